"""The secure-sum stages every holder runs, where mutation testing found them unchecked.

``scripts/mutmut.sh client/participant.py`` (against the in-process round, PE round, budget
and setup tests) left alive: later stages that no longer compared the request's task id with
the task in progress, a credentials check that let an identity whose key is not the roster's
through (the secure-sum layer refused it later, with a similar message), a colluder bound
forgotten when the node state is reloaded, an unmask that crashed instead of leaving its noise
in when the chain seed was gone, the lifetime delta cap and the record count left out of the
policy checks at setup and commit, the data index kept in no file, and the refusals' texts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, RecordDict

import tests.server.test_secure_round as rounds
from fedsynth.client import data_index
from fedsynth.client.budget import ClientBudget
from fedsynth.client.contributor import Contributor
from fedsynth.client.data_index import index_path_for
from fedsynth.client.policy import ClientPolicy
from fedsynth.protocol.errors import (
    BudgetExceededError,
    IdentityError,
    LateSubmissionError,
    ProtocolError,
    StageOrderError,
    UnsafeThresholdError,
)
from fedsynth.protocol.exact_noise import NOISE_SEED_FIELD, REMOVAL_FIELD
from fedsynth.protocol.identity import HolderIdentity
from fedsynth.protocol.manifest import TaskManifest
from fedsynth.protocol.messages import Envelope, ints_field, pack
from fedsynth.protocol.models import LoadedModel
from fedsynth.server.coordinator import PublicReference
from fedsynth.server.secure_round import Reply, run_secure_round
from tests.client.test_contributor_setup import _after_an_earlier_task, _contributor, _fields
from tests.protocol.test_verification import DELTA, vector_manifest
from tests.server.test_secure_round import (
    NODES_3,
    LocalTransport,
    Node,
    _wire,
    make_manifest,
    make_nodes,
    setup_request,
)

tiny = rounds.tiny  # the round tests' model and public reference fixtures, shared
reference = rounds.reference

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _after_setup(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference, **options: Any
) -> tuple[Node, TaskManifest]:
    """One holder of a K = 3 task that has answered the setup stage (and nothing else)."""
    manifest = make_manifest(tiny, reference, NODES_3, **options)
    node = make_nodes(tmp_path, tiny, NODES_3)[NODES_3[0]]
    node.contributor.handle("setup", _wire(setup_request(manifest, reference)), node.state)
    return node, manifest


def _send(node: Node, stage: str, task_id: str, fields: Mapping[str, Any]) -> RecordDict:
    return node.contributor.handle(stage, _wire(pack(Envelope(task_id, stage), fields)), node.state)


# ---------------------------------------------------------------------------------------------
# Every stage belongs to the task in progress
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["share_keys", "masked_input", "consistency", "unmask"])
def test_a_later_stage_of_another_task_is_refused_as_stale(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference, stage: str
) -> None:
    node, manifest = _after_setup(tmp_path, tiny, reference)
    with pytest.raises(LateSubmissionError) as caught:
        _send(node, stage, "another-task", {"survivors": ints_field([]), "dropped": []})
    assert str(caught.value) == (
        f"task_id='another-task' is not the current task {manifest.task_id!r} (stale or replay)"
    )


def test_stage_requests_that_lack_a_field_or_carry_a_bad_one_are_refused_by_name(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    """The holder's own log names the field at fault (the coordinator reads the category)."""
    node, manifest = _after_setup(tmp_path, tiny, reference)
    task, members = manifest.task_id, ints_field(list(NODES_3))
    with pytest.raises(ProtocolError) as caught:
        _send(node, "consistency", task, {})
    assert str(caught.value) == "consistency request lacks 'survivors'"
    with pytest.raises(ProtocolError) as caught:
        _send(node, "consistency", task, {"survivors": ["x"]})
    assert str(caught.value) == "survivors: 'x' is not a node id"
    with pytest.raises(StageOrderError) as caught:
        _send(node, "consistency", task, {"survivors": members})
    assert str(caught.value) == (
        "consistency() called in stage 'share_keys'; expected stage 'consistency'"
    )
    for missing in ("survivors", "dropped"):
        fields = {"survivors": members, "dropped": ints_field([])}
        del fields[missing]
        with pytest.raises(ProtocolError) as caught:
            _send(node, "unmask", task, fields)
        assert str(caught.value) == f"unmask request lacks {missing!r}"
    with pytest.raises(ProtocolError) as caught:
        _send(node, "unmask", task, {"survivors": ["x"], "dropped": ints_field([])})
    assert str(caught.value) == "survivors: 'x' is not a node id"
    with pytest.raises(ProtocolError) as caught:
        _send(node, "unmask", task, {"survivors": members, "dropped": ["y"]})
    assert str(caught.value) == "dropped: 'y' is not a node id"
    with pytest.raises(ProtocolError) as caught:
        _send(node, "unmask", task, {"survivors": members, "dropped": [], REMOVAL_FIELD: "all"})
    assert str(caught.value) == (
        "unmask request asks for noise removal 'all'; expected one of ['seed', 'upload']"
    )


