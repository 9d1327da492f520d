"""Tests of the production coordinator: a task file's task, run against real holders in-process.

The holders are real Contributors behind an in-process transport (each stage's RecordDict goes
through Flower's protobuf serialization, as on the wire); the tiny random model stands in for
the task's model on both sides. The coordinator gets only the task file: no data, no records.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from processes import packages_loaded_by

from fedsynth.client.contributor import ClientSettings, Contributor, refusal_reason
from fedsynth.client.policy import ClientPolicy
from fedsynth.protocol.accounting import calibrate_vector_release
from fedsynth.protocol.errors import (
    BudgetExceededError,
    ConfigError,
    DuplicateReleaseError,
    FedSynthError,
    TooFewParticipantsError,
)
from fedsynth.protocol.identity import HolderIdentity, Roster
from fedsynth.protocol.models import LoadedModel, tiny_model
from fedsynth.server import flower_app, task_runner
from fedsynth.server.coordinator import compute_public_reference
from fedsynth.server.ledger import PrivacyLedger, file_digest, ledger_path
from fedsynth.server.release import load_release
from fedsynth.server.secure_round import Reply
from fedsynth.server.task_cli import flwr_run_command
from fedsynth.server.task_file import RUN_CONFIG_KEY, TaskSpec, load_task, parse_task
from fedsynth.server.task_runner import run_task

pytestmark = pytest.mark.usefixtures("single_torch_thread")
NODES = (11, 2**40 + 5, 2**63 + 1)
WORDS = ["good", "bad", "plot", "actor", "slow", "fun", "long", "dull", "film", "story"]
RECORDS_PER_NODE = (3, 4, 5)


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_model(seed=0)


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Public references are cached per test, never in the user's cache."""
    monkeypatch.setenv("FEDSYNTH_CACHE", str(tmp_path / "cache"))
    yield


def task_data(**privacy: Any) -> dict[str, Any]:
    return {
        "method": "vector",
        "model": {
            "name": "tiny-llama",
            "layers": [1, 2],
            "max_text_tokens": 32,
            "prior_per_label": 3,
            "max_new_tokens": 6,
            "generation_batch": 6,
        },
        "privacy": {"epsilon": 4.0, "delta": 1e-5, "mode": "distributed", **privacy},
        "federation": {"expected_holders": 3, "threshold": 2},
        "deadlines": {"stage_s": 42.0},
        "store": {"dir": "store"},
        "labels": [
            {"name": "pos", "instruction": "Review (positive): ", "shots": ["a fine film"]},
            {"name": "neg", "instruction": "Review (negative): ", "shots": ["a dull film"]},
        ],
    }


def spec_of(tmp_path: Path, data: dict[str, Any]) -> TaskSpec:
    return parse_task(data, base_dir=tmp_path / "coordinator", source="TASK.toml")


@dataclass
class Holder:
    contributor: Contributor
    labels: list[str]
    state: RecordDict = field(default_factory=RecordDict)


