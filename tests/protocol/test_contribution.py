"""Tests of the contribution math: rounding, integer class sums, noise shares, decoding."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fedsynth.protocol.codec import field_sum, from_field, to_field
from fedsynth.protocol.contribution import (
    client_noise_share_variance,
    conditional_round,
    decode_release,
    encode_contribution,
    integer_class_sums,
    record_l2_bound,
)
from fedsynth.protocol.errors import ConfigError, FieldRangeError, ShapeError
from fedsynth.protocol.features import PromptTemplate, clip_to_unit
from fedsynth.protocol.manifest import PrivacySpec, TaskManifest, array_sha256

TEMPLATE = PromptTemplate(
    instruction="A {label} text: ", label_names=(("pos", "positive"), ("neg", "negative"))
)
NODES = (11, 22, 2**64 - 1)


def build_manifest(
    *,
    hidden: int = 8,
    mode: str = "distributed",
    epsilon: float = 4.0,
    total_variance: float = 100.0,
    threshold: int = 2,
    node_ids: tuple[int, ...] = NODES,
    scale: float = 100.0,
    bits: int = 48,
    count_weight: float = 0.5,
    clip_norms: tuple[float, float] = (2.0, 3.0),
    max_records: int = 1000,
    reference_seed: int = 0,
) -> tuple[TaskManifest, np.ndarray]:
    """A hand-made task: 2 labels, layers (0, 1), and its (2, 2, hidden) reference array."""
    reference = np.random.default_rng(reference_seed).normal(size=(2, 2, hidden)).astype(np.float32)
    privacy = PrivacySpec(
        epsilon=epsilon,
        delta=1e-5,
        mode=mode,
        threshold=threshold,
        total_variance=total_variance,
        noise_multiplier=1.0,
        l2_sensitivity=1.0,
        l1_sensitivity=1.0,
        accountant="test",
    )
    manifest = TaskManifest(
        task_id="task-contribution",
        model_name="none",
        model_fingerprint="sha256:" + "0" * 64,
        hidden_size=hidden,
        template=TEMPLATE,
        layers=(0, 1),
        max_text_tokens=16,
        clip_norms=clip_norms,
        residual_norms=(1.0, 1.0),
        count_weight=count_weight,
        scale=scale,
        bits=bits,
        node_ids=node_ids,
        privacy=privacy,
        reference_sha256=array_sha256(reference),
        max_records=max_records,
    )
    return manifest, reference


def _client_data(
    rng: np.random.Generator, n: int, hidden: int, reference: np.ndarray
) -> tuple[np.ndarray, list[str]]:
    """Features scattered around the reference so that some rows are clipped and some not."""
    labels = [("pos", "neg")[int(i)] for i in rng.integers(0, 2, size=n)]
    index = [0 if label == "pos" else 1 for label in labels]
    spread = rng.choice([0.2, 1.0, 5.0], size=(n, 2, 1))
    feats = reference[index] + rng.normal(size=(n, 2, hidden)) * spread
    return feats.astype(np.float32), labels


def _true_means(
    feats: np.ndarray, labels: list[str], manifest: TaskManifest, reference: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean of the clipped differences in model units, and the counts."""
    clip = np.asarray(manifest.clip_norms)
    means = np.zeros(reference.shape)
    counts = np.zeros(len(manifest.labels))
    for c, label in enumerate(manifest.labels):
        rows = feats[[i for i, x in enumerate(labels) if x == label]]
        counts[c] = len(rows)
        if len(rows):
            means[c] = clip_to_unit(rows - reference[c][None], clip).mean(axis=0) * clip[:, None]
    return means, counts


# ---------------------------------------------------------------------------------------------
# conditional_round
# ---------------------------------------------------------------------------------------------


def test_conditional_round_is_unbiased_with_a_loose_bound() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(-5, 5, size=(1, 40))
    reps = 20_000
    rows = np.repeat(base, reps, axis=0)
    out = conditional_round(rows, l2_bound=1e9, rng=rng)
    assert out.dtype == np.int64
    assert np.all((out == np.floor(rows)) | (out == np.ceil(rows)))
    frac = base[0] - np.floor(base[0])
    se = np.sqrt(frac * (1 - frac) / reps)
    assert np.all(np.abs(out.mean(axis=0) - base[0]) <= 5 * se + 1e-12)


