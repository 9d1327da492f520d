"""``fedsynth coordinator``: set up a consortium, admit holders, start SuperLink and Synthesis.

The operator runs ``init`` once, ``add-node`` for each holder (with the two public keys the
holder's ``fedsynth node init`` printed; compare the fingerprints over a second channel), sends
every holder ``ca.pem`` and ``roster.json``, then ``start``. TLS and node authentication are on
unless ``--insecure`` is given explicitly (a warning is printed; it is never a fallback).

``start`` also runs the Synthesis service over the coordinator's release directory, with its
own certificate from the consortium's CA and the bearer tokens in ``synthesis.token`` (both made
by ``init``). The two processes live and die together: when either exits, the other is stopped
and one line says which one ended and why.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.markup import escape

from fedsynth.protocol.cli_common import console as _console
from fedsynth.protocol.cli_common import err_console as _err
from fedsynth.protocol.cli_common import fail as _fail
from fedsynth.protocol.errors import FedSynthError
from fedsynth.server import consortium
from fedsynth.server.pki import DEFAULT_HOSTS
from fedsynth.server.superlink import (
    CONNECTION_NAME,
    DEFAULT_PORT,
    RunningSuperLink,
    connect_host,
    start_superlink,
)
from fedsynth.server.synthesis_process import (
    DEFAULT_SYNTHESIS_PORT,
    RunningSynthesis,
    SynthesisFiles,
    check_synthesis_files,
    exit_report,
    init_synthesis,
    start_synthesis,
)

__all__ = ["coordinator_app"]

coordinator_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Coordinator operator: CA and certificates, consortium roster, SuperLink.",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
)


@coordinator_app.command("init")
def init_command(
    directory: Annotated[Path, typer.Argument(help="New coordinator directory (mode 0700).")],
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="DNS name or IP the SuperLink's certificate names (repeat for several).",
            show_default=" ".join(DEFAULT_HOSTS),
        ),
    ] = None,
) -> None:
    """Create a CA, TLS certificates for SuperLink and Synthesis, a token, an empty consortium."""
    hosts = list(host) if host else list(DEFAULT_HOSTS)
    try:
        paths = consortium.init(directory, hosts)
        synthesis = init_synthesis(
            paths.directory, ca_cert=paths.ca_cert, ca_key=paths.ca_key, hosts=hosts
        )
    except FedSynthError as exc:
        _fail(str(exc))
    _console.print(f"coordinator directory: {escape(str(paths.directory))}")
    _console.print(f"  CA certificate (send to every holder): {escape(str(paths.ca_cert))}")
    _console.print(f"  SuperLink and Synthesis certificates for {escape(', '.join(hosts))}")
    _console.print(
        f"  Synthesis bearer token (mode 0600; give it to consumers with ca.pem): "
        f"{escape(str(synthesis.token))}"
    )
    _console.print(
        f"  release directory (a task file's store.dir): {escape(str(synthesis.releases))}"
    )
    _console.print("next: fedsynth coordinator add-node DIR --name NAME ... for each holder")


@coordinator_app.command("add-node")
def add_node_command(
    directory: Annotated[Path, typer.Argument(help="Coordinator directory.")],
    name: Annotated[str, typer.Option(help="The holder's name in the roster.")],
    node_public_key: Annotated[
        Path, typer.Option(help="The holder's node.pub (OpenSSH EC P-384, Flower node auth).")
    ],
    signing_public_key: Annotated[
        Path, typer.Option(help="The holder's signing.pub (Ed25519 PEM, secure-sum signatures).")
    ],
) -> None:
    """Admit a holder: check both keys, refuse a repeated name or key, update the roster."""
    try:
        member = consortium.add_node(directory, name, node_public_key, signing_public_key)
        roster = consortium.load_consortium(directory).roster()
    except FedSynthError as exc:
        _fail(str(exc))
    _console.print(f"added {escape(member.name)} ({member.added})")
    _console.print(f"  node key fingerprint:    {member.node_fingerprint}")
    _console.print(f"  signing key fingerprint: {member.signing_fingerprint}")
    _console.print("  compare both with the holder over a second channel (a call)")
    _console.print(
        f"roster: {len(roster)} holders, digest {roster.digest()}; send "
        f"{escape(str(consortium.CoordinatorPaths(directory).roster))} to every holder"
    )


@coordinator_app.command("start")
def start_command(
    directory: Annotated[Path, typer.Argument(help="Coordinator directory.")],
    host: Annotated[
        str, typer.Option(help="Address the SuperLink listens on (0.0.0.0: every interface).")
    ],
    port: Annotated[int, typer.Option(help="The SuperLink's port (Fleet and Control API).")] = (
        DEFAULT_PORT
    ),
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Turn TLS off (node authentication stays on). Never for real data.",
        ),
    ] = False,
    synthesis: Annotated[
        bool,
        typer.Option(
            "--synthesis/--no-synthesis",
            help="Also serve the releases to consumers (TLS and bearer token always on).",
        ),
    ] = True,
    synthesis_host: Annotated[
        str | None,
        typer.Option(help="Address the Synthesis service listens on.", show_default="--host"),
    ] = None,
    synthesis_port: Annotated[
        int, typer.Option(help="The Synthesis service's port.", min=1, max=65535)
    ] = DEFAULT_SYNTHESIS_PORT,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model the Synthesis service generates with: the model.name of your tasks "
            "(required unless --no-synthesis).",
            show_default=False,
        ),
    ] = None,
    releases: Annotated[
        Path | None,
        typer.Option(
            help="Release directory the tasks publish to (their store.dir).",
            show_default="DIR/releases",
        ),
    ] = None,
) -> None:
    """Start the SuperLink (TLS, node authentication, every holder registered) and Synthesis."""
    if insecure:
        _err.print(
            "[yellow]warning:[/yellow] --insecure: TLS is OFF. Contributions and node "
            "authentication travel unencrypted and holders cannot verify this SuperLink. "
            "Use only on a closed test network."
        )
    files = SynthesisFiles(Path(directory))
    link: RunningSuperLink | None = None
    service: RunningSynthesis | None = None
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C
    try:
        try:
            serve_host = synthesis_host or host
            if synthesis:  # a bad certificate or token file: refused before anything starts
                if not model:
                    _fail(
                        "--model: name the model your tasks use (their model.name), which the "
                        "Synthesis service generates with, or pass --no-synthesis"
                    )
                check_synthesis_files(
                    files, ca_cert=files.directory / "ca.pem", host=connect_host(serve_host)
                )
            link = start_superlink(directory, host=host, port=port, insecure=insecure)
            if synthesis:
                service = start_synthesis(
                    files.directory,
                    releases=releases or files.releases,
                    model=str(model),
                    host=serve_host,
                    port=synthesis_port,
                    connect_host=connect_host(serve_host),
                )
        except FedSynthError as exc:
            _fail(str(exc))
        _console.print(
            f"SuperLink on {escape(host)}:{port} ({'INSECURE' if insecure else 'TLS'}, node "
            f"authentication on); log: {escape(str(link.log_path))}"
        )
        for name, node_id in link.node_ids.items():
            _console.print(f"  registered {escape(name)}: node id {node_id}")
        if link.unregistered:
            ids = ", ".join(str(i) for i in link.unregistered)
            _console.print(
                f"  unregistered {len(link.unregistered)} node(s) of the saved state that are no "
                f"member's: {ids}"
            )
        _console.print(
            f"flwr connection {CONNECTION_NAME!r}: FLWR_HOME={escape(str(link.flwr_home))}"
        )
        if service is not None:
            _console.print(
                f"Synthesis service on {escape(serve_host)}:{synthesis_port} (TLS, bearer "
                f"tokens in {escape(str(files.token))}; model {escape(str(model))}; releases in "
                f"{escape(str(releases or files.releases))}) is loading its model; log: "
                f"{escape(str(service.log_path))}"
            )
        _console.print("Ctrl-C stops both.")
        _supervise(link, service)
    except KeyboardInterrupt:
        _console.print("stopping the SuperLink and the Synthesis service")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if service is not None:
            service.stop()
        if link is not None:
            link.stop()


def _supervise(link: RunningSuperLink, service: RunningSynthesis | None) -> NoReturn:
    """Wait until either process exits; stop the other and fail with one line."""
    announced = service is None
    while True:
        code = link.process.poll()
        if code is not None:
            if service is not None:
                service.stop()
            _fail(
                exit_report(
                    "SuperLink",
                    code,
                    link.log_path,
                    _read_log(link.log_path),
                    stopped="Synthesis service" if service is not None else "coordinator",
                )
            )
        if service is not None:
            code = service.process.poll()
            if code is not None:
                link.stop()
                _fail(
                    exit_report(
                        "Synthesis service",
                        code,
                        service.log_path,
                        _read_log(service.log_path),
                        stopped="SuperLink",
                    )
                )
            if not announced and service.ready():
                announced = True
                _console.print(f"Synthesis service ready on {service.host}:{service.port}")
        time.sleep(0.5)


def _read_log(path: Path, limit: int = 16_384) -> str:
    """The last ``limit`` bytes of a log ('' if it cannot be read)."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - limit))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
