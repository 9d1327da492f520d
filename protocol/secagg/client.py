"""One holder's side of the secure sum: a state machine over the five stages.

The holder signs its round keys with its long-term identity, verifies every peer's signed keys
under the roster it pins, masks its vector, signs the survivor set it is told, and reveals
shares only for a survivor set that at least t survivors signed (Bonawitz et al., CCS 2017,
the active-adversary variant). It also refuses a threshold below :func:`min_safe_threshold`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedsynth.protocol import codec
from fedsynth.protocol.errors import (
    ConfigError,
    DuplicateSubmissionError,
    IdentityError,
    InconsistentSurvivorsError,
    KeyAuthenticationError,
    ProtocolError,
    StageOrderError,
    TooFewParticipantsError,
    UnsafeThresholdError,
)
from fedsynth.protocol.identity import HolderIdentity, Roster
from fedsynth.protocol.secagg.config import (
    KeyShares,
    PublicKeys,
    SecAggConfig,
    StateValue,
    check_public_key_set,
)
from fedsynth.protocol.secagg.crypto import (
    GCM_NONCE_BYTES,
    PURPOSE_ENC,
    SHARE_KIND_MASK_KEY,
    SHARE_KIND_SEED,
    aad,
    add_inplace,
    check_node_id,
    check_share,
    decode_plaintext,
    derive_pair_key,
    encode_plaintext,
    is_int,
    pairwise_mask,
    prg,
    prg_nonce,
    share_commitment,
    signature_is_valid,
    split_secrets,
    sub_inplace,
    survivors_message,
)
from fedsynth.protocol.secagg.stages import (
    CLIENT_STAGES,
    KEY_BYTES,
    SIGNATURE_BYTES,
    Stage,
    check_stage,
    min_safe_threshold,
)

_STATE_VERSION: Final = 2


def check_threshold_floor(config: SecAggConfig, max_colluders: int) -> None:
    """Refuse a threshold below what the guarantee needs for K and ``max_colluders``.

    Raises:
        ConfigError: If ``max_colluders`` is not an int >= 0.
        UnsafeThresholdError: If ``t < min_safe_threshold(K, max_colluders)``.
    """
    if isinstance(max_colluders, bool) or not isinstance(max_colluders, int) or max_colluders < 0:
        raise ConfigError(f"max_colluders={max_colluders!r}: must be an int >= 0")
    k = len(config.node_ids)
    floor = min_safe_threshold(k, max_colluders)
    if config.threshold < floor:
        limit = (
            f"needs t >= {floor}"
            if floor <= k
            else f"no t <= K is safe (t >= {floor} would be needed)"
        )
        raise UnsafeThresholdError(
            f"threshold t={config.threshold} with K={k} participants and "
            f"max_colluders={max_colluders}: the secure sum hides each input only if "
            f"2t - K > colluders, which {limit}"
        )


class SecAggClient:
    """State machine of one client.

    Stages must be called in order: :meth:`setup` -> :meth:`share_keys` -> :meth:`masked_input`
    -> :meth:`consistency` -> :meth:`unmask`. An out-of-order call raises
    :class:`StageOrderError`; any other refusal leaves the client in its stage, having revealed
    nothing. The object holds secret keys; :meth:`export_state` returns the round's secrets too
    (never the long-term identity), so keep exported states local.
    """

    def __init__(
        self,
        node_id: int,
        config: SecAggConfig,
        *,
        identity: HolderIdentity,
        roster: Roster,
        max_colluders: int = 0,
    ) -> None:
        """Create a client before the setup round.

        Args:
            node_id: This client's id; must be in ``config.node_ids``.
            config: The session configuration.
            identity: This holder's long-term signing identity; must be in ``roster``.
            roster: The consortium roster this holder pins; every peer's keys must be signed
                by a roster member.
            max_colluders: Holders assumed to collude with the coordinator; t must satisfy
                ``2t - K > max_colluders``.

        Raises:
            ConfigError: If ``config`` is not a SecAggConfig or ``node_id`` is not a participant.
            IdentityError: If the identity is missing from the roster or does not match it.
            UnsafeThresholdError: If the threshold is below the safe floor.
        """
        if not isinstance(config, SecAggConfig):
            raise ConfigError(f"config must be a SecAggConfig, got {type(config).__name__}")
        if not is_int(node_id) or int(node_id) not in config.node_ids:
            raise ConfigError(
                f"node_id={node_id!r} is not among the {len(config.node_ids)} session node_ids"
            )
        if not isinstance(identity, HolderIdentity):
            raise IdentityError(f"identity must be a HolderIdentity, got {type(identity).__name__}")
        if not isinstance(roster, Roster):
            raise IdentityError(f"roster must be a Roster, got {type(roster).__name__}")
        if identity.name not in roster or roster.key_of(identity.name) != identity.public_key:
            raise IdentityError(
                f"identity {identity.name!r} is not in the pinned roster with this key"
            )
        check_threshold_floor(config, max_colluders)
        self._node_id = int(node_id)
        self._config = config
        self._identity = identity
        self._roster = roster
        self._stage = Stage.SETUP
        self._enc_sk: X25519PrivateKey | None = None
        self._mask_sk: X25519PrivateKey | None = None
        self._b_seed: bytes | None = None
        self._u1: dict[int, PublicKeys] = {}
        self._u3: list[int] = []
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
    def stage(self) -> Stage:
        """The call this client expects next (one of ``CLIENT_STAGES``)."""
        return self._stage

    def _secrets(self) -> tuple[X25519PrivateKey, X25519PrivateKey, bytes]:
        """Return ``(enc_sk, mask_sk, b_seed)``; they exist from setup until masked_input."""
        if self._enc_sk is None or self._mask_sk is None or self._b_seed is None:
            raise StageOrderError(
                f"node {self._node_id} holds no key material in stage {self._stage.value!r}"
            )
        return self._enc_sk, self._mask_sk, self._b_seed

    def _own_public_keys(self) -> PublicKeys:
        """Return this client's signed public keys (only valid between setup and masked_input)."""
        enc_sk, mask_sk, _ = self._secrets()
        enc_pk = enc_sk.public_key().public_bytes_raw()
        mask_pk = mask_sk.public_key().public_bytes_raw()
        unsigned = PublicKeys(
            enc_pk=enc_pk,
            mask_pk=mask_pk,
            name=self._identity.name,
            sign_pk=self._identity.public_key,
            signature=b"",
        )
        signature = self._identity.sign(unsigned.message(node=self._node_id, config=self._config))
        return PublicKeys(
            enc_pk=enc_pk,
            mask_pk=mask_pk,
            name=self._identity.name,
            sign_pk=self._identity.public_key,
            signature=signature,
        )

    def _share_index_of(self, node: int) -> int:
        """1-based Shamir index of ``node``: its position in the sorted U1 plus one."""
        return sorted(self._u1).index(node) + 1

    def _authenticate(self, u1: Mapping[int, PublicKeys]) -> None:
        """Check every announced key against the pinned roster (KeyAuthenticationError)."""
        for node, keys in u1.items():
            if keys.name not in self._roster:
                raise KeyAuthenticationError(
                    f"node {self._node_id}: keys of node {node} are signed as holder "
                    f"{keys.name!r}, which is not in the pinned roster"
                )
            expected = self._roster.key_of(keys.name)
            if keys.sign_pk != expected:
                raise KeyAuthenticationError(
                    f"node {self._node_id}: keys of node {node} carry a signing key that is not "
                    f"the roster's key of holder {keys.name!r} (substituted)"
                )
            if not keys.verify(node=node, config=self._config, sign_pk=expected):
                raise KeyAuthenticationError(
                    f"node {self._node_id}: keys of node {node} (holder {keys.name!r}) are "
                    f"unsigned or the signature does not verify under the roster key"
                )

    def setup(self) -> PublicKeys:
        """Generate both X25519 key pairs and the 32-byte self-mask seed; sign the keys.

        Returns:
            The signed public keys to announce.

        Raises:
            StageOrderError: If not in stage ``setup``.
        """
        check_stage(self._stage, Stage.SETUP, "setup")
        self._enc_sk = X25519PrivateKey.generate()
        self._mask_sk = X25519PrivateKey.generate()
        self._b_seed = os.urandom(KEY_BYTES)
        self._stage = Stage.SHARE_KEYS
        return self._own_public_keys()

    def share_keys(self, public_keys: Mapping[int, PublicKeys]) -> KeyShares:
        """Verify U1, then Shamir-share the self-mask seed and the mask key to every other node.

        Every entry must be signed by the roster key of the name it carries, names must be
        distinct, and this client's own entry must be unchanged; otherwise nothing is shared.

        Args:
            public_keys: Keys of all nodes that answered setup (the set U1), including this
                client's own, unchanged.

        Returns:
            The encrypted shares for every other node and the commitments for the coordinator.

        Raises:
            StageOrderError: If not in stage ``share_keys``.
            KeyAuthenticationError: If a key is unsigned, wrongly signed, signed by a key not in
                the roster, or two nodes share a key or a name.
            ProtocolError: If the own keys are missing or altered or a node is not a participant.
            TooFewParticipantsError: If fewer than t nodes are listed.
        """
        check_stage(self._stage, Stage.SHARE_KEYS, "share_keys")
        u1 = check_public_key_set(public_keys, self._config, who=f"node {self._node_id}")
        own = self._own_public_keys()
        if u1.get(self._node_id) != own:
            raise ProtocolError(
                f"node {self._node_id}: the broadcast key set lacks or alters this node's keys"
            )
        self._authenticate(u1)
        enc_sk, mask_sk, b_seed = self._secrets()
        cfg = self._config
        order = sorted(u1)
        # One pass over both secrets: b_shares[i] and sk_shares[i] go to order[i] (index i + 1).
        b_shares, sk_shares = split_secrets(
            [b_seed, mask_sk.private_bytes_raw()], cfg.threshold, len(order)
        )
        ciphertexts: dict[int, bytes] = {}
        commitments: dict[int, bytes] = {}
        for position, node in enumerate(order):
            commitments[node] = share_commitment(
                session_id=cfg.session_id,
                owner=self._node_id,
                recipient=node,
                kind=SHARE_KIND_SEED,
                share=b_shares[position],
            ) + share_commitment(
                session_id=cfg.session_id,
                owner=self._node_id,
                recipient=node,
                kind=SHARE_KIND_MASK_KEY,
                share=sk_shares[position],
            )
            if node == self._node_id:
                continue
            key = derive_pair_key(
                enc_sk,
                u1[node].enc_pk,
                purpose=PURPOSE_ENC,
                session_id=cfg.session_id,
                node_a=self._node_id,
                node_b=node,
            )
            plaintext = encode_plaintext(
                self._node_id, node, b_shares[position], sk_shares[position]
            )
            nonce = os.urandom(GCM_NONCE_BYTES)
            sealed = AESGCM(key).encrypt(nonce, plaintext, aad(cfg.session_id, self._node_id, node))
            ciphertexts[node] = nonce + sealed
        own_pos = order.index(self._node_id)
        self._u1 = u1
        self._shares = {self._node_id: (b_shares[own_pos], sk_shares[own_pos])}
        self._stage = Stage.MASKED_INPUT
        return KeyShares(ciphertexts=ciphertexts, commitments=commitments)

    def _decrypt_from(self, sender: int, ciphertext: object) -> tuple[bytes, bytes]:
        """Decrypt and check the shares that ``sender`` addressed to this client."""
        enc_sk, _, _ = self._secrets()
        if not isinstance(ciphertext, bytes):
            raise ProtocolError(
                f"ciphertext from node {sender} must be bytes, got {type(ciphertext).__name__}"
            )
        key = derive_pair_key(
            enc_sk,
            self._u1[sender].enc_pk,
            purpose=PURPOSE_ENC,
            session_id=self._config.session_id,
            node_a=self._node_id,
            node_b=sender,
        )
        nonce, sealed = ciphertext[:GCM_NONCE_BYTES], ciphertext[GCM_NONCE_BYTES:]
        try:
            plaintext = AESGCM(key).decrypt(
                nonce, sealed, aad(self._config.session_id, sender, self._node_id)
            )
        except (InvalidTag, ValueError):
            raise ProtocolError(
                f"ciphertext from node {sender} to node {self._node_id} failed authentication"
            ) from None
        return decode_plaintext(
            plaintext,
            sender=sender,
            recipient=self._node_id,
            expected_index=self._share_index_of(self._node_id),
        )

    def check_ciphertexts(self, ciphertexts: Mapping[int, bytes]) -> None:
        """Check the masked-input stage's ciphertexts (senders, authentication, count) only.

        The same checks :meth:`masked_input` starts with, with no change of state: a holder
        runs them before it pays for its input, so shares that fail to authenticate are
        refused before the budget is charged, not after.

        Raises:
            StageOrderError, ProtocolError, TooFewParticipantsError: as :meth:`masked_input`.
        """
        self._received(ciphertexts)

    def _received(self, ciphertexts: Mapping[int, bytes]) -> dict[int, tuple[bytes, bytes]]:
        """The decrypted, authenticated ``{sender: share pair}`` of the masked-input stage."""
        check_stage(self._stage, Stage.MASKED_INPUT, "masked_input")
        if not isinstance(ciphertexts, Mapping):
            raise ProtocolError(f"ciphertexts must be a mapping, got {type(ciphertexts).__name__}")
        received: dict[int, tuple[bytes, bytes]] = {}
        for raw_sender, ciphertext in ciphertexts.items():
            sender = check_node_id(raw_sender, "ciphertext sender")
            if sender == self._node_id:
                raise ProtocolError(f"node {self._node_id} received a ciphertext from itself")
            if sender not in self._u1:
                raise ProtocolError(
                    f"ciphertext from node {sender}, which did not announce keys (not in U1)"
                )
            if sender in received:
                raise DuplicateSubmissionError(f"two ciphertexts from node {sender}")
            received[sender] = self._decrypt_from(sender, ciphertext)
        if len(received) + 1 < self._config.threshold:
            raise TooFewParticipantsError(
                f"node {self._node_id}: {len(received)} other nodes shared keys, U2 has "
                f"{len(received) + 1} members, threshold t={self._config.threshold}"
            )
        return received

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
        received = self._received(ciphertexts)
        cfg = self._config
        codec.check_field_elements(value, bits=cfg.bits, expected_shape=(cfg.dim,), name="value")
        _, mask_sk, b_seed = self._secrets()

        masked = np.array(value, dtype=np.uint64, copy=True)
        nonce = prg_nonce(cfg.session_id)
        add_inplace(masked, prg(b_seed, nonce=nonce, dim=cfg.dim, bits=cfg.bits), cfg.bits)
        for other in sorted(received):
            mask = pairwise_mask(
                mask_sk,
                self._u1[other].mask_pk,
                session_id=cfg.session_id,
                node=self._node_id,
                peer=other,
                dim=cfg.dim,
                bits=cfg.bits,
            )
            if other > self._node_id:
                add_inplace(masked, mask, cfg.bits)
            else:
                sub_inplace(masked, mask, cfg.bits)

        self._shares.update(received)
        # The private keys and the seed are no longer needed: only shares are released later.
        self._enc_sk = None
        self._mask_sk = None
        self._b_seed = None
        self._stage = Stage.CONSISTENCY
        return masked

    def _check_node_list(self, nodes: object, name: str) -> list[int]:
        """A list of distinct node ids of U2 (ProtocolError otherwise)."""
        if isinstance(nodes, str | bytes) or not isinstance(nodes, Sequence):
            raise ProtocolError(f"{name} must be a sequence of node ids, got {nodes!r}")
        checked = [check_node_id(node, f"{name} entry") for node in nodes]
        if len(set(checked)) != len(checked):
            raise ProtocolError(f"{name} lists a node more than once: {checked}")
        strangers = sorted(set(checked) - set(self._shares))
        if strangers:
            raise ProtocolError(
                f"{name} lists node(s) {strangers} that did not share keys with node "
                f"{self._node_id} (not in U2)"
            )
        return checked

    def consistency(self, survivors: Sequence[int]) -> bytes:
        """Sign the survivor set U3 the coordinator announces (once; it cannot be changed).

        Args:
            survivors: Nodes whose masked input the coordinator received; must be a subset of
                U2 that includes this client and holds at least t nodes.

        Returns:
            This holder's Ed25519 signature over (session, configuration, sorted U3).

        Raises:
            StageOrderError: If not in stage ``consistency``.
            ProtocolError: If the list is malformed, repeats a node, names a node outside U2,
                or lacks this client.
            TooFewParticipantsError: If fewer than t survivors are listed.
        """
        check_stage(self._stage, Stage.CONSISTENCY, "consistency")
        listed = self._check_node_list(survivors, "survivors")
        if self._node_id not in listed:
            raise ProtocolError(f"node {self._node_id} is not listed among the survivors")
        if len(listed) < self._config.threshold:
            raise TooFewParticipantsError(
                f"{len(listed)} survivors, threshold t={self._config.threshold}"
            )
        self._u3 = sorted(listed)
        self._stage = Stage.UNMASK
        return self._identity.sign(self._survivors_message(self._u3))

    def _survivors_message(self, survivors: Sequence[int]) -> bytes:
        return survivors_message(
            session_id=self._config.session_id,
            config_digest=self._config.digest(),
            survivors=survivors,
        )

    def unmask(
        self,
        survivors: Sequence[int],
        dropped: Sequence[int],
        *,
        signatures: Mapping[int, bytes],
    ) -> dict[int, bytes]:
        """Release the shares the coordinator needs to remove the masks.

        Shares are released only if ``survivors`` is the set this client signed at
        :meth:`consistency` and at least t distinct survivors signed that same set (valid
        signatures under their roster keys). Together with :func:`min_safe_threshold`, no survivor
        list with a node and another without it can both be released, so the coordinator never
        gets a node's self-mask seed and its mask key (see the package docstring for what a
        colluder signing as different node ids in different views can still do).

        Args:
            survivors: U3; must equal the signed set.
            dropped: U2 minus U3.
            signatures: ``{signer: signature}`` collected at the consistency stage.

        Returns:
            ``{owner: share}``: the b-share of every survivor and the mask-key share of every
            dropped node.

        Raises:
            StageOrderError: If not in stage ``unmask``.
            InconsistentSurvivorsError: If ``survivors`` differs from the signed set or fewer
                than t survivors signed it.
            ProtocolError: If a node is listed twice, in both lists, not in U2, or the lists do
                not cover U2.
        """
        check_stage(self._stage, Stage.UNMASK, "unmask")
        u2 = set(self._shares)
        told_survivors = self._check_node_list(survivors, "survivors")
        told_dropped = self._check_node_list(dropped, "dropped")
        both = sorted(set(told_survivors) & set(told_dropped))
        if both:
            raise ProtocolError(
                f"node(s) {both} listed both as survivor and as dropped; refusing to release "
                "both shares of the same node"
            )
        if sorted(told_survivors) != self._u3:
            raise InconsistentSurvivorsError(
                f"node {self._node_id}: survivors {sorted(told_survivors)} at unmask differ from "
                f"the survivor set {self._u3} this node signed; revealing nothing"
            )
        uncovered = sorted(u2 - set(told_survivors) - set(told_dropped))
        if uncovered:
            raise ProtocolError(f"U2 node(s) {uncovered} are neither survivors nor dropped")
        if not isinstance(signatures, Mapping):
            raise ProtocolError(f"signatures must be a mapping, got {type(signatures).__name__}")
        message = self._survivors_message(self._u3)
        valid: set[int] = set()
        for raw_signer, signature in signatures.items():
            if not is_int(raw_signer) or int(raw_signer) not in self._u3:
                continue  # only survivors' signatures count
            signer = int(raw_signer)
            if signature_is_valid(self._u1[signer].sign_pk, signature, message):
                valid.add(signer)
        if len(valid) < self._config.threshold:
            raise InconsistentSurvivorsError(
                f"node {self._node_id}: {len(valid)} valid survivor signatures over the survivor "
                f"set, threshold t={self._config.threshold}; revealing nothing"
            )
        response: dict[int, bytes] = {}
        for owner in told_survivors:
            response[owner] = self._shares[owner][0]
        for owner in told_dropped:
            response[owner] = self._shares[owner][1]
        self._shares = {}
        self._stage = Stage.DONE
        return response

    def export_state(self) -> dict[str, StateValue]:
        """Return a serializable snapshot so a fresh process can continue the protocol.

        All values are ``bytes``, ``int``, ``str`` or homogeneous lists, as a Flower
        ``ConfigRecord`` accepts. The snapshot holds the round's private keys and shares (not
        the long-term identity): store it only on the client's own node, and never restore a
        snapshot older than the latest one (a replayed state could sign or answer twice).

        Returns:
            The state dictionary.
        """
        state: dict[str, StateValue] = {
            "version": _STATE_VERSION,
            "stage": self._stage.value,
            "node_id": self._node_id,
            "session_id": self._config.session_id,
            "node_ids": list(self._config.node_ids),
            "threshold": self._config.threshold,
            "bits": self._config.bits,
            "dim": self._config.dim,
            "terms": self._config.terms,
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
            state["u1_names"] = [self._u1[n].name for n in order]
            state["u1_sign_pks"] = [self._u1[n].sign_pk for n in order]
            state["u1_signatures"] = [self._u1[n].signature for n in order]
        if self._shares:
            owners = sorted(self._shares)
            state["share_owners"] = owners
            state["b_shares"] = [self._shares[n][0] for n in owners]
            state["sk_shares"] = [self._shares[n][1] for n in owners]
        if self._u3:
            state["u3"] = list(self._u3)
        return state

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        *,
        identity: HolderIdentity,
        roster: Roster,
        max_colluders: int = 0,
    ) -> SecAggClient:
        """Rebuild a client from :meth:`export_state` output.

        The announced keys are authenticated against ``roster`` again, so a state cannot carry
        keys the pinned roster does not vouch for.

        Args:
            state: The exported snapshot.
            identity: This holder's identity (not part of the snapshot).
            roster: The pinned roster.
            max_colluders: As for the constructor.

        Returns:
            A client in the same stage with the same secrets.

        Raises:
            ProtocolError: If the snapshot is malformed or inconsistent with its stage.
            KeyAuthenticationError: If its key set does not verify under ``roster``.
            ConfigError: If its configuration fields are invalid.
        """
        if not isinstance(state, Mapping):
            raise ProtocolError(f"state must be a mapping, got {type(state).__name__}")

        def get(name: str, kind: type) -> Any:
            if name not in state:
                raise ProtocolError(f"state field {name!r} is missing")
            value = state[name]
            if kind is int and not is_int(value):
                raise ProtocolError(f"state field {name!r} must be int, got {value!r}")
            if kind is not int and not isinstance(value, kind):
                raise ProtocolError(
                    f"state field {name!r} must be {kind.__name__}, got {type(value).__name__}"
                )
            return value

        def get_list(name: str, kind: type) -> list[Any]:
            items = list(get(name, list))
            for item in items:
                ok = is_int(item) if kind is int else isinstance(item, kind)
                if not ok:
                    raise ProtocolError(f"state field {name!r} must hold only {kind.__name__}")
            return items

        version = int(get("version", int))
        if version != _STATE_VERSION:
            raise ProtocolError(
                f"state version {version} is not supported (expected {_STATE_VERSION})"
            )
        raw_stage = str(get("stage", str))
        if raw_stage not in {s.value for s in CLIENT_STAGES}:
            raise ProtocolError(
                f"state stage {raw_stage!r} is not one of {[s.value for s in CLIENT_STAGES]}"
            )
        stage = Stage(raw_stage)
        config = SecAggConfig(
            session_id=get("session_id", str),
            node_ids=tuple(get_list("node_ids", int)),
            threshold=get("threshold", int),
            bits=get("bits", int),
            dim=get("dim", int),
            terms=get("terms", str),
        )
        client = cls(
            int(get("node_id", int)),
            config,
            identity=identity,
            roster=roster,
            max_colluders=max_colluders,
        )
        client._stage = stage
        if stage in (Stage.SHARE_KEYS, Stage.MASKED_INPUT):
            try:
                client._enc_sk = X25519PrivateKey.from_private_bytes(get("enc_sk", bytes))
                client._mask_sk = X25519PrivateKey.from_private_bytes(get("mask_sk", bytes))
            except ValueError:
                raise ProtocolError("state holds a malformed X25519 private key") from None
            seed = get("b_seed", bytes)
            if len(seed) != KEY_BYTES:
                raise ProtocolError(
                    f"state field 'b_seed' has {len(seed)} bytes, expected {KEY_BYTES}"
                )
            client._b_seed = bytes(seed)
        if stage in (Stage.MASKED_INPUT, Stage.CONSISTENCY, Stage.UNMASK):
            client._restore_round(
                get_list("u1_ids", int),
                get_list("u1_enc_pks", bytes),
                get_list("u1_mask_pks", bytes),
                get_list("u1_names", str),
                get_list("u1_sign_pks", bytes),
                get_list("u1_signatures", bytes),
            )
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
                    check_share(b_share, expected_index=index, field="state b-share"),
                    check_share(sk_share, expected_index=index, field="state mask-key share"),
                )
            if client._node_id not in shares:
                raise ProtocolError("state lacks this node's own shares")
            client._shares = shares
        if stage == Stage.UNMASK:
            u3 = [int(n) for n in get_list("u3", int)]
            if u3 != sorted(set(u3)) or not set(u3) <= set(client._shares):
                raise ProtocolError("state field 'u3' is not a sorted subset of U2")
            client._u3 = u3
        if stage == Stage.MASKED_INPUT and client._own_public_keys() != client._u1[client._node_id]:
            raise ProtocolError("state: private keys do not match the node's announced keys")
        return client

    def _restore_round(
        self,
        ids: list[Any],
        enc: list[Any],
        mask: list[Any],
        names: list[Any],
        sign_pks: list[Any],
        signatures: list[Any],
    ) -> None:
        """Rebuild and re-authenticate U1 from its exported columns."""
        columns = (ids, enc, mask, names, sign_pks, signatures)
        if len({len(column) for column in columns}) != 1:
            raise ProtocolError("state fields 'u1_*' have different lengths")
        u1 = {
            int(n): PublicKeys(
                enc_pk=bytes(e), mask_pk=bytes(m), name=str(a), sign_pk=bytes(p), signature=bytes(s)
            )
            for n, e, m, a, p, s in zip(*columns, strict=True)
        }
        checked = check_public_key_set(u1, self._config, who="state")
        if self._node_id not in checked:
            raise ProtocolError("state: own node is missing from 'u1_ids'")
        if len(checked[self._node_id].signature) != SIGNATURE_BYTES:
            raise ProtocolError("state: own announced keys are unsigned")
        self._authenticate(checked)
        self._u1 = checked
