"""The coordinator's release ledger: one SQLite row per release, committed with its file's digest.

Every release the coordinator publishes (a dataset-vector file, a PE task's charge) is one row:
id, time, method, epsilon, delta, trust mode, participants, refusals by category, the SHA-256 of
the published file and its path. :meth:`PrivacyLedger.publish` writes the release file (the
writer writes a temporary file, fsyncs and renames it) *inside* the ``BEGIN IMMEDIATE``
transaction that inserts the row, after the duplicate and lifetime-cap checks, and hashes the
file as it lies on disk before the commit. So a coordinator killed at any point leaves either
both or only an orphan file, never a row without its file; a release id is recorded at most
once (a second attempt is refused, never charged twice); and two coordinator processes sharing
a ledger cannot both pass a cap that only one of them fits (SQLite's write lock serializes
them). WAL mode lets readers go on meanwhile, ``synchronous=FULL`` makes a committed row survive
a power loss, and the file is owner-only (0600) from its first byte.

A ledger that cannot be read is never guessed around: every operation raises
:class:`~fedsynth.protocol.errors.LedgerError` naming the path. Nothing private is stored:
privacy terms, node counts and refusal categories only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedsynth.protocol import sqlite_store
from fedsynth.protocol.errors import (
    BudgetExceededError,
    DuplicateReleaseError,
    LedgerError,
    RefusalCategory,
)

LEDGER_FILE = "ledger.sqlite"
"""The ledger's file name inside a coordinator's store (what ``fedsynth ledger DIR`` reads)."""
LEGACY_FILE = "ledger.jsonl"
"""The JSON-lines ledger of earlier versions; its rows are imported once, never dropped."""
# 'fSLd' in PRAGMA application_id marks a file as a fedsynth coordinator ledger.
APPLICATION_ID = 0x66534C64
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0
METHODS = ("vector", "pe")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    method TEXT NOT NULL,
    epsilon TEXT NOT NULL,
    delta REAL NOT NULL,
    mode TEXT NOT NULL,
    participants TEXT NOT NULL,
    refusals TEXT NOT NULL,
    digest TEXT,
    path TEXT NOT NULL
)
"""

_FORMAT = sqlite_store.StoreFormat(APPLICATION_ID, SCHEMA_VERSION, _SCHEMA)

FileWriter = Callable[[Path], object]
"""Writes a release file at the given path atomically (temporary file, fsync, rename)."""


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes as they lie on disk."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def refusal_counts(refusals: Mapping[str, str]) -> dict[str, int]:
    """Refusals by category, from a report's ``{node: "<stage>: <category>"}`` map."""
    known = {c.value for c in RefusalCategory}
    counts: Counter[str] = Counter()
    for summary in refusals.values():
        category = str(summary).rpartition(": ")[2] or str(summary)
        counts[category if category in known else RefusalCategory.PROTOCOL.value] += 1
    return dict(sorted(counts.items()))


def _epsilon_text(epsilon: object) -> str:
    value = float(str(epsilon))
    return "inf" if math.isinf(value) else repr(value)


