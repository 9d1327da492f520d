"""A sanitized release: per-class dataset vectors plus the manifest and privacy report, one file.

The file is a safetensors archive: tensor ``vectors`` (C, L, H) and ``counts`` (C,), with the
manifest and privacy report as JSON in its metadata. Saving writes a temporary file and renames
it, so a crash never leaves a partial release. Everything in it is differentially private (or
public), so generating from it costs no further privacy.

Integrity: the metadata carries a SHA-256 digest over the format, the release id, the manifest,
the report and both tensors, and the report's privacy terms (task id, epsilon, delta, trust mode,
model fingerprint) must equal the manifest's. Loading verifies both and refuses a file that was
altered or corrupted after it was written, so a release whose vectors or stated guarantee were
changed (by accident or by hand) is never used for generation or shown by ``fedsynth inspect``.
The digest is not a signature: it catches alteration, not a forger who rewrites every part
consistently; that party is bound by the ledger row and the holders' own budgets.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from fedsynth.protocol.contribution import DecodedRelease, noise_schedule
from fedsynth.protocol.errors import ConfigError, ReleaseIntegrityError, refusal_summary
from fedsynth.protocol.exact_noise import aggregate_variance
from fedsynth.protocol.manifest import TaskManifest
from fedsynth.protocol.mechanisms import trust_statement
from fedsynth.server.secure_round import RoundResult
from fedsynth.server.vocabulary import PRIOR_VOCABULARY_KEY

RELEASE_FORMAT = "fedsynth.release.v2"  # v2: digest and report/manifest check


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

    @property
    def prior_vocabulary(self) -> str | None:
        """The vocabulary the task's prior texts were sampled from (None: not recorded)."""
        return self.manifest.extra.get(PRIOR_VOCABULARY_KEY)


def check_strength(strength: float) -> float:
    """``strength`` as a float if it is a finite number >= 0, else a ConfigError naming it."""
    if (
        isinstance(strength, bool)
        or not isinstance(strength, numbers.Real)
        or not (math.isfinite(strength) and strength >= 0)
    ):
        raise ConfigError(f"strength={strength}: must be a finite number >= 0")
    return float(strength)


