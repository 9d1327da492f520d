"""The federated Private Evolution demo: K simulated holders vote, the coordinator evolves.

Same data split and outputs as the dataset-vector demo (:mod:`fedsynth.simulations.demo`); the
holders run :class:`~fedsynth.client.pe_voter.PEVoter` in Flower's simulation and the
coordinator runs :func:`~fedsynth.server.pe_coordinator.run_pe`. With ``init="steered"`` a
dataset-vector release (a share ``init_fraction`` of the epsilon and half the delta, composed
with the PE rounds by basic composition) steers the first population, and the variations.

The evaluator (simulation only) embeds each round's population and scores it against held-out
real texts: embedding Fréchet distance (lower is better) and precision/recall in embedding
space; at the end label fidelity and train-on-synthetic accuracy for round 0 and round T.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.protocol.embedding import load_embedder
from fedsynth.protocol.errors import ConfigError, FedSynthError
from fedsynth.protocol.models import LoadedModel, load_model
from fedsynth.protocol.pe import Embedder, Population
from fedsynth.server.coordinator import compute_public_reference, epsilon_label
from fedsynth.server.ledger import PrivacyLedger, ledger_path
from fedsynth.server.pe_coordinator import PEConfig, PEResult, RoundEvent, run_pe
from fedsynth.server.pe_text import TextRandomAPI, TextVariationAPI, VariationConfig
from fedsynth.server.secure_round import Transport
from fedsynth.server.synthesize import SyntheticSample, release_deltas
from fedsynth.simulations.datasets import json_line
from fedsynth.simulations.demo import (
    CoordinatorOutcome,
    DemoConfig,
    DemoData,
    Reporter,
    generation_config,
    make_coordinator_job,
    public_basis_for,
    simulated_dropouts,
    task_config,
)

log = logging.getLogger(__name__)
INITS = ("prior", "steered")


@dataclass(frozen=True)
class PEDemoSettings:
    """PE-specific demo settings (the rest comes from the DemoConfig)."""

    rounds: int = 4
    per_label: int = 60
    init: str = "prior"
    init_fraction: float = 0.5
    embedder: str = "all-minilm-l6-v2"
    top_k: int = 1
    selection: str = "rank"
    temperature: float = 0.9
    output_per_label: int | None = None  # final population size per label (default N)

    def __post_init__(self) -> None:
        """Refuse bad settings here, before a steering release or any PE round spends ε."""
        if self.init not in INITS:
            raise ConfigError(f"init={self.init!r}: expected one of {INITS}")
        if not 0.0 < self.init_fraction < 1.0:
            raise ConfigError(f"init_fraction={self.init_fraction}: must be in (0, 1)")
        if not (math.isfinite(self.temperature) and self.temperature > 0.0):
            raise ConfigError(f"temperature={self.temperature}: must be a finite number > 0")
        sizes = [("rounds", self.rounds), ("per_label", self.per_label)]
        if self.output_per_label is not None:
            sizes.append(("output_per_label", self.output_per_label))
        for name, value in sizes:
            if value < 1:
                raise ConfigError(f"{name}={value}: must be >= 1")
        if not 1 <= self.top_k <= self.per_label:
            raise ConfigError(f"top_k={self.top_k}: must be in 1..per_label={self.per_label}")


PE_PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"rounds": 2, "per_label": 20},
    "default": {},
}


@dataclass
class PEOutcome:
    """What the PE job produced."""

    result: PEResult | None = None
    initial: Population | None = None
    vector_release: Path | None = None
    errors: list[str] = field(default_factory=list)
    epsilon_offset: float = 0.0  # epsilon of the steering release (basic composition)


def budget_split(config: DemoConfig, pe: PEDemoSettings) -> tuple[float, float, float, float]:
    """(epsilon_vector, delta_vector, epsilon_pe, delta_pe): basic composition to the target."""
    if pe.init == "prior":
        return 0.0, 0.0, config.epsilon, config.delta
    if math.isinf(config.epsilon):
        return math.inf, config.delta / 2, math.inf, config.delta / 2
    eps_vec = config.epsilon * pe.init_fraction
    return eps_vec, config.delta / 2, config.epsilon - eps_vec, config.delta / 2


def pe_config(config: DemoConfig, pe: PEDemoSettings) -> PEConfig:
    """The coordinator's PE task settings for this demo."""
    _, _, eps_pe, delta_pe = budget_split(config, pe)
    per_label_records = (config.private_per_label or 0) or None
    return PEConfig(
        labels=config.template.labels,
        rounds=pe.rounds,
        per_label=pe.per_label,
        top_k=pe.top_k,
        selection=pe.selection,
        epsilon=eps_pe,
        delta=delta_pe,
        mode=config.mode,
        threshold=config.threshold,
        colluders=config.colluders,
        declared_records_per_label=per_label_records,
        output_per_label=pe.output_per_label,
        seed=config.seed,
    )


