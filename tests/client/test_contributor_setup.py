"""A dataset-vector holder's setup and commit, where mutation testing found them unchecked.

``scripts/mutmut.sh client/contributor.py`` left alive a setup that looked for the task in no
store at all (``budget.has(None)``), one that checked the lifetime cap against an empty budget
(``ClientBudget(None)``), and a commit that charged a budget keeping nothing (the test that
would catch it charges in forked processes, which mutmut's reach statistics do not see). The
setup refusals come before the model loads and before any state is kept; the commit charges
this holder's store. Also: records read with the holder's field names, the model-mismatch
messages, the ``device`` setting reaching the loader.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import RecordDict

from fedsynth.client.budget import ClientBudget
from fedsynth.client.contributor import Contributor
from fedsynth.client.policy import ClientPolicy
from fedsynth.client.settings import ClientSettings
from fedsynth.protocol.errors import (
    BudgetExceededError,
    ModelMismatchError,
    PolicyViolationError,
    ProtocolError,
)
from fedsynth.protocol.messages import vector_to_bytes
from tests.protocol.test_verification import NODES, vector_manifest


def _never_loaded() -> Any:
    raise AssertionError("a refused task must not load the model")


def _contributor(tmp_path: Path, policy: ClientPolicy, node_id: int = NODES[0]) -> Contributor:
    data = tmp_path / "private.jsonl"
    data.write_text('{"text": "fine", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    settings = ClientSettings(
        data_path=data, budget_path=tmp_path / "budget.sqlite", seed=1, policy=policy
    )
    return Contributor(settings, node_id=node_id, model_loader=_never_loaded)


def _fields(manifest: Any) -> dict[str, Any]:
    reference = np.zeros((2, len(manifest.layers), manifest.hidden_size), dtype=np.float32)
    return {"manifest": manifest.to_json(), "reference": vector_to_bytes(reference.reshape(-1))}


def test_setup_refuses_a_task_this_holder_already_contributed_to(tmp_path: Path) -> None:
    manifest = vector_manifest("distributed", 4.0)
    contributor = _contributor(tmp_path, ClientPolicy(max_epsilon_per_task=8.0))
    ClientBudget(tmp_path / "budget.sqlite").charge(manifest)
    state = RecordDict()
    with pytest.raises(PolicyViolationError) as caught:
        contributor.accept(_fields(manifest), state)
    assert f"task_id={manifest.task_id!r} was already contributed to" in str(caught.value)
    assert not list(state.keys())


def _after_an_earlier_task(tmp_path: Path, policy: ClientPolicy | None = None) -> Contributor:
    """A holder whose store already holds another task (epsilon 4): by default its lifetime
    cap is 6, so a second such task does not fit."""
    contributor = _contributor(
        tmp_path, policy or ClientPolicy(max_epsilon_per_task=4.0, max_total_epsilon=6.0)
    )
    earlier = dataclasses.replace(vector_manifest("distributed", 4.0), task_id="earlier")
    ClientBudget(tmp_path / "budget.sqlite").charge(earlier)
    return contributor


def test_setup_checks_the_lifetime_cap_against_what_the_store_spent(tmp_path: Path) -> None:
    contributor = _after_an_earlier_task(tmp_path)
    with pytest.raises(BudgetExceededError, match=r"max_total_epsilon=6.0"):
        contributor.accept(_fields(vector_manifest("distributed", 4.0)), RecordDict())


def test_a_holder_outside_the_round_is_told_so_and_the_reply_echoes_the_labels(
    tmp_path: Path,
) -> None:
    manifest = vector_manifest("distributed", 4.0)
    outsider = _contributor(tmp_path, ClientPolicy(max_epsilon_per_task=8.0), node_id=99)
    with pytest.raises(ProtocolError) as caught:
        outsider.accept(_fields(manifest), RecordDict())
    assert str(caught.value) == f"node 99 is not a participant of {manifest.task_id}"
    assert outsider.setup_reply_fields(manifest) == {"n_labels": 2}


def test_prepare_refuses_a_task_charged_since_setup(tmp_path: Path) -> None:
    manifest = vector_manifest("distributed", 4.0)
    contributor = _contributor(tmp_path, ClientPolicy(max_epsilon_per_task=8.0))
    ClientBudget(tmp_path / "budget.sqlite").charge(manifest)  # e.g. by a second node process
    with pytest.raises(PolicyViolationError, match="was already contributed to"):
        contributor.prepare(manifest, b"", RecordDict())


def test_the_commit_charges_this_holders_store(tmp_path: Path) -> None:
    manifest = vector_manifest("distributed", 4.0)
    contributor = _contributor(tmp_path, ClientPolicy(max_epsilon_per_task=8.0))
    contributor.committed(manifest, RecordDict())  # nothing counted at setup by this object
    store = ClientBudget(tmp_path / "budget.sqlite")
    assert store.has(manifest.task_id) and store.spent() == 4.0


def test_the_commit_rechecks_the_cap_and_the_record_limit(tmp_path: Path) -> None:
    contributor = _after_an_earlier_task(tmp_path)
    with pytest.raises(BudgetExceededError, match=r"max_total_epsilon=6.0"):
        contributor.committed(vector_manifest("distributed", 4.0), RecordDict())
    # A task whose record bound is below this holder's own cap: the policy's terms are
    # re-checked inside the charge too, and nothing is charged.
    one = dataclasses.replace(vector_manifest("distributed", 4.0), task_id="one", max_records=1)
    (tmp_path / "fresh").mkdir()
    fresh = _contributor(tmp_path / "fresh", ClientPolicy(max_epsilon_per_task=4.0))
    with pytest.raises(PolicyViolationError, match="the task's max_records=1 is below"):
        fresh.committed(one, RecordDict())
    assert not ClientBudget(tmp_path / "fresh" / "budget.sqlite").has("one")


def test_records_are_read_with_the_holders_field_names_and_foreign_labels_left_out(
    tmp_path: Path,
) -> None:
    data = tmp_path / "private.jsonl"
    rows = [("one", "pos"), ("two", "other"), ("three", "neg"), ("four", "pos")]
    data.write_text("".join(f'{{"body": "{t}", "y": "{y}"}}\n' for t, y in rows))
    settings = ClientSettings(
        data_path=data,
        budget_path=tmp_path / "budget.sqlite",
        text_field="body",
        label_field="y",
    )
    contributor = Contributor(settings, node_id=NODES[0], model_loader=_never_loaded)
    batches = list(contributor.record_batches(("pos", "neg"), size=2))
    assert [[(r.text, r.label) for r in batch] for batch in batches] == [
        [("one", "pos"), ("three", "neg")],
        [("four", "pos")],
    ]


class _CharTokenizer:
    """Encodes a text as its characters' code points (enough to fingerprint a tokenizer)."""

    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]


