r"""An operator's task file (TASK.toml): all the coordinator needs for one task, nothing private.

The file names the method (``vector``: one dataset-vector release; ``pe``: federated Private
Evolution), the labels with their instruction and public shots, the model, the privacy terms,
the secure sum's threshold and the holders expected, the stage deadlines, PE's settings and
where the coordinator keeps its releases and ledger. It is parsed once into a frozen
:class:`TaskSpec`; every check runs here, before anything connects or is charged, and every
error names the key, the value and the limit. A task file never names data: the holders keep
their records on their own premises, so a key such as ``data`` or ``data-path`` is refused.

Example (see ``examples/task-vector.toml``)::

    method = "vector"
    [model]
    name = "gemma3-270m"
    layers = [8, 9, 10, 11]
    [privacy]
    epsilon = 4.0
    delta = 1e-5
    mode = "distributed"
    [federation]
    expected_holders = 3
    [[labels]]
    name = "positive"
    instruction = "Here is a positive movie review snippet:\n"
    shots = ["A warm, funny and generous film."]
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from fedsynth.protocol.errors import TaskFileError
from fedsynth.protocol.features import PromptTemplate
from fedsynth.protocol.secagg.stages import min_safe_threshold
from fedsynth.server.generation import GenerationConfig
from fedsynth.server.vocabulary import VOCABULARIES

METHODS = ("vector", "pe")
MODES = ("distributed", "central", "local")
SELECTIONS = ("rank", "probabilistic")
RUN_CONFIG_KEY = "task-path"
"""The Flower run-config key that carries the task file's path to the ServerApp."""
PRIVATE_KEYS = frozenset(
    {
        "data",
        "data-path",
        "data_path",
        "data-dir",
        "data_dir",
        "data-file",
        "data_file",
        "dataset",
        "records",
        "partition",
        "partitions",
        "train",
        "test",
    }
)
TASK_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# Every key a section may hold (anything else is refused by name).
SECTIONS: dict[str, frozenset[str]] = {
    "": frozenset(
        {"task_id", "method", "seed", "labels", "model", "privacy", "federation", "deadlines"}
        | {"pe", "store"}
    ),
    "labels": frozenset({"name", "instruction", "shots"}),
    "model": frozenset(
        {"name", "layers", "strength", "max_text_tokens", "prior_per_label", "max_new_tokens"}
        | {"generation_batch", "vocabulary"}
    ),
    "privacy": frozenset({"epsilon", "delta", "mode", "lifetime_epsilon"}),
    "federation": frozenset({"expected_holders", "min_holders", "threshold", "colluders"}),
    "deadlines": frozenset({"stage_s", "holders_s"}),
    "pe": frozenset(
        {"rounds", "population", "keep", "top_k", "selection", "threshold_std", "embedder"}
        | {"temperature", "declared_records_per_label"}
    ),
    "store": frozenset({"dir", "ledger"}),
}


@dataclass(frozen=True)
class LabelSpec:
    """One label: the instruction that precedes a text of it, and public example texts."""

    name: str
    instruction: str
    shots: tuple[str, ...] = ()


@dataclass(frozen=True)
class PESettings:
    """Federated PE settings (used when ``method = "pe"``)."""

    rounds: int = 3
    population: int = 60
    keep: int | None = None
    top_k: int = 1
    selection: str = "rank"
    threshold_std: float = 2.0
    embedder: str = "all-minilm-l6-v2"
    temperature: float = 0.9
    declared_records_per_label: int | None = None


