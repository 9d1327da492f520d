"""A holder's validated per-label record counts, kept by the data file's identity.

A setup must refuse a malformed file, and check the holder's ``max_records``, before any key
is exchanged, so it needs the file validated and counted. Reading the file at every setup made
the reply time grow with the file's size: free, repeatable, and so a count a coordinator could
average out of its timings. The index reads a file once per version and keeps what the read
found (the count of every valid record per label); a setup then only looks the file's identity
up (``os.stat``: device, inode, size, modification and change times, plus the fields read), in
time that does not depend on the file. A changed file is read again at its next setup, once
(and at every setup until it has stood unchanged for two seconds).

The store is the holder's own (0600, beside its budget store: a fresh ClientApp process answers
every message of a deployed node, so an in-memory cache alone would never be hit). It holds
counts, never text. A file that fails validation is indexed with its refusal's message, so its
refusal is no slower to time than an answer; a missing file is never indexed.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from fedsynth.client.data import MAX_CHARS, iter_record_batches
from fedsynth.protocol import sqlite_store
from fedsynth.protocol.errors import BudgetStoreError, DataFileError

__all__ = ["DataIndex", "FileIdentity", "LabelCounts", "index_path_for", "label_counts"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# 'fSDx' in PRAGMA application_id marks a file as a fedsynth data index.
APPLICATION_ID = 0x66534478
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0
SETTLED_NS = 2_000_000_000
"""How long a file version must have stood unchanged before its counts are kept."""

_FORMAT = sqlite_store.StoreFormat(
    application_id=APPLICATION_ID,
    schema_version=SCHEMA_VERSION,
    schema="""
