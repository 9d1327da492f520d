"""Edges of the privacy accountants that mutation testing showed untested.

Each test checks the accountant against an independent reference: a hand computation of the
published formula, ``dp_accounting`` called directly, or the rule the docstring states (a
whole number of compositions, delta in [0, 1], ...). A wrong answer here is either a weaker
guarantee than the one reported or a calibration that no longer matches its own accountant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from fedsynth.protocol.accounting import (
    RDP_ORDERS,
    PrivacyEvent,
    calibrate_gaussian,
    calibrate_pe,
    calibrate_skellam_variance,
    calibrate_vector_release,
    gaussian_epsilon,
    gdp_delta,
    min_vector_scale,
    pe_epsilon,
    pe_min_workable_epsilon,
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

DELTA = 1e-5


# ---------------------------------------------------------------- whole numbers and orders


@pytest.mark.parametrize("compositions", [2.5, 1.0, True, "2"])
def test_compositions_must_be_a_whole_number(compositions: Any) -> None:
    """2.5 releases truncated to 2 would understate the composed epsilon."""
    with pytest.raises(ConfigError, match="compositions"):
        skellam_epsilon(l1=4.0, l2=2.0, variance=16.0, delta=DELTA, compositions=compositions)
    with pytest.raises(ConfigError, match="compositions"):
        gaussian_epsilon(noise_multiplier=2.0, delta=DELTA, compositions=compositions)


def test_numpy_integer_compositions_count_like_python_integers() -> None:
    as_int = skellam_epsilon(l1=4.0, l2=2.0, variance=16.0, delta=DELTA, compositions=3)
    as_numpy = skellam_epsilon(l1=4.0, l2=2.0, variance=16.0, delta=DELTA, compositions=np.int64(3))
    assert as_numpy == as_int


@pytest.mark.parametrize("order", [2.5, True, 1, 0])
def test_skellam_orders_must_be_integers_of_at_least_two(order: Any) -> None:
    """The Skellam RDP bound holds for integer orders >= 2 only."""
    with pytest.raises(ConfigError, match="orders"):
        skellam_rdp(l1=1.0, l2=1.0, variance=1.0, orders=[2, order])


def test_skellam_rdp_matches_the_published_formula_by_hand() -> None:
    """eps(a) = a*l2^2/(2v) + min(((2a-1)*l2^2 + 6*l1)/(4v^2), 3*l1/(2v)), Agarwal et al. 2021."""
    # l1=6, l2=2, v=3: the second-order term is the smaller one.
    curve = skellam_rdp(l1=6.0, l2=2.0, variance=3.0, orders=[2, 3])
    assert curve[0] == pytest.approx(2 * 4 / 6 + (3 * 4 + 36) / 36, rel=1e-12)
    assert curve[1] == pytest.approx(3 * 4 / 6 + (5 * 4 + 36) / 36, rel=1e-12)
    # l1=1, l2=1, v=0.5: the first-order term 3*l1/(2v) = 3 is the smaller one.
    curve = skellam_rdp(l1=1.0, l2=1.0, variance=0.5, orders=[2])
    assert curve[0] == pytest.approx(2 * 1 / 1 + 3.0, rel=1e-12)


# ---------------------------------------------------------------- no noise


@pytest.mark.parametrize(("l1", "l2"), [(1.0, 0.0), (0.0, 1.0), (3.0, 2.0)])
def test_no_noise_with_any_sensitivity_is_not_private(l1: float, l2: float) -> None:
    assert skellam_epsilon(l1=l1, l2=l2, variance=0.0, delta=DELTA) == math.inf


def test_no_noise_and_no_sensitivity_costs_nothing() -> None:
    assert skellam_epsilon(l1=0.0, l2=0.0, variance=0.0, delta=DELTA) == 0.0


# ---------------------------------------------------------------- small epsilons


def test_gaussian_epsilon_below_one_matches_dp_accounting() -> None:
    """A large noise multiplier gives epsilon < 1; the library's own accountants agree."""
    rdp = dp_accounting.rdp.RdpAccountant(orders=list(RDP_ORDERS))
    rdp.compose(dp_accounting.GaussianDpEvent(20.0))
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.GaussianDpEvent(20.0))
    expected_rdp, expected_pld = rdp.get_epsilon(DELTA), pld.get_epsilon(DELTA)
    assert 0.0 < expected_pld < expected_rdp < 1.0
    assert gaussian_epsilon(noise_multiplier=20.0, delta=DELTA) == pytest.approx(
        expected_rdp, rel=1e-9
    )
    assert gaussian_epsilon(noise_multiplier=20.0, delta=DELTA, accountant="pld") == pytest.approx(
        expected_pld, rel=1e-9
    )


