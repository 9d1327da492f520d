"""Private Evolution (PE) core, independent of the modality.

PE (Lin et al., arXiv 2305.15560; for text Aug-PE, Xie et al., arXiv 2403.01749) makes DP
synthetic data without training: a population of candidates is proposed by a *random API*,
each private example votes for its nearest candidates in an *embedding* space, a noisy vote
*histogram* selects survivors, a *variation API* perturbs them into the next population, and
this repeats for T rounds. Only the histogram touches private data, so only it is noised.

This module holds the interfaces and the pure math (votes, thresholding, selection, the next
population). Text implementations live in :mod:`fedsynth.server.pe_text` (generator side) and
:mod:`fedsynth.protocol.embedding` (embedders); the federated protocol in
:mod:`fedsynth.protocol.pe_manifest`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np

from fedsynth.protocol.errors import ConfigError, ShapeError


class Embedder(Protocol):
    """Maps samples to fixed-size vectors; its fingerprint identifies the exact weights."""

    @property
    def name(self) -> str:
        """Human-readable name."""
        ...

    @property
    def fingerprint(self) -> str:
        """sha256 over the embedder's weights/configuration."""
        ...

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        ...

    def embed(self, samples: Sequence[str]) -> np.ndarray:
        """Return (n, dim) float32 embeddings."""
        ...


class RandomAPI(Protocol):
    """Draws fresh samples of one label from public knowledge only (round-0 population)."""

    def random(self, label: str, n: int, *, seed: int) -> list[str]:
        """Return ``n`` samples for ``label``."""
        ...


class VariationAPI(Protocol):
    """Produces variations of given samples (same label), for the next population."""

    def vary(self, label: str, parents: Sequence[str], *, seed: int) -> list[str]:
        """Return one variation per parent, in order."""
        ...


class Selection(StrEnum):
    """How survivors are chosen from the noisy histogram."""

    RANK = "rank"  # the top-``keep`` candidates by noisy count
    PROBABILISTIC = "probabilistic"  # draws proportional to the thresholded count (original PE)


@dataclass(frozen=True)
class Population:
    """One generation of candidates, label-major: ``per_label`` samples of label 0, then 1, ...

    Attributes:
        labels: Label set, in histogram order.
        samples: ``len(labels) * per_label`` samples.
        per_label: Candidates per label N.
        origin: Per sample, how it was made ("random", "kept", "variation").
    """

    labels: tuple[str, ...]
    samples: tuple[str, ...]
    per_label: int
    origin: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.per_label < 1:
            raise ConfigError(f"per_label={self.per_label}: must be >= 1")
        if len(self.samples) != len(self.labels) * self.per_label:
            raise ShapeError(
                f"population has {len(self.samples)} samples, expected "
                f"{len(self.labels)} labels x {self.per_label}"
            )
        if self.origin and len(self.origin) != len(self.samples):
            raise ShapeError("origin must have one entry per sample")

    def of_label(self, index: int) -> tuple[str, ...]:
        """The candidates of label ``index``."""
        return self.samples[index * self.per_label : (index + 1) * self.per_label]

    @property
    def sample_labels(self) -> list[str]:
        """The label of every sample, in order."""
        return [label for label in self.labels for _ in range(self.per_label)]


