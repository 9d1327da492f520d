"""Secure summation of integer vectors (Bonawitz et al., CCS 2017, full-graph variant).

A coordinator (:class:`SecAggServer`) and K clients (:class:`SecAggClient`) compute the exact sum
modulo 2^bits of the clients' uint64 vectors. Each client adds a self mask ``PRG(b_u)`` and
pairwise masks ``+-PRG(s_uv)`` that cancel in the sum; the seeds ``b_u`` and the mask key
``mask_sk_u`` are Shamir-shared (threshold t) among the participants, so up to K - t clients may
drop out after the key exchange and the coordinator can still remove their pairwise masks, while it
never learns both secrets of any one client and never sees an unmasked individual vector.

Rounds (the message flows; the transport is someone else's job)::

    client.setup()                -> PublicKeys          -> server.receive_public_keys  (U1)
    client.share_keys(U1 keys)    -> {recipient: ct}     -> server.route_shares         (U2)
    client.masked_input(cts, x)   -> masked vector       -> server.receive_masked_input
                                                            server.close_masked_inputs  (U3, D)
    client.unmask(U3, D)          -> {owner: share}      -> server.unmask -> sum over U3

Security model: semi-honest coordinator and clients (no signatures and no consistency-check
round). Clients still refuse the one request that would unmask a vector outright: the b-share
and the mask-key share of the same node. All primitives come from libraries: X25519, HKDF-SHA256,
ChaCha20 and AES-GCM from ``cryptography``; Shamir sharing over GF(2^128) from Flower
(``flwr.common.secure_aggregation.crypto.shamir``, backed by PyCryptodome).

Every public method validates its input before changing any state, so a call that raises leaves
the object as it was.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

from fedsynth.protocol import codec
from fedsynth.protocol.errors import (
    ConfigError,
    DuplicateSubmissionError,
    LateSubmissionError,
    ProtocolError,
    StageOrderError,
    TooFewParticipantsError,
)

__all__ = [
    "CLIENT_STAGES",
    "KEY_BYTES",
    "MAX_DIM",
    "SERVER_STAGES",
    "SHARE_BYTES",
    "PublicKeys",
    "SecAggClient",
    "SecAggConfig",
    "SecAggServer",
    "StateValue",
]

KEY_BYTES: Final = 32
"""Length of X25519 public/private keys, of the self-mask seed and of every derived key."""

MAX_DIM: Final = 2**31
"""Largest vector length (keeps the ChaCha20 32-bit block counter far from wrapping)."""

MAX_NODE_ID: Final = 2**64 - 1
"""Largest node id (Flower node ids are unsigned 64-bit)."""

MAX_SESSION_ID_BYTES: Final = 1024
"""Longest accepted session id, in UTF-8 bytes."""

_CHECK_BYTES: Final = 15
# A shared secret is ``secret32 || SHA-256(tag || secret32)[:15]`` = 47 bytes, which Flower pads
# to 48 bytes = 3 chunks of 16; every share is a 4-byte index plus 3 * 16 bytes.
SHARE_BYTES: Final = 4 + 48
"""Length of one Shamir share as produced by Flower's ``create_shares`` for our secrets."""

_STATE_VERSION: Final = 1
_PURPOSE_MASK: Final = b"fedsynth/secagg/mask"
_PURPOSE_ENC: Final = b"fedsynth/secagg/enc"
_NONCE_TAG: Final = b"fedsynth/secagg/prg-nonce"
_CHECK_TAG: Final = b"fedsynth/secagg/share-check"
_AAD_TAG: Final = b"fedsynth/secagg/share-ct"
_PLAINTEXT_MAGIC: Final = b"FSSA\x01"
_GCM_NONCE_BYTES: Final = 12

CLIENT_STAGES: Final = ("setup", "share_keys", "masked_input", "unmask", "done")
"""Client stages, each named after the call it expects next (``done`` expects none)."""

SERVER_STAGES: Final = ("public_keys", "route_shares", "masked_input", "unmask", "done")
"""Coordinator stages, each named after the round it expects next (``done`` expects none)."""

StateValue = bytes | int | str | list[int] | list[bytes]
"""Value types of an exported client state (all accepted by a Flower ``ConfigRecord``)."""


# --------------------------------------------------------------------------------------------
# Small validated helpers
# --------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    """Return True for Python/numpy integers, excluding bools."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _check_node_id(value: object, field: str) -> int:
    """Return a node id as int, raising ProtocolError if it is not an int in [0, 2^64)."""
    if not _is_int(value):
        raise ProtocolError(f"{field} must be an integer node id, got {value!r}")
    node = int(cast(int, value))
    if not 0 <= node <= MAX_NODE_ID:
        raise ProtocolError(f"{field}={node} is outside the node id range [0, {MAX_NODE_ID}]")
    return node


def _u64(node: int) -> bytes:
    """Encode a node id as 8 big-endian bytes."""
    return node.to_bytes(8, "big")


def _session_bytes(session_id: str) -> bytes:
    """Length-prefixed UTF-8 encoding of the session id (used in every derivation)."""
    raw = session_id.encode("utf-8")
    return len(raw).to_bytes(4, "big") + raw


def _derive_pair_key(
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
    info = purpose + b"\x00" + _session_bytes(session_id) + _u64(low) + _u64(high)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def _prg_nonce(session_id: str) -> bytes:
    """ChaCha20 16-byte nonce: 32-bit block counter 0 followed by 96 bits from the session id."""
    digest = hashlib.sha256(_NONCE_TAG + b"\x00" + _session_bytes(session_id)).digest()
    return bytes(4) + digest[:12]


def _prg(key: bytes, *, nonce: bytes, dim: int, bits: int) -> npt.NDArray[np.uint64]:
    """Expand a 32-byte key into ``dim`` uniform field elements with ChaCha20."""
    encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * dim)) + encryptor.finalize()
    words = np.frombuffer(stream, dtype="<u8").astype(np.uint64)
    if bits < codec.MAX_BITS:
        np.bitwise_and(words, np.uint64((1 << bits) - 1), out=words)
    return words