def test_corrupt_node_state_is_refused_not_used(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    node, manifest = _after_setup(tmp_path, tiny, reference)
    record = node.state.config_records[node.contributor.state_key]
    record["payload"] = "not bytes"
    with pytest.raises(StageOrderError) as caught:
        _send(node, "share_keys", manifest.task_id, {})
    assert str(caught.value) == "corrupt node state: payload is not bytes"
    fresh = RecordDict()  # a node that never answered a setup
    with pytest.raises(StageOrderError) as caught:
        node.contributor.handle("share_keys", _wire(pack(Envelope("t", "share_keys"), {})), fresh)
    assert str(caught.value) == "no task in progress: the setup stage must come first"


# ---------------------------------------------------------------------------------------------
# The holder's own identity and its colluder bound
# ---------------------------------------------------------------------------------------------


def test_an_identity_whose_key_is_not_the_rosters_is_refused_before_the_task_is_read(
    tmp_path: Path, tiny: LoadedModel
) -> None:
    node = make_nodes(tmp_path, tiny, NODES_3)[NODES_3[0]]
    name = node.settings.identity.name  # type: ignore[union-attr]
    impostor = dataclasses.replace(node.settings, identity=HolderIdentity.generate(name))
    contributor = Contributor(impostor, node_id=node.node_id, model_loader=lambda: tiny)
    garbage = pack(Envelope("t", "setup"), {"manifest": "not a manifest"})
    with pytest.raises(IdentityError) as caught:
        contributor.handle("setup", _wire(garbage), RecordDict())
    assert str(caught.value) == f"identity {name!r} is not in the pinned roster with this key"


def test_a_holder_without_identity_and_roster_names_both(tmp_path: Path) -> None:
    contributor = _contributor(tmp_path, ClientPolicy(max_epsilon_per_task=8.0))
    assert contributor.settings.identity is None and contributor.settings.roster is None
    with pytest.raises(IdentityError) as caught:
        contributor.credentials()
    assert str(caught.value).startswith(
        "this holder has no identity and no roster: it cannot sign its round keys"
    )


def test_a_stricter_colluder_bound_holds_at_every_later_stage(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    """A node restarted mid-round with a larger ``max_colluders`` re-checks the threshold of
    the task in progress before it answers another stage (t = 2 of K = 3 guards against no
    colluder; with one assumed, the masks could be removed)."""
    node, manifest = _after_setup(tmp_path, tiny, reference, threshold=2)
    stricter = dataclasses.replace(
        node.settings, policy=dataclasses.replace(node.settings.policy, max_colluders=1)
    )
    restarted = Contributor(stricter, node_id=node.node_id, model_loader=lambda: tiny)
    with pytest.raises(UnsafeThresholdError, match="threshold t=2 with K=3"):
        restarted.handle(
            "share_keys", _wire(pack(Envelope(manifest.task_id, "share_keys"), {})), node.state
        )


# ---------------------------------------------------------------------------------------------
# Exact noise sharing: a lost chain seed leaves the noise in
# ---------------------------------------------------------------------------------------------


class _SeedLosingTransport(LocalTransport):
    """Erases one holder's chain seed between its masked input and unmask (a lost state)."""

    def __init__(self, nodes: Mapping[int, Node], forgetful: int) -> None:
        super().__init__(nodes)
        self.forgetful = forgetful

    def exchange(
        self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        if stage == "unmask":
            node = self.nodes[self.forgetful]
            del node.state.config_records[node.contributor._noise_key]
        return super().exchange(stage, requests, timeout=timeout)


def test_a_holder_without_its_chain_seed_reveals_none_and_its_noise_stays_in(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    manifest = make_manifest(tiny, reference, NODES_3, task_id="lost-seed", epsilon=4.0)
    assert manifest.privacy.noise_sharing == "exact"
    nodes = make_nodes(tmp_path, tiny, NODES_3, budgets=True)
    forgetful = NODES_3[1]
    transport = _SeedLosingTransport(nodes, forgetful)
    result = run_secure_round(transport, manifest, reference.means)
    assert sorted(result.survivors) == sorted(NODES_3)
    assert set(transport.replies["unmask"]) == set(NODES_3)  # it still answers with its shares
    assert "unmask" not in transport.refusals
    revealed = {
        n for n, r in transport.replies["unmask"].items() if NOISE_SEED_FIELD in r["fedsynth"]
    }
    assert revealed == set(NODES_3) - {forgetful}
    assert sorted(result.noise_removed) == sorted(revealed)


def test_a_chain_seed_that_is_not_bytes_or_of_another_task_is_none(tmp_path: Path) -> None:
    manifest = vector_manifest("distributed", 4.0)
    contributor = _contributor(tmp_path, ClientPolicy(max_epsilon_per_task=8.0))
    state = RecordDict()
    key = contributor._noise_key
    state.config_records[key] = ConfigRecord({"task_id": manifest.task_id, "seed": b"s" * 32})
    assert contributor.noise_seed(manifest, state) == b"s" * 32
    state.config_records[key] = ConfigRecord({"task_id": manifest.task_id, "seed": "text"})
    assert contributor.noise_seed(manifest, state) is None
    state.config_records[key] = ConfigRecord({"task_id": "other", "seed": b"s" * 32})
    assert contributor.noise_seed(manifest, state) is None


def test_an_unseeded_holder_draws_from_the_os(tmp_path: Path) -> None:
    """Without a test seed every draw is fresh: two holders, or two calls, never share noise."""
    contributor = _contributor(tmp_path, ClientPolicy(max_epsilon_per_task=8.0))
    unseeded = Contributor(
        dataclasses.replace(contributor.settings, seed=None), node_id=contributor.node_id
    )
    draws = [unseeded.rng("t").integers(0, 2**62, size=4).tolist() for _ in range(2)]
    assert draws[0] != draws[1]
    seeds = [unseeded._new_noise_seed("t") for _ in range(2)]
    assert all(len(seed) == 32 for seed in seeds) and seeds[0] != seeds[1]
    # A test seed fixes both per node and task.
    assert contributor.rng("t").integers(0, 2**62) == contributor.rng("t").integers(0, 2**62)
    assert contributor._new_noise_seed("t") == contributor._new_noise_seed("t")


def test_a_seeded_holder_draws_other_noise_for_every_task_and_round(tmp_path: Path) -> None:
    """Seeded runs (tests, simulations, benchmarks) reproduce, but never repeat a holder's noise
    across tasks or PE rounds: the same noise in two releases cancels in their difference.
    Before, the seed was fixed per node only, so every round of a seeded PE task drew the
    same noise."""
    contributor = _contributor(tmp_path, ClientPolicy(max_epsilon_per_task=8.0))
    rounds = [f"pe-x/round-{r}" for r in (1, 2, 3)]
    draws = [contributor.rng(t).integers(0, 2**62, size=4).tolist() for t in rounds]
    assert len({tuple(d) for d in draws}) == 3
    assert len({contributor._new_noise_seed(t) for t in rounds}) == 3
    other = Contributor(contributor.settings, node_id=contributor.node_id + 1)
    assert other.rng(rounds[0]).integers(0, 2**62) != contributor.rng(rounds[0]).integers(0, 2**62)


# ---------------------------------------------------------------------------------------------
# The policy at setup and at the commit: the lifetime delta cap and the record count
# ---------------------------------------------------------------------------------------------


def _after_spending_delta(tmp_path: Path) -> Contributor:
    """A holder whose lifetime delta cap (1.5 tasks' worth) already holds one task's delta."""
    policy = ClientPolicy(max_epsilon_per_task=8.0, max_delta=DELTA, max_total_delta=1.5e-5)
    return _after_an_earlier_task(tmp_path, policy)


def test_setup_checks_the_lifetime_delta_cap_against_what_the_store_spent(tmp_path: Path) -> None:
    contributor = _after_spending_delta(tmp_path)
    with pytest.raises(BudgetExceededError, match=r"max_total_delta=1\.5e-05 \(spent 1e-05\)"):
        contributor.accept(_fields(vector_manifest("distributed", 4.0)), RecordDict())


def test_the_commit_rechecks_the_lifetime_delta_cap(tmp_path: Path) -> None:
    contributor = _after_spending_delta(tmp_path)
    manifest = vector_manifest("distributed", 4.0)
    with pytest.raises(BudgetExceededError, match=r"max_total_delta=1\.5e-05 \(spent 1e-05\)"):
        contributor.committed(manifest, RecordDict())
    assert not ClientBudget(tmp_path / "budget.sqlite").has(manifest.task_id)


def test_the_record_count_reaches_the_delta_warning_at_setup_and_at_the_commit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """delta = 0.5 is not below 1/n for this holder's 2 records: its own log says so at setup
    and again when the commit re-checks the terms (never the coordinator)."""
    base = vector_manifest("distributed", 4.0)
    manifest = dataclasses.replace(
        base, privacy=dataclasses.replace(base.privacy, delta=0.5), task_id="loose-delta"
    )
    policy = ClientPolicy(max_epsilon_per_task=8.0, max_delta=0.5, max_total_delta=0.9)
    contributor = _contributor(tmp_path, policy)
    warning = "delta=0.5 is not below 1/n=1/2 for this holder's data"
    # Every check passed: the next step of setup is the model, which this holder never loads.
    with (
        caplog.at_level(logging.WARNING, logger="fedsynth.client.policy"),
        pytest.raises(AssertionError, match="must not load the model"),
    ):
        contributor.accept(_fields(manifest), RecordDict())
    assert [r.getMessage() for r in caplog.records if warning in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedsynth.client.policy"):
        contributor.committed(manifest, RecordDict())
    assert [r.getMessage() for r in caplog.records if warning in r.getMessage()]


# ---------------------------------------------------------------------------------------------
# The record count and its index
# ---------------------------------------------------------------------------------------------


def test_the_count_is_kept_beside_the_store_and_the_skipped_records_are_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    contributor = _contributor(tmp_path, ClientPolicy(max_epsilon_per_task=8.0))
    data = contributor.settings.data_path
    with open(data, "a") as out:
        out.write('{"text": "meh", "label": "neutral"}\n{"text": "so so", "label": "mixed"}\n')
    monkeypatch.setattr(data_index, "SETTLED_NS", 0)  # index a file written this instant
    with pytest.raises(RuntimeError, match=r"^check_file_size before record_count$"):
        contributor.check_file_size()
    with caplog.at_level(logging.WARNING, logger="fedsynth.client.participant"):
        assert contributor.record_count(("pos", "neg")) == 2
    assert contributor.file_records == 4
    assert [r.getMessage() for r in caplog.records] == [
        "2 record(s) carry a label this task does not list; they are left out of it"
    ]
    index = index_path_for(contributor.settings.budget_path)
    assert index is not None and index.is_file()