def test_skellam_epsilon_below_one_tends_to_the_gaussian() -> None:
    """Large scale, large noise: Skellam's epsilon approaches the RDP Gaussian's (below 1)."""
    l2 = 1000.0
    rdp = dp_accounting.rdp.RdpAccountant(orders=list(RDP_ORDERS))
    rdp.compose(dp_accounting.GaussianDpEvent(20.0))
    reference = rdp.get_epsilon(DELTA)
    eps = skellam_rdp_epsilon(l1=l2, l2=l2, variance=(20.0 * l2) ** 2, delta=DELTA)
    assert reference <= eps < 1.0
    assert eps == pytest.approx(reference, rel=1e-3)
    # The accountant's GDP certificate reaches the Gaussian's PLD epsilon, never below it.
    tight = gaussian_epsilon(noise_multiplier=20.0, delta=DELTA, accountant="pld")
    accounted = skellam_epsilon(l1=l2, l2=l2, variance=(20.0 * l2) ** 2, delta=DELTA)
    assert tight <= accounted < min(eps, tight * 1.005)


def test_calibrated_skellam_variance_is_the_smallest_within_the_tolerance() -> None:
    """The bisection returns the private end, within 1e-6 relative, for a target below 1."""
    v = calibrate_skellam_variance(epsilon=0.5, delta=DELTA, l1=1000.0, l2=100.0)
    assert skellam_epsilon(l1=1000.0, l2=100.0, variance=v, delta=DELTA) <= 0.5
    assert skellam_epsilon(l1=1000.0, l2=100.0, variance=v * (1 - 3e-6), delta=DELTA) > 0.5


# ---------------------------------------------------------------- rounding bound


def test_rounded_l2_bound_with_another_failure_probability_by_hand() -> None:
    """beta = e^-2 gives sqrt(2 ln(1/beta)) = 2: sqrt(c^2 + d/4 + 2 (c + sqrt(d)/2))."""
    c, d = 100.0, 16
    expected = min(c + 4.0, math.sqrt(c**2 + d / 4 + 2.0 * (c + 4.0 / 2)))
    assert rounded_l2_sensitivity(scaled_clip=c, dim=d, beta=math.exp(-2.0)) == pytest.approx(
        expected, rel=1e-12
    )
    assert expected == pytest.approx(101.0346, abs=1e-4)


@pytest.mark.parametrize("beta", [0.0, -0.5, 1.0, 1.5])
def test_rounding_failure_probability_outside_zero_one_is_refused(beta: float) -> None:
    with pytest.raises(ConfigError, match="beta"):
        rounded_l2_sensitivity(scaled_clip=10.0, dim=4, beta=beta)


def test_vector_sensitivity_uses_layers_plus_gamma_squared() -> None:
    """One record: L unit-clipped layers and a count gamma: sqrt(L + gamma^2) before rounding."""
    l2, l1 = vector_record_sensitivity(scale=50.0, layers=2, count_weight=3.0, dim=9)
    expected = rounded_l2_sensitivity(scaled_clip=50.0 * math.sqrt(2 + 9.0), dim=9)
    assert l2 == expected
    assert l1 == pytest.approx(expected * 3.0)  # sqrt(9) < l2: Cauchy-Schwarz bound
    assert rounding_inflation(scale=50.0, layers=2, count_weight=3.0, dim=9) == pytest.approx(
        expected / (50.0 * math.sqrt(11.0)) - 1.0, rel=1e-12
    )


