"""Shamir sharing over GF(2^383 - 31): reconstruction, secrecy, the old format, tampering.

The reference for "reconstructs exactly what the old one did" is Flower's GF(2^128) sharing
(``create_shares``/``combine_shares``, backed by PyCryptodome), kept here test-only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets as pysecrets
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from hypothesis import given, settings
from hypothesis import strategies as st
from secagg_harness import make_round

from fedsynth.protocol.errors import (
    ProtocolError,
    ShareError,
    TooFewParticipantsError,
    TooFewSharesError,
)
from fedsynth.protocol.secagg import KEY_BYTES, SHARE_BYTES, Stage, shamir
from fedsynth.protocol.secagg.crypto import (
    CHECK_BYTES,
    check_share,
    combine_secret,
    combine_secrets,
    split_secret,
    split_secrets,
)

P = shamir.PRIME


# ---------------------------------------------------------------------------------------------
# Test-only reference: the former implementation (Flower / PyCryptodome, GF(2^128) chunks)
# ---------------------------------------------------------------------------------------------

_CHECK_TAG = b"fedsynth/secagg/share-check"


def _reference_pack(secret: bytes) -> bytes:
    return secret + hashlib.sha256(_CHECK_TAG + secret).digest()[:CHECK_BYTES]


def _reference_split(secret: bytes, t: int, k: int) -> list[bytes]:
    return [bytes(s) for s in create_shares(_reference_pack(secret), t, k)]


def _reference_combine(shares: list[bytes]) -> bytes:
    packed = combine_shares(shares)
    secret, check = packed[:KEY_BYTES], packed[KEY_BYTES:]
    assert hmac.compare_digest(check, _reference_pack(secret)[KEY_BYTES:])
    return secret


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _interpolate(points: Sequence[tuple[int, int]], x: int) -> int:
    """Value at ``x`` of the unique polynomial of degree < len(points) through ``points``."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num = num * (x - xj) % P
                den = den * (xi - xj) % P
        total += yi * num * pow(den, -1, P)
    return total % P


def _flip(share: bytes, position: int, bit: int = 0x01) -> bytes:
    raw = bytearray(share)
    raw[position] ^= bit
    return bytes(raw)


# ---------------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------------


def test_the_modulus_is_a_prime_that_holds_every_packed_secret() -> None:
    # Miller-Rabin with the first 20 primes as bases: a composite passes with chance < 4^-20.
    d, r = P - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for base in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71):
        x = pow(base, d, P)
        if x in (1, P - 1):
            continue
        for _ in range(r - 1):
            x = x * x % P
            if x == P - 1:
                break
        else:
            pytest.fail(f"{base} witnesses that the modulus is composite")
    assert 2 ** (8 * (KEY_BYTES + CHECK_BYTES)) < P < 2**383
    # No odd number between it and 2^383 is prime (each fails Fermat's test to base 3).
    assert all(pow(3, n - 1, n) != 1 for n in range(P + 2, 2**383, 2))


def test_share_length_is_the_protocol_constant() -> None:
    shares = split_secret(bytes(range(32)), 2, 3)
    assert shamir.SHARE_BYTES == SHARE_BYTES == 52  # as long as the former shares
    assert [len(s) for s in shares] == [SHARE_BYTES] * 3
    assert [int.from_bytes(s[:4], "little") for s in shares] == [1, 2, 3]


