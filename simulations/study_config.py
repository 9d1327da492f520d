"""Study configuration: a TOML file naming the data, the methods and the sweeps to run.

Everything is checked here, before any model is loaded, so a typo costs seconds rather than a
night of compute. A study is a union of sweeps; each sweep is a grid over methods × ε × K ×
partition × trust mode × dropout rate, and the study repeats every cell for each seed.

Example (see ``studies/small.toml``)::

    name = "small"
    seeds = [0, 1]
    corpus = "rotten_tomatoes"
    metrics = ["tstr", "fid", "mia"]

    [data]
    private_per_label = 150

    [[sweep]]
    name = "privacy"
    methods = ["prior", "vector", "vector-pooled"]
    epsilons = [1.0, 4.0]
    clients = [3]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.mechanisms import TrustMode
from fedsynth.protocol.secagg import min_safe_threshold
from fedsynth.server.snr import DEFAULT_MIN_SIGNAL_SHARE, check_min_signal_share
from fedsynth.simulations.datasets import available_corpora
from fedsynth.simulations.partitions import PartitionSpec

STUDY_FORMAT = 2  # 2: the fidelity judge trains on real texts outside the split (as the demo)
POOLED_CLIENTS = 1  # the K column of methods that use the pooled data (no holders)


@dataclass(frozen=True)
class MethodInfo:
    """A method the study runner knows, with the guarantee it really gives."""

    name: str
    guarantee: str
    uses_epsilon: bool  # one cell per ε of the sweep (else a single cell at its fixed ε)
    fixed_epsilon: float | None = None
    federated: bool = False  # runs through Flower's simulation (trust modes, dropouts apply)
    formal_dp: bool = False  # a record-level (ε, δ)-DP guarantee at the row's ε
    fixed_mode: str | None = None  # the trust mode column when the sweep's modes do not apply
    dropouts: bool = False  # whether the sweep's dropout rates apply


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo(
            "prior",
            "ε = 0: the release generator at strength 0 (class template, the same seeds and "
            "own shot pools; no private data touched); the floor",
            formal_dp=True,
            uses_epsilon=False,
            fixed_epsilon=0.0,
        ),
        MethodInfo(
            "vector",
            "(ε, δ)-DP per record: federated dataset vector, secure sum; trust as in the mode "
            "column (central: coordinator sees the exact sum; distributed: t-of-K honest "
            "holders; local: each holder's sum is DP on its own)",
            formal_dp=True,
            dropouts=True,
            uses_epsilon=True,
            federated=True,
        ),
        MethodInfo(
            "vector-pooled",
            "(ε, δ)-DP per record: central EPSVec on the pooled data; trusts one curator with "
            "every holder's raw records",
            formal_dp=True,
            fixed_mode="central",
            uses_epsilon=True,
        ),
        MethodInfo(
            "vector-nonprivate",
            "no privacy (ε = ∞): exact dataset vector of the pooled data; the ceiling",
            uses_epsilon=False,
            fixed_epsilon=math.inf,
        ),
        MethodInfo(
            "pe",
            "(ε, δ)-DP per record over all rounds: federated Private Evolution, secure sum of "
            "vote histograms; trust as in the mode column",
            formal_dp=True,
            dropouts=True,
            uses_epsilon=True,
            federated=True,
        ),
        MethodInfo(
            "pe-steered",
            "(ε, δ)-DP per record, basic composition: a federated dataset-vector release "
            "([pe] init_fraction of ε, δ/2) steers the first population and every variation, "
            "then federated PE spends the rest; trust as in the mode column",
            formal_dp=True,
            dropouts=True,
            uses_epsilon=True,
            federated=True,
        ),
        MethodInfo(
            "dp-sgd",
            "(ε, δ)-DP per record: LoRA adapters (q/v projections) fine-tuned with DP-SGD "
            "(Opacus, RDP accountant, Poisson sampling) on the pooled data, then sampling; "
            "trusts one curator with every holder's raw records",
            formal_dp=True,
            fixed_mode="central",
            uses_epsilon=True,
        ),
        MethodInfo(
            "dp-fedavg",
            "(ε, δ)-DP per record: each holder fine-tunes the LoRA adapters with DP-SGD "
            "(Opacus) on its own data for all rounds, the server averages them (Flower); "
            "parallel composition across holders",
            formal_dp=True,
            fixed_mode="local",
            uses_epsilon=True,
            federated=True,
        ),
        MethodInfo(
            "rpsg",
            "NOT record-level DP: RPSG-style private seeds rewritten by the model; ε (classic "
            "Gaussian, at any ε) covers only which candidate of a seed is kept, every output "
            "derives from one private record; cosine and NLL filters are empirical defences",
            uses_epsilon=True,
        ),
        MethodInfo(
            "noisy-icl",
            "NOT record-level DP: SafeSynthDP-style in-context examples whose token embeddings "
            "are clipped and noised; ε is per token embedding (a record of n tokens shown m "
            "times gets n·m·ε); noise kind in [baselines] icl_noise",
            uses_epsilon=True,
        ),
        MethodInfo(
            "icl-verbatim",
            "NOT private (ε = ∞): private records quoted verbatim as in-context examples and "
            "each sample starts with half of one of them; a deliberately leaky control that "
            "shows the attacks have power (its attack members: the records it quoted)",
            uses_epsilon=False,
            fixed_epsilon=math.inf,
        ),
    )
}

METRICS: dict[str, str] = {
    "tstr": "train on synthetic, test on real held-out data: accuracy and macro-F1",
    "fidelity": "share of samples a classifier trained on real data gives the intended label",
    "fid": "Fréchet distance of sentence embeddings to held-out real text (lower is better)",
    "mauve": "MAUVE (mauve-text) on sentence embeddings against held-out real text",
    "self_bleu": "Self-BLEU (sacrebleu) among synthetic samples (lower = more diverse)",
    "distinct": "distinct-1 and distinct-2 over all synthetic samples",
    "next_word": "next-word accuracy on real text of a bigram model trained on the synthetic",
    "mia": "membership inference AUC, nearest-synthetic embedding similarity attack",
    "canary": "exposure of a canary inserted [data] canaries times into one holder's data, "
    "ranked by the released generator's likelihood against other secrets",
}

METRIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "tstr": ("tstr_accuracy", "tstr_macro_f1"),
    "fidelity": ("label_fidelity",),
    "fid": ("embedding_fd",),
    "mauve": ("mauve",),
    "self_bleu": ("self_bleu",),
    "distinct": ("distinct_1", "distinct_2"),
    "next_word": ("next_word_accuracy",),
    "mia": ("mia_auc",),
    "canary": ("canary_exposure",),
}

DEFAULT_METRICS = ("tstr", "fidelity", "fid", "mauve", "self_bleu", "distinct", "next_word", "mia")


@dataclass(frozen=True)
class DataSettings:
    """Sizes shared by every cell (per label)."""

    private_per_label: int = 150
    test_per_label: int = 150
    synthetic_per_label: int = 32
    mia_members: int = 100
    max_new_tokens: int = 40
    strength: float = 0.03
    generation_batch: int = 32
    shots: int = 0  # own samples shown per sample (0: the plain prompt; the demo's default is 1)
    top_p: float = 0.95  # nucleus sampling of every generation (1: the whole distribution)
    audit_runs: int = 200  # releases per side of the empirical ε audit (0: no audit)
    canaries: int = 0  # copies of one canary record in the first holder's data (0: none)
    canary_candidates: int = 200  # other secrets the canary is ranked against
    colluders: int = 0  # holders assumed to side with the coordinator (noise and t sized for them)
    # Public instruction variants, one drawn per prompt, as `fedsynth demo --variant` (the
    # dataset-vector methods, the prior and the fine-tuned models; PE, RPSG and ICL keep their
    # own prompts). Empty: the template's instruction.
    variants: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from fedsynth.server.synthesize import check_variants

        check_variants(self.variants)


@dataclass(frozen=True)
class PESettings:
    """Federated PE settings used by ``pe`` cells."""

    rounds: int = 2
    population: int = 16
    output: int | None = None  # final population per label (default: population); free
    top_k: int = 1
    init_fraction: float = 0.5  # pe-steered: share of ε for the steering vector release


@dataclass(frozen=True)
class BaselineSettings:
    """Settings of the comparison baselines (RPSG-style, noisy and verbatim ICL)."""

    icl_shots: int = 3
    icl_noise: str = "gaussian"  # "gaussian" (L2 clip) or "laplace" (L1 clip)
    rpsg_candidates: int = 2  # model rewrites per private seed
    rpsg_seed_factor: int = 2  # seeds drawn per wanted sample (the filters drop some)


@dataclass(frozen=True)
class SteeringSettings:
    """How samples are generated from a dataset-vector release (post-processing only)."""

    # Project each class direction onto the public basis where the release's SNR says that is
    # closer to the noise-free direction (fedsynth.server.public_basis). Opt-in, as in the demo
    # and `generate`: measured, it trades label fidelity for fluency (README, "Denoising").
    denoise: bool = False
    # Switch off a layer whose estimated signal share (factor^2) is below this
    # (fedsynth.server.snr); 0 is the plain shrink rule.
    min_signal_share: float = DEFAULT_MIN_SIGNAL_SHARE

    def __post_init__(self) -> None:
        check_min_signal_share(self.min_signal_share)


@dataclass(frozen=True)
class DPTrainingSettings:
    """DP fine-tuning baselines (dp-sgd pooled, dp-fedavg per holder)."""

    epochs: int = 1  # passes over the data (per round for dp-fedavg)
    batch_size: int = 16
    learning_rate: float = 0.002
    max_grad_norm: float = 1.0
    lora_rank: int = 4
    max_tokens: int = 48
    rounds: int = 2  # dp-fedavg rounds


@dataclass(frozen=True)
class Sweep:
    """One grid of cells; the study is the union of its sweeps (duplicates run once)."""

    name: str
    methods: tuple[str, ...]
    epsilons: tuple[float, ...] = (4.0,)
    clients: tuple[int, ...] = (3,)
    partitions: tuple[PartitionSpec, ...] = (PartitionSpec("iid"),)
    modes: tuple[str, ...] = ("distributed",)
    dropouts: tuple[float, ...] = (0.0,)


@dataclass(frozen=True)
class Cell:
    """One row of results.csv."""

    method: str
    mode: str
    epsilon: float
    clients: int
    partition: str
    dropout: float
    seed: int

    @property
    def key(self) -> str:
        """Stable identity used for resuming (finished keys are skipped)."""
        eps = "inf" if math.isinf(self.epsilon) else f"{self.epsilon:g}"
        return (
            f"{self.method}|{self.mode}|eps={eps}|K={self.clients}|{self.partition}|"
            f"drop={self.dropout:g}|seed={self.seed}"
        )

    @property
    def dropped_clients(self) -> int:
        """Holders that go offline after key sharing in this cell."""
        return round(self.dropout * self.clients)


@dataclass(frozen=True)
class StudyConfig:
    """A whole study: fixed settings, sweeps and seeds."""

    name: str
    sweeps: tuple[Sweep, ...]
    seeds: tuple[int, ...] = (0,)
    corpus: str = "rotten_tomatoes"
    model: str = "gemma3-270m"
    layers: tuple[int, ...] = (8, 9, 10, 11)
    embedder: str = "all-minilm-l6-v2"
    delta: float = 1e-5
    metrics: tuple[str, ...] = DEFAULT_METRICS
    plot_metric: str = "tstr_accuracy"  # the utility column of the plots and comparisons
    time_budget_minutes: float | None = None  # above it (estimated), a run needs --yes
    data: DataSettings = field(default_factory=DataSettings)
    pe: PESettings = field(default_factory=PESettings)
    baselines: BaselineSettings = field(default_factory=BaselineSettings)
    dp_training: DPTrainingSettings = field(default_factory=DPTrainingSettings)
    steering: SteeringSettings = field(default_factory=SteeringSettings)

    def cells(self) -> list[Cell]:
        """Every cell of every sweep, each once, in a stable order (seed-major)."""
        seen: dict[str, Cell] = {}
        for seed in self.seeds:
            for sweep in self.sweeps:
                for cell in _sweep_cells(sweep, seed):
                    seen.setdefault(cell.key, cell)
        return list(seen.values())

    def fingerprint(self) -> str:
        """Hash of the settings that change what a cell computes (not the grid itself).

        Only values that differ from their defaults enter the hash, so a newer fedsynth that
        adds a setting (whose default keeps the old behaviour) still opens older results.
        """
        return _hash(self._fixed())

    def fingerprints(self) -> dict[str, str]:
        """``common`` (what every cell reads) and one hash per method-specific section.

        A change to ``[pe]`` changes only what PE cells compute, so only their rows go stale
        (see :data:`SECTION_METHODS`); the other rows stay comparable.
        """
        fixed = self._fixed()
        sections = {name: fixed.pop(name, {}) for name in SECTION_METHODS}
        return {"common": _hash(fixed), **{name: _hash(v) for name, v in sections.items()}}

    def _fixed(self) -> dict[str, Any]:
        fixed = _non_default(self, StudyConfig(name="", sweeps=()))
        for name in ("name", "sweeps", "seeds", "metrics", "plot_metric", "time_budget_minutes"):
            fixed.pop(name, None)
        return fixed


# Settings sections that only some methods read: changing one re-runs only those methods' cells.
SECTION_METHODS: dict[str, tuple[str, ...]] = {
    "pe": ("pe", "pe-steered"),
    "dp_training": ("dp-sgd", "dp-fedavg"),
    "baselines": ("rpsg", "noisy-icl", "icl-verbatim"),
    "steering": ("vector", "vector-pooled", "vector-nonprivate", "pe-steered"),
}


def _hash(fixed: Mapping[str, Any]) -> str:
    text = json.dumps(fixed, sort_keys=True, default=str)
    return hashlib.sha256(f"{STUDY_FORMAT}:{text}".encode()).hexdigest()[:16]


def _non_default(value: Any, default: Any) -> dict[str, Any]:
    """The fields of a dataclass that differ from ``default`` (nested dataclasses recursed)."""
    out: dict[str, Any] = {}
    for f in fields(value):
        mine, theirs = getattr(value, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(mine) and not isinstance(mine, type):
            nested = _non_default(mine, theirs)
            if nested:
                out[f.name] = nested
        elif mine != theirs:
            out[f.name] = mine
    return out


def _sweep_cells(sweep: Sweep, seed: int) -> Iterable[Cell]:
    for method in sweep.methods:
        info = METHODS[method]
        epsilons = sweep.epsilons if info.uses_epsilon else (info.fixed_epsilon or 0.0,)
        if info.fixed_mode is not None:
            modes: tuple[str, ...] = (info.fixed_mode,)
        elif info.federated:
            modes = sweep.modes
        else:
            modes = ("none",)
        dropouts = sweep.dropouts if info.dropouts else (0.0,)
        # Methods that never split the data see the pooled set: one cell, not one per K.
        clients = sweep.clients if info.federated else (POOLED_CLIENTS,)
        partitions = sweep.partitions if info.federated else (None,)
        for epsilon in epsilons:
            for k in clients:
                for spec in partitions:
                    partition = spec.name if spec is not None else "pooled"
                    for mode in modes:
                        for dropout in dropouts:
                            yield Cell(method, mode, epsilon, k, partition, dropout, seed)


# --------------------------------------------------------------------------- parsing


def _keys(table: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _int(value: Any, where: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    return float(value)


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list, got {value!r}")
    return value


def _epsilon(value: Any, where: str) -> float:
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity"):
        return math.inf
    eps = _number(value, where)
    if not eps > 0:
        raise ConfigError(f"{where}: ε must be > 0 (use method 'prior' for ε = 0), got {value!r}")
    return eps


def _parse_sweep(raw: Any, index: int) -> Sweep:
    where = f"sweep {index + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table ([[sweep]])")
    _keys(raw, [f.name for f in fields(Sweep)], where)
    name = str(raw.get("name", f"sweep-{index + 1}"))
    where = f"sweep {name!r}"
    methods = tuple(str(m) for m in _list(raw.get("methods"), f"{where}: methods"))
    for method in methods:
        if method not in METHODS:
            raise ConfigError(
                f"{where}: method {method!r} is unknown; known methods are {list(METHODS)}"
            )
    epsilons = tuple(
        _epsilon(e, f"{where}: epsilons") for e in _list(raw.get("epsilons", [4.0]), where)
    )
    clients = tuple(
        _int(k, f"{where}: clients", minimum=2) for k in _list(raw.get("clients", [3]), where)
    )
    partitions = tuple(PartitionSpec.parse(p) for p in _list(raw.get("partitions", ["iid"]), where))
    modes = tuple(str(m) for m in _list(raw.get("modes", ["distributed"]), where))
    known_modes = [m.value for m in TrustMode]
    for mode in modes:
        if mode not in known_modes:
            raise ConfigError(f"{where}: trust mode {mode!r} is unknown; expected {known_modes}")
    dropouts = tuple(
        _number(d, f"{where}: dropouts") for d in _list(raw.get("dropouts", [0]), where)
    )
    for rate in dropouts:
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"{where}: a dropout rate must be in [0, 1), got {rate!r}")
    for k in clients:
        for rate in dropouts:
            survivors = k - round(rate * k)
            needed = min_safe_threshold(k)
            if survivors < needed:
                raise ConfigError(
                    f"{where}: dropout {rate:g} at K={k} leaves {survivors} holders, below the "
                    f"secure sum's threshold t={needed}"
                )
    return Sweep(name, methods, epsilons, clients, partitions, modes, dropouts)


_OPTIONAL_INTS = ("output",)  # integer settings whose default (None) means "as another one"


def _parse_table(cls: type[Any], raw: Any, where: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"[{where}] must be a table")
    _keys(raw, [f.name for f in fields(cls)], f"[{where}]")
    values: dict[str, Any] = {}
    defaults = cls()
    for key, value in raw.items():
        default = getattr(defaults, key)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"[{where}] {key} must be true or false, got {value!r}")
            values[key] = value
        elif isinstance(default, tuple):  # a list of strings
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"[{where}] {key} must be a list of strings, got {value!r}")
            values[key] = tuple(value)
        elif isinstance(default, str):
            if key == "icl_noise" and value not in ("gaussian", "laplace"):
                raise ConfigError(f"[{where}] icl_noise must be 'gaussian' or 'laplace'")
            values[key] = str(value)
        elif isinstance(default, int) or key in _OPTIONAL_INTS:
            may_be_zero = key in ("audit_runs", "canaries", "shots", "colluders")
            values[key] = _int(value, f"[{where}] {key}", minimum=0 if may_be_zero else 1)
        else:
            values[key] = _number(value, f"[{where}] {key}")
            if key == "min_signal_share":
                continue  # its range is the setting's own check (SteeringSettings)
            if not values[key] > 0:
                raise ConfigError(f"[{where}] {key} must be > 0, got {value!r}")
            if key == "init_fraction" and not values[key] < 1:
                raise ConfigError(f"[{where}] init_fraction must be < 1, got {value!r}")
    try:
        return cls(**values)
    except ConfigError as err:  # a setting's own check (__post_init__) names the value
        raise ConfigError(f"[{where}] {err}") from err


def parse_study(raw: Mapping[str, Any], *, source: str = "config") -> StudyConfig:
    """Validate a parsed TOML document and build the study (every error names its place)."""
    top = [f.name for f in fields(StudyConfig) if f.name != "sweeps"] + ["sweep", "format"]
    _keys(raw, top, source)
    fmt = raw.get("format", STUDY_FORMAT)
    if fmt != STUDY_FORMAT:
        raise ConfigError(f"{source}: format = {fmt!r}; this fedsynth reads format {STUDY_FORMAT}")
    sweeps_raw = raw.get("sweep")
    if not isinstance(sweeps_raw, list) or not sweeps_raw:
        raise ConfigError(f"{source}: at least one [[sweep]] table is needed")
    sweeps = tuple(_parse_sweep(s, i) for i, s in enumerate(sweeps_raw))
    seeds = tuple(_int(s, "seeds", minimum=0) for s in _list(raw.get("seeds", [0]), "seeds"))
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds repeat: {list(seeds)}")
    corpus = str(raw.get("corpus", "rotten_tomatoes"))
    if corpus not in available_corpora():
        raise ConfigError(f"corpus {corpus!r} is unknown; known corpora are {available_corpora()}")
    metrics = tuple(str(m) for m in _list(raw.get("metrics", list(DEFAULT_METRICS)), "metrics"))
    for metric in metrics:
        if metric not in METRICS:
            raise ConfigError(f"metric {metric!r} is unknown; known metrics are {list(METRICS)}")
    plot_metric = str(raw.get("plot_metric", "tstr_accuracy"))
    produced = {c: m for m, cols in METRIC_COLUMNS.items() for c in cols}
    if produced.get(plot_metric) not in metrics:
        raise ConfigError(
            f"plot_metric {plot_metric!r} is not a column of the configured metrics; choose one "
            f"of {sorted(c for c, m in produced.items() if m in metrics)}"
        )
    layers = tuple(
        _int(x, "layers", minimum=0) for x in _list(raw.get("layers", [8, 9, 10, 11]), "layers")
    )
    delta = _number(raw.get("delta", 1e-5), "delta")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    budget = raw.get("time_budget_minutes")
    if budget is not None:
        budget = _number(budget, "time_budget_minutes")
        if not (math.isfinite(budget) and budget > 0):
            raise ConfigError(f"time_budget_minutes must be a number > 0, got {budget!r}")
    config = StudyConfig(
        name=str(raw.get("name", "study")),
        sweeps=sweeps,
        seeds=seeds,
        corpus=corpus,
        model=str(raw.get("model", "gemma3-270m")),
        layers=layers,
        embedder=str(raw.get("embedder", "all-minilm-l6-v2")),
        delta=delta,
        metrics=metrics,
        plot_metric=plot_metric,
        time_budget_minutes=budget,
        data=_parse_table(DataSettings, raw.get("data"), "data"),
        pe=_parse_table(PESettings, raw.get("pe"), "pe"),
        baselines=_parse_table(BaselineSettings, raw.get("baselines"), "baselines"),
        dp_training=_parse_table(DPTrainingSettings, raw.get("dp_training"), "dp_training"),
        steering=_parse_table(SteeringSettings, raw.get("steering"), "steering"),
    )
    _check_sizes(config)
    return config


def _check_sizes(config: StudyConfig) -> None:
    """K must fit the private records; PE needs its population to fit the samples asked."""
    from fedsynth.simulations.demo import TEMPLATES

    n_labels = len(TEMPLATES[config.corpus].labels)
    records = config.data.private_per_label * n_labels
    for sweep in config.sweeps:
        for k in sweep.clients:
            if k > records:
                raise ConfigError(
                    f"sweep {sweep.name!r}: K={k} holders exceed the {records} private training "
                    f"records (private_per_label={config.data.private_per_label} × {n_labels} "
                    "labels); every holder needs at least 1 record"
                )
    if config.data.mia_members > config.data.private_per_label * n_labels:
        raise ConfigError("[data] mia_members exceeds the private training records")
    colluders = config.data.colluders
    for cell in config.cells():
        if not METHODS[cell.method].federated:
            continue
        t = min_safe_threshold(cell.clients, colluders)
        if t > cell.clients - cell.dropped_clients:
            raise ConfigError(
                f"[data] colluders={colluders}: at K={cell.clients} with {cell.dropped_clients} "
                f"dropped the safe threshold t={t} leaves no round that can finish "
                f"({cell.key})"
            )
    if ("canary" in config.metrics) != (config.data.canaries > 0):
        raise ConfigError(
            "the 'canary' metric and [data] canaries >= 1 go together: set both or neither"
        )


def load_study_config(path: Path | str) -> StudyConfig:
    """Read and validate a study TOML file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"study config {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"study config {path} is not valid TOML: {exc}") from None
    return parse_study(raw, source=str(path))
