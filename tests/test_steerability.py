"""The steerability diagnostic's measures on features whose answers are known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.steerability import (
    DataSet,
    between_share,
    centroid_accuracy,
    diagnose,
    from_jsonl,
    split,
)


def test_class_means_that_differ_are_found_and_equal_ones_are_not() -> None:
    rng = np.random.default_rng(0)
    labels = ["a"] * 200 + ["b"] * 200
    noise = rng.normal(size=(400, 8))
    apart = noise.copy()
    apart[200:, 0] += 4.0  # class b's mean moved along one coordinate
    assert centroid_accuracy(apart[::2], labels[::2], apart[1::2], labels[1::2]) > 0.95
    assert centroid_accuracy(noise[::2], labels[::2], noise[1::2], labels[1::2]) < 0.65
    # Between-class share: 4^2/4 = 4 of the moved coordinate's variance 1 + 4 over 8 coordinates.
    assert between_share(apart, labels) == pytest.approx(4 / (8 + 4), abs=0.03)
    assert between_share(noise, labels) < 0.01


def test_split_is_disjoint_per_label_and_seeded(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": "xy"[i % 2]} for i in range(40)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = from_jsonl(path, "d", 8)
    train, test = split(data, 5, seed=1)
    assert len(train) == len(test) == 10 and not set(train) & set(test)
    assert sorted(data.labels[i] for i in train) == ["x"] * 5 + ["y"] * 5
    assert split(data, 5, seed=1) == (train, test) != split(data, 5, seed=2)


def test_diagnose_runs_on_the_tiny_model() -> None:
    words = {"good": "fine great lovely", "bad": "awful poor dull"}
    texts, labels = [], []
    for i in range(60):
        label = "good" if i % 2 else "bad"
        texts.append(f"{words[label].split()[i % 3]} film {i}")
        labels.append(label)
    data = DataSet("toy", tuple(texts), tuple(labels), 8)
    row = diagnose(data, per_label=12, seed=0, model="tiny-llama", layers=(1, 2))
    assert row["tfidf"] > 0.9  # the words give the label away
    for key in ("centroid", "probe", "between"):
        assert 0 <= float(row[key]) <= 1
