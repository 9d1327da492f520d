"""``vector-pooled`` and ``vector-nonprivate``: central EPSVec on the pooled data.

The same feature, rounding and decoding code as the federated release, run by one curator on
every holder's records (ε = ∞ for the non-private ceiling).
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import TYPE_CHECKING

import numpy as np

from fedsynth.protocol.codec import to_field
from fedsynth.protocol.contribution import decode_release, integer_class_sums
from fedsynth.server.coordinator import build_manifest
from fedsynth.server.release import Release, save_release
from fedsynth.server.secure_round import RoundResult
from fedsynth.simulations.demo import task_config
from fedsynth.simulations.methods.base import CellOutput, StudyContext
from fedsynth.simulations.methods.common import effective_noise_multiplier, release_samples

if TYPE_CHECKING:
    from fedsynth.simulations.study_config import Cell


def pooled_release(ctx: StudyContext, cell: Cell) -> tuple[Release, dict[str, float]]:
    """Central EPSVec on the pooled data: the same feature, rounding and decoding code."""
    from fedsynth.server.release import privacy_report

    state = ctx.seed_state(cell.seed)
    config = dataclasses.replace(ctx.demo_config(cell), mode="central")
    tc = task_config(config, cell.epsilon)
    # The pooled curator is the only data source; the manifest's second node adds nothing.
    manifest = build_manifest(tc, ctx.loaded, ctx.reference, (1, 2))
    computed = state.pooled_features is None
    features = ctx.pooled_features(state, manifest)
    rng = np.random.default_rng(secrets.randbits(128))
    sums = integer_class_sums(
        features,
        [r.label for r in state.pooled],
        manifest=manifest,
        reference=ctx.reference.means,
        rng=rng,
    )
    decoded = decode_release(
        to_field(sums.reshape(-1), bits=manifest.bits), manifest=manifest, survivors=1, rng=rng
    )
    result = RoundResult(field_sum=np.zeros(0, dtype=np.uint64), survivors=[1], dropped=[])
    release = Release(
        release_id=manifest.task_id,
        manifest=manifest,
        vectors=decoded.vectors,
        counts=decoded.counts,
        report=privacy_report(manifest, result, model_name=ctx.loaded.name),
    )
    # Every pooled cell reports what the curator's features cost, but only the cell that
    # computed them spent that time: the others read the seed's cache.
    reused = 0.0 if computed else state.pooled_seconds
    return release, {"client_seconds": state.pooled_seconds, "reused_seconds": reused}


def run(ctx: StudyContext, cell: Cell) -> CellOutput:
    """The pooled release (kept in the cell's folder), then generation from it."""
    release, perf = pooled_release(ctx, cell)
    perf["noise_multiplier"] = effective_noise_multiplier(release.manifest.privacy, survivors=1)
    save_release(release, ctx.cell_dir(cell) / "release-pooled.safetensors")
    return release_samples(ctx, release, cell, perf)