class RoundEvaluator:
    """Scores a population against held-out real texts in embedding space (simulation only)."""

    def __init__(self, embedder: Embedder, data: DemoData) -> None:
        self.embedder = embedder
        self.real = embedder.embed([r.text for r in data.test])

    def __call__(self, population: Population) -> dict[str, float]:
        """Embedding Fréchet distance, precision and recall of the population."""
        from fedsynth.simulations.metrics import frechet_distance, precision_recall_embeddings

        synth = self.embedder.embed(list(population.samples))
        precision, recall = precision_recall_embeddings(self.real, synth, k=3)
        return {
            "embedding_fd": frechet_distance(synth, self.real),
            "precision": precision,
            "recall": recall,
        }


def make_pe_job(
    config: DemoConfig,
    pe: PEDemoSettings,
    loaded: LoadedModel,
    data: DemoData,
    outcome: PEOutcome,
    *,
    report: Reporter | None = None,
) -> Callable[[Transport, tuple[int, ...], Any], None]:
    """The coordinator's half: optional steering release, then T PE rounds."""
    # Everything the rounds need is built and checked here, before the job spends any ε:
    # the steering release must never be charged for a PE task that then cannot run.
    pe_task = pe_config(config, pe)
    gen = dataclasses.replace(generation_config(config), temperature=pe.temperature)
    variation = VariationConfig(generation=gen)
    eps_vec, delta_vec, _, _ = budget_split(config, pe)
    vec_config = None
    if pe.init == "steered":
        vec_config = dataclasses.replace(
            config, epsilon=eps_vec, delta=delta_vec, include_nonprivate=False
        )
    config.check_federation()
    embedder = load_embedder(pe.embedder)
    evaluator = RoundEvaluator(embedder, data)
    ledger = PrivacyLedger(ledger_path(config.out_dir))

    def job(transport: Transport, nodes: tuple[int, ...], context: Any) -> None:
        deltas_by_label = None
        if vec_config is not None:
            reference = compute_public_reference(
                loaded, task_config(vec_config, eps_vec), progress=report
            )
            vec_outcome = CoordinatorOutcome()
            make_coordinator_job(vec_config, loaded, reference, vec_outcome, report=report)(
                transport, nodes, context
            )
            from fedsynth.server.release import load_release

            outcome.vector_release = vec_outcome.releases[epsilon_label(eps_vec)]
            outcome.epsilon_offset = eps_vec
            release = load_release(outcome.vector_release)
            basis = public_basis_for(vec_config, loaded, reference, release)
            deltas_by_label = release_deltas(
                release,
                strength=config.strength,
                contrast=config.contrast,
                basis=basis,
                min_signal_share=vec_config.min_signal_share,
            )
        random_api = TextRandomAPI(loaded, config.template, gen, deltas_by_label=deltas_by_label)
        variation_api = TextVariationAPI(
            loaded, config.template, variation, deltas_by_label=deltas_by_label
        )
        pe_transport = _pe_transport(transport)

        def on_event(event: RoundEvent) -> None:
            if report is None:
                return
            total = event.epsilon_spent + outcome.epsilon_offset
            eps = "inf" if math.isinf(total) else f"{total:.2f}"
            fd = event.metrics.get("embedding_fd")
            figure = f" · FD {fd:.4f}" if fd is not None else ""
            report(
                f"PE round {event.round}/{event.rounds} ({event.phase}) · ε spent {eps}{figure}",
                event.round,
                event.rounds,
            )

        def evaluate(population: Population) -> dict[str, float]:
            if outcome.initial is None:
                outcome.initial = population
            return evaluator(population)

        # A demo is always a new task on freshly written holder files: never resume an old
        # demo's checkpoint (operators resume through run_pe with the same directory).
        checkpoint = config.out_dir / "pe-checkpoint"
        shutil.rmtree(checkpoint, ignore_errors=True)
        outcome.result = run_pe(
            pe_transport,
            nodes,
            pe_task,
            random_api=random_api,
            variation_api=variation_api,
            embedder=embedder,
            checkpoint_dir=checkpoint,
            ledger=ledger,
            evaluate=evaluate,
            progress=on_event,
        )

    return job


def _pe_transport(transport: Transport) -> Transport:
    """The Flower transport switched to PE messages (other transports are used as they are)."""
    for_action = getattr(transport, "for_action", None)
    if for_action is None:
        return transport
    from fedsynth.server.flower_app import PE_ACTION

    switched: Transport = for_action(PE_ACTION)
    return switched


def run_pe_federation(
    config: DemoConfig,
    pe: PEDemoSettings,
    data: DemoData,
    loaded: LoadedModel,
    *,
    report: Reporter | None = None,
) -> PEOutcome:
    """Run the real ServerApp and ClientApps (PE voters) in Flower's simulation."""
    from fedsynth.simulations.demo import run_job_in_simulation

    outcome = PEOutcome()
    job = make_pe_job(config, pe, loaded, data, outcome, report=report)
    outcome.errors.extend(run_job_in_simulation(config, data, job, embedder=pe.embedder))
    return outcome


