"""Federated PE end to end in one process: real PEVoters, the real secure sum and coordinator.

The transport passes every stage through Flower's protobuf serialization, as on the wire. The
embedder is the weightless hashing embedder and the random/variation APIs are small word-level
samplers, so these tests check the protocol, the exact arithmetic, checkpoints and refusals in
seconds; the real generator and MiniLM run in tests/test_e2e_pe.py.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from fedsynth.client.pe_voter import PEVoter
from fedsynth.client.policy import ClientBudget, ClientPolicy
from fedsynth.client.settings import ClientSettings
from fedsynth.protocol.accounting import calibrate_pe
from fedsynth.protocol.codec import from_field, to_field
from fedsynth.protocol.embedding import HashingEmbedder
from fedsynth.protocol.errors import (
    ConfigError,
    FedSynthError,
    FieldRangeError,
    ModelMismatchError,
    ShapeError,
    StageOrderError,
    TooFewParticipantsError,
)
from fedsynth.protocol.identity import HolderIdentity, Roster
from fedsynth.protocol.messages import Envelope, pack, vector_to_bytes
from fedsynth.protocol.pe import vote_histogram
from fedsynth.protocol.pe_manifest import decode_histogram
from fedsynth.server.ledger import PrivacyLedger
from fedsynth.server.pe_coordinator import (
    PEConfig,
    PEResult,
    build_round_manifest,
    load_state,
    run_pe,
)
from fedsynth.server.secure_round import Reply, run_secure_sum

LABELS = ("sport", "cooking")
VOCAB = {
    "sport": ["goal", "match", "team", "score", "coach", "league", "striker", "penalty"],
    "cooking": ["oven", "salt", "butter", "recipe", "flour", "simmer", "garlic", "sauce"],
}
NEUTRAL = ["the", "a", "very", "today", "old", "new", "big", "small", "green", "quiet"]
NODES = (11, 2**40 + 5, 2**63 + 1)


class WordRandomAPI:
    """Public prior: sentences of neutral words (knows nothing about the labels)."""

    def random(self, label: str, n: int, *, seed: int) -> list[str]:
        rng = np.random.default_rng(seed)
        return [" ".join(rng.choice(NEUTRAL, size=5)) for _ in range(n)]


class WordVariationAPI:
    """Replaces one word with a word from the shared public vocabulary of all labels."""

    def vary(self, label: str, parents: Sequence[str], *, seed: int) -> list[str]:
        rng = np.random.default_rng(seed)
        pool = NEUTRAL + VOCAB["sport"] + VOCAB["cooking"]
        out = []
        for parent in parents:
            words = parent.split()
            words[int(rng.integers(len(words)))] = str(rng.choice(pool))
            out.append(" ".join(words))
        return out


def write_private(path: Path, index: int, n: int = 30) -> Path:
    rng = np.random.default_rng(500 + index)
    rows = []
    for i in range(n):
        label = LABELS[(i + index) % 2]
        words = [*list(rng.choice(VOCAB[label], size=4)), str(rng.choice(NEUTRAL))]
        rows.append({"text": " ".join(words), "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _wire(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))


@dataclass
class VoterNode:
    voter: PEVoter
    state: RecordDict = field(default_factory=RecordDict)


class PETransport:
    """Routes stages to PEVoters; can drop nodes at given stages; counts uploaded bytes."""

    def __init__(
        self, nodes: Mapping[int, VoterNode], drop: Mapping[str, set[int]] | None = None
    ) -> None:
        self.nodes = nodes
        self.drop = drop or {}
        self.uploaded: dict[int, int] = {}

    def exchange(
        self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        replies: dict[int, Reply] = {}
        for node_id, content in requests.items():
            if node_id in self.drop.get(stage, set()):
                continue
            node = self.nodes[node_id]
            try:
                reply = node.voter.handle(stage, _wire(content), node.state)
            except FedSynthError as exc:
                replies[node_id] = Reply(content=None, error=f"{type(exc).__name__}: {exc}")
                continue
            if stage == "masked_input":
                data = reply.config_records["fedsynth"]["masked"]
                assert isinstance(data, bytes)
                self.uploaded[node_id] = len(data)
            replies[node_id] = Reply(content=_wire(reply))
        return replies


def make_voters(
    tmp_path: Path,
    *,
    embedder: HashingEmbedder,
    budgets: bool = True,
    policy: ClientPolicy | None = None,
) -> dict[int, VoterNode]:
    nodes = {}
    identities = {n: HolderIdentity.generate(f"holder-{i}") for i, n in enumerate(NODES)}
    roster = Roster({identity.name: identity.public_key for identity in identities.values()})
    for index, node_id in enumerate(NODES):
        settings = ClientSettings(
            data_path=write_private(tmp_path / f"private-{index}.jsonl", index),
            embedder=embedder.name,
            policy=policy or ClientPolicy(allow_non_private=True),
            budget_path=tmp_path / f"budget-{index}.jsonl" if budgets else None,
            seed=7,
            identity=identities[node_id],
            roster=roster,
        )
        voter = PEVoter(settings, node_id=node_id, embedder_loader=lambda e=embedder: e)
        nodes[node_id] = VoterNode(voter)
    return nodes


def pe_config(**overrides: object) -> PEConfig:
    values: dict[str, object] = {
        "labels": LABELS,
        "rounds": 3,
        "per_label": 8,
        "keep": 4,
        "epsilon": math.inf,
        "seed": 3,
    }
    values.update(overrides)
    return PEConfig(**values)  # type: ignore[arg-type]


def run_word_pe(
    nodes: Mapping[int, VoterNode],
    config: PEConfig,
    embedder: HashingEmbedder,
    checkpoint_dir: Path,
    **kwargs: Any,
) -> PEResult:
    """A PE task over in-process holders with the word-level random and variation APIs."""
    return run_pe(
        PETransport(nodes),
        NODES,
        config,
        random_api=WordRandomAPI(),
        variation_api=WordVariationAPI(),
        embedder=embedder,
        checkpoint_dir=checkpoint_dir,
        **kwargs,
    )


@pytest.fixture
def embedder() -> HashingEmbedder:
    return HashingEmbedder(64)


def mean_best_similarity(embedder: HashingEmbedder, samples: Sequence[str], tmp: Path) -> float:
    private = [
        json.loads(line)["text"]
        for i in range(len(NODES))
        for line in (tmp / f"private-{i}.jsonl").read_text().splitlines()
    ]
    sims = embedder.embed(private) @ embedder.embed(list(samples)).T
    return float(sims.max(axis=1).mean())


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "dropped"),
    [
        ("masked_input", set()),
        *(("masked_input", {n}) for n in NODES),  # K - t = 1 holder may drop before its input
        ("unmask", {NODES[0]}),  # input sent, then silent: still in the sum
    ],
)
def test_federated_histogram_equals_sum_of_client_histograms(
    tmp_path: Path, embedder: HashingEmbedder, stage: str, dropped: set[int]
) -> None:
    """Without noise the secure sum is exactly the sum of the survivors' vote histograms."""
    nodes = make_voters(tmp_path, embedder=embedder)
    config = pe_config(top_k=2)
    calibration = calibrate_pe(mode="distributed", epsilon=math.inf, delta=1e-5, rounds=3, top_k=2)
    candidates_text = WordRandomAPI().random("x", 16, seed=1)
    candidates_text[:3] = ["goal match team", "oven salt butter", "coach league score"]
    candidates = embedder.embed(candidates_text)
    manifest = build_round_manifest(
        config,
        calibration,
        pe_task_id="pe-test",
        round_number=1,
        embedder=embedder,
        candidates=candidates,
        nodes=NODES,
    )
    transport = PETransport(nodes, drop={stage: dropped})
    contributed = set() if stage == "unmask" else dropped
    result = run_secure_sum(
        transport,
        manifest,
        {"manifest": manifest.to_json(), "candidates": vector_to_bytes(candidates.reshape(-1))},
    )
    expected = np.zeros(manifest.dim, dtype=np.int64)
    for node_id, node in nodes.items():
        if node_id in contributed:
            continue
        private, label_ids = node.voter.private_embeddings(manifest, embedder)
        expected += vote_histogram(private, label_ids, candidates, n_labels=2, per_label=8, top_k=2)
    assert sorted(result.survivors) == sorted(set(NODES) - contributed)
    got = from_field(result.field_sum, bits=manifest.bits)
    np.testing.assert_array_equal(got, expected)
    assert expected.sum() == 2 * sum(
        n.voter.record_count(LABELS) for i, n in nodes.items() if i not in contributed
    )
    # bits = 32: 4 bytes per histogram entry on the wire, exactly the raw int32 histogram.
    assert all(size == manifest.dim * 4 for size in transport.uploaded.values())


