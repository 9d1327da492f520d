"""Steering strength from the release's own signal-to-noise ratio: never worse than the prior.

A release whose class vectors are pure noise must generate exactly the prior's text; a noiseless
release keeps the user's strength; the noise standard deviation the rule assumes is the one
decode_release actually produces (checked by simulation through the real encode/sum/decode
path), so a factor-2 error in scale, count or clip norm, or using the target instead of the
larger variance actually present, fails here.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from releases import LAYERS, make_manifest, make_test_release
from typer.testing import CliRunner

from fedsynth.protocol.accounting import calibrate_vector_release
from fedsynth.protocol.contribution import (
    DecodedRelease,
    decode_release,
    encode_contribution,
    integer_class_sums,
)
from fedsynth.protocol.errors import ConfigError, NonPositiveCountError
from fedsynth.protocol.manifest import TaskManifest
from fedsynth.protocol.models import LoadedModel, tiny_model
from fedsynth.server.generation import GenerationConfig, steering_deltas
from fedsynth.server.release import Release, make_release, save_release
from fedsynth.server.secure_round import RoundResult
from fedsynth.server.snr import (
    DEFAULT_MIN_SIGNAL_SHARE,
    check_min_signal_share,
    class_parts,
    coordinate_noise_sd,
    direction_weights,
    noise_variance_present,
    shrink_factor,
    steering_lines,
    steering_snr,
)
from fedsynth.server.synthesize import (
    generate_from_release,
    iter_release_samples,
    label_deltas,
    release_deltas,
    steering_report,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SURVIVORS = [1, 2, 3]  # of K = 4, threshold t = 2 (see releases.make_manifest)
CONFIG = GenerationConfig(max_new_tokens=5, batch_size=4, stop_at_newline=False)


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return tiny_model(seed=0, arch="llama")


def _with_variance(manifest: TaskManifest, variance: float) -> TaskManifest:
    return dataclasses.replace(
        manifest, privacy=dataclasses.replace(manifest.privacy, total_variance=variance)
    )


def _release(manifest: TaskManifest, vectors: np.ndarray, counts: np.ndarray) -> Release:
    result = RoundResult(
        field_sum=np.zeros(manifest.dim, dtype=np.uint64), survivors=SURVIVORS, dropped=[4]
    )
    decoded = DecodedRelease(vectors=vectors.astype(np.float32), counts=counts)
    return make_release(manifest, decoded, result, model_name="tiny-llama")


def _secure_sum(
    manifest: TaskManifest, client_sums: list[np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """Each survivor's noise share added and embedded in the field, then the field sum."""
    total = np.zeros(manifest.dim, dtype=np.uint64)
    for sums in client_sums:
        total = total + encode_contribution(sums, manifest=manifest, rng=rng)  # wraps mod 2^64
    return total


def _noise_only_release(manifest: TaskManifest, seed: int) -> Release:
    """A release decoded from the secure sum of survivors that hold no records: pure noise."""
    rng = np.random.default_rng(seed)
    empty = [np.zeros((len(manifest.labels), manifest.row_dim), dtype=np.int64) for _ in SURVIVORS]
    field_sum = _secure_sum(manifest, empty, rng)
    decoded = decode_release(field_sum, manifest=manifest, survivors=len(SURVIVORS), rng=rng)
    result = RoundResult(field_sum=field_sum, survivors=SURVIVORS, dropped=[4])
    return make_release(manifest, decoded, result, model_name="tiny-llama")


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("contrast", [1.0, 3.0])
def test_pure_noise_gets_strength_zero_and_generates_the_prior(
    llama: LoadedModel, seed: int, contrast: float
) -> None:
    release = _noise_only_release(make_manifest(llama), seed)
    snr = steering_snr(release, contrast=contrast)
    for entry in snr.classes:
        assert all(item.factor == 0.0 for item in entry.layers), entry
        # No hook at all: what is generated is the unsteered model's.
        assert label_deltas(release, entry.label, strength=1.0, contrast=contrast) == {}
    report = steering_report(release, strength=1.0, contrast=contrast)
    assert all(c["effective_strength"] == 0.0 for c in report["classes"].values())
    kwargs = {"n_per_label": 4, "contrast": contrast, "config": CONFIG, "seed": 9}
    shrunk = [s.text for s in generate_from_release(llama, release, strength=1.0, **kwargs)]
    prior = [
        s.text
        for s in generate_from_release(llama, release, strength=0.0, snr_shrink=False, **kwargs)
    ]
    assert shrunk == prior
    # The opt-out steers with the noise: the test above would see a missing shrink.
    raw = [
        s.text
        for s in generate_from_release(llama, release, strength=1.0, snr_shrink=False, **kwargs)
    ]
    assert raw != prior