@settings(derandomize=True, max_examples=60, deadline=None)
@given(data=st.data(), k=st.integers(2, 12))
def test_any_t_of_k_shares_reconstruct(data: st.DataObject, k: int) -> None:
    t = data.draw(st.integers(2, k), label="t")
    chosen = data.draw(st.permutations(range(k)), label="order")[:t]
    values = data.draw(st.lists(st.integers(0, P - 1), min_size=1, max_size=3), label="secrets")
    rows = shamir.split(values, threshold=t, num=k)
    assert len(rows) == k and all(len(row) == len(values) for row in rows)
    indices = [i + 1 for i in chosen]
    columns = [[rows[i][j] for i in chosen] for j in range(len(values))]
    assert shamir.combine(indices, columns, num=k) == values
    # t - 1 of the same shares, interpolated as if they were all there is, miss every secret.
    fewer = shamir.combine(indices[:-1], [column[:-1] for column in columns], num=k)
    assert all(guess != value for guess, value in zip(fewer, values, strict=True))
    # The same through the byte encoding, the integrity check and the batched combine.
    raw = [data.draw(st.binary(min_size=32, max_size=32), label=f"key {j}") for j in range(2)]
    shares = split_secrets(raw, t, k)
    picked = {100 + j: [shares[j][i] for i in chosen] for j in range(2)}
    got = combine_secrets(picked, threshold=t, what={}, num=k)
    assert got == {100: raw[0], 101: raw[1]}


def test_more_than_t_consistent_shares_give_the_same_secret() -> None:
    secret = pysecrets.token_bytes(32)
    shares = split_secret(secret, 3, 7)
    assert combine_secret(shares, owner=1, what="seed") == secret
    assert combine_secret(shares[2:5], owner=1, what="seed") == secret


def test_lagrange_coefficients_interpolate_constants_and_are_batched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert sum(shamir.lagrange_at_zero([2, 5, 9, 11])) % P == 1  # a constant polynomial
    calls: list[tuple[int, ...]] = []
    original = shamir.lagrange_at_zero

    def counting(indices: Sequence[int], *, num: int | None = None) -> list[int]:
        calls.append(tuple(indices))
        return original(indices, num=num)

    monkeypatch.setattr(shamir, "lagrange_at_zero", counting)
    values = [pysecrets.randbelow(P) for _ in range(20)]
    rows = shamir.split(values, threshold=3, num=6)
    same = {n: [(i, rows[i - 1][n]) for i in (2, 4, 5)] for n in range(15)}
    other = {n: [(i, rows[i - 1][n]) for i in (1, 3, 6)] for n in range(15, 20)}
    assert shamir.reconstruct({**same, **other}, threshold=3, num=6) == dict(enumerate(values))
    assert sorted(calls) == [(1, 3, 6), (2, 4, 5)]  # one coefficient set per index set


def test_the_coordinator_reconstructs_every_secret_with_one_coefficient_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[int, ...]] = []
    original = shamir.lagrange_at_zero

    def counting(indices: Sequence[int], *, num: int | None = None) -> list[int]:
        calls.append(tuple(indices))
        return original(indices, num=num)

    monkeypatch.setattr(shamir, "lagrange_at_zero", counting)
    rnd = make_round(7, 4, dim=16, seed=11)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input(absent=[102, 105])
    rnd.consistency()
    np.testing.assert_array_equal(rnd.server.unmask(rnd.responses()), rnd.expected())
    assert len(calls) == 1  # 5 seeds and 2 mask keys, all from the same 4 survivors


# ---------------------------------------------------------------------------------------------
# Secrecy of t - 1 shares
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "t"), [(3, 2), (5, 3), (10, 6)])
def test_t_minus_1_shares_are_consistent_with_every_secret(k: int, t: int) -> None:
    secret = pysecrets.randbelow(P)
    rows = shamir.split([secret], threshold=t, num=k)
    known = [(x, rows[x - 1][0]) for x in range(1, t)]  # t - 1 shares
    missing = t  # an index not among them
    for candidate in [0, 1, secret, P - 1, *(pysecrets.randbelow(P) for _ in range(5))]:
        # The unique polynomial through (0, candidate) and the t - 1 shares gives a t-th share
        # with which the same t - 1 shares reconstruct the candidate: nothing is ruled out.
        extra = _interpolate([(0, candidate), *known], missing)
        indices = [x for x, _ in known] + [missing]
        got = shamir.combine(indices, [[y for _, y in known] + [extra]], num=k)
        assert got == [candidate]


