"""The empirical audit runs the real release mechanism, could refute the claim it checks, never
beats the accountant on an honest release, and does beat it when the noise is 4x too small."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fedsynth.protocol.accounting import calibrate_vector_release
from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.features import PromptTemplate
from fedsynth.protocol.manifest import TaskManifest
from fedsynth.protocol.models import tiny_model
from fedsynth.server.coordinator import PublicReference, TaskConfig, build_manifest
from fedsynth.simulations.audit import (
    attainable_epsilon_bound,
    audit_mechanism,
    audit_release,
    clopper_pearson_upper,
    epsilon_lower_bound,
    runs_to_refute,
)

TEMPLATE = PromptTemplate(
    instruction="A {label} text: ", label_names=(("pos", "positive"), ("neg", "negative"))
)
LAYERS = (1, 2)
# Many labels: every class row of one release is one run of the mechanism audit.
MANY_CLASSES = 500
MANY_TEMPLATE = PromptTemplate(
    instruction="A {label} text: ",
    label_names=tuple((f"c{i}", f"class {i}") for i in range(MANY_CLASSES)),
)
NODES = (1, 2, 3)
THRESHOLD = 2


# --------------------------------------------------------------------------- attainable bound


def test_300_runs_can_never_refute_epsilon_4() -> None:
    # The old audit of ε = 4 with 300 runs per side passed whatever the mechanism did.
    attainable = attainable_epsilon_bound(300, delta=1e-5)
    perfect = 1 - 0.05 ** (1 / 150)  # Clopper-Pearson of 0 errors in the 150 held-out runs
    assert attainable == pytest.approx(math.log((1 - 1e-5 - perfect) / perfect), rel=1e-9)
    assert 3.8 < attainable < 4.0


@pytest.mark.parametrize(("epsilon", "delta"), [(1.0, 1e-5), (2.0, 1e-2), (4.0, 1e-5), (8.0, 1e-6)])
def test_runs_to_refute_is_the_smallest_sufficient_number(epsilon: float, delta: float) -> None:
    runs = runs_to_refute(epsilon, delta=delta)
    assert attainable_epsilon_bound(runs, delta=delta) > epsilon
    if runs > 4:
        assert attainable_epsilon_bound(runs - 1, delta=delta) <= epsilon
    assert runs_to_refute(4.0, delta=1e-5) == 331


def test_attainable_bound_grows_with_runs_and_confidence_costs() -> None:
    values = [attainable_epsilon_bound(n, delta=1e-5) for n in (10, 100, 1000, 10_000)]
    assert values == sorted(values)
    assert attainable_epsilon_bound(1000, delta=1e-5, confidence=0.99) < values[2]


def test_perfect_separation_reaches_exactly_the_attainable_bound() -> None:
    for runs in (20, 301, 2000):
        bound, *_ = epsilon_lower_bound(np.zeros(runs), np.ones(runs), delta=1e-5, confidence=0.95)
        assert bound == pytest.approx(attainable_epsilon_bound(runs, delta=1e-5), rel=1e-12)


@pytest.mark.parametrize(
    ("runs", "delta", "confidence"), [(3, 1e-5, 0.95), (100, 1.0, 0.95), (100, 1e-5, 1.0)]
)
def test_attainable_bound_rejects_bad_arguments(runs: int, delta: float, confidence: float) -> None:
    with pytest.raises(ConfigError):
        attainable_epsilon_bound(runs, delta=delta, confidence=confidence)


# --------------------------------------------------------------------------- mechanism audit


@pytest.fixture(scope="module")
def loaded():  # type: ignore[no-untyped-def]
    return tiny_model()


@pytest.fixture(scope="module")
def many_reference(loaded) -> PublicReference:  # type: ignore[no-untyped-def]
    means = np.random.default_rng(7).normal(size=(MANY_CLASSES, 1, loaded.hidden_size))
    return PublicReference(
        texts={}, means=means.astype(np.float32), clip_norms=(2.0,), residual_norms=(5.0,)
    )


def _many_manifest(loaded, reference, *, mode: str, epsilon: float, delta: float) -> TaskManifest:  # type: ignore[no-untyped-def]
    config = TaskConfig(
        template=MANY_TEMPLATE,
        layers=(1,),
        epsilon=epsilon,
        delta=delta,
        mode=mode,
        threshold=THRESHOLD,
    )
    return build_manifest(config, loaded, reference, NODES)


def _calibrated_at_half_scale(manifest: TaskManifest) -> TaskManifest:
    """The coordinator's cheat: calibrate for scale/2, i.e. 4x too little noise variance."""
    cheat = calibrate_vector_release(
        mode=manifest.privacy.mode,
        epsilon=manifest.privacy.epsilon,
        delta=manifest.privacy.delta,
        layers=len(manifest.layers),
        dim=manifest.row_dim,
        scale=manifest.scale / 2,
        count_weight=manifest.count_weight,
    )
    privacy = dataclasses.replace(manifest.privacy, total_variance=cheat.total_variance)
    return dataclasses.replace(manifest, privacy=privacy)


def _survivors(mode: str) -> int:
    # distributed: t survivors carry exactly the calibrated noise; local: the coordinator's
    # view of one holder's own contribution; central: all noise is the coordinator's.
    return 1 if mode == "local" else THRESHOLD


