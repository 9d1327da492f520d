"""Integer codec for secure sums: fixed-point quantization and arithmetic modulo 2^bits.

Real vectors are scaled and rounded to integers with unbiased randomized rounding
(:func:`quantize`), embedded into the ring Z/2^bits by two's complement (:func:`to_field`),
summed there (:func:`field_sum`), and lifted back to centered integers (:func:`from_field`,
:func:`decode`).

Field elements are always ``numpy.uint64`` arrays whose entries lie in ``[0, 2^bits)``. Arithmetic
uses numpy's native uint64 wraparound (which is reduction modulo 2^64) followed by a bit mask, so it
is exact for every ``bits`` in ``[MIN_BITS, MAX_BITS]``, including 64; no value ever passes through
a float or an unbounded Python integer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from fedsynth.protocol.errors import ConfigError, FieldRangeError, ShapeError

__all__ = [
    "MAX_ABS_SCALED",
    "MAX_BITS",
    "MIN_BITS",
    "check_field_elements",
    "decode",
    "field_add",
    "field_sub",
    "field_sum",
    "from_field",
    "quantize",
    "to_field",
    "validate_bits",
]

MAX_BITS = 64
"""Largest supported field size in bits (the ring Z/2^64, native uint64 arithmetic)."""

MIN_BITS = 16
"""Smallest supported field size in bits."""

MAX_ABS_SCALED = 2**62
"""Exclusive bound on ``|x * scale|`` accepted by :func:`quantize` (keeps int64 headroom)."""


def validate_bits(bits: int) -> int:
    """Check that a field size is supported.

    Args:
        bits: Number of bits of the ring Z/2^bits.

    Returns:
        ``bits`` unchanged.

    Raises:
        ConfigError: If ``bits`` is not an integer in ``[MIN_BITS, MAX_BITS]``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer):
        raise ConfigError(
            f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r} "
            f"of type {type(bits).__name__}"
        )
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ConfigError(f"bits={int(bits)} is outside the allowed range [{MIN_BITS}, {MAX_BITS}]")
    return int(bits)


def _validate_scale(scale: float) -> float:
    """Return ``scale`` as a float after checking it is finite and positive."""
    if isinstance(scale, bool) or not isinstance(scale, int | float | np.integer | np.floating):
        raise ConfigError(f"scale must be a positive finite number, got {scale!r}")
    value = float(scale)
    if not math.isfinite(value) or value <= 0.0:
        raise ConfigError(f"scale={scale!r} must be finite and > 0")
    return value


def _modulus_mask(bits: int) -> np.uint64:
    """Return ``2^bits - 1`` as a numpy uint64 (all ones for ``bits == 64``)."""
    return np.uint64((1 << bits) - 1)


def _reduce(values: npt.NDArray[np.uint64], bits: int) -> npt.NDArray[np.uint64]:
    """Reduce uint64 values (already correct modulo 2^64) modulo 2^bits."""
    if bits == MAX_BITS:
        return values
    return np.asarray(np.bitwise_and(values, _modulus_mask(bits)), dtype=np.uint64)


