"""``fedsynth demo --drop N``: holders leave after the key exchange, the release still comes
out, and the privacy report names the holders that dropped.

The fast test drives the dropout ClientApp directly with Flower messages. The end-to-end test
(slow: about a minute of Ray start-up and rounds) runs the real command in a fresh process:
Flower's simulation, three real ClientApps, the real secure round with dropout recovery, a tiny
random generator (shapes only; its scores are meaningless and not asserted) and a small user
data file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp

from fedsynth.protocol.messages import Envelope, pack
from fedsynth.server.ledger import PrivacyLedger
from fedsynth.server.release import load_release
from fedsynth.simulations.demo import simulated_dropouts, with_simulated_dropouts


def _message(stage: str, node: int, action: str) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m-{node}-{stage}",
        src_node_id=1,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=600.0,
        message_type=f"query.{action}",
    )
    return Message(content=pack(Envelope("task-x", stage), {}), metadata=metadata)


@pytest.mark.parametrize("action", ["dataset_vector", "pe_votes"])
def test_dropped_holders_answer_key_stages_then_go_offline(tmp_path: Path, action: str) -> None:
    inner = ClientApp()
    answered: list[tuple[int, str]] = []

    def serve(msg: Message, context: Context) -> Message:
        stage = str(msg.content.config_records["fedsynth"]["stage"])
        answered.append((int(context.node_config["partition-id"]), stage))
        return Message(RecordDict({"fedsynth": ConfigRecord({"ok": 1})}), reply_to=msg)

    inner.query(action)(serve)
    app = with_simulated_dropouts(inner, (2,), tmp_path)
    replies: dict[tuple[int, str], Message] = {}
    for pid in (0, 1, 2):
        node = 100 + pid
        ctx = Context(
            run_id=1,
            node_id=node,
            node_config={"partition-id": pid},
            state=RecordDict(),
            run_config={},
        )
        for stage in ("setup", "share_keys", "masked_input", "consistency", "unmask"):
            replies[(pid, stage)] = app(_message(stage, node, action), ctx)
    # Holders 0 and 1 answer every stage; holder 2 only the key exchange.
    survivors = [(pid, s) for pid in (0, 1) for s in ("setup", "share_keys", "masked_input")]
    assert set(survivors) <= set(answered)
    assert [(pid, s) for pid, s in answered if pid == 2] == [(2, "setup"), (2, "share_keys")]
    assert all(replies[(2, s)].has_error() for s in ("masked_input", "consistency", "unmask"))
    assert not any(replies[(pid, "masked_input")].has_error() for pid in (0, 1))
    [note] = simulated_dropouts(tmp_path)
    assert note["holder"] == "holder-2" and note["node_id"] == "102"
    assert note["partition"] == "partition-2.jsonl" and note["stage"] == "masked_input"


def _tiny_demo(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``fedsynth demo`` in a fresh process on a small data file and the tiny model."""
    data = tmp_path / "mine.jsonl"
    rows = [
        {"text": f"{label} example text {i} {'x' * (i % 7)}", "label": label}
        for label in ("alpha", "beta")
        for i in range(24)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fedsynth.simulations", "demo", "--out", str(out)]
    cmd += ["--data", str(data), "--model", "tiny-llama", "--layers", "1,2", "--quick"]
    cmd += ["--no-baseline", "--samples", "2", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, out


@pytest.mark.slow
def test_demo_drop_one_holder_names_it_in_the_report(tmp_path: Path) -> None:
    proc, out = _tiny_demo(tmp_path, "--clients", "3", "--drop", "1")

    report = json.loads((out / "privacy_report.json").read_text())
    assert report["K"] == 3 and report["threshold_t"] == 2
    assert report["survivors"] == 2
    assert len(report["dropped_clients"]) == 1
    # The holder behind the dropped node id is named: the last of the three.
    [dropped] = report["dropped_holders"]
    assert dropped["holder"] == "holder-2"
    assert dropped["partition"] == "partition-2.jsonl"
    assert dropped["node_id"] == report["dropped_clients"][0]
    assert dropped["stage"] == "masked_input"
    assert "holder-2" in " ".join(proc.stdout.split())
    # Noise calibrated for t = 2 survivors: with exactly t left the target is met, not undercut.
    noise = report["noise"]
    assert noise["aggregate_variance_actual_scaled"] >= noise["aggregate_variance_target_scaled"]
    # The saved release verifies and carries the same round facts.
    release = load_release(out / "release-eps4.safetensors")
    assert release.report["dropped_clients"] == report["dropped_clients"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dropped_holders"] == ["holder-2"]
    # The same-number real-text reference: 2 holders' records per label, 3 draws, and the line
    # that says how much of its gap to the prior each release closes.
    real = summary["real_reference"]
    assert real["per_label"] == 2 and real["draws"] == 3
    assert 0.0 <= real["tstr_accuracy"] <= 1.0
    assert "same number of real texts (2 per label, 3 draws)" in " ".join(proc.stdout.split())
    assert len(PrivacyLedger(out / "ledger.sqlite").rows()) == 1


@pytest.mark.slow
def test_demo_sized_for_a_colluder_keeps_the_target_with_one_silent_holder(tmp_path: Path) -> None:
    # K = 4 holders, one may side with the coordinator: t = 3 (2t - K > 1), every share sized
    # for t - 1 honest holders, so all four surviving carry 4/3 of the target (the report says
    # so) and any three honest ones still the whole of it.
    _, out = _tiny_demo(tmp_path, "--clients", "4", "--colluders", "1")
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["K"] == 4 and report["threshold_t"] == 3 and report["survivors"] == 4
    noise = report["noise"]
    assert noise["colluders_tolerated"] == 1
    target = noise["aggregate_variance_target_scaled"]
    assert noise["aggregate_variance_actual_scaled"] == pytest.approx(target * 4 / 3, rel=1e-9)