def test_a_noiseless_release_keeps_the_users_strength(llama: LoadedModel) -> None:
    release = make_test_release(llama, epsilon=math.inf)
    snr = steering_snr(release)
    assert snr.noise_variance_scaled == 0.0
    for entry in snr.classes:
        assert [item.factor for item in entry.layers] == [1.0] * len(LAYERS)
        assert all(math.isinf(item.snr) for item in entry.layers)
        shrunk = label_deltas(release, entry.label, strength=0.3)
        plain = label_deltas(release, entry.label, strength=0.3, snr_shrink=False)
        assert shrunk.keys() == plain.keys() == set(LAYERS)
        for layer in LAYERS:
            assert torch.equal(shrunk[layer], plain[layer])
    report = steering_report(release, strength=0.3)
    assert {c["effective_strength"] for c in report["classes"].values()} == {0.3}
    kwargs = {"n_per_label": 2, "strength": 0.3, "config": CONFIG, "seed": 3}
    assert [s.text for s in generate_from_release(llama, release, **kwargs)] == [
        s.text for s in generate_from_release(llama, release, snr_shrink=False, **kwargs)
    ]


def test_a_high_snr_release_keeps_nearly_full_strength(llama: LoadedModel) -> None:
    release = make_test_release(llama)  # unit-variance vectors, noise sd at most 0.07
    snr = steering_snr(release)
    for entry in snr.classes:
        for item in entry.layers:
            assert item.snr > 100
            assert 0.98 < item.factor < 1.0
        shrunk = label_deltas(release, entry.label, strength=0.5)
        plain = label_deltas(release, entry.label, strength=0.5, snr_shrink=False)
        for layer in LAYERS:
            ratio = float(shrunk[layer].norm() / plain[layer].norm())
            assert ratio == pytest.approx(entry.factors[layer], rel=1e-5)
            assert torch.allclose(shrunk[layer] / ratio, plain[layer], atol=1e-5)


def test_the_factor_falls_with_the_noise_variance(llama: LoadedModel) -> None:
    base = make_test_release(llama)
    variances = [1e-2, 1.0, 1e2, 1e4, 1e6, 1e7, 1e8, 1e10]
    factors = []
    for variance in variances:
        manifest = _with_variance(base.manifest, variance)
        release = _release(manifest, base.vectors, base.counts)
        factors.append(np.array([list(c.factors.values()) for c in steering_snr(release).classes]))
    for weaker, stronger in itertools.pairwise(factors):
        assert np.all(stronger <= weaker)
    assert np.all(factors[0] > 0.999)
    assert np.all(factors[-1] == 0.0)
    assert any(np.any((f > 0.05) & (f < 0.95)) for f in factors)  # a gradual rule, not a step
    # The scalar rule: 1 without noise, 0 for a zero vector, falling in the noise sd.
    assert shrink_factor(5.0, noise_sd=0.0, dim=32) == 1.0
    assert shrink_factor(0.0, noise_sd=0.1, dim=32) == 0.0
    sds = [0.01, 0.05, 0.1, 0.2, 0.4, 1.0]
    values = [shrink_factor(10.0, noise_sd=sd, dim=32) for sd in sds]
    assert values == sorted(values, reverse=True) and values[0] > 0.99 and values[-1] == 0.0


def test_the_variance_actually_present_is_used_when_larger(llama: LoadedModel) -> None:
    release = make_test_release(llama)  # distributed, 3 survivors of t = 2: 1.5 x the target
    assert noise_variance_present(release) == (600.0, "actual (privacy report)")
    sd = coordinate_noise_sd(release)
    clip = np.array(release.manifest.clip_norms)  # (2, 3); scale 1000
    for c, count in enumerate(release.counts):
        np.testing.assert_allclose(sd[c], clip * math.sqrt(600.0) / (1000.0 * count))
    # A report that states less than the target never lowers the noise assumed.
    report = json.loads(json.dumps(release.report))
    report["noise"]["aggregate_variance_actual_scaled"] = 1.0
    understated = dataclasses.replace(release, report=report)
    assert noise_variance_present(understated) == (400.0, "target (manifest)")


