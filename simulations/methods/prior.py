"""``prior``: the model without the release (ε = 0, no private data touched); the floor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsynth.server.synthesize import floor_samples
from fedsynth.simulations.demo import generation_config, sampling_seed
from fedsynth.simulations.methods.base import CellOutput, Generator, StudyContext

if TYPE_CHECKING:
    from fedsynth.simulations.study_config import Cell

__all__ = ["floor_samples", "run"]


def run(ctx: StudyContext, cell: Cell) -> CellOutput:
    """The floor of the study's methods, from the public side only.

    :func:`floor_samples` with the seed the release cells use, with or without the study's
    ``shots``: what a release switched off entirely would generate, not another draw of the
    same distribution (the public prior texts are one, and differ by their sampling noise).
    """
    config = ctx.demo_config(cell)
    samples = floor_samples(
        ctx.loaded,
        config.template,
        n_per_label=config.synthetic_per_label,
        generation=generation_config(config),
        shots=config.shots,
        seed=sampling_seed(cell.seed),
        variants=config.variants,
    )
    template = config.template
    return CellOutput(
        samples, generator=Generator({lb: template.prefix(lb) for lb in template.labels})
    )
