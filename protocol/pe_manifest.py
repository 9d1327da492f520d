"""The manifest of one federated Private Evolution round, and the client's vote encoding.

A PE task runs T rounds; each round is one secure sum whose session id is
``<pe_task_id>/round-<r>``, so a message from another round can never be mixed in. The manifest
travels as JSON plus one array (the candidates' embeddings) whose sha256 it carries. The privacy
spec states the guarantee of the WHOLE task (all T rounds) and the per-round noise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsynth.protocol.codec import to_field, validate_bits
from fedsynth.protocol.contribution import share_noise
from fedsynth.protocol.errors import ConfigError, FieldRangeError, ShapeError
from fedsynth.protocol.manifest import (
    ADJACENCY,
    PrivacySpec,
    array_sha256,
    noise_margin,
    secagg_config_of,
)
from fedsynth.protocol.secagg import SecAggConfig

PE_MANIFEST_VERSION = "pe-1"
PE_ADJACENCY = ADJACENCY + "; one record votes for top_k candidates of its own label"


@dataclass(frozen=True)
class PERoundManifest:
    """One round of a federated PE task, as published by the coordinator.

    Attributes:
        pe_task_id: The PE task (all rounds); budgets are charged once per PE task.
        round: This round, 1..rounds.
        rounds: T, the number of histogram releases the privacy spec covers.
        embedder_name: Human-readable embedder name.
        embedder_fingerprint: Fingerprint clients must reproduce with their embedder.
        embedding_dim: Embedding dimension D.
        labels: Labels, in histogram order.
        per_label: Candidates per label N.
        top_k: Votes per private example.
        candidates_sha256: Hash of the (C*N, D) float32 candidate embeddings.
        bits: Field bits of the secure sum.
        node_ids: Participants (K).
        privacy: Guarantee of the whole task and the per-round noise (votes).
        deadline_s: Per-stage deadline.
        max_records: Per-client cap on records (bounds the field range).
    """

    pe_task_id: str
    round: int
    rounds: int
    embedder_name: str
    embedder_fingerprint: str
    embedding_dim: int
    labels: tuple[str, ...]
    per_label: int
    top_k: int
    candidates_sha256: str
    bits: int
    node_ids: tuple[int, ...]
    privacy: PrivacySpec
    deadline_s: float = 600.0
    max_records: int = 1_000_000
    version: str = PE_MANIFEST_VERSION

    def __post_init__(self) -> None:
        if not self.pe_task_id or "/" in self.pe_task_id:
            raise ConfigError(f"pe_task_id={self.pe_task_id!r}: must be non-empty without '/'")
        if self.version != PE_MANIFEST_VERSION:
            raise ConfigError(
                f"PE manifest version={self.version!r} is not supported "
                f"(expected {PE_MANIFEST_VERSION!r})"
            )
        if self.rounds < 1 or not 1 <= self.round <= self.rounds:
            raise ConfigError(f"round={self.round} must be in 1..rounds={self.rounds}")
        if self.embedding_dim < 1:
            raise ConfigError(f"embedding_dim={self.embedding_dim}: must be >= 1")
        if len(self.labels) < 1 or len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"labels={self.labels}: need distinct labels")
        if self.per_label < 1:
            raise ConfigError(f"per_label={self.per_label}: must be >= 1")
        if not 1 <= self.top_k <= self.per_label:
            raise ConfigError(f"top_k={self.top_k}: must be in 1..per_label={self.per_label}")
        if not math.isclose(self.privacy.l2_sensitivity, math.sqrt(self.top_k)) or not (
            math.isclose(self.privacy.l1_sensitivity, self.top_k)
        ):
            raise ConfigError(
                f"privacy sensitivities (L2 {self.privacy.l2_sensitivity}, L1 "
                f"{self.privacy.l1_sensitivity}) do not match top_k={self.top_k}: one record "
                f"changes the histogram by L2 sqrt(top_k) and L1 top_k"
            )
        validate_bits(self.bits)
        k = len(self.node_ids)
        if len(set(self.node_ids)) != k:
            raise ConfigError(f"node_ids contain duplicates: {self.node_ids}")
        if self.privacy.threshold > k:
            raise ConfigError(f"threshold t={self.privacy.threshold} exceeds K={k} participants")
        if not self.deadline_s > 0:
            raise ConfigError(f"deadline_s={self.deadline_s}: must be > 0")
        if self.max_records < 1:
            raise ConfigError(f"max_records={self.max_records}: must be >= 1")
        if self.worst_case_sum() >= 2.0 ** (self.bits - 1):
            raise ConfigError(
                f"bits={self.bits} too small for K={k} clients x max_records={self.max_records}"
            )

    # -- what the secure sum needs -------------------------------------------------------------

    @property
    def task_id(self) -> str:
        """The secure-sum session of this round."""
        return f"{self.pe_task_id}/round-{self.round}"

    @property
    def model_fingerprint(self) -> str:
        """The fingerprint a client's policy checks (the embedder's)."""
        return self.embedder_fingerprint

    @property
    def dim(self) -> int:
        """Histogram length C * N."""
        return len(self.labels) * self.per_label

    def secagg_config(self) -> SecAggConfig:
        """Secure-sum parameters of this round."""
        return secagg_config_of(self, domain=b"fedsynth/pe-round-terms")

    def worst_case_sum(self) -> float:
        """Largest |coordinate| of an honest aggregate: all votes plus every share's 40 std."""
        k = len(self.node_ids)
        noise = noise_margin(self.privacy, clients=k)
        return k * self.max_records * self.top_k + noise

    def check_candidates(self, candidates: np.ndarray) -> None:
        """Check shape and hash of the candidate embeddings against the manifest."""
        expected = (self.dim, self.embedding_dim)
        if candidates.shape != expected:
            raise ShapeError(f"candidate embeddings shape {candidates.shape} != {expected}")
        found = array_sha256(candidates)
        if found != self.candidates_sha256:
            raise ConfigError(
                f"candidates_sha256 mismatch: manifest {self.candidates_sha256}, got {found}"
            )

    def same_task_terms(self, other: PERoundManifest) -> bool:
        """Whether two rounds belong to one task under identical terms (privacy, embedder)."""
        return (
            self.pe_task_id == other.pe_task_id
            and self.rounds == other.rounds
            and self.privacy == other.privacy
            and self.embedder_fingerprint == other.embedder_fingerprint
            and self.labels == other.labels
            and self.top_k == other.top_k
        )

    # -- serialization -------------------------------------------------------------------------

    def to_json(self) -> str:
        """Canonical JSON (infinite epsilon as "inf")."""
        privacy = dict(self.privacy.__dict__)
        privacy["epsilon"] = "inf" if math.isinf(self.privacy.epsilon) else self.privacy.epsilon
        data = {
            "version": self.version,
            "pe_task_id": self.pe_task_id,
            "round": self.round,
            "rounds": self.rounds,
            "embedder_name": self.embedder_name,
            "embedder_fingerprint": self.embedder_fingerprint,
            "embedding_dim": self.embedding_dim,
            "labels": list(self.labels),
            "per_label": self.per_label,
            "top_k": self.top_k,
            "candidates_sha256": self.candidates_sha256,
            "bits": self.bits,
            "node_ids": [str(n) for n in self.node_ids],
            "privacy": privacy,
            "deadline_s": self.deadline_s,
            "max_records": self.max_records,
        }
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PERoundManifest:
        """Parse and validate; a missing or malformed field raises ConfigError."""
        try:
            data: dict[str, Any] = json.loads(text)
            privacy = dict(data["privacy"])
            privacy["epsilon"] = float(privacy["epsilon"])
            return cls(
                version=str(data["version"]),
                pe_task_id=str(data["pe_task_id"]),
                round=int(data["round"]),
                rounds=int(data["rounds"]),
                embedder_name=str(data["embedder_name"]),
                embedder_fingerprint=str(data["embedder_fingerprint"]),
                embedding_dim=int(data["embedding_dim"]),
                labels=tuple(str(x) for x in data["labels"]),
                per_label=int(data["per_label"]),
                top_k=int(data["top_k"]),
                candidates_sha256=str(data["candidates_sha256"]),
                bits=int(data["bits"]),
                node_ids=tuple(int(x) for x in data["node_ids"]),
                privacy=PrivacySpec(**privacy),
                deadline_s=float(data["deadline_s"]),
                max_records=int(data["max_records"]),
            )
        except (AttributeError, KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"malformed PE round manifest: {exc!r}") from exc