@dataclass(frozen=True)
class TaskSpec:
    """One coordinator task, validated; built only by :func:`parse_task` / :func:`load_task`.

    Attributes:
        method: ``vector`` or ``pe``.
        labels: The labels in release order, each with its instruction and public shots.
        model: Model name (packaged name, local directory or cached hub id).
        layers: Residual-stream layers of the dataset vector.
        strength: Default steering strength for generation from the release.
        epsilon, delta, mode: The guarantee of the whole task and the trust mode.
        lifetime_epsilon: The coordinator's cap on the finite epsilon its ledger records.
        threshold: t of the secure sum (at least the safe threshold for K and colluders).
        expected_holders: K, the holders the coordinator waits for.
        min_holders: The fewest holders a task starts with once ``holders_s`` has passed.
        colluders: Holders assumed to side with the coordinator (raises the safe t; the noise
            shares are sized so that the other survivors alone carry the target).
        stage_s: Deadline of each secure-sum stage, seconds.
        holders_s: How long to wait for the expected holders to connect, seconds.
        store_dir: Where releases are written; ``ledger`` is the ledger file.
        task_id: The release id (None: a fresh one per run).
        vocabulary: The tokens the coordinator's generations (prior texts, PE variations) may
            use (:data:`~fedsynth.server.vocabulary.VOCABULARIES`).
    """

    method: str
    labels: tuple[LabelSpec, ...]
    model: str
    layers: tuple[int, ...]
    epsilon: float
    delta: float
    mode: str
    threshold: int
    expected_holders: int
    min_holders: int
    store_dir: Path
    ledger: Path
    colluders: int = 0
    strength: float = 0.03
    max_text_tokens: int = 64
    prior_per_label: int = 100
    max_new_tokens: int = 48
    generation_batch: int = 16
    vocabulary: str = "full"
    lifetime_epsilon: float = math.inf
    stage_s: float = 1800.0
    holders_s: float = 300.0
    pe: PESettings = PESettings()
    task_id: str | None = None
    seed: int = 0

    @property
    def template(self) -> PromptTemplate:
        """The class-conditional template: each label's own instruction, all shots in order.

        The shared slot is filled with a label's whole instruction, so labels may word their
        prompts differently; every shot is shown before every prompt, after its label's
        instruction.
        """
        return PromptTemplate(
            instruction="{label}",
            label_names=tuple((label.name, label.instruction) for label in self.labels),
            shots=tuple((label.name, shot) for label in self.labels for shot in label.shots),
        )

    @property
    def generation(self) -> GenerationConfig:
        """Sampling settings of the coordinator's generations (prior texts, PE variations)."""
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            batch_size=self.generation_batch,
            vocabulary=self.vocabulary,
        )

    def to_run_config(self, path: Path) -> dict[str, str]:
        """The Flower run config that hands this task (saved at ``path``) to the ServerApp."""
        return {RUN_CONFIG_KEY: str(path.resolve())}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> TaskSpec:
        """Load the task file the run config names under ``task-path``.

        Raises:
            TaskFileError: The key is missing or empty, or the file is invalid.
        """
        value = str(run_config.get(RUN_CONFIG_KEY) or "")
        if not value:
            raise TaskFileError(f"run config {RUN_CONFIG_KEY}={value!r}: name a task file")
        return load_task(Path(value))


