"""Run a simulation study: every cell of the config, one results.csv row each, resumable.

Federated cells (``vector``, ``pe``) run the real ClientApps and ServerApp in Flower's
in-process simulation, exactly as ``fedsynth demo`` does; pooled baselines run the same
protocol functions (features, per-record rounding, decoding with central noise) on the union of
the holders' data. After each cell its row is appended to ``results.csv`` and flushed, so an
interrupted study resumes where it stopped; ``study.json`` pins the settings the rows came from.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from fedsynth.client.data import Record
from fedsynth.client.policy import ClientPolicy
from fedsynth.protocol.codec import to_field
from fedsynth.protocol.contribution import (
    decode_release,
    integer_class_sums,
    noise_share_variance,
)
from fedsynth.protocol.errors import ConfigError, FedSynthError, TimeBudgetError
from fedsynth.protocol.features import extract_features
from fedsynth.protocol.manifest import PrivacySpec
from fedsynth.protocol.models import LoadedModel, load_model
from fedsynth.server.coordinator import PublicReference, build_manifest, compute_public_reference
from fedsynth.server.generation import generate_from_prompts
from fedsynth.server.release import Release, save_release
from fedsynth.server.secure_round import Reply, RoundResult, Transport
from fedsynth.server.synthesize import SyntheticSample, generate_from_release, label_deltas
from fedsynth.simulations.datasets import json_line
from fedsynth.simulations.demo import (
    CoordinatorOutcome,
    DemoConfig,
    DemoData,
    discard_partitions,
    generation_config,
    make_coordinator_job,
    removed_on_failure,
    run_job_in_simulation,
    task_config,
    write_partitions,
)
from fedsynth.simulations.partitions import PartitionSpec, partition_records, partition_stats
from fedsynth.simulations.study_config import (
    METHODS,
    METRIC_COLUMNS,
    STUDY_FORMAT,
    Cell,
    StudyConfig,
)

log = logging.getLogger(__name__)

KEY_COLUMNS = ("method", "mode", "epsilon", "clients", "partition", "dropout", "seed")
PERF_COLUMNS = (
    "noise_multiplier",
    "client_seconds",
    "bytes_per_client",
    "coordinator_seconds",
    "generation_tokens_per_s",
    "cell_seconds",
)
RESULT_COLUMNS = (
    "key",
    *KEY_COLUMNS,
    "status",
    "n_synthetic",
    *(c for cols in METRIC_COLUMNS.values() for c in cols),
    *PERF_COLUMNS,
)
CANARY_TEXT = "The ticket stub I kept from that screening reads {secret}, and I loved every minute."
AUDIT_COLUMNS = (
    "mode",
    "claimed_epsilon",
    "clients",
    "epsilon_lower_bound",
    "runs",
    "false_positive_rate",
    "false_negative_rate",
    "attainable_bound",
)

Progress = Callable[[str], None]


# --------------------------------------------------------------------------- folder


def open_results_folder(config: StudyConfig, out_dir: Path) -> set[str]:
    """Create or check the study folder; return the keys of cells already finished.

    Refuses (before any compute) a folder written by another study format or with other fixed
    settings, since its rows would not be comparable with new ones.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "study.json"
    meta = {"format": STUDY_FORMAT, "fingerprint": config.fingerprint(), "name": config.name}
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise ConfigError(
                f"{meta_path} is not a study file; use a new results folder"
            ) from None
        if old.get("format") != STUDY_FORMAT:
            raise ConfigError(
                f"{out_dir} holds results of study format {old.get('format')!r}; this fedsynth "
                f"writes format {STUDY_FORMAT}. Use a new results folder."
            )
        if old.get("fingerprint") != meta["fingerprint"]:
            raise ConfigError(
                f"{out_dir} holds results made with other fixed settings (model, data sizes, "
                "layers, PE settings, ...); its rows would not be comparable. Use a new results "
                "folder, or change only the sweeps, seeds and metrics."
            )
    else:
        if (out_dir / "results.csv").exists():
            raise ConfigError(
                f"{out_dir} holds a results.csv but no study.json: not a fedsynth study folder "
                "(nothing was changed); use a new results folder"
            )
        meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return {row["key"] for row in read_results(out_dir) if row["status"] != ""}


def read_results(out_dir: Path) -> list[dict[str, str]]:
    """Rows of results.csv (empty when there is none); refuses a file with other columns."""
    path = out_dir / "results.csv"
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = tuple(reader.fieldnames or ())
        rows = list(reader)
    if columns == RESULT_COLUMNS:
        return rows
    if not {"key", *KEY_COLUMNS, "status"} <= set(columns) or not set(columns) <= set(
        RESULT_COLUMNS
    ):
        raise ConfigError(
            f"{path} has other columns than this fedsynth writes; use a new results folder"
        )
    # Written before some metric columns existed: rewrite it with the current header.
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return [{c: row.get(c, "") for c in RESULT_COLUMNS} for row in rows]


def append_result(out_dir: Path, row: Mapping[str, Any]) -> None:
    """Append one row and flush it to disk (a crash after this keeps the cell)."""
    path = out_dir / "results.csv"
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({c: _cell_text(row.get(c)) for c in RESULT_COLUMNS})
        handle.flush()


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if math.isnan(value):
            return ""
        return f"{value:.6g}"
    return str(value)


# --------------------------------------------------------------------------- shared state


