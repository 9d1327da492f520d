"""Empirical privacy audit of the released dataset vector: an ε lower bound from many runs.

The auditor runs the real release mechanism (per-holder clipping, per-record rounding, noise
shares, field sum, decoding with central noise) many times on neighbouring data sets D and
D ∪ {canary}, where the canary is a worst-case record (a full clip norm in every layer, in a fixed
direction). A linear test on each release guesses whether the canary was in. Half the runs pick
the test's threshold; the other half give Clopper-Pearson upper bounds on its false-positive and
false-negative rates, and any (ε, δ)-DP mechanism must satisfy

    FPR + e^ε · FNR ≥ 1 − δ   and   FNR + e^ε · FPR ≥ 1 − δ,

so ε ≥ log((1 − δ − FNR) / FPR) holds with the stated confidence. The bound can only be as large
as the number of runs allows (about log(runs)); it must never exceed the accountant's ε.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedsynth.protocol.codec import field_sum
from fedsynth.protocol.contribution import decode_release, encode_contribution, integer_class_sums
from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.features import clip_to_unit
from fedsynth.protocol.manifest import TaskManifest


@dataclass(frozen=True)
class AuditResult:
    """Outcome of one audit: the empirical lower bound next to the claimed ε."""

    epsilon_lower_bound: float
    claimed_epsilon: float
    runs: int
    threshold: float
    false_positive_rate: float
    false_negative_rate: float
    confidence: float


def clopper_pearson_upper(failures: int, trials: int, *, confidence: float) -> float:
    """One-sided upper confidence bound on a rate from ``failures`` out of ``trials``."""
    from scipy.stats import beta

    if trials < 1 or not 0 <= failures <= trials:
        raise ConfigError(f"need 0 <= failures <= trials, trials >= 1; got {failures}/{trials}")
    if failures == trials:
        return 1.0
    return float(beta.ppf(confidence, failures + 1, trials - failures))


def epsilon_lower_bound(
    scores_out: Sequence[float],
    scores_in: Sequence[float],
    *,
    delta: float,
    confidence: float = 0.95,
) -> tuple[float, float, float, float]:
    """Lower bound on ε from test scores of runs without (``out``) and with (``in``) the canary.

    The first half of each list picks the threshold (the one with the largest point estimate);
    the second half bounds the error rates, so picking does not bias the bound.

    Returns:
        (ε lower bound (0 when nothing can be claimed), threshold, FPR bound, FNR bound).
    """
    out = np.asarray(scores_out, dtype=np.float64)
    inn = np.asarray(scores_in, dtype=np.float64)
    if len(out) < 4 or len(inn) < 4:
        raise ConfigError("the audit needs at least 4 runs on each side")
    h_out, h_in = len(out) // 2, len(inn) // 2
    pick_out, test_out = out[:h_out], out[h_out:]
    pick_in, test_in = inn[:h_in], inn[h_in:]

    def point_epsilon(tau: float) -> float:
        fpr = (np.sum(pick_out >= tau) + 1) / (len(pick_out) + 2)
        fnr = (np.sum(pick_in < tau) + 1) / (len(pick_in) + 2)
        return math.log(max(1 - delta - fnr, 1e-12) / fpr)

    candidates = np.unique(np.concatenate([pick_out, pick_in]))
    tau = float(max(candidates, key=point_epsilon))
    fpr = clopper_pearson_upper(int(np.sum(test_out >= tau)), len(test_out), confidence=confidence)
    fnr = clopper_pearson_upper(int(np.sum(test_in < tau)), len(test_in), confidence=confidence)
    bound = 0.0
    if 1 - delta - fnr > 0 and fpr > 0:
        bound = max(bound, math.log((1 - delta - fnr) / fpr))
    return bound, tau, fpr, fnr


def canary_features(manifest: TaskManifest, reference: np.ndarray, label_index: int) -> np.ndarray:
    """A worst-case record: 10 clip norms from the class reference along a fixed direction."""
    direction = np.random.default_rng(12345).normal(
        size=(len(manifest.layers), manifest.hidden_size)
    )
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    clip = np.asarray(manifest.clip_norms, dtype=np.float64)[:, None]
    record: np.ndarray = (reference[label_index] + 10.0 * clip * direction)[None]
    return record.astype(np.float32)


def release_statistic(
    holders: Sequence[tuple[np.ndarray, Sequence[str]]],
    *,
    manifest: TaskManifest,
    reference: np.ndarray,
    canary: np.ndarray,
    label_index: int,
    rng: np.random.Generator,
) -> float:
    """Run the release once and project the released class sum onto the canary's record.

    Every holder computes integer sums and adds its noise share; the field sum is decoded (with
    central noise in central mode) exactly as the coordinator does.
    """
    fields = []
    for features, labels in holders:
        sums = integer_class_sums(
            features, list(labels), manifest=manifest, reference=reference, rng=rng
        )
        fields.append(encode_contribution(sums, manifest=manifest, rng=rng))
    decoded = decode_release(
        field_sum(fields, bits=manifest.bits), manifest=manifest, rng=rng, min_count=1e-9
    )
    clip = np.asarray(manifest.clip_norms, dtype=np.float64)[:, None]
    count = decoded.counts[label_index]
    unit_sum = decoded.vectors[label_index].astype(np.float64) / clip * count
    diff = canary[0].astype(np.float64) - reference[label_index]
    unit = clip_to_unit(diff[None], clip[:, 0])[0]
    return float(np.sum(unit_sum * unit) + manifest.count_weight**2 * count)


def audit_release(
    holders: Sequence[tuple[np.ndarray, Sequence[str]]],
    *,
    manifest: TaskManifest,
    reference: np.ndarray,
    runs: int,
    seed: int,
    label_index: int = 0,
    confidence: float = 0.95,
) -> AuditResult:
    """Audit the release mechanism by ``runs`` releases without and with the canary.

    The canary is added to the first holder's data; the scores go to
    :func:`epsilon_lower_bound`.
    """
    if runs < 4:
        raise ConfigError(f"runs={runs}: the audit needs at least 4 runs per side")
    canary = canary_features(manifest, reference, label_index)
    label = manifest.labels[label_index]
    first_features, first_labels = holders[0]
    with_canary = [
        (np.concatenate([first_features, canary]), [*first_labels, label]),
        *holders[1:],
    ]
    rng = np.random.default_rng(seed)
    scores = {
        name: [
            release_statistic(
                data,
                manifest=manifest,
                reference=reference,
                canary=canary,
                label_index=label_index,
                rng=rng,
            )
            for _ in range(runs)
        ]
        for name, data in (("out", holders), ("in", with_canary))
    }
    bound, tau, fpr, fnr = epsilon_lower_bound(
        scores["out"], scores["in"], delta=manifest.privacy.delta, confidence=confidence
    )
    return AuditResult(
        epsilon_lower_bound=bound,
        claimed_epsilon=manifest.privacy.epsilon,
        runs=runs,
        threshold=tau,
        false_positive_rate=fpr,
        false_negative_rate=fnr,
        confidence=confidence,
    )