def check_contrast(contrast: float) -> float:
    """``contrast`` as a float if it is a finite number, else a ConfigError naming it.

    Any finite contrast is post-processing of the release (no privacy cost): 1 steers with the
    class vectors, above 1 amplifies what separates the classes, 0 steers every class alike.
    """
    if (
        isinstance(contrast, bool)
        or not isinstance(contrast, numbers.Real)
        or not math.isfinite(contrast)
    ):
        raise ConfigError(f"contrast={contrast!r}: must be a finite number")
    return float(contrast)


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
    schedule = noise_schedule(p, clients=k)
    if schedule is not None:
        actual_variance = aggregate_variance(
            schedule, len(result.survivors), len(set(result.noise_removed))
        )
    elif p.mode == "distributed":
        actual_variance = p.total_variance * len(result.survivors) / (p.threshold - p.colluders)
    elif p.mode == "local":
        actual_variance = p.total_variance * len(result.survivors)
    return {
        "format": RELEASE_FORMAT,
        "task_id": manifest.task_id,
        "mechanism": mechanism,
        "trust_mode": p.mode,
        "trust": trust_statement(p.mode),
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
            "noise_sharing": p.noise_sharing,
            # The target stays in the sum even if this many survivors added no noise.
            "colluders_tolerated": p.colluders,
            "excess_noise_removed_for": len(set(result.noise_removed)),
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
        # Node and "<stage>: <category>" only: a holder's details stay in its own log.
        "refused_or_failed": {str(n): refusal_summary(r) for n, r in result.refusals.items()},
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


def release_digest(
    *,
    release_id: str,
    manifest_json: str,
    report_json: str,
    vectors: np.ndarray,
    counts: np.ndarray,
) -> str:
    """SHA-256 over every part of a release file, each part named and length-prefixed.

    The manifest and report are hashed as the exact JSON text stored in the file (no
    re-serialization), the tensors as little-endian float32 / float64 bytes with their shapes.
    """
    digest = hashlib.sha256()

    def part(name: str, data: bytes) -> None:
        label = name.encode()
        digest.update(len(label).to_bytes(2, "big") + label)
        digest.update(len(data).to_bytes(8, "big") + data)

    part("format", RELEASE_FORMAT.encode())
    part("release_id", release_id.encode())
    part("manifest", manifest_json.encode())
    part("report", report_json.encode())
    for name, array, dtype in (("vectors", vectors, "<f4"), ("counts", counts, "<f8")):
        values = np.ascontiguousarray(array, dtype=dtype)
        part(f"{name}.shape", json.dumps(list(values.shape)).encode())
        part(name, values.tobytes())
    return "sha256:" + digest.hexdigest()


def check_report_matches_manifest(
    release_id: str, manifest: TaskManifest, report: dict[str, Any], *, where: str
) -> None:
    """Refuse a report whose privacy terms differ from the manifest the noise was drawn for.

    Raises:
        ReleaseIntegrityError: naming the field, the report's value and the manifest's.
    """
    p = manifest.privacy
    expected = {
        "task_id": manifest.task_id,
        "epsilon": "inf" if math.isinf(p.epsilon) else p.epsilon,
        "delta": p.delta,
        "trust_mode": p.mode,
        "model_fingerprint": manifest.model_fingerprint,
    }
    if release_id != manifest.task_id:
        raise ReleaseIntegrityError(
            f"{where}: release_id={release_id!r} differs from the manifest's task_id="
            f"{manifest.task_id!r}"
        )
    for key, value in expected.items():
        if key not in report or report[key] != value:
            raise ReleaseIntegrityError(
                f"{where}: report {key}={report.get(key)!r} differs from the manifest's {value!r}"
            )


def save_release(release: Release, path: Path) -> Path:
    """Write the release atomically (temporary file, fsync, rename), with its digest.

    Raises:
        ReleaseIntegrityError: if the report's terms differ from the manifest's (nothing written).
    """
    check_report_matches_manifest(
        release.release_id, release.manifest, release.report, where=str(path)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    vectors = np.ascontiguousarray(release.vectors, dtype=np.float32)
    counts = np.ascontiguousarray(release.counts, dtype=np.float64)
    manifest_json = release.manifest.to_json()
    report_json = json.dumps(release.report, sort_keys=True)
    digest = release_digest(
        release_id=release.release_id,
        manifest_json=manifest_json,
        report_json=report_json,
        vectors=vectors,
        counts=counts,
    )
    save_file(
        {"vectors": vectors, "counts": counts},
        str(tmp),
        metadata={
            "format": RELEASE_FORMAT,
            "release_id": release.release_id,
            "manifest": manifest_json,
            "report": report_json,
            "digest": digest,
        },
    )
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)
    return path


def load_release(path: Path) -> Release:
    """Read and verify a release file written by :func:`save_release`.

    Raises:
        ConfigError: the file is missing, not a regular file, unreadable, of another format or
            incomplete.
        ReleaseIntegrityError: the digest does not match the content, a vector is not finite,
            or the report's privacy terms differ from the manifest's (the file was altered
            after it was written).
    """
    if not path.exists():
        raise ConfigError(f"release file {path} does not exist")
    if path.is_dir():  # an empty path argument arrives as "." too
        raise ConfigError(f"{path} is a directory, not a release file (give the .safetensors file)")
    if not path.is_file():  # a FIFO (or a link to one, or a device) would block the open
        raise ConfigError(f"{path}: not a regular file, not read")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several unrelated types on corrupt files
        raise ConfigError(f"{path} is not a readable release file: {exc}") from exc
    if metadata.get("format") != RELEASE_FORMAT:
        raise ConfigError(f"{path}: format={metadata.get('format')!r}, expected {RELEASE_FORMAT}")
    missing = [k for k in ("release_id", "manifest", "report") if k not in metadata]
    missing += [k for k in ("vectors", "counts") if k not in tensors]
    if missing:
        raise ConfigError(f"{path}: incomplete release file, missing {', '.join(missing)}")
    # Integrity first: nothing in an altered file is parsed or trusted.
    stored = metadata.get("digest")
    if not stored:
        raise ReleaseIntegrityError(f"{path}: no digest in the file; it cannot be verified")
    actual = release_digest(
        release_id=metadata["release_id"],
        manifest_json=metadata["manifest"],
        report_json=metadata["report"],
        vectors=tensors["vectors"],
        counts=tensors["counts"],
    )
    if not hmac.compare_digest(stored.encode(), actual.encode()):
        raise ReleaseIntegrityError(
            f"{path}: digest mismatch (stored {stored[:19]}..., content {actual[:19]}...): the "
            "vectors, manifest or report were altered after the release was written"
        )
    try:
        manifest = TaskManifest.from_json(metadata["manifest"])
        report = json.loads(metadata["report"])
    except ValueError as exc:  # includes ConfigError and bad JSON
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path}: bad manifest or report JSON: {exc}") from exc
    vectors, counts, release_id = tensors["vectors"], tensors["counts"], metadata["release_id"]
    expected = (len(manifest.labels), len(manifest.layers), manifest.hidden_size)
    if vectors.shape != expected:
        raise ConfigError(f"{path}: vectors shape {vectors.shape} != {expected}")
    if not np.isfinite(vectors).all():  # would fail every use only once it had started
        raise ReleaseIntegrityError(f"{path}: a class vector is not finite")
    if not isinstance(report, dict):
        raise ReleaseIntegrityError(f"{path}: the report is not a JSON object")
    check_report_matches_manifest(release_id, manifest, report, where=str(path))
    return Release(
        release_id=release_id,
        manifest=manifest,
        vectors=vectors,
        counts=counts,
        report=report,
    )