def test_a_zero_count_weight_and_a_single_coordinate_are_valid() -> None:
    l2, l1 = vector_record_sensitivity(scale=10.0, layers=1, count_weight=0.0, dim=1)
    assert l2 == pytest.approx(min(11.0, math.sqrt(100.0 + 0.25 + 10.5)))
    assert l1 == pytest.approx(l2 * 1.0)
    assert rounded_l1_sensitivity(l2=0.5, dim=100) == pytest.approx(0.25)


def test_min_vector_scale_with_a_looser_limit_by_hand() -> None:
    """For one layer, gamma 0 and d = 1 the linear bound c + 1 gives c = 1 / tau."""
    tau = 0.5
    scale = min_vector_scale(layers=1, count_weight=0.0, dim=1, max_inflation=tau)
    inflation = rounding_inflation(scale=scale, layers=1, count_weight=0.0, dim=1)
    assert inflation <= tau
    assert inflation == pytest.approx(tau, rel=1e-9)
    # By hand: the quadratic bound sqrt(c^2 + 1/4 + c + 1/2) = 1.5 c  <=>  1.25 c^2 - c - 0.75 = 0.
    assert scale == pytest.approx((1.0 + math.sqrt(1.0 + 3.75)) / 2.5, rel=1e-9)


# ---------------------------------------------------------------- Private Evolution


def test_gdp_delta_at_infinite_epsilon_is_zero() -> None:
    assert gdp_delta(epsilon=math.inf, mu=1.0) == 0.0


def test_gdp_delta_by_hand() -> None:
    """delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Dong, Roth, Su 2022)."""
    eps, mu = 1.0, 2.0
    expected = stats.norm.cdf(-0.5 + 1.0) - math.e * stats.norm.cdf(-0.5 - 1.0)
    assert gdp_delta(epsilon=eps, mu=mu) == pytest.approx(expected, rel=1e-12)
    # At epsilon 0: 2 Phi(mu/2) - 1.
    assert gdp_delta(epsilon=0.0, mu=mu) == pytest.approx(2 * stats.norm.cdf(1.0) - 1, rel=1e-12)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("epsilon", {"epsilon": -1.0, "mu": 1.0}),
        ("epsilon", {"epsilon": math.nan, "mu": 1.0}),
        ("mu", {"epsilon": 1.0, "mu": -0.5}),
        ("mu", {"epsilon": 1.0, "mu": math.nan}),
    ],
)
def test_gdp_delta_refuses_invalid_arguments(field: str, kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match=field):
        gdp_delta(**kwargs)


def _gdp_delta_by_hand(epsilon: float, mu: float) -> float:
    return float(
        stats.norm.cdf(-epsilon / mu + mu / 2)
        - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2)
    )


@pytest.mark.parametrize("epsilon", [10.0, 1e-3])
def test_pe_noise_multiplier_outside_the_first_bracket(epsilon: float) -> None:
    """epsilon 10 in one round needs mu > 1 and epsilon 1e-3 needs mu < 1e-3: both solve
    delta(epsilon, mu) = 1e-5 exactly, by the closed form computed here."""
    sigma = pe_noise_multiplier(epsilon=epsilon, delta=DELTA, rounds=1)
    mu = 1.0 / sigma
    assert (mu > 1.0) if epsilon > 1 else (mu < 1e-3)
    assert _gdp_delta_by_hand(epsilon, mu) == pytest.approx(DELTA, rel=1e-6)
    # A slightly larger mu (less noise) breaks delta: sigma is the smallest.
    assert _gdp_delta_by_hand(epsilon, mu * 1.001) > DELTA


