"""``pe``: federated Private Evolution, secure sum of the holders' vote histograms.

``pe-steered`` (:mod:`fedsynth.simulations.methods.pe_steered`) runs the same code with the
first population (and every variation) steered by a dataset-vector release made in the same
federation from part of the cell's ε.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fedsynth.simulations.demo import DemoData
from fedsynth.simulations.methods.base import CellOutput, StudyContext
from fedsynth.simulations.methods.common import federated_failure, run_federated

if TYPE_CHECKING:
    from fedsynth.simulations.study_config import Cell


def run(ctx: StudyContext, cell: Cell) -> CellOutput:
    """All PE rounds through Flower's simulation; the samples are the final population."""
    return run_pe(ctx, cell, init="prior")


def run_pe(ctx: StudyContext, cell: Cell, *, init: str) -> CellOutput:
    """A PE cell whose first population is the prior's (``init="prior"``) or steered."""
    from fedsynth.simulations import pe_demo

    config = ctx.demo_config(cell)
    settings = pe_demo.PEDemoSettings(
        rounds=ctx.config.pe.rounds,
        per_label=ctx.config.pe.population,
        output_per_label=ctx.config.pe.output,
        top_k=ctx.config.pe.top_k,
        embedder=ctx.config.embedder,
        init=init,
        init_fraction=ctx.config.pe.init_fraction,
    )
    pe_demo.pe_config(config, settings)
    outcome = pe_demo.PEOutcome()
    state = ctx.seed_state(cell.seed)
    start = time.monotonic()
    perf, errors = run_federated(
        ctx,
        cell,
        config,
        lambda: pe_demo.make_pe_job(
            config,
            settings,
            ctx.loaded,
            DemoData(state.train, state.test, [], config.out_dir / "clients", ""),
            outcome,
        ),
    )
    if errors or outcome.result is None:
        federated_failure("the federated PE run", errors)
    samples = pe_demo.population_samples(outcome.result.state.population, "pe-final")
    perf["coordinator_seconds"] = time.monotonic() - start - perf.get("client_seconds", 0.0)
    return CellOutput(samples, perf=perf)
