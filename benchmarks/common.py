"""What every benchmark reports: one ``Figure`` per measured number, judged against its target.

Each ``benchmarks/bench_*.py`` module has ``figures(quick: bool) -> list[Figure]``; the runner
(``python -m benchmarks``) calls them all and prints one table. A figure carries the baseline
measured in the same run (or None when there is none), the ratio value / baseline, the target
as text and whether it was met (None: informational, or not judged at these sizes).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

QUICK_MODEL = "tiny-llama"
"""The model every benchmark uses under ``--quick``: random weights, shapes only, built locally."""

QUICK_NOTE = "quick sizes (tiny-llama): timing targets are stated for the real model, not judged"


@dataclass(frozen=True)
class Figure:
    """One measured number of one benchmark.

    Attributes:
        benchmark: Module name without the ``bench_`` prefix (``contribution``, ``secagg``, ...).
        figure: What was measured, in words.
        value: The measurement.
        unit: Unit of ``value`` and ``baseline`` (``examples/s``, ``s``, ``B``, ...).
        baseline: The same quantity for the baseline measured in the same run, or None.
        ratio: ``value / baseline`` when both exist and the baseline is non-zero, else None.
        target: The target as text (``">= 0.9x"``, ``"< 2 s"``), empty when there is none.
        met: Whether the target was met; None when there is no target or it was not judged.
        note: Anything a reader needs to read the number right (sizes, caveats).
    """

    benchmark: str
    figure: str
    value: float
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The figure as a JSON-ready dict (non-finite numbers become None)."""
        out = asdict(self)
        for key in ("value", "baseline", "ratio"):
            number = out[key]
            if number is not None and not math.isfinite(number):
                out[key] = None
        return out


def ratio_of(value: float, baseline: float | None) -> float | None:
    """``value / baseline``, or None without a usable baseline."""
    if baseline is None or baseline == 0 or not math.isfinite(baseline):
        return None
    return value / baseline


def compared(
    benchmark: str,
    figure: str,
    value: float,
    unit: str,
    *,
    baseline: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    judge: bool = True,
    note: str = "",
) -> Figure:
    """A figure whose target bounds the ratio value / baseline (or the value, without baseline).

    Args:
        benchmark: Benchmark name.
        figure: What was measured.
        value: The measurement.
        unit: Its unit.
        baseline: Baseline measured in the same run (None: the bound applies to ``value``).
        at_least: Lower bound (inclusive), or None.
        at_most: Upper bound (inclusive), or None.
        judge: False when the run's sizes are not those the target is stated for: the target
            is shown, ``met`` stays None.
        note: Free text for the reader.
    """
    ratio = ratio_of(value, baseline)
    judged = ratio if baseline is not None else value
    suffix = "x" if baseline is not None else f" {unit}".rstrip()
    parts = []
    if at_least is not None:
        parts.append(f">= {at_least:g}{suffix}")
    if at_most is not None:
        parts.append(f"<= {at_most:g}{suffix}")
    met: bool | None = None
    if judge and parts and judged is not None and math.isfinite(judged):
        met = (at_least is None or judged >= at_least) and (at_most is None or judged <= at_most)
    return Figure(
        benchmark=benchmark,
        figure=figure,
        value=value,
        unit=unit,
        baseline=baseline,
        ratio=ratio,
        target=" and ".join(parts),
        met=met,
        note=note,
    )


def info(
    benchmark: str,
    figure: str,
    value: float,
    unit: str,
    *,
    baseline: float | None = None,
    target: str = "",
    note: str = "",
) -> Figure:
    """A figure without a judged target (``met`` is None); ``target`` may still describe one."""
    return Figure(
        benchmark=benchmark,
        figure=figure,
        value=value,
        unit=unit,
        baseline=baseline,
        ratio=ratio_of(value, baseline),
        target=target,
        met=None,
        note=note,
    )


def random_deltas(hidden_size: int, layers: tuple[int, ...], *, strength: float) -> dict[int, Any]:
    """A fixed random steering direction per layer, scaled as a release's would be (seed 0)."""
    import torch

    from fedsynth.server.generation import steering_deltas

    gen = torch.Generator().manual_seed(0)
    return steering_deltas(
        {layer: torch.randn(hidden_size, generator=gen) for layer in layers},
        strength=strength,
        residual_norms=dict.fromkeys(layers, 8000.0),
    )


def run_script(
    doc: str, figures: Callable[[bool], list[Figure]], argv: list[str] | None = None
) -> int:
    """A benchmark script's own command line: ``--quick``, then one line per figure."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print_figures(figures(args.quick))
    return 0


def print_figures(rows: list[Figure]) -> None:
    """One line per figure, for a benchmark script run on its own."""
    for row in rows:
        ratio = "" if row.ratio is None else f"  ratio {row.ratio:.3f}"
        baseline = "" if row.baseline is None else f"  baseline {row.baseline:.4g}"
        print(f"{row.figure}: {row.value:.4g} {row.unit}{baseline}{ratio}  {row.note}")