def test_direction_weights_give_the_contrast_directions(llama: LoadedModel) -> None:
    release = make_test_release(llama)
    for contrast in (0.0, 1.0, 2.5):
        for c, label in enumerate(release.labels):
            weights = direction_weights(3, c, contrast=contrast)
            combined = np.tensordot(weights, release.vectors.astype(np.float64), axes=1)
            directions = release.directions(label, contrast=contrast)
            for j, layer in enumerate(LAYERS):
                np.testing.assert_allclose(directions[layer].numpy(), combined[j], atol=1e-5)


def test_contrast_that_amplifies_noise_is_shrunk(llama: LoadedModel) -> None:
    """Classes that share a strong signal and differ only by noise: the class vectors are
    worth steering with, their contrast (the noise between them, amplified) is not."""
    manifest = make_manifest(llama)
    counts = np.array([12.0, 12.0, 12.0])
    probe = _release(manifest, np.ones((3, len(LAYERS), llama.hidden_size)), counts)
    sd = coordinate_noise_sd(probe)  # (C, L)
    rng = np.random.default_rng(5)
    # The contrast keeps the common part at weight 1 and multiplies the noise by ~24.
    common = rng.normal(size=(1, len(LAYERS), llama.hidden_size)) * 8 * sd.max()
    noise = rng.normal(size=(3, len(LAYERS), llama.hidden_size)) * sd[:, :, None]
    release = _release(manifest, common + noise, counts)
    assert all(f > 0.95 for c in steering_snr(release).classes for f in c.factors.values())
    sharp = steering_snr(release, contrast=30.0)
    assert all(f == 0.0 for c in sharp.classes for f in c.factors.values())


def test_class_parts_of_a_noiseless_release_are_exact(llama: LoadedModel) -> None:
    manifest = make_manifest(llama, epsilon=math.inf)
    rng = np.random.default_rng(2)
    mean = rng.normal(size=(1, len(LAYERS), llama.hidden_size))
    offsets = rng.normal(size=(3, len(LAYERS), llama.hidden_size))
    offsets -= offsets.mean(axis=0, keepdims=True)  # the classes' mean is `mean` itself
    # Scale each class's offset to a known share of the mean's length at every layer.
    wanted = np.array([0.1, 0.2, 0.4])
    lengths = np.linalg.norm(offsets, axis=2) / np.linalg.norm(mean, axis=2)
    scaled = offsets * (wanted[:, None] / lengths)[:, :, None]
    scaled -= scaled.mean(axis=0, keepdims=True)  # still centred (changes the shares a bit)
    release = _release(manifest, mean + scaled, np.array([5.0, 5.0, 5.0]))
    expected = (np.linalg.norm(scaled, axis=2) / np.linalg.norm(mean, axis=2)).mean(axis=1)
    parts = class_parts(release)
    assert [p.label for p in parts] == list(release.labels)
    np.testing.assert_allclose([p.share for p in parts], expected, rtol=1e-4)
    assert all(math.isinf(p.snr) for p in parts)


@pytest.mark.parametrize("seed", [0, 1])
def test_class_parts_of_pure_noise_have_no_signal(llama: LoadedModel, seed: int) -> None:
    # Decoded from the real mechanism's noise alone: the class parts are all noise, so their
    # noise-corrected share and SNR are near 0 (the expected noise energy is taken off).
    release = _noise_only_release(make_manifest(llama), seed)
    for part in class_parts(release):
        assert part.snr < 0.5 and part.share < 0.5, part


def test_class_parts_refuse_a_non_positive_count(llama: LoadedModel) -> None:
    broken = dataclasses.replace(make_test_release(llama), counts=np.array([1.0, 0.0, 2.0]))
    with pytest.raises(NonPositiveCountError, match="'neg'"):
        class_parts(broken)


