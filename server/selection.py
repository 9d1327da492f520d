"""Keep the steered samples that the release itself says carry their class (post-processing).

A release's class vector points, in the model's residual stream, from the public prior of a
class to that class's private records; what separates one class from the others is its
contrast direction (the class vector minus the mean of all class vectors). A steered sample
that reads as its class has moved along that direction; one that drifted (to another class, to
a generic sentence) has not. Generating more samples than asked and keeping those that project
furthest along their class's direction uses only the release and the public model, so it costs
no privacy. Layers are weighted by the shrink factor the release's own signal-to-noise ratio
gives them (:mod:`fedsynth.server.snr`): a layer whose direction is mostly noise has no say,
and a class whose every layer is noise keeps its samples in the order they were generated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.features import extract_features

if TYPE_CHECKING:
    from fedsynth.protocol.models import LoadedModel
    from fedsynth.server.release import Release
    from fedsynth.server.snr import SteeringSnr


def check_select(select: float) -> None:
    """Refuse a kept fraction outside (0, 1].

    Raises:
        ConfigError: naming the value and what was expected.
    """
    if isinstance(select, bool) or not isinstance(select, int | float) or not 0 < select <= 1:
        raise ConfigError(f"select={select!r}: must be a fraction in (0, 1] (1 keeps every sample)")


def select_caution(select: float, labels: Sequence[str]) -> str | None:
    """A warning for ``select`` < 1 on more than two classes, where it was not seen to help.

    Measured (README): on two-class sentiment it lifted label fidelity at equal TSTR accuracy,
    on three tweet outlets it changed little, on five news topics it lowered TSTR accuracy.
    """
    if select >= 1 or len(labels) <= 2:
        return None
    return (
        f"select={select} with {len(labels)} classes: keeping the samples the release ranks "
        "highest was measured to help on two classes only (three: no change; five news topics: "
        "lower TSTR accuracy), so check it on your data"
    )


def candidates_per_label(n_per_label: int, select: float) -> int:
    """How many samples to generate per label so that keeping ``select`` of them leaves ``n``."""
    check_select(select)
    return max(n_per_label, math.ceil(n_per_label / select - 1e-9))


def selection_chunks(n_per_label: int, select: float, chunk: int | None) -> list[tuple[int, int]]:
    """(kept, generated) for each run of a label's samples that is selected on its own.

    ``chunk`` None selects among all of a label's samples at once; a chunk of k keeps the best
    k of every ``k / select`` in turn (a stream then holds back at most one chunk).
    """
    if chunk is not None and chunk < 1:
        raise ConfigError(f"chunk={chunk}: must be >= 1")
    if chunk is None or chunk >= n_per_label:
        return [(n_per_label, candidates_per_label(n_per_label, select))]
    sizes = [chunk] * (n_per_label // chunk) + (
        [n_per_label % chunk] if n_per_label % chunk else []
    )
    return [(k, candidates_per_label(k, select)) for k in sizes]


def scorer_for(backend: str, model: str, select: float) -> LoadedModel | None:
    """The `transformers` model that reads the samples when ``select`` < 1 on another backend.

    None where nothing must be loaded: no selection, or the `transformers` backend (its own
    model reads the samples).
    """
    if select >= 1 or backend == "transformers":
        return None
    from fedsynth.protocol.models import load_model

    return load_model(model)


def contrast_directions(vectors: np.ndarray) -> np.ndarray:
    """Per class and layer, the unit direction that separates the class from the others.

    ``vectors`` is (C, L, H); with one class it is the class vector itself. A zero direction
    (two identical classes) stays zero and so scores nothing.
    """
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 3:
        raise ConfigError(f"vectors of shape {v.shape}: expected (classes, layers, hidden)")
    d = v - v.mean(axis=0, keepdims=True) if v.shape[0] > 1 else v
    norms = np.linalg.norm(d, axis=-1, keepdims=True)
    out: np.ndarray = np.divide(d, norms, out=np.zeros_like(d), where=norms > 0)
    return out


def alignment_scores(
    features: np.ndarray, directions: np.ndarray, layer_weights: Sequence[float]
) -> np.ndarray:
    """Weighted sum over layers of each sample's projection on its class's direction.

    Args:
        features: (n, L, H) the samples' features (mean residual over their tokens).
        directions: (L, H) the class's unit directions.
        layer_weights: L weights (the SNR shrink factors).

    Returns:
        (n,) scores; within one class, larger means further along the class's direction.
    """
    f = np.asarray(features, dtype=np.float64)
    w = np.asarray(layer_weights, dtype=np.float64)
    if f.ndim != 3 or f.shape[1:] != directions.shape or w.shape != (f.shape[1],):
        raise ConfigError(
            f"features {f.shape}, directions {directions.shape} and {w.size} layer weights "
            "do not match"
        )
    scores: np.ndarray = np.einsum("nlh,lh,l->n", f, directions, w)
    return scores


def top_in_order(scores: np.ndarray, keep: int) -> list[int]:
    """Indices of the ``keep`` highest scores, in their original order (ties: the earlier)."""
    if keep >= len(scores):
        return list(range(len(scores)))
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:keep])


def select_texts(
    scorer: LoadedModel,
    release: Release,
    label: str,
    texts: Sequence[str],
    *,
    keep: int,
    snr: SteeringSnr,
) -> list[int]:
    """Indices (in order) of the ``keep`` texts of ``label`` the release says carry it best.

    The texts are read as the holders' records were (the release's feature function, rendered
    with ``label``'s prompt). When the SNR leaves the class no layer, the first ``keep`` are
    kept: a noise direction would only pick at random.
    """
    if keep >= len(texts):
        return list(range(len(texts)))
    factors = snr.of(label).factors
    layers = release.manifest.layers
    weights = [float(factors[layer]) for layer in layers]
    if not any(w > 0 for w in weights):
        return list(range(keep))
    directions = contrast_directions(release.vectors)[release.labels.index(label)]
    features, _ = extract_features(
        scorer, list(texts), [label] * len(texts), release.manifest.feature_spec
    )
    return top_in_order(alignment_scores(features, directions, weights), keep)
