"""Simulated holders compute at the caller's priority, not at Ray's default nice 15.

At nice 15 a federated demo or study cell waits behind every other process on the machine
(other test workers in CI, a second study) while its coordinator waits for the holders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsynth.server.flower_app import ACTION
from fedsynth.simulations.demo import DemoData, demo_config, run_job_in_simulation

pytestmark = pytest.mark.slow


def test_simulated_holders_run_at_the_callers_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    app = ClientApp()

    @app.query(ACTION.split(".", 1)[1])
    def niceness(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"r": ConfigRecord({"nice": os.nice(0)})}), reply_to=msg)

    seen: dict[int, int] = {}

    def job(transport: Any, nodes: tuple[int, ...], context: Any) -> None:
        replies = transport.exchange("setup", {n: RecordDict() for n in nodes}, timeout=120)
        for node, reply in replies.items():
            seen[node] = int(reply.content.config_records["r"]["nice"])

    config = demo_config("quick", out_dir=tmp_path, model="tiny-llama", clients=2)
    data = DemoData([], [], [], tmp_path / "clients", "none")
    assert run_job_in_simulation(config, data, job, client_app=app) == []
    assert len(seen) == 2
    assert set(seen.values()) == {os.nice(0)}
