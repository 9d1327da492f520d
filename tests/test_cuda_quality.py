"""The GPU known-answer check sees what it is for: agreement, weight faults, padding faults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fedsynth.server.generation as generation
from benchmarks.cuda_quality import agreement, batching, fluency, main, review_prompts
from fedsynth.protocol.models import LoadedModel, tiny_model


def test_identical_models_agree_and_other_weights_do_not() -> None:
    prompts = review_prompts(8)
    same = agreement(tiny_model(seed=0), tiny_model(seed=0), prompts, steps=3)
    other = agreement(tiny_model(seed=0), tiny_model(seed=1), prompts, steps=3)
    assert same["padded_rows"] > 0 and same["rows"] - same["padded_rows"] > 0
    assert abs(same["kl_padded_rows"]) < 1e-5 and abs(same["kl_unpadded_rows"]) < 1e-5
    assert other["kl_padded_rows"] > 1e-3 and other["kl_unpadded_rows"] > 1e-3


def test_a_padding_fault_shows_in_the_batching_check(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(seed=0, arch="gemma3")
    prompts = review_prompts(6)
    assert batching(model, prompts)["kl_worst"] < 1e-5
    real = generation._left_padded

    def unmasked(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = real(*args, **kwargs)  # type: ignore[arg-type]
        return ids, torch.ones_like(mask)  # the padding is attended to as if it were text

    monkeypatch.setattr(generation, "_left_padded", unmasked)
    assert batching(model, prompts)["kl_worst"] > 1e-3


def _peaked(seed: int) -> LoadedModel:
    """A tiny model with a sharp next-token distribution (a random one is near uniform)."""
    loaded = tiny_model(seed=seed)
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight.mul_(40.0)
    return loaded


def test_fluency_scores_the_generators_samples_under_the_reference() -> None:
    reference = _peaked(0)
    own = fluency(reference, reference, samples=16, batch=8)
    foreign = fluency(reference, _peaked(1), samples=16, batch=8)
    assert own["mean_logprob_per_token"] > foreign["mean_logprob_per_token"] + 1.0
    assert 0 <= own["empty_fraction"] < 1


def test_the_script_writes_a_report_without_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    main(
        [
            "--model",
            "tiny-llama",
            "--device",
            "cpu",
            "--rows",
            "6",
            "--steps",
            "2",
            "--samples",
            "6",
            "--batch",
            "3",
            "--json",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"sdpa", "eager"}
    for row in report["variants"].values():
        assert "error" not in row
        assert abs(row["agreement"]["kl_padded_rows"]) < 1e-5