def _add_inplace(total: npt.NDArray[np.uint64], term: npt.NDArray[np.uint64], bits: int) -> None:
    """``total = (total + term) mod 2^bits`` in place (uint64 wraparound, then mask)."""
    with np.errstate(over="ignore"):
        np.add(total, term, out=total, dtype=np.uint64)
    if bits < codec.MAX_BITS:
        np.bitwise_and(total, np.uint64((1 << bits) - 1), out=total)


def _sub_inplace(total: npt.NDArray[np.uint64], term: npt.NDArray[np.uint64], bits: int) -> None:
    """``total = (total - term) mod 2^bits`` in place (uint64 wraparound, then mask)."""
    with np.errstate(over="ignore"):
        np.subtract(total, term, out=total, dtype=np.uint64)
    if bits < codec.MAX_BITS:
        np.bitwise_and(total, np.uint64((1 << bits) - 1), out=total)


def _pack_secret(secret: bytes) -> bytes:
    """Append an integrity check so a reconstruction from corrupt shares is detected."""
    return secret + hashlib.sha256(_CHECK_TAG + secret).digest()[:_CHECK_BYTES]


def _split_secret(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Shamir-split a 32-byte secret (with integrity check) into ``num`` shares."""
    shares = create_shares(_pack_secret(secret), threshold, num)
    return [bytes(share) for share in shares]


def _combine_secret(shares: list[bytes], *, owner: int, what: str) -> bytes:
    """Reconstruct a 32-byte secret and verify its integrity check (ProtocolError on failure)."""
    try:
        packed = combine_shares(shares)
    except Exception as exc:  # any failure inside Flower/PyCryptodome means corrupt shares
        raise ProtocolError(
            f"reconstruction of {what} of node {owner} failed ({type(exc).__name__}); "
            "at least one share is corrupt"
        ) from None
    if len(packed) != KEY_BYTES + _CHECK_BYTES:
        raise ProtocolError(
            f"reconstruction of {what} of node {owner} gave {len(packed)} bytes, expected "
            f"{KEY_BYTES + _CHECK_BYTES}; at least one share is corrupt"
        )
    secret, check = packed[:KEY_BYTES], packed[KEY_BYTES:]
    expected = hashlib.sha256(_CHECK_TAG + secret).digest()[:_CHECK_BYTES]
    if not hmac.compare_digest(check, expected):
        raise ProtocolError(
            f"reconstruction of {what} of node {owner} failed its integrity check; "
            "at least one share is corrupt"
        )
    return secret


def _share_index(share: bytes) -> int:
    """Return the 1-based Shamir index stored in the first 4 bytes (little-endian) of a share."""
    return int.from_bytes(share[:4], "little", signed=False)


def _check_share(share: object, *, expected_index: int, field: str) -> bytes:
    """Check a share's type, length and index; return it as bytes."""
    if not isinstance(share, bytes):
        raise ProtocolError(f"{field} must be bytes, got {type(share).__name__}")
    if len(share) != SHARE_BYTES:
        raise ProtocolError(f"{field} has {len(share)} bytes, expected {SHARE_BYTES}")
    index = _share_index(share)
    if index != expected_index:
        raise ProtocolError(f"{field} carries Shamir index {index}, expected {expected_index}")
    return share


def _aad(session_id: str, sender: int, recipient: int) -> bytes:
    """Associated data binding a share ciphertext to session, sender and recipient."""
    return _AAD_TAG + b"\x00" + _session_bytes(session_id) + _u64(sender) + _u64(recipient)


def _encode_plaintext(sender: int, recipient: int, b_share: bytes, sk_share: bytes) -> bytes:
    """Serialize the pair of shares sent from ``sender`` to ``recipient``."""
    parts = [_PLAINTEXT_MAGIC, _u64(sender), _u64(recipient)]
    for share in (b_share, sk_share):
        parts.append(len(share).to_bytes(2, "big"))
        parts.append(share)
    return b"".join(parts)


def _decode_plaintext(
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
            _check_share(share, expected_index=expected_index, field=f"{label} from node {sender}")
        )
    if pos != len(plaintext):
        raise ProtocolError(
            f"share message from node {sender} has {len(plaintext) - pos} trailing bytes"
        )
    return shares[0], shares[1]


def _check_stage(current: str, expected: str, call: str) -> None:
    """Raise StageOrderError unless ``current == expected``."""
    if current != expected:
        raise StageOrderError(f"{call}() called in stage {current!r}; expected stage {expected!r}")


# --------------------------------------------------------------------------------------------
# Messages and configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecAggConfig:
    """Parameters of one secure-summation session, identical at every party.

    Attributes:
        session_id: Unique per round; binds all derived keys, masks and nonces. Non-empty.
        node_ids: The K participants chosen for this round, distinct ints in [0, 2^64), K >= 2.
            A list is accepted and stored as a tuple.
        threshold: Shamir threshold t with 2 <= t <= K; at least t clients must survive.
        bits: Field size in bits (see :func:`fedsynth.protocol.codec.validate_bits`).
        dim: Vector length, 1 <= dim <= ``MAX_DIM``.
    """

    session_id: str
    node_ids: tuple[int, ...]
    threshold: int
    bits: int
    dim: int

    def __post_init__(self) -> None:
        """Validate every field.

        Raises:
            ConfigError: Naming the offending field, its value and the limit.
        """
        if not isinstance(self.session_id, str) or not self.session_id:
            raise ConfigError(f"session_id must be a non-empty string, got {self.session_id!r}")
        if len(self.session_id.encode("utf-8")) > MAX_SESSION_ID_BYTES:
            raise ConfigError(
                f"session_id is {len(self.session_id.encode('utf-8'))} UTF-8 bytes long, "
                f"limit {MAX_SESSION_ID_BYTES}"
            )
        if isinstance(self.node_ids, str | bytes) or not isinstance(self.node_ids, Sequence):
            raise ConfigError(f"node_ids must be a sequence of ints, got {self.node_ids!r}")
        ids: list[int] = []
        for index, node in enumerate(self.node_ids):
            if not _is_int(node) or not 0 <= int(node) <= MAX_NODE_ID:
                raise ConfigError(
                    f"node_ids[{index}]={node!r} must be an int in [0, {MAX_NODE_ID}]"
                )
            ids.append(int(node))
        if len(set(ids)) != len(ids):
            dupes = sorted({n for n in ids if ids.count(n) > 1})
            raise ConfigError(f"node_ids must be distinct, duplicated: {dupes}")
        if len(ids) < 2:
            raise ConfigError(f"node_ids has K={len(ids)} participants, need at least 2")
        object.__setattr__(self, "node_ids", tuple(ids))
        if not _is_int(self.threshold) or not 2 <= int(self.threshold) <= len(ids):
            raise ConfigError(
                f"threshold t={self.threshold!r} must be an int with 2 <= t <= K={len(ids)}"
            )
        object.__setattr__(self, "threshold", int(self.threshold))
        object.__setattr__(self, "bits", codec.validate_bits(self.bits))
        if not _is_int(self.dim) or not 1 <= int(self.dim) <= MAX_DIM:
            raise ConfigError(f"dim={self.dim!r} must be an int with 1 <= dim <= {MAX_DIM}")
        object.__setattr__(self, "dim", int(self.dim))

    def to_dict(self) -> dict[str, str | int | list[int]]:
        """Return plain JSON-able (and Flower ``ConfigRecord``-able) values for transport."""
        return {
            "session_id": self.session_id,
            "node_ids": list(self.node_ids),
            "threshold": self.threshold,
            "bits": self.bits,
            "dim": self.dim,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SecAggConfig:
        """Rebuild a config from :meth:`to_dict` output.

        Args:
            data: Mapping with keys ``session_id``, ``node_ids``, ``threshold``, ``bits``, ``dim``.

        Returns:
            The validated config.

        Raises:
            ConfigError: If a key is missing or a value is invalid.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
        fields = ("session_id", "node_ids", "threshold", "bits", "dim")
        missing = [name for name in fields if name not in data]
        if missing:
            raise ConfigError(f"config is missing field(s) {missing}")
        node_ids = data["node_ids"]
        if isinstance(node_ids, str | bytes) or not isinstance(node_ids, Sequence):
            raise ConfigError(f"node_ids must be a list of ints, got {node_ids!r}")
        return cls(
            session_id=data["session_id"],
            node_ids=tuple(node_ids),
            threshold=data["threshold"],
            bits=data["bits"],
            dim=data["dim"],
        )


@dataclass(frozen=True)
class PublicKeys:
    """The two X25519 public keys a client announces in the setup round.

    Attributes:
        enc_pk: Raw 32-byte key for the encryption of shares between clients.
        mask_pk: Raw 32-byte key for the pairwise masks.
    """

    enc_pk: bytes
    mask_pk: bytes

    def __post_init__(self) -> None:
        """Check both keys are 32-byte strings.

        Raises:
            ProtocolError: Naming the malformed key and its length.
        """
        for name in ("enc_pk", "mask_pk"):
            value = getattr(self, name)
            if not isinstance(value, bytes):
                raise ProtocolError(f"{name} must be bytes, got {type(value).__name__}")
            if len(value) != KEY_BYTES:
                raise ProtocolError(f"{name} has {len(value)} bytes, expected {KEY_BYTES}")

    def to_dict(self) -> dict[str, bytes]:
        """Return ``{"enc_pk": ..., "mask_pk": ...}`` for transport."""
        return {"enc_pk": self.enc_pk, "mask_pk": self.mask_pk}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PublicKeys:
        """Rebuild from :meth:`to_dict` output.

        Args:
            data: Mapping with ``enc_pk`` and ``mask_pk``.

        Returns:
            The validated public keys.

        Raises:
            ProtocolError: If a key is missing or malformed.
        """
        if not isinstance(data, Mapping) or "enc_pk" not in data or "mask_pk" not in data:
            raise ProtocolError("public keys message must hold 'enc_pk' and 'mask_pk'")
        return cls(enc_pk=data["enc_pk"], mask_pk=data["mask_pk"])


def _check_public_key_set(
    keys: Mapping[int, PublicKeys], config: SecAggConfig, *, who: str
) -> dict[int, PublicKeys]:
    """Validate a set of announced keys (membership, types, distinctness, count >= t)."""
    if not isinstance(keys, Mapping):
        raise ProtocolError(f"{who}: public keys must be a mapping, got {type(keys).__name__}")
    allowed = set(config.node_ids)
    checked: dict[int, PublicKeys] = {}
    seen: dict[bytes, int] = {}
    for raw_node in sorted(keys, key=lambda n: int(n) if _is_int(n) else -1):
        node = _check_node_id(raw_node, f"{who}: public key owner")
        if node not in allowed:
            raise ProtocolError(f"{who}: node {node} is not a participant of this session")
        pks = keys[raw_node]
        if not isinstance(pks, PublicKeys):
            raise ProtocolError(
                f"{who}: keys of node {node} must be PublicKeys, got {type(pks).__name__}"
            )
        for key in (pks.enc_pk, pks.mask_pk):
            if key in seen:
                raise ProtocolError(
                    f"{who}: node {node} announces a public key already used by node {seen[key]}"
                )
            seen[key] = node
        checked[node] = pks
    if len(checked) < config.threshold:
        raise TooFewParticipantsError(
            f"{who}: {len(checked)} nodes announced keys, threshold t={config.threshold}"
        )
    return checked


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


class SecAggClient:
    """State machine of one client.

    Stages must be called in order: :meth:`setup` -> :meth:`share_keys` -> :meth:`masked_input`
    -> :meth:`unmask`. An out-of-order call raises :class:`StageOrderError`. The object holds
    secret keys; :meth:`export_state` returns them too, so keep exported states local.
    """

    def __init__(self, node_id: int, config: SecAggConfig) -> None:
        """Create a client before the setup round.

        Args:
            node_id: This client's id; must be in ``config.node_ids``.
            config: The session configuration.

        Raises:
            ConfigError: If ``config`` is not a SecAggConfig or ``node_id`` is not a participant.
        """
        if not isinstance(config, SecAggConfig):
            raise ConfigError(f"config must be a SecAggConfig, got {type(config).__name__}")
        if not _is_int(node_id) or int(node_id) not in config.node_ids:
            raise ConfigError(
                f"node_id={node_id!r} is not among the {len(config.node_ids)} session node_ids"
            )
        self._node_id = int(node_id)
        self._config = config
        self._stage = "setup"
        self._enc_sk: X25519PrivateKey | None = None
        self._mask_sk: X25519PrivateKey | None = None
        self._b_seed: bytes | None = None
        self._u1: dict[int, PublicKeys] = {}
        # owner -> (share of owner's b, share of owner's mask_sk) held by this client
        self._shares: dict[int, tuple[bytes, bytes]] = {}

    @property
    def node_id(self) -> int:
        """This client's node id."""
        return self._node_id

    @property
    def config(self) -> SecAggConfig:
        """The session configuration."""
        return self._config

    @property
    def stage(self) -> str:
        """Name of the call this client expects next (one of ``CLIENT_STAGES``)."""
        return self._stage

    def _secrets(self) -> tuple[X25519PrivateKey, X25519PrivateKey, bytes]:
        """Return ``(enc_sk, mask_sk, b_seed)``; they exist from setup until masked_input."""
        if self._enc_sk is None or self._mask_sk is None or self._b_seed is None:
            raise StageOrderError(
                f"node {self._node_id} holds no key material in stage {self._stage!r}"
            )
        return self._enc_sk, self._mask_sk, self._b_seed

    def _own_public_keys(self) -> PublicKeys:
        """Return this client's public keys (only valid between setup and masked_input)."""
        enc_sk, mask_sk, _ = self._secrets()
        return PublicKeys(
            enc_pk=enc_sk.public_key().public_bytes_raw(),
            mask_pk=mask_sk.public_key().public_bytes_raw(),
        )

    def _share_index_of(self, node: int) -> int:
        """1-based Shamir index of ``node``: its position in the sorted U1 plus one."""
        return sorted(self._u1).index(node) + 1

    def setup(self) -> PublicKeys:
        """Generate both X25519 key pairs and the 32-byte self-mask seed.

        Returns:
            The public keys to announce.

        Raises:
            StageOrderError: If not in stage ``setup``.
        """
        _check_stage(self._stage, "setup", "setup")
        self._enc_sk = X25519PrivateKey.generate()
        self._mask_sk = X25519PrivateKey.generate()
        self._b_seed = os.urandom(KEY_BYTES)
        self._stage = "share_keys"
        return self._own_public_keys()

    def share_keys(self, public_keys: Mapping[int, PublicKeys]) -> dict[int, bytes]:
        """Shamir-share the self-mask seed and the mask key, encrypted for every other node.

        Args:
            public_keys: Keys of all nodes that answered setup (the set U1), including this
                client's own, unchanged.

        Returns:
            ``{recipient: ciphertext}`` for every other node in ``public_keys``.

        Raises:
            StageOrderError: If not in stage ``share_keys``.
            ProtocolError: If the own keys are missing or altered, a node is not a participant,
                or two keys coincide.
            TooFewParticipantsError: If fewer than t nodes are listed.
        """
        _check_stage(self._stage, "share_keys", "share_keys")
        u1 = _check_public_key_set(public_keys, self._config, who=f"node {self._node_id}")
        own = self._own_public_keys()
        if u1.get(self._node_id) != own:
            raise ProtocolError(
                f"node {self._node_id}: the broadcast key set lacks or alters this node's keys"
            )
        enc_sk, mask_sk, b_seed = self._secrets()
        order = sorted(u1)
        b_shares = _split_secret(b_seed, self._config.threshold, len(order))
        sk_shares = _split_secret(mask_sk.private_bytes_raw(), self._config.threshold, len(order))
        outgoing: dict[int, bytes] = {}
        for position, node in enumerate(order):
            if node == self._node_id:
                continue
            key = _derive_pair_key(
                enc_sk,
                u1[node].enc_pk,
                purpose=_PURPOSE_ENC,
                session_id=self._config.session_id,
                node_a=self._node_id,
                node_b=node,
            )
            plaintext = _encode_plaintext(
                self._node_id, node, b_shares[position], sk_shares[position]
            )
            nonce = os.urandom(_GCM_NONCE_BYTES)
            sealed = AESGCM(key).encrypt(
                nonce, plaintext, _aad(self._config.session_id, self._node_id, node)
            )
            outgoing[node] = nonce + sealed
        own_pos = order.index(self._node_id)
        self._u1 = u1
        self._shares = {self._node_id: (b_shares[own_pos], sk_shares[own_pos])}
        self._stage = "masked_input"
        return outgoing

    def _decrypt_from(self, sender: int, ciphertext: object) -> tuple[bytes, bytes]:
        """Decrypt and check the shares that ``sender`` addressed to this client."""
        enc_sk, _, _ = self._secrets()
        if not isinstance(ciphertext, bytes):
            raise ProtocolError(
                f"ciphertext from node {sender} must be bytes, got {type(ciphertext).__name__}"
            )
        key = _derive_pair_key(
            enc_sk,
            self._u1[sender].enc_pk,
            purpose=_PURPOSE_ENC,
            session_id=self._config.session_id,
            node_a=self._node_id,
            node_b=sender,
        )
        nonce, sealed = ciphertext[:_GCM_NONCE_BYTES], ciphertext[_GCM_NONCE_BYTES:]
        try:
            plaintext = AESGCM(key).decrypt(
                nonce, sealed, _aad(self._config.session_id, sender, self._node_id)
            )
        except (InvalidTag, ValueError):
            raise ProtocolError(
                f"ciphertext from node {sender} to node {self._node_id} failed authentication"
            ) from None
        return _decode_plaintext(
            plaintext,
            sender=sender,
            recipient=self._node_id,
            expected_index=self._share_index_of(self._node_id),
        )

    def masked_input(
        self, ciphertexts: Mapping[int, bytes], value: npt.NDArray[np.uint64]
    ) -> npt.NDArray[np.uint64]:
        """Store the received shares and return the masked input vector.

        Args:
            ciphertexts: ``{sender: ciphertext}`` addressed to this client. The senders plus this
                client form U2, the nodes that completed share_keys.
            value: uint64 vector of shape ``(dim,)`` with elements ``< 2^bits``.

        Returns:
            ``value + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)`` mod 2^bits,
            over v in U2.

        Raises:
            StageOrderError: If not in stage ``masked_input``.
            ProtocolError: If a sender is unknown or this client, or a ciphertext fails.
            TooFewParticipantsError: If fewer than t - 1 other nodes sent shares.
            ShapeError: If ``value`` is not uint64 of shape ``(dim,)``.
            FieldRangeError: If an element of ``value`` is ``>= 2^bits``.
        """
        _check_stage(self._stage, "masked_input", "masked_input")
        cfg = self._config
        if not isinstance(ciphertexts, Mapping):
            raise ProtocolError(f"ciphertexts must be a mapping, got {type(ciphertexts).__name__}")
        received: dict[int, tuple[bytes, bytes]] = {}
        for raw_sender, ciphertext in ciphertexts.items():
            sender = _check_node_id(raw_sender, "ciphertext sender")
            if sender == self._node_id:
                raise ProtocolError(f"node {self._node_id} received a ciphertext from itself")
            if sender not in self._u1:
                raise ProtocolError(
                    f"ciphertext from node {sender}, which did not announce keys (not in U1)"
                )
            if sender in received:
                raise DuplicateSubmissionError(f"two ciphertexts from node {sender}")
            received[sender] = self._decrypt_from(sender, ciphertext)
        if len(received) + 1 < cfg.threshold:
            raise TooFewParticipantsError(
                f"node {self._node_id}: {len(received)} other nodes shared keys, U2 has "
                f"{len(received) + 1} members, threshold t={cfg.threshold}"
            )
        codec.check_field_elements(value, bits=cfg.bits, expected_shape=(cfg.dim,), name="value")
        _, mask_sk, b_seed = self._secrets()

        nonce = _prg_nonce(cfg.session_id)
        masked = np.array(value, dtype=np.uint64, copy=True)
        _add_inplace(masked, _prg(b_seed, nonce=nonce, dim=cfg.dim, bits=cfg.bits), cfg.bits)
        for other in sorted(received):
            seed = _derive_pair_key(
                mask_sk,
                self._u1[other].mask_pk,
                purpose=_PURPOSE_MASK,
                session_id=cfg.session_id,
                node_a=self._node_id,
                node_b=other,
            )
            mask = _prg(seed, nonce=nonce, dim=cfg.dim, bits=cfg.bits)
            if other > self._node_id:
                _add_inplace(masked, mask, cfg.bits)
            else:
                _sub_inplace(masked, mask, cfg.bits)

        self._shares.update(received)
        # The private keys and the seed are no longer needed: only shares are released later.
        self._enc_sk = None
        self._mask_sk = None
        self._b_seed = None
        self._stage = "unmask"
        return masked

    def unmask(self, survivors: Sequence[int], dropped: Sequence[int]) -> dict[int, bytes]:
        """Release the shares the coordinator needs to remove the masks.

        Args:
            survivors: Nodes whose masked input the coordinator received (U3); must include this
                client and hold at least t nodes.
            dropped: Nodes of U2 that sent no masked input. ``survivors`` and ``dropped`` must be
                disjoint and together equal U2.

        Returns:
            ``{owner: share}``: the b-share of every survivor and the mask-key share of every
            dropped node.

        Raises:
            StageOrderError: If not in stage ``unmask``.
            ProtocolError: If a node is listed twice, in both lists, not in U2, if this client is
                not a survivor, or if the lists do not cover U2.
            TooFewParticipantsError: If fewer than t survivors are listed.
        """
        _check_stage(self._stage, "unmask", "unmask")
        u2 = set(self._shares)
        lists: dict[str, list[int]] = {}
        for name, nodes in (("survivors", survivors), ("dropped", dropped)):
            if isinstance(nodes, str | bytes) or not isinstance(nodes, Sequence):
                raise ProtocolError(f"{name} must be a sequence of node ids, got {nodes!r}")
            checked = [_check_node_id(node, f"{name} entry") for node in nodes]
            if len(set(checked)) != len(checked):
                raise ProtocolError(f"{name} lists a node more than once: {checked}")
            strangers = sorted(set(checked) - u2)
            if strangers:
                raise ProtocolError(
                    f"{name} lists node(s) {strangers} that did not share keys with node "
                    f"{self._node_id} (not in U2)"
                )
            lists[name] = checked
        both = sorted(set(lists["survivors"]) & set(lists["dropped"]))
        if both:
            raise ProtocolError(
                f"node(s) {both} listed both as survivor and as dropped; refusing to release "
                "both shares of the same node"
            )
        if self._node_id not in lists["survivors"]:
            raise ProtocolError(f"node {self._node_id} is not listed among the survivors")
        uncovered = sorted(u2 - set(lists["survivors"]) - set(lists["dropped"]))
        if uncovered:
            raise ProtocolError(f"U2 node(s) {uncovered} are neither survivors nor dropped")
        if len(lists["survivors"]) < self._config.threshold:
            raise TooFewParticipantsError(
                f"{len(lists['survivors'])} survivors, threshold t={self._config.threshold}"
            )
        response: dict[int, bytes] = {}
        for owner in lists["survivors"]:
            response[owner] = self._shares[owner][0]
        for owner in lists["dropped"]:
            response[owner] = self._shares[owner][1]
        self._shares = {}
        self._stage = "done"
        return response

    def export_state(self) -> dict[str, StateValue]:
        """Return a serializable snapshot so a fresh process can continue the protocol.

        All values are ``bytes``, ``int``, ``str`` or homogeneous lists of ``int`` or ``bytes``,
        as a Flower ``ConfigRecord`` accepts. The snapshot holds private keys and shares: store
        it only on the client's own node, and never restore a snapshot older than the latest
        one (a replayed state could answer :meth:`unmask` twice).

        Returns:
            The state dictionary.
        """
        state: dict[str, StateValue] = {
            "version": _STATE_VERSION,
            "stage": self._stage,
            "node_id": self._node_id,
            "session_id": self._config.session_id,
            "node_ids": list(self._config.node_ids),
            "threshold": self._config.threshold,
            "bits": self._config.bits,
            "dim": self._config.dim,
        }
        if self._enc_sk is not None and self._mask_sk is not None and self._b_seed is not None:
            state["enc_sk"] = self._enc_sk.private_bytes_raw()
            state["mask_sk"] = self._mask_sk.private_bytes_raw()
            state["b_seed"] = self._b_seed
        if self._u1:
            order = sorted(self._u1)
            state["u1_ids"] = order
            state["u1_enc_pks"] = [self._u1[n].enc_pk for n in order]
            state["u1_mask_pks"] = [self._u1[n].mask_pk for n in order]
        if self._shares:
            owners = sorted(self._shares)
            state["share_owners"] = owners
            state["b_shares"] = [self._shares[n][0] for n in owners]
            state["sk_shares"] = [self._shares[n][1] for n in owners]
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SecAggClient:
        """Rebuild a client from :meth:`export_state` output.

        Args:
            state: The exported snapshot.

        Returns:
            A client in the same stage with the same secrets.

        Raises:
            ProtocolError: If the snapshot is malformed or inconsistent with its stage.
            ConfigError: If its configuration fields are invalid.
        """
        if not isinstance(state, Mapping):
            raise ProtocolError(f"state must be a mapping, got {type(state).__name__}")

        def get(name: str, kind: type) -> Any:
            if name not in state:
                raise ProtocolError(f"state field {name!r} is missing")
            value = state[name]
            if kind is int and not _is_int(value):
                raise ProtocolError(f"state field {name!r} must be int, got {value!r}")
            if kind is not int and not isinstance(value, kind):
                raise ProtocolError(
                    f"state field {name!r} must be {kind.__name__}, got {type(value).__name__}"
                )
            return value

        def get_list(name: str, kind: type) -> list[Any]:
            items = list(get(name, list))
            for item in items:
                ok = _is_int(item) if kind is int else isinstance(item, kind)
                if not ok:
                    raise ProtocolError(f"state field {name!r} must hold only {kind.__name__}")
            return items

        version = int(get("version", int))
        if version != _STATE_VERSION:
            raise ProtocolError(f"state version {version} is not supported (expected 1)")
        stage = str(get("stage", str))
        if stage not in CLIENT_STAGES:
            raise ProtocolError(f"state stage {stage!r} is not one of {CLIENT_STAGES}")
        config = SecAggConfig(
            session_id=get("session_id", str),
            node_ids=tuple(get_list("node_ids", int)),
            threshold=get("threshold", int),
            bits=get("bits", int),
            dim=get("dim", int),
        )
        client = cls(int(get("node_id", int)), config)
        client._stage = stage
        if stage in ("share_keys", "masked_input"):
            try:
                client._enc_sk = X25519PrivateKey.from_private_bytes(get("enc_sk", bytes))
                client._mask_sk = X25519PrivateKey.from_private_bytes(get("mask_sk", bytes))
            except ValueError:
                raise ProtocolError("state holds a malformed X25519 private key") from None
            seed = get("b_seed", bytes)
            if len(seed) != KEY_BYTES:
                raise ProtocolError(f"state field 'b_seed' has {len(seed)} bytes, expected 32")
            client._b_seed = bytes(seed)
        if stage in ("masked_input", "unmask"):
            ids = get_list("u1_ids", int)
            enc = get_list("u1_enc_pks", bytes)
            mask = get_list("u1_mask_pks", bytes)
            if not len(ids) == len(enc) == len(mask):
                raise ProtocolError("state fields 'u1_ids', 'u1_enc_pks', 'u1_mask_pks' differ")
            u1 = {
                int(n): PublicKeys(enc_pk=bytes(e), mask_pk=bytes(m))
                for n, e, m in zip(ids, enc, mask, strict=True)
            }
            client._u1 = _check_public_key_set(u1, config, who="state")
            if client._node_id not in client._u1:
                raise ProtocolError("state: own node is missing from 'u1_ids'")
            owners = get_list("share_owners", int)
            b_shares = get_list("b_shares", bytes)
            sk_shares = get_list("sk_shares", bytes)
            if not len(owners) == len(b_shares) == len(sk_shares):
                raise ProtocolError("state fields 'share_owners', 'b_shares', 'sk_shares' differ")
            index = client._share_index_of(client._node_id)
            shares: dict[int, tuple[bytes, bytes]] = {}
            for owner, b_share, sk_share in zip(owners, b_shares, sk_shares, strict=True):
                owner_id = int(owner)
                if owner_id not in client._u1:
                    raise ProtocolError(f"state holds shares of node {owner_id}, not in U1")
                shares[owner_id] = (
                    _check_share(b_share, expected_index=index, field="state b-share"),
                    _check_share(sk_share, expected_index=index, field="state mask-key share"),
                )
            if client._node_id not in shares:
                raise ProtocolError("state lacks this node's own shares")
            client._shares = shares
        if stage == "masked_input" and client._own_public_keys() != client._u1[client._node_id]:
            raise ProtocolError("state: private keys do not match the node's announced keys")
        return client


# --------------------------------------------------------------------------------------------
# Coordinator
# --------------------------------------------------------------------------------------------


class SecAggServer:
    """Coordinator state machine; it never holds any individual unmasked vector.

    Rounds must be called in order: :meth:`receive_public_keys` -> :meth:`route_shares` ->
    :meth:`receive_masked_input` (repeatedly) -> :meth:`close_masked_inputs` -> :meth:`unmask`.
    Masked inputs are added to a running sum as they arrive; only the sum is kept.
    """

    def __init__(self, config: SecAggConfig) -> None:
        """Create a coordinator before the key-announcement round.

        Args:
            config: The session configuration.

        Raises:
            ConfigError: If ``config`` is not a SecAggConfig.
        """
        if not isinstance(config, SecAggConfig):
            raise ConfigError(f"config must be a SecAggConfig, got {type(config).__name__}")
        self._config = config
        self._stage = "public_keys"
        self._u1: dict[int, PublicKeys] = {}
        self._u2: list[int] = []
        self._received: set[int] = set()
        self._sum = np.zeros(config.dim, dtype=np.uint64)
        self._survivors: list[int] = []
        self._dropped: list[int] = []

    @property
    def config(self) -> SecAggConfig:
        """The session configuration."""
        return self._config

    @property
    def stage(self) -> str:
        """Name of the round this coordinator expects next (one of ``SERVER_STAGES``)."""
        return self._stage

    def receive_public_keys(self, keys: Mapping[int, PublicKeys]) -> dict[int, PublicKeys]:
        """Validate the announced keys and return the broadcast set U1.

        Args:
            keys: ``{node: PublicKeys}`` of every node that answered setup.

        Returns:
            U1 as ``{node: PublicKeys}`` in ascending node order, to send to every node in it.

        Raises:
            StageOrderError: If not in stage ``public_keys``.
            ProtocolError: If a node is not a participant or two keys coincide.
            TooFewParticipantsError: If fewer than t nodes answered.
        """
        _check_stage(self._stage, "public_keys", "receive_public_keys")
        self._u1 = _check_public_key_set(keys, self._config, who="coordinator")
        self._stage = "route_shares"
        return dict(self._u1)

    def route_shares(
        self, outgoing: Mapping[int, Mapping[int, bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """Transpose the encrypted shares from senders to recipients.

        Args:
            outgoing: ``{sender: {recipient: ciphertext}}``; each sender (in U1) must address
                every other node of U1. The senders form U2.

        Returns:
            ``{recipient: {sender: ciphertext}}`` for every recipient in U2, holding the
            ciphertexts from every other member of U2.

        Raises:
            StageOrderError: If not in stage ``route_shares``.
            ProtocolError: If a sender is not in U1 or its recipients are not U1 minus itself.
            TooFewParticipantsError: If fewer than t nodes sent shares.
        """
        _check_stage(self._stage, "route_shares", "route_shares")
        if not isinstance(outgoing, Mapping):
            raise ProtocolError(f"outgoing must be a mapping, got {type(outgoing).__name__}")
        checked: dict[int, dict[int, bytes]] = {}
        for raw_sender, cts in outgoing.items():
            sender = _check_node_id(raw_sender, "share sender")
            if sender not in self._u1:
                raise ProtocolError(f"node {sender} sent shares but is not in U1")
            if not isinstance(cts, Mapping):
                raise ProtocolError(f"shares of node {sender} must be a mapping")
            addressed: dict[int, bytes] = {}
            for raw_recipient, ciphertext in cts.items():
                recipient = _check_node_id(raw_recipient, f"recipient of node {sender}")
                if not isinstance(ciphertext, bytes):
                    raise ProtocolError(
                        f"ciphertext {sender} -> {recipient} must be bytes, "
                        f"got {type(ciphertext).__name__}"
                    )
                addressed[recipient] = ciphertext
            expected = set(self._u1) - {sender}
            if set(addressed) != expected:
                raise ProtocolError(
                    f"node {sender} addressed {sorted(addressed)}, expected U1 minus itself "
                    f"{sorted(expected)}"
                )
            checked[sender] = addressed
        if len(checked) < self._config.threshold:
            raise TooFewParticipantsError(
                f"{len(checked)} nodes shared keys, threshold t={self._config.threshold}"
            )
        u2 = sorted(checked)
        routed: dict[int, dict[int, bytes]] = {
            recipient: {sender: checked[sender][recipient] for sender in u2 if sender != recipient}
            for recipient in u2
        }
        self._u2 = u2
        self._stage = "masked_input"
        return routed

    def receive_masked_input(self, node_id: int, masked: npt.NDArray[np.uint64]) -> None:
        """Add one client's masked vector to the running sum.

        Args:
            node_id: The sender; must be in U2.
            masked: uint64 vector of shape ``(dim,)`` with elements ``< 2^bits``.

        Raises:
            LateSubmissionError: If the masked-input round is already closed.
            StageOrderError: If the round has not started yet.
            ProtocolError: If the node is not in U2.
            DuplicateSubmissionError: If the node already sent a masked input.
            ShapeError: If ``masked`` is not uint64 of shape ``(dim,)``.
            FieldRangeError: If an element is ``>= 2^bits``.
        """
        if self._stage in ("unmask", "done"):
            raise LateSubmissionError(
                f"masked input from node {node_id!r} arrived in stage {self._stage!r}, after "
                "the masked-input round was closed"
            )
        _check_stage(self._stage, "masked_input", "receive_masked_input")
        node = _check_node_id(node_id, "masked input sender")
        if node not in self._u2:
            raise ProtocolError(f"masked input from node {node}, which is not in U2")
        if node in self._received:
            raise DuplicateSubmissionError(f"node {node} already sent its masked input")
        cfg = self._config
        codec.check_field_elements(
            masked, bits=cfg.bits, expected_shape=(cfg.dim,), name=f"masked input of node {node}"
        )
        _add_inplace(self._sum, masked, cfg.bits)
        self._received.add(node)

    def close_masked_inputs(self) -> tuple[list[int], list[int]]:
        """End the masked-input round.

        Returns:
            ``(survivors, dropped)``: U3 (nodes whose masked input arrived) and U2 minus U3, both
            ascending; send both lists to every survivor.

        Raises:
            StageOrderError: If not in stage ``masked_input``.
            TooFewParticipantsError: If fewer than t masked inputs arrived (the round stays
                open, so more inputs may still be accepted).
        """
        _check_stage(self._stage, "masked_input", "close_masked_inputs")
        survivors = sorted(self._received)
        if len(survivors) < self._config.threshold:
            raise TooFewParticipantsError(
                f"{len(survivors)} masked inputs arrived, threshold t={self._config.threshold}"
            )
        self._survivors = survivors
        self._dropped = sorted(set(self._u2) - self._received)
        self._stage = "unmask"
        return list(self._survivors), list(self._dropped)

    def unmask(self, responses: Mapping[int, Mapping[int, bytes]]) -> npt.NDArray[np.uint64]:
        """Reconstruct the secrets, remove all masks and return the sum.

        For every survivor its seed b_u is reconstructed and ``PRG(b_u)`` removed; for every
        dropped node its mask key is reconstructed (and checked against its announced public key)
        and its pairwise masks with every survivor are cancelled.

        Args:
            responses: ``{responder: {owner: share}}`` from at least t survivors; each holds one
                share per node of U3 and of the dropped set.

        Returns:
            The sum over the survivors of their input vectors, uint64 modulo 2^bits.

        Raises:
            StageOrderError: If not in stage ``unmask``.
            ProtocolError: If a responder is not a survivor, a response is incomplete or
                malformed, or a reconstruction fails (the message names the owner).
            TooFewParticipantsError: If fewer than t survivors responded (nothing changes, so the
                call may be repeated with more responses).
        """
        _check_stage(self._stage, "unmask", "unmask")
        cfg = self._config
        if not isinstance(responses, Mapping):
            raise ProtocolError(f"responses must be a mapping, got {type(responses).__name__}")
        order = sorted(self._u1)
        survivors = set(self._survivors)
        owners = survivors | set(self._dropped)
        shares_by_owner: dict[int, list[bytes]] = {owner: [] for owner in owners}
        for raw_responder in sorted(responses, key=lambda n: int(n) if _is_int(n) else -1):
            responder = _check_node_id(raw_responder, "unmask responder")
            if responder not in survivors:
                raise ProtocolError(f"unmask response from node {responder}, not a survivor")
            response = responses[raw_responder]
            if not isinstance(response, Mapping):
                raise ProtocolError(f"unmask response of node {responder} must be a mapping")
            got = {_check_node_id(owner, f"owner in response of {responder}") for owner in response}
            if got != owners or len(response) != len(owners):
                raise ProtocolError(
                    f"unmask response of node {responder} covers {sorted(got)}, expected "
                    f"{sorted(owners)}"
                )
            index = order.index(responder) + 1
            for raw_owner, share in response.items():
                owner = int(raw_owner)
                shares_by_owner[owner].append(
                    _check_share(
                        share,
                        expected_index=index,
                        field=f"share of node {owner} from node {responder}",
                    )
                )
        responders = len(responses)
        if responders < cfg.threshold:
            raise TooFewParticipantsError(
                f"{responders} survivors answered the unmask round, threshold t={cfg.threshold}"
            )

        nonce = _prg_nonce(cfg.session_id)
        total = np.array(self._sum, dtype=np.uint64, copy=True)
        for owner in self._survivors:
            # Exactly t shares (the PyCryptodome-documented usage, O(t^2)); the integrity check
            # inside the shared secret detects any corrupt share among them.
            seed = _combine_secret(
                shares_by_owner[owner][: cfg.threshold], owner=owner, what="self-mask seed"
            )
            _sub_inplace(total, _prg(seed, nonce=nonce, dim=cfg.dim, bits=cfg.bits), cfg.bits)
        for owner in self._dropped:
            raw_sk = _combine_secret(
                shares_by_owner[owner][: cfg.threshold], owner=owner, what="mask key"
            )
            mask_sk = X25519PrivateKey.from_private_bytes(raw_sk)
            if mask_sk.public_key().public_bytes_raw() != self._u1[owner].mask_pk:
                raise ProtocolError(
                    f"reconstructed mask key of node {owner} does not match its public key"
                )
            for survivor in self._survivors:
                pair_seed = _derive_pair_key(
                    mask_sk,
                    self._u1[survivor].mask_pk,
                    purpose=_PURPOSE_MASK,
                    session_id=cfg.session_id,
                    node_a=owner,
                    node_b=survivor,
                )
                mask = _prg(pair_seed, nonce=nonce, dim=cfg.dim, bits=cfg.bits)
                # The survivor added +mask if owner > survivor and -mask otherwise.
                if owner > survivor:
                    _sub_inplace(total, mask, cfg.bits)
                else:
                    _add_inplace(total, mask, cfg.bits)
        self._stage = "done"
        self._sum = np.zeros(0, dtype=np.uint64)
        return total


class SecureSumTask(Protocol):
    """What the secure sum needs from a task manifest (dataset vector or PE round)."""

    @property
    def task_id(self) -> str:
        """Session id; every message of the round carries it."""
        ...

    @property
    def node_ids(self) -> tuple[int, ...]:
        """The K participants."""
        ...

    @property
    def deadline_s(self) -> float:
        """Per-stage deadline in seconds."""
        ...

    @property
    def dim(self) -> int:
        """Length of the summed vector."""
        ...

    def secagg_config(self) -> SecAggConfig:
        """Secure-sum parameters (threshold t, field bits)."""
        ...

    def to_json(self) -> str:
        """The manifest as canonical JSON."""
        ...
