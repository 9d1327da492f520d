"""The coordinator's Synthesis service as a child process of ``fedsynth coordinator start``.

``coordinator init`` gives the service its own TLS certificate (issued by the consortium's CA
for the same host names as the SuperLink's, so a consumer pins the one ``ca.pem``) and a bearer
token file (mode 0600) the operator hands to consumers. ``coordinator start`` checks those files
before anything starts, then runs ``fedsynth synthesis serve`` over the coordinator's release
directory in its own process group next to the SuperLink, and stops both together.

Files, command line and the exit report are pure; starting, readiness and the token file's I/O
are at the bottom. The service itself is :mod:`fedsynth.server.synthesis_service`; this module
only wires it.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fedsynth.protocol.deployment import die_with_parent, load_certificate, stop_process
from fedsynth.protocol.errors import CertificateError, ConfigError
from fedsynth.server.pki import (
    DEFAULT_HOSTS,
    issue_server_certificate,
    load_private_key,
    load_server_credentials,
    write_certificate,
    write_private_key,
)
from fedsynth.server.synthesis_client import read_token_file

__all__ = [
    "DEFAULT_SYNTHESIS_PORT",
    "RunningSynthesis",
    "SynthesisFiles",
    "check_synthesis_files",
    "exit_report",
    "init_synthesis",
    "start_synthesis",
    "synthesis_command",
]

DEFAULT_SYNTHESIS_PORT: Final = 50061
"""Port of the Synthesis service (``fedsynth synthesis serve``'s default)."""

TOKEN_BYTES: Final = 32
"""Random bytes of a consumer token (256 bits; 43 URL-safe characters)."""

_TAIL_CHARS: Final = 300  # the most of a log line an exit report quotes


@dataclass(frozen=True)
class SynthesisFiles:
    """Where a coordinator directory keeps the Synthesis service's files."""

    directory: Path

    @property
    def cert(self) -> Path:
        """The service's TLS certificate, signed by the consortium's CA."""
        return self.directory / "synthesis.pem"

    @property
    def key(self) -> Path:
        """The service's TLS private key (0600)."""
        return self.directory / "synthesis.key"

    @property
    def token(self) -> Path:
        """Consumers' bearer tokens, one per line (0600; hand one line to each consumer)."""
        return self.directory / "synthesis.token"

    @property
    def releases(self) -> Path:
        """The default release directory (a task file's ``store.dir`` names it)."""
        return self.directory / "releases"

    @property
    def log(self) -> Path:
        """The service's log."""
        return self.directory / "synthesis.log"


def synthesis_command(
    files: SynthesisFiles,
    *,
    releases: Path,
    model: str,
    host: str,
    port: int,
    python: str = sys.executable,
) -> list[str]:
    """The command line that serves ``releases`` with TLS from ``files`` and their token file.

    There is no insecure variant: a consortium's Synthesis service always speaks TLS.
    """
    return [
        python,
        "-m",
        "fedsynth.server.synthesis_process",
        "serve",
        "--releases",
        str(Path(releases).absolute()),
        "--model",
        model,
        "--token-file",
        str(files.token.absolute()),
        "--host",
        host,
        "--port",
        str(port),
        "--tls-cert",
        str(files.cert.absolute()),
        "--tls-key",
        str(files.key.absolute()),
    ]


def last_line(text: str) -> str:
    """The last non-empty line of ``text``, at most ``_TAIL_CHARS`` characters ('' if none)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1]
    return line if len(line) <= _TAIL_CHARS else line[: _TAIL_CHARS - 3] + "..."


def exit_report(name: str, code: int, log: Path, log_text: str, *, stopped: str) -> str:
    """One line saying which process ended, how, what it last logged, and what was stopped."""
    tail = last_line(log_text)
    said = f" ({tail})" if tail else ""
    return f"the {name} exited with status {code}{said}; stopped the {stopped} too; log: {log}"


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _write_token(path: Path) -> None:
    """Create ``path`` holding one fresh token, mode 0600 from the first byte; never overwrite."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ConfigError(f"token_file={path}: cannot create ({exc.strerror})") from None
    try:
        os.write(fd, (token + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def init_synthesis(
    directory: Path, *, ca_cert: Path, ca_key: Path, hosts: Sequence[str] = DEFAULT_HOSTS
) -> SynthesisFiles:
    """Issue the service's certificate for ``hosts`` from the CA and create its token file.

    Raises:
        CertificateError: A file already exists (nothing is overwritten), the CA files cannot
            be read, or a host is malformed.
        ConfigError: The token file cannot be created.
    """
    files = SynthesisFiles(Path(directory))
    existing = [p for p in (files.cert, files.key, files.token) if p.exists()]
    if existing:
        raise CertificateError(
            f"{existing[0]} already exists; refusing to overwrite the Synthesis service's files"
        )
    key, cert = issue_server_certificate(
        load_private_key(ca_key), load_certificate(ca_cert), list(hosts)
    )
    write_private_key(files.key, key)
    write_certificate(files.cert, cert)
    _write_token(files.token)
    files.releases.mkdir(mode=0o700, exist_ok=True)
    return files


def check_synthesis_files(files: SynthesisFiles, *, ca_cert: Path, host: str) -> None:
    """Refuse to start with a certificate or token file that would fail once consumers come.

    Raises:
        CertificateError: The certificate expired, is not signed by the CA, does not name
            ``host``, or its key does not match (naming the file).
        ConfigError: The token file is missing, readable by others or holds a short token.
    """
    for path in (files.cert, files.key):
        if not path.is_file():
            raise CertificateError(
                f"{path} is missing: this coordinator directory predates the Synthesis service; "
                "issue its files with `fedsynth coordinator init` in a new directory, or start "
                "with --no-synthesis"
            )
    load_server_credentials(ca_cert, files.cert, files.key, hosts=[host])
    read_token_file(files.token)


# ---------------------------------------------------------------------------------------------
# The process
# ---------------------------------------------------------------------------------------------


@dataclass
class RunningSynthesis:
    """A started Synthesis service process (own process group) and where it listens."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path

    def ready(self) -> bool:
        """Whether the service accepts connections yet (it loads the model first)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the service and its children."""
        stop_process(self.process)


def start_synthesis(
    directory: Path,
    *,
    releases: Path,
    model: str,
    host: str,
    connect_host: str,
    port: int = DEFAULT_SYNTHESIS_PORT,
    env: dict[str, str] | None = None,
) -> RunningSynthesis:
    """Check the service's files, then start it; it listens once its model is loaded.

    ``connect_host`` is where this machine reaches it (the certificate must name it).

    Raises:
        CertificateError, ConfigError: See :func:`check_synthesis_files` (nothing started).
    """
    files = SynthesisFiles(Path(directory))
    check_synthesis_files(files, ca_cert=files.directory / "ca.pem", host=connect_host)
    releases = Path(releases)
    releases.mkdir(mode=0o700, parents=True, exist_ok=True)
    command = synthesis_command(files, releases=releases, model=model, host=host, port=port)
    with files.log.open("ab") as handle:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),  # SIGTERM when this process dies (Linux)
            cwd=files.directory,
        )
    return RunningSynthesis(process=process, host=connect_host, port=port, log_path=files.log)


def main() -> None:
    """``python -m fedsynth.server.synthesis_process serve ...``: the service's own command."""
    from fedsynth.server.synthesis_client import synthesis_app

    synthesis_app(prog_name="fedsynth synthesis")


if __name__ == "__main__":
    main()
