"""Empirical privacy audit of the released dataset vector: an ε lower bound from many runs.

The auditor runs the real release mechanism (per-holder clipping, per-record rounding, noise
shares, field sum, decoding with central noise) many times on neighbouring data sets D and
D ∪ {canary}, where the canary is a worst-case record (a full clip norm in every layer, in a fixed
direction). A linear test on each release guesses whether the canary was in. Half the runs pick
the test's threshold; the other half give Clopper-Pearson upper bounds on its false-positive and
false-negative rates, and any (ε, δ)-DP mechanism must satisfy

    FPR + e^ε · FNR ≥ 1 − δ   and   FNR + e^ε · FPR ≥ 1 − δ,

so ε ≥ log((1 − δ − FNR) / FPR) holds with the stated confidence. The bound can only be as large
as the number of runs allows (about log(runs / 6) at 95 %): :func:`attainable_epsilon_bound` is
that ceiling, reached when the test separates the two halves perfectly. An audit whose ceiling
is below the claimed ε cannot refute the claim, whatever the mechanism does, so every audit
reports the ceiling next to its bound and the tests only audit claims below it. The bound must
never exceed the accountant's ε; on a release with too little noise it must.

Two drivers: :func:`audit_release` runs one release per run on the holders' real features (the
study's audit); :func:`audit_mechanism` runs the same release code on synthetic records with one
run per class of a many-label manifest, cheap enough for the tens of thousands of runs that an
audit able to refute ε = 2 or 4 needs (the tests' audit and its negative control).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedsynth.protocol.codec import field_sum
from fedsynth.protocol.contribution import (
    DecodedRelease,
    decode_release,
    encode_contribution,
    integer_class_sums,
    noise_schedule,
    remove_excess_noise,
)
from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.exact_noise import SEED_BYTES, revealed_seed
from fedsynth.protocol.features import clip_to_unit
from fedsynth.protocol.manifest import TaskManifest


@dataclass(frozen=True)
class AuditResult:
    """Outcome of one audit: the empirical lower bound next to the claimed ε.

    Attributes:
        epsilon_lower_bound: ε the runs prove with the stated confidence (0 if none).
        claimed_epsilon: The accountant's ε for the audited release.
        attainable_bound: The largest bound these runs could have reported at all
            (:func:`attainable_epsilon_bound`); below ``claimed_epsilon`` the audit cannot
            refute the claim.
        runs: Releases per side (with and without the canary).
        threshold: Test threshold picked on the first half of the runs.
        false_positive_rate: Clopper-Pearson upper bound on the test's FPR (second half).
        false_negative_rate: Clopper-Pearson upper bound on the test's FNR (second half).
        confidence: One-sided confidence of the bounds.
    """

    epsilon_lower_bound: float
    claimed_epsilon: float
    attainable_bound: float
    runs: int
    threshold: float
    false_positive_rate: float
    false_negative_rate: float
    confidence: float

    @property
    def can_refute(self) -> bool:
        """Whether these runs could have reported a bound above the claimed ε at all."""
        return self.attainable_bound > self.claimed_epsilon

    @property
    def refutes_claim(self) -> bool:
        """Whether the measured bound exceeds the claimed ε (the release leaks more)."""
        return self.epsilon_lower_bound > self.claimed_epsilon


def clopper_pearson_upper(failures: int, trials: int, *, confidence: float) -> float:
    """One-sided upper confidence bound on a rate from ``failures`` out of ``trials``."""
    from scipy.stats import beta

    if trials < 1 or not 0 <= failures <= trials:
        raise ConfigError(f"need 0 <= failures <= trials, trials >= 1; got {failures}/{trials}")
    if failures == trials:
        return 1.0
    return float(beta.ppf(confidence, failures + 1, trials - failures))


def _bound_from_rates(
    *, false_positive_rate: float, false_negative_rate: float, delta: float
) -> float:
    """ε ≥ log((1 − δ − FNR) / FPR), or 0 when the rates prove nothing."""
    if 1 - delta - false_negative_rate > 0 and false_positive_rate > 0:
        return max(0.0, math.log((1 - delta - false_negative_rate) / false_positive_rate))
    return 0.0


def attainable_epsilon_bound(runs: int, *, delta: float, confidence: float = 0.95) -> float:
    """The largest ε lower bound :func:`epsilon_lower_bound` can report from ``runs`` per side.

    The bound is largest when the test separates the held-out halves perfectly (no false
    positive, no false negative); the Clopper-Pearson bounds of 0 errors in ``h`` trials are
    then ``1 − (1 − confidence)^(1/h)`` with ``h = runs − runs // 2``. An audit can refute a
    claimed ε only if this exceeds it (300 runs at 95 % give about 3.9, so they can never
    refute ε = 4).

    Args:
        runs: Releases per side (the same number with and without the canary), >= 4.
        delta: The δ of the audited claim, in [0, 1).
        confidence: One-sided confidence of the Clopper-Pearson bounds, in (0, 1).

    Returns:
        The ceiling on the reportable bound (0 when even perfect separation proves nothing).

    Raises:
        ConfigError: On fewer than 4 runs, or δ or the confidence out of range.
    """
    if isinstance(runs, bool) or not isinstance(runs, int | np.integer) or runs < 4:
        raise ConfigError(f"runs={runs!r}: the audit needs an integer of at least 4 runs per side")
    if not 0.0 <= delta < 1.0:
        raise ConfigError(f"delta={delta!r}: must be in [0, 1)")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence={confidence!r}: must be in (0, 1)")
    held_out = int(runs) - int(runs) // 2
    perfect = clopper_pearson_upper(0, held_out, confidence=confidence)
    return _bound_from_rates(false_positive_rate=perfect, false_negative_rate=perfect, delta=delta)


def runs_to_refute(epsilon: float, *, delta: float, confidence: float = 0.95) -> int:
    """The fewest runs per side whose :func:`attainable_epsilon_bound` exceeds ``epsilon``.

    Below this an audit of an ε claim is vacuous: it passes whatever the mechanism does.

    Raises:
        ConfigError: If ``epsilon`` is not a finite number > 0.
    """
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"epsilon={epsilon!r}: must be finite and > 0")
    # Perfect separation with h held-out runs gives p = 1 − α^(1/h) on both sides and the
    # bound log((1 − δ − p) / p) > ε  <=>  p < (1 − δ) / (1 + e^ε).
    target = (1.0 - delta) / (1.0 + math.exp(epsilon))
    held_out = max(2, math.ceil(math.log(1.0 - confidence) / math.log1p(-target)) - 1)
    # The closed form can be off by one through float round-off: settle it on the real bound.
    while (
        attainable_epsilon_bound(max(4, 2 * held_out - 1), delta=delta, confidence=confidence)
        <= epsilon
    ):
        held_out += 1
    return max(4, 2 * held_out - 1)


def epsilon_lower_bound(
    scores_out: Sequence[float],
    scores_in: Sequence[float],
    *,
    delta: float,
    confidence: float = 0.95,
) -> tuple[float, float, float, float]:
    """Lower bound on ε from test scores of runs without (``out``) and with (``in``) the canary.

    The first half of each list picks the threshold (the one whose Clopper-Pearson bound on
    that half is largest); the second half bounds the error rates, so picking does not bias
    the bound.

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

    # Pick τ by the bound the held-out half would give if it behaved like the picking half:
    # Clopper-Pearson bounds at every candidate (the score counts as "canary in" when >= τ).
    # Point estimates would favour extreme thresholds whose few errors the held-out half
    # cannot confirm.
    from scipy.stats import beta

    scores = np.unique(np.concatenate([pick_out, pick_in]))
    # Midpoints between neighbouring scores: a threshold at the edge of one side's scores
    # would turn a held-out run just beyond that edge into an error.
    candidates = (scores[:-1] + scores[1:]) / 2 if len(scores) > 1 else scores
    false_pos = len(pick_out) - np.searchsorted(np.sort(pick_out), candidates, side="left")
    false_neg = np.searchsorted(np.sort(pick_in), candidates, side="left")
    fpr_up = np.where(
        false_pos < len(pick_out),
        beta.ppf(confidence, false_pos + 1, np.maximum(len(pick_out) - false_pos, 1)),
        1.0,
    )
    fnr_up = np.where(
        false_neg < len(pick_in),
        beta.ppf(confidence, false_neg + 1, np.maximum(len(pick_in) - false_neg, 1)),
        1.0,
    )
    point = np.log(np.maximum(1 - delta - fnr_up, 1e-300) / fpr_up)
    tau = float(candidates[int(np.argmax(point))])
    fpr = clopper_pearson_upper(int(np.sum(test_out >= tau)), len(test_out), confidence=confidence)
    fnr = clopper_pearson_upper(int(np.sum(test_in < tau)), len(test_in), confidence=confidence)
    bound = _bound_from_rates(false_positive_rate=fpr, false_negative_rate=fnr, delta=delta)
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


