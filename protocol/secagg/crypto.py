"""Cryptographic pieces of the secure sum, as pure functions on bytes and arrays.

Every primitive comes from a library: X25519, Ed25519, HKDF-SHA256, ChaCha20 and AES-GCM from
``cryptography``; SHA-256 from ``hashlib``; Shamir sharing over GF(2^383 - 31) from
:mod:`fedsynth.protocol.secagg.shamir` (textbook polynomial evaluation and Lagrange
interpolation with Python's integers and the ``secrets`` CSPRNG, batched over secrets). This
module only fixes the encodings: which bytes are derived, encrypted, signed or committed to,
each under its own domain tag, and each bound to the session.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Final, cast

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedsynth.protocol import codec
from fedsynth.protocol.errors import ProtocolError, ShareError, TooFewSharesError
from fedsynth.protocol.secagg import shamir
from fedsynth.protocol.secagg.stages import (
    COMMITMENT_BYTES,
    KEY_BYTES,
    MAX_NODE_ID,
    SHARE_BYTES,
    SIGNATURE_BYTES,
)

CHECK_BYTES: Final = 15
"""Bytes of the integrity check appended to every shared secret."""

PACKED_BYTES: Final = KEY_BYTES + CHECK_BYTES
"""Bytes of a packed secret (secret and integrity check): 376 bits, one field element."""

GCM_NONCE_BYTES: Final = 12
"""AES-GCM nonce length; the nonce is prepended to every share ciphertext."""

PURPOSE_MASK: Final = b"fedsynth/secagg/mask"
PURPOSE_ENC: Final = b"fedsynth/secagg/enc"
_NONCE_TAG: Final = b"fedsynth/secagg/prg-nonce"
_CHECK_TAG: Final = b"fedsynth/secagg/share-check"
_AAD_TAG: Final = b"fedsynth/secagg/share-ct"
_KEYS_TAG: Final = b"fedsynth/secagg/v2/round-keys"
_SURVIVORS_TAG: Final = b"fedsynth/secagg/v2/survivors"
_COMMIT_TAG: Final = b"fedsynth/secagg/v2/share-commitment"
_PLAINTEXT_MAGIC: Final = b"FSSA\x01"

SHARE_KIND_SEED: Final = 1
"""Commitment kind of a share of the self-mask seed b_u."""
SHARE_KIND_MASK_KEY: Final = 2
"""Commitment kind of a share of the mask key mask_sk_u."""


# --------------------------------------------------------------------------------------------
# Small validated helpers
# --------------------------------------------------------------------------------------------


def is_int(value: object) -> bool:
    """Return True for Python/numpy integers, excluding bools."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def check_node_id(value: object, field: str) -> int:
    """Return a node id as int, raising ProtocolError if it is not an int in [0, 2^64)."""
    if not is_int(value):
        raise ProtocolError(f"{field} must be an integer node id, got {value!r}")
    node = int(cast(int, value))
    if not 0 <= node <= MAX_NODE_ID:
        raise ProtocolError(f"{field}={node} is outside the node id range [0, {MAX_NODE_ID}]")
    return node


def u64(node: int) -> bytes:
    """Encode a node id as 8 big-endian bytes."""
    return node.to_bytes(8, "big")


def session_bytes(session_id: str) -> bytes:
    """Length-prefixed UTF-8 encoding of the session id (used in every derivation)."""
    raw = session_id.encode("utf-8")
    return len(raw).to_bytes(4, "big") + raw


def check_x25519_public(value: object, field: str) -> bytes:
    """Check a raw X25519 public key: 32 bytes and not a low-order point.

    A low-order point gives the all-zero shared secret with every private key, so a client that
    announced one would make every honest peer's key agreement fail; it is refused up front.

    Raises:
        ProtocolError: Naming the field and what is wrong with it.
    """
    if not isinstance(value, bytes):
        raise ProtocolError(f"{field} must be bytes, got {type(value).__name__}")
    if len(value) != KEY_BYTES:
        raise ProtocolError(f"{field} has {len(value)} bytes, expected {KEY_BYTES}")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(value))
    except ValueError:
        raise ProtocolError(f"{field} is a low-order X25519 point (no key agreement)") from None
    return value


