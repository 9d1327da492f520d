"""The coordinator's side of the secure sum: routing, the running sum and robust unmasking.

The coordinator never holds an individual unmasked vector: masked inputs are added to a running
sum as they arrive. A faulty client (malformed or wrongly signed keys, bad shares, a bad
signature, a corrupt share at unmask) is dropped and its reason recorded in
:attr:`SecAggServer.rejected`; the round only aborts when fewer than t clients remain.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Final, cast

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedsynth.protocol import codec
from fedsynth.protocol.errors import (
    ConfigError,
    DuplicateSubmissionError,
    LateSubmissionError,
    ProtocolError,
    TooFewParticipantsError,
)
from fedsynth.protocol.identity import Roster
from fedsynth.protocol.secagg.config import KeyShares, PublicKeys, SecAggConfig
from fedsynth.protocol.secagg.crypto import (
    SHARE_KIND_MASK_KEY,
    SHARE_KIND_SEED,
    add_inplace,
    check_commitment,
    check_node_id,
    check_share,
    combine_secrets,
    is_int,
    pairwise_mask,
    prg,
    prg_nonce,
    share_commitment,
    signature_is_valid,
    sub_inplace,
    survivors_message,
)
from fedsynth.protocol.secagg.stages import COMMITMENT_BYTES, Stage, check_stage

_MAX_REASON: Final = 300
_WORD_BITS: Final = codec.MAX_BITS


def _node_sort_key(node: object) -> int:
    """Sort key of a node id from the wire (anything that is not an int sorts first)."""
    return int(cast(int, node)) if is_int(node) else -1


class SecAggServer:
    """Coordinator state machine; it never holds any individual unmasked vector.

    Rounds must be called in order: :meth:`receive_public_keys` -> :meth:`route_shares` ->
    :meth:`receive_masked_input` (repeatedly) -> :meth:`close_masked_inputs` ->
    :meth:`receive_signatures` -> :meth:`unmask`.
    """

    def __init__(self, config: SecAggConfig, *, roster: Roster | None = None) -> None:
        """Create a coordinator before the key-announcement round.

        Args:
            config: The session configuration.
            roster: The consortium roster, if the coordinator has one: keys signed by a
                holder outside it are then dropped at once instead of being refused by every
                holder at share_keys.

        Raises:
            ConfigError: If ``config`` is not a SecAggConfig or ``roster`` not a Roster.
        """
        if not isinstance(config, SecAggConfig):
            raise ConfigError(f"config must be a SecAggConfig, got {type(config).__name__}")
        if roster is not None and not isinstance(roster, Roster):
            raise ConfigError(f"roster must be a Roster or None, got {type(roster).__name__}")
        self._config = config
        self._roster = roster
        self._stage = Stage.SETUP
        self._u1: dict[int, PublicKeys] = {}
        self._u2: list[int] = []
        # owner -> recipient -> (seed-share commitment, key-share commitment)
        self._commitments: dict[int, dict[int, tuple[bytes, bytes]]] = {}
        self._received: set[int] = set()
        self._sum = np.zeros(config.dim, dtype=np.uint64)
        self._survivors: list[int] = []
        self._dropped: list[int] = []
        self._signers: list[int] = []
        self._rejected: dict[int, str] = {}

    @property
    def config(self) -> SecAggConfig:
        """The session configuration."""
        return self._config

    @property
    def stage(self) -> Stage:
        """The round this coordinator expects next (one of ``SERVER_STAGES``)."""
        return self._stage

    @property
    def rejected(self) -> dict[int, str]:
        """``{node: reason}`` of every client dropped for a faulty message so far."""
        return dict(self._rejected)

    @property
    def signers(self) -> list[int]:
        """Survivors whose consistency signature was valid (U4); ask only them to unmask."""
        return list(self._signers)

    def _reject(self, node: int, stage: Stage, reason: str) -> None:
        self._rejected.setdefault(node, f"{stage.value}: {reason[:_MAX_REASON]}")

    def _require(self, count: int, what: str) -> None:
        if count < self._config.threshold:
            raise TooFewParticipantsError(f"{count} {what}, threshold t={self._config.threshold}")

    def receive_public_keys(self, keys: Mapping[int, PublicKeys]) -> dict[int, PublicKeys]:
        """Keep the validly signed keys and return the broadcast set U1.

        An entry is dropped (and recorded in :attr:`rejected`) if its node is not a
        participant, it is not PublicKeys, its signature does not verify under its signing
        key, its name is not the roster's (when a roster is set), or it shares a key or a name
        with another entry (every entry involved is dropped: the coordinator cannot tell which
        one copied).

        Args:
            keys: ``{node: PublicKeys}`` of every node that answered setup.

        Returns:
            U1 as ``{node: PublicKeys}`` in ascending node order, to send to every node in it.

        Raises:
            StageOrderError: If not in stage ``setup``.
            ProtocolError: If ``keys`` is not a mapping.
            TooFewParticipantsError: If fewer than t valid entries remain.
        """
        check_stage(self._stage, Stage.SETUP, "receive_public_keys")
        if not isinstance(keys, Mapping):
            raise ProtocolError(f"public keys must be a mapping, got {type(keys).__name__}")
        cfg = self._config
        allowed = set(cfg.node_ids)
        valid: dict[int, PublicKeys] = {}
        for raw_node in sorted(keys, key=_node_sort_key):
            node = int(raw_node) if is_int(raw_node) else None
            if node is None or node not in allowed:
                continue  # a stranger: nothing to record it under
            pks = keys[raw_node]
            if not isinstance(pks, PublicKeys):
                self._reject(node, Stage.SETUP, "keys are not PublicKeys")
                continue
            if not pks.verify(node=node, config=cfg):
                self._reject(node, Stage.SETUP, "round keys are unsigned or wrongly signed")
                continue
            if self._roster is not None and (
                pks.name not in self._roster or self._roster.key_of(pks.name) != pks.sign_pk
            ):
                self._reject(node, Stage.SETUP, f"holder {pks.name!r} is not in the roster")
                continue
            valid[node] = pks
        owners: dict[bytes | str, list[int]] = {}
        for node, pks in valid.items():
            for item in (pks.enc_pk, pks.mask_pk, pks.sign_pk, pks.name):
                owners.setdefault(item, []).append(node)
        clashing = {n for nodes in owners.values() if len(set(nodes)) > 1 for n in nodes}
        for node in sorted(clashing):
            self._reject(node, Stage.SETUP, "announces a key or name another node also uses")
            del valid[node]
        self._require(len(valid), "nodes announced valid keys")
        self._u1 = dict(sorted(valid.items()))
        self._stage = Stage.SHARE_KEYS
        return dict(self._u1)

    def route_shares(self, outgoing: Mapping[int, KeyShares]) -> dict[int, dict[int, bytes]]:
        """Keep the commitments and transpose the encrypted shares from senders to recipients.

        A sender outside U1, or one whose ciphertexts are not addressed to exactly the other
        members of U1 or whose commitments do not cover U1, is dropped (recorded in
        :attr:`rejected`). The remaining senders form U2.

        Args:
            outgoing: ``{sender: KeyShares}``.

        Returns:
            ``{recipient: {sender: ciphertext}}`` for every recipient in U2, holding the
            ciphertexts from every other member of U2.

        Raises:
            StageOrderError: If not in stage ``share_keys``.
            ProtocolError: If ``outgoing`` is not a mapping.
            TooFewParticipantsError: If fewer than t nodes sent valid shares.
        """
        check_stage(self._stage, Stage.SHARE_KEYS, "route_shares")
        if not isinstance(outgoing, Mapping):
            raise ProtocolError(f"outgoing must be a mapping, got {type(outgoing).__name__}")
        checked: dict[int, dict[int, bytes]] = {}
        commitments: dict[int, dict[int, tuple[bytes, bytes]]] = {}
        for raw_sender in sorted(outgoing, key=_node_sort_key):
            if not is_int(raw_sender) or int(raw_sender) not in self._u1:
                continue
            sender = int(raw_sender)
            try:
                checked[sender], commitments[sender] = self._check_key_shares(
                    sender, outgoing[raw_sender]
                )
            except ProtocolError as exc:
                self._reject(sender, Stage.SHARE_KEYS, str(exc))
        self._require(len(checked), "nodes shared keys")
        u2 = sorted(checked)
        routed: dict[int, dict[int, bytes]] = {
            recipient: {sender: checked[sender][recipient] for sender in u2 if sender != recipient}
            for recipient in u2
        }
        self._u2 = u2
        self._commitments = commitments
        self._stage = Stage.MASKED_INPUT
        return routed

    def _check_key_shares(
        self, sender: int, shares: object
    ) -> tuple[dict[int, bytes], dict[int, tuple[bytes, bytes]]]:
        """Validate one sender's KeyShares; return its ciphertexts and split commitments."""
        if not isinstance(shares, KeyShares):
            raise ProtocolError(f"shares of node {sender} must be KeyShares")
        addressed: dict[int, bytes] = {}
        for raw_recipient, ciphertext in shares.ciphertexts.items():
            recipient = check_node_id(raw_recipient, f"recipient of node {sender}")
            if not isinstance(ciphertext, bytes):
                raise ProtocolError(f"ciphertext {sender} -> {recipient} must be bytes")
            addressed[recipient] = ciphertext
        expected = set(self._u1) - {sender}
        if set(addressed) != expected:
            raise ProtocolError(
                f"node {sender} addressed {sorted(addressed)}, expected U1 minus itself "
                f"{sorted(expected)}"
            )
        split: dict[int, tuple[bytes, bytes]] = {}
        for raw_recipient, value in shares.commitments.items():
            recipient = check_node_id(raw_recipient, f"commitment recipient of node {sender}")
            commitment = check_commitment(value, f"commitment {sender} -> {recipient}")
            split[recipient] = (commitment[:COMMITMENT_BYTES], commitment[COMMITMENT_BYTES:])
        if set(split) != set(self._u1):
            raise ProtocolError(
                f"node {sender} committed to shares for {sorted(split)}, expected U1 "
                f"{sorted(self._u1)}"
            )
        return addressed, split

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
        if self._stage in (Stage.CONSISTENCY, Stage.UNMASK, Stage.DONE):
            raise LateSubmissionError(
                f"masked input from node {node_id!r} arrived in stage {self._stage.value!r}, "
                "after the masked-input round was closed"
            )
        check_stage(self._stage, Stage.MASKED_INPUT, "receive_masked_input")
        node = check_node_id(node_id, "masked input sender")
        if node not in self._u2:
            raise ProtocolError(f"masked input from node {node}, which is not in U2")
        if node in self._received:
            raise DuplicateSubmissionError(f"node {node} already sent its masked input")
        cfg = self._config
        codec.check_field_elements(
            masked, bits=cfg.bits, expected_shape=(cfg.dim,), name=f"masked input of node {node}"
        )
        add_inplace(self._sum, masked, cfg.bits)
        self._received.add(node)

    def close_masked_inputs(self) -> tuple[list[int], list[int]]:
        """End the masked-input round.

        Returns:
            ``(survivors, dropped)``: U3 (nodes whose masked input arrived) and U2 minus U3, both
            ascending. Send U3 to every survivor for the consistency check.

        Raises:
            StageOrderError: If not in stage ``masked_input``.
            TooFewParticipantsError: If fewer than t masked inputs arrived (the round stays
                open, so more inputs may still be accepted).
        """
        check_stage(self._stage, Stage.MASKED_INPUT, "close_masked_inputs")
        survivors = sorted(self._received)
        self._require(len(survivors), "masked inputs arrived")
        self._survivors = survivors
        self._dropped = sorted(set(self._u2) - self._received)
        self._stage = Stage.CONSISTENCY
        return list(self._survivors), list(self._dropped)

    def receive_signatures(self, signatures: Mapping[int, bytes]) -> dict[int, bytes]:
        """Keep the survivors' valid signatures over U3; they go to every signer at unmask.

        Args:
            signatures: ``{survivor: signature}`` from the consistency stage.

        Returns:
            ``{signer: signature}`` of the valid ones (U4), ascending.

        Raises:
            StageOrderError: If not in stage ``consistency``.
            ProtocolError: If ``signatures`` is not a mapping.
            TooFewParticipantsError: If fewer than t valid signatures arrived (the stage stays
                open, so the call may be repeated).
        """
        check_stage(self._stage, Stage.CONSISTENCY, "receive_signatures")
        if not isinstance(signatures, Mapping):
            raise ProtocolError(f"signatures must be a mapping, got {type(signatures).__name__}")
        message = survivors_message(
            session_id=self._config.session_id,
            config_digest=self._config.digest(),
            survivors=self._survivors,
        )
        valid: dict[int, bytes] = {}
        for raw_signer in sorted(signatures, key=_node_sort_key):
            if not is_int(raw_signer) or int(raw_signer) not in self._survivors:
                continue
            signer = int(raw_signer)
            signature = signatures[raw_signer]
            if signature_is_valid(self._u1[signer].sign_pk, signature, message):
                valid[signer] = signature
            else:
                self._reject(signer, Stage.CONSISTENCY, "signature over U3 does not verify")
        self._require(len(valid), "survivors signed the survivor set")
        self._signers = sorted(valid)
        self._stage = Stage.UNMASK
        return valid

    def _valid_shares(
        self, responses: Mapping[int, Mapping[int, bytes]]
    ) -> tuple[dict[int, list[bytes]], int]:
        """Every returned share that matches its owner's commitment, by owner; and responders."""
        order = sorted(self._u1)
        survivors = set(self._survivors)
        owners = sorted(survivors | set(self._dropped))
        good: dict[int, list[bytes]] = {owner: [] for owner in owners}
        responders = 0
        for raw_responder in sorted(responses, key=_node_sort_key):
            if not is_int(raw_responder) or int(raw_responder) not in self._signers:
                continue
            responder = int(raw_responder)
            response = responses[raw_responder]
            if not isinstance(response, Mapping):
                self._reject(responder, Stage.UNMASK, "response is not a mapping")
                continue
            responders += 1
            index = order.index(responder) + 1
            for owner in owners:
                kind = SHARE_KIND_SEED if owner in survivors else SHARE_KIND_MASK_KEY
                try:
                    share = check_share(
                        response.get(owner), expected_index=index, field=f"share of node {owner}"
                    )
                except ProtocolError as exc:
                    self._reject(responder, Stage.UNMASK, str(exc))
                    continue
                expected = self._commitments[owner][responder][kind - 1]
                actual = share_commitment(
                    session_id=self._config.session_id,
                    owner=owner,
                    recipient=responder,
                    kind=kind,
                    share=share,
                )
                if hmac.compare_digest(actual, expected):
                    good[owner].append(share)
                else:
                    self._reject(
                        responder, Stage.UNMASK, f"share of node {owner} fails its commitment"
                    )
        return good, responders

    def unmask(self, responses: Mapping[int, Mapping[int, bytes]]) -> npt.NDArray[np.uint64]:
        """Reconstruct the secrets from any t valid shares, remove all masks, return the sum.

        For every survivor its seed b_u is reconstructed and ``PRG(b_u)`` removed; for every
        dropped node its mask key is reconstructed (and checked against its announced public key)
        and its pairwise masks with every survivor are cancelled. A share that fails its owner's
        commitment is discarded (its sender recorded in :attr:`rejected`), so one corrupt
        survivor cannot spoil a round that t honest survivors can finish.

        Args:
            responses: ``{responder: {owner: share}}`` from the signers; each holds one share
                per node of U3 and of the dropped set.

        Returns:
            The sum over the survivors of their input vectors, uint64 modulo 2^bits.

        Raises:
            StageOrderError: If not in stage ``unmask``.
            ProtocolError: If ``responses`` is not a mapping, or an owner's own shares are
                inconsistent (its reconstruction fails although every share matches its
                commitment: the owner cheated at share_keys).
            TooFewParticipantsError: If fewer than t signers responded or fewer than t valid
                shares of some node arrived (nothing changes, so the call may be repeated with
                more responses).
        """
        check_stage(self._stage, Stage.UNMASK, "unmask")
        cfg = self._config
        if not isinstance(responses, Mapping):
            raise ProtocolError(f"responses must be a mapping, got {type(responses).__name__}")
        good, responders = self._valid_shares(responses)
        self._require(responders, "survivors answered the unmask round")
        short = {
            owner: len(shares) for owner, shares in good.items() if len(shares) < cfg.threshold
        }
        if short:
            raise TooFewParticipantsError(
                f"valid shares per node {short}, threshold t={cfg.threshold}; corrupt or missing "
                "shares were discarded"
            )

        # One batch for every survivor's seed and every dropped node's mask key, each from its
        # first t valid shares: owners whose shares came from the same t survivors share one
        # set of Lagrange coefficients. Every share matched its commitment, and the integrity
        # check inside every secret is a second guard.
        what = {owner: "self-mask seed" for owner in self._survivors}
        what.update({owner: "mask key" for owner in self._dropped})
        recovered = combine_secrets(
            {owner: good[owner][: cfg.threshold] for owner in what},
            threshold=cfg.threshold,
            what=what,
            num=len(self._u1),
        )
        # Masks are expanded to full 64-bit words: each add/sub below reduces mod 2^bits, and
        # 2^bits divides 2^64, so reducing the mask first would only repeat that work.
        nonce = prg_nonce(cfg.session_id)
        total = np.array(self._sum, dtype=np.uint64, copy=True)
        for owner in self._survivors:
            seed = recovered[owner]
            sub_inplace(total, prg(seed, nonce=nonce, dim=cfg.dim, bits=_WORD_BITS), cfg.bits)
        for owner in self._dropped:
            mask_sk = X25519PrivateKey.from_private_bytes(recovered[owner])
            if mask_sk.public_key().public_bytes_raw() != self._u1[owner].mask_pk:
                raise ProtocolError(
                    f"reconstructed mask key of node {owner} does not match its public key"
                )
            for survivor in self._survivors:
                mask = pairwise_mask(
                    mask_sk,
                    self._u1[survivor].mask_pk,
                    session_id=cfg.session_id,
                    node=owner,
                    peer=survivor,
                    dim=cfg.dim,
                    bits=_WORD_BITS,
                )
                # The survivor added +mask if owner > survivor and -mask otherwise.
                if owner > survivor:
                    sub_inplace(total, mask, cfg.bits)
                else:
                    add_inplace(total, mask, cfg.bits)
        self._stage = Stage.DONE
        self._sum = np.zeros(0, dtype=np.uint64)
        return total
