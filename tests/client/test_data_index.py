"""The holder's data index: a setup reads the data file once per version of it.

Reading and validating the whole file at every setup made the reply time grow with the file's
size, for free and as often as a coordinator asked. These tests pin what replaces it: the counts
are those of a full validation, a settled file is never read again until it changes, a changed
or unsettled file is, and nothing malformed or damaged is trusted.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from fedsynth.client import data as data_module
from fedsynth.client import data_index
from fedsynth.client.contributor import Contributor
from fedsynth.client.data import count_records
from fedsynth.client.data_index import DataIndex, LabelCounts, index_path_for
from fedsynth.client.policy import ClientPolicy
from fedsynth.client.settings import ClientSettings
from fedsynth.protocol.errors import BudgetStoreError, DataFileError, PolicyViolationError


def write(path: Path, labels: Sequence[str]) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i, label in enumerate(labels):
            handle.write(json.dumps({"text": f"record {i}", "label": label}) + "\n")
    return path


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every full read of a data file the index makes; files count as settled at once."""
    seen: list[Path] = []
    real = data_index.label_counts

    def counting(path: Path, **kwargs: Any) -> LabelCounts:
        seen.append(Path(path))
        return real(path, **kwargs)

    monkeypatch.setattr(data_index, "label_counts", counting)
    monkeypatch.setattr(data_index, "SETTLED_NS", 0)
    monkeypatch.setattr(data_index, "_MEMORY", {})
    return seen


def counts(index: DataIndex, path: Path) -> LabelCounts:
    return index.counts(path, text_field="text", label_field="label")


def test_counts_are_those_of_a_full_validation_for_every_label_set(tmp_path: Path) -> None:
    labels = ["a"] * 7 + ["b"] * 3 + ["c"] * 5 + ["7"] * 2
    path = write(tmp_path / "d.jsonl", labels)
    found = counts(DataIndex(None), path)
    assert found.total == len(labels)
    for task_labels in (("a",), ("a", "b"), ("b", "c", "zzz"), ("zzz",), ("a", "b", "c", "7")):
        expected = count_records(path, labels=task_labels, skip_unknown_labels=True)
        assert found.of(task_labels) == expected


def test_a_settled_file_is_read_once_then_looked_up(tmp_path: Path, reads: list[Path]) -> None:
    path = write(tmp_path / "d.jsonl", ["a", "b", "a"])
    store = tmp_path / "node" / "budget.data-index.sqlite"
    first = counts(DataIndex(store), path)
    assert reads == [path]
    for _ in range(3):  # a new index object, as a fresh ClientApp process would make
        assert counts(DataIndex(store), path).counts == first.counts
    assert reads == [path]
    assert stat.S_IMODE(store.stat().st_mode) == 0o600


def test_a_changed_file_is_read_again(tmp_path: Path, reads: list[Path]) -> None:
    path = write(tmp_path / "d.jsonl", ["a", "b", "a"])
    store = tmp_path / "idx.sqlite"
    assert counts(DataIndex(store), path).of(("a",)) == 2
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": "one more", "label": "a"}) + "\n")
    assert counts(DataIndex(store), path).of(("a",)) == 3
    assert len(reads) == 2
    # Same size, same times: a rewrite that only the inode tells apart is still a new version.
    replacement = write(tmp_path / "other.jsonl", ["b", "b", "b", "b"])
    st = path.stat()
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, path)
    assert counts(DataIndex(store), path).of(("a",)) == 0
    assert len(reads) == 3


