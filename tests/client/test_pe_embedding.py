"""The PE voter embeds its data file a chunk at a time, with the same result as all at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedsynth.client.pe_voter import embed_data_file
from fedsynth.protocol.embedding import load_embedder
from fedsynth.protocol.errors import DataFileError, UnknownLabelError


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chunks_give_the_embeddings_of_the_whole_file_in_file_order(tmp_path: Path) -> None:
    rows = [
        {"text": f"review number {i} was {'good' if i % 3 else 'bad'}", "label": "ab"[i % 2]}
        for i in range(11)
    ]
    data = _write(tmp_path / "d.jsonl", rows)
    embedder = load_embedder("hashing-64")
    chunked, labels = embed_data_file(data, ("a", "b"), embedder, chunk=3)
    whole = np.asarray(embedder.embed([r["text"] for r in rows]))
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(labels, [i % 2 for i in range(11)])
    # The task's label order decides the indices.
    _, swapped = embed_data_file(data, ("b", "a"), embedder, chunk=4)
    np.testing.assert_array_equal(swapped, [1 - i % 2 for i in range(11)])


def test_a_bad_file_is_refused_as_load_records_refuses_it(tmp_path: Path) -> None:
    embedder = load_embedder("hashing-64")
    foreign = _write(
        tmp_path / "f.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "c"}]
    )
    with pytest.raises(UnknownLabelError):
        embed_data_file(foreign, ("a", "b"), embedder, chunk=1)
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "x", "label": "a"}\nnot json\n')
    with pytest.raises(DataFileError):
        embed_data_file(broken, ("a", "b"), embedder, chunk=1)


def test_a_voter_leaves_out_the_labels_its_round_omits(tmp_path: Path) -> None:
    """A holder's vote skips records of labels the round does not list (refusing would tell
    the coordinator the file holds one); with none left it votes nothing, without an error."""
    embedder = load_embedder("hashing-64")
    mixed = _write(tmp_path / "m.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "c"}])
    vectors, labels = embed_data_file(mixed, ("a", "b"), embedder, skip_unknown_labels=True)
    np.testing.assert_allclose(vectors, np.asarray(embedder.embed(["x"])), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(labels, [0])
    foreign = _write(tmp_path / "f.jsonl", [{"text": "y", "label": "c"}])
    vectors, labels = embed_data_file(foreign, ("a", "b"), embedder, skip_unknown_labels=True)
    assert vectors.shape == (0, embedder.dim) and labels.shape == (0,)


def test_the_chunks_are_stacked_in_order_and_released_as_copied() -> None:
    """The stacked embeddings equal a concatenation; the chunk list is emptied (each chunk is
    released once copied, so the peak holds the embeddings about once, not twice)."""
    from fedsynth.client.pe_voter import _stack_releasing

    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 5)).astype(np.float32) for n in (3, 1, 4)]
    expected = np.concatenate(parts)
    stacked = _stack_releasing(parts)
    np.testing.assert_array_equal(stacked, expected)
    assert stacked.dtype == np.float32 and parts == []