def test_pe_epsilon_is_zero_when_epsilon_zero_already_meets_delta() -> None:
    """sigma = 1e6, T = 1: mu = 1e-6 and delta(0) = 2 Phi(mu/2) - 1 ~ 4e-7 < 1e-5."""
    mu = 1e-6
    assert 2 * stats.norm.cdf(mu / 2) - 1 < DELTA
    assert pe_epsilon(noise_multiplier=1e6, delta=DELTA, rounds=1) == 0.0


def test_pe_epsilon_above_one_solves_the_gdp_equation() -> None:
    """T = 4 rounds at sigma = 1: mu = 2; the epsilon found satisfies delta(eps) = 1e-5."""
    eps = pe_epsilon(noise_multiplier=1.0, delta=DELTA, rounds=4)
    assert eps > 2.0
    first = stats.norm.cdf(-eps / 2.0 + 1.0)
    second = math.exp(eps) * stats.norm.cdf(-eps / 2.0 - 1.0)
    assert first - second == pytest.approx(DELTA, rel=1e-6)
    assert pe_noise_multiplier(epsilon=eps, delta=DELTA, rounds=4) == pytest.approx(1.0, rel=1e-8)


# ---------------------------------------------------------------- ledger events


def _event(**changes: Any) -> PrivacyEvent:
    fields: dict[str, Any] = {
        "mechanism": "skellam",
        "adjacency": "add/remove",
        "epsilon": 1.0,
        "delta": DELTA,
        "accountant": "rdp",
        "noise": {"variance": 4.0},
        "compositions": 1,
    }
    fields.update(changes)
    return PrivacyEvent(**fields)