def vote_histogram(
    private: np.ndarray,
    private_labels: np.ndarray,
    candidates: np.ndarray,
    *,
    n_labels: int,
    per_label: int,
    top_k: int = 1,
    chunk: int = 4096,
) -> np.ndarray:
    """Integer vote histogram of private examples over the candidates of their own label.

    Each example gives one vote to each of its ``top_k`` nearest candidates (L2 distance in
    embedding space). Sensitivity under add/remove of one example: one label's block changes
    by ``top_k`` distinct unit entries, so L1 = ``top_k`` and L2 = ``sqrt(top_k)``.

    Args:
        private: (n, D) embeddings of the private examples.
        private_labels: (n,) label indices in ``[0, n_labels)``.
        candidates: (n_labels * per_label, D) candidate embeddings, label-major.

    Returns:
        (n_labels * per_label,) int64 votes.
    """
    if private.ndim != 2 or candidates.ndim != 2:
        raise ShapeError("private and candidate embeddings must be 2-D")
    if candidates.shape[0] != n_labels * per_label:
        raise ShapeError(
            f"{candidates.shape[0]} candidates, expected {n_labels} labels x {per_label}"
        )
    if private.shape[1] != candidates.shape[1]:
        raise ShapeError(
            f"embedding dimension {private.shape[1]} != candidates' {candidates.shape[1]}"
        )
    if not 1 <= top_k <= per_label:
        raise ConfigError(f"top_k={top_k}: must be in [1, per_label={per_label}]")
    labels = np.asarray(private_labels, dtype=np.int64)
    if labels.shape != (private.shape[0],):
        raise ShapeError("private_labels must have one entry per private example")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_labels):
        raise ConfigError(f"label indices must be in [0, {n_labels})")
    votes = np.zeros(n_labels * per_label, dtype=np.int64)
    cand = candidates.astype(np.float64)
    for c in range(n_labels):
        block = cand[c * per_label : (c + 1) * per_label]
        block_sq = (block**2).sum(axis=1)
        members = np.flatnonzero(labels == c)  # row numbers: no copy of the class's embeddings
        for start in range(0, len(members), chunk):
            part = private[members[start : start + chunk]].astype(np.float64)
            # ||p - q||^2 up to the per-row constant ||p||^2.
            dist = block_sq[None, :] - 2.0 * part @ block.T
            if top_k == 1:
                nearest = dist.argmin(axis=1)[:, None]
            else:
                nearest = np.argpartition(dist, top_k - 1, axis=1)[:, :top_k]
            np.add.at(votes, c * per_label + nearest.reshape(-1), 1)
    return votes


def threshold_histogram(histogram: np.ndarray, threshold: float) -> np.ndarray:
    """Zero every count at or below ``threshold`` (noise floor; post-processing)."""
    out = np.asarray(histogram, dtype=np.float64).copy()
    out[out <= threshold] = 0.0
    return out


def select_survivors(
    histogram: np.ndarray,
    *,
    n_labels: int,
    per_label: int,
    keep: int,
    method: Selection | str,
    rng: np.random.Generator,
) -> list[list[int]]:
    """Per label, the indices (within the label's block) of the selected candidates.

    ``rank`` keeps the ``keep`` highest counts with a positive count (ties by index);
    ``probabilistic`` draws ``keep`` indices with replacement proportional to the count, as in
    the original PE. A label whose counts are all zero (noise won) selects nothing.
    """
    method = Selection(method)
    counts = np.asarray(histogram, dtype=np.float64)
    if counts.shape != (n_labels * per_label,):
        raise ShapeError(f"histogram shape {counts.shape} != ({n_labels * per_label},)")
    if not 1 <= keep <= per_label:
        raise ConfigError(f"keep={keep}: must be in [1, per_label={per_label}]")
    out: list[list[int]] = []
    for c in range(n_labels):
        block = np.clip(counts[c * per_label : (c + 1) * per_label], 0.0, None)
        positive = np.nonzero(block > 0)[0]
        if len(positive) == 0:
            out.append([])
            continue
        if method is Selection.RANK:
            order = positive[np.lexsort((positive, -block[positive]))]
            out.append([int(i) for i in order[:keep]])
        else:
            p = block / block.sum()
            out.append([int(i) for i in rng.choice(per_label, size=keep, p=p)])
    return out


def plan_next_population(
    selected: Sequence[Sequence[int]],
    histogram: np.ndarray,
    *,
    per_label: int,
    keep_selected: bool,
    rng: np.random.Generator,
    size: int | None = None,
) -> list[tuple[list[int], list[int]]]:
    """For each label: (candidates kept as they are, parents of the new variations).

    The next population has ``size`` (default ``per_label``, the voted population's N) samples
    per label: the distinct selected candidates (if ``keep_selected``) plus variations of
    parents drawn from the selection proportionally to their noisy count. A label with no
    selection varies uniformly drawn candidates. A ``size`` above N grows the final population
    from the last histogram (post-processing: no extra privacy cost).
    """
    size = per_label if size is None else size
    if size < 1:
        raise ConfigError(f"size={size}: must be >= 1")
    counts = np.clip(np.asarray(histogram, dtype=np.float64), 0.0, None)
    plan: list[tuple[list[int], list[int]]] = []
    for c, chosen in enumerate(selected):
        kept = sorted(set(chosen))[:size] if keep_selected else []
        n_new = size - len(kept)
        if chosen:
            pool = np.asarray(chosen, dtype=np.int64)
            weights = counts[c * per_label + pool] + 1e-12
            parents = rng.choice(pool, size=n_new, p=weights / weights.sum())
        else:
            parents = rng.integers(0, per_label, size=n_new)
        plan.append((kept, [int(p) for p in parents]))
    return plan
