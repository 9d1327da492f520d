"""``pe``: federated Private Evolution, secure sum of the holders' vote histograms."""

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
    from fedsynth.simulations import pe_demo

    config = ctx.demo_config(cell)
    settings = pe_demo.PEDemoSettings(
        rounds=ctx.config.pe.rounds,
        per_label=ctx.config.pe.population,
        top_k=ctx.config.pe.top_k,
        embedder=ctx.config.embedder,
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
