"""The federated dataset-vector demo: K simulated holders, one DP release, synthetic data, scores.

Flow: split the bundled corpus into a private training part (partitioned across the holders)
and a held-out test part; the coordinator computes the public reference (prior texts); the
holders and the coordinator run the real client and server code in Flower's simulation (secure
sum, distributed noise) for the target epsilon and, as a ceiling, a non-private release; then the
coordinator generates labelled texts from the prior and from both releases, and the evaluator
scores them against the real data (label fidelity, train-on-synthetic accuracy, embedding
Fréchet distance).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.client.contributor import ClientSettings
from fedsynth.client.data import Record, load_records
from fedsynth.client.policy import ClientPolicy
from fedsynth.protocol.contribution import decode_release
from fedsynth.protocol.features import PromptTemplate
from fedsynth.protocol.models import DEFAULT_MODEL, LoadedModel, cache_root, load_model
from fedsynth.server.coordinator import (
    PublicReference,
    TaskConfig,
    build_manifest,
    compute_public_reference,
    epsilon_label,
)
from fedsynth.server.generation import GenerationConfig
from fedsynth.server.ledger import PrivacyLedger
from fedsynth.server.release import Release, make_release, save_release
from fedsynth.server.secure_round import Transport, run_secure_round
from fedsynth.server.synthesize import SyntheticSample, generate_from_release
from fedsynth.simulations.datasets import (
    json_line,
    load_corpus,
    partition_iid,
    split_train_test,
    subsample_per_label,
    write_jsonl,
)

log = logging.getLogger(__name__)

TEMPLATES: dict[str, PromptTemplate] = {
    "rotten_tomatoes": PromptTemplate(
        instruction="Here is a {label} movie review snippet:\n",
        label_names=(("positive", "positive"), ("negative", "negative")),
    ),
    "bbc_news": PromptTemplate(
        instruction="Here is a BBC News article about {label}:\n",
        label_names=(
            ("business", "business"),
            ("entertainment", "entertainment"),
            ("politics", "politics"),
            ("sports", "sports"),
            ("tech", "technology"),
        ),
    ),
}


@dataclass(frozen=True)
class DemoConfig:
    """One demo run; presets fix sizes so the run fits a time budget on 2 CPU cores."""

    out_dir: Path
    corpus: str = "rotten_tomatoes"
    model: str = DEFAULT_MODEL
    clients: int = 3
    threshold: int | None = None
    epsilon: float = 4.0
    delta: float = 1e-5
    mode: str = "distributed"
    layers: tuple[int, ...] = (8, 9, 10, 11)
    strength: float = 0.03
    contrast: float = 1.0
    private_per_label: int | None = 2000
    synthetic_per_label: int = 150
    prior_per_label: int = 150
    test_per_label: int | None = 500
    include_nonprivate: bool = True
    max_new_tokens: int = 48
    generation_batch: int = 64
    drop_clients: int = 0
    seed: int = 0
    data_path: Path | None = None
    text_field: str = "text"
    label_field: str = "label"
    instruction: str | None = None

    @property
    def template(self) -> PromptTemplate:
        """The class-conditional template: the bundled corpus's, or one for the user's data."""
        if self.data_path is None:
            return TEMPLATES[self.corpus]
        labels = user_labels(self.data_path, self.text_field, self.label_field)
        return PromptTemplate(
            instruction=self.instruction or "Here is a text labelled {label}:\n",
            label_names=tuple((label, label) for label in labels),
        )


PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "private_per_label": 300,
        "synthetic_per_label": 30,
        "prior_per_label": 30,
        "test_per_label": 200,
    },
    "default": {},
}


def demo_config(preset: str, **overrides: Any) -> DemoConfig:
    """Build a DemoConfig from a preset name and explicit overrides (None = keep preset)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {list(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    config = DemoConfig(**values)
    # The prior condition reuses the public prior texts: there must be enough of them.
    if config.prior_per_label < config.synthetic_per_label:
        config = dataclasses.replace(config, prior_per_label=config.synthetic_per_label)
    return config


@dataclass
class DemoData:
    """The demo's data split: what the holders hold and what the evaluator keeps apart."""

    train: list[Record]
    test: list[Record]
    partitions: list[list[Record]]
    partition_dir: Path
    source: str


@functools.cache
def user_labels(path: Path, text_field: str, label_field: str) -> tuple[str, ...]:
    """Sorted labels of a user's data file (every row validated, errors with line numbers)."""
    records = load_records(path, text_field=text_field, label_field=label_field)
    return tuple(sorted({r.label for r in records}))


def prepare_data(config: DemoConfig) -> DemoData:
    """Split the corpus (bundled, or the user's file) and write one private file per holder."""
    if config.data_path is not None:
        records = load_records(
            config.data_path, text_field=config.text_field, label_field=config.label_field
        )
        source = f"user data {config.data_path}"
    else:
        corpus = load_corpus(config.corpus)
        records, source = list(corpus.records), corpus.source
    train, test = split_train_test(records, test_fraction=0.15, seed=config.seed)
    train = subsample_per_label(train, per_label=config.private_per_label, seed=config.seed)
    test = subsample_per_label(test, per_label=config.test_per_label, seed=config.seed + 1)
    partitions = partition_iid(train, num_clients=config.clients, seed=config.seed)
    partition_dir = config.out_dir / "clients"
    partition_dir.mkdir(parents=True, exist_ok=True)
    for stale in partition_dir.glob("budget-*.jsonl"):
        stale.unlink()
    for i, part in enumerate(partitions):
        write_jsonl(part, partition_dir / f"partition-{i}.jsonl")
    return DemoData(train, test, partitions, partition_dir, source)


def task_config(config: DemoConfig, epsilon: float) -> TaskConfig:
    """The coordinator's task settings for one release of this demo."""
    return TaskConfig(
        template=config.template,
        layers=config.layers,
        epsilon=epsilon,
        delta=config.delta,
        mode=config.mode,
        threshold=config.threshold,
        prior_per_label=config.prior_per_label,
        prior_generation=generation_config(config),
        seed=config.seed,
    )


def generation_config(config: DemoConfig) -> GenerationConfig:
    """Sampling settings shared by the prior and the steered generations."""
    return GenerationConfig(
        max_new_tokens=config.max_new_tokens, batch_size=config.generation_batch
    )


Reporter = Callable[[str, int, int], None]
ROUND_STAGES = ("setup", "share_keys", "masked_input", "unmask", "done")


@dataclass
class CoordinatorOutcome:
    """Releases made by the coordinator job (filled in as rounds finish)."""

    releases: dict[str, Path] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def release_epsilons(config: DemoConfig) -> list[float]:
    """The epsilons released: the target, then (optionally) the non-private ceiling."""
    out = [config.epsilon]
    if config.include_nonprivate and math.isfinite(config.epsilon):
        out.append(math.inf)
    return out


def make_coordinator_job(
    config: DemoConfig,
    loaded: LoadedModel,
    reference: PublicReference,
    outcome: CoordinatorOutcome,
    *,
    report: Reporter | None = None,
) -> Callable[[Transport, tuple[int, ...], Any], None]:
    """The coordinator's half of the demo: one secure round per release, saved with the ledger."""
    ledger = PrivacyLedger(config.out_dir / "ledger.jsonl")

    def job(transport: Transport, nodes: tuple[int, ...], _context: Any) -> None:
        for epsilon in release_epsilons(config):
            name = f"release-eps{epsilon_label(epsilon)}"
            manifest = build_manifest(task_config(config, epsilon), loaded, reference, nodes)
            ledger.check(epsilon)
            chosen = _with_dropouts(transport, nodes, config.drop_clients)

            def on_stage(stage: str, name: str = name) -> None:
                if report is not None:
                    report(f"{name}: {stage}", ROUND_STAGES.index(stage), len(ROUND_STAGES) - 1)

            result = run_secure_round(chosen, manifest, reference.means, progress=on_stage)
            # Central-mode noise: always from the OS's secure randomness, never a public seed.
            rng = np.random.default_rng(secrets.randbits(128))
            decoded = decode_release(result.field_sum, manifest=manifest, rng=rng)
            release = make_release(manifest, decoded, result, model_name=loaded.name)
            path = save_release(release, config.out_dir / f"{name}.safetensors")
            ledger.record(release.report, release_path=path)
            outcome.releases[epsilon_label(epsilon)] = path

    return job


class _DroppingTransport:
    """Simulates holders that go offline after sharing keys (tests dropout recovery)."""

    def __init__(self, inner: Transport, dropped: set[int]) -> None:
        self.inner = inner
        self.dropped = dropped

    def exchange(self, stage: str, requests: Mapping[int, Any], *, timeout: float) -> Any:
        if stage in ("masked_input", "unmask"):
            requests = {n: r for n, r in requests.items() if n not in self.dropped}
        return self.inner.exchange(stage, requests, timeout=timeout)


def _with_dropouts(transport: Transport, nodes: tuple[int, ...], count: int) -> Transport:
    if count <= 0:
        return transport
    return _DroppingTransport(transport, set(nodes[-count:]))


def run_federation(
    config: DemoConfig,
    data: DemoData,
    loaded: LoadedModel,
    reference: PublicReference,
    *,
    report: Reporter | None = None,
) -> CoordinatorOutcome:
    """Run the real ServerApp and ClientApps in Flower's in-process simulation (Ray)."""
    outcome = CoordinatorOutcome()
    job = make_coordinator_job(config, loaded, reference, outcome, report=report)
    outcome.errors.extend(run_job_in_simulation(config, data, job))
    return outcome


def run_job_in_simulation(
    config: DemoConfig,
    data: DemoData,
    job: Callable[[Transport, tuple[int, ...], Any], None],
    *,
    embedder: str = "all-minilm-l6-v2",
    policy: ClientPolicy | None = None,
    client_app: Any = None,
) -> list[str]:
    """Run ``job`` as the ServerApp against K simulated holders; return the job's errors.

    ``policy`` is every holder's policy (default: the standard one, non-private tasks allowed
    when the demo asks for them); ``client_app`` replaces fedsynth's ClientApp (baselines).
    """
    from flwr.simulation import run_simulation

    from fedsynth.client.flower_app import make_client_app
    from fedsynth.server.flower_app import make_server_app

    settings = ClientSettings(
        data_path=data.partition_dir / "partition-0.jsonl",
        model=config.model,
        embedder=embedder,
        policy=policy
        or ClientPolicy(allow_non_private=config.include_nonprivate or math.isinf(config.epsilon)),
    )
    errors: list[str] = []

    def guarded(transport: Transport, nodes: tuple[int, ...], context: Any) -> None:
        try:
            job(transport, nodes, context)
        except Exception as exc:  # re-raised below, outside Flower's thread
            errors.append(f"{type(exc).__name__}: {exc}")
            raise

    cpus = max(1, min(os.cpu_count() or 1, config.clients))
    run_simulation(
        server_app=make_server_app(guarded, num_clients=config.clients),
        client_app=client_app or make_client_app(settings, partition_dir=data.partition_dir),
        num_supernodes=config.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False},
        },
    )
    return errors