def simulate_release(
    holders: Sequence[tuple[np.ndarray, Sequence[str]]],
    *,
    manifest: TaskManifest,
    reference: np.ndarray,
    rng: np.random.Generator,
) -> DecodedRelease:
    """Run the release once, every holder a survivor, and decode it as the coordinator does.

    Every holder computes integer sums and adds its noise share; the field sum of all holders
    is stripped of the survivors' excess noise (exact sharing) and decoded (with central noise
    in central mode).
    """
    fields = []
    k = len(manifest.node_ids)
    schedule = noise_schedule(manifest.privacy, clients=k)
    revealed: dict[int, bytes] = {}
    for i, (features, labels) in enumerate(holders):
        sums = integer_class_sums(
            features, list(labels), manifest=manifest, reference=reference, rng=rng
        )
        seed = rng.bytes(SEED_BYTES) if schedule is not None else None
        fields.append(encode_contribution(sums, manifest=manifest, rng=rng, noise_seed=seed))
        shown = revealed_seed(seed, schedule, len(holders)) if schedule and seed else None
        if shown is not None:
            revealed[i] = shown
    total, _ = remove_excess_noise(
        field_sum(fields, bits=manifest.bits),
        revealed,
        privacy=manifest.privacy,
        clients=k,
        survivors=list(range(len(holders))),
        bits=manifest.bits,
    )
    return decode_release(
        total,
        manifest=manifest,
        survivors=len(holders),
        rng=rng,
        min_count=1e-9,
    )


