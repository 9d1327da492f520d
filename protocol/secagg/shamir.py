"""Shamir secret sharing over the prime field GF(2^383 - 31), batched for the secure sum.

Each holder shares two secrets (its self-mask seed and its mask key) with all K participants,
and the coordinator reconstructs one secret per participant from the same survivors' shares.
Both sides therefore work in batches: :func:`split` evaluates every secret's random polynomial
at all K points in one pass, and :func:`combine` computes the Lagrange coefficients at 0 once per
set of share indices and applies them to every secret shared at those indices.

Field choice: the secrets shared here are 47 bytes (a 32-byte key plus a 15-byte integrity
check, 376 bits), so the field must hold any integer below 2^376. p = 2^383 - 31 is the largest
prime below 2^383 (``sympy.prevprime(2**383)``; the tests re-check it with Miller-Rabin): one
field element holds one whole secret, so no secret is split into chunks, and an element takes
48 bytes, so a share (4-byte index + 48 bytes) is exactly as long as the former GF(2^128)
shares of the same secret (three 16-byte chunks): the upload does not grow. A Mersenne prime
would need 2^521 - 1 (66-byte shares); its cheap reduction buys nothing here, since Python
reduces a 400-bit integer modulo any prime in well under a microsecond. The evaluation points
1..K are small, so Horner's rule multiplies by a small integer at every step and reduces once
per point. Interpolation at 0 is exact: ``sum_i lambda_i * y_i mod p`` with
``lambda_i = prod_{j != i} x_j / (x_j - x_i)``.

Secrecy (Shamir, CACM 1979): the t - 1 coefficients above the constant term are drawn uniformly
from the field with the operating system's CSPRNG (:mod:`secrets`), so any t - 1 shares are
uniformly distributed and independent of the secret; every candidate secret is consistent with
them. Any t shares determine the secret.

Wire format of one share: the 1-based index as 4 little-endian bytes (the index prefix the
protocol has always used), then the value as 48 big-endian bytes, value < p.
"""

from __future__ import annotations

import secrets
from collections.abc import Hashable, Mapping, Sequence
from typing import Final, TypeVar

from fedsynth.protocol.errors import ShareError, TooFewSharesError

__all__ = [
    "INDEX_BYTES",
    "MAX_SHARES",
    "PRIME",
    "SHARE_BYTES",
    "VALUE_BYTES",
    "check_indices",
    "combine",
    "decode_share",
    "encode_share",
    "lagrange_at_zero",
    "reconstruct",
    "split",
]

PRIME: Final = 2**383 - 31
"""The field modulus, the largest prime below 2^383."""

VALUE_BYTES: Final = (PRIME.bit_length() + 7) // 8
"""Bytes of one field element (48)."""

INDEX_BYTES: Final = 4
"""Bytes of the share index prefix (little-endian)."""

SHARE_BYTES: Final = INDEX_BYTES + VALUE_BYTES
"""Length of one encoded share (52)."""

MAX_SHARES: Final = 2**16
"""Largest number of shares (and largest index) accepted; far above any realistic K."""

Key = TypeVar("Key", bound=Hashable)