def load_coordinator(
    config: DemoConfig, *, report: Reporter | None = None
) -> tuple[LoadedModel, PublicReference]:
    """Load the model (converting the packaged GGUF once) and compute the public reference."""
    loaded = load_model(config.model)
    reference = compute_public_reference(
        loaded, task_config(config, config.epsilon), progress=report
    )
    return loaded, reference


def generate_conditions(
    config: DemoConfig,
    loaded: LoadedModel,
    reference: PublicReference,
    releases: Mapping[str, Path],
    *,
    report: Reporter | None = None,
) -> dict[str, list[SyntheticSample]]:
    """Synthetic samples per condition: the prior (epsilon 0) and each release."""
    from fedsynth.server.release import load_release

    labels = config.template.labels
    out: dict[str, list[SyntheticSample]] = {
        "prior (eps=0)": [
            SyntheticSample(text=t, label=label, release_id="prior")
            for label in labels
            for t in reference.texts[label][: config.synthetic_per_label]
        ]
    }
    for eps_name, path in releases.items():
        release: Release = load_release(path)
        out[f"eps={eps_name}"] = generate_from_release(
            loaded,
            release,
            n_per_label=config.synthetic_per_label,
            strength=config.strength,
            contrast=config.contrast,
            config=generation_config(config),
            seed=config.seed + 101,
            progress=_phase(report, f"generate eps={eps_name}"),
        )
    return out


