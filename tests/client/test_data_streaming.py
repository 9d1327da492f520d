"""Streaming reads of a data file: the same records and the same errors as loading it whole."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedsynth.client.data import (
    MAX_REPORTED_PROBLEMS,
    count_records,
    iter_record_batches,
    load_records,
)
from fedsynth.protocol.errors import ConfigError, DataFileError, FedSynthError, UnknownLabelError


def jsonl(path: Path, n: int, label: str = "a") -> Path:
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": label}) + "\n" for i in range(n)))
    return path


def csv_file(path: Path, n: int) -> Path:
    path.write_text("text,label\n" + "".join(f'"line {i}\nwrapped",{i % 3}\n' for i in range(n)))
    return path


def parquet(path: Path, n: int) -> Path:
    pq.write_table(
        pa.table({"text": [f"t{i}" for i in range(n)], "label": [i % 2 for i in range(n)]}),
        path,
        row_group_size=7,
    )
    return path


@pytest.mark.parametrize("make", [jsonl, csv_file, parquet])
def test_batches_hold_the_records_of_load_records_in_order(tmp_path: Path, make: object) -> None:
    path = make(tmp_path / f"d.{make.__name__.replace('_file', '')}", 23)  # type: ignore[operator]
    batches = list(iter_record_batches(path, batch_size=5))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert [r for b in batches for r in b] == load_records(path)
    assert count_records(path) == 23


def _error_of(call: object) -> tuple[type, str]:
    with pytest.raises(FedSynthError) as info:
        call()  # type: ignore[operator]
    return type(info.value), str(info.value)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("bad.jsonl", b'{"text": "ok", "label": "a"}\n{"text": "", "label": "a"}\nnot json\n'),
        ("labels.jsonl", b'{"text": "ok", "label": "a"}\n{"text": "x", "label": "zzz"}\n'),
        ("mixed.jsonl", b'{"text": "x", "label": "zzz"}\n{"text": 3, "label": "a"}\n'),
        ("many.jsonl", b'{"text": "", "label": "a"}\n' * (MAX_REPORTED_PROBLEMS + 7)),
        ("empty.jsonl", b"\n\n"),
        ("utf8.csv", b"text,label\nok,a\nfine,a\n\xe2\x82 price,a\n"),
        ("bom.csv", b"\xef\xbb\xbftext,label\nok,a\n\xa3,a\n"),
        ("header.csv", b"body,label\nx,a\n"),
        ("fields.csv", b"text,label\nok,a\none,two,three\n"),
    ],
)
def test_streaming_raises_what_load_records_raises(
    tmp_path: Path, name: str, content: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    expected = _error_of(lambda: load_records(path, labels=["a"]))
    assert _error_of(lambda: count_records(path, labels=["a"])) == expected
    assert (
        _error_of(lambda: list(iter_record_batches(path, labels=["a"], batch_size=1))) == expected
    )


def test_invalid_utf8_names_the_byte_of_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    content = b"\xef\xbb\xbftext,label\nok,a\n\xe2\x82 price,a\n"
    path.write_bytes(content)
    with pytest.raises(DataFileError) as info:
        count_records(path)
    offset = content.index(b"\xe2\x82")
    assert f"line 3: not valid UTF-8 (invalid continuation byte at byte {offset})" in str(
        info.value
    )


def test_the_error_comes_after_the_valid_batches_before_it(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "d.jsonl", 10)
    with path.open("a") as handle:
        handle.write('{"text": "late", "label": "b"}\n')
    batches = iter_record_batches(path, labels=["a"], batch_size=4)
    assert len(next(batches)) == 4
    assert len(next(batches)) == 4
    assert len(next(batches)) == 2
    with pytest.raises(UnknownLabelError, match="line 11: unknown label 'b'"):
        next(batches)


def test_parquet_missing_column_and_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["ok"]}), path)
    with pytest.raises(DataFileError, match=r"lacks column\(s\) \['label'\]; found columns"):
        count_records(path)
    path.write_bytes(b"garbage")
    with pytest.raises(DataFileError, match="unreadable Parquet file"):
        count_records(path)


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_a_bad_batch_size_is_refused_at_the_call(tmp_path: Path, size: object) -> None:
    path = jsonl(tmp_path / "d.jsonl", 3)
    with pytest.raises(ConfigError, match=f"batch_size must be an integer >= 1, got {size!r}"):
        iter_record_batches(path, batch_size=size)  # type: ignore[arg-type]


def test_a_missing_file_is_refused_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="not found"):
        iter_record_batches(tmp_path / "absent.jsonl")


def test_every_bad_row_is_counted_though_only_the_first_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "x", "label": "zzz"}\n' + b'{"text": "", "label": "a"}\n' * 30)
    with pytest.raises(DataFileError) as info:
        count_records(path, labels=["a"])
    message = str(info.value)
    header = f"31 malformed row(s); allowed labels are ['a']; first {MAX_REPORTED_PROBLEMS}:"
    assert header in message
    assert "line 1: unknown label 'zzz'" in message
    assert f"line {MAX_REPORTED_PROBLEMS}: " in message
    assert f"line {MAX_REPORTED_PROBLEMS + 1}: " not in message
    assert f"... and {31 - MAX_REPORTED_PROBLEMS} more" in message
