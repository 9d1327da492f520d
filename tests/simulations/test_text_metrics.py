"""Diversity, distribution and attack metrics on hand-made inputs."""

from __future__ import annotations

import numpy as np
import pytest

from fedsynth.protocol.errors import ConfigError
from fedsynth.simulations.text_metrics import (
    distinct_n,
    mauve_score,
    membership_auc,
    next_word_accuracy,
    self_bleu,
    words,
)


def test_words_and_distinct_n() -> None:
    tokens = ["it's", "a", "good", "film", "a", "good", "one"]
    assert words("It's a GOOD film, a good one!") == tokens
    # unigrams: it's a good film a good one -> 5 unique of 7; bigrams: 6, all but "a good" unique.
    assert distinct_n(["It's a GOOD film, a good one!"], 1) == pytest.approx(5 / 7)
    assert distinct_n(["It's a GOOD film, a good one!"], 2) == pytest.approx(5 / 6)
    assert distinct_n([""], 2) == 0.0
    with pytest.raises(ConfigError):
        distinct_n(["a"], 0)


def test_self_bleu_separates_repetition_from_diversity() -> None:
    same = ["the film was a quiet triumph of style and wit"] * 5
    varied = [
        "the film was a quiet triumph of style and wit",
        "dull plot , wooden acting and a score that never stops",
        "an energetic cast saves a script full of holes",
        "i laughed twice and checked my watch nine times",
        "gorgeous photography cannot hide the empty centre",
    ]
    assert self_bleu(same) == pytest.approx(100.0)
    assert self_bleu(varied) < 10.0
    with pytest.raises(ConfigError):
        self_bleu(["only one"])


def test_next_word_accuracy_counts_bigram_hits() -> None:
    train = ["the cat sat", "the cat ran", "the cat sat"]
    # the->cat (hit), cat->sat (hit); the->cat (hit), cat->ran (miss: "sat" predicted)
    assert next_word_accuracy(train, ["the cat sat", "the cat ran"]) == pytest.approx(3 / 4)
    # unseen previous word falls back to the most common word ("the" or "cat": 3 each)
    assert next_word_accuracy(train, ["dog cat"]) in (0.0, 1.0)
    with pytest.raises(ConfigError):
        next_word_accuracy(train, ["single"])


def test_membership_auc_detects_copies_and_not_independent_data() -> None:
    rng = np.random.default_rng(0)
    members = rng.normal(size=(200, 16))
    non_members = rng.normal(size=(200, 16))
    leaky = members[:150] + 0.01 * rng.normal(size=(150, 16))
    private = rng.normal(size=(150, 16))  # same distribution, no member copied
    assert membership_auc(members, non_members, leaky) > 0.8
    assert 0.42 < membership_auc(members, non_members, private) < 0.58


def test_mauve_separates_distributions() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 8))
    close = rng.normal(size=(200, 8))
    far = rng.normal(loc=3.0, size=(200, 8))
    assert mauve_score(real, close) > 0.8
    assert mauve_score(real, far) < 0.2
