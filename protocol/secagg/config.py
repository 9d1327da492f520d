"""The session configuration, the announced round keys and the task interface of a secure sum."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fedsynth.protocol import codec
from fedsynth.protocol.errors import (
    ConfigError,
    IdentityError,
    KeyAuthenticationError,
    ProtocolError,
    TooFewParticipantsError,
)
from fedsynth.protocol.identity import check_holder_name
from fedsynth.protocol.secagg.crypto import (
    check_node_id,
    check_x25519_public,
    is_int,
    round_keys_message,
    signature_is_valid,
)
from fedsynth.protocol.secagg.stages import KEY_BYTES, MAX_DIM, MAX_NODE_ID, MAX_SESSION_ID_BYTES

if TYPE_CHECKING:
    from fedsynth.protocol.manifest import PrivacySpec

StateValue = bytes | int | str | list[int] | list[bytes] | list[str]
"""Value types of an exported client state (all accepted by a Flower ``ConfigRecord``)."""


@dataclass(frozen=True)
class SecAggConfig:
    """Parameters of one secure-summation session, identical at every party.

    Attributes:
        session_id: Unique per round; binds all derived keys, masks, nonces and signatures.
            Non-empty.
        node_ids: The K participants chosen for this round, distinct ints in [0, 2^64), K >= 2.
            A list is accepted and stored as a tuple.
        threshold: Shamir threshold t with 2 <= t <= K; at least t clients must survive. Holders
            additionally refuse t below :func:`min_safe_threshold`.
        bits: Field size in bits (see :func:`fedsynth.protocol.codec.validate_bits`).
        dim: Vector length, 1 <= dim <= ``MAX_DIM``.
        terms: Hex SHA-256 of the task's terms (its whole manifest), or "" for a bare sum.
            Bound into every signature, so holders handed different manifests under one task id
            (another noise, scale or mode for one of them) reject each other's keys.
    """

    session_id: str
    node_ids: tuple[int, ...]
    threshold: int
    bits: int
    dim: int
    terms: str = ""

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
            if not is_int(node) or not 0 <= int(node) <= MAX_NODE_ID:
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
        if not is_int(self.threshold) or not 2 <= int(self.threshold) <= len(ids):
            raise ConfigError(
                f"threshold t={self.threshold!r} must be an int with 2 <= t <= K={len(ids)}"
            )
        object.__setattr__(self, "threshold", int(self.threshold))
        object.__setattr__(self, "bits", codec.validate_bits(self.bits))
        if not is_int(self.dim) or not 1 <= int(self.dim) <= MAX_DIM:
            raise ConfigError(f"dim={self.dim!r} must be an int with 1 <= dim <= {MAX_DIM}")
        object.__setattr__(self, "dim", int(self.dim))
        if not isinstance(self.terms, str) or (
            self.terms and not re.fullmatch(r"[0-9a-f]{64}", self.terms)
        ):
            raise ConfigError(f"terms={self.terms!r} must be '' or 64 lowercase hex digits")

    def to_dict(self) -> dict[str, str | int | list[int]]:
        """Return plain JSON-able (and Flower ``ConfigRecord``-able) values for transport."""
        return {
            "session_id": self.session_id,
            "node_ids": list(self.node_ids),
            "threshold": self.threshold,
            "bits": self.bits,
            "dim": self.dim,
            "terms": self.terms,
        }

    def digest(self) -> bytes:
        """SHA-256 of the canonical JSON of :meth:`to_dict`; every signature binds it.

        Two holders that sign under different configurations (other participants, another t,
        other task terms) reject each other's keys, so the coordinator cannot run one session
        with different thresholds or manifests at different holders.
        """
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(b"fedsynth/secagg/config\x00" + text.encode("utf-8")).digest()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SecAggConfig:
        """Rebuild a config from :meth:`to_dict` output.

        Args:
            data: Mapping with keys ``session_id``, ``node_ids``, ``threshold``, ``bits``, ``dim``
                (and ``terms``, "" when absent).

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
            terms=data.get("terms", ""),
        )


