"""Tests of a data holder's own privacy policy and persistent epsilon budget."""

from __future__ import annotations

import math
from typing import Any

import pytest
from manifests import FINGERPRINT, make_manifest

from fedsynth.client.policy import ClientPolicy, parse_bool, parse_float
from fedsynth.protocol.errors import (
    BudgetExceededError,
    ConfigError,
    PolicyViolationError,
)
from fedsynth.protocol.manifest import TaskManifest


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
            make_manifest(mode="central"),
            0.0,
            100,
            PolicyViolationError,
            "mode='central' is not among the allowed modes",
        ),
        (
            ClientPolicy(max_colluders=1),
            make_manifest(colluders=0),
            0.0,
            100,
            PolicyViolationError,
            "colluders=0: the task's noise shares assume fewer colluding holders than this "
            "holder's max_colluders=1",
        ),
        (
            ClientPolicy(max_records=2000),
            make_manifest(max_records=1999),
            0.0,
            100,
            PolicyViolationError,
            "the task's max_records=1999 is below this holder's max_records=2000",
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
# Consent to non-private releases: strict booleans
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        ("true", True),
        ("TRUE", True),
        ("false", False),
        ("False", False),
    ],
)
def test_booleans_parse_strictly(value: object, expected: bool) -> None:
    assert parse_bool("allow-non-private", value) is expected


@pytest.mark.parametrize("value", ["yes", "no", "0", "1", "", "falsch", 1, 0, 1.0, None])
def test_anything_else_is_not_a_boolean(value: object) -> None:
    with pytest.raises(ConfigError, match=r"allow-non-private=.*must be true or false"):
        parse_bool("allow-non-private", value)


@pytest.mark.parametrize("value", ["false", "true", 1, "no"])
def test_policy_consent_must_be_a_real_bool(value: object) -> None:
    # bool("false") is True: a policy built from text must not read "false" as consent.
    with pytest.raises(ConfigError, match="allow_non_private"):
        ClientPolicy(allow_non_private=value)  # type: ignore[arg-type]


def test_numbers_parse_strictly() -> None:
    assert parse_float("max-epsilon", "4.5") == 4.5
    assert parse_float("max-epsilon", 2) == 2.0
    for bad in ("four", True, None):
        with pytest.raises(ConfigError, match="max-epsilon"):
            parse_float("max-epsilon", bad)


@pytest.mark.parametrize("value", [-1, True, 1.5, "1", None])
def test_policy_refuses_a_colluder_count_that_is_not_a_whole_number(value: object) -> None:
    # A negative count would let the secure-sum threshold fall below a strict majority.
    with pytest.raises(ConfigError, match=r"max_colluders=.*must be an int >= 0"):
        ClientPolicy(max_colluders=value)  # type: ignore[arg-type]


def test_policy_accepts_the_edges_of_its_own_settings() -> None:
    ClientPolicy(max_colluders=0)
    ClientPolicy(max_colluders=2)
    ClientPolicy(max_epsilon_per_task=0.5, max_total_epsilon=0.5)
    ClientPolicy(min_threshold=2)


def test_no_refusal_depends_on_the_holders_record_count(caplog: pytest.LogCaptureFixture) -> None:
    """Whether a holder takes a task must not tell the coordinator how many records it has:
    delta against 1/n only warns in the holder's own log; max_delta is what refuses."""
    policy = ClientPolicy(max_delta=0.9, max_total_delta=0.99)
    for n_records in (1, 2, 10**9, None):
        policy.check(make_manifest(delta=0.5), spent=0.0, n_records=n_records)
    assert "delta=0.5 is not below 1/n=1/2" in caplog.text
    # The record cap is the holder's own: the same answer for every task's cap.
    capped = ClientPolicy(max_records=100)
    capped.check_records(100)
    with pytest.raises(PolicyViolationError, match="101 records exceed this holder's max_records"):
        capped.check_records(101)
    for task_cap in (100, 10**6):
        capped.check(make_manifest(max_records=task_cap), spent=0.0, n_records=None)


def test_noise_sized_for_enough_colluders_is_accepted() -> None:
    policy = ClientPolicy(max_colluders=1)
    policy.check(make_manifest(colluders=1), spent=0.0, n_records=10)
    # No noise to size in a non-private task (consented to) or where each holder adds it all.
    ClientPolicy(max_colluders=1, allow_non_private=True).check(
        make_manifest(epsilon=math.inf), spent=0.0, n_records=10
    )
    policy.check(make_manifest(mode="local"), spent=0.0, n_records=10)
    manifest = make_manifest(colluders=1)
    assert TaskManifest.from_json(manifest.to_json()) == manifest
    assert manifest.secagg_config().digest() != make_manifest(colluders=0).secagg_config().digest()


def test_central_mode_only_where_the_holder_lists_it() -> None:
    ClientPolicy(allowed_modes=("distributed", "central")).check(
        make_manifest(mode="central"), spent=0.0, n_records=10
    )
    assert "central" not in ClientPolicy().allowed_modes


