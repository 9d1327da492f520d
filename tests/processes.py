"""Helpers shared by the tests that start real SuperLinks, SuperNodes and services."""

from __future__ import annotations

import socket
import subprocess

from typer.testing import CliRunner


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
