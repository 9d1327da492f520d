"""Read a data holder's private labelled records from JSON Lines, CSV or Parquet.

Every malformed row is collected and reported in one :class:`DataFileError` that names the file
and the 1-based line (or row) of each problem, so that nothing is silently dropped:

* JSON Lines (``.jsonl``/``.json``): the physical line in the file; blank lines are skipped.
* CSV (``.csv``): the physical line in the file where the record starts, counting the header as
  line 1 (for files without multi-line quoted fields this is ``row index + 2``).
* Parquet (``.parquet``): ``row index + 1``, reported as "row".

Files are read as a stream: :func:`iter_record_batches` yields validated records a batch at a
time and :func:`count_records` validates a whole file keeping only a count, so a holder's memory
grows with the batch size, not with the number of its records. :func:`load_records` is the
same stream collected into one list.
"""

from __future__ import annotations

import csv
import json
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsynth.protocol.errors import ConfigError, DataFileError, UnknownLabelError

__all__ = [
    "DEFAULT_READ_BATCH",
    "MAX_REPORTED_PROBLEMS",
    "SUPPORTED_SUFFIXES",
    "Record",
    "count_records",
    "iter_record_batches",
    "load_records",
]

#: File suffixes :func:`load_records` understands (``.json`` is read as JSON Lines).
SUPPORTED_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".csv", ".parquet")

#: How many bad rows one error message lists; the total count is always given.
MAX_REPORTED_PROBLEMS = 20

#: Records per batch of :func:`iter_record_batches` unless the caller asks for another size.
DEFAULT_READ_BATCH = 1024


MAX_CHARS = 20_000
"""A holder's default limit on one record's length; a longer record makes it refuse its file."""


@dataclass(frozen=True, slots=True)
class Record:
    """One labelled text record.

    Attributes:
        text: The record's text (non-empty).
        label: The record's class label, always a string.
    """

    text: str
    label: str


@dataclass(frozen=True, slots=True)
class _Problem:
    """One bad row: where it is, what is wrong and whether only its label is unknown."""

    where: str
    message: str
    unknown_label: bool = False


@dataclass(frozen=True, slots=True)
class _RawRow:
    """One row as read from the file, before validation."""

    where: str
    fields: dict[str, Any] | None
    error: str | None = None


def load_records(
    path: str | Path,
    *,
    text_field: str = "text",
    label_field: str = "label",
    labels: Sequence[str] | None = None,
    max_chars: int = MAX_CHARS,
) -> list[Record]:
    """Load and validate labelled text records from a private data file.

    The format is chosen by the file suffix: ``.jsonl`` or ``.json`` (JSON Lines, one object per
    line), ``.csv`` (with a header row) or ``.parquet``. Labels are converted to strings (an
    integer label ``1`` becomes ``"1"``) and stripped of surrounding whitespace; texts are kept
    exactly as written. The whole file is held in memory; a holder's contribution path uses
    :func:`count_records` and :func:`iter_record_batches` instead.

    Args:
        path: The data file.
        text_field: Name of the field (JSON key or column) holding the text.
        label_field: Name of the field (JSON key or column) holding the label.
        labels: If given, the only labels allowed (e.g. those a task manifest lists).
        max_chars: Longest text allowed, in characters.

    Returns:
        The records in file order.

    Raises:
        ConfigError: If ``max_chars`` is below 1, ``labels`` is empty or a field name is empty.
        DataFileError: If the file is missing, has an unsupported suffix, holds no records or has
            malformed rows (all of them are counted; the first 20 are listed with their line).
        UnknownLabelError: If every row is well formed but some carry a label not in ``labels``.
    """
    batches = iter_record_batches(
        path, text_field=text_field, label_field=label_field, labels=labels, max_chars=max_chars
    )
    return [record for batch in batches for record in batch]


