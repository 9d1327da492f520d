"""Round-level noise: the noise in a real secure-sum release is the variance its epsilon needs.

Seeded rounds at epsilon = 4 with K = 4 real holders (Contributors on the tiny model, PEVoters
on the hashing embedder) behind an in-process transport, through every stage of the secure sum.
The residual (decoded release minus the plain, noise-free sum of the survivors' records) must
have per-coordinate variance ``total_variance``, the manifest's target, whether exactly t or
all K holders survive (exact noise sharing: with more than t survivors each reveals the excess
the sum does not need, and the coordinator removes it; without that removal all K would leave
K/t times the target, which the test would reject). The check is a two-sided chi-square test
at p = 1e-6 over all coordinates; negative controls show that it fails when the holders add no
noise, half the variance, or a quarter of it (the scale/2 calibration).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from scipy import stats

import fedsynth.protocol.contribution as contribution
from fedsynth.client.contributor import ClientSettings, Contributor
from fedsynth.client.data import load_records
from fedsynth.client.pe_voter import PEVoter
from fedsynth.client.policy import ClientBudget, ClientPolicy
from fedsynth.protocol.accounting import calibrate_pe
from fedsynth.protocol.codec import from_field
from fedsynth.protocol.embedding import HashingEmbedder
from fedsynth.protocol.errors import FedSynthError, TooFewParticipantsError
from fedsynth.protocol.features import FeatureSpec, PromptTemplate, clip_to_unit, extract_features
from fedsynth.protocol.identity import HolderIdentity, Roster
from fedsynth.protocol.manifest import TaskManifest
from fedsynth.protocol.messages import vector_to_bytes
from fedsynth.protocol.models import LoadedModel, tiny_model
from fedsynth.protocol.pe import vote_histogram
from fedsynth.protocol.pe_manifest import decode_histogram
from fedsynth.protocol.verification import verify_manifest
from fedsynth.server.coordinator import PublicReference, TaskConfig, build_manifest
from fedsynth.server.pe_coordinator import PEConfig, build_round_manifest
from fedsynth.server.secure_round import Reply, run_secure_round, run_secure_sum

EPSILON = 4.0
DELTA = 1e-5
NODES = (101, 2**40 + 7, 2**63 + 3, 55)
THRESHOLD = 3  # a strict majority of K = 4
TEMPLATE = PromptTemplate(
    instruction="Review ({label}): ", label_names=(("pos", "positive"), ("neg", "negative"))
)
LAYERS = (1, 2, 3)
BATCH = 4
WORDS = ["good", "bad", "plot", "actor", "slow", "fun", "long", "dull", "bright", "film"]
PE_LABELS = ("sport", "cooking")
PE_WORDS = ["goal", "match", "team", "oven", "salt", "butter", "the", "very", "old", "new"]
P_VALUE = 1e-6

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def variance_matches(residual: np.ndarray, expected: float) -> bool:
    """Two-sided chi-square test of ``var(residual) == expected`` (mean known to be 0)."""
    n = residual.size
    statistic = float(np.sum(residual.astype(np.float64) ** 2)) / expected
    return bool(stats.chi2.ppf(P_VALUE, n) <= statistic <= stats.chi2.isf(P_VALUE, n))


def _wire(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))


@dataclass
class Holder:
    participant: Contributor | PEVoter
    settings: ClientSettings
    state: RecordDict = field(default_factory=RecordDict)


class InProcessTransport:
    """Carries each stage through Flower's serialization; drops nodes at given stages."""

    def __init__(self, holders: Mapping[int, Holder], drop: Mapping[str, set[int]]) -> None:
        self.holders = holders
        self.drop = drop

    def exchange(
        self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        out: dict[int, Reply] = {}
        for node_id, content in requests.items():
            if node_id in self.drop.get(stage, set()):
                continue
            holder = self.holders[node_id]
            try:
                reply = holder.participant.handle(stage, _wire(content), holder.state)
            except FedSynthError as exc:
                out[node_id] = Reply(content=None, error=f"{type(exc).__name__}: {exc}")
                continue
            out[node_id] = Reply(content=_wire(reply))
        return out


def credentials() -> tuple[dict[int, HolderIdentity], Roster]:
    identities = {node: HolderIdentity.generate(f"holder-{i}") for i, node in enumerate(NODES)}
    roster = Roster({identity.name: identity.public_key for identity in identities.values()})
    return identities, roster


def make_holders(
    tmp_path: Path,
    seed: int,
    write: Callable[[Path, int], Path],
    build: Callable[[ClientSettings, int], Contributor | PEVoter],
) -> dict[int, Holder]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    identities, roster = credentials()
    holders = {}
    for index, node_id in enumerate(NODES):
        settings = ClientSettings(
            data_path=write(tmp_path / f"data-{index}.jsonl", seed * 10 + index),
            embedder="hashing-64",
            seed=seed,
            batch_size=BATCH,
            policy=ClientPolicy(),
            budget_path=tmp_path / f"budget-{index}.jsonl",
            identity=identities[node_id],
            roster=roster,
        )
        holders[node_id] = Holder(build(settings, node_id), settings)
    return holders


# ---------------------------------------------------------------- dataset vectors


def write_reviews(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    rows = [
        {"text": " ".join(rng.choice(WORDS, size=3)), "label": TEMPLATE.labels[i % 2]}
        for i in range(4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def reference(tiny: LoadedModel) -> PublicReference:
    return PublicReference(
        texts={},
        means=np.zeros((2, len(LAYERS), tiny.hidden_size), dtype=np.float32),
        clip_norms=(1.0, 1.5, 2.0),
        residual_norms=(1.0, 1.0, 1.0),
    )


def vector_manifest(tiny: LoadedModel, reference: PublicReference, task_id: str) -> TaskManifest:
    config = TaskConfig(
        template=TEMPLATE,
        layers=LAYERS,
        max_text_tokens=16,
        epsilon=EPSILON,
        delta=DELTA,
        threshold=THRESHOLD,
        scale=1000.0,
        bits=64,
        prior_per_label=2,
    )
    return build_manifest(config, tiny, reference, NODES, task_id=task_id)


def plain_vector_sum(
    holders: list[Holder], manifest: TaskManifest, reference: PublicReference, tiny: LoadedModel
) -> np.ndarray:
    """The survivors' scaled class sums without rounding or noise, (dim,) float64."""
    texts: list[str] = []
    labels: list[str] = []
    for holder in holders:
        for record in load_records(holder.settings.data_path, labels=manifest.labels):
            texts.append(record.text)
            labels.append(record.label)
    spec = FeatureSpec(TEMPLATE, LAYERS, manifest.max_text_tokens, BATCH)
    feats, _ = extract_features(tiny, texts, labels, spec)
    ids = np.array([manifest.labels.index(label) for label in labels])
    unit = clip_to_unit(
        feats - reference.means[ids], np.asarray(manifest.clip_norms, dtype=np.float64)
    ).reshape(len(texts), -1)
    rows = np.concatenate([unit, np.full((len(texts), 1), manifest.count_weight)], axis=1)
    sums = np.stack([rows[ids == c].sum(axis=0) for c in range(len(manifest.labels))])
    out: np.ndarray = (sums * manifest.scale).reshape(-1)
    return out


def vector_residuals(
    tmp_path: Path,
    tiny: LoadedModel,
    reference: PublicReference,
    *,
    dropped: set[int],
    rounds: int,
    tag: str,
    removal: str = "auto",
) -> tuple[np.ndarray, float]:
    """Residuals of ``rounds`` independent seeded releases, and their expected variance."""
    residuals = []
    expected = math.nan
    for r in range(rounds):
        manifest = vector_manifest(tiny, reference, f"noise-{tag}-{r}")
        verify_manifest(manifest)
        holders = make_holders(
            tmp_path / f"{tag}-{r}",
            seed=1000 + r,
            write=write_reviews,
            build=lambda settings, node: Contributor(
                settings, node_id=node, model_loader=lambda: tiny
            ),
        )
        transport = InProcessTransport(holders, drop={"masked_input": dropped})
        result = run_secure_round(transport, manifest, reference.means, noise_removal=removal)
        assert sorted(result.survivors) == sorted(set(NODES) - dropped)
        assert not result.refusals
        survivors = [holders[n] for n in result.survivors]
        released = from_field(result.field_sum, bits=manifest.bits).astype(np.float64)
        residuals.append(released - plain_vector_sum(survivors, manifest, reference, tiny))
        # Exact sharing: with more than t survivors each reveals its excess, and what stays
        # is the target whatever the number of survivors.
        assert manifest.privacy.noise_sharing == "exact"
        more_than_t = len(result.survivors) > manifest.privacy.threshold
        assert sorted(result.noise_removed) == (sorted(result.survivors) if more_than_t else [])
        expected = manifest.privacy.total_variance
        # The decoder accepts what honest survivors produce.
        contribution.decode_release(
            result.field_sum, manifest=manifest, survivors=len(result.survivors)
        )
    return np.concatenate(residuals), expected


@pytest.mark.parametrize(
    ("dropped", "factor", "removal"),
    [(set(), 1.0, "auto"), ({NODES[1]}, 1.0, "auto"), (set(), 1.0, "upload")],
    ids=["all-K-survive", "exactly-t-survive", "all-K-survive-excess-uploaded"],
)
def test_vector_release_carries_the_target_noise(
    tmp_path: Path,
    tiny: LoadedModel,
    reference: PublicReference,
    dropped: set[int],
    factor: float,
    removal: str,
) -> None:
    residual, expected = vector_residuals(
        tmp_path, tiny, reference, dropped=dropped, rounds=6, tag="honest", removal=removal
    )
    target = vector_manifest(tiny, reference, "target").privacy.total_variance
    assert expected == pytest.approx(factor * target)
    assert residual.size >= 1000
    assert variance_matches(residual, expected)
    assert abs(residual.mean()) < 6 * math.sqrt(expected / residual.size)


@pytest.fixture
def broken_noise(request: pytest.FixtureRequest) -> Iterator[float]:
    """Make every holder add only a fraction of its noise share (a privacy bug)."""
    fraction = float(request.param)
    original = contribution.noise_share_variance

    def weakened(privacy: object) -> float:
        return fraction * original(privacy)  # type: ignore[arg-type]

    # Every holder's share, plain or exact, vectors or votes, comes from this one function.
    contribution.noise_share_variance = weakened  # type: ignore[assignment]
    try:
        yield fraction
    finally:
        contribution.noise_share_variance = original


@pytest.mark.parametrize("broken_noise", [0.0, 0.25, 0.5], indirect=True)
def test_vector_noise_check_catches_weakened_noise(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference, broken_noise: float
) -> None:
    residual, expected = vector_residuals(
        tmp_path, tiny, reference, dropped={NODES[1]}, rounds=6, tag="broken"
    )
    assert not variance_matches(residual, expected)


# ---------------------------------------------------------------- PE votes


def write_votes(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    rows = [
        {"text": " ".join(rng.choice(PE_WORDS, size=4)), "label": PE_LABELS[i % 2]}
        for i in range(12)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PE_PER_LABEL = 600
PE_ROUNDS = 3


def pe_residuals(
    tmp_path: Path, *, dropped: set[int], tasks: int, tag: str
) -> tuple[np.ndarray, float]:
    embedder = HashingEmbedder(64)
    config = PEConfig(
        labels=PE_LABELS,
        rounds=PE_ROUNDS,
        per_label=PE_PER_LABEL,
        top_k=2,
        epsilon=EPSILON,
        delta=DELTA,
        threshold=THRESHOLD,
    )
    calibration = calibrate_pe(
        mode="distributed", epsilon=EPSILON, delta=DELTA, rounds=PE_ROUNDS, top_k=2
    )
    residuals = []
    expected = math.nan
    for task in range(tasks):
        rng = np.random.default_rng(task)
        texts = [" ".join(rng.choice(PE_WORDS, size=4)) for _ in range(2 * PE_PER_LABEL)]
        candidates = embedder.embed(texts).astype(np.float32)
        manifest = build_round_manifest(
            config,
            calibration,
            pe_task_id=f"pe-noise-{tag}-{task}",
            round_number=1,
            embedder=embedder,
            candidates=candidates,
            nodes=NODES,
        )
        verify_manifest(manifest)
        holders = make_holders(
            tmp_path / f"{tag}-{task}",
            seed=2000 + task,
            write=write_votes,
            build=lambda settings, node: PEVoter(
                settings, node_id=node, embedder_loader=lambda: embedder
            ),
        )
        transport = InProcessTransport(holders, drop={"masked_input": dropped})
        result = run_secure_sum(
            transport,
            manifest,
            {"manifest": manifest.to_json(), "candidates": vector_to_bytes(candidates.reshape(-1))},
        )
        assert sorted(result.survivors) == sorted(set(NODES) - dropped)
        histogram = decode_histogram(
            result.field_sum, manifest=manifest, survivors=len(result.survivors)
        )
        plain = np.zeros(manifest.dim, dtype=np.int64)
        for node in result.survivors:
            records = load_records(holders[node].settings.data_path, labels=PE_LABELS)
            ids = np.array([PE_LABELS.index(r.label) for r in records])
            plain += vote_histogram(
                embedder.embed([r.text for r in records]),
                ids,
                candidates,
                n_labels=len(PE_LABELS),
                per_label=PE_PER_LABEL,
                top_k=2,
            )
        residuals.append(histogram - plain)
        assert manifest.privacy.noise_sharing == "exact"
        more_than_t = len(result.survivors) > THRESHOLD
        assert sorted(result.noise_removed) == (sorted(result.survivors) if more_than_t else [])
        expected = manifest.privacy.total_variance
    return np.concatenate(residuals), expected


@pytest.mark.parametrize(
    ("dropped", "factor"),
    [(set(), 1.0), ({NODES[2]}, 1.0)],
    ids=["all-K-survive", "exactly-t-survive"],
)
def test_pe_votes_carry_the_target_noise(tmp_path: Path, dropped: set[int], factor: float) -> None:
    residual, expected = pe_residuals(tmp_path, dropped=dropped, tasks=2, tag="honest")
    target = calibrate_pe(
        mode="distributed", epsilon=EPSILON, delta=DELTA, rounds=PE_ROUNDS, top_k=2
    ).total_variance
    assert expected == pytest.approx(factor * target)
    assert residual.size >= 2000
    assert variance_matches(residual, expected)


@pytest.mark.parametrize("broken_noise", [0.0, 0.25, 0.5], indirect=True)
def test_pe_noise_check_catches_weakened_noise(tmp_path: Path, broken_noise: float) -> None:
    residual, expected = pe_residuals(tmp_path, dropped={NODES[2]}, tasks=2, tag="broken")
    assert not variance_matches(residual, expected)


def test_holders_refuse_a_round_with_a_quarter_of_the_noise(
    tmp_path: Path, tiny: LoadedModel, reference: PublicReference
) -> None:
    """The scale/2 calibration attack on a real round: every holder refuses at setup."""
    honest = vector_manifest(tiny, reference, "quarter")
    privacy = dataclasses.replace(
        honest.privacy,
        total_variance=honest.privacy.total_variance / 4,
        noise_multiplier=honest.privacy.noise_multiplier / 2,
    )
    manifest = dataclasses.replace(honest, privacy=privacy)
    holders = make_holders(
        tmp_path,
        seed=1,
        write=write_reviews,
        build=lambda settings, node: Contributor(settings, node_id=node, model_loader=lambda: tiny),
    )
    transport = InProcessTransport(holders, drop={})
    with pytest.raises(TooFewParticipantsError):
        run_secure_round(transport, manifest, reference.means)
    for holder in holders.values():
        assert holder.settings.budget_path is not None
        assert not holder.settings.budget_path.exists() or not ClientBudget(
            holder.settings.budget_path
        ).has(manifest.task_id)
