"""Run one secure-sum round (a dataset-vector task or one PE round) over any message transport.

The coordinator drives the five stages of the secure sum (setup, share_keys, masked_input,
consistency, unmask; see :class:`fedsynth.protocol.secagg.Stage`) through a :class:`Transport`:
Flower's Grid in deployment and simulation, or direct calls in tests. Every stage has a
deadline; a client that misses it, refuses, answers for a stale task, or sends anything
malformed or wrongly signed counts as dropped, never as a reason to abort everyone's round.
Below the threshold t of survivors the round aborts with TooFewParticipantsError and nothing is
released. The coordinator only ever holds masked vectors and the final sum.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
from flwr.app import RecordDict

from fedsynth.protocol.contribution import noise_schedule, remove_excess_noise
from fedsynth.protocol.errors import FedSynthError, ProtocolError, TooFewParticipantsError
from fedsynth.protocol.exact_noise import (
    NOISE_EXCESS_FIELD,
    NOISE_SEED_FIELD,
    REMOVAL_AUTO,
    REMOVAL_FIELD,
    REMOVAL_UPLOAD,
    check_removal,
    removal_mode,
)
from fedsynth.protocol.identity import Roster
from fedsynth.protocol.manifest import TaskManifest
from fedsynth.protocol.messages import (
    Envelope,
    blobs_from_fields,
    blobs_to_fields,
    field_from_bytes,
    ints_field,
    ints_from_bytes,
    keys_to_fields,
    pack,
    public_keys_from_reply,
    unpack,
    vector_to_bytes,
)
from fedsynth.protocol.secagg import (
    KeyShares,
    PublicKeys,
    SecAggServer,
    SecureSumTask,
    Stage,
    min_safe_threshold,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    """One node's answer to a stage: content, or the reason it refused or failed."""

    content: RecordDict | None
    error: str | None = None


