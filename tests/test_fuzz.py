"""Every decoder that reads another party's bytes survives a short coverage-guided fuzzing run.

``scripts/fuzz.py TARGET -runs=N`` (atheris / libFuzzer) feeds mutated inputs, starting from
valid ones, to one decoder; it fails on any exception other than fedsynth's own clear errors.
Each CI run fuzzes every target for a few thousand inputs (longer runs are for a developer's
machine: ``-max_total_time=600``). A planted bug must be reported, or the harness proves
nothing.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from script_modules import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "fuzz.py"
RUNS = 2000

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="atheris ships wheels for Linux x86_64 only (the dev extra installs it there)",
)


def _targets() -> list[str]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True, check=True
    )
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _scratch_env(tmp_path: Path) -> dict[str, str]:
    """The script's scratch files under the test's directory: libFuzzer ends the process with
    C's exit, so Python's clean-up of temporary directories never runs."""
    return {**os.environ, "TMPDIR": str(tmp_path)}


def _fuzz(target: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), target, f"-runs={RUNS}", "-timeout=30"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tmp_path,  # libFuzzer writes crash-<sha1> files into the working directory
        env=_scratch_env(tmp_path),
    )


DECODERS = (
    "task-manifest",
    "pe-manifest",
    "roster",
    "stage-fields",
    "generate-request",
    "release-file",
    "task-file",
    "policy-file",
)


def test_every_decoder_is_a_target() -> None:
    assert set(_targets()) == {*DECODERS, "planted-bug"}


@pytest.mark.parametrize("target", DECODERS)
def test_no_input_escapes_the_decoders_own_errors(target: str, tmp_path: Path) -> None:
    proc = _fuzz(target, tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert f"#{RUNS}\tDONE" in output, output[-2000:]  # every input ran
    assert "cov: " in output  # coverage-guided: the decoder's code is instrumented
    assert not list(tmp_path.glob("crash-*"))


def test_a_planted_bug_is_reported(tmp_path: Path) -> None:
    proc = _fuzz("planted-bug", tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Uncaught Python exception" in output and "IndexError" in output, output[-2000:]
    assert list(tmp_path.glob("crash-*"))  # the input is kept to reproduce it
    assert list(tmp_path.glob("fedsynth-fuzz-*"))  # scratch files stay under the test's dir


def test_the_memory_limit_is_over_what_the_process_inherited() -> None:
    fuzz = load_script("fuzz")
    assert fuzz.rss_flags(["-runs=5"], 3000) == ["-runs=5", "-rss_limit_mb=5048"]
    assert fuzz.rss_flags(["-rss_limit_mb=100"], 3000) == ["-rss_limit_mb=100"]


def test_a_run_started_from_a_large_process_is_not_out_of_memory(tmp_path: Path) -> None:
    # Linux hands the parent's peak RSS to the child; a test worker holding a model once made
    # every fuzzing run report "out-of-memory (used: 2814Mb; limit: 2048Mb)" on its first input.
    parent = (
        "import subprocess, sys\n"
        "ballast = bytearray(2600 * 2**20)\n"
        "ballast[::4096] = b'x' * len(ballast[::4096])\n"
        "sys.exit(subprocess.run(sys.argv[1:]).returncode)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", parent, sys.executable, str(SCRIPT), "roster", f"-runs={RUNS}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tmp_path,
        env=_scratch_env(tmp_path),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert f"#{RUNS}\tDONE" in output, output[-2000:]
