"""Split one labelled training set across K simulated holders: IID, label skew, quantity skew.

Every scheme gives each holder at least one record and uses every record exactly once, so the
pooled data (what central EPSVec sees) is the same for all schemes of one seed. Pure functions:
no files, no models.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedsynth.client.data import Record
from fedsynth.protocol.errors import ConfigError
from fedsynth.simulations.datasets import check_num_clients, partition_iid

PARTITION_KINDS = ("iid", "label-skew", "quantity-skew")


@dataclass(frozen=True)
class PartitionSpec:
    """A partition scheme: ``iid``, ``label-skew`` (Dirichlet α per label) or ``quantity-skew``.

    Smaller α means more skew: for label skew each label's records are spread over the holders
    with proportions drawn from Dirichlet(α); for quantity skew the holders' sizes are.
    """

    kind: str
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in PARTITION_KINDS:
            raise ConfigError(
                f"partition {self.kind!r} is unknown; expected one of {list(PARTITION_KINDS)} "
                "(write skewed ones as 'label-skew:ALPHA' or 'quantity-skew:ALPHA')"
            )
        if self.kind == "iid":
            if self.alpha is not None:
                raise ConfigError("partition 'iid' takes no alpha")
            return
        alpha = self.alpha
        if (
            alpha is None
            or isinstance(alpha, bool)
            or not isinstance(alpha, int | float)
            or not math.isfinite(alpha)
            or alpha <= 0
        ):
            raise ConfigError(
                f"partition {self.kind!r} needs a Dirichlet alpha > 0 (e.g. "
                f"'{self.kind}:0.5'), got {alpha!r}"
            )

    @property
    def name(self) -> str:
        """The spelling used in configs and results: ``iid``, ``label-skew:0.5``."""
        return self.kind if self.alpha is None else f"{self.kind}:{self.alpha:g}"

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        """Read ``iid``, ``label-skew:ALPHA`` or ``quantity-skew:ALPHA``."""
        if not isinstance(text, str):
            raise ConfigError(f"a partition is written as a string like 'iid', got {text!r}")
        kind, sep, rest = text.strip().partition(":")
        if not sep:
            return cls(kind)
        try:
            alpha = float(rest)
        except ValueError:
            raise ConfigError(f"partition {text!r}: alpha {rest!r} is not a number") from None
        return cls(kind, alpha)


def _fix_empty(assignment: np.ndarray, num_clients: int, rng: np.random.Generator) -> None:
    """Move records from the largest holders to empty ones until every holder has one."""
    counts = np.bincount(assignment, minlength=num_clients)
    for empty in np.flatnonzero(counts == 0):
        donor = int(np.argmax(counts))
        candidates = np.flatnonzero(assignment == donor)
        moved = int(rng.choice(candidates))
        assignment[moved] = empty
        counts[donor] -= 1
        counts[empty] += 1


def _split_by_proportions(n: int, proportions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Holder index for each of n items, holder sizes ≈ n × proportions (shuffled)."""
    cuts = np.floor(np.cumsum(proportions) * n).astype(np.int64)
    cuts[-1] = n
    owners = np.searchsorted(cuts, np.arange(n), side="right")
    return rng.permutation(owners)


def partition_label_skew(
    records: Sequence[Record], *, num_clients: int, alpha: float, seed: int
) -> list[list[Record]]:
    """Each label's records go to the holders in Dirichlet(α) proportions (α → 0: one each)."""
    check_num_clients(records, num_clients)
    PartitionSpec("label-skew", alpha)
    rng = np.random.default_rng(seed)
    assignment = np.zeros(len(records), dtype=np.int64)
    by_label: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_label.setdefault(record.label, []).append(i)
    for label in sorted(by_label):
        indices = np.asarray(by_label[label])
        proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
        assignment[indices] = _split_by_proportions(len(indices), proportions, rng)
    _fix_empty(assignment, num_clients, rng)
    return [[records[int(i)] for i in np.flatnonzero(assignment == c)] for c in range(num_clients)]


def partition_quantity_skew(
    records: Sequence[Record], *, num_clients: int, alpha: float, seed: int
) -> list[list[Record]]:
    """Holder sizes in Dirichlet(α) proportions; each holder's records drawn IID."""
    check_num_clients(records, num_clients)
    PartitionSpec("quantity-skew", alpha)
    rng = np.random.default_rng(seed)
    proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
    assignment = _split_by_proportions(len(records), proportions, rng)
    _fix_empty(assignment, num_clients, rng)
    return [[records[int(i)] for i in np.flatnonzero(assignment == c)] for c in range(num_clients)]


def partition_records(
    records: Sequence[Record], spec: PartitionSpec, *, num_clients: int, seed: int
) -> list[list[Record]]:
    """Partition ``records`` across ``num_clients`` holders by ``spec``."""
    if spec.kind == "iid":
        check_num_clients(records, num_clients)
        return partition_iid(records, num_clients=num_clients, seed=seed)
    assert spec.alpha is not None  # checked by PartitionSpec
    if spec.kind == "label-skew":
        return partition_label_skew(records, num_clients=num_clients, alpha=spec.alpha, seed=seed)
    return partition_quantity_skew(records, num_clients=num_clients, alpha=spec.alpha, seed=seed)


def partition_stats(
    partitions: Sequence[Sequence[Record]], labels: Sequence[str]
) -> list[dict[str, int]]:
    """Per holder: ``{"size": n, <label>: count, ...}`` (the report's holder table)."""
    out = []
    for part in partitions:
        counts = Counter(r.label for r in part)
        out.append({"size": len(part), **{label: counts.get(label, 0) for label in labels}})
    return out
