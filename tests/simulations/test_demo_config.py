"""Demo configuration and data preparation (no model needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedsynth.protocol.errors import DataFileError
from fedsynth.simulations.demo import PRESETS, demo_config, prepare_data, release_epsilons


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_presets_and_overrides(tmp_path: Path) -> None:
    quick = demo_config("quick", out_dir=tmp_path, epsilon=2.0, samples=None)
    assert quick.private_per_label == PRESETS["quick"]["private_per_label"]
    assert quick.epsilon == 2.0
    assert release_epsilons(quick) == [2.0, float("inf")]
    with pytest.raises(ValueError, match="preset"):
        demo_config("huge", out_dir=tmp_path)


def test_user_data_gets_template_and_partitions(tmp_path: Path) -> None:
    rows = [{"body": f"text number {i}", "kind": "a" if i % 3 else "b"} for i in range(60)]
    data = _write(tmp_path / "mine.jsonl", rows)
    config = demo_config(
        "quick",
        out_dir=tmp_path / "out",
        data_path=data,
        text_field="body",
        label_field="kind",
        clients=3,
        instruction="A note of kind {label}:\n",
    )
    assert config.template.labels == ("a", "b")
    assert config.template.prefix("b") == "A note of kind b:\n"
    prepared = prepare_data(config)
    assert len(prepared.partitions) == 3
    assert sum(len(p) for p in prepared.partitions) == len(prepared.train)
    assert not {r.text for r in prepared.train} & {r.text for r in prepared.test}
    for i in range(3):
        lines = (prepared.partition_dir / f"partition-{i}.jsonl").read_text().splitlines()
        assert len(lines) == len(prepared.partitions[i])


def test_user_data_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": "x"}\n{"text": "", "label": "x"}\n')
    config = demo_config("quick", out_dir=tmp_path / "out", data_path=bad)
    with pytest.raises(DataFileError, match="line 2"):
        prepare_data(config)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--threshold", "5", "--clients", "3"], "threshold"),
        (["--clients", "1"], "clients"),
        (["--mode", "trusted"], "mode"),
        (["--epsilon", "-1"], "epsilon"),
        (["--drop", "2", "--clients", "3"], "threshold"),
    ],
)
def test_cli_refuses_bad_settings_before_compute(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedsynth.simulations", "demo", "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert needle in (proc.stdout + proc.stderr).lower()
    assert not (tmp_path / "synthetic.jsonl").exists()