def test_conditional_round_keeps_every_row_within_the_record_bound() -> None:
    manifest, _ = build_manifest(scale=20.0)
    rng = np.random.default_rng(1)
    n, hidden = 2000, manifest.hidden_size
    unit = rng.normal(size=(n, 2, hidden))
    unit /= np.linalg.norm(unit, axis=-1, keepdims=True)  # every layer at the clip norm
    rows = (
        np.concatenate([unit.reshape(n, -1), np.full((n, 1), manifest.count_weight)], axis=1)
        * manifest.scale
    )
    bound = record_l2_bound(manifest)
    assert bound > manifest.scale * math.sqrt(2 + manifest.count_weight**2)
    out = conditional_round(rows, l2_bound=bound, rng=rng)
    assert np.all(np.linalg.norm(out, axis=1) <= bound)
    assert np.all((out == np.floor(rows)) | (out == np.ceil(rows)))


def test_conditional_round_redraws_until_within_a_tight_bound() -> None:
    rng = np.random.default_rng(2)
    rows = np.full((500, 4), 0.5)
    # Each coordinate is 0 or 1; a norm <= 1.5 allows at most two ones per row.
    out = conditional_round(rows, l2_bound=1.5, rng=rng)
    assert np.all(out.sum(axis=1) <= 2)
    assert out.sum(axis=1).max() == 2


def test_conditional_round_gives_up_with_field_range_error() -> None:
    with pytest.raises(FieldRangeError, match="l2_bound"):
        conditional_round(
            np.full((3, 4), 2.5), l2_bound=1.0, rng=np.random.default_rng(0), max_tries=5
        )


# ---------------------------------------------------------------------------------------------
# integer_class_sums + encode_contribution + decode_release
# ---------------------------------------------------------------------------------------------


def test_noise_free_round_trip_recovers_the_true_means() -> None:
    manifest, reference = build_manifest(epsilon=math.inf, total_variance=0.0, scale=1000.0)
    rng = np.random.default_rng(3)
    parts = [_client_data(rng, n, manifest.hidden_size, reference) for n in (7, 12, 4)]
    values = []
    int_total = np.zeros((2, manifest.row_dim), dtype=np.int64)
    for feats, labels in parts:
        sums = integer_class_sums(feats, labels, manifest=manifest, reference=reference, rng=rng)
        assert sums.shape == (2, manifest.row_dim)
        assert sums.dtype == np.int64
        int_total += sums
        value = encode_contribution(sums, manifest=manifest, rng=rng)
        assert value.dtype == np.uint64
        assert value.shape == (manifest.dim,)
        np.testing.assert_array_equal(from_field(value, bits=manifest.bits), sums.reshape(-1))
        values.append(value)
    total = field_sum(values, bits=manifest.bits)
    np.testing.assert_array_equal(from_field(total, bits=manifest.bits), int_total.reshape(-1))
    decoded = decode_release(total, manifest=manifest, survivors=3)

    all_feats = np.concatenate([f for f, _ in parts])
    all_labels = [label for _, labels in parts for label in labels]
    means, counts = _true_means(all_feats, all_labels, manifest, reference)
    np.testing.assert_array_equal(decoded.counts, counts)
    assert decoded.vectors.shape == (2, 2, manifest.hidden_size)
    assert decoded.vectors.dtype == np.float32
    # Each record's coordinate is rounded by less than 1 in the scaled domain.
    tolerance = np.asarray(manifest.clip_norms)[None, :, None] / manifest.scale + 1e-5
    assert np.all(np.abs(decoded.vectors - means) <= tolerance)
    assert np.abs(decoded.vectors - means).max() > 0  # rounding did happen (not vacuous)


def test_class_without_records_decodes_to_zero_with_min_count() -> None:
    manifest, reference = build_manifest(epsilon=math.inf, total_variance=0.0)
    rng = np.random.default_rng(4)
    feats = reference[[0, 0, 0]] + rng.normal(size=(3, 2, manifest.hidden_size))
    sums = integer_class_sums(feats, ["pos"] * 3, manifest=manifest, reference=reference, rng=rng)
    assert not sums[1].any()
    decoded = decode_release(
        encode_contribution(sums, manifest=manifest, rng=rng), manifest=manifest, survivors=1
    )
    np.testing.assert_array_equal(decoded.counts, [3.0, 1.0])
    assert not decoded.vectors[1].any()


