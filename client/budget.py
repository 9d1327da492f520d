"""A data holder's persistent privacy budget: one SQLite store, charged in one atomic step.

The store is the holder's own record of every task it contributed to, with the task's privacy
terms as they were when it was first charged, and of every PE round it answered. It never
trusts the coordinator: the lifetime cap is re-checked inside the same ``BEGIN IMMEDIATE``
transaction that inserts the charge, so two tasks set up at the same time (two processes, two
threads, two runs) can never both pass a check that only one of them fits. SQLite's write lock
serializes the check-and-charge across processes; WAL mode lets readers go on meanwhile, and
``synchronous=FULL`` makes a charge survive a power loss once the transaction returns.

A store that cannot be read (corrupt file, not a fedsynth store, locked for too long) is never
guessed around: every operation raises :class:`BudgetStoreError` naming the path, so the holder
refuses tasks until an operator repairs or restores it. Nothing private is stored: task ids,
privacy terms and round numbers only.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedsynth.protocol import sqlite_store
from fedsynth.protocol.errors import (
    BudgetStoreError,
    PolicyViolationError,
    StageOrderError,
)
from fedsynth.protocol.manifest import PrivacySpec, TaskManifest
from fedsynth.protocol.pe_manifest import PERoundManifest

# 'fSBg' in PRAGMA application_id marks a file as a fedsynth budget store.
APPLICATION_ID = 0x66534267
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0

SpendCheck = Callable[[float, float], None]
"""Called inside the charging transaction with the epsilon and the delta already spent on other
tasks of finite epsilon; raises (a policy or budget error) to refuse. The transaction then
writes nothing."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('task', 'pe-round')),
    task_id TEXT NOT NULL,
    epsilon TEXT NOT NULL,
    delta REAL NOT NULL,
    mode TEXT NOT NULL,
    round INTEGER,
    terms TEXT,
    recorded_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_charge_per_task ON entries (task_id) WHERE kind = 'task';
CREATE UNIQUE INDEX IF NOT EXISTS one_answer_per_round
    ON entries (task_id, round) WHERE kind = 'pe-round';
"""


_FORMAT = sqlite_store.StoreFormat(APPLICATION_ID, SCHEMA_VERSION, _SCHEMA, integrity_check=True)


def _epsilon_text(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else repr(float(epsilon))


def privacy_terms(privacy: PrivacySpec) -> dict[str, Any]:
    """Every field of a task's privacy spec (epsilon as text, so infinity is exact)."""
    terms = dict(privacy.__dict__)
    terms["epsilon"] = _epsilon_text(privacy.epsilon)
    return terms


def vector_task_terms(manifest: TaskManifest) -> dict[str, Any]:
    """The terms of a dataset-vector task that fix what its contribution reveals."""
    return {
        "kind": "dataset_vector",
        "privacy": privacy_terms(manifest.privacy),
        "model_fingerprint": manifest.model_fingerprint,
        "layers": list(manifest.layers),
        "labels": list(manifest.labels),
        "clip_norms": list(manifest.clip_norms),
        "count_weight": manifest.count_weight,
        "scale": manifest.scale,
        "bits": manifest.bits,
        "max_records": manifest.max_records,
    }


def pe_task_terms(manifest: PERoundManifest) -> dict[str, Any]:
    """The terms every round of one PE task must share (what its whole epsilon covers)."""
    return {
        "kind": "pe_votes",
        "privacy": privacy_terms(manifest.privacy),
        "rounds": manifest.rounds,
        "top_k": manifest.top_k,
        "embedder_fingerprint": manifest.embedder_fingerprint,
        "embedding_dim": manifest.embedding_dim,
        "labels": list(manifest.labels),
    }


def canonical_terms(terms: Mapping[str, Any]) -> str:
    """Task terms as canonical JSON (how they are stored and compared)."""
    return json.dumps(terms, sort_keys=True, separators=(",", ":"), allow_nan=False)