def test_policy_refusal_messages_state_the_rule() -> None:
    with pytest.raises(ConfigError, match=r"^max_total_epsilon must be >= max_epsilon_per_task$"):
        ClientPolicy(max_epsilon_per_task=8.0, max_total_epsilon=4.0)
    with pytest.raises(PolicyViolationError, match=r"^epsilon=inf \(non-private release\) is"):
        ClientPolicy().check(make_manifest(epsilon=math.inf), spent=0.0, n_records=10)
    policy = ClientPolicy(max_epsilon_per_task=4.0, max_total_epsilon=10.0)
    with pytest.raises(BudgetExceededError, match=r"bring the total to 10\.5 > .*spent 6\.5"):
        policy.check(make_manifest(epsilon=4.0), spent=6.5, n_records=100)


def test_min_holders_is_a_whole_number_and_its_limit_is_inclusive() -> None:
    for bad in (2.5, "3", 1, True):
        with pytest.raises(ConfigError, match=rf"^min_holders={bad!r}: must be an int >= 2$"):
            ClientPolicy(min_holders=bad)  # type: ignore[arg-type]
    manifest = make_manifest()
    k = len(manifest.node_ids)
    ClientPolicy(min_holders=k).check(manifest, spent=0.0, n_records=10)  # exactly enough
    with pytest.raises(PolicyViolationError, match=rf"^K={k} participants is below min_holders"):
        ClientPolicy(min_holders=k + 1).check(manifest, spent=0.0, n_records=10)


def test_delta_and_record_caps_validate_at_their_edges() -> None:
    # max_total_delta may equal max_delta (one task's worth) and must stay below 1.
    ClientPolicy(max_delta=1e-4, max_total_delta=1e-4)
    ClientPolicy(max_delta=1e-4, max_total_delta=0.999)
    for bad in (1.0, 1.5):
        with pytest.raises(ConfigError, match=rf"^max_total_delta={bad}: must be >= max_delta"):
            ClientPolicy(max_delta=1e-4, max_total_delta=bad)
    with pytest.raises(ConfigError, match=r"max_total_delta=1e-05: must be >= max_delta=0\.0001"):
        ClientPolicy(max_delta=1e-4, max_total_delta=1e-5)
    # A holder may cap its records at one; zero, fractions and booleans are refused by name.
    assert ClientPolicy(max_records=1).max_records == 1
    for bad_records in (0, -3, 2.5, True, "10"):
        with pytest.raises(
            ConfigError, match=rf"^max_records={bad_records!r}: must be an int >= 1$"
        ):
            ClientPolicy(max_records=bad_records)  # type: ignore[arg-type]


def test_the_delta_warning_states_its_bound_and_fires_only_at_or_above_1_over_n(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = ClientPolicy(max_delta=0.9, max_total_delta=0.99)
    policy.check(make_manifest(delta=0.6), spent=0.0, n_records=1)  # 0.6 < 1/1
    assert "1/n" not in caplog.text
    policy.check(make_manifest(delta=0.5), spent=0.0, n_records=2)  # 0.5 = 1/2
    assert (
        "delta=0.5 is not below 1/n=1/2 for this holder's data; lower max_delta in the policy "
        "to refuse such tasks"
    ) in caplog.text


def test_colluder_and_delta_budget_refusals_state_the_rule() -> None:
    with pytest.raises(
        PolicyViolationError,
        match=r"colluders=0: the task's noise shares assume fewer colluding holders than this "
        r"holder's max_colluders=1 \(their missing noise would leave the sum below the target\)$",
    ):
        ClientPolicy(max_colluders=1).check(make_manifest(colluders=0), spent=0.0, n_records=10)
    policy = ClientPolicy(max_delta=1e-5, max_total_delta=2.5e-5)
    with pytest.raises(
        BudgetExceededError,
        match=r"^delta=1e-05 would bring the total to 3e-05 > max_total_delta=2\.5e-05 "
        r"\(spent 2e-05\)$",
    ):
        policy.check(make_manifest(delta=1e-5), spent=0.0, n_records=10, spent_delta=2e-5)


def test_a_fixed_reply_time_needs_room_before_the_stage_deadline() -> None:
    """The check reads public terms only (the deadline and the holder's own setting)."""
    policy = ClientPolicy(masked_input_reply_s=590.0)
    policy.check(make_manifest(), spent=0.0, n_records=None)  # deadline 600: 10 s of room
    with pytest.raises(PolicyViolationError, match="deadline_s=600 leaves less than 10 s"):
        ClientPolicy(masked_input_reply_s=590.5).check(make_manifest(), spent=0.0, n_records=1)
    ClientPolicy(masked_input_reply_s=0.0).check(make_manifest(), spent=0.0, n_records=1)
    for bad in (-1.0, math.inf, math.nan, True, "5"):
        with pytest.raises(ConfigError, match="masked_input_reply_s"):
            ClientPolicy(masked_input_reply_s=bad)  # type: ignore[arg-type]
