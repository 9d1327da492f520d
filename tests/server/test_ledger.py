"""Tests of the coordinator's SQLite ledger: atomic with the release file, never charged twice."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from fedsynth.protocol.errors import BudgetExceededError, DuplicateReleaseError, LedgerError
from fedsynth.server import task_cli
from fedsynth.server.ledger import (
    LEDGER_FILE,
    PrivacyLedger,
    file_digest,
    ledger_path,
    ledger_rows,
    refusal_counts,
)
from fedsynth.server.task_cli import ledger_command


def report(task_id: str, epsilon: float | str = 1.0, **extra: object) -> dict[str, object]:
    return {
        "task_id": task_id,
        "epsilon": epsilon,
        "delta": 1e-5,
        "trust_mode": "distributed",
        "survivors": 3,
        **extra,
    }


class Writer:
    """A release writer as save_release does it: temporary file, fsync, rename."""

    def __init__(self, content: bytes = b"release bytes") -> None:
        self.content = content
        self.calls: list[Path] = []

    def __call__(self, path: Path) -> None:
        self.calls.append(path)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as handle:
            handle.write(self.content)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)


def writer(content: bytes = b"release bytes") -> Writer:
    return Writer(content)


def test_publish_writes_the_file_and_its_row_together(tmp_path: Path) -> None:
    ledger = PrivacyLedger(ledger_path(tmp_path / "store"), max_total_epsilon=5.0)
    assert ledger.rows() == [] and ledger.spent() == 0.0
    refusals = {"17": "masked_input: policy", "18": "setup: budget", "19": "setup: policy"}
    row = ledger.publish(
        report("a", 2.0, refused_or_failed=refusals),
        path=tmp_path / "store" / "a.safetensors",
        write=writer(b"AAAA"),
    )
    assert row["task_id"] == "a" and row["method"] == "vector"
    assert row["epsilon"] == "2.0" and row["delta"] == 1e-5 and row["trust_mode"] == "distributed"
    assert row["survivors"] == 3
    assert row["refusals"] == {"budget": 1, "policy": 2}
    assert row["digest"] == file_digest(tmp_path / "store" / "a.safetensors")
    assert row["release"] == str(tmp_path / "store" / "a.safetensors")
    assert row["created"].endswith("+00:00")
    ledger.publish(report("b", "inf"), path=tmp_path / "store" / "b", write=writer())
    reopened = PrivacyLedger(ledger.path, max_total_epsilon=5.0)
    assert [r["task_id"] for r in reopened.rows()] == ["a", "b"]
    assert reopened.spent() == 2.0  # a non-private release is recorded, never budgeted
    reopened.check(3.0)
    reopened.check(math.inf)
    with pytest.raises(BudgetExceededError, match=r"max_total_epsilon=5\.0"):
        reopened.check(3.5)


def test_the_ledger_is_wal_and_owner_only(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "new" / LEDGER_FILE)
    ledger.publish(report("a"), path=tmp_path / "a", write=writer())
    assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ledger.path.parent.stat().st_mode) == 0o700
    with sqlite3.connect(ledger.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_recorded_id_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE)
    ledger.publish(report("a", 1.0), path=tmp_path / "a", write=writer(b"first"))
    second = writer(b"second")
    with pytest.raises(DuplicateReleaseError, match=r"task_id='a' is already recorded"):
        ledger.publish(report("a", 1.0), path=tmp_path / "a2", write=second)
    with pytest.raises(DuplicateReleaseError):
        ledger.record(report("a", 1.0), release_path=tmp_path / "a")
    assert second.calls == [] and not (tmp_path / "a2").exists()
    assert (tmp_path / "a").read_bytes() == b"first"
    assert len(ledger.rows()) == 1 and ledger.spent() == 1.0  # charged once


def test_the_cap_is_checked_in_the_recording_transaction(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE, max_total_epsilon=3.0)
    ledger.publish(report("a", 2.0), path=tmp_path / "a", write=writer())
    late = writer()
    with pytest.raises(BudgetExceededError, match=r"epsilon=1\.5 would bring the ledger to 3\.5"):
        ledger.publish(report("b", 1.5), path=tmp_path / "b", write=late)
    assert late.calls == [] and [r["task_id"] for r in ledger.rows()] == ["a"]


def test_a_failure_between_file_and_commit_leaves_an_orphan_file_and_no_row(
    tmp_path: Path,
) -> None:
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE)
    inner = writer(b"orphan")

    def write_then_die(path: Path) -> None:
        inner(path)
        raise KeyboardInterrupt  # the process is stopped after the rename, before the commit

    with pytest.raises(KeyboardInterrupt):
        ledger.publish(report("a", 2.0), path=tmp_path / "a", write=write_then_die)
    assert (tmp_path / "a").read_bytes() == b"orphan"  # published file, never recorded
    assert ledger.rows() == [] and ledger.spent() == 0.0
    # The id was never charged, so the task can still be recorded once.
    ledger.publish(report("a", 2.0), path=tmp_path / "a", write=writer(b"again"))
    assert [r["digest"] for r in ledger.rows()] == [file_digest(tmp_path / "a")]


CRASH = """
import os, sys
from pathlib import Path
from fedsynth.server.ledger import PrivacyLedger

