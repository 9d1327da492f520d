"""Run every benchmark, print one table, write JSON: ``python -m benchmarks`` / ``fedsynth bench``.

Every module ``benchmarks/bench_*.py`` is found by name and must have
``figures(quick: bool) -> list[Figure]``. The benchmarks run one after the other in this
process. A benchmark that raises is reported by name (its traceback goes to stderr) and the
others still run; the exit status is then 1. Timings never fail the run: a target that is not
met shows as "NO" in the table and ``"met": false`` in the JSON, nothing more.

Run from the checkout's root (``python -m benchmarks``): another installed package (opacus)
also ships a top-level ``benchmarks`` package, and the current directory must come first.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import Figure

PACKAGE_DIR = Path(__file__).resolve().parent
SCHEMA_VERSION = 1


def discover() -> list[str]:
    """Names of every benchmark module (``bench_*.py`` beside this file), sorted."""
    return sorted(p.stem for p in PACKAGE_DIR.glob("bench_*.py"))


def short_name(module: str) -> str:
    """``bench_secagg`` -> ``secagg``: the name the table, the JSON and ``--only`` use."""
    return module.removeprefix("bench_")


@dataclass
class Outcome:
    """What one benchmark produced: its figures, or the error that stopped it."""

    name: str
    seconds: float
    figures: list[Figure] = field(default_factory=list)
    error: str | None = None


def run_one(module: str, *, quick: bool) -> Outcome:
    """Import ``benchmarks.<module>`` and call its ``figures(quick)``; never raises an Exception.

    A benchmark is a measurement, not privacy code: whatever it raises is caught here so the
    other benchmarks still run, and reported by name with its traceback on stderr.
    """
    name = short_name(module)
    start = time.perf_counter()
    try:
        loaded = importlib.import_module(f"benchmarks.{module}")
        make = getattr(loaded, "figures", None)
        if not callable(make):
            raise TypeError(f"benchmarks/{module}.py has no figures(quick) function")
        rows = list(make(quick))
        if not rows:
            raise ValueError(f"benchmarks/{module}.py: figures(quick={quick}) returned no rows")
        for row in rows:
            if not isinstance(row, Figure):
                raise TypeError(
                    f"benchmarks/{module}.py: figures() returned a {type(row).__name__}, "
                    "expected benchmarks.common.Figure"
                )
    except Exception as exc:
        print(f"\nbenchmark {name} failed:", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        return Outcome(name, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")
    return Outcome(name, time.perf_counter() - start, figures=rows)


def _git_commit(root: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def machine_info() -> dict[str, Any]:
    """Where and when the figures were measured (no user or host names)."""
    import torch

    try:
        from importlib.metadata import version

        fedsynth_version: str | None = version("fedsynth")
    except Exception:  # not installed as a distribution: still a valid run
        fedsynth_version = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "load_average_1m": round(load[0], 2) if load else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "fedsynth": fedsynth_version,
        "commit": _git_commit(PACKAGE_DIR.parent),
    }


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    text = f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
    return f"{text} {unit}".rstrip()


def _ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.3f}x" if abs(ratio) < 100 else f"{ratio:.3g}x"


def print_table(outcomes: Sequence[Outcome], *, quick: bool) -> None:
    """One rich table of every figure, then one line per failed benchmark."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # A pipe or a log gets the whole table, not one squeezed to 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=f"fedsynth benchmarks{' (--quick)' if quick else ''}")
    for column in ("benchmark", "figure", "value", "baseline", "ratio", "target", "met?"):
        justify = "right" if column in ("value", "baseline", "ratio") else "left"
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for outcome in outcomes:
        for row in outcome.figures:
            met = {True: "[green]yes[/green]", False: "[red]NO[/red]", None: "-"}[row.met]
            table.add_row(
                escape(row.benchmark),
                escape(row.figure),
                escape(_number(row.value, row.unit)),
                escape(_number(row.baseline, row.unit)),
                _ratio(row.ratio),
                escape(row.target or "-"),
                met,
            )
        if outcome.error is not None:
            table.add_row(escape(outcome.name), "[red]FAILED[/red]", "-", "-", "-", "-", "-")
    console.print(table)
    for outcome in outcomes:
        if outcome.error is not None:
            console.print(
                f"[red]benchmark {escape(outcome.name)} failed:[/red] {escape(outcome.error)}"
            )
    seconds = ", ".join(f"{o.name} {o.seconds:.1f} s" for o in outcomes)
    console.print(f"wall time per benchmark: {seconds}")


def report(
    outcomes: Sequence[Outcome], *, quick: bool, machine: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON document: machine, run settings, one entry per benchmark, every row."""
    return {
        "schema": SCHEMA_VERSION,
        "machine": machine if machine is not None else machine_info(),
        "quick": quick,
        "benchmarks": [
            {
                "name": o.name,
                "seconds": round(o.seconds, 3),
                "rows": len(o.figures),
                "error": o.error,
            }
            for o in outcomes
        ],
        "failed": [o.name for o in outcomes if o.error is not None],
        "rows": [row.as_dict() for o in outcomes for row in o.figures],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """``--quick``, ``--json FILE``, ``--only NAME ...`` (names with or without ``bench_``)."""
    known = [short_name(m) for m in discover()]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run fedsynth's benchmarks; print one table and optionally write JSON.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes everywhere (tiny-llama, small K and d)"
    )
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write rows here")
    parser.add_argument(
        "--only", nargs="+", default=None, metavar="NAME", help=f"run only these: {known}"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads (default: 1 with --quick, where tiny models gain nothing from more "
        "and thread spinning on busy cores distorts the timings; torch's default otherwise)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: must be >= 1")
    if args.only is not None:
        wanted = [short_name(n) for n in args.only]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            parser.error(f"--only {' '.join(unknown)}: no such benchmark; known: {known}")
        args.only = wanted
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; return 0, or 1 when one of them raised."""
    args = parse_args(argv)
    modules = [m for m in discover() if args.only is None or short_name(m) in args.only]
    import torch

    threads_before = torch.get_num_threads()
    threads = args.threads or (1 if args.quick else threads_before)
    torch.set_num_threads(threads)
    outcomes: list[Outcome] = []
    try:
        for module in modules:
            print(f"running {short_name(module)}{' (quick)' if args.quick else ''} ...", flush=True)
            outcomes.append(run_one(module, quick=args.quick))
        machine = machine_info()  # torch_threads: what the benchmarks ran with
    finally:
        torch.set_num_threads(threads_before)
    print_table(outcomes, quick=args.quick)
    if args.json is not None:
        document = report(outcomes, quick=args.quick, machine=machine)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    return 1 if any(o.error is not None for o in outcomes) else 0
