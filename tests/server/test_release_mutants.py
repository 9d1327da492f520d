"""Edges of the release file (digest, report/manifest check, load/save) that mutation testing
showed untested.

The digest is checked against an independent computation of the documented layout (every
part named and length-prefixed, tensors as little-endian float32 / float64 with their shapes),
so a file written by another implementation of the format verifies, and a change of the
layout that save and load would both make cannot pass unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from fedsynth.protocol.contribution import DecodedRelease
from fedsynth.protocol.errors import ConfigError, ReleaseIntegrityError
from fedsynth.protocol.features import PromptTemplate
from fedsynth.protocol.manifest import PrivacySpec, TaskManifest, array_sha256
from fedsynth.server.release import (
    RELEASE_FORMAT,
    Release,
    check_report_matches_manifest,
    load_release,
    make_release,
    privacy_report,
    release_digest,
    save_release,
)
from fedsynth.server.secure_round import RoundResult

HIDDEN = 4
LAYERS = (1, 2)
TEMPLATE = PromptTemplate(
    instruction="A {label} review: ",
    label_names=(("pos", "positive"), ("neg", "negative")),
)


def _manifest(*, epsilon: float = 2.0, mode: str = "distributed") -> TaskManifest:
    reference = np.zeros((2, len(LAYERS), HIDDEN), dtype=np.float32)
    return TaskManifest(
        task_id="task-7",
        model_name="tiny",
        model_fingerprint="f" * 64,
        hidden_size=HIDDEN,
        template=TEMPLATE,
        layers=LAYERS,
        max_text_tokens=16,
        clip_norms=(2.0, 3.0),
        residual_norms=(5.0, 7.0),
        count_weight=0.5,
        scale=1000.0,
        bits=64,
        node_ids=(1, 2, 3),
        privacy=PrivacySpec(
            epsilon=epsilon,
            delta=1e-5,
            mode=mode,
            threshold=2,
            total_variance=0.0 if math.isinf(epsilon) else 400.0,
            noise_multiplier=1.0,
            l2_sensitivity=20.0,
            l1_sensitivity=200.0,
            accountant="rdp",
        ),
        reference_sha256=array_sha256(reference),
    )


def _release(*, epsilon: float = 2.0, vectors: np.ndarray | None = None) -> Release:
    manifest = _manifest(epsilon=epsilon)
    if vectors is None:
        vectors = np.arange(2 * len(LAYERS) * HIDDEN, dtype=np.float32).reshape(2, 2, HIDDEN)
    decoded = DecodedRelease(vectors=vectors, counts=np.array([3.5, 1.0]))
    result = RoundResult(
        field_sum=np.zeros(1, dtype=np.uint64),
        survivors=[1, 3],
        dropped=[2],
        refusals={2: "masked_input: budget", 3: "share_keys: n=12 records, spent 3.5 of 8"},
    )
    return make_release(manifest, decoded, result, model_name="tiny")


def _reference_digest(
    release_id: str, manifest_json: str, report_json: str, vectors: np.ndarray, counts: np.ndarray
) -> str:
    """The documented layout, written out independently of the code under test."""
    h = hashlib.sha256()
    parts: list[tuple[str, bytes]] = [
        ("format", b"fedsynth.release.v2"),
        ("release_id", release_id.encode("utf-8")),
        ("manifest", manifest_json.encode("utf-8")),
        ("report", report_json.encode("utf-8")),
    ]
    v = np.asarray(vectors, dtype="<f4")
    c = np.asarray(counts, dtype="<f8")
    parts += [
        ("vectors.shape", json.dumps(list(v.shape)).encode()),
        ("vectors", v.tobytes()),
        ("counts.shape", json.dumps(list(c.shape)).encode()),
        ("counts", c.tobytes()),
    ]
    for name, data in parts:
        label = name.encode("utf-8")
        h.update(len(label).to_bytes(2, "big") + label + len(data).to_bytes(8, "big") + data)
    return "sha256:" + h.hexdigest()


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="numpy") as handle:
        return dict(handle.metadata() or {})


def test_the_stored_digest_follows_the_documented_layout(tmp_path: Path) -> None:
    path = save_release(_release(), tmp_path / "r.safetensors")
    meta = _metadata(path)
    tensors = load_file(str(path))
    assert meta["format"] == RELEASE_FORMAT == "fedsynth.release.v2"
    assert meta["digest"] == _reference_digest(
        meta["release_id"], meta["manifest"], meta["report"], tensors["vectors"], tensors["counts"]
    )


def test_a_file_written_elsewhere_to_the_documented_layout_loads(tmp_path: Path) -> None:
    release = _release()
    manifest_json = release.manifest.to_json()
    report_json = json.dumps(release.report)  # key order is the writer's choice
    vectors = release.vectors.astype(np.float32)
    counts = release.counts.astype(np.float64)
    path = tmp_path / "elsewhere.safetensors"
    save_file(
        {"vectors": vectors, "counts": counts},
        str(path),
        metadata={
            "format": "fedsynth.release.v2",
            "release_id": "task-7",
            "manifest": manifest_json,
            "report": report_json,
            "digest": _reference_digest("task-7", manifest_json, report_json, vectors, counts),
        },
    )
    back = load_release(path)
    np.testing.assert_array_equal(back.vectors, vectors)
    assert back.report == release.report


def test_the_digest_separates_the_parts() -> None:
    """Moving text from the manifest part into the report part changes the digest."""
    vectors, counts = np.zeros((1, 1, 1), dtype=np.float32), np.zeros(1)
    one = release_digest(
        release_id="r", manifest_json="ab", report_json="c", vectors=vectors, counts=counts
    )
    two = release_digest(
        release_id="r", manifest_json="a", report_json="bc", vectors=vectors, counts=counts
    )
    assert one != two
    # The shapes are digested too: the same bytes in another shape are another release.
    flat = release_digest(
        release_id="r",
        manifest_json="ab",
        report_json="c",
        vectors=np.zeros((1, 1, 2), dtype=np.float32),
        counts=np.zeros(0),
    )
    tall = release_digest(
        release_id="r",
        manifest_json="ab",
        report_json="c",
        vectors=np.zeros((1, 2, 1), dtype=np.float32),
        counts=np.zeros(0),
    )
    assert flat != tall
    assert one.startswith("sha256:") and len(one) == len("sha256:") + 64


def test_saving_converts_to_the_file_dtypes_and_keeps_the_values(tmp_path: Path) -> None:
    vectors = np.linspace(-1.0, 1.0, 16).reshape(2, 2, HIDDEN)  # float64 in
    release = _release(vectors=vectors)
    release = Release(
        release_id=release.release_id,
        manifest=release.manifest,
        vectors=vectors,
        counts=np.array([3, 1]),  # integers in
        report=release.report,
    )
    back = load_release(save_release(release, tmp_path / "d.safetensors"))
    assert back.vectors.dtype == np.float32
    assert back.counts.dtype == np.float64
    np.testing.assert_array_equal(back.vectors, vectors.astype(np.float32))
    np.testing.assert_array_equal(back.counts, [3.0, 1.0])


def test_saving_again_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "again.safetensors"
    save_release(_release(), path)
    save_release(_release(epsilon=math.inf), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.safetensors"]
    assert load_release(path).report["epsilon"] == "inf"


@pytest.mark.parametrize("missing", ["release_id", "manifest", "report"])
def test_a_file_missing_a_metadata_part_names_it(tmp_path: Path, missing: str) -> None:
    good = save_release(_release(), tmp_path / "good.safetensors")
    meta = {k: v for k, v in _metadata(good).items() if k != missing}
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(good)), str(bad), metadata=meta)
    with pytest.raises(ConfigError, match=f"incomplete release file, missing {missing}"):
        load_release(bad)


@pytest.mark.parametrize("missing", ["vectors", "counts"])
def test_a_file_missing_a_tensor_names_it(tmp_path: Path, missing: str) -> None:
    good = save_release(_release(), tmp_path / "good.safetensors")
    tensors = {k: v for k, v in load_file(str(good)).items() if k != missing}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=_metadata(good))
    with pytest.raises(ConfigError, match=f"missing {missing}"):
        load_release(bad)


def test_an_empty_digest_is_no_digest(tmp_path: Path) -> None:
    good = save_release(_release(), tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(good)), str(bad), metadata={**_metadata(good), "digest": ""})
    with pytest.raises(ReleaseIntegrityError, match="no digest"):
        load_release(bad)


def test_a_digest_of_other_content_is_refused_and_not_shown_whole(tmp_path: Path) -> None:
    good = save_release(_release(), tmp_path / "good.safetensors")
    meta = _metadata(good)
    other = "sha256:" + "0" * 64
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(good)), str(bad), metadata={**meta, "digest": other})
    with pytest.raises(ReleaseIntegrityError, match="digest mismatch") as info:
        load_release(bad)
    message = str(info.value)
    assert "sha256:000000000000..." in message
    assert meta["digest"][:19] in message
    assert meta["digest"] not in message


def test_a_digested_but_unparsable_manifest_is_a_config_error(tmp_path: Path) -> None:
    good = save_release(_release(), tmp_path / "good.safetensors")
    meta = _metadata(good)
    tensors = load_file(str(good))
    manifest_json = "{not json"
    meta.update(
        manifest=manifest_json,
        digest=_reference_digest(
            meta["release_id"], manifest_json, meta["report"], tensors["vectors"], tensors["counts"]
        ),
    )
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ConfigError, match="malformed task manifest"):
        load_release(bad)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("task_id", "task-8"),
        ("epsilon", 4.0),
        ("epsilon", "inf"),
        ("delta", 1e-3),
        ("trust_mode", "central"),
        ("model_fingerprint", "e" * 64),
    ],
)
def test_each_privacy_term_of_the_report_must_equal_the_manifests(key: str, value: object) -> None:
    release = _release()
    check_report_matches_manifest("task-7", release.manifest, release.report, where="here")
    with pytest.raises(ReleaseIntegrityError, match=f"here: report {key}=") as info:
        check_report_matches_manifest(
            "task-7", release.manifest, {**release.report, key: value}, where="here"
        )
    assert repr(value) in str(info.value)


def test_a_release_id_other_than_the_task_is_refused() -> None:
    release = _release()
    with pytest.raises(
        ReleaseIntegrityError, match=r"where: release_id='task-8' differs .* task_id='task-7'"
    ):
        check_report_matches_manifest("task-8", release.manifest, release.report, where="where")


def test_an_infinite_epsilon_report_says_inf_and_matches() -> None:
    release = _release(epsilon=math.inf)
    assert release.report["epsilon"] == "inf"
    check_report_matches_manifest("task-7", release.manifest, release.report, where="x")
    with pytest.raises(ReleaseIntegrityError, match="epsilon"):
        check_report_matches_manifest(
            "task-7", release.manifest, {**release.report, "epsilon": math.inf}, where="x"
        )


def test_the_report_names_who_took_part_and_who_refused() -> None:
    report = _release().report
    assert report["K"] == 3
    assert report["survivors"] == 2
    assert report["dropped_clients"] == ["2"]
    # Only "<stage>: <category>": a holder's detailed text is never published.
    assert report["refused_or_failed"] == {"2": "masked_input: budget", "3": "share_keys: protocol"}
    assert report["model"] == "tiny"
    assert report["format"] == RELEASE_FORMAT
    # Central mode: the coordinator's noise is what the manifest states, survivors or not.
    central = privacy_report(
        _manifest(mode="central"),
        RoundResult(np.zeros(1, dtype=np.uint64), survivors=[1, 2, 3], dropped=[]),
        model_name="tiny",
    )
    assert central["noise"]["aggregate_variance_actual_scaled"] == 400.0
    assert "Gaussian" in central["mechanism"]
    assert "coordinator" in central["mechanism"]
    assert "Skellam" in _release().report["mechanism"]


def test_the_digest_is_over_the_stored_dtypes_whatever_the_callers() -> None:
    """Vectors are digested as float32 and counts as float64, the dtypes the file stores."""
    values = np.array([[[0.5, -1.25]]])
    as_stored = release_digest(
        release_id="r",
        manifest_json="m",
        report_json="r",
        vectors=values.astype(np.float32),
        counts=np.array([2.0, 3.0]),
    )
    as_held = release_digest(
        release_id="r",
        manifest_json="m",
        report_json="r",
        vectors=values,  # float64
        counts=np.array([2, 3]),  # int64
    )
    assert as_held == as_stored


def test_saving_creates_missing_parent_folders(tmp_path: Path) -> None:
    path = save_release(_release(), tmp_path / "a" / "b" / "c" / "r.safetensors")
    assert load_release(path).release_id == "task-7"


def test_load_errors_name_the_file_and_what_was_found(tmp_path: Path) -> None:
    good = save_release(_release(), tmp_path / "good.safetensors")
    meta, tensors = _metadata(good), load_file(str(good))
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other), metadata={**meta, "format": "fedsynth.release.v1"})
    with pytest.raises(ConfigError, match=r"format='fedsynth\.release\.v1', expected") as info:
        load_release(other)
    assert str(other) in str(info.value)

    partial = tmp_path / "partial.safetensors"
    kept = {k: v for k, v in meta.items() if k not in ("release_id", "report")}
    save_file(tensors, str(partial), metadata=kept)
    with pytest.raises(ConfigError, match="missing release_id, report"):
        load_release(partial)

    # A report that restates another epsilon, digested consistently: the error names the file.
    report = json.loads(meta["report"])
    report_json = json.dumps({**report, "epsilon": 0.5})
    forged = tmp_path / "forged.safetensors"
    save_file(
        tensors,
        str(forged),
        metadata={
            **meta,
            "report": report_json,
            "digest": _reference_digest(
                meta["release_id"],
                meta["manifest"],
                report_json,
                tensors["vectors"],
                tensors["counts"],
            ),
        },
    )
    with pytest.raises(ReleaseIntegrityError, match=r"epsilon=0\.5") as info:
        load_release(forged)
    assert str(info.value).startswith(f"{forged}: report")


def test_a_digest_mismatch_shows_both_prefixes_and_says_what_happened(tmp_path: Path) -> None:
    good = save_release(_release(), tmp_path / "good.safetensors")
    meta, tensors = _metadata(good), load_file(str(good))
    changed = {**tensors, "counts": tensors["counts"] + 1.0}
    bad = tmp_path / "bad.safetensors"
    save_file(changed, str(bad), metadata=meta)
    content = _reference_digest(
        meta["release_id"], meta["manifest"], meta["report"], changed["vectors"], changed["counts"]
    )
    with pytest.raises(ReleaseIntegrityError) as info:
        load_release(bad)
    message = str(info.value)
    assert f"(stored {meta['digest'][:19]}..., content {content[:19]}...)" in message
    assert "were altered after the release was written" in message


def test_an_inconsistent_release_is_refused_naming_the_target_file(tmp_path: Path) -> None:
    release = _release()
    bad = Release(
        release_id=release.release_id,
        manifest=release.manifest,
        vectors=release.vectors,
        counts=release.counts,
        report={**release.report, "delta": 0.5},
    )
    target = tmp_path / "never.safetensors"
    with pytest.raises(ReleaseIntegrityError, match=r"delta=0\.5") as info:
        save_release(bad, target)
    assert str(info.value).startswith(f"{target}: report")
    assert not target.exists()


def test_the_report_states_how_the_classes_compose() -> None:
    """The guarantee is per record across the whole release: per-layer, then parallel."""
    composition = _release().report["composition"]
    assert "per-layer composition" in composition
    assert "parallel composition across classes" in composition
    assert "whole release" in composition


def test_a_release_with_a_non_finite_vector_or_a_fifo_is_refused_before_use(
    tmp_path: Path,
) -> None:
    """Every reader (generate, inspect, the service's store) refuses them at load: a NaN
    vector would fail each use only once it had started, a FIFO would block the open."""
    vectors = np.arange(2 * len(LAYERS) * HIDDEN, dtype=np.float32).reshape(2, 2, HIDDEN)
    vectors[0, 0, 0] = np.inf
    inf = save_release(_release(vectors=vectors), tmp_path / "inf.safetensors")
    with pytest.raises(ReleaseIntegrityError, match="not finite"):
        load_release(inf)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_release(fifo)  # returns at once: the FIFO is never opened
