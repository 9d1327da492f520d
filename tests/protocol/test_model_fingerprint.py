"""The weight fingerprint a release is checked against, whatever precision the model runs in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from fedsynth.protocol import models
from fedsynth.protocol.models import CharTokenizer, LoadedModel, tiny_model, weight_fingerprint


def _bf16_copy(saved: LoadedModel, folder: Path, monkeypatch: pytest.MonkeyPatch) -> LoadedModel:
    """Save ``saved``'s fp32 weights to ``folder`` and load them as a GPU would (bf16)."""
    saved.model.save_pretrained(folder)
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: CharTokenizer()
    )
    monkeypatch.setattr(models, "model_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(models, "_LOADED", {})
    return models.load_model(str(folder), device="cpu")


def test_a_bf16_copy_carries_the_fp32_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator on a GPU (bf16) applies releases that fp32 CPU holders made with the same
    weights: its loaded model carries their fingerprint, not the hash of its rounded copy."""
    tiny = tiny_model(seed=3)
    loaded = _bf16_copy(tiny, tmp_path, monkeypatch)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert weight_fingerprint(loaded.model) != tiny.fingerprint  # rounding changed the weights
    assert loaded.fingerprint == tiny.fingerprint


def test_other_weights_keep_another_fingerprint_in_bf16(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bf16 path reads the fingerprint of the weights on disk: other weights, other hash."""
    other = tiny_model(seed=4)
    loaded = _bf16_copy(other, tmp_path, monkeypatch)
    assert loaded.fingerprint == other.fingerprint != tiny_model(seed=3).fingerprint
