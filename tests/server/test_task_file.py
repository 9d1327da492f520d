"""Tests of the operator's task file: every bad input is a clear error before anything runs."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest

from fedsynth.protocol.errors import ConfigError, TaskFileError
from fedsynth.protocol.secagg.stages import min_safe_threshold
from fedsynth.server.task_file import (
    RUN_CONFIG_KEY,
    TaskSpec,
    describe,
    load_task,
    parse_task,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def base() -> dict[str, Any]:
    """A valid vector task as parsed TOML."""
    return {
        "method": "vector",
        "model": {"name": "tiny-llama", "layers": [1, 2]},
        "privacy": {"epsilon": 4.0, "delta": 1e-5, "mode": "distributed"},
        "federation": {"expected_holders": 5},
        "labels": [
            {"name": "pos", "instruction": "A positive review: ", "shots": ["fine film"]},
            {"name": "neg", "instruction": "A negative review: "},
        ],
    }


def parse(data: dict[str, Any], tmp_path: Path) -> TaskSpec:
    return parse_task(data, base_dir=tmp_path, source="TASK.toml")


def edited(path: str, value: Any) -> dict[str, Any]:
    """``base()`` with one dotted key set (``labels.1.instruction``); ``...`` deletes it."""
    data = copy.deepcopy(base())
    *parents, last = path.split(".")
    node: Any = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if value is ...:
        del node[int(last) if isinstance(node, list) else last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


def test_a_valid_task_gets_the_safe_threshold_and_its_defaults(tmp_path: Path) -> None:
    spec = parse(base(), tmp_path)
    assert spec.threshold == min_safe_threshold(5) == 3
    assert spec.min_holders == 5 and spec.expected_holders == 5
    assert spec.store_dir == tmp_path / "releases"
    assert spec.ledger == tmp_path / "releases" / "ledger.sqlite"
    assert spec.task_id is None and spec.lifetime_epsilon == math.inf
    # Each label keeps its own instruction; every shot is shown after its label's instruction.
    template = spec.template
    assert template.labels == ("pos", "neg")
    assert template.prefix("neg") == "A positive review: fine film\n\nA negative review: "
    assert ("epsilon", "4") in describe(spec) and ("vocabulary", "full") in describe(spec)
    # Samples are as long as the declared records unless the task says otherwise.
    assert spec.max_text_tokens == 64 and spec.generation.max_new_tokens == 64
    longer = parse(edited("model.max_text_tokens", 96), tmp_path)
    assert longer.generation.max_new_tokens == 96
    shorter = parse(edited("model.max_new_tokens", 20), tmp_path)
    assert (shorter.max_text_tokens, shorter.generation.max_new_tokens) == (64, 20)
    # The coordinator's generations sample the full vocabulary unless the task names another.
    assert spec.generation.vocabulary == "full"
    assert parse(edited("model.vocabulary", "latin"), tmp_path).generation.vocabulary == "latin"


def test_the_example_task_files_are_valid() -> None:
    vector = load_task(EXAMPLES / "task-vector.toml")
    pe = load_task(EXAMPLES / "task-pe.toml")
    assert vector.method == "vector" and pe.method == "pe"
    assert pe.pe.rounds == 3 and pe.pe.population == 60
    assert vector.store_dir == EXAMPLES / "releases"
    for spec in (vector, pe):
        assert all(label.shots for label in spec.labels)  # public shots only


def test_run_config_carries_the_absolute_path(tmp_path: Path) -> None:
    path = tmp_path / "TASK.toml"
    path.write_text((EXAMPLES / "task-vector.toml").read_text())
    spec = load_task(path)
    config = spec.to_run_config(path)
    assert config == {RUN_CONFIG_KEY: str(path.resolve())}
    assert TaskSpec.from_run_config(config) == spec
    with pytest.raises(TaskFileError, match="task-path=''"):
        TaskSpec.from_run_config({"preset": "quick"})


BAD: list[tuple[str, Any, str]] = [
    # (dotted key, value or ... to delete, pattern the message must match)
    ("colour", "blue", r"colour='blue': unknown key; expected one of \["),
    ("privacy.epsilom", 1.0, r"privacy\.epsilom=1\.0: unknown key"),
    ("labels.1.template", "x", r"labels\.template='x': unknown key"),
    ("labels.1.instruction", ..., r"labels\[1\]\.instruction=None: label 'neg' has no instr"),
    ("labels.0.instruction", "  ", r"labels\[0\]\.instruction='  ': must be a non-empty"),
    ("labels.1.name", "pos", r"labels=\['pos', 'pos'\]: label names must be distinct"),
    ("labels.0.shots", [""], r"labels\[0\]\.shots=\[''\]: must be a list of non-empty"),
    ("labels", [{"name": "a", "instruction": "x"}], r"labels=1: need at least 2"),
    ("privacy.epsilon", 0.0, r"privacy\.epsilon=0\.0: must be > 0"),
    ("privacy.epsilon", -1, r"privacy\.epsilon=-1\.0: must be > 0"),
    ("privacy.epsilon", math.nan, r"privacy\.epsilon=nan: must be a finite number or inf"),
    ("privacy.epsilon", "4", r"privacy\.epsilon='4': must be a number"),
    ("privacy.epsilon", ..., r"privacy\.epsilon=None: missing \(required\)"),
    ("privacy.delta", 0.0, r"privacy\.delta=0\.0: must be in \(0, 1\)"),
    ("privacy.delta", 1.0, r"privacy\.delta=1\.0: must be in \(0, 1\)"),
    ("privacy.delta", math.inf, r"privacy\.delta=inf: must be a finite number"),
    ("privacy.mode", "trusted", r"privacy\.mode='trusted': expected one of \['distributed'"),
    ("privacy.lifetime_epsilon", 3.0, r"privacy\.epsilon=4\.0: exceeds privacy\.lifetime_eps"),
    ("federation.threshold", 6, r"federation\.threshold=6: t must be <= expected_holders K=5"),
    ("federation.threshold", 2, r"federation\.threshold=2: below the safe threshold 3 for K=5"),
    ("federation.threshold", 1, r"federation\.threshold=1: must be >= 2"),
    ("federation.threshold", True, r"federation\.threshold=True: must be an integer"),
    ("federation.min_holders", 6, r"federation\.min_holders=6: must be <= expected_holders K=5"),
    ("federation.min_holders", 2, r"federation\.min_holders=2: must be >= threshold t=3"),
    ("federation.expected_holders", 1, r"federation\.expected_holders=1: must be >= 2"),
    ("federation.expected_holders", ..., r"federation\.expected_holders=None: missing"),
    ("federation.colluders", 5, r"federation\.colluders=5: no threshold t <= K=5 is safe"),
    ("model.layers", [], r"model\.layers=\[\]: must be a non-empty list"),
    ("model.layers", [1, 1], r"model\.layers=\[1, 1\]: layer indices must be distinct"),
    ("model.name", ..., r"model\.name=None: missing \(required\)"),
    ("model.strength", -0.1, r"model\.strength=-0\.1: must be >= 0\.0"),
    ("model.vocabulary", "cyrillic", r"model\.vocabulary='cyrillic': expected one of \['full'"),
    ("deadlines.stage_s", 0, r"deadlines\.stage_s=0: must be > 0"),
    ("method", "fedavg", r"method='fedavg': expected one of \['vector', 'pe'\]"),
    ("task_id", "../escape", r"task_id='\.\./escape': must be 1-64 letters"),
    ("pe.rounds", 3, r"pe=\{'rounds': 3\}: a \[pe\] section applies only to method = \"pe\""),
]


@pytest.mark.parametrize(("key", "value", "pattern"), BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_input_is_refused_naming_key_value_and_limit(
    tmp_path: Path, key: str, value: Any, pattern: str
) -> None:
    with pytest.raises(TaskFileError, match=pattern) as info:
        parse(edited(key, value), tmp_path)
    assert str(info.value).startswith("TASK.toml: ")
    assert isinstance(info.value, ConfigError)


def test_threshold_floor_follows_the_colluders(tmp_path: Path) -> None:
    data = edited("federation.colluders", 1)
    assert parse(data, tmp_path).threshold == min_safe_threshold(5, 1) == 4
    data["federation"]["threshold"] = 3  # safe without colluders, not against one
    with pytest.raises(TaskFileError, match=r"threshold=3: below the safe threshold 4"):
        parse(data, tmp_path)


@pytest.mark.parametrize(
    "key",
    ["data", "store.data-path", "labels.0.data_path", "pe.dataset", "federation.Records"],
)
def test_a_task_file_never_names_data(tmp_path: Path, key: str) -> None:
    data = edited(key, "/srv/private/records.jsonl")
    if key.startswith("pe."):
        data["method"] = "pe"
    with pytest.raises(TaskFileError, match="the holders keep their records") as info:
        parse(data, tmp_path)
    assert "task file never names data" in str(info.value)


def test_pe_settings_are_checked(tmp_path: Path) -> None:
    data = base()
    data["method"] = "pe"
    data["pe"] = {"rounds": 2, "population": 8, "embedder": "hashing-64"}
    spec = parse(data, tmp_path)
    assert (spec.pe.rounds, spec.pe.population, spec.pe.embedder) == (2, 8, "hashing-64")
    for pe, pattern in [
        ({"rounds": 0}, r"pe\.rounds=0: must be >= 1"),
        ({"population": 8, "keep": 9}, r"pe\.keep=9: must be <= pe\.population=8"),
        ({"population": 8, "top_k": 9}, r"pe\.top_k=9: must be <= pe\.population=8"),
        ({"selection": "best"}, r"pe\.selection='best': expected one of"),
        ({"temperature": 0.0}, r"pe\.temperature=0\.0: must be > 0"),
        ({"seeds": 1}, r"pe\.seeds=1: unknown key"),
    ]:
        data["pe"] = pe
        with pytest.raises(TaskFileError, match=pattern):
            parse(data, tmp_path)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(TaskFileError, match="cannot be read"):
        load_task(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text('method = "vector"\n[model\n')
    with pytest.raises(TaskFileError, match=r"broken\.toml: not valid TOML"):
        load_task(broken)
    latin1 = tmp_path / "latin1.toml"  # found by scripts/fuzz.py task-file
    latin1.write_bytes('method = "vector"\ntask_id = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(TaskFileError, match=r"latin1\.toml: not UTF-8 text \(byte 32"):
        load_task(latin1)


def test_infinite_epsilon_is_a_non_private_task(tmp_path: Path) -> None:
    spec = parse(edited("privacy.epsilon", math.inf), tmp_path)
    assert math.isinf(spec.epsilon)
    assert ("epsilon", "inf (non-private)") in describe(spec)
