"""The Skellam GDP certificate against exact privacy loss distributions of the lattice noise."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy import special

from fedsynth.protocol.accounting import (
    calibrate_gaussian,
    calibrate_skellam_variance,
    gdp_delta,
    skellam_epsilon,
    skellam_rdp_epsilon,
)
from fedsynth.protocol.skellam_gdp import (
    DELTA_SLACK,
    MAX_VARIANCE,
    skellam_gdp_epsilon,
    skellam_gdp_factor,
    skellam_gdp_mu,
    skellam_gdp_variance,
)

DELTA = 1e-5


def _skellam_pld(
    variance: float, shift: int, *, pessimistic: bool
) -> pld_lib.PrivacyLossDistribution:
    """Exact PLD of one coordinate, Sk(v/2, v/2) against it shifted by ``shift`` (dp-accounting)."""
    reach = math.ceil(40.0 * math.sqrt(variance) + 200.0)
    outcomes = np.arange(-reach, reach + 1)
    with np.errstate(divide="ignore"):
        log_pmf = np.log(special.ive(np.abs(outcomes), variance))
    kept = np.isfinite(log_pmf) & (log_pmf > -700.0)
    lower = {int(o): float(p) for o, p in zip(outcomes[kept], log_pmf[kept], strict=True)}
    upper = {o + shift: p for o, p in lower.items()}
    return pld_lib.from_two_probability_mass_functions(
        lower, upper, pessimistic_estimate=pessimistic, value_discretization_interval=1e-4
    )


@pytest.mark.parametrize(
    ("variance", "shift", "tightness"),
    [
        (2.0, 1, None),
        (10.0, 1, 1.2),
        (10.0, 3, 1.25),
        (100.0, 10, 1.03),
        (1e3, 30, 1.005),
        (1e4, 100, 1.001),
    ],
)
def test_certificate_is_never_below_the_exact_loss_and_tight_with_enough_noise(
    variance: float, shift: int, tightness: float | None
) -> None:
    """One coordinate shifted by m: the certified epsilon bounds the exact one from above."""
    exact_low = _skellam_pld(variance, shift, pessimistic=False).get_epsilon_for_delta(DELTA)
    exact_high = _skellam_pld(variance, shift, pessimistic=True).get_epsilon_for_delta(DELTA)
    certified = skellam_gdp_epsilon(l2=float(shift), variance=variance, delta=DELTA)
    assert certified is not None
    assert certified >= exact_low
    if tightness is not None:
        assert certified <= exact_high * tightness


def test_certificate_bounds_a_spread_shift_and_composed_releases() -> None:
    """A shift (3, 4) of L2 norm 5 over two coordinates, and three releases of a shift of 10."""
    two = _skellam_pld(100.0, 3, pessimistic=False).compose(
        _skellam_pld(100.0, 4, pessimistic=False)
    )
    certified = skellam_gdp_epsilon(l2=5.0, variance=100.0, delta=DELTA)
    assert certified is not None
    assert two.get_epsilon_for_delta(DELTA) <= certified < 1.03 * two.get_epsilon_for_delta(DELTA)
    three = _skellam_pld(100.0, 10, pessimistic=False).self_compose(3)
    composed = skellam_gdp_epsilon(l2=10.0, variance=100.0, delta=DELTA, compositions=3)
    assert composed is not None
    assert three.get_epsilon_for_delta(DELTA) <= composed
    assert composed > skellam_gdp_epsilon(l2=10.0, variance=100.0, delta=DELTA)


def test_where_the_certificate_is_loose_the_rdp_bound_answers() -> None:
    """At variance 2 the lattice makes the factor large (1.12) and the certificate loose; the
    accountant takes the smaller of it and the RDP bound, both above the exact epsilon."""
    exact = _skellam_pld(2.0, 1, pessimistic=True).get_epsilon_for_delta(DELTA)
    factor = skellam_gdp_factor(2.0)
    assert factor is not None and factor > 1.1
    certified = skellam_gdp_epsilon(l2=1.0, variance=2.0, delta=DELTA)
    rdp = skellam_rdp_epsilon(l1=1.0, l2=1.0, variance=2.0, delta=DELTA)
    assert certified is not None
    accounted = skellam_epsilon(l1=1.0, l2=1.0, variance=2.0, delta=DELTA)
    assert accounted == min(certified, rdp)
    assert exact <= accounted


@pytest.mark.parametrize(("variance", "limit"), [(100.0, 1.003), (1e3, 1.0005), (1e6, 1.0002)])
def test_the_factor_tends_to_one_as_the_noise_grows(variance: float, limit: float) -> None:
    factor = skellam_gdp_factor(variance)
    assert factor is not None
    assert 1.0 <= factor < limit


def test_no_certificate_outside_its_range() -> None:
    """Above scipy's Bessel range or without noise the accountant keeps the RDP bound."""
    for variance in (0.0, -1.0, math.inf, math.nan, 2.0 * MAX_VARIANCE):
        assert skellam_gdp_factor(variance) is None
    big = 2.0 * MAX_VARIANCE
    assert skellam_gdp_epsilon(l2=1e4, variance=big, delta=DELTA) is None
    assert skellam_epsilon(l1=1e4, l2=1e4, variance=big, delta=DELTA) == skellam_rdp_epsilon(
        l1=1e4, l2=1e4, variance=big, delta=DELTA
    )
    assert skellam_gdp_epsilon(l2=1.0, variance=100.0, delta=1e-160) is None
    assert skellam_gdp_variance(epsilon=60.0, delta=DELTA, l2=1.0) is None


