"""Tests of the task manifest: validation (each error names its field), JSON, reference check."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pytest

from fedsynth.protocol.errors import ConfigError, ShapeError
from fedsynth.protocol.features import PromptTemplate
from fedsynth.protocol.manifest import (
    MANIFEST_VERSION,
    PrivacySpec,
    TaskManifest,
    array_sha256,
    noise_share_variance,
)
from fedsynth.protocol.mechanisms import MAX_SKELLAM_VARIANCE, skellam_noise

TEMPLATE = PromptTemplate(
    instruction="A {label} text: ",
    label_names=(("pos", "positive"), ("neg", "negative")),
    shots=(("neg", "awful"),),
)
REFERENCE = np.random.default_rng(0).normal(size=(2, 2, 8)).astype(np.float32)


def privacy(**overrides: Any) -> PrivacySpec:
    fields: dict[str, Any] = {
        "epsilon": 4.0,
        "delta": 1e-5,
        "mode": "distributed",
        "threshold": 2,
        "total_variance": 100.0,
        "noise_multiplier": 1.25,
        "l2_sensitivity": 150.0,
        "l1_sensitivity": 900.0,
        "accountant": "rdp",
    }
    fields.update(overrides)
    return PrivacySpec(**fields)


def manifest(**overrides: Any) -> TaskManifest:
    fields: dict[str, Any] = {
        "task_id": "task-1",
        "model_name": "tiny",
        "model_fingerprint": "sha256:" + "ab" * 32,
        "hidden_size": 8,
        "template": TEMPLATE,
        "layers": (1, 3),
        "max_text_tokens": 32,
        "clip_norms": (2.0, 3.5),
        "residual_norms": (10.0, 12.0),
        "count_weight": 0.5,
        "scale": 100.0,
        "bits": 48,
        "node_ids": (5, 2**63, 2**64 - 1),
        "privacy": privacy(),
        "reference_sha256": array_sha256(REFERENCE),
        "max_records": 1000,
        "extra": {"note": "x"},
    }
    fields.update(overrides)
    return TaskManifest(**fields)


def test_json_round_trip() -> None:
    original = manifest()
    text = original.to_json()
    assert json.loads(text)["node_ids"] == ["5", str(2**63), str(2**64 - 1)]
    back = TaskManifest.from_json(text)
    assert back == original
    assert back.to_json() == text
    assert back.labels == ("pos", "neg")
    assert back.row_dim == 2 * 8 + 1
    assert back.dim == 2 * back.row_dim


def test_json_round_trip_with_infinite_epsilon() -> None:
    original = manifest(privacy=privacy(epsilon=math.inf, total_variance=0.0))
    text = original.to_json()
    assert json.loads(text)["privacy"]["epsilon"] == "inf"  # valid JSON, no bare Infinity
    assert "Infinity" not in text
    back = TaskManifest.from_json(text)
    assert math.isinf(back.privacy.epsilon)
    assert back == original


def test_secagg_config_binds_the_task() -> None:
    m = manifest()
    cfg = m.secagg_config()
    assert cfg.session_id == m.task_id
    assert cfg.node_ids == m.node_ids
    assert cfg.threshold == m.privacy.threshold
    assert cfg.bits == m.bits
    assert cfg.dim == m.dim
    spec = m.feature_spec
    assert (spec.template, spec.layers, spec.max_text_tokens) == (TEMPLATE, (1, 3), 32)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"task_id": ""}, "task_id"),
        ({"version": "0"}, "version"),
        ({"layers": (3, 1)}, "layers"),
        ({"clip_norms": (2.0,)}, "clip_norms"),
        ({"clip_norms": (2.0, 0.0)}, "clip_norms"),
        ({"clip_norms": (2.0, -1.0)}, "clip_norms"),
        ({"clip_norms": (2.0, math.inf)}, "clip_norms"),
        ({"clip_norms": (2.0, math.nan)}, "clip_norms"),
        ({"residual_norms": (1.0,)}, "residual_norms"),
        ({"count_weight": 0.0}, "count_weight"),
        ({"scale": 0.0}, "scale"),
        ({"scale": math.inf}, "scale"),
        ({"bits": 15}, "bits"),
        ({"bits": 65}, "bits"),
        ({"node_ids": (5, 6, 5)}, "node_ids"),
        ({"node_ids": (5,)}, "threshold"),  # t=2 > K=1
        ({"privacy": privacy(threshold=3), "node_ids": (1, 2)}, "threshold t=3 exceeds K=2"),
        ({"deadline_s": 0.0}, "deadline_s"),
        ({"max_records": 0}, "max_records"),
        ({"bits": 16, "scale": 1000.0, "max_records": 100}, "bits=16 too small"),
    ],
)
def test_manifest_validation_names_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        manifest(**overrides)


def test_capacity_check_counts_records_scale_and_noise() -> None:
    # 3 clients x 100 records x (100 * 1 + 1) = 30300 plus little noise fits below 2^15...
    manifest(bits=16, max_records=100, privacy=privacy(total_variance=1.0))
    # ...but not with 40 standard deviations of a larger noise (40 * sqrt(3 * 2000) = 3098).
    with pytest.raises(ConfigError, match="bits=16 too small"):
        manifest(bits=16, max_records=100, privacy=privacy(total_variance=2000.0))
    # A larger count weight enlarges the count coordinate.
    manifest(bits=16, max_records=50, privacy=privacy(total_variance=1.0))
    with pytest.raises(ConfigError, match="too small"):
        manifest(bits=16, max_records=50, count_weight=3.0, privacy=privacy(total_variance=1.0))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"epsilon": math.nan}, "epsilon"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": -1e-5}, "delta"),
        ({"threshold": 1}, "threshold"),
        ({"mode": "trusted"}, "mode"),
        ({"total_variance": -1.0}, "total_variance"),
        ({"total_variance": math.inf}, "total_variance"),
        ({"total_variance": 0.0}, "total_variance"),  # finite epsilon without noise
    ],
)
def test_privacy_validation_names_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        privacy(**overrides)


def _mutated(change: Any) -> str:
    data = json.loads(manifest().to_json())
    change(data)
    return json.dumps(data)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{not json",
        "[]",
        '"a string"',
        "42",
        "null",
        _mutated(lambda d: d.pop("task_id")),
        _mutated(lambda d: d.pop("privacy")),
        _mutated(lambda d: d["privacy"].pop("delta")),
        _mutated(lambda d: d["privacy"].update(bogus=1)),
        _mutated(lambda d: d.update(privacy="strict")),
        _mutated(lambda d: d.update(hidden_size="wide")),
        _mutated(lambda d: d.update(layers=None)),
        _mutated(lambda d: d.update(node_ids=["one"])),
        _mutated(lambda d: d.update(template=["instruction"])),
        _mutated(lambda d: d["template"].update(label_names=[["only-one"]])),
        _mutated(lambda d: d.update(extra=["not", "a", "mapping"])),
        _mutated(lambda d: d.update(extra="text")),
    ],
)
def test_malformed_json_raises_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        TaskManifest.from_json(text)


def test_json_validation_errors_still_name_the_field() -> None:
    text = _mutated(lambda d: d["privacy"].update(threshold=4))
    with pytest.raises(ConfigError, match="threshold t=4 exceeds K=3"):
        TaskManifest.from_json(text)
    text = _mutated(lambda d: d.update(version="2"))
    with pytest.raises(ConfigError, match=f"version='2'.*{MANIFEST_VERSION}"):
        TaskManifest.from_json(text)


def test_check_reference() -> None:
    m = manifest()
    m.check_reference(REFERENCE.copy())
    with pytest.raises(ShapeError, match="reference shape"):
        m.check_reference(REFERENCE[:, :1])
    changed = REFERENCE.copy()
    changed[1, 1, 7] = np.nextafter(changed[1, 1, 7], np.float32(np.inf))
    with pytest.raises(ConfigError, match="reference_sha256"):
        m.check_reference(changed)
    with pytest.raises(ConfigError, match="reference_sha256"):
        m.check_reference(REFERENCE.astype(np.float64))  # same values, other dtype


def test_array_sha256_depends_on_dtype_shape_and_bytes() -> None:
    a = np.arange(6, dtype=np.float32)
    assert array_sha256(a) == array_sha256(a.copy())
    assert array_sha256(a) != array_sha256(a.reshape(2, 3))
    assert array_sha256(a) != array_sha256(a.astype(np.float64))
    assert array_sha256(a).startswith("sha256:")
    # Non-contiguous views hash their values, not their memory layout.
    b = np.arange(12, dtype=np.float32)[::2]
    assert array_sha256(b) == array_sha256(np.ascontiguousarray(b))


def test_manifest_is_frozen() -> None:
    m = manifest()
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.task_id = "other"  # type: ignore[misc]


def _smallest_bits(**overrides: Any) -> int:
    """The fewest field bits a manifest with these terms is accepted with."""
    for bits in range(8, 65):
        try:
            manifest(bits=bits, **overrides)
        except ConfigError:
            continue
        return bits
    raise AssertionError("no field size holds these terms")


@pytest.mark.parametrize("mode", ["distributed", "local", "central"])
@pytest.mark.parametrize("k", [3, 100])
def test_each_holder_keeps_forty_std_of_its_own_share_in_the_field(mode: str, k: int) -> None:
    """A holder refuses a value beyond 2^(bits-1)/K: the smallest accepted field must leave
    each holder 40 std of its own share beyond its largest sums, or the refusal would come a
    few std out for a holder whose counts near the cap (local mode at K = 100: 4 std before)."""
    terms = {
        "node_ids": tuple(range(1, k + 1)),
        "privacy": privacy(mode=mode, total_variance=1e12, threshold=2),
        "max_records": 10,
    }
    bits = _smallest_bits(**terms)
    task = manifest(bits=bits, **terms)
    records = task.max_records * (task.scale * max(1.0, task.count_weight) + 1.0)
    share_std = math.sqrt(noise_share_variance(task.privacy))
    assert 2.0 ** (bits - 1) / k >= records + 40.0 * share_std
    if mode == "central":  # the coordinator's one draw: 40 std of the whole variance
        assert 2.0 ** (bits - 1) >= k * records + 40.0 * math.sqrt(1e12)


@pytest.mark.parametrize(
    ("mode", "threshold", "colluders", "per_share"),
    [("distributed", 2, 0, 2), ("distributed", 3, 1, 2), ("local", 2, 0, 1)],
)
def test_a_noise_share_the_sampler_cannot_draw_is_refused_at_setup(
    mode: str, threshold: int, colluders: int, per_share: int
) -> None:
    """A share above the Skellam sampler's limit would pass verification (more noise is never
    less private), be charged, and only then fail to sample: refused with the terms instead."""
    limit = MAX_SKELLAM_VARIANCE
    at_limit = privacy(
        mode=mode, threshold=threshold, colluders=colluders, total_variance=limit * per_share
    )
    share = noise_share_variance(at_limit)
    assert share == pytest.approx(limit)
    # The largest share the terms may ask for is one the sampler draws.
    noise = skellam_noise((4,), variance=share, rng=np.random.default_rng(0))
    assert noise.dtype == np.int64 and noise.shape == (4,)
    with pytest.raises(ConfigError, match=r"total_variance=.*sampler"):
        privacy(
            mode=mode,
            threshold=threshold,
            colluders=colluders,
            total_variance=limit * per_share * (1 + 1e-9),
        )
    # Central mode: the holders add nothing, the coordinator's Gaussian has no such limit.
    privacy(mode="central", total_variance=limit * 10)
