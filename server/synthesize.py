"""Unlimited labelled generation from a saved release (post-processing: no privacy cost)."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.features import PromptTemplate, check_instruction, longest_prompt_tokens
from fedsynth.protocol.models import LoadedModel
from fedsynth.server.backends import GenerationBackend, as_backend, check_release_backend
from fedsynth.server.generation import GenerationConfig, steering_deltas
from fedsynth.server.public_basis import PublicBasis
from fedsynth.server.release import Release
from fedsynth.server.selection import select_texts, selection_chunks
from fedsynth.server.snr import (
    DEFAULT_MIN_SIGNAL_SHARE,
    SteeringSnr,
    check_release_counts,
    steering_snr,
)


@dataclass(frozen=True)
class SyntheticSample:
    """One synthetic text, its intended label and the release it was steered by."""

    text: str
    label: str
    release_id: str


REFILL_BATCHES = 4
"""Batches of prompts per generation call on a backend that refills its batch (llama.cpp)."""


def refills(backend: GenerationBackend) -> bool:
    """Whether ``backend`` keeps its batch full by starting new prompts as rows end."""
    return bool(getattr(backend, "refills_batch", False))


def check_release_model(loaded: LoadedModel | GenerationBackend, release: Release) -> None:
    """Steering vectors only make sense in the model they were computed with.

    Same weights, layers and width: :func:`fedsynth.server.backends.check_release_backend`.
    """
    check_release_backend(loaded, release)


def label_deltas(
    release: Release,
    label: str,
    *,
    strength: float,
    contrast: float = 1.0,
    snr_shrink: bool = True,
    snr: SteeringSnr | None = None,
    basis: PublicBasis | None = None,
    min_signal_share: float = DEFAULT_MIN_SIGNAL_SHARE,
) -> dict[int, torch.Tensor]:
    """The per-layer steering added to the residual stream when generating ``label``.

    With ``snr_shrink`` (the default) the strength at each layer is multiplied by the shrink
    factor the release's own signal-to-noise ratio gives (:mod:`fedsynth.server.snr`); a layer
    whose factor is 0 gets no hook at all, so a class vector that is all noise generates exactly
    what the unsteered prior generates. ``snr_shrink=False`` applies the strength as given (for
    experiments).

    With a public ``basis`` the SNR rule may project a layer's direction onto part of it
    (:func:`fedsynth.server.snr.steering_snr`); the opt-out never projects.

    Args:
        snr: Precomputed :func:`steering_snr` of this release at this ``contrast`` (avoids
            recomputing it per label; it carries its own basis).
        basis: The public basis for computing ``snr`` when it is not given.
        min_signal_share: For computing ``snr`` when it is not given: a layer whose signal
            share is below it gets no steering (:func:`fedsynth.server.snr.steering_snr`).

    Raises:
        NonPositiveCountError: a class's noisy count is <= 0.
        ConfigError: ``snr`` belongs to another release or contrast.
    """
    directions = release.directions(label, contrast=contrast)
    residual_norms = release.residual_norms()
    if not snr_shrink:
        return steering_deltas(directions, strength=strength, residual_norms=residual_norms)
    if snr is None:
        snr = steering_snr(
            release, contrast=contrast, basis=basis, min_signal_share=min_signal_share
        )
    elif snr.release_id != release.release_id or snr.contrast != contrast:
        raise ConfigError(
            f"snr is for release {snr.release_id!r} at contrast={snr.contrast}, not "
            f"{release.release_id!r} at contrast={contrast}"
        )
    factors = snr.of(label).factors
    directions = snr.directions(release, label)
    kept = {layer: d for layer, d in directions.items() if factors[layer] > 0.0}
    deltas = steering_deltas(kept, strength=strength, residual_norms=residual_norms)
    return {layer: delta * factors[layer] for layer, delta in deltas.items()}


def release_deltas(
    release: Release,
    *,
    strength: float,
    contrast: float = 1.0,
    basis: PublicBasis | None = None,
    min_signal_share: float = DEFAULT_MIN_SIGNAL_SHARE,
) -> dict[str, dict[int, torch.Tensor]]:
    """:func:`label_deltas` of every label, from one SNR computation (SNR shrink on)."""
    snr = steering_snr(release, contrast=contrast, basis=basis, min_signal_share=min_signal_share)
    return {
        label: label_deltas(release, label, strength=strength, contrast=contrast, snr=snr)
        for label in release.labels
    }


def steering_report(
    release: Release,
    *,
    strength: float,
    contrast: float = 1.0,
    snr_shrink: bool = True,
    basis: PublicBasis | None = None,
    min_signal_share: float = DEFAULT_MIN_SIGNAL_SHARE,
) -> dict[str, Any]:
    """Per class the SNR, the shrink factor and the effective strength generation uses.

    JSON-ready, for the generation's own report (summary, CLI output); never written into the
    release file, which is immutable.

    Raises:
        NonPositiveCountError: a class's noisy count is <= 0.
    """
    snr = steering_snr(
        release,
        contrast=contrast,
        basis=basis if snr_shrink else None,
        min_signal_share=min_signal_share,
    )
    return snr.to_dict(strength=strength, applied=snr_shrink)


SHOT_POOL = 64
"""Plain-prompt samples per label that shot-conditioned generation draws its shots from."""

_POOL_SEED_OFFSET = 5_003
"""Seeds of the shot pool's batches: after any chunk index a run of samples reaches."""

