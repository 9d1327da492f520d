"""``vector``: the federated dataset vector through the real ClientApps and ServerApp."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsynth.simulations.demo import CoordinatorOutcome, make_coordinator_job
from fedsynth.simulations.methods.base import CellOutput, StudyContext
from fedsynth.simulations.methods.common import (
    effective_noise_multiplier,
    federated_failure,
    release_samples,
    run_federated,
)

if TYPE_CHECKING:
    from fedsynth.simulations.study_config import Cell


def run(ctx: StudyContext, cell: Cell) -> CellOutput:
    """One federated release in the cell's trust mode, then generation from it."""
    from fedsynth.server.release import load_release

    config = ctx.demo_config(cell)
    outcome = CoordinatorOutcome()
    perf, errors = run_federated(
        ctx,
        cell,
        config,
        lambda: make_coordinator_job(config, ctx.loaded, ctx.reference, outcome),
    )
    if errors or not outcome.releases:
        federated_failure("the federated release", errors)
    release = load_release(next(iter(outcome.releases.values())))
    perf["noise_multiplier"] = effective_noise_multiplier(
        release.manifest.privacy,
        survivors=cell.clients - cell.dropped_clients,
        removed=int(release.report["noise"].get("excess_noise_removed_for", 0)),
    )
    return release_samples(ctx, release, cell, perf)
