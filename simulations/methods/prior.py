"""``prior``: the public prior's texts (ε = 0, no private data touched); the floor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsynth.server.synthesize import SyntheticSample
from fedsynth.simulations.demo import prior_samples
from fedsynth.simulations.methods.base import CellOutput, Generator, StudyContext

if TYPE_CHECKING:
    from fedsynth.simulations.study_config import Cell


def run(ctx: StudyContext, cell: Cell) -> CellOutput:
    """The first ``synthetic_per_label`` prior generations of each label.

    With the study's ``shots``, unsteered samples conditioned on shots from those public texts
    instead (the demo's prior condition), so the floor gets what the other methods get.
    """
    config = ctx.demo_config(cell)
    if config.shots:
        samples = prior_samples(config, ctx.loaded, ctx.reference)
    else:
        n = config.synthetic_per_label
        samples = [
            SyntheticSample(text=t, label=label, release_id="prior")
            for label, texts in sorted(ctx.reference.texts.items())
            for t in texts[:n]
        ]
    template = config.template
    return CellOutput(
        samples, generator=Generator({lb: template.prefix(lb) for lb in template.labels})
    )