_VARIANT_SEED_OFFSET = 7_919
"""Seed of the per-prompt choice of instruction variant, apart from the shots' draw."""


def shot_pool_size(n: int, shots: int, pool_size: int = SHOT_POOL) -> int:
    """Plain samples generated for a label's shot pool of ``n`` samples with ``shots``.

    ``n``, at most ``pool_size``, so the pool never costs more than the label's own samples;
    none without shots.
    """
    return min(pool_size, n) if shots > 0 else 0


def check_shots(shots: int, pool_size: int = SHOT_POOL) -> None:
    """Refuse a shot count below 0 or a pool that cannot hold one sample.

    Raises:
        ConfigError: naming the value and what was expected.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise ConfigError(f"shots={shots!r}: must be an integer >= 0")
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
        raise ConfigError(f"shot pool={pool_size!r}: must be an integer >= 1")


def variant_templates(template: PromptTemplate, variants: Sequence[str]) -> list[PromptTemplate]:
    r"""``template`` with each of ``variants`` as its instruction (none given: the template).

    Variants are public instructions with the template's ``{label}`` slot (e.g. "Here is a
    {label} movie review snippet about the acting:\n"); generation draws one per prompt so the
    samples do not all start from one state. The release's features were read with the
    template's own instruction; a variant changes only what the model is asked, so it is
    post-processing like the prompt itself.

    Raises:
        ConfigError: a variant without the ``{label}`` slot or with another slot, naming it
            (:func:`check_variants`).
    """
    check_variants(variants)
    return [dataclasses.replace(template, instruction=v) for v in variants] or [template]


def check_variants(variants: Sequence[str]) -> None:
    """Refuse an instruction variant without a ``{label}`` slot or with any other slot.

    Raises:
        ConfigError: naming the variant.
    """
    for variant in variants:
        if not isinstance(variant, str):
            raise ConfigError(f"variant={variant!r} lacks a {{label}} slot")
        check_instruction(variant, "variant")


def shots_span(prompt_tokens: int, shots: int, new_tokens: int) -> int:
    """Tokens of the longest input with ``shots`` shots before a sample's own prompt.

    Each shot is a prompt, a sample and a blank line; the sample adds ``new_tokens``.
    """
    return prompt_tokens + shots * (prompt_tokens + new_tokens + 2) + new_tokens


def check_variants_fit(
    loaded: LoadedModel | GenerationBackend,
    template: PromptTemplate,
    variants: Sequence[str],
    *,
    shots: int,
    new_tokens: int,
) -> None:
    """Refuse variants whose prompts, with shots and a whole sample, outrun the context.

    Checked where the model has a fixed context (llama.cpp sizes its context to the prompts).

    Raises:
        ConfigError: naming the longest variant's tokens and the context.
    """
    model = transformers_model(loaded)
    if not variants or model is None or model.context is None:
        return
    context = model.context
    templates = variant_templates(template, variants)
    prompt = max(longest_prompt_tokens(model, t) for t in templates)
    longest = shots_span(prompt, shots, new_tokens)
    if longest > context:
        raise ConfigError(
            f"variants: a {prompt}-token prompt with {shots} shots and {new_tokens}-token "
            f"samples makes {longest} tokens, beyond {model.name}'s context of {context} "
            "tokens (use shorter variants or fewer shots)"
        )


def shot_prompt(template: PromptTemplate, label: str, shots: Sequence[str]) -> str:
    """``label``'s prompt with ``shots`` (texts of that label) shown first.

    They follow the template's own public shots and are rendered the same way.
    """
    extra = tuple((label, text) for text in shots)
    return dataclasses.replace(template, shots=template.shots + extra).prefix(label)


def iter_label_texts(
    backend: GenerationBackend,
    template: PromptTemplate,
    label: str,
    *,
    n: int,
    deltas: dict[int, torch.Tensor] | None,
    config: GenerationConfig,
    seed: int,
    shots: int = 0,
    pool: Sequence[str] | None = None,
    pool_size: int = SHOT_POOL,
    progress: Callable[[int], None] | None = None,
    pool_progress: Callable[[int, int], None] | None = None,
    variants: Sequence[str] = (),
) -> Iterator[str]:
    """Yield ``n`` texts of one label, ``config.batch_size`` per batch (batch i uses seed + i).

    With ``shots`` > 0 every text is conditioned on ``shots`` texts of the same label drawn at
    random (without replacement where the pool allows) from ``pool``: by default
    ``min(pool_size, n)`` texts first generated from the plain prompt (or the ``variants``)
    with the same steering, and not yielded (so the pool never costs more than the samples).
    Varying what each sample sees spreads the samples out (the plain prompt makes every sample
    start from the same state) and the steered shots show the class once more; everything comes
    from the release and the model, so this is post-processing too.

    Args:
        pool: Texts to draw shots from instead (e.g. the public prior texts); empty strings
            are skipped, and a pool with no text leaves the plain prompt.
        progress: Called with the number of texts yielded so far.
        pool_progress: Called with (pool texts generated, pool size) while a pool is made.
        variants: Public instruction variants, one drawn per prompt (shot pool included);
            empty: the template's instruction (:func:`variant_templates`).
    """
    check_shots(shots, pool_size)
    templates = variant_templates(template, variants)
    # One variant per prompt; without variants the template itself (and no draw).
    aspect = random.Random(seed + _VARIANT_SEED_OFFSET) if len(templates) > 1 else None

    def form() -> PromptTemplate:
        return templates[0] if aspect is None else aspect.choice(templates)

    choose: Callable[[], str] = lambda: form().prefix(label)  # noqa: E731
    if shots > 0:
        if pool is None:
            pool = []
            wanted = shot_pool_size(n, shots, pool_size)
            for j, start in enumerate(range(0, wanted, config.batch_size)):
                size = min(config.batch_size, wanted - start)
                pool += backend.generate(
                    [form().prefix(label) for _ in range(size)],
                    config=config,
                    deltas=deltas,
                    seed=seed + _POOL_SEED_OFFSET + j,
                )
                if pool_progress is not None:
                    pool_progress(len(pool), wanted)
        texts = [t for t in pool if t.strip()]
        rng = random.Random(seed)
        if texts:

            def choose() -> str:
                picked = (
                    rng.sample(texts, shots)
                    if len(texts) >= shots
                    else [rng.choice(texts) for _ in range(shots)]
                )
                return shot_prompt(form(), label, picked)

    done = 0
    chunk_index = 0
    # A backend that refills its batch as rows end gets several batches' prompts per call: the
    # batch then thins only at the end of each call, not at the end of every batch.
    per_call = config.batch_size * (REFILL_BATCHES if refills(backend) else 1)
    while done < n:
        chunk = min(n - done, per_call)
        prompts = [choose() for _ in range(chunk)]
        yield from backend.generate(prompts, config=config, deltas=deltas, seed=seed + chunk_index)
        done += chunk
        chunk_index += 1
        if progress is not None:
            progress(done)


def iter_labelled_texts(
    backend: GenerationBackend,
    template: PromptTemplate,
    labels: Sequence[str],
    *,
    n_per_label: int,
    deltas_of: Callable[[str], dict[int, torch.Tensor] | None],
    config: GenerationConfig,
    seed: int,
    shots: int = 0,
    pools: Mapping[str, Sequence[str]] | None = None,
    pool_size: int = SHOT_POOL,
    progress: Callable[[int, int], None] | None = None,
    pool_progress: Callable[[int, int], None] | None = None,
    variants: Sequence[str] = (),
) -> Iterator[tuple[str, str]]:
    """Yield (label, text) for ``n_per_label`` texts of each label, label by label.

    Label i's batches use seeds from ``seed * 1_000_003 + i * 10_007`` on, so a label's texts
    do not depend on the other labels; ``deltas_of(label)`` (computed when the label starts)
    steers them and ``pools[label]``, if given, supplies its shots (:func:`iter_label_texts`).
    ``progress`` is called with (texts done, texts total), ``pool_progress`` with (pool texts
    generated, pool texts total) over all labels' shot pools.
    """
    total = n_per_label * len(labels)
    for index, label in enumerate(labels):
        before = index * n_per_label

        def tick(done: int, before: int = before) -> None:
            if progress is not None:
                progress(before + done, total)

        def pool_tick(done: int, wanted: int, index: int = index) -> None:
            # Every label's pool has the same size: min(pool_size, n_per_label).
            if pool_progress is not None:
                pool_progress(index * wanted + done, wanted * len(labels))

        for text in iter_label_texts(
            backend,
            template,
            label,
            n=n_per_label,
            deltas=deltas_of(label),
            config=config,
            seed=seed * 1_000_003 + index * 10_007,
            shots=shots,
            pool=None if pools is None else pools[label],
            pool_size=pool_size,
            progress=tick,
            pool_progress=pool_tick,
            variants=variants,
        ):
            yield label, text


def floor_samples(
    loaded: LoadedModel | GenerationBackend,
    template: PromptTemplate,
    *,
    n_per_label: int,
    generation: GenerationConfig,
    shots: int,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    pool_progress: Callable[[int, int], None] | None = None,
    variants: Sequence[str] = (),
) -> list[SyntheticSample]:
    """Samples of the release generator at strength 0, label by label: the prior (ε = 0).

    Exactly what :func:`generate_from_release` yields from a release whose every layer the SNR
    rule switches off (same seeds, prompts and own unsteered shot pools), so the floor and a
    switched-off release differ by nothing, and a release's gain over the floor is not mixed
    with the draw of a different shot pool. The demo's prior and the study's ``prior`` cells
    are both this.
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
            progress=progress,
            pool_progress=pool_progress,
            variants=variants,
        )
    ]


