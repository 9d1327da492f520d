from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import scipy.linalg

from fedsynth.protocol.errors import ConfigError
from fedsynth.simulations.datasets import (
    load_rotten_tomatoes,
    split_train_test,
    subsample_per_label,
)
from fedsynth.simulations.metrics import (
    embed_texts,
    frechet_distance,
    label_fidelity,
    load_embedder,
    one_sided_proportion_test,
    precision_recall_embeddings,
    train_text_classifier,
    tstr_scores,
)


def reference_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.real(scipy.linalg.sqrtm(s_a @ s_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


def test_frechet_identical_is_zero() -> None:
    a = np.random.default_rng(0).normal(size=(200, 16))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_mean_shift_equals_squared_norm() -> None:
    a = np.random.default_rng(1).normal(size=(300, 8))
    shift = np.linspace(0.1, 0.8, 8)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    assert frechet_distance(a, a + 2 * shift) > frechet_distance(a, a + shift)


def test_frechet_matches_sqrtm_reference() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(400, 12))
    b = rng.normal(size=(350, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    assert frechet_distance(a, b) == pytest.approx(reference_frechet(a, b), rel=1e-5)


def test_frechet_fewer_rows_than_dims_is_finite() -> None:
    rng = np.random.default_rng(3)
    value = frechet_distance(rng.normal(size=(10, 64)), rng.normal(size=(12, 64)))
    assert np.isfinite(value)
    assert value > 0


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.zeros((1, 4)), np.zeros((5, 4)), "a has 1 rows"),
        (np.zeros((5, 4)), np.zeros((5, 3)), "dimension"),
        (np.zeros(5), np.zeros((5, 1)), "2-D"),
    ],
)
def test_frechet_rejects_bad_input(a: np.ndarray, b: np.ndarray, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        frechet_distance(a, b)


def test_label_fidelity_toy() -> None:
    texts = [
        "good great fine",
        "great good",
        "fine good nice",
        "bad awful",
        "awful poor bad",
        "poor bad",
    ]
    labels = ["pos", "pos", "pos", "neg", "neg", "neg"]
    clf = train_text_classifier(texts, labels)
    assert label_fidelity(clf, ["good nice", "bad poor"], ["pos", "neg"]) == 1.0
    assert label_fidelity(clf, ["good nice", "bad poor"], ["neg", "neg"]) == 0.5
    with pytest.raises(ConfigError, match="2 texts but 1 labels"):
        label_fidelity(clf, ["a", "b"], ["pos"])


def test_train_requires_two_labels() -> None:
    with pytest.raises(ConfigError, match="at least 2"):
        train_text_classifier(["a", "b"], ["x", "x"])


def test_tstr_on_real_rotten_tomatoes() -> None:
    train, test = split_train_test(load_rotten_tomatoes().records, seed=0)
    train = subsample_per_label(train, per_label=1000, seed=0)
    test = subsample_per_label(test, per_label=250, seed=0)
    scores = tstr_scores(
        [r.text for r in train],
        [r.label for r in train],
        [r.text for r in test],
        [r.label for r in test],
    )
    assert scores["degenerate"] == 0.0
    assert scores["accuracy"] > 0.6
    assert scores["macro_f1"] > 0.6


def test_tstr_degenerate() -> None:
    test_texts = ["a", "b", "c", "d"]
    test_labels = ["pos", "pos", "pos", "neg"]
    scores = tstr_scores(["x", "y"], ["pos", "pos"], test_texts, test_labels)
    assert scores["degenerate"] == 1.0
    assert scores["accuracy"] == 0.75
    assert scores["macro_f1"] == pytest.approx((2 * 0.75 / 1.75) / 2)
    empty = tstr_scores([], [], test_texts, test_labels)
    assert empty == {"accuracy": 0.0, "macro_f1": 0.0, "degenerate": 1.0}


def test_proportion_test() -> None:
    p = one_sided_proportion_test(70, 100, 50, 100)
    assert p < 0.01
    assert p == pytest.approx(0.00187, abs=2e-4)
    assert one_sided_proportion_test(50, 100, 50, 100) == pytest.approx(0.5)
    assert one_sided_proportion_test(50, 100, 70, 100) > 0.99
    assert one_sided_proportion_test(0, 10, 0, 20) == 0.5
    with pytest.raises(ConfigError, match="n_a"):
        one_sided_proportion_test(0, 0, 1, 2)
    with pytest.raises(ConfigError, match="exceeds"):
        one_sided_proportion_test(5, 4, 1, 2)


def test_precision_recall_self_and_disjoint() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=(300, 10))
    assert precision_recall_embeddings(a, a, k=3) == (1.0, 1.0)
    far = rng.normal(size=(200, 10)) + 100.0
    assert precision_recall_embeddings(a, far, k=3) == (0.0, 0.0)
    # Synthetic data covering only one of two real modes: full precision, about half recall.
    two_modes = np.vstack([a, rng.normal(size=(300, 10)) + 50.0])
    precision, recall = precision_recall_embeddings(two_modes, a[:200], k=3)
    assert precision == 1.0
    assert 0.3 < recall <= 0.5
    with pytest.raises(ConfigError, match="at least 4"):
        precision_recall_embeddings(a[:3], a, k=3)


@pytest.fixture(scope="module")
def embedder() -> Iterator[Any]:
    yield load_embedder(device="cpu")


def test_embedder_shapes_and_similarity(embedder: Any) -> None:
    texts = [
        "The movie was wonderful and moving.",
        "A truly wonderful, moving film.",
        "Quarterly profits at the bank fell sharply.",
    ]
    vectors = embed_texts(embedder, texts, batch_size=2)
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.3
    assert embed_texts(embedder, []).shape == (0, 384)