def load_task(path: Path) -> TaskSpec:
    """Read and validate a task file.

    Raises:
        TaskFileError: The file is missing, not TOML, or any value is invalid (the message
            names the file, the key, the value and the limit).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TaskFileError(f"task file {path}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise TaskFileError(
            f"task file {path}: not UTF-8 text (byte {exc.start} cannot be decoded)"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TaskFileError(f"task file {path}: not valid TOML ({exc})") from None
    return parse_task(data, base_dir=path.resolve().parent, source=str(path))


def parse_task(data: Mapping[str, Any], *, base_dir: Path, source: str = "task") -> TaskSpec:
    """Validate a parsed task file; relative store paths are taken from ``base_dir``.

    Raises:
        TaskFileError: naming ``source``, the key, the value and the limit.
    """
    reader = _Reader(source)
    reader.refuse_private(data, "")
    reader.refuse_unknown(data, "")
    method = reader.choice(data, "method", METHODS, default=None)
    sections = {name: reader.section(data, name) for name in SECTIONS if name not in ("", "labels")}
    labels = reader.labels(data.get("labels"))
    model = sections["model"]
    privacy = sections["privacy"]
    federation = sections["federation"]
    deadlines = sections["deadlines"]
    pe_data = sections["pe"]
    store = sections["store"]

    epsilon = reader.number(privacy, "privacy.epsilon", default=None, infinite=True)
    if not epsilon > 0:
        reader.fail("privacy.epsilon", epsilon, "must be > 0 (or inf for a non-private task)")
    delta = reader.number(privacy, "privacy.delta", default=None)
    if not 0.0 < delta < 1.0:
        reader.fail("privacy.delta", delta, "must be in (0, 1)")
    lifetime = reader.number(privacy, "privacy.lifetime_epsilon", default=math.inf, infinite=True)
    if not lifetime > 0:
        reader.fail("privacy.lifetime_epsilon", lifetime, "must be > 0 (or inf)")
    if math.isfinite(epsilon) and epsilon > lifetime:
        reader.fail("privacy.epsilon", epsilon, f"exceeds privacy.lifetime_epsilon={lifetime}")

    k = reader.integer(federation, "federation.expected_holders", default=None, minimum=2)
    colluders = reader.integer(federation, "federation.colluders", default=0, minimum=0)
    safe = min_safe_threshold(k, colluders)
    if safe > k:
        reader.fail(
            "federation.colluders",
            colluders,
            f"no threshold t <= K={k} is safe against {colluders} colluding holders",
        )
    threshold = reader.integer(federation, "federation.threshold", default=safe, minimum=2)
    if threshold > k:
        reader.fail("federation.threshold", threshold, f"t must be <= expected_holders K={k}")
    if threshold < safe:
        reader.fail(
            "federation.threshold",
            threshold,
            f"below the safe threshold {safe} for K={k} and {colluders} colluders "
            "(a smaller t lets the coordinator unmask a holder's input)",
        )
    min_holders = reader.integer(federation, "federation.min_holders", default=k, minimum=2)
    if min_holders > k:
        reader.fail("federation.min_holders", min_holders, f"must be <= expected_holders K={k}")
    if min_holders < threshold:
        reader.fail(
            "federation.min_holders",
            min_holders,
            f"must be >= threshold t={threshold} (fewer holders could never complete a round)",
        )

    layers = reader.int_list(model, "model.layers")
    max_text_tokens = reader.integer(model, "model.max_text_tokens", default=64, minimum=1)
    pe = reader.pe(pe_data)
    store_dir = base_dir / reader.text(store, "store.dir", default="releases")
    ledger = store_dir / "ledger.sqlite"
    if "ledger" in store:
        ledger = base_dir / reader.text(store, "store.ledger", default="")
    task_id = data.get("task_id")
    if task_id is not None and not (
        isinstance(task_id, str) and TASK_ID_PATTERN.fullmatch(task_id)
    ):
        reader.fail("task_id", task_id, "must be 1-64 letters, digits, '.', '_' or '-'")
    spec = TaskSpec(
        method=method,
        labels=labels,
        model=reader.text(model, "model.name", default=None),
        layers=layers,
        epsilon=epsilon,
        delta=delta,
        mode=reader.choice(privacy, "mode", MODES, default="distributed", where="privacy.mode"),
        lifetime_epsilon=lifetime,
        threshold=threshold,
        expected_holders=k,
        min_holders=min_holders,
        colluders=colluders,
        strength=reader.number(model, "model.strength", default=0.03, minimum=0.0),
        max_text_tokens=max_text_tokens,
        prior_per_label=reader.integer(model, "model.prior_per_label", default=100, minimum=2),
        # Samples as long as the declared records unless the task says otherwise.
        max_new_tokens=reader.integer(
            model, "model.max_new_tokens", default=max_text_tokens, minimum=1
        ),
        generation_batch=reader.integer(model, "model.generation_batch", default=16, minimum=1),
        vocabulary=reader.choice(model, "model.vocabulary", VOCABULARIES, default="full"),
        stage_s=reader.number(deadlines, "deadlines.stage_s", default=1800.0, positive=True),
        holders_s=reader.number(deadlines, "deadlines.holders_s", default=300.0, positive=True),
        pe=pe,
        store_dir=store_dir,
        ledger=ledger,
        task_id=task_id,
        seed=reader.integer(data, "seed", default=0, minimum=0),
    )
    if method == "vector" and "pe" in data:
        reader.fail("pe", dict(pe_data), 'a [pe] section applies only to method = "pe"')
    return spec


class _Reader:
    """Typed access to a task file's values; every failure names source, key, value, limit."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, value: object, limit: str) -> NoReturn:
        raise TaskFileError(f"{self.source}: {key}={value!r}: {limit}")

    def refuse_private(self, data: object, prefix: str) -> None:
        """Refuse any key that would hand the coordinator a data file (at any depth)."""
        items: list[tuple[str, object]] = []
        if isinstance(data, Mapping):
            items = [(str(k), v) for k, v in data.items()]
        elif isinstance(data, list):
            items = [(f"{i}", v) for i, v in enumerate(data)]
        for key, value in items:
            name = f"{prefix}.{key}" if prefix else key
            if key.lower() in PRIVATE_KEYS:
                raise TaskFileError(
                    f"{self.source}: {name}={value!r}: a task file never names data; the "
                    "holders keep their records and read them on their own premises (their "
                    "node config names the file)"
                )
            self.refuse_private(value, name)

    def refuse_unknown(self, data: Mapping[str, Any], section: str) -> None:
        allowed = SECTIONS[section]
        for key, value in data.items():
            if key not in allowed:
                where = f"{section}.{key}" if section else key
                self.fail(where, value, f"unknown key; expected one of {sorted(allowed)}")

    def section(self, data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, Mapping):
            self.fail(name, value, "must be a table ([" + name + "])")
        self.refuse_unknown(value, name)
        return value

    def labels(self, value: object) -> tuple[LabelSpec, ...]:
        if not isinstance(value, list) or len(value) < 2:
            count = len(value) if isinstance(value, list) else value
            self.fail("labels", count, "need at least 2 [[labels]] tables")
        out: list[LabelSpec] = []
        for i, item in enumerate(value):
            if not isinstance(item, Mapping):
                self.fail(f"labels[{i}]", item, "must be a table ([[labels]])")
            self.refuse_unknown(item, "labels")
            name = self.text(item, "name", default=None, where=f"labels[{i}].name")
            if "instruction" not in item:
                self.fail(
                    f"labels[{i}].instruction",
                    None,
                    f"label {name!r} has no instruction template (the text before its samples)",
                )
            instruction = self.text(
                item, "instruction", default=None, where=f"labels[{i}].instruction"
            )
            shots = item.get("shots", [])
            if not isinstance(shots, list) or not all(
                isinstance(s, str) and s.strip() for s in shots
            ):
                self.fail(f"labels[{i}].shots", shots, "must be a list of non-empty public texts")
            out.append(LabelSpec(name=name, instruction=instruction, shots=tuple(shots)))
        names = [label.name for label in out]
        if len(set(names)) != len(names):
            self.fail("labels", names, "label names must be distinct")
        return tuple(out)

    def pe(self, data: Mapping[str, Any]) -> PESettings:
        population = self.integer(data, "pe.population", default=60, minimum=2)
        keep = data.get("keep")
        if keep is not None:
            keep = self.integer(data, "pe.keep", default=None, minimum=1)
            if keep > population:
                self.fail("pe.keep", keep, f"must be <= pe.population={population}")
        top_k = self.integer(data, "pe.top_k", default=1, minimum=1)
        if top_k > population:
            self.fail("pe.top_k", top_k, f"must be <= pe.population={population}")
        declared = data.get("declared_records_per_label")
        if declared is not None:
            declared = self.integer(data, "pe.declared_records_per_label", default=None, minimum=1)
        return PESettings(
            rounds=self.integer(data, "pe.rounds", default=3, minimum=1),
            population=population,
            keep=keep,
            top_k=top_k,
            selection=self.choice(
                data, "selection", SELECTIONS, default="rank", where="pe.selection"
            ),
            threshold_std=self.number(data, "pe.threshold_std", default=2.0, minimum=0.0),
            embedder=self.text(data, "embedder", default="all-minilm-l6-v2", where="pe.embedder"),
            temperature=self.number(data, "pe.temperature", default=0.9, positive=True),
            declared_records_per_label=declared,
        )

    def _get(self, data: Mapping[str, Any], key: str, default: object) -> object:
        name = key.rpartition(".")[2]
        if name not in data:
            if default is None:
                self.fail(key, None, "missing (required)")
            return default
        return data[name]

    def text(
        self, data: Mapping[str, Any], key: str, *, default: str | None, where: str | None = None
    ) -> str:
        value = self._get(data, where or key, default)
        if not isinstance(value, str) or not value.strip():
            self.fail(where or key, value, "must be a non-empty string")
        return value

    def choice(
        self,
        data: Mapping[str, Any],
        key: str,
        choices: tuple[str, ...],
        *,
        default: str | None,
        where: str | None = None,
    ) -> str:
        value = self._get(data, where or key, default)
        if value not in choices:
            self.fail(where or key, value, f"expected one of {list(choices)}")
        return str(value)

    def integer(
        self, data: Mapping[str, Any], key: str, *, default: int | None, minimum: int
    ) -> int:
        value = self._get(data, key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, value, "must be an integer")
        if value < minimum:
            self.fail(key, value, f"must be >= {minimum}")
        return value

    def number(
        self,
        data: Mapping[str, Any],
        key: str,
        *,
        default: float | None,
        minimum: float | None = None,
        positive: bool = False,
        infinite: bool = False,
    ) -> float:
        value = self._get(data, key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, value, "must be a number")
        number = float(value)
        if math.isnan(number) or (math.isinf(number) and not (infinite and number > 0)):
            self.fail(key, value, "must be a finite number" + (" or inf" if infinite else ""))
        if minimum is not None and number < minimum:
            self.fail(key, value, f"must be >= {minimum}")
        if positive and not number > 0:
            self.fail(key, value, "must be > 0")
        return number

    def int_list(self, data: Mapping[str, Any], key: str) -> tuple[int, ...]:
        value = self._get(data, key, None)
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in value)
        ):
            self.fail(key, value, "must be a non-empty list of layer indices")
        if min(value) < 0 or len(set(value)) != len(value):
            self.fail(key, value, "layer indices must be distinct and >= 0")
        return tuple(value)