def iter_release_samples(
    loaded: LoadedModel | GenerationBackend,
    release: Release,
    *,
    n_per_label: int,
    strength: float,
    contrast: float = 1.0,
    config: GenerationConfig,
    seed: int,
    labels: tuple[str, ...] | None = None,
    progress: Callable[[int, int], None] | None = None,
    snr_shrink: bool = True,
    shots: int = 0,
    shot_pool: int = SHOT_POOL,
    pool_progress: Callable[[int, int], None] | None = None,
    select: float = 1.0,
    scorer: LoadedModel | None = None,
    select_chunk: int | None = None,
    basis: PublicBasis | None = None,
    min_signal_share: float = DEFAULT_MIN_SIGNAL_SHARE,
    variants: Sequence[str] = (),
) -> Iterator[SyntheticSample]:
    """Yield ``n_per_label`` steered samples per label, label by label, chunk by chunk.

    The release's counts are checked before anything is generated; with ``snr_shrink`` (the
    default) the strength follows the release's signal-to-noise ratio (:func:`label_deltas`).
    ``shots`` > 0 conditions each sample on that many of ``shot_pool`` earlier steered samples
    of its label (:func:`iter_label_texts`). ``select`` < 1 generates ``n / select`` samples
    per label and keeps the ``n`` that the release says carry their class best
    (:mod:`fedsynth.server.selection`); a label's samples are then yielded once it is done,
    or with ``select_chunk`` k, the best k of every k / ``select`` as soon as they are read.

    Args:
        loaded: the model, as loaded for `transformers` or on any generation backend.
        progress: called with (samples done, samples total).
        snr_shrink: False applies ``strength`` unshrunk (for experiments).
        pool_progress: called with (pool texts done, pool texts total) while the shot pools
            are generated.
        scorer: the `transformers` model that reads the samples for ``select`` (default:
            ``loaded`` when it is one; needed with another backend).
        basis: a public basis the SNR rule may project each direction onto
            (:mod:`fedsynth.server.public_basis`); None keeps the whole directions.
        min_signal_share: the SNR rule switches off a layer whose signal share is below it
            (:func:`fedsynth.server.snr.steering_snr`; 0: the plain shrink rule).
        variants: public instruction variants, one drawn per prompt (:func:`variant_templates`).

    Raises:
        ModelMismatchError: the model is not the release's (or its layers or width differ).
        NonPositiveCountError: a class's noisy count is <= 0.
        ConfigError: a negative strength, shot count, an empty shot pool, ``select`` outside
            (0, 1], or ``select`` < 1 without a model to read the samples with.
    """
    backend = as_backend(loaded)
    check_release_backend(backend, release)
    if strength < 0:
        raise ConfigError(f"strength={strength}: must be >= 0")
    check_shots(shots, shot_pool)
    check_variants(variants)
    chunks = selection_chunks(n_per_label, select, select_chunk)
    per_label = sum(generated for _, generated in chunks)
    if per_label > n_per_label:
        scorer = scorer or transformers_model(loaded)
        if scorer is None:
            raise ConfigError(
                f"select={select}: reading the samples needs the release's model on "
                f"transformers; the {backend.backend} backend cannot, so pass it as scorer"
            )
        check_release_backend(scorer, release)
    check_release_counts(release)
    snr = (
        steering_snr(release, contrast=contrast, basis=basis, min_signal_share=min_signal_share)
        if snr_shrink
        else None
    )
    pairs = iter_labelled_texts(
        backend,
        release.manifest.template,
        labels or release.labels,
        n_per_label=per_label,
        deltas_of=lambda label: label_deltas(
            release, label, strength=strength, contrast=contrast, snr_shrink=snr_shrink, snr=snr
        ),
        config=config,
        seed=seed,
        shots=shots,
        pool_size=shot_pool,
        progress=progress,
        pool_progress=pool_progress,
        variants=variants,
    )
    if scorer is None or per_label == n_per_label:
        for label, text in pairs:
            yield SyntheticSample(text=text, label=label, release_id=release.release_id)
        return
    selection_snr = snr or steering_snr(
        release, contrast=contrast, basis=basis, min_signal_share=min_signal_share
    )
    for label, group in itertools.groupby(pairs, key=lambda pair: pair[0]):
        for keep, generated in chunks:
            texts = [text for _, text in itertools.islice(group, generated)]
            kept = select_texts(scorer, release, label, texts, keep=keep, snr=selection_snr)
            for i in kept:
                yield SyntheticSample(text=texts[i], label=label, release_id=release.release_id)