CREATE TABLE IF NOT EXISTS counts (
    path TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    counts TEXT NOT NULL
)
""",
)

# In-process entries, for holders without a budget store (simulations, tests): path -> entry.
_MEMORY: dict[str, tuple[str, str]] = {}


@dataclass(frozen=True)
class FileIdentity:
    """What tells one version of a data file from another, and how it is read."""

    path: str
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    text_field: str
    label_field: str
    max_chars: int

    @classmethod
    def of(
        cls, path: Path, *, text_field: str, label_field: str, max_chars: int = MAX_CHARS
    ) -> FileIdentity:
        """The identity of ``path`` now (``os.stat``; a missing file raises OSError)."""
        st = os.stat(path)
        return cls(
            path=str(Path(path).resolve()),
            device=st.st_dev,
            inode=st.st_ino,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            text_field=text_field,
            label_field=label_field,
            max_chars=max_chars,
        )

    def settled(self, now_ns: int) -> bool:
        """Unchanged for :data:`SETTLED_NS` before ``now_ns``.

        File times tick at the kernel's clock granularity (milliseconds), so a file rewritten
        in place to the same size within one tick keeps its identity; a version is indexed
        only once it is older than that could hide (what git calls a "racily clean" entry).
        """
        return now_ns - max(self.mtime_ns, self.ctime_ns) >= SETTLED_NS

    def key(self) -> str:
        """A canonical text form, compared whole."""
        return json.dumps(self.__dict__, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class LabelCounts:
    """The valid records of one file version, counted per label."""

    counts: Mapping[str, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "counts", MappingProxyType(dict(self.counts)))

    @property
    def total(self) -> int:
        """Every valid record, whatever its label."""
        return sum(self.counts.values())

    def of(self, labels: Sequence[str]) -> int:
        """The records carrying one of ``labels`` (what a task with these labels reads)."""
        return sum(self.counts.get(str(label), 0) for label in set(labels))


def label_counts(
    path: Path, *, text_field: str, label_field: str, max_chars: int = MAX_CHARS
) -> LabelCounts:
    """Validate a whole file and count its records per label (one pass, no record kept).

    The rules are those of :func:`~fedsynth.client.data.load_records`.

    Raises:
        DataFileError: As :func:`~fedsynth.client.data.iter_record_batches` for the file.
    """
    counts: Counter[str] = Counter()
    for batch in iter_record_batches(
        path, text_field=text_field, label_field=label_field, max_chars=max_chars
    ):
        counts.update(record.label for record in batch)
    return LabelCounts(dict(counts))


def index_path_for(budget_path: Path | None) -> Path | None:
    """Where a holder with this budget store keeps its data index (beside it), or None."""
    if budget_path is None:
        return None
    return budget_path.with_name(f"{budget_path.stem}.data-index.sqlite")


class DataIndex:
    """Per-label counts of a holder's data file, read once per version of the file.

    ``path``: the SQLite store (None: this process's memory only).
    """

    def __init__(self, path: Path | None, *, timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = path
        self.timeout_s = timeout_s

    def counts(
        self, data_path: Path, *, text_field: str, label_field: str, max_chars: int = MAX_CHARS
    ) -> LabelCounts:
        """The file's counts: looked up when this version was read before, else read now.

        A file that changed while it was read is not indexed (its next setup reads it again);
        the task's own pass over the file compares its count with this one anyway.

        Raises:
            DataFileError: The file is missing, unreadable or malformed (nothing is indexed).
            BudgetStoreError: The index store cannot be opened or written.
        """

        def identity() -> FileIdentity:
            return FileIdentity.of(
                data_path, text_field=text_field, label_field=label_field, max_chars=max_chars
            )

        try:
            before: FileIdentity | None = identity()
        except OSError:
            before = None  # the read below raises the data file's own error
        if before is not None:
            cached = self._lookup(before)
            if cached is not None:
                return cached
        try:
            counted: LabelCounts | DataFileError = label_counts(
                data_path, text_field=text_field, label_field=label_field, max_chars=max_chars
            )
        except DataFileError as exc:
            counted = exc  # a malformed file's refusal is kept too, so it is no slower to time
        if before is None or before != identity():
            log.warning("%s changed while it was read; not indexed", data_path)
        elif before.settled(time.time_ns()):
            self._store(before, counted)
        if isinstance(counted, DataFileError):
            raise counted
        return counted

    # -- storage ---------------------------------------------------------------------------------

    def _lookup(self, identity: FileIdentity) -> LabelCounts | None:
        """The counts kept for this version of the file; raises the refusal kept for it."""
        if self.path is None:
            entry = _MEMORY.get(identity.path)
            text = entry[1] if entry and entry[0] == identity.key() else None
        elif not self.path.exists():
            text = None
        else:
            row = self._run(
                lambda db: db.execute(
                    "SELECT identity, counts FROM counts WHERE path = ?", (identity.path,)
                ).fetchone(),
                write=False,
            )
            text = row[1] if row is not None and row[0] == identity.key() else None
        if text is None:
            return None
        value = _parse_entry(self.path, text)
        if isinstance(value, str):
            raise DataFileError(value)
        return LabelCounts(value)

    def _store(self, identity: FileIdentity, counted: LabelCounts | DataFileError) -> None:
        if isinstance(counted, DataFileError):
            text = json.dumps({"error": str(counted)})
        else:
            text = json.dumps({"counts": dict(counted.counts)}, sort_keys=True)
        if self.path is None:
            _MEMORY[identity.path] = (identity.key(), text)
            return
        self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO counts (path, identity, counts) VALUES (?, ?, ?)",
                (identity.path, identity.key(), text),
            ),
            write=True,
        )

    def _run(self, action: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        if self.path is None:
            raise RuntimeError("no store path")
        try:
            sqlite_store.create_private_file(self.path)
            db = sqlite_store.connect(self.path, _FORMAT, timeout_s=self.timeout_s)
            with sqlite_store.transaction(db, write=write):
                return action(db)
        except (OSError, sqlite3.Error, sqlite_store.StoreFormatError) as exc:
            raise BudgetStoreError(
                f"data index {self.path} is unusable ({exc}); this holder refuses tasks until "
                "it is removed (it is rebuilt from the data file) or repaired"
            ) from None


def _parse_entry(path: Path | None, text: str) -> dict[str, int] | str:
    """A stored entry, checked: per-label counts, or a malformed file's refusal message.

    A damaged entry is an error, never a guess.
    """
    try:
        entry = json.loads(text)
    except json.JSONDecodeError:
        entry = None
    if isinstance(entry, dict) and set(entry) == {"error"} and isinstance(entry["error"], str):
        return entry["error"]
    counts = entry.get("counts") if isinstance(entry, dict) and set(entry) == {"counts"} else None
    if not isinstance(counts, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in counts.items()
    ):
        raise BudgetStoreError(
            f"data index {path}: a damaged entry; remove the file (it is rebuilt from the data "
            "file)"
        )
    return counts
