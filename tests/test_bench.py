"""The benchmark command: every bench_*.py module reports rows; a failing one is named, not hidden.

* ``python -m benchmarks --quick --json FILE`` runs every benchmark module at tiny sizes, exits
  0 and writes the machine and one or more finite rows per module (slow: a few minutes on 2
  busy cores).
* A benchmark that raises makes the run exit non-zero and is named on the console and in the
  JSON, while the other benchmarks' rows are still written.
* ``fedsynth bench`` outside a source checkout fails with one line naming ``python -m
  benchmarks``; a bench script still runs on its own (``python benchmarks/bench_x.py``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from typer.testing import CliRunner

from fedsynth.simulations.cli import app

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem.removeprefix("bench_") for p in (ROOT / "benchmarks").glob("bench_*.py"))
ROW_FIELDS = {
    "benchmark",
    "figure",
    "value",
    "unit",
    "baseline",
    "ratio",
    "target",
    "met",
    "note",
}
MACHINE_FIELDS = {"platform", "cpu_count", "python", "torch", "date"}


@pytest.fixture
def bench() -> Iterator[ModuleType]:
    """The checkout's benchmarks package (opacus installs another top-level ``benchmarks``)."""
    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] == "benchmarks"}
    sys.path.insert(0, str(ROOT))
    try:
        import benchmarks.runner as runner

        assert Path(runner.__file__).resolve().parent == ROOT / "benchmarks"
        yield runner
    finally:
        sys.path[:] = [p for p in sys.path if p != str(ROOT)]
        for m in [m for m in sys.modules if m.split(".")[0] == "benchmarks"]:
            del sys.modules[m]
        sys.modules.update(saved)


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "FEDSYNTH_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}


def _check_rows(document: dict[str, Any], expected: list[str]) -> None:
    rows = document["rows"]
    for row in rows:
        assert set(row) == ROW_FIELDS, row
        assert isinstance(row["value"], float | int) and math.isfinite(row["value"]), row
        for key in ("baseline", "ratio"):
            assert row[key] is None or math.isfinite(row[key]), row
        if row["baseline"] not in (None, 0) and row["ratio"] is not None:
            assert row["ratio"] == pytest.approx(row["value"] / row["baseline"]), row
        assert row["met"] in (True, False, None), row
        assert isinstance(row["figure"], str) and row["figure"], row
    for name in expected:
        assert [r for r in rows if r["benchmark"] == name], f"no row from benchmark {name}"