def count_records(
    path: str | Path,
    *,
    text_field: str = "text",
    label_field: str = "label",
    labels: Sequence[str] | None = None,
    max_chars: int = MAX_CHARS,
    skip_unknown_labels: bool = False,
    on_skipped: Callable[[int], None] | None = None,
) -> int:
    """Validate a whole data file exactly as :func:`load_records` does and count its records.

    One streaming pass that keeps no record: a holder runs it before it takes a task (the
    refusal of a malformed file comes before any key is exchanged; records of a label the task
    omits are left out with ``skip_unknown_labels``) at a memory cost independent of the
    file's size.

    ``skip_unknown_labels`` and ``on_skipped``: as for :func:`iter_record_batches`.

    Returns:
        The number of records (at least 1, or 0 when every one was skipped).

    Raises:
        ConfigError, DataFileError, UnknownLabelError: As :func:`load_records`.
    """
    batches = iter_record_batches(
        path,
        text_field=text_field,
        label_field=label_field,
        labels=labels,
        max_chars=max_chars,
        skip_unknown_labels=skip_unknown_labels,
        on_skipped=on_skipped,
    )
    return sum(len(batch) for batch in batches)


def iter_record_batches(
    path: str | Path,
    *,
    text_field: str = "text",
    label_field: str = "label",
    labels: Sequence[str] | None = None,
    max_chars: int = MAX_CHARS,
    batch_size: int = DEFAULT_READ_BATCH,
    skip_unknown_labels: bool = False,
    on_skipped: Callable[[int], None] | None = None,
) -> Iterator[list[Record]]:
    """Stream a data file's valid records in file order, ``batch_size`` at a time.

    The options, the suffix and the file's existence are checked at the call. The rows are
    validated as they are read with the rules of :func:`load_records`; a malformed row is not
    yielded but counted, and once the file is read to its end the iterator raises the same
    error :func:`load_records` raises for that file. A consumer must therefore treat what it
    computed from the batches as provisional until the iterator ends without an error (a
    holder computes its whole contribution before anything leaves, so a file that fails late
    contributes nothing).

    Args:
        path: The data file.
        text_field: Name of the field (JSON key or column) holding the text.
        label_field: Name of the field (JSON key or column) holding the label.
        labels: If given, the only labels allowed.
        max_chars: Longest text allowed, in characters.
        batch_size: Most records per yielded batch (the last one may hold fewer).
        skip_unknown_labels: Leave out well-formed rows whose label is not in ``labels``
            instead of failing (a holder's task path: whether its file holds a label the
            task omits must not decide whether it takes part, or a coordinator could ask).
            A file whose every row is left out then yields nothing and raises nothing.
        on_skipped: Called once at the end with the number of rows left out (skip mode).

    Yields:
        Lists of 1 to ``batch_size`` records.

    Raises:
        ConfigError: If an option is invalid (at the call).
        DataFileError, UnknownLabelError: As :func:`load_records` (unsupported suffix or missing
            file at the call; malformed rows, unknown labels or no records when the end of the
            file is reached).
    """
    _check_options(
        text_field=text_field, label_field=label_field, labels=labels, max_chars=max_chars
    )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataFileError(
            f"{file}: unsupported file suffix {file.suffix!r}; "
            f"supported suffixes are {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not file.exists():
        raise DataFileError(f"{file}: data file not found")
    if not file.is_file():
        raise DataFileError(f"{file}: data path is not a regular file")
    allowed = None if labels is None else frozenset(str(label) for label in labels)
    return _stream(
        file,
        suffix,
        text_field=text_field,
        label_field=label_field,
        allowed=allowed,
        max_chars=max_chars,
        batch_size=batch_size,
        skip_unknown_labels=skip_unknown_labels,
        on_skipped=on_skipped,
    )


def _stream(
    file: Path,
    suffix: str,
    *,
    text_field: str,
    label_field: str,
    allowed: frozenset[str] | None,
    max_chars: int,
    batch_size: int,
    skip_unknown_labels: bool = False,
    on_skipped: Callable[[int], None] | None = None,
) -> Iterator[list[Record]]:
    """Read, validate and batch the rows; raise the file's error once its end is reached."""
    if suffix in (".jsonl", ".json"):
        rows: Iterator[_RawRow] = _read_jsonl(file)
    elif suffix == ".csv":
        rows = _read_csv(file, required=(text_field, label_field))
    else:
        rows = _read_parquet(file, required=(text_field, label_field), batch_size=batch_size)

    batch: list[Record] = []
    problems = _Problems()
    n_records = 0
    skipped = 0
    for row in rows:
        if row.fields is None:
            problems.add(_Problem(row.where, row.error or "unreadable row"))
            continue
        record, problem = _validate(
            row,
            text_field=text_field,
            label_field=label_field,
            allowed=allowed,
            max_chars=max_chars,
        )
        if problem is not None and problem.unknown_label and skip_unknown_labels:
            skipped += 1
        elif problem is not None:
            problems.add(problem)
        elif record is not None:
            batch.append(record)
            n_records += 1
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch

    if problems.total:
        _raise_problems(file, problems, allowed)
    if skip_unknown_labels and on_skipped is not None:
        on_skipped(skipped)
    if not n_records and not skipped:
        raise DataFileError(f"{file}: the file holds no records (at least 1 is required)")


class _Problems:
    """The bad rows of a file: the first few in full, the rest only counted (bounded memory)."""

    def __init__(self) -> None:
        self.shown: list[_Problem] = []
        self.total = 0
        self.unknown_labels = 0

    def add(self, problem: _Problem) -> None:
        """Count one bad row, keeping it if fewer than MAX_REPORTED_PROBLEMS are kept."""
        self.total += 1
        self.unknown_labels += problem.unknown_label
        if len(self.shown) < MAX_REPORTED_PROBLEMS:
            self.shown.append(problem)


def _check_options(
    *, text_field: str, label_field: str, labels: Sequence[str] | None, max_chars: int
) -> None:
    """Reject option values that cannot describe a valid file."""
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ConfigError(f"max_chars must be an integer >= 1, got {max_chars!r}")
    for name, value in (("text_field", text_field), ("label_field", label_field)):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
    if text_field == label_field:
        raise ConfigError(f"text_field and label_field must differ, both are {text_field!r}")
    if labels is not None:
        if isinstance(labels, str):
            raise ConfigError(f"labels must be a sequence of strings, got the string {labels!r}")
        if len(labels) == 0:
            raise ConfigError("labels must list at least 1 label when given, got an empty list")


def _validate(
    row: _RawRow,
    *,
    text_field: str,
    label_field: str,
    allowed: frozenset[str] | None,
    max_chars: int,
) -> tuple[Record | None, _Problem | None]:
    """Check one row's text and label; return either a record or a problem."""
    fields = row.fields or {}
    messages: list[str] = []

    text: str | None = None
    if text_field not in fields or fields[text_field] is None:
        messages.append(f"missing field {text_field!r}")
    elif not isinstance(fields[text_field], str):
        messages.append(
            f"field {text_field!r} must be a string, got {type(fields[text_field]).__name__}"
        )
    elif not fields[text_field].strip():
        messages.append(f"field {text_field!r} is empty or whitespace-only")
    elif len(fields[text_field]) > max_chars:
        messages.append(
            f"field {text_field!r} has {len(fields[text_field])} characters, "
            f"more than max_chars={max_chars}"
        )
    else:
        text = fields[text_field]

    label: str | None = None
    raw_label = fields.get(label_field)
    if label_field not in fields or raw_label is None:
        messages.append(f"missing field {label_field!r}")
    else:
        converted = _label_to_str(raw_label)
        if converted is None:
            messages.append(
                f"field {label_field!r} must be a string or an integer, "
                f"got {type(raw_label).__name__} {raw_label!r}"
            )
        elif not converted:
            messages.append(f"field {label_field!r} is empty or whitespace-only")
        else:
            label = converted

    if messages:
        return None, _Problem(row.where, "; ".join(messages))
    if text is None or label is None:  # pragma: no cover - unreachable, keeps mypy precise
        return None, _Problem(row.where, "invalid row")
    if allowed is not None and label not in allowed:
        return None, _Problem(row.where, f"unknown label {label!r}", unknown_label=True)
    return Record(text=text, label=label), None


def _label_to_str(value: Any) -> str | None:
    """Convert a label to a stripped string, or return None if its type is not allowed."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return None


def _raise_problems(file: Path, problems: _Problems, allowed: frozenset[str] | None) -> None:
    """Raise one error listing the first problems and the total count."""
    shown = problems.shown
    lines = "\n".join(f"  {p.where}: {p.message}" for p in shown)
    more = problems.total - len(shown)
    tail = f"\n  ... and {more} more" if more else ""
    allowed_text = "" if allowed is None else f"; allowed labels are {sorted(allowed)}"
    if problems.unknown_labels == problems.total:
        raise UnknownLabelError(
            f"{file}: {problems.total} row(s) carry a label the task does not list"
            f"{allowed_text}:\n{lines}{tail}"
        )
    raise DataFileError(
        f"{file}: {problems.total} malformed row(s)"
        f"{allowed_text if problems.unknown_labels else ''}; "
        f"first {len(shown)}:\n{lines}{tail}"
    )


def _read_jsonl(file: Path) -> Iterator[_RawRow]:
    """Yield one raw row per non-blank physical line of a JSON Lines file."""
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"line {number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield _RawRow(where, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                continue
            if number == 1 and line.lstrip().startswith("["):
                yield _RawRow(
                    where,
                    None,
                    "looks like a JSON array; expected JSON Lines (one object per line)",
                )
                return
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield _RawRow(where, None, f"invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(value, dict):
                yield _RawRow(where, None, f"expected a JSON object, got {type(value).__name__}")
                continue
            yield _RawRow(where, value)


def _read_csv(file: Path, *, required: tuple[str, ...]) -> Iterator[_RawRow]:
    """Yield one raw row per CSV record, numbered by the physical line where it starts."""
    _check_utf8(file)  # a whole-file error, before any row, as for a file read at once
    with file.open("r", encoding="utf-8-sig", newline="") as handle:
        yield from _csv_rows(file, csv.reader(handle), required=required)


def _check_utf8(file: Path) -> None:
    """Refuse a file that is not UTF-8, naming the line and the byte offset of the first error.

    Read line by line (a multi-byte UTF-8 sequence never contains a newline byte, so the first
    error, its reason and its offset are those of decoding the whole file at once).
    """
    offset = 0
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataFileError(
                    f"{file}: line {number}: not valid UTF-8 "
                    f"({exc.reason} at byte {offset + exc.start})"
                ) from exc
            offset += len(raw)


def _csv_rows(file: Path, reader: Any, *, required: tuple[str, ...]) -> Iterator[_RawRow]:
    """The rows of a CSV reader after its header, each with the line where it starts."""
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise DataFileError(f"{file}: line 1: unreadable CSV header ({exc})") from exc
    missing = [name for name in required if name not in header]
    if missing:
        raise DataFileError(
            f"{file}: line 1: header lacks column(s) {missing}; found columns {header}"
        )
    next_start = reader.line_num + 1
    while True:
        start = next_start
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield _RawRow(f"line {start}", None, f"unreadable CSV ({exc})")
            if reader.line_num < start:  # no progress: stop rather than loop
                return
            next_start = reader.line_num + 1
            continue
        next_start = reader.line_num + 1
        if not cells or (len(cells) == 1 and not cells[0].strip()):
            continue
        where = f"line {start}"
        if len(cells) != len(header):
            yield _RawRow(where, None, f"has {len(cells)} fields, the header has {len(header)}")
            continue
        yield _RawRow(where, dict(zip(header, cells, strict=True)))


def _read_parquet(
    file: Path, *, required: tuple[str, ...], batch_size: int = DEFAULT_READ_BATCH
) -> Iterator[_RawRow]:
    """Yield one raw row per Parquet row, numbered ``row index + 1``, a row batch at a time."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
        names = list(parquet.schema_arrow.names)
    except Exception as exc:
        raise DataFileError(f"{file}: unreadable Parquet file ({exc})") from exc
    missing = [name for name in required if name not in names]
    if missing:
        raise DataFileError(f"{file}: lacks column(s) {missing}; found columns {names}")
    batches = parquet.iter_batches(batch_size=batch_size, columns=list(required))
    index = 0
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:
            raise DataFileError(f"{file}: unreadable Parquet file ({exc})") from exc
        if batch is None:
            return
        for row in batch.to_pylist():
            index += 1
            yield _RawRow(f"row {index}", row)
