"""Selection by the release: keep the samples that move furthest along their class direction."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.features import extract_features
from fedsynth.protocol.models import LoadedModel, tiny_model
from fedsynth.server.generation import GenerationConfig
from fedsynth.server.release import Release
from fedsynth.server.selection import (
    alignment_scores,
    candidates_per_label,
    contrast_directions,
    select_caution,
    select_texts,
    selection_chunks,
    top_in_order,
)
from fedsynth.server.snr import steering_snr
from fedsynth.server.synthesize import generate_from_release
from tests.server.releases import make_test_release


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return tiny_model(seed=0)


def test_candidates_and_bad_fractions() -> None:
    assert candidates_per_label(150, 1.0) == 150
    assert candidates_per_label(150, 0.5) == 300
    assert candidates_per_label(100, 1 / 3) == 300
    assert candidates_per_label(10, 0.3) == 34
    for bad in (0, -0.5, 1.5, True, "half"):
        with pytest.raises(ConfigError, match="select="):
            candidates_per_label(10, bad)  # type: ignore[arg-type]


def test_selection_chunks_keep_n_in_runs_of_the_chunk() -> None:
    assert selection_chunks(10, 0.5, None) == [(10, 20)]
    assert selection_chunks(10, 0.5, 4) == [(4, 8), (4, 8), (2, 4)]
    assert selection_chunks(3, 0.5, 8) == [(3, 6)]
    assert selection_chunks(9, 1.0, 4) == [(4, 4), (4, 4), (1, 1)]
    assert selection_chunks(5, 0.3, 2) == [(2, 7), (2, 7), (1, 4)]
    with pytest.raises(ConfigError, match="chunk=0"):
        selection_chunks(5, 0.5, 0)


def test_selection_on_more_than_two_classes_comes_with_a_warning() -> None:
    assert select_caution(0.5, ["neg", "pos"]) is None
    assert select_caution(1.0, ["a", "b", "c", "d", "e"]) is None
    caution = select_caution(0.5, ["a", "b", "c", "d", "e"])
    assert caution is not None and "select=0.5 with 5 classes" in caution


def test_contrast_directions_separate_the_classes() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(size=(3, 2, 8))
    d = contrast_directions(v)
    assert np.allclose(np.linalg.norm(d, axis=-1), 1.0)
    centred = v - v.mean(axis=0)
    cos = np.sum(d * centred, axis=-1) / np.linalg.norm(centred, axis=-1)
    assert np.allclose(cos, 1.0)  # the direction of v_c minus the mean of all classes
    single = contrast_directions(v[:1])
    assert np.allclose(single[0] * np.linalg.norm(v[0], axis=-1, keepdims=True), v[0])
    same = contrast_directions(np.stack([v[0], v[0]]))
    assert np.all(same == 0)  # identical classes: nothing separates them, nothing scored
    with pytest.raises(ConfigError, match="expected"):
        contrast_directions(v[0])


def test_alignment_is_the_weighted_projection() -> None:
    directions = np.zeros((2, 3))
    directions[0, 0] = directions[1, 1] = 1.0
    features = np.array([[[2.0, 5, 0], [0, 1, 0]], [[1, 0, 0], [0, 3, 9]]])
    assert alignment_scores(features, directions, [1.0, 1.0]).tolist() == [3.0, 4.0]
    assert alignment_scores(features, directions, [1.0, 0.0]).tolist() == [2.0, 1.0]
    with pytest.raises(ConfigError, match="do not match"):
        alignment_scores(features, directions, [1.0])


def test_top_in_order_keeps_the_best_in_generation_order() -> None:
    assert top_in_order(np.array([0.1, 5.0, -1.0, 3.0, 3.0]), 3) == [1, 3, 4]
    assert top_in_order(np.array([2.0, 2.0, 2.0]), 2) == [0, 1]  # ties: the earlier
    assert top_in_order(np.array([1.0, 0.0]), 5) == [0, 1]


def _steered_release(llama: LoadedModel, up: list[str], down: list[str]) -> Release:
    """A release whose 'pos' class points from ``down`` texts to ``up`` texts ('neg' back)."""
    release = make_test_release(llama)
    spec = release.manifest.feature_spec
    f_up, _ = extract_features(llama, up, ["pos"] * len(up), spec)
    f_down, _ = extract_features(llama, down, ["pos"] * len(down), spec)
    toward = f_up.mean(axis=0) - f_down.mean(axis=0)
    # Far above the test release's noise (the tiny model's residuals are small).
    toward = (50.0 * toward / np.linalg.norm(toward, axis=-1, keepdims=True)).astype(np.float32)
    vectors = np.stack([toward, -toward, np.zeros_like(toward)])
    return dataclasses.replace(release, vectors=vectors)


def test_the_release_keeps_the_texts_its_class_points_to(llama: LoadedModel) -> None:
    up = ["great fun, loved it"] * 3 + ["a great delight"] * 3
    down = ["dull and bad", "bad, awful, dull", "awful"] * 2
    release = _steered_release(llama, up, down)
    snr = steering_snr(release)
    assert all(f > 0 for f in snr.of("pos").factors.values())  # the premise: real signal
    texts = [down[0], up[0], down[1], up[3], down[2], up[1]]
    assert select_texts(llama, release, "pos", texts, keep=3, snr=snr) == [1, 3, 5]
    assert select_texts(llama, release, "neg", texts, keep=3, snr=snr) == [0, 2, 4]
    assert select_texts(llama, release, "pos", texts, keep=9, snr=snr) == list(range(6))


def test_a_class_that_is_all_noise_keeps_its_first_samples(llama: LoadedModel) -> None:
    release = _steered_release(llama, ["great fun"], ["dull"])
    # Tiny class vectors against the release's noise: every shrink factor is 0.
    quiet = dataclasses.replace(release, vectors=release.vectors * 1e-6)
    snr = steering_snr(quiet)
    assert all(f == 0 for f in snr.of("pos").factors.values())
    texts = ["dull", "great fun", "dull", "great fun"]
    assert select_texts(llama, quiet, "pos", texts, keep=2, snr=snr) == [0, 1]


def test_generation_keeps_the_best_of_its_candidates(llama: LoadedModel) -> None:
    release = _steered_release(llama, ["great fun, loved it"], ["dull and bad"])
    config = GenerationConfig(max_new_tokens=6, batch_size=4)
    kwargs: dict[str, Any] = {"strength": 0.2, "config": config, "seed": 5}
    candidates = generate_from_release(llama, release, n_per_label=6, **kwargs)
    kept = generate_from_release(llama, release, n_per_label=3, select=0.5, **kwargs)
    snr = steering_snr(release)
    for label in release.labels:
        texts = [s.text for s in candidates if s.label == label]
        mine = [s.text for s in kept if s.label == label]
        assert len(mine) == 3
        want = select_texts(llama, release, label, texts, keep=3, snr=snr)
        assert mine == [texts[i] for i in want]
    assert [s.label for s in kept] == [lb for lb in release.labels for _ in range(3)]


class _NoHooksBackend:
    """A generation backend without a `transformers` model behind it (as llama.cpp)."""

    backend = "llamacpp"

    def __init__(self, loaded: LoadedModel) -> None:
        self.fingerprint = loaded.fingerprint
        self.num_layers = loaded.num_layers
        self.hidden_size = loaded.hidden_size
        self.steerable_layers = range(loaded.num_layers)

    def generate(self, prompts: list[str], **_: Any) -> list[str]:
        return ["text"] * len(prompts)


def test_selection_on_another_backend_needs_a_scorer(llama: LoadedModel) -> None:
    release = make_test_release(llama)
    backend: Any = _NoHooksBackend(llama)
    config = GenerationConfig(max_new_tokens=4, batch_size=4)
    kwargs: dict[str, Any] = {"n_per_label": 2, "strength": 0.1, "config": config, "seed": 0}
    with pytest.raises(ConfigError, match=r"select=0\.5.*scorer"):
        generate_from_release(backend, release, select=0.5, **kwargs)
    samples = generate_from_release(backend, release, select=0.5, scorer=llama, **kwargs)
    assert len(samples) == 2 * len(release.labels)
    assert len(generate_from_release(backend, release, **kwargs)) == 2 * len(release.labels)


def test_a_reading_model_is_loaded_only_for_selection_on_another_backend() -> None:
    from fedsynth.server.selection import scorer_for

    assert scorer_for("transformers", "tiny-llama", 0.5) is None  # its own model reads
    assert scorer_for("llamacpp", "tiny-llama", 1.0) is None  # nothing to select
    loaded = scorer_for("llamacpp", "tiny-llama", 0.5)
    assert isinstance(loaded, LoadedModel) and loaded.name == "tiny-llama"