@pytest.mark.parametrize(
    "changes",
    [{"epsilon": 0.0}, {"epsilon": 0.5}, {"epsilon": math.inf}, {"delta": 0.0}, {"delta": 1.0}],
)
def test_privacy_events_accept_the_edges_of_their_ranges(changes: dict[str, Any]) -> None:
    assert _event(**changes).to_dict()[next(iter(changes))] == next(iter(changes.values()))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"epsilon": -0.1}, "^epsilon=-0.1 "),
        ({"epsilon": math.nan}, "^epsilon=nan "),
        ({"delta": -0.1}, "^delta=-0.1 "),
        ({"delta": 1.5}, "^delta=1.5 "),
        ({"delta": math.nan}, "^delta=nan "),
        ({"compositions": 0}, "^compositions=0 "),
        ({"compositions": 1.5}, "^compositions=1.5 "),
    ],
)
def test_privacy_events_refuse_what_no_release_has(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        _event(**changes)


def test_privacy_event_dict_keeps_every_field() -> None:
    event = _event(mechanism="gaussian", accountant="pld", compositions=3, epsilon=2.5)
    assert event.to_dict() == {
        "mechanism": "gaussian",
        "adjacency": "add/remove",
        "epsilon": 2.5,
        "delta": DELTA,
        "accountant": "pld",
        "noise": {"variance": 4.0},
        "compositions": 3,
    }


@pytest.mark.parametrize("mode", ["distributed", "central"])
def test_vector_release_event_states_the_calibrated_noise(mode: str) -> None:
    cal = calibrate_vector_release(
        mode=mode,
        epsilon=4.0,
        delta=DELTA,
        layers=2,
        dim=2 * 16 + 1,
        scale=500.0,
        count_weight=0.5,
    )
    event = cal.to_event()
    assert event.adjacency == "add/remove"
    assert event.compositions == 1
    assert (event.epsilon, event.delta) == (cal.epsilon_achieved, DELTA)
    assert event.accountant == cal.accountant
    assert ("PLD" in event.accountant) == (mode == "central")
    # Skellam at this large variance: the GDP certificate is the tighter bound, and says so.
    assert ("GDP certificate" in event.accountant) == (mode != "central")
    assert event.noise == {
        "variance": cal.total_variance,
        "noise_multiplier": cal.noise_multiplier,
        "l2_sensitivity": cal.l2_sensitivity,
        "l1_sensitivity": cal.l1_sensitivity,
        "scale": 500.0,
    }
    # The stated noise really is the accountant's: recompute epsilon from the event alone.
    if mode == "central":
        eps = gaussian_epsilon(
            noise_multiplier=math.sqrt(event.noise["variance"]) / event.noise["l2_sensitivity"],
            delta=DELTA,
            accountant="pld",
        )
    else:
        eps = skellam_epsilon(
            l1=event.noise["l1_sensitivity"],
            l2=event.noise["l2_sensitivity"],
            variance=event.noise["variance"],
            delta=DELTA,
        )
    assert eps <= 4.0 + 1e-9
    assert eps == pytest.approx(4.0, abs=1e-3)


def test_pe_event_states_the_calibrated_noise_of_all_rounds() -> None:
    cal = calibrate_pe(mode="distributed", epsilon=2.0, delta=DELTA, rounds=3, top_k=4)
    event = cal.to_event()
    assert event.adjacency == "add/remove"
    assert (event.epsilon, event.delta, event.compositions) == (cal.epsilon_achieved, DELTA, 3)
    assert event.accountant == cal.accountant
    # Small vote variances: whichever bound was tighter is named.
    rdp = skellam_rdp_epsilon(
        l1=cal.l1_sensitivity,
        l2=cal.l2_sensitivity,
        variance=cal.total_variance,
        delta=DELTA,
        compositions=3,
    )
    tighter = "dp-accounting RDP" if rdp == cal.epsilon_achieved else "GDP certificate"
    assert tighter in event.accountant
    assert event.noise == {
        "variance": cal.total_variance,
        "noise_multiplier": cal.noise_multiplier,
        "l2_sensitivity": 2.0,
        "l1_sensitivity": 4.0,
    }
    eps = skellam_epsilon(
        l1=4.0, l2=2.0, variance=event.noise["variance"], delta=DELTA, compositions=3
    )
    assert eps <= 2.0
    assert eps == pytest.approx(2.0, abs=1e-3)


# ---------------------------------------------------------------- vector release edges


def test_vector_release_accepts_one_coordinate_per_layer_plus_the_count() -> None:
    cal = calibrate_vector_release(
        mode="distributed",
        epsilon=2.0,
        delta=DELTA,
        layers=3,
        dim=4,
        scale=100.0,
        count_weight=1.0,
    )
    assert cal.dim == 4
    with pytest.raises(ConfigError, match=r"dim=3 must be at least layers \+ 1 = 4"):
        calibrate_vector_release(
            mode="distributed",
            epsilon=2.0,
            delta=DELTA,
            layers=3,
            dim=3,
            scale=100.0,
            count_weight=1.0,
        )


def test_local_mode_calibrates_each_clients_noise_like_distributed() -> None:
    """Local: one client's noise alone must give epsilon (the only noise that client trusts)."""
    local = calibrate_vector_release(
        mode="local", epsilon=2.0, delta=DELTA, layers=1, dim=9, scale=200.0, count_weight=1.0
    )
    eps = skellam_epsilon(
        l1=local.l1_sensitivity,
        l2=local.l2_sensitivity,
        variance=local.total_variance,
        delta=DELTA,
    )
    assert eps <= 2.0
    assert eps == pytest.approx(2.0, abs=1e-3)
    assert local.noise_multiplier == pytest.approx(
        math.sqrt(local.total_variance) / local.l2_sensitivity
    )


# ---------------------------------------------------------------- PE planning


def _workable(**changes: Any) -> float:
    kwargs: dict[str, Any] = {
        "mode": "distributed",
        "delta": DELTA,
        "rounds": 2,
        "top_k": 1,
        "per_label": 1,
        "records_per_label": 1,
        "clients": 2,
    }
    kwargs.update(changes)
    return pe_min_workable_epsilon(**kwargs)


def test_pe_workable_epsilon_accepts_a_single_record_and_candidate() -> None:
    """One vote per candidate at signal-to-noise 2 means noise std 0.5."""
    eps = _workable()
    expected = skellam_epsilon(l1=1.0, l2=1.0, variance=0.25, delta=DELTA, compositions=2)
    assert eps == pytest.approx(expected, rel=1e-12)


def test_pe_workable_epsilon_in_local_mode_splits_the_sum_over_the_clients() -> None:
    """Local: the sum's variance is K times one client's, and one client's is what protects."""
    eps = _workable(mode="local", clients=4, records_per_label=4)
    expected = skellam_epsilon(l1=1.0, l2=1.0, variance=4.0 / 4, delta=DELTA, compositions=2)
    assert eps == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"mode": "trusted"}, "^mode='trusted' "),
        ({"clients": 0}, "^clients=0 "),
        ({"rounds": 0}, "^rounds=0 "),
        ({"top_k": 0}, "^top_k=0 "),
        ({"per_label": 0}, "^records_per_label and per_label must be >= 1$"),
        ({"records_per_label": 0}, "^records_per_label and per_label must be >= 1$"),
        ({"signal_to_noise": -1.0}, "^signal_to_noise=-1.0 "),
    ],
)
def test_pe_workable_epsilon_names_the_invalid_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        _workable(**changes)


