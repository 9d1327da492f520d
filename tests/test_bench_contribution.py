"""benchmarks/bench_contribution.py's compute comparison: FLOPs per record and the epochs bound."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from benchmarks.bench_contribution import (
    COMPARATORS,
    COMPARISON_STUDY,
    UTILITY_METRICS,
    Comparator,
    flops_per_record,
    vector_lead,
)
from fedsynth.client.data import Record
from fedsynth.protocol.features import FeatureSpec
from fedsynth.protocol.models import tiny_model
from fedsynth.simulations.demo import TEMPLATES
from fedsynth.simulations.dp_finetune import DPTrainSettings
from fedsynth.simulations.study_config import load_study_config

TEMPLATE = TEMPLATES["rotten_tomatoes"]
RECORDS = [
    Record("a quiet, moving film about grief and the people who carry it", "positive"),
    Record("two hours I will never get back", "negative"),
    Record("the cast is wonderful and the script keeps up with them", "positive"),
]


def test_flops_are_per_record_exactly_and_the_epoch_costs_more_than_the_features() -> None:
    loaded = tiny_model(seed=0, arch="llama")
    spec = FeatureSpec(TEMPLATE, (1,), 32, 8)
    # Batches of 2 expected: a sampled epoch would count a random number of records.
    settings = DPTrainSettings(batch_size=2)
    once = flops_per_record(loaded, RECORDS, TEMPLATE, spec, settings)
    # The same records twice: every record is counted once per epoch (no sampled batch), so
    # the per-record figures do not move.
    twice = flops_per_record(loaded, RECORDS + RECORDS, TEMPLATE, spec, settings)
    assert twice.features == pytest.approx(once.features, rel=1e-9)
    assert twice.dp_epoch == pytest.approx(once.dp_epoch, rel=1e-9)
    # The epoch runs every layer and the head forward and backward; the features stop early.
    assert once.dp_epoch > 2 * once.features > 0


def test_epochs_are_read_from_each_study(tmp_path: Path) -> None:
    fedavg, sgd = COMPARATORS
    settings = load_study_config(COMPARISON_STUDY).dp_training
    assert fedavg.epochs() == settings.rounds * settings.epochs >= 1
    assert sgd.epochs() == load_study_config(sgd.study).dp_training.epochs
    config = tmp_path / "study.toml"
    text = COMPARISON_STUDY.read_text().replace(
        "[dp_training]\nepochs = 1\nrounds = 2", "[dp_training]\nepochs = 2\nrounds = 3"
    )
    assert text != COMPARISON_STUDY.read_text()
    config.write_text(text)
    assert Comparator("x", "dp-fedavg", config, tmp_path / "r.csv").epochs() == 6
    assert Comparator("x", "dp-sgd", config, tmp_path / "r.csv").epochs() == 2


FIELDS = ("method", "mode", "epsilon", "partition", "seed", "status", *UTILITY_METRICS)


def _write(path: Path, rows: list[tuple[object, ...]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        writer.writerows(rows)
    return path


def test_vector_lead_pairs_cells_by_seed_and_partition(tmp_path: Path) -> None:
    vector = [
        ("vector", "distributed", 4, part, seed, "ok", 0.60 + 0.01 * seed + bump, 0.70)
        for seed in range(3)
        for part, bump in (("iid", 0.0), ("label-skew:0.5", 0.02))
    ]
    noise = [  # none of these may count: another mode, epsilon, status
        ("vector", "central", 4, "iid", 0, "ok", 0.9, 0.9),
        ("vector", "distributed", 1, "iid", 0, "ok", 0.9, 0.9),
        ("vector", "distributed", 4, "iid", 0, "failed", 0.9, 0.9),
    ]
    fedavg = [
        ("dp-fedavg", "local", 4, part, seed, "ok", 0.50 + 0.01 * seed, 0.55 + 0.01 * seed)
        for seed in range(3)
        for part in ("iid", "label-skew:0.5")
    ]
    sgd = [
        ("dp-sgd", "central", 4, "pooled", seed, "ok", 0.65, 0.60 + 0.05 * seed)
        for seed in range(3)
    ]
    results = _write(tmp_path / "results.csv", vector + noise + fedavg + sgd)

    fed_acc, fed_fid = vector_lead(results, "dp-fedavg", vector_results=results)
    assert fed_acc.pairs == 6 and fed_acc.metric == "tstr_accuracy"
    assert fed_acc.mean == pytest.approx(0.11) and fed_acc.low < 0.11 < fed_acc.high
    assert fed_acc.low > 0  # the paired differences are 0.10 and 0.12: clearly above 0
    assert fed_fid.mean == pytest.approx(0.14)

    # A pooled method: one pair per seed, against the mean of that seed's vector cells.
    acc, fid = vector_lead(results, "dp-sgd", vector_results=results)
    assert acc.pairs == fid.pairs == 3
    assert acc.mean == pytest.approx(0.61 + 0.01 - 0.65)  # vector means 0.61, 0.62, 0.63
    assert acc.high < 0  # above the vector: not below its utility
    assert fid.mean == pytest.approx(0.70 - 0.65)

    with pytest.raises(ValueError, match="fewer than 2"):
        vector_lead(results, "pe", vector_results=results)
