"""``fedsynth node``: a data holder's keys, its SuperNode, and what it has spent.

``init`` creates the node directory and prints the two public keys to send the operator;
``start`` checks everything, then runs the SuperNode with TLS pinned to the consortium's CA and
the holder's node key; ``status`` reads the holder's own budget store (never the coordinator's
word) and policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedsynth.client import node_dir
from fedsynth.client.policy_file import PolicyFile, load_policy_file
from fedsynth.client.supernode import DEFAULT_RUNTIME_PORT, start_supernode
from fedsynth.protocol.deployment import stop_process
from fedsynth.protocol.errors import FedSynthError
from fedsynth.protocol.identity import Roster

__all__ = ["node_app"]

node_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Data holder: node keys, the SuperNode, the holder's own budget.",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
)
_console = Console(soft_wrap=True)
_err = Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> NoReturn:
    _err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(2)


@node_app.command("init")
def init_command(
    directory: Annotated[Path, typer.Argument(help="New node directory (mode 0700).")],
) -> None:
    """Create the node-authentication key pair and the signing identity; print the public keys."""
    try:
        keys = node_dir.init(directory)
    except FedSynthError as exc:
        _fail(str(exc))
    _print_keys(keys)
    _console.print(
        "send node.pub and signing.pub to the operator and read both fingerprints to them "
        "over a second channel; put the roster.json they send back into this directory"
    )


def _print_keys(keys: node_dir.NodePublicKeys) -> None:
    _console.print(f"node directory: {escape(str(keys.paths.directory))}")
    _console.print(f"node public key ({escape(str(keys.paths.node_pub))}):")
    _console.print(f"  {keys.node_public_key}", soft_wrap=True)
    _console.print(f"  fingerprint {keys.node_fingerprint}")
    _console.print(f"signing public key ({escape(str(keys.paths.signing_pub))}):")
    _console.print(f"  {keys.signing_public_key.hex()}")
    _console.print(f"  fingerprint {keys.signing_fingerprint}")


@node_app.command("start")
def start_command(
    directory: Annotated[Path, typer.Argument(help="Node directory (from `node init`).")],
    data: Annotated[Path, typer.Option(help="The holder's private data file (jsonl/csv/parquet).")],
    policy: Annotated[Path, typer.Option(help="The holder's POLICY.toml.")],
    superlink: Annotated[str, typer.Option(help="The SuperLink's address HOST:PORT.")],
    ca: Annotated[Path, typer.Option(help="The consortium's CA certificate (ca.pem).")],
    port: Annotated[
        int, typer.Option(help="Local runtime API port (one per SuperNode on a machine).")
    ] = DEFAULT_RUNTIME_PORT,
    model: Annotated[
        str | None, typer.Option(help="Model name or path (default: the run's model).")
    ] = None,
    text_field: Annotated[str, typer.Option(help="Text column of --data.")] = "text",
    label_field: Annotated[str, typer.Option(help="Label column of --data.")] = "label",
) -> None:
    """Start a SuperNode: TLS pinned to --ca, authenticated by the node key, policy enforced."""
    try:
        process = start_supernode(
            directory,
            data=data,
            policy=policy,
            superlink=superlink,
            ca=ca,
            port=port,
            model=model,
            text_field=text_field,
            label_field=label_field,
        )
    except FedSynthError as exc:
        _fail(str(exc))
    try:
        code = process.wait()
    except KeyboardInterrupt:
        _console.print("stopping the SuperNode")
        code = 0
    finally:
        stop_process(process)
    if code != 0:
        _fail(f"the SuperNode exited with status {code}")


@node_app.command("status")
def status_command(
    directory: Annotated[Path, typer.Argument(help="Node directory.")],
    policy: Annotated[
        Path | None,
        typer.Option(help="The POLICY.toml the node runs with.", show_default="DIR/POLICY.toml"),
    ] = None,
) -> None:
    """Show the budget spent, every task charged, and the models the policy allows."""
    paths = node_dir.NodePaths(Path(directory))
    try:
        keys = node_dir.public_keys(paths.directory)
    except FedSynthError as exc:
        _fail(str(exc))
    _print_keys(keys)
    if paths.roster.is_file():
        try:
            roster = Roster.load(paths.roster)
            _console.print(f"roster: {len(roster)} holders, digest {roster.digest()}")
        except FedSynthError as exc:
            _console.print(f"roster: [red]unreadable[/red] ({escape(str(exc))})")
    else:
        _console.print("roster: missing (copy the operator's roster.json here)")
    policy_path = policy or paths.directory / "POLICY.toml"
    loaded: PolicyFile | None = None
    if policy_path.is_file():
        try:
            loaded = load_policy_file(policy_path)
        except FedSynthError as exc:
            _fail(str(exc))
    budget_path = (loaded.budget_path if loaded else None) or paths.budget
    _print_budget(budget_path, loaded)
    if loaded is None:
        _console.print(
            f"policy: no policy file at {escape(str(policy_path))} (pass --policy); allowed "
            "models and caps unknown"
        )
    else:
        p = loaded.policy
        prints = ", ".join(p.allowed_fingerprints) or "none listed (the local model's only)"
        _console.print(f"policy ({escape(str(policy_path))}):")
        _console.print(f"  allowed model fingerprints: {prints}")
        _console.print(
            f"  caps: epsilon {p.max_epsilon_per_task:g} per task, {p.max_total_epsilon:g} in "
            f"total; delta {p.max_delta:g}; t >= {p.min_threshold}; K >= {p.min_holders}; "
            f"modes {', '.join(p.allowed_modes)}; non-private "
            f"{'ALLOWED' if p.allow_non_private else 'refused'}"
        )
    log_file = loaded.log_file if loaded else None
    _console.print(
        "refusals: not recorded in the budget store (it records charges and answered PE "
        "rounds only); "
        + (
            f"their details are in the node's log {escape(str(log_file))}"
            if log_file
            else "set log_file in the policy to keep their details in a file"
        )
    )


def _print_budget(budget_path: Path, loaded: PolicyFile | None) -> None:
    if not budget_path.is_file():
        _console.print(f"budget store {escape(str(budget_path))}: none yet (no task charged)")
        return
    from fedsynth.client.budget import ClientBudget  # loads the accountant

    budget = ClientBudget(budget_path)
    try:
        entries = budget.entries()
        spent = budget.spent()
    except FedSynthError as exc:
        _fail(str(exc))
    cap = f" of {loaded.policy.max_total_epsilon:g}" if loaded else ""
    _console.print(f"budget store {escape(str(budget_path))}: epsilon spent {spent:.4g}{cap}")
    table = Table("task", "kind", "epsilon", "delta", "mode / round")
    for row in entries:
        if row.get("kind") == "pe-round":
            table.add_row(str(row["task_id"]), "PE round answered", "", "", str(row["round"]))
        else:
            table.add_row(
                str(row["task_id"]),
                "charged",
                str(row["epsilon"]),
                f"{row['delta']:g}" if isinstance(row.get("delta"), float) else "",
                str(row.get("mode", "")),
            )
    _console.print(table)
