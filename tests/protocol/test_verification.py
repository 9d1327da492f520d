"""Tests of the holder's own check of a manifest's noise and sensitivity.

Calibration consistency: every manifest the coordinator's ``build_manifest`` and PE round
builder produce states exactly the record bound the clients round to and a variance that
achieves its epsilon under the holder's accountant. Refusals: a manifest with too little noise
(a quarter of it, the scale/2 calibration, 1e-9), an understated sensitivity, an inconsistent
noise multiplier or a too coarse scale is refused with an error naming the field and the limit,
by the pure check and by the holder's setup stage before any key exists.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import RecordDict

from fedsynth.client.contributor import Contributor
from fedsynth.client.pe_voter import PEVoter
from fedsynth.client.settings import ClientSettings
from fedsynth.protocol.accounting import (
    calibrate_pe,
    calibrate_vector_release,
    gaussian_epsilon,
    rounded_l1_sensitivity,
    skellam_epsilon,
)
from fedsynth.protocol.contribution import record_l2_bound
from fedsynth.protocol.errors import (
    AdjacencyMismatchError,
    ConfigError,
    InconsistentNoiseError,
    NoiseTooLowError,
    PolicyViolationError,
    ScaleTooSmallError,
    SensitivityUnderstatedError,
)
from fedsynth.protocol.features import PromptTemplate
from fedsynth.protocol.manifest import (
    ADJACENCY,
    PrivacySpec,
    TaskManifest,
    noise_share_variance,
)
from fedsynth.protocol.messages import vector_to_bytes
from fedsynth.protocol.pe_manifest import PE_ADJACENCY, PERoundManifest
from fedsynth.protocol.verification import (
    REL_TOL,
    check_vector_scale,
    stated_noise_epsilon,
    verify_manifest,
    verify_pe_manifest,
    verify_task_manifest,
)
from fedsynth.server.coordinator import PublicReference, TaskConfig, build_manifest
from fedsynth.server.pe_coordinator import PEConfig, build_round_manifest
from fedsynth.server.secure_round import default_threshold

DELTA = 1e-5
MODES = ("distributed", "local", "central")
TEMPLATE = PromptTemplate(
    instruction="A {label} review: ", label_names=(("pos", "positive"), ("neg", "negative"))
)
NODES = (3, 5, 8, 13)
# (layers, hidden): Gemma 3 270M with one and four layers, and the tiny test model.
SHAPES = (((9,), 640), ((8, 9, 10, 11), 640), ((1, 2), 32))


@dataclass(frozen=True)
class FakeModel:
    """The public facts of a model that build_manifest reads."""

    name: str
    fingerprint: str
    hidden_size: int


@dataclass(frozen=True)
class FakeEmbedder:
    """The public facts of an embedder that the PE round builder reads."""

    name: str = "hashing-16"
    fingerprint: str = "sha256:" + "cd" * 32
    dim: int = 16


def _reference(layers: tuple[int, ...], hidden: int) -> PublicReference:
    return PublicReference(
        texts={},
        means=np.zeros((2, len(layers), hidden), dtype=np.float32),
        clip_norms=tuple(1.0 + i for i in range(len(layers))),
        residual_norms=tuple(5.0 for _ in layers),
    )


@functools.cache
def vector_manifest(
    mode: str,
    epsilon: float,
    layers: tuple[int, ...] = (1, 2),
    hidden: int = 32,
    scale: float = 1000.0,
) -> TaskManifest:
    config = TaskConfig(
        template=TEMPLATE,
        layers=layers,
        epsilon=epsilon,
        delta=DELTA,
        mode=mode,
        scale=scale,
        prior_per_label=2,
    )
    model = FakeModel(f"fake-{hidden}", "sha256:" + "ab" * 32, hidden)
    return build_manifest(
        config,
        model,  # type: ignore[arg-type]
        _reference(layers, hidden),
        NODES,
        task_id=f"dv-{mode}-{epsilon}-{len(layers)}-{hidden}",
    )


@functools.cache
def pe_manifest(mode: str, epsilon: float, rounds: int = 3, top_k: int = 1) -> PERoundManifest:
    config = PEConfig(
        labels=("pos", "neg"),
        rounds=rounds,
        per_label=8,
        keep=4,
        top_k=top_k,
        epsilon=epsilon,
        delta=DELTA,
        mode=mode,
    )
    calibration = calibrate_pe(mode=mode, epsilon=epsilon, delta=DELTA, rounds=rounds, top_k=top_k)
    embedder = FakeEmbedder()
    candidates = np.zeros((2 * 8, embedder.dim), dtype=np.float32)
    return build_round_manifest(
        config,
        calibration,
        pe_task_id=f"pe-{mode}-{epsilon}-{rounds}-{top_k}",
        round_number=1,
        embedder=embedder,  # type: ignore[arg-type]
        candidates=candidates,
        nodes=NODES,
    )


def with_privacy(manifest: Any, **changes: Any) -> Any:
    """The manifest with some privacy fields changed (noise multiplier kept consistent)."""
    privacy = dataclasses.replace(manifest.privacy, **changes)
    if "noise_multiplier" not in changes and privacy.total_variance > 0:
        privacy = dataclasses.replace(
            privacy, noise_multiplier=math.sqrt(privacy.total_variance) / privacy.l2_sensitivity
        )
    return dataclasses.replace(manifest, privacy=privacy)


# ---------------------------------------------------------------- calibration consistency


@pytest.mark.parametrize(("layers", "hidden"), SHAPES)
@pytest.mark.parametrize("epsilon", [1.0, 4.0, math.inf])
@pytest.mark.parametrize("mode", MODES)
def test_build_manifest_states_the_record_bound_and_enough_noise(
    mode: str, epsilon: float, layers: tuple[int, ...], hidden: int
) -> None:
    manifest = vector_manifest(mode, epsilon, layers, hidden)
    privacy = manifest.privacy
    bound = record_l2_bound(manifest)
    assert privacy.l2_sensitivity == bound
    assert privacy.l1_sensitivity == rounded_l1_sensitivity(l2=bound, dim=manifest.row_dim)
    # What goes over the wire is what the holder verifies.
    parsed = TaskManifest.from_json(manifest.to_json())
    assert parsed == manifest
    terms = verify_manifest(parsed)
    assert terms.trusted_coordinator == (mode == "central")
    if math.isinf(epsilon):
        assert privacy.total_variance == 0.0
        assert terms.epsilon == math.inf
        return
    assert terms.l2_sensitivity == bound
    assert terms.epsilon <= epsilon * (1 + REL_TOL)
    assert terms.epsilon == pytest.approx(epsilon, abs=2e-3)  # tight: not over-noised either
    # Independent reference: the library accountants at the record bound.
    if mode == "central":
        reference = gaussian_epsilon(
            noise_multiplier=math.sqrt(privacy.total_variance) / bound,
            delta=DELTA,
            accountant="pld",
        )
    else:
        reference = skellam_epsilon(
            l1=privacy.l1_sensitivity, l2=bound, variance=privacy.total_variance, delta=DELTA
        )
    assert reference <= epsilon * (1 + REL_TOL)
    assert privacy.noise_multiplier == pytest.approx(
        math.sqrt(privacy.total_variance) / bound, rel=1e-12
    )


@pytest.mark.parametrize("top_k", [1, 4])
@pytest.mark.parametrize("rounds", [1, 10])
@pytest.mark.parametrize("epsilon", [1.0, 4.0, math.inf])
@pytest.mark.parametrize("mode", MODES)
def test_pe_round_manifest_states_top_k_and_enough_noise(
    mode: str, epsilon: float, rounds: int, top_k: int
) -> None:
    manifest = pe_manifest(mode, epsilon, rounds, top_k)
    privacy = manifest.privacy
    assert privacy.l2_sensitivity == math.sqrt(top_k)
    assert privacy.l1_sensitivity == top_k
    assert privacy.threshold == default_threshold(len(NODES))
    parsed = PERoundManifest.from_json(manifest.to_json())
    terms = verify_manifest(parsed)
    if math.isinf(epsilon):
        assert terms.epsilon == math.inf
        return
    assert terms.epsilon <= epsilon * (1 + REL_TOL)
    assert terms.epsilon == pytest.approx(epsilon, abs=2e-3)
    if mode == "central":
        reference = gaussian_epsilon(
            noise_multiplier=math.sqrt(privacy.total_variance) / math.sqrt(top_k),
            delta=DELTA,
            compositions=rounds,
            accountant="pld",
        )
    else:
        reference = skellam_epsilon(
            l1=top_k,
            l2=math.sqrt(top_k),
            variance=privacy.total_variance,
            delta=DELTA,
            compositions=rounds,
        )
    assert reference <= epsilon * (1 + REL_TOL)


@pytest.mark.parametrize("mode", ["distributed", "local"])
def test_each_client_adds_the_verified_variance(mode: str) -> None:
    """Verification covers what the clients add: any t shares sum to the verified variance."""
    manifest = vector_manifest(mode, 4.0)
    share = noise_share_variance(manifest.privacy)
    t = manifest.privacy.threshold
    summed = share * (t if mode == "distributed" else 1)
    assert summed == pytest.approx(manifest.privacy.total_variance, rel=1e-12)
    verified = stated_noise_epsilon(
        dataclasses.replace(manifest.privacy, total_variance=summed),
        l2=record_l2_bound(manifest),
        l1=manifest.privacy.l1_sensitivity,
    )
    assert verified <= 4.0 * (1 + REL_TOL)


# ---------------------------------------------------------------- too little noise


@pytest.mark.parametrize("factor", [0.25, 0.5, 0.9])
@pytest.mark.parametrize("mode", MODES)
def test_too_little_noise_is_refused(mode: str, factor: float) -> None:
    manifest = vector_manifest(mode, 4.0)
    low = with_privacy(manifest, total_variance=manifest.privacy.total_variance * factor)
    with pytest.raises(NoiseTooLowError, match="total_variance") as caught:
        verify_task_manifest(low)
    message = str(caught.value)
    assert "epsilon=4.0" in message and "requires total_variance >=" in message
    assert isinstance(caught.value, PolicyViolationError)


@pytest.mark.parametrize("mode", MODES)
def test_variance_of_1e9_is_refused(mode: str) -> None:
    manifest = vector_manifest(mode, 1.0)
    with pytest.raises(NoiseTooLowError, match="total_variance=1e-09"):
        verify_task_manifest(with_privacy(manifest, total_variance=1e-9))


@pytest.mark.parametrize("mode", MODES)
def test_scale_half_calibration_is_refused(mode: str) -> None:
    """A coordinator calibrating at scale/2 (4x too little variance) is caught either way."""
    manifest = vector_manifest(mode, 4.0)
    half = calibrate_vector_release(
        mode=mode,
        epsilon=4.0,
        delta=DELTA,
        layers=len(manifest.layers),
        dim=manifest.row_dim,
        scale=manifest.scale / 2,
        count_weight=manifest.count_weight,
    )
    assert half.total_variance < 0.3 * manifest.privacy.total_variance
    # Stating the half-scale calibration wholesale: the sensitivity is understated.
    wholesale = with_privacy(
        manifest,
        total_variance=half.total_variance,
        noise_multiplier=half.noise_multiplier,
        l2_sensitivity=half.l2_sensitivity,
        l1_sensitivity=half.l1_sensitivity,
    )
    with pytest.raises(SensitivityUnderstatedError, match="l2_sensitivity"):
        verify_task_manifest(wholesale)
    # Stating the true sensitivity with the half-scale variance: the noise is too low.
    with pytest.raises(NoiseTooLowError, match="total_variance"):
        verify_task_manifest(with_privacy(manifest, total_variance=half.total_variance))


def test_central_manifest_with_the_unrounded_bound_is_refused() -> None:
    """The old central calibration (Delta = scale * sqrt(L + gamma^2)) understates the record."""
    manifest = vector_manifest("central", 4.0)
    unrounded = manifest.scale * math.sqrt(len(manifest.layers) + manifest.count_weight**2)
    old = with_privacy(
        manifest,
        l2_sensitivity=unrounded,
        total_variance=(manifest.privacy.noise_multiplier * unrounded) ** 2,
    )
    with pytest.raises(SensitivityUnderstatedError, match=f"l2_sensitivity={unrounded!r}"):
        verify_task_manifest(old)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("field", ["l2_sensitivity", "l1_sensitivity"])
def test_understated_sensitivity_is_refused(mode: str, field: str) -> None:
    manifest = vector_manifest(mode, 4.0)
    stated = getattr(manifest.privacy, field)
    with pytest.raises(SensitivityUnderstatedError, match=field) as caught:
        verify_task_manifest(with_privacy(manifest, **{field: stated * (1 - 1e-6)}))
    assert repr(stated) in str(caught.value)  # names the limit it recomputed


def test_round_off_is_tolerated_and_more_noise_is_fine() -> None:
    manifest = vector_manifest("distributed", 4.0)
    privacy = manifest.privacy
    nudged = with_privacy(
        manifest,
        l2_sensitivity=privacy.l2_sensitivity * (1 - 1e-12),
        l1_sensitivity=privacy.l1_sensitivity * (1 - 1e-12),
    )
    verify_task_manifest(nudged)
    generous = with_privacy(
        manifest,
        total_variance=privacy.total_variance * 4,
        l2_sensitivity=privacy.l2_sensitivity * 2,
        l1_sensitivity=privacy.l1_sensitivity * 4,
    )
    assert verify_task_manifest(generous).epsilon < 2.5


@pytest.mark.parametrize("mode", MODES)
def test_inconsistent_noise_multiplier_is_refused(mode: str) -> None:
    manifest = vector_manifest(mode, 4.0)
    bad = with_privacy(manifest, noise_multiplier=manifest.privacy.noise_multiplier * 2)
    with pytest.raises(InconsistentNoiseError, match="noise_multiplier"):
        verify_task_manifest(bad)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("epsilon", [4.0, math.inf])
def test_another_adjacency_label_is_refused(mode: str, epsilon: float) -> None:
    """Noise calibrated for add/remove but labelled replace-one (which needs about twice the
    sensitivity): the holders would sign, and the release would state, a guarantee the noise
    does not give. The holder accepts only the relation it recomputed the sensitivity for."""
    manifest = vector_manifest(mode, epsilon)
    assert manifest.privacy.adjacency == ADJACENCY
    verify_task_manifest(manifest)
    relabelled = with_privacy(manifest, adjacency="replace-one (one record's value changes)")
    with pytest.raises(AdjacencyMismatchError, match="replace-one"):
        verify_task_manifest(relabelled)
    with pytest.raises(AdjacencyMismatchError):  # PE's label is not a dataset vector's either
        verify_task_manifest(with_privacy(manifest, adjacency=PE_ADJACENCY))
    pe = pe_manifest(mode, epsilon)
    assert pe.privacy.adjacency == PE_ADJACENCY
    verify_pe_manifest(pe)
    with pytest.raises(AdjacencyMismatchError, match="add/remove"):
        verify_pe_manifest(with_privacy(pe, adjacency=ADJACENCY))


@pytest.mark.parametrize("field", ["l2_sensitivity", "l1_sensitivity"])
def test_an_infinite_stated_sensitivity_is_refused(field: str) -> None:
    """Stating more than the bound is conservative, but an infinite bound comes with a noise
    multiplier of 0, which the release would publish."""
    manifest = vector_manifest("distributed", 4.0)
    with pytest.raises(InconsistentNoiseError, match=f"{field}=inf"):
        verify_task_manifest(with_privacy(manifest, **{field: math.inf}))


@pytest.mark.parametrize(
    ("field", "value"),
    [("delta", "1e-5"), ("total_variance", "5"), ("noise_multiplier", None), ("threshold", 3.0)],
)
def test_a_privacy_field_of_the_wrong_json_type_is_refused_by_name(field: str, value: Any) -> None:
    """Without the type check ``"delta": "1e-5"`` passed verification and only failed later
    in the policy's comparison with a TypeError; ``3.0`` for t passed until the secure sum."""
    manifest = vector_manifest("distributed", 4.0)
    data = json.loads(manifest.to_json())
    data["privacy"][field] = value
    with pytest.raises(ConfigError, match=f"privacy.{field}="):
        TaskManifest.from_json(json.dumps(data))


