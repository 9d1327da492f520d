"""Tests of the Private Evolution core: votes, thresholding, selection, next population."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedsynth.protocol.errors import ConfigError, ShapeError
from fedsynth.protocol.pe import (
    Population,
    Selection,
    plan_next_population,
    select_survivors,
    threshold_histogram,
    vote_histogram,
)

# ---------------------------------------------------------------- helpers


def _random_case(
    seed: int, *, n: int, n_labels: int, per_label: int, dim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Continuous random embeddings (ties have probability zero)."""
    rng = np.random.default_rng(seed)
    private = rng.normal(size=(n, dim)).astype(np.float32)
    labels = rng.integers(0, n_labels, size=n)
    candidates = rng.normal(size=(n_labels * per_label, dim)).astype(np.float32)
    return private, labels, candidates


def _reference_votes(
    private: np.ndarray,
    labels: np.ndarray,
    candidates: np.ndarray,
    *,
    n_labels: int,
    per_label: int,
    top_k: int,
) -> tuple[np.ndarray, list[set[int]]]:
    """Brute force: full L2 distances to the example's own label block, k smallest."""
    votes = np.zeros(n_labels * per_label, dtype=np.int64)
    chosen: list[set[int]] = []
    for x, c in zip(private.astype(np.float64), labels, strict=True):
        block = candidates[c * per_label : (c + 1) * per_label].astype(np.float64)
        dist = np.linalg.norm(block - x[None, :], axis=1)
        nearest = {int(c) * per_label + int(i) for i in np.argsort(dist, kind="stable")[:top_k]}
        chosen.append(nearest)
        for j in nearest:
            votes[j] += 1
    return votes, chosen


# ---------------------------------------------------------------- vote_histogram


def test_each_example_votes_for_its_nearest_candidate_of_its_own_label() -> None:
    # Label 0 candidates at x=0 and x=10; label 1 candidates at x=1 and x=100. The example of
    # label 1 at x=0.1 is nearest to label 0's candidate 0 overall, but must vote within label 1.
    candidates = np.array([[0.0, 0.0], [10.0, 0.0], [1.0, 0.0], [100.0, 0.0]], dtype=np.float32)
    private = np.array([[0.1, 0.0], [9.0, 0.0], [0.1, 0.0], [60.0, 0.0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    votes = vote_histogram(private, labels, candidates, n_labels=2, per_label=2)
    assert votes.dtype == np.int64
    assert votes.tolist() == [1, 1, 1, 1]
    votes = vote_histogram(private[:3], labels[:3], candidates, n_labels=2, per_label=2)
    assert votes.tolist() == [1, 1, 1, 0]


def test_top_k_gives_k_distinct_nearest_votes() -> None:
    candidates = np.array([[0.0], [1.0], [2.0], [3.0], [50.0], [51.0]], dtype=np.float32)
    private = np.array([[0.2], [2.9]], dtype=np.float32)
    votes = vote_histogram(private, np.array([0, 0]), candidates, n_labels=1, per_label=6, top_k=3)
    # 0.2 -> {0, 1, 2}; 2.9 -> {3, 2, 1}
    assert votes.tolist() == [1, 2, 2, 1, 0, 0]
    # top_k == per_label: everyone votes for every candidate of its label, once.
    votes = vote_histogram(private, np.array([0, 0]), candidates, n_labels=1, per_label=6, top_k=6)
    assert votes.tolist() == [2] * 6


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 40),
    n_labels=st.integers(1, 4),
    per_label=st.integers(1, 7),
    dim=st.integers(1, 6),
    data=st.data(),
)
def test_votes_match_brute_force(
    seed: int, n: int, n_labels: int, per_label: int, dim: int, data: st.DataObject
) -> None:
    top_k = data.draw(st.integers(1, per_label))
    private, labels, candidates = _random_case(
        seed, n=n, n_labels=n_labels, per_label=per_label, dim=dim
    )
    votes = vote_histogram(
        private, labels, candidates, n_labels=n_labels, per_label=per_label, top_k=top_k
    )
    expected, _ = _reference_votes(
        private, labels, candidates, n_labels=n_labels, per_label=per_label, top_k=top_k
    )
    assert votes.shape == (n_labels * per_label,)
    np.testing.assert_array_equal(votes, expected)
    assert int(votes.sum()) == n * top_k
    # Each label block receives exactly (#members of that label) * top_k votes.
    for c in range(n_labels):
        block = votes[c * per_label : (c + 1) * per_label]
        assert int(block.sum()) == int((labels == c).sum()) * top_k
        assert block.max(initial=0) <= int((labels == c).sum())


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n_labels=st.integers(1, 3),
    per_label=st.integers(1, 6),
    dim=st.integers(1, 4),
    n=st.integers(1, 25),
)
def test_add_remove_one_example_sensitivity(
    data: st.DataObject, n_labels: int, per_label: int, dim: int, n: int
) -> None:
    # Arbitrary floats, duplicates and ties included: the sensitivity must hold regardless.
    elements = st.floats(-4, 4, allow_nan=False, width=32)
    private = data.draw(hnp.arrays(np.float32, (n, dim), elements=elements))
    candidates = data.draw(hnp.arrays(np.float32, (n_labels * per_label, dim), elements=elements))
    labels = data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, n_labels - 1)))
    top_k = data.draw(st.integers(1, per_label))
    removed = data.draw(st.integers(0, n - 1))
    kwargs = {"n_labels": n_labels, "per_label": per_label, "top_k": top_k}
    full = vote_histogram(private, labels, candidates, **kwargs)
    keep = np.arange(n) != removed
    without = vote_histogram(private[keep], labels[keep], candidates, **kwargs)
    diff = full - without
    assert int(np.abs(diff).sum()) == top_k
    assert math.isclose(float(np.linalg.norm(diff)), math.sqrt(top_k))
    assert set(np.unique(diff).tolist()) <= {0, 1}
    c = int(labels[removed])
    changed = np.nonzero(diff)[0]
    assert all(c * per_label <= i < (c + 1) * per_label for i in changed)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