def derive_pair_key(
    private_key: X25519PrivateKey,
    peer_public: bytes,
    *,
    purpose: bytes,
    session_id: str,
    node_a: int,
    node_b: int,
) -> bytes:
    """X25519 agreement followed by HKDF-SHA256 bound to purpose, session and the node pair."""
    low, high = sorted((node_a, node_b))
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # low-order point: the all-zero shared secret is refused
        raise ProtocolError(
            f"X25519 key agreement between nodes {low} and {high} failed: {exc}"
        ) from None
    info = purpose + b"\x00" + session_bytes(session_id) + u64(low) + u64(high)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def prg_nonce(session_id: str) -> bytes:
    """ChaCha20 16-byte nonce: 32-bit block counter 0 followed by 96 bits from the session id."""
    digest = hashlib.sha256(_NONCE_TAG + b"\x00" + session_bytes(session_id)).digest()
    return bytes(4) + digest[:12]


@functools.lru_cache(maxsize=2)
def _zeros(length: int) -> bytes:
    """A shared all-zero plaintext for the key stream (one per vector length in use)."""
    return bytes(length)


def prg(key: bytes, *, nonce: bytes, dim: int, bits: int) -> npt.NDArray[np.uint64]:
    """Expand a 32-byte key into ``dim`` uniform field elements with ChaCha20."""
    encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    stream = bytearray(8 * dim)  # written in place and viewed by numpy: no copy of the stream
    encryptor.update_into(_zeros(8 * dim), stream)
    encryptor.finalize()
    words = np.frombuffer(stream, dtype="<u8")
    if words.dtype != np.uint64:  # only on a big-endian machine
        words = words.astype(np.uint64)
    if bits < codec.MAX_BITS:
        np.bitwise_and(words, np.uint64((1 << bits) - 1), out=words)
    return words


def add_inplace(total: npt.NDArray[np.uint64], term: npt.NDArray[np.uint64], bits: int) -> None:
    """``total = (total + term) mod 2^bits`` in place (uint64 wraparound, then mask)."""
    with np.errstate(over="ignore"):
        np.add(total, term, out=total, dtype=np.uint64)
    if bits < codec.MAX_BITS:
        np.bitwise_and(total, np.uint64((1 << bits) - 1), out=total)


def sub_inplace(total: npt.NDArray[np.uint64], term: npt.NDArray[np.uint64], bits: int) -> None:
    """``total = (total - term) mod 2^bits`` in place (uint64 wraparound, then mask)."""
    with np.errstate(over="ignore"):
        np.subtract(total, term, out=total, dtype=np.uint64)
    if bits < codec.MAX_BITS:
        np.bitwise_and(total, np.uint64((1 << bits) - 1), out=total)


def pairwise_mask(
    mask_sk: X25519PrivateKey,
    peer_mask_pk: bytes,
    *,
    session_id: str,
    node: int,
    peer: int,
    dim: int,
    bits: int,
) -> npt.NDArray[np.uint64]:
    """The mask PRG(s_uv) that ``node`` and ``peer`` share; ``node`` adds it iff peer > node."""
    seed = derive_pair_key(
        mask_sk,
        peer_mask_pk,
        purpose=PURPOSE_MASK,
        session_id=session_id,
        node_a=node,
        node_b=peer,
    )
    return prg(seed, nonce=prg_nonce(session_id), dim=dim, bits=bits)


# --------------------------------------------------------------------------------------------
# Shamir shares
# --------------------------------------------------------------------------------------------


def _pack_secret(secret: bytes) -> bytes:
    """Append an integrity check so a reconstruction from corrupt shares is detected."""
    return secret + hashlib.sha256(_CHECK_TAG + secret).digest()[:CHECK_BYTES]


def split_secrets(secret_list: Sequence[bytes], threshold: int, num: int) -> list[list[bytes]]:
    """Shamir-split several 32-byte secrets (each with integrity check) in one pass.

    Each secret is packed with its check, read as one big-endian element of GF(2^383 - 31) and
    shared with a fresh random polynomial of degree t - 1 (:func:`shamir.split`).

    Args:
        secret_list: The 32-byte secrets of one owner.
        threshold: t.
        num: K; share ``i`` (0-based) goes to the node with Shamir index ``i + 1``.

    Returns:
        ``shares[j][i]``: the encoded share of secret ``j`` for index ``i + 1``.

    Raises:
        ProtocolError: If a secret is not 32 bytes, or t, K are out of range.
    """
    values: list[int] = []
    for position, secret in enumerate(secret_list):
        if not isinstance(secret, bytes) or len(secret) != KEY_BYTES:
            raise ProtocolError(f"secret [{position}] to share must be {KEY_BYTES} bytes")
        values.append(int.from_bytes(_pack_secret(secret), "big"))
    rows = shamir.split(values, threshold=threshold, num=num)  # rows[i][j]
    return [
        [shamir.encode_share(i + 1, row[j]) for i, row in enumerate(rows)]
        for j in range(len(values))
    ]