folder = Path(sys.argv[1])
ledger = PrivacyLedger(folder / "ledger.sqlite")

def write(path):
    path.write_bytes(b"written before the crash")
    os.fsync(os.open(path, os.O_RDONLY))
    os._exit(17)  # killed: no rollback, no commit, no cleanup

ledger.publish(
    {"task_id": "crashed", "epsilon": 2.0, "delta": 1e-5, "trust_mode": "central",
     "survivors": 3},
    path=folder / "crashed.safetensors",
    write=write,
)
"""


def test_a_process_killed_before_the_commit_records_nothing(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE)
    ledger.publish(report("before", 1.0), path=tmp_path / "before", write=writer())
    proc = subprocess.run(
        [sys.executable, "-c", CRASH, str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 17, proc.stderr
    assert (tmp_path / "crashed.safetensors").exists()  # an orphan file...
    reopened = PrivacyLedger(tmp_path / LEDGER_FILE)  # ...and a ledger that reopens cleanly
    assert [r["task_id"] for r in reopened.rows()] == ["before"]
    assert reopened.spent() == 1.0
    reopened.publish(report("after", 1.0), path=tmp_path / "after", write=writer())
    assert [r["task_id"] for r in reopened.rows()] == ["before", "after"]


WORKER = """
import sys
from pathlib import Path
from fedsynth.protocol.errors import BudgetExceededError, DuplicateReleaseError
from fedsynth.server.ledger import PrivacyLedger

folder, name = Path(sys.argv[1]), sys.argv[2]
ledger = PrivacyLedger(folder / "ledger.sqlite", max_total_epsilon=15.0)
outcomes = []
for i in range(12):
    # Half the ids are shared by both processes: each may be recorded once only.
    task_id = f"shared-{i}" if i % 2 else f"{name}-{i}"
    try:
        ledger.publish(
            {"task_id": task_id, "epsilon": 1.0, "delta": 1e-5, "trust_mode": "distributed",
             "survivors": 3},
            path=folder / f"{name}-{i}.bin",
            write=lambda p: p.write_bytes(task_id.encode()),
        )
        outcomes.append("ok")
    except DuplicateReleaseError:
        outcomes.append("dup")
    except BudgetExceededError:
        outcomes.append("cap")
