"""Coordinator-side task preparation: public reference, clip norms, noise calibration, manifest.

Everything here uses public inputs only (the model and the class-conditional template): the
reference is the mean feature of texts the model writes from the template alone (the "prior"),
the clip norm m_l is the median distance of those prior texts to their class mean, and r_l (the
steering scale) is their median residual norm. The prior texts are kept: they are also the
epsilon = 0 baseline.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedsynth.protocol.accounting import calibrate_vector_release, validate_epsilon_delta
from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.features import FeatureSpec, PromptTemplate, extract_features
from fedsynth.protocol.manifest import (
    PrivacySpec,
    TaskManifest,
    array_sha256,
    default_noise_sharing,
)
from fedsynth.protocol.models import LoadedModel, cache_root
from fedsynth.protocol.secagg.stages import min_safe_threshold
from fedsynth.protocol.verification import check_vector_scale
from fedsynth.server.generation import GenerationConfig, generate_texts
from fedsynth.server.vocabulary import PRIOR_VOCABULARY_KEY


@dataclass(frozen=True)
class TaskConfig:
    """Everything the coordinator operator chooses for a dataset-vector task."""

    template: PromptTemplate
    layers: tuple[int, ...] = (8, 9, 10, 11)
    max_text_tokens: int = 64
    epsilon: float = 4.0
    delta: float = 1e-5
    mode: str = "distributed"
    threshold: int | None = None
    colluders: int = 0
    scale: float = 1000.0  # rounding inflates a record's bound < 0.1 % (min ~430 for 4x640)
    bits: int = 64
    count_weight: float = 0.5
    prior_per_label: int = 100
    prior_generation: GenerationConfig = field(default_factory=GenerationConfig)
    deadline_s: float = 1800.0
    max_records: int = 1_000_000
    seed: int = 0

    def __post_init__(self) -> None:
        validate_epsilon_delta(epsilon=self.epsilon, delta=self.delta)
        FeatureSpec(self.template, self.layers, self.max_text_tokens)
        if self.prior_per_label < 2:
            raise ConfigError(f"prior_per_label={self.prior_per_label}: must be >= 2")


@dataclass(frozen=True)
class PublicReference:
    """Public per-class reference and the statistics derived from it."""

    texts: dict[str, list[str]]
    means: np.ndarray  # (C, L, H)
    clip_norms: tuple[float, ...]
    residual_norms: tuple[float, ...]


def _reference_key(loaded: LoadedModel, config: TaskConfig) -> str:
    payload = json.dumps(
        {
            "fingerprint": loaded.fingerprint,
            "template": config.template.to_dict(),
            "layers": list(config.layers),
            "max_text_tokens": config.max_text_tokens,
            "prior_per_label": config.prior_per_label,
            "generation": asdict(config.prior_generation),
            "seed": config.seed,
            "v": 1,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def compute_public_reference(
    loaded: LoadedModel,
    config: TaskConfig,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    use_cache: bool = True,
) -> PublicReference:
    """Generate prior texts per class, extract their features, derive reference statistics.

    Cached on disk by model fingerprint and settings (all inputs are public).

    Args:
        progress: called with (phase, done, total) as samples/features complete.
    """
    path = cache_root() / "references" / f"{_reference_key(loaded, config)}.npz"
    if use_cache and path.exists():
        data = np.load(path, allow_pickle=False)
        meta = json.loads(str(data["meta"]))
        return PublicReference(
            texts=meta["texts"],
            means=data["means"],
            clip_norms=tuple(meta["clip_norms"]),
            residual_norms=tuple(meta["residual_norms"]),
        )
    labels = config.template.labels
    total = config.prior_per_label * len(labels)
    texts: dict[str, list[str]] = {}
    done = 0
    for index, label in enumerate(labels):

        def tick(n: int, _tokens: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress("prior samples", done, total)

        texts[label] = generate_texts(
            loaded,
            config.template.prefix(label),
            config.prior_per_label,
            config=config.prior_generation,
            seed=config.seed * 1000 + index,
            progress=tick,
        )
    spec = FeatureSpec(config.template, config.layers, config.max_text_tokens)
    all_texts = [t for label in labels for t in texts[label]]
    all_labels = [label for label in labels for _ in texts[label]]
    seen = 0

    def tick_features(n: int) -> None:
        nonlocal seen
        seen += n
        if progress is not None:
            progress("prior features", seen, len(all_texts))

    features, token_norms = extract_features(
        loaded, all_texts, all_labels, spec, progress=tick_features
    )
    label_ids = np.array([labels.index(label) for label in all_labels])
    means = np.stack([features[label_ids == c].mean(axis=0) for c in range(len(labels))])
    deviations = np.linalg.norm(features - means[label_ids], axis=-1)  # (n, L)
    clip_norms = tuple(float(x) for x in np.median(deviations, axis=0))
    residual_norms = tuple(float(x) for x in np.median(token_norms, axis=0))
    reference = PublicReference(
        texts=texts,
        means=means.astype(np.float32),
        clip_norms=clip_norms,
        residual_norms=residual_norms,
    )
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        meta = {"texts": texts, "clip_norms": clip_norms, "residual_norms": residual_norms}
        np.savez(tmp, means=reference.means, meta=np.array(json.dumps(meta)))
        tmp.rename(path)
    return reference


def build_manifest(
    config: TaskConfig,
    loaded: LoadedModel,
    reference: PublicReference,
    node_ids: tuple[int, ...],
    *,
    task_id: str | None = None,
) -> TaskManifest:
    """Calibrate the noise for (epsilon, delta, layers) and publish the task manifest.

    The stated sensitivities are the rounding-inflated bound of one record in every mode
    (clients round each record in central mode too), and the scale must keep that inflation
    under 0.1 % (:func:`~fedsynth.protocol.verification.check_vector_scale`), since the
    holders refuse a coarser one.

    Raises:
        ScaleTooSmallError: If ``config.scale`` is below the minimum for the model's dims.
        ConfigError: On a threshold outside 2..K.
    """
    k = len(node_ids)
    threshold = (
        config.threshold
        if config.threshold is not None
        else max(2, min_safe_threshold(k, config.colluders))
    )
    if threshold > k:
        raise ConfigError(f"threshold t={threshold} exceeds K={k} clients")
    if threshold < 2:
        raise ConfigError(f"threshold t={threshold}: must be >= 2")
    row_dim = len(config.layers) * loaded.hidden_size + 1
    check_vector_scale(
        scale=config.scale,
        layers=len(config.layers),
        count_weight=config.count_weight,
        row_dim=row_dim,
    )
    calibration = calibrate_vector_release(
        mode=config.mode,
        epsilon=config.epsilon,
        delta=config.delta,
        layers=len(config.layers),
        dim=row_dim,
        scale=config.scale,
        count_weight=config.count_weight,
    )
    privacy = PrivacySpec(
        epsilon=config.epsilon,
        delta=config.delta,
        mode=config.mode,
        threshold=threshold,
        total_variance=calibration.total_variance,
        noise_multiplier=calibration.noise_multiplier,
        l2_sensitivity=calibration.l2_sensitivity,
        l1_sensitivity=calibration.l1_sensitivity,
        accountant=calibration.accountant,
        noise_sharing=default_noise_sharing(config.mode, calibration.total_variance),
        colluders=config.colluders,
    )
    return TaskManifest(
        task_id=task_id or f"dv-{uuid.uuid4().hex[:12]}",
        model_name=loaded.name,
        model_fingerprint=loaded.fingerprint,
        hidden_size=loaded.hidden_size,
        template=config.template,
        layers=config.layers,
        max_text_tokens=config.max_text_tokens,
        clip_norms=reference.clip_norms,
        residual_norms=reference.residual_norms,
        count_weight=config.count_weight,
        scale=config.scale,
        bits=config.bits,
        node_ids=node_ids,
        privacy=privacy,
        reference_sha256=array_sha256(reference.means),
        deadline_s=config.deadline_s,
        max_records=config.max_records,
        extra=prior_record(config.prior_generation),
    )


def prior_record(generation: GenerationConfig) -> dict[str, str]:
    """How the prior texts were sampled, as a manifest's ``extra`` (public; read by users).

    The class vectors are measured against these texts, so whoever applies a release can
    sample the same way (:func:`~fedsynth.server.vocabulary.release_vocabulary`).
    """
    return {
        PRIOR_VOCABULARY_KEY: generation.vocabulary,
        "prior_top_p": repr(generation.top_p),
        "prior_temperature": repr(generation.temperature),
        "prior_max_new_tokens": str(generation.max_new_tokens),
    }


def epsilon_label(epsilon: float) -> str:
    """Short text for an epsilon, with infinity spelled out."""
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def reference_cache_dir() -> Path:
    """Where public references are cached."""
    return cache_root() / "references"
