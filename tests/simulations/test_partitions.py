"""Partitions of a labelled set across K holders."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fedsynth.client.data import Record
from fedsynth.protocol.errors import ConfigError
from fedsynth.simulations.partitions import (
    PartitionSpec,
    partition_records,
    partition_stats,
)

RECORDS = [Record(text=f"t{i}", label=("a", "b", "c")[i % 3]) for i in range(600)]
SPECS = ["iid", "label-skew:0.1", "label-skew:100", "quantity-skew:0.3"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("k", [2, 5, 40])
def test_every_record_once_and_no_empty_holder(spec: str, k: int) -> None:
    parts = partition_records(RECORDS, PartitionSpec.parse(spec), num_clients=k, seed=3)
    assert len(parts) == k
    assert all(len(p) >= 1 for p in parts)
    assert sorted(r.text for p in parts for r in p) == sorted(r.text for r in RECORDS)


@pytest.mark.parametrize("spec", SPECS)
def test_seeded(spec: str) -> None:
    a = partition_records(RECORDS, PartitionSpec.parse(spec), num_clients=4, seed=1)
    b = partition_records(RECORDS, PartitionSpec.parse(spec), num_clients=4, seed=1)
    c = partition_records(RECORDS, PartitionSpec.parse(spec), num_clients=4, seed=2)
    assert a == b
    assert a != c


def _label_concentration(parts: list[list[Record]]) -> float:
    """Mean share of each holder's most common label (1/3 = balanced, 1 = one label)."""
    shares = [Counter(r.label for r in p).most_common(1)[0][1] / len(p) for p in parts]
    return float(np.mean(shares))


def test_small_alpha_skews_labels_and_large_alpha_does_not() -> None:
    skewed = partition_records(RECORDS, PartitionSpec("label-skew", 0.05), num_clients=6, seed=0)
    flat = partition_records(RECORDS, PartitionSpec("label-skew", 1000.0), num_clients=6, seed=0)
    iid = partition_records(RECORDS, PartitionSpec("iid"), num_clients=6, seed=0)
    assert _label_concentration(skewed) > 0.8
    assert _label_concentration(flat) < 0.45
    assert _label_concentration(iid) < 0.45


def test_quantity_skew_varies_sizes_but_keeps_labels_mixed() -> None:
    parts = partition_records(RECORDS, PartitionSpec("quantity-skew", 0.2), num_clients=6, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) > 4 * min(sizes)
    big = max(parts, key=len)
    assert _label_concentration([big]) < 0.45


def test_stats_table() -> None:
    parts = [[RECORDS[0], RECORDS[1]], [RECORDS[3]]]
    assert partition_stats(parts, ["a", "b", "c"]) == [
        {"size": 2, "a": 1, "b": 1, "c": 0},
        {"size": 1, "a": 1, "b": 0, "c": 0},
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("label-skew:0", "alpha > 0"),
        ("label-skew:-1", "alpha > 0"),
        ("quantity-skew", "alpha > 0"),
        ("label-skew:x", "not a number"),
        ("iid:0.5", "takes no alpha"),
        ("shards", "unknown"),
    ],
)
def test_bad_specs(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PartitionSpec.parse(text)


def test_more_holders_than_records_is_refused() -> None:
    with pytest.raises(ConfigError, match="exceeds the 3 training records"):
        partition_records(RECORDS[:3], PartitionSpec("label-skew", 1.0), num_clients=4, seed=0)