# ---------------------------------------------------------------------------------------------
# The noise formula against the real mechanism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["distributed", "central", "local"])
@pytest.mark.parametrize("contrast", [1.0, 3.0])
def test_noise_sd_matches_decoded_noisy_sums(
    llama: LoadedModel, mode: str, contrast: float
) -> None:
    manifest = make_manifest(llama, mode=mode)
    hidden = llama.hidden_size
    rng = np.random.default_rng(11)
    labels = [label for label in manifest.labels for _ in range(12)]
    features = rng.normal(size=(len(labels), len(LAYERS), hidden)) * 0.7
    reference = np.zeros((3, len(LAYERS), hidden), dtype=np.float32)
    parts = np.array_split(np.arange(len(labels)), len(SURVIVORS))
    client_sums = [
        integer_class_sums(
            features[idx], [labels[i] for i in idx], manifest=manifest, reference=reference, rng=rng
        )
        for idx in parts
    ]
    signal = sum(client_sums)  # (C, row_dim) noiseless integer sums
    clip = np.asarray(manifest.clip_norms)
    z: list[np.ndarray] = []
    for _ in range(150):
        field_sum = _secure_sum(manifest, client_sums, rng)
        decoded = decode_release(field_sum, manifest=manifest, survivors=len(SURVIVORS), rng=rng)
        result = RoundResult(field_sum=field_sum, survivors=SURVIVORS, dropped=[4])
        release = make_release(manifest, decoded, result, model_name="tiny-llama")
        # What the vectors would be without noise, divided by the same released counts.
        clean_vectors = (
            signal[:, :-1].reshape(3, len(LAYERS), hidden)
            / manifest.scale
            / decoded.counts[:, None, None]
            * clip[None, :, None]
        )
        clean = dataclasses.replace(release, vectors=clean_vectors.astype(np.float64))
        snr = steering_snr(release, contrast=contrast)
        for label in manifest.labels:
            noisy_dir = release.directions(label, contrast=contrast)
            clean_dir = clean.directions(label, contrast=contrast)
            for item in snr.of(label).layers:
                residual = (noisy_dir[item.layer].double() - clean_dir[item.layer]).numpy()
                z.append(residual / item.noise_sd)
    pooled = np.stack(z)  # (trials * C * L, H): noise in units of the predicted sd
    assert abs(float(pooled.mean())) < 0.03
    assert float(pooled.std()) == pytest.approx(1.0, abs=0.03)
    per_block = pooled.reshape(150, 3 * len(LAYERS), hidden).transpose(1, 0, 2).reshape(6, -1)
    np.testing.assert_allclose(per_block.std(axis=1), 1.0, atol=0.07)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, -3.0, math.nan])
def test_a_non_positive_count_is_refused_before_generation(llama: LoadedModel, bad: float) -> None:
    release = make_test_release(llama)
    broken = dataclasses.replace(release, counts=np.array([12.5, bad, 1.0]))
    calls: list[tuple[int, int]] = []
    for snr_shrink in (True, False):
        samples = iter_release_samples(
            llama,
            broken,
            n_per_label=2,
            strength=0.5,
            config=CONFIG,
            seed=0,
            progress=lambda *a: calls.append(a),
            snr_shrink=snr_shrink,
        )
        with pytest.raises(NonPositiveCountError, match=r"class 'neg' is (0|-3|nan)"):
            next(samples)
    assert calls == []
    with pytest.raises(NonPositiveCountError, match="'neg'"):
        steering_report(broken, strength=0.5)
    with pytest.raises(NonPositiveCountError, match="'neg'"):
        label_deltas(broken, "pos", strength=0.5)


# ---------------------------------------------------------------------------------------------
# What generation reports: the CLI and the demo's outputs
# ---------------------------------------------------------------------------------------------


def _cli_generate(release: Path, out: Path, *extra: str) -> object:
    from fedsynth.simulations.cli import app

    args = ["generate", "--release", str(release), "--out", str(out), "--max-new-tokens", "4"]
    return CliRunner().invoke(app, [*args, "--n", "3", "--seed", "2", *extra])


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_generate_cli_reports_the_snr_and_follows_it(tmp_path: Path, llama: LoadedModel) -> None:
    noise = save_release(_noise_only_release(make_manifest(llama), 0), tmp_path / "n.safetensors")
    result = _cli_generate(noise, tmp_path / "a.jsonl", "--strength", "1.0")
    output = " ".join(str(result.output).split())  # type: ignore[attr-defined]
    assert result.exit_code == 0, output  # type: ignore[attr-defined]
    for label in ("pos", "neg", "mix"):
        assert f"{label}: count" in output
    assert "effective strength 0 " in output
    report = json.loads((tmp_path / "a.jsonl.report.json").read_text())
    assert report["steering"]["applied"] is True
    assert report["privacy"]["epsilon"] == 2.0
    assert {c["effective_strength"] for c in report["steering"]["classes"].values()} == {0.0}
    prior = _cli_generate(noise, tmp_path / "p.jsonl", "--strength", "0", "--no-snr-shrink")
    assert prior.exit_code == 0  # type: ignore[attr-defined]
    assert _texts(tmp_path / "a.jsonl") == _texts(tmp_path / "p.jsonl")
    raw = _cli_generate(noise, tmp_path / "r.jsonl", "--strength", "1.0", "--no-snr-shrink")
    assert raw.exit_code == 0  # type: ignore[attr-defined]
    assert _texts(tmp_path / "r.jsonl") != _texts(tmp_path / "p.jsonl")
    opted_out = json.loads((tmp_path / "r.jsonl.report.json").read_text())["steering"]
    assert opted_out["applied"] is False
    assert {c["effective_strength"] for c in opted_out["classes"].values()} == {1.0}


