"""Unlimited labelled generation from a saved release (post-processing: no privacy cost)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fedsynth.protocol.errors import ConfigError, ModelMismatchError
from fedsynth.protocol.models import LoadedModel
from fedsynth.server.generation import GenerationConfig, generate_texts, steering_deltas
from fedsynth.server.release import Release


@dataclass(frozen=True)
class SyntheticSample:
    """One synthetic text, its intended label and the release it was steered by."""

    text: str
    label: str
    release_id: str


def check_release_model(loaded: LoadedModel, release: Release) -> None:
    """Steering vectors only make sense in the model they were computed with."""
    if loaded.fingerprint != release.manifest.model_fingerprint:
        raise ModelMismatchError(
            f"model_fingerprint: release {release.release_id} was made with "
            f"{release.manifest.model_fingerprint}, the loaded model has {loaded.fingerprint}"
        )


def label_deltas(
    release: Release, label: str, *, strength: float, contrast: float = 1.0
) -> dict[int, torch.Tensor]:
    """The per-layer steering added to the residual stream when generating ``label``."""
    return steering_deltas(
        release.directions(label, contrast=contrast),
        strength=strength,
        residual_norms=release.residual_norms(),
    )


def iter_release_samples(
    loaded: LoadedModel,
    release: Release,
    *,
    n_per_label: int,
    strength: float,
    contrast: float = 1.0,
    config: GenerationConfig,
    seed: int,
    labels: tuple[str, ...] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[SyntheticSample]:
    """Yield ``n_per_label`` steered samples per label, label by label, chunk by chunk.

    Args:
        progress: called with (samples done, samples total).
    """
    check_release_model(loaded, release)
    if strength < 0:
        raise ConfigError(f"strength={strength}: must be >= 0")
    chosen = labels or release.labels
    total = n_per_label * len(chosen)
    done = 0
    for index, label in enumerate(chosen):
        deltas = label_deltas(release, label, strength=strength, contrast=contrast)
        prompt = release.manifest.template.prefix(label)
        remaining = n_per_label
        chunk_index = 0
        while remaining > 0:
            chunk = min(remaining, config.batch_size)
            texts = generate_texts(
                loaded,
                prompt,
                chunk,
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
    loaded: LoadedModel,
    release: Release,
    *,
    n_per_label: int,
    strength: float,
    contrast: float = 1.0,
    config: GenerationConfig,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
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
        )
    )
