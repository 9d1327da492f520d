"""Federated PE end to end on the bundled data.

1. Real models: Gemma 3 270M proposes and varies candidates, three real PEVoters (all-MiniLM-L6-v2,
   Skellam shares, secure sum) vote over an in-process wire transport. Fidelity is precision in
   embedding space against held-out real reviews (the share of candidates inside the real data's
   k-NN manifold, Kynkäänniemi et al. 2019): it improves over the rounds without noise, and at
   epsilon = 4 the final population still beats round 0 (fixed seeds). The Fréchet distance is
   printed too; it also penalises the loss of diversity that selection causes, so it is not the
   figure PE optimises.
2. The command line: ``fedsynth demo --method pe`` runs the same code in Flower's simulation
   (Ray, real ServerApp/ClientApps) and writes its outputs; a tiny random generator and the hashing
   embedder keep this part fast (its scores are meaningless and not asserted).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from fedsynth.client.pe_voter import PEVoter
from fedsynth.client.policy import ClientPolicy
from fedsynth.client.settings import ClientSettings
from fedsynth.protocol.embedding import load_embedder
from fedsynth.protocol.errors import FedSynthError
from fedsynth.protocol.identity import simulated_member, write_simulated_consortium
from fedsynth.protocol.models import load_model
from fedsynth.server.generation import GenerationConfig
from fedsynth.server.pe_coordinator import PEConfig, run_pe
from fedsynth.server.pe_text import TextRandomAPI, TextVariationAPI, VariationConfig
from fedsynth.server.secure_round import Reply
from fedsynth.simulations.datasets import (
    load_corpus,
    partition_iid,
    split_train_test,
    subsample_per_label,
    write_jsonl,
)
from fedsynth.simulations.demo import TEMPLATES
from fedsynth.simulations.metrics import frechet_distance, precision_recall_embeddings

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_torch_thread")]
NODES = (101, 202, 303)


class MemoRandomAPI:
    """The text random API, memoized: both runs share seed 5, so their round-0 populations are
    identical public texts; generating them once keeps CI shorter."""

    def __init__(self, inner: TextRandomAPI, memo: dict[tuple[str, int, int], list[str]]) -> None:
        self.inner = inner
        self.memo = memo

    def random(self, label: str, n: int, *, seed: int) -> list[str]:
        key = (label, n, seed)
        if key not in self.memo:
            self.memo[key] = self.inner.random(label, n, seed=seed)
        return list(self.memo[key])


class WireTransport:
    """Stages through Flower's protobuf serialization to in-process voters."""

    def __init__(self, voters: Mapping[int, PEVoter]) -> None:
        self.voters = voters
        self.states = {n: RecordDict() for n in voters}

    def exchange(
        self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        replies = {}
        for node, content in requests.items():
            wire = recorddict_from_proto(recorddict_to_proto(content))
            try:
                reply = self.voters[node].handle(stage, wire, self.states[node])
            except FedSynthError as exc:
                replies[node] = Reply(content=None, error=str(exc))
                continue
            replies[node] = Reply(content=recorddict_from_proto(recorddict_to_proto(reply)))
        return replies


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("pe-e2e")
    records = list(load_corpus("rotten_tomatoes").records)
    train, test = split_train_test(records, test_fraction=0.15, seed=0)
    train = subsample_per_label(train, per_label=300, seed=0)
    test = subsample_per_label(test, per_label=200, seed=1)
    paths = []
    for i, part in enumerate(partition_iid(train, num_clients=len(NODES), seed=0)):
        write_jsonl(part, tmp / f"partition-{i}.jsonl")
        paths.append(tmp / f"partition-{i}.jsonl")
    write_simulated_consortium(tmp, len(NODES))
    embedder = load_embedder("all-minilm-l6-v2")
    return {
        "tmp": tmp,
        "paths": paths,
        "embedder": embedder,
        "real": embedder.embed([r.text for r in test]),
        "loaded": load_model("gemma3-270m"),
        "memo": {},
    }


def run_task(setting: dict[str, object], epsilon: float, name: str) -> list[float]:
    embedder = setting["embedder"]
    paths: list[Path] = setting["paths"]  # type: ignore[assignment]
    members = [simulated_member(path.parent, i) for i, path in enumerate(paths)]
    voters = {
        node: PEVoter(
            ClientSettings(
                data_path=path,
                embedder="all-minilm-l6-v2",
                policy=ClientPolicy(allow_non_private=True),
                seed=11,
                identity=identity,
                roster=roster,
            ),
            node_id=node,
            embedder_loader=lambda: embedder,  # type: ignore[return-value]
        )
        for node, path, (identity, roster) in zip(NODES, paths, members, strict=True)
    }
    template = TEMPLATES["rotten_tomatoes"]
    gen = GenerationConfig(max_new_tokens=24, temperature=0.9, batch_size=48)
    loaded = setting["loaded"]
    config = PEConfig(
        labels=template.labels,
        rounds=2,
        per_label=16,
        epsilon=epsilon,
        declared_records_per_label=300,
        seed=5,
    )
    history: list[float] = []
    fds: list[float] = []
    real: np.ndarray = setting["real"]  # type: ignore[assignment]

    def evaluate(population: object) -> dict[str, float]:
        synth = embedder.embed(list(population.samples))  # type: ignore[attr-defined]
        precision, recall = precision_recall_embeddings(real, synth, k=3)
        history.append(precision)
        fds.append(frechet_distance(synth, real))
        return {"precision": precision, "recall": recall, "embedding_fd": fds[-1]}

    result = run_pe(
        WireTransport(voters),
        NODES,
        config,
        random_api=MemoRandomAPI(TextRandomAPI(loaded, template, gen), setting["memo"]),  # type: ignore[arg-type]
        variation_api=TextVariationAPI(loaded, template, VariationConfig(generation=gen)),  # type: ignore[arg-type]
        embedder=embedder,  # type: ignore[arg-type]
        checkpoint_dir=setting["tmp"] / f"ckpt-{name}",  # type: ignore[operator]
        evaluate=evaluate,
    )
    assert result.state.completed_round == 2
    assert all(h.survivors == 3 for h in result.state.history)
    print(f"{name}: precision per round {[round(x, 3) for x in history]}")
    print(f"{name}: embedding FD per round {[round(x, 4) for x in fds]}")
    return history


def test_pe_moves_toward_real_data_without_noise(setting: dict[str, object]) -> None:
    precision = run_task(setting, math.inf, "inf")
    assert precision[-1] > precision[0] + 0.1
    assert min(precision[1:]) > precision[0]  # every voted round beats the public prior


def test_pe_at_epsilon_4_beats_round_zero(setting: dict[str, object]) -> None:
    precision = run_task(setting, 4.0, "eps4")
    assert precision[-1] > precision[0]


def test_cli_pe_demo_through_flower_simulation(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    cmd = [
        sys.executable,
        "-m",
        "fedsynth.simulations",
        "demo",
        "--method",
        "pe",
        "--quick",
        "--model",
        "tiny-llama",
        "--embedder",
        "hashing-64",
        "--epsilon",
        "4",
        "--out",
        str(out),
    ]
    # A checkpoint left by an earlier demo in the same folder must not be resumed: a demo is
    # always a new task on freshly written holder files.
    stale = out / "pe-checkpoint"
    stale.mkdir(parents=True)
    (stale / "state.json").write_text(
        json.dumps({"format": "fedsynth-pe-checkpoint-1", "config_fingerprint": "old"})
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PE rounds" in proc.stdout
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["rounds"] == 2 and report["rounds_completed"] == 2
    assert report["epsilon"] <= 4.0 and report["trust_mode"] == "distributed"
    assert [h["survivors"] for h in report["history"]] == [3, 3]
    rows = [json.loads(line) for line in (out / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 20 and {r["label"] for r in rows} == {"positive", "negative"}
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert (out / "pe-rounds.png").stat().st_size > 1000
    # Too small an epsilon is refused before anything runs, with the workable minimum.
    small = subprocess.run(
        [*cmd[:-4], "--epsilon", "0.05", "--out", str(tmp_path / "small")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert small.returncode == 2
    assert "minimum workable epsilon" in small.stderr  # errors go to stderr