print(",".join(outcomes))
"""


def test_two_processes_never_exceed_the_cap_or_record_an_id_twice(tmp_path: Path) -> None:
    PrivacyLedger(tmp_path / LEDGER_FILE).rows()  # created once, so both open the same schema
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("p", "q")
    ]
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outcomes += out.strip().split(",")
    rows = PrivacyLedger(tmp_path / LEDGER_FILE).rows()
    ids = [r["task_id"] for r in rows]
    assert len(ids) == len(set(ids))  # no id charged twice
    assert len(rows) == outcomes.count("ok") == 15  # the cap is reached and never passed
    assert PrivacyLedger(tmp_path / LEDGER_FILE).spent() == 15.0
    assert outcomes.count("cap") >= 1
    for row in rows:  # every row points at the file it recorded
        assert file_digest(Path(row["release"])) == row["digest"]


def test_a_pe_charge_is_recorded_first_and_bound_to_its_file_later(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE)
    checkpoint = tmp_path / "pe.checkpoint"
    checkpoint.mkdir()
    ledger.record(report("pe-1", 3.0, survivors=">= t = 2 per round"), release_path=checkpoint)
    [charged] = ledger.rows()
    assert charged["digest"] is None and charged["survivors"] == ">= t = 2 per round"
    ledger.attach("pe-1", path=tmp_path / "pe-1.json", write=writer(b"{}"), participants=3)
    [done] = ledger.rows()
    assert done["digest"] == file_digest(tmp_path / "pe-1.json") and done["survivors"] == 3
    assert ledger.spent() == 3.0
    with pytest.raises(LedgerError, match="task_id='pe-2' has no row"):
        ledger.attach("pe-2", path=tmp_path / "pe-2.json", write=writer())
    assert not (tmp_path / "pe-2.json").exists()


def test_rows_of_an_older_json_lines_ledger_stay_spent(tmp_path: Path) -> None:
    legacy = tmp_path / "ledger.jsonl"
    lines = [
        json.dumps(
            {
                "task_id": "old",
                "epsilon": "2.5",
                "delta": 1e-5,
                "trust_mode": "local",
                "survivors": 3,
                "release": str(tmp_path / "old.safetensors"),
            }
        ),
        '{"task_id": "torn", "epsilon": "9',  # a crash mid-append
    ]
    legacy.write_text("\n".join(lines))
    ledger = PrivacyLedger(ledger_path(tmp_path), max_total_epsilon=4.0)
    assert [r["task_id"] for r in ledger.rows()] == ["old"]
    assert ledger.spent() == 2.5
    with pytest.raises(BudgetExceededError):
        ledger.check(2.0)


def test_a_foreign_or_corrupt_file_is_never_guessed_around(tmp_path: Path) -> None:
    foreign = tmp_path / "other.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(LedgerError, match="not a fedsynth coordinator ledger"):
        PrivacyLedger(foreign).rows()
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database file at all" * 100)
    with pytest.raises(LedgerError, match="unreadable or unavailable"):
        PrivacyLedger(garbage).spent()
    with pytest.raises(LedgerError, match="no ledger at"):
        ledger_rows(tmp_path / "empty")


def test_refusals_are_counted_by_category_only() -> None:
    counts = refusal_counts(
        {"1": "setup: model", "2": "unmask: protocol", "3": "a b c", "4": "data"}
    )
    assert counts == {"data": 1, "model": 1, "protocol": 2}


def test_the_ledger_command_prints_every_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(task_cli, "console", Console(width=200))
    ledger = PrivacyLedger(ledger_path(tmp_path))
    ledger.publish(
        report("dv-1", 4.0, refused_or_failed={"9": "setup: policy"}),
        path=tmp_path / "dv-1.safetensors",
        write=writer(),
    )
    app = typer.Typer()
    app.command()(ledger_command)
    result = CliRunner().invoke(app, [str(tmp_path)])
    assert result.exit_code == 0, result.output
    for text in ("dv-1", "vector", "4.0", "1e-05", "distributed", "policy 1", "sha256:"):
        assert text in result.output
    result = CliRunner().invoke(app, [str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no ledger at" in result.output
