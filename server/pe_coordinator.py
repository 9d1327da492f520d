"""The coordinator's side of federated Private Evolution: rounds, selection, checkpoints.

Each round: embed the population, publish a round manifest with the candidates' embeddings, run
one secure sum of the clients' noisy vote histograms, threshold and select, and ask the
variation API for the next population. Everything after the secure sum is post-processing of
the noisy histogram.

Crash safety: ``state.json`` in the checkpoint directory is rewritten atomically before each
round starts (write-ahead: that round's budget is considered spent from then on) and after it
ends. A restart resumes after the last finished round; a round that was started but not
finished is never re-run (clients may already have answered it, and they refuse a replay): the
task moves on to the next round with the unchanged population, and the lost round still counts
toward T. The task's total epsilon is written to the ledger once, before round 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.protocol.accounting import (
    PECalibration,
    calibrate_pe,
    gaussian_epsilon,
    pe_aggregate_noise_std,
    pe_min_workable_epsilon,
    skellam_epsilon,
    validate_epsilon_delta,
)
from fedsynth.protocol.errors import ConfigError, FedSynthError, refusal_summary
from fedsynth.protocol.manifest import PrivacySpec, array_sha256, default_noise_sharing
from fedsynth.protocol.mechanisms import trust_statement
from fedsynth.protocol.messages import vector_to_bytes
from fedsynth.protocol.pe import (
    Embedder,
    Population,
    RandomAPI,
    Selection,
    VariationAPI,
    plan_next_population,
    select_survivors,
    threshold_histogram,
)
from fedsynth.protocol.pe_manifest import PE_ADJACENCY, PERoundManifest, decode_histogram
from fedsynth.protocol.secagg.stages import min_safe_threshold
from fedsynth.server.ledger import PrivacyLedger
from fedsynth.server.secure_round import (
    RoundResult,
    Transport,
    run_secure_sum,
)

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "fedsynth-pe-checkpoint-1"


@dataclass(frozen=True)
class PEConfig:
    """Everything the coordinator operator chooses for a federated PE task.

    Attributes:
        labels: Label set (histogram order).
        rounds: T, the number of vote histograms (privacy is calibrated for all T).
        per_label: Population size N per label.
        keep: Candidates selected per label each round (default N/2).
        top_k: Votes per private example.
        selection: ``rank`` or ``probabilistic``.
        keep_selected: Carry the selected candidates into the next population unchanged.
        threshold_std: Counts at or below this many aggregate noise std are zeroed.
        epsilon, delta, mode, threshold: Guarantee of the whole task and secure-sum threshold t.
        colluders: Holders that may side with the coordinator and add no noise; the noise
            shares are sized without them and the default t is safe against them.
        output_per_label: Samples per label of the final population, grown from the last
            histogram by more variations of its selection (post-processing, free); default N.
            Lets a small voted population (enough votes per candidate at a small epsilon) still
            yield a large synthetic data set.
        declared_records_per_label: Public planning figure (e.g. holders' declared sizes) used
            only to refuse an epsilon too small to be workable; never measured from data.
        bits: Field bits (32 halves the upload against 64; votes are small integers).
        deadline_s: Per-stage deadline.
        max_records: Per-client cap on records.
        seed: Seed of the public randomness (generation, selection draws).
    """

    labels: tuple[str, ...]
    rounds: int = 3
    per_label: int = 60
    keep: int | None = None
    top_k: int = 1
    selection: str = "rank"
    keep_selected: bool = True
    threshold_std: float = 2.0
    epsilon: float = 4.0
    delta: float = 1e-5
    mode: str = "distributed"
    threshold: int | None = None
    colluders: int = 0
    declared_records_per_label: int | None = None
    output_per_label: int | None = None
    bits: int = 32
    deadline_s: float = 1800.0
    max_records: int = 1_000_000
    seed: int = 0

    def __post_init__(self) -> None:
        validate_epsilon_delta(epsilon=self.epsilon, delta=self.delta)
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds}: must be >= 1")
        if self.per_label < 2:
            raise ConfigError(f"per_label={self.per_label}: must be >= 2")
        if not 1 <= self.keep_count <= self.per_label:
            raise ConfigError(f"keep={self.keep}: must be in 1..per_label={self.per_label}")
        if not 1 <= self.top_k <= self.per_label:
            raise ConfigError(f"top_k={self.top_k}: must be in 1..per_label={self.per_label}")
        if self.output_per_label is not None and self.output_per_label < 1:
            raise ConfigError(f"output_per_label={self.output_per_label}: must be >= 1")
        Selection(self.selection)
        if self.threshold_std < 0:
            raise ConfigError(f"threshold_std={self.threshold_std}: must be >= 0")

    @property
    def keep_count(self) -> int:
        """Candidates selected per label."""
        return self.keep if self.keep is not None else max(1, self.per_label // 2)

    def fingerprint(self) -> str:
        """Hash of the settings; a checkpoint only resumes under the same settings."""
        data = asdict(self)
        data["epsilon"] = str(self.epsilon)
        if self.output_per_label is None:  # absent: checkpoints from before the setting resume
            del data["output_per_label"]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def check_workable(config: PEConfig, calibration: PECalibration, *, clients: int) -> None:
    """Refuse, before round 1, an epsilon too small for T rounds and N candidates per label."""
    if math.isinf(config.epsilon) or config.declared_records_per_label is None:
        return
    needed = pe_min_workable_epsilon(
        mode=config.mode,
        delta=config.delta,
        rounds=config.rounds,
        top_k=config.top_k,
        per_label=config.per_label,
        records_per_label=config.declared_records_per_label,
        clients=clients,
    )
    if config.epsilon < needed:
        std = pe_aggregate_noise_std(calibration, clients=clients)
        mean = config.declared_records_per_label * config.top_k / config.per_label
        raise ConfigError(
            f"epsilon={config.epsilon} is too small for T={config.rounds} rounds with "
            f"N={config.per_label} candidates per label and ~{config.declared_records_per_label} "
            f"records per label: the noise std ({std:.1f} votes) exceeds half the mean votes per "
            f"candidate ({mean:.1f}); the minimum workable epsilon is "
            f"{math.ceil(needed * 100) / 100:.2f} (or lower T or N). Nothing was spent."
        )


def epsilon_after(calibration: PECalibration, rounds_done: int) -> float:
    """Epsilon spent by the first ``rounds_done`` histograms (same accountant as calibration)."""
    if rounds_done <= 0:
        return 0.0
    if math.isinf(calibration.epsilon):
        return math.inf
    if calibration.mode == "central":
        return gaussian_epsilon(
            noise_multiplier=calibration.noise_multiplier,
            delta=calibration.delta,
            compositions=rounds_done,
            accountant="pld",
        )
    return skellam_epsilon(
        l1=calibration.l1_sensitivity,
        l2=calibration.l2_sensitivity,
        variance=calibration.total_variance,
        delta=calibration.delta,
        compositions=rounds_done,
    )


@dataclass
class RoundRecord:
    """What one round did (kept in the checkpoint and the privacy report)."""

    round: int
    status: str  # "done" or "lost"
    survivors: int = 0
    dropped: list[str] = field(default_factory=list)
    refusals: dict[str, str] = field(default_factory=dict)
    selected_per_label: list[int] = field(default_factory=list)
    max_votes: float = 0.0
    epsilon_spent: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    upload_bytes: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class PEState:
    """The checkpoint: population and history after the last finished round."""

    pe_task_id: str
    config_fingerprint: str
    population: Population
    completed_round: int = 0
    started_round: int = 0
    history: list[RoundRecord] = field(default_factory=list)
    initial_metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        """Serialize (population texts included: they are DP post-processing outputs)."""
        return json.dumps(
            {
                "format": CHECKPOINT_FORMAT,
                "pe_task_id": self.pe_task_id,
                "config_fingerprint": self.config_fingerprint,
                "completed_round": self.completed_round,
                "started_round": self.started_round,
                "population": {
                    "labels": list(self.population.labels),
                    "per_label": self.population.per_label,
                    "samples": list(self.population.samples),
                    "origin": list(self.population.origin),
                },
                "history": [asdict(h) for h in self.history],
                "initial_metrics": self.initial_metrics,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> PEState:
        """Parse a checkpoint; a malformed one raises ConfigError."""
        try:
            data = json.loads(text)
            if data.get("format") != CHECKPOINT_FORMAT:
                raise ConfigError(f"checkpoint format {data.get('format')!r} is not supported")
            pop = data["population"]
            return cls(
                pe_task_id=str(data["pe_task_id"]),
                config_fingerprint=str(data["config_fingerprint"]),
                population=Population(
                    labels=tuple(pop["labels"]),
                    samples=tuple(pop["samples"]),
                    per_label=int(pop["per_label"]),
                    origin=tuple(pop["origin"]),
                ),
                completed_round=int(data["completed_round"]),
                started_round=int(data["started_round"]),
                history=[RoundRecord(**h) for h in data["history"]],
                initial_metrics=dict(data.get("initial_metrics", {})),
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"malformed PE checkpoint: {exc!r}") from exc


def save_state(state: PEState, directory: Path) -> Path:
    """Atomically replace ``state.json`` (write, fsync, rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "state.json"
    tmp = directory / "state.json.tmp"
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(state.to_json())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def load_state(directory: Path) -> PEState | None:
    """The checkpoint in ``directory``, or None when there is none."""
    path = directory / "state.json"
    if not path.exists():
        return None
    return PEState.from_json(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class RoundEvent:
    """Progress of a PE task, for a progress bar."""

    round: int
    rounds: int
    phase: str
    epsilon_spent: float
    metrics: Mapping[str, float]


Evaluator = Callable[[Population], dict[str, float]]


@dataclass
class PEResult:
    """The final population and what every round did."""

    state: PEState
    calibration: PECalibration
    report: dict[str, Any]


def initial_population(config: PEConfig, random_api: RandomAPI) -> Population:
    """Round-0 population: N samples per label from the random API."""
    samples: list[str] = []
    for index, label in enumerate(config.labels):
        texts = random_api.random(label, config.per_label, seed=config.seed * 1000 + index)
        if len(texts) != config.per_label:
            raise FedSynthError(f"random API returned {len(texts)} samples, expected N")
        samples.extend(texts)
    return Population(
        labels=config.labels,
        samples=tuple(samples),
        per_label=config.per_label,
        origin=tuple(["random"] * len(samples)),
    )


def next_population(
    config: PEConfig,
    population: Population,
    histogram: np.ndarray,
    variation_api: VariationAPI,
    *,
    round_number: int,
    rng: np.random.Generator,
    size: int | None = None,
) -> tuple[Population, list[int]]:
    """Threshold, select and vary: the population of the next round (post-processing).

    ``size`` samples per label (default N); the final round passes ``output_per_label``.
    """
    size = config.per_label if size is None else size
    selected = select_survivors(
        histogram,
        n_labels=len(config.labels),
        per_label=config.per_label,
        keep=config.keep_count,
        method=config.selection,
        rng=rng,
    )
    plan = plan_next_population(
        selected,
        histogram,
        per_label=config.per_label,
        keep_selected=config.keep_selected,
        rng=rng,
        size=size,
    )
    samples: list[str] = []
    origin: list[str] = []
    for c, (kept, parents) in enumerate(plan):
        block = population.of_label(c)
        samples.extend(block[i] for i in kept)
        origin.extend(["kept"] * len(kept))
        varied = variation_api.vary(
            config.labels[c],
            [block[i] for i in parents],
            seed=config.seed * 1_000_003 + round_number * 101 + c,
        )
        if len(varied) != len(parents):
            raise FedSynthError(f"variation API returned {len(varied)} of {len(parents)} samples")
        samples.extend(varied)
        origin.extend(["variation"] * len(varied))
    new = Population(
        labels=population.labels,
        samples=tuple(samples),
        per_label=size,
        origin=tuple(origin),
    )
    return new, [len(set(s)) for s in selected]


def round_threshold(config: PEConfig, clients: int) -> int:
    """The task's threshold: as configured, else the smallest safe for its colluders."""
    return config.threshold or min_safe_threshold(clients, config.colluders)


def build_round_manifest(
    config: PEConfig,
    calibration: PECalibration,
    *,
    pe_task_id: str,
    round_number: int,
    embedder: Embedder,
    candidates: np.ndarray,
    nodes: tuple[int, ...],
) -> PERoundManifest:
    """The manifest of one round (privacy terms identical in every round)."""
    threshold = round_threshold(config, len(nodes))
    privacy = PrivacySpec(
        epsilon=config.epsilon,
        delta=config.delta,
        mode=config.mode,
        threshold=threshold,
        total_variance=calibration.total_variance,
        noise_multiplier=calibration.noise_multiplier,
        l2_sensitivity=calibration.l2_sensitivity,
        l1_sensitivity=calibration.l1_sensitivity,
        accountant=f"{calibration.accountant}, {config.rounds} rounds composed",
        adjacency=PE_ADJACENCY,
        noise_sharing=default_noise_sharing(config.mode, calibration.total_variance),
        colluders=config.colluders,
    )
    return PERoundManifest(
        pe_task_id=pe_task_id,
        round=round_number,
        rounds=config.rounds,
        embedder_name=embedder.name,
        embedder_fingerprint=embedder.fingerprint,
        embedding_dim=embedder.dim,
        labels=config.labels,
        per_label=config.per_label,
        top_k=config.top_k,
        candidates_sha256=array_sha256(candidates),
        bits=config.bits,
        node_ids=nodes,
        privacy=privacy,
        deadline_s=config.deadline_s,
        max_records=config.max_records,
    )


def run_pe(
    transport: Transport,
    nodes: tuple[int, ...],
    config: PEConfig,
    *,
    random_api: RandomAPI,
    variation_api: VariationAPI,
    embedder: Embedder,
    checkpoint_dir: Path,
    ledger: PrivacyLedger | None = None,
    evaluate: Evaluator | None = None,
    progress: Callable[[RoundEvent], None] | None = None,
    stop_after: int | None = None,
) -> PEResult:
    """Run (or resume) a federated PE task for T rounds and return the final population.

    ``stop_after`` ends the call after that many rounds (to test restarts); the checkpoint is
    left as it would be after a crash at that point.
    """
    calibration = calibrate_pe(
        mode=config.mode,
        epsilon=config.epsilon,
        delta=config.delta,
        rounds=config.rounds,
        top_k=config.top_k,
    )
    check_workable(config, calibration, clients=len(nodes))
    threshold = round_threshold(config, len(nodes))
    if threshold > len(nodes):
        raise ConfigError(f"threshold t={threshold} exceeds the K={len(nodes)} clients")

    def emit(round_number: int, phase: str, spent: float, metrics: Mapping[str, float]) -> None:
        if progress is not None:
            progress(RoundEvent(round_number, config.rounds, phase, spent, dict(metrics)))

    state = load_state(checkpoint_dir)
    if state is not None and state.config_fingerprint != config.fingerprint():
        raise ConfigError(
            f"checkpoint in {checkpoint_dir} belongs to other PE settings (fingerprint "
            f"{state.config_fingerprint} != {config.fingerprint()}); use a fresh directory"
        )
    if state is None:
        emit(0, "initial population", 0.0, {})
        population = initial_population(config, random_api)
        state = PEState(
            pe_task_id=f"pe-{uuid.uuid4().hex[:12]}",
            config_fingerprint=config.fingerprint(),
            population=population,
        )
        if evaluate is not None:
            state.initial_metrics = evaluate(population)
        if ledger is not None:
            ledger.check(config.epsilon)
        save_state(state, checkpoint_dir)
    else:
        log.info("resuming PE task %s after round %s", state.pe_task_id, state.completed_round)
    if state.started_round > state.completed_round:
        lost = state.started_round
        log.warning("round %s was interrupted; it counts as spent and is not re-run", lost)
        state.history.append(
            RoundRecord(round=lost, status="lost", epsilon_spent=epsilon_after(calibration, lost))
        )
        state.completed_round = lost
        save_state(state, checkpoint_dir)
    # Central-mode noise comes from the OS's secure randomness, never from the public seed;
    # selection and parent draws are public post-processing, seeded for reproducibility.
    noise_rng = np.random.default_rng(secrets.randbits(128))
    done_now = 0
    while state.completed_round < config.rounds:
        if stop_after is not None and done_now >= stop_after:
            break
        r = state.completed_round + 1
        spent_before = epsilon_after(calibration, r - 1)
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        latest = state.history[-1].metrics if state.history else state.initial_metrics
        emit(r, "embed candidates", spent_before, latest)
        candidates = embedder.embed(list(state.population.samples)).astype(np.float32)
        timings["embed"] = time.monotonic() - t0
        manifest = build_round_manifest(
            config,
            calibration,
            pe_task_id=state.pe_task_id,
            round_number=r,
            embedder=embedder,
            candidates=candidates,
            nodes=nodes,
        )
        if r == 1 and ledger is not None and not _ledger_has(ledger, state.pe_task_id):
            row = _ledger_report(state.pe_task_id, calibration, threshold)
            ledger.record(row, release_path=checkpoint_dir)
        state.started_round = r  # write-ahead: from here on this round's budget is spent
        save_state(state, checkpoint_dir)
        t0 = time.monotonic()
        emit(r, "secure sum", spent_before, {})
        result = run_secure_sum(
            transport,
            manifest,
            {"manifest": manifest.to_json(), "candidates": vector_to_bytes(candidates.reshape(-1))},
        )
        histogram = decode_histogram(
            result.field_sum, manifest=manifest, survivors=len(result.survivors), rng=noise_rng
        )
        timings["aggregation"] = time.monotonic() - t0
        noise_std = pe_aggregate_noise_std(calibration, clients=len(result.survivors))
        noisy = threshold_histogram(histogram, config.threshold_std * noise_std)
        t0 = time.monotonic()
        emit(r, "variations", epsilon_after(calibration, r), {})
        population, selected = next_population(
            config,
            state.population,
            noisy,
            variation_api,
            round_number=r,
            rng=np.random.default_rng([config.seed, r]),
            size=config.output_per_label if r == config.rounds else None,
        )
        timings["generation"] = time.monotonic() - t0
        metrics = evaluate(population) if evaluate is not None else {}
        spent = epsilon_after(calibration, r)
        state.history.append(
            _round_record(r, result, selected, histogram, spent, timings, manifest, metrics)
        )
        state.population = population
        state.completed_round = r
        save_state(state, checkpoint_dir)
        emit(r, "done", spent, metrics)
        done_now += 1
    report = pe_privacy_report(state, calibration, config, nodes=nodes, embedder=embedder)
    return PEResult(state=state, calibration=calibration, report=report)


def _round_record(
    r: int,
    result: RoundResult,
    selected: list[int],
    histogram: np.ndarray,
    spent: float,
    timings: dict[str, float],
    manifest: PERoundManifest,
    metrics: dict[str, float],
) -> RoundRecord:
    return RoundRecord(
        round=r,
        status="done",
        survivors=len(result.survivors),
        dropped=[str(n) for n in result.dropped],
        refusals={str(n): refusal_summary(reason) for n, reason in result.refusals.items()},
        selected_per_label=selected,
        max_votes=float(histogram.max(initial=0.0)),
        epsilon_spent=spent,
        seconds=timings,
        upload_bytes=manifest.dim * (4 if manifest.bits <= 32 else 8),
        metrics=metrics,
    )


def _ledger_has(ledger: PrivacyLedger, task_id: str) -> bool:
    return any(row.get("task_id") == task_id for row in ledger.rows())


def _ledger_report(task_id: str, calibration: PECalibration, threshold: int) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "epsilon": calibration.epsilon_achieved,
        "delta": calibration.delta,
        "trust_mode": calibration.mode,
        "survivors": f">= t = {threshold} per round",
    }


def pe_privacy_report(
    state: PEState,
    calibration: PECalibration,
    config: PEConfig,
    *,
    nodes: tuple[int, ...],
    embedder: Embedder,
) -> dict[str, Any]:
    """The privacy report of a PE task: mechanism, accountant, noise, rounds and who took part."""
    mechanism = {
        "distributed": "distributed Skellam (client noise shares) + secure sum, per round",
        "local": "local Skellam (each client fully sanitizes its histogram) + secure sum",
        "central": "Gaussian added by the coordinator after a secure sum, per round",
    }[calibration.mode]
    eps = calibration.epsilon_achieved
    return {
        "format": "fedsynth-pe-report-1",
        "method": "federated Private Evolution (vote histograms under secure sum)",
        "task_id": state.pe_task_id,
        "mechanism": mechanism,
        "trust_mode": calibration.mode,
        "trust": trust_statement(calibration.mode),
        "epsilon": "inf" if math.isinf(eps) else eps,
        "epsilon_target": "inf" if math.isinf(config.epsilon) else config.epsilon,
        "delta": calibration.delta,
        "adjacency": PE_ADJACENCY,
        "composition": f"{config.rounds} rounds composed by the accountant (lost rounds count)",
        "accountant": calibration.accountant,
        "gdp_cross_check_epsilon": None
        if math.isnan(calibration.gdp_epsilon)
        else calibration.gdp_epsilon,
        "noise": {
            "noise_multiplier": calibration.noise_multiplier,
            "aggregate_variance_votes": calibration.total_variance,
            "l2_sensitivity_votes": calibration.l2_sensitivity,
            "l1_sensitivity_votes": calibration.l1_sensitivity,
            "field_bits": config.bits,
        },
        "rounds": config.rounds,
        "rounds_completed": state.completed_round,
        "per_label": config.per_label,
        "output_per_label": config.output_per_label or config.per_label,
        "top_k": config.top_k,
        "selection": config.selection,
        "K": len(nodes),
        "threshold_t": round_threshold(config, len(nodes)),
        "embedder": embedder.name,
        "embedder_fingerprint": embedder.fingerprint,
        "labels": list(config.labels),
        "history": [asdict(h) for h in state.history],
    }