def encode_votes(
    votes: np.ndarray,
    *,
    manifest: PERoundManifest,
    rng: np.random.Generator,
    noise_seed: bytes | None = None,
) -> np.ndarray:
    """Add this client's Skellam share to its integer votes and embed them in the field.

    ``noise_seed``: the chain seed of an exact-sharing task (:func:`share_noise`).

    Returns:
        (dim,) uint64 field elements, ready to be masked.
    """
    if votes.shape != (manifest.dim,):
        raise ShapeError(f"votes shape {votes.shape} != ({manifest.dim},)")
    noisy = votes.astype(np.int64) + share_noise(
        manifest.privacy,
        clients=len(manifest.node_ids),
        dim=manifest.dim,
        rng=rng,
        noise_seed=noise_seed,
    )
    limit = 2.0 ** (manifest.bits - 1) / len(manifest.node_ids)
    if float(np.abs(noisy).max(initial=0)) >= limit:
        raise FieldRangeError(
            f"this histogram does not fit bits={manifest.bits} for K={len(manifest.node_ids)} "
            "clients without risk of wrapping; the task needs more field bits"
        )
    return to_field(noisy, bits=manifest.bits)


def decode_histogram(
    field_sum: np.ndarray,
    *,
    manifest: PERoundManifest,
    survivors: int,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The noisy vote histogram from the secure sum (plus central noise in central mode).

    Refuses a sum outside what ``survivors`` honest clients can produce (a corrupt or
    malicious input, or a field wrap-around): FieldRangeError, nothing is selected from it.
    """
    from fedsynth.protocol.codec import from_field
    from fedsynth.protocol.mechanisms import TrustMode, gaussian_noise

    ints = from_field(field_sum, bits=manifest.bits).astype(np.float64)
    if ints.shape != (manifest.dim,):
        raise ShapeError(f"sum shape {ints.shape} != ({manifest.dim},)")
    mode = TrustMode(manifest.privacy.mode)
    per_client_var = (
        manifest.privacy.total_variance
        if mode is TrustMode.LOCAL
        else manifest.privacy.total_variance / manifest.privacy.threshold
    )
    noise_std = math.sqrt(per_client_var * survivors) if mode is not TrustMode.CENTRAL else 0.0
    upper = survivors * manifest.max_records * manifest.top_k + 40.0 * noise_std + 1.0
    lower = -(40.0 * noise_std + 1.0)
    if ints.max(initial=0) > upper or ints.min(initial=0) < lower:
        raise FieldRangeError(
            f"aggregated histogram outside the range {survivors} honest clients can produce "
            f"([{lower:.0f}, {upper:.0f}]); a client sent a malformed input and this round's "
            "result is discarded"
        )
    if mode is TrustMode.CENTRAL and manifest.privacy.total_variance:
        if rng is None:
            raise ConfigError("central mode needs an rng for the coordinator's noise")
        ints = ints + gaussian_noise(
            ints.shape, std=math.sqrt(manifest.privacy.total_variance), rng=rng
        )
    return ints