@pytest.mark.parametrize("mode", ["distributed", "central", "local"])
@pytest.mark.parametrize(("epsilon", "delta", "runs"), [(1.0, 1e-5, 1000), (4.0, 1e-5, 1500)])
def test_mechanism_audit_never_exceeds_the_accountant(
    loaded, many_reference, mode: str, epsilon: float, delta: float, runs: int
) -> None:
    manifest = _many_manifest(loaded, many_reference, mode=mode, epsilon=epsilon, delta=delta)
    result = audit_mechanism(
        manifest, many_reference.means, runs=runs, seed=11, survivors=_survivors(mode)
    )
    assert result.claimed_epsilon == epsilon
    # The audit could have refuted the claim: its ceiling is above it.
    assert result.can_refute
    assert result.attainable_bound > epsilon + 0.5
    assert 0.0 <= result.epsilon_lower_bound <= epsilon
    assert not result.refutes_claim


# At δ = 1e-2 the calibrated noise is small enough that 8000 runs per side reach the part of
# the trade-off curve where 4x too little variance (about twice the ε) shows; the calibration
# code path is the same at every δ.
CONTROL = {"epsilon": 2.0, "delta": 1e-2, "runs": 8000}


@pytest.mark.parametrize("mode", ["distributed", "central", "local"])
def test_audit_refutes_a_release_calibrated_at_half_the_scale(
    loaded, many_reference, mode: str
) -> None:
    epsilon, delta, runs = CONTROL["epsilon"], CONTROL["delta"], int(CONTROL["runs"])
    honest = _many_manifest(loaded, many_reference, mode=mode, epsilon=epsilon, delta=delta)
    cheat = _calibrated_at_half_scale(honest)
    assert cheat.privacy.total_variance == pytest.approx(
        honest.privacy.total_variance / 4, rel=0.01
    )
    kwargs = {"runs": runs, "seed": 5, "survivors": _survivors(mode)}
    honest_result = audit_mechanism(honest, many_reference.means, **kwargs)  # type: ignore[arg-type]
    cheat_result = audit_mechanism(cheat, many_reference.means, **kwargs)  # type: ignore[arg-type]
    assert honest_result.can_refute and cheat_result.can_refute
    # Negative control: the same audit, on the under-noised release, breaks the claim ...
    assert cheat_result.epsilon_lower_bound > epsilon
    assert cheat_result.refutes_claim
    # ... and on the honest release it does not.
    assert honest_result.epsilon_lower_bound <= epsilon


def test_audit_refutes_a_release_with_no_client_noise(loaded, many_reference) -> None:
    # Distributed mode where the clients' shares are gone: the canary is plain to see.
    honest = _many_manifest(loaded, many_reference, mode="distributed", epsilon=2.0, delta=1e-5)
    silent = dataclasses.replace(
        honest, privacy=dataclasses.replace(honest.privacy, total_variance=1e-9)
    )
    result = audit_mechanism(silent, many_reference.means, runs=1000, seed=3, survivors=THRESHOLD)
    assert result.epsilon_lower_bound == pytest.approx(result.attainable_bound, rel=1e-9)
    assert result.refutes_claim


@pytest.mark.parametrize("survivors", [0, 4])
def test_mechanism_audit_rejects_impossible_survivor_counts(
    loaded, many_reference, survivors: int
) -> None:
    manifest = _many_manifest(loaded, many_reference, mode="distributed", epsilon=1.0, delta=1e-5)
    with pytest.raises(ConfigError, match="survivors"):
        audit_mechanism(manifest, many_reference.means, runs=100, seed=0, survivors=survivors)


# --------------------------------------------------------------------------- real features path


@pytest.fixture(scope="module")
def setting(loaded) -> tuple[object, PublicReference, list[tuple[np.ndarray, list[str]]]]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    means = rng.normal(size=(2, len(LAYERS), loaded.hidden_size)).astype(np.float32)
    reference = PublicReference(
        texts={"pos": [], "neg": []}, means=means, clip_norms=(1.0, 2.0), residual_norms=(5.0, 5.0)
    )
    holders = []
    for _ in range(3):
        labels = ["pos"] * 5 + ["neg"] * 5
        feats = means[[0 if x == "pos" else 1 for x in labels]] + rng.normal(
            scale=0.5, size=(10, len(LAYERS), loaded.hidden_size)
        )
        holders.append((feats.astype(np.float32), labels))
    return loaded, reference, holders


def _manifest(setting, *, epsilon: float, mode: str):  # type: ignore[no-untyped-def]
    loaded, reference, _ = setting
    config = TaskConfig(
        template=TEMPLATE, layers=LAYERS, epsilon=epsilon, mode=mode, threshold=THRESHOLD
    )
    return build_manifest(config, loaded, reference, NODES)


@pytest.mark.parametrize("mode", ["central", "distributed", "local"])
def test_release_audit_never_exceeds_the_accountant(setting, mode: str) -> None:
    _, reference, holders = setting
    manifest = _manifest(setting, epsilon=1.0, mode=mode)
    survivors = holders[: _survivors(mode)]
    result = audit_release(
        survivors, manifest=manifest, reference=reference.means, runs=300, seed=1
    )
    assert result.claimed_epsilon == 1.0
    assert result.can_refute  # 300 runs can report up to 3.9 > 1
    assert 0.0 <= result.epsilon_lower_bound <= 1.0


def test_release_audit_has_power_without_noise(setting) -> None:
    # The same audit on a non-private release reaches its ceiling: the test can detect leaks.
    _, reference, holders = setting
    manifest = _manifest(setting, epsilon=math.inf, mode="distributed")
    result = audit_release(holders, manifest=manifest, reference=reference.means, runs=300, seed=1)
    assert result.epsilon_lower_bound == pytest.approx(result.attainable_bound, rel=1e-9)
    assert result.false_positive_rate < 0.03


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