def transformers_model(model: LoadedModel | GenerationBackend) -> LoadedModel | None:
    """The `transformers` model behind ``model``, if it has one (it can read samples)."""
    if isinstance(model, LoadedModel):
        return model
    loaded = getattr(model, "loaded", None)
    return loaded if isinstance(loaded, LoadedModel) else None


def generate_from_release(
    loaded: LoadedModel | GenerationBackend,
    release: Release,
    *,
    n_per_label: int,
    strength: float,
    contrast: float = 1.0,
    config: GenerationConfig,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    snr_shrink: bool = True,
    shots: int = 0,
    shot_pool: int = SHOT_POOL,
    pool_progress: Callable[[int, int], None] | None = None,
    select: float = 1.0,
    scorer: LoadedModel | None = None,
    basis: PublicBasis | None = None,
    min_signal_share: float = DEFAULT_MIN_SIGNAL_SHARE,
    variants: Sequence[str] = (),
) -> list[SyntheticSample]:
    """All samples of :func:`iter_release_samples` as a list."""
    return list(
        iter_release_samples(
            loaded,
            release,
            n_per_label=n_per_label,
            strength=strength,
            contrast=contrast,
            config=config,
            seed=seed,
            progress=progress,
            snr_shrink=snr_shrink,
            shots=shots,
            shot_pool=shot_pool,
            pool_progress=pool_progress,
            select=select,
            scorer=scorer,
            basis=basis,
            min_signal_share=min_signal_share,
            variants=variants,
        )
    )
