"""``prior``: the model without the release (ε = 0, no private data touched); the floor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsynth.server.backends import as_backend
from fedsynth.server.synthesize import SyntheticSample, iter_labelled_texts
from fedsynth.simulations.demo import generation_config, sampling_seed
from fedsynth.simulations.methods.base import CellOutput, Generator, StudyContext

if TYPE_CHECKING:
    from fedsynth.protocol.features import PromptTemplate
    from fedsynth.protocol.models import LoadedModel
    from fedsynth.server.backends import GenerationBackend
    from fedsynth.server.generation import GenerationConfig
    from fedsynth.simulations.study_config import Cell


def floor_samples(
    loaded: LoadedModel | GenerationBackend,
    template: PromptTemplate,
    *,
    n_per_label: int,
    generation: GenerationConfig,
    shots: int,
    seed: int,
) -> list[SyntheticSample]:
    """Samples of the release generator at strength 0, label by label.

    Exactly what :func:`fedsynth.server.synthesize.generate_from_release` yields from a
    release whose every layer the SNR rule switches off (same seeds, prompts and own
    unsteered shot pools), so the floor and a switched-off release differ by nothing, and a
    release's gain over the floor is not mixed with the draw of a different shot pool.
    """
    return [
        SyntheticSample(text=text, label=label, release_id="prior")
        for label, text in iter_labelled_texts(
            as_backend(loaded),
            template,
            template.labels,
            n_per_label=n_per_label,
            deltas_of=lambda _label: None,
            config=generation,
            seed=seed,
            shots=shots,
        )
    ]


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
    )
    template = config.template
    return CellOutput(
        samples, generator=Generator({lb: template.prefix(lb) for lb in template.labels})
    )
