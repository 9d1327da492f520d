"""Pure pieces of the comparison baselines: noise calibration, selection, filters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsynth.protocol.errors import ConfigError
from fedsynth.simulations.baselines import (
    classic_gaussian_sigma,
    generate_after_embeddings,
    keep_highest,
    keep_lowest,
    noisy_argmax,
    perturb_embeddings,
    rescale_unit,
)


def test_classic_gaussian_sigma_reference() -> None:
    # Dwork & Roth Thm A.1: sqrt(2 ln(1.25/1e-5)) = 4.8448 for ε = 1, Δ = 1.
    assert classic_gaussian_sigma(1.0, 1e-5, 1.0) == pytest.approx(4.8448, abs=1e-4)
    assert classic_gaussian_sigma(2.0, 1e-5, 3.0) == pytest.approx(3 * 4.8448 / 2, abs=1e-3)
    assert classic_gaussian_sigma(math.inf, 1e-5, 1.0) == 0.0
    with pytest.raises(ConfigError):
        classic_gaussian_sigma(0.0, 1e-5, 1.0)


def test_noisy_argmax() -> None:
    scores = np.array([[0.1, 0.9, 0.2], [0.8, 0.1, 0.0]])
    rng = np.random.default_rng(0)
    assert noisy_argmax(scores, sigma=0.0, rng=rng).tolist() == [1, 0]
    # Enormous noise: the choice is close to uniform.
    picks = np.concatenate([noisy_argmax(scores, sigma=1e6, rng=rng) for _ in range(3000)])
    counts = np.bincount(picks, minlength=3) / len(picks)
    assert np.all(np.abs(counts - 1 / 3) < 0.03)


def test_rescale_and_keep() -> None:
    assert rescale_unit(np.array([2.0, 4.0, 3.0])).tolist() == [0.0, 1.0, 0.5]
    assert rescale_unit(np.array([1.0, 1.0])).tolist() == [0.5, 0.5]
    values = np.array([5.0, 1.0, 3.0, 2.0])
    assert keep_lowest(values, 0.5).tolist() == [False, True, False, True]
    assert keep_highest(values, 0.5).tolist() == [True, False, True, False]
    assert keep_lowest(values, 0.01).sum() == 1
    with pytest.raises(ConfigError):
        keep_lowest(values, 0.0)


@pytest.mark.parametrize("kind", ["gaussian", "laplace"])
def test_perturb_embeddings_clips_and_adds_calibrated_noise(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16) * 10
    clipped = perturb_embeddings(
        x, epsilon=math.inf, delta=1e-5, kind=kind, clip=2.0, generator=gen
    )
    order = 1 if kind == "laplace" else 2
    assert float(torch.linalg.vector_norm(clipped, ord=order, dim=-1).max()) <= 2.0 + 1e-5
    zero = torch.zeros(4000, 16)
    noisy = perturb_embeddings(zero, epsilon=2.0, delta=1e-5, kind=kind, clip=2.0, generator=gen)
    if kind == "gaussian":
        expected = classic_gaussian_sigma(2.0, 1e-5, 4.0)
        assert float(noisy.std()) == pytest.approx(expected, rel=0.03)
    else:
        # Laplace(b) has mean |x| = b with b = 2·clip/ε.
        assert float(noisy.abs().mean()) == pytest.approx(2.0, rel=0.03)
    with pytest.raises(ConfigError):
        perturb_embeddings(x, epsilon=1.0, delta=1e-5, kind="uniform", clip=1.0, generator=gen)


def test_embedding_prompts_sampled_in_batches_match_one_at_a_time() -> None:
    """Left padding changes nothing: with the nucleus cut to the top token, batches of three
    prompts of different lengths give what one prompt at a time gives, row for row (on the
    study's model: a random tiny one writes the same tokens whatever its prompt)."""
    from fedsynth.protocol.models import load_model
    from fedsynth.server.generation import GenerationConfig

    loaded = load_model("gemma3-270m")
    parts = [
        ("Here is a review:", ["a fine film", "dull and long, far too long for anyone"], "Next:"),
        ("Here is a review:", ["bad"], "Next:"),
        ("Here is a review:", [], "Next:"),
        ("Here is a long review of a film:", ["one", "two", "three"], "Next one:"),
    ]
    outputs = {}
    for batch in (1, 3):
        config = GenerationConfig(max_new_tokens=6, batch_size=batch, top_p=1e-6)
        outputs[batch] = generate_after_embeddings(
            loaded, parts, epsilon=8.0, delta=1e-5, kind="gaussian", config=config, seed=4
        )
    assert len(outputs[1]) == len(parts) and len(set(outputs[1])) > 1
    assert outputs[1] == outputs[3]
