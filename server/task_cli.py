"""The operator's commands: ``fedsynth task run|validate TASK.toml`` and ``fedsynth ledger DIR``.

``task run`` checks the task file, then starts ``flwr run`` of the fedsynth app against a named
Flower connection (a SuperLink in ``$FLWR_HOME/config.toml``) with the task file's path in the
run config; the ServerApp on the coordinator's machine reads it and runs the production
coordinator (:mod:`fedsynth.server.task_runner`). ``task validate`` only checks and prints the
task. ``ledger`` prints every release the coordinator's ledger records.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fedsynth.protocol.cli_common import console
from fedsynth.protocol.cli_common import fail as _fail
from fedsynth.protocol.errors import FedSynthError
from fedsynth.server.ledger import LEDGER_FILE, ledger_rows

if TYPE_CHECKING:  # the task file module pulls in the model code: loaded only when used
    from fedsynth.server.task_file import TaskSpec

task_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run or check an operator's task file (TASK.toml) against a Flower federation.",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def app_dir() -> Path:
    """The fedsynth Flower app: the project folder whose pyproject.toml declares the apps."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        _fail(f"no pyproject.toml in {root}; pass the fedsynth app folder with --app DIR")
    return root


def run_config_args(spec: TaskSpec, task_path: Path) -> list[str]:
    """``--run-config`` arguments for ``flwr run``: the task file and what the holders load.

    The holders take the model (and PE's embedder) named here only where their own node
    config names none; every privacy term reaches them in the signed-off manifest.
    """
    values = {**spec.to_run_config(task_path), "model": spec.model}
    if spec.method == "pe":
        values["embedder"] = spec.pe.embedder
    args: list[str] = []
    for key, value in values.items():
        if '"' in value or "\n" in value:
            _fail(f"{key}={value!r}: a double quote or newline cannot pass through flwr run")
        args += ["--run-config", f'{key}="{value}"']
    return args


def flwr_run_command(
    spec: TaskSpec,
    task_path: Path,
    *,
    app: Path,
    federation: str | None,
    flwr: str = "flwr",
    stream: bool = True,
) -> list[str]:
    """The ``flwr run`` command line that runs ``spec`` (pure: nothing is started)."""
    command = [flwr, "run", str(app)]
    if federation:
        command.append(federation)
    if stream:
        command.append("--stream")
    return command + run_config_args(spec, task_path)


def _load(path: Path) -> TaskSpec:
    try:
        from fedsynth.server.task_file import load_task

        return load_task(path)
    except FedSynthError as exc:
        _fail(str(exc))


def _task_table(spec: TaskSpec, path: Path) -> Table:
    table = Table(title=f"task {path}", show_header=False)
    table.add_column("setting", style="bold")
    table.add_column("value")
    from fedsynth.server.task_file import describe

    for setting, value in describe(spec):
        table.add_row(setting, escape(value))
    return table


@task_app.command("validate")
def validate(
    task: Annotated[Path, typer.Argument(help="The task file (TASK.toml).", show_default=False)],
) -> None:
    """Check a task file and print what the holders will be asked; nothing runs."""
    spec = _load(task)
    console.print(_task_table(spec, task))
    console.print("[green]task file is valid[/green]")


@task_app.command("run")
def run(
    task: Annotated[Path, typer.Argument(help="The task file (TASK.toml).", show_default=False)],
    federation: Annotated[
        str | None,
        typer.Option(
            "--federation",
            "--superlink",
            help="Named Flower connection in $FLWR_HOME/config.toml (default: flwr's default).",
        ),
    ] = None,
    app: Annotated[
        Path | None,
        typer.Option(help="The fedsynth Flower app folder (default: this installation's)."),
    ] = None,
    stream: Annotated[bool, typer.Option(help="Stream the ServerApp's log.")] = True,
) -> None:
    """Run one task through Flower: a release in the coordinator's store and a ledger row."""
    spec = _load(task)
    console.print(_task_table(spec, task))
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or shutil.which("flwr")
    if flwr is None:
        _fail("the flwr command is not installed (pip install 'flwr[simulation]')")
    command = flwr_run_command(
        spec,
        task.resolve(),
        app=app or app_dir(),
        federation=federation,
        flwr=flwr,
        stream=stream,
    )
    console.print(f"running: {escape(' '.join(command))}")
    if not stream:
        code = subprocess.run(command, check=False).returncode
        if code != 0:
            _fail(f"flwr run exited with status {code}")
        console.print("run started; follow it with `flwr log RUN_ID` (RUN_ID printed above)")
        return
    from fedsynth.server.flwr_runs import run_streaming

    outcome = run_streaming(command, flwr=flwr, federation=federation)
    if not outcome.completed:  # flwr run exits 0 even when the ServerApp raised
        _fail(
            f"flwr run exited with status {outcome.returncode}; run {outcome.run_id} ended "
            f"{outcome.status or 'with an unknown status'} {outcome.details}".rstrip()
            + "; see the ServerApp's log above"
        )
    console.print(f"release and ledger row in {escape(str(spec.store_dir))}")


def ledger_table(rows: list[dict[str, object]], *, title: str) -> Table:
    """One row per release: id, date, method, ε, δ, mode, participants, refusals, digest."""
    table = Table(title=title)
    for column in (
        "id",
        "date",
        "method",
        "ε",
        "δ",
        "mode",
        "participants",
        "refusals",
        "digest",
    ):
        table.add_column(column)
    for row in rows:
        refusals = row.get("refusals") or {}
        by_category = (
            ", ".join(f"{k} {v}" for k, v in refusals.items())
            if isinstance(refusals, dict)
            else str(refusals)
        )
        digest = str(row.get("digest") or "(none: charged, not published)")
        table.add_row(
            escape(str(row["task_id"])),
            str(row["created"]),
            str(row["method"]),
            str(row["epsilon"]),
            f"{float(str(row['delta'])):g}",
            str(row["trust_mode"]),
            str(row["survivors"]),
            escape(by_category or "none"),
            escape(digest[:23] + "…" if len(digest) > 24 else digest),
        )
    return table


def ledger_command(
    folder: Annotated[
        Path,
        typer.Argument(
            help=f"The coordinator's store (holding {LEDGER_FILE}) or the ledger file itself.",
            show_default=False,
        ),
    ],
) -> None:
    """Print every release the coordinator's ledger records."""
    try:
        rows = ledger_rows(folder)
    except FedSynthError as exc:
        _fail(str(exc))
    console.print(ledger_table(rows, title=f"releases in {folder}"))
    if not rows:
        console.print("no releases recorded")
