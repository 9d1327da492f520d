"""Helpers shared by the tests that start real SuperLinks, SuperNodes and services."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from typer.testing import CliRunner

from fedsynth.protocol.deployment import die_with_parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli_ok(app: object, *args: str) -> str:
    """Run a typer app in-process; its output (the command must succeed)."""
    result = CliRunner().invoke(app, list(args))  # type: ignore[arg-type]
    assert result.exit_code == 0, result.output
    return result.output


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The process's exit status, or None if it still runs after ``timeout`` seconds."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def add_holder(coord: Path, directory: Path, name: str) -> None:
    """``node init DIRECTORY`` for a holder, then the operator's ``add-node`` of its keys."""
    from fedsynth.client.node_cli import node_app
    from fedsynth.server.coordinator_cli import coordinator_app

    cli_ok(node_app, "init", str(directory))
    cli_ok(
        coordinator_app,
        "add-node",
        str(coord),
        "--name",
        name,
        "--node-public-key",
        str(directory / "node.pub"),
        "--signing-public-key",
        str(directory / "signing.pub"),
    )


def coordinator_flwr(coord: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``flwr ARGS`` with the coordinator directory's Flower connection (as the operator)."""
    from fedsynth.protocol.deployment import flower_environment

    return subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), *args],
        env=flower_environment(coord / "flwr-home"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def wait_nodes_online(
    coord: Path,
    node_ids: Sequence[int | str],
    procs: Sequence[subprocess.Popen[bytes]],
    log: Path,
    timeout: float = 180,
) -> None:
    """Wait until ``flwr supernode ls`` lists every node of ``node_ids`` online.

    A SuperNode that reconnects to a restarted SuperLink is not activated again, so the
    SuperLink's log does not show it; its status does. ``procs`` must keep running meanwhile.
    """
    deadline = time.monotonic() + timeout
    while True:
        listed = coordinator_flwr(coord, "supernode", "ls", "fedsynth", "--format", "json")
        try:
            nodes = json.loads(listed.stdout)["nodes"]
        except (ValueError, KeyError):
            nodes = []
        online = {str(n["node-id"]) for n in nodes if n.get("status") == "online"}
        if {str(i) for i in node_ids} <= online:
            return
        for proc in procs:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, listed.stdout + log.read_text(errors="replace")[-3000:]
        time.sleep(2)


def packages_loaded_by(modules: Sequence[str], packages: Sequence[str]) -> list[str]:
    """Which of ``packages`` (or any of their submodules) a fresh interpreter has loaded after
    importing ``modules``: how a test pins what a process start costs or may depend on."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        f"watched = {list(packages)!r}\n"
        "print(json.dumps(sorted(p for p in watched if any(m == p or m.startswith(p + '.') "
        "for m in sys.modules))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    loaded: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return loaded


def start_coordinator(
    coord: Path,
    link_port: int,
    synthesis_port: int,
    log: Path,
    *,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """``fedsynth coordinator start`` (tiny model) on 127.0.0.1 in its own session.

    Its output is appended to ``log``; the venv's scripts go first on PATH (the SuperLink
    starts Flower's helper executables by name).
    """
    environment = dict(os.environ if env is None else env)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    with log.open("ab") as handle:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedsynth.simulations",
                "coordinator",
                "start",
                str(coord),
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
                "--synthesis-port",
                str(synthesis_port),
                "--model",
                "tiny-llama",
            ],
            env=environment,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),  # a killed test run leaves nothing running
        )
