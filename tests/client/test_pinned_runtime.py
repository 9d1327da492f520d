"""The node's pinned runtime ends with its SuperNode and passes a stop signal on to it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from processes import free_port, wait_exit

from fedsynth.client.pinned_runtime import runtime_command


def _runtime(tmp_path: Path, supernode_code: str) -> subprocess.Popen[bytes]:
    secret = tmp_path / "superexec.secret"
    secret.write_bytes(b"s" * 32)
    fake_supernode = [sys.executable, "-c", supernode_code]
    command = runtime_command(
        fake_supernode,
        runtime_address=f"127.0.0.1:{free_port()}",  # nothing listens: every poll fails
        fab_sha256=frozenset({"ab" * 32}),
        secret_file=secret,
    )
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_the_runtime_exits_with_its_supernodes_status(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, "import sys, time; time.sleep(2); sys.exit(3)")
    try:
        assert wait_exit(runtime, 60) == 3
    finally:
        runtime.kill()


def test_a_stop_signal_reaches_the_supernode_and_ends_the_runtime(tmp_path: Path) -> None:
    marker = tmp_path / "stopped"
    ready = tmp_path / "ready"
    code = (
        "import signal, sys, time\n"
        f"def stop(*_): open({str(marker)!r}, 'w').close(); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(120)\n"
    )
    runtime = _runtime(tmp_path, code)
    try:
        # The SuperNode is up and handles SIGTERM (not a fixed sleep: on a loaded machine the
        # runtime's own start, flwr's imports, can take longer than any guess).
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert runtime.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        runtime.send_signal(signal.SIGTERM)
        assert wait_exit(runtime, 60) is not None
        assert marker.exists()  # the SuperNode got the signal, not an orphaning kill
    finally:
        runtime.kill()