def _phase(report: Reporter | None, phase: str) -> Callable[[int, int], None] | None:
    """Bind a reporter to one phase name."""
    if report is None:
        return None
    bound: Reporter = report
    return lambda done, total: bound(phase, done, total)


def evaluate_conditions(
    samples: Mapping[str, list[SyntheticSample]], data: DemoData
) -> dict[str, dict[str, float]]:
    """Label fidelity, train-on-synthetic accuracy / macro-F1, embedding Fréchet distance."""
    from fedsynth.simulations.metrics import (
        embed_texts,
        frechet_distance,
        label_fidelity,
        load_embedder,
        train_text_classifier,
        tstr_scores,
    )

    classifier = train_text_classifier(
        [r.text for r in data.train], [r.label for r in data.train], seed=0
    )
    embedder = load_embedder()
    test_texts = [r.text for r in data.test]
    test_labels = [r.label for r in data.test]
    real_emb = embed_texts(embedder, test_texts)
    scores: dict[str, dict[str, float]] = {}
    for name, rows in samples.items():
        texts = [s.text for s in rows]
        labels = [s.label for s in rows]
        fidelity = label_fidelity(classifier, texts, labels)
        tstr = tstr_scores(texts, labels, test_texts, test_labels, seed=0)
        emb = embed_texts(embedder, texts)
        scores[name] = {
            "label_fidelity": fidelity,
            "fidelity_hits": round(fidelity * len(texts)),
            "n": len(texts),
            "tstr_accuracy": tstr["accuracy"],
            "tstr_macro_f1": tstr["macro_f1"],
            "embedding_fd": frechet_distance(emb, real_emb),
        }
    return scores


