"""Tests of the holder's ClientApp: consent only from the holder, categories only, no store no task.

Messages go through the real ClientApp (``app(message, context)``), as Flower delivers them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, Metadata, RecordDict
from processes import packages_loaded_by

from fedsynth.client.budget import ClientBudget
from fedsynth.client.flower_app import (
    ACTION,
    PE_ACTION,
    make_client_app,
    settings_from_context,
)
from fedsynth.client.policy import ClientPolicy
from fedsynth.client.settings import ClientSettings
from fedsynth.protocol.errors import (
    BudgetStoreError,
    ConfigError,
    PolicyViolationError,
    RefusalCategory,
    refusal_summary,
)
from fedsynth.protocol.features import PromptTemplate
from fedsynth.protocol.identity import simulated_member, write_simulated_consortium
from fedsynth.protocol.manifest import PrivacySpec, TaskManifest
from fedsynth.protocol.messages import Envelope, pack, vector_to_bytes
from fedsynth.protocol.models import LoadedModel, tiny_model
from fedsynth.server.coordinator import PublicReference, TaskConfig, build_manifest

TEMPLATE = PromptTemplate(
    instruction="Review ({label}): ", label_names=(("pos", "positive"), ("neg", "negative"))
)
LAYERS = (1, 2)
NODE = 7
NODES = (NODE, 8, 9)
CATEGORIES = {c.value for c in RefusalCategory}


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_model(seed=0)


def make_task(
    tiny: LoadedModel, *, delta: float = 1e-5, means: np.ndarray | None = None, **changes: Any
) -> tuple[TaskManifest, np.ndarray]:
    shape = (len(TEMPLATE.labels), len(LAYERS), tiny.hidden_size)
    reference = PublicReference(
        texts={},
        means=np.zeros(shape, dtype=np.float32) if means is None else means,
        clip_norms=(1.0, 1.0),
        residual_norms=(1.0, 1.0),
    )
    config = TaskConfig(
        template=TEMPLATE, layers=LAYERS, max_text_tokens=16, epsilon=4.0, delta=delta
    )
    manifest = build_manifest(config, tiny, reference, NODES, task_id="task-x")
    return dataclasses.replace(manifest, **changes), reference.means


def message(action: str, stage: str, fields: dict[str, Any], task_id: str = "task-x") -> Message:
    metadata = Metadata(
        run_id=1,
        message_id="m-1",
        src_node_id=1,
        dst_node_id=NODE,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=600.0,
        message_type=f"query.{action}",
    )
    return Message(content=pack(Envelope(task_id, stage), fields), metadata=metadata)


def setup_message(manifest: TaskManifest, means: np.ndarray) -> Message:
    fields = {"manifest": manifest.to_json(), "reference": vector_to_bytes(means.reshape(-1))}
    return message(ACTION, "setup", fields)


def context(node: dict[str, Any], run: dict[str, Any] | None = None) -> Context:
    return Context(
        run_id=1, node_id=NODE, node_config=node, state=RecordDict(), run_config=run or {}
    )


def write_records(path: Path, n: int) -> Path:
    rows = [{"text": f"so so {i}", "label": TEMPLATE.labels[i % 2]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def holder(tmp_path: Path, n_records: int, policy: ClientPolicy | None = None) -> ClientSettings:
    ids = tmp_path / "ids"
    ids.mkdir()
    write_simulated_consortium(ids, len(NODES))
    identity, roster = simulated_member(ids, 0)
    return ClientSettings(
        data_path=write_records(tmp_path / "private.jsonl", n_records),
        policy=policy or ClientPolicy(),
        budget_path=tmp_path / "budget.sqlite",
        identity=identity,
        roster=roster,
    )


def refusal_of(reply: Message) -> str:
    assert reply.has_error(), "the node took part"
    return str(reply.error.reason)


# ---------------------------------------------------------------------------------------------
# Budgets fail closed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("action", [ACTION, PE_ACTION])
def test_a_node_without_a_budget_store_refuses_every_task(tmp_path: Path, action: str) -> None:
    node = {"data-path": str(write_records(tmp_path / "private.jsonl", 4))}
    with pytest.raises(BudgetStoreError, match="budget-path is not set"):
        settings_from_context(context(node))
    reply = make_client_app()(message(action, "setup", {}), context(node))
    assert refusal_of(reply) == "budget"
    # A fixed-settings app without a store refuses the same way.
    bare = ClientSettings(data_path=tmp_path / "private.jsonl")
    reply = make_client_app(bare)(message(action, "setup", {}), context({}))
    assert refusal_of(reply) == "budget"


def test_budget_path_from_the_node_config_and_beside_simulated_partitions(
    tmp_path: Path,
) -> None:
    node = {"data-path": "/data/private.jsonl", "budget-path": str(tmp_path / "b.sqlite")}
    assert settings_from_context(context(node)).budget_path == tmp_path / "b.sqlite"
    simulated = settings_from_context(
        context({"partition-id": 2, "num-partitions": 3}, {"data-dir": str(tmp_path / "parts")})
    )
    assert simulated.data_path == tmp_path / "parts" / "partition-2.jsonl"
    assert simulated.budget_path == tmp_path / "parts" / "budget-2.sqlite"


def test_a_deployed_node_reads_no_file_the_run_config_names(tmp_path: Path) -> None:
    """The run config is the coordinator's: without data-path in its own node config a
    SuperNode that is not simulated refuses, rather than read (and keep its budget beside)
    whatever directory the run names."""
    run = {"data-dir": str(tmp_path / "elsewhere")}
    with pytest.raises(ConfigError, match="names no data-path"):
        settings_from_context(context({"partition-id": 0}, run))
    assert refusal_of(make_client_app()(message(ACTION, "setup", {}), context({}, run))) != ""


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model", "/srv/models/anything"),
        ("model", "org/hub-model"),
        ("model", "tiny-llama"),
        ("model", "tiny-gpt2"),
        ("embedder", "/srv/emb"),
        ("embedder", "hashing-67108864"),
    ],
)
def test_a_deployed_node_loads_no_model_path_the_run_config_names(
    tmp_path: Path, key: str, value: str
) -> None:
    """A run config may pick a packaged model or embedder by name; a path, a hub id, a
    random-weight test model or a hashing embedder (whose width the coordinator would pick) is
    the holder's own choice (its node config), as its data file is."""
    node = {"data-path": "/data/private.jsonl", "budget-path": str(tmp_path / "b.sqlite")}
    with pytest.raises(PolicyViolationError, match=rf"run config {key}='{value}'"):
        settings_from_context(context(node, {key: value}))
    reply = make_client_app()(message(ACTION, "setup", {}), context(node, {key: value}))
    assert refusal_of(reply) == "policy"
    # By name from the run, or any value from the node's own config, is taken.
    named = settings_from_context(
        context(node, {"model": "smollm2-135m", "embedder": "all-minilm-l6-v2"})
    )
    assert (named.model, named.embedder) == ("smollm2-135m", "all-minilm-l6-v2")
    own = settings_from_context(context({**node, key: value}, {key: "other"}))
    assert getattr(own, key) == value
    # A simulated node's run config is its own operator's: paths are taken there.
    simulated = settings_from_context(
        context({"partition-id": 0, "num-partitions": 2}, {"data-dir": str(tmp_path), key: value})
    )
    assert getattr(simulated, key) == value


