"""``coordinator start`` killed without notice leaves nothing listening, and starts again.

A real ``coordinator start`` (SuperLink with TLS and node authentication, plus the Synthesis
service) on 127.0.0.1 is SIGKILLed, as a crash or an OOM kill would: it gets no chance to stop
its two servers, which run in their own sessions. They must still go (Linux parent-death
signal), so that a restart on the same ports and state directory comes up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from processes import add_holder, cli_ok, free_port, start_coordinator

from fedsynth.protocol.deployment import stop_process
from fedsynth.server.coordinator_cli import coordinator_app

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux parent-death signal"),
]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _wait_ready(coord: Path, proc: subprocess.Popen[bytes], seen: int) -> None:
    log = coord.parent / "coordinator.log"
    deadline = time.monotonic() + 180
    while log.read_text(errors="replace").count("Synthesis service ready") < seen:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.3)


def test_a_killed_coordinator_leaves_no_server_and_restarts(tmp_path: Path) -> None:
    coord = tmp_path / "coord"
    cli_ok(coordinator_app, "init", str(coord))
    add_holder(coord, tmp_path / "alice", "alice")
    link_port, synthesis_port = free_port(), free_port()
    start = start_coordinator(coord, link_port, synthesis_port, tmp_path / "coordinator.log")
    try:
        _wait_ready(coord, start, 1)
        assert _listening(link_port) and _listening(synthesis_port)
        servers = psutil.Process(start.pid).children()
        assert len(servers) == 2  # the SuperLink and the Synthesis service, each in its session
        assert all(os.getsid(s.pid) != os.getsid(start.pid) for s in servers)

        start.send_signal(signal.SIGKILL)  # the launcher only: no stop reaches the servers
        start.wait(timeout=10)
        _gone, alive = psutil.wait_procs(servers, timeout=60)
        assert not alive, [p.cmdline() for p in alive]
        assert not _listening(link_port) and not _listening(synthesis_port)

        # The same state directory and ports serve again.
        start = start_coordinator(coord, link_port, synthesis_port, tmp_path / "coordinator.log")
        _wait_ready(coord, start, 2)
        assert _listening(link_port) and _listening(synthesis_port)
    finally:
        stop_process(start)
    assert not _listening(link_port) and not _listening(synthesis_port)
