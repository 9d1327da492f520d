"""The production coordinator job: run one task file's task against connected holders.

Given a :class:`~fedsynth.server.task_file.TaskSpec`, a transport and the holders' node ids, the
runner builds everything from public inputs (the model and the task's template: prior texts,
clip norms, reference), runs the secure sum (a dataset-vector task) or the rounds of federated
Private Evolution, and publishes the result: a release file in the task's store and one row in
its ledger, committed together (:class:`~fedsynth.server.ledger.PrivacyLedger`). It never reads
a data file and never evaluates against real records; the demo in ``simulations/`` builds on
the same :func:`run_vector_release`, never the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.protocol.contribution import decode_release
from fedsynth.protocol.errors import DuplicateReleaseError, TooFewParticipantsError
from fedsynth.protocol.identity import Roster
from fedsynth.protocol.models import LoadedModel, load_model
from fedsynth.protocol.pe import Embedder
from fedsynth.server.coordinator import (
    PublicReference,
    TaskConfig,
    build_manifest,
    compute_public_reference,
)
from fedsynth.server.flower_app import PE_ACTION
from fedsynth.server.ledger import PrivacyLedger
from fedsynth.server.release import Release, make_release, save_release
from fedsynth.server.secure_round import Transport, run_secure_round
from fedsynth.server.task_file import TaskSpec

log = logging.getLogger(__name__)
PE_RELEASE_FORMAT = "fedsynth.pe-release.v1"

StageProgress = Callable[[str], None]


@dataclass(frozen=True)
class TaskOutcome:
    """What a finished task left behind: the release file and its ledger row."""

    task_id: str
    method: str
    release_path: Path
    ledger_row: dict[str, Any]


def task_config(spec: TaskSpec) -> TaskConfig:
    """The dataset-vector settings of a task file (what :func:`build_manifest` calibrates)."""
    return TaskConfig(
        template=spec.template,
        layers=spec.layers,
        max_text_tokens=spec.max_text_tokens,
        epsilon=spec.epsilon,
        delta=spec.delta,
        mode=spec.mode,
        threshold=spec.threshold,
        colluders=spec.colluders,
        prior_per_label=spec.prior_per_label,
        prior_generation=spec.generation,
        deadline_s=spec.stage_s,
        seed=spec.seed,
    )


def run_vector_release(
    transport: Transport,
    nodes: tuple[int, ...],
    config: TaskConfig,
    loaded: LoadedModel,
    reference: PublicReference,
    *,
    ledger: PrivacyLedger,
    path: Path,
    task_id: str | None = None,
    progress: StageProgress | None = None,
    roster: Roster | None = None,
) -> tuple[Release, dict[str, Any]]:
    """One dataset-vector release: manifest, secure round, decode, publish file and ledger row.

    The id and the lifetime cap are checked before any holder is contacted (and again in the
    transaction that records the release). Central-mode noise comes from the OS's secure
    randomness, never from a public seed.

    Raises:
        DuplicateReleaseError: ``task_id`` is already in the ledger (nobody is contacted).
        BudgetExceededError: The ledger's lifetime cap would be exceeded.
        TooFewParticipantsError: Fewer than t holders completed the round (nothing recorded).
    """
    manifest = build_manifest(config, loaded, reference, nodes, task_id=task_id)
    if ledger.has(manifest.task_id):
        raise DuplicateReleaseError(
            f"task_id={manifest.task_id!r} is already recorded in {ledger.path}; a task file "
            "with a fixed task_id runs once (remove task_id or choose a new one)"
        )
    ledger.check(config.epsilon)
    result = run_secure_round(
        transport, manifest, reference.means, progress=progress, roster=roster
    )
    rng = np.random.default_rng(secrets.randbits(128))
    decoded = decode_release(
        result.field_sum, manifest=manifest, survivors=len(result.survivors), rng=rng
    )
    release = make_release(manifest, decoded, result, model_name=loaded.name)
    row = ledger.publish(
        release.report, path=path, write=lambda target: save_release(release, target)
    )
    return release, row


def run_task(
    spec: TaskSpec,
    transport: Transport,
    nodes: tuple[int, ...],
    *,
    load: Callable[[str], LoadedModel] = load_model,
    embedder: Embedder | None = None,
    progress: StageProgress | None = None,
) -> TaskOutcome:
    """Run the task of ``spec`` with the holders ``nodes`` and publish its release.

    ``load`` and ``embedder`` replace the model loader and the PE embedder (tests use tiny
    ones); everything else comes from the task file.

    Raises:
        TooFewParticipantsError: Fewer holders than the task's minimum, or a round fell
            below the threshold (nothing recorded).
        DuplicateReleaseError, BudgetExceededError: Refused by the ledger before any round.
    """
    if len(nodes) < spec.min_holders:
        raise TooFewParticipantsError(
            f"{len(nodes)} holders connected; the task needs federation.min_holders="
            f"{spec.min_holders}"
        )
    ledger = PrivacyLedger(spec.ledger, max_total_epsilon=spec.lifetime_epsilon)
    if spec.method == "pe":
        return _run_pe_task(spec, transport, nodes, ledger, load=load, embedder=embedder)
    task_id = spec.task_id or f"dv-{uuid.uuid4().hex[:12]}"
    # Cheap refusals first: nothing is generated for a task the ledger would refuse.
    if ledger.has(task_id):
        raise DuplicateReleaseError(
            f"task_id={task_id!r} is already recorded in {ledger.path}; it is not run again"
        )
    ledger.check(spec.epsilon)
    loaded = load(spec.model)
    config = task_config(spec)
    reference = compute_public_reference(loaded, config)
    path = spec.store_dir / f"{task_id}.safetensors"
    release, row = run_vector_release(
        transport,
        nodes,
        config,
        loaded,
        reference,
        ledger=ledger,
        path=path,
        task_id=task_id,
        progress=progress,
    )
    log.info(
        "release %s published at %s (%s of %s holders)",
        release.release_id,
        path,
        release.report["survivors"],
        release.report["K"],
    )
    return TaskOutcome(task_id=task_id, method="vector", release_path=path, ledger_row=row)


def pe_transport(transport: Transport) -> Transport:
    """The transport switched to PE messages where it carries several kinds (Flower's)."""
    for_action = getattr(transport, "for_action", None)
    if for_action is None:
        return transport
    switched: Transport = for_action(PE_ACTION)
    return switched


def _run_pe_task(
    spec: TaskSpec,
    transport: Transport,
    nodes: tuple[int, ...],
    ledger: PrivacyLedger,
    *,
    load: Callable[[str], LoadedModel],
    embedder: Embedder | None,
) -> TaskOutcome:
    """Federated PE: T rounds of vote histograms, then the final population is published.

    The task's epsilon is recorded before round 1 (inside :func:`run_pe`); with a fixed
    ``task_id`` its checkpoint folder is fixed too, so a restarted coordinator resumes the task
    instead of charging it again.
    """
    from fedsynth.protocol.embedding import load_embedder
    from fedsynth.server.pe_coordinator import PEConfig, run_pe
    from fedsynth.server.pe_text import TextRandomAPI, TextVariationAPI, VariationConfig

    pe = spec.pe
    config = PEConfig(
        labels=spec.template.labels,
        rounds=pe.rounds,
        per_label=pe.population,
        keep=pe.keep,
        top_k=pe.top_k,
        selection=pe.selection,
        threshold_std=pe.threshold_std,
        epsilon=spec.epsilon,
        delta=spec.delta,
        mode=spec.mode,
        threshold=spec.threshold,
        colluders=spec.colluders,
        declared_records_per_label=pe.declared_records_per_label,
        deadline_s=spec.stage_s,
        seed=spec.seed,
    )
    ledger.check(spec.epsilon)
    loaded = load(spec.model)
    vectors = embedder or load_embedder(pe.embedder)
    generation = dataclasses.replace(spec.generation, temperature=pe.temperature)
    checkpoint = spec.store_dir / f"{spec.task_id or 'pe-' + uuid.uuid4().hex[:12]}.checkpoint"
    result = run_pe(
        pe_transport(transport),
        nodes,
        config,
        random_api=TextRandomAPI(loaded, spec.template, generation),
        variation_api=TextVariationAPI(
            loaded, spec.template, VariationConfig(generation=generation)
        ),
        embedder=vectors,
        checkpoint_dir=checkpoint,
        ledger=ledger,
    )
    task_id = result.state.pe_task_id
    path = spec.store_dir / f"{task_id}.pe.json"
    done = [h.survivors for h in result.state.history if h.status == "done"]
    payload = {
        "format": PE_RELEASE_FORMAT,
        "task_id": task_id,
        "report": result.report,
        "labels": list(result.state.population.labels),
        "per_label": result.state.population.per_label,
        "samples": list(result.state.population.samples),
    }
    ledger.attach(
        task_id,
        path=path,
        write=lambda target: write_json_atomic(target, payload),
        participants=min(done) if done else 0,
    )
    row = next(r for r in ledger.rows() if r["task_id"] == task_id)
    eps = result.report["epsilon"]
    log.info("PE task %s published at %s (epsilon %s)", task_id, path, eps)
    return TaskOutcome(task_id=task_id, method="pe", release_path=path, ledger_row=row)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> Path:
    """Write JSON to ``path`` through a temporary file, fsync and rename (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(payload, indent=1, default=_json_default))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def _json_default(value: object) -> object:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
