"""Tests of the noise samplers and of how Skellam noise is split among clients."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.mechanisms import (
    TrustMode,
    client_noise_variance,
    gaussian_noise,
    share_variance,
    skellam_noise,
)

N_DRAWS = 200_000


def _skellam_variance_se(variance: float, n: int) -> float:
    """Standard error of the sample variance of n Skellam draws of the given variance.

    Skellam cumulants: k2 = k4 = variance, so mu4 = variance + 3 variance^2.
    """
    return math.sqrt((variance + 2.0 * variance**2) / n)


@pytest.mark.parametrize("variance", [0.5, 3.0, 40.0, 2500.0])
def test_skellam_moments(variance: float) -> None:
    rng = np.random.default_rng(1234)
    x = skellam_noise(N_DRAWS, variance=variance, rng=rng)
    assert x.dtype == np.int64
    assert x.shape == (N_DRAWS,)
    assert abs(x.var() - variance) < 5.0 * _skellam_variance_se(variance, N_DRAWS)
    assert abs(x.mean()) < 5.0 * math.sqrt(variance / N_DRAWS)


def test_skellam_shape_zero_and_reproducible() -> None:
    zeros = skellam_noise((3, 4), variance=0.0, rng=np.random.default_rng(0))
    assert zeros.shape == (3, 4)
    assert zeros.dtype == np.int64
    assert not zeros.any()
    a = skellam_noise((5, 7), variance=10.0, rng=np.random.default_rng(7))
    b = skellam_noise((5, 7), variance=10.0, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, 1e300])
def test_skellam_rejects_bad_variance(bad: float) -> None:
    with pytest.raises(ConfigError, match="variance"):
        skellam_noise(3, variance=bad, rng=np.random.default_rng(0))


@pytest.mark.parametrize("threshold", [2, 3, 7])
def test_t_shares_sum_to_total(threshold: int) -> None:
    total = 60.0
    share = share_variance(total_variance=total, threshold=threshold)
    assert share == pytest.approx(total / threshold)
    rng = np.random.default_rng(threshold)
    summed = sum(
        (skellam_noise(N_DRAWS, variance=share, rng=rng) for _ in range(threshold)),
        start=np.zeros(N_DRAWS, dtype=np.int64),
    )
    assert abs(summed.var() - total) < 5.0 * _skellam_variance_se(total, N_DRAWS)
    # More survivors than the threshold add proportionally more noise.
    survivors = threshold + 2
    more = summed + sum(
        (skellam_noise(N_DRAWS, variance=share, rng=rng) for _ in range(survivors - threshold)),
        start=np.zeros(N_DRAWS, dtype=np.int64),
    )
    expected = survivors / threshold * total
    assert abs(more.var() - expected) < 5.0 * _skellam_variance_se(expected, N_DRAWS)


@pytest.mark.parametrize("threshold", [0, -3])
def test_share_variance_rejects_small_threshold(threshold: int) -> None:
    with pytest.raises(ConfigError, match=f"threshold={threshold}"):
        share_variance(total_variance=1.0, threshold=threshold)


def test_share_variance_rejects_bad_total() -> None:
    with pytest.raises(ConfigError, match="total_variance"):
        share_variance(total_variance=-1.0, threshold=2)


def test_gaussian_noise() -> None:
    std = 3.5
    x = gaussian_noise(N_DRAWS, std=std, rng=np.random.default_rng(99))
    assert x.dtype == np.float64
    se = math.sqrt(2.0 / N_DRAWS) * std**2
    assert abs(x.var() - std**2) < 5.0 * se
    assert abs(x.mean()) < 5.0 * std / math.sqrt(N_DRAWS)
    assert not gaussian_noise((2, 2), std=0.0, rng=np.random.default_rng(0)).any()
    with pytest.raises(ConfigError, match="std"):
        gaussian_noise(3, std=-0.1, rng=np.random.default_rng(0))


def test_trust_modes() -> None:
    assert TrustMode("distributed") is TrustMode.DISTRIBUTED
    assert TrustMode.LOCAL == "local"
    kwargs = {"total_variance": 90.0, "threshold": 3}
    assert client_noise_variance(mode=TrustMode.DISTRIBUTED, **kwargs) == pytest.approx(30.0)
    assert client_noise_variance(mode="distributed", **kwargs) == pytest.approx(30.0)
    assert client_noise_variance(mode="local", **kwargs) == 90.0
    assert client_noise_variance(mode=TrustMode.CENTRAL, **kwargs) == 0.0
    with pytest.raises(ConfigError, match="mode='trusted'"):
        client_noise_variance(mode="trusted", **kwargs)


def test_reports_say_plainly_whom_central_mode_trusts() -> None:
    from fedsynth.protocol.mechanisms import TrustMode, trust_statement

    assert trust_statement("central").startswith("trusted coordinator")
    for mode in (TrustMode.DISTRIBUTED, TrustMode.LOCAL):
        assert trust_statement(mode).startswith("no trusted party")
    with pytest.raises(ConfigError, match="mode="):
        trust_statement("nobody")