def test_generate_cli_refuses_a_zero_count_and_writes_nothing(
    tmp_path: Path, llama: LoadedModel
) -> None:
    release = make_test_release(llama)
    broken = dataclasses.replace(release, counts=np.array([12.5, 7.25, 0.0]))
    path = save_release(broken, tmp_path / "b.safetensors")
    result = _cli_generate(path, tmp_path / "out.jsonl")
    output = " ".join(str(result.output).split())  # type: ignore[attr-defined]
    assert result.exit_code == 2, output  # type: ignore[attr-defined]
    assert "class 'mix' is 0" in output
    assert not (tmp_path / "out.jsonl").exists()
    assert not (tmp_path / "out.jsonl.report.json").exists()


def test_demo_outputs_carry_the_steering_report(tmp_path: Path, llama: LoadedModel) -> None:
    from fedsynth.server.synthesize import SyntheticSample
    from fedsynth.simulations.demo import demo_config, write_outputs

    release_path = save_release(make_test_release(llama), tmp_path / "release-eps2.safetensors")
    config = demo_config("quick", out_dir=tmp_path, epsilon=2.0, strength=0.05)
    samples = {"eps=2": [SyntheticSample(text="x", label="pos", release_id="release-1")]}
    scores = {"eps=2": {"label_fidelity": 0.5, "tstr_accuracy": 0.5}}
    summary = write_outputs(config, samples, scores, {"2": release_path}, {"total": 1.0})
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["steering"] == json.loads(json.dumps(summary["steering"]))
    classes = on_disk["steering"]["2"]["classes"]
    assert set(classes) == {"pos", "neg", "mix"}
    for entry in classes.values():
        assert 0.98 < entry["factor"] < 1.0
        assert entry["effective_strength"] == pytest.approx(0.05 * entry["factor"])
        assert entry["snr"] > 100
    privacy = json.loads((tmp_path / "privacy_report.json").read_text())
    assert privacy["steering"]["classes"] == classes
    assert privacy["epsilon"] == 2.0
    assert privacy["steering"]["min_signal_share"] == 0.5
    # The demo's cut reaches its report: at 1 only a noiseless layer would keep its strength.
    strict = demo_config("quick", out_dir=tmp_path, epsilon=2.0, min_signal_share=1.0)
    summary = write_outputs(strict, samples, scores, {"2": release_path}, {"total": 1.0})
    assert summary["steering"]["2"]["min_signal_share"] == 1.0
    assert {c["factor"] for c in summary["steering"]["2"]["classes"].values()} == {0.0}


def test_steering_deltas_unchanged_without_shrink(llama: LoadedModel) -> None:
    release = make_test_release(llama)
    plain = label_deltas(release, "neg", strength=0.4, snr_shrink=False)
    direct = steering_deltas(
        release.directions("neg"), strength=0.4, residual_norms=release.residual_norms()
    )
    for layer in LAYERS:
        assert torch.equal(plain[layer], direct[layer])


