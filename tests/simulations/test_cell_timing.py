"""A cell's coordinator seconds count only the time it spent, never work another cell cached."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsynth.simulations import study as study_module
from fedsynth.simulations.methods import CellOutput
from fedsynth.simulations.study import StudyRunner
from fedsynth.simulations.study_config import load_study_config

CONFIG = """
name = "timing"
seeds = [0]
model = "tiny-llama"
layers = [1, 2]
embedder = "hashing-64"
metrics = ["tstr"]

[[sweep]]
name = "pooled"
methods = ["vector-pooled"]
epsilons = [4]
"""


@pytest.mark.parametrize("reused", [0.0, 200.0])
def test_reused_client_time_is_reported_but_not_subtracted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reused: float
) -> None:
    path = tmp_path / "timing.toml"
    path.write_text(CONFIG)
    runner = StudyRunner(load_study_config(path), tmp_path / "out")
    # A pooled cell that reads the seed's cached features: they cost 200 s once, elsewhere.
    perf = {"client_seconds": 200.0, "reused_seconds": reused, "generation_seconds": 1.0}
    monkeypatch.setattr(
        study_module, "runner_for", lambda _method: lambda _ctx, _cell: CellOutput([], perf=perf)
    )
    (cell,) = runner.config.cells()
    row = runner.run_cell(cell)
    assert row["client_seconds"] == 200.0  # what the release's features cost is still reported
    assert "reused_seconds" not in row
    spent = row["cell_seconds"] - 1.0 - (200.0 - reused)
    assert row["coordinator_seconds"] == pytest.approx(spent)
    if reused:
        assert row["coordinator_seconds"] > -1.0  # was −201 s: the cached 200 s subtracted