def _check_count(value: object, name: str, low: int, high: int) -> int:
    """Return ``value`` as int if it is an int (not bool) in [low, high], else ShareError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShareError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ShareError(f"{name}={value} is outside [{low}, {high}]")
    return value


def split(secret_values: Sequence[int], *, threshold: int, num: int) -> list[list[int]]:
    """Share every secret among ``num`` parties with threshold ``threshold``, in one pass.

    Args:
        secret_values: The secrets, each an int in ``[0, PRIME)``.
        threshold: t, the number of shares that reconstruct a secret; ``2 <= t <= num``.
        num: K, the number of shares per secret (evaluation points 1..K); at most
            ``MAX_SHARES``.

    Returns:
        ``rows`` with ``rows[i][j]`` the share of secret ``j`` at index ``i + 1`` (a list per
        recipient, each holding one value per secret).

    Raises:
        ShareError: If a secret is not an int in the field, or t, K are out of range.
    """
    num = _check_count(num, "num", 2, MAX_SHARES)
    threshold = _check_count(threshold, "threshold", 2, num)
    for position, value in enumerate(secret_values):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < PRIME:
            raise ShareError(f"secret_values[{position}] must be an int in [0, p = 2^383 - 31)")
    # One random polynomial per secret, highest coefficient first for Horner's rule.
    polynomials = [
        [secrets.randbelow(PRIME) for _ in range(threshold - 1)] + [value]
        for value in secret_values
    ]
    rows: list[list[int]] = []
    for x in range(1, num + 1):
        row: list[int] = []
        for coefficients in polynomials:
            acc = 0
            for coefficient in coefficients:
                acc = acc * x + coefficient  # x is small: reduce once per point, not per step
            row.append(acc % PRIME)
        rows.append(row)
    return rows


def check_indices(indices: Sequence[int], *, num: int | None = None) -> list[int]:
    """Validate share indices: ints, each in ``[1, num]`` (or ``[1, MAX_SHARES]``), distinct.

    Raises:
        ShareError: Naming the offending index and the limit.
    """
    high = MAX_SHARES if num is None else _check_count(num, "num", 1, MAX_SHARES)
    checked: list[int] = []
    seen: set[int] = set()
    for position, index in enumerate(indices):
        if isinstance(index, bool) or not isinstance(index, int):
            raise ShareError(f"share index [{position}] must be an int, got {index!r}")
        if index == 0:
            raise ShareError(f"share index [{position}] is 0, which would be the secret itself")
        if not 1 <= index <= high:
            raise ShareError(f"share index [{position}]={index} is outside [1, {high}]")
        if index in seen:
            raise ShareError(f"share index {index} appears more than once")
        seen.add(index)
        checked.append(index)
    return checked


def lagrange_at_zero(indices: Sequence[int], *, num: int | None = None) -> list[int]:
    """Lagrange coefficients that interpolate a polynomial at 0 from its values at ``indices``.

    ``lambda_i = prod_{j != i} x_j / (x_j - x_i) mod p``. The numerators and denominators are
    products of small integers, formed exactly and reduced once; the divisions are modular
    inverses (all ``x_j - x_i`` are non-zero and far below p, so they are invertible).

    Args:
        indices: Distinct share indices, each in ``[1, num]``.
        num: Largest allowed index (K); None allows up to ``MAX_SHARES``.

    Returns:
        One coefficient per index, in the same order.

    Raises:
        ShareError: If an index is zero, repeated, not an int or out of range, or none is given.
    """
    xs = check_indices(indices, num=num)
    if not xs:
        raise TooFewSharesError("no share indices given, need at least 1")
    total = 1
    for x in xs:
        total *= x
    coefficients: list[int] = []
    for i, xi in enumerate(xs):
        numerator = total // xi
        denominator = 1
        for j, xj in enumerate(xs):
            if j != i:
                denominator *= xj - xi
        coefficients.append(numerator * pow(denominator % PRIME, -1, PRIME) % PRIME)
    return coefficients


def combine(
    indices: Sequence[int], values: Sequence[Sequence[int]], *, num: int | None = None
) -> list[int]:
    """Reconstruct many secrets shared at the same indices with one set of coefficients.

    Every share set must be consistent (points of one polynomial of degree below
    ``len(indices)``); give exactly t shares to reconstruct a threshold-t sharing.

    Args:
        indices: The share indices, distinct, each in ``[1, num]``.
        values: ``values[j][i]``: the share of secret ``j`` at ``indices[i]``, each in
            ``[0, PRIME)``.
        num: Largest allowed index (K); None allows up to ``MAX_SHARES``.

    Returns:
        The secrets, one per row of ``values``.

    Raises:
        ShareError: If an index is invalid, a row's length differs from ``len(indices)`` or a
            value is outside the field.
    """
    coefficients = lagrange_at_zero(indices, num=num)
    width = len(coefficients)
    out: list[int] = []
    for row_number, row in enumerate(values):
        if len(row) != width:
            raise ShareError(
                f"values[{row_number}] holds {len(row)} shares, expected {width} (one per index)"
            )
        acc = 0
        for coefficient, value in zip(coefficients, row, strict=True):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < PRIME:
                raise ShareError(f"values[{row_number}] holds a value outside the field")
            acc += coefficient * value
        out.append(acc % PRIME)
    return out


def reconstruct(
    shares: Mapping[Key, Sequence[tuple[int, int]]], *, threshold: int, num: int | None = None
) -> dict[Key, int]:
    """Reconstruct many secrets, each from its first ``threshold`` ``(index, value)`` shares.

    Secrets whose first t shares carry the same index set are combined together with one set
    of Lagrange coefficients (the common case: the same survivors answered for every owner).

    Args:
        shares: ``{key: [(index, value), ...]}``; each list holds at least t shares.
        threshold: t.
        num: Largest allowed index (K); None allows up to ``MAX_SHARES``.

    Returns:
        ``{key: secret}``.

    Raises:
        TooFewSharesError: If a list holds fewer than t shares (naming its key).
        ShareError: If an index is zero, repeated or out of range, or a value outside the field.
    """
    threshold = _check_count(threshold, "threshold", 1, MAX_SHARES)
    groups: dict[tuple[int, ...], list[Key]] = {}
    for key, owned in shares.items():
        if len(owned) < threshold:
            raise TooFewSharesError(
                f"secret {key!r} has {len(owned)} shares, threshold t={threshold}"
            )
        index_set = tuple(index for index, _ in owned[:threshold])
        groups.setdefault(index_set, []).append(key)
    result: dict[Key, int] = {}
    for index_set, keys in groups.items():
        rows = [[value for _, value in shares[key][:threshold]] for key in keys]
        for key, secret in zip(keys, combine(index_set, rows, num=num), strict=True):
            result[key] = secret
    return result


def encode_share(index: int, value: int) -> bytes:
    """Encode one share: index as 4 little-endian bytes, value as 48 big-endian bytes.

    Raises:
        ShareError: If the index is outside ``[1, MAX_SHARES]`` or the value outside the field.
    """
    check_indices([index])
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < PRIME:
        raise ShareError("share value must be an int in [0, p = 2^383 - 31)")
    return index.to_bytes(INDEX_BYTES, "little") + value.to_bytes(VALUE_BYTES, "big")


def decode_share(raw: object, *, field: str = "share") -> tuple[int, int]:
    """Decode one share into ``(index, value)``.

    Raises:
        ShareError: If ``raw`` is not bytes of length ``SHARE_BYTES``, its index is 0 or above
            ``MAX_SHARES``, or its value is not below the prime.
    """
    if not isinstance(raw, bytes):
        raise ShareError(f"{field} must be bytes, got {type(raw).__name__}")
    if len(raw) != SHARE_BYTES:
        raise ShareError(f"{field} has {len(raw)} bytes, expected {SHARE_BYTES}")
    index = int.from_bytes(raw[:INDEX_BYTES], "little")
    if not 1 <= index <= MAX_SHARES:
        raise ShareError(f"{field} carries Shamir index {index}, outside [1, {MAX_SHARES}]")
    value = int.from_bytes(raw[INDEX_BYTES:], "big")
    if value >= PRIME:
        raise ShareError(f"{field} holds a value that is not below the field prime p = 2^383 - 31")
    return index, value
