"""Crash-safe SQLite files for a holder's budget store and the coordinator's ledger.

Neither may ever lose a charge, and both open their file the same way: created owner-only
(0600) before SQLite touches it, WAL journal with FULL sync (a committed charge survives a power
cut), the schema created under the write lock (two first users cannot both create it), and the
file's ``application_id`` and ``user_version`` checked so that a foreign or newer file is
refused instead of guessed around.
Each store keeps its own error class and messages; this module only raises ``sqlite3.Error``,
``OSError`` and the :class:`StoreFormatError` its callers translate.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["StoreFormat", "StoreFormatError", "connect", "create_private_file", "transaction"]


@dataclass(frozen=True)
class StoreFormat:
    """What a store file must be: its application id, schema version and schema statements."""

    application_id: int
    schema_version: int
    schema: str
    """SQL statements separated by ``;`` (run once, when the file is new and empty)."""
    integrity_check: bool = False
    """Run ``PRAGMA quick_check`` on every open (cheap for a small store)."""


class StoreFormatError(Exception):
    """The file is not this kind of store, or it failed its integrity check."""

    def __init__(self, application_id: int, schema_version: int, integrity: str = "ok") -> None:
        super().__init__(f"application_id={application_id:#x}, schema version {schema_version}")
        self.application_id = application_id
        self.schema_version = schema_version
        self.integrity = integrity


def create_private_file(path: Path, *, dir_mode: int = 0o700) -> None:
    """Create ``path`` (and missing parents, ``dir_mode``) owner-only if it does not exist."""
    if not path.parent.exists():
        path.parent.mkdir(mode=dir_mode, parents=True, exist_ok=True)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def connect(
    path: Path,
    store: StoreFormat,
    *,
    timeout_s: float,
    on_create: Callable[[sqlite3.Connection], None] | None = None,
) -> sqlite3.Connection:
    """Open ``path`` as a ``store``: WAL, FULL sync, schema created when new, format checked.

    ``on_create`` runs inside the creating transaction (e.g. importing an older file's rows).
    The connection is in autocommit mode (``isolation_level=None``): callers open their own
    transactions with :func:`transaction`.

    Raises:
        sqlite3.Error: The file cannot be opened or read.
        StoreFormatError: The file belongs to something else, has another schema version, or
            failed its integrity check.
    """
    db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
    try:
        _enter_wal(db, deadline=time.monotonic() + timeout_s)
        _prepare(db, store, on_create)
    except BaseException:
        db.close()
        raise
    return db


def _enter_wal(db: sqlite3.Connection, *, deadline: float) -> None:
    """Switch the file to WAL, waiting while another process does the same.

    Turning a new, empty file to WAL writes its header, and SQLite answers a concurrent
    switch with "database is locked" at once instead of calling the busy handler; two first
    users of a store would then fail. A file already in WAL is left alone.
    """
    delay = 0.002
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            busy = code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _prepare(
    db: sqlite3.Connection,
    store: StoreFormat,
    on_create: Callable[[sqlite3.Connection], None] | None,
) -> None:
    db.execute("PRAGMA synchronous = FULL")
    app_id = db.execute("PRAGMA application_id").fetchone()[0]
    if app_id == 0:
        # Create the schema under the write lock, so two first users cannot race.
        db.execute("BEGIN IMMEDIATE")
        try:
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            tables = db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
            if app_id == 0 and tables == 0:
                for statement in store.schema.split(";"):
                    if statement.strip():
                        db.execute(statement)
                if on_create is not None:
                    on_create(db)
                db.execute(f"PRAGMA application_id = {int(store.application_id)}")
                db.execute(f"PRAGMA user_version = {int(store.schema_version)}")
                app_id = store.application_id
            db.execute("COMMIT")
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if app_id != store.application_id or version != store.schema_version:
        raise StoreFormatError(app_id, version)
    if store.integrity_check:
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise StoreFormatError(app_id, version, integrity=str(check))


@contextmanager
def transaction(db: sqlite3.Connection, *, write: bool) -> Iterator[sqlite3.Connection]:
    """One transaction (``BEGIN IMMEDIATE`` when writing); any exception rolls it back.

    The connection is closed afterwards either way.
    """
    try:
        db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    finally:
        db.close()
