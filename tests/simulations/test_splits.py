"""The split the demo and the study share, and the study's method table."""

from __future__ import annotations

import inspect
from collections import Counter
from pathlib import Path

import pytest

from fedsynth.client.data import Record
from fedsynth.simulations.datasets import load_corpus
from fedsynth.simulations.demo import demo_config, split_data
from fedsynth.simulations.partitions import PartitionSpec, partition_records
from fedsynth.simulations.splits import (
    JUDGE_MIN_PER_LABEL,
    DataSplit,
    holder_partitions,
    judge_set,
    split_records,
)
from fedsynth.simulations.study import StudyRunner
from fedsynth.simulations.study_config import METHODS, load_study_config

STUDY = """
name = "split"
seeds = [3]
model = "tiny-llama"
embedder = "hashing-64"

[data]
private_per_label = 40
test_per_label = 25
mia_members = 20

[[sweep]]
name = "s"
methods = ["prior"]
"""


def _records(per_label: int) -> list[Record]:
    return [
        Record(text=f"{label} text {i}", label=label) for label in "ab" for i in range(per_label)
    ]


def test_parts_are_disjoint_capped_and_seeded() -> None:
    records = _records(400)
    split = split_records(records, private_per_label=50, test_per_label=20, seed=1)
    assert Counter(r.label for r in split.train) == {"a": 50, "b": 50}
    assert Counter(r.label for r in split.test) == {"a": 20, "b": 20}
    texts = [[r.text for r in part] for part in (split.train, split.test, split.judge)]
    assert len(set(texts[0]) | set(texts[1]) | set(texts[2])) == sum(map(len, texts))
    assert len(split.judge) == 400 * 2 - 140  # everything else, under JUDGE_PER_LABEL
    assert split == split_records(records, private_per_label=50, test_per_label=20, seed=1)
    assert (
        split.train != split_records(records, private_per_label=50, test_per_label=20, seed=2).train
    )


def test_judge_falls_back_to_the_private_records_when_too_few_others() -> None:
    big = split_records(_records(400), private_per_label=50, test_per_label=20, seed=0)
    judge, what = judge_set(big)
    assert judge == big.judge and "neither the holders' data" in what
    small = DataSplit(big.train, big.test, big.judge[: JUDGE_MIN_PER_LABEL - 1])
    judge, what = judge_set(small)
    assert judge == big.train and "private records" in what


def test_holder_partitions_match_the_partition_schemes() -> None:
    train = _records(60)
    for name in ("iid", "label-skew:0.5"):
        expected = partition_records(train, PartitionSpec.parse(name), num_clients=4, seed=5)
        assert holder_partitions(train, name, clients=4, seed=5) == expected
        assert holder_partitions(train, PartitionSpec.parse(name), clients=4, seed=5) == expected


def test_the_demo_and_the_study_split_alike(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(STUDY)
    state = StudyRunner(load_study_config(path), tmp_path / "out").seed_state(3)
    demo = split_data(
        demo_config(
            "default", out_dir=tmp_path / "d", private_per_label=40, test_per_label=25, seed=3
        )
    )
    assert demo.source == load_corpus("rotten_tomatoes").source
    assert state.train == demo.train
    assert state.test == demo.test
    assert state.judge == demo.judge and len(state.judge) > 0


def test_every_method_of_the_table_has_a_runner_module() -> None:
    from fedsynth.simulations.methods import RUNNERS, runner_for

    assert set(RUNNERS) == set(METHODS)
    for name in METHODS:
        run = runner_for(name)
        assert run.__name__ == "run"
        assert list(inspect.signature(run).parameters) == ["ctx", "cell"]
    with pytest.raises(KeyError):
        runner_for("no-such-method")
