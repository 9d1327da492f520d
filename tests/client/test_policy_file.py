"""A holder's POLICY.toml: strict parsing into ClientPolicy, and the ClientApp that obeys it."""

from __future__ import annotations

import logging
import stat
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict
from manifests import FINGERPRINT, make_manifest

from fedsynth.client.flower_app import settings_from_context
from fedsynth.client.policy import ClientPolicy
from fedsynth.client.policy_file import (
    attach_log_file,
    load_policy_file,
    node_policy,
    parse_policy,
)
from fedsynth.protocol.errors import BudgetExceededError, ConfigError, PolicyViolationError

FULL = f"""
max_epsilon_per_task = 2.5
max_total_epsilon = 10
max_delta = 1e-7
allowed_fingerprints = ["{FINGERPRINT}"]
allowed_modes = ["distributed", "local"]
min_threshold = 3
min_holders = 4
max_colluders = 1
masked_input_reply_s = 900
allow_non_private = false
budget_path = "store/budget.sqlite"
log_file = "/var/log/fedsynth-node.log"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "POLICY.toml"
    path.write_text(text)
    return path


def test_every_term_is_read(tmp_path: Path) -> None:
    loaded = load_policy_file(write(tmp_path, FULL))
    assert loaded.policy == ClientPolicy(
        max_epsilon_per_task=2.5,
        max_total_epsilon=10.0,
        max_delta=1e-7,
        allowed_fingerprints=(FINGERPRINT,),
        allowed_modes=("distributed", "local"),
        min_threshold=3,
        min_holders=4,
        max_colluders=1,
        masked_input_reply_s=900.0,
        allow_non_private=False,
    )
    assert loaded.budget_path == tmp_path / "store" / "budget.sqlite"  # beside the file
    assert loaded.log_file == Path("/var/log/fedsynth-node.log")


def test_an_empty_file_keeps_the_safe_defaults(tmp_path: Path) -> None:
    loaded = load_policy_file(write(tmp_path, ""))
    assert loaded.policy == ClientPolicy()
    assert loaded.policy.allow_non_private is False
    assert loaded.budget_path is None and loaded.log_file is None


def test_an_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    # A typo must not silently keep the looser default cap.
    with pytest.raises(ConfigError, match=r"POLICY.toml: unknown key 'max_epsilon' \(known keys"):
        load_policy_file(write(tmp_path, "max_epsilon = 1.0\n"))
    with pytest.raises(ConfigError, match="unknown key 'policy'"):
        load_policy_file(write(tmp_path, "[policy]\nmax_delta = 1e-6\n"))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('max_epsilon_per_task = "2"', r"max_epsilon_per_task='2' is a string, expected a number"),
        ("max_delta = true", r"max_delta=True is a boolean, expected a number"),
        ("min_threshold = 3.0", r"min_threshold=3.0 is a float, expected an integer"),
        ("min_holders = true", r"min_holders=True is a boolean, expected an integer"),
        ('allow_non_private = "false"', r"allow_non_private='false' is a string, expected true"),
        ("allow_non_private = 0", r"allow_non_private=0 is an integer, expected true or false"),
        ('allowed_modes = "local"', r"allowed_modes='local' is a string, expected a list"),
        ("allowed_fingerprints = [1]", r"allowed_fingerprints\[0\]=1 is an integer"),
        ("budget_path = 3", r"budget_path=3 is an integer, expected a non-empty string"),
    ],
)
def test_a_value_of_the_wrong_type_names_key_value_and_type(
    tmp_path: Path, line: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_policy_file(write(tmp_path, line + "\n"))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("max_epsilon_per_task = 0", "must be a finite number > 0"),
        ("max_epsilon_per_task = inf", "must be a finite number > 0"),
        ("max_total_epsilon = nan", "must be a finite number > 0"),
        ("max_delta = 1.0", "must be below 1"),
        ("min_threshold = 1", "min_threshold=1: must be >= 2"),
        ("min_holders = 1", "min_holders=1: must be an int >= 2"),
        ("max_colluders = -1", "max_colluders=-1"),
        ("masked_input_reply_s = -1", "masked_input_reply_s=-1.0: must be a finite number"),
        ("masked_input_reply_s = inf", "masked_input_reply_s=inf: must be a finite number"),
        ('masked_input_reply_s = "600"', "masked_input_reply_s='600' is a string"),
        ('allowed_modes = ["trusted"]', "'trusted' is not a trust mode"),
        ("allowed_modes = []", "at least one trust mode"),
        ('allowed_modes = ["local", "local"]', "lists an entry twice"),
        ('allowed_fingerprints = ["abc"]', "'abc' is not 'sha256:'"),
        ("max_epsilon_per_task = 9\nmax_total_epsilon = 5", "max_total_epsilon must be >="),
    ],
)
def test_out_of_range_terms_are_refused(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_policy_file(write(tmp_path, line + "\n"))


def test_a_missing_or_broken_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy_file(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_policy_file(write(tmp_path, "max_delta = = 1\n"))


def test_the_file_s_caps_refuse_a_task_that_breaks_them(tmp_path: Path) -> None:
    policy = parse_policy(
        {
            "max_epsilon_per_task": 2.0,
            "max_total_epsilon": 5.0,
            "min_holders": 4,
            "allowed_fingerprints": ["sha256:" + "00" * 32],
        },
        base_dir=tmp_path,
    ).policy
    with pytest.raises(PolicyViolationError, match=r"epsilon=4.0 exceeds max_epsilon_per_task=2"):
        policy.check(make_manifest(epsilon=4.0), spent=0.0, n_records=None)
    with pytest.raises(PolicyViolationError, match="K=3 participants is below min_holders=4"):
        policy.check(make_manifest(epsilon=1.0), spent=0.0, n_records=None)
    relaxed = parse_policy(
        {"max_epsilon_per_task": 2.0, "max_total_epsilon": 5.0}, base_dir=tmp_path
    ).policy
    with pytest.raises(BudgetExceededError, match="max_total_epsilon=5"):
        relaxed.check(make_manifest(epsilon=2.0), spent=4.0, n_records=None)
    allowed = parse_policy({"allowed_fingerprints": [FINGERPRINT]}, base_dir=tmp_path).policy
    allowed.check(make_manifest(epsilon=1.0), spent=0.0, n_records=None)
    with pytest.raises(PolicyViolationError, match="not in allowed_fingerprints"):
        parse_policy(
            {"allowed_fingerprints": ["sha256:" + "00" * 32]}, base_dir=tmp_path
        ).policy.check(make_manifest(epsilon=1.0), spent=0.0, n_records=None)


# ---------------------------------------------------------------------------------------------
# The ClientApp reads policy-path from its own node config
# ---------------------------------------------------------------------------------------------


def context(node: dict[str, Any], run: dict[str, Any] | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run or {})


def test_the_client_app_enforces_the_policy_file(tmp_path: Path) -> None:
    policy = write(
        tmp_path,
        'max_epsilon_per_task = 1.5\nmin_holders = 3\nbudget_path = "b.sqlite"\n',
    )
    node = {"data-path": "/data/private.jsonl", "policy-path": str(policy)}
    settings = settings_from_context(context(node))
    assert settings.policy.max_epsilon_per_task == 1.5
    assert settings.policy.min_holders == 3
    assert settings.budget_path == tmp_path / "b.sqlite"
    with pytest.raises(PolicyViolationError, match=r"exceeds max_epsilon_per_task=1.5"):
        settings.policy.check(make_manifest(epsilon=4.0), spent=0.0, n_records=None)


def test_a_run_config_cannot_point_the_node_at_another_policy(tmp_path: Path) -> None:
    strict = write(tmp_path, "max_epsilon_per_task = 1.0\n")
    node = {
        "data-path": "/data/private.jsonl",
        "policy-path": str(strict),
        "budget-path": str(tmp_path / "b.sqlite"),
    }
    loose = tmp_path / "loose.toml"
    loose.write_text("max_epsilon_per_task = 8.0\nallow_non_private = true\n")
    settings = settings_from_context(context(node, {"policy-path": str(loose)}))
    assert settings.policy.max_epsilon_per_task == 1.0
    assert settings.policy.allow_non_private is False


def test_a_policy_file_and_inline_terms_together_are_refused(tmp_path: Path) -> None:
    policy = write(tmp_path, "max_epsilon_per_task = 1.0\n")
    for key, value in (("allow-non-private", "true"), ("max-epsilon", "8")):
        with pytest.raises(ConfigError, match=f"both policy-path=.* and {key}="):
            node_policy({"policy-path": str(policy), key: value})


def test_two_budget_stores_for_one_holder_are_refused(tmp_path: Path) -> None:
    policy = write(tmp_path, 'budget_path = "one.sqlite"\n')
    with pytest.raises(ConfigError, match="differs from budget_path"):
        node_policy({"policy-path": str(policy), "budget-path": str(tmp_path / "two.sqlite")})
    same = node_policy({"policy-path": str(policy), "budget-path": str(tmp_path / "one.sqlite")})
    assert same.budget_path == tmp_path / "one.sqlite"


def test_without_a_policy_file_the_inline_terms_still_apply(tmp_path: Path) -> None:
    loaded = node_policy({"max-epsilon": "3", "allow-non-private": "false"})
    assert loaded.policy.max_epsilon_per_task == 3.0
    assert loaded.policy.allow_non_private is False
    assert loaded.log_file is None


def test_the_log_file_is_owner_only_and_attached_once(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "node.log"
    name = "fedsynth.test_policy_file"
    logger = logging.getLogger(name)
    try:
        attach_log_file(log_file, logger_name=name)
        attach_log_file(log_file, logger_name=name)
        assert len(logger.handlers) == 1
        assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
        logger.warning("refused stage setup: epsilon=9 exceeds max_epsilon_per_task=2")
        logger.handlers[0].flush()
        assert "exceeds max_epsilon_per_task" in log_file.read_text()
    finally:
        for handler in list(logger.handlers):
            handler.close()
            logger.removeHandler(handler)


def test_node_status_says_when_a_masked_input_reply_tells_the_record_count(
    tmp_path: Path,
) -> None:
    from typer.testing import CliRunner

    from fedsynth.simulations.cli import app

    runner = CliRunner()
    node = tmp_path / "node"
    init = runner.invoke(app, ["node", "init", str(node)], env={"COLUMNS": "400"})
    assert init.exit_code == 0
    said = " ".join(init.output.split())
    assert "max_colluders = 0 assumes no holder sides with the coordinator" in said
    assert "masked_input_reply_s = 0 answers a masked input when it is computed" in said
    for text, expected in (
        ("", "masked input answered at once (its time tells the task's record count)"),
        ("masked_input_reply_s = 300\n", "masked input answered 300 s after it arrives"),
    ):
        policy = write(tmp_path, text)
        result = runner.invoke(
            app, ["node", "status", str(node), "--policy", str(policy)], env={"COLUMNS": "400"}
        )
        assert result.exit_code == 0, result.output
        assert expected in " ".join(result.output.split())
