"""``fedsynth node``: a data holder's keys, its SuperNode, and what it has spent.

``init`` creates the node directory and prints the two public keys to send the operator;
``start`` checks everything, then runs the SuperNode with TLS pinned to the consortium's CA and
the holder's node key; ``status`` reads the holder's own budget store (never the coordinator's
word) and policy; ``fetch-model`` gets the model a task names and prints the fingerprint the
node will compare with the task's manifest.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fedsynth.client import app_pin, node_dir
from fedsynth.client.model_fetch import fetch_model
from fedsynth.client.policy_file import PolicyFile, load_policy_file
from fedsynth.client.supernode import DEFAULT_RUNTIME_PORT, node_pin, start_supernode
from fedsynth.protocol.cli_common import console as _console
from fedsynth.protocol.cli_common import errors_at_the_edge
from fedsynth.protocol.cli_common import fail as _fail
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
_TRUSTED_APP_HELP = (
    "App bundle the node runs: its SHA-256 (flwr build + sha256sum), a .fab file or an app "
    "directory; repeat for several."
)


@node_app.command("init")
def init_command(
    directory: Annotated[Path, typer.Argument(help="New node directory (mode 0700).")],
    trusted_app: Annotated[
        list[str] | None,
        typer.Option(
            help=_TRUSTED_APP_HELP + " Written to DIR/trusted-app.toml.",
            show_default="the installed fedsynth's bundle",
        ),
    ] = None,
) -> None:
    """Create the node-authentication key pair and the signing identity; print the public keys."""
    try:
        hashes = app_pin.pin_hashes(trusted_app) if trusted_app else None
        keys = node_dir.init(directory)
        if hashes:
            app_pin.write_pin_file(keys.paths.trusted_app, hashes)
    except FedSynthError as exc:
        _fail(str(exc))
    _print_keys(keys)
    _print_pin(keys.paths)
    _console.print(
        "send node.pub and signing.pub to the operator and read both fingerprints to them "
        "over a second channel; put the roster.json they send back into this directory"
    )
    _console.print(
        "then write POLICY.toml (README, deployment): two terms have defaults worth a second "
        "look: max_colluders = 0 assumes no holder sides with the coordinator (one that does "
        "leaves (t − 1)/t of the noise), and masked_input_reply_s = 0 answers a masked input "
        "when it is computed, so its time tells your record count (set it above your longest "
        "contribution, which your node's log reports)"
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
    trusted_app: Annotated[
        list[str] | None,
        typer.Option(
            help=_TRUSTED_APP_HELP, show_default="DIR/trusted-app.toml, else the installed bundle"
        ),
    ] = None,
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
            trusted_apps=trusted_app,
        )
    except FedSynthError as exc:
        _fail(str(exc))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it too
    try:
        code = process.wait()
    except KeyboardInterrupt:
        _console.print("stopping the SuperNode")
        return
    finally:
        stop_process(process)
    # Nobody asked it to stop, so the node no longer serves its holder: never a success, so
    # that a supervisor's restart-on-failure starts it again.
    _fail(unexpected_exit_message(code, superlink))


def unexpected_exit_message(code: int, superlink: str) -> str:
    """Why a SuperNode that nobody stopped has ended, and what the holder does about it."""
    return (
        f"the SuperNode stopped by itself (status {code}) and no longer serves this node: "
        f"Flower's SuperNode ends when the SuperLink {superlink} refuses its node key (the "
        "coordinator lost its registrations or removed this node) or the TLS handshake fails; "
        "its log above says which. Run `fedsynth node start` under a supervisor that restarts "
        "it on failure (systemd Restart=on-failure)."
    )


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
    _print_pin(paths)
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
        reply = (
            f"{p.masked_input_reply_s:g} s after it arrives"
            if p.masked_input_reply_s
            else "at once (its time tells the task's record count)"
        )
        _console.print(f"policy ({escape(str(policy_path))}):")
        _console.print(f"  allowed model fingerprints: {prints}")
        _console.print(
            f"  caps: epsilon {p.max_epsilon_per_task:g} per task, {p.max_total_epsilon:g} in "
            f"total; delta {p.max_delta:g} per task, {p.max_total_delta:g} in total; "
            f"t >= {p.min_threshold}; K >= {p.min_holders}; "
            f"records <= {p.max_records}; colluders assumed {p.max_colluders}; "
            f"masked input answered {reply}; "
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


def _print_pin(paths: node_dir.NodePaths) -> None:
    """The app bundles the node runs, and how the operator's side computes the same hash."""
    source = (
        escape(str(paths.trusted_app))
        if paths.trusted_app.is_file()
        else "built from the installed fedsynth's source"
    )
    try:
        pin = node_pin(paths)
    except FedSynthError as exc:
        _console.print(f"trusted app: [red]none[/red] ({escape(str(exc))})")
        return
    _console.print(f"trusted app ({source}): {pin.describe()}")
    _console.print(
        "  compare with the operator's: flwr build in a clean checkout of that release, then "
        "sha256sum the .fab"
    )


def _print_budget(budget_path: Path, loaded: PolicyFile | None) -> None:
    if not budget_path.is_file():
        _console.print(f"budget store {escape(str(budget_path))}: none yet (no task charged)")
        return
    from fedsynth.client.budget import ClientBudget  # loads the accountant

    budget = ClientBudget(budget_path)
    try:
        entries = budget.entries()
        spent, spent_delta = budget.spending()
    except FedSynthError as exc:
        _fail(str(exc))
    cap = f" of {loaded.policy.max_total_epsilon:g}" if loaded else ""
    delta_cap = f" of {loaded.policy.max_total_delta:g}" if loaded else ""
    _console.print(
        f"budget store {escape(str(budget_path))}: epsilon spent {spent:.4g}{cap}, "
        f"delta spent {spent_delta:.4g}{delta_cap}"
    )
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


@node_app.command("fetch-model")
def fetch_model_command(
    name: Annotated[
        str,
        typer.Argument(
            help="The model the task names: gemma3-270m or smollm2-135m (from their installed "
            "packages), tiny-llama or tiny-gpt2 (tests), or a local model directory."
        ),
    ],
    cache: Annotated[
        Path | None,
        typer.Option(
            help="Model cache directory; start the node with the same FEDSYNTH_CACHE.",
            show_default="$FEDSYNTH_CACHE or ~/.cache/fedsynth",
        ),
    ] = None,
) -> None:
    """Get a model (converted once from its package, never from a hub); print its fingerprint.

    The fingerprint is the one the node compares with every task manifest: compare it with the
    operator's and list it in POLICY.toml's allowed_fingerprints.
    """
    if cache is not None:
        os.environ["FEDSYNTH_CACHE"] = str(cache)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # packaged or local only, no hub
        os.environ[key] = "1"
    with errors_at_the_edge():  # an unknown name, a missing package, a cache it cannot write
        fetched = fetch_model(name)
    where = f" in {fetched.location}" if fetched.location else ""
    _console.print(f"model {fetched.name}: {fetched.source}{where}", markup=False, highlight=False)
    _console.print(f"fingerprint {fetched.fingerprint}", markup=False, highlight=False)
    _console.print(
        f"  of which the tokenizer's {fetched.tokenizer_fingerprint}", markup=False, highlight=False
    )
    _console.print(
        f"(the weights as loaded on {fetched.device} and the tokenizer, as the node's "
        "ClientApp loads them) compare it with the fingerprint the operator gives for the task; "
        "list it in POLICY.toml's allowed_fingerprints",
        markup=False,
        highlight=False,
    )