@pytest.mark.parametrize(
    ("mode", "factor"),
    [("distributed", 3 / 2), ("local", 3.0)],
)
def test_noise_variance_of_the_sum(mode: str, factor: float) -> None:
    manifest, reference = build_manifest(hidden=1024, mode=mode, total_variance=100.0)
    expected_share = 100.0 / 2 if mode == "distributed" else 100.0
    assert client_noise_share_variance(manifest) == pytest.approx(expected_share)
    rng = np.random.default_rng(5)
    parts = [_client_data(rng, n, manifest.hidden_size, reference) for n in (5, 3, 6)]
    sums = [
        integer_class_sums(f, lab, manifest=manifest, reference=reference, rng=rng)
        for f, lab in parts
    ]
    truth = np.sum(sums, axis=0).reshape(-1)
    errors = []
    for _ in range(10):
        values = [encode_contribution(s, manifest=manifest, rng=rng) for s in sums]
        total = from_field(field_sum(values, bits=manifest.bits), bits=manifest.bits)
        errors.append(total - truth)
    noise = np.concatenate(errors).astype(np.float64)
    expected = 100.0 * factor  # total_variance * K / t (distributed) or * K (local)
    se = math.sqrt((expected + 2 * expected**2) / noise.size)
    assert noise.size > 30_000
    assert abs(noise.var() - expected) < 5 * se
    assert abs(noise.mean()) < 5 * math.sqrt(expected / noise.size)


