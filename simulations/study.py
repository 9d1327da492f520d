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
import hashlib
import importlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.client.data import Record
from fedsynth.client.policy import ClientPolicy
from fedsynth.protocol.errors import ConfigError, FedSynthError, TimeBudgetError
from fedsynth.protocol.features import extract_features
from fedsynth.protocol.models import LoadedModel, load_model
from fedsynth.server.coordinator import PublicReference, build_manifest, compute_public_reference
from fedsynth.server.synthesize import SyntheticSample
from fedsynth.simulations import scoring
from fedsynth.simulations.datasets import json_line
from fedsynth.simulations.demo import DemoConfig, check_text_length, task_config
from fedsynth.simulations.folder_lock import exclusive_folder
from fedsynth.simulations.methods import CellOutput, SeedState, runner_for
from fedsynth.simulations.noise_check import NoiseCheck
from fedsynth.simulations.partitions import partition_stats
from fedsynth.simulations.scoring import CANARY_TEXT
from fedsynth.simulations.splits import holder_partitions, split_records
from fedsynth.simulations.study_config import (
    METHODS,
    METRIC_COLUMNS,
    SECTION_METHODS,
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

NOISE_COLUMNS = ("key", "release", "ratio", "low", "high", "coordinates", "verdict")
# Status prefix of a cell whose release failed the realized-noise check: its row is kept (and
# shown in the report) but the cell counts as unfinished, so the next run measures it again.
INVALID = "invalid"

Progress = Callable[[str], None]


SOURCE_PACKAGES = ("client", "protocol", "server", "simulations")


def source_fingerprint() -> str:
    """SHA-256 over the Python source of every fedsynth package this process would import.

    A study's holders run in fresh processes for every cell and import fedsynth anew, while
    the coordinator's process keeps the code it started with; if the source changes under a
    running study (an editable install being worked on), the two sides can follow different
    protocols. The runner compares this before and after each cell and stops when it moved.
    """
    digest = hashlib.sha256()
    for name in SOURCE_PACKAGES:
        module = importlib.import_module(f"fedsynth.{name}")
        for folder in sorted(str(p) for p in module.__path__):
            for path in sorted(Path(folder).rglob("*.py")):
                digest.update(str(path.relative_to(folder)).encode() + b"\0")
                digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


class SourceChangedError(FedSynthError):
    """fedsynth's source changed while a study ran: restart it so every process agrees."""


# --------------------------------------------------------------------------- folder


def open_results_folder(
    config: StudyConfig, out_dir: Path, *, rerun_changed: bool = False
) -> set[str]:
    """Create or check the study folder; return the keys of cells already finished.

    Refuses (before any compute) a folder written by another study format or with other
    settings that every cell reads, since its rows would not be comparable with new ones. A
    change to a section only some methods read (``[pe]``, ``[dp_training]``, ``[baselines]``)
    makes only those methods' rows stale: refused too, unless ``rerun_changed``, which drops
    those rows (and their cell folders) so that they run again.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "study.json"
    parts = config.fingerprints()
    meta: dict[str, Any] = {
        "format": STUDY_FORMAT,
        "fingerprint": config.fingerprint(),
        "fingerprints": parts,
        "name": config.name,
    }
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
        old_parts = old.get("fingerprints")
        if not isinstance(old_parts, dict):  # written before per-section fingerprints
            if old.get("fingerprint") != meta["fingerprint"]:
                raise _other_settings(out_dir)
        elif old_parts.get("common") != parts["common"]:
            raise _other_settings(out_dir)
        else:
            # A section the folder's study.json does not name is older than it: the folder's
            # rows were made with that section's defaults.
            defaults = StudyConfig(name="", sweeps=()).fingerprints()
            changed = [
                name
                for name in SECTION_METHODS
                if old_parts.get(name, defaults[name]) != parts[name]
            ]
            _drop_stale_rows(out_dir, changed, rerun_changed=rerun_changed)
        if old != meta:
            meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    else:
        if (out_dir / "results.csv").exists():
            raise ConfigError(
                f"{out_dir} holds a results.csv but no study.json: not a fedsynth study folder "
                "(nothing was changed); use a new results folder"
            )
        meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return {
        row["key"]
        for row in read_results(out_dir)
        if row["status"] != "" and not row["status"].startswith(INVALID)
    }


def _other_settings(out_dir: Path) -> ConfigError:
    return ConfigError(
        f"{out_dir} holds results made with other fixed settings (model, data sizes, layers, "
        "...); its rows would not be comparable. Use a new results folder, or change only the "
        "sweeps, seeds, metrics and the method sections ([pe], [dp_training], [baselines])."
    )


def _drop_stale_rows(out_dir: Path, changed: Sequence[str], *, rerun_changed: bool) -> None:
    """Refuse, or with ``rerun_changed`` remove, the rows made under a changed method section.

    The cell folders of those methods go too, finished or not: an interrupted PE cell's
    checkpoint belongs to the old settings and would refuse to resume under the new ones.
    """
    methods = {m for name in changed for m in SECTION_METHODS[name]}
    rows = read_results(out_dir)
    stale = [r for r in rows if r["method"] in methods]
    sections = ", ".join(f"[{name}]" for name in changed)
    if stale and not rerun_changed:
        raise ConfigError(
            f"{sections} changed since {len(stale)} rows of {sorted({r['method'] for r in stale})} "
            f"in {out_dir} were made; pass --rerun-changed to drop those rows and run them "
            "again (the other rows are kept), or restore the old settings."
        )
    if stale:
        _rewrite_results(out_dir / "results.csv", [r for r in rows if r["method"] not in methods])
        log.warning("%s changed: dropped %d rows, which will run again", sections, len(stale))
    cells = out_dir / "cells"
    # A cell folder is the slug of its key, which starts with "<method>|".
    for folder in cells.iterdir() if cells.is_dir() else ():
        if folder.name.split("_", 1)[0] in methods:
            shutil.rmtree(folder, ignore_errors=True)


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
    _rewrite_results(path, rows)
    return [{c: row.get(c, "") for c in RESULT_COLUMNS} for row in rows]


def _rewrite_results(path: Path, rows: Sequence[Mapping[str, str]]) -> None:
    """Replace results.csv atomically by ``rows`` under the current header."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def append_result(out_dir: Path, row: Mapping[str, Any]) -> None:
    """Append one row and flush it to disk (a crash after this keeps the cell).

    A row of the same key (an invalid run of the cell, now run again) is replaced in place.
    """
    path = out_dir / "results.csv"
    if path.exists():
        rows = read_results(out_dir)
        if any(r["key"] == row["key"] for r in rows):
            text = {c: _cell_text(row.get(c)) for c in RESULT_COLUMNS}
            _rewrite_results(path, [text if r["key"] == row["key"] else r for r in rows])
            return
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
    """Runs the cells of a study that are not finished yet and writes the report.

    It is the methods' :class:`~fedsynth.simulations.methods.StudyContext`: the model, the public
    reference and each seed's split and evaluators are computed once and shared by every cell.
    """

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
            out_dir=self.cell_dir(cell),
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
            shots=d.shots,
            variants=d.variants,
            top_p=d.top_p,
            denoise=self.config.steering.denoise,
            min_signal_share=self.config.steering.min_signal_share,
            colluders=d.colluders,
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
        """Data split and evaluators of one seed (computed once; the demo's split)."""
        if seed not in self._seeds:
            from fedsynth.simulations.datasets import load_corpus

            d = self.config.data
            split = split_records(
                load_corpus(self.config.corpus).records,
                private_per_label=d.private_per_label,
                test_per_label=d.test_per_label,
                seed=seed,
            )
            train, test = split.train, split.test
            rng = np.random.default_rng(seed + 7)
            n = min(d.mia_members, len(train), len(test))
            members = [train[int(i)] for i in rng.permutation(len(train))[:n]]
            non_members = [test[int(i)] for i in rng.permutation(len(test))[:n]]
            state = SeedState(train, test, members, non_members, judge=split.judge)
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

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Sentence embeddings of ``texts`` by the metrics' embedder."""
        from fedsynth.simulations.metrics import embed_texts

        return embed_texts(self.embedder, list(texts))

    def cell_dir(self, cell: Cell) -> Path:
        """The folder of one cell's files (samples, holder files while it runs, releases)."""
        return self.out_dir / "cells" / _slug(cell.key)

    def holder_policy(self) -> ClientPolicy:
        """The simulated holders accept every ε and trust mode the study sweeps.

        Real holders set their own terms, central mode only where they list it.
        """
        finite = [c.epsilon for c in self.config.cells() if math.isfinite(c.epsilon)]
        largest = max([8.0, *finite])
        return ClientPolicy(
            max_epsilon_per_task=largest,
            max_total_epsilon=largest * 1000,
            allow_non_private=True,
            allowed_modes=("distributed", "central", "local"),
        )

    # ---------------------------------------------------------------- running

    def run(self, *, over_budget_ok: bool = False) -> list[dict[str, str]]:
        """Run every unfinished cell, then write report.md and the plots; return all rows.

        With the config's ``time_budget_minutes``, the time the unfinished cells will take is
        estimated from the cells measured so far (the finished ones, else the first cell run
        now, whose row is kept); above the budget the run stops with
        :class:`TimeBudgetError` unless ``over_budget_ok``. A second run on the same folder
        is refused while this one holds it (:mod:`.folder_lock`).
        """
        with exclusive_folder(self.out_dir, "fedsynth simulate"):
            return self._run(over_budget_ok=over_budget_ok)

    def _run(self, *, over_budget_ok: bool) -> list[dict[str, str]]:
        finished = open_results_folder(self.config, self.out_dir)
        cells = self.config.cells()
        todo = [c for c in cells if c.key not in finished]
        self.progress(f"{len(cells)} cells, {len(cells) - len(todo)} already finished")
        measured = [
            float(r["cell_seconds"])
            for r in read_results(self.out_dir)
            if r["key"] in finished and r.get("cell_seconds")
        ]
        if todo:  # prompts, shots, variants and lengths are the study's, not a cell's
            check_text_length(self.demo_config(todo[0]), self.loaded)
        judged = over_budget_ok or self.config.time_budget_minutes is None
        source = source_fingerprint()
        for i, cell in enumerate(todo, start=1):
            if not judged and measured:
                check_time_budget(self.config, measured, remaining=len(todo) - i + 1)
                judged = True
            self.progress(f"[{i}/{len(todo)}] {cell.key}")
            row = self.run_cell(cell)
            if source_fingerprint() != source:
                row["status"] = f"{INVALID}: fedsynth's source changed while the cell ran"
                append_result(self.out_dir, row)
                raise SourceChangedError(
                    "fedsynth's source changed while the study ran, so this cell's holders and "
                    "coordinator may have run different code; its row is marked invalid. Run "
                    "the same command again: the study resumes, repeating that cell."
                )
            append_result(self.out_dir, row)
            measured.append(float(row["cell_seconds"]))
        self.run_audits(cells)
        return self.report()

    def report(self) -> list[dict[str, str]]:
        """Write report.md and the plots from the rows finished so far; return the rows.

        Runs no cell and no audit, so a study that spans several sittings can be read (and a
        partial table published, its seed counts shown) before it is complete.
        """
        open_results_folder(self.config, self.out_dir)
        rows = read_results(self.out_dir)
        self.fill_holder_tables(self.config.cells())
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
            features = self.pooled_features(state, manifest)
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

    def pooled_features(self, state: SeedState, manifest: Any) -> np.ndarray:
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
        parts = holder_partitions(state.train, cell.partition, clients=cell.clients, seed=cell.seed)
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
        for stale in self.cell_dir(cell).glob("release-*.safetensors"):  # an earlier run's
            stale.unlink()
        try:
            output = runner_for(cell.method)(self, cell)
        except FedSynthError as exc:  # a refusal (ε too small for PE, ...) is a result too
            log.warning("cell %s refused: %s", cell.key, exc)
            output = CellOutput(samples=[], status=f"refused: {exc}")
        row: dict[str, Any] = {"key": cell.key, **dataclasses.asdict(cell)}
        row["status"] = output.status
        failed = self.record_noise_checks(cell)
        if failed:
            row["status"] = failed
        row["n_synthetic"] = len(output.samples)
        if output.samples and not failed:
            row.update(scoring.score(self, cell, output.samples, members=output.members))
            if "canary" in self.config.metrics and output.generator is not None:
                row["canary_exposure"] = scoring.canary_exposure(self, cell, output.generator)
        perf = dict(output.perf)
        reused = perf.pop("reused_seconds", 0.0)  # client time reported, not spent in this cell
        row.update(perf)
        row["cell_seconds"] = time.monotonic() - start
        if "coordinator_seconds" not in row:
            row["coordinator_seconds"] = (
                row["cell_seconds"]
                - perf.get("client_seconds", 0.0)
                + reused
                - perf.get("generation_seconds", 0.0)
            )
        self._write_samples(cell, output.samples)
        return row

    def noise_checks(self, cell: Cell) -> list[tuple[str, NoiseCheck]]:
        """The realized-noise check of every release the cell kept (:mod:`.noise_check`).

        Needs every record in the release: the seed's pooled records, or in a dropout cell
        those of the surviving holders (the simulation drops the last ``dropped_clients``
        partitions before their masked input, so theirs are not in the sum). Skipped for
        releases without noise and where the release names another number of dropouts.
        """
        from fedsynth.server.release import load_release
        from fedsynth.simulations.noise_check import realized_noise

        state = self.seed_state(cell.seed)
        survivors = list(range(len(state.pooled)))
        if cell.dropped_clients:
            index = {id(record): i for i, record in enumerate(state.pooled)}
            kept = self.partitions(cell)[: cell.clients - cell.dropped_clients]
            survivors = [index[id(record)] for part in kept for record in part]
        checks = []
        for path in sorted(self.cell_dir(cell).glob("release-*.safetensors")):
            release = load_release(path)
            if not release.manifest.privacy.total_variance:
                continue
            if len(release.report.get("dropped_clients", [])) != cell.dropped_clients:
                log.warning(
                    "cell %s: %s names another number of dropouts, noise not checked",
                    cell.key,
                    path.name,
                )
                continue
            reference = self.reference_of(cell, release.manifest.reference_sha256)
            if reference is None:
                log.warning(
                    "cell %s: %s: public reference not found, noise not checked",
                    cell.key,
                    path.name,
                )
                continue
            check = realized_noise(
                release,
                self.pooled_features(state, release.manifest)[survivors],
                [state.pooled[i].label for i in survivors],
                reference=reference,
            )
            if check is not None:
                checks.append((path.name, check))
        return checks

    def reference_of(self, cell: Cell, sha256: str) -> np.ndarray | None:
        """The public reference a release of ``cell`` was made with, found by its hash.

        The study's own, or the one a cell computes for itself (pe-steered's vector half
        uses the cell's seed); None where neither matches.
        """
        from fedsynth.protocol.manifest import array_sha256

        if array_sha256(self.reference.means) == sha256:
            return self.reference.means
        own = compute_public_reference(self.loaded, task_config(self.demo_config(cell), 1.0))
        return own.means if array_sha256(own.means) == sha256 else None

    def record_noise_checks(self, cell: Cell) -> str:
        """Check the cell's releases, append them to noise.csv; the invalid status, or ""."""
        checks = self.noise_checks(cell)
        if not checks:
            return ""
        path = self.out_dir / "noise.csv"
        new = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(NOISE_COLUMNS)
            for name, check in checks:
                writer.writerow(
                    [
                        cell.key,
                        name,
                        f"{check.ratio:.6g}",
                        f"{check.low:.6g}",
                        f"{check.high:.6g}",
                        check.coordinates,
                        check.verdict,
                    ]
                )
        failed = [f"{name}: {check.describe()}" for name, check in checks if not check.ok]
        for line in failed:
            log.warning("cell %s: %s", cell.key, line)
        return f"{INVALID}: " + "; ".join(failed) if failed else ""

    def check_stored_noise(self) -> list[str]:
        """Check the kept releases of the finished cells not yet in noise.csv.

        A cell whose release fails gets the invalid status (its row stays, the next run
        measures the cell again). Returns the keys of those cells.
        """
        with exclusive_folder(self.out_dir, "fedsynth simulate"):
            return self._check_stored_noise()

    def _check_stored_noise(self) -> list[str]:
        open_results_folder(self.config, self.out_dir)
        rows = read_results(self.out_dir)
        done = set()
        path = self.out_dir / "noise.csv"
        if path.exists():
            with path.open(newline="", encoding="utf-8") as handle:
                done = {r["key"] for r in csv.DictReader(handle)}
        cells = {c.key: c for c in self.config.cells()}
        invalid = []
        for row in rows:
            cell = cells.get(row["key"])
            if cell is None or row["key"] in done or row["status"] != "ok":
                continue
            if not any(self.cell_dir(cell).glob("release-*.safetensors")):
                continue
            self.progress(f"noise check: {cell.key}")
            status = self.record_noise_checks(cell)
            if status:
                row["status"] = status
                invalid.append(cell.key)
        if invalid:
            _rewrite_results(self.out_dir / "results.csv", rows)
        return invalid

    def _write_samples(self, cell: Cell, samples: Sequence[SyntheticSample]) -> None:
        folder = self.cell_dir(cell)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "synthetic.jsonl").open("w", encoding="utf-8") as handle:
            for s in samples:
                handle.write(json_line(dataclasses.asdict(s)) + "\n")


def _slug(key: str) -> str:
    """A folder name for a cell key."""
    keep = [ch if ch.isalnum() or ch in "-.=" else "_" for ch in key]
    return "".join(keep)