class PrivacyLedger:
    """The coordinator's record of releases and the epsilon each spent, in one SQLite file.

    Args:
        path: The ledger file (created owner-only, with its folder, on first use).
        max_total_epsilon: Lifetime cap on the finite epsilons recorded (basic composition);
            re-checked inside the transaction that records a release.
        timeout_s: How long to wait for another process's write lock.
    """

    def __init__(
        self, path: Path, *, max_total_epsilon: float = math.inf, timeout_s: float = BUSY_TIMEOUT_S
    ) -> None:
        if not (max_total_epsilon > 0):
            raise LedgerError(f"max_total_epsilon={max_total_epsilon}: must be > 0 (or inf)")
        self.path = path
        self.max_total_epsilon = max_total_epsilon
        self.timeout_s = timeout_s

    # -- reading ---------------------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """Every recorded release, oldest first (an empty list when the file does not exist)."""
        if not self._exists():
            return []
        with self._transaction(write=False) as db:
            found = db.execute(
                "SELECT seq, task_id, created, method, epsilon, delta, mode, participants, "
                "refusals, digest, path FROM releases ORDER BY seq"
            ).fetchall()
        return [self._row(*values) for values in found]

    def spent(self) -> float:
        """Sum of the finite epsilons recorded (basic composition across releases)."""
        if not self._exists():
            return 0.0
        with self._transaction(write=False) as db:
            return self._spent(db)

    def has(self, task_id: str) -> bool:
        """Whether a release with this id is recorded."""
        if not self._exists():
            return False
        with self._transaction(write=False) as db:
            return self._has(db, task_id)

    def check(self, epsilon: float) -> None:
        """Refuse a new task that would exceed the lifetime cap (checked again at recording).

        Raises:
            BudgetExceededError: naming epsilon, the total it would reach and the cap.
        """
        self._check_cap(self.spent(), epsilon)

    # -- recording (each one atomic) ---------------------------------------------------------------

    def publish(
        self,
        report: Mapping[str, Any],
        *,
        path: Path,
        write: FileWriter,
        method: str = "vector",
    ) -> dict[str, Any]:
        """Write a release file and record it, in one transaction; return the row.

        Order inside the write transaction: refuse a recorded id, re-check the cap, call
        ``write(path)``, fsync the folder, hash the file, insert the row, commit. Anything that
        fails (or a crash) before the commit leaves no row; the file may remain as an orphan.

        Raises:
            DuplicateReleaseError: ``report["task_id"]`` is already recorded (nothing written).
            BudgetExceededError: The release would exceed the lifetime cap (nothing written).
            LedgerError: The ledger cannot be read or written.
        """
        task_id = str(report["task_id"])
        epsilon = _epsilon_text(report["epsilon"])
        with self._transaction(write=True) as db:
            self._refuse_duplicate(db, task_id)
            self._check_cap(self._spent(db), float(epsilon))
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
            _fsync_dir(path.parent)
            digest = file_digest(path)
            self._insert(db, report, method=method, digest=digest, path=path)
            found = db.execute(
                "SELECT seq, task_id, created, method, epsilon, delta, mode, participants, "
                "refusals, digest, path FROM releases WHERE task_id = ?",
                (task_id,),
            ).fetchone()
        return self._row(*found)

    def record(
        self, report: Mapping[str, Any], *, release_path: Path, method: str = "vector"
    ) -> None:
        """Record a charge for something already at ``release_path`` (a file is hashed).

        Used where the epsilon is spent before any file is final (a PE task is charged before
        its first round, with its checkpoint folder as the path); :meth:`attach` later binds
        the row to the published file.

        Raises:
            DuplicateReleaseError: The id is already recorded.
            BudgetExceededError: The charge would exceed the lifetime cap.
        """
        task_id = str(report["task_id"])
        with self._transaction(write=True) as db:
            self._refuse_duplicate(db, task_id)
            self._check_cap(self._spent(db), float(_epsilon_text(report["epsilon"])))
            digest = file_digest(release_path) if release_path.is_file() else None
            self._insert(db, report, method=method, digest=digest, path=release_path)

    def attach(
        self,
        task_id: str,
        *,
        path: Path,
        write: FileWriter,
        participants: object | None = None,
    ) -> None:
        """Write the final file of a charged release and bind its row to it, in one transaction.

        Raises:
            LedgerError: No row for ``task_id`` (a file is never published uncharged).
        """
        with self._transaction(write=True) as db:
            if not self._has(db, task_id):
                raise LedgerError(
                    f"task_id={task_id!r} has no row in {self.path}: a release is published "
                    "only after its epsilon is recorded"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
            _fsync_dir(path.parent)
            db.execute(
                "UPDATE releases SET digest = ?, path = ? WHERE task_id = ?",
                (file_digest(path), str(path), task_id),
            )
            if participants is not None:
                db.execute(
                    "UPDATE releases SET participants = ? WHERE task_id = ?",
                    (str(participants), task_id),
                )

    # -- internals -------------------------------------------------------------------------------

    def _exists(self) -> bool:
        """Whether there is anything to read (the ledger, or an older one to import)."""
        return self.path.exists() or self.path.with_name(LEGACY_FILE).is_file()

    def _insert(
        self,
        db: sqlite3.Connection,
        report: Mapping[str, Any],
        *,
        method: str,
        digest: str | None,
        path: Path,
    ) -> None:
        if method not in METHODS:
            raise LedgerError(f"method={method!r}: expected one of {METHODS}")
        refusals = report.get("refused_or_failed", {})
        db.execute(
            "INSERT INTO releases (task_id, created, method, epsilon, delta, mode, participants, "
            "refusals, digest, path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                str(report["task_id"]),
                time.time(),
                method,
                _epsilon_text(report["epsilon"]),
                float(report["delta"]),
                str(report["trust_mode"]),
                str(report.get("survivors", "")),
                json.dumps(refusal_counts(refusals if isinstance(refusals, Mapping) else {})),
                digest,
                str(path),
            ),
        )

    def _row(
        self,
        seq: int,
        task_id: str,
        created: float,
        method: str,
        epsilon: str,
        delta: float,
        mode: str,
        participants: str,
        refusals: str,
        digest: str | None,
        path: str,
    ) -> dict[str, Any]:
        self._parse_epsilon(seq, epsilon)
        try:
            by_category = json.loads(refusals)
        except json.JSONDecodeError:
            by_category = None
        if not isinstance(by_category, dict):
            raise LedgerError(f"ledger {self.path}: row {seq} has unreadable refusals")
        count: int | str = int(participants) if participants.isdigit() else participants
        return {
            "task_id": task_id,
            "created": datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="seconds"),
            "method": method,
            "epsilon": "inf" if epsilon == "inf" else str(float(epsilon)),
            "delta": delta,
            "trust_mode": mode,
            "survivors": count,
            "refusals": by_category,
            "digest": digest,
            "release": path,
        }

    def _spent(self, db: sqlite3.Connection) -> float:
        total = 0.0
        for seq, epsilon in db.execute("SELECT seq, epsilon FROM releases"):
            value = self._parse_epsilon(seq, epsilon)
            if math.isfinite(value):
                total += value
        return total

    @staticmethod
    def _has(db: sqlite3.Connection, task_id: str) -> bool:
        found = db.execute("SELECT 1 FROM releases WHERE task_id = ?", (task_id,)).fetchone()
        return found is not None

    def _refuse_duplicate(self, db: sqlite3.Connection, task_id: str) -> None:
        if self._has(db, task_id):
            raise DuplicateReleaseError(
                f"task_id={task_id!r} is already recorded in {self.path}; recording it again "
                "would charge its epsilon twice"
            )

    def _check_cap(self, spent: float, epsilon: float) -> None:
        if math.isfinite(epsilon) and spent + epsilon > self.max_total_epsilon:
            raise BudgetExceededError(
                f"epsilon={epsilon} would bring the ledger to {spent + epsilon:.4g} > "
                f"max_total_epsilon={self.max_total_epsilon}"
            )

    def _parse_epsilon(self, seq: int, text: object) -> float:
        try:
            value = float(str(text))
        except ValueError:
            value = math.nan
        if math.isnan(value) or value <= 0:
            raise LedgerError(
                f"ledger {self.path}: row {seq} has epsilon={text!r}, not a number > 0; repair "
                "or restore the ledger before the coordinator releases anything else"
            )
        return value

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction (``BEGIN IMMEDIATE`` when writing); any error rolls it back."""
        db = self._open()
        try:
            with sqlite_store.transaction(db, write=write):
                yield db
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def _open(self) -> sqlite3.Connection:
        """Open the ledger (created 0600, WAL, FULL sync); a foreign file is refused."""
        try:
            sqlite_store.create_private_file(self.path)
        except OSError as exc:
            raise LedgerError(f"ledger {self.path} cannot be created ({exc.strerror})") from None
        try:
            return sqlite_store.connect(
                self.path, _FORMAT, timeout_s=self.timeout_s, on_create=self._import_legacy
            )
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        except sqlite_store.StoreFormatError as exc:
            raise LedgerError(
                f"ledger {self.path}: not a fedsynth coordinator ledger (application_id="
                f"{exc.application_id:#x}, schema version {exc.schema_version}; expected "
                f"{APPLICATION_ID:#x}, {SCHEMA_VERSION})"
            ) from None

    def _import_legacy(self, db: sqlite3.Connection) -> None:
        """Carry the rows of a JSON-lines ledger beside this file over (their epsilon stays spent).

        A torn last line (a crash mid-append) is skipped, as the old reader did.
        """
        legacy = self.path.with_name(LEGACY_FILE)
        if legacy == self.path or not legacy.is_file():
            return
        for line in legacy.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                report = {
                    "task_id": row["task_id"],
                    "epsilon": row["epsilon"],
                    "delta": row["delta"],
                    "trust_mode": row["trust_mode"],
                    "survivors": row.get("survivors", ""),
                }
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
            if not self._has(db, str(report["task_id"])):
                release = Path(str(row.get("release", "")))
                method = "pe" if str(report["task_id"]).startswith("pe-") else "vector"
                digest = file_digest(release) if release.is_file() else None
                self._insert(db, report, method=method, digest=digest, path=release)

    def _error(self, exc: sqlite3.Error) -> LedgerError:
        return LedgerError(
            f"ledger {self.path} is unreadable or unavailable ({exc}); nothing was recorded"
        )


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable before the row that points at it is committed."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ledger_path(folder: Path) -> Path:
    """The ledger file of a coordinator's store or a demo's output folder."""
    return folder / LEDGER_FILE


def ledger_rows(path: Path) -> list[dict[str, Any]]:
    """Every release recorded in a ledger, given its file or the folder that holds it.

    Raises:
        LedgerError: There is no ledger there, or it cannot be read.
    """
    file = ledger_path(path) if path.is_dir() else path
    if not file.is_file():
        raise LedgerError(f"no ledger at {file}: expected a {LEDGER_FILE} written by fedsynth")
    return PrivacyLedger(file).rows()