def write_outputs(
    config: DemoConfig,
    samples: Mapping[str, list[SyntheticSample]],
    scores: Mapping[str, Mapping[str, float]],
    releases: Mapping[str, Path],
    timings: Mapping[str, float],
) -> dict[str, Any]:
    """Write synthetic.jsonl, privacy_report.json, summary.json and a comparison plot."""
    from fedsynth.server.release import load_release

    main_key = epsilon_label(config.epsilon)
    main = load_release(releases[main_key])
    out = config.out_dir
    with (out / "synthetic.jsonl").open("w", encoding="utf-8") as handle:
        for sample in samples[f"eps={main_key}"]:
            handle.write(json_line(asdict(sample)) + "\n")
    baselines = out / "baselines"
    baselines.mkdir(exist_ok=True)
    for name, rows in samples.items():
        slug = name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "")
        with (baselines / f"synthetic-{slug}.jsonl").open("w", encoding="utf-8") as handle:
            for sample in rows:
                handle.write(json_line(asdict(sample)) + "\n")
    (out / "privacy_report.json").write_text(json.dumps(main.report, indent=2, sort_keys=True))
    config_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    config_json["epsilon"] = epsilon_label(config.epsilon)
    summary = {
        "config": config_json,
        "scores": scores,
        "releases": {k: str(v) for k, v in releases.items()},
        "timings_s": dict(timings),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_scores(scores, out / "scores.png")
    return summary


def plot_scores(scores: Mapping[str, Mapping[str, float]], path: Path) -> None:
    """Bar chart of label fidelity and train-on-synthetic accuracy per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scores)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(x - 0.2, [scores[n]["label_fidelity"] for n in names], 0.4, label="label fidelity")
    ax.bar(x + 0.2, [scores[n]["tstr_accuracy"] for n in names], 0.4, label="TSTR accuracy")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="grey", lw=0.5, ls="--")
    ax.legend(loc="lower right")
    ax.set_title("Synthetic data utility by condition")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def coordinator_job_from_run_config(
    run_config: Mapping[str, Any],
) -> Callable[[Transport, tuple[int, ...], Any], None]:
    """The whole coordinator side for ``flwr run .`` (settings from pyproject's run config).

    ``method = "pe"`` runs federated Private Evolution (``pe-rounds``, ``pe-population``,
    ``pe-init``, ``embedder``) instead of a dataset-vector release.
    """
    out = Path(str(run_config.get("out-dir") or cache_root() / "flwr-run"))
    preset = str(run_config.get("preset", "quick"))
    config = demo_config(
        preset,
        out_dir=out,
        epsilon=float(run_config.get("epsilon", 4.0)),
        delta=float(run_config.get("delta", 1e-5)),
        mode=str(run_config.get("mode", "distributed")),
        clients=int(run_config.get("num-clients", 3)),
        model=str(run_config.get("model") or DEFAULT_MODEL),
        layers=tuple(int(x) for x in str(run_config.get("layers", "8,9,10,11")).split(",")),
    )
    if str(run_config.get("method", "vector")) == "pe":
        return _pe_job_from_run_config(run_config, config, preset)

    def job(transport: Transport, nodes: tuple[int, ...], context: Any) -> None:
        timings: dict[str, float] = {}
        start = time.monotonic()
        data = prepare_data(config)
        loaded, reference = load_coordinator(config)
        timings["reference"] = time.monotonic() - start
        outcome = CoordinatorOutcome()
        make_coordinator_job(config, loaded, reference, outcome)(transport, nodes, context)
        samples = generate_conditions(config, loaded, reference, outcome.releases)
        scores = evaluate_conditions(samples, data)
        write_outputs(config, samples, scores, outcome.releases, timings)
        log.info("fedsynth demo finished; outputs in %s", config.out_dir)

    return job


def _pe_job_from_run_config(
    run_config: Mapping[str, Any], config: DemoConfig, preset: str
) -> Callable[[Transport, tuple[int, ...], Any], None]:
    """The PE coordinator for ``flwr run . --run-config "method='pe'"``."""
    from fedsynth.simulations import pe_demo

    values: dict[str, Any] = dict(pe_demo.PE_PRESETS.get(preset, {}))
    for key, name in (("pe-rounds", "rounds"), ("pe-population", "per_label")):
        if key in run_config:
            values[name] = int(str(run_config[key]))
    settings = pe_demo.PEDemoSettings(
        init=str(run_config.get("pe-init", "prior")),
        embedder=str(run_config.get("embedder", "all-minilm-l6-v2")),
        **values,
    )
    pe_demo.pe_config(config, settings)  # refuse bad settings before anything runs

    def job(transport: Transport, nodes: tuple[int, ...], context: Any) -> None:
        start = time.monotonic()
        data = prepare_data(config)
        loaded = load_model(config.model)
        outcome = pe_demo.PEOutcome()
        pe_demo.make_pe_job(config, settings, loaded, data, outcome)(transport, nodes, context)
        final = outcome.result.state if outcome.result else None
        scores: dict[str, dict[str, float]] = {}
        if final is not None and outcome.initial is not None:
            scores = evaluate_conditions(
                {
                    "PE round 0": pe_demo.population_samples(outcome.initial, "round-0"),
                    "PE final": pe_demo.population_samples(final.population, "final"),
                },
                data,
            )
        timings = {"total": time.monotonic() - start}
        pe_demo.write_pe_outputs(config, settings, outcome, scores, timings)
        log.info("fedsynth PE demo finished; outputs in %s", config.out_dir)

    return job