def test_t_minus_1_shares_interpolate_to_uniform_values() -> None:
    secret = pysecrets.randbelow(P)
    t, k, n = 3, 5, 4000
    guesses = []
    for _ in range(n):
        rows = shamir.split([secret], threshold=t, num=k)
        # Interpolating the t - 1 shares at 1 and 2 as if they were all there is.
        guesses.append(shamir.combine([1, 2], [[rows[0][0], rows[1][0]]], num=k)[0])
    assert len(set(guesses)) == n  # every sharing differs
    assert secret not in guesses
    # Each of the 64 low bits and the top bit of the guess is a fair coin (6 sigma).
    tolerance = 6 * 0.5 / np.sqrt(n)
    for bit in [*range(64), P.bit_length() - 1]:
        share_of_ones = sum((g >> bit) & 1 for g in guesses) / n
        assert abs(share_of_ones - 0.5) < tolerance, bit


def test_sharings_of_one_secret_are_fresh() -> None:
    secret = pysecrets.token_bytes(32)
    first, second = split_secret(secret, 3, 5), split_secret(secret, 3, 5)
    assert all(a != b for a, b in zip(first, second, strict=True))
    both = split_secrets([secret, secret], 3, 5)
    assert all(a != b for a, b in zip(both[0], both[1], strict=True))


# ---------------------------------------------------------------------------------------------
# The old implementation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "t"), [(2, 2), (3, 2), (5, 3), (9, 5), (12, 12)])
def test_same_bytes_as_the_flower_implementation(k: int, t: int) -> None:
    rng = np.random.default_rng(k * 100 + t)
    keys = [bytes(32), b"\xff" * 32, X25519PrivateKey.generate().private_bytes_raw()]
    keys += [pysecrets.token_bytes(32) for _ in range(3)]
    for secret in keys:
        subset = sorted(rng.choice(k, size=t, replace=False).tolist())
        old = _reference_split(secret, t, k)
        new = split_secret(secret, t, k)
        old_result = _reference_combine([old[i] for i in subset])
        new_result = combine_secret([new[i] for i in subset], owner=7, what="key")
        assert old_result == new_result == secret
        # Same index convention: share i goes to Shamir index i + 1 in both.
        assert [s[:4] for s in old] == [s[:4] for s in new]
    # A mask key reconstructed by either path is the same X25519 key.
    key = X25519PrivateKey.generate()
    raw = key.private_bytes_raw()
    via_new = combine_secret(split_secret(raw, t, k)[:t], owner=1, what="mask key")
    via_old = _reference_combine(_reference_split(raw, t, k)[:t])
    assert via_new == via_old
    pk = key.public_key().public_bytes_raw()
    assert X25519PrivateKey.from_private_bytes(via_new).public_key().public_bytes_raw() == pk


# ---------------------------------------------------------------------------------------------
# Tampered and malformed shares
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", [4, 5, 30, 50, 51])
def test_a_tampered_share_fails_the_integrity_check(position: int) -> None:
    secret = pysecrets.token_bytes(32)
    shares = split_secret(secret, 3, 5)
    tampered = [shares[0], _flip(shares[1], position), shares[2]]
    with pytest.raises(ShareError, match=r"node 9.*at least one share is corrupt"):
        combine_secret(tampered, owner=9, what="mask key")
    with pytest.raises(ProtocolError):  # a ShareError is a ProtocolError
        combine_secrets({9: tampered}, threshold=3, what={9: "seed"}, num=5)


def test_a_tampered_share_is_skipped_when_t_valid_ones_remain() -> None:
    rnd = make_round(6, 4, dim=16, seed=12)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input(absent=[105])
    rnd.consistency()
    responses = rnd.responses()
    liar = min(responses)  # its shares would be among the first t used
    responses[liar] = {o: _flip(s, 40) for o, s in responses[liar].items()}
    np.testing.assert_array_equal(rnd.server.unmask(responses), rnd.expected())
    assert "fails its commitment" in rnd.server.rejected[liar]


