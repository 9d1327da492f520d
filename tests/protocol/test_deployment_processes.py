"""Processes a command starts in their own session end when the command is killed (Linux)."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from fedsynth.protocol.deployment import die_with_parent

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="parent-death signals are Linux-only"
)

LAUNCHER = """
import subprocess, sys, time
from fedsynth.protocol.deployment import die_with_parent
armed = sys.argv[1] == "armed"
child = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(120)"],
    start_new_session=True,
    preexec_fn=die_with_parent() if armed else None,
)
print(child.pid, flush=True)
time.sleep(120)
"""


def _orphan_after_launcher_killed(armed: bool) -> tuple[int, bool]:
    """Start a launcher that starts a long child in its own session, SIGKILL the launcher;
    return the child's pid and whether it still runs 10 s later."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, "armed" if armed else "plain"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert launcher.stdout is not None
    pid = int(launcher.stdout.readline())
    child = psutil.Process(pid)
    assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    launcher.kill()
    launcher.wait(timeout=10)
    try:
        child.wait(timeout=10)
    except psutil.TimeoutExpired:
        return pid, True
    return pid, False


def test_a_child_in_its_own_session_ends_when_its_launcher_is_killed() -> None:
    _, alive = _orphan_after_launcher_killed(armed=True)
    assert not alive


def test_without_the_parent_death_signal_the_child_would_be_orphaned() -> None:
    """The control: the same set-up without :func:`die_with_parent` leaves the child running."""
    pid, alive = _orphan_after_launcher_killed(armed=False)
    try:
        assert alive
    finally:
        if psutil.pid_exists(pid):
            psutil.Process(pid).kill()
            time.sleep(0.1)


def test_a_child_whose_launcher_lives_keeps_running() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    try:
        time.sleep(1.0)
        assert child.poll() is None
    finally:
        child.kill()
        child.wait(timeout=10)