def test_a_layer_whose_signal_share_is_below_a_half_is_switched_off(llama: LoadedModel) -> None:
    """The default rule keeps the plain factor where factor^2 >= 1/2 and is 0 below it (no
    hook at that layer); ``min_signal_share = 0`` is the plain rule."""
    base = make_test_release(llama)
    kept = switched_off = 0
    for variance in (1e4, 1e5, 3e5, 1e6, 3e6):
        release = _release(_with_variance(base.manifest, variance), base.vectors, base.counts)
        plain = steering_snr(release, min_signal_share=0.0)
        rule = steering_snr(release)
        assert rule.min_signal_share == DEFAULT_MIN_SIGNAL_SHARE == 0.5
        for before, after in zip(plain.classes, rule.classes, strict=True):
            deltas = label_deltas(release, after.label, strength=0.5)
            for layer, factor in before.factors.items():
                if factor**2 >= 0.5:
                    assert after.factors[layer] == factor and layer in deltas
                    kept += 1
                else:
                    assert after.factors[layer] == 0.0 and layer not in deltas
                    switched_off += factor > 0.0
        report = rule.to_dict(strength=0.5)
        assert report["min_signal_share"] == 0.5 and "below 0.5" in report["rule"]
        assert "off where the signal share is below 0.5" in steering_lines(report)[0]
        assert "below" not in plain.to_dict(strength=0.5)["rule"]
    assert kept and switched_off  # the sweep reaches both sides of the cut
    for bad in (-0.1, 1.5, math.nan, True, "half"):
        with pytest.raises(ConfigError, match=r"min_signal_share=.*must be a number in"):
            check_min_signal_share(bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="min_signal_share"):
            steering_snr(base, min_signal_share=bad)  # type: ignore[arg-type]


def test_generate_cli_takes_the_rules_default_and_refuses_a_bad_share(
    tmp_path: Path, llama: LoadedModel
) -> None:
    from fedsynth.simulations.cli import generate

    default = inspect.signature(generate).parameters["min_signal_share"].default
    assert default == DEFAULT_MIN_SIGNAL_SHARE
    path = save_release(make_test_release(llama), tmp_path / "r.safetensors")
    result = _cli_generate(path, tmp_path / "out.jsonl", "--min-signal-share", "2")
    output = " ".join(str(result.output).split())  # type: ignore[attr-defined]
    assert result.exit_code == 2 and "min_signal_share=2.0" in output, output  # type: ignore[attr-defined]
    assert not (tmp_path / "out.jsonl").exists()
    result = _cli_generate(path, tmp_path / "ok.jsonl", "--min-signal-share", "0")
    assert result.exit_code == 0  # type: ignore[attr-defined]
    steering = json.loads((tmp_path / "ok.jsonl.report.json").read_text())["steering"]
    assert steering["min_signal_share"] == 0.0


def test_records_needed_puts_the_expected_factor_exactly_at_the_cut(
    tmp_path: Path, llama: LoadedModel
) -> None:
    """benchmarks/signal_share_records.py: at the records it reports, a vector whose energy is
    the signal's plus the expected noise energy gets factor² equal to the cut; fewer records
    fall below it. A noisy release is refused (its vectors are not the signal)."""
    from benchmarks.signal_share_records import main, records_needed

    release = make_test_release(llama, epsilon=math.inf)
    manifest = release.manifest
    hidden = manifest.hidden_size
    for cut in (0.25, 0.5):
        _, rows = records_needed(release, mode="central", epsilon=1.0, delta=1e-5, cut=cut)
        assert len(rows) == len(release.labels) * len(manifest.layers)
        sd = (
            math.sqrt(
                calibrate_vector_release(
                    mode="central",
                    epsilon=1.0,
                    delta=1e-5,
                    layers=len(manifest.layers),
                    dim=len(manifest.layers) * hidden + 1,
                    scale=manifest.scale,
                    count_weight=manifest.count_weight,
                ).total_variance
            )
            / manifest.scale
        )
        for _, layer, energy, records in rows:
            for n, side in ((records, 0), (0.8 * records, -1)):
                noise_sd = manifest.clip_norms[manifest.layers.index(layer)] * sd / n
                factor = shrink_factor(energy + hidden * noise_sd**2, noise_sd=noise_sd, dim=hidden)
                if side == 0:
                    assert factor**2 == pytest.approx(cut, rel=1e-9)
                else:
                    assert factor**2 < cut
    path = save_release(release, tmp_path / "inf.safetensors")
    assert main([str(path), "--epsilon", "1"]) == 0
    noisy = save_release(make_test_release(llama), tmp_path / "noisy.safetensors")
    assert main([str(noisy)]) == 2


def test_release_deltas_are_each_labels_deltas_from_one_snr(llama: LoadedModel) -> None:
    base = make_test_release(llama)
    release = _release(_with_variance(base.manifest, 3e5), base.vectors, base.counts)
    for cut in (0.0, 0.5):
        every = release_deltas(release, strength=0.2, contrast=1.5, min_signal_share=cut)
        assert set(every) == set(release.labels)
        for label in release.labels:
            one = label_deltas(release, label, strength=0.2, contrast=1.5, min_signal_share=cut)
            assert every[label].keys() == one.keys()
            for layer in one:
                assert torch.equal(every[label][layer], one[layer])
