"""The realized-noise check passes releases that carry their stated noise, in every trust mode,
and fails those that carry a quarter of it (a privacy failure) or more than twice it (wrong
signal-to-noise figures)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fedsynth.protocol.contribution import client_noise_share_variance
from fedsynth.protocol.features import PromptTemplate
from fedsynth.protocol.manifest import TaskManifest
from fedsynth.protocol.models import tiny_model
from fedsynth.server.coordinator import PublicReference, TaskConfig, build_manifest
from fedsynth.server.release import Release
from fedsynth.simulations.audit import simulate_release
from fedsynth.simulations.noise_check import realized_noise, released_scaled_sums

LABELS = ("pos", "neg", "mix", "odd", "new", "old")
TEMPLATE = PromptTemplate(
    instruction="A {label} text: ", label_names=tuple((lb, f"{lb} kind") for lb in LABELS)
)
# 6 classes x (2 layers x 32 + 1) = 390 coordinates: the ratio's sd is 0.072 per unit of
# variance, and at this level an honest release leaves the band about once in 10^6 checks
# (band about 0.65-1.35), while a quarter or 2.3x the noise is 5 sd or more outside it.
LEVEL = 1e-6
LAYERS = (1, 2)
NODES = (1, 2, 3, 4)
HOLDERS = 4


@pytest.fixture(scope="module")
def setting() -> tuple[PublicReference, list[tuple[np.ndarray, list[str]]], TaskConfig]:
    loaded = tiny_model()
    rng = np.random.default_rng(3)
    means = rng.normal(size=(len(LABELS), len(LAYERS), loaded.hidden_size)).astype(np.float32)
    reference = PublicReference(
        texts={lb: [] for lb in LABELS},
        means=means,
        clip_norms=(1.0, 2.0),
        residual_norms=(5.0, 5.0),
    )
    holders = []
    for _ in range(HOLDERS):
        labels = [lb for i, lb in enumerate(LABELS) for _ in range(12 - i)]
        index = [TEMPLATE.labels.index(x) for x in labels]
        feats = means[index] + rng.normal(
            scale=0.4, size=(len(labels), len(LAYERS), means.shape[2])
        )
        holders.append((feats.astype(np.float32), labels))
    config = TaskConfig(template=TEMPLATE, layers=LAYERS, epsilon=2.0, threshold=3)
    return reference, holders, config


def _manifest(setting, *, mode: str, epsilon: float = 2.0) -> TaskManifest:  # type: ignore[no-untyped-def]
    reference, _, config = setting
    config = dataclasses.replace(config, mode=mode, epsilon=epsilon)
    return build_manifest(config, tiny_model(), reference, NODES)


def _scaled_variance(manifest: TaskManifest, factor: float) -> TaskManifest:
    privacy = dataclasses.replace(
        manifest.privacy, total_variance=manifest.privacy.total_variance * factor
    )
    return dataclasses.replace(manifest, privacy=privacy)


def _release(setting, run_with: TaskManifest, stated: TaskManifest, seed: int) -> Release:  # type: ignore[no-untyped-def]
    """Run the mechanism of ``run_with`` but label the release with ``stated``'s terms."""
    reference, holders, _ = setting
    decoded = simulate_release(
        holders, manifest=run_with, reference=reference.means, rng=np.random.default_rng(seed)
    )
    report: dict[str, object] = {}
    if stated.privacy.mode == "local":  # every holder's whole noise stays: the report says so
        actual = HOLDERS * client_noise_share_variance(stated)
        report = {"noise": {"aggregate_variance_actual_scaled": actual}}
    return Release(
        release_id="t",
        manifest=stated,
        vectors=decoded.vectors,
        counts=decoded.counts,
        report=report,
    )


def _check(setting, release: Release):  # type: ignore[no-untyped-def]
    reference, holders, _ = setting
    features = np.concatenate([f for f, _ in holders])
    labels = [label for _, ls in holders for label in ls]
    return realized_noise(release, features, labels, reference=reference.means, level=LEVEL)


@pytest.mark.parametrize("mode", ["central", "distributed", "local"])
def test_a_release_with_its_stated_noise_passes(setting, mode: str) -> None:
    manifest = _manifest(setting, mode=mode)
    ratios = []
    for seed in range(3):
        check = _check(setting, _release(setting, manifest, manifest, seed))
        assert check is not None and check.ok, check.describe()
        ratios.append(check.ratio)
    assert abs(float(np.mean(ratios)) - 1.0) < 0.2  # the mean of 3 has sd 0.042


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_a_quarter_of_the_noise_fails_as_less_than_stated(setting, mode: str) -> None:
    honest = _manifest(setting, mode=mode)
    release = _release(setting, _scaled_variance(honest, 0.25), honest, seed=5)
    check = _check(setting, release)
    assert check is not None and not check.ok
    assert check.verdict == "less noise than stated"
    assert check.ratio < 0.4


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_more_than_twice_the_noise_fails_as_more_than_stated(setting, mode: str) -> None:
    honest = _manifest(setting, mode=mode)
    release = _release(setting, _scaled_variance(honest, 2.3), honest, seed=6)
    check = _check(setting, release)
    assert check is not None and check.verdict == "more noise than stated"
    assert 1.45 < check.ratio < 3.3  # 2.3 +- about 0.2 per sd


def test_local_noise_fails_when_the_report_does_not_state_it(setting) -> None:
    manifest = _manifest(setting, mode="local")
    release = _release(setting, manifest, manifest, seed=7)
    silent = dataclasses.replace(release, report={})
    check = _check(setting, silent)
    assert check is not None and check.verdict == "more noise than stated"


def test_the_released_sums_invert_the_decoder_exactly(setting) -> None:
    manifest = _manifest(setting, mode="distributed", epsilon=math.inf)
    release = _release(setting, manifest, manifest, seed=8)
    reference, holders, _ = setting
    from fedsynth.protocol.contribution import integer_class_sums

    exact = sum(
        integer_class_sums(
            f, ls, manifest=manifest, reference=reference.means, rng=np.random.default_rng(i)
        )
        for i, (f, ls) in enumerate(holders)
    )
    # Without noise only each record's rounding (at most 1 per record and coordinate) differs.
    assert np.max(np.abs(released_scaled_sums(release) - exact)) <= HOLDERS * 12 + 1
    assert _check(setting, release) is None  # nothing to measure against


def test_classes_at_the_count_floor_are_skipped(setting) -> None:
    manifest = _manifest(setting, mode="central")
    release = _release(setting, manifest, manifest, seed=9)
    floored = dataclasses.replace(release, counts=np.full_like(release.counts, 1.0))
    assert _check(setting, floored) is None
    one_left = release.counts.copy()
    one_left[1:] = 1.0
    check = _check(setting, dataclasses.replace(release, counts=one_left))
    assert check is not None
    assert check.coordinates == manifest.row_dim
