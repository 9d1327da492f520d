"""Tests that pin what mutation testing found unchecked in a PE holder.

``scripts/mutmut.sh client/pe_voter.py`` (against the budget, embedding, verification and
in-process PE round tests) left alive: the round order and terms a node without a store keeps
in its state (a replayed round answered twice, changed terms taken), the embedding cache's key
(a data file changed since the last round, or another holder's field names in the same process,
served stale embeddings: votes from records no longer in the file), the holder's field names and
foreign labels, the embedder setting reaching the loader, and the refusals' texts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
from flwr.app import RecordDict
from test_budget import PE_LABELS, PE_NODES, _pe_round

from fedsynth.client import pe_voter
from fedsynth.client.pe_voter import PEVoter, embedder_matches
from fedsynth.client.policy import ClientPolicy
from fedsynth.client.settings import ClientSettings
from fedsynth.protocol.embedding import HashingEmbedder
from fedsynth.protocol.errors import (
    ModelMismatchError,
    PolicyViolationError,
    ShapeError,
    StageOrderError,
)

EMBEDDER = HashingEmbedder(32)


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n: int, text: str = "text", label: str = "label") -> list[dict[str, str]]:
    return [{text: f"{PE_LABELS[i % 2]} item {i}", label: PE_LABELS[i % 2]} for i in range(n)]


def _voter(tmp_path: Path, *, store: bool = False, **settings: Any) -> PEVoter:
    data = settings.pop("data_path", None) or _write(tmp_path / "pe.jsonl", _rows(12))
    config = ClientSettings(
        data_path=data,
        embedder=EMBEDDER.name,
        policy=settings.pop("policy", ClientPolicy(max_epsilon_per_task=8.0)),
        budget_path=tmp_path / "budget.sqlite" if store else None,
        **settings,
    )
    return PEVoter(config, node_id=PE_NODES[0], embedder_loader=lambda: EMBEDDER)


def test_a_node_without_a_store_keeps_the_round_order_in_its_state(tmp_path: Path) -> None:
    voter, state = _voter(tmp_path), RecordDict()
    second, _ = _pe_round(EMBEDDER, 2, epsilon=2.0)
    voter.committed(second, state)
    with pytest.raises(StageOrderError, match=r"round 2 .* is replayed: .* answered round 2"):
        voter.prepare(second, b"", state)
    first, _ = _pe_round(EMBEDDER, 1, epsilon=2.0)
    with pytest.raises(StageOrderError, match=r"round 1 .* is stale: .* answered round 2"):
        voter.prepare(first, b"", state)


def test_a_node_without_a_store_refuses_changed_terms(tmp_path: Path) -> None:
    voter, state = _voter(tmp_path), RecordDict()
    voter.committed(_pe_round(EMBEDDER, 1, epsilon=2.0)[0], state)
    raised, _ = _pe_round(EMBEDDER, 2, epsilon=8.0)
    with pytest.raises(PolicyViolationError) as caught:
        voter.prepare(raised, b"", state)
    assert str(caught.value) == (
        "PE task 'pe-restart' changed its terms (privacy, embedder, labels or top_k) after this "
        "node answered a round; refusing"
    )


def test_a_store_refuses_other_terms_by_name(tmp_path: Path) -> None:
    voter = _voter(tmp_path, store=True)
    voter.committed(_pe_round(EMBEDDER, 1, epsilon=2.0)[0], RecordDict())
    with pytest.raises(PolicyViolationError) as caught:
        _voter(tmp_path, store=True).prepare(
            _pe_round(EMBEDDER, 2, epsilon=8.0)[0], b"", RecordDict()
        )
    assert str(caught.value) == (
        "PE task 'pe-restart' was charged under other terms (privacy, rounds, embedder, labels "
        "or top_k) than this round's; refusing"
    )


def test_embeddings_follow_the_data_file_and_the_holders_field_names(tmp_path: Path) -> None:
    manifest, _ = _pe_round(EMBEDDER, 1, epsilon=2.0)
    data = _write(tmp_path / "pe.jsonl", _rows(12))
    voter = _voter(tmp_path, data_path=data)
    embeddings, labels = voter.private_embeddings(manifest, EMBEDDER)
    assert embeddings.shape == (12, 32) and labels.tolist() == [0, 1] * 6
    # The holder erases records: the next round votes without them.
    _write(data, _rows(12)[:5])
    os.utime(data, ns=(1, 1))  # another mtime whatever the clock's resolution
    embeddings, labels = voter.private_embeddings(manifest, EMBEDDER)
    assert embeddings.shape == (5, 32) and labels.tolist() == [0, 1, 0, 1, 0]
    # Other holders in the process read one file under other field names (a label of no task
    # left out): each gets its own records, not the embeddings cached for another's fields.
    rows = [
        {"text": f"t{i}", "label": PE_LABELS[i % 2], "body": f"b{i}", "y": PE_LABELS[(i + 1) % 2]}
        for i in range(4)
    ]
    rows.append({"text": "x", "label": "weather", "body": "x", "y": "weather"})
    shared = _write(tmp_path / "shared.jsonl", rows)
    other = tmp_path / "other"
    other.mkdir()
    plain = _voter(other, data_path=shared).private_embeddings(manifest, EMBEDDER)
    by_y = _voter(other, data_path=shared, label_field="y").private_embeddings(manifest, EMBEDDER)
    by_body = _voter(other, data_path=shared, text_field="body").private_embeddings(
        manifest, EMBEDDER
    )
    assert plain[1].tolist() == [0, 1, 0, 1] and by_y[1].tolist() == [1, 0, 1, 0]
    assert (by_y[0] == plain[0]).all() and not (by_body[0] == plain[0]).all()
    assert by_body[0].shape == (4, 32) and by_body[1].tolist() == [0, 1, 0, 1]


def test_a_later_round_is_not_counted_twice_against_the_cap(tmp_path: Path) -> None:
    policy = ClientPolicy(max_epsilon_per_task=2.0, max_total_epsilon=3.0)
    voter = _voter(tmp_path, store=True, policy=policy)
    first, _ = _pe_round(EMBEDDER, 1, epsilon=2.0)
    voter.committed(first, RecordDict())  # 2 of the 3 spent, on this task
    _, fields = _pe_round(EMBEDDER, 2, epsilon=2.0)
    manifest, _ = voter.accept(fields, RecordDict())  # 2 + 0 for the others, not 2 + 2
    assert manifest.round == 2


def test_the_embedder_setting_reaches_the_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str | None]] = []
    monkeypatch.setattr(
        pe_voter, "load_embedder", lambda name, device=None: calls.append((name, device))
    )
    settings = ClientSettings(data_path=tmp_path / "d.jsonl", embedder="hashing-8", device="cpu")
    PEVoter(settings, node_id=PE_NODES[0])._embedder_loader()
    assert calls == [("hashing-8", "cpu")]


def test_an_embedder_of_another_size_is_named(tmp_path: Path) -> None:
    manifest, _ = _pe_round(EMBEDDER, 1, epsilon=2.0)
    other = HashingEmbedder(16)
    narrower = dataclasses.replace(manifest, embedder_fingerprint=other.fingerprint)
    with pytest.raises(ModelMismatchError) as caught:
        embedder_matches(other, narrower)
    assert str(caught.value) == "embedding_dim: manifest has 32, local embedder 16"


def test_a_restarted_node_reads_the_answered_round_from_its_store(tmp_path: Path) -> None:
    _voter(tmp_path, store=True).committed(_pe_round(EMBEDDER, 2, epsilon=2.0)[0], RecordDict())
    restarted = _voter(tmp_path, store=True)  # an empty node state
    with pytest.raises(StageOrderError, match=r"round 2 .* is replayed: .* answered round 2"):
        restarted.prepare(_pe_round(EMBEDDER, 2, epsilon=2.0)[0], b"", RecordDict())


def test_candidates_of_the_wrong_size_are_named(tmp_path: Path) -> None:
    manifest, fields = _pe_round(EMBEDDER, 1, epsilon=2.0)
    with pytest.raises(ShapeError, match=r"^candidates: 4 bytes != "):
        _voter(tmp_path).accept({**fields, "candidates": b"\x00" * 4}, RecordDict())
    other = HashingEmbedder(16)
    with pytest.raises(ModelMismatchError) as caught:
        embedder_matches(other, manifest)
    assert str(caught.value) == (
        f"embedder_fingerprint: manifest has {manifest.embedder_fingerprint}, the local "
        f"embedder {other.name!r} has {other.fingerprint}"
    )