def population_samples(population: Population, release_id: str) -> list[SyntheticSample]:
    """A population as labelled synthetic samples."""
    return [
        SyntheticSample(text=text, label=label, release_id=release_id)
        for text, label in zip(population.samples, population.sample_labels, strict=True)
    ]


def write_pe_outputs(
    config: DemoConfig,
    pe: PEDemoSettings,
    outcome: PEOutcome,
    scores: dict[str, dict[str, float]],
    timings: dict[str, float],
) -> dict[str, Any]:
    """synthetic.jsonl (final population), privacy_report.json, summary.json, pe-rounds.png."""
    if outcome.result is None:
        raise FedSynthError("the PE task produced no result")
    result = outcome.result
    out = config.out_dir
    with (out / "synthetic.jsonl").open("w", encoding="utf-8") as handle:
        for sample in population_samples(result.state.population, result.state.pe_task_id):
            handle.write(json_line(asdict(sample)) + "\n")
    report = dict(result.report)
    eps_vec, delta_vec, eps_pe, delta_pe = budget_split(config, pe)
    if outcome.vector_release is not None:
        from fedsynth.server.release import load_release

        report = {
            "method": "steered initial population (dataset vector) + federated PE",
            "composition": "basic composition of the two releases",
            "epsilon_total": epsilon_label(eps_vec + eps_pe),
            "delta_total": delta_vec + delta_pe,
            "releases": [load_release(outcome.vector_release).report, report],
        }
    dropouts = simulated_dropouts(out / "clients")
    if dropouts:
        report["dropped_holders"] = dropouts  # names the holders behind dropped node ids
    (out / "privacy_report.json").write_text(json.dumps(report, indent=2, default=str))
    rounds: list[dict[str, Any]] = [{"round": 0, **result.state.initial_metrics}]
    rounds.extend({"round": h.round, "status": h.status, **h.metrics} for h in result.state.history)
    summary = {
        "method": "pe",
        "pe": asdict(pe),
        "epsilon": epsilon_label(config.epsilon),
        "rounds": rounds,
        "scores": scores,
        "timings_s": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    plot_rounds(rounds, out / "pe-rounds.png", title=f"PE, ε={epsilon_label(config.epsilon)}")
    return summary


def plot_rounds(rounds: list[dict[str, Any]], path: Path, *, title: str) -> None:
    """Embedding FD and precision/recall per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rounds if "embedding_fd" in r]
    x = [r["round"] for r in done]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.plot(x, [r["embedding_fd"] for r in done], marker="o")
    left.set_xlabel("round")
    left.set_ylabel("embedding FD to held-out (lower is better)")
    right.plot(x, [r["precision"] for r in done], marker="o", label="precision")
    right.plot(x, [r["recall"] for r in done], marker="s", label="recall")
    right.set_xlabel("round")
    right.set_ylim(0, 1)
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_pe_demo(
    config: DemoConfig,
    pe: PEDemoSettings,
    data: DemoData,
    *,
    report: Reporter | None = None,
) -> tuple[PEOutcome, dict[str, dict[str, float]], dict[str, float]]:
    """Load the generator, run the federation, score round 0 and round T."""
    from fedsynth.simulations.demo import check_text_length, evaluate_conditions

    timings: dict[str, float] = {}
    start = time.monotonic()
    loaded = load_model(config.model)
    # Before the first round: nothing spent on a refusal. PE builds its own prompts (no shots).
    check_text_length(dataclasses.replace(config, shots=0), loaded)
    timings["model"] = time.monotonic() - start
    t0 = time.monotonic()
    outcome = run_pe_federation(config, pe, data, loaded, report=report)
    timings["federation"] = time.monotonic() - t0
    if outcome.errors or outcome.result is None or outcome.initial is None:
        raise FedSynthError(
            "the federated PE task failed: " + ("; ".join(outcome.errors) or "no result")
        )
    t0 = time.monotonic()
    final = outcome.result.state.population
    samples = {
        "PE round 0": population_samples(outcome.initial, "round-0"),
        f"PE round {outcome.result.state.completed_round}": population_samples(final, "final"),
    }
    scores = evaluate_conditions(samples, data)
    timings["evaluation"] = time.monotonic() - t0
    timings["total"] = time.monotonic() - start
    return outcome, scores, timings


def round_table(outcome: PEOutcome) -> list[tuple[int, float, float, float, float]]:
    """(round, epsilon spent, FD, precision, recall) per round, round 0 first.

    The epsilon includes a steering release's (basic composition).
    """
    if outcome.result is None:
        return []
    state = outcome.result.state
    offset = outcome.epsilon_offset
    rows = [(0, offset, *_metric_triplet(state.initial_metrics))]
    for h in state.history:
        rows.append((h.round, h.epsilon_spent + offset, *_metric_triplet(h.metrics)))
    return rows


def _metric_triplet(metrics: dict[str, float]) -> tuple[float, float, float]:
    return (
        float(metrics.get("embedding_fd", np.nan)),
        float(metrics.get("precision", np.nan)),
        float(metrics.get("recall", np.nan)),
    )
