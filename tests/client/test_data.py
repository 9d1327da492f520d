from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedsynth.client.data import Record, load_records
from fedsynth.protocol.errors import ConfigError, DataFileError, UnknownLabelError

ROWS = [
    {"text": "A fine film.", "label": "positive"},
    {"text": "Dull — and too long.", "label": "negative"},
    {"text": "Ünïcödé works", "label": "positive"},
]
EXPECTED = [Record(r["text"], r["label"]) for r in ROWS]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_round_trip(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r, ensure_ascii=False) for r in ROWS])
    assert load_records(path) == EXPECTED


def test_json_suffix_is_json_lines_and_blank_lines_skipped(tmp_path: Path) -> None:
    lines = [json.dumps(ROWS[0]), "", "   ", json.dumps(ROWS[1])]
    path = write_lines(tmp_path / "d.json", lines)
    assert load_records(str(path)) == EXPECTED[:2]


def test_csv_round_trip_and_int_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text(
        'text,label\n"Hello, world",1\n"multi\nline text",0\nplain,  2 \n', encoding="utf-8"
    )
    assert load_records(path) == [
        Record("Hello, world", "1"),
        Record("multi\nline text", "0"),
        Record("plain", "2"),
    ]


def test_parquet_round_trip_with_int_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    table = pa.table({"body": ["x y", "z"], "cls": [1, 2], "extra": [0.5, 0.7]})
    pq.write_table(table, path)
    assert load_records(path, text_field="body", label_field="cls") == [
        Record("x y", "1"),
        Record("z", "2"),
    ]


def test_configurable_field_names(tmp_path: Path) -> None:
    rows = [{"review": r["text"], "sentiment": r["label"], "id": i} for i, r in enumerate(ROWS)]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    assert load_records(path, text_field="review", label_field="sentiment") == EXPECTED
    with pytest.raises(DataFileError, match="missing field 'text'"):
        load_records(path)


def test_jsonl_reports_every_bad_line(tmp_path: Path) -> None:
    lines = [
        json.dumps(ROWS[0]),  # 1 ok
        json.dumps(ROWS[1]),  # 2 ok
        '{"text": "broken", ',  # 3 invalid JSON
        json.dumps(ROWS[2]),  # 4 ok
        json.dumps({"text": "no label"}),  # 5 missing label
        json.dumps(["a", "list"]),  # 6 not an object
        json.dumps({"text": "   ", "label": "positive"}),  # 7 whitespace-only text
        json.dumps({"text": 42, "label": "positive"}),  # 8 text not a string
        json.dumps({"text": "ok", "label": ""}),  # 9 empty label
        json.dumps({"text": "x" * 21, "label": "positive"}),  # 10 too long
        json.dumps({"label": "positive"}),  # 11 missing text
        json.dumps({"text": "ok", "label": None}),  # 12 null label
    ]
    path = write_lines(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataFileError) as info:
        load_records(path, max_chars=20)
    message = str(info.value)
    assert not isinstance(info.value, UnknownLabelError)
    assert str(path) in message
    assert "9 malformed row(s)" in message
    for number, fragment in [
        (3, "invalid JSON"),
        (5, "missing field 'label'"),
        (6, "expected a JSON object"),
        (7, "empty or whitespace-only"),
        (8, "must be a string"),
        (9, "'label' is empty"),
        (10, "21 characters, more than max_chars=20"),
        (11, "missing field 'text'"),
        (12, "missing field 'label'"),
    ]:
        assert f"line {number}: " in message
        line = next(s for s in message.splitlines() if s.strip().startswith(f"line {number}:"))
        assert fragment in line
    for good in (1, 2, 4):
        assert f"line {good}:" not in message


def test_error_lists_first_20_and_total(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ["{bad"] * 25)
    with pytest.raises(DataFileError) as info:
        load_records(path)
    message = str(info.value)
    assert "25 malformed row(s)" in message
    assert "line 20:" in message
    assert "line 21:" not in message
    assert "and 5 more" in message


def test_csv_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\nfine,pos\n,neg\nalso fine,\nthree,fields,here\n", encoding="utf-8")
    with pytest.raises(DataFileError) as info:
        load_records(path)
    message = str(info.value)
    assert "line 3: field 'text' is empty" in message  # row index 1 + 2
    assert "line 4: field 'label' is empty" in message
    assert "line 5: has 3 fields, the header has 2" in message
    assert "line 2:" not in message


def test_csv_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("body,label\nx,y\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"line 1: header lacks column\(s\) \['text'\]"):
        load_records(path)


def test_parquet_row_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["ok", None, "fine"], "label": ["a", "b", None]}), path)
    with pytest.raises(DataFileError) as info:
        load_records(path)
    message = str(info.value)
    assert "row 2: missing field 'text'" in message
    assert "row 3: missing field 'label'" in message
    assert "row 1:" not in message


def test_parquet_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["ok"]}), path)
    with pytest.raises(DataFileError, match="label"):
        load_records(path)


def test_unknown_label(tmp_path: Path) -> None:
    rows = [*ROWS, {"text": "meh", "label": "neutral"}]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    assert len(load_records(path, labels=["positive", "negative", "neutral"])) == 4
    with pytest.raises(UnknownLabelError) as info:
        load_records(path, labels=("positive", "negative"))
    message = str(info.value)
    assert "'neutral'" in message
    assert "line 4" in message
    assert "'negative'" in message
    assert "'positive'" in message


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("hello\n", encoding="utf-8")
    with pytest.raises(DataFileError) as info:
        load_records(path)
    assert "'.txt'" in str(info.value)
    assert ".jsonl" in str(info.value)
    assert ".parquet" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="not found"):
        load_records(tmp_path / "absent.jsonl")


@pytest.mark.parametrize(
    ("name", "content"),
    [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.csv", ""), ("e.csv", "text,label\n")],
)
def test_empty_file(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFileError, match="no records"):
        load_records(path)


def test_empty_parquet(tmp_path: Path) -> None:
    path = tmp_path / "e.parquet"
    pq.write_table(
        pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())}), path
    )
    with pytest.raises(DataFileError, match="no records"):
        load_records(path)


def test_json_array_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    with pytest.raises(DataFileError, match="JSON array"):
        load_records(path)


def test_invalid_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"text": "\xa3", "label": "a"}\n')
    with pytest.raises(DataFileError, match="line 2: not valid UTF-8"):
        load_records(path)


def test_bad_options(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in ROWS])
    with pytest.raises(ConfigError, match="max_chars"):
        load_records(path, max_chars=0)
    with pytest.raises(ConfigError, match="labels"):
        load_records(path, labels=[])
    with pytest.raises(ConfigError, match="must differ"):
        load_records(path, text_field="x", label_field="x")


def test_csv_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\nok,a\n\xa3 price,b\n")
    with pytest.raises(DataFileError, match="line 3: not valid UTF-8"):
        load_records(path)


def test_csv_with_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\r\nfirst,a\r\n\r\nsecond,b\r\n,c\r\n")
    with pytest.raises(DataFileError) as info:
        load_records(path)
    assert "line 5: field 'text' is empty" in str(info.value)
    path.write_bytes(b"\xef\xbb\xbftext,label\r\nfirst,a\r\nsecond,b\r\n")
    assert load_records(path) == [Record("first", "a"), Record("second", "b")]


def test_record_is_frozen_hashable_and_picklable() -> None:
    import dataclasses
    import pickle

    record = Record("t", "l")
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.text = "u"
    assert pickle.loads(pickle.dumps(record)) == record
    assert len({record, Record("t", "l")}) == 1