def test_non_private_manifest_has_nothing_to_verify() -> None:
    manifest = vector_manifest("distributed", math.inf, scale=1000.0)
    assert verify_manifest(manifest).epsilon == math.inf


# ---------------------------------------------------------------- scale lower limit


def test_scale_below_the_minimum_is_refused_by_coordinator_and_holder() -> None:
    with pytest.raises(ScaleTooSmallError, match=r"scale=100\.0 is below the minimum") as caught:
        vector_manifest("distributed", 4.0, (8, 9, 10, 11), 640, scale=100.0)
    assert isinstance(caught.value, ConfigError)
    assert "0.1 %" in str(caught.value)
    # A manifest published with a coarse scale (and honestly calibrated for it) is refused too.
    good = vector_manifest("distributed", 4.0)
    cal = calibrate_vector_release(
        mode="distributed",
        epsilon=4.0,
        delta=DELTA,
        layers=2,
        dim=good.row_dim,
        scale=50.0,
        count_weight=good.count_weight,
    )
    coarse = dataclasses.replace(
        good,
        scale=50.0,
        privacy=dataclasses.replace(
            good.privacy,
            total_variance=cal.total_variance,
            noise_multiplier=cal.noise_multiplier,
            l2_sensitivity=cal.l2_sensitivity,
            l1_sensitivity=cal.l1_sensitivity,
        ),
    )
    with pytest.raises(ScaleTooSmallError, match=r"scale=50\.0"):
        verify_task_manifest(coarse)
    check_vector_scale(scale=1000.0, layers=4, count_weight=0.5, row_dim=4 * 640 + 1)