@pytest.mark.parametrize("top_k", [1, 3])
def test_chunking_gives_identical_results(chunk: int, top_k: int) -> None:
    private, labels, candidates = _random_case(7, n=57, n_labels=3, per_label=5, dim=8)
    kwargs = {"n_labels": 3, "per_label": 5, "top_k": top_k}
    reference = vote_histogram(private, labels, candidates, **kwargs)
    chunked = vote_histogram(private, labels, candidates, chunk=chunk, **kwargs)
    np.testing.assert_array_equal(chunked, reference)
    assert int(chunked.sum()) == 57 * top_k


def test_no_private_examples_gives_zero_histogram() -> None:
    candidates = np.ones((6, 3), dtype=np.float32)
    votes = vote_histogram(
        np.zeros((0, 3), dtype=np.float32),
        np.zeros(0, dtype=np.int64),
        candidates,
        n_labels=2,
        per_label=3,
    )
    assert votes.tolist() == [0] * 6


def test_vote_histogram_does_not_modify_inputs() -> None:
    private, labels, candidates = _random_case(3, n=10, n_labels=2, per_label=3, dim=4)
    before = (private.copy(), labels.copy(), candidates.copy())
    vote_histogram(private, labels, candidates, n_labels=2, per_label=3, top_k=2)
    for a, b in zip((private, labels, candidates), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_vote_histogram_errors() -> None:
    private, labels, candidates = _random_case(0, n=5, n_labels=2, per_label=3, dim=4)
    kw = {"n_labels": 2, "per_label": 3}
    with pytest.raises(ShapeError, match="2-D"):
        vote_histogram(private[0], labels, candidates, **kw)
    with pytest.raises(ShapeError, match="2-D"):
        vote_histogram(private, labels, candidates[0], **kw)
    with pytest.raises(ShapeError, match="5 candidates"):
        vote_histogram(private, labels, candidates[:5], **kw)
    with pytest.raises(ShapeError, match="dimension 3"):
        vote_histogram(private[:, :3], labels, candidates, **kw)
    with pytest.raises(ShapeError, match="one entry per private example"):
        vote_histogram(private, labels[:4], candidates, **kw)
    with pytest.raises(ShapeError, match="one entry per private example"):
        vote_histogram(private, labels.reshape(5, 1), candidates, **kw)
    with pytest.raises(ConfigError, match="top_k=0"):
        vote_histogram(private, labels, candidates, top_k=0, **kw)
    with pytest.raises(ConfigError, match="top_k=4"):
        vote_histogram(private, labels, candidates, top_k=4, **kw)
    bad = labels.copy()
    bad[0] = 2
    with pytest.raises(ConfigError, match=r"\[0, 2\)"):
        vote_histogram(private, bad, candidates, **kw)
    bad[0] = -1
    with pytest.raises(ConfigError, match=r"\[0, 2\)"):
        vote_histogram(private, bad, candidates, **kw)


# ---------------------------------------------------------------- threshold_histogram


def test_threshold_histogram_zeros_at_or_below_threshold() -> None:
    hist = np.array([-3.0, 0.0, 1.9, 2.0, 2.0001, 7.5])
    out = threshold_histogram(hist, 2.0)
    assert out.dtype == np.float64
    assert out.tolist() == [0.0, 0.0, 0.0, 0.0, 2.0001, 7.5]
    # A copy: the input is unchanged.
    assert hist.tolist() == [-3.0, 0.0, 1.9, 2.0, 2.0001, 7.5]
    # Threshold 0 removes exactly the non-positive counts; integer input accepted.
    assert threshold_histogram(np.array([-1, 0, 1, 5]), 0.0).tolist() == [0.0, 0.0, 1.0, 5.0]
    # A negative threshold keeps values above it (including negative ones).
    assert threshold_histogram(np.array([-2.0, -0.5, 3.0]), -1.0).tolist() == [0.0, -0.5, 3.0]


# ---------------------------------------------------------------- select_survivors


def _select(
    hist: list[float], n_labels: int, per_label: int, keep: int, method: str, seed: int = 0
):
    return select_survivors(
        np.asarray(hist, dtype=np.float64),
        n_labels=n_labels,
        per_label=per_label,
        keep=keep,
        method=method,
        rng=np.random.default_rng(seed),
    )


def test_rank_keeps_top_counts_ties_by_index_positive_only() -> None:
    block0 = [3.0, 5.0, 5.0, 0.0, -2.0, 1.0]
    block1 = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    block2 = [2.0, 2.0, 2.0, 2.0, 9.0, 0.5]
    hist = block0 + block1 + block2
    assert _select(hist, 3, 6, 3, "rank") == [[1, 2, 0], [], [4, 0, 1]]
    # keep larger than the positive count: only the positive ones.
    assert _select(hist, 3, 6, 6, "rank") == [[1, 2, 0, 5], [], [4, 0, 1, 2, 3, 5]]
    assert _select(hist, 3, 6, 1, Selection.RANK) == [[1], [], [4]]


def test_rank_all_negative_label_selects_nothing() -> None:
    assert _select([-1.0, -5.0, -0.1, 4.0, 0.0, 2.0], 2, 3, 2, "rank") == [[], [0, 2]]


@settings(max_examples=80, deadline=None)
@given(
    n_labels=st.integers(1, 3),
    per_label=st.integers(1, 8),
    data=st.data(),
)
def test_rank_matches_reference_sort(n_labels: int, per_label: int, data: st.DataObject) -> None:
    # Small integer counts so ties are frequent.
    hist = data.draw(
        st.lists(
            st.integers(-3, 4).map(float),
            min_size=n_labels * per_label,
            max_size=n_labels * per_label,
        )
    )
    keep = data.draw(st.integers(1, per_label))
    got = _select(hist, n_labels, per_label, keep, "rank")
    for c in range(n_labels):
        block = hist[c * per_label : (c + 1) * per_label]
        ref = sorted((i for i in range(per_label) if block[i] > 0), key=lambda i: (-block[i], i))
        assert got[c] == ref[:keep]


def test_probabilistic_only_positive_and_proportional() -> None:
    # Label 0: weights 0, 1, 3, -4 (clipped to 0), 6; label 1: nothing positive.
    hist = [0.0, 1.0, 3.0, -4.0, 6.0, 0.0, -1.0, 0.0, 0.0, 0.0]
    rng = np.random.default_rng(1234)
    counts: Counter[int] = Counter()
    draws = 0
    for _ in range(2000):
        out = select_survivors(
            np.asarray(hist), n_labels=2, per_label=5, keep=5, method="probabilistic", rng=rng
        )
        assert out[1] == []
        assert len(out[0]) == 5
        assert set(out[0]) <= {1, 2, 4}
        counts.update(out[0])
        draws += len(out[0])
    assert draws == 10_000
    # Binomial std of a frequency over 10 000 draws is <= 0.005; allow 5 std.
    assert counts[1] / draws == pytest.approx(0.1, abs=0.025)
    assert counts[2] / draws == pytest.approx(0.3, abs=0.025)
    assert counts[4] / draws == pytest.approx(0.6, abs=0.025)


def test_probabilistic_is_reproducible_with_seed() -> None:
    hist = [1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 5.0, 5.0]
    a = _select(hist, 2, 4, 3, "probabilistic", seed=9)
    b = _select(hist, 2, 4, 3, "probabilistic", seed=9)
    assert a == b
    assert all(i in {0, 1, 2, 3} for i in a[0])
    assert all(i in {2, 3} for i in a[1])


def test_select_survivors_errors() -> None:
    with pytest.raises(ShapeError, match="histogram shape"):
        _select([1.0, 2.0, 3.0], 2, 2, 1, "rank")
    with pytest.raises(ConfigError, match="keep=0"):
        _select([1.0, 2.0, 3.0, 4.0], 2, 2, 0, "rank")
    with pytest.raises(ConfigError, match="keep=3"):
        _select([1.0, 2.0, 3.0, 4.0], 2, 2, 3, "rank")
    with pytest.raises(ValueError, match="bogus"):
        _select([1.0, 2.0, 3.0, 4.0], 2, 2, 1, "bogus")


# ---------------------------------------------------------------- plan_next_population


@pytest.mark.parametrize("keep_selected", [True, False])
def test_plan_sizes_kept_and_parents(keep_selected: bool) -> None:
    per_label = 6
    selected = [[4, 1, 4, 1, 1], [], [0, 2, 3, 5, 1, 4]]
    hist = np.array([1, 5, 0, 0, 2, 0] + [0] * 6 + [1, 1, 1, 1, 1, 1], dtype=np.float64)
    plan = plan_next_population(
        selected,
        hist,
        per_label=per_label,
        keep_selected=keep_selected,
        rng=np.random.default_rng(0),
    )
    assert len(plan) == 3
    for (kept, parents), chosen in zip(plan, selected, strict=True):
        assert len(kept) + len(parents) == per_label
        if keep_selected:
            assert kept == sorted(set(chosen))
        else:
            assert kept == []
        if chosen:
            assert set(parents) <= set(chosen)
        assert all(0 <= p < per_label for p in parents)
        assert all(isinstance(p, int) for p in kept + parents)
    if keep_selected:
        # Every candidate of label 2 is kept: nothing new.
        assert plan[2] == ([0, 1, 2, 3, 4, 5], [])
        assert plan[0][0] == [1, 4]


@pytest.mark.parametrize("size", [2, 9, 40])
def test_plan_size_other_than_n(size: int) -> None:
    """A final population of ``size`` per label, parents indexed in the voted N's blocks."""
    hist = np.array([0, 3, 0, 1, 0, 0, 2, 0], dtype=np.float64)
    selected = [[1, 3], [2]]
    plan = plan_next_population(
        selected, hist, per_label=4, keep_selected=True, rng=np.random.default_rng(1), size=size
    )
    for (kept, parents), chosen in zip(plan, selected, strict=True):
        assert len(kept) + len(parents) == size
        assert kept == sorted(chosen)[:size]
        assert set(parents) <= set(chosen)
    with pytest.raises(ConfigError, match="size=0"):
        plan_next_population(
            selected, hist, per_label=4, keep_selected=True, rng=np.random.default_rng(1), size=0
        )


def test_plan_parents_proportional_to_counts() -> None:
    # Label block: counts 1 (index 0) and 3 (index 2); index 1 has count 7 but is not selected.
    hist = np.array([1.0, 7.0, 3.0, 0.0])
    rng = np.random.default_rng(5)
    counts: Counter[int] = Counter()
    for _ in range(2500):
        ((kept, parents),) = plan_next_population(
            [[0, 2]], hist, per_label=4, keep_selected=False, rng=rng
        )
        assert kept == []
        counts.update(parents)
    total = sum(counts.values())
    assert total == 10_000
    assert set(counts) == {0, 2}
    assert counts[2] / total == pytest.approx(0.75, abs=0.025)


def test_plan_uniform_parents_when_nothing_selected() -> None:
    hist = np.zeros(8)
    rng = np.random.default_rng(11)
    counts: Counter[int] = Counter()
    for _ in range(2500):
        plan = plan_next_population([[], []], hist, per_label=4, keep_selected=True, rng=rng)
        for kept, parents in plan:
            assert kept == []
            assert len(parents) == 4
            counts.update(parents)
    total = sum(counts.values())
    assert total == 20_000
    for i in range(4):
        assert counts[i] / total == pytest.approx(0.25, abs=0.02)


# ---------------------------------------------------------------- Population


def test_population_valid() -> None:
    pop = Population(
        labels=("a", "b"),
        samples=("a1", "a2", "a3", "b1", "b2", "b3"),
        per_label=3,
        origin=("random",) * 6,
    )
    assert pop.of_label(0) == ("a1", "a2", "a3")
    assert pop.of_label(1) == ("b1", "b2", "b3")
    assert pop.sample_labels == ["a", "a", "a", "b", "b", "b"]
    # origin is optional.
    assert Population(labels=("x",), samples=("s",), per_label=1).origin == ()


def test_population_validation() -> None:
    with pytest.raises(ConfigError, match="per_label=0"):
        Population(labels=("a",), samples=(), per_label=0)
    with pytest.raises(ShapeError, match="population has 3 samples"):
        Population(labels=("a", "b"), samples=("1", "2", "3"), per_label=2)
    with pytest.raises(ShapeError, match="population has 5 samples"):
        Population(labels=("a", "b"), samples=("1", "2", "3", "4", "5"), per_label=2)
    with pytest.raises(ShapeError, match="origin"):
        Population(labels=("a",), samples=("1", "2"), per_label=2, origin=("random",))