def split_secret(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Shamir-split one 32-byte secret (with integrity check) into ``num`` shares."""
    return split_secrets([secret], threshold, num)[0]


def _unpack_secret(value: int, *, owner: int, what: str) -> bytes:
    """The 32-byte secret inside a reconstructed field element, after its integrity check."""
    if value >> (8 * PACKED_BYTES):
        raise ShareError(
            f"reconstruction of {what} of node {owner} is not a packed {PACKED_BYTES}-byte "
            "secret; at least one share is corrupt"
        )
    packed = value.to_bytes(PACKED_BYTES, "big")
    secret, check = packed[:KEY_BYTES], packed[KEY_BYTES:]
    expected = hashlib.sha256(_CHECK_TAG + secret).digest()[:CHECK_BYTES]
    if not hmac.compare_digest(check, expected):
        raise ShareError(
            f"reconstruction of {what} of node {owner} failed its integrity check; "
            "at least one share is corrupt"
        )
    return secret


def combine_secrets(
    shares: Mapping[int, Sequence[bytes]],
    *,
    threshold: int,
    what: Mapping[int, str],
    num: int | None = None,
) -> dict[int, bytes]:
    """Reconstruct many owners' 32-byte secrets, each from its first t shares, in one batch.

    Owners whose first t shares carry the same Shamir indices share one set of Lagrange
    coefficients (:func:`shamir.reconstruct`); every result must pass its integrity check.

    Args:
        shares: ``{owner: [encoded share, ...]}`` with at least t shares per owner.
        threshold: t.
        what: ``{owner: name of the secret}`` for error messages (e.g. ``"mask key"``).
        num: Largest valid Shamir index (K); None allows any up to ``shamir.MAX_SHARES``.

    Returns:
        ``{owner: secret}``.

    Raises:
        TooFewSharesError: If an owner has fewer than t shares.
        ShareError: If a share is malformed, indices repeat, or a reconstruction fails its
            integrity check (the shares are inconsistent).
    """
    for owner, owned in shares.items():
        if len(owned) < threshold:
            raise TooFewSharesError(
                f"{what.get(owner, 'secret')} of node {owner} has {len(owned)} shares, "
                f"threshold t={threshold}"
            )
    decoded = {
        owner: [shamir.decode_share(share, field=f"share of node {owner}") for share in owned]
        for owner, owned in shares.items()
    }
    values = shamir.reconstruct(decoded, threshold=threshold, num=num)
    return {
        owner: _unpack_secret(value, owner=owner, what=what.get(owner, "secret"))
        for owner, value in values.items()
    }


def combine_secret(shares: Sequence[bytes], *, owner: int, what: str) -> bytes:
    """Reconstruct one 32-byte secret from all given shares and verify its integrity check.

    Every given share is used, so give exactly t (more consistent shares give the same
    secret).

    Raises:
        ProtocolError: (a :class:`ShareError`) if a share is malformed or the integrity check
            fails.
    """
    return combine_secrets(
        {owner: list(shares)}, threshold=max(len(shares), 1), what={owner: what}
    )[owner]


def share_index(share: bytes) -> int:
    """Return the 1-based Shamir index stored in the first 4 bytes (little-endian) of a share."""
    return int.from_bytes(share[: shamir.INDEX_BYTES], "little", signed=False)


def check_share(share: object, *, expected_index: int, field: str) -> bytes:
    """Check a share's type, length, index and value range; return it as bytes."""
    if not isinstance(share, bytes):
        raise ProtocolError(f"{field} must be bytes, got {type(share).__name__}")
    if len(share) != SHARE_BYTES:
        raise ProtocolError(f"{field} has {len(share)} bytes, expected {SHARE_BYTES}")
    index = share_index(share)
    if index != expected_index:
        raise ProtocolError(f"{field} carries Shamir index {index}, expected {expected_index}")
    shamir.decode_share(share, field=field)
    return share


def share_commitment(
    *, session_id: str, owner: int, recipient: int, kind: int, share: bytes
) -> bytes:
    """SHA-256 commitment to the share of ``owner``'s secret held by ``recipient``.

    The owner sends it to the coordinator at share_keys; at unmask the coordinator keeps only
    returned shares that match, so one corrupt share cannot spoil a reconstruction. It hides the
    share computationally: fewer than t shares leave at least 128 unknown bits in every share.
    """
    data = (
        _COMMIT_TAG
        + b"\x00"
        + session_bytes(session_id)
        + u64(owner)
        + u64(recipient)
        + bytes([kind])
        + share
    )
    return hashlib.sha256(data).digest()


def check_commitment(value: object, field: str) -> bytes:
    """Check that a commitment is ``2 * COMMITMENT_BYTES`` bytes (seed share, mask-key share)."""
    if not isinstance(value, bytes):
        raise ProtocolError(f"{field} must be bytes, got {type(value).__name__}")
    if len(value) != 2 * COMMITMENT_BYTES:
        raise ProtocolError(f"{field} has {len(value)} bytes, expected {2 * COMMITMENT_BYTES}")
    return value


# --------------------------------------------------------------------------------------------
# Encrypted share messages
# --------------------------------------------------------------------------------------------


def aad(session_id: str, sender: int, recipient: int) -> bytes:
    """Associated data binding a share ciphertext to session, sender and recipient."""
    return _AAD_TAG + b"\x00" + session_bytes(session_id) + u64(sender) + u64(recipient)


def encode_plaintext(sender: int, recipient: int, b_share: bytes, sk_share: bytes) -> bytes:
    """Serialize the pair of shares sent from ``sender`` to ``recipient``."""
    parts = [_PLAINTEXT_MAGIC, u64(sender), u64(recipient)]
    for share in (b_share, sk_share):
        parts.append(len(share).to_bytes(2, "big"))
        parts.append(share)
    return b"".join(parts)


def decode_plaintext(
    plaintext: bytes, *, sender: int, recipient: int, expected_index: int
) -> tuple[bytes, bytes]:
    """Parse and check a decrypted share message; return ``(b_share, sk_share)``."""
    head = len(_PLAINTEXT_MAGIC)
    if plaintext[:head] != _PLAINTEXT_MAGIC or len(plaintext) < head + 16:
        raise ProtocolError(f"share message from node {sender} is malformed (bad header)")
    got_sender = int.from_bytes(plaintext[head : head + 8], "big")
    got_recipient = int.from_bytes(plaintext[head + 8 : head + 16], "big")
    if got_sender != sender or got_recipient != recipient:
        raise ProtocolError(
            f"share message names sender {got_sender} -> recipient {got_recipient}, but it was "
            f"delivered as {sender} -> {recipient}"
        )
    pos = head + 16
    shares: list[bytes] = []
    for label in ("b-share", "mask-key share"):
        if len(plaintext) < pos + 2:
            raise ProtocolError(f"share message from node {sender} is truncated at the {label}")
        length = int.from_bytes(plaintext[pos : pos + 2], "big")
        pos += 2
        share = plaintext[pos : pos + length]
        if len(share) != length:
            raise ProtocolError(f"share message from node {sender} is truncated at the {label}")
        pos += length
        shares.append(
            check_share(share, expected_index=expected_index, field=f"{label} from node {sender}")
        )
    if pos != len(plaintext):
        raise ProtocolError(
            f"share message from node {sender} has {len(plaintext) - pos} trailing bytes"
        )
    return shares[0], shares[1]


# --------------------------------------------------------------------------------------------
# Signed statements
# --------------------------------------------------------------------------------------------


def round_keys_message(
    *,
    session_id: str,
    config_digest: bytes,
    node: int,
    enc_pk: bytes,
    mask_pk: bytes,
    name: str,
) -> bytes:
    """The bytes a holder signs to announce its round keys under its roster name.

    Binding the session, the session's configuration (participants, t, field, length) and the
    node id means a signed key cannot be replayed in another round, under another node id or
    for another threshold.
    """
    raw_name = name.encode("utf-8")
    return (
        _KEYS_TAG
        + b"\x00"
        + session_bytes(session_id)
        + config_digest
        + u64(node)
        + enc_pk
        + mask_pk
        + len(raw_name).to_bytes(2, "big")
        + raw_name
    )


def survivors_message(*, session_id: str, config_digest: bytes, survivors: Sequence[int]) -> bytes:
    """The bytes a survivor signs in the consistency check: the survivor set U3 it was told."""
    ordered = sorted(survivors)
    return (
        _SURVIVORS_TAG
        + b"\x00"
        + session_bytes(session_id)
        + config_digest
        + len(ordered).to_bytes(4, "big")
        + b"".join(u64(node) for node in ordered)
    )


def signature_is_valid(public_key: bytes, signature: object, message: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` under ``public_key``."""
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
