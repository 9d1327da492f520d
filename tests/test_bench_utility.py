"""bench_utility's summary over seeds: read from each seed's summary.json (no demo is run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import bench_utility


def _seed(out: Path, seed: int, prior: float, ours: float, real: float | None) -> None:
    folder = out / f"seed-{seed}"
    folder.mkdir(parents=True)
    row = {"label_fidelity": 0.7, "mauve": 0.5, "self_bleu": 10.0, "distinct_2": 0.7}
    scores = {
        bench_utility.PRIOR: {**row, "tstr_accuracy": prior},
        bench_utility.PRIVATE: {**row, "tstr_accuracy": ours},
    }
    reference = None if real is None else {"tstr_accuracy": real, "per_label": 80, "draws": 3}
    summary = {"scores": scores, "real_reference": reference}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_gap_closed_over_seeds_without_a_ceiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed(tmp_path, 0, prior=0.5, ours=0.6, real=0.7)  # closes half the gap
    _seed(tmp_path, 1, prior=0.4, ours=0.7, real=0.8)  # three quarters
    argv = ["bench_utility.py", "--seeds", "0", "1", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    bench_utility.main()
    out = capsys.readouterr().out
    assert "eps=inf" not in out  # run with --no-baseline: no ceiling line
    assert "accuracy eps=4 - prior   = 0.200 ± 0.141" in out
    assert "real texts, same number  = 0.750 ± 0.071" in out
    assert "gap prior->real closed   = 0.625 ± 0.177  (target >= 0.50)" in out


def test_no_gap_line_without_real_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed(tmp_path, 0, prior=0.5, ours=0.6, real=None)  # a summary from before the reference
    monkeypatch.setattr(sys, "argv", ["bench_utility.py", "--seeds", "0", "--out", str(tmp_path)])
    bench_utility.main()
    assert "gap prior->real closed" not in capsys.readouterr().out
