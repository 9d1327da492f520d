"""One writer per results folder: a second study or curve on a locked folder is refused at
once, and the lock goes with the process that held it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedsynth.protocol.errors import FolderInUseError
from fedsynth.simulations.folder_lock import exclusive_folder

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fedsynth.simulations.folder_lock import exclusive_folder
    with exclusive_folder(Path(sys.argv[1]), "test"):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def _holder(folder: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_and_told_who_holds_it(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        with (
            pytest.raises(
                FolderInUseError, match=rf"in use by test \(pid {proc.pid}\).*this samples curve"
            ),
            exclusive_folder(tmp_path, "samples curve"),
        ):
            pass
    finally:
        proc.kill()
        proc.wait()
    # The kernel dropped the killed process's lock: the folder is free again.
    with exclusive_folder(tmp_path, "samples curve"):
        pass


def test_the_lock_is_released_after_the_block_and_after_an_error(tmp_path: Path) -> None:
    with exclusive_folder(tmp_path, "x"):
        pass
    with pytest.raises(RuntimeError), exclusive_folder(tmp_path, "x"):
        raise RuntimeError("boom")
    with exclusive_folder(tmp_path / "new", "x"):  # creates the folder
        assert (tmp_path / "new" / ".lock").exists()


def test_a_study_and_a_curve_refuse_a_locked_folder(tmp_path: Path) -> None:
    from benchmarks.samples_curve import main as curve_main
    from fedsynth.simulations.study import StudyRunner
    from fedsynth.simulations.study_config import StudyConfig

    proc = _holder(tmp_path)
    try:
        with pytest.raises(FolderInUseError):
            StudyRunner(StudyConfig(name="x", sweeps=()), tmp_path).run()
        with pytest.raises(FolderInUseError):
            curve_main(["--out", str(tmp_path), "--merge", str(tmp_path / "none")])
        assert not (tmp_path / "results.csv").exists()
    finally:
        proc.kill()
        proc.wait()