class Transport(Protocol):
    """Sends one request per node for a stage and collects replies until the deadline."""

    def exchange(
        self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        """Return the replies that arrived in time (missing nodes simply absent)."""
        ...


@dataclass
class RoundResult:
    """What the coordinator learns from a round: the sum and who took part."""

    field_sum: np.ndarray
    survivors: list[int]
    dropped: list[int]
    refusals: dict[int, str] = field(default_factory=dict)
    # Survivors whose excess noise was removed (exact noise sharing); the others' stays.
    noise_removed: list[int] = field(default_factory=list)


def run_secure_round(
    transport: Transport,
    manifest: TaskManifest,
    reference: np.ndarray,
    *,
    progress: Callable[[str], None] | None = None,
    roster: Roster | None = None,
    noise_removal: str = REMOVAL_AUTO,
) -> RoundResult:
    """Run the stages of a dataset-vector task and return the survivors' exact sum."""
    manifest.check_reference(reference)
    setup_fields = {
        "manifest": manifest.to_json(),
        "reference": vector_to_bytes(reference.astype(np.float32).reshape(-1)),
    }
    return run_secure_sum(
        transport,
        manifest,
        setup_fields,
        progress=progress,
        roster=roster,
        noise_removal=noise_removal,
    )


T = TypeVar("T")


def run_secure_sum(
    transport: Transport,
    task: SecureSumTask,
    setup_fields: Mapping[str, Any],
    *,
    progress: Callable[[str], None] | None = None,
    roster: Roster | None = None,
    noise_removal: str = REMOVAL_AUTO,
) -> RoundResult:
    """Run setup, share_keys, masked_input, consistency and unmask; return the exact sum.

    ``setup_fields`` (the manifest and its public arrays) go to every participant at setup.
    With ``roster``, keys signed by a holder outside it are dropped at setup; without it the
    coordinator still drops keys whose signature does not verify, and every holder checks
    every key against the roster it pins. ``noise_removal`` (exact noise sharing): whether
    survivors reveal seeds of their excess noise (``seed``), send its sum (``upload``), or
    whichever is cheaper for this round (``auto``; see
    :func:`fedsynth.protocol.exact_noise.removal_mode`).
    """
    check_removal(noise_removal)  # a bad name fails before any stage
    schedule = noise_schedule(task.privacy, clients=len(task.node_ids))
    config = task.secagg_config()
    server = SecAggServer(config, roster=roster)
    task_id = task.task_id
    deadline = task.deadline_s
    threshold = config.threshold
    participants = len(task.node_ids)
    refusals: dict[int, str] = {}

    def note(stage: str) -> None:
        if progress is not None:
            progress(stage)

    def envelope(stage: Stage) -> Envelope:
        """A request header stamped with this coordinator's clock and the stage deadline."""
        return Envelope(task_id, stage.value, sent_at=time.time(), deadline_s=deadline)

    def exchange(stage: Stage, requests: Mapping[int, RecordDict]) -> dict[int, dict[str, Any]]:
        note(stage.value)
        replies = transport.exchange(stage.value, requests, timeout=deadline)
        good: dict[int, dict[str, Any]] = {}
        for node, reply in replies.items():
            if node not in requests:
                continue
            if reply.error is not None or reply.content is None:
                refusals[node] = f"{stage.value}: {reply.error}"
                log.warning("node %s dropped at %s: %s", node, stage.value, reply.error)
                continue
            try:
                good[node] = unpack(reply.content, task_id=task_id, stage=stage.value)
            except FedSynthError as exc:
                refusals[node] = f"{stage.value}: {exc}"
                log.warning("node %s sent a bad %s reply: %s", node, stage.value, exc)
        return good

    def parse(
        stage: Stage, replies: Mapping[int, dict[str, Any]], read: Callable[[dict[str, Any]], T]
    ) -> dict[int, T]:
        """Each reply decoded by ``read``; a malformed one makes its node a dropout."""
        out: dict[int, T] = {}
        for node, fields in replies.items():
            try:
                out[node] = read(fields)
            except FedSynthError as exc:
                refusals[node] = f"{stage.value}: {exc}"
                log.warning("node %s sent a malformed %s reply: %s", node, stage.value, exc)
        return out

    def advance(stage: Stage, count: int, step: Callable[[], T]) -> T:
        """Run a coordinator step; record whom it dropped; abort below t with every reason."""
        _require(count, threshold, participants, stage.value, refusals)
        try:
            return step()
        except TooFewParticipantsError as exc:
            for node, reason in server.rejected.items():
                refusals.setdefault(node, reason)
            raise TooFewParticipantsError(
                f"{stage.value}: {exc}; the round is aborted and nothing is released "
                f"({_reasons(refusals)})"
            ) from None
        finally:
            for node, reason in server.rejected.items():
                refusals.setdefault(node, reason)

    # Stage 1: publish the manifest, collect signed public keys (U1).
    request = pack(envelope(Stage.SETUP), dict(setup_fields))
    replies = exchange(Stage.SETUP, {n: request for n in task.node_ids})
    keys = parse(Stage.SETUP, replies, public_keys_from_reply)
    u1: dict[int, PublicKeys] = advance(
        Stage.SETUP, len(keys), lambda: server.receive_public_keys(keys)
    )

    # Stage 2: every client checks U1's signatures and secret-shares its mask keys (U2).
    request = pack(envelope(Stage.SHARE_KEYS), keys_to_fields(u1))
    replies = exchange(Stage.SHARE_KEYS, {n: request for n in u1})
    outgoing = parse(
        Stage.SHARE_KEYS,
        replies,
        lambda f: KeyShares(
            ciphertexts=blobs_from_fields("ct:", f), commitments=blobs_from_fields("cm:", f)
        ),
    )
    routed = advance(Stage.SHARE_KEYS, len(outgoing), lambda: server.route_shares(outgoing))

    # Stage 3: masked inputs (the expensive stage on the clients: features + noise) (U3).
    requests = {
        node: pack(envelope(Stage.MASKED_INPUT), blobs_to_fields("ct:", cts))
        for node, cts in routed.items()
    }
    replies = exchange(Stage.MASKED_INPUT, requests)
    accepted = 0
    for node, f in replies.items():
        try:
            masked = field_from_bytes(f.get("masked"), bits=config.bits, length=task.dim)
            server.receive_masked_input(node, masked)
            accepted += 1
        except FedSynthError as exc:
            refusals[node] = f"{Stage.MASKED_INPUT.value}: {exc}"
            log.warning("node %s: masked input rejected: %s", node, exc)
    survivors, dropped = advance(Stage.MASKED_INPUT, accepted, server.close_masked_inputs)

    # Stage 4: every survivor signs the survivor set it is told (consistency check, U4).
    request = pack(envelope(Stage.CONSISTENCY), {"survivors": ints_field(survivors)})
    replies = exchange(Stage.CONSISTENCY, {n: request for n in survivors})
    signatures = parse(Stage.CONSISTENCY, replies, _signature_of)
    valid = advance(
        Stage.CONSISTENCY, len(signatures), lambda: server.receive_signatures(signatures)
    )

    # Stage 5: signers check t signatures over the same set, then reveal self-mask shares of
    # survivors and key shares of the dropped (and, with exact sharing, their excess noise).
    unmask_fields: dict[str, Any] = {
        "survivors": ints_field(survivors),
        "dropped": ints_field(dropped),
        **blobs_to_fields("sg:", valid),
    }
    removal = None
    if schedule is not None:
        removal = removal_mode(noise_removal, schedule, len(survivors), task.dim)
        unmask_fields[REMOVAL_FIELD] = removal
    request = pack(envelope(Stage.UNMASK), unmask_fields)
    replies = exchange(Stage.UNMASK, {n: request for n in server.signers})
    responses = parse(Stage.UNMASK, replies, lambda f: blobs_from_fields("sh:", f))
    total = advance(Stage.UNMASK, len(responses), lambda: server.unmask(responses))
    # Exact noise sharing: each survivor's unmask reply also reveals the excess noise that
    # len(survivors) inputs do not need; what stays is the target variance.
    revealed = {node: replies[node].get(NOISE_SEED_FIELD) for node in responses if node in replies}
    uploaded: dict[int, np.ndarray] = {}
    if removal == REMOVAL_UPLOAD:
        for node in responses:
            data = replies[node].get(NOISE_EXCESS_FIELD)
            if data is None:
                continue
            try:
                uploaded[node] = ints_from_bytes(data, length=task.dim, name=NOISE_EXCESS_FIELD)
            except FedSynthError as exc:
                # Its excess stays in the sum: more noise than the target, never less.
                refusals[node] = f"{Stage.UNMASK.value}: {exc}"
                log.warning("node %s: excess noise upload rejected: %s", node, exc)
    total, noise_removed = remove_excess_noise(
        total,
        revealed,
        privacy=task.privacy,
        clients=participants,
        survivors=survivors,
        bits=config.bits,
        uploaded=uploaded,
    )
    note(Stage.DONE.value)
    return RoundResult(
        field_sum=total,
        survivors=survivors,
        dropped=dropped,
        refusals=refusals,
        noise_removed=noise_removed,
    )


def _signature_of(fields: Mapping[str, Any]) -> bytes:
    """The signature in a consistency reply (ProtocolError if absent or not bytes)."""
    signature = fields.get("signature")
    if not isinstance(signature, bytes):
        raise ProtocolError("consistency reply lacks a 'signature' of bytes")
    return signature


def _require(
    count: int, t: int, participants: int, stage: str, refusals: Mapping[int, str]
) -> None:
    """Abort loudly below the threshold, naming the reasons clients gave."""
    if count < t:
        reasons = _reasons(refusals)
        raise TooFewParticipantsError(
            f"only {count} of {participants} clients completed {stage}, below the "
            f"threshold t={t}; the round is aborted and nothing is released ({reasons})"
        )


def _reasons(refusals: Mapping[int, str]) -> str:
    """Every recorded refusal, one clause per node."""
    return "; ".join(f"node {n}: {r}" for n, r in sorted(refusals.items())) or "none given"


def default_threshold(num_clients: int) -> int:
    """The smallest threshold holders accept with no colluders: t = floor(K/2) + 1, at least 2."""
    return min_safe_threshold(num_clients, 0)
