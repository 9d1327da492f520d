"""What the noise samplers must guarantee, stated so that a weakened sampler or share split fails.

Each test names the break it catches: clients adding no noise, a halved or mis-split variance,
a biased or one-sided sampler, thresholds that are not whole numbers of clients, and error
messages that stop naming the field and the limit (mutation testing found the last two
unchecked; see docs/mutation-testing.md).
"""

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

DRAWS = 400_000


def _var_tolerance(variance: float, n: int) -> float:
    # 6 standard errors of a sample variance of Skellam draws (kurtosis: mu4 = v + 3 v^2).
    return 6.0 * math.sqrt((variance + 2.0 * variance**2) / n)


@pytest.mark.parametrize("mode", list(TrustMode))
@pytest.mark.parametrize("threshold", [2, 3, 5])
def test_t_client_shares_carry_at_least_the_calibrated_variance(
    mode: TrustMode, threshold: int
) -> None:
    # Catches: clients adding no noise, a share of total/K instead of total/t, a halved share.
    total = 80.0
    share = client_noise_variance(mode=mode, total_variance=total, threshold=threshold)
    if mode is TrustMode.CENTRAL:
        assert share == 0.0  # the trusted coordinator adds all of it
        return
    assert share > 0.0
    # Any t survivors (distributed) or one client on its own (local) reach the total exactly.
    survivors_needed = threshold if mode is TrustMode.DISTRIBUTED else 1
    assert share * survivors_needed == pytest.approx(total, rel=1e-12)
    rng = np.random.default_rng(threshold)
    summed = sum(
        (skellam_noise(DRAWS, variance=share, rng=rng) for _ in range(survivors_needed)),
        start=np.zeros(DRAWS, dtype=np.int64),
    )
    assert abs(summed.var() - total) < _var_tolerance(total, DRAWS)


@pytest.mark.parametrize("variance", [0.2, 2.0, 30.0])
def test_skellam_is_symmetric_integer_noise_of_the_stated_variance(variance: float) -> None:
    # Catches: Pois + Pois (biased), one Poisson only (half the variance, biased), mu = v instead
    # of v / 2 (twice the variance is safe but breaks the accounting of the sum), a dropped draw.
    x = skellam_noise(DRAWS, variance=variance, rng=np.random.default_rng(3))
    assert x.dtype == np.int64 and x.shape == (DRAWS,)
    assert abs(x.mean()) < 6.0 * math.sqrt(variance / DRAWS)
    assert abs(x.var() - variance) < _var_tolerance(variance, DRAWS)
    # P(X = k) = P(X = -k) for a symmetric Skellam: compare the two tails.
    positive, negative = int((x > 0).sum()), int((x < 0).sum())
    assert abs(positive - negative) < 6.0 * math.sqrt(positive + negative)


def test_noise_is_fresh_per_coordinate_and_per_call() -> None:
    # Catches a sampler that repeats one draw across coordinates or across calls.
    rng = np.random.default_rng(9)
    a = skellam_noise((1000,), variance=50.0, rng=rng)
    b = skellam_noise((1000,), variance=50.0, rng=rng)
    assert len(np.unique(a)) > 30
    assert not np.array_equal(a, b)
    g = gaussian_noise((1000,), std=2.0, rng=rng)
    assert len(np.unique(g)) == 1000


@pytest.mark.parametrize("std", [0.5, 1.0, 7.0])
def test_gaussian_noise_has_the_stated_std_and_no_bias(std: float) -> None:
    # Catches the coordinator's noise being skipped for some std (std = 1 included).
    x = gaussian_noise(DRAWS, std=std, rng=np.random.default_rng(5))
    assert x.dtype == np.float64
    assert abs(x.mean()) < 6.0 * std / math.sqrt(DRAWS)
    assert abs(x.std() - std) < 6.0 * std / math.sqrt(2 * DRAWS)


def test_zero_noise_only_when_asked_for() -> None:
    assert not gaussian_noise((3, 2), std=0.0, rng=np.random.default_rng(0)).any()
    assert not skellam_noise((3, 2), variance=0.0, rng=np.random.default_rng(0)).any()
    assert gaussian_noise((3, 2), std=1e-3, rng=np.random.default_rng(0)).all()


@pytest.mark.parametrize("threshold", [2.5, "2", 1.0, None, True])
def test_share_split_refuses_a_threshold_that_is_not_a_whole_number(threshold: object) -> None:
    # A fractional or boolean t would split the noise over a number of clients that cannot
    # exist; the error names the field and the limit.
    with pytest.raises(ConfigError, match=r"threshold=.* must be an integer >= 1"):
        share_variance(total_variance=10.0, threshold=threshold)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"threshold=.* must be an integer >= 1"):
        client_noise_variance(
            mode="distributed",
            total_variance=10.0,
            threshold=threshold,  # type: ignore[arg-type]
        )


def test_whole_number_thresholds_down_to_one_are_accepted() -> None:
    assert share_variance(total_variance=12.0, threshold=np.int64(4)) == pytest.approx(3.0)
    # t = 1: one survivor must carry all the noise on its own.
    assert share_variance(total_variance=7.0, threshold=1) == 7.0
    assert client_noise_variance(mode="distributed", total_variance=7.0, threshold=1) == 7.0


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_errors_name_the_field_and_the_limit(bad: float) -> None:
    limit = r"=.* must be a finite number >= 0$"
    with pytest.raises(ConfigError, match=rf"^total_variance{limit}"):
        client_noise_variance(mode="local", total_variance=bad, threshold=2)
    with pytest.raises(ConfigError, match=rf"^total_variance{limit}"):
        share_variance(total_variance=bad, threshold=2)
    with pytest.raises(ConfigError, match=rf"^std{limit}"):
        gaussian_noise(3, std=bad, rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match=rf"^variance{limit}"):
        skellam_noise(3, variance=bad, rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match=r"^threshold=0 must be >= 1$"):
        share_variance(total_variance=1.0, threshold=0)


def test_unknown_mode_lists_the_allowed_modes() -> None:
    with pytest.raises(ConfigError) as caught:
        client_noise_variance(mode="trusted", total_variance=1.0, threshold=2)
    assert str(caught.value) == "mode='trusted' must be one of: distributed, central, local"
