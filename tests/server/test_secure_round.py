"""End-to-end tests of one secure-sum round: coordinator and real Contributors in one process.

An in-process Transport carries each stage's RecordDict (through Flower's protobuf
serialization, as on the wire) to ``Contributor.handle`` with one persistent state per node, and
maps every refusal to ``Reply(error=...)`` as the Flower ClientApp does. The tiny random model is
used for features; only shapes and exact arithmetic matter here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from fedsynth.client.contributor import ClientSettings, Contributor, refusal_reason
from fedsynth.client.data import load_records
from fedsynth.client.policy import ClientBudget, ClientPolicy
from fedsynth.protocol.codec import field_sum, from_field
from fedsynth.protocol.contribution import (
    decode_release,
    encode_contribution,
    integer_class_sums,
    noise_schedule,
)
from fedsynth.protocol.errors import (
    ClockSkewError,
    ConfigError,
    FedSynthError,
    IdentityError,
    KeyAuthenticationError,
    ProtocolError,
    StageOrderError,
    TooFewParticipantsError,
    UnsafeThresholdError,
)
from fedsynth.protocol.exact_noise import (
    NOISE_EXCESS_FIELD,
    NOISE_SEED_FIELD,
    REMOVAL_FIELD,
    SEED_BYTES,
    TOLERANCE,
    aggregate_variance,
    removable_noise,
    revealed_seed,
)
from fedsynth.protocol.features import (
    FeatureSpec,
    PromptTemplate,
    class_unit_sums,
    extract_features,
)
from fedsynth.protocol.identity import HolderIdentity, Roster
from fedsynth.protocol.manifest import TaskManifest
from fedsynth.protocol.messages import (
    Envelope,
    blobs_from_fields,
    ints_field,
    ints_from_bytes,
    pack,
    vector_from_bytes,
    vector_to_bytes,
)
from fedsynth.protocol.models import LoadedModel, tiny_model
from fedsynth.protocol.secagg.crypto import combine_secret, prg, prg_nonce, sub_inplace
from fedsynth.protocol.verification import verify_task_manifest
from fedsynth.server.coordinator import PublicReference, TaskConfig, build_manifest
from fedsynth.server.release import privacy_report
from fedsynth.server.secure_round import Reply, RoundResult, run_secure_round

TEMPLATE = PromptTemplate(
    instruction="Review ({label}): ",
    label_names=(("pos", "positive"), ("neg", "negative")),
    shots=(("neg", "dull"),),
)
LAYERS = (1, 2)
SEED = 1234
BATCH = 4
NODES_3 = (7, 2**40 + 3, 2**64 - 1)
NODES_5 = (*NODES_3, 12_345, 2**63)
WORDS = [
    "good",
    "bad",
    "plot",
    "actor",
    "slow",
    "fun",
    "long",
    "dull",
    "bright",
    "dark",
    "film",
    "story",
    "ending",
    "music",
]
PUBLIC = {
    "pos": ["a fine film", "great fun", "lovely music", "bright story"],
    "neg": ["a dull film", "too long", "bad acting", "dark and slow"],
}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def reference(tiny: LoadedModel) -> PublicReference:
    texts = [t for label in TEMPLATE.labels for t in PUBLIC[label]]
    labels = [label for label in TEMPLATE.labels for _ in PUBLIC[label]]
    feats, norms = extract_features(tiny, texts, labels, FeatureSpec(TEMPLATE, LAYERS, 32, 8))
    ids = np.array([TEMPLATE.labels.index(label) for label in labels])
    means = np.stack([feats[ids == c].mean(axis=0) for c in range(len(TEMPLATE.labels))])
    deviations = np.linalg.norm(feats - means[ids], axis=-1)
    return PublicReference(
        texts={},
        means=means.astype(np.float32),
        # Half the median distance, so that some private records are clipped and some not.
        clip_norms=tuple(float(x) for x in 0.5 * np.median(deviations, axis=0)),
        residual_norms=tuple(float(x) for x in np.median(norms, axis=0)),
    )


def make_manifest(
    tiny: LoadedModel,
    reference: PublicReference,
    node_ids: tuple[int, ...],
    *,
    task_id: str = "task-a",
    epsilon: float = math.inf,
    threshold: int | None = None,
    scale: float = 1000.0,
    colluders: int = 0,
) -> TaskManifest:
    config = TaskConfig(
        template=TEMPLATE,
        layers=LAYERS,
        max_text_tokens=32,
        epsilon=epsilon,
        delta=1e-5,
        threshold=threshold,
        colluders=colluders,
        scale=scale,
        bits=64,
        prior_per_label=2,
    )
    return build_manifest(config, tiny, reference, node_ids, task_id=task_id)


# ---------------------------------------------------------------------------------------------
# A federation of real Contributors behind an in-process transport
# ---------------------------------------------------------------------------------------------


@dataclass
class Node:
    node_id: int
    contributor: Contributor
    settings: ClientSettings
    state: RecordDict = field(default_factory=RecordDict)


def _wire(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))


def setup_request(manifest: TaskManifest, reference: PublicReference) -> RecordDict:
    """The coordinator's setup request of ``manifest``, as one holder receives it."""
    return pack(
        Envelope(manifest.task_id, "setup"),
        {"manifest": manifest.to_json(), "reference": vector_to_bytes(reference.means.reshape(-1))},
    )