@pytest.mark.slow
def test_quick_run_of_every_benchmark_exits_0_with_finite_rows(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    document = json.loads(out.read_text())
    assert document["quick"] is True
    assert document["failed"] == []
    assert set(document["machine"]) >= MACHINE_FIELDS
    assert document["machine"]["cpu_count"] >= 1
    assert [b["name"] for b in document["benchmarks"]] == MODULES
    assert all(b["error"] is None and b["rows"] >= 1 for b in document["benchmarks"])
    _check_rows(document, MODULES)
    assert "met?" in done.stdout  # the one table


def test_a_raising_benchmark_fails_the_run_by_name_and_the_others_still_report(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    import benchmarks.bench_generation as generation

    def broken(quick: bool) -> list[Any]:
        raise RuntimeError("steering hook lost")

    monkeypatch.setattr(generation, "figures", broken)
    out = tmp_path / "bench.json"
    code = bench.main(["--quick", "--only", "generation", "secagg", "--json", str(out)])
    said = capsys.readouterr()
    assert code != 0
    assert "benchmark generation failed" in said.out
    assert "steering hook lost" in said.out + said.err
    document = json.loads(out.read_text())
    assert document["failed"] == ["generation"]
    entry = {b["name"]: b for b in document["benchmarks"]}
    assert entry["generation"]["error"] == "RuntimeError: steering hook lost"
    assert entry["secagg"]["error"] is None and entry["secagg"]["rows"] >= 1
    assert {r["benchmark"] for r in document["rows"]} == {"secagg"}
    _check_rows(document, ["secagg"])


def test_every_benchmark_passing_exits_0(bench: ModuleType, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--only", "bench_secagg", "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["failed"] == []
    _check_rows(document, ["secagg"])
    # The masked vector is judged even at quick sizes (bytes, not timings); timings are not.
    by_figure = {r["figure"]: r for r in document["rows"]}
    masked = [r for f, r in by_figure.items() if f.startswith("masked vector")]
    assert masked and all(r["met"] is True and r["ratio"] == 1.0 for r in masked)
    assert all(r["met"] is None for f, r in by_figure.items() if "time" in f)
    assert "met?" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("result", "needle"),
    [([], "returned no rows"), (["not a figure"], "expected benchmarks.common.Figure")],
)
def test_a_benchmark_without_rows_counts_as_failed(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, result: list[Any], needle: str
) -> None:
    import benchmarks.bench_secagg as secagg

    monkeypatch.setattr(secagg, "figures", lambda quick: result)
    outcome = bench.run_one("bench_secagg", quick=True)
    assert outcome.error is not None and needle in outcome.error
    assert outcome.figures == []


def test_unknown_benchmark_name_is_refused(bench: ModuleType, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--only", "no-such-bench"])
    assert exc.value.code == 2
    assert "no-such-bench" in capsys.readouterr().err


def test_figures_judge_the_ratio_and_leave_unjudged_targets_open(bench: ModuleType) -> None:
    from benchmarks.common import compared

    slow = compared("x", "f", 8.0, "tokens/s", baseline=10.0, at_least=0.97)
    assert (slow.ratio, slow.target, slow.met) == (0.8, ">= 0.97x", False)
    fast = compared("x", "f", 9.9, "tokens/s", baseline=10.0, at_least=0.97)
    assert fast.met is True
    bound = compared("x", "f", 2.5, "s", at_most=2.0)
    assert (bound.ratio, bound.target, bound.met) == (None, "<= 2 s", False)
    unjudged = compared("x", "f", 8.0, "tokens/s", baseline=10.0, at_least=0.97, judge=False)
    assert unjudged.met is None and unjudged.target == ">= 0.97x"
    assert compared("x", "f", 1.0, "s", baseline=0.0, at_most=1.0).ratio is None


def test_fedsynth_bench_outside_a_checkout_names_python_m_benchmarks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fedsynth.client.app_pin as app_pin

    monkeypatch.setattr(app_pin, "installed_source_root", lambda: None)
    result = CliRunner().invoke(app, ["bench", "--quick"])
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "python -m benchmarks" in said
    assert "source checkout" in said
    assert "Traceback" not in result.output


def test_fedsynth_bench_runs_the_checkouts_benchmarks(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app, ["bench", "--quick", "--only", "secagg", "--json", str(out)], terminal_width=200
    )
    assert result.exit_code == 0, result.output
    assert "met?" in result.output
    document = json.loads(out.read_text())
    assert [b["name"] for b in document["benchmarks"]] == ["secagg"]
    _check_rows(document, ["secagg"])
    help_text = CliRunner().invoke(app, ["-h"], terminal_width=200).output
    assert "bench" in help_text


def test_a_bench_script_still_runs_on_its_own(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_secagg.py"), "--ks", "3", "--dim", "64"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "targets at K = 3" in done.stdout


def test_the_cuda_bench_runs_every_decoder_on_a_cpu(tmp_path: Path) -> None:
    """The GPU benchmark's code paths (dynamic, static, compiled, profile) on a tiny CPU model."""
    out = tmp_path / "cuda.json"
    args = ["--model", "tiny-llama", "--batches", "3", "--compiled-batches", "3", "--tokens", "4"]
    args += ["--repeats", "1", "--layers", "1", "--profile", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_cuda.py"), *args],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == []
    assert [r["variant"] for r in report["rows"]] == ["dynamic", "static", "compiled"]
    for row in report["rows"]:
        assert row["steered_tokens_per_s"] > 0 and row["unsteered_tokens_per_s"] > 0
        assert row["steered_rows_changed"] > 0  # the release reached every decoder's samples
    assert "Self CPU time total" in report["profile"]