# ---------------------------------------------------------------- PE


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("factor", [0.25, 1e-9])
def test_pe_too_little_noise_is_refused(mode: str, factor: float) -> None:
    manifest = pe_manifest(mode, 4.0, 10, 1)
    low = with_privacy(manifest, total_variance=manifest.privacy.total_variance * factor)
    with pytest.raises(NoiseTooLowError, match="T=10 rounds"):
        verify_pe_manifest(low)


def test_pe_noise_for_fewer_rounds_is_refused() -> None:
    """Noise calibrated for T = 1 published in a T = 10 task is too little for ten releases."""
    one = pe_manifest("distributed", 4.0, 1, 1)
    ten = pe_manifest("distributed", 4.0, 10, 1)
    with pytest.raises(NoiseTooLowError):
        verify_pe_manifest(dataclasses.replace(ten, privacy=one.privacy))


def test_pe_understated_sensitivity_and_inconsistent_multiplier_are_refused() -> None:
    manifest = pe_manifest("distributed", 4.0, 3, 4)
    # The manifest's own validation already refuses sensitivities that do not match top_k;
    # bypass it to check that the holder's recomputation refuses them independently.
    for field in ("l2_sensitivity", "l1_sensitivity"):
        understated = dataclasses.replace(manifest)
        privacy = dataclasses.replace(
            manifest.privacy, **{field: getattr(manifest.privacy, field) / 2}
        )
        object.__setattr__(understated, "privacy", privacy)
        with pytest.raises(SensitivityUnderstatedError, match=field):
            verify_pe_manifest(understated)
    with pytest.raises(InconsistentNoiseError, match="noise_multiplier"):
        verify_pe_manifest(
            with_privacy(manifest, noise_multiplier=manifest.privacy.noise_multiplier / 2)
        )


