"""Several directions per class: the cluster means, the share of samples, the clustering."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.subclass_steering import cluster_vectors, kmeans, nearest, split_counts
from fedsynth.protocol.features import class_unit_sums, clip_to_unit


def test_one_cluster_is_the_class_vector_a_release_decodes() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(12, 2, 5)) * 3
    reference = rng.normal(size=(1, 2, 5))
    clip = np.array([1.5, 4.0])
    unit = clip_to_unit(features - reference[0], clip)
    vectors, sizes = cluster_vectors(unit, clip, np.zeros(12, dtype=np.int64), 1)
    sums = class_unit_sums(
        features,
        ["a"] * 12,
        label_order=["a"],
        reference=reference,
        clip_norms=clip,
        count_weight=1,
    )
    decoded = sums[0, :-1].reshape(2, 5) / sums[0, -1] * clip[:, None]
    assert sizes.tolist() == [12]
    np.testing.assert_allclose(vectors[0], decoded, rtol=1e-5)


def test_each_cluster_averages_its_own_records_only() -> None:
    unit = np.stack([np.full((1, 2), v) for v in (1.0, 3.0, -2.0, -4.0)])  # (4, 1, 2)
    vectors, sizes = cluster_vectors(unit, np.array([2.0]), np.array([0, 0, 2, 2]), 3)
    assert sizes.tolist() == [2, 0, 2]
    np.testing.assert_allclose(vectors[0], [[4.0, 4.0]])  # mean 2, times the clip norm 2
    np.testing.assert_allclose(vectors[1], 0.0)  # an empty cluster steers nothing
    np.testing.assert_allclose(vectors[2], [[-6.0, -6.0]])


@pytest.mark.parametrize(
    ("n", "sizes", "expected"),
    [(10, [5, 5], [5, 5]), (10, [1, 1, 1], [4, 3, 3]), (7, [90, 9, 1], [6, 1, 0]), (3, [1], [3])],
)
def test_samples_are_shared_in_proportion_and_sum_to_n(
    n: int, sizes: list[int], expected: list[int]
) -> None:
    got = split_counts(n, np.array(sizes))
    assert sum(got) == n
    assert sorted(got, reverse=True) == sorted(expected, reverse=True)


def test_records_go_to_the_cluster_they_lie_in() -> None:
    rng = np.random.default_rng(1)
    left = rng.normal(size=(20, 4)) * 0.1 + np.array([5.0, 0, 0, 0])
    right = rng.normal(size=(20, 4)) * 0.1 + np.array([0, 0, 5.0, 0])
    centroids = kmeans(np.vstack([left, right]), 2, seed=0)
    assign = nearest(np.vstack([left, right]), centroids)
    assert len(set(assign[:20])) == 1 and len(set(assign[20:])) == 1
    assert assign[0] != assign[20]
