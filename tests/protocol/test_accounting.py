"""Tests of the privacy accountants against published and library reference values."""

from __future__ import annotations

import math
import warnings
from typing import Any

import dp_accounting
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsynth.protocol.accounting import (
    MAX_ROUNDING_INFLATION,
    RDP_ORDERS,
    PrivacyEvent,
    VectorReleaseCalibration,
    calibrate_gaussian,
    calibrate_skellam_variance,
    calibrate_vector_release,
    gaussian_epsilon,
    gdp_delta,
    min_vector_scale,
    pe_epsilon,
    pe_noise_multiplier,
    rounded_l1_sensitivity,
    rounded_l2_sensitivity,
    rounding_inflation,
    skellam_epsilon,
    skellam_rdp,
    skellam_rdp_epsilon,
    validate_epsilon_delta,
    vector_record_sensitivity,
)
from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.skellam_gdp import skellam_gdp_epsilon

DELTA = 1e-5


# ---------------------------------------------------------------- Skellam


@pytest.mark.parametrize(
    ("l1", "l2", "variance", "expected"),
    [
        (1.0, 1.0, 1.0, 6.252728),
        (100.0, 10.0, 100.0, 4.790228),
        (100.0, 10.0, 400.0, 2.171917),
        (4.0, 2.0, 4.0, 5.690228),
    ],
)
def test_skellam_reference_values(l1: float, l2: float, variance: float, expected: float) -> None:
    eps = skellam_rdp_epsilon(l1=l1, l2=l2, variance=variance, delta=DELTA)
    assert eps == pytest.approx(expected, abs=1e-5)
    # The accountant takes the smaller of this RDP bound and the GDP certificate.
    gdp = skellam_gdp_epsilon(l2=l2, variance=variance, delta=DELTA)
    assert gdp is not None
    assert skellam_epsilon(l1=l1, l2=l2, variance=variance, delta=DELTA) == min(eps, gdp)


def _gaussian_rdp_epsilon(noise_multiplier: float, compositions: int = 1) -> float:
    acc = dp_accounting.rdp.RdpAccountant(orders=list(RDP_ORDERS))
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(noise_multiplier), compositions
        )
    )
    return float(acc.get_epsilon(DELTA))


def test_skellam_gaussian_limit() -> None:
    d = 100.0
    assert skellam_rdp_epsilon(l1=d, l2=d, variance=d**2, delta=DELTA) == pytest.approx(
        4.752955, abs=1e-5
    )
    reference = _gaussian_rdp_epsilon(1.0)
    assert reference == pytest.approx(4.752728, abs=1e-5)
    tight = gaussian_epsilon(noise_multiplier=1.0, delta=DELTA, accountant="pld")
    for big in (100.0, 1000.0, 1e4):
        eps = skellam_rdp_epsilon(l1=big, l2=big, variance=big**2, delta=DELTA)
        assert eps == pytest.approx(reference, abs=1e-3)
        assert eps >= reference
        # The accountant itself reaches the Gaussian's PLD epsilon, never below it.
        accounted = skellam_epsilon(l1=big, l2=big, variance=big**2, delta=DELTA)
        assert tight <= accounted < tight * 1.005


def test_skellam_rdp_shape_and_compositions() -> None:
    curve = skellam_rdp(l1=100.0, l2=10.0, variance=100.0)
    assert curve.shape == (len(RDP_ORDERS),)
    assert np.all(np.diff(curve) > 0)
    one = skellam_epsilon(l1=100.0, l2=10.0, variance=400.0, delta=DELTA)
    three = skellam_epsilon(l1=100.0, l2=10.0, variance=400.0, delta=DELTA, compositions=3)
    assert three > one
    with pytest.raises(ConfigError, match="orders"):
        skellam_rdp(l1=1.0, l2=1.0, variance=1.0, orders=[1, 2])
    with pytest.raises(ConfigError, match="variance"):
        skellam_rdp(l1=1.0, l2=1.0, variance=0.0)
    assert skellam_epsilon(l1=1.0, l2=1.0, variance=0.0, delta=DELTA) == math.inf


