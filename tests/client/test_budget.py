"""Tests of a holder's budget store: atomic check-and-charge, persisted task terms, fail closed."""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import RecordDict
from manifests import TEMPLATE, make_manifest

from fedsynth.client.budget import ClientBudget, pe_task_terms
from fedsynth.client.contributor import Contributor
from fedsynth.client.pe_voter import PEVoter
from fedsynth.client.policy import ClientPolicy
from fedsynth.client.settings import ClientSettings
from fedsynth.protocol.accounting import calibrate_pe
from fedsynth.protocol.embedding import HashingEmbedder
from fedsynth.protocol.errors import (
    BudgetExceededError,
    BudgetStoreError,
    ConfigError,
    FedSynthError,
    PolicyViolationError,
    StageOrderError,
)
from fedsynth.protocol.identity import simulated_member, write_simulated_consortium
from fedsynth.protocol.messages import Envelope, pack, vector_to_bytes
from fedsynth.protocol.pe_manifest import PERoundManifest
from fedsynth.server.pe_coordinator import PEConfig, build_round_manifest

PE_LABELS = ("sport", "cooking")
PE_NODES = (11, 12, 13)


def write_records(path: Path, n: int = 6) -> Path:
    rows = [{"text": f"text {i}", "label": TEMPLATE.labels[i % 2]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


def test_budget_charges_a_task_once_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "budget.sqlite"
    budget = ClientBudget(path)
    assert budget.spent() == 0.0
    assert not budget.has("task-1")
    budget.charge(make_manifest("task-1", epsilon=3.0))
    # A second contribution to one task (new keys, fresh noise) is refused, not charged again.
    with pytest.raises(PolicyViolationError, match=r"task-1.*already contributed"):
        budget.charge(make_manifest("task-1", epsilon=3.0))
    assert budget.spent() == 3.0
    budget.charge(make_manifest("task-2", epsilon=1.5, mode="local"))
    budget.charge(make_manifest("task-3", epsilon=math.inf))
    assert budget.spent() == 4.5  # infinite epsilon is recorded, not summed
    assert budget.spent(exclude="task-1") == 1.5

    reopened = ClientBudget(path)
    assert reopened.spent() == 4.5
    assert reopened.has("task-1") and reopened.has("task-2") and reopened.has("task-3")
    assert not reopened.has("task-4")
    entries = reopened.entries()
    assert [e["task_id"] for e in entries] == ["task-1", "task-2", "task-3"]
    assert entries[1]["mode"] == "local"
    assert entries[2]["epsilon"] == "inf"
    terms = reopened.terms("task-2")
    assert terms is not None and terms["privacy"]["epsilon"] == "1.5"
    with sqlite3.connect(path) as db:  # a real SQLite store in WAL mode
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 3


def test_the_charge_rechecks_the_policy_against_the_store(tmp_path: Path) -> None:
    path = tmp_path / "budget.sqlite"
    policy = ClientPolicy(max_epsilon_per_task=4.0, max_total_epsilon=7.0)
    first, second = make_manifest("first", epsilon=4.0), make_manifest("second", epsilon=4.0)
    # Both tasks were accepted at setup, when nothing was spent yet.
    policy.check(first, spent=ClientBudget(path).spent(), n_records=10)
    policy.check(second, spent=ClientBudget(path).spent(), n_records=10)
    ClientBudget(path).charge(
        first, check=lambda spent, _: policy.check(first, spent=spent, n_records=10)
    )
    with pytest.raises(BudgetExceededError, match=r"max_total_epsilon=7.0"):
        ClientBudget(path).charge(
            second, check=lambda spent, _: policy.check(second, spent=spent, n_records=10)
        )
    assert ClientBudget(path).spent() == 4.0
    assert not ClientBudget(path).has("second")  # the refused charge wrote nothing


def test_deltas_compose_like_epsilons_against_their_own_lifetime_cap(tmp_path: Path) -> None:
    """Basic composition adds the deltas too: a holder's store sums those of its tasks of
    finite epsilon, and the charge refuses one that would pass max_total_delta."""
    path = tmp_path / "budget.sqlite"
    policy = ClientPolicy(max_delta=1e-5, max_total_delta=2.5e-5, allow_non_private=True)

    def charge(manifest: Any) -> None:
        ClientBudget(path).charge(
            manifest,
            check=lambda spent, spent_delta: policy.check(
                manifest, spent=spent, spent_delta=spent_delta, n_records=10
            ),
        )

    charge(make_manifest("one", epsilon=1.0, delta=1e-5))
    charge(make_manifest("free", epsilon=math.inf, delta=1e-5))  # no guarantee: not counted
    charge(make_manifest("two", epsilon=1.0, delta=1e-5))
    assert ClientBudget(path).spent_delta() == pytest.approx(2e-5)
    assert ClientBudget(path).spent_delta(exclude="two") == pytest.approx(1e-5)
    with pytest.raises(BudgetExceededError, match=r"max_total_delta=2.5e-05 \(spent 2e-05\)"):
        charge(make_manifest("three", epsilon=1.0, delta=1e-5))
    assert not ClientBudget(path).has("three")
    charge(make_manifest("small", epsilon=1.0, delta=5e-6))  # what still fits is charged
    with pytest.raises(ConfigError, match="max_total_delta=1e-06: must be >= max_delta"):
        ClientPolicy(max_delta=1e-5, max_total_delta=1e-6)


def _charge_at_the_same_time(
    data: str, budget: str, task_id: str, barrier: Any, results: Any
) -> None:
    """One holder process: accept a task at setup, then commit it when the other one does."""
    policy = ClientPolicy(max_epsilon_per_task=4.0, max_total_epsilon=6.0)
    settings = ClientSettings(data_path=Path(data), policy=policy, budget_path=Path(budget))
    manifest = make_manifest(task_id, epsilon=4.0)
    contributor = Contributor(settings, node_id=1, model_loader=lambda: None)  # type: ignore[arg-type,return-value]
    n_records = contributor.record_count(manifest.labels)
    try:
        # Setup: the store shows nothing spent, so each task alone fits the cap.
        policy.check(manifest, spent=ClientBudget(Path(budget)).spent(), n_records=n_records)
        barrier.wait(timeout=60)
        contributor.committed(manifest, RecordDict())  # the point of no return
    except FedSynthError as exc:
        results.put((task_id, type(exc).__name__))
    else:
        results.put((task_id, "charged"))


def test_two_processes_setting_up_two_tasks_at_once_cannot_overspend(tmp_path: Path) -> None:
    data = write_records(tmp_path / "data.jsonl")
    budget = tmp_path / "budget.sqlite"
    ClientBudget(budget).spent()  # the store exists before the race
    # Two real processes (forked: each opens its own connection to the one store file).
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    results = context.Queue()
    workers = [
        context.Process(
            target=_charge_at_the_same_time,
            args=(str(data), str(budget), task_id, barrier, results),
        )
        for task_id in ("task-a", "task-b")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    outcome = dict(results.get(timeout=10) for _ in workers)
    # The lifetime cap (6.0) admits one of the two 4.0 tasks; the other is refused at commit,
    # before its masked input could leave.
    assert sorted(outcome.values()) == ["BudgetExceededError", "charged"]
    store = ClientBudget(budget)
    assert store.spent() == 4.0
    charged = [task for task, what in outcome.items() if what == "charged"]
    assert [e["task_id"] for e in store.entries()] == charged


def test_a_task_id_seen_again_with_other_terms_is_refused(tmp_path: Path) -> None:
    budget = ClientBudget(tmp_path / "budget.sqlite")
    budget.charge_task("pe-x", make_manifest(epsilon=2.0).privacy)
    assert not budget.charge_task("pe-x", make_manifest(epsilon=2.0).privacy)  # same terms: ok
    with pytest.raises(PolicyViolationError, match=r"pe-x.*other terms"):
        budget.charge_task("pe-x", make_manifest(epsilon=8.0).privacy)
    with pytest.raises(PolicyViolationError, match="other terms"):
        budget.charge_task("pe-x", make_manifest(epsilon=2.0, total_variance=1e-9).privacy)
    assert budget.spent() == 2.0


def test_budget_without_path_tracks_nothing() -> None:
    budget = ClientBudget(None)
    budget.charge(make_manifest())
    assert budget.spent() == 0.0
    assert not budget.has("task-1")
    assert budget.entries() == []


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p.write_bytes(b'{"task_id": "task-1", "epsi'), id="torn-json"),
        pytest.param(lambda p: p.write_bytes(b"SQLite format 3\x00" + b"\xff" * 200), id="header"),
    ],
)
def test_an_unreadable_store_fails_closed_with_a_clear_error(tmp_path: Path, damage: Any) -> None:
    path = tmp_path / "budget.sqlite"
    damage(path)
    before = path.read_bytes()
    with pytest.raises(BudgetStoreError, match=str(path)):
        ClientBudget(path).spent()
    with pytest.raises(BudgetStoreError, match="budget store"):
        ClientBudget(path).charge(make_manifest("task-3", epsilon=1.0))  # nothing on top
    assert path.read_bytes() == before  # nothing guessed, nothing rewritten


