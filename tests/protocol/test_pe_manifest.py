"""Tests of the federated PE round manifest and the client's vote encoding."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import numpy as np
import pytest

from fedsynth.protocol.accounting import PECalibration, calibrate_pe
from fedsynth.protocol.codec import field_sum, from_field, to_field
from fedsynth.protocol.errors import ConfigError, FieldRangeError, ShapeError
from fedsynth.protocol.manifest import PrivacySpec, array_sha256
from fedsynth.protocol.pe_manifest import (
    PE_ADJACENCY,
    PE_MANIFEST_VERSION,
    PERoundManifest,
    decode_histogram,
    encode_votes,
)

DELTA = 1e-5
ROUNDS = 5
LABELS = ("pos", "neg")
NODES = (11, 22, 33, 44)
DIM = 8


@functools.cache
def _calibration(mode: str, epsilon: float, top_k: int) -> PECalibration:
    return calibrate_pe(mode=mode, epsilon=epsilon, delta=DELTA, rounds=ROUNDS, top_k=top_k)


def _privacy(
    mode: str = "distributed", epsilon: float = 4.0, top_k: int = 2, threshold: int = 3
) -> PrivacySpec:
    cal = _calibration(mode, epsilon, top_k)
    return PrivacySpec(
        epsilon=epsilon,
        delta=DELTA,
        mode=mode,
        threshold=threshold,
        total_variance=cal.total_variance,
        noise_multiplier=cal.noise_multiplier,
        l2_sensitivity=cal.l2_sensitivity,
        l1_sensitivity=cal.l1_sensitivity,
        accountant=f"{cal.accountant}, {ROUNDS} rounds composed",
        adjacency=PE_ADJACENCY,
    )


def _candidates(per_label: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(len(LABELS) * per_label, DIM)).astype(np.float32)


def _manifest(**overrides: Any) -> PERoundManifest:
    per_label = overrides.get("per_label", 3)
    top_k = overrides.get("top_k", 2)
    fields: dict[str, Any] = {
        "pe_task_id": "pe-task-1",
        "round": 2,
        "rounds": ROUNDS,
        "embedder_name": "hashing-8",
        "embedder_fingerprint": "sha256:" + "ab" * 32,
        "embedding_dim": DIM,
        "labels": LABELS,
        "per_label": per_label,
        "top_k": top_k,
        "candidates_sha256": array_sha256(_candidates(per_label)),
        "bits": 32,
        "node_ids": NODES,
        "privacy": _privacy(top_k=top_k),
        "deadline_s": 30.0,
        "max_records": 1000,
    }
    fields.update(overrides)
    return PERoundManifest(**fields)


# ---------------------------------------------------------------- JSON


def _strict_loads(text: str) -> Any:
    def reject(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def test_json_round_trip() -> None:
    manifest = _manifest()
    text = manifest.to_json()
    data = _strict_loads(text)
    assert data["version"] == PE_MANIFEST_VERSION
    assert data["node_ids"] == ["11", "22", "33", "44"]
    again = PERoundManifest.from_json(text)
    assert again == manifest
    assert again.to_json() == text
    assert isinstance(again.labels, tuple)
    assert isinstance(again.node_ids, tuple)


@pytest.mark.parametrize("mode", ["distributed", "central", "local"])
def test_json_round_trip_infinite_epsilon(mode: str) -> None:
    cal = _calibration(mode, math.inf, 1)
    assert cal.total_variance == 0.0
    privacy = PrivacySpec(
        epsilon=math.inf,
        delta=DELTA,
        mode=mode,
        threshold=2,
        total_variance=cal.total_variance,
        noise_multiplier=cal.noise_multiplier,
        l2_sensitivity=cal.l2_sensitivity,
        l1_sensitivity=cal.l1_sensitivity,
        accountant=cal.accountant,
        adjacency=PE_ADJACENCY,
    )
    manifest = _manifest(top_k=1, privacy=privacy)
    text = manifest.to_json()
    assert _strict_loads(text)["privacy"]["epsilon"] == "inf"
    again = PERoundManifest.from_json(text)
    assert again == manifest
    assert math.isinf(again.privacy.epsilon)


def test_from_json_malformed() -> None:
    good = json.loads(_manifest().to_json())
    with pytest.raises(ConfigError, match="malformed"):
        PERoundManifest.from_json("{not json")
    for key in ("round", "privacy", "labels", "candidates_sha256"):
        data = dict(good)
        del data[key]
        with pytest.raises(ConfigError, match="malformed"):
            PERoundManifest.from_json(json.dumps(data))
    data = dict(good, node_ids=["11", "x"])
    with pytest.raises(ConfigError, match="malformed"):
        PERoundManifest.from_json(json.dumps(data))
    data = dict(good, privacy=dict(good["privacy"], unexpected=1))
    with pytest.raises(ConfigError, match="malformed"):
        PERoundManifest.from_json(json.dumps(data))
    # A well-formed but invalid value is refused by validation (not wrapped as malformed).
    data = dict(good, round=ROUNDS + 1)
    with pytest.raises(ConfigError, match=f"round={ROUNDS + 1}"):
        PERoundManifest.from_json(json.dumps(data))
    data = dict(good, version="pe-0")
    with pytest.raises(ConfigError, match="pe-0"):
        PERoundManifest.from_json(json.dumps(data))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("round_number", [0, -1, ROUNDS + 1])
def test_round_outside_range(round_number: int) -> None:
    with pytest.raises(ConfigError, match=f"round={round_number} must be in 1..rounds={ROUNDS}"):
        _manifest(round=round_number)


def test_round_bounds_inclusive() -> None:
    assert _manifest(round=1).round == 1
    assert _manifest(round=ROUNDS).round == ROUNDS
    with pytest.raises(ConfigError, match="rounds=0"):
        _manifest(round=1, rounds=0)


def test_top_k_sensitivity_mismatch() -> None:
    # Privacy calibrated for top_k=2 (L2 sqrt 2, L1 2) but the manifest asks for 3 or 1 votes.
    for top_k in (1, 3):
        with pytest.raises(ConfigError, match="sensitivities"):
            _manifest(top_k=top_k, privacy=_privacy(top_k=2))
    # L2 right but L1 wrong.
    bad = dataclasses.replace(_privacy(top_k=2), l1_sensitivity=math.sqrt(2))
    with pytest.raises(ConfigError, match="sensitivities"):
        _manifest(top_k=2, privacy=bad)
    # Matching sensitivities for another top_k are accepted.
    assert _manifest(top_k=3, privacy=_privacy(top_k=3)).top_k == 3


def test_duplicate_node_ids() -> None:
    with pytest.raises(ConfigError, match="duplicates"):
        _manifest(node_ids=(1, 2, 3, 2))


def test_threshold_exceeds_participants() -> None:
    with pytest.raises(ConfigError, match="threshold t=5 exceeds K=4"):
        _manifest(privacy=_privacy(threshold=5))
    with pytest.raises(ConfigError, match="threshold t=3 exceeds K=2"):
        _manifest(node_ids=(1, 2))
    assert _manifest(privacy=_privacy(threshold=4)).privacy.threshold == 4


def test_bits_too_small() -> None:
    # K * max_records * top_k = 4 * 10_000 * 2 = 80_000 > 2^15.
    with pytest.raises(ConfigError, match="bits=16 too small"):
        _manifest(bits=16, max_records=10_000)
    # Fits at 32 bits.
    assert _manifest(bits=32, max_records=10_000).bits == 32
    # Outside the supported field sizes altogether.
    with pytest.raises(ConfigError, match="bits=8"):
        _manifest(bits=8)
    with pytest.raises(ConfigError, match="bits=65"):
        _manifest(bits=65)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"pe_task_id": ""}, "pe_task_id"),
        ({"pe_task_id": "a/b"}, "pe_task_id"),
        ({"version": "pe-2"}, "version"),
        ({"embedding_dim": 0}, "embedding_dim=0"),
        ({"labels": ()}, "labels"),
        ({"labels": ("a", "a")}, "labels"),
        ({"top_k": 4, "per_label": 3}, "top_k=4"),
        ({"deadline_s": 0.0}, "deadline_s"),
        ({"max_records": 0}, "max_records=0"),
    ],
)
def test_other_validation(overrides: dict[str, Any], match: str) -> None:
    if "top_k" in overrides:
        overrides = dict(overrides, privacy=_privacy(top_k=overrides["top_k"]))
    with pytest.raises(ConfigError, match=match):
        _manifest(**overrides)


# ---------------------------------------------------------------- derived values


def test_task_id_and_secagg_config() -> None:
    manifest = _manifest(pe_task_id="pe-xyz", round=3)
    assert manifest.task_id == "pe-xyz/round-3"
    assert _manifest(pe_task_id="pe-xyz", round=1).task_id == "pe-xyz/round-1"
    assert manifest.dim == len(LABELS) * 3
    assert manifest.model_fingerprint == manifest.embedder_fingerprint
    config = manifest.secagg_config()
    assert config.session_id == "pe-xyz/round-3"
    assert config.dim == manifest.dim
    assert tuple(config.node_ids) == NODES
    assert config.threshold == 3
    assert config.bits == 32


def test_check_candidates() -> None:
    candidates = _candidates()
    manifest = _manifest()
    manifest.check_candidates(candidates)  # matches
    manifest.check_candidates(candidates.copy())
    with pytest.raises(ShapeError, match="shape"):
        manifest.check_candidates(candidates[:-1])
    with pytest.raises(ShapeError, match="shape"):
        manifest.check_candidates(candidates[:, :-1])
    with pytest.raises(ShapeError, match="shape"):
        manifest.check_candidates(candidates.reshape(-1))
    changed = candidates.copy()
    changed[2, 5] += 1e-3
    with pytest.raises(ConfigError, match="candidates_sha256 mismatch"):
        manifest.check_candidates(changed)
    # Same values, other dtype: another hash.
    with pytest.raises(ConfigError, match="candidates_sha256 mismatch"):
        manifest.check_candidates(candidates.astype(np.float64))


def test_same_task_terms() -> None:
    base = _manifest(round=1)
    # Another round of the same task, with other candidates: same terms.
    later = _manifest(round=4, candidates_sha256=array_sha256(_candidates(seed=9)))
    assert base.same_task_terms(later)
    assert later.same_task_terms(base)
    assert base.same_task_terms(base)
    different = [
        _manifest(pe_task_id="pe-task-2"),
        _manifest(rounds=ROUNDS + 1),
        _manifest(privacy=dataclasses.replace(_privacy(), epsilon=3.0)),
        _manifest(privacy=dataclasses.replace(_privacy(), total_variance=1.0)),
        _manifest(embedder_fingerprint="sha256:" + "cd" * 32),
        _manifest(labels=("neg", "pos")),
        _manifest(top_k=1, privacy=_privacy(top_k=1)),
    ]
    for other in different:
        assert not base.same_task_terms(other)
        assert not other.same_task_terms(base)


# ---------------------------------------------------------------- encode / decode


def _votes(manifest: PERoundManifest, n_clients: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 50, size=manifest.dim).astype(np.int64) for _ in range(n_clients)]


def _noise_manifest(mode: str, epsilon: float = 1.0, per_label: int = 400) -> PERoundManifest:
    privacy = _privacy(mode=mode, epsilon=epsilon, top_k=2)
    return _manifest(
        per_label=per_label,
        candidates_sha256=array_sha256(_candidates(per_label)),
        privacy=privacy,
    )


def test_encode_decode_exact_without_noise() -> None:
    for mode in ("distributed", "central", "local"):
        privacy = PrivacySpec(
            epsilon=math.inf,
            delta=DELTA,
            mode=mode,
            threshold=3,
            total_variance=0.0,
            noise_multiplier=0.0,
            l2_sensitivity=math.sqrt(2),
            l1_sensitivity=2.0,
            accountant="none",
            adjacency=PE_ADJACENCY,
        )
        manifest = _manifest(privacy=privacy)
        votes = _votes(manifest, 4)
        rng = np.random.default_rng(1)
        encoded = [encode_votes(v, manifest=manifest, rng=rng) for v in votes]
        for enc, v in zip(encoded, votes, strict=True):
            assert enc.dtype == np.uint64
            np.testing.assert_array_equal(from_field(enc, bits=manifest.bits), v)
        total = field_sum(encoded, bits=manifest.bits)
        hist = decode_histogram(total, manifest=manifest, survivors=4, rng=rng)
        np.testing.assert_array_equal(hist, np.sum(votes, axis=0).astype(np.float64))


def test_encode_decode_distributed_noise() -> None:
    manifest = _noise_manifest("distributed")
    votes = _votes(manifest, 4)
    rng = np.random.default_rng(2)
    encoded = [encode_votes(v, manifest=manifest, rng=rng) for v in votes]
    total = field_sum(encoded, bits=manifest.bits)
    # Distributed mode: the coordinator adds nothing, no rng needed.
    hist = decode_histogram(total, manifest=manifest, survivors=4)
    noise = hist - np.sum(votes, axis=0)
    assert np.all(noise == np.round(noise))  # integer Skellam noise
    # 4 survivors, each adding total_variance / t with t = 3.
    expected_var = manifest.privacy.total_variance * 4 / 3
    assert manifest.dim == 800
    assert float(noise.mean()) == pytest.approx(0.0, abs=4 * math.sqrt(expected_var / 800))
    assert float(noise.var()) == pytest.approx(expected_var, rel=0.15)
    # Each client's own encoding carries its share only.
    own = from_field(encoded[0], bits=manifest.bits) - votes[0]
    assert float(own.var()) == pytest.approx(manifest.privacy.total_variance / 3, rel=0.15)


def test_encode_decode_local_noise() -> None:
    manifest = _noise_manifest("local")
    votes = _votes(manifest, 4)
    rng = np.random.default_rng(3)
    encoded = [encode_votes(v, manifest=manifest, rng=rng) for v in votes]
    hist = decode_histogram(field_sum(encoded, bits=manifest.bits), manifest=manifest, survivors=4)
    noise = hist - np.sum(votes, axis=0)
    assert float(noise.var()) == pytest.approx(manifest.privacy.total_variance * 4, rel=0.15)


def test_encode_decode_central_noise() -> None:
    manifest = _noise_manifest("central")
    votes = _votes(manifest, 4)
    rng = np.random.default_rng(4)
    encoded = [encode_votes(v, manifest=manifest, rng=rng) for v in votes]
    # Clients add no noise in central mode.
    for enc, v in zip(encoded, votes, strict=True):
        np.testing.assert_array_equal(from_field(enc, bits=manifest.bits), v)
    total = field_sum(encoded, bits=manifest.bits)
    with pytest.raises(ConfigError, match="rng"):
        decode_histogram(total, manifest=manifest, survivors=4)
    hist = decode_histogram(total, manifest=manifest, survivors=4, rng=np.random.default_rng(5))
    noise = hist - np.sum(votes, axis=0)
    assert not np.all(noise == np.round(noise))  # Gaussian, not integer
    assert float(noise.std()) == pytest.approx(math.sqrt(manifest.privacy.total_variance), rel=0.1)


def test_encode_votes_errors() -> None:
    manifest = _manifest()
    rng = np.random.default_rng(0)
    with pytest.raises(ShapeError, match="votes shape"):
        encode_votes(np.zeros(manifest.dim + 1, dtype=np.int64), manifest=manifest, rng=rng)
    with pytest.raises(ShapeError, match="votes shape"):
        encode_votes(np.zeros((1, manifest.dim), dtype=np.int64), manifest=manifest, rng=rng)
    # 2^31 / 4 clients = 2^29: a count that large could wrap the field when summed.
    huge = np.zeros(manifest.dim, dtype=np.int64)
    huge[0] = 2**29
    with pytest.raises(FieldRangeError, match="bits=32"):
        encode_votes(huge, manifest=manifest, rng=rng)


def _field(manifest: PERoundManifest, values: np.ndarray) -> np.ndarray:
    return to_field(values.astype(np.int64), bits=manifest.bits)


@pytest.mark.parametrize("mode", ["distributed", "local", "central"])
def test_decode_refuses_out_of_range(mode: str) -> None:
    privacy = _privacy(mode=mode, epsilon=4.0, top_k=2)
    manifest = _manifest(privacy=privacy)
    survivors = 3
    per_client = (
        privacy.total_variance / privacy.threshold
        if mode == "distributed"
        else privacy.total_variance
    )
    noise_std = math.sqrt(per_client * survivors) if mode != "central" else 0.0
    upper = survivors * manifest.max_records * manifest.top_k + 40.0 * noise_std + 1.0
    lower = -(40.0 * noise_std + 1.0)
    rng = np.random.default_rng(0)
    ok = np.zeros(manifest.dim)
    ok[0], ok[1] = math.floor(upper), math.ceil(lower)
    hist = decode_histogram(_field(manifest, ok), manifest=manifest, survivors=survivors, rng=rng)
    assert hist.shape == (manifest.dim,)
    for bad_value in (math.floor(upper) + 2, math.ceil(lower) - 2, 2**30, -(2**30)):
        bad = np.zeros(manifest.dim)
        bad[3] = bad_value
        with pytest.raises(FieldRangeError, match="outside the range"):
            decode_histogram(_field(manifest, bad), manifest=manifest, survivors=survivors, rng=rng)
    # The bound depends on the survivors: what 3 clients can produce, 1 cannot.
    big = np.zeros(manifest.dim)
    big[0] = math.floor(upper)
    with pytest.raises(FieldRangeError):
        decode_histogram(_field(manifest, big), manifest=manifest, survivors=1, rng=rng)


def test_decode_wrong_shape() -> None:
    manifest = _manifest()
    with pytest.raises(ShapeError, match="sum shape"):
        decode_histogram(
            _field(manifest, np.zeros(manifest.dim + 2)), manifest=manifest, survivors=4
        )
