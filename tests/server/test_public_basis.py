"""Denoising a release by projecting onto a public subspace: more signal, never a noisy push.

The class signal lies in the few directions public text varies in; the noise is isotropic. A
release whose signal sits in the public basis must come out of the rule closer to the
noise-free direction than without the basis (so skipping the projection, or counting the
noise of all H dimensions inside k of them, fails here), a noiseless release must be left
whole, and a pure-noise release must still generate exactly the prior.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from releases import LAYERS, make_manifest, make_test_release

from fedsynth.protocol.contribution import DecodedRelease
from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.manifest import TaskManifest
from fedsynth.protocol.models import LoadedModel, tiny_model
from fedsynth.server.generation import GenerationConfig
from fedsynth.server.public_basis import (
    PublicBasis,
    basis_from_features,
    release_basis,
)
from fedsynth.server.release import Release, make_release
from fedsynth.server.secure_round import RoundResult
from fedsynth.server.snr import coordinate_noise_sd, projected_factor, steering_snr
from fedsynth.server.synthesize import generate_from_release, label_deltas, steering_report

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CONFIG = GenerationConfig(max_new_tokens=5, batch_size=4, stop_at_newline=False)


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return tiny_model(seed=0, arch="llama")


def _orthonormal(rng: np.random.Generator, rows: int, hidden: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(hidden, rows)))
    return q.T  # (rows, hidden), orthonormal rows


def _basis(rng: np.random.Generator, hidden: int, rank: int = 16) -> PublicBasis:
    return PublicBasis(
        layers=LAYERS,
        vectors=np.stack([_orthonormal(rng, rank, hidden) for _ in LAYERS]),
        source="test",
    )


def _noisy_release(
    llama: LoadedModel, basis: PublicBasis, *, inside: int, noise: float, seed: int
) -> tuple[Release, np.ndarray]:
    """Class signals inside the top ``inside`` basis directions plus noise of the assumed sd.

    ``noise`` scales the signal down against the release's noise sd (larger: noisier).
    """
    rng = np.random.default_rng(seed)
    manifest = make_manifest(llama)
    counts = np.array([12.5, 7.25, 3.0])
    placeholder = np.zeros((3, len(LAYERS), llama.hidden_size), dtype=np.float32)
    shell = _release_of(manifest, placeholder, counts)
    sd = coordinate_noise_sd(shell)  # (C, L): what the rule assumes; contrast 1 keeps it
    signal = np.zeros_like(placeholder, dtype=np.float64)
    for c in range(3):
        for j, layer in enumerate(LAYERS):
            weights = rng.normal(size=inside)
            direction = weights @ basis.of(layer, inside)
            # signal energy = (H / noise) * noise energy of the layer
            target = math.sqrt(llama.hidden_size / noise) * sd[c, j]
            signal[c, j] = direction / np.linalg.norm(direction) * target
    noisy = signal + rng.normal(size=signal.shape) * sd[:, :, None]
    return _release_of(manifest, noisy.astype(np.float32), counts), signal


def _release_of(manifest: TaskManifest, vectors: np.ndarray, counts: np.ndarray) -> Release:
    result = RoundResult(
        field_sum=np.zeros(manifest.dim, dtype=np.uint64), survivors=[1, 2, 3], dropped=[4]
    )
    decoded = DecodedRelease(vectors=vectors, counts=counts)
    return make_release(manifest, decoded, result, model_name="tiny-llama")


def _cos(a: torch.Tensor | np.ndarray, b: np.ndarray) -> float:
    x = np.asarray(a, dtype=np.float64)
    return float(x @ b / (np.linalg.norm(x) * np.linalg.norm(b)))


def test_basis_from_features_finds_the_public_principal_directions() -> None:
    rng = np.random.default_rng(0)
    hidden = 24
    dominant = _orthonormal(rng, 2, hidden)
    weights = rng.normal(size=(200, 2)) * np.array([10.0, 5.0])
    features = np.stack(
        [weights @ dominant + rng.normal(size=(200, hidden)) * 0.1 + 3.0 for _ in LAYERS], axis=1
    )
    basis = basis_from_features(features, LAYERS, max_rank=6)
    assert basis.vectors.shape == (len(LAYERS), 6, hidden)
    for layer in LAYERS:
        rows = basis.of(layer, 6)
        np.testing.assert_allclose(rows @ rows.T, np.eye(6), atol=1e-10)
        assert abs(rows[0] @ dominant[0]) > 0.999  # the largest variance first
        assert abs(rows[1] @ dominant[1]) > 0.999
        # Projection onto the top two keeps a vector of their span whole.
        v = dominant[0] * 2 - dominant[1]
        np.testing.assert_allclose(basis.project(layer, v, 2), v, atol=1e-2)
    # The rank is capped by the rows: n - 1 directions carry any variance after centring.
    assert basis_from_features(features[:5], LAYERS).rank == 4
    with pytest.raises(ConfigError, match="at least 2"):
        basis_from_features(features[:1], LAYERS)
    with pytest.raises(ConfigError, match="not finite"):
        basis_from_features(np.full((3, len(LAYERS), hidden), np.nan), LAYERS)
    with pytest.raises(ConfigError, match="rank=7"):
        basis.of(LAYERS[0], 7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_projection_brings_a_noisy_direction_closer_to_the_signal(
    llama: LoadedModel, seed: int
) -> None:
    rng = np.random.default_rng(100 + seed)
    basis = _basis(rng, llama.hidden_size)
    # Noise energy 0.75 times the signal's over all H = 32 dimensions: a cosine of about 0.76;
    # k = 8 directions hold the signal and a quarter of the noise: about 0.92.
    release, signal = _noisy_release(llama, basis, inside=4, noise=0.75, seed=seed)
    # The projection itself, without the signal-share cut (which would switch off the layers
    # whose estimate stays below 1/2 and so hide their ranks).
    plain = steering_snr(release, min_signal_share=0.0)
    denoised = steering_snr(release, basis=basis, min_signal_share=0.0)
    gains, projected = [], 0
    for c, label in enumerate(release.labels):
        raw = release.directions(label, contrast=1.0)
        added = denoised.directions(release, label)
        for j, layer in enumerate(LAYERS):
            before = plain.of(label).layers[j]
            after = denoised.of(label).layers[j]
            assert before.rank is None
            truth = signal[c, j]
            assert after.factor >= before.factor
            assert _cos(added[layer], truth) > _cos(raw[layer], truth) - 0.05
            # The factor is a conservative estimate of the cosine, never above it by much.
            assert after.factor < _cos(added[layer], truth) + 0.05
            if after.rank is not None:
                projected += 1
                assert after.rank in (8, 16)
                assert after.factor > before.factor
            gains.append(_cos(added[layer], truth) - _cos(raw[layer], truth))
        deltas = label_deltas(release, label, strength=0.5, basis=basis, min_signal_share=0.0)
        for layer, delta in deltas.items():
            assert _cos(delta, signal[c, LAYERS.index(layer)]) > 0.5
    assert projected >= 5  # of 3 classes x 2 layers
    assert float(np.mean(gains)) > 0.08
    report = steering_report(release, strength=0.5, basis=basis, min_signal_share=0.0)
    assert report["public_basis"] == "test"
    ranks = {
        item["projected_rank"] for c in report["classes"].values() for item in c["layers"].values()
    }
    assert ranks <= {8, 16, None} and ranks & {8, 16}
    # The opt-out applies the raw directions: no projection, no shrink.
    opted = steering_report(release, strength=0.5, basis=basis, snr_shrink=False)
    assert opted["public_basis"] is None


def test_a_noiseless_release_is_never_projected(llama: LoadedModel) -> None:
    release = make_test_release(llama, epsilon=math.inf)
    basis = _basis(np.random.default_rng(5), llama.hidden_size)
    snr = steering_snr(release, basis=basis)
    for entry in snr.classes:
        assert [item.rank for item in entry.layers] == [None] * len(LAYERS)
        assert [item.factor for item in entry.layers] == [1.0] * len(LAYERS)
        with_basis = label_deltas(release, entry.label, strength=0.3, basis=basis)
        without = label_deltas(release, entry.label, strength=0.3)
        for layer in LAYERS:
            assert torch.equal(with_basis[layer], without[layer])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_noise_with_a_basis_still_generates_the_prior(llama: LoadedModel, seed: int) -> None:
    rng = np.random.default_rng(seed)
    basis = _basis(rng, llama.hidden_size)
    manifest = make_manifest(llama)
    counts = np.array([12.5, 7.25, 3.0])
    shell = _release_of(manifest, np.zeros((3, len(LAYERS), llama.hidden_size), "f4"), counts)
    sd = coordinate_noise_sd(shell)
    noise = rng.normal(size=(3, len(LAYERS), llama.hidden_size)) * sd[:, :, None]
    release = _release_of(manifest, noise.astype(np.float32), counts)
    snr = steering_snr(release, basis=basis)
    assert all(item.factor == 0.0 for entry in snr.classes for item in entry.layers)
    kwargs = {"n_per_label": 3, "config": CONFIG, "seed": 4}
    denoised = [
        s.text for s in generate_from_release(llama, release, strength=1.0, basis=basis, **kwargs)
    ]
    prior = [
        s.text
        for s in generate_from_release(llama, release, strength=0.0, snr_shrink=False, **kwargs)
    ]
    assert denoised == prior


def test_projected_factor_counts_only_the_noise_inside_the_basis() -> None:
    rng = np.random.default_rng(3)
    hidden, k = 400, 8
    rows = _orthonormal(rng, k, hidden)
    signal = rng.normal(size=k) @ rows
    signal *= 4.0 / np.linalg.norm(signal)  # energy 16
    sd = 0.2  # noise energy 0.04 per dimension: 16 over all 400, 0.32 inside the basis
    factors = []
    for trial in range(200):
        observed = signal + np.random.default_rng(trial).normal(size=hidden) * sd
        factors.append(projected_factor(observed, basis=rows, noise_sd=sd))
    # Inside the basis the SNR is 50: the cosine is about 0.99, the conservative factor a bit
    # less. Counting the noise of all 400 dimensions inside it would give 0.
    assert 0.9 < float(np.median(factors)) <= 1.0
    assert projected_factor(signal, basis=rows, noise_sd=0.0) == pytest.approx(1.0)
    outside = _orthonormal(rng, 1, hidden)[0]
    outside -= rows.T @ (rows @ outside)
    assert projected_factor(outside, basis=rows, noise_sd=0.0) == pytest.approx(0.0, abs=1e-6)


def test_a_basis_of_other_layers_or_width_is_refused(llama: LoadedModel) -> None:
    release = make_test_release(llama)
    rng = np.random.default_rng(0)
    wrong_layers = dataclasses.replace(_basis(rng, llama.hidden_size), layers=(1, 3))
    with pytest.raises(ConfigError, match="does not fit"):
        steering_snr(release, basis=wrong_layers)
    wrong_width = _basis(rng, llama.hidden_size + 8)
    with pytest.raises(ConfigError, match="does not fit"):
        steering_snr(release, basis=wrong_width)


def test_release_basis_is_public_deterministic_and_cached(
    llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDSYNTH_CACHE", str(tmp_path))
    manifest = make_manifest(llama)
    first = release_basis(llama, manifest, per_label=4)
    assert first.layers == LAYERS
    assert first.vectors.shape == (len(LAYERS), 3 * 4 - 1, llama.hidden_size)
    assert list((tmp_path / "bases").glob("*.npz"))
    again = release_basis(llama, manifest, per_label=4)  # from the cache
    np.testing.assert_array_equal(first.vectors, again.vectors)
    fresh = release_basis(llama, manifest, per_label=4, use_cache=False)
    np.testing.assert_allclose(np.abs(fresh.vectors), np.abs(first.vectors), atol=1e-6)
    with pytest.raises(ConfigError, match="per_label=1"):
        release_basis(llama, manifest, per_label=1)


def test_generate_cli_denoises_on_request_and_reports_the_basis(
    llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from fedsynth.server.release import save_release
    from fedsynth.simulations.cli import app

    monkeypatch.setenv("FEDSYNTH_CACHE", str(tmp_path / "cache"))
    path = save_release(make_test_release(llama), tmp_path / "r.safetensors")
    args = ["generate", "--release", str(path), "--max-new-tokens", "4", "--n", "2"]
    plain = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a.jsonl")])
    assert plain.exit_code == 0, plain.output
    report = json.loads((tmp_path / "a.jsonl.report.json").read_text())["steering"]
    assert report["public_basis"] is None
    denoised = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b.jsonl"), "--denoise"])
    assert denoised.exit_code == 0, denoised.output
    assert "public basis" in denoised.output
    report = json.loads((tmp_path / "b.jsonl.report.json").read_text())["steering"]
    assert report["public_basis"] == "192 public prior samples"  # 64 per label, 3 labels
    assert "public basis" in report["rule"]
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 6
    assert list((tmp_path / "cache" / "bases").glob("*.npz"))
