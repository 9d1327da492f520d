"""``prior``: the public prior's texts (ε = 0, no private data touched); the floor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsynth.server.synthesize import SyntheticSample
from fedsynth.simulations.methods.base import CellOutput, Generator, StudyContext

if TYPE_CHECKING:
    from fedsynth.simulations.study_config import Cell


def run(ctx: StudyContext, cell: Cell) -> CellOutput:
    """The first ``synthetic_per_label`` prior generations of each label."""
    n = ctx.config.data.synthetic_per_label
    samples = [
        SyntheticSample(text=t, label=label, release_id="prior")
        for label, texts in sorted(ctx.reference.texts.items())
        for t in texts[:n]
    ]
    template = ctx.demo_config(cell).template
    return CellOutput(
        samples, generator=Generator({lb: template.prefix(lb) for lb in template.labels})
    )
