"""The shared SQLite store opener: owner-only files, WAL, one schema, foreign files refused."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fedsynth.protocol import sqlite_store

FORMAT = sqlite_store.StoreFormat(
    0x54455354, 3, "CREATE TABLE a (x INTEGER); CREATE TABLE b (y TEXT)", integrity_check=True
)


def _open(path: Path, **kwargs: object) -> sqlite3.Connection:
    sqlite_store.create_private_file(path)
    return sqlite_store.connect(path, FORMAT, timeout_s=5.0, **kwargs)  # type: ignore[arg-type]


def test_a_new_store_is_private_wal_and_carries_its_format(tmp_path: Path) -> None:
    path = tmp_path / "new" / "store.sqlite"
    db = _open(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA application_id").fetchone()[0] == FORMAT.application_id
    assert db.execute("PRAGMA user_version").fetchone()[0] == FORMAT.schema_version
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"a", "b"}
    db.close()
    # Reopening neither recreates nor rejects it.
    _open(path).close()


def test_a_foreign_or_newer_file_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.sqlite"
    other = sqlite3.connect(foreign)
    other.execute("CREATE TABLE notes (t TEXT)")
    other.commit()
    other.close()
    with pytest.raises(sqlite_store.StoreFormatError) as info:
        _open(foreign)
    assert info.value.application_id == 0
    newer = tmp_path / "newer.sqlite"
    _open(newer).close()
    db = sqlite3.connect(newer)
    db.execute("PRAGMA user_version = 4")
    db.close()
    with pytest.raises(sqlite_store.StoreFormatError) as info:
        _open(newer)
    assert (info.value.application_id, info.value.schema_version) == (FORMAT.application_id, 4)


def test_a_failing_on_create_leaves_an_empty_unmarked_file(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"

    def explode(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO a VALUES (1)")
        raise RuntimeError("import failed")

    with pytest.raises(RuntimeError):
        _open(path, on_create=explode)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA application_id").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
    db.close()
    # The next open creates the store properly.
    _open(path).close()


def test_a_transaction_rolls_back_on_error_and_commits_otherwise(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    with pytest.raises(ValueError), sqlite_store.transaction(_open(path), write=True) as db:
        db.execute("INSERT INTO a VALUES (1)")
        raise ValueError("refused")
    with sqlite_store.transaction(_open(path), write=True) as db:
        db.execute("INSERT INTO a VALUES (2)")
    with sqlite_store.transaction(_open(path), write=False) as db:
        assert db.execute("SELECT x FROM a").fetchall() == [(2,)]


FIRST_USERS = """
import os
import sys
import time
from pathlib import Path
from fedsynth.protocol import sqlite_store

folder, name, peers = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
store = sqlite_store.StoreFormat(0x54455354, 3, "CREATE TABLE a (x INTEGER)")
for r in range(int(sys.argv[4])):
    (folder / f"ready-{r}-{name}").touch()
    deadline = time.monotonic() + 60
    while not all((folder / f"ready-{r}-{peer}").exists() for peer in peers):
        if time.monotonic() > deadline:
            sys.exit(f"round {r}: a peer never came")
        time.sleep(0)
    path = folder / f"store-{r}.sqlite"
    sqlite_store.create_private_file(path)
    db = sqlite_store.connect(path, store, timeout_s=30.0)
    with sqlite_store.transaction(db, write=True):
        db.execute("INSERT INTO a VALUES (?)", (r,))
print("done")
"""


def test_first_users_racing_to_create_a_store_wait_instead_of_failing(tmp_path: Path) -> None:
    # Turning a new empty file to WAL while another process does the same answered "database
    # is locked" at once (no busy handler): two first users of a ledger failed.
    names = ["p", "q", "r"]
    rounds = 40
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_USERS, str(tmp_path), name, ",".join(names), str(rounds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            assert out.strip() == "done"
    finally:
        for proc in procs:  # a failed peer must not leave the others spinning
            proc.kill()
            proc.wait()
    for r in range(rounds):
        db = _open(tmp_path / f"store-{r}.sqlite")
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT COUNT(*) FROM a").fetchone()[0] == len(names)
        db.close()