def test_pe_improves_over_rounds_without_noise(tmp_path: Path, embedder: HashingEmbedder) -> None:
    nodes = make_voters(tmp_path, embedder=embedder)
    history: list[float] = []

    def evaluate(population: object) -> dict[str, float]:
        value = mean_best_similarity(embedder, population.samples, tmp_path)  # type: ignore[attr-defined]
        history.append(value)
        return {"similarity": value}

    result = run_pe(
        PETransport(nodes),
        NODES,
        pe_config(rounds=4),
        random_api=WordRandomAPI(),
        variation_api=WordVariationAPI(),
        embedder=embedder,
        checkpoint_dir=tmp_path / "ckpt",
        evaluate=evaluate,
    )
    assert len(history) == 5
    assert history[-1] > history[0] + 0.05
    assert result.state.completed_round == 4
    assert [h.status for h in result.state.history] == ["done"] * 4
    assert result.report["epsilon"] == "inf"


def test_output_population_grows_from_the_last_histogram(
    tmp_path: Path, embedder: HashingEmbedder
) -> None:
    """output_per_label: the votes run on N per label, the final population has M per label."""
    nodes = make_voters(tmp_path, embedder=embedder)
    config = pe_config(rounds=2, output_per_label=20)
    result = run_word_pe(nodes, config, embedder, tmp_path / "ckpt")
    final = result.state.population
    assert final.per_label == 20 and len(final.samples) == 20 * len(LABELS)
    assert result.report["per_label"] == 8 and result.report["output_per_label"] == 20
    # Every round voted on N = 8 per label (the holders' histograms never grow).
    assert [h.status for h in result.state.history] == ["done", "done"]
    assert all(len(h.selected_per_label) == len(LABELS) for h in result.state.history)
    assert all(0 < n <= 8 for h in result.state.history for n in h.selected_per_label)
    # Without the setting the fingerprint is the one older checkpoints carry (no new key).
    plain = pe_config(rounds=2)
    assert plain.fingerprint() != config.fingerprint()
    old_style = {k: v for k, v in asdict(plain).items() if k != "output_per_label"}
    old_style["epsilon"] = str(plain.epsilon)
    text = json.dumps(old_style, sort_keys=True).encode()
    assert plain.fingerprint() == hashlib.sha256(text).hexdigest()[:16]
    with pytest.raises(ConfigError, match="output_per_label=0"):
        pe_config(output_per_label=0)