# ---------------------------------------------------------------- the holder's setup stage


def _settings(tmp_path: Path) -> ClientSettings:
    data = tmp_path / "private.jsonl"
    data.write_text('{"text": "fine", "label": "pos"}\n')
    return ClientSettings(data_path=data, budget_path=tmp_path / "budget.jsonl", seed=1)


def test_contributor_refuses_low_noise_before_anything_else(tmp_path: Path) -> None:
    manifest = vector_manifest("distributed", 4.0)
    low = with_privacy(manifest, total_variance=manifest.privacy.total_variance / 4)
    loads: list[int] = []

    def loader() -> Any:
        loads.append(1)
        raise AssertionError("the model must not be loaded for a refused manifest")

    contributor = Contributor(_settings(tmp_path), node_id=NODES[0], model_loader=loader)
    reference = np.zeros((2, 2, 32), dtype=np.float32)
    fields = {"manifest": low.to_json(), "reference": vector_to_bytes(reference.reshape(-1))}
    state = RecordDict()
    with pytest.raises(NoiseTooLowError, match="total_variance"):
        contributor.accept(fields, state)
    assert not loads
    assert not list(state.keys())  # nothing kept: no key, no task state


def test_contributor_refuses_another_adjacency_before_anything_else(tmp_path: Path) -> None:
    manifest = vector_manifest("distributed", 4.0)
    relabelled = with_privacy(manifest, adjacency="replace-one (one record's value changes)")

    def loader() -> Any:
        raise AssertionError("the model must not be loaded for a refused manifest")

    contributor = Contributor(_settings(tmp_path), node_id=NODES[0], model_loader=loader)
    reference = np.zeros((2, 2, 32), dtype=np.float32)
    fields = {"manifest": relabelled.to_json(), "reference": vector_to_bytes(reference.reshape(-1))}
    state = RecordDict()
    with pytest.raises(AdjacencyMismatchError, match="replace-one"):
        contributor.accept(fields, state)
    assert not list(state.keys())


