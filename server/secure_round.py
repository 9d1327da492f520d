"""Run one secure-sum round (a dataset-vector task or one PE round) over any message transport.

The coordinator drives four stages (setup, share_keys, masked_input, unmask) through a
:class:`Transport`: Flower's Grid in deployment and simulation, or direct calls in tests. Every
stage has a deadline; a client that misses it, refuses, or answers for a stale task counts as
dropped. Below the threshold t of survivors the round aborts with TooFewParticipantsError and
nothing is released. The coordinator only ever holds masked vectors and the final sum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import RecordDict

from fedsynth.protocol.errors import FedSynthError, ProtocolError, TooFewParticipantsError
from fedsynth.protocol.manifest import TaskManifest
from fedsynth.protocol.messages import (
    Envelope,
    blobs_from_fields,
    blobs_to_fields,
    field_from_bytes,
    ints_field,
    keys_to_fields,
    pack,
    unpack,
    vector_to_bytes,
)
from fedsynth.protocol.secagg import KEY_BYTES, PublicKeys, SecAggServer, SecureSumTask

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


def run_secure_round(
    transport: Transport,
    manifest: TaskManifest,
    reference: np.ndarray,
    *,
    progress: Callable[[str], None] | None = None,
) -> RoundResult:
    """Run the four stages of a dataset-vector task and return the survivors' exact sum."""
    manifest.check_reference(reference)
    setup_fields = {
        "manifest": manifest.to_json(),
        "reference": vector_to_bytes(reference.astype(np.float32).reshape(-1)),
    }
    return run_secure_sum(transport, manifest, setup_fields, progress=progress)


def run_secure_sum(
    transport: Transport,
    task: SecureSumTask,
    setup_fields: Mapping[str, Any],
    *,
    progress: Callable[[str], None] | None = None,
) -> RoundResult:
    """Run setup, share_keys, masked_input and unmask; return the exact modular sum.

    ``setup_fields`` (the manifest and its public arrays) go to every participant at setup.
    """
    server = SecAggServer(task.secagg_config())
    task_id = task.task_id
    deadline = task.deadline_s
    threshold = task.secagg_config().threshold
    refusals: dict[int, str] = {}

    def note(stage: str) -> None:
        if progress is not None:
            progress(stage)

    def collect(stage: str, replies: dict[int, Reply]) -> dict[int, dict[str, object]]:
        good: dict[int, dict[str, object]] = {}
        for node, reply in replies.items():
            if reply.error is not None or reply.content is None:
                refusals[node] = f"{stage}: {reply.error}"
                log.warning("node %s dropped at %s: %s", node, stage, reply.error)
                continue
            try:
                good[node] = unpack(reply.content, task_id=task_id, stage=stage)
            except FedSynthError as exc:
                refusals[node] = f"{stage}: {exc}"
                log.warning("node %s sent a bad %s reply: %s", node, stage, exc)
        return good

    # Stage 1: publish the manifest, collect public keys.
    note("setup")
    setup_request = pack(Envelope(task_id, "setup"), dict(setup_fields))
    replies = collect(
        "setup",
        transport.exchange("setup", {n: setup_request for n in task.node_ids}, timeout=deadline),
    )
    keys: dict[int, PublicKeys] = {}
    for node, f in replies.items():
        enc_pk, mask_pk = f.get("enc_pk"), f.get("mask_pk")
        if not all(isinstance(k, bytes) and len(k) == KEY_BYTES for k in (enc_pk, mask_pk)):
            # One faulty client is a dropout, not a reason to abort everyone's round.
            refusals[node] = f"setup: public keys are not two {KEY_BYTES}-byte strings"
            continue
        keys[node] = PublicKeys(enc_pk=_as_bytes(enc_pk), mask_pk=_as_bytes(mask_pk))
    _require(len(keys), threshold, len(task.node_ids), "setup", refusals)
    broadcast = server.receive_public_keys(keys)

    # Stage 2: every client secret-shares its mask keys to the others (encrypted, via us).
    note("share_keys")
    keys_request = pack(Envelope(task_id, "share_keys"), keys_to_fields(broadcast))
    replies = collect(
        "share_keys",
        transport.exchange("share_keys", {n: keys_request for n in broadcast}, timeout=deadline),
    )
    outgoing: dict[int, dict[int, bytes]] = {}
    for node, f in replies.items():
        try:
            blobs = blobs_from_fields("ct:", f)
        except (FedSynthError, ValueError) as exc:
            refusals[node] = f"share_keys: {exc}"
            continue
        if set(blobs) != set(broadcast) - {node}:
            refusals[node] = "share_keys: shares not addressed to exactly the other participants"
            continue
        outgoing[node] = blobs
    _require(len(outgoing), threshold, len(task.node_ids), "share_keys", refusals)
    routed = server.route_shares(outgoing)

    # Stage 3: masked inputs (the expensive stage on the clients: features + noise).
    note("masked_input")
    requests = {
        node: pack(Envelope(task_id, "masked_input"), blobs_to_fields("ct:", cts))
        for node, cts in routed.items()
    }
    replies = collect(
        "masked_input", transport.exchange("masked_input", requests, timeout=deadline)
    )
    accepted = 0
    for node, f in replies.items():
        try:
            masked = field_from_bytes(
                f.get("masked"), bits=task.secagg_config().bits, length=task.dim
            )
            server.receive_masked_input(node, masked)
            accepted += 1
        except FedSynthError as exc:
            refusals[node] = f"masked_input: {exc}"
            log.warning("node %s: masked input rejected: %s", node, exc)
    _require(accepted, threshold, len(task.node_ids), "masked_input", refusals)
    survivors, dropped = server.close_masked_inputs()

    # Stage 4: survivors reveal self-mask shares of survivors and key shares of the dropped.
    note("unmask")
    unmask_request = pack(
        Envelope(task_id, "unmask"),
        {"survivors": ints_field(survivors), "dropped": ints_field(dropped)},
    )
    replies = collect(
        "unmask",
        transport.exchange("unmask", {n: unmask_request for n in survivors}, timeout=deadline),
    )
    responses = {node: blobs_from_fields("sh:", f) for node, f in replies.items()}
    _require(len(responses), threshold, len(task.node_ids), "unmask", refusals)
    total = server.unmask(responses)
    note("done")
    return RoundResult(field_sum=total, survivors=survivors, dropped=dropped, refusals=refusals)


def _require(
    count: int, t: int, participants: int, stage: str, refusals: Mapping[int, str]
) -> None:
    """Abort loudly below the threshold, naming the reasons clients gave."""
    if count < t:
        reasons = "; ".join(f"node {n}: {r}" for n, r in sorted(refusals.items())) or "none given"
        raise TooFewParticipantsError(
            f"only {count} of {participants} clients completed {stage}, below the "
            f"threshold t={t}; the round is aborted and nothing is released ({reasons})"
        )


def default_threshold(num_clients: int) -> int:
    """A majority threshold: t = floor(K/2) + 1, at least 2."""
    return max(2, math.floor(num_clients / 2) + 1)


def _as_bytes(value: object) -> bytes:
    """A field that must hold bytes (a public key); anything else is a protocol error."""
    if not isinstance(value, bytes):
        raise ProtocolError(f"expected bytes, got {type(value).__name__}")
    return value