class _TimedTransport:
    """Records per-stage wall time and reply bytes of a transport (the performance columns)."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.stage_seconds: dict[str, float] = {}
        self.bytes_by_node: dict[int, int] = {}

    def for_action(self, action: str) -> _TimedTransport:
        """Switch the inner transport's message kind, keep recording here."""
        switched = getattr(self.inner, "for_action", None)
        if switched is not None:
            self.inner = switched(action)
        return self

    def exchange(self, stage: str, requests: Mapping[int, Any], *, timeout: float) -> Any:
        from flwr.common.serde import recorddict_to_proto

        start = time.monotonic()
        replies: dict[int, Reply] = self.inner.exchange(stage, requests, timeout=timeout)
        elapsed = time.monotonic() - start
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + elapsed
        for node, reply in replies.items():
            if reply.content is not None:
                size = recorddict_to_proto(reply.content).ByteSize()
                self.bytes_by_node[node] = self.bytes_by_node.get(node, 0) + size
        return replies

    @property
    def client_seconds(self) -> float:
        """Wall time of the stages in which holders compute (features or votes, noise).

        For protocols without a secure sum (DP-FedAvg): every exchange.
        """
        if "masked_input" in self.stage_seconds:
            return self.stage_seconds["masked_input"]
        return sum(self.stage_seconds.values())

    @property
    def bytes_per_client(self) -> float:
        """Mean bytes uploaded per holder over all stages (serialized Flower records)."""
        if not self.bytes_by_node:
            return math.nan
        return float(np.mean(list(self.bytes_by_node.values())))


@dataclass
class SeedState:
    """What every cell of one seed shares: data split, evaluators, pooled features."""

    train: list[Record]
    test: list[Record]
    members: list[Record]
    non_members: list[Record]
    classifier: Any = None
    test_embeddings: np.ndarray | None = None
    member_embeddings: np.ndarray | None = None
    non_member_embeddings: np.ndarray | None = None
    canaries: list[Record] = field(default_factory=list)
    canary_secret: str = ""
    candidate_secrets: list[str] = field(default_factory=list)
    pooled_features: np.ndarray | None = None
    pooled_seconds: float = 0.0

    @property
    def pooled(self) -> list[Record]:
        """Everything the holders hold together: the private records plus the canaries."""
        return self.train + self.canaries


@dataclass
class CellOutput:
    """Samples of one cell, its performance figures and its generator (for canary exposure)."""

    samples: list[SyntheticSample]
    status: str = "ok"
    perf: dict[str, float] = field(default_factory=dict)
    generator: Generator | None = None
    members: list[Record] | None = None  # records the method read, if not all private ones


@dataclass(frozen=True)
class Generator:
    """What a method releases for generation: a prompt per label and optional steering."""

    prompts: Mapping[str, str]
    deltas_by_label: Mapping[str, Mapping[int, Any]] | None = None
    model: LoadedModel | None = None  # a fine-tuned model (default: the study's model)


def check_time_budget(config: StudyConfig, measured_s: Sequence[float], *, remaining: int) -> None:
    """Refuse to start ``remaining`` cells whose estimated time exceeds the config's budget.

    The estimate is the mean measured cell time times the cells left: cells differ (a
    federated cell costs more than the prior), so it is a guide, stated as such.

    Raises:
        TimeBudgetError: The estimate exceeds ``time_budget_minutes`` (names both and how to go on).
    """
    budget = config.time_budget_minutes
    if budget is None or not measured_s or remaining <= 0:
        return
    mean_s = float(np.mean(measured_s))
    estimate = mean_s * remaining / 60.0
    if estimate > budget:
        raise TimeBudgetError(
            f"study {config.name!r}: {remaining} cells left, about {estimate:.0f} min at the "
            f"{mean_s:.0f} s per cell measured so far ({len(measured_s)} cells), above "
            f"time_budget_minutes={budget:g}. Finished cells are kept and a rerun resumes: pass "
            "--yes to run the rest anyway, or shrink the grid or raise the budget."
        )