def test_an_overstated_epsilon_is_accepted_and_logged_with_the_holders_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Noise for epsilon = 1 stated as epsilon = 8 only overcharges the holder (the budget takes
    the stated figure); it is accepted, and the operator sees both figures in a warning."""
    inflated = with_privacy(vector_manifest("distributed", 1.0), epsilon=8.0)
    verified = verify_task_manifest(inflated)
    assert verified.epsilon == pytest.approx(1.0, rel=1e-6)
    contributor = Contributor(_settings(tmp_path), node_id=NODES[0])
    with caplog.at_level(logging.INFO, logger="fedsynth.client.participant"):
        contributor.log_accepted("task", inflated.task_id, 8.0, verified)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "epsilon=8" in warnings[0].getMessage() and "epsilon=1" in warnings[0].getMessage()
    caplog.clear()
    calibrated = vector_manifest("distributed", 4.0)
    with caplog.at_level(logging.INFO, logger="fedsynth.client.participant"):
        contributor.log_accepted("task", "t", 4.0, verify_task_manifest(calibrated))
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "this holder's accountant: 4" in caplog.records[0].getMessage()


def test_pe_voter_refuses_low_noise_before_anything_else(tmp_path: Path) -> None:
    manifest = pe_manifest("distributed", 4.0, 3, 1)
    low = with_privacy(manifest, total_variance=manifest.privacy.total_variance / 4)

    def loader() -> Any:
        raise AssertionError("the embedder must not be loaded for a refused manifest")

    voter = PEVoter(_settings(tmp_path), node_id=NODES[0], embedder_loader=loader)
    candidates = np.zeros((manifest.dim, manifest.embedding_dim), dtype=np.float32)
    fields = {"manifest": low.to_json(), "candidates": vector_to_bytes(candidates.reshape(-1))}
    state = RecordDict()
    with pytest.raises(NoiseTooLowError, match="total_variance"):
        voter.accept(fields, state)
    assert not list(state.keys())


def test_privacy_spec_alone_is_not_trusted() -> None:
    """PrivacySpec accepts any positive variance; only the holder's recomputation refuses it."""
    manifest = vector_manifest("distributed", 1.0)
    spec = PrivacySpec(
        epsilon=1.0,
        delta=DELTA,
        mode="distributed",
        threshold=manifest.privacy.threshold,
        total_variance=1e-9,
        noise_multiplier=math.sqrt(1e-9) / manifest.privacy.l2_sensitivity,
        l2_sensitivity=manifest.privacy.l2_sensitivity,
        l1_sensitivity=manifest.privacy.l1_sensitivity,
        accountant="x",
    )
    with pytest.raises(NoiseTooLowError):
        verify_task_manifest(dataclasses.replace(manifest, privacy=spec))
