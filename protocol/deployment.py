"""What both sides of a real deployment share: Flower's processes and the CA certificate.

The coordinator starts ``flower-superlink`` and each holder ``flower-supernode``; both find
Flower's executables, give them an environment without telemetry, wait for them and stop them
the same way. Both read PEM certificates and refuse one outside its validity window (the
holder checks the CA it pins before its node starts; the coordinator its whole chain).
"""

from __future__ import annotations

import ctypes
import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from cryptography import x509

from fedsynth.protocol.errors import CertificateError, DeploymentError

__all__ = [
    "check_is_ca",
    "check_validity",
    "describe_certificate",
    "die_with_parent",
    "find_executable",
    "flower_environment",
    "load_certificate",
    "stop_process",
    "utcnow",
    "wait_for_port",
]

MAX_PEM_BYTES: Final = 1024 * 1024
"""Largest certificate or key file read."""


def utcnow(now: dt.datetime | None) -> dt.datetime:
    """``now`` as an aware UTC datetime (the current time if None)."""
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise CertificateError(f"now={now!r} must be timezone-aware (UTC)")
    return now.astimezone(dt.UTC)


def describe_certificate(cert: x509.Certificate) -> str:
    """``certificate 'CN=...' (serial ...)``: how error messages name a certificate."""
    return f"certificate {cert.subject.rfc4514_string()!r} (serial {cert.serial_number:x})"


def check_validity(
    cert: x509.Certificate, *, now: dt.datetime | None = None, what: str | None = None
) -> None:
    """Refuse a certificate outside its validity window at ``now``.

    Raises:
        CertificateError: Naming the certificate, its window and the current time.
    """
    moment = utcnow(now)
    label = what or describe_certificate(cert)
    if moment > cert.not_valid_after_utc:
        raise CertificateError(
            f"{label} expired at {cert.not_valid_after_utc.isoformat()} (now "
            f"{moment.isoformat()}); issue a new one"
        )
    if moment < cert.not_valid_before_utc:
        raise CertificateError(
            f"{label} is not valid before {cert.not_valid_before_utc.isoformat()} (now "
            f"{moment.isoformat()}); check this machine's clock"
        )


def _read(path: Path, what: str) -> bytes:
    try:
        if path.stat().st_size > MAX_PEM_BYTES:
            raise CertificateError(f"{what} {path} exceeds {MAX_PEM_BYTES} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"{what} {path}: cannot read ({exc.strerror})") from None


def load_certificate(path: Path) -> x509.Certificate:
    """Read one PEM certificate.

    Raises:
        CertificateError: If the file is missing, too large or not a PEM certificate.
    """
    path = Path(path)
    data = _read(path, "certificate file")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertificateError(f"certificate file {path} is not a PEM certificate") from None


def check_is_ca(cert: x509.Certificate, *, what: str) -> None:
    """Refuse a certificate that is not a CA (basic constraints CA:TRUE).

    Raises:
        CertificateError: Naming ``what``.
    """
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertificateError(f"{what} is not a CA certificate (basic constraints CA:FALSE)")


def flower_environment(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: own FLWR_HOME, no telemetry, venv on PATH.

    The SuperLink starts helper executables (``flower-superexec``) by name, so the directory
    of this interpreter's scripts goes first on PATH.
    """
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
    )
    return env


def find_executable(name: str) -> str:
    """Path of a Flower executable beside this interpreter, else on PATH.

    Raises:
        DeploymentError: If it is not installed.
    """
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise DeploymentError(f"{name} is not installed (pip install 'flwr[simulation]')")
    return found


def wait_for_port(
    address: str, port: int, *, timeout_s: float, process: subprocess.Popen[bytes]
) -> None:
    """Wait until something listens on ``address:port``; fail early if ``process`` exits.

    Raises:
        DeploymentError: If the process exits or nothing listens within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeploymentError(
                f"the process exited with status {process.returncode} before listening on "
                f"{address}:{port} (see its log)"
            )
        try:
            with socket.create_connection((address, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise DeploymentError(f"nothing listens on {address}:{port} after {timeout_s:.0f}s")


_PR_SET_PDEATHSIG: Final = 1  # <linux/prctl.h>


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` after which Linux sends the child SIGTERM when this process dies.

    The long-running processes a command starts (the SuperLink, the Synthesis service) run in
    their own session, so that stopping them can signal their whole group; without this, a
    launcher killed with SIGKILL (no chance to stop them) would leave them listening. With it
    they get the same SIGTERM a normal stop sends and shut down the same way. ``None`` on other
    systems, where a killed launcher still leaves them running.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    parent = os.getpid()

    def arm() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:  # the launcher died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def stop_process(process: subprocess.Popen[bytes], *, timeout_s: float = 20.0) -> None:
    """Stop a process started in its own session: SIGTERM to its group, then SIGKILL."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        process.wait(timeout=timeout_s)