def test_central_mode_clients_add_no_noise_and_decode_adds_gaussian() -> None:
    manifest, reference = build_manifest(hidden=1024, mode="central", total_variance=100.0)
    assert client_noise_share_variance(manifest) == 0.0
    rng = np.random.default_rng(6)
    feats, labels = _client_data(rng, 40, manifest.hidden_size, reference)
    sums = integer_class_sums(feats, labels, manifest=manifest, reference=reference, rng=rng)
    first = encode_contribution(sums, manifest=manifest, rng=np.random.default_rng(1))
    second = encode_contribution(sums, manifest=manifest, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(from_field(first, bits=manifest.bits), sums.reshape(-1))

    with pytest.raises(ConfigError, match="rng"):
        decode_release(first, manifest=manifest, survivors=1)
    residuals = []
    for seed in range(3):
        decoded = decode_release(
            first, manifest=manifest, survivors=1, rng=np.random.default_rng(seed)
        )
        assert np.all(decoded.counts > 5)  # far from the min_count clamp
        clip = np.asarray(manifest.clip_norms)[None, :, None]
        # Undo the post-processing to recover the noisy scaled sum.
        layers = decoded.vectors / clip * decoded.counts[:, None, None] * manifest.scale
        count = decoded.counts * manifest.count_weight * manifest.scale
        noisy = np.concatenate([layers.reshape(2, -1), count[:, None]], axis=1).reshape(-1)
        residuals.append(noisy - sums.reshape(-1))
    noise = np.concatenate(residuals)
    se = math.sqrt(2 * 100.0**2 / noise.size)
    assert abs(noise.var() - 100.0) < 5 * se
    assert abs(noise.mean()) < 5 * math.sqrt(100.0 / noise.size)
    # Non-integer values: the coordinator's noise is continuous Gaussian, not Skellam.
    assert np.mean(np.abs(noise - np.round(noise)) > 1e-3) > 0.9


def test_wrong_reference_is_refused() -> None:
    manifest, reference = build_manifest()
    rng = np.random.default_rng(7)
    feats, labels = _client_data(rng, 4, manifest.hidden_size, reference)
    other = reference.copy()
    other[0, 0, 0] += 1.0
    with pytest.raises(ConfigError, match="reference_sha256"):
        integer_class_sums(feats, labels, manifest=manifest, reference=other, rng=rng)
    with pytest.raises(ShapeError, match="reference"):
        integer_class_sums(feats, labels, manifest=manifest, reference=reference[:1], rng=rng)


def test_unknown_label_is_refused() -> None:
    manifest, reference = build_manifest()
    rng = np.random.default_rng(8)
    feats, labels = _client_data(rng, 4, manifest.hidden_size, reference)
    with pytest.raises(ConfigError, match="neutral"):
        integer_class_sums(
            feats, [*labels[:-1], "neutral"], manifest=manifest, reference=reference, rng=rng
        )


def test_wrong_feature_shape_is_refused() -> None:
    manifest, reference = build_manifest()
    rng = np.random.default_rng(9)
    with pytest.raises(ShapeError, match="features"):
        integer_class_sums(
            np.zeros((2, 2, manifest.hidden_size + 1)),
            ["pos", "neg"],
            manifest=manifest,
            reference=reference,
            rng=rng,
        )
    with pytest.raises(ShapeError, match="sums"):
        encode_contribution(np.zeros((2, 3), dtype=np.int64), manifest=manifest, rng=rng)


def test_small_field_with_big_scale_is_refused_by_the_manifest() -> None:
    with pytest.raises(ConfigError, match="bits=16 too small"):
        build_manifest(bits=16, scale=1000.0, max_records=1000)


def test_overflowing_contribution_raises_field_range_error() -> None:
    # The manifest is accepted (10 records per client fit), but a client holding far more
    # records than max_records would wrap the 16-bit field: the encoder refuses.
    manifest, reference = build_manifest(bits=16, scale=100.0, max_records=10, total_variance=1.0)
    rng = np.random.default_rng(10)
    small = integer_class_sums(
        *_client_data(rng, 10, manifest.hidden_size, reference),
        manifest=manifest,
        reference=reference,
        rng=rng,
    )
    encode_contribution(small, manifest=manifest, rng=rng)  # fits
    feats = reference[[0] * 300] + rng.normal(size=(300, 2, manifest.hidden_size))
    big = integer_class_sums(feats, ["pos"] * 300, manifest=manifest, reference=reference, rng=rng)
    with pytest.raises(FieldRangeError, match="bits=16") as caught:
        encode_contribution(big, manifest=manifest, rng=rng)
    # The refusal travels to the coordinator: it must not reveal the unmasked magnitudes.
    assert str(int(np.abs(big).max())) not in str(caught.value)
    assert not any(
        ch.isdigit() for ch in str(caught.value).replace("bits=16", "").replace("K=3", "")
    )


def test_decode_rejects_wrong_length() -> None:
    manifest, _ = build_manifest()
    with pytest.raises(ShapeError):
        decode_release(np.zeros(manifest.dim + 1, dtype=np.uint64), manifest=manifest, survivors=1)


def test_manifest_dims() -> None:
    manifest, _ = build_manifest()
    assert manifest.row_dim == 2 * 8 + 1
    assert manifest.dim == 2 * manifest.row_dim
    shifted = dataclasses.replace(manifest, count_weight=2.0)
    assert record_l2_bound(shifted) > record_l2_bound(manifest)


# ---------------------------------------------------------------------------------------------
# decode range check: a sum the survivors cannot produce is refused
# ---------------------------------------------------------------------------------------------


def _sum_with(manifest: TaskManifest, values: dict[int, float]) -> np.ndarray:
    ints = np.zeros(manifest.dim, dtype=np.int64)
    for index, value in values.items():
        ints[index] = int(value)
    return to_field(ints, bits=manifest.bits)


def test_decode_accepts_what_honest_survivors_produce() -> None:
    manifest, reference = build_manifest(hidden=64, scale=1000.0, total_variance=1e6)
    rng = np.random.default_rng(11)
    values = []
    for n in (30, 25, 40):
        # Every record far outside the clip norm: each layer block at its largest norm.
        feats = reference[[0] * n] + 100.0 * rng.normal(size=(n, 2, manifest.hidden_size))
        sums = integer_class_sums(
            feats, ["pos"] * n, manifest=manifest, reference=reference, rng=rng
        )
        values.append(encode_contribution(sums, manifest=manifest, rng=rng))
    decoded = decode_release(field_sum(values, bits=manifest.bits), manifest=manifest, survivors=3)
    assert decoded.counts[0] == pytest.approx(95, abs=15)


@pytest.mark.parametrize("where", ["count-high", "count-negative", "layer-norm"])
def test_decode_refuses_a_sum_beyond_the_survivors(where: str) -> None:
    manifest, _ = build_manifest(max_records=1000, total_variance=100.0)
    count = manifest.row_dim - 1  # class "pos"'s count coordinate
    one_client = manifest.max_records * (manifest.count_weight * manifest.scale + 1)
    values = {
        "count-high": {count: 2 * one_client},
        "count-negative": {count: -1000},
        "layer-norm": {0: 2 * manifest.max_records * (manifest.scale + 3)},
    }[where]
    corrupt = _sum_with(manifest, values)
    with pytest.raises(FieldRangeError, match="honest clients can produce") as caught:
        decode_release(corrupt, manifest=manifest, survivors=1)
    # The message names the class and the limit, never the decoded value.
    assert "'pos'" in str(caught.value)
    assert str(int(next(iter(values.values())))) not in str(caught.value)
    if where != "count-negative":
        # Three survivors can produce it.
        decode_release(corrupt, manifest=manifest, survivors=3)


def test_decode_margin_follows_the_noise() -> None:
    """The margin below zero is 40 aggregate noise std: a sum just inside it decodes."""
    manifest, _ = build_manifest(total_variance=400.0, threshold=2)
    count = manifest.row_dim - 1
    std = math.sqrt(400.0 / 2 * 3)  # three survivors, each adding total / t
    decode_release(_sum_with(manifest, {count: -39 * std}), manifest=manifest, survivors=3)
    with pytest.raises(FieldRangeError):
        decode_release(_sum_with(manifest, {count: -42 * std}), manifest=manifest, survivors=3)


@pytest.mark.parametrize("survivors", [0, 4, True])
def test_decode_needs_a_valid_survivor_count(survivors: int) -> None:
    manifest, _ = build_manifest()
    with pytest.raises(ConfigError, match="survivors"):
        decode_release(
            np.zeros(manifest.dim, dtype=np.uint64), manifest=manifest, survivors=survivors
        )


def _edge_manifest() -> tuple[TaskManifest, int]:
    """Two clients, both surviving, with every limit of the honest range an integer."""
    manifest, _ = build_manifest(
        hidden=16, total_variance=400.0, threshold=2, max_records=10, node_ids=(11, 22)
    )
    return manifest, 2


def test_decode_range_edges_decode_and_one_unit_beyond_is_refused() -> None:
    """The honest range is exact: a wider range (more margin, more records) would let a
    malformed input through, a narrower one would discard honest releases."""
    manifest, survivors = _edge_manifest()
    std = math.sqrt(manifest.privacy.total_variance / manifest.privacy.threshold * survivors)
    records = survivors * manifest.max_records
    root_h = math.sqrt(manifest.hidden_size)
    margin = 40.0 * std + 1.0
    count_upper = records * (manifest.count_weight * manifest.scale + 1.0) + margin
    norm_upper = records * (manifest.scale + root_h) + (root_h + 40.0) * std + 1.0
    assert record_l2_bound(manifest) > manifest.scale + root_h  # the per-layer bound applies
    assert all(float(x).is_integer() for x in (margin, count_upper, norm_upper))
    row = manifest.row_dim
    for c in range(len(manifest.labels)):
        count = (c + 1) * row - 1
        layer_1 = c * row + manifest.hidden_size  # first coordinate of the second layer
        for inside in ({count: -margin}, {count: count_upper}, {layer_1: norm_upper}):
            decode_release(_sum_with(manifest, inside), manifest=manifest, survivors=survivors)
        for beyond in (
            {count: -margin - 1},
            {count: count_upper + 1},
            {layer_1: norm_upper + 1},
            {layer_1: -norm_upper - 1},
        ):
            with pytest.raises(FieldRangeError, match=repr(manifest.labels[c])) as caught:
                decode_release(_sum_with(manifest, beyond), manifest=manifest, survivors=survivors)
            if count in beyond:  # the message states the honest range, never the value
                assert f"[{-margin:.6g}, {count_upper:.6g}]" in str(caught.value)


def test_encode_refuses_a_value_at_the_field_limit_of_its_share() -> None:
    """Each of K clients may use less than 2^(bits-1)/K in absolute value: then no sum of K
    contributions wraps around the field."""
    manifest, _ = build_manifest(
        bits=16, max_records=10, mode="central", total_variance=1.0, node_ids=(11, 22)
    )
    assert client_noise_share_variance(manifest) == 0.0  # central: the value is encoded as is
    limit = 2 ** (manifest.bits - 1) // len(manifest.node_ids)
    rng = np.random.default_rng(12)
    for value in (limit - 1, -(limit - 1)):
        sums = np.zeros((len(manifest.labels), manifest.row_dim), dtype=np.int64)
        sums[1, 3] = value
        encoded = encode_contribution(sums, manifest=manifest, rng=rng)
        np.testing.assert_array_equal(from_field(encoded, bits=manifest.bits), sums.reshape(-1))
    for value in (limit, -limit):
        sums = np.zeros((len(manifest.labels), manifest.row_dim), dtype=np.int64)
        sums[1, 3] = value
        with pytest.raises(FieldRangeError, match="bits=16"):
            encode_contribution(sums, manifest=manifest, rng=rng)
