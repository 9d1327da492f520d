"""The empirical audit runs the real release mechanism and never beats the accountant."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsynth.protocol.features import PromptTemplate
from fedsynth.protocol.models import tiny_model
from fedsynth.server.coordinator import PublicReference, TaskConfig, build_manifest
from fedsynth.simulations.audit import (
    audit_release,
    clopper_pearson_upper,
    epsilon_lower_bound,
)

TEMPLATE = PromptTemplate(
    instruction="A {label} text: ", label_names=(("pos", "positive"), ("neg", "negative"))
)
LAYERS = (1, 2)


@pytest.fixture(scope="module")
def setting() -> tuple[object, PublicReference, list[tuple[np.ndarray, list[str]]]]:
    loaded = tiny_model()
    rng = np.random.default_rng(0)
    means = rng.normal(size=(2, len(LAYERS), loaded.hidden_size)).astype(np.float32)
    reference = PublicReference(
        texts={"pos": [], "neg": []}, means=means, clip_norms=(1.0, 2.0), residual_norms=(5.0, 5.0)
    )
    holders = []
    for _ in range(3):
        labels = ["pos"] * 20 + ["neg"] * 20
        feats = means[[0 if x == "pos" else 1 for x in labels]] + rng.normal(
            scale=0.5, size=(40, len(LAYERS), loaded.hidden_size)
        )
        holders.append((feats.astype(np.float32), labels))
    return loaded, reference, holders


def _manifest(setting, *, epsilon: float, mode: str):  # type: ignore[no-untyped-def]
    loaded, reference, _ = setting
    config = TaskConfig(template=TEMPLATE, layers=LAYERS, epsilon=epsilon, mode=mode)
    return build_manifest(config, loaded, reference, (1, 2, 3))


@pytest.mark.parametrize("mode", ["central", "distributed", "local"])
@pytest.mark.parametrize("epsilon", [1.0, 4.0])
def test_audit_bound_never_exceeds_the_accountant(setting, mode: str, epsilon: float) -> None:
    _, reference, holders = setting
    manifest = _manifest(setting, epsilon=epsilon, mode=mode)
    result = audit_release(holders, manifest=manifest, reference=reference.means, runs=300, seed=1)
    assert result.claimed_epsilon == epsilon
    assert 0.0 <= result.epsilon_lower_bound <= epsilon


def test_audit_has_power_without_noise(setting) -> None:
    # The same audit on a non-private release finds a large ε: the test can detect leaks.
    _, reference, holders = setting
    manifest = _manifest(setting, epsilon=math.inf, mode="distributed")
    result = audit_release(holders, manifest=manifest, reference=reference.means, runs=300, seed=1)
    assert result.epsilon_lower_bound > 3.5
    assert result.false_positive_rate < 0.03


def test_audit_detects_the_canary_when_noise_is_weak(setting) -> None:
    # At ε = 16 (central Gaussian) the canary is visible: a clearly positive bound, below the claim.
    _, reference, holders = setting
    manifest = _manifest(setting, epsilon=16.0, mode="central")
    result = audit_release(holders, manifest=manifest, reference=reference.means, runs=300, seed=2)
    assert 1.5 < result.epsilon_lower_bound <= 16.0


def test_clopper_pearson_reference_values() -> None:
    # 0 failures in n trials: the upper bound is 1 - alpha**(1/n) (the "rule of three" regime).
    assert clopper_pearson_upper(0, 150, confidence=0.95) == pytest.approx(
        1 - 0.05 ** (1 / 150), rel=1e-9
    )
    assert clopper_pearson_upper(150, 150, confidence=0.95) == 1.0
    # scipy-independent check: 5/100 at 95 % one-sided is 0.1023 (published tables).
    assert clopper_pearson_upper(5, 100, confidence=0.95) == pytest.approx(0.1023, abs=5e-4)


def test_identical_score_distributions_give_no_evidence() -> None:
    rng = np.random.default_rng(0)
    bound, *_ = epsilon_lower_bound(
        rng.normal(size=400), rng.normal(size=400), delta=1e-5, confidence=0.95
    )
    assert bound < 0.3