def quantize(x: npt.ArrayLike, *, scale: float, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Scale real values and round them to integers with unbiased randomized rounding.

    Each entry ``y = x * scale`` becomes ``floor(y) + B`` where ``B ~ Bernoulli(y - floor(y))``,
    so ``E[quantize(x)] = x * scale`` and ``|quantize(x) - x * scale| < 1``.

    Args:
        x: Real-valued array (any shape) of finite numbers.
        scale: Fixed-point scale factor, finite and > 0.
        rng: Source of the rounding randomness.

    Returns:
        An int64 array with the shape of ``x``.

    Raises:
        ConfigError: If ``scale`` is not finite or not > 0.
        TypeError: If ``rng`` is not a ``numpy.random.Generator``.
        ShapeError: If ``x`` is not a real numeric array or holds NaN or infinite values.
        FieldRangeError: If any ``|x * scale| >= 2**62`` (int64 would overflow).
    """
    scale_f = _validate_scale(scale)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ShapeError(f"x must be a real numeric array, got dtype {arr.dtype}")
    values = arr.astype(np.float64)
    finite = np.isfinite(values)
    if not bool(np.all(finite)):
        bad = int(np.size(finite) - np.count_nonzero(finite))
        raise ShapeError(f"x holds {bad} non-finite value(s) (NaN or inf); all must be finite")
    with np.errstate(over="ignore"):
        scaled = values * scale_f
    if scaled.size:
        largest = float(np.max(np.abs(scaled)))
        if not largest < MAX_ABS_SCALED:
            raise FieldRangeError(
                f"largest |x * scale| = {largest:.6g} (scale={scale_f:.6g}) reaches the limit "
                f"2**62 = {MAX_ABS_SCALED}; reduce scale or clip x"
            )
    low = np.floor(scaled)
    frac = scaled - low
    bump = rng.random(size=scaled.shape) < frac
    return np.asarray(low.astype(np.int64) + bump.astype(np.int64), dtype=np.int64)


def check_field_elements(
    elements: npt.NDArray[Any],
    *,
    bits: int,
    expected_shape: tuple[int, ...] | None = None,
    name: str = "vector",
) -> None:
    """Check that an array is a valid vector of field elements.

    Args:
        elements: Candidate array.
        bits: Field size in bits.
        expected_shape: Required shape, or ``None`` to accept any shape.
        name: Name of the array used in error messages.

    Raises:
        ConfigError: If ``bits`` is unsupported.
        ShapeError: If ``elements`` is not a uint64 numpy array or its shape differs.
        FieldRangeError: If any element is ``>= 2^bits``.
    """
    bits = validate_bits(bits)
    if not isinstance(elements, np.ndarray):
        raise ShapeError(f"{name} must be a numpy uint64 array, got {type(elements).__name__}")
    if elements.dtype != np.uint64:
        raise ShapeError(f"{name} must have dtype uint64, got dtype {elements.dtype}")
    if expected_shape is not None and tuple(elements.shape) != tuple(expected_shape):
        raise ShapeError(
            f"{name} has shape {tuple(elements.shape)}, expected {tuple(expected_shape)}"
        )
    if bits < MAX_BITS and elements.size:
        largest = int(np.max(elements))
        if largest >= 1 << bits:
            raise FieldRangeError(
                f"{name} holds element {largest} >= 2^{bits} = {1 << bits} (field size limit)"
            )


def to_field(values: npt.NDArray[Any], *, bits: int) -> npt.NDArray[np.uint64]:
    """Embed signed integers into Z/2^bits by two's complement.

    Args:
        values: Integer array whose dtype casts safely to int64 (any shape).
        bits: Field size in bits.

    Returns:
        A uint64 array of field elements in ``[0, 2^bits)`` with the shape of ``values``.

    Raises:
        ConfigError: If ``bits`` is unsupported.
        ShapeError: If ``values`` is not an integer numpy array castable to int64.
        FieldRangeError: If any value lies outside ``[-2^(bits-1), 2^(bits-1))``.
    """
    bits = validate_bits(bits)
    if not isinstance(values, np.ndarray):
        raise ShapeError(f"values must be a numpy integer array, got {type(values).__name__}")
    if not np.issubdtype(values.dtype, np.integer) or not np.can_cast(
        values.dtype, np.int64, casting="safe"
    ):
        raise ShapeError(f"values must have an integer dtype castable to int64, got {values.dtype}")
    ints = np.ascontiguousarray(values, dtype=np.int64)
    if bits < MAX_BITS and ints.size:
        low, high = int(np.min(ints)), int(np.max(ints))
        half = 1 << (bits - 1)
        if low < -half or high >= half:
            largest = max(abs(low), abs(high))
            raise FieldRangeError(
                f"values hold |value| = {largest}, outside the {bits}-bit range "
                f"[-2^{bits - 1}, 2^{bits - 1}) = [{-half}, {half})"
            )
    return _reduce(ints.view(np.uint64).copy(), bits)


def from_field(elements: npt.NDArray[Any], *, bits: int) -> npt.NDArray[np.int64]:
    """Lift field elements to centered signed integers.

    Elements ``>= 2^(bits-1)`` map to ``element - 2^bits``; the others are unchanged.

    Args:
        elements: uint64 array with entries in ``[0, 2^bits)``.
        bits: Field size in bits.

    Returns:
        An int64 array in ``[-2^(bits-1), 2^(bits-1))`` with the shape of ``elements``.

    Raises:
        ConfigError: If ``bits`` is unsupported.
        ShapeError: If ``elements`` is not a uint64 numpy array.
        FieldRangeError: If any element is ``>= 2^bits``.
    """
    bits = validate_bits(bits)
    check_field_elements(elements, bits=bits, name="elements")
    shift = MAX_BITS - bits
    # Move the field's sign bit to bit 63, reinterpret as int64, then shift back arithmetically:
    # an exact sign extension for every bits in [16, 64].
    raised = np.left_shift(np.ascontiguousarray(elements), np.uint64(shift))
    signed = np.ascontiguousarray(raised).view(np.int64)
    return np.asarray(np.right_shift(signed, np.int64(shift)), dtype=np.int64)


def _check_pair(
    a: npt.NDArray[Any], b: npt.NDArray[Any], bits: int
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Validate two field vectors of equal shape and return them typed."""
    check_field_elements(a, bits=bits, name="a")
    check_field_elements(b, bits=bits, expected_shape=tuple(a.shape), name="b")
    return a, b


def field_add(a: npt.NDArray[Any], b: npt.NDArray[Any], *, bits: int) -> npt.NDArray[np.uint64]:
    """Add two field vectors modulo 2^bits.

    Args:
        a: uint64 array of field elements.
        b: uint64 array of field elements with the shape of ``a``.
        bits: Field size in bits.

    Returns:
        ``(a + b) mod 2^bits`` as a new uint64 array.

    Raises:
        ConfigError: If ``bits`` is unsupported.
        ShapeError: If an input is not uint64 or the shapes differ.
        FieldRangeError: If an input holds an element ``>= 2^bits``.
    """
    bits = validate_bits(bits)
    left, right = _check_pair(a, b, bits)
    with np.errstate(over="ignore"):
        total = np.asarray(np.add(left, right, dtype=np.uint64), dtype=np.uint64)
    return _reduce(total, bits)


def field_sub(a: npt.NDArray[Any], b: npt.NDArray[Any], *, bits: int) -> npt.NDArray[np.uint64]:
    """Subtract two field vectors modulo 2^bits.

    Args:
        a: uint64 array of field elements (minuend).
        b: uint64 array of field elements with the shape of ``a`` (subtrahend).
        bits: Field size in bits.

    Returns:
        ``(a - b) mod 2^bits`` as a new uint64 array.

    Raises:
        ConfigError: If ``bits`` is unsupported.
        ShapeError: If an input is not uint64 or the shapes differ.
        FieldRangeError: If an input holds an element ``>= 2^bits``.
    """
    bits = validate_bits(bits)
    left, right = _check_pair(a, b, bits)
    with np.errstate(over="ignore"):
        diff = np.asarray(np.subtract(left, right, dtype=np.uint64), dtype=np.uint64)
    return _reduce(diff, bits)


def field_sum(arrays: Iterable[npt.NDArray[Any]], *, bits: int) -> npt.NDArray[np.uint64]:
    """Sum field vectors modulo 2^bits.

    Args:
        arrays: One or more uint64 arrays of equal shape.
        bits: Field size in bits.

    Returns:
        The modular sum as a new uint64 array.

    Raises:
        ConfigError: If ``bits`` is unsupported.
        ShapeError: If ``arrays`` is empty, an input is not uint64, or the shapes differ.
        FieldRangeError: If an input holds an element ``>= 2^bits``.
    """
    bits = validate_bits(bits)
    total: npt.NDArray[np.uint64] | None = None
    for index, arr in enumerate(arrays):
        if total is None:
            check_field_elements(arr, bits=bits, name="arrays[0]")
            total = np.array(arr, dtype=np.uint64, copy=True)
            continue
        check_field_elements(
            arr, bits=bits, expected_shape=tuple(total.shape), name=f"arrays[{index}]"
        )
        with np.errstate(over="ignore"):
            np.add(total, arr, out=total, dtype=np.uint64)
        total = _reduce(total, bits)
    if total is None:
        raise ShapeError("field_sum needs at least one array, got none")
    return total


def decode(elements: npt.NDArray[Any], *, bits: int, scale: float) -> npt.NDArray[np.float64]:
    """Lift field elements to centered integers and undo the fixed-point scale.

    Args:
        elements: uint64 array with entries in ``[0, 2^bits)``.
        bits: Field size in bits.
        scale: The fixed-point scale used by :func:`quantize`, finite and > 0.

    Returns:
        ``from_field(elements) / scale`` as float64.

    Raises:
        ConfigError: If ``bits`` or ``scale`` is invalid.
        ShapeError: If ``elements`` is not a uint64 numpy array.
        FieldRangeError: If any element is ``>= 2^bits``.
    """
    scale_f = _validate_scale(scale)
    ints = from_field(elements, bits=bits)
    return np.asarray(ints.astype(np.float64) / scale_f, dtype=np.float64)