def test_a_model_mismatch_names_both_fingerprints_or_both_sizes() -> None:
    from fedsynth.client.contributor import manifest_model_matches
    from fedsynth.protocol.models import tokenizer_fingerprint

    manifest = vector_manifest("distributed", 4.0)
    other = SimpleNamespace(
        name="local", fingerprint="sha256:" + "00" * 32, hidden_size=32, tokenizer=_CharTokenizer()
    )
    with pytest.raises(ModelMismatchError) as caught:
        manifest_model_matches(other, manifest)  # type: ignore[arg-type]
    assert str(caught.value) == (
        f"model_fingerprint: manifest has {manifest.model_fingerprint}, the local model 'local' "
        f"has {other.fingerprint} (it covers the weights and the tokenizer; the local "
        f"tokenizer's part is {tokenizer_fingerprint(_CharTokenizer())})"
    )
    narrower = SimpleNamespace(name="local", fingerprint=manifest.model_fingerprint, hidden_size=7)
    with pytest.raises(ModelMismatchError) as caught:
        manifest_model_matches(narrower, manifest)  # type: ignore[arg-type]
    assert str(caught.value) == "hidden_size: manifest has 32, local model 7"


def test_the_holders_device_setting_reaches_the_model_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsynth.protocol import models

    calls: list[tuple[str, str | None]] = []
    monkeypatch.setattr(
        models, "load_model", lambda name, device=None: calls.append((name, device))
    )
    settings = ClientSettings(data_path=tmp_path / "data.jsonl", model="tiny-llama", device="cpu")
    Contributor(settings, node_id=NODES[0])._model_loader()
    assert calls == [("tiny-llama", "cpu")]
