"""``fedsynth coordinator``: set up a consortium, admit holders, start the SuperLink.

The operator runs ``init`` once, ``add-node`` for each holder (with the two public keys the
holder's ``fedsynth node init`` printed; compare the fingerprints over a second channel), sends
every holder ``ca.pem`` and ``roster.json``, then ``start``. TLS and node authentication are on
unless ``--insecure`` is given explicitly (a warning is printed; it is never a fallback).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from fedsynth.protocol.errors import FedSynthError
from fedsynth.server import consortium
from fedsynth.server.pki import DEFAULT_HOSTS
from fedsynth.server.superlink import CONNECTION_NAME, DEFAULT_PORT, start_superlink

__all__ = ["coordinator_app"]

coordinator_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Coordinator operator: CA and certificates, consortium roster, SuperLink.",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
)
_console = Console(soft_wrap=True)
_err = Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> NoReturn:
    _err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(2)


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
    """Create a CA, the SuperLink's TLS certificate and key, and an empty consortium."""
    hosts = list(host) if host else list(DEFAULT_HOSTS)
    try:
        paths = consortium.init(directory, hosts)
    except FedSynthError as exc:
        _fail(str(exc))
    _console.print(f"coordinator directory: {escape(str(paths.directory))}")
    _console.print(f"  CA certificate (send to every holder): {escape(str(paths.ca_cert))}")
    _console.print(f"  SuperLink certificate for {escape(', '.join(hosts))}")
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
) -> None:
    """Start the SuperLink with TLS and node authentication; register every holder's key."""
    if insecure:
        _err.print(
            "[yellow]warning:[/yellow] --insecure: TLS is OFF. Contributions and node "
            "authentication travel unencrypted and holders cannot verify this SuperLink. "
            "Use only on a closed test network."
        )
    try:
        link = start_superlink(directory, host=host, port=port, insecure=insecure)
    except FedSynthError as exc:
        _fail(str(exc))
    try:
        _console.print(
            f"SuperLink on {escape(host)}:{port} ({'INSECURE' if insecure else 'TLS'}, node "
            f"authentication on); log: {escape(str(link.log_path))}"
        )
        for name, node_id in link.node_ids.items():
            _console.print(f"  registered {escape(name)}: node id {node_id}")
        _console.print(
            f"flwr connection {CONNECTION_NAME!r}: FLWR_HOME={escape(str(link.flwr_home))}"
        )
        _console.print("Ctrl-C stops it.")
        while link.process.poll() is None:
            time.sleep(1.0)
        _fail(f"the SuperLink exited with status {link.process.returncode}; see {link.log_path}")
    except KeyboardInterrupt:
        _console.print("stopping the SuperLink")
    finally:
        link.stop()