# ---------------------------------------------------------------------------------------------
# Non-private only by the holder's own word
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, "true", False])
def test_a_run_config_cannot_enable_non_private_releases(tmp_path: Path, value: object) -> None:
    node = {"data-path": "/data/private.jsonl", "budget-path": str(tmp_path / "b.sqlite")}
    run = {"allow-non-private": value}
    with pytest.raises(
        PolicyViolationError,
        match=r"allow-non-private.*the coordinator's run config may not enable non-private",
    ):
        settings_from_context(context(node, run))
    assert refusal_of(make_client_app()(message(ACTION, "setup", {}), context(node, run))) == (
        "policy"
    )


@pytest.mark.parametrize(
    ("value", "allowed"), [(True, True), ("TRUE", True), ("false", False), (False, False)]
)
def test_consent_comes_from_the_node_config_strictly(
    tmp_path: Path, value: object, allowed: bool
) -> None:
    node = {
        "data-path": "/data/private.jsonl",
        "budget-path": str(tmp_path / "b.sqlite"),
        "allow-non-private": value,
    }
    assert settings_from_context(context(node)).policy.allow_non_private is allowed


def test_consent_defaults_to_no(tmp_path: Path) -> None:
    node = {"data-path": "/data/private.jsonl", "budget-path": str(tmp_path / "b.sqlite")}
    assert settings_from_context(context(node)).policy.allow_non_private is False