# ---------------------------------------------------------------- error messages


_ERRORS: list[tuple[Callable[..., object], dict[str, Any], str]] = [
    (skellam_rdp, {"l1": -1.0, "l2": 1.0, "variance": 1.0}, "l1=-1.0"),
    (skellam_rdp, {"l1": 1.0, "l2": math.inf, "variance": 1.0}, "l2=inf"),
    (skellam_epsilon, {"l1": 1.0, "l2": 1.0, "variance": -2.0, "delta": DELTA}, "variance=-2.0"),
    (skellam_epsilon, {"l1": 1.0, "l2": 1.0, "variance": 2.0, "delta": 1.5}, "delta=1.5"),
    (calibrate_skellam_variance, {"epsilon": 1.0, "delta": DELTA, "l1": 1.0, "l2": 0.0}, "l2=0.0"),
    (
        calibrate_skellam_variance,
        {"epsilon": 1.0, "delta": DELTA, "l1": 1.0, "l2": 1.0, "compositions": 0},
        "compositions=0",
    ),
    (
        calibrate_skellam_variance,
        {"epsilon": -1.0, "delta": DELTA, "l1": 1.0, "l2": 1.0},
        "epsilon=-1.0",
    ),
    (rounded_l2_sensitivity, {"scaled_clip": -1.0, "dim": 4}, "scaled_clip=-1.0"),
    (rounded_l1_sensitivity, {"l2": 1.0, "dim": 0}, "dim=0"),
    (
        vector_record_sensitivity,
        {"scale": 1.0, "layers": 0, "count_weight": 0.5, "dim": 4},
        "layers=0",
    ),
    (
        vector_record_sensitivity,
        {"scale": 1.0, "layers": 1, "count_weight": -0.5, "dim": 4},
        "count_weight=-0.5",
    ),
    (min_vector_scale, {"layers": 0, "count_weight": 0.5, "dim": 4}, "layers=0"),
    (min_vector_scale, {"layers": 1, "count_weight": -1.0, "dim": 4}, "count_weight=-1.0"),
    (min_vector_scale, {"layers": 1, "count_weight": 0.5, "dim": 0}, "dim=0"),
    (gaussian_epsilon, {"noise_multiplier": 1.0, "delta": 0.0}, "delta=0.0"),
    (calibrate_gaussian, {"epsilon": 1.0, "delta": DELTA, "accountant": "prv"}, "rdp, pld"),
    (calibrate_gaussian, {"epsilon": 1.0, "delta": DELTA, "compositions": 0}, "compositions=0"),
    (calibrate_gaussian, {"epsilon": 0.0, "delta": DELTA}, "epsilon=0.0"),
    (calibrate_gaussian, {"epsilon": 1.0, "delta": 1.0}, "delta=1.0"),
    (pe_noise_multiplier, {"epsilon": 1.0, "delta": 2.0, "rounds": 1}, "delta=2.0"),
    (pe_epsilon, {"noise_multiplier": -1.0, "delta": DELTA, "rounds": 1}, "noise_multiplier=-1.0"),
    (pe_epsilon, {"noise_multiplier": 1.0, "delta": DELTA, "rounds": 0}, "rounds=0"),
    (validate_epsilon_delta, {"epsilon": 1.0, "delta": DELTA, "n": 1.5}, "n=1.5"),
    (
        calibrate_vector_release,
        {
            "mode": "local",
            "epsilon": 1.0,
            "delta": DELTA,
            "layers": 1,
            "dim": 4,
            "scale": 1.0,
            "count_weight": -1.0,
        },
        "count_weight=-1.0",
    ),
    (
        calibrate_vector_release,
        {
            "mode": "local",
            "epsilon": 1.0,
            "delta": DELTA,
            "layers": 0,
            "dim": 4,
            "scale": 1.0,
            "count_weight": 1.0,
        },
        "layers=0",
    ),
    (
        calibrate_vector_release,
        {
            "mode": "local",
            "epsilon": 1.0,
            "delta": DELTA,
            "layers": 1,
            "dim": 0,
            "scale": 1.0,
            "count_weight": 1.0,
        },
        "dim=0",
    ),
    (
        calibrate_vector_release,
        {
            "mode": "nope",
            "epsilon": 1.0,
            "delta": DELTA,
            "layers": 1,
            "dim": 4,
            "scale": 1.0,
            "count_weight": 1.0,
        },
        "distributed, central, local",
    ),
    (
        calibrate_pe,
        {"mode": "nope", "epsilon": 1.0, "delta": DELTA, "rounds": 1},
        "distributed, central, local",
    ),
]