def test_pe_with_noise_beats_round_zero(tmp_path: Path, embedder: HashingEmbedder) -> None:
    nodes = make_voters(tmp_path, embedder=embedder)
    history: list[float] = []

    def evaluate(population: object) -> dict[str, float]:
        value = mean_best_similarity(embedder, population.samples, tmp_path)  # type: ignore[attr-defined]
        history.append(value)
        return {"similarity": value}

    result = run_pe(
        PETransport(nodes),
        NODES,
        pe_config(rounds=4, epsilon=8.0, threshold_std=0.5),
        random_api=WordRandomAPI(),
        variation_api=WordVariationAPI(),
        embedder=embedder,
        checkpoint_dir=tmp_path / "ckpt",
        evaluate=evaluate,
    )
    assert history[-1] > history[0]
    assert result.calibration.epsilon_achieved <= 8.0
    assert result.report["epsilon"] <= 8.0
    spent = [h.epsilon_spent for h in result.state.history]
    assert spent == sorted(spent) and spent[-1] == pytest.approx(
        result.calibration.epsilon_achieved, rel=1e-6
    )
    # The task is charged once per holder, with its whole epsilon, plus one row per round.
    budget = ClientBudget(tmp_path / "budget-0.jsonl")
    assert budget.spent() == pytest.approx(8.0)
    assert budget.last_round(result.state.pe_task_id) == 4


