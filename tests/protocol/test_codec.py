"""Tests of the integer codec used for secure sums."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsynth.protocol import codec
from fedsynth.protocol.errors import ConfigError, FieldRangeError, ShapeError

BITS = (16, 32, 48, 64)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# validate_bits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [16, 17, 32, 63, 64])
def test_validate_bits_accepts_range(bits: int) -> None:
    assert codec.validate_bits(bits) == bits


@pytest.mark.parametrize("bits", [15, 0, -1, 65, 128])
def test_validate_bits_rejects_out_of_range(bits: int) -> None:
    with pytest.raises(ConfigError, match=rf"bits={bits}.*\[16, 64\]"):
        codec.validate_bits(bits)


@pytest.mark.parametrize("bits", [True, 32.0, "32", None])
def test_validate_bits_rejects_non_int(bits: Any) -> None:
    with pytest.raises(ConfigError, match="bits"):
        codec.validate_bits(bits)


# ---------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------


def test_quantize_is_unbiased() -> None:
    x = np.array([0.3, -1.7, 2.25, 1e-3, -0.999, 5.0, 0.5])
    scale = 3.0
    draws = 40_000
    q = codec.quantize(np.tile(x, (draws, 1)), scale=scale, rng=_rng(1))
    assert q.dtype == np.int64
    target = x * scale
    frac = target - np.floor(target)
    std_err = np.sqrt(frac * (1 - frac) / draws)
    mean = q.mean(axis=0)
    assert np.all(np.abs(mean - target) <= 5 * std_err + 1e-9), (mean, target, std_err)


def test_quantize_exact_values_are_deterministic() -> None:
    x = np.array([0.0, 1.0, -2.0, 1.5])
    q = codec.quantize(x, scale=2.0, rng=_rng())
    np.testing.assert_array_equal(q, [0, 2, -4, 3])


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=32,
    ),
    scale=st.floats(min_value=1e-3, max_value=2.0**20),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantize_error_below_one(values: list[float], scale: float, seed: int) -> None:
    x = np.array(values)
    q = codec.quantize(x, scale=scale, rng=_rng(seed))
    assert q.shape == x.shape
    assert np.all(np.abs(q.astype(np.float64) - x * scale) < 1.0)


def test_quantize_keeps_shape() -> None:
    x = np.zeros((3, 4, 5))
    assert codec.quantize(x, scale=1.0, rng=_rng()).shape == (3, 4, 5)
    assert codec.quantize(np.zeros(0), scale=1.0, rng=_rng()).shape == (0,)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_quantize_rejects_bad_scale(scale: float) -> None:
    with pytest.raises(ConfigError, match="scale"):
        codec.quantize(np.ones(3), scale=scale, rng=_rng())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_quantize_rejects_non_finite_input(bad: float) -> None:
    with pytest.raises(ShapeError, match="non-finite"):
        codec.quantize(np.array([1.0, bad]), scale=1.0, rng=_rng())


def test_quantize_rejects_non_numeric_input() -> None:
    with pytest.raises(ShapeError, match="dtype"):
        codec.quantize(np.array(["a", "b"]), scale=1.0, rng=_rng())
    with pytest.raises(ShapeError, match="dtype"):
        codec.quantize(np.array([True, False]), scale=1.0, rng=_rng())


def test_quantize_overflow_raises() -> None:
    with pytest.raises(FieldRangeError, match=r"2\*\*62"):
        codec.quantize(np.array([1.0, 2.0**62]), scale=1.0, rng=_rng())
    with pytest.raises(FieldRangeError, match=r"2\*\*62"):
        codec.quantize(np.array([-1.0]), scale=2.0**62, rng=_rng())
    # x * scale overflowing float64 is reported the same way.
    with pytest.raises(FieldRangeError):
        codec.quantize(np.array([1e300]), scale=1e300, rng=_rng())
    # Just below the limit is fine.
    q = codec.quantize(np.array([-(2.0**61)]), scale=1.0, rng=_rng())
    assert int(q[0]) == -(2**61)


def test_quantize_requires_generator() -> None:
    with pytest.raises(TypeError, match="Generator"):
        legacy: Any = np.random.RandomState(0)
        codec.quantize(np.ones(2), scale=1.0, rng=legacy)


# ---------------------------------------------------------------------------------------------
# to_field / from_field
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_extremes(bits: int) -> None:
    half = 1 << (bits - 1)
    values = np.array([-half, -half + 1, -1, 0, 1, half - 2, half - 1], dtype=np.int64)
    field = codec.to_field(values, bits=bits)
    assert field.dtype == np.uint64
    mod = 1 << bits
    assert [int(e) for e in field] == [int(v) % mod for v in values]
    np.testing.assert_array_equal(codec.from_field(field, bits=bits), values)


@settings(max_examples=50, deadline=None)
@given(data=st.data(), bits=st.sampled_from(BITS))
def test_round_trip_random(data: st.DataObject, bits: int) -> None:
    half = 1 << (bits - 1)
    ints = data.draw(st.lists(st.integers(-half, half - 1), min_size=0, max_size=20))
    values = np.array(ints, dtype=np.int64)
    field = codec.to_field(values, bits=bits)
    assert all(0 <= int(e) < (1 << bits) for e in field)
    np.testing.assert_array_equal(codec.from_field(field, bits=bits), values)


@pytest.mark.parametrize("bits", [16, 32, 48])
def test_to_field_overflow_names_value_and_limit(bits: int) -> None:
    half = 1 << (bits - 1)
    with pytest.raises(FieldRangeError, match=rf"\|value\| = {half}\b.*{bits}-bit"):
        codec.to_field(np.array([0, half], dtype=np.int64), bits=bits)
    with pytest.raises(FieldRangeError, match=rf"\|value\| = {half + 1}\b"):
        codec.to_field(np.array([-half - 1], dtype=np.int64), bits=bits)


def test_to_field_64_accepts_all_int64() -> None:
    info = np.iinfo(np.int64)
    values = np.array([info.min, info.max], dtype=np.int64)
    np.testing.assert_array_equal(
        codec.from_field(codec.to_field(values, bits=64), bits=64), values
    )


def test_to_field_accepts_smaller_int_dtypes() -> None:
    values = np.array([-3, 7], dtype=np.int16)
    np.testing.assert_array_equal(
        codec.from_field(codec.to_field(values, bits=16), bits=16), [-3, 7]
    )


@pytest.mark.parametrize(
    "values",
    [np.array([1.0, 2.0]), np.array([1, 2], dtype=np.uint64), [1, 2]],
)
def test_to_field_rejects_non_int64_castable(values: Any) -> None:
    with pytest.raises(ShapeError):
        codec.to_field(values, bits=32)


def test_from_field_checks_range_and_dtype() -> None:
    with pytest.raises(FieldRangeError, match=r"65536 >= 2\^16"):
        codec.from_field(np.array([1, 1 << 16], dtype=np.uint64), bits=16)
    with pytest.raises(ShapeError, match="uint64"):
        codec.from_field(np.array([1, 2], dtype=np.int64), bits=16)


def test_check_field_elements() -> None:
    ok = np.array([0, 65535], dtype=np.uint64)
    codec.check_field_elements(ok, bits=16, expected_shape=(2,))
    with pytest.raises(ShapeError, match=r"myvec has shape \(2,\), expected \(3,\)"):
        codec.check_field_elements(ok, bits=16, expected_shape=(3,), name="myvec")
    with pytest.raises(ShapeError, match="dtype uint64"):
        codec.check_field_elements(ok.astype(np.uint32), bits=16)
    with pytest.raises(ShapeError, match="numpy uint64 array"):
        not_an_array: Any = [0, 1]
        codec.check_field_elements(not_an_array, bits=16)
    with pytest.raises(FieldRangeError, match="65536"):
        codec.check_field_elements(np.array([65536], dtype=np.uint64), bits=16)
    codec.check_field_elements(np.array([2**64 - 1], dtype=np.uint64), bits=64)
    with pytest.raises(ConfigError):
        codec.check_field_elements(ok, bits=8)


# ---------------------------------------------------------------------------------------------
# Field arithmetic
# ---------------------------------------------------------------------------------------------

_u64s = st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=16)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), bits=st.sampled_from(BITS))
def test_field_ops_match_python_ints(data: st.DataObject, bits: int) -> None:
    mod = 1 << bits
    n = data.draw(st.integers(1, 16))
    vecs = [data.draw(st.lists(st.integers(0, mod - 1), min_size=n, max_size=n)) for _ in range(3)]
    arrays = [np.array(v, dtype=np.uint64) for v in vecs]
    a, b, c = vecs
    added = codec.field_add(arrays[0], arrays[1], bits=bits)
    subbed = codec.field_sub(arrays[0], arrays[1], bits=bits)
    summed = codec.field_sum(arrays, bits=bits)
    assert [int(e) for e in added] == [(x + y) % mod for x, y in zip(a, b, strict=True)]
    assert [int(e) for e in subbed] == [(x - y) % mod for x, y in zip(a, b, strict=True)]
    assert [int(e) for e in summed] == [(x + y + z) % mod for x, y, z in zip(a, b, c, strict=True)]
    for out in (added, subbed, summed):
        assert out.dtype == np.uint64


def test_field_ops_exact_at_64_bit_extremes() -> None:
    top = np.array([2**64 - 1, 2**63, 0], dtype=np.uint64)
    one = np.array([1, 2**63, 1], dtype=np.uint64)
    np.testing.assert_array_equal(
        codec.field_add(top, one, bits=64), np.array([0, 0, 1], np.uint64)
    )
    np.testing.assert_array_equal(
        codec.field_sub(one, top, bits=64), np.array([2, 0, 1], dtype=np.uint64)
    )
    many = codec.field_sum([top] * 1000, bits=64)
    assert [int(e) for e in many] == [(1000 * int(v)) % 2**64 for v in top]


def test_field_ops_do_not_modify_inputs() -> None:
    a = np.array([5, 6], dtype=np.uint64)
    b = np.array([7, 8], dtype=np.uint64)
    codec.field_add(a, b, bits=16)
    codec.field_sum([a, b], bits=16)
    np.testing.assert_array_equal(a, [5, 6])
    np.testing.assert_array_equal(b, [7, 8])


def test_field_ops_validate() -> None:
    a = np.array([1, 2], dtype=np.uint64)
    with pytest.raises(ShapeError, match="shape"):
        codec.field_add(a, np.array([1, 2, 3], dtype=np.uint64), bits=32)
    with pytest.raises(FieldRangeError):
        codec.field_sub(a, np.array([1, 2**32], dtype=np.uint64), bits=32)
    with pytest.raises(ShapeError, match="at least one"):
        codec.field_sum([], bits=32)
    with pytest.raises(ShapeError, match=r"arrays\[1\]"):
        codec.field_sum([a, np.array([1], dtype=np.uint64)], bits=32)


@settings(max_examples=50, deadline=None)
@given(
    data=st.data(),
    bits=st.sampled_from(BITS),
    count=st.integers(1, 12),
)
def test_field_sum_of_encoded_ints_decodes_to_integer_sum(
    data: st.DataObject, bits: int, count: int
) -> None:
    # Keep |sum| < 2^(bits-1): each term bounded by 2^(bits-1) / count.
    bound = (1 << (bits - 1)) // count - 1
    dim = data.draw(st.integers(1, 8))
    rows = [
        data.draw(st.lists(st.integers(-bound, bound), min_size=dim, max_size=dim))
        for _ in range(count)
    ]
    encoded = [codec.to_field(np.array(r, dtype=np.int64), bits=bits) for r in rows]
    total = codec.from_field(codec.field_sum(encoded, bits=bits), bits=bits)
    assert [int(v) for v in total] == [sum(col) for col in zip(*rows, strict=True)]


def test_field_sum_wraps_like_twos_complement() -> None:
    bits = 16
    a = codec.to_field(np.array([32767], dtype=np.int64), bits=bits)
    b = codec.to_field(np.array([1], dtype=np.int64), bits=bits)
    assert int(codec.from_field(codec.field_sum([a, b], bits=bits), bits=bits)[0]) == -32768


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(
        st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=32,
    ),
    scale=st.sampled_from([1.0, 7.5, 2.0**10, 2.0**16]),
    bits=st.sampled_from([32, 48, 64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_decode_inverts_quantize(values: list[float], scale: float, bits: int, seed: int) -> None:
    x = np.array(values)
    field = codec.to_field(codec.quantize(x, scale=scale, rng=_rng(seed)), bits=bits)
    decoded = codec.decode(field, bits=bits, scale=scale)
    assert decoded.dtype == np.float64
    assert np.all(np.abs(decoded - x) <= 1.0 / scale + 1e-9 * np.maximum(1.0, np.abs(x)))


def test_decode_validates_scale() -> None:
    with pytest.raises(ConfigError, match="scale"):
        codec.decode(np.zeros(2, dtype=np.uint64), bits=32, scale=0.0)