def test_tampered_shares_fail_clearly_when_fewer_than_t_valid_remain() -> None:
    rnd = make_round(6, 4, dim=16, seed=13)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input(absent=[104, 105])
    rnd.consistency()
    responses = rnd.responses()
    assert len(responses) == 4
    liar = max(responses)
    responses[liar] = {o: _flip(s, 45) for o, s in responses[liar].items()}
    with pytest.raises(TooFewParticipantsError, match=r"valid shares per node.*t=4"):
        rnd.server.unmask(responses)
    assert rnd.server.stage == Stage.UNMASK  # nothing was revealed or consumed


def test_a_share_value_outside_the_field_is_malformed() -> None:
    share = split_secret(bytes(32), 2, 3)[0]
    too_big = share[:4] + P.to_bytes(shamir.VALUE_BYTES, "big")
    with pytest.raises(ShareError, match="not below the field prime"):
        check_share(too_big, expected_index=1, field="b-share")
    with pytest.raises(ShareError, match="not below the field prime"):
        shamir.decode_share(too_big)


@pytest.mark.parametrize(
    ("indices", "match"),
    [
        ([1, 2, 2], "appears more than once"),
        ([0, 1, 2], "is 0"),
        ([1, 2, 7], r"outside \[1, 6\]"),
        ([1, True, 3], "must be an int"),
    ],
)
def test_bad_indices_are_refused(indices: list[Any], match: str) -> None:
    with pytest.raises(ShareError, match=match):
        shamir.lagrange_at_zero(indices, num=6)
    with pytest.raises(ShareError, match=match):
        shamir.combine(indices, [[1, 2, 3]], num=6)


def test_duplicate_share_bytes_are_refused() -> None:
    shares = split_secret(bytes(range(32)), 2, 4)
    with pytest.raises(ShareError, match="appears more than once"):
        combine_secret([shares[1], shares[1]], owner=3, what="seed")


def test_fewer_than_t_shares_are_refused() -> None:
    values = [5, 6]
    rows = shamir.split(values, threshold=3, num=4)
    owned = {0: [(1, rows[0][0]), (2, rows[1][0])], 1: [(i + 1, rows[i][1]) for i in range(3)]}
    with pytest.raises(TooFewSharesError, match="secret 0 has 2 shares, threshold t=3"):
        shamir.reconstruct(owned, threshold=3, num=4)
    shares = split_secret(bytes(32), 3, 4)
    with pytest.raises(TooFewParticipantsError, match="node 5 has 2 shares"):
        combine_secrets({5: shares[:2]}, threshold=3, what={}, num=4)
    with pytest.raises(TooFewSharesError):
        combine_secret([], owner=1, what="seed")


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x01\x00\x00\x00" + bytes(47), b"\x01\x00\x00\x00" + bytes(49), "not bytes"],
)
def test_malformed_share_bytes_are_refused(raw: object) -> None:
    with pytest.raises(ShareError, match="share"):
        shamir.decode_share(raw)
    with pytest.raises(ProtocolError):
        check_share(raw, expected_index=1, field="share")


def test_zero_index_in_share_bytes_is_refused() -> None:
    with pytest.raises(ShareError, match="Shamir index 0"):
        shamir.decode_share(bytes(SHARE_BYTES))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 1, "num": 3}, "threshold=1"),
        ({"threshold": 4, "num": 3}, "threshold=4"),
        ({"threshold": 2, "num": 1}, "num=1"),
        ({"threshold": 2, "num": 2**17}, "num=131072"),
    ],
)
def test_split_validates_threshold_and_count(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ShareError, match=match):
        shamir.split([1], **kwargs)


@pytest.mark.parametrize("bad", [-1, P, True, 1.5])
def test_split_refuses_values_outside_the_field(bad: object) -> None:
    with pytest.raises(ShareError, match=r"secret_values\[1\]"):
        shamir.split([1, bad], threshold=2, num=3)  # type: ignore[list-item]


def test_split_secrets_refuses_a_secret_of_the_wrong_length() -> None:
    with pytest.raises(ProtocolError, match=r"secret \[0\].*32 bytes"):
        split_secrets([bytes(31)], 2, 3)