def test_the_report_states_the_threshold_the_colluders_raised(
    tmp_path: Path, embedder: HashingEmbedder
) -> None:
    """K = 3 with one colluder needs t = 3 (2t − K > 1), not the majority 2: the report says
    the threshold the rounds ran with."""
    nodes = make_voters(tmp_path, embedder=embedder)
    result = run_word_pe(nodes, pe_config(rounds=1, colluders=1), embedder, tmp_path / "ckpt")
    assert result.report["threshold_t"] == 3


def test_restart_resumes_without_spending_twice(tmp_path: Path, embedder: HashingEmbedder) -> None:
    nodes = make_voters(tmp_path, embedder=embedder)
    ckpt = tmp_path / "ckpt"
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    kwargs = {
        "random_api": WordRandomAPI(),
        "variation_api": WordVariationAPI(),
        "embedder": embedder,
        "checkpoint_dir": ckpt,
        "ledger": ledger,
    }
    config = pe_config(rounds=4, epsilon=8.0, threshold_std=0.5)
    first = run_pe(PETransport(nodes), NODES, config, stop_after=2, **kwargs)  # type: ignore[arg-type]
    assert first.state.completed_round == 2
    # Simulate a crash after round 3 started (clients answered, the coordinator died).
    state = load_state(ckpt)
    assert state is not None
    state.started_round = 3
    from fedsynth.server.pe_coordinator import save_state

    save_state(state, ckpt)
    nodes_budget = ClientBudget(tmp_path / "budget-0.jsonl")
    nodes_budget.record_round(state.pe_task_id, 3)
    resumed = run_pe(PETransport(nodes), NODES, config, **kwargs)  # type: ignore[arg-type]
    assert resumed.state.pe_task_id == first.state.pe_task_id
    assert [h.status for h in resumed.state.history] == ["done", "done", "lost", "done"]
    assert resumed.state.completed_round == 4
    # One ledger row for the whole task; client budgets charged once.
    assert [r["task_id"] for r in ledger.rows()] == [first.state.pe_task_id]
    assert ClientBudget(tmp_path / "budget-1.jsonl").spent() == pytest.approx(8.0)
    # Other settings cannot resume this checkpoint.
    with pytest.raises(ConfigError, match="other PE settings"):
        run_pe(PETransport(nodes), NODES, replace(config, per_label=9), **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- bad input


def _round(
    embedder: HashingEmbedder, round_number: int = 1, *, epsilon: float = math.inf
) -> tuple[object, np.ndarray, dict[str, object]]:
    config = pe_config(epsilon=epsilon)
    calibration = calibrate_pe(mode="distributed", epsilon=epsilon, delta=1e-5, rounds=3)
    candidates = embedder.embed(WordRandomAPI().random("x", 16, seed=round_number))
    manifest = build_round_manifest(
        config,
        calibration,
        pe_task_id="pe-bad",
        round_number=round_number,
        embedder=embedder,
        candidates=candidates,
        nodes=NODES,
    )
    fields: dict[str, object] = {
        "manifest": manifest.to_json(),
        "candidates": vector_to_bytes(candidates.reshape(-1)),
    }
    return manifest, candidates, fields


def _setup(node: VoterNode, manifest: object, fields: Mapping[str, object]) -> RecordDict:
    content = pack(Envelope(manifest.task_id, "setup"), dict(fields))  # type: ignore[attr-defined]
    return node.voter.handle("setup", _wire(content), node.state)


def test_client_refuses_wrong_dimension_and_other_embedder(
    tmp_path: Path, embedder: HashingEmbedder
) -> None:
    node = make_voters(tmp_path, embedder=embedder)[NODES[0]]
    manifest, candidates, fields = _round(embedder)
    wrong = dict(fields, candidates=vector_to_bytes(candidates[:, :32].reshape(-1)))
    with pytest.raises(ShapeError, match="candidates"):
        _setup(node, manifest, wrong)
    other = HashingEmbedder(32)
    manifest2, _, fields2 = _round(other)
    with pytest.raises(ModelMismatchError, match="embedder_fingerprint"):
        _setup(node, manifest2, fields2)
    tampered = candidates.copy()
    tampered[0, 0] += 1.0
    with pytest.raises(ConfigError, match="candidates_sha256"):
        _setup(node, manifest, dict(fields, candidates=vector_to_bytes(tampered.reshape(-1))))
    assert ClientBudget(node.voter.settings.budget_path).entries() == []  # nothing spent


def test_client_refuses_replayed_and_stale_rounds(
    tmp_path: Path, embedder: HashingEmbedder
) -> None:
    nodes = make_voters(tmp_path, embedder=embedder)
    for round_number in (1, 2):
        manifest, _candidates, fields = _round(embedder, round_number)
        run_secure_sum(PETransport(nodes), manifest, fields)  # type: ignore[arg-type]
    node = nodes[NODES[0]]
    for round_number, kind in ((2, "replayed"), (1, "stale")):
        manifest, _, fields = _round(embedder, round_number)
        with pytest.raises(StageOrderError, match=kind):
            _setup(node, manifest, fields)
    # The same holds after a node restart (fresh state): the budget file remembers.
    fresh = VoterNode(node.voter)
    manifest, _, fields = _round(embedder, 2)
    with pytest.raises(StageOrderError, match="replayed"):
        _setup(fresh, manifest, fields)
    # A whole round fails when all nodes refuse: nothing is released.
    with pytest.raises(TooFewParticipantsError):
        run_secure_sum(PETransport(nodes), manifest, fields)  # type: ignore[arg-type]


def test_histogram_outside_field_range_is_refused(embedder: HashingEmbedder) -> None:
    manifest, _, _ = _round(embedder, epsilon=4.0)
    bogus = np.zeros(manifest.dim, dtype=np.int64)  # type: ignore[attr-defined]
    bogus[3] = 3 * manifest.max_records + 10_000  # type: ignore[attr-defined]
    with pytest.raises(FieldRangeError, match="outside the range"):
        decode_histogram(to_field(bogus, bits=32), manifest=manifest, survivors=3)  # type: ignore[arg-type]
    bogus[3] = -1_000
    with pytest.raises(FieldRangeError):
        decode_histogram(to_field(bogus, bits=32), manifest=manifest, survivors=3)  # type: ignore[arg-type]


def test_epsilon_too_small_is_refused_before_round_one(
    tmp_path: Path, embedder: HashingEmbedder
) -> None:
    nodes = make_voters(tmp_path, embedder=embedder)
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    config = pe_config(
        epsilon=0.5, rounds=10, per_label=200, keep=100, declared_records_per_label=2000
    )
    with pytest.raises(ConfigError, match=r"minimum workable epsilon is (\d+\.\d+)") as info:
        run_word_pe(nodes, config, embedder, tmp_path / "ckpt", ledger=ledger)
    assert not (tmp_path / "ckpt").exists() and ledger.rows() == []
    minimum = float(str(info.value).split("minimum workable epsilon is ")[1].split()[0])
    assert 2.0 < minimum < 4.0  # distributed Skellam, T = 10, N = 200, 2000 per label
    # At the stated minimum the task is accepted (the check passes).
    from fedsynth.server.pe_coordinator import check_workable

    ok = replace(config, epsilon=minimum)
    check_workable(
        ok,
        calibrate_pe(mode="distributed", epsilon=minimum, delta=1e-5, rounds=10),
        clients=3,
    )