def make_holders(
    tmp_path: Path,
    tiny: LoadedModel,
    names: tuple[str, str] = ("pos", "neg"),
    policy: ClientPolicy | None = None,
) -> dict[int, Holder]:
    """Three holders on their own premises (tmp_path/holder-i), each with a budget store."""
    identities = {n: HolderIdentity.generate(f"holder-{i}") for i, n in enumerate(NODES)}
    roster = Roster({identity.name: identity.public_key for identity in identities.values()})
    holders = {}
    for index, node_id in enumerate(NODES):
        home = tmp_path / f"holder-{index}"
        home.mkdir()
        rng = np.random.default_rng(index)
        labels = [names[(i + index) % 2] for i in range(RECORDS_PER_NODE[index])]
        rows = [{"text": " ".join(rng.choice(WORDS, size=3)), "label": lab} for lab in labels]
        (home / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        settings = ClientSettings(
            data_path=home / "data.jsonl",
            seed=7,
            batch_size=4,
            policy=policy or ClientPolicy(),
            budget_path=home / "budget.sqlite",
            identity=identities[node_id],
            roster=roster,
        )
        contributor = Contributor(settings, node_id=node_id, model_loader=lambda: tiny)
        holders[node_id] = Holder(contributor, labels)
    return holders


class InProcessTransport:
    """Carries each stage to the holders as serialized RecordDicts; can drop holders."""

    def __init__(
        self, holders: Mapping[int, Holder], *, drop: Mapping[str, set[int]] | None = None
    ):
        self.holders = holders
        self.drop = drop or {}
        self.stages: list[str] = []
        self.timeouts: list[float] = []

    def exchange(
        self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        self.stages.append(stage)
        self.timeouts.append(timeout)
        out: dict[int, Reply] = {}
        for node_id, content in requests.items():
            if node_id in self.drop.get(stage, set()):
                continue
            holder = self.holders[node_id]
            wire = recorddict_from_proto(recorddict_to_proto(content))
            try:
                reply = holder.contributor.handle(stage, wire, holder.state)
            except FedSynthError as exc:
                out[node_id] = Reply(content=None, error=refusal_reason(exc))
                continue
            out[node_id] = Reply(content=recorddict_from_proto(recorddict_to_proto(reply)))
        return out


def load_tiny(tiny: LoadedModel) -> Any:
    def load(name: str) -> LoadedModel:
        assert name == "tiny-llama"
        return tiny

    return load


@pytest.mark.parametrize("mode", ["distributed", "central"])
def test_a_vector_task_file_becomes_a_release_and_one_ledger_row(
    tmp_path: Path, tiny: LoadedModel, mode: str
) -> None:
    spec = spec_of(tmp_path, {**task_data(mode=mode), "task_id": f"reviews-{mode}"})
    # Central mode (the coordinator sees the noise-free sum) only where the holders list it.
    policy = ClientPolicy(allowed_modes=(mode,))
    holders = make_holders(tmp_path, tiny, policy=policy)
    transport = InProcessTransport(holders)
    outcome = run_task(spec, transport, NODES, load=load_tiny(tiny))

    # The five stages of the secure sum ran, each under the task file's deadline.
    assert transport.stages == ["setup", "share_keys", "masked_input", "consistency", "unmask"]
    assert set(transport.timeouts) == {42.0}
    # The release lies in the task's store and verifies.
    assert outcome.task_id == f"reviews-{mode}"
    assert outcome.release_path == spec.store_dir / f"reviews-{mode}.safetensors"
    release = load_release(outcome.release_path)
    privacy = release.manifest.privacy
    assert (privacy.epsilon, privacy.delta, privacy.mode) == (4.0, 1e-5, mode)
    assert privacy.threshold == 2 and release.report["survivors"] == 3
    assert release.labels == ("pos", "neg")
    # The noise is calibrated for the task file's epsilon, not for a weaker guarantee.
    expected = calibrate_vector_release(
        mode=mode,
        epsilon=4.0,
        delta=1e-5,
        layers=2,
        dim=2 * tiny.hidden_size + 1,
        scale=release.manifest.scale,
        count_weight=release.manifest.count_weight,
    )
    assert privacy.total_variance == pytest.approx(expected.total_variance)
    # And it was added: the released counts are not the holders' true counts.
    true_counts = [sum(h.labels.count(lab) for h in holders.values()) for lab in ("pos", "neg")]
    assert not np.allclose(release.counts, true_counts)
    # One ledger row, bound to the file by its digest.
    [row] = PrivacyLedger(spec.ledger).rows()
    assert row == outcome.ledger_row
    assert row["task_id"] == f"reviews-{mode}" and row["method"] == "vector"
    assert row["epsilon"] == "4.0" and row["trust_mode"] == mode and row["survivors"] == 3
    assert row["digest"] == file_digest(outcome.release_path)
    assert row["refusals"] == {}

    # The same task file again: refused before any holder is contacted, never charged twice.
    again = InProcessTransport(holders)
    with pytest.raises(DuplicateReleaseError, match=f"task_id='reviews-{mode}'"):
        run_task(spec, again, NODES, load=load_tiny(tiny))
    assert again.stages == []
    assert len(PrivacyLedger(spec.ledger).rows()) == 1


def test_holders_refuse_a_central_task_unless_their_policy_lists_it(
    tmp_path: Path, tiny: LoadedModel
) -> None:
    """In central mode the coordinator sees the noise-free sum: the default policy refuses."""
    spec = spec_of(tmp_path, {**task_data(mode="central"), "task_id": "reviews-central"})
    transport = InProcessTransport(make_holders(tmp_path, tiny))
    with pytest.raises(TooFewParticipantsError, match="setup: policy"):
        run_task(spec, transport, NODES, load=load_tiny(tiny))
    assert transport.stages == ["setup"]
    assert PrivacyLedger(spec.ledger).rows() == []


def test_an_aborted_round_publishes_and_records_nothing(tmp_path: Path, tiny: LoadedModel) -> None:
    spec = spec_of(tmp_path, task_data())
    holders = make_holders(tmp_path, tiny)
    transport = InProcessTransport(holders, drop={"masked_input": {NODES[0], NODES[1]}})
    with pytest.raises(TooFewParticipantsError, match="below the threshold t=2"):
        run_task(spec, transport, NODES, load=load_tiny(tiny))
    assert PrivacyLedger(spec.ledger).rows() == []
    assert list(spec.store_dir.glob("*.safetensors")) == []


def test_too_few_holders_or_an_exhausted_ledger_stop_before_any_round(
    tmp_path: Path, tiny: LoadedModel
) -> None:
    data = task_data(lifetime_epsilon=5.0)
    data["federation"]["min_holders"] = 3
    spec = spec_of(tmp_path, data)
    transport = InProcessTransport(make_holders(tmp_path, tiny))
    with pytest.raises(TooFewParticipantsError, match=r"federation\.min_holders=3"):
        run_task(spec, transport, NODES[:2], load=load_tiny(tiny))
    PrivacyLedger(spec.ledger).record(
        {"task_id": "earlier", "epsilon": 2.0, "delta": 1e-5, "trust_mode": "central"},
        release_path=tmp_path,
    )
    with pytest.raises(BudgetExceededError, match=r"max_total_epsilon=5\.0"):
        run_task(spec, transport, NODES, load=load_tiny(tiny))
    assert transport.stages == []
    assert [r["task_id"] for r in PrivacyLedger(spec.ledger).rows()] == ["earlier"]


def test_the_production_coordinator_never_imports_the_simulations() -> None:
    production = [
        "fedsynth.server.task_runner",
        "fedsynth.server.task_file",
        "fedsynth.server.task_cli",
        "fedsynth.server.flower_app",
        "fedsynth.server.ledger",
    ]
    assert packages_loaded_by(production, ["fedsynth.simulations"]) == []


def _context(run_config: dict[str, Any]) -> Any:
    return SimpleNamespace(run_config=run_config)


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def test_the_server_app_runs_the_task_file_when_one_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "TASK.toml"
    path.write_text(
        (Path(__file__).resolve().parents[2] / "examples" / "task-vector.toml").read_text()
    )
    ran: list[tuple[str, Any]] = []

    def fake_run_task(
        spec: TaskSpec, transport: Any, nodes: tuple[int, ...], progress: Any = None
    ) -> Any:
        assert callable(progress)  # each secure-sum stage shows in the run's log
        ran.append(("task", (spec.task_id, nodes)))
        return SimpleNamespace(task_id=spec.task_id, release_path=spec.store_dir)

    monkeypatch.setattr(task_runner, "run_task", fake_run_task)
    monkeypatch.setattr(flower_app, "_flwr_run_job", lambda *a: ran.append(("demo", a[1])))
    grid: Any = FakeGrid([5, 3, 9])
    flower_app._main(grid, _context({"preset": "quick", RUN_CONFIG_KEY: str(path)}))
    assert ran == [("task", ("reviews-vector-001", (3, 5, 9)))]
    # Without a task file, the repository's default run config still runs the demo.
    ran.clear()
    flower_app._main(grid, _context({"preset": "quick", "num-clients": 2, RUN_CONFIG_KEY: ""}))
    assert ran == [("demo", (3, 5))]
    with pytest.raises(ConfigError, match="neither task-path"):
        flower_app._main(grid, _context({}))


def test_waiting_for_holders_starts_with_the_minimum_only_after_the_deadline() -> None:
    grid: Any = FakeGrid([4, 2])
    assert flower_app.wait_for_holders(grid, 2, 2, timeout=0.0) == (2, 4)
    assert flower_app.wait_for_holders(grid, 3, 2, timeout=0.0, poll_s=0.0) == (2, 4)
    with pytest.raises(TooFewParticipantsError, match=r"federation\.min_holders=3"):
        flower_app.wait_for_holders(grid, 4, 3, timeout=0.0, poll_s=0.0)


def test_task_run_hands_flwr_the_task_path_and_the_model(tmp_path: Path) -> None:
    examples = Path(__file__).resolve().parents[2] / "examples"
    spec = load_task(examples / "task-pe.toml")
    command = flwr_run_command(
        spec, examples / "task-pe.toml", app=tmp_path, federation="consortium", flwr="flwr"
    )
    assert command[:5] == ["flwr", "run", str(tmp_path), "consortium", "--stream"]
    assert command[5:] == [
        "--run-config",
        f'task-path="{(examples / "task-pe.toml").resolve()}"',
        "--run-config",
        'model="gemma3-270m"',
        "--run-config",
        'embedder="all-minilm-l6-v2"',
    ]


def test_the_demo_makes_its_releases_through_the_same_pipeline(
    tmp_path: Path, tiny: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    from fedsynth.simulations.demo import (
        CoordinatorOutcome,
        demo_config,
        make_coordinator_job,
        task_config,
    )

    config = demo_config(
        "quick",
        out_dir=tmp_path / "demo",
        model="tiny-llama",
        layers=(1, 2),
        prior_per_label=3,
        synthetic_per_label=3,
        max_new_tokens=6,
        generation_batch=6,
    )
    reference = compute_public_reference(tiny, task_config(config, config.epsilon))
    holders = make_holders(tmp_path, tiny, names=("positive", "negative"))
    outcome = CoordinatorOutcome()
    job = make_coordinator_job(config, tiny, reference, outcome)
    job(InProcessTransport(holders), NODES, None)
    # The private release is made and recorded; the holders refuse the non-private ceiling
    # (their policy does not allow it), so it is skipped and never recorded.
    assert set(outcome.releases) == {"4"}
    assert outcome.releases["4"] == config.out_dir / "release-eps4.safetensors"
    [row] = PrivacyLedger(ledger_path(config.out_dir)).rows()
    assert row["epsilon"] == "4.0" and row["digest"] == file_digest(outcome.releases["4"])
    assert "release-epsinf not made: the holders refused it" in caplog.text
    assert not (config.out_dir / "release-epsinf.safetensors").exists()
