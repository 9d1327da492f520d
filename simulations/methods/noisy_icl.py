"""``noisy-icl``: in-context examples whose token embeddings are clipped and noised.

Not record-level DP (ε is per token embedding); see the method table.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fedsynth.server.synthesize import SyntheticSample
from fedsynth.simulations.demo import generation_config, sampling_seed
from fedsynth.simulations.methods.base import CellOutput, StudyContext
from fedsynth.simulations.methods.common import generation_perf, icl_shots

if TYPE_CHECKING:
    from fedsynth.simulations.study_config import Cell


def run(ctx: StudyContext, cell: Cell) -> CellOutput:
    """Generate after the noised embeddings of each sample's shots."""
    from fedsynth.simulations.baselines import generate_after_embeddings

    config = ctx.demo_config(cell)
    template = config.template
    shots = icl_shots(ctx, cell)
    parts = []
    for label, quoted in shots:
        instruction = template.instruction.format(label=template.describe(label))
        parts.append((instruction, quoted, instruction))
    start = time.monotonic()
    texts = generate_after_embeddings(
        ctx.loaded,
        parts,
        epsilon=cell.epsilon,
        delta=ctx.config.delta,
        kind=ctx.config.baselines.icl_noise,
        config=generation_config(config),
        seed=sampling_seed(cell.seed),
    )
    samples = [
        SyntheticSample(text=t, label=label, release_id="noisy-icl")
        for t, (label, _) in zip(texts, shots, strict=True)
    ]
    return CellOutput(samples, perf=generation_perf(ctx, samples, time.monotonic() - start))
