"""DP fine-tuning baselines: accounting cross-checked, training really learns, task round trip."""

from __future__ import annotations

import math

import pytest

from fedsynth.client.data import Record
from fedsynth.protocol.models import tiny_model
from fedsynth.server.generation import text_logprobs
from fedsynth.simulations.demo import TEMPLATES
from fedsynth.simulations.dp_fedavg import FedAvgTask, holder_noise
from fedsynth.simulations.dp_finetune import (
    DPTrainSettings,
    dpsgd_epsilon,
    dpsgd_noise_multiplier,
    finetune_pooled,
)

TEMPLATE = TEMPLATES["rotten_tomatoes"]


@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.1, 256 / 60000, 14060), (2.0, 0.04, 50)])
def test_opacus_epsilon_matches_dp_accounting(sigma: float, q: float, steps: int) -> None:
    # Two independent RDP implementations of the Poisson-subsampled Gaussian must agree.
    import dp_accounting

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(event)
    reference = accountant.get_epsilon(1e-5)
    ours = dpsgd_epsilon(noise_multiplier=sigma, delta=1e-5, sample_rate=q, steps=steps)
    assert ours == pytest.approx(reference, rel=0.05)


def test_noise_multiplier_spends_the_target_epsilon() -> None:
    for eps in (1.0, 4.0):
        sigma = dpsgd_noise_multiplier(epsilon=eps, delta=1e-5, sample_rate=0.05, steps=40)
        spent = dpsgd_epsilon(noise_multiplier=sigma, delta=1e-5, sample_rate=0.05, steps=40)
        assert spent <= eps + 0.02
        assert spent > 0.95 * eps
    assert dpsgd_noise_multiplier(epsilon=math.inf, delta=1e-5, sample_rate=0.1, steps=5) == 0
    assert math.isinf(dpsgd_epsilon(noise_multiplier=0.0, delta=1e-5, sample_rate=0.1, steps=5))


def test_training_learns_the_records_and_reports_its_privacy() -> None:
    loaded = tiny_model()
    records = [Record("zq zq zq zq zq zq", "positive")] * 32 + [Record("ab ab ab", "negative")] * 32
    before = text_logprobs(loaded, TEMPLATE.prefix("positive"), ["zq zq zq zq zq zq"])[0]
    settings = DPTrainSettings(epochs=6, learning_rate=0.05, batch_size=16)
    tuned, report = finetune_pooled(
        loaded, records, TEMPLATE, epsilon=math.inf, delta=1e-5, settings=settings, seed=0
    )
    after = text_logprobs(tuned, TEMPLATE.prefix("positive"), ["zq zq zq zq zq zq"])[0]
    assert after > before + 0.5  # clipped SGD without noise learns the record
    assert report["trainable_parameters"] > 0
    # The base model the study shares is untouched (a copy was trained).
    assert text_logprobs(loaded, TEMPLATE.prefix("positive"), ["zq zq zq zq zq zq"])[0] == before
    _, private = finetune_pooled(
        loaded, records, TEMPLATE, epsilon=2.0, delta=1e-5, settings=settings, seed=0
    )
    assert 1.9 < private["epsilon_spent"] <= 2.02
    assert private["noise_multiplier"] > 0.5


def test_fedavg_task_round_trip_and_holder_noise() -> None:
    task = FedAvgTask(
        model="tiny-llama",
        template=TEMPLATE,
        epsilon=4.0,
        delta=1e-5,
        rounds=3,
        settings=DPTrainSettings(epochs=2, batch_size=8),
    )
    again, round_index = FedAvgTask.from_config(dict(task.to_config(2)))
    assert again == task and round_index == 2
    sigma, q, per_round = holder_noise(task, 40)
    assert q == pytest.approx(0.2)
    assert per_round == 10
    spent = dpsgd_epsilon(noise_multiplier=sigma, delta=1e-5, sample_rate=q, steps=30)
    assert 3.8 < spent <= 4.02  # all rounds together spend the holder's ε
