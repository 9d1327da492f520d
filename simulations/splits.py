"""One way to split a labelled corpus, shared by the demo and the study.

Private records (the holders' data), held-out records (the evaluator's test set) and judge
records (real texts in neither, for the label-fidelity judge) are drawn the same way from the
same seed, so a study cell and a demo run with equal seeds and sizes hold the same private
records, score on the same held-out texts and judge fidelity the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from fedsynth.client.data import Record
from fedsynth.simulations.datasets import left_over, split_train_test, subsample_per_label
from fedsynth.simulations.partitions import PartitionSpec, partition_records

TEST_FRACTION = 0.15
"""Share of the corpus set aside (before subsampling) for held-out and judge texts."""
JUDGE_PER_LABEL = 3000
"""Most real texts per label the fidelity judge trains on (more add little and cost time)."""
JUDGE_MIN_PER_LABEL = 50
"""Fewer other real texts than this for some label: the judge trains on the private records."""


@dataclass(frozen=True)
class DataSplit:
    """Private, held-out and judge records of one seed (disjoint as records of the corpus)."""

    train: list[Record]
    test: list[Record]
    judge: list[Record]


def split_records(
    records: Sequence[Record],
    *,
    private_per_label: int | None,
    test_per_label: int | None,
    seed: int,
) -> DataSplit:
    """Split ``records`` into private, held-out and judge records.

    At most ``private_per_label`` private and ``test_per_label`` held-out records per label,
    and up to :data:`JUDGE_PER_LABEL` judge records per label from what is left (``None``:
    every record of that part).
    """
    train_pool, test_pool = split_train_test(list(records), test_fraction=TEST_FRACTION, seed=seed)
    train = subsample_per_label(train_pool, per_label=private_per_label, seed=seed)
    test = subsample_per_label(test_pool, per_label=test_per_label, seed=seed + 1)
    judge = subsample_per_label(
        left_over(train_pool, train) + left_over(test_pool, test),
        per_label=JUDGE_PER_LABEL,
        seed=seed + 2,
    )
    return DataSplit(train, test, judge)


def judge_set(split: DataSplit) -> tuple[list[Record], str]:
    """The texts the label-fidelity judge trains on, and what they are (for summaries).

    Other real texts when the data has enough of every label: a judge trained on the holders'
    records would score how close samples are to those records, not to the label. Otherwise
    (a small data file) the private records, and the description says so.
    """
    labels = {r.label for r in [*split.train, *split.test]}
    counts = Counter(r.label for r in split.judge)
    if split.judge and all(counts[label] >= JUDGE_MIN_PER_LABEL for label in labels):
        return split.judge, (
            f"{len(split.judge)} real texts in neither the holders' data nor the held-out set"
        )
    return split.train, (
        f"the holders' {len(split.train)} private records (fewer than {JUDGE_MIN_PER_LABEL} "
        "other real texts of some label)"
    )


def holder_partitions(
    train: Sequence[Record], partition: str | PartitionSpec, *, clients: int, seed: int
) -> list[list[Record]]:
    """The private records spread over ``clients`` holders (``iid``, ``label-skew:α``, ...)."""
    spec = partition if isinstance(partition, PartitionSpec) else PartitionSpec.parse(partition)
    return partition_records(train, spec, num_clients=clients, seed=seed)
