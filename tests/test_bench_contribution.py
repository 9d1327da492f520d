"""benchmarks/bench_contribution.py's compute comparison: FLOPs per record and the epochs bound."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_contribution import (
    COMPARISON_STUDY,
    fedavg_epochs,
    flops_per_record,
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


def test_the_epochs_bound_is_read_from_the_comparison_study(tmp_path: Path) -> None:
    settings = load_study_config(COMPARISON_STUDY).dp_training
    assert fedavg_epochs() == settings.rounds * settings.epochs >= 1
    config = tmp_path / "study.toml"
    text = COMPARISON_STUDY.read_text().replace(
        "[dp_training]\nepochs = 1\nrounds = 2", "[dp_training]\nepochs = 2\nrounds = 3"
    )
    assert text != COMPARISON_STUDY.read_text()
    config.write_text(text)
    assert fedavg_epochs(config) == 6
