"""Tests that pin what mutation testing found unchecked in a holder's budget store.

``scripts/mutmut.sh client/budget.py`` (against ``test_budget.py`` and ``test_policy.py``) left
alive: a charge that checks and writes outside one ``BEGIN IMMEDIATE`` transaction (two
concurrent setups both pass the cap), readers that take the write lock (a reader waits behind
a charge in progress), the stored terms' keys and canonical text (the store outlives a version:
a renamed key would make the next version refuse the later rounds of a running PE task as
"other terms"), a same task id under other non-privacy terms taken for a plain repeat, PE
round rows that the ledger listing could not read, what a store without a path passes to the
policy check, and the refusals' texts.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from manifests import FINGERPRINT, TEMPLATE, make_manifest

from fedsynth.client.budget import (
    ClientBudget,
    SpendCheck,
    canonical_terms,
    pe_task_terms,
    privacy_terms,
    vector_task_terms,
)
from fedsynth.protocol.accounting import calibrate_pe
from fedsynth.protocol.embedding import HashingEmbedder
from fedsynth.protocol.errors import (
    BudgetExceededError,
    BudgetStoreError,
    PolicyViolationError,
    StageOrderError,
)
from fedsynth.protocol.pe_manifest import PERoundManifest
from fedsynth.server.pe_coordinator import PEConfig, build_round_manifest

EMBEDDER = HashingEmbedder(32)


def pe_round(pe_task_id: str, round_number: int = 1, *, epsilon: float = 2.0) -> PERoundManifest:
    config = PEConfig(labels=("sport", "cooking"), rounds=3, per_label=4, keep=2, epsilon=epsilon)
    calibration = calibrate_pe(mode="distributed", epsilon=epsilon, delta=1e-5, rounds=3)
    words = np.random.default_rng(round_number).integers(0, 99, size=8)
    return build_round_manifest(
        config,
        calibration,
        pe_task_id=pe_task_id,
        round_number=round_number,
        embedder=EMBEDDER,
        candidates=EMBEDDER.embed([f"word{int(w)}" for w in words]),
        nodes=(11, 12, 13),
    )


# -- the stored format -------------------------------------------------------------------------


def test_the_stored_terms_of_a_vector_task_are_these_keys(tmp_path: Path) -> None:
    manifest = make_manifest("t", epsilon=3.0)
    budget = ClientBudget(tmp_path / "budget.sqlite")
    budget.charge(manifest)
    assert budget.terms("t") == {
        "kind": "dataset_vector",
        "privacy": json.loads(json.dumps(privacy_terms(manifest.privacy))),
        "model_fingerprint": FINGERPRINT,
        "layers": [0],
        "labels": list(TEMPLATE.labels),
        "clip_norms": [1.0],
        "count_weight": 0.5,
        "scale": 100.0,
        "bits": 48,
        "max_records": 1_000_000,
    }
    assert budget.terms("t") == json.loads(canonical_terms(vector_task_terms(manifest)))
    assert privacy_terms(manifest.privacy)["epsilon"] == "3.0"
    assert privacy_terms(make_manifest(epsilon=math.inf).privacy)["epsilon"] == "inf"


def test_the_stored_terms_of_a_pe_task_are_these_keys() -> None:
    manifest = pe_round("pe-a")
    assert pe_task_terms(manifest) == {
        "kind": "pe_votes",
        "privacy": privacy_terms(manifest.privacy),
        "rounds": 3,
        "top_k": manifest.top_k,
        "embedder_fingerprint": EMBEDDER.fingerprint,
        "embedding_dim": 32,
        "labels": ["sport", "cooking"],
    }


def test_canonical_terms_are_compact_key_sorted_json_without_nan() -> None:
    assert canonical_terms({"b": 1, "a": [1.5, "x"]}) == '{"a":[1.5,"x"],"b":1}'
    with pytest.raises(ValueError):
        canonical_terms({"a": math.nan})


# -- charging ----------------------------------------------------------------------------------


def test_a_task_id_under_other_model_terms_is_named_as_such(tmp_path: Path) -> None:
    budget = ClientBudget(tmp_path / "budget.sqlite")
    first = make_manifest("t", epsilon=3.0)
    budget.charge(first)
    with pytest.raises(PolicyViolationError) as caught:
        budget.charge(first)
    assert "'t' was already contributed to" in str(caught.value)
    assert "a second contribution would spend its epsilon again" in str(caught.value)
    # Same privacy terms, another model: not a repeat of the task it was charged for.
    other = make_manifest("t", epsilon=3.0)
    other = type(other)(**{**other.__dict__, "model_fingerprint": "sha256:" + "ef" * 32})
    with pytest.raises(PolicyViolationError) as caught:
        budget.charge(other)
    assert (
        "the same task id with new terms (epsilon, noise, rounds, embedder, labels) is refused"
        in (str(caught.value))
    )


def test_charge_task_says_whether_it_charged(tmp_path: Path) -> None:
    budget = ClientBudget(tmp_path / "budget.sqlite")
    privacy = make_manifest(epsilon=2.0).privacy
    terms = {"privacy": privacy_terms(privacy), "rounds": 3}
    assert budget.charge_task("x", privacy, terms=terms) is True
    assert budget.charge_task("x", privacy, terms=terms) is False  # the same terms again
    with pytest.raises(PolicyViolationError, match="other terms"):
        budget.charge_task("x", privacy, terms={**terms, "rounds": 4})
    assert budget.spent() == 2.0


def test_the_listing_reads_pe_round_rows(tmp_path: Path) -> None:
    budget = ClientBudget(tmp_path / "budget.sqlite")
    budget.charge_pe_round(pe_round("pe-a", 1))
    budget.charge_pe_round(pe_round("pe-a", 2))
    assert budget.entries() == [
        {"task_id": "pe-a", "epsilon": "2.0", "delta": 1e-5, "mode": "distributed"},
        {"task_id": "pe-a", "epsilon": "0", "round": 1, "kind": "pe-round"},
        {"task_id": "pe-a", "epsilon": "0", "round": 2, "kind": "pe-round"},
    ]
    assert budget.spent() == 2.0 and budget.last_round("pe-a") == 2


def test_record_round_keeps_the_latest_round_only(tmp_path: Path) -> None:
    budget = ClientBudget(tmp_path / "budget.sqlite")
    budget.record_round("pe-b", 3)
    budget.record_round("pe-b", 2)  # older: nothing recorded
    budget.record_round("pe-b", 3)  # the same: nothing recorded
    assert budget.last_round("pe-b") == 3
    assert [e.get("round") for e in budget.entries()] == [3]
    ClientBudget(None).record_round("pe-b", 4)  # keeps nothing, raises nothing


def test_a_store_without_a_path_passes_nothing_spent_to_the_check() -> None:
    seen: list[tuple[float, float]] = []
    budget = ClientBudget(None)
    assert (
        budget.charge_task("x", make_manifest().privacy, check=lambda e, d: seen.append((e, d)))
        is False
    )
    budget.charge_pe_round(pe_round("pe-a"), check=lambda e, d: seen.append((e, d)))
    assert seen == [(0.0, 0.0), (0.0, 0.0)]
    assert budget.spending() == (0.0, 0.0) and budget.last_round("pe-a") == 0
    with pytest.raises(BudgetExceededError):
        budget.charge(make_manifest(), check=_refuse)


def _refuse(_epsilon: float, _delta: float) -> None:
    raise BudgetExceededError("refused")


# -- one transaction per charge ----------------------------------------------------------------


def _race(*charges: Callable[[], object]) -> list[str]:
    """Run two charges at once, each holding its transaction open inside its check."""
    barrier = threading.Barrier(len(charges))
    outcome: list[str] = []

    def run(charge: Callable[[], object]) -> None:
        barrier.wait(timeout=30)
        try:
            charge()
        except (PolicyViolationError, BudgetStoreError) as exc:
            outcome.append(type(exc).__name__)
        else:
            outcome.append("charged")

    threads = [threading.Thread(target=run, args=(c,)) for c in charges]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return sorted(outcome)


def _slow_cap(cap: float, epsilon: float) -> SpendCheck:
    def check(spent: float, _delta: float) -> None:
        time.sleep(0.3)  # the other charge reaches its own check meanwhile, unless it waits
        if spent + epsilon > cap:
            raise BudgetExceededError(f"{spent} + {epsilon} > {cap}")

    return check


def test_two_charges_at_once_see_each_other(tmp_path: Path) -> None:
    path = tmp_path / "budget.sqlite"
    ClientBudget(path).spent()  # the store exists before the race
    check = _slow_cap(6.0, 4.0)
    outcome = _race(
        lambda: ClientBudget(path).charge(make_manifest("a", epsilon=4.0), check=check),
        lambda: ClientBudget(path).charge(make_manifest("b", epsilon=4.0), check=check),
    )
    # The second waits for the first's transaction, then its check sees 4.0 spent: a refusal
    # by the cap, not a store error after both passed a check on nothing spent.
    assert outcome == ["BudgetExceededError", "charged"]
    assert ClientBudget(path).spent() == 4.0


def test_two_pe_first_rounds_at_once_see_each_other(tmp_path: Path) -> None:
    path = tmp_path / "budget.sqlite"
    ClientBudget(path).spent()
    check = _slow_cap(3.0, 2.0)
    outcome = _race(
        lambda: ClientBudget(path).charge_pe_round(pe_round("pe-a"), check=check),
        lambda: ClientBudget(path).charge_pe_round(pe_round("pe-b"), check=check),
    )
    assert outcome == ["BudgetExceededError", "charged"]
    assert ClientBudget(path).spent() == 2.0


def test_readers_go_on_while_a_charge_holds_its_transaction(tmp_path: Path) -> None:
    path = tmp_path / "budget.sqlite"
    ClientBudget(path).charge(make_manifest("earlier", epsilon=1.0))
    inside, release = threading.Event(), threading.Event()

    def hold(_spent: float, _delta: float) -> None:
        inside.set()
        release.wait(timeout=20)

    writer = threading.Thread(
        target=lambda: ClientBudget(path).charge(make_manifest("t", epsilon=2.0), check=hold)
    )
    writer.start()
    try:
        assert inside.wait(timeout=20)
        reader = ClientBudget(path, timeout_s=2.0)  # a reader that took the lock would time out
        assert reader.spending() == (1.0, 1e-6)
        assert reader.spent() == 1.0 and reader.terms("t") is None
        assert reader.last_round("t") == 0
        assert [e["task_id"] for e in reader.entries()] == ["earlier"]
    finally:
        release.set()
        writer.join(timeout=30)
    assert ClientBudget(path).spent() == 3.0


# -- refusals ----------------------------------------------------------------------------------


def test_store_refusals_say_what_the_operator_must_do(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(BudgetStoreError) as caught:
        ClientBudget(blocker / "budget.sqlite").spent()  # a parent that is a file
    assert "cannot be created (" in str(caught.value)
    assert "this holder refuses tasks until it can keep its budget" in str(caught.value)

    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (x TEXT)")
    with pytest.raises(BudgetStoreError) as caught:
        ClientBudget(other).spent()
    assert "point budget-path at a new file or restore the store" in str(caught.value)

    torn = tmp_path / "torn.sqlite"
    torn.write_bytes(b"SQLite format 3\x00" + b"\xff" * 200)
    with pytest.raises(BudgetStoreError) as caught:
        ClientBudget(torn).spent()
    assert "until an operator repairs or restores it (nothing is guessed or charged)" in str(
        caught.value
    )

    path = tmp_path / "budget.sqlite"
    ClientBudget(path).charge(make_manifest("t", epsilon=2.0))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE entries SET terms = 'not json' WHERE task_id = 't'")
    with pytest.raises(BudgetStoreError) as caught:
        ClientBudget(path).terms("t")
    assert str(caught.value) == (
        f"budget store {path}: entry 1 has unreadable task terms; repair or restore the store "
        "before this holder takes part in new tasks"
    )
    with sqlite3.connect(path) as db:
        db.execute("UPDATE entries SET epsilon = '-1.0' WHERE task_id = 't'")
    with pytest.raises(BudgetStoreError) as caught:
        ClientBudget(path).spent()
    assert str(caught.value) == (
        f"budget store {path}: entry 1 has epsilon='-1.0', not a number >= 0; repair or "
        "restore the store before this holder takes part in new tasks"
    )


def test_a_round_answered_twice_is_named(tmp_path: Path) -> None:
    budget = ClientBudget(tmp_path / "budget.sqlite")
    budget.charge_pe_round(pe_round("pe-a", 2))
    with pytest.raises(StageOrderError, match=r"answering again would release its votes twice$"):
        budget.charge_pe_round(pe_round("pe-a", 1))