@pytest.mark.parametrize(("function", "kwargs", "needle"), _ERRORS)
def test_errors_name_the_field_and_the_value(
    function: Callable[..., object], kwargs: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        function(**kwargs)
    assert needle in str(info.value)


# ---------------------------------------------------------------- what a calibration reports


@pytest.mark.parametrize("mode", ["central", "distributed", "local"])
def test_a_vector_calibration_reports_the_terms_it_was_given(mode: str) -> None:
    # Releases and ledgers show these fields; a calibration must not report other terms.
    c = calibrate_vector_release(
        mode=mode, epsilon=4.0, delta=DELTA, layers=3, dim=3 * 16 + 1, scale=800.0, count_weight=0.5
    )
    assert (c.mode, c.epsilon, c.delta, c.layers, c.dim, c.scale, c.count_weight) == (
        mode,
        4.0,
        DELTA,
        3,
        49,
        800.0,
        0.5,
    )
    expected = "dp-accounting PLD" if mode == "central" else "Skellam: "
    assert c.accountant.startswith(expected)


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_a_pe_calibration_reports_the_terms_it_was_given(mode: str) -> None:
    c = calibrate_pe(mode=mode, epsilon=3.0, delta=DELTA, rounds=4, top_k=2)
    assert (c.mode, c.epsilon, c.delta, c.rounds, c.top_k) == (mode, 3.0, DELTA, 4, 2)
    expected = "dp-accounting PLD" if mode == "central" else "Skellam: "
    assert c.accountant.startswith(expected)
    free = calibrate_pe(mode=mode, epsilon=math.inf, delta=DELTA, rounds=4)
    assert free.accountant == "none (epsilon = inf)" and free.total_variance == 0.0