def released_unit_rows(
    holders: Sequence[tuple[np.ndarray, Sequence[str]]],
    *,
    manifest: TaskManifest,
    reference: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Run the release once; return each class's released sum in the unit domain.

    The decoded mean vectors of :func:`simulate_release` multiplied back by their noisy counts.

    Returns:
        (C, L*H + 1) float64: per class, the unit-clipped layer sums and the count coordinate
        (γ times the noisy count), as the records entered it.
    """
    decoded = simulate_release(holders, manifest=manifest, reference=reference, rng=rng)
    return unit_rows(decoded.vectors, decoded.counts, manifest=manifest)


def unit_rows(vectors: np.ndarray, counts: np.ndarray, *, manifest: TaskManifest) -> np.ndarray:
    """Invert the decoder: (C, L, H) mean vectors and noisy counts back to class sums.

    Returns:
        (C, L*H + 1) float64 in the unit domain: each layer's vector times its noisy count
        over the layer's clip norm, and the count coordinate γ times the noisy count.
    """
    clip = np.asarray(manifest.clip_norms, dtype=np.float64)[None, :, None]
    n = np.asarray(counts, dtype=np.float64)
    unit_sums = np.asarray(vectors, dtype=np.float64) / clip * n[:, None, None]  # (C, L, H)
    rows: np.ndarray = np.concatenate(
        [unit_sums.reshape(len(n), -1), manifest.count_weight * n[:, None]], axis=1
    )
    return rows


def canary_unit_row(
    manifest: TaskManifest, reference: np.ndarray, canary: np.ndarray, label_index: int
) -> np.ndarray:
    """The canary's own row in the unit domain: its clipped layers and the count weight γ.

    Returns:
        (L*H + 1,) float64; projecting a released class row on it is the likelihood-ratio test
        between "canary in" and "canary out" under spherical noise.
    """
    clip = np.asarray(manifest.clip_norms, dtype=np.float64)
    diff = canary[0].astype(np.float64) - reference[label_index]
    unit = clip_to_unit(diff[None], clip)[0]  # (L, H)
    return np.concatenate([unit.reshape(-1), [manifest.count_weight]])


def release_statistic(
    holders: Sequence[tuple[np.ndarray, Sequence[str]]],
    *,
    manifest: TaskManifest,
    reference: np.ndarray,
    canary: np.ndarray,
    label_index: int,
    rng: np.random.Generator,
) -> float:
    """Run the release once and project the released class sum onto the canary's record."""
    rows = released_unit_rows(holders, manifest=manifest, reference=reference, rng=rng)
    return float(rows[label_index] @ canary_unit_row(manifest, reference, canary, label_index))


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
    :func:`epsilon_lower_bound`. Every holder in ``holders`` survives: pass exactly t holders
    to audit a distributed release at the noise its guarantee is calibrated for (more
    survivors add more noise), and the canary's holder alone to audit a local release.
    The result carries :func:`attainable_epsilon_bound`, so a reader sees whether the audit
    could have refuted the claim at all.
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
        attainable_bound=attainable_epsilon_bound(
            runs, delta=manifest.privacy.delta, confidence=confidence
        ),
        runs=runs,
        threshold=tau,
        false_positive_rate=fpr,
        false_negative_rate=fnr,
        confidence=confidence,
    )


