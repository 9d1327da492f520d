"""What a release is, in one place: model, classes, guarantee, prior settings and steering.

``fedsynth inspect`` prints this for whoever receives a release file (a consumer deciding what
to generate, a holder checking what was published under its name). Everything comes from the
verified file itself: the manifest the holders signed off on, the privacy report bound to it by
the digest, and the steering figures that are post-processing of the public release
(:mod:`fedsynth.server.snr`), so reading it costs no privacy and needs no model.
"""

from __future__ import annotations

from typing import Any

from fedsynth.protocol.errors import NonPositiveCountError
from fedsynth.protocol.manifest import json_float
from fedsynth.server.release import Release
from fedsynth.server.snr import DEFAULT_MIN_SIGNAL_SHARE, class_parts, steering_lines
from fedsynth.server.synthesize import steering_report
from fedsynth.server.vocabulary import PRIOR_VOCABULARY_KEY

PRIOR_KEYS = (PRIOR_VOCABULARY_KEY, "prior_top_p", "prior_temperature", "prior_max_new_tokens")
"""The manifest ``extra`` entries that say how the task's prior texts were sampled."""

_PRIVACY_KEYS = (
    "trust_mode",
    "mechanism",
    "accountant",
    "adjacency",
    "composition",
    "K",
    "survivors",
    "threshold_t",
    "dropped_clients",
    "refused_or_failed",
)


def release_summary(
    release: Release,
    *,
    strength: float,
    contrast: float = 1.0,
    min_signal_share: float = DEFAULT_MIN_SIGNAL_SHARE,
) -> dict[str, Any]:
    """JSON-ready summary of a loaded (hence digest-verified) release.

    Args:
        strength: The steering strength to state the effective strength per class for.
        contrast: The class contrast generation would use.
        min_signal_share: As :func:`~fedsynth.server.snr.steering_snr`.

    A class count <= 0 (a file fedsynth did not decode, or altered) leaves the steering and
    class-part figures ``{"unavailable": reason}``: the rest is still what the file states.
    """
    manifest = release.manifest
    privacy = manifest.privacy
    report = release.report if isinstance(release.report, dict) else {}
    stated = report.get("noise")
    noise: dict[str, Any] = stated if isinstance(stated, dict) else {}
    recorded = {key: manifest.extra.get(key) for key in PRIOR_KEYS}
    return {
        "release_id": release.release_id,
        "task_id": manifest.task_id,
        "integrity": "digest verified",
        "model": {
            "name": manifest.model_name,
            "fingerprint": manifest.model_fingerprint,
            "hidden_size": manifest.hidden_size,
            "layers": list(manifest.layers),
            "max_text_tokens": manifest.max_text_tokens,
        },
        "classes": {
            label: float(count) for label, count in zip(release.labels, release.counts, strict=True)
        },
        "privacy": {
            "epsilon": json_float(privacy.epsilon),
            "delta": privacy.delta,
            "noise_multiplier": json_float(privacy.noise_multiplier),
            "noise_sharing": privacy.noise_sharing,
            "colluders_tolerated": privacy.colluders,
            "noise_variance_target_scaled": privacy.total_variance,
            "noise_variance_actual_scaled": noise.get("aggregate_variance_actual_scaled"),
            **{key: report.get(key) for key in _PRIVACY_KEYS},
        },
        "prior": {
            **recorded,
            PRIOR_VOCABULARY_KEY: recorded[PRIOR_VOCABULARY_KEY] or "full (not recorded)",
        },
        **_steering_figures(
            release, strength=strength, contrast=contrast, min_signal_share=min_signal_share
        ),
        "report": report,
    }


def _steering_figures(
    release: Release, *, strength: float, contrast: float, min_signal_share: float
) -> dict[str, Any]:
    """``class_parts`` and ``steering``, or why the release cannot be weighed."""
    try:
        return {
            "class_parts": {
                part.label: {"share": part.share, "snr": json_float(part.snr)}
                for part in class_parts(release)
            },
            "steering": steering_report(
                release, strength=strength, contrast=contrast, min_signal_share=min_signal_share
            ),
        }
    except NonPositiveCountError as exc:
        return {"class_parts": {"unavailable": str(exc)}, "steering": {"unavailable": str(exc)}}


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """Plain lines for a terminal, in the order a reader checks them."""
    model = summary["model"]
    privacy = summary["privacy"]
    prior = summary["prior"]
    lines = [
        f"release {summary['release_id']} (task {summary['task_id']}): {summary['integrity']}",
        f"model {model['name']} {model['fingerprint']}",
        f"  layers {model['layers']}, hidden size {model['hidden_size']}, records up to "
        f"{model['max_text_tokens']} tokens",
        "classes (noisy counts): "
        + ", ".join(f"{label} {count:.1f}" for label, count in summary["classes"].items()),
        (
            "guarantee: none (epsilon = inf: a non-private release)"
            if privacy["epsilon"] == "inf"
            else f"guarantee: ({privacy['epsilon']:g}, {privacy['delta']:g})-DP, "
            f"{privacy['adjacency'] or 'adjacency not stated'}"
        ),
        f"  trust {privacy['trust_mode']}: {privacy['mechanism']}",
        f"  accountant: {privacy['accountant']}",
        f"  noise multiplier {_fmt(privacy['noise_multiplier'])}, noise sharing "
        f"{privacy['noise_sharing']}, colluders tolerated {privacy['colluders_tolerated']}",
    ]
    if privacy["K"] is not None:
        dropped = privacy["dropped_clients"] or []
        lines.append(
            f"  holders {privacy['K']}, survivors {privacy['survivors']}, threshold "
            f"{privacy['threshold_t']}, dropped {len(dropped)}"
        )
    lines.append(
        f"prior texts: vocabulary {prior[PRIOR_VOCABULARY_KEY]}, top-p "
        f"{prior['prior_top_p'] or '?'}, temperature {prior['prior_temperature'] or '?'}, up to "
        f"{prior['prior_max_new_tokens'] or '?'} new tokens"
    )
    if "unavailable" in summary["steering"]:
        lines.append(f"steering: unavailable: {summary['steering']['unavailable']}")
        return lines
    lines.append(
        "class parts (class vector - mean of the classes; what --contrast scales): "
        + ", ".join(
            f"{label} {entry['share']:.3f} of the mean, snr {_fmt(entry['snr'])}"
            for label, entry in summary["class_parts"].items()
        )
    )
    lines.extend(steering_lines(summary["steering"]))
    return lines


def _fmt(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.4g}"