@dataclass(frozen=True)
class PublicKeys:
    """What a client announces in the setup round: two X25519 keys, signed under its identity.

    Attributes:
        enc_pk: Raw 32-byte key for the encryption of shares between clients.
        mask_pk: Raw 32-byte key for the pairwise masks.
        name: The announcing holder's roster name.
        sign_pk: Raw 32-byte Ed25519 key the signature verifies under; holders accept it only
            if it is the roster's key for ``name``.
        signature: Ed25519 signature over :func:`round_keys_message` (session, configuration,
            node id, both keys, name). Its validity is checked by :meth:`verify`, not here, so
            an unsigned key can be represented and refused.
    """

    enc_pk: bytes
    mask_pk: bytes
    name: str
    sign_pk: bytes
    signature: bytes

    def __post_init__(self) -> None:
        """Check the keys' types and lengths, that they are usable points, and the name.

        Raises:
            ProtocolError: Naming the malformed field.
        """
        check_x25519_public(self.enc_pk, "enc_pk")
        check_x25519_public(self.mask_pk, "mask_pk")
        try:
            check_holder_name(self.name, "name")
        except IdentityError as exc:
            raise ProtocolError(str(exc)) from None
        for name in ("sign_pk", "signature"):
            value = getattr(self, name)
            if not isinstance(value, bytes):
                raise ProtocolError(f"{name} must be bytes, got {type(value).__name__}")
        if len(self.sign_pk) != KEY_BYTES:
            raise ProtocolError(f"sign_pk has {len(self.sign_pk)} bytes, expected {KEY_BYTES}")

    def message(self, *, node: int, config: SecAggConfig) -> bytes:
        """The bytes the signature must cover for ``node`` in the session ``config``."""
        return round_keys_message(
            session_id=config.session_id,
            config_digest=config.digest(),
            node=node,
            enc_pk=self.enc_pk,
            mask_pk=self.mask_pk,
            name=self.name,
        )

    def verify(self, *, node: int, config: SecAggConfig, sign_pk: bytes | None = None) -> bool:
        """Whether the signature is valid for ``node`` in ``config``.

        Args:
            node: The node id the keys are announced for.
            config: The session.
            sign_pk: The key to verify under (a holder passes the roster's key for
                :attr:`name`); None uses the announced :attr:`sign_pk`.
        """
        key = self.sign_pk if sign_pk is None else sign_pk
        return signature_is_valid(key, self.signature, self.message(node=node, config=config))

    def to_dict(self) -> dict[str, bytes | str]:
        """Return the fields for transport (``ConfigRecord``-compatible)."""
        return {
            "enc_pk": self.enc_pk,
            "mask_pk": self.mask_pk,
            "name": self.name,
            "sign_pk": self.sign_pk,
            "signature": self.signature,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PublicKeys:
        """Rebuild from :meth:`to_dict` output.

        Raises:
            KeyAuthenticationError: If the name, signing key or signature is missing (an
                unsigned key).
            ProtocolError: If a key is missing or malformed.
        """
        if not isinstance(data, Mapping) or "enc_pk" not in data or "mask_pk" not in data:
            raise ProtocolError("public keys message must hold 'enc_pk' and 'mask_pk'")
        missing = [k for k in ("name", "sign_pk", "signature") if k not in data]
        if missing:
            raise KeyAuthenticationError(
                f"public keys message lacks {missing}: round keys must be signed"
            )
        return cls(
            enc_pk=data["enc_pk"],
            mask_pk=data["mask_pk"],
            name=data["name"],
            sign_pk=data["sign_pk"],
            signature=data["signature"],
        )


@dataclass(frozen=True)
class KeyShares:
    """What a client sends at share_keys.

    Attributes:
        ciphertexts: ``{recipient: AES-GCM ciphertext}`` for every other node of U1.
        commitments: ``{recipient: seed-share commitment || key-share commitment}`` (2 x 32
            bytes) for every node of U1, the sender included; the coordinator uses them to
            discard corrupt shares at unmask.
    """

    ciphertexts: dict[int, bytes]
    commitments: dict[int, bytes]


def check_public_key_set(
    keys: Mapping[int, PublicKeys], config: SecAggConfig, *, who: str
) -> dict[int, PublicKeys]:
    """Validate a set of announced keys: membership, types, distinct keys and names, >= t.

    Signatures are checked separately (the coordinator and the holders verify under different
    keys). Raises on the first problem.

    Raises:
        ProtocolError: If a node is not a participant or an entry is not PublicKeys.
        KeyAuthenticationError: If two nodes share an X25519 key, a name or a signing key.
        TooFewParticipantsError: If fewer than t nodes are listed.
    """
    if not isinstance(keys, Mapping):
        raise ProtocolError(f"{who}: public keys must be a mapping, got {type(keys).__name__}")
    allowed = set(config.node_ids)
    checked: dict[int, PublicKeys] = {}
    seen: dict[bytes, int] = {}
    names: dict[str, int] = {}
    for raw_node in sorted(keys, key=lambda n: int(n) if is_int(n) else -1):
        node = check_node_id(raw_node, f"{who}: public key owner")
        if node not in allowed:
            raise ProtocolError(f"{who}: node {node} is not a participant of this session")
        pks = keys[raw_node]
        if not isinstance(pks, PublicKeys):
            raise ProtocolError(
                f"{who}: keys of node {node} must be PublicKeys, got {type(pks).__name__}"
            )
        for key in (pks.enc_pk, pks.mask_pk, pks.sign_pk):
            if key in seen:
                raise KeyAuthenticationError(
                    f"{who}: node {node} announces a public key already used by node {seen[key]}"
                )
            seen[key] = node
        if pks.name in names:
            raise KeyAuthenticationError(
                f"{who}: nodes {names[pks.name]} and {node} both announce keys as holder "
                f"{pks.name!r}"
            )
        names[pks.name] = node
        checked[node] = pks
    if len(checked) < config.threshold:
        raise TooFewParticipantsError(
            f"{who}: {len(checked)} nodes announced keys, threshold t={config.threshold}"
        )
    return checked


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

    @property
    def privacy(self) -> PrivacySpec:
        """The guarantee and how the noise is shared (exact sharing removes excess at unmask)."""
        ...

    def secagg_config(self) -> SecAggConfig:
        """Secure-sum parameters (threshold t, field bits)."""
        ...

    def to_json(self) -> str:
        """The manifest as canonical JSON."""
        ...
