"""A holder's contribution streams its data file: memory grows with the batch, not the records.

The feature extractor is replaced by a deterministic fake (features depend only on the text), so
the streamed contribution can be compared bit for bit with the materialising computation (all
records loaded, all features extracted, one call of ``integer_class_sums``) on the same seed.
"""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import RecordDict
from manifests import FINGERPRINT, make_manifest

from fedsynth.client import contributor as contributor_module
from fedsynth.client.contributor import STREAM_BATCHES, Contributor
from fedsynth.client.data import load_records
from fedsynth.client.policy import ClientPolicy
from fedsynth.client.settings import ClientSettings
from fedsynth.protocol.codec import from_field
from fedsynth.protocol.contribution import encode_contribution, integer_class_sums
from fedsynth.protocol.errors import DataFileError, PolicyViolationError
from fedsynth.protocol.features import FeatureSpec, clip_to_unit
from fedsynth.protocol.manifest import TaskManifest, array_sha256
from fedsynth.protocol.messages import vector_to_bytes

HIDDEN = 16
LAYERS = (0, 1)
BATCH = 4  # forward batch; a chunk read from the file is STREAM_BATCHES * BATCH records
CHUNK = STREAM_BATCHES * BATCH
SEED = 11
NODE = 1


def reference() -> np.ndarray:
    return np.random.default_rng(5).normal(size=(2, len(LAYERS), HIDDEN)).astype(np.float32)


def manifest(**changes: Any) -> TaskManifest:
    return dataclasses.replace(
        make_manifest(),
        hidden_size=HIDDEN,
        layers=LAYERS,
        clip_norms=(3.0, 4.0),
        residual_norms=(1.0, 1.0),
        reference_sha256=array_sha256(reference()),
        **changes,
    )


def fake_features(
    _loaded: Any, texts: Sequence[str], labels: Sequence[str], spec: FeatureSpec
) -> tuple[np.ndarray, np.ndarray]:
    """(n, L, H) features that depend on each text alone.

    A "loud" text's feature mostly exceeds its clip norm (its rounded row is often redrawn), a
    "quiet" one stays far inside (never redrawn).
    """
    rows = [
        np.random.default_rng(zlib.crc32(text.encode())).normal(size=(len(LAYERS), HIDDEN))
        * (0.1 if text.startswith("quiet") else 1.2)
        for text in texts
    ]
    features = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 2, HIDDEN))
    return features, np.ones((len(texts), len(LAYERS)), dtype=np.float32)