def audit_mechanism(
    manifest: TaskManifest,
    reference: np.ndarray,
    *,
    runs: int,
    seed: int,
    survivors: int,
    records_per_class: int = 8,
    confidence: float = 0.95,
) -> AuditResult:
    """Audit the release arithmetic itself, with one run per class of every release.

    The records are synthetic (the mechanism's guarantee does not depend on them): the same
    ``records_per_class`` records (relative to the reference) in every class of the first
    holder's data, and in the
    "in" world one canary per class (:func:`canary_features`, the same worst-case direction
    in every class). Every class row is released by its own mechanism on disjoint records
    (parallel composition, the manifest's ε is the ε of one class), so one call of the real
    release code (integer sums, rounding, noise shares, field sum, range check, decoding,
    central noise) yields one independent run per class; a manifest with many labels makes
    the tens of thousands of runs a meaningful audit needs cheap.

    Args:
        manifest: The task to audit, as a holder would receive it.
        reference: (C, L, H) the manifest's public reference.
        runs: Runs per side (released class rows with and without the canary), >= 4.
        seed: Seed of the audit's generator (features, rounding and noise).
        survivors: Holders whose noise shares reach the sum: t to audit a distributed
            release at the noise its guarantee is calibrated for, 1 to audit one holder's own
            contribution in local mode (what a coordinator that unmasks it sees).
        records_per_class: Records per class besides the canary (keep the noisy count > 0).
        confidence: One-sided confidence of the Clopper-Pearson bounds.

    Returns:
        The audit, with the attainable bound of ``runs``.

    Raises:
        ConfigError: On runs < 4, survivors outside 1..K, or records_per_class < 1.
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 4:
        raise ConfigError(f"runs={runs!r}: the audit needs at least 4 runs per side")
    k = len(manifest.node_ids)
    if isinstance(survivors, bool) or not isinstance(survivors, int) or not 1 <= survivors <= k:
        raise ConfigError(f"survivors={survivors!r}: must be an integer in 1..K={k}")
    if records_per_class < 1:
        raise ConfigError(f"records_per_class={records_per_class}: must be >= 1")
    rng = np.random.default_rng(seed)
    n_classes, n_layers, hidden = len(manifest.labels), len(manifest.layers), manifest.hidden_size
    clip = np.asarray(manifest.clip_norms, dtype=np.float64)[None, :, None]
    labels = [label for label in manifest.labels for _ in range(records_per_class)]
    # The same records (relative to the class reference) in every class, so that every class
    # row is a run of one and the same release: only the mechanism's randomness differs.
    offsets = 0.5 * clip * rng.normal(size=(records_per_class, n_layers, hidden))
    base = (reference[:, None] + offsets[None]).reshape(len(labels), n_layers, hidden)
    canaries = np.concatenate(
        [canary_features(manifest, reference, c) for c in range(n_classes)]
    )  # (C, L, H)
    canary_rows = np.stack(
        [canary_unit_row(manifest, reference, canaries[c : c + 1], c) for c in range(n_classes)]
    )  # (C, L*H + 1)
    empty: tuple[np.ndarray, list[str]] = (np.zeros((0, n_layers, hidden), dtype=np.float32), [])
    worlds = {
        "out": [(base.astype(np.float32), labels)],
        "in": [
            (
                np.concatenate([base, canaries]).astype(np.float32),
                [*labels, *manifest.labels],
            )
        ],
    }
    scores: dict[str, list[float]] = {"out": [], "in": []}
    for name, first in worlds.items():
        holders = [*first, *[empty] * (survivors - 1)]
        while len(scores[name]) < runs:
            rows = released_unit_rows(holders, manifest=manifest, reference=reference, rng=rng)
            scores[name].extend(np.sum(rows * canary_rows, axis=1).tolist())
    bound, tau, fpr, fnr = epsilon_lower_bound(
        scores["out"][:runs],
        scores["in"][:runs],
        delta=manifest.privacy.delta,
        confidence=confidence,
    )
    return AuditResult(
        epsilon_lower_bound=bound,
        claimed_epsilon=manifest.privacy.epsilon,
        attainable_bound=attainable_epsilon_bound(
            runs, delta=manifest.privacy.delta, confidence=confidence
        ),
        runs=runs,
        threshold=tau,
        false_positive_rate=fpr,
        false_negative_rate=fnr,
        confidence=confidence,
    )
