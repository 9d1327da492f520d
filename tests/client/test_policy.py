"""Tests of a data holder's own privacy policy and persistent epsilon budget."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedsynth.client.policy import ClientBudget, ClientPolicy
from fedsynth.protocol.durable import append_json_line
from fedsynth.protocol.errors import (
    BudgetExceededError,
    ConfigError,
    PolicyViolationError,
)
from fedsynth.protocol.features import PromptTemplate
from fedsynth.protocol.manifest import PrivacySpec, TaskManifest, array_sha256

TEMPLATE = PromptTemplate(instruction="{label}: ", label_names=(("a", "A"), ("b", "B")))
FINGERPRINT = "sha256:" + "cd" * 32


def make_manifest(task_id: str = "task-1", **privacy_overrides: Any) -> TaskManifest:
    fields: dict[str, Any] = {
        "epsilon": 4.0,
        "delta": 1e-6,
        "mode": "distributed",
        "threshold": 2,
        "total_variance": 100.0,
        "noise_multiplier": 1.0,
        "l2_sensitivity": 1.0,
        "l1_sensitivity": 1.0,
        "accountant": "rdp",
    }
    fields.update(privacy_overrides)
    if math.isinf(fields["epsilon"]):
        fields["total_variance"] = 0.0
    return TaskManifest(
        task_id=task_id,
        model_name="tiny",
        model_fingerprint=FINGERPRINT,
        hidden_size=4,
        template=TEMPLATE,
        layers=(0,),
        max_text_tokens=8,
        clip_norms=(1.0,),
        residual_norms=(1.0,),
        count_weight=0.5,
        scale=100.0,
        bits=48,
        node_ids=(1, 2, 3),
        privacy=PrivacySpec(**fields),
        reference_sha256=array_sha256(np.zeros((2, 1, 4), dtype=np.float32)),
    )


def test_default_policy_accepts_a_reasonable_task() -> None:
    ClientPolicy().check(make_manifest(), spent=0.0, n_records=100)
    ClientPolicy().check(make_manifest(), spent=0.0, n_records=None)


@pytest.mark.parametrize(
    ("policy", "manifest", "spent", "n_records", "error", "field"),
    [
        (
            ClientPolicy(allowed_modes=("distributed",)),
            make_manifest(mode="local"),
            0.0,
            100,
            PolicyViolationError,
            "mode='local'",
        ),
        (
            ClientPolicy(max_epsilon_per_task=2.0),
            make_manifest(epsilon=4.0),
            0.0,
            100,
            PolicyViolationError,
            "epsilon=4.0 exceeds max_epsilon_per_task=2.0",
        ),
        (
            ClientPolicy(),
            make_manifest(epsilon=math.inf),
            0.0,
            100,
            PolicyViolationError,
            "epsilon=inf",
        ),
        (
            ClientPolicy(max_delta=1e-7),
            make_manifest(delta=1e-6),
            0.0,
            100,
            PolicyViolationError,
            "delta=1e-06 exceeds max_delta",
        ),
        (
            ClientPolicy(),
            make_manifest(delta=1e-5),
            0.0,
            100_000,  # delta must be strictly below 1/n
            PolicyViolationError,
            "delta=1e-05 must be below 1/n",
        ),
        (
            ClientPolicy(min_threshold=3),
            make_manifest(threshold=2),
            0.0,
            100,
            PolicyViolationError,
            "threshold t=2 is below min_threshold=3",
        ),
        (
            ClientPolicy(allowed_fingerprints=("sha256:" + "00" * 32,)),
            make_manifest(),
            0.0,
            100,
            PolicyViolationError,
            "model_fingerprint",
        ),
        (
            ClientPolicy(max_epsilon_per_task=4.0, max_total_epsilon=10.0),
            make_manifest(epsilon=4.0),
            6.5,
            100,
            BudgetExceededError,
            "max_total_epsilon=10.0",
        ),
    ],
)
def test_policy_refusals_name_the_field(
    policy: ClientPolicy,
    manifest: TaskManifest,
    spent: float,
    n_records: int | None,
    error: type[Exception],
    field: str,
) -> None:
    with pytest.raises(error, match=field):
        policy.check(manifest, spent=spent, n_records=n_records)


def test_policy_boundaries_are_accepted() -> None:
    policy = ClientPolicy(max_epsilon_per_task=4.0, max_total_epsilon=10.0, max_delta=1e-6)
    policy.check(make_manifest(epsilon=4.0, delta=1e-6), spent=6.0, n_records=999_999)
    policy.check(
        make_manifest(threshold=3),
        spent=0.0,
        n_records=1,
    )
    allowed = ClientPolicy(allowed_fingerprints=(FINGERPRINT,))
    allowed.check(make_manifest(), spent=0.0, n_records=10)


def test_non_private_task_with_consent_ignores_the_budget() -> None:
    policy = ClientPolicy(allow_non_private=True, max_epsilon_per_task=1.0, max_total_epsilon=1.0)
    policy.check(make_manifest(epsilon=math.inf), spent=1.0, n_records=10)


def test_policy_errors_are_not_budget_errors_unless_budget() -> None:
    with pytest.raises(PolicyViolationError) as info:
        ClientPolicy(max_epsilon_per_task=2.0).check(make_manifest(), spent=0.0, n_records=10)
    assert not isinstance(info.value, BudgetExceededError)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_epsilon_per_task": 0.0}, "max_epsilon_per_task"),
        ({"max_epsilon_per_task": 8.0, "max_total_epsilon": 4.0}, "max_total_epsilon"),
        ({"min_threshold": 1}, "min_threshold"),
    ],
)
def test_policy_validation(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        ClientPolicy(**kwargs)


# ---------------------------------------------------------------------------------------------
# ClientBudget
# ---------------------------------------------------------------------------------------------


def test_budget_charges_once_per_task_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "budget.jsonl"
    budget = ClientBudget(path)
    assert budget.spent() == 0.0
    assert not budget.has("task-1")
    budget.charge(make_manifest("task-1", epsilon=3.0))
    budget.charge(make_manifest("task-1", epsilon=3.0))  # a retried stage: not charged again
    assert budget.spent() == 3.0
    assert budget.has("task-1")
    budget.charge(make_manifest("task-2", epsilon=1.5, mode="local"))
    budget.charge(make_manifest("task-3", epsilon=math.inf))
    assert budget.spent() == 4.5  # infinite epsilon is recorded, not summed

    reopened = ClientBudget(path)
    assert reopened.spent() == 4.5
    assert reopened.has("task-1") and reopened.has("task-2") and reopened.has("task-3")
    assert not reopened.has("task-4")
    entries = reopened.entries()
    assert [e["task_id"] for e in entries] == ["task-1", "task-2", "task-3"]
    assert entries[1]["mode"] == "local"
    assert entries[2]["epsilon"] == "inf"
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert all(json.loads(line) for line in lines)


def test_budget_feeds_the_policy(tmp_path: Path) -> None:
    budget = ClientBudget(tmp_path / "budget.jsonl")
    policy = ClientPolicy(max_epsilon_per_task=4.0, max_total_epsilon=7.0)
    first = make_manifest("first", epsilon=4.0)
    policy.check(first, spent=budget.spent(), n_records=10)
    budget.charge(first)
    with pytest.raises(BudgetExceededError, match="spent 4"):
        policy.check(make_manifest("second", epsilon=4.0), spent=budget.spent(), n_records=10)
    policy.check(make_manifest("third", epsilon=3.0), spent=budget.spent(), n_records=10)


def test_budget_without_path_tracks_nothing() -> None:
    budget = ClientBudget(None)
    budget.charge(make_manifest())
    assert budget.spent() == 0.0
    assert not budget.has("task-1")
    assert budget.entries() == []


def test_torn_budget_line_fails_safe_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "budget.jsonl"
    budget = ClientBudget(path)
    budget.charge(make_manifest("task-1", epsilon=2.0))
    with path.open("a") as handle:
        handle.write('{"task_id": "task-2", "epsi')  # a crash mid-write
    with pytest.raises(PolicyViolationError, match="line 2"):
        budget.spent()
    with pytest.raises(PolicyViolationError, match="line 2"):
        budget.charge(make_manifest("task-3", epsilon=1.0))  # nothing is charged on top
    assert "task-3" not in path.read_text()


def test_durable_append_starts_a_fresh_line_after_a_torn_one(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"torn')
    append_json_line(path, {"b": 2})
    assert path.read_text().splitlines() == ['{"a": 1}', '{"torn', '{"b": 2}']
