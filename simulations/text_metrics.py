"""Diversity, distribution and attack metrics of a synthetic text set (pure functions).

Each takes texts or precomputed sentence embeddings and returns plain floats, so studies can run
them on any method's output and tests can check them on hand-made inputs.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from fedsynth.protocol.errors import ConfigError

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, apostrophes)."""
    return _WORD.findall(text.lower())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams of all texts (Li et al. 2016); 0.0 when there are none."""
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    grams: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        tokens = words(text)
        grams.update(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def self_bleu(texts: Sequence[str], *, max_texts: int = 200, seed: int = 0) -> float:
    """Mean sentence BLEU (sacrebleu, 0-100) of each text against all the others.

    Higher means the samples repeat each other. At most ``max_texts`` texts (a seeded sample) are
    scored, since the cost grows with the square of their number.
    """
    import sacrebleu

    if len(texts) < 2:
        raise ConfigError(f"Self-BLEU needs at least 2 texts, got {len(texts)}")
    chosen = list(texts)
    if len(chosen) > max_texts:
        order = np.random.default_rng(seed).permutation(len(chosen))[:max_texts]
        chosen = [chosen[int(i)] for i in order]
    scores = [
        sacrebleu.sentence_bleu(text, chosen[:i] + chosen[i + 1 :]).score
        for i, text in enumerate(chosen)
    ]
    return float(np.mean(scores))


def mauve_score(real: np.ndarray, synthetic: np.ndarray, *, seed: int = 0) -> float:
    """MAUVE (mauve-text) between two sets of precomputed sentence embeddings, in (0, 1]."""
    import mauve

    if len(real) < 4 or len(synthetic) < 4:
        raise ConfigError("MAUVE needs at least 4 texts on each side")
    buckets = max(2, min(len(real), len(synthetic)) // 10)
    out = mauve.compute_mauve(
        p_features=np.asarray(real, dtype=np.float32),
        q_features=np.asarray(synthetic, dtype=np.float32),
        num_buckets=buckets,
        seed=seed,
        verbose=False,
    )
    return float(out.mauve)


class BigramModel:
    """Next-word predictor: most frequent follower of the previous word, unigram fallback.

    A deliberately small language model, so the score measures what the synthetic text teaches
    about real word order rather than the capacity of the learner.
    """

    def __init__(self, texts: Sequence[str]) -> None:
        self._followers: dict[str, Counter[str]] = defaultdict(Counter)
        unigrams: Counter[str] = Counter()
        for text in texts:
            tokens = words(text)
            unigrams.update(tokens)
            for prev, nxt in itertools.pairwise(tokens):
                self._followers[prev][nxt] += 1
        self._fallback = unigrams.most_common(1)[0][0] if unigrams else ""
        self._best = {w: c.most_common(1)[0][0] for w, c in self._followers.items()}

    def predict(self, previous: str) -> str:
        """The most likely next word after ``previous``."""
        return self._best.get(previous, self._fallback)


def next_word_accuracy(train_texts: Sequence[str], test_texts: Sequence[str]) -> float:
    """Share of real next words a bigram model trained on ``train_texts`` predicts exactly.

    Every word of each test text after its first is one prediction.
    """
    model = BigramModel(train_texts)
    hits = total = 0
    for text in test_texts:
        tokens = words(text)
        for prev, nxt in itertools.pairwise(tokens):
            hits += model.predict(prev) == nxt
            total += 1
    if total == 0:
        raise ConfigError("the test texts hold no word pairs")
    return hits / total


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Vectors along the last axis scaled to unit L2 norm (zero vectors stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    unit: np.ndarray = x / np.maximum(norms, 1e-12)
    return unit


def nearest_similarity(queries: np.ndarray, synthetic: np.ndarray) -> np.ndarray:
    """Cosine similarity of each query to its nearest synthetic sample."""
    similarity: np.ndarray = (unit_rows(queries) @ unit_rows(synthetic).T).max(axis=1)
    return similarity


def membership_auc(members: np.ndarray, non_members: np.ndarray, synthetic: np.ndarray) -> float:
    """ROC AUC of the nearest-synthetic-neighbour attack (0.5 = no better than guessing).

    The attacker scores each candidate record by the cosine similarity of its embedding to the
    closest synthetic sample and guesses "member" for high scores. Members are private training
    records the method saw, non-members are held-out records from the same distribution.
    """
    from sklearn.metrics import roc_auc_score

    if len(members) == 0 or len(non_members) == 0:
        raise ConfigError("the attack needs members and non-members")
    scores = np.concatenate(
        [nearest_similarity(members, synthetic), nearest_similarity(non_members, synthetic)]
    )
    truth = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    return float(roc_auc_score(truth, scores))


def exposure(canary_score: float, candidate_scores: Sequence[float]) -> float:
    """Canary exposure (Carlini et al., 2019) estimated from a sample of other secrets.

    ``log2(n + 1) - log2(rank)``, where rank is the canary's 1-based position among itself and
    the n candidates by model score (higher = more likely). 0 means the canary ranks last, the
    maximum ``log2(n + 1)`` that it ranks first; a model that never saw it scores about 1 on
    average (rank uniform).
    """
    if len(candidate_scores) == 0:
        raise ConfigError("exposure needs candidate secrets to rank the canary against")
    rank = 1 + sum(1 for s in candidate_scores if s > canary_score)
    return float(np.log2(len(candidate_scores) + 1) - np.log2(rank))
