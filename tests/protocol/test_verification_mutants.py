"""Tests that pin what mutation testing found unchecked in the holder's manifest verification.

``scripts/mutmut.sh protocol/verification.py`` left these changes alive against
``test_verification.py`` alone: the scale limit's inclusive edge, the refusal messages' figures
(the variance the holder's own accountant needs, for T rounds and a sensitivity other than 1;
the epsilon the stated noise gives; the inflation a coarse scale causes; the field and the task
shape that are named), the small-variance path of :func:`stated_noise_epsilon` and the terms a
verification returns. A refusal's figures are what an operator acts on, so they are tested to
be the holder's own recomputation, not the coordinator's numbers.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from fedsynth.protocol.accounting import (
    calibrate_gaussian,
    calibrate_skellam_variance,
    gaussian_epsilon,
    min_vector_scale,
    rounding_inflation,
    skellam_epsilon,
    vector_record_sensitivity,
)
from fedsynth.protocol.errors import (
    NoiseTooLowError,
    ScaleTooSmallError,
    SensitivityUnderstatedError,
)
from fedsynth.protocol.verification import (
    check_vector_scale,
    stated_noise_epsilon,
    verify_pe_manifest,
    verify_task_manifest,
)
from tests.protocol.test_verification import DELTA, pe_manifest, vector_manifest, with_privacy


def test_the_minimum_scale_itself_passes_and_just_below_it_is_refused() -> None:
    shape = {"layers": 4, "count_weight": 0.5, "row_dim": 4 * 640 + 1}
    minimum = min_vector_scale(layers=4, count_weight=0.5, dim=shape["row_dim"])
    check_vector_scale(scale=minimum, **shape)  # inclusive: the limit is <= 0.1 %
    below = minimum * (1 - 1e-6)
    with pytest.raises(ScaleTooSmallError) as caught:
        check_vector_scale(scale=below, **shape)
    inflation = rounding_inflation(scale=below, layers=4, count_weight=0.5, dim=shape["row_dim"])
    message = str(caught.value)
    assert f"inflate a record's L2 bound by {100 * inflation:.3g} %" in message
    assert f"below the minimum {minimum:.6g} for 4 layers" in message


@pytest.mark.parametrize("field", ["l2_sensitivity", "l1_sensitivity"])
def test_an_understated_sensitivity_is_named_with_the_task_shape(field: str) -> None:
    manifest = vector_manifest("distributed", 4.0)
    understated = with_privacy(manifest, **{field: getattr(manifest.privacy, field) / 2})
    with pytest.raises(SensitivityUnderstatedError) as caught:
        verify_task_manifest(understated)
    l2, l1 = vector_record_sensitivity(
        scale=manifest.scale,
        layers=len(manifest.layers),
        count_weight=manifest.count_weight,
        dim=manifest.row_dim,
    )
    message = str(caught.value)
    assert f"privacy.{field}=" in message
    assert f"recomputes for scale={manifest.scale!r}, 2 layers" in message
    assert message.endswith(repr(l2 if field == "l2_sensitivity" else l1))


@pytest.mark.parametrize("mode", ["distributed", "local"])
def test_a_skellam_refusal_states_the_epsilon_and_the_variance_the_holder_needs(
    mode: str,
) -> None:
    # top_k = 4 and three rounds: a message that dropped the rounds or the sensitivities
    # would state another variance.
    manifest = pe_manifest(mode, 4.0, rounds=3, top_k=4)
    low = with_privacy(manifest, total_variance=manifest.privacy.total_variance / 4)
    with pytest.raises(NoiseTooLowError) as caught:
        verify_pe_manifest(low)
    gives = skellam_epsilon(
        l1=4.0, l2=2.0, variance=low.privacy.total_variance, delta=DELTA, compositions=3
    )
    needs = calibrate_skellam_variance(epsilon=4.0, delta=DELTA, l1=4.0, l2=2.0, compositions=3)
    message = str(caught.value)
    assert f"it gives epsilon={gives:.6g}" in message
    assert f"total_variance >= {needs:.6g}" in message
    assert "top_k=4 votes per record, T=3 rounds" in message


def test_a_central_refusal_far_below_the_noise_states_what_the_holder_needs() -> None:
    # Sensitivity 2 (top_k = 4) and three rounds: the variance needed is (sigma * 2)^2 with
    # sigma calibrated for three compositions.
    manifest = pe_manifest("central", 4.0, rounds=3, top_k=4)
    low = with_privacy(manifest, total_variance=manifest.privacy.total_variance / 4)
    with pytest.raises(NoiseTooLowError) as caught:
        verify_pe_manifest(low)
    sigma = calibrate_gaussian(epsilon=4.0, delta=DELTA, compositions=3)
    message = str(caught.value)
    assert "it gives far more than that" in message
    assert f"total_variance >= {(sigma * 2.0) ** 2:.6g}" in message


def test_a_central_refusal_near_the_noise_states_the_epsilon_it_gives() -> None:
    manifest = pe_manifest("central", 4.0, rounds=3, top_k=4)
    # Within the shortcut's margin of the needed multiplier: the accountant itself answers.
    near = with_privacy(manifest, total_variance=manifest.privacy.total_variance * (1 - 1e-6))
    with pytest.raises(NoiseTooLowError) as caught:
        verify_pe_manifest(near)
    gives = gaussian_epsilon(
        noise_multiplier=near.privacy.noise_multiplier,
        delta=DELTA,
        compositions=3,
        accountant="pld",
    )
    assert gives > 4.0
    assert f"it gives epsilon={gives:.6g}" in str(caught.value)


@pytest.mark.parametrize("mode", ["distributed", "local", "central"])
def test_stated_noise_epsilon_of_a_small_variance_is_the_accountants(mode: str) -> None:
    spec = dataclasses.replace(
        pe_manifest(mode, 4.0, rounds=1, top_k=1).privacy,
        total_variance=0.5,
        noise_multiplier=math.sqrt(0.5),
    )
    got = stated_noise_epsilon(spec, l2=1.0, l1=1.0)
    if mode == "central":
        expected = gaussian_epsilon(
            noise_multiplier=math.sqrt(0.5), delta=DELTA, compositions=1, accountant="pld"
        )
    else:
        expected = skellam_epsilon(l1=1.0, l2=1.0, variance=0.5, delta=DELTA)
    assert math.isfinite(got) and got == pytest.approx(expected, rel=1e-9)
    silent = dataclasses.replace(
        pe_manifest(mode, math.inf, rounds=1, top_k=1).privacy, total_variance=0.0
    )
    assert stated_noise_epsilon(silent, l2=1.0, l1=1.0) == math.inf


@pytest.mark.parametrize("mode", ["distributed", "local", "central"])
def test_verification_returns_the_recomputed_terms(mode: str) -> None:
    terms = verify_pe_manifest(pe_manifest(mode, 4.0, rounds=3, top_k=4))
    assert (terms.l2_sensitivity, terms.l1_sensitivity) == (2.0, 4.0)
    assert terms.epsilon <= 4.0 * (1 + 1e-9)
    assert terms.trusted_coordinator is (mode == "central")
    vector = vector_manifest(mode, 4.0)
    l2, l1 = vector_record_sensitivity(
        scale=vector.scale,
        layers=len(vector.layers),
        count_weight=vector.count_weight,
        dim=vector.row_dim,
    )
    terms = verify_task_manifest(vector)
    assert (terms.l2_sensitivity, terms.l1_sensitivity) == (l2, l1)
    assert terms.trusted_coordinator is (mode == "central")
    for open_terms in (
        verify_pe_manifest(pe_manifest(mode, math.inf, rounds=3, top_k=4)),
        verify_task_manifest(vector_manifest(mode, math.inf)),
    ):
        assert open_terms.epsilon == math.inf
        assert math.isnan(open_terms.l2_sensitivity) and math.isnan(open_terms.l1_sensitivity)
        assert open_terms.trusted_coordinator is (mode == "central")
