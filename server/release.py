"""A sanitized release: per-class dataset vectors plus the manifest and privacy report, one file.

The file is a safetensors archive: tensor ``vectors`` (C, L, H) and ``counts`` (C,), with the
manifest and privacy report as JSON in its metadata. Saving writes a temporary file and renames
it, so a crash never leaves a partial release. Everything in it is differentially private (or
public), so generating from it costs no further privacy.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from fedsynth.protocol.contribution import DecodedRelease
from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.manifest import TaskManifest
from fedsynth.server.secure_round import RoundResult

RELEASE_FORMAT = "fedsynth.release.v1"


@dataclass(frozen=True)
class Release:
    """Sanitized per-class vectors and the facts needed to use and audit them."""

    release_id: str
    manifest: TaskManifest
    vectors: np.ndarray  # (C, L, H) float32
    counts: np.ndarray  # (C,) noisy counts
    report: dict[str, Any]

    @property
    def labels(self) -> tuple[str, ...]:
        """Labels of the rows of ``vectors``."""
        return self.manifest.labels

    def directions(self, label: str, *, contrast: float = 1.0) -> dict[int, torch.Tensor]:
        """Steering directions per layer for ``label`` (post-processing, no privacy cost).

        ``contrast`` > 1 amplifies what separates this class from the mean of all classes:
        ``mean + contrast * (v_c - mean)``; 1.0 returns the class vector itself.
        """
        if label not in self.labels:
            raise ConfigError(f"label={label!r} is not in this release's {list(self.labels)}")
        c = self.labels.index(label)
        mean = self.vectors.mean(axis=0)
        vector = mean + contrast * (self.vectors[c] - mean)
        return {
            layer: torch.from_numpy(np.ascontiguousarray(vector[j]))
            for j, layer in enumerate(self.manifest.layers)
        }

    def residual_norms(self) -> dict[int, float]:
        """Public typical residual norm per layer."""
        return dict(zip(self.manifest.layers, self.manifest.residual_norms, strict=True))


def privacy_report(
    manifest: TaskManifest, result: RoundResult, *, model_name: str
) -> dict[str, Any]:
    """The privacy report of a release: mechanism, noise, guarantee, who took part."""
    p = manifest.privacy
    mechanism = {
        "distributed": "distributed Skellam (client noise shares) + secure sum",
        "local": "local Skellam (each client fully sanitizes) + secure sum",
        "central": "Gaussian added by the coordinator after a secure sum",
    }[p.mode]
    k = len(manifest.node_ids)
    actual_variance = p.total_variance
    if p.mode == "distributed":
        actual_variance = p.total_variance * len(result.survivors) / p.threshold
    elif p.mode == "local":
        actual_variance = p.total_variance * len(result.survivors)
    return {
        "format": RELEASE_FORMAT,
        "task_id": manifest.task_id,
        "mechanism": mechanism,
        "trust_mode": p.mode,
        "epsilon": "inf" if math.isinf(p.epsilon) else p.epsilon,
        "delta": p.delta,
        "adjacency": p.adjacency,
        "composition": "per-layer composition (joint-vector analysis) within a class; parallel "
        "composition across classes (disjoint records): epsilon applies to the whole release",
        "accountant": p.accountant,
        "noise": {
            "noise_multiplier": p.noise_multiplier,
            "aggregate_variance_target_scaled": p.total_variance,
            "aggregate_variance_actual_scaled": actual_variance,
            "l2_sensitivity_scaled": p.l2_sensitivity,
            "l1_sensitivity_scaled": p.l1_sensitivity,
            "scale": manifest.scale,
            "count_weight": manifest.count_weight,
            "field_bits": manifest.bits,
        },
        "K": k,
        "threshold_t": p.threshold,
        "survivors": len(result.survivors),
        "dropped_clients": [str(n) for n in result.dropped],
        "refused_or_failed": {str(n): r for n, r in result.refusals.items()},
        "model": model_name,
        "model_fingerprint": manifest.model_fingerprint,
        "layers": list(manifest.layers),
        "clip_norms": list(manifest.clip_norms),
        "labels": list(manifest.labels),
    }


def make_release(
    manifest: TaskManifest, decoded: DecodedRelease, result: RoundResult, *, model_name: str
) -> Release:
    """Bundle decoded vectors with their manifest and privacy report."""
    return Release(
        release_id=manifest.task_id,
        manifest=manifest,
        vectors=decoded.vectors,
        counts=decoded.counts,
        report=privacy_report(manifest, result, model_name=model_name),
    )


def save_release(release: Release, path: Path) -> Path:
    """Write the release atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {
            "vectors": np.ascontiguousarray(release.vectors, dtype=np.float32),
            "counts": np.ascontiguousarray(release.counts, dtype=np.float64),
        },
        str(tmp),
        metadata={
            "format": RELEASE_FORMAT,
            "release_id": release.release_id,
            "manifest": release.manifest.to_json(),
            "report": json.dumps(release.report, sort_keys=True),
        },
    )
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)
    return path


def load_release(path: Path) -> Release:
    """Read and validate a release file written by :func:`save_release`."""
    if not path.exists():
        raise ConfigError(f"release file {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several unrelated types on corrupt files
        raise ConfigError(f"{path} is not a readable release file: {exc}") from exc
    if metadata.get("format") != RELEASE_FORMAT:
        raise ConfigError(f"{path}: format={metadata.get('format')!r}, expected {RELEASE_FORMAT}")
    try:
        manifest = TaskManifest.from_json(metadata["manifest"])
        vectors = tensors["vectors"]
        counts = tensors["counts"]
        report = json.loads(metadata["report"])
        release_id = metadata["release_id"]
    except (KeyError, ValueError) as exc:  # ValueError includes ConfigError and bad JSON
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path}: incomplete release file, missing or bad {exc}") from exc
    expected = (len(manifest.labels), len(manifest.layers), manifest.hidden_size)
    if vectors.shape != expected:
        raise ConfigError(f"{path}: vectors shape {vectors.shape} != {expected}")
    return Release(
        release_id=release_id,
        manifest=manifest,
        vectors=vectors,
        counts=counts,
        report=report,
    )