def test_a_corrupt_row_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "budget.sqlite"
    ClientBudget(path).charge(make_manifest("task-1", epsilon=2.0))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE entries SET epsilon = 'two' WHERE task_id = 'task-1'")
    with pytest.raises(BudgetStoreError, match="entry 1 has epsilon='two'"):
        ClientBudget(path).spent()
    with pytest.raises(BudgetStoreError):
        ClientBudget(path).charge(make_manifest("task-2", epsilon=1.0))


def test_another_sqlite_file_is_not_taken_for_a_budget_store(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (x TEXT)")
    with pytest.raises(BudgetStoreError, match="not a fedsynth budget store"):
        ClientBudget(path).spent()


# ---------------------------------------------------------------------------------------------
# PE task terms live in the store, so a restarted node holds a task to its first terms
# ---------------------------------------------------------------------------------------------


def _pe_round(
    embedder: HashingEmbedder, round_number: int, *, epsilon: float
) -> tuple[PERoundManifest, dict[str, object]]:
    config = PEConfig(labels=PE_LABELS, rounds=3, per_label=4, keep=2, epsilon=epsilon, seed=3)
    calibration = calibrate_pe(mode="distributed", epsilon=epsilon, delta=1e-5, rounds=3)
    rng = np.random.default_rng(round_number)
    candidates = embedder.embed([f"word{int(x)}" for x in rng.integers(0, 99, size=8)])
    manifest = build_round_manifest(
        config,
        calibration,
        pe_task_id="pe-restart",
        round_number=round_number,
        embedder=embedder,
        candidates=candidates,
        nodes=PE_NODES,
    )
    fields: dict[str, object] = {
        "manifest": manifest.to_json(),
        "candidates": vector_to_bytes(candidates.reshape(-1)),
    }
    return manifest, fields


def _voter(tmp_path: Path, embedder: HashingEmbedder) -> PEVoter:
    rows = [{"text": f"{label} item {i}", "label": label} for i in range(12) for label in PE_LABELS]
    data = tmp_path / "pe-data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = tmp_path / "ids"
    if not ids.exists():
        ids.mkdir()
        write_simulated_consortium(ids, len(PE_NODES))
    identity, roster = simulated_member(ids, 0)
    settings = ClientSettings(
        data_path=data,
        embedder=embedder.name,
        policy=ClientPolicy(max_epsilon_per_task=8.0),
        budget_path=tmp_path / "budget.sqlite",
        identity=identity,
        roster=roster,
    )
    return PEVoter(settings, node_id=PE_NODES[0], embedder_loader=lambda: embedder)


def test_pe_task_terms_survive_a_restart(tmp_path: Path) -> None:
    embedder = HashingEmbedder(32)
    first, _ = _pe_round(embedder, 1, epsilon=2.0)
    _voter(tmp_path, embedder).committed(first, RecordDict())  # round 1's votes left
    store = ClientBudget(tmp_path / "budget.sqlite")
    assert store.spent() == 2.0
    assert store.terms("pe-restart") == json.loads(json.dumps(pe_task_terms(first)))

    # The node restarts: a new voter, a new store object, an empty node state. The
    # coordinator now raises epsilon from 2 to 8 for the same PE task.
    restarted = _voter(tmp_path, embedder)
    raised, fields = _pe_round(embedder, 2, epsilon=8.0)
    setup = pack(Envelope(raised.task_id, "setup"), fields)
    with pytest.raises(PolicyViolationError, match=r"pe-restart.*other terms"):
        restarted.handle("setup", setup, RecordDict())
    with pytest.raises(PolicyViolationError, match="other terms"):
        restarted.committed(raised, RecordDict())  # the commit re-checks the terms too
    assert ClientBudget(tmp_path / "budget.sqlite").spent() == 2.0  # 8 - 2 never uncharged

    # The same task under its first terms goes on (charged once, round order kept).
    same, fields = _pe_round(embedder, 2, epsilon=2.0)
    restarted.handle("setup", pack(Envelope(same.task_id, "setup"), fields), RecordDict())
    restarted.committed(same, RecordDict())
    assert ClientBudget(tmp_path / "budget.sqlite").spent() == 2.0
    assert ClientBudget(tmp_path / "budget.sqlite").last_round("pe-restart") == 2
    with pytest.raises(StageOrderError, match="already answered round 2"):
        _voter(tmp_path, embedder).committed(same, RecordDict())


def test_pe_first_round_charge_rechecks_the_cap(tmp_path: Path) -> None:
    embedder = HashingEmbedder(32)
    voter = _voter(tmp_path, embedder)
    voter = PEVoter(
        dataclasses.replace(
            voter.settings, policy=ClientPolicy(max_epsilon_per_task=8.0, max_total_epsilon=9.0)
        ),
        node_id=PE_NODES[0],
        embedder_loader=lambda: embedder,
    )
    ClientBudget(tmp_path / "budget.sqlite").charge(make_manifest("earlier", epsilon=8.0))
    manifest, _ = _pe_round(embedder, 1, epsilon=2.0)
    with pytest.raises(BudgetExceededError, match=r"max_total_epsilon=9.0"):
        voter.committed(manifest, RecordDict())
    store = ClientBudget(tmp_path / "budget.sqlite")
    assert store.spent() == 8.0 and store.last_round("pe-restart") == 0
