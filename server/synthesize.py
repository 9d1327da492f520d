"""Unlimited labelled generation from a saved release (post-processing: no privacy cost)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.models import LoadedModel
from fedsynth.server.backends import GenerationBackend, as_backend, check_release_backend
from fedsynth.server.generation import GenerationConfig, steering_deltas
from fedsynth.server.release import Release
from fedsynth.server.snr import SteeringSnr, check_release_counts, steering_snr


@dataclass(frozen=True)
class SyntheticSample:
    """One synthetic text, its intended label and the release it was steered by."""

    text: str
    label: str
    release_id: str


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
) -> dict[int, torch.Tensor]:
    """The per-layer steering added to the residual stream when generating ``label``.

    With ``snr_shrink`` (the default) the strength at each layer is multiplied by the shrink
    factor the release's own signal-to-noise ratio gives (:mod:`fedsynth.server.snr`); a layer
    whose factor is 0 gets no hook at all, so a class vector that is all noise generates exactly
    what the unsteered prior generates. ``snr_shrink=False`` applies the strength as given (for
    experiments).

    Args:
        snr: Precomputed :func:`steering_snr` of this release at this ``contrast`` (avoids
            recomputing it per label).

    Raises:
        NonPositiveCountError: a class's noisy count is <= 0.
        ConfigError: ``snr`` belongs to another release or contrast.
    """
    directions = release.directions(label, contrast=contrast)
    residual_norms = release.residual_norms()
    if not snr_shrink:
        return steering_deltas(directions, strength=strength, residual_norms=residual_norms)
    if snr is None:
        snr = steering_snr(release, contrast=contrast)
    elif snr.release_id != release.release_id or snr.contrast != contrast:
        raise ConfigError(
            f"snr is for release {snr.release_id!r} at contrast={snr.contrast}, not "
            f"{release.release_id!r} at contrast={contrast}"
        )
    factors = snr.of(label).factors
    kept = {layer: d for layer, d in directions.items() if factors[layer] > 0.0}
    deltas = steering_deltas(kept, strength=strength, residual_norms=residual_norms)
    return {layer: delta * factors[layer] for layer, delta in deltas.items()}


def steering_report(
    release: Release, *, strength: float, contrast: float = 1.0, snr_shrink: bool = True
) -> dict[str, Any]:
    """Per class the SNR, the shrink factor and the effective strength generation uses.

    JSON-ready, for the generation's own report (summary, CLI output); never written into the
    release file, which is immutable.

    Raises:
        NonPositiveCountError: a class's noisy count is <= 0.
    """
    snr = steering_snr(release, contrast=contrast)
    return snr.to_dict(strength=strength, applied=snr_shrink)


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
) -> Iterator[SyntheticSample]:
    """Yield ``n_per_label`` steered samples per label, label by label, chunk by chunk.

    The release's counts are checked before anything is generated; with ``snr_shrink`` (the
    default) the strength follows the release's signal-to-noise ratio (:func:`label_deltas`).

    Args:
        loaded: the model, as loaded for `transformers` or on any generation backend.
        progress: called with (samples done, samples total).
        snr_shrink: False applies ``strength`` unshrunk (for experiments).

    Raises:
        ModelMismatchError: the model is not the release's (or its layers or width differ).
        NonPositiveCountError: a class's noisy count is <= 0.
    """
    backend = as_backend(loaded)
    check_release_backend(backend, release)
    if strength < 0:
        raise ConfigError(f"strength={strength}: must be >= 0")
    check_release_counts(release)
    snr = steering_snr(release, contrast=contrast) if snr_shrink else None
    chosen = labels or release.labels
    total = n_per_label * len(chosen)
    done = 0
    for index, label in enumerate(chosen):
        deltas = label_deltas(
            release, label, strength=strength, contrast=contrast, snr_shrink=snr_shrink, snr=snr
        )
        prompt = release.manifest.template.prefix(label)
        remaining = n_per_label
        chunk_index = 0
        while remaining > 0:
            chunk = min(remaining, config.batch_size)
            texts = backend.generate(
                [prompt] * chunk,
                config=config,
                deltas=deltas,
                seed=seed * 1_000_003 + index * 10_007 + chunk_index,
            )
            for text in texts:
                yield SyntheticSample(text=text, label=label, release_id=release.release_id)
            remaining -= chunk
            chunk_index += 1
            done += chunk
            if progress is not None:
                progress(done, total)


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
        )
    )