class StudyRunner:
    """Runs the cells of a study that are not finished yet and writes the report."""

    def __init__(
        self,
        config: StudyConfig,
        out_dir: Path,
        *,
        progress: Progress | None = None,
        loaded: LoadedModel | None = None,
    ) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.progress = progress or (lambda _message: None)
        self._loaded = loaded
        self._reference: PublicReference | None = None
        self._seeds: dict[int, SeedState] = {}
        self._embedder: Any = None
        self.holder_tables: dict[str, list[dict[str, int]]] = {}

    # ---------------------------------------------------------------- lazies

    @property
    def loaded(self) -> LoadedModel:
        """The coordinator's model (loaded on first use)."""
        if self._loaded is None:
            self._loaded = load_model(self.config.model)
        return self._loaded

    def demo_config(self, cell: Cell) -> DemoConfig:
        """The demo settings that run one cell through the real federated code."""
        d = self.config.data
        epsilon = cell.epsilon if cell.epsilon > 0 else 4.0
        return DemoConfig(
            out_dir=self.out_dir / "cells" / _slug(cell.key),
            corpus=self.config.corpus,
            model=self.config.model,
            clients=cell.clients,
            epsilon=epsilon,
            delta=self.config.delta,
            mode=cell.mode if cell.mode in ("central", "distributed", "local") else "central",
            layers=self.config.layers,
            strength=d.strength,
            private_per_label=d.private_per_label,
            synthetic_per_label=d.synthetic_per_label,
            prior_per_label=max(d.synthetic_per_label, 8),
            test_per_label=d.test_per_label,
            include_nonprivate=False,
            max_new_tokens=d.max_new_tokens,
            generation_batch=d.generation_batch,
            drop_clients=cell.dropped_clients,
            seed=cell.seed,
        )

    @property
    def reference(self) -> PublicReference:
        """The public prior and reference (one for the whole study: it is public)."""
        if self._reference is None:
            base = self.demo_config(self.config.cells()[0])
            base = dataclasses.replace(base, seed=0)
            self.progress("computing the public reference (prior generations)")
            self._reference = compute_public_reference(self.loaded, task_config(base, base.epsilon))
        return self._reference

    @property
    def embedder(self) -> Any:
        """The sentence embedder used by the metrics (all-MiniLM-L6-v2, bundled)."""
        if self._embedder is None:
            from fedsynth.simulations.metrics import load_embedder

            self._embedder = load_embedder()
        return self._embedder

    def seed_state(self, seed: int) -> SeedState:
        """Data split and evaluators of one seed (computed once)."""
        if seed not in self._seeds:
            from fedsynth.simulations.datasets import (
                load_corpus,
                split_train_test,
                subsample_per_label,
            )

            d = self.config.data
            records = list(load_corpus(self.config.corpus).records)
            train, test = split_train_test(records, test_fraction=0.15, seed=seed)
            train = subsample_per_label(train, per_label=d.private_per_label, seed=seed)
            test = subsample_per_label(test, per_label=d.test_per_label, seed=seed + 1)
            rng = np.random.default_rng(seed + 7)
            n = min(d.mia_members, len(train), len(test))
            members = [train[int(i)] for i in rng.permutation(len(train))[:n]]
            non_members = [test[int(i)] for i in rng.permutation(len(test))[:n]]
            state = SeedState(train, test, members, non_members)
            if d.canaries:
                secrets_ = [
                    f"{int(x):06d}"
                    for x in rng.choice(10**6, d.canary_candidates + 1, replace=False)
                ]
                state.canary_secret, state.candidate_secrets = secrets_[0], secrets_[1:]
                label = sorted({r.label for r in train})[0]
                text = CANARY_TEXT.format(secret=state.canary_secret)
                state.canaries = [Record(text=text, label=label) for _ in range(d.canaries)]
            self._seeds[seed] = state
        return self._seeds[seed]

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        from fedsynth.simulations.metrics import embed_texts

        return embed_texts(self.embedder, list(texts))

    # ---------------------------------------------------------------- running

    def run(self, *, over_budget_ok: bool = False) -> list[dict[str, str]]:
        """Run every unfinished cell, then write report.md and the plots; return all rows.

        With the config's ``time_budget_minutes``, the time the unfinished cells will take is
        estimated from the cells measured so far (the finished ones, else the first cell run
        now, whose row is kept); above the budget the run stops with
        :class:`TimeBudgetError` unless ``over_budget_ok``.
        """
        finished = open_results_folder(self.config, self.out_dir)
        cells = self.config.cells()
        todo = [c for c in cells if c.key not in finished]
        self.progress(f"{len(cells)} cells, {len(cells) - len(todo)} already finished")
        measured = [
            float(r["cell_seconds"])
            for r in read_results(self.out_dir)
            if r["key"] in finished and r.get("cell_seconds")
        ]
        judged = over_budget_ok or self.config.time_budget_minutes is None
        for i, cell in enumerate(todo, start=1):
            if not judged and measured:
                check_time_budget(self.config, measured, remaining=len(todo) - i + 1)
                judged = True
            self.progress(f"[{i}/{len(todo)}] {cell.key}")
            row = self.run_cell(cell)
            append_result(self.out_dir, row)
            measured.append(float(row["cell_seconds"]))
        self.run_audits(cells)
        rows = read_results(self.out_dir)
        self.fill_holder_tables(cells)
        from fedsynth.simulations.study_report import write_report

        write_report(self, rows)
        return rows

    def run_audits(self, cells: Sequence[Cell]) -> None:
        """Empirical ε lower bound for each (mode, ε) of the vector cells.

        Uses the first cell's seed and IID holders; rows already in audit.csv are kept.
        """
        runs = self.config.data.audit_runs
        wanted = sorted(
            {
                (c.mode, c.epsilon, c.clients if c.clients > 1 else 3)
                for c in cells
                if c.method in ("vector", "vector-pooled") and math.isfinite(c.epsilon)
            }
        )
        if runs == 0 or not wanted:
            return
        from fedsynth.simulations.audit import audit_release

        path = self.out_dir / "audit.csv"
        done: set[tuple[str, str, str]] = set()
        if path.exists():
            with path.open(newline="", encoding="utf-8") as handle:
                done = {
                    (r["mode"], r["claimed_epsilon"], r["clients"]) for r in csv.DictReader(handle)
                }
        seed = cells[0].seed
        state = self.seed_state(seed)
        labels = [r.label for r in state.pooled]
        for mode, epsilon, k in wanted:
            if (mode, f"{epsilon:g}", str(k)) in done:
                continue
            self.progress(f"privacy audit: {mode}, ε={epsilon:g}, K={k}, {runs} runs per side")
            tc = task_config(dataclasses.replace(self.demo_config(cells[0]), mode=mode), epsilon)
            manifest = build_manifest(tc, self.loaded, self.reference, tuple(range(1, k + 1)))
            features = self._pooled_features(state, manifest)
            holders = [
                (features[idx], [labels[i] for i in idx])
                for idx in np.array_split(np.random.default_rng(seed).permutation(len(labels)), k)
            ]
            result = audit_release(
                holders, manifest=manifest, reference=self.reference.means, runs=runs, seed=seed
            )
            self.progress(
                f"  ε lower bound {result.epsilon_lower_bound:.3f}; the largest {runs} runs can "
                f"report is {result.attainable_bound:.3f}"
                + ("" if result.can_refute else f", so they cannot refute ε={epsilon:g}")
            )
            new = not path.exists()
            with path.open("a", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                if new:
                    writer.writerow(AUDIT_COLUMNS)
                writer.writerow(
                    [
                        mode,
                        f"{epsilon:g}",
                        k,
                        f"{result.epsilon_lower_bound:.6g}",
                        runs,
                        f"{result.false_positive_rate:.6g}",
                        f"{result.false_negative_rate:.6g}",
                        f"{result.attainable_bound:.6g}",
                    ]
                )

    def _pooled_features(self, state: SeedState, manifest: Any) -> np.ndarray:
        """Features of every private record of the seed (computed once, by the curator)."""
        if state.pooled_features is None:
            start = time.monotonic()
            state.pooled_features, _ = extract_features(
                self.loaded,
                [r.text for r in state.pooled],
                [r.label for r in state.pooled],
                manifest.feature_spec,
            )
            state.pooled_seconds = time.monotonic() - start
        return state.pooled_features

    def partitions(self, cell: Cell) -> list[list[Record]]:
        """The holders' data of a cell (seeded: the same cell always gets the same split)."""
        state = self.seed_state(cell.seed)
        spec = PartitionSpec.parse(cell.partition)
        parts = partition_records(state.train, spec, num_clients=cell.clients, seed=cell.seed)
        parts[0] = parts[0] + state.canaries  # the canaries all live at the first holder
        return parts

    def fill_holder_tables(self, cells: Sequence[Cell]) -> None:
        """Per-holder sizes and label histograms of every (partition, K) the study federates.

        Computed for the first seed, for the report.
        """
        for cell in cells:
            if not METHODS[cell.method].federated or cell.seed != self.config.seeds[0]:
                continue
            name = f"{cell.partition}, K={cell.clients}, seed={cell.seed}"
            if name not in self.holder_tables:
                labels = sorted({r.label for r in self.seed_state(cell.seed).train})
                self.holder_tables[name] = partition_stats(self.partitions(cell), labels)

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        """Produce one cell's samples by its method, then score them."""
        start = time.monotonic()
        runner = getattr(self, "_method_" + cell.method.replace("-", "_"))
        try:
            output: CellOutput = runner(cell)
        except FedSynthError as exc:  # a refusal (ε too small for PE, ...) is a result too
            log.warning("cell %s refused: %s", cell.key, exc)
            output = CellOutput(samples=[], status=f"refused: {exc}")
        row: dict[str, Any] = {"key": cell.key, **dataclasses.asdict(cell)}
        row["status"] = output.status
        row["n_synthetic"] = len(output.samples)
        if output.samples:
            row.update(self.score(cell, output.samples, members=output.members))
            if "canary" in self.config.metrics and output.generator is not None:
                row["canary_exposure"] = self.canary_exposure(cell, output.generator)
        row.update(output.perf)
        row["cell_seconds"] = time.monotonic() - start
        if "coordinator_seconds" not in row:
            row["coordinator_seconds"] = (
                row["cell_seconds"]
                - output.perf.get("client_seconds", 0.0)
                - output.perf.get("generation_seconds", 0.0)
            )
        self._write_samples(cell, output.samples)
        return row

    def _write_samples(self, cell: Cell, samples: Sequence[SyntheticSample]) -> None:
        folder = self.out_dir / "cells" / _slug(cell.key)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "synthetic.jsonl").open("w", encoding="utf-8") as handle:
            for s in samples:
                handle.write(json_line(dataclasses.asdict(s)) + "\n")

    # ---------------------------------------------------------------- methods

    def _method_prior(self, cell: Cell) -> CellOutput:
        n = self.config.data.synthetic_per_label
        samples = [
            SyntheticSample(text=t, label=label, release_id="prior")
            for label, texts in sorted(self.reference.texts.items())
            for t in texts[:n]
        ]
        template = self.demo_config(cell).template
        return CellOutput(
            samples, generator=Generator({lb: template.prefix(lb) for lb in template.labels})
        )

    def _generate(self, release: Release, cell: Cell, perf: dict[str, float]) -> CellOutput:
        config = self.demo_config(cell)
        start = time.monotonic()
        samples = generate_from_release(
            self.loaded,
            release,
            n_per_label=config.synthetic_per_label,
            strength=config.strength,
            contrast=config.contrast,
            config=generation_config(config),
            seed=cell.seed + 101,
        )
        perf.update(self._generation_perf(samples, time.monotonic() - start))
        template = release.manifest.template
        deltas = {
            label: label_deltas(release, label, strength=config.strength, contrast=config.contrast)
            for label in release.labels
        }
        generator = Generator({lb: template.prefix(lb) for lb in template.labels}, deltas)
        return CellOutput(samples, perf=perf, generator=generator)

    def _generation_perf(
        self, samples: Sequence[SyntheticSample], seconds: float
    ) -> dict[str, float]:
        tokens = sum(
            len(self.loaded.tokenizer.encode(s.text, add_special_tokens=False)) for s in samples
        )
        return {
            "generation_seconds": seconds,
            "generation_tokens_per_s": tokens / max(seconds, 1e-9),
        }

    def _federation_data(self, cell: Cell, config: DemoConfig) -> DemoData:
        """Write the cell's holder files (owner-only; all removed if one write fails)."""
        state = self.seed_state(cell.seed)
        data = DemoData(
            state.train,
            state.test,
            self.partitions(cell),
            config.out_dir / "clients",
            self.config.corpus,
        )
        write_partitions(data)
        return data

    def holder_policy(self) -> ClientPolicy:
        """The simulated holders accept every ε the study sweeps (real holders set their own)."""
        finite = [c.epsilon for c in self.config.cells() if math.isfinite(c.epsilon)]
        largest = max([8.0, *finite])
        return ClientPolicy(
            max_epsilon_per_task=largest,
            max_total_epsilon=largest * 1000,
            allow_non_private=True,
        )

    def _run_federated(
        self,
        cell: Cell,
        config: DemoConfig,
        make_job: Callable[[], Callable[..., None]],
        *,
        client_app: Any = None,
    ) -> tuple[dict[str, float], list[str]]:
        inner = make_job()  # builds and checks the job's settings before any holder file exists
        config.check_federation()
        timed: dict[str, _TimedTransport] = {}

        def job(transport: Transport, nodes: tuple[int, ...], context: Any) -> None:
            timed["t"] = _TimedTransport(transport)
            inner(timed["t"], nodes, context)

        with removed_on_failure(self._federation_data(cell, config)) as data:
            errors = run_job_in_simulation(
                config,
                data,
                job,
                embedder=self.config.embedder,
                policy=self.holder_policy(),
                client_app=client_app,
            )
        if errors:
            discard_partitions(data)  # a failed run leaves no private copies behind
        perf: dict[str, float] = {}
        if "t" in timed:
            perf = {
                "client_seconds": timed["t"].client_seconds,
                "bytes_per_client": timed["t"].bytes_per_client,
            }
        return perf, errors

    def _method_vector(self, cell: Cell) -> CellOutput:
        from fedsynth.server.release import load_release

        config = self.demo_config(cell)
        outcome = CoordinatorOutcome()
        perf, errors = self._run_federated(
            cell,
            config,
            lambda: make_coordinator_job(config, self.loaded, self.reference, outcome),
        )
        if errors or not outcome.releases:
            _federated_failure("the federated release", errors)
        release = load_release(next(iter(outcome.releases.values())))
        perf["noise_multiplier"] = effective_noise_multiplier(
            release.manifest.privacy,
            survivors=cell.clients - cell.dropped_clients,
            removed=int(release.report["noise"].get("excess_noise_removed_for", 0)),
        )
        return self._generate(release, cell, perf)

    def _pooled_release(self, cell: Cell) -> tuple[Release, dict[str, float]]:
        """Central EPSVec on the pooled data: the same feature, rounding and decoding code."""
        state = self.seed_state(cell.seed)
        config = dataclasses.replace(self.demo_config(cell), mode="central")
        tc = task_config(config, cell.epsilon)
        # The pooled curator is the only data source; the manifest's second node adds nothing.
        manifest = build_manifest(tc, self.loaded, self.reference, (1, 2))
        features = self._pooled_features(state, manifest)
        rng = np.random.default_rng(secrets.randbits(128))
        sums = integer_class_sums(
            features,
            [r.label for r in state.pooled],
            manifest=manifest,
            reference=self.reference.means,
            rng=rng,
        )
        decoded = decode_release(
            to_field(sums.reshape(-1), bits=manifest.bits), manifest=manifest, survivors=1, rng=rng
        )
        from fedsynth.server.release import privacy_report

        result = RoundResult(field_sum=np.zeros(0, dtype=np.uint64), survivors=[1], dropped=[])
        release = Release(
            release_id=manifest.task_id,
            manifest=manifest,
            vectors=decoded.vectors,
            counts=decoded.counts,
            report=privacy_report(manifest, result, model_name=self.loaded.name),
        )
        return release, {"client_seconds": state.pooled_seconds}

    def _method_vector_pooled(self, cell: Cell) -> CellOutput:
        release, perf = self._pooled_release(cell)
        perf["noise_multiplier"] = effective_noise_multiplier(release.manifest.privacy, survivors=1)
        save_release(
            release, self.out_dir / "cells" / _slug(cell.key) / "release-pooled.safetensors"
        )
        return self._generate(release, cell, perf)

    _method_vector_nonprivate = _method_vector_pooled

    def _method_pe(self, cell: Cell) -> CellOutput:
        from fedsynth.simulations import pe_demo

        config = self.demo_config(cell)
        settings = pe_demo.PEDemoSettings(
            rounds=self.config.pe.rounds,
            per_label=self.config.pe.population,
            top_k=self.config.pe.top_k,
            embedder=self.config.embedder,
        )
        pe_demo.pe_config(config, settings)
        outcome = pe_demo.PEOutcome()
        state = self.seed_state(cell.seed)
        start = time.monotonic()
        perf, errors = self._run_federated(
            cell,
            config,
            lambda: pe_demo.make_pe_job(
                config,
                settings,
                self.loaded,
                DemoData(state.train, state.test, [], config.out_dir / "clients", ""),
                outcome,
            ),
        )
        if errors or outcome.result is None:
            _federated_failure("the federated PE run", errors)
        samples = pe_demo.population_samples(outcome.result.state.population, "pe-final")
        perf["coordinator_seconds"] = time.monotonic() - start - perf.get("client_seconds", 0.0)
        return CellOutput(samples, perf=perf)

    def _icl_shots(self, cell: Cell) -> list[tuple[str, list[str]]]:
        """(label, shots) per sample, drawn from the attack's member records and the canaries.

        Each is quoted at least once when the prompts have room, so leaks show in the attacks.
        """
        state = self.seed_state(cell.seed)
        config = self.demo_config(cell)
        n_shots = self.config.baselines.icl_shots
        rng = np.random.default_rng(cell.seed + 303)
        out = []
        for label in config.template.labels:
            pool = [r.text for r in state.members + state.canaries if r.label == label] or [
                r.text for r in state.train if r.label == label
            ]
            order = [int(i) for i in rng.permutation(len(pool))]
            for j in range(config.synthetic_per_label):
                picks = [order[(j * n_shots + s) % len(order)] for s in range(n_shots)]
                out.append((label, list(dict.fromkeys(pool[i] for i in picks))))
        return out

    def _method_icl_verbatim(self, cell: Cell) -> CellOutput:
        state = self.seed_state(cell.seed)
        config = self.demo_config(cell)
        template = config.template
        shots = self._icl_shots(cell)
        # Each sample starts with the first half of one quoted record, verbatim; the other
        # quoted records are the in-context examples.
        prompts, starts = [], []
        for label, quoted in shots:
            words = quoted[0].split()
            start_text = " ".join(words[: max(1, len(words) // 2)])
            shown = dataclasses.replace(template, shots=tuple((label, s) for s in quoted[1:]))
            prompts.append(shown.prefix(label) + start_text)
            starts.append(start_text)
        labels = [label for label, _ in shots]
        start = time.monotonic()
        texts = generate_from_prompts(
            self.loaded, prompts, config=generation_config(config), seed=cell.seed + 101
        )
        samples = [
            SyntheticSample(text=f"{head} {t}".strip(), label=label, release_id="icl-verbatim")
            for head, t, label in zip(starts, texts, labels, strict=True)
        ]
        read = {text for _, quoted in shots for text in quoted}
        # Its generator for the canary test: the label's first prompt that quotes a canary.
        shown_prompts: dict[str, str] = {}
        for prompt, label in zip(prompts, labels, strict=True):
            quotes = any(c.text in prompt for c in state.canaries)
            if label not in shown_prompts or (
                quotes and not any(c.text in shown_prompts[label] for c in state.canaries)
            ):
                shown_prompts[label] = prompt
        perf = self._generation_perf(samples, time.monotonic() - start)
        # The control reads only the records it quotes: those are its members for the attack.
        members = [r for r in state.members if r.text in read]
        return CellOutput(
            samples, perf=perf, generator=Generator(shown_prompts), members=members or None
        )

    def _method_noisy_icl(self, cell: Cell) -> CellOutput:
        from fedsynth.simulations.baselines import generate_after_embeddings

        config = self.demo_config(cell)
        template = config.template
        shots = self._icl_shots(cell)
        parts = []
        for label, quoted in shots:
            instruction = template.instruction.format(label=template.describe(label))
            parts.append((instruction, quoted, instruction))
        start = time.monotonic()
        texts = generate_after_embeddings(
            self.loaded,
            parts,
            epsilon=cell.epsilon,
            delta=self.config.delta,
            kind=self.config.baselines.icl_noise,
            config=generation_config(config),
            seed=cell.seed + 101,
        )
        samples = [
            SyntheticSample(text=t, label=label, release_id="noisy-icl")
            for t, (label, _) in zip(texts, shots, strict=True)
        ]
        return CellOutput(samples, perf=self._generation_perf(samples, time.monotonic() - start))

    def dp_train_settings(self) -> Any:
        """The study's DP fine-tuning settings as the trainer's dataclass."""
        from fedsynth.simulations.dp_finetune import DPTrainSettings

        t = self.config.dp_training
        return DPTrainSettings(
            epochs=t.epochs,
            batch_size=t.batch_size,
            learning_rate=t.learning_rate,
            max_grad_norm=t.max_grad_norm,
            lora_rank=t.lora_rank,
            max_tokens=t.max_tokens,
        )

    def _sample_model(self, cell: Cell, model: LoadedModel, perf: dict[str, float]) -> CellOutput:
        """Samples of a fine-tuned model from the plain class prompts."""
        config = self.demo_config(cell)
        template = config.template
        labels = [lb for lb in template.labels for _ in range(config.synthetic_per_label)]
        start = time.monotonic()
        texts = generate_from_prompts(
            model,
            [template.prefix(lb) for lb in labels],
            config=generation_config(config),
            seed=cell.seed + 101,
        )
        samples = [
            SyntheticSample(text=t, label=lb, release_id=cell.method)
            for t, lb in zip(texts, labels, strict=True)
        ]
        perf.update(self._generation_perf(samples, time.monotonic() - start))
        generator = Generator({lb: template.prefix(lb) for lb in template.labels}, model=model)
        return CellOutput(samples, perf=perf, generator=generator)

    def _method_dp_sgd(self, cell: Cell) -> CellOutput:
        from fedsynth.simulations.dp_finetune import finetune_pooled

        state = self.seed_state(cell.seed)
        start = time.monotonic()
        model, report = finetune_pooled(
            self.loaded,
            state.pooled,
            self.demo_config(cell).template,
            epsilon=cell.epsilon,
            delta=self.config.delta,
            settings=self.dp_train_settings(),
            seed=cell.seed,
        )
        perf = {
            "client_seconds": time.monotonic() - start,
            "noise_multiplier": report["noise_multiplier"],
        }
        return self._sample_model(cell, model, perf)

    def _method_dp_fedavg(self, cell: Cell) -> CellOutput:
        from fedsynth.simulations import dp_fedavg as fa
        from fedsynth.simulations.dp_finetune import (
            adapter_state,
            load_adapter_state,
            lora_model,
            merged_model,
        )

        config = self.demo_config(cell)
        settings = self.dp_train_settings()
        task = fa.FedAvgTask(
            model=self.config.model,
            template=config.template,
            epsilon=cell.epsilon,
            delta=self.config.delta,
            rounds=self.config.dp_training.rounds,
            settings=settings,
        )
        model = lora_model(self.loaded, rank=settings.lora_rank)
        outcome = fa.FedAvgOutcome()
        perf, errors = self._run_federated(
            cell,
            config,
            lambda: fa.make_fedavg_job(task, adapter_state(model), outcome, timeout=3600.0),
            client_app=fa.make_fedavg_client_app(config.out_dir / "clients"),
        )
        if errors or outcome.adapters is None:
            _federated_failure("DP-FedAvg", errors)
        load_adapter_state(model, outcome.adapters)
        sigmas = [float(r["noise_multiplier"]) for rep in outcome.reports[:1] for r in rep.values()]
        perf["noise_multiplier"] = min(sigmas) if sigmas else math.nan
        return self._sample_model(cell, merged_model(model, self.loaded), perf)

    def _method_rpsg(self, cell: Cell) -> CellOutput:
        """Seeds → model rewrites → noisy choice → cosine filter → NLL filter → label check."""
        from fedsynth.server.generation import text_logprobs
        from fedsynth.simulations import baselines as b
        from fedsynth.simulations.metrics import train_text_classifier
        from fedsynth.simulations.text_metrics import nearest_similarity, unit_rows

        state = self.seed_state(cell.seed)
        config = self.demo_config(cell)
        template = config.template
        settings = self.config.baselines
        rng = np.random.default_rng(cell.seed + 505)
        seeds: list[tuple[str, str]] = []
        for label in template.labels:
            pool = [r.text for r in state.pooled if r.label == label]
            n = min(len(pool), config.synthetic_per_label * settings.rpsg_seed_factor)
            seeds += [(label, pool[int(i)]) for i in rng.permutation(len(pool))[:n]]
        prompts = [
            f"{template.prefix(label)}{text}\n\n{template.prefix(label)}"
            for label, text in seeds
            for _ in range(settings.rpsg_candidates)
        ]
        start = time.monotonic()
        candidates = generate_from_prompts(
            self.loaded, prompts, config=generation_config(config), seed=cell.seed + 101
        )
        perf = self._generation_perf(
            [SyntheticSample(t, "", "") for t in candidates], time.monotonic() - start
        )
        # Label agreement by a classifier of the public prior texts (no private data).
        prior = self.reference.texts
        public = train_text_classifier(
            [t for lb in prior for t in prior[lb]], [lb for lb in prior for _ in prior[lb]], seed=0
        )
        classes = list(public.classes_)
        cand = np.array(candidates, dtype=object).reshape(len(seeds), settings.rpsg_candidates)
        seed_emb = self._embed([t for _, t in seeds])
        cand_emb = self._embed(candidates).reshape(len(seeds), settings.rpsg_candidates, -1)
        similarity = np.einsum("sd,scd->sc", unit_rows(seed_emb), unit_rows(cand_emb))
        probs = public.predict_proba(candidates).reshape(len(seeds), settings.rpsg_candidates, -1)
        agree = np.stack([probs[i, :, classes.index(label)] for i, (label, _) in enumerate(seeds)])
        scores = b.rescale_unit(
            b.RPSG_SCORE_WEIGHT * similarity + (1 - b.RPSG_SCORE_WEIGHT) * agree
        )
        sigma = b.classic_gaussian_sigma(cell.epsilon, self.config.delta, 1.0)
        chosen = b.noisy_argmax(scores, sigma=sigma, rng=rng)
        picked = [str(cand[i, c]) for i, c in enumerate(chosen)]
        labels = [label for label, _ in seeds]
        # Cosine filter: keep the texts least similar to any private record.
        private_emb = self._embed([r.text for r in state.pooled])
        keep = b.keep_lowest(
            nearest_similarity(cand_emb[np.arange(len(seeds)), chosen], private_emb),
            b.RPSG_COSINE_KEEP,
        )
        # NLL filter: drop the most likely (memorized-looking) texts under the base model.
        nll = np.full(len(picked), -np.inf)
        for i in np.flatnonzero(keep):
            if picked[i].strip():
                nll[i] = -text_logprobs(self.loaded, template.prefix(labels[i]), [picked[i]])[0]
        kept_idx = np.flatnonzero(keep)
        keep[kept_idx] = b.keep_highest(nll[kept_idx], b.RPSG_NLL_KEEP)
        # Label alignment: the public classifier must give the seed's label.
        predicted = public.predict(picked)
        samples = []
        per_label: dict[str, int] = {}
        for i in np.flatnonzero(keep):
            label = labels[i]
            if predicted[i] != label or per_label.get(label, 0) >= config.synthetic_per_label:
                continue
            per_label[label] = per_label.get(label, 0) + 1
            samples.append(SyntheticSample(text=picked[i], label=label, release_id="rpsg"))
        return CellOutput(samples, perf=perf)

    # ---------------------------------------------------------------- scoring

    def canary_exposure(self, cell: Cell, generator: Generator) -> float:
        """Exposure of the seed's canary under the cell's released generator."""
        from fedsynth.server.generation import text_logprobs
        from fedsynth.simulations.text_metrics import exposure

        state = self.seed_state(cell.seed)
        label = state.canaries[0].label
        texts = [
            CANARY_TEXT.format(secret=s) for s in [state.canary_secret, *state.candidate_secrets]
        ]
        deltas = (generator.deltas_by_label or {}).get(label)
        model = generator.model or self.loaded
        scores = text_logprobs(model, generator.prompts[label], texts, deltas=deltas)
        return exposure(scores[0], scores[1:])

    def score(
        self,
        cell: Cell,
        samples: Sequence[SyntheticSample],
        *,
        members: Sequence[Record] | None = None,
    ) -> dict[str, float]:
        """The configured utility and privacy metrics of one cell's samples.

        ``members`` replaces the seed's attack members for a method that reads only some of
        the private records (non-members: as many held-out records).
        """
        from fedsynth.simulations import metrics as m
        from fedsynth.simulations import text_metrics as tm

        state = self.seed_state(cell.seed)
        texts = [s.text for s in samples]
        labels = [s.label for s in samples]
        test_texts = [r.text for r in state.test]
        wanted = set(self.config.metrics)
        out: dict[str, float] = {}
        if "tstr" in wanted:
            tstr = m.tstr_scores(texts, labels, test_texts, [r.label for r in state.test], seed=0)
            out["tstr_accuracy"] = tstr["accuracy"]
            out["tstr_macro_f1"] = tstr["macro_f1"]
        if "fidelity" in wanted:
            if state.classifier is None:
                state.classifier = m.train_text_classifier(
                    [r.text for r in state.train], [r.label for r in state.train], seed=0
                )
            out["label_fidelity"] = m.label_fidelity(state.classifier, texts, labels)
        if wanted & {"fid", "mauve", "mia"}:
            emb = self._embed(texts)
            if state.test_embeddings is None:
                state.test_embeddings = self._embed(test_texts)
            if "fid" in wanted:
                out["embedding_fd"] = m.frechet_distance(emb, state.test_embeddings)
            if "mauve" in wanted:
                out["mauve"] = tm.mauve_score(state.test_embeddings, emb, seed=cell.seed)
            if "mia" in wanted:
                if state.member_embeddings is None or state.non_member_embeddings is None:
                    state.member_embeddings = self._embed([r.text for r in state.members])
                    state.non_member_embeddings = self._embed([r.text for r in state.non_members])
                member_emb, non_member_emb = state.member_embeddings, state.non_member_embeddings
                if members is not None:
                    member_emb = self._embed([r.text for r in members])
                    non_member_emb = non_member_emb[: len(members)]
                out["mia_auc"] = tm.membership_auc(member_emb, non_member_emb, emb)
        if "self_bleu" in wanted:
            out["self_bleu"] = tm.self_bleu(texts, seed=cell.seed)
        if "distinct" in wanted:
            out["distinct_1"] = tm.distinct_n(texts, 1)
            out["distinct_2"] = tm.distinct_n(texts, 2)
        if "next_word" in wanted:
            out["next_word_accuracy"] = tm.next_word_accuracy(texts, test_texts)
        return out


REFUSALS = ("ConfigError", "PolicyViolationError", "BudgetExceededError", "TooFewParticipants")


def _federated_failure(what: str, errors: Sequence[str]) -> NoReturn:
    """Raise a refusal (a finished cell with its reason) or a crash (the cell reruns later)."""
    message = f"{what} failed: {'; '.join(errors) or 'no result'}"
    if any(e.startswith(REFUSALS) for e in errors):
        raise ConfigError(message)
    raise RuntimeError(message)


def effective_noise_multiplier(privacy: PrivacySpec, *, survivors: int, removed: int = 0) -> float:
    """Std of the noise in the released sum over the record's L2 sensitivity.

    The manifest's multiplier is what any t survivors guarantee; each surviving holder adds
    its share (:func:`noise_share_variance`: variance/t distributed, the whole variance local),
    the coordinator adds the whole variance in central mode. Under exact sharing each of the
    ``removed`` survivors whose excess was removed keeps only variance/survivors.
    """
    if privacy.total_variance == 0:
        return 0.0
    share = noise_share_variance(privacy)
    present = (
        removed * privacy.total_variance / survivors + (survivors - removed) * share
        or privacy.total_variance
    )
    return privacy.noise_multiplier * math.sqrt(present / privacy.total_variance)


def _slug(key: str) -> str:
    """A folder name for a cell key."""
    keep = [ch if ch.isalnum() or ch in "-.=" else "_" for ch in key]
    return "".join(keep)
