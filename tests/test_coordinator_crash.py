"""``coordinator start`` killed without notice leaves nothing listening, and starts again.

A real ``coordinator start`` (SuperLink with TLS and node authentication, plus the Synthesis
service) on 127.0.0.1 is SIGKILLed, as a crash or an OOM kill would: it gets no chance to stop
its two servers, which run in their own sessions. They must still go (Linux parent-death
signal), so that a restart on the same ports and state directory comes up. The SuperLink keeps
its registrations in that directory: a holder's running ``node start`` keeps its node id and
reconnects by itself, and a key registered behind the member list's back is removed. Without
that state, the holder's SuperNode is refused and ``node start`` ends with an error, never
silently.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from processes import (
    add_holder,
    cli_ok,
    coordinator_flwr,
    free_port,
    start_coordinator,
    wait_exit,
    wait_nodes_online,
)

from fedsynth.client.node_cli import node_app
from fedsynth.protocol.deployment import die_with_parent, stop_process
from fedsynth.server.consortium import CoordinatorPaths
from fedsynth.server.coordinator_cli import coordinator_app
from fedsynth.server.superlink import CONNECTION_NAME

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


def _node_ids(log: Path) -> list[str]:
    return [
        ln.rsplit(" ", 1)[1] for ln in log.read_text().splitlines() if "registered alice:" in ln
    ]


def _start_node(tmp_path: Path, coord: Path, link_port: int) -> subprocess.Popen[bytes]:
    alice = tmp_path / "alice"
    (alice / "roster.json").write_bytes(CoordinatorPaths(coord).roster.read_bytes())
    (tmp_path / "data.jsonl").write_text('{"text": "fine", "label": "positive"}\n')
    (tmp_path / "POLICY.toml").write_text("max_epsilon_per_task = 2.0\n")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with (tmp_path / "node.log").open("ab") as handle:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "fedsynth.simulations", "node", "start", str(alice)),
                *(
                    "--data",
                    str(tmp_path / "data.jsonl"),
                    "--policy",
                    str(tmp_path / "POLICY.toml"),
                ),
                *("--superlink", f"127.0.0.1:{link_port}", "--ca", str(coord / "ca.pem")),
                *("--port", str(free_port())),
            ],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),  # a killed test run leaves nothing running
        )


def test_a_killed_coordinator_leaves_no_server_and_restarts(tmp_path: Path) -> None:
    coord = tmp_path / "coord"
    cli_ok(coordinator_app, "init", str(coord))
    add_holder(coord, tmp_path / "alice", "alice")
    cli_ok(node_app, "init", str(tmp_path / "outsider"))
    link_port, synthesis_port = free_port(), free_port()
    coord_log, node_log = tmp_path / "coordinator.log", tmp_path / "node.log"
    start = start_coordinator(coord, link_port, synthesis_port, coord_log)
    node: subprocess.Popen[bytes] | None = None
    try:
        _wait_ready(coord, start, 1)
        assert _listening(link_port) and _listening(synthesis_port)
        [alice_id] = _node_ids(coord_log)
        node = _start_node(tmp_path, coord, link_port)
        wait_nodes_online(coord, [alice_id], [node], node_log)
        # A key registered behind the member list's back (as if its holder had been removed).
        outsider = coordinator_flwr(
            coord,
            "supernode",
            "register",
            str(tmp_path / "outsider" / "node.pub"),
            CONNECTION_NAME,
            "--format",
            "json",
        )
        assert '"success": true' in outsider.stdout, outsider.stdout + outsider.stderr
        servers = psutil.Process(start.pid).children()
        assert len(servers) == 2  # the SuperLink and the Synthesis service, each in its session
        assert all(os.getsid(s.pid) != os.getsid(start.pid) for s in servers)

        start.send_signal(signal.SIGKILL)  # the launcher only: no stop reaches the servers
        start.wait(timeout=10)
        _gone, alive = psutil.wait_procs(servers, timeout=60)
        assert not alive, [p.cmdline() for p in alive]
        assert not _listening(link_port) and not _listening(synthesis_port)

        # The same state directory and ports serve again; alice keeps her node id, her node
        # (never restarted) comes back online, and the outsider's key is gone.
        start = start_coordinator(coord, link_port, synthesis_port, coord_log)
        _wait_ready(coord, start, 2)
        assert _listening(link_port) and _listening(synthesis_port)
        assert _node_ids(coord_log) == [alice_id, alice_id]
        assert "unregistered 1 node(s)" in coord_log.read_text()
        wait_nodes_online(coord, [alice_id], [node], node_log)
        listed = coordinator_flwr(
            coord, "supernode", "ls", CONNECTION_NAME, "--format", "json"
        ).stdout
        status = {n["node-id"]: n["status"] for n in json.loads(listed)["nodes"]}
        assert sorted(status.values()) == ["online", "unregistered"], listed
        assert status[alice_id] == "online"

        # Without its state the SuperLink no longer knows alice's node: refused, her
        # `node start` ends with an error (a supervisor restarts it), never with success.
        stop_process(start)
        for path in coord.glob("superlink-state.db*"):
            path.unlink()
        start = start_coordinator(coord, link_port, synthesis_port, coord_log)
        _wait_ready(coord, start, 3)
        assert _node_ids(coord_log)[-1] != alice_id
        code = wait_exit(node, 180)
        assert code not in (None, 0), node_log.read_text(errors="replace")[-3000:]
        assert "the SuperNode stopped by itself" in node_log.read_text(errors="replace")
    finally:
        if node is not None:
            stop_process(node)
        stop_process(start)
    assert not _listening(link_port) and not _listening(synthesis_port)