@pytest.fixture
def fake_extractor(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Install the fake extractor in the holder's module; returns the size of every call."""
    calls: list[int] = []

    def counting(
        loaded: Any, texts: Sequence[str], labels: Sequence[str], spec: FeatureSpec, **_: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        assert spec.batch_size == BATCH
        calls.append(len(texts))
        return fake_features(loaded, texts, labels, spec)

    monkeypatch.setattr(contributor_module, "extract_features", counting)
    return calls


def write_records(
    path: Path, n: int, labels: Sequence[str] = ("a", "b"), *, word: str = "loud"
) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(json.dumps({"text": f"{word} {i}", "label": labels[i % len(labels)]}))
            handle.write("\n")
    return path


def holder(path: Path, policy: ClientPolicy | None = None) -> Contributor:
    settings = ClientSettings(
        data_path=path, batch_size=BATCH, seed=SEED, policy=policy or ClientPolicy()
    )
    loaded = SimpleNamespace(name="fake", fingerprint=FINGERPRINT, hidden_size=HIDDEN)
    return Contributor(settings, node_id=NODE, model_loader=lambda: loaded)  # type: ignore[arg-type,return-value]


def streamed(path: Path, task: TaskManifest, policy: ClientPolicy | None = None) -> np.ndarray:
    payload = vector_to_bytes(reference().reshape(-1))
    return holder(path, policy).contribution(task, payload, RecordDict())


def materialised(path: Path, task: TaskManifest) -> np.ndarray:
    """The contribution as computed before streaming: every record and feature at once."""
    records = load_records(path, labels=task.labels)
    texts, labels = [r.text for r in records], [r.label for r in records]
    features, _ = fake_features(None, texts, labels, task.feature_spec)
    rng = holder(path).rng(task.task_id)  # the seeded holder's own generator
    sums = integer_class_sums(features, labels, manifest=task, reference=reference(), rng=rng)
    return encode_contribution(sums, manifest=task, rng=rng)


# ---------------------------------------------------------------------------------------------
# Same result as the materialising computation
# ---------------------------------------------------------------------------------------------


def test_a_file_within_one_chunk_gives_the_materialised_contribution(
    tmp_path: Path, fake_extractor: list[int]
) -> None:
    path = write_records(tmp_path / "d.jsonl", CHUNK - 3)
    task = manifest()
    assert np.array_equal(streamed(path, task), materialised(path, task))
    assert fake_extractor == [CHUNK - 3]


def test_many_chunks_of_one_label_give_the_materialised_contribution(
    tmp_path: Path, fake_extractor: list[int]
) -> None:
    # One label and no re-rounding: the rng draws come in the same order however the records
    # are batched, so the streamed field vector equals the materialised one exactly.
    n = 5 * CHUNK + 7
    path = write_records(tmp_path / "d.jsonl", n, labels=("a",), word="quiet")
    task = manifest()
    out = streamed(path, task)
    assert np.array_equal(out, materialised(path, task))
    assert fake_extractor == [CHUNK] * 5 + [7]


def test_many_chunks_of_two_labels_sum_every_record_once_within_rounding(
    tmp_path: Path, fake_extractor: list[int]
) -> None:
    # The draws interleave differently across classes, so only the distribution is the same:
    # every coordinate is within one rounding unit per record of the exact scaled sum, the
    # counts are exact, and the rounding errors average out (unbiased).
    n = 4 * CHUNK + 9
    path = write_records(tmp_path / "d.jsonl", n)
    task = manifest(privacy=dataclasses.replace(manifest().privacy, mode="central"))
    out = from_field(streamed(path, task), bits=task.bits).reshape(2, task.row_dim)
    ref = from_field(materialised(path, task), bits=task.bits).reshape(2, task.row_dim)
    records = load_records(path)
    texts, labels = [r.text for r in records], [r.label for r in records]
    features, _ = fake_features(None, texts, labels, task.feature_spec)
    clip = np.asarray(task.clip_norms)
    exact = np.zeros((2, task.row_dim))
    for c, label in enumerate(task.labels):
        members = features[[lab == label for lab in labels]]
        unit = clip_to_unit(members - reference()[c][None], clip).reshape(len(members), -1)
        exact[c, :-1] = unit.sum(axis=0) * task.scale
        exact[c, -1] = len(members) * task.count_weight * task.scale
        assert np.all(np.abs(out[c] - exact[c]) <= len(members))
    assert np.array_equal(out[:, -1], ref[:, -1])
    assert np.array_equal(out[:, -1], exact[:, -1])
    # Each coordinate's error sums n/2 independent zero-mean roundings of variance <= 1/4.
    errors = (out - exact)[:, :-1]
    assert abs(errors.mean()) < 5 * np.sqrt(n / 2 / 4) / np.sqrt(errors.size)
    assert max(fake_extractor) == CHUNK


# ---------------------------------------------------------------------------------------------
# Memory: bounded by the chunk, whatever the number of records
# ---------------------------------------------------------------------------------------------


def test_features_are_never_extracted_for_more_than_a_chunk(
    tmp_path: Path, fake_extractor: list[int]
) -> None:
    n = 10 * CHUNK + 1
    streamed(write_records(tmp_path / "d.jsonl", n), manifest())
    assert max(fake_extractor) <= CHUNK
    assert sum(fake_extractor) == n  # every record once


def _peak_bytes(path: Path, task: TaskManifest) -> int:
    contributor = holder(path)
    payload = vector_to_bytes(reference().reshape(-1))
    tracemalloc.start()
    try:
        contributor.contribution(task, payload, RecordDict())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def test_peak_memory_does_not_grow_with_the_number_of_records(
    tmp_path: Path, fake_extractor: list[int]
) -> None:
    task = manifest()
    small = _peak_bytes(write_records(tmp_path / "small.jsonl", 3 * CHUNK), task)
    large = _peak_bytes(write_records(tmp_path / "large.jsonl", 30 * CHUNK), task)
    # Materialising 10x the records would need about 10x the memory (records, features and
    # their float64 copies); streaming keeps one chunk alive.
    assert large < 1.3 * small, (small, large)


# ---------------------------------------------------------------------------------------------
# Validation still covers the whole file, and a late failure contributes nothing
# ---------------------------------------------------------------------------------------------


def test_a_malformed_row_after_many_chunks_contributes_nothing(
    tmp_path: Path, fake_extractor: list[int]
) -> None:
    path = write_records(tmp_path / "d.jsonl", 3 * CHUNK)
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"text": "", "label": "a"}\n')
    with pytest.raises(DataFileError, match=f"line {3 * CHUNK + 1}: field 'text' is empty"):
        streamed(path, manifest())
    assert sum(fake_extractor) == 3 * CHUNK  # streamed, then refused at the end of the file


def test_a_foreign_label_after_many_chunks_is_left_out(
    tmp_path: Path, fake_extractor: list[int]
) -> None:
    """A record of a label the task omits is left out wherever it lies (refusing would tell
    the coordinator the file holds that label); the contribution is the one without it."""
    path = write_records(tmp_path / "d.jsonl", 2 * CHUNK + 5)
    without = streamed(path, manifest())
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"text": "late", "label": "zzz"}\n')
    np.testing.assert_array_equal(streamed(path, manifest()), without)


def test_a_file_with_only_omitted_labels_contributes_only_noise(
    tmp_path: Path, fake_extractor: list[int]
) -> None:
    """Every record left out: the holder still takes part (a refusal would tell the coordinator
    its file holds none of the task's labels) and its vector is its noise share alone."""
    path = write_records(tmp_path / "d.jsonl", 7, labels=("zzz",))
    task = manifest()
    assert holder(path).record_count(task.labels) == 0
    noise_only = from_field(streamed(path, task), bits=task.bits)
    assert noise_only.shape == (task.dim,)
    assert np.any(noise_only != 0)  # the noise share is there


def test_more_records_than_the_holders_cap_are_refused_at_contribution(
    tmp_path: Path, fake_extractor: list[int]
) -> None:
    path = write_records(tmp_path / "d.jsonl", 2 * CHUNK + 1)
    with pytest.raises(PolicyViolationError, match=f"{2 * CHUNK + 1} records exceed"):
        streamed(path, manifest(), ClientPolicy(max_records=2 * CHUNK))
    assert streamed(path, manifest(), ClientPolicy(max_records=2 * CHUNK + 1)).shape == (
        manifest().dim,
    )


def test_a_file_that_changed_since_setup_is_refused(
    tmp_path: Path, fake_extractor: list[int]
) -> None:
    path = write_records(tmp_path / "d.jsonl", CHUNK + 2)
    contributor = holder(path)
    task = manifest()
    assert contributor.record_count(task.labels) == CHUNK + 2
    write_records(path, CHUNK + 3)
    with pytest.raises(DataFileError, match="changed while this task ran"):
        contributor.contribution(task, vector_to_bytes(reference().reshape(-1)), RecordDict())
