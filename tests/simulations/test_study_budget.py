"""A study over its time budget stops after the cells it measured and resumes with --yes."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsynth.protocol.errors import TimeBudgetError
from fedsynth.simulations.cli import app
from fedsynth.simulations.study import StudyRunner
from fedsynth.simulations.study_config import load_study_config

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CONFIG = """
name = "budget"
seeds = [0, 1, 2]
model = "tiny-llama"
layers = [1, 2]
embedder = "hashing-64"
metrics = ["tstr"]
time_budget_minutes = 1e-9  # below any cell, even one whose work is cached

[data]
private_per_label = 30
test_per_label = 30
synthetic_per_label = 6
mia_members = 20
max_new_tokens = 10
audit_runs = 0

[[sweep]]
name = "floor"
methods = ["prior"]
"""


def _keys(out: Path) -> list[str]:
    with (out / "results.csv").open(newline="") as handle:
        return [row["key"] for row in csv.DictReader(handle)]


def test_over_budget_stops_after_the_first_measured_cell_then_yes_finishes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "budget.toml"
    path.write_text(CONFIG)
    config = load_study_config(path)
    out = tmp_path / "out"
    with pytest.raises(TimeBudgetError, match="2 cells left"):
        StudyRunner(config, out).run()
    assert len(_keys(out)) == 1  # the measured cell's row is kept
    # A rerun judges the rest by the finished cell before running anything.
    result = CliRunner().invoke(app, ["simulate", str(path), "--out", str(out)])
    assert result.exit_code != 0
    assert "time_budget_minutes=1e-09" in " ".join(result.output.split())
    assert len(_keys(out)) == 1
    result = CliRunner().invoke(app, ["simulate", str(path), "--out", str(out), "--yes"])
    assert result.exit_code == 0, result.output
    assert sorted(_keys(out)) == sorted(c.key for c in config.cells())