@pytest.mark.parametrize(
    ("epsilon", "l1", "l2", "compositions"),
    [(4.0, 100.0, 10.0, 1), (1.0, 100.0, 10.0, 3), (0.5, 4.0, 2.0, 1), (8.0, 1e5, 2062.0, 2)],
)
def test_skellam_calibration_round_trip(
    epsilon: float, l1: float, l2: float, compositions: int
) -> None:
    v = calibrate_skellam_variance(
        epsilon=epsilon, delta=DELTA, l1=l1, l2=l2, compositions=compositions
    )
    achieved = skellam_epsilon(l1=l1, l2=l2, variance=v, delta=DELTA, compositions=compositions)
    assert achieved <= epsilon
    assert achieved == pytest.approx(epsilon, abs=1e-3)
    # Slightly less noise breaks the target: v is (nearly) the smallest.
    less = skellam_epsilon(
        l1=l1, l2=l2, variance=v * (1 - 1e-4), delta=DELTA, compositions=compositions
    )
    assert less > epsilon


@settings(max_examples=25, deadline=None)
@given(
    epsilon=st.floats(min_value=0.1, max_value=20.0),
    l2=st.floats(min_value=0.5, max_value=1e4),
    ratio=st.floats(min_value=1.0, max_value=100.0),
)
def test_skellam_calibration_property(epsilon: float, l2: float, ratio: float) -> None:
    l1 = l2 * ratio
    v = calibrate_skellam_variance(epsilon=epsilon, delta=DELTA, l1=l1, l2=l2)
    achieved = skellam_epsilon(l1=l1, l2=l2, variance=v, delta=DELTA)
    assert achieved <= epsilon
    assert achieved == pytest.approx(epsilon, abs=1e-3)


def test_skellam_calibration_infinite_and_tiny() -> None:
    assert calibrate_skellam_variance(epsilon=math.inf, delta=DELTA, l1=1.0, l2=1.0) == 0.0
    # Below the floor of the integer-order conversion (~0.02 at delta=1e-5) RDP is left with its
    # KL-bound regime (epsilon 0), which needs a huge variance; the GDP certificate answers.
    v = calibrate_skellam_variance(epsilon=1e-3, delta=DELTA, l1=1.0, l2=1.0)
    assert skellam_epsilon(l1=1.0, l2=1.0, variance=v, delta=DELTA) <= 1e-3
    assert skellam_rdp_epsilon(l1=1.0, l2=1.0, variance=v, delta=DELTA) > 1e-3
    sigma = calibrate_gaussian(epsilon=1e-3, delta=DELTA)
    assert sigma**2 <= v < (1.01 * sigma) ** 2


def test_rounded_sensitivities() -> None:
    # beta = exp(-0.5) makes sqrt(2 ln(1/beta)) = 1.
    c, d = 1000.0, 2561
    expected = min(c + math.sqrt(d), math.sqrt(c**2 + d / 4 + (c + math.sqrt(d) / 2)))
    l2 = rounded_l2_sensitivity(scaled_clip=c, dim=d)
    assert l2 == pytest.approx(expected, rel=1e-12)
    assert c < l2 < c + math.sqrt(d)
    # Small clip: the second bound can exceed c + sqrt(d), and the minimum takes the first.
    assert rounded_l2_sensitivity(scaled_clip=0.0, dim=1) == pytest.approx(math.sqrt(0.75))
    assert rounded_l2_sensitivity(scaled_clip=0.1, dim=1) == pytest.approx(
        min(1.1, math.sqrt(0.01 + 0.25 + 0.6))
    )
    assert rounded_l1_sensitivity(l2=l2, dim=d) == pytest.approx(l2 * math.sqrt(d))
    assert rounded_l1_sensitivity(l2=2.0, dim=100) == pytest.approx(4.0)
    with pytest.raises(ConfigError, match="beta"):
        rounded_l2_sensitivity(scaled_clip=1.0, dim=4, beta=1.0)
    with pytest.raises(ConfigError, match="dim"):
        rounded_l2_sensitivity(scaled_clip=1.0, dim=0)


# ---------------------------------------------------------------- Gaussian