def describe(spec: TaskSpec) -> list[tuple[str, str]]:
    """The task as (setting, value) rows for a table: what the holders will be asked."""
    eps = "inf (non-private)" if math.isinf(spec.epsilon) else f"{spec.epsilon:g}"
    rows = [
        ("method", spec.method),
        ("task id", spec.task_id or "(fresh per run)"),
        ("labels", ", ".join(label.name for label in spec.labels)),
        ("public shots", str(sum(len(label.shots) for label in spec.labels))),
        ("model", spec.model),
        ("layers", ",".join(str(x) for x in spec.layers)),
        ("strength", f"{spec.strength:g}"),
        ("vocabulary", spec.vocabulary),
        ("epsilon", eps),
        ("delta", f"{spec.delta:g}"),
        ("trust mode", spec.mode),
        ("threshold t", str(spec.threshold)),
        ("holders K (min)", f"{spec.expected_holders} ({spec.min_holders})"),
        ("stage deadline", f"{spec.stage_s:g} s"),
        ("store", str(spec.store_dir)),
        ("ledger", str(spec.ledger)),
    ]
    if spec.method == "pe":
        rows += [
            ("PE rounds", str(spec.pe.rounds)),
            ("PE population", str(spec.pe.population)),
            ("PE embedder", spec.pe.embedder),
        ]
    return rows