@pytest.mark.parametrize("value", ["yes", "0", 1])
def test_a_non_boolean_consent_is_an_error_naming_the_key(tmp_path: Path, value: object) -> None:
    node = {
        "data-path": "/data/private.jsonl",
        "budget-path": str(tmp_path / "b.sqlite"),
        "allow-non-private": value,
    }
    with pytest.raises(ConfigError, match=f"allow-non-private={value!r}"):
        settings_from_context(context(node))
    assert refusal_of(make_client_app()(message(ACTION, "setup", {}), context(node))) == "policy"


# ---------------------------------------------------------------------------------------------
# Refusals carry the category only; the details stay in the holder's log
# ---------------------------------------------------------------------------------------------


def test_too_many_records_is_refused_without_the_count(
    tmp_path: Path, tiny: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    """The record cap that refuses is the holder's own, the same for every task: a cap the
    coordinator sets could be moved over free setups until the answer flips at n."""
    manifest, means = make_task(tiny)
    app = make_client_app(holder(tmp_path, n_records=17, policy=ClientPolicy(max_records=16)))
    with caplog.at_level(logging.WARNING):
        reason = refusal_of(app(setup_message(manifest, means), context({})))
    assert reason == "policy"
    assert "17 records exceed this holder's max_records=16" in caplog.text
    # A task capped below the holder's cap is refused whatever the file holds (here 2 records).
    small, means = make_task(tiny, max_records=3)
    (tmp_path / "second").mkdir()
    app = make_client_app(holder(tmp_path / "second", n_records=2))
    assert refusal_of(app(setup_message(small, means), context({}))) == "policy"


def write_labelled(path: Path, labels: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"text": f"fine {i}", "label": label} for i, label in enumerate(labels)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_holder(folder: Path, labels: list[str], **policy: Any) -> ClientSettings:
    folder.mkdir(parents=True)
    settings = holder(folder, n_records=1, policy=ClientPolicy(**policy))
    path = write_labelled(folder / "private.jsonl", labels)
    return dataclasses.replace(settings, data_path=path, model="tiny-llama")


def test_the_record_cap_counts_the_whole_file_whatever_the_task_labels(
    tmp_path: Path, tiny: LoadedModel
) -> None:
    """Counted over the task's labels only, the cap would answer "do labels L hold more than
    max_records?" for any L the coordinator names, at a free setup."""
    file = ["pos", "pos", "pos", "neg", "neg"]
    manifest, means = make_task(tiny)
    one_label = dataclasses.replace(
        manifest, template=dataclasses.replace(TEMPLATE, label_names=(("pos", "p"), ("x", "x")))
    )
    for n, task in enumerate((manifest, one_label)):
        app = make_client_app(tiny_holder(tmp_path / f"cap4-{n}", file, max_records=4))
        assert refusal_of(app(setup_message(task, means), context({}))) == "policy"
        app = make_client_app(tiny_holder(tmp_path / f"cap5-{n}", file, max_records=5))
        assert not app(setup_message(task, means), context({})).has_error()


def test_a_non_finite_reference_is_refused_at_setup_whatever_the_data(
    tmp_path: Path, tiny: LoadedModel
) -> None:
    """A NaN in one label's reference row would turn that label's records into NaN and fail
    only a holder that has one: refused at setup instead, alike for every file."""
    shape = (len(TEMPLATE.labels), len(LAYERS), tiny.hidden_size)
    poisoned = np.zeros(shape, dtype=np.float32)
    poisoned[1, 0, 0] = np.nan
    manifest, means = make_task(tiny, means=poisoned)
    for name, labels in (("both", ["pos", "neg"]), ("pos-only", ["pos", "pos"])):
        app = make_client_app(tiny_holder(tmp_path / name, labels))
        assert refusal_of(app(setup_message(manifest, means), context({}))) == "protocol"
    clean, zeros = make_task(tiny)
    app = make_client_app(tiny_holder(tmp_path / "clean", ["pos", "neg"]))
    assert not app(setup_message(clean, zeros), context({})).has_error()


def test_a_text_length_beyond_the_model_context_is_refused_at_setup(
    tmp_path: Path, tiny: LoadedModel
) -> None:
    """The prompt plus max_text_tokens bounds every record's input: a task whose bound outruns
    the positions (256 for the tiny model) is refused before a record is read, so a long
    prompt cannot make only the long records fail."""
    assert tiny.context == 256
    prompt = len(tiny.tokenizer.encode(TEMPLATE.prefix("pos"), add_special_tokens=True))
    fits, means = make_task(tiny, max_text_tokens=256 - prompt - 8)
    too_long, _ = make_task(tiny, max_text_tokens=256)
    for n, labels in enumerate((["pos", "neg"], ["neg"])):
        app = make_client_app(tiny_holder(tmp_path / f"long-{n}", labels))
        assert refusal_of(app(setup_message(too_long, means), context({}))) == "protocol"
        app = make_client_app(tiny_holder(tmp_path / f"fits-{n}", labels))
        assert not app(setup_message(fits, means), context({})).has_error()


def test_delta_above_one_over_n_is_not_a_refusal_but_a_local_warning(
    tmp_path: Path, tiny: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    """Refusing delta >= 1/n would tell the coordinator about n (it can move delta); the holder's
    max_delta refuses, and its own log names 1/n."""
    manifest, means = make_task(tiny, delta=1e-4)
    settings = dataclasses.replace(holder(tmp_path, n_records=12_345), model="tiny-llama")
    app = make_client_app(settings)  # 1/n < delta
    with caplog.at_level(logging.WARNING):
        reply = app(setup_message(manifest, means), context({}))
    assert not reply.has_error()
    assert "1/n=1/12345" in caplog.text


def test_a_budget_refusal_does_not_tell_the_spend(
    tmp_path: Path, tiny: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    settings = holder(tmp_path, n_records=9)
    store = ClientBudget(settings.budget_path)
    for i, eps in enumerate((8.0, 8.0, 8.0, 8.0, 8.0, 7.25)):  # 47.25 of the cap of 50 spent
        privacy = PrivacySpec(
            epsilon=eps,
            delta=1e-6,
            mode="distributed",
            threshold=2,
            total_variance=1.0,
            noise_multiplier=1.0,
            l2_sensitivity=1.0,
            l1_sensitivity=1.0,
            accountant="rdp",
        )
        store.charge_task(f"earlier-{i}", privacy)
    manifest, means = make_task(tiny)
    with caplog.at_level(logging.WARNING):
        reason = refusal_of(make_client_app(settings)(setup_message(manifest, means), context({})))
    assert reason == "budget"
    assert not any(ch.isdigit() for ch in reason)
    assert "spent 47.25" in caplog.text
    assert store.spent() == pytest.approx(47.25)


def test_reports_keep_stage_and_category_only() -> None:
    assert refusal_summary("setup: policy") == "setup: policy"
    assert refusal_summary("masked_input: budget") == "masked_input: budget"
    assert refusal_summary("budget") == "budget"
    # Anything else (an old client's detailed reason) is reported as a protocol failure.
    assert (
        refusal_summary("setup: PolicyViolationError: delta must be below 1/n=1/12345")
        == "setup: protocol"
    )
    assert refusal_summary("BudgetExceededError: spent 47.25") == "protocol"
    assert refusal_summary(None) == "protocol"
    for category in CATEGORIES:
        assert refusal_summary(f"unmask: {category}") == f"unmask: {category}"


def test_the_client_app_and_the_cli_start_without_the_heavy_libraries() -> None:
    """Flower starts a ClientApp process per message and every command starts the CLI: neither
    imports torch, dp-accounting or scipy until a stage or command needs them."""
    starts = ["fedsynth.client.flower_app", "fedsynth.simulations.cli"]
    heavy = ["torch", "dp_accounting", "scipy", "transformers"]
    assert packages_loaded_by(starts, heavy) == []