@pytest.mark.parametrize(("compositions", "reference"), [(1, 1.084), (2, 1.533), (4, 2.168)])
def test_gaussian_calibration_matches_prv(compositions: int, reference: float) -> None:
    sigma = calibrate_gaussian(epsilon=4.0, delta=DELTA, compositions=compositions)
    assert sigma == pytest.approx(reference, rel=0.01)
    achieved = gaussian_epsilon(
        noise_multiplier=sigma, delta=DELTA, compositions=compositions, accountant="pld"
    )
    assert achieved <= 4.0 + 1e-9
    assert achieved == pytest.approx(4.0, abs=1e-3)

    from opacus.accountants import PRVAccountant

    prv = PRVAccountant()
    for _ in range(compositions):
        prv.step(noise_multiplier=sigma, sample_rate=1.0)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        prv_eps = prv.get_epsilon(delta=DELTA)
    assert prv_eps == pytest.approx(4.0, rel=0.01)


def test_gaussian_rdp_calibration_round_trip() -> None:
    sigma = calibrate_gaussian(epsilon=4.0, delta=DELTA, accountant="rdp")
    eps = gaussian_epsilon(noise_multiplier=sigma, delta=DELTA)
    assert eps <= 4.0
    assert eps == pytest.approx(4.0, abs=1e-3)
    # The RDP accountant is looser than PLD, so it needs more noise.
    assert sigma > calibrate_gaussian(epsilon=4.0, delta=DELTA)
    assert gaussian_epsilon(noise_multiplier=1.0, delta=DELTA) == pytest.approx(
        _gaussian_rdp_epsilon(1.0), abs=1e-12
    )


@pytest.mark.parametrize("layers", [2, 4, 9])
def test_gaussian_per_layer_composition(layers: int) -> None:
    s = 2.3
    composed = gaussian_epsilon(noise_multiplier=s, delta=DELTA, compositions=layers)
    joint = gaussian_epsilon(noise_multiplier=s / math.sqrt(layers), delta=DELTA)
    assert composed == pytest.approx(joint, abs=1e-6)


def test_gaussian_edge_cases() -> None:
    assert gaussian_epsilon(noise_multiplier=0.0, delta=DELTA) == math.inf
    assert calibrate_gaussian(epsilon=math.inf, delta=DELTA) == 0.0
    with pytest.raises(ConfigError, match="accountant='prv'"):
        gaussian_epsilon(noise_multiplier=1.0, delta=DELTA, accountant="prv")
    with pytest.raises(ConfigError, match="compositions=0"):
        gaussian_epsilon(noise_multiplier=1.0, delta=DELTA, compositions=0)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        gaussian_epsilon(noise_multiplier=-1.0, delta=DELTA)


# ---------------------------------------------------------------- Private Evolution


@pytest.mark.parametrize(
    ("epsilon", "expected"), [(1.0, 11.797293), (2.0, 6.304989), (4.0, 3.418934)]
)
def test_pe_noise_multiplier(epsilon: float, expected: float) -> None:
    sigma = pe_noise_multiplier(epsilon=epsilon, delta=DELTA, rounds=10)
    assert sigma == pytest.approx(expected, abs=1e-6)
    assert pe_epsilon(noise_multiplier=sigma, delta=DELTA, rounds=10) == pytest.approx(
        epsilon, abs=1e-9
    )
    assert gdp_delta(epsilon=epsilon, mu=math.sqrt(10) / sigma) == pytest.approx(DELTA, rel=1e-6)
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), 10))
    assert acc.get_epsilon(DELTA) == pytest.approx(epsilon, abs=1e-3)


