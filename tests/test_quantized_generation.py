"""benchmarks/quantized_generation.py on the tiny model: the measurements run and add up."""

from __future__ import annotations

import pytest

from benchmarks.quantized_generation import int8_copy, speed, vocab_coverage
from fedsynth.protocol.models import tiny_model


def test_int8_copy_leaves_the_model_and_speeds_are_measured() -> None:
    loaded = tiny_model(seed=0, arch="llama")
    before = loaded.model.lm_head.weight.clone()
    quantized = int8_copy(loaded, per_channel=True)
    assert quantized.model is not loaded.model
    assert (loaded.model.lm_head.weight == before).all()
    best = speed(loaded, batch=2, tokens=2, repeats=1)
    assert set(best) == {"fp32", "int8 per-tensor", "int8 per-channel"}
    assert all(v > 0 for v in best.values())


def test_vocab_coverage_grows_with_the_level() -> None:
    loaded = tiny_model(seed=0, arch="llama")
    rows = vocab_coverage(loaded, calibration=2, batch=4, steps=6)
    sizes = [r["tokens"] for r in rows]
    outside = [r["held-out nucleus mass outside"] for r in rows]
    assert sizes == sorted(sizes) and sizes[0] >= 1
    assert outside == sorted(outside, reverse=True)
    assert all(0.0 <= o <= 1.0 for o in outside)
    assert rows[-1]["head share"] == pytest.approx(sizes[-1] / loaded.model.lm_head.out_features)
