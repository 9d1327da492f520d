"""The Flower ClientApp's wiring, where mutation testing found it unchecked.

``scripts/mutmut.sh client/flower_app.py`` (against ``test_flower_app.py`` and
``test_node_dir.py``) left alive: a deployed node that took its identity from key files lying
beside its data file (as a simulated node does), a simulated node signing as another partition,
the node config's data path and field names, the simulation's per-partition data file, budget
store and identity, the stage a message names, and the reply to an unexpected failure (its
code, its category and the full trace in the holder's log only).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message, RecordDict

from fedsynth.client import flower_app
from fedsynth.client.flower_app import ERROR_CODE_REFUSED, make_client_app, settings_from_context
from fedsynth.client.settings import ClientSettings
from fedsynth.protocol.errors import PolicyViolationError
from fedsynth.protocol.identity import write_simulated_consortium
from tests.client.test_flower_app import ACTION, PE_ACTION, context, message

SECRET = "record 17 reads 'my diagnosis'"


class _Capture:
    """Stands in for a holder: keeps the settings it was built with and the stage it ran."""

    built: list[tuple[ClientSettings, int]]
    stages: list[str]
    fail: BaseException | None = None

    def __init__(self, settings: ClientSettings, *, node_id: int) -> None:
        type(self).built.append((settings, node_id))

    def handle(self, stage: str, content: RecordDict, state: RecordDict) -> RecordDict:
        type(self).stages.append(stage)
        if type(self).fail is not None:
            raise type(self).fail
        return RecordDict()


@pytest.fixture
def capture(monkeypatch: pytest.MonkeyPatch) -> type[_Capture]:
    _Capture.built, _Capture.stages, _Capture.fail = [], [], None
    monkeypatch.setattr(flower_app, "Contributor", _Capture)
    monkeypatch.setattr(flower_app, "PEVoter", _Capture)
    return _Capture


def test_a_deployed_node_reads_its_own_config_and_no_key_file_beside_its_data(
    tmp_path: Path,
) -> None:
    """Key files of a simulated consortium lie in the data file's folder: a deployed node (one
    with its own data-path) signs only with the identity its node config names."""
    write_simulated_consortium(tmp_path, 2)
    data = tmp_path / "private.jsonl"
    node = {
        "data-path": str(data),
        "budget-path": str(tmp_path / "b.sqlite"),
        "text-field": "body",
        "label-field": "topic",
    }
    settings = settings_from_context(context(node))
    assert settings.data_path == data
    assert (settings.text_field, settings.label_field) == ("body", "topic")
    assert settings.identity is None and settings.roster is None
    plain = settings_from_context(context({"data-path": str(data), "budget-path": "b.sqlite"}))
    assert (plain.text_field, plain.label_field) == ("text", "label")


def test_a_simulated_node_signs_as_its_own_partition(tmp_path: Path) -> None:
    roster = write_simulated_consortium(tmp_path, 3)
    for pid in (0, 2):
        settings = settings_from_context(
            context({"partition-id": pid, "num-partitions": 3}, {"data-dir": str(tmp_path)})
        )
        assert settings.identity is not None and settings.identity.name == f"holder-{pid}"
        assert settings.roster == roster
        assert settings.data_path == tmp_path / f"partition-{pid}.jsonl"


@pytest.mark.parametrize("action", [ACTION, PE_ACTION])
def test_a_simulated_app_gives_each_partition_its_files_and_identity(
    tmp_path: Path, capture: type[_Capture], action: str
) -> None:
    roster = write_simulated_consortium(tmp_path, 3)
    app = make_client_app(partition_dir=tmp_path)
    reply = app(message(action, "share_keys", {}), context({"partition-id": 2, "data-path": "x"}))
    assert not reply.has_error()
    ((settings, node_id),) = capture.built
    assert node_id == 7 and capture.stages == ["share_keys"]
    assert settings.data_path == tmp_path / "partition-2.jsonl"
    assert settings.budget_path == tmp_path / "budget-2.sqlite"
    assert settings.identity is not None and settings.identity.name == "holder-2"
    assert settings.roster == roster


def _answer(
    tmp_path: Path,
    capture: type[_Capture],
    caplog: pytest.LogCaptureFixture,
    failure: BaseException,
    stage: str,
) -> tuple[Message, list[logging.LogRecord]]:
    """A simulated node's reply to ``stage`` when its holder raises ``failure``, and its log."""
    write_simulated_consortium(tmp_path, 3)
    app = make_client_app(partition_dir=tmp_path)
    capture.fail = failure
    with caplog.at_level(logging.WARNING, logger="fedsynth.client.flower_app"):
        reply = app(message(ACTION, stage, {}), context({"partition-id": 1, "num-partitions": 3}))
    assert reply.has_error() and reply.error.code == ERROR_CODE_REFUSED
    return reply, caplog.records


def test_an_unexpected_failure_is_refused_as_protocol_and_stays_in_the_holders_log(
    tmp_path: Path, capture: type[_Capture], caplog: pytest.LogCaptureFixture
) -> None:
    reply, (record,) = _answer(tmp_path, capture, caplog, RuntimeError(SECRET), "masked_input")
    assert reply.error.reason == "protocol"
    assert record.getMessage() == "node 7 failed stage masked_input"
    assert record.exc_info is not None and SECRET in str(record.exc_info[1])


def test_a_refusal_is_logged_in_full_and_answered_with_its_category(
    tmp_path: Path, capture: type[_Capture], caplog: pytest.LogCaptureFixture
) -> None:
    failure = PolicyViolationError(SECRET)
    reply, records = _answer(tmp_path, capture, caplog, failure, "consistency")
    assert reply.error.reason == "policy"
    assert [r.getMessage() for r in records] == [f"node 7 refused stage consistency: {SECRET}"]


def test_a_node_that_cannot_build_its_settings_logs_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node: dict[str, Any] = {"data-path": str(tmp_path / "private.jsonl")}
    with caplog.at_level(logging.WARNING, logger="fedsynth.client.flower_app"):
        reply = make_client_app()(message(ACTION, "unmask", {}), context(node))
    assert reply.error.code == ERROR_CODE_REFUSED and reply.error.reason == "budget"
    (record,) = caplog.records
    assert record.getMessage().startswith("node 7 refused stage unmask: budget-path is not set")
