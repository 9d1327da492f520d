"""The task manifest: everything a client needs to check and compute its contribution.

Frozen, validated and versioned. It travels as JSON plus one array (the public per-class
reference), whose sha256 the JSON carries so the two cannot be mixed up.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsynth.protocol.codec import validate_bits
from fedsynth.protocol.errors import ConfigError, ShapeError
from fedsynth.protocol.features import FeatureSpec, PromptTemplate
from fedsynth.protocol.mechanisms import MAX_SKELLAM_VARIANCE, TrustMode
from fedsynth.protocol.secagg import SecAggConfig

MANIFEST_VERSION = "1"
ADJACENCY = "add/remove one record (record level, over the union of all holders' data)"
NOISE_PLAIN = "plain"
NOISE_EXACT = "exact"
NOISE_SHARINGS = (NOISE_PLAIN, NOISE_EXACT)


def default_noise_sharing(mode: str, total_variance: float) -> str:
    """Exact sharing wherever holders add noise shares (distributed with noise), else plain."""
    exact = mode == TrustMode.DISTRIBUTED.value and total_variance > 0
    return NOISE_EXACT if exact else NOISE_PLAIN


def array_sha256(array: np.ndarray) -> str:
    """Hash an array's dtype, shape and bytes."""
    digest = hashlib.sha256()
    digest.update(str(array.dtype).encode())
    digest.update(str(tuple(array.shape)).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return "sha256:" + digest.hexdigest()


def secagg_config_of(manifest: Any, *, domain: bytes) -> SecAggConfig:
    """The secure sum a manifest fixes: its task id as session, its K, t, field and length.

    Every signature of the session also binds the SHA-256 of the whole manifest, taken as the
    holders parse it (serialized, parsed, serialized again, so that the coordinator's copy and
    each holder's hash alike): holders handed different manifests refuse each other's keys.
    """
    text = type(manifest).from_json(manifest.to_json()).to_json()
    return SecAggConfig(
        session_id=manifest.task_id,
        node_ids=manifest.node_ids,
        threshold=manifest.privacy.threshold,
        bits=manifest.bits,
        dim=manifest.dim,
        terms=hashlib.sha256(domain + b"\x00" + text.encode("utf-8")).hexdigest(),
    )


@dataclass(frozen=True)
class PrivacySpec:
    """The target guarantee and how noise is shared, for one task (all classes in parallel).

    Only the shape of these numbers is validated here. Every holder recomputes the sensitivity
    and the noise its epsilon needs with its own accountant before it contributes
    (:mod:`fedsynth.protocol.verification`); in central mode the noise is the trusted
    coordinator's to add.
    """

    epsilon: float
    delta: float
    mode: str
    threshold: int
    total_variance: float
    noise_multiplier: float
    l2_sensitivity: float
    l1_sensitivity: float
    accountant: str
    adjacency: str = ADJACENCY
    # "exact": distributed shares with removable excess (protocol/exact_noise.py), so the sum
    # carries the target variance whatever the number of survivors; "plain": v/(t - c) each.
    noise_sharing: str = NOISE_PLAIN
    # c, the holders that may side with the coordinator and add no noise: distributed shares
    # are sized so that the survivors other than any c of them carry the target variance.
    colluders: int = 0

    def __post_init__(self) -> None:
        # The accountant (dp-accounting, scipy) loads on first use, not on import.
        from fedsynth.protocol.accounting import validate_epsilon_delta

        self._check_types()
        validate_epsilon_delta(epsilon=self.epsilon, delta=self.delta)
        try:
            TrustMode(self.mode)
        except ValueError:
            raise ConfigError(
                f"mode={self.mode!r} must be one of {[m.value for m in TrustMode]}"
            ) from None
        if self.threshold < 2:
            raise ConfigError(f"threshold t={self.threshold}: must be >= 2")
        if (
            isinstance(self.colluders, bool)
            or not isinstance(self.colluders, int)
            or not 0 <= self.colluders < self.threshold
        ):
            raise ConfigError(
                f"colluders={self.colluders!r}: must be an int with 0 <= c < t={self.threshold}"
            )
        if self.total_variance < 0 or not math.isfinite(self.total_variance):
            raise ConfigError(f"total_variance={self.total_variance}: must be finite and >= 0")
        if math.isfinite(self.epsilon) and self.total_variance == 0:
            raise ConfigError(f"epsilon={self.epsilon} is finite but total_variance is 0")
        if self.noise_sharing not in NOISE_SHARINGS:
            raise ConfigError(
                f"noise_sharing={self.noise_sharing!r} must be one of {list(NOISE_SHARINGS)}"
            )
        if self.noise_sharing == NOISE_EXACT and self.mode != TrustMode.DISTRIBUTED.value:
            raise ConfigError(
                f"noise_sharing={NOISE_EXACT!r} applies to distributed mode only, not "
                f"mode={self.mode!r}"
            )
        share = noise_share_variance(self)
        if share > MAX_SKELLAM_VARIANCE:
            # More noise is never less private, so verification would accept it, the budget
            # would be charged, and only the draw would fail: refuse the terms themselves.
            raise ConfigError(
                f"total_variance={self.total_variance:g}: a holder's noise share {share:g} "
                f"exceeds the Skellam sampler's limit {MAX_SKELLAM_VARIANCE:g}"
            )

    def _check_types(self) -> None:
        """Refuse a field of the wrong JSON type by name (``"1e-5"`` for a number, ``3.0`` for t).

        Before a comparison deep in the checks fails on it with a TypeError or lets it through.
        """
        for name in (
            "epsilon",
            "delta",
            "total_variance",
            "noise_multiplier",
            "l2_sensitivity",
            "l1_sensitivity",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ConfigError(f"privacy.{name}={value!r}: must be a number")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Integral):
            raise ConfigError(f"privacy.threshold={self.threshold!r}: must be an integer")
        for name in ("mode", "accountant", "adjacency", "noise_sharing"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ConfigError(f"privacy.{name}={value!r}: must be a string")


def noise_share_variance(privacy: PrivacySpec) -> float:
    """Skellam variance one client adds per coordinate, by trust mode.

    distributed: total/(t − c), so any t surviving shares carry the target variance even when
    c of them are colluders' that add nothing; local: the full total (the client's own sum is
    DP on its own); central: none.
    """
    mode = TrustMode(privacy.mode)
    if mode is TrustMode.DISTRIBUTED:
        return privacy.total_variance / (privacy.threshold - privacy.colluders)
    if mode is TrustMode.LOCAL:
        return privacy.total_variance
    return 0.0


def noise_margin(privacy: PrivacySpec, *, clients: int) -> float:
    """Room for the noise in the field: 40 std of every holder's share, K times, plus 1.

    A holder refuses a contribution beyond 2^(bits-1)/K (it could wrap), so each holder's own
    share, not only the aggregate's, must keep 40 std of room; otherwise a share of the full
    variance (local mode, or t - c = 1) would be refused a few std out, an answer that depends
    on how close its sums come to the cap. Central mode's single draw is the aggregate's.
    """
    k = max(clients, 1)
    share = math.sqrt(noise_share_variance(privacy))
    central = 0.0 if share else math.sqrt(privacy.total_variance)
    return 40.0 * (k * share + central) + 1.0


@dataclass(frozen=True)
class TaskManifest:
    """A dataset-vector task as published by the coordinator.

    Attributes:
        task_id: Unique id; also binds the secure-sum session.
        model_name: Human-readable model name.
        model_fingerprint: sha256 of the weights and the tokenizer (see `combined_fingerprint`).
        template: Class-conditional prompt template (labels in manifest order).
        layers: Injection/feature layers.
        max_text_tokens: Text tokens kept per example.
        clip_norms: Per-layer clip norms m_l, chosen on public data only.
        residual_norms: Typical residual norm per layer (public; scales steering).
        count_weight: Weight gamma of the count coordinate.
        scale: Fixed-point scale of the unit domain.
        bits: Field bits of the secure sum.
        node_ids: Participants of the round (K of them).
        privacy: Target guarantee and noise.
        reference_sha256: Hash of the (C, L, H) public reference array.
        deadline_s: Per-stage deadline in seconds.
        max_records: Per-client cap on records (bounds the field range).
    """

    task_id: str
    model_name: str
    model_fingerprint: str
    hidden_size: int
    template: PromptTemplate
    layers: tuple[int, ...]
    max_text_tokens: int
    clip_norms: tuple[float, ...]
    residual_norms: tuple[float, ...]
    count_weight: float
    scale: float
    bits: int
    node_ids: tuple[int, ...]
    privacy: PrivacySpec
    reference_sha256: str
    deadline_s: float = 600.0
    max_records: int = 1_000_000
    version: str = MANIFEST_VERSION
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.task_id:
            raise ConfigError("task_id must not be empty")
        if self.version != MANIFEST_VERSION:
            raise ConfigError(
                f"manifest version={self.version!r} is not supported (expected "
                f"{MANIFEST_VERSION!r})"
            )
        FeatureSpec(self.template, self.layers, self.max_text_tokens)  # validates layers
        n_layers = len(self.layers)
        if len(self.clip_norms) != n_layers or any(
            not (m > 0 and math.isfinite(m)) for m in self.clip_norms
        ):
            raise ConfigError(f"clip_norms={self.clip_norms}: need {n_layers} positive values")
        if len(self.residual_norms) != n_layers:
            raise ConfigError(f"residual_norms: need {n_layers} values")
        if not self.count_weight > 0:
            raise ConfigError(f"count_weight={self.count_weight}: must be > 0")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ConfigError(f"scale={self.scale}: must be positive and finite")
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
        self.check_field_capacity()

    @property
    def labels(self) -> tuple[str, ...]:
        """Labels in the order of the released rows."""
        return self.template.labels

    @property
    def row_dim(self) -> int:
        """Coordinates per class: L * H layer values and one count."""
        return len(self.layers) * self.hidden_size + 1

    @property
    def dim(self) -> int:
        """Length of the secure-sum vector: one row per class."""
        return len(self.labels) * self.row_dim

    @property
    def feature_spec(self) -> FeatureSpec:
        """The feature function this task fixes."""
        return FeatureSpec(self.template, self.layers, self.max_text_tokens)

    def secagg_config(self) -> SecAggConfig:
        """The secure-sum parameters this task fixes (session bound to the task id)."""
        return secagg_config_of(self, domain=b"fedsynth/task-terms")

    def check_field_capacity(self) -> None:
        """Refuse parameters whose worst-case aggregate could wrap around the field.

        Worst case per coordinate: K clients, each with max_records records of magnitude scale
        (plus rounding) and its noise share up to 40 standard deviations (:func:`noise_margin`).
        """
        k = len(self.node_ids)
        per_record = self.scale * max(1.0, self.count_weight) + 1.0
        noise = noise_margin(self.privacy, clients=k)
        worst = k * self.max_records * per_record + noise
        if worst >= 2.0 ** (self.bits - 1):
            raise ConfigError(
                f"bits={self.bits} too small: worst-case |sum| {worst:.3g} >= 2^{self.bits - 1}; "
                f"raise bits or lower max_records={self.max_records} / scale={self.scale}"
            )

    def check_reference(self, reference: np.ndarray) -> None:
        """Check shape and hash of the public reference array against the manifest."""
        expected = (len(self.labels), len(self.layers), self.hidden_size)
        if reference.shape != expected:
            raise ShapeError(f"reference shape {reference.shape} != manifest's {expected}")
        found = array_sha256(reference)
        if found != self.reference_sha256:
            raise ConfigError(
                f"reference_sha256 mismatch: manifest {self.reference_sha256}, got {found}"
            )
        if not np.all(np.isfinite(reference)):
            # A NaN row would turn every record of its class into NaN: refused here, at setup,
            # whatever the holder's data (clip_to_unit zeroes such rows as well).
            raise ConfigError("reference holds non-finite values (NaN or inf)")

    def to_json(self) -> str:
        """Serialize to canonical JSON (infinite epsilon as the string "inf")."""
        data = {
            "version": self.version,
            "task_id": self.task_id,
            "model_name": self.model_name,
            "model_fingerprint": self.model_fingerprint,
            "hidden_size": self.hidden_size,
            "template": self.template.to_dict(),
            "layers": list(self.layers),
            "max_text_tokens": self.max_text_tokens,
            "clip_norms": list(self.clip_norms),
            "residual_norms": list(self.residual_norms),
            "count_weight": self.count_weight,
            "scale": self.scale,
            "bits": self.bits,
            "node_ids": [str(n) for n in self.node_ids],
            "privacy": {
                **self.privacy.__dict__,
                "epsilon": json_float(self.privacy.epsilon),
            },
            "reference_sha256": self.reference_sha256,
            "deadline_s": self.deadline_s,
            "max_records": self.max_records,
            "extra": dict(self.extra),
        }
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TaskManifest:
        """Parse and validate a manifest; a missing or malformed field raises ConfigError."""
        try:
            data: dict[str, Any] = json.loads(text)
            privacy = dict(data["privacy"])
            privacy["epsilon"] = float(privacy["epsilon"])
            return cls(
                version=str(data["version"]),
                task_id=str(data["task_id"]),
                model_name=str(data["model_name"]),
                model_fingerprint=str(data["model_fingerprint"]),
                hidden_size=int(data["hidden_size"]),
                template=PromptTemplate.from_dict(data["template"]),
                layers=tuple(int(x) for x in data["layers"]),
                max_text_tokens=int(data["max_text_tokens"]),
                clip_norms=tuple(float(x) for x in data["clip_norms"]),
                residual_norms=tuple(float(x) for x in data["residual_norms"]),
                count_weight=float(data["count_weight"]),
                scale=float(data["scale"]),
                bits=int(data["bits"]),
                node_ids=tuple(int(x) for x in data["node_ids"]),
                privacy=PrivacySpec(**privacy),
                reference_sha256=str(data["reference_sha256"]),
                deadline_s=float(data["deadline_s"]),
                max_records=int(data["max_records"]),
                extra={str(k): str(v) for k, v in data.get("extra", {}).items()},
            )
        except (AttributeError, KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"malformed task manifest: {exc!r}") from exc


def json_float(value: float) -> float | str:
    """JSON-safe float: infinity becomes the string "inf" (JSON has no infinity)."""
    return "inf" if math.isinf(value) else value
