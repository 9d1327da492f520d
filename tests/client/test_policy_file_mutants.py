"""A holder's POLICY.toml and node config, where mutation testing found them unchecked.

``scripts/mutmut.sh client/policy_file.py`` (against the policy-file, node-directory and
ClientApp tests) left alive: the file parser's own refusal of a lifetime delta cap of 1 or more,
the inline terms' defaults and the policy file's log file reaching the node, the log file's
attachment (created with its folders, written at INFO, once per path but for every path), the
file size limit's inclusive edge, and the refusals' texts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsynth.client import policy_file
from fedsynth.client.policy_file import (
    KNOWN_KEYS,
    attach_log_file,
    load_policy_file,
    node_policy,
    parse_policy,
)
from fedsynth.protocol.errors import ConfigError


def _refusal(data: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_policy(data, base_dir=Path("/holder"))
    return str(caught.value)


def test_the_file_refuses_a_lifetime_delta_cap_of_one_itself() -> None:
    assert _refusal({"max_total_delta": 1.0}) == "max_total_delta=1.0: must be below 1"
    assert _refusal({"max_delta": 1}) == "max_delta=1: must be below 1"


def test_every_refusal_names_the_key_the_value_and_what_was_expected() -> None:
    assert _refusal({"allowed_modes": ["local", 3]}) == (
        "allowed_modes[1]=3 is an integer, expected a string"
    )
    assert _refusal({"allowed_fingerprints": {"a": 1}}) == (
        "allowed_fingerprints={'a': 1} is a dict, expected a list of strings"
    )
    assert _refusal({"masked_input_reply_s": "600"}) == (
        "masked_input_reply_s='600' is a string, expected a number of seconds"
    )
    assert _refusal({"allowed_modes": []}) == (
        "allowed_modes=[]: a policy must allow at least one trust mode"
    )
    assert _refusal({"allowed_fingerprints": ["sha256:AB"]}) == (
        "allowed_fingerprints: 'sha256:AB' is not 'sha256:' and 64 lower-case hex digits (the "
        "fingerprint `fedsynth node fetch-model` prints)"
    )
    assert _refusal({"max_epsilon": 2.0}) == (
        f"unknown key 'max_epsilon' (known keys: {', '.join(sorted(KNOWN_KEYS))})"
    )


def test_the_file_size_limit_is_inclusive_and_unreadable_files_say_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "POLICY.toml"
    path.write_text("max_epsilon_per_task = 2.0\n")
    size = path.stat().st_size
    monkeypatch.setattr(policy_file, "MAX_POLICY_BYTES", size)
    assert load_policy_file(path).policy.max_epsilon_per_task == 2.0
    monkeypatch.setattr(policy_file, "MAX_POLICY_BYTES", size - 1)
    with pytest.raises(ConfigError) as caught:
        load_policy_file(path)
    assert str(caught.value) == f"policy file {path} exceeds {size - 1} bytes"
    monkeypatch.undo()
    path.write_bytes(b"max_epsilon_per_task = 2.0 # \xff\n")
    with pytest.raises(ConfigError) as caught:
        load_policy_file(path)
    assert str(caught.value) == f"policy file {path}: cannot read (not UTF-8 text)"
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        load_policy_file(missing)
    assert str(caught.value) == f"policy file {missing}: cannot read (No such file or directory)"


def test_inline_terms_default_to_the_strict_side_and_keep_the_nodes_store() -> None:
    """Without a policy file: epsilon 8 per task, and no non-private release unless the holder's
    own node config says so."""
    bare = node_policy({"budget-path": "/srv/budget.sqlite"})
    assert bare.policy.max_epsilon_per_task == 8.0
    assert bare.policy.allow_non_private is False
    assert bare.budget_path == Path("/srv/budget.sqlite") and bare.log_file is None
    consent = node_policy({"allow-non-private": True, "max-epsilon": 2.5})
    assert consent.policy.allow_non_private is True
    assert consent.policy.max_epsilon_per_task == 2.5
    with pytest.raises(ConfigError, match="allow-non-private"):
        node_policy({"allow-non-private": "yes please"})
    with pytest.raises(ConfigError, match="max-epsilon"):
        node_policy({"max-epsilon": "lots"})


def test_the_policy_files_log_file_and_store_reach_the_node(tmp_path: Path) -> None:
    path = tmp_path / "POLICY.toml"
    path.write_text('budget_path = "budget.sqlite"\nlog_file = "logs/node.log"\n')
    loaded = node_policy({"policy-path": str(path)})
    assert loaded.budget_path == tmp_path / "budget.sqlite"
    assert loaded.log_file == tmp_path / "logs" / "node.log"
    other = tmp_path / "other.sqlite"
    with pytest.raises(ConfigError) as caught:
        node_policy({"policy-path": str(path), "budget-path": str(other)})
    assert str(caught.value) == (
        f"node config budget-path={str(other)!r} differs from budget_path="
        f"{str(tmp_path / 'budget.sqlite')!r} in {path}; one holder keeps one budget store"
    )
    with pytest.raises(ConfigError) as caught:
        node_policy({"policy-path": str(path), "max-epsilon": 2.0})
    assert str(caught.value) == (
        f"node config sets both policy-path={str(path)!r} and max-epsilon=2.0; put every term "
        "in the policy file"
    )


@pytest.fixture
def fedsynth_logger() -> Iterator[logging.Logger]:
    """The package logger, its handlers and level restored afterwards."""
    logger = logging.getLogger("fedsynth")
    handlers, level = list(logger.handlers), logger.level
    logger.setLevel(logging.NOTSET)
    yield logger
    for handler in logger.handlers:
        if handler not in handlers:
            handler.close()
    logger.handlers[:] = handlers
    logger.setLevel(level)


def test_a_log_file_is_created_with_its_folders_and_takes_info_records(
    tmp_path: Path, fedsynth_logger: logging.Logger
) -> None:
    first = tmp_path / "deep" / "logs" / "node.log"
    attach_log_file(first)
    attach_log_file(first)  # once per path
    second = tmp_path / "second.log"
    attach_log_file(second)  # another path is attached too
    assert fedsynth_logger.level == logging.INFO
    logging.getLogger("fedsynth.client.test").info("refused task %s", "t-1")
    for path in (first, second):
        lines = path.read_text().splitlines()
        assert len(lines) == 1, lines
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO fedsynth\.client\.test: refused task t-1",
            lines[0],
        )
        assert path.stat().st_mode & 0o777 == 0o600


def test_a_log_file_keeps_a_more_verbose_level_and_names_a_path_it_cannot_create(
    tmp_path: Path, fedsynth_logger: logging.Logger
) -> None:
    fedsynth_logger.setLevel(logging.DEBUG)
    attach_log_file(tmp_path / "node.log")
    assert fedsynth_logger.level == logging.DEBUG
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as caught:
        attach_log_file(blocker / "node.log")
    assert str(caught.value) == f"log_file {blocker / 'node.log'}: cannot create (File exists)"