@pytest.mark.parametrize(
    ("variance", "order"), [(1e6, 0), (1e6, 3000), (1e4, 1000), (1e4, 3000), (50.0, 200)]
)
def test_the_pmf_the_certificate_sums_matches_arbitrary_precision(
    variance: float, order: int
) -> None:
    """scipy's exp-scaled Bessel function against mpmath's besseli, out to 30 sigma."""
    mpmath.mp.dps = 40
    reference = mpmath.besseli(order, variance, maxterms=10**6) * mpmath.exp(-variance)
    assert float(special.ive(order, variance)) == pytest.approx(float(reference), rel=1e-10)


@pytest.mark.parametrize(("epsilon", "l2"), [(1.0, 810.5), (4.0, 810.5), (8.0, 3.0), (0.3, 40.0)])
def test_calibrated_variance_is_the_smallest_the_certificate_proves(
    epsilon: float, l2: float
) -> None:
    variance = skellam_gdp_variance(epsilon=epsilon, delta=DELTA, l2=l2)
    assert variance is not None
    achieved = skellam_gdp_epsilon(l2=l2, variance=variance, delta=DELTA)
    assert achieved is not None and achieved <= epsilon
    below = skellam_gdp_epsilon(l2=l2, variance=variance * (1.0 - 1e-5), delta=DELTA)
    assert below is not None and below > epsilon
    # Never less noise than the Gaussian mechanism accounted exactly would need.
    assert math.sqrt(variance) / l2 >= calibrate_gaussian(epsilon=epsilon, delta=DELTA)
    assert calibrate_skellam_variance(epsilon=epsilon, delta=DELTA, l1=l2 * l2, l2=l2) <= variance


def test_the_conversion_meets_delta_and_is_tight() -> None:
    """The epsilon returned is never below the GDP curve's root at delta, and not far above it."""
    for variance in (50.0, 400.0, 3e3, 7.7e4, 8.8e5):
        mu = skellam_gdp_mu(l2=30.0, variance=variance, compositions=2)
        eps = skellam_gdp_epsilon(l2=30.0, variance=variance, delta=DELTA, compositions=2)
        assert mu is not None and eps is not None
        assert gdp_delta(epsilon=eps, mu=mu) <= DELTA - DELTA_SLACK
        assert gdp_delta(epsilon=max(eps - 1e-9, 0.0), mu=mu) > DELTA - DELTA_SLACK


def test_epsilon_zero_and_beyond_the_certified_range() -> None:
    # delta = 0.1 is met at epsilon 0 by mu = 0.1: the certificate says 0, not more.
    assert skellam_gdp_epsilon(l2=1.0, variance=100.0, delta=0.1) == 0.0
    # A shift of 100 under unit variance is far beyond epsilon 50: no certificate.
    assert skellam_gdp_epsilon(l2=100.0, variance=1.0, delta=DELTA) is None


@pytest.mark.parametrize("compositions", [3, 10])
def test_calibrated_variance_covers_composed_releases(compositions: int) -> None:
    variance = skellam_gdp_variance(epsilon=2.0, delta=DELTA, l2=20.0, compositions=compositions)
    assert variance is not None
    achieved = skellam_gdp_epsilon(
        l2=20.0, variance=variance, delta=DELTA, compositions=compositions
    )
    assert achieved is not None and achieved <= 2.0
    below = skellam_gdp_epsilon(
        l2=20.0, variance=variance * (1.0 - 1e-5), delta=DELTA, compositions=compositions
    )
    assert below is not None and below > 2.0
    sigma = calibrate_gaussian(epsilon=2.0, delta=DELTA, compositions=compositions)
    assert sigma <= math.sqrt(variance) / 20.0 < 1.01 * sigma


def test_where_the_factor_is_one_the_calibration_is_the_gaussians() -> None:
    """A tiny variance (sensitivity below one unit) certifies c = 1: exactly the Gaussian's."""
    variance = skellam_gdp_variance(epsilon=8.0, delta=DELTA, l2=0.05)
    assert variance is not None
    assert skellam_gdp_factor(variance) == 1.0
    sigma = calibrate_gaussian(epsilon=8.0, delta=DELTA)
    assert math.sqrt(variance) / 0.05 == pytest.approx(sigma, rel=1e-6)