def write_records(
    path: Path, node_index: int, *, n: int = 5, extra_label: str | None = None
) -> Path:
    rng = np.random.default_rng(100 + node_index)
    rows = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(1, 5)))
        rows.append({"text": " ".join(words), "label": TEMPLATE.labels[(i + node_index) % 2]})
    if extra_label is not None:
        rows.append({"text": "so so", "label": extra_label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_nodes(
    tmp_path: Path,
    tiny: LoadedModel,
    node_ids: tuple[int, ...],
    *,
    models: Mapping[int, LoadedModel] | None = None,
    extra_labels: Mapping[int, str] | None = None,
    policy: ClientPolicy | None = None,
    budgets: bool = False,
) -> dict[int, Node]:
    nodes = {}
    identities = {n: HolderIdentity.generate(f"holder-{i}") for i, n in enumerate(node_ids)}
    roster = Roster({identity.name: identity.public_key for identity in identities.values()})
    for index, node_id in enumerate(node_ids):
        data = write_records(
            tmp_path / f"data-{index}.jsonl",
            index,
            n=3 + index % 3,
            extra_label=(extra_labels or {}).get(node_id),
        )
        settings = ClientSettings(
            data_path=data,
            seed=SEED,
            batch_size=BATCH,
            policy=policy or ClientPolicy(allow_non_private=True),
            budget_path=tmp_path / f"budget-{index}.jsonl" if budgets else None,
            identity=identities[node_id],
            roster=roster,
        )
        model = (models or {}).get(node_id, tiny)
        contributor = Contributor(settings, node_id=node_id, model_loader=lambda model=model: model)
        nodes[node_id] = Node(node_id, contributor, settings)
    return nodes


class LocalTransport:
    """Routes requests to Contributors; can drop nodes or make a node's reply stale."""

    def __init__(
        self,
        nodes: Mapping[int, Node],
        *,
        drop: Mapping[str, set[int]] | None = None,
        stale: Mapping[str, set[int]] | None = None,
    ) -> None:
        self.nodes = nodes
        self.drop = drop or {}
        self.stale = stale or {}
        self.stages: list[str] = []
        self.timeouts: list[float] = []
        self.requests: dict[str, dict[int, RecordDict]] = {}
        self.replies: dict[str, dict[int, RecordDict]] = {}
        self.refusals: dict[str, dict[int, FedSynthError]] = {}  # what each holder raised

    def exchange(
        self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        self.stages.append(stage)
        self.timeouts.append(timeout)
        self.requests[stage] = dict(requests)
        out: dict[int, Reply] = {}
        for node_id, content in requests.items():
            if node_id in self.drop.get(stage, set()):
                continue  # no reply before the deadline
            node = self.nodes[node_id]
            try:
                reply = node.contributor.handle(stage, _wire(content), node.state)
            except FedSynthError as exc:
                self.refusals.setdefault(stage, {})[node_id] = exc
                out[node_id] = Reply(content=None, error=refusal_reason(exc))
                continue
            reply = _wire(reply)
            if node_id in self.stale.get(stage, set()):
                reply.config_records["fedsynth"]["task_id"] = "an-earlier-task"
            self.replies.setdefault(stage, {})[node_id] = reply
            out[node_id] = Reply(content=reply)
        return out


# ---------------------------------------------------------------------------------------------
# What the round should produce, computed without the protocol
# ---------------------------------------------------------------------------------------------


def node_records(node: Node, manifest: TaskManifest) -> tuple[list[str], list[str]]:
    records = load_records(node.settings.data_path)  # a label the task omits is left out
    kept = [r for r in records if r.label in manifest.labels]
    return [r.text for r in kept], [r.label for r in kept]


def plain_contribution(
    node: Node, manifest: TaskManifest, reference: PublicReference, model: LoadedModel
) -> np.ndarray:
    """The node's unmasked field vector, recomputed with its (test-only) fixed seed."""
    texts, labels = node_records(node, manifest)
    spec = dataclasses.replace(manifest.feature_spec, batch_size=BATCH)
    feats, _ = extract_features(model, texts, labels, spec)
    rng = node.contributor.rng(manifest.task_id)  # the seeded holder's own generator
    sums = integer_class_sums(feats, labels, manifest=manifest, reference=reference.means, rng=rng)
    return encode_contribution(sums, manifest=manifest, rng=rng)


def pooled_release(
    nodes: list[Node], manifest: TaskManifest, reference: PublicReference, model: LoadedModel
) -> tuple[np.ndarray, np.ndarray]:
    """Non-federated per-class means (model units) and counts over the given nodes' records."""
    texts: list[str] = []
    labels: list[str] = []
    for node in nodes:
        t, lab = node_records(node, manifest)
        texts += t
        labels += lab
    feats, _ = extract_features(model, texts, labels, manifest.feature_spec)
    clip = np.asarray(manifest.clip_norms)
    sums = class_unit_sums(
        feats,
        labels,
        label_order=manifest.labels,
        reference=reference.means,
        clip_norms=clip,
        count_weight=manifest.count_weight,
    )
    counts = sums[:, -1] / manifest.count_weight
    shape = (len(manifest.labels), len(manifest.layers), manifest.hidden_size)
    vectors = sums[:, :-1].reshape(shape) / counts[:, None, None] * clip[None, :, None]
    return vectors, counts


def assert_release_matches(
    result: RoundResult,
    contributors: list[Node],
    manifest: TaskManifest,
    reference: PublicReference,
    model: LoadedModel,
) -> None:
    # Exactly the modular sum of the contributors' own field vectors...
    plain = [plain_contribution(n, manifest, reference, model) for n in contributors]
    np.testing.assert_array_equal(result.field_sum, field_sum(plain, bits=manifest.bits))
    # ...which decodes to the pooled, non-federated means within the rounding error.
    decoded = decode_release(result.field_sum, manifest=manifest, survivors=len(result.survivors))
    vectors, counts = pooled_release(contributors, manifest, reference, model)
    np.testing.assert_array_equal(decoded.counts, counts)
    assert counts.min() >= 1
    tolerance = np.asarray(manifest.clip_norms)[None, :, None] / manifest.scale + 1e-5
    assert np.all(np.abs(decoded.vectors - vectors) <= tolerance)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("node_ids", [NODES_3, NODES_5], ids=["K3", "K5"])
def test_round_equals_pooled_computation(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference, node_ids: tuple[int, ...]
) -> None:
    manifest = make_manifest(tiny, reference, node_ids)
    assert manifest.privacy.threshold == len(node_ids) // 2 + 1
    nodes = make_nodes(tmp_path, tiny, node_ids)
    transport = LocalTransport(nodes)
    stages: list[str] = []
    result = run_secure_round(transport, manifest, reference.means, progress=stages.append)
    assert stages == ["setup", "share_keys", "masked_input", "consistency", "unmask", "done"]
    assert transport.stages == ["setup", "share_keys", "masked_input", "consistency", "unmask"]
    assert set(transport.timeouts) == {manifest.deadline_s}
    assert result.survivors == sorted(node_ids)
    assert result.dropped == []
    assert result.refusals == {}
    assert_release_matches(result, list(nodes.values()), manifest, reference, tiny)


@pytest.mark.parametrize("stage", ["setup", "share_keys", "masked_input"])
def test_dropouts_leave_the_survivors_sum(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference, stage: str
) -> None:
    manifest = make_manifest(tiny, reference, NODES_5)
    t = manifest.privacy.threshold
    assert t == 3
    gone = {NODES_5[1], NODES_5[3]}  # K - t nodes: the most the round tolerates
    nodes = make_nodes(tmp_path, tiny, NODES_5)
    result = run_secure_round(LocalTransport(nodes, drop={stage: gone}), manifest, reference.means)
    assert result.survivors == sorted(set(NODES_5) - gone)
    # Only nodes that shared keys and then went silent need their pairwise masks removed.
    assert result.dropped == (sorted(gone) if stage == "masked_input" else [])
    survivors = [nodes[n] for n in result.survivors]
    assert_release_matches(result, survivors, manifest, reference, tiny)


def test_silent_survivor_at_unmask_is_tolerated(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    manifest = make_manifest(tiny, reference, NODES_5)
    nodes = make_nodes(tmp_path, tiny, NODES_5)
    transport = LocalTransport(nodes, drop={"masked_input": {NODES_5[0]}, "unmask": {NODES_5[2]}})
    result = run_secure_round(transport, manifest, reference.means)
    # Its masked input arrived, so its data is in the sum although it never answered unmask.
    assert result.survivors == sorted(set(NODES_5) - {NODES_5[0]})
    assert result.dropped == [NODES_5[0]]
    assert_release_matches(result, [nodes[n] for n in result.survivors], manifest, reference, tiny)


@pytest.mark.parametrize("stage", ["setup", "share_keys", "masked_input", "unmask"])
def test_too_many_dropouts_abort_the_round(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference, stage: str
) -> None:
    manifest = make_manifest(tiny, reference, NODES_5)
    t = manifest.privacy.threshold
    gone = set(NODES_5[: len(NODES_5) - t + 1])
    nodes = make_nodes(tmp_path, tiny, NODES_5)
    transport = LocalTransport(nodes, drop={stage: gone})
    with pytest.raises(TooFewParticipantsError):
        run_secure_round(transport, manifest, reference.means)
    # The coordinator stops at the failing stage: it never asks anyone to unmask.
    if stage != "unmask":
        assert "unmask" not in transport.stages
    assert transport.stages[-1] == stage


def test_abort_names_the_refusals_of_every_stage(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    manifest = make_manifest(tiny, reference, NODES_5)
    nodes = make_nodes(tmp_path, tiny, NODES_5)
    transport = LocalTransport(nodes, stale={"masked_input": set(NODES_5[:3])})
    with pytest.raises(TooFewParticipantsError, match="masked_input") as info:
        run_secure_round(transport, manifest, reference.means)
    for node in NODES_5[:3]:
        assert f"node {node}: masked_input:" in str(info.value)
    assert "an-earlier-task" in str(info.value)
    assert "unmask" not in transport.stages


def test_coordinator_only_sees_masked_vectors(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    manifest = make_manifest(tiny, reference, NODES_3)
    nodes = make_nodes(tmp_path, tiny, NODES_3)
    transport = LocalTransport(nodes)
    result = run_secure_round(transport, manifest, reference.means)

    plain = {n: plain_contribution(nodes[n], manifest, reference, tiny) for n in NODES_3}
    masked = {
        n: vector_from_bytes(
            reply.config_records["fedsynth"]["masked"], dtype="uint64", length=manifest.dim
        )
        for n, reply in transport.replies["masked_input"].items()
    }
    assert set(masked) == set(NODES_3)
    for n, vec in masked.items():
        # The plain contributions are small signed integers...
        assert np.all(np.abs(from_field(plain[n], bits=64)) < 2**32)
        # ...the masked ones are nowhere near any client's plain vector and look uniform.
        for other in plain.values():
            assert not np.any(vec == other)
        assert np.all(np.abs(from_field(vec, bits=64).astype(np.float64)) > 2**32)
    top_bits = np.concatenate([(v >> np.uint64(63)).astype(np.float64) for v in masked.values()])
    assert abs(top_bits.mean() - 0.5) < 6 * 0.5 / math.sqrt(top_bits.size)
    # No other stage carries a vector of the contribution's length.
    for stage, replies in transport.replies.items():
        for reply in replies.values():
            for key, value in reply.config_records["fedsynth"].items():
                if isinstance(value, bytes) and len(value) == 8 * manifest.dim:
                    assert stage == "masked_input" and key == "masked"
    # What the coordinator keeps is the sum and who took part, nothing per client (the nodes
    # whose excess noise was removed under exact sharing are node ids too).
    assert {f.name for f in dataclasses.fields(RoundResult)} == {
        "field_sum",
        "survivors",
        "dropped",
        "refusals",
        "noise_removed",
    }
    assert result.noise_removed == []  # epsilon = inf: no noise, plain sharing
    assert result.field_sum.shape == (manifest.dim,)
    np.testing.assert_array_equal(result.field_sum, field_sum(plain.values(), bits=64))
    # The masks do not cancel without the unmask stage.
    assert not np.array_equal(field_sum(masked.values(), bits=64), result.field_sum)


def test_the_coordinators_whole_view_still_hides_each_contribution(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    """After unmask the coordinator holds each survivor's masked vector and, from the revealed
    shares, its self-mask seed; what is left after removing the self mask is still hidden by the
    pairwise masks, which cancel only in the sum over all survivors."""
    manifest = make_manifest(tiny, reference, NODES_3)
    nodes = make_nodes(tmp_path, tiny, NODES_3)
    transport = LocalTransport(nodes)
    result = run_secure_round(transport, manifest, reference.means)
    config = manifest.secagg_config()
    nonce = prg_nonce(config.session_id)
    revealed = [
        blobs_from_fields("sh:", reply.config_records["fedsynth"])
        for reply in transport.replies["unmask"].values()
    ]
    assert len(revealed) >= config.threshold
    residues, plains = [], []
    for node in result.survivors:
        fields = transport.replies["masked_input"][node].config_records["fedsynth"]
        residue = vector_from_bytes(fields["masked"], dtype="uint64", length=manifest.dim)
        seed = combine_secret(
            [shares[node] for shares in revealed][: config.threshold],
            owner=node,
            what="self-mask seed",
        )
        sub_inplace(residue, prg(seed, nonce=nonce, dim=config.dim, bits=config.bits), config.bits)
        plain = plain_contribution(nodes[node], manifest, reference, tiny)
        # Not one coordinate of the contribution shows, and the residue looks uniform.
        assert not np.any(residue == plain)
        top_bits = (residue >> np.uint64(config.bits - 1)).astype(np.float64)
        assert abs(top_bits.mean() - 0.5) < 6 * 0.5 / math.sqrt(top_bits.size)
        residues.append(residue)
        plains.append(plain)
    # The self masks were removed exactly: the pairwise masks cancel in the full sum.
    np.testing.assert_array_equal(
        field_sum(residues, bits=config.bits), field_sum(plains, bits=config.bits)
    )


def test_client_with_another_model_refuses_at_setup(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    node_ids = (*NODES_3, 99)
    manifest = make_manifest(tiny, reference, node_ids)
    assert manifest.privacy.threshold == 3
    other = tiny_model(seed=1)
    assert other.fingerprint != tiny.fingerprint
    nodes = make_nodes(tmp_path, tiny, node_ids, models={99: other})
    transport = LocalTransport(nodes)
    result = run_secure_round(transport, manifest, reference.means)
    assert set(result.refusals) == {99}
    # The coordinator learns the refusal's category, not the holder's fingerprint or model.
    assert result.refusals[99] == "setup: model"
    assert result.survivors == sorted(NODES_3)
    assert 99 not in transport.requests["share_keys"]
    assert_release_matches(result, [nodes[n] for n in NODES_3], manifest, reference, tiny)


def test_model_mismatch_below_threshold_aborts(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    manifest = make_manifest(tiny, reference, NODES_3)
    other = tiny_model(seed=1)
    nodes = make_nodes(tmp_path, tiny, NODES_3, models={NODES_3[0]: other, NODES_3[1]: other})
    with pytest.raises(TooFewParticipantsError, match="setup: model"):
        run_secure_round(LocalTransport(nodes), manifest, reference.means)


def test_a_label_the_task_omits_is_left_out_not_refused(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference, caplog: pytest.LogCaptureFixture
) -> None:
    """Whether a holder has a record of a label the task does not list is private: a refusal
    would answer it for any label a coordinator leaves out. The holder takes part without
    those records and says so in its own log only."""
    manifest = make_manifest(tiny, reference, NODES_3, threshold=2)
    odd = NODES_3[2]
    nodes = make_nodes(tmp_path, tiny, NODES_3, extra_labels={odd: "neutral"})
    with caplog.at_level("WARNING", logger="fedsynth"):
        result = run_secure_round(LocalTransport(nodes), manifest, reference.means)
    assert result.refusals == {}
    assert result.survivors == sorted(NODES_3)
    assert_release_matches(result, list(nodes.values()), manifest, reference, tiny)
    assert "1 record(s) carry a label this task does not list" in caplog.text


@pytest.mark.parametrize("stage", ["setup", "share_keys", "masked_input"])
def test_stale_reply_is_rejected_as_a_refusal(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference, stage: str
) -> None:
    manifest = make_manifest(tiny, reference, NODES_5)
    late = NODES_5[3]
    nodes = make_nodes(tmp_path, tiny, NODES_5)
    result = run_secure_round(
        LocalTransport(nodes, stale={stage: {late}}), manifest, reference.means
    )
    assert set(result.refusals) == {late}
    assert result.refusals[late].startswith(f"{stage}: ")
    assert "an-earlier-task" in result.refusals[late]
    assert late not in result.survivors
    assert result.dropped == ([late] if stage == "masked_input" else [])
    survivors = [nodes[n] for n in NODES_5 if n != late]
    assert_release_matches(result, survivors, manifest, reference, tiny)


class SkewedTransport(LocalTransport):
    """One holder's clock runs ``skew_s`` ahead of the coordinator's (its requests look old)."""

    def __init__(self, nodes: Mapping[int, Node], *, skewed: int, skew_s: float) -> None:
        super().__init__(nodes)
        self.skewed, self.skew_s = skewed, skew_s

    def exchange(
        self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        shifted = dict(requests)
        if self.skewed in requests:
            content = _wire(requests[self.skewed])
            record = content.config_records["fedsynth"]
            record["sent_at"] = float(record["sent_at"]) - self.skew_s  # type: ignore[arg-type]
            shifted[self.skewed] = content
        return super().exchange(stage, shifted, timeout=timeout)


def test_requests_carry_the_coordinators_clock_and_a_skewed_holder_refuses(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    """Every request states when it was sent and the stage deadline; a holder whose clock is
    further off than the deadline refuses at setup (category protocol, details in its own
    error), spends nothing, and the others complete the round without it."""
    manifest = make_manifest(tiny, reference, NODES_5)
    nodes = make_nodes(tmp_path, tiny, NODES_5, budgets=True)
    skewed = NODES_5[1]
    transport = SkewedTransport(nodes, skewed=skewed, skew_s=manifest.deadline_s + 5.0)
    before = time.time()
    result = run_secure_round(transport, manifest, reference.means)
    assert result.refusals == {skewed: "setup: protocol"}
    assert skewed not in result.survivors
    assert_release_matches(
        result, [nodes[n] for n in NODES_5 if n != skewed], manifest, reference, tiny
    )
    for stage, requests in transport.requests.items():
        for node, content in requests.items():
            if node == skewed:
                continue  # the transport shifted this one's stamp
            record = content.config_records["fedsynth"]
            assert record["deadline_s"] == manifest.deadline_s, stage
            assert before - 1.0 <= float(record["sent_at"]) <= time.time() + 1.0, stage  # type: ignore[arg-type]
    assert not nodes[skewed].settings.budget_path.exists()  # type: ignore[union-attr]
    # The holder's own error names the skew and the deadline.
    late = _wire(transport.requests["setup"][skewed])
    late.config_records["fedsynth"]["sent_at"] = time.time() - manifest.deadline_s - 5.0
    with pytest.raises(
        ClockSkewError, match=f"beyond the stage deadline of {manifest.deadline_s:g} s"
    ):
        nodes[skewed].contributor.handle("setup", late, RecordDict())


def test_stages_out_of_order_are_refused(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    manifest = make_manifest(tiny, reference, NODES_3)
    nodes = make_nodes(tmp_path, tiny, NODES_3, budgets=True)
    node = nodes[NODES_3[0]]
    task = manifest.task_id
    masked_request = pack(Envelope(task, "masked_input"), {})
    # A fresh state knows no task: everything but setup is refused.
    for stage in ("share_keys", "masked_input", "unmask"):
        with pytest.raises(StageOrderError, match="setup"):
            node.contributor.handle(stage, pack(Envelope(task, stage), {}), RecordDict())
    with pytest.raises(ProtocolError, match="unknown stage"):
        node.contributor.handle("finish", masked_request, RecordDict())

    setup = pack(
        Envelope(task, "setup"),
        {"manifest": manifest.to_json(), "reference": vector_to_bytes(reference.means.reshape(-1))},
    )
    node.contributor.handle("setup", setup, node.state)
    with pytest.raises(StageOrderError, match="masked_input"):
        node.contributor.handle("masked_input", masked_request, node.state)
    # An out-of-order request releases nothing, so it costs no budget.
    assert ClientBudget(node.settings.budget_path).entries() == []
    with pytest.raises(StageOrderError):
        node.contributor.handle(
            "unmask", pack(Envelope(task, "unmask"), {"survivors": [], "dropped": []}), node.state
        )


def test_budget_is_charged_once_and_enforced(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    policy = ClientPolicy(max_epsilon_per_task=4.0, max_total_epsilon=6.0)
    nodes = make_nodes(tmp_path, tiny, NODES_3, policy=policy, budgets=True)
    first = make_manifest(tiny, reference, NODES_3, task_id="task-first", epsilon=4.0)
    assert first.privacy.total_variance > 0
    result = run_secure_round(LocalTransport(nodes), first, reference.means)
    assert result.survivors == sorted(NODES_3)
    for node in nodes.values():
        budget = ClientBudget(node.settings.budget_path)
        assert [e["task_id"] for e in budget.entries()] == ["task-first"]
        assert budget.spent() == 4.0

    second = make_manifest(tiny, reference, NODES_3, task_id="task-second", epsilon=4.0)
    fresh = {n: dataclasses.replace(node, state=RecordDict()) for n, node in nodes.items()}
    with pytest.raises(TooFewParticipantsError, match="setup: budget") as info:
        run_secure_round(LocalTransport(fresh), second, reference.means)
    assert "max_total_epsilon" not in str(info.value)  # the holder's spend stays local
    for node in nodes.values():
        assert ClientBudget(node.settings.budget_path).spent() == 4.0


def test_a_task_is_contributed_to_only_once(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    # The budget charges a task id once; re-running the same task (new session keys, fresh
    # noise) would give the coordinator a second noisy sum of the same data for free.
    nodes = make_nodes(tmp_path, tiny, NODES_3, budgets=True)
    manifest = make_manifest(tiny, reference, NODES_3, task_id="task-once")
    run_secure_round(LocalTransport(nodes), manifest, reference.means)
    fresh = {n: dataclasses.replace(node, state=RecordDict()) for n, node in nodes.items()}
    with pytest.raises(TooFewParticipantsError, match="setup: policy"):
        run_secure_round(LocalTransport(fresh), manifest, reference.means)
    for node in nodes.values():
        assert len(ClientBudget(node.settings.budget_path).entries()) == 1


def test_a_second_concurrent_session_of_a_task_is_refused(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    # Two sessions of one task set up side by side (e.g. two runs): only one may contribute,
    # even though neither had charged the budget when both accepted the task.
    nodes = make_nodes(tmp_path, tiny, NODES_3, budgets=True)
    manifest = make_manifest(tiny, reference, NODES_3, task_id="task-twice")
    twin = {n: dataclasses.replace(node, state=RecordDict()) for n, node in nodes.items()}
    reached, release = threading.Event(), threading.Event()
    outcome: list[BaseException | RoundResult] = []

    class Paused(LocalTransport):
        def exchange(
            self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
        ) -> dict[int, Reply]:
            if stage == "masked_input":
                reached.set()
                assert release.wait(timeout=60)
            return super().exchange(stage, requests, timeout=timeout)

    def second_session() -> None:
        try:
            outcome.append(run_secure_round(Paused(twin), manifest, reference.means))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=second_session)
    thread.start()
    try:
        assert reached.wait(timeout=60)  # the second session holds keys and shares
        first = run_secure_round(LocalTransport(nodes), manifest, reference.means)
    finally:
        release.set()
        thread.join(timeout=60)
    assert first.survivors == sorted(NODES_3)
    assert len(outcome) == 1
    assert isinstance(outcome[0], TooFewParticipantsError)
    assert "masked_input: policy" in str(outcome[0])
    for node in nodes.values():
        assert len(ClientBudget(node.settings.budget_path).entries()) == 1


def _flip(data: bytes, at: int = 10) -> bytes:
    raw = bytearray(data)
    raw[at] ^= 0x40
    return bytes(raw)


def _first(record: ConfigRecord, prefix: str) -> str:
    return next(k for k in sorted(record) if k.startswith(prefix))


# How a faulty client damages its reply, per stage (the key is the test id).
DAMAGE: dict[str, tuple[str, Callable[[ConfigRecord], None]]] = {
    "short-key": ("setup", lambda r: r.__setitem__("enc_pk", b"short")),
    "low-order-key": ("setup", lambda r: r.__setitem__("mask_pk", bytes(32))),
    "unsigned-key": ("setup", lambda r: r.__delitem__("signature")),
    "bad-signature": ("setup", lambda r: r.__setitem__("signature", _flip(r["signature"]))),  # type: ignore[arg-type]
    "bad-name": ("setup", lambda r: r.__setitem__("name", "no spaces allowed")),
    "withheld-share": ("share_keys", lambda r: r.__delitem__(_first(r, "ct:"))),
    "bad-recipient": ("share_keys", lambda r: r.__setitem__("ct:abc", b"x")),
    "short-commitment": ("share_keys", lambda r: r.__setitem__(_first(r, "cm:"), b"c")),
    "short-masked": ("masked_input", lambda r: r.__setitem__("masked", b"\x00" * 3)),
    "bad-consistency-signature": (
        "consistency",
        lambda r: r.__setitem__("signature", _flip(r["signature"])),  # type: ignore[arg-type]
    ),
    "no-consistency-signature": ("consistency", lambda r: r.__delitem__("signature")),
    "corrupt-share": (
        "unmask",
        lambda r: r.__setitem__(_first(r, "sh:"), _flip(r[_first(r, "sh:")])),
    ),  # type: ignore[arg-type]
    "bad-share-owner": ("unmask", lambda r: r.__setitem__("sh:x1", b"x")),
}


class _Corrupting(LocalTransport):
    """Damages one node's reply at one stage (a faulty, not merely absent, client)."""

    def __init__(
        self,
        nodes: Mapping[int, Node],
        *,
        stage: str,
        node: int,
        damage: Callable[[ConfigRecord], None],
    ) -> None:
        super().__init__(nodes)
        self.target_stage, self.target, self.damage = stage, node, damage

    def exchange(
        self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        out = super().exchange(stage, requests, timeout=timeout)
        reply = out.get(self.target)
        if stage == self.target_stage and reply is not None and reply.content is not None:
            self.damage(reply.content.config_records["fedsynth"])
        return out


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_malformed_reply_counts_as_a_dropout_not_an_abort(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference, kind: str
) -> None:
    stage, damage = DAMAGE[kind]
    manifest = make_manifest(tiny, reference, NODES_5)
    faulty = NODES_5[1]
    nodes = make_nodes(tmp_path, tiny, NODES_5)
    transport = _Corrupting(nodes, stage=stage, node=faulty, damage=damage)
    result = run_secure_round(transport, manifest, reference.means)
    assert set(result.refusals) == {faulty}
    assert result.refusals[faulty].startswith(f"{stage}: ")
    late = stage in ("consistency", "unmask")
    # Faulty before its masked input arrived: left out. After: its input is in the sum.
    assert (faulty in result.survivors) == late
    if stage == "consistency":  # not a signer: never asked to unmask
        assert faulty not in transport.requests["unmask"]
    survivors = [nodes[n] for n in result.survivors]
    assert_release_matches(result, survivors, manifest, reference, tiny)


def test_a_corrupt_share_from_one_survivor_is_discarded(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    manifest = make_manifest(tiny, reference, NODES_5)  # t = 3
    nodes = make_nodes(tmp_path, tiny, NODES_5)
    liar = min(NODES_5)  # its shares would be among the first t tried

    def corrupt_all(record: ConfigRecord) -> None:
        for key in [k for k in record if k.startswith("sh:")]:
            record[key] = _flip(record[key])  # type: ignore[arg-type]

    transport = _Corrupting(nodes, stage="unmask", node=liar, damage=corrupt_all)
    result = run_secure_round(transport, manifest, reference.means)
    assert result.survivors == sorted(NODES_5)
    assert "fails its commitment" in result.refusals[liar]
    assert_release_matches(result, list(nodes.values()), manifest, reference, tiny)


class _SubstitutingCoordinator(LocalTransport):
    """Replaces one peer's announced keys in the share_keys request to one victim."""

    def __init__(self, nodes: Mapping[int, Node], *, victim: int, peer: int) -> None:
        super().__init__(nodes)
        self.victim, self.peer = victim, peer

    def exchange(
        self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        if stage == "share_keys":
            forged = _wire(requests[self.victim])
            entry = list(forged.config_records["fedsynth"][f"pk:{self.peer}"])  # type: ignore[arg-type]
            entry[0] = X25519PrivateKey.generate().public_key().public_bytes_raw()
            forged.config_records["fedsynth"][f"pk:{self.peer}"] = entry
            requests = {**requests, self.victim: forged}
        return super().exchange(stage, requests, timeout=timeout)


def test_a_substituted_key_is_refused_by_the_holder(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    manifest = make_manifest(tiny, reference, NODES_5)
    nodes = make_nodes(tmp_path, tiny, NODES_5)
    victim, peer = NODES_5[0], NODES_5[2]
    transport = _SubstitutingCoordinator(nodes, victim=victim, peer=peer)
    result = run_secure_round(transport, manifest, reference.means)
    # The victim shared nothing with the forged key: it refused and dropped out.
    assert result.refusals == {victim: "share_keys: protocol"}
    assert victim not in transport.replies["share_keys"]
    assert victim not in result.survivors
    # Locally, the holder names the substituted key.
    with pytest.raises(KeyAuthenticationError, match=f"node {peer}"):
        _replay_forged(transport, nodes[victim], manifest, reference)
    assert_release_matches(result, [nodes[n] for n in result.survivors], manifest, reference, tiny)


def _replay_forged(
    transport: _SubstitutingCoordinator,
    node: Node,
    manifest: TaskManifest,
    reference: PublicReference,
) -> None:
    """Set the node up afresh and hand it a forged key set, to see the holder's own error."""
    state = RecordDict()
    setup = setup_request(manifest, reference)
    reply = node.contributor.handle("setup", _wire(setup), state)
    fields = reply.config_records["fedsynth"]
    own = [
        fields["enc_pk"],
        fields["mask_pk"],
        fields["sign_pk"],
        fields["signature"],
        str(fields["name"]).encode(),
    ]
    request = _wire(transport.requests["share_keys"][transport.victim])
    record = request.config_records["fedsynth"]
    record[f"pk:{node.node_id}"] = own
    entry = list(record[f"pk:{transport.peer}"])  # type: ignore[arg-type]
    entry[0] = X25519PrivateKey.generate().public_key().public_bytes_raw()
    record[f"pk:{transport.peer}"] = entry
    node.contributor.handle("share_keys", request, state)


class _SplittingCoordinator(LocalTransport):
    """Tells half the survivors that the target survived and half that it dropped; then, as a
    malicious coordinator would, asks every holder to unmask with all signatures it got."""

    def __init__(self, nodes: Mapping[int, Node], *, target: int) -> None:
        super().__init__(nodes)
        self.target = target
        self.revealed: dict[int, RecordDict] = {}
        self.unmask_refusals: dict[int, str] = {}

    def exchange(
        self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        if stage != "consistency":
            return super().exchange(stage, requests, timeout=timeout)
        survivors = sorted(requests)
        without = [n for n in survivors if n != self.target]
        # The target and the first survivor hear "it survived", the others "it dropped".
        told = {n: (survivors if n in (survivors[0], self.target) else without) for n in survivors}
        task = str(next(iter(requests.values())).config_records["fedsynth"]["task_id"])
        split = {
            n: pack(Envelope(task, "consistency"), {"survivors": ints_field(told[n])})
            for n in survivors
        }
        out = super().exchange(stage, split, timeout=timeout)
        signatures = {
            n: r.content.config_records["fedsynth"]["signature"]
            for n, r in out.items()
            if r.content is not None
        }
        for n in survivors:
            dropped = sorted(set(survivors) - set(told[n]))
            request = pack(
                Envelope(task, "unmask"),
                {
                    "survivors": ints_field(told[n]),
                    "dropped": ints_field(dropped),
                    **{f"sg:{s}": sig for s, sig in signatures.items()},
                },
            )
            node = self.nodes[n]
            try:
                self.revealed[n] = node.contributor.handle("unmask", _wire(request), node.state)
            except FedSynthError as exc:
                self.unmask_refusals[n] = type(exc).__name__
        return out


def test_inconsistent_survivor_lists_abort_before_any_share_is_revealed(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    node_ids = (*NODES_3, 99)  # K = 4, t = 3: a 2 / 2 split gathers 2 signatures per list
    manifest = make_manifest(tiny, reference, node_ids)
    assert manifest.privacy.threshold == 3
    nodes = make_nodes(tmp_path, tiny, node_ids)
    transport = _SplittingCoordinator(nodes, target=max(node_ids))
    with pytest.raises(TooFewParticipantsError, match="consistency"):
        run_secure_round(transport, manifest, reference.means)
    assert transport.revealed == {}
    assert transport.unmask_refusals == dict.fromkeys(node_ids, "InconsistentSurvivorsError")
    assert "unmask" not in transport.stages


def test_a_holder_without_identity_or_roster_refuses_every_task(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    manifest = make_manifest(tiny, reference, NODES_3)
    nodes = make_nodes(tmp_path, tiny, NODES_3)
    lone = NODES_3[0]
    for missing in ("identity", "roster"):
        settings = dataclasses.replace(nodes[lone].settings, **{missing: None})
        contributor = Contributor(settings, node_id=lone, model_loader=lambda: tiny)
        setup = setup_request(manifest, reference)
        with pytest.raises(IdentityError, match=f"no {missing}.*identity-path and roster-path"):
            contributor.handle("setup", _wire(setup), RecordDict())
    stranger = dataclasses.replace(
        nodes[lone].settings,
        identity=HolderIdentity.generate(nodes[lone].settings.identity.name),  # type: ignore[union-attr]
    )
    with pytest.raises(IdentityError, match="not in the pinned roster"):
        Contributor(stranger, node_id=lone, model_loader=lambda: tiny).handle(
            "setup", _wire(setup), RecordDict()
        )


@pytest.mark.parametrize(
    ("threshold", "colluders", "refused"),
    [(2, 0, True), (3, 0, False), (3, 1, True), (4, 1, False)],
)
def test_holders_refuse_a_threshold_below_the_floor(
    tmp_path: Path,
    tiny: LoadedModel,
    reference: PublicReference,
    threshold: int,
    colluders: int,
    refused: bool,
) -> None:
    manifest = make_manifest(tiny, reference, NODES_5, threshold=threshold)
    policy = ClientPolicy(allow_non_private=True, max_colluders=colluders)
    nodes = make_nodes(tmp_path, tiny, NODES_5, policy=policy)
    if refused:
        with pytest.raises(TooFewParticipantsError, match="setup: policy") as info:
            run_secure_round(LocalTransport(nodes), manifest, reference.means)
        assert "share_keys" not in str(info.value)
        node = nodes[NODES_5[0]]
        setup = setup_request(manifest, reference)
        with pytest.raises(UnsafeThresholdError, match=f"threshold t={threshold} with K=5"):
            node.contributor.handle("setup", _wire(setup), RecordDict())
    else:
        result = run_secure_round(LocalTransport(nodes), manifest, reference.means)
        assert result.survivors == sorted(NODES_5)


def _noise_seed_fields(transport: LocalTransport) -> dict[str, dict[int, object]]:
    """Every reply field named like a revealed noise seed, by stage and node."""
    return {
        stage: {
            n: r.config_records["fedsynth"][NOISE_SEED_FIELD]
            for n, r in replies.items()
            if NOISE_SEED_FIELD in r.config_records["fedsynth"]
        }
        for stage, replies in transport.replies.items()
    }


class _SeedWatchingTransport(LocalTransport):
    """Notes each holder's chain seed while its round is between masked_input and unmask."""

    def __init__(self, nodes: Mapping[int, Node], manifest: TaskManifest, **options: Any) -> None:
        super().__init__(nodes, **options)
        self.manifest = manifest
        self.chain_seeds: dict[int, bytes] = {}

    def exchange(
        self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        replies = super().exchange(stage, requests, timeout=timeout)
        if stage == "masked_input":
            for node_id, node in self.nodes.items():
                seed = node.contributor.noise_seed(self.manifest, node.state)
                if seed is not None:
                    self.chain_seeds[node_id] = seed
        return replies


def test_exact_noise_seeds_are_revealed_at_unmask_for_the_signed_survivors_only(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    """With all K = 3 in the sum each holder reveals, in its unmask reply only, the seed of the
    excess its share carries beyond v/3; with t = 2 in the sum there is no excess to reveal."""
    manifest = make_manifest(tiny, reference, NODES_3, task_id="exact-all", epsilon=4.0)
    assert manifest.privacy.noise_sharing == "exact"
    schedule = noise_schedule(manifest.privacy, clients=len(NODES_3))
    assert schedule is not None
    (tmp_path / "all").mkdir()
    (tmp_path / "t").mkdir()
    nodes = make_nodes(tmp_path / "all", tiny, NODES_3, budgets=True)
    transport = _SeedWatchingTransport(nodes, manifest)
    result = run_secure_round(transport, manifest, reference.means)
    assert sorted(result.survivors) == sorted(result.noise_removed) == sorted(NODES_3)
    seeds = _noise_seed_fields(transport)
    assert {stage for stage, found in seeds.items() if found} == {"unmask"}
    for node in NODES_3:
        top = transport.chain_seeds[node]
        assert seeds["unmask"][node] == revealed_seed(top, schedule, len(NODES_3))
        # Once revealed, the holder keeps no noise secret in its state.
        assert nodes[node].contributor.noise_seed(manifest, nodes[node].state) is None
    report = privacy_report(manifest, result, model_name=tiny.name)
    assert report["noise"]["aggregate_variance_actual_scaled"] == pytest.approx(
        manifest.privacy.total_variance
    )
    assert report["noise"]["excess_noise_removed_for"] == 3

    manifest = make_manifest(tiny, reference, NODES_3, task_id="exact-t", epsilon=4.0)
    nodes = make_nodes(tmp_path / "t", tiny, NODES_3, budgets=True)
    transport = LocalTransport(nodes, drop={"masked_input": {NODES_3[0]}})
    result = run_secure_round(transport, manifest, reference.means)
    assert len(result.survivors) == 2 and result.noise_removed == []
    assert not any(_noise_seed_fields(transport).values())
    report = privacy_report(manifest, result, model_name=tiny.name)
    assert report["noise"]["aggregate_variance_actual_scaled"] == pytest.approx(
        manifest.privacy.total_variance
    )


def test_beyond_26_holders_reveal_the_seeds_of_binary_blocks_for_the_signed_survivors(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    """K = 28, t = 15, two holders dropped: each survivor reveals the seeds of the blocks its
    schedule removes for 26 inputs (four of six), the coordinator removes them for every
    survivor, and the sum keeps between the target and 1 + 1/TOLERANCE times it."""
    node_ids = tuple(range(101, 129))
    manifest = make_manifest(tiny, reference, node_ids, task_id="exact-blocks", epsilon=4.0)
    schedule = noise_schedule(manifest.privacy, clients=len(node_ids))
    assert schedule is not None and schedule.uses_blocks
    dropped = {node_ids[0], node_ids[5]}
    nodes = make_nodes(tmp_path, tiny, node_ids)
    transport = _SeedWatchingTransport(nodes, manifest, drop={"masked_input": dropped})
    result = run_secure_round(transport, manifest, reference.means)
    survivors = sorted(set(node_ids) - dropped)
    assert sorted(result.survivors) == sorted(result.noise_removed) == survivors
    removed = schedule.removed(len(survivors))
    assert 0 < len(removed) < len(schedule.components)
    revealed = _noise_seed_fields(transport)["unmask"]
    for node in survivors:
        assert revealed[node] == revealed_seed(transport.chain_seeds[node], schedule, 26)
        assert len(revealed[node]) == SEED_BYTES * len(removed)  # type: ignore[arg-type]
    # Block subsets of different survivor counts are not nested (15 units = blocks 0-3, 16 =
    # block 4), so a second reveal must never happen: a repeated unmask is refused.
    again = survivors[0]
    with pytest.raises(FedSynthError):
        nodes[again].contributor.handle(
            "unmask", _wire(transport.requests["unmask"][again]), nodes[again].state
        )
    assert nodes[again].contributor.noise_seed(manifest, nodes[again].state) is None
    report = privacy_report(manifest, result, model_name=tiny.name)
    target = manifest.privacy.total_variance
    actual = report["noise"]["aggregate_variance_actual_scaled"]
    assert target <= actual <= target * (1 + 1 / TOLERANCE)
    assert actual == pytest.approx(aggregate_variance(schedule, 26, 26))


@pytest.mark.parametrize("dropped", [set(), {NODES_5[0]}], ids=["5-of-5", "4-of-5"])
def test_uploaded_excess_removes_exactly_what_the_seeds_would(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference, dropped: set[int]
) -> None:
    """Asked to upload, each survivor sends the sum of exactly the components its seed_{s-1}
    would give for the s it signed (K = 5, t = 3, s = 5 or 4), and no seed; the round's sum is
    bit for bit the one that revealing seeds gives, and carries the target noise."""
    sums = {}
    for mode in ("seed", "upload"):
        manifest = make_manifest(tiny, reference, NODES_5, task_id="exact-both", epsilon=4.0)
        schedule = noise_schedule(manifest.privacy, clients=len(NODES_5))
        assert schedule is not None and schedule.threshold == 3
        (tmp_path / mode).mkdir()
        nodes = make_nodes(tmp_path / mode, tiny, NODES_5, budgets=True)
        transport = _SeedWatchingTransport(nodes, manifest, drop={"masked_input": dropped})
        result = run_secure_round(transport, manifest, reference.means, noise_removal=mode)
        s = len(result.survivors)
        assert s == 5 - len(dropped) and sorted(result.noise_removed) == result.survivors
        assert not result.refusals
        assert {transport.requests["unmask"][n].config_records["fedsynth"][REMOVAL_FIELD]
                for n in result.survivors} == {mode}  # fmt: skip
        replies = {n: r.config_records["fedsynth"] for n, r in transport.replies["unmask"].items()}
        sent = NOISE_EXCESS_FIELD if mode == "upload" else NOISE_SEED_FIELD
        assert all(sent in f and len({NOISE_SEED_FIELD, NOISE_EXCESS_FIELD} & set(f)) == 1
                   for f in replies.values())  # fmt: skip
        if mode == "upload":
            for node in result.survivors:
                revealed = revealed_seed(transport.chain_seeds[node], schedule, s)
                assert revealed is not None
                np.testing.assert_array_equal(
                    ints_from_bytes(replies[node][NOISE_EXCESS_FIELD], length=manifest.dim),
                    removable_noise(revealed, schedule, s, manifest.dim),
                )
        report = privacy_report(manifest, result, model_name=tiny.name)
        assert report["noise"]["aggregate_variance_actual_scaled"] == pytest.approx(
            manifest.privacy.total_variance
        )
        sums[mode] = result.field_sum
    np.testing.assert_array_equal(sums["seed"], sums["upload"])


class _ExcessTamperingTransport(LocalTransport):
    """Replaces one survivor's uploaded excess with bytes that do not decode, or rewrites the
    removal mode every holder is asked for."""

    def __init__(
        self, nodes: Mapping[int, Node], *, victim: int | None = None, mode: str | None = None
    ) -> None:
        super().__init__(nodes)
        self.victim, self.mode = victim, mode
        self.errors: dict[int, str] = {}

    def exchange(
        self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        if stage == "unmask" and self.mode is not None:
            requests = {n: _wire(r) for n, r in requests.items()}
            for request in requests.values():
                request.config_records["fedsynth"][REMOVAL_FIELD] = self.mode
        replies = super().exchange(stage, requests, timeout=timeout)
        self.errors.update({n: f"{stage}: {r.error}" for n, r in replies.items() if r.error})
        if stage == "unmask" and self.victim in replies:
            content = replies[self.victim].content
            assert content is not None
            content.config_records["fedsynth"][NOISE_EXCESS_FIELD] = b"\x02not zlib"
        return replies


def test_a_bad_excess_upload_leaves_that_survivors_noise_in_and_a_bad_mode_is_refused(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    """An upload that does not decode is refused and that survivor's excess stays (more noise
    than the target, never less); holders refuse an unmask request naming an unknown removal,
    before revealing any share; the coordinator refuses an unknown mode before any stage."""
    manifest = make_manifest(tiny, reference, NODES_5, task_id="bad-upload", epsilon=4.0)
    (tmp_path / "bad").mkdir()
    nodes = make_nodes(tmp_path / "bad", tiny, NODES_5, budgets=True)
    victim = NODES_5[2]
    transport = _ExcessTamperingTransport(nodes, victim=victim)
    result = run_secure_round(transport, manifest, reference.means, noise_removal="upload")
    assert victim in result.survivors and victim not in result.noise_removed
    assert len(result.noise_removed) == 4
    assert "noise_excess: not a zlib stream" in result.refusals[victim]
    schedule = noise_schedule(manifest.privacy, clients=5)
    assert schedule is not None
    report = privacy_report(manifest, result, model_name=tiny.name)
    assert report["noise"]["aggregate_variance_actual_scaled"] == pytest.approx(
        4 * schedule.kept_variance(5) + schedule.share_variance
    )
    assert report["noise"]["aggregate_variance_actual_scaled"] > manifest.privacy.total_variance

    manifest = make_manifest(tiny, reference, NODES_5, task_id="bad-mode", epsilon=4.0)
    (tmp_path / "mode").mkdir()
    nodes = make_nodes(tmp_path / "mode", tiny, NODES_5, budgets=True)
    transport = _ExcessTamperingTransport(nodes, mode="everything")
    with pytest.raises(TooFewParticipantsError, match="only 0 of 5 clients completed unmask"):
        run_secure_round(transport, manifest, reference.means, noise_removal="seed")
    assert all(reason == "unmask: protocol" for reason in transport.errors.values())
    assert "unmask" not in transport.replies  # no share left any holder

    transport = LocalTransport(nodes)
    with pytest.raises(ConfigError, match="noise removal 'everything'"):
        run_secure_round(transport, manifest, reference.means, noise_removal="everything")
    assert transport.stages == []


class _SplitManifestCoordinator(LocalTransport):
    """Hands one victim another manifest under the same task id: a 4x finer fixed-point scale
    (with the noise calibrated to it, so that its terms verify on their own). In the victim's
    units the others' noise would then be 4x smaller in standard deviation."""

    def __init__(self, nodes: Mapping[int, Node], *, victim: int, forged: TaskManifest) -> None:
        super().__init__(nodes)
        self.victim, self.forged = victim, forged

    def exchange(
        self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        if stage == "setup":
            request = _wire(requests[self.victim])
            request.config_records["fedsynth"]["manifest"] = self.forged.to_json()
            requests = {**requests, self.victim: request}
        return super().exchange(stage, requests, timeout=timeout)


def test_holders_handed_different_manifests_under_one_task_refuse_each_other(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    manifest = make_manifest(tiny, reference, NODES_3, task_id="split", epsilon=4.0)
    forged = make_manifest(tiny, reference, NODES_3, task_id="split", epsilon=4.0, scale=4000.0)
    verify_task_manifest(forged)  # each copy passes every check a holder makes on its own
    assert forged.secagg_config().digest() != manifest.secagg_config().digest()
    victim = NODES_3[0]
    nodes = make_nodes(tmp_path, tiny, NODES_3, budgets=True)
    transport = _SplitManifestCoordinator(nodes, victim=victim, forged=forged)
    # The victim's keys are signed under its terms: no peer (and no honest coordinator) takes
    # them, so its contribution never enters a sum with holders that hold other terms.
    result = run_secure_round(transport, manifest, reference.means)
    assert victim not in result.survivors
    assert victim not in transport.replies.get("masked_input", {})
    assert sorted(result.survivors) == sorted(NODES_3[1:])  # the others' sum goes on


def test_noise_is_sized_for_the_colluders_a_holder_assumes(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    """A holder that assumes one colluder (who may add no noise) refuses shares sized for
    none; with the task sized for one, every survivor keeps v/(s − 1), so the four honest of
    five alone carry the target (the report states the larger total)."""
    policy = ClientPolicy(max_colluders=1)
    naive = make_manifest(tiny, reference, NODES_5, task_id="naive", epsilon=4.0, threshold=4)
    (tmp_path / "naive").mkdir()
    nodes = make_nodes(tmp_path / "naive", tiny, NODES_5, policy=policy, budgets=True)
    with pytest.raises(TooFewParticipantsError, match="setup: policy"):
        run_secure_round(LocalTransport(nodes), naive, reference.means)

    sized = make_manifest(tiny, reference, NODES_5, task_id="sized", epsilon=4.0, colluders=1)
    p = sized.privacy
    assert (p.threshold, p.colluders) == (4, 1)
    (tmp_path / "sized").mkdir()
    nodes = make_nodes(tmp_path / "sized", tiny, NODES_5, policy=policy, budgets=True)
    result = run_secure_round(LocalTransport(nodes), sized, reference.means)
    assert sorted(result.survivors) == sorted(result.noise_removed) == sorted(NODES_5)
    report = privacy_report(sized, result, model_name=tiny.name)
    assert report["noise"]["colluders_tolerated"] == 1
    assert report["noise"]["aggregate_variance_actual_scaled"] == pytest.approx(
        5 * p.total_variance / 4
    )


def test_holders_listed_but_absent_do_not_count_toward_min_holders(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    """K = 3 listed, one never exchanges keys: holders whose policy wants 3 keep their input."""
    manifest = make_manifest(tiny, reference, NODES_3, threshold=2)
    policy = ClientPolicy(allow_non_private=True, min_holders=3)
    nodes = make_nodes(tmp_path, tiny, NODES_3, policy=policy)
    transport = LocalTransport(nodes, drop={"share_keys": {NODES_3[0]}})
    with pytest.raises(TooFewParticipantsError, match="masked_input: policy"):
        run_secure_round(transport, manifest, reference.means)
    assert transport.replies.get("masked_input", {}) == {}
    assert {str(e) for e in transport.refusals["masked_input"].values()} == {
        "2 holders exchanged keys, below min_holders=3"
    }


def test_a_holder_pays_before_it_reads_its_data_so_a_failure_is_never_free(
    tmp_path: Path,
    tiny: LoadedModel,
    reference: PublicReference,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever fails once a holder computes on its records (a refusal that might depend on
    them) comes after the charge: a coordinator cannot repeat a task under fresh ids to read
    such a failure for nothing. The same task id is then refused as already charged."""
    nodes = make_nodes(tmp_path, tiny, NODES_3, budgets=True)
    manifest = make_manifest(tiny, reference, NODES_3, task_id="task-probe", epsilon=4.0)
    charged_when_read: list[list[str]] = []

    def failing(self: Contributor, task: TaskManifest, payload: bytes, state: RecordDict) -> Any:
        budget = ClientBudget(self.settings.budget_path)
        charged_when_read.append([str(e["task_id"]) for e in budget.entries()])
        raise ConfigError("a failure while the records were being read")

    monkeypatch.setattr(Contributor, "contribution", failing)
    with pytest.raises(FedSynthError):
        run_secure_round(LocalTransport(nodes), manifest, reference.means)
    assert charged_when_read == [["task-probe"]] * len(NODES_3)
    for node in nodes.values():
        assert ClientBudget(node.settings.budget_path).spent() == 4.0
    fresh = {n: dataclasses.replace(node, state=RecordDict()) for n, node in nodes.items()}
    with pytest.raises(TooFewParticipantsError, match="setup: policy"):  # already charged
        run_secure_round(LocalTransport(fresh), manifest, reference.means)


def test_min_holders_bounds_the_survivors_not_only_the_key_exchange(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    """A coordinator that discards two masked inputs (or says those holders dropped) would
    release a sum over t = 3 of 5 holders; holders whose policy wants 5 refuse to sign or
    unmask such a survivor set, so no share is revealed. Wanting 3, they finish the round."""
    manifest = make_manifest(tiny, reference, NODES_5, threshold=3)
    discarded = {"masked_input": {NODES_5[1], NODES_5[3]}}
    strict = ClientPolicy(allow_non_private=True, min_holders=5)
    (tmp_path / "strict").mkdir()
    (tmp_path / "loose").mkdir()
    transport = LocalTransport(
        make_nodes(tmp_path / "strict", tiny, NODES_5, policy=strict), drop=discarded
    )
    with pytest.raises(TooFewParticipantsError, match="consistency: policy"):
        run_secure_round(transport, manifest, reference.means)
    assert transport.replies.get("consistency", {}) == {}
    assert transport.replies.get("unmask", {}) == {}
    assert {str(e) for e in transport.refusals["consistency"].values()} == {
        "3 survivors would make the sum, below min_holders=5"
    }
    loose = ClientPolicy(allow_non_private=True, min_holders=3)
    nodes = make_nodes(tmp_path / "loose", tiny, NODES_5, policy=loose)
    result = run_secure_round(LocalTransport(nodes, drop=discarded), manifest, reference.means)
    assert len(result.survivors) == 3


class _GarbageCiphertexts(LocalTransport):
    """Hands every holder unauthenticated shares at the masked-input stage."""

    def exchange(
        self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        if stage == "masked_input":
            for content in requests.values():
                record = content.config_records["fedsynth"]
                for key in [k for k in record if k.startswith("ct:")]:
                    record[key] = _flip(record[key])  # type: ignore[arg-type]
        return super().exchange(stage, requests, timeout=timeout)


def test_shares_that_fail_authentication_are_refused_before_the_budget_is_charged(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    """Garbage at the masked-input stage is refused for nothing (no record is read), so a
    coordinator cannot drain a holder's budget by sending it; the task can then run."""
    nodes = make_nodes(tmp_path, tiny, NODES_3, budgets=True)
    manifest = make_manifest(tiny, reference, NODES_3, task_id="task-garbage", epsilon=4.0)
    with pytest.raises(TooFewParticipantsError, match="masked_input: protocol"):
        run_secure_round(_GarbageCiphertexts(nodes), manifest, reference.means)
    for node in nodes.values():
        assert ClientBudget(node.settings.budget_path).spent() == 0.0
    fresh = {n: dataclasses.replace(node, state=RecordDict()) for n, node in nodes.items()}
    run_secure_round(LocalTransport(fresh), manifest, reference.means)
    for node in fresh.values():
        assert ClientBudget(node.settings.budget_path).spent() == 4.0


# ---------------------------------------------------------------------------------------------
# The masked input's reply time: fixed by the holder, not by its records
# ---------------------------------------------------------------------------------------------


class _Clock:
    """A clock that moves only when the work or a sleep moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class _TimedTransport(LocalTransport):
    """Notes how long (on the test clock) each holder took to answer its masked input."""

    def __init__(self, nodes: Mapping[int, Node], clock: _Clock) -> None:
        super().__init__(nodes)
        self.clock = clock
        self.took: dict[int, float] = {}

    def exchange(
        self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        if stage != "masked_input":
            return super().exchange(stage, requests, timeout=timeout)
        out: dict[int, Reply] = {}
        for node_id, content in requests.items():
            start = self.clock.now
            out.update(super().exchange(stage, {node_id: content}, timeout=timeout))
            self.took[node_id] = self.clock.now - start
        return out


def _timed_federation(
    tmp_path: Path,
    tiny: LoadedModel,
    monkeypatch: pytest.MonkeyPatch,
    policy: ClientPolicy,
) -> tuple[dict[int, Node], _Clock]:
    """Holders whose contribution takes 0.1 s of the test clock per record they hold."""
    from fedsynth.client import participant

    clock = _Clock()
    tmp_path.mkdir(exist_ok=True)
    monkeypatch.setattr(participant, "_clock", lambda: clock.now)
    monkeypatch.setattr(participant, "_sleep", clock.sleep)
    nodes = make_nodes(tmp_path, tiny, NODES_3, policy=policy)
    for node in nodes.values():
        real = node.contributor.contribution

        def working(*args: Any, real: Any = real, node: Node = node) -> np.ndarray:
            clock.now += 0.1 * len(load_records(node.settings.data_path))
            return real(*args)

        monkeypatch.setattr(node.contributor, "contribution", working)
    return nodes, clock


def test_a_masked_input_leaves_at_the_holders_fixed_time_whatever_its_records(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Holders of 3, 4 and 5 records take 0.3, 0.4 and 0.5 s to compute; with
    ``masked_input_reply_s = 2`` every reply (and a refusal after the charge) leaves at 2 s,
    so its time says nothing about the count. Without the term, it says the count."""
    manifest = make_manifest(tiny, reference, NODES_3)
    nodes, clock = _timed_federation(
        tmp_path / "held", tiny, monkeypatch, ClientPolicy(allow_non_private=True)
    )
    transport = _TimedTransport(nodes, clock)
    run_secure_round(transport, manifest, reference.means)
    assert sorted(round(t, 6) for t in transport.took.values()) == [0.3, 0.4, 0.5]

    policy = ClientPolicy(allow_non_private=True, masked_input_reply_s=2.0)
    nodes, clock = _timed_federation(tmp_path / "fixed", tiny, monkeypatch, policy)
    # One holder's file changes after setup: its refusal comes after the charge, also at 2 s.
    late = nodes[NODES_3[0]]
    original = late.settings.data_path.read_text()
    transport = _TimedTransport(nodes, clock)
    real_exchange = transport.exchange

    def exchange(
        stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        if stage == "masked_input":
            late.settings.data_path.write_text(original + original)
        return real_exchange(stage, requests, timeout=timeout)

    transport.exchange = exchange  # type: ignore[method-assign]
    result = run_secure_round(transport, manifest, reference.means)
    assert late.node_id not in result.survivors
    assert transport.took == pytest.approx({n: 2.0 for n in NODES_3}, abs=1e-9)


def test_a_masked_input_past_its_reply_time_goes_at_once_and_says_so(
    tmp_path: Path,
    tiny: LoadedModel,
    reference: PublicReference,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = ClientPolicy(allow_non_private=True, masked_input_reply_s=0.35)
    nodes, clock = _timed_federation(tmp_path, tiny, monkeypatch, policy)
    transport = _TimedTransport(nodes, clock)
    with caplog.at_level("INFO", logger="fedsynth.client.participant"):
        run_secure_round(transport, make_manifest(tiny, reference, NODES_3), reference.means)
    assert sorted(round(t, 6) for t in transport.took.values()) == [0.35, 0.4, 0.5]
    # The holder's own log: how long the work took, and what to do where it took too long.
    logged = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == "fedsynth.client.participant"
    ]
    assert sorted(m for level, m in logged if level == "INFO" and "accepted" not in m) == [
        f"masked input computed in {t} s (masked_input_reply_s=0.35)" for t in (0.3, 0.4, 0.5)
    ]
    assert sorted(m for level, m in logged if level == "WARNING") == [
        f"the masked input took {t} s, beyond masked_input_reply_s=0.35: this reply's time "
        "depends on the data; raise masked_input_reply_s in the policy"
        for t in (0.4, 0.5)
    ]


def test_a_deadline_without_room_for_the_reply_time_is_refused_at_setup(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    manifest = dataclasses.replace(make_manifest(tiny, reference, NODES_3), deadline_s=60.0)
    policy = ClientPolicy(allow_non_private=True, masked_input_reply_s=55.0)
    nodes = make_nodes(tmp_path, tiny, NODES_3, policy=policy)
    with pytest.raises(TooFewParticipantsError, match="setup: policy"):
        run_secure_round(LocalTransport(nodes), manifest, reference.means)