def test_an_unsettled_file_is_read_at_every_setup(
    tmp_path: Path, reads: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file touched within the last two seconds could be rewritten within one clock tick
    without changing its identity, so it is not indexed yet."""
    monkeypatch.setattr(data_index, "SETTLED_NS", 2_000_000_000)
    path = write(tmp_path / "d.jsonl", ["a"])
    for _ in range(3):
        counts(DataIndex(None), path)
    assert len(reads) == 3


def test_a_file_changed_while_it_was_read_is_not_indexed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: list[Path]
) -> None:
    path = write(tmp_path / "d.jsonl", ["a", "b"])
    real = data_index.label_counts

    def racing(p: Path, **kwargs: Any) -> LabelCounts:
        found = real(p, **kwargs)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"text": "late", "label": "a"}) + "\n")
        return found

    monkeypatch.setattr(data_index, "label_counts", racing)
    assert counts(DataIndex(None), path).total == 2
    monkeypatch.setattr(data_index, "label_counts", real)
    assert counts(DataIndex(None), path).total == 3  # read again, not the stale 2


def test_a_malformed_file_is_refused_alike_at_every_setup_and_read_once(
    tmp_path: Path, reads: list[Path]
) -> None:
    """The refusal is kept with the file's version, so a coordinator timing it learns no more
    than from an answer; a fixed file is read again (a new version)."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n{"text": "", "label": "a"}\n')
    store = tmp_path / "idx.sqlite"
    messages = []
    for _ in range(3):
        with pytest.raises(DataFileError, match="empty or whitespace-only") as info:
            counts(DataIndex(store), path)
        messages.append(str(info.value))
    assert len(reads) == 1 and len(set(messages)) == 1
    path.write_text('{"text": "fine", "label": "a"}\n{"text": "also fine", "label": "b"}\n')
    assert counts(DataIndex(store), path).total == 2
    assert len(reads) == 2
    with pytest.raises(DataFileError, match="not found"):  # a missing file is never indexed
        counts(DataIndex(store), tmp_path / "missing.jsonl")


def test_a_damaged_or_foreign_index_is_refused_not_guessed(
    tmp_path: Path, reads: list[Path]
) -> None:
    path = write(tmp_path / "d.jsonl", ["a"])
    store = tmp_path / "idx.sqlite"
    counts(DataIndex(store), path)
    with sqlite3.connect(store) as db:
        db.execute("""UPDATE counts SET counts = '{"counts": {"a": -5}}'""")
    with pytest.raises(BudgetStoreError, match="damaged entry"):
        counts(DataIndex(store), path)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(BudgetStoreError, match=r"data index .* is unusable"):
        counts(DataIndex(foreign), path)


def test_the_index_lives_beside_the_budget_store() -> None:
    assert index_path_for(None) is None
    assert index_path_for(Path("/n/budget.sqlite")) == Path("/n/budget.data-index.sqlite")


def test_a_setup_does_not_read_a_settled_file_again(
    tmp_path: Path, reads: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder's setup path: the count of the task's labels, every record for the holder's
    cap, and no second read of the file for a second task (the timing that grew with it)."""
    opened: list[Path] = []
    real_stream = data_module._stream

    def stream(file: Path, *args: Any, **kwargs: Any) -> Any:
        opened.append(file)
        return real_stream(file, *args, **kwargs)

    monkeypatch.setattr(data_module, "_stream", stream)
    path = write(tmp_path / "d.jsonl", ["a"] * 4 + ["b"] * 2 + ["zzz"] * 3)
    budget = tmp_path / "node" / "budget.sqlite"

    def holder(policy: ClientPolicy) -> Contributor:
        settings = ClientSettings(data_path=path, budget_path=budget, policy=policy)
        return Contributor(settings, node_id=1, model_loader=lambda: None)  # type: ignore[arg-type,return-value]

    first = holder(ClientPolicy())
    assert first.record_count(("a", "b")) == 6
    assert first.file_records == 9
    second = holder(ClientPolicy(max_records=8))
    assert second.record_count(("b",)) == 2
    # Every record counts against the cap, whatever the task's labels, read from the index.
    with pytest.raises(PolicyViolationError, match="9 records exceed"):
        second.check_file_size()
    assert opened == [path]  # one pass over the file for two setups
    assert reads == [path]