class ClientBudget:
    """A holder's epsilon ledger in one SQLite file (WAL), shared safely by its processes.

    ``path=None`` keeps nothing (in-process tests only): a deployed node refuses every task
    without a store, see :func:`fedsynth.client.flower_app.settings_from_context`.
    """

    def __init__(self, path: Path | None, *, timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = path
        self.timeout_s = timeout_s

    # -- reading ---------------------------------------------------------------------------------

    def entries(self) -> list[dict[str, object]]:
        """Every recorded charge and answered PE round, oldest first."""
        if self.path is None:
            return []
        with self._transaction(self.path, write=False) as db:
            rows = db.execute(
                "SELECT seq, kind, task_id, epsilon, delta, mode, round FROM entries ORDER BY seq"
            ).fetchall()
        out: list[dict[str, object]] = []
        for seq, kind, task_id, epsilon, delta, mode, round_number in rows:
            self._parse_epsilon(seq, epsilon)
            row: dict[str, object] = {"task_id": task_id, "epsilon": epsilon}
            if kind == "task":
                row.update(delta=delta, mode=mode)
            else:
                row.update(round=round_number, kind="pe-round")
            out.append(row)
        return out

    def spending(self, *, exclude: str | None = None) -> tuple[float, float]:
        """Epsilon and delta charged so far on tasks of finite epsilon, in one read of the store.

        Basic composition adds each up; ``exclude`` leaves one task out.
        """
        if self.path is None:
            return 0.0, 0.0
        with self._transaction(self.path, write=False) as db:
            return self._spending(db, exclude)

    def spent(self, *, exclude: str | None = None) -> float:
        """Total finite epsilon charged so far (basic composition), optionally without a task."""
        return self.spending(exclude=exclude)[0]

    def spent_delta(self, *, exclude: str | None = None) -> float:
        """Total delta of the tasks of finite epsilon charged so far (basic composition)."""
        return self.spending(exclude=exclude)[1]

    def has(self, task_id: str) -> bool:
        """Whether this task was already charged."""
        return self.terms(task_id) is not None

    def terms(self, task_id: str) -> dict[str, Any] | None:
        """The terms a task was first charged under (None: never charged)."""
        if self.path is None:
            return None
        with self._transaction(self.path, write=False) as db:
            return self._terms(db, task_id)

    def last_round(self, task_id: str) -> int:
        """The last PE round this holder answered for ``task_id`` (0: none)."""
        if self.path is None:
            return 0
        with self._transaction(self.path, write=False) as db:
            return self._last_round(db, task_id)

    # -- charging (each one atomic) --------------------------------------------------------------

    def charge(self, manifest: TaskManifest, *, check: SpendCheck | None = None) -> None:
        """Charge a dataset-vector task once, re-checking the policy in the same transaction.

        Raises:
            PolicyViolationError: The task id was already charged (a second contribution would
                spend its epsilon again), or ``check`` refused.
            BudgetStoreError: The store cannot be read or written.
        """
        self.charge_task(
            manifest.task_id,
            manifest.privacy,
            terms=vector_task_terms(manifest),
            check=check,
            repeat=False,
        )

    def charge_task(
        self,
        task_id: str,
        privacy: PrivacySpec,
        *,
        terms: Mapping[str, Any] | None = None,
        check: SpendCheck | None = None,
        repeat: bool = True,
    ) -> bool:
        """Charge a task's whole epsilon once; return whether this call charged it.

        ``repeat`` allows a task already charged under identical terms (later PE rounds); a
        task id seen again with other terms is always refused.
        """
        wanted = dict(terms) if terms is not None else {"privacy": privacy_terms(privacy)}
        if self.path is None:
            if check is not None:
                check(0.0, 0.0)
            return False
        with self._transaction(self.path, write=True) as db:
            return self._charge(db, task_id, privacy, wanted, check, repeat=repeat)

    def charge_pe_round(
        self, manifest: PERoundManifest, *, check: SpendCheck | None = None
    ) -> None:
        """Charge a PE task at its first round and record this round, in one transaction.

        Raises:
            PolicyViolationError: The task was charged under other terms, or ``check`` refused.
            StageOrderError: This round (or a later one) was already answered.
            BudgetStoreError: The store cannot be read or written.
        """
        if self.path is None:
            if check is not None:
                check(0.0, 0.0)
            return
        with self._transaction(self.path, write=True) as db:
            last = self._last_round(db, manifest.pe_task_id)
            if manifest.round <= last:
                raise StageOrderError(
                    f"round {manifest.round} of PE task {manifest.pe_task_id!r}: this node "
                    f"already answered round {last}; answering again would release its votes "
                    "twice"
                )
            self._charge(
                db,
                manifest.pe_task_id,
                manifest.privacy,
                pe_task_terms(manifest),
                check,
                repeat=True,
            )
            self._insert_round(db, manifest.pe_task_id, manifest.round)

    def record_round(self, task_id: str, round_number: int) -> None:
        """Record that a PE round's votes left this holder (a replay is then refused)."""
        if self.path is None:
            return
        with self._transaction(self.path, write=True) as db:
            if round_number > self._last_round(db, task_id):
                self._insert_round(db, task_id, round_number)

    # -- internals -------------------------------------------------------------------------------

    def _charge(
        self,
        db: sqlite3.Connection,
        task_id: str,
        privacy: PrivacySpec,
        terms: Mapping[str, Any],
        check: SpendCheck | None,
        *,
        repeat: bool,
    ) -> bool:
        stored = self._terms(db, task_id)
        if stored is not None:
            if canonical_terms(stored) != canonical_terms(terms):
                raise PolicyViolationError(
                    f"task_id={task_id!r} was charged in {self.path} under other terms; the same "
                    "task id with new terms (epsilon, noise, rounds, embedder, labels) is refused"
                )
            if not repeat:
                raise PolicyViolationError(
                    f"task_id={task_id!r} was already contributed to (charged in {self.path}); "
                    "a second contribution would spend its epsilon again"
                )
            return False
        spent, spent_delta = self._spending(db, task_id)  # reads (and validates) every charge
        if check is not None:
            check(spent, spent_delta)
        db.execute(
            "INSERT INTO entries (kind, task_id, epsilon, delta, mode, terms, recorded_at) "
            "VALUES ('task', ?, ?, ?, ?, ?, ?)",
            (
                task_id,
                _epsilon_text(privacy.epsilon),
                privacy.delta,
                privacy.mode,
                canonical_terms(terms),
                time.time(),
            ),
        )
        return True

    @staticmethod
    def _insert_round(db: sqlite3.Connection, task_id: str, round_number: int) -> None:
        db.execute(
            "INSERT INTO entries (kind, task_id, epsilon, delta, mode, round, recorded_at) "
            "VALUES ('pe-round', ?, '0', 0.0, '', ?, ?)",
            (task_id, round_number, time.time()),
        )

    def _spending(self, db: sqlite3.Connection, exclude: str | None) -> tuple[float, float]:
        epsilon_total = delta_total = 0.0
        for seq, epsilon, delta in db.execute(
            "SELECT seq, epsilon, delta FROM entries WHERE kind = 'task' AND task_id IS NOT ?",
            (exclude,),
        ):
            value = self._parse_epsilon(seq, epsilon)
            if math.isfinite(value):
                epsilon_total += value
                delta_total += float(delta)
        return epsilon_total, delta_total

    def _terms(self, db: sqlite3.Connection, task_id: str) -> dict[str, Any] | None:
        row = db.execute(
            "SELECT seq, terms FROM entries WHERE kind = 'task' AND task_id = ?", (task_id,)
        ).fetchone()
        if row is None:
            return None
        seq, text = row
        try:
            terms = json.loads(text)
        except (TypeError, json.JSONDecodeError):
            terms = None
        if not isinstance(terms, dict):
            raise BudgetStoreError(
                f"budget store {self.path}: entry {seq} has unreadable task terms; repair or "
                "restore the store before this holder takes part in new tasks"
            )
        return terms

    @staticmethod
    def _last_round(db: sqlite3.Connection, task_id: str) -> int:
        row = db.execute(
            "SELECT MAX(round) FROM entries WHERE kind = 'pe-round' AND task_id = ?", (task_id,)
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _parse_epsilon(self, seq: int, text: object) -> float:
        try:
            value = float(str(text))
        except ValueError:
            value = math.nan
        if math.isnan(value) or value < 0:
            raise BudgetStoreError(
                f"budget store {self.path}: entry {seq} has epsilon={text!r}, not a number >= 0; "
                "repair or restore the store before this holder takes part in new tasks"
            )
        return value

    @contextmanager
    def _transaction(self, path: Path, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction on the store (``BEGIN IMMEDIATE`` when writing).

        Any store failure becomes a :class:`BudgetStoreError`; an error rolls everything back.
        """
        db = self._open(path)
        try:
            with sqlite_store.transaction(db, write=write):
                yield db
        except sqlite3.Error as exc:
            raise self._store_error(exc) from None

    def _open(self, path: Path) -> sqlite3.Connection:
        """Open the store (created 0600, WAL, FULL sync, integrity-checked); else refuse."""
        try:
            # Owner-only from the first byte: the store lists the tasks this holder joined.
            sqlite_store.create_private_file(path)
        except OSError as exc:
            raise BudgetStoreError(
                f"budget store {path} cannot be created ({exc.strerror}); this holder refuses "
                "tasks until it can keep its budget"
            ) from None
        try:
            return sqlite_store.connect(path, _FORMAT, timeout_s=self.timeout_s)
        except sqlite3.Error as exc:
            raise self._store_error(exc) from None
        except sqlite_store.StoreFormatError as exc:
            if exc.integrity != "ok":
                raise BudgetStoreError(
                    f"budget store {self.path} failed its integrity check ({exc.integrity}); "
                    "repair or restore it before this holder takes part in new tasks"
                ) from None
            raise BudgetStoreError(
                f"budget store {self.path}: not a fedsynth budget store (application_id="
                f"{exc.application_id:#x}, schema version {exc.schema_version}; expected "
                f"{APPLICATION_ID:#x}, {SCHEMA_VERSION}); point budget-path at a new file or "
                "restore the store"
            ) from None

    def _store_error(self, exc: sqlite3.Error) -> BudgetStoreError:
        return BudgetStoreError(
            f"budget store {self.path} is unreadable or unavailable ({exc}); this holder refuses "
            "tasks until an operator repairs or restores it (nothing is guessed or charged)"
        )