def test_gdp_delta_edges() -> None:
    assert gdp_delta(epsilon=1.0, mu=0.0) == 0.0
    assert gdp_delta(epsilon=1.0, mu=math.inf) == 1.0
    # A huge epsilon must not overflow e^eps.
    assert gdp_delta(epsilon=800.0, mu=1.0) == pytest.approx(0.0, abs=1e-300)
    assert 0.0 < gdp_delta(epsilon=0.0, mu=1.0) < 1.0
    assert pe_epsilon(noise_multiplier=0.0, delta=DELTA, rounds=3) == math.inf
    assert pe_noise_multiplier(epsilon=math.inf, delta=DELTA, rounds=3) == 0.0
    with pytest.raises(ConfigError, match="rounds=0"):
        pe_noise_multiplier(epsilon=1.0, delta=DELTA, rounds=0)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"epsilon": 0.0, "delta": DELTA}, "epsilon", "0.0"),
        ({"epsilon": -1.5, "delta": DELTA}, "epsilon", "-1.5"),
        ({"epsilon": math.nan, "delta": DELTA}, "epsilon", "nan"),
        ({"epsilon": 1.0, "delta": 0.0}, "delta", "0.0"),
        ({"epsilon": 1.0, "delta": -0.1}, "delta", "-0.1"),
        ({"epsilon": 1.0, "delta": 1.0}, "delta", "1.0"),
        ({"epsilon": 1.0, "delta": 2.5}, "delta", "2.5"),
        ({"epsilon": 1.0, "delta": 0.01, "n": 100}, "delta", "0.01"),
        ({"epsilon": 1.0, "delta": 0.002, "n": 1000}, "delta", "0.002"),
    ],
)
def test_validate_epsilon_delta_errors(kwargs: dict[str, Any], field: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_epsilon_delta(**kwargs)
    message = str(info.value)
    assert field in message
    assert value in message


def test_validate_epsilon_delta_n_message_and_ok() -> None:
    with pytest.raises(ConfigError, match=r"delta=0\.01 must be below 1/n=0\.01 for n=100"):
        validate_epsilon_delta(epsilon=1.0, delta=0.01, n=100)
    validate_epsilon_delta(epsilon=1.0, delta=DELTA, n=1000)
    validate_epsilon_delta(epsilon=math.inf, delta=DELTA)
    with pytest.raises(ConfigError, match="n=0"):
        validate_epsilon_delta(epsilon=1.0, delta=DELTA, n=0)


# ---------------------------------------------------------------- records


def test_privacy_event() -> None:
    event = PrivacyEvent(
        mechanism="skellam",
        adjacency="add/remove",
        epsilon=4.0,
        delta=DELTA,
        accountant="dp-accounting RDP (integer orders 2..128, 256)",
        noise={"variance": 12.0, "l2_sensitivity": 2.0, "l1_sensitivity": 4.0},
        compositions=1,
    )
    d = event.to_dict()
    assert d["epsilon"] == 4.0
    assert d["noise"] == {"variance": 12.0, "l2_sensitivity": 2.0, "l1_sensitivity": 4.0}
    assert d["noise"] is not event.noise
    with pytest.raises(AttributeError):
        setattr(event, "epsilon", 1.0)  # noqa: B010 - frozen dataclass must refuse
    with pytest.raises(ConfigError, match="compositions"):
        PrivacyEvent(
            mechanism="gaussian",
            adjacency="add/remove",
            epsilon=1.0,
            delta=DELTA,
            accountant="x",
            noise={},
            compositions=0,
        )


def _vector(mode: str, epsilon: float) -> VectorReleaseCalibration:
    return calibrate_vector_release(
        mode=mode,
        epsilon=epsilon,
        delta=DELTA,
        layers=4,
        dim=4 * 640 + 1,
        scale=1000.0,
        count_weight=0.5,
    )


def test_vector_release_distributed_close_to_gaussian() -> None:
    cal = _vector("distributed", 4.0)
    assert cal.epsilon_achieved <= 4.0
    assert cal.epsilon_achieved == pytest.approx(4.0, abs=1e-3)
    unit_clip = 1000.0 * math.sqrt(4.25)
    assert cal.l2_sensitivity == pytest.approx(
        rounded_l2_sensitivity(scaled_clip=unit_clip, dim=2561)
    )
    assert cal.l1_sensitivity == pytest.approx(
        rounded_l1_sensitivity(l2=cal.l2_sensitivity, dim=2561)
    )
    assert cal.noise_multiplier == pytest.approx(math.sqrt(cal.total_variance) / cal.l2_sensitivity)
    # With a large scale Skellam approaches the Gaussian: the GDP certificate gives it the
    # PLD-accounted Gaussian's noise, within 1.02x at every epsilon (about 7 % below RDP's).
    for eps in (1.0, 4.0, 8.0):
        at_eps = cal if eps == 4.0 else _vector("distributed", eps)
        ratio = at_eps.noise_multiplier / calibrate_gaussian(epsilon=eps, delta=DELTA)
        assert 1.0 <= ratio < 1.02
    rdp_only = calibrate_gaussian(epsilon=4.0, delta=DELTA, accountant="rdp")
    assert cal.noise_multiplier < rdp_only / 1.06
    event = cal.to_event()
    assert event.mechanism == "skellam"
    assert event.noise["variance"] == cal.total_variance


def test_vector_release_local_and_central() -> None:
    local = _vector("local", 4.0)
    dist = _vector("distributed", 4.0)
    assert local.total_variance == dist.total_variance
    assert local.to_event().mechanism == "local-skellam"
    central = _vector("central", 4.0)
    sigma = calibrate_gaussian(epsilon=4.0, delta=DELTA)
    # Clients round every record in central mode too: same rounding-inflated bound.
    assert central.l2_sensitivity == dist.l2_sensitivity
    assert central.l1_sensitivity == dist.l1_sensitivity
    assert central.l2_sensitivity > 1000.0 * math.sqrt(4.25)
    assert central.noise_multiplier == sigma
    assert central.total_variance == pytest.approx((sigma * central.l2_sensitivity) ** 2)
    assert central.epsilon_achieved == pytest.approx(4.0, abs=1e-3)
    assert central.epsilon_achieved <= 4.0 + 1e-9
    assert central.to_event().mechanism == "gaussian"


@pytest.mark.parametrize("mode", ["distributed", "local", "central"])
def test_vector_release_non_private(mode: str) -> None:
    cal = _vector(mode, math.inf)
    assert cal.total_variance == 0.0
    assert cal.noise_multiplier == 0.0
    assert cal.epsilon_achieved == math.inf


def test_vector_release_errors() -> None:
    with pytest.raises(ConfigError, match="mode='secure'"):
        _vector("secure", 1.0)
    with pytest.raises(ConfigError, match="dim=4"):
        calibrate_vector_release(
            mode="central", epsilon=1.0, delta=DELTA, layers=4, dim=4, scale=1.0, count_weight=1.0
        )
    with pytest.raises(ConfigError, match="scale"):
        calibrate_vector_release(
            mode="central", epsilon=1.0, delta=DELTA, layers=1, dim=4, scale=0.0, count_weight=1.0
        )


# ---------------------------------------------------------------- PE calibration (calibrate_pe)

PE_ROUNDS = 10
# Reference PE noise multipliers (closed-form mu-GDP, T = 10, delta = 1e-5).
PE_REFERENCE_SIGMA = {1.0: 11.797293, 2.0: 6.304989, 4.0: 3.418934}
# Aug-PE (Xie et al. 2024), Yelp: published noise multipliers at T = 10, delta = 1/(N ln N).
AUG_PE_YELP_SIGMA = {1.0: 15.34, 2.0: 8.03, 4.0: 4.24}
YELP_N = 1.94e6


def _calibrate_pe(**kwargs: Any) -> Any:
    from fedsynth.protocol.accounting import calibrate_pe

    return calibrate_pe(**kwargs)


def _pe_noise_std(calibration: Any, clients: int) -> float:
    from fedsynth.protocol.accounting import pe_aggregate_noise_std

    return pe_aggregate_noise_std(calibration, clients=clients)


def _pe_min_eps(**kwargs: Any) -> float:
    from fedsynth.protocol.accounting import pe_min_workable_epsilon

    return pe_min_workable_epsilon(**kwargs)


@pytest.mark.parametrize(("epsilon", "expected"), sorted(PE_REFERENCE_SIGMA.items()))
def test_calibrate_pe_central_reference_multipliers(epsilon: float, expected: float) -> None:
    cal = _calibrate_pe(mode="central", epsilon=epsilon, delta=DELTA, rounds=PE_ROUNDS)
    assert cal.mode == "central"
    assert cal.rounds == PE_ROUNDS
    assert cal.top_k == 1
    assert cal.l2_sensitivity == 1.0
    assert cal.l1_sensitivity == 1.0
    assert cal.noise_multiplier == pytest.approx(expected, abs=1e-6)
    assert cal.total_variance == pytest.approx(cal.noise_multiplier**2, rel=1e-12)
    # The PLD accountant and the closed-form GDP composition agree.
    assert cal.gdp_epsilon == pytest.approx(epsilon, abs=1e-6)
    assert cal.epsilon_achieved <= epsilon
    assert cal.epsilon_achieved == pytest.approx(epsilon, abs=1e-6)
    assert cal.noise_multiplier == pytest.approx(
        pe_noise_multiplier(epsilon=epsilon, delta=DELTA, rounds=PE_ROUNDS), rel=1e-6
    )
    event = cal.to_event()
    assert event.mechanism == "pe-gaussian"
    assert event.compositions == PE_ROUNDS
    assert event.epsilon == cal.epsilon_achieved
    assert event.noise["variance"] == cal.total_variance


@pytest.mark.parametrize(("epsilon", "published"), sorted(AUG_PE_YELP_SIGMA.items()))
def test_calibrate_pe_central_matches_aug_pe_yelp(epsilon: float, published: float) -> None:
    delta = 1.0 / (YELP_N * math.log(YELP_N))
    cal = _calibrate_pe(mode="central", epsilon=epsilon, delta=delta, rounds=PE_ROUNDS)
    assert cal.delta == delta
    assert cal.noise_multiplier == pytest.approx(published, rel=0.01)
    assert cal.gdp_epsilon == pytest.approx(epsilon, abs=1e-6)


def test_calibrate_pe_top_k_scales_noise_std() -> None:
    base = _calibrate_pe(mode="central", epsilon=2.0, delta=DELTA, rounds=PE_ROUNDS)
    sigma = base.noise_multiplier
    for k in (2, 4, 9):
        cal = _calibrate_pe(mode="central", epsilon=2.0, delta=DELTA, rounds=PE_ROUNDS, top_k=k)
        assert cal.top_k == k
        assert cal.l2_sensitivity == pytest.approx(math.sqrt(k))
        assert cal.l1_sensitivity == k
        assert cal.noise_multiplier == pytest.approx(sigma, rel=1e-12)
        assert cal.total_variance == pytest.approx((sigma * math.sqrt(k)) ** 2, rel=1e-12)
        assert _pe_noise_std(cal, 5) == pytest.approx(sigma * math.sqrt(k), rel=1e-12)
        assert cal.epsilon_achieved <= 2.0
    # Skellam: the L1 term makes the scaling approximately, not exactly, sqrt(k).
    dist1 = _calibrate_pe(mode="distributed", epsilon=2.0, delta=DELTA, rounds=PE_ROUNDS)
    dist4 = _calibrate_pe(mode="distributed", epsilon=2.0, delta=DELTA, rounds=PE_ROUNDS, top_k=4)
    assert math.sqrt(dist4.total_variance) == pytest.approx(
        2.0 * math.sqrt(dist1.total_variance), rel=0.02
    )


@pytest.mark.parametrize("epsilon", [1.0, 2.0, 4.0])
def test_calibrate_pe_distributed_close_to_gaussian(epsilon: float) -> None:
    cal = _calibrate_pe(mode="distributed", epsilon=epsilon, delta=DELTA, rounds=PE_ROUNDS)
    assert cal.mode == "distributed"
    assert cal.epsilon_achieved <= epsilon
    assert cal.epsilon_achieved >= 0.99 * epsilon
    assert math.isnan(cal.gdp_epsilon)
    assert cal.noise_multiplier == pytest.approx(math.sqrt(cal.total_variance))
    # Skellam with RDP accounting needs more noise than the PLD-accounted Gaussian, but not much.
    ratio = cal.noise_multiplier / PE_REFERENCE_SIGMA[epsilon]
    assert 1.0 < ratio < 1.15
    # The accountant's epsilon for this exact variance is the one reported.
    assert skellam_epsilon(
        l1=1.0, l2=1.0, variance=cal.total_variance, delta=DELTA, compositions=PE_ROUNDS
    ) == pytest.approx(cal.epsilon_achieved, rel=1e-12)
    assert cal.to_event().mechanism == "pe-skellam"


def test_calibrate_pe_local_and_aggregate_std() -> None:
    dist = _calibrate_pe(mode="distributed", epsilon=2.0, delta=DELTA, rounds=PE_ROUNDS)
    local = _calibrate_pe(mode="local", epsilon=2.0, delta=DELTA, rounds=PE_ROUNDS)
    assert local.total_variance == dist.total_variance
    assert local.to_event().mechanism == "pe-local-skellam"
    # Local: every client adds the full variance; distributed: the sum carries it once.
    assert _pe_noise_std(local, 9) == pytest.approx(3.0 * math.sqrt(local.total_variance))
    assert _pe_noise_std(dist, 9) == pytest.approx(math.sqrt(dist.total_variance))


@pytest.mark.parametrize("mode", ["central", "distributed", "local"])
def test_calibrate_pe_infinite_epsilon(mode: str) -> None:
    cal = _calibrate_pe(mode=mode, epsilon=math.inf, delta=DELTA, rounds=PE_ROUNDS, top_k=3)
    assert cal.total_variance == 0.0
    assert cal.noise_multiplier == 0.0
    assert cal.epsilon_achieved == math.inf
    assert _pe_noise_std(cal, 4) == 0.0


def test_calibrate_pe_errors() -> None:
    with pytest.raises(ConfigError, match="mode='trusted'"):
        _calibrate_pe(mode="trusted", epsilon=1.0, delta=DELTA, rounds=3)
    with pytest.raises(ConfigError, match="rounds=0"):
        _calibrate_pe(mode="central", epsilon=1.0, delta=DELTA, rounds=0)
    with pytest.raises(ConfigError, match="top_k=0"):
        _calibrate_pe(mode="central", epsilon=1.0, delta=DELTA, rounds=3, top_k=0)
    with pytest.raises(ConfigError, match="epsilon"):
        _calibrate_pe(mode="central", epsilon=0.0, delta=DELTA, rounds=3)
    with pytest.raises(ConfigError, match="delta"):
        _calibrate_pe(mode="distributed", epsilon=1.0, delta=1.0, rounds=3)


def _check_workable(mode: str, records: int, *, clients: int = 4) -> float:
    top_k, per_label = 2, 20
    eps = _pe_min_eps(
        mode=mode,
        delta=DELTA,
        rounds=PE_ROUNDS,
        top_k=top_k,
        per_label=per_label,
        records_per_label=records,
        clients=clients,
    )
    assert 0.0 < eps < math.inf
    cal = _calibrate_pe(mode=mode, epsilon=eps, delta=DELTA, rounds=PE_ROUNDS, top_k=top_k)
    mean_votes = records * top_k / per_label
    std = _pe_noise_std(cal, clients)
    # At the workable epsilon the calibrated noise is mean_votes / 2 (signal-to-noise 2), up to
    # the calibration's tolerance, and never meaningfully above it.
    assert std <= mean_votes / 2.0 * (1.0 + 1e-3)
    assert std == pytest.approx(mean_votes / 2.0, rel=1e-3)
    return eps


@pytest.mark.parametrize("mode", ["distributed", "local"])
def test_pe_min_workable_epsilon_skellam(mode: str) -> None:
    eps = [_check_workable(mode, records) for records in (50, 500, 5000)]
    assert eps[0] > eps[1] > eps[2]


def test_pe_min_workable_epsilon_central() -> None:
    small = _check_workable("central", 100)
    large = _check_workable("central", 1000)
    assert small > large


def test_pe_min_workable_epsilon_signal_to_noise_and_errors() -> None:
    kwargs: dict[str, Any] = {
        "mode": "distributed",
        "delta": DELTA,
        "rounds": PE_ROUNDS,
        "top_k": 1,
        "per_label": 10,
        "records_per_label": 200,
        "clients": 3,
    }
    assert _pe_min_eps(**kwargs, signal_to_noise=4.0) > _pe_min_eps(**kwargs)
    with pytest.raises(ConfigError, match="records_per_label"):
        _pe_min_eps(**dict(kwargs, records_per_label=0))
    with pytest.raises(ConfigError, match="per_label"):
        _pe_min_eps(**dict(kwargs, per_label=0))


def test_pe_min_workable_epsilon_rejects_invalid_arguments() -> None:
    kwargs: dict[str, Any] = {
        "mode": "distributed",
        "delta": DELTA,
        "rounds": PE_ROUNDS,
        "top_k": 1,
        "per_label": 10,
        "records_per_label": 200,
        "clients": 3,
    }
    with pytest.raises(ConfigError, match="top_k"):
        _pe_min_eps(**dict(kwargs, top_k=0))
    with pytest.raises(ConfigError, match="signal_to_noise"):
        _pe_min_eps(**kwargs, signal_to_noise=0.0)


# ---------------------------------------------------------------- rounding in central mode


@pytest.mark.parametrize("scale", [10.0, 100.0, 1000.0])
def test_central_calibration_covers_the_rounded_record(scale: float) -> None:
    """The Gaussian noise achieves epsilon at the rounded bound the clients actually round to."""
    dim = 4 * 640 + 1
    cal = calibrate_vector_release(
        mode="central", epsilon=4.0, delta=DELTA, layers=4, dim=dim, scale=scale, count_weight=0.5
    )
    rounded = rounded_l2_sensitivity(scaled_clip=scale * math.sqrt(4.25), dim=dim)
    assert cal.l2_sensitivity == rounded
    true_eps = gaussian_epsilon(
        noise_multiplier=math.sqrt(cal.total_variance) / rounded, delta=DELTA, accountant="pld"
    )
    assert true_eps <= 4.0 * (1 + 1e-9)
    assert true_eps == pytest.approx(4.0, abs=1e-3)
    # The unrounded calibration (noise for scale * sqrt(L + gamma^2)) overspends: at scale 10
    # the rounded record sees epsilon of about 7.
    unrounded_std = calibrate_gaussian(epsilon=4.0, delta=DELTA) * scale * math.sqrt(4.25)
    old_eps = gaussian_epsilon(
        noise_multiplier=unrounded_std / rounded, delta=DELTA, accountant="pld"
    )
    assert old_eps > 4.0 + 1e-3
    if scale == 10.0:
        assert old_eps == pytest.approx(7.03, abs=0.05)


@pytest.mark.parametrize(
    ("layers", "hidden"), [(4, 640), (1, 640), (18, 640), (2, 32), (1, 4), (4, 8), (1, 65536)]
)
@pytest.mark.parametrize("count_weight", [0.5, 2.0])
def test_min_vector_scale_keeps_the_inflation_under_the_limit(
    layers: int, hidden: int, count_weight: float
) -> None:
    dim = layers * hidden + 1
    minimum = min_vector_scale(layers=layers, count_weight=count_weight, dim=dim)
    at_min = rounding_inflation(scale=minimum, layers=layers, count_weight=count_weight, dim=dim)
    assert at_min <= MAX_ROUNDING_INFLATION
    assert at_min == pytest.approx(MAX_ROUNDING_INFLATION, rel=1e-6)  # tight, not just safe
    below = rounding_inflation(
        scale=minimum * (1 - 1e-6), layers=layers, count_weight=count_weight, dim=dim
    )
    assert below > MAX_ROUNDING_INFLATION
    # The inflation shrinks as the scale grows.
    assert (
        rounding_inflation(scale=2 * minimum, layers=layers, count_weight=count_weight, dim=dim)
        < at_min
    )


def test_default_scale_is_fine_enough_for_the_models_used() -> None:
    """1000 keeps the inflation under 0.1 % for Gemma 3 270M (hidden 640) and the tiny models."""
    for layers, hidden in [(4, 640), (1, 640), (18, 640), (4, 576), (2, 32), (4, 32)]:
        dim = layers * hidden + 1
        assert min_vector_scale(layers=layers, count_weight=0.5, dim=dim) < 1000.0
        assert rounding_inflation(scale=1000.0, layers=layers, count_weight=0.5, dim=dim) < 1e-3
    # At scale 1000 the unrounded bound understates Gemma's 4-layer record noticeably ...
    assert rounding_inflation(scale=1000.0, layers=4, count_weight=0.5, dim=2561) > 1e-4
    # ... and at scale 10 grossly.
    assert rounding_inflation(scale=10.0, layers=4, count_weight=0.5, dim=2561) > 0.5


def test_vector_record_sensitivity_matches_the_rounding_bound() -> None:
    l2, l1 = vector_record_sensitivity(scale=300.0, layers=3, count_weight=0.5, dim=97)
    assert l2 == rounded_l2_sensitivity(scaled_clip=300.0 * math.sqrt(3.25), dim=97)
    assert l1 == rounded_l1_sensitivity(l2=l2, dim=97)
    with pytest.raises(ConfigError, match="scale"):
        vector_record_sensitivity(scale=0.0, layers=3, count_weight=0.5, dim=97)
    with pytest.raises(ConfigError, match="max_inflation"):
        min_vector_scale(layers=1, count_weight=0.5, dim=5, max_inflation=0.0)
