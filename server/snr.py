"""Steering strength from a release's own signal-to-noise ratio (post-processing, no privacy cost).

A class vector from a release is the noise-free mean difference plus Gaussian-like noise whose
variance the release states publicly. Where the noise dominates, steering with the vector pushes
the model in a random direction and makes its text worse than the unsteered prior. This module
estimates, per class and injection layer, how much of the vector actually added during
generation is signal, and turns that into a factor in [0, 1] that multiplies the user's
strength: 0 where the vector is indistinguishable from noise (generation is then exactly the
prior's), 1 for a noiseless release.

Everything used is public and part of the release: the manifest's noise variance (or the larger
variance the privacy report says is actually present), the scale, the clip norms, the released
noisy counts and the released vectors. Nothing private is read, so the rule is post-processing
of a differentially private release and costs no privacy.

Noise model (scaled integer domain, per coordinate, add/remove adjacency; EPSVec arXiv
2602.21218 with distributed Skellam noise, Agarwal, Kairouz, Liu 2021): the secure sum of class c
carries noise of variance ``sigma2`` per coordinate (Skellam shares in distributed/local mode,
Gaussian added by the coordinator in central mode). Decoding divides by ``scale`` and by the
noisy count ``n_c`` and multiplies layer l by its clip norm ``m_l``, so each coordinate of the
released vector at layer l carries noise of standard deviation::

    sd[c, l] = m_l * sqrt(sigma2) / (scale * n_c)

The released count ``n_c`` is itself noisy, but it is the number the vector was divided by, so
the formula is exact given it; its noise only rescales the vector and leaves the steering
direction (which is normalized) unchanged. The randomized rounding of each record (variance
below 1/4 per record and coordinate in the scaled domain, i.e. 1/(4 scale^2) per unit) is not
noise added for privacy and is orders of magnitude below ``sigma2``; it is left out so that a
noiseless release keeps its full strength.

The rule (per class and layer): with ``d`` the direction actually added at layer l (the class
vector, or its contrast with the class mean, see :func:`direction_weights`), ``H`` its
dimension, ``s^2`` its per-coordinate noise variance and ``U`` the upper ``1 - level`` quantile
of the noise energy (``s^2`` times the chi-square quantile with ``H`` degrees of freedom)::

    factor = sqrt(max(0, 1 - U / ||d||^2))

``1 - E[noise energy] / ||d||^2`` is the positive-part James-Stein factor; it estimates the
share of the observed energy that is signal, which is the squared cosine between ``d`` and the
noise-free direction. The engine adds the *unit* direction times the strength, so the expected
squared distance between what is added and what the noise-free release would add,
``strength^2 (f^2 - 2 f cos + 1)``, is smallest at ``f = cos``: hence the square root. Using the
upper quantile ``U`` instead of the mean makes the rule conservative (shrinking more is the safe
side): a vector of pure noise gets factor exactly 0 except with probability ``level``, where the
plain James-Stein factor would leave it a small positive strength half the time.

Steer only where the signal dominates (``min_signal_share``, default 1/2): ``factor^2`` estimates
the share of the direction's energy that is signal, and below one half the unit direction added
is more noise than signal. The square-distance argument above treats a step along the noise like
a step along the signal, but the model does not: measured on the comparison study's releases
(Gemma 3 270M, Rotten Tomatoes), every release at ε = 1 had factors 0.46–0.72 and its samples
drifted off the task's domain (MAUVE 0.04–0.19 against the prior's 0.13 and 0.35), while every
release at ε = 4 had 0.92–0.97 and kept it. Such a layer gets factor 0, so a release that is
mostly noise everywhere generates the prior; ``min_signal_share = 0`` restores the plain rule.

Why per class and layer, not per class: each layer receives its own addition (its own unit
direction times ``strength * r_l``), the layers carry independent noise of different size
(``m_l`` differs) and different signal, so a layer whose direction is noise is switched off
without giving up the layers that carry the class signal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import chi2

from fedsynth.protocol.errors import ConfigError, NonPositiveCountError
from fedsynth.protocol.manifest import json_float
from fedsynth.server.public_basis import PublicBasis
from fedsynth.server.release import Release, check_contrast

DEFAULT_LEVEL = 1e-3  # chance that a pure-noise layer keeps a non-zero strength
DEFAULT_MIN_SIGNAL_SHARE = 0.5  # below it (factor^2, the signal's share) a layer is off


@dataclass(frozen=True)
class LayerSnr:
    """Signal-to-noise figures of one class's steering direction at one injection layer.

    Attributes:
        layer: The injection layer.
        noise_sd: Noise standard deviation of each coordinate of the added direction.
        noise_energy: Expected squared norm of that noise, ``H * noise_sd**2``.
        observed_energy: Squared norm of the released direction.
        snr: Estimated signal energy over noise energy,
            ``max(0, observed - noise) / noise`` (``inf`` without noise).
        factor: The shrink factor in [0, 1] that multiplies the user's strength.
        rank: With a public basis, the number of its directions the added direction is
            projected onto; None where the whole direction is kept (no basis, or the full
            direction was estimated to be closer to the noise-free one).
    """

    layer: int
    noise_sd: float
    noise_energy: float
    observed_energy: float
    snr: float
    factor: float
    rank: int | None = None


@dataclass(frozen=True)
class ClassSnr:
    """Signal-to-noise figures of one class, one entry per injection layer."""

    label: str
    count: float
    layers: tuple[LayerSnr, ...]

    @property
    def factors(self) -> dict[int, float]:
        """Shrink factor per injection layer."""
        return {entry.layer: entry.factor for entry in self.layers}

    @property
    def factor(self) -> float:
        """Mean shrink factor over the layers (one number for a summary)."""
        return float(np.mean([entry.factor for entry in self.layers]))


@dataclass(frozen=True)
class SteeringSnr:
    """Per-class signal-to-noise ratios of a release and the shrink factors they imply."""

    release_id: str
    noise_variance_scaled: float
    variance_source: str
    contrast: float
    level: float
    classes: tuple[ClassSnr, ...]
    basis: PublicBasis | None = field(default=None, compare=False, repr=False)
    min_signal_share: float = 0.0

    def of(self, label: str) -> ClassSnr:
        """The figures of ``label``."""
        for entry in self.classes:
            if entry.label == label:
                return entry
        raise ConfigError(
            f"label={label!r} is not in this release's {[c.label for c in self.classes]}"
        )

    def directions(self, release: Release, label: str) -> dict[int, torch.Tensor]:
        """``label``'s directions as generation adds them: projected where a rank was chosen."""
        if release.release_id != self.release_id:
            raise ConfigError(
                f"these figures are for release {self.release_id!r}, not {release.release_id!r}"
            )
        directions = release.directions(label, contrast=self.contrast)
        entry = self.of(label)
        for item in entry.layers:
            if item.rank is None or self.basis is None:
                continue
            raw = directions[item.layer]
            projected = self.basis.project(item.layer, raw.double().numpy(), item.rank)
            directions[item.layer] = torch.from_numpy(projected).to(raw.dtype)
        return directions

    def to_dict(self, *, strength: float, applied: bool = True) -> dict[str, Any]:
        """JSON-ready report: the rule, the noise used, and per class the SNR and strength.

        Args:
            strength: The user's strength, to state the effective strength per layer.
            applied: Whether generation used the factors (False: the opt-out was taken and the
                effective strength is the user's).
        """
        classes: dict[str, Any] = {}
        for entry in self.classes:
            layers = {}
            for item in entry.layers:
                used = item.factor if applied else 1.0
                layers[str(item.layer)] = {
                    "noise_sd": item.noise_sd,
                    "noise_energy": item.noise_energy,
                    "observed_energy": item.observed_energy,
                    "snr": json_float(item.snr),
                    "factor": item.factor,
                    "projected_rank": item.rank,
                    "effective_strength": strength * used,
                }
            mean_used = entry.factor if applied else 1.0
            classes[entry.label] = {
                "count": entry.count,
                "snr": json_float(_class_snr(entry)),
                "factor": entry.factor,
                "effective_strength": strength * mean_used,
                "layers": layers,
            }
        return {
            "rule": "per class and layer: strength * sqrt(max(0, 1 - U / ||d||^2)), U the "
            f"{1 - self.level:g} quantile of the noise energy of the added direction d"
            + (
                ""
                if self.basis is None
                else "; or d projected onto the top k directions of the public basis "
                "(projected_rank k) where that estimate of the cosine with the noise-free "
                "direction is larger"
            )
            + (
                f"; 0 where factor^2 (the signal's estimated share of d) is below "
                f"{self.min_signal_share:g}"
                if self.min_signal_share > 0.0
                else ""
            ),
            "applied": applied,
            "min_signal_share": self.min_signal_share,
            "strength": strength,
            "contrast": self.contrast,
            "level": self.level,
            "noise_variance_scaled": self.noise_variance_scaled,
            "variance_source": self.variance_source,
            "public_basis": None if self.basis is None else self.basis.source,
            "classes": classes,
        }


def _class_snr(entry: ClassSnr) -> float:
    """Signal over noise energy summed over the layers (one number per class)."""
    noise = sum(item.noise_energy for item in entry.layers)
    observed = sum(item.observed_energy for item in entry.layers)
    if noise == 0.0:
        return math.inf
    return max(0.0, observed - noise) / noise


def check_release_counts(release: Release) -> None:
    """Refuse a release whose noisy count of some class is zero, negative or not finite.

    The vectors were divided by these counts; a count <= 0 means the file was not decoded by
    fedsynth (which floors counts at 1) or was altered, and its vectors cannot be weighed.

    Raises:
        NonPositiveCountError: naming the class, the count found and the limit (> 0).
    """
    counts = np.asarray(release.counts, dtype=np.float64).reshape(-1)
    if counts.shape != (len(release.labels),):
        raise ConfigError(
            f"release {release.release_id}: counts shape {counts.shape} != "
            f"({len(release.labels)},) labels"
        )
    for label, count in zip(release.labels, counts, strict=True):
        if not (math.isfinite(count) and count > 0):
            raise NonPositiveCountError(
                f"release {release.release_id}: noisy count of class {label!r} is {count:g}; "
                "it must be a finite number > 0 to weigh the class vector (nothing generated)"
            )


def noise_variance_present(release: Release) -> tuple[float, str]:
    """Per-coordinate noise variance of each class sum (scaled domain) and where it comes from.

    The manifest states the target variance; in distributed mode with more than ``t``
    survivors, and in local mode, more noise is present, as the privacy report states. The
    larger of the two is used: overstating the noise only shrinks more.
    """
    target = float(release.manifest.privacy.total_variance)
    noise = release.report.get("noise") if isinstance(release.report, dict) else None
    stated = noise.get("aggregate_variance_actual_scaled") if isinstance(noise, dict) else None
    if (
        isinstance(stated, int | float)
        and not isinstance(stated, bool)
        and math.isfinite(stated)
        and stated > target
    ):
        return float(stated), "actual (privacy report)"
    return target, "target (manifest)"


def coordinate_noise_sd(release: Release, *, variance: float | None = None) -> np.ndarray:
    """Noise standard deviation of each coordinate of each released class vector, per layer.

    ``sd[c, l] = clip_l * sqrt(variance) / (scale * count_c)`` (see the module docstring).

    Args:
        variance: Per-coordinate variance of the class sums in the scaled domain (default:
            :func:`noise_variance_present`).

    Returns:
        (C, L) float64.

    Raises:
        NonPositiveCountError: if a class's noisy count is <= 0.
    """
    check_release_counts(release)
    if variance is None:
        variance, _ = noise_variance_present(release)
    manifest = release.manifest
    counts = np.asarray(release.counts, dtype=np.float64).reshape(-1)
    clip = np.asarray(manifest.clip_norms, dtype=np.float64)
    result: np.ndarray = clip[None, :] * math.sqrt(variance) / (manifest.scale * counts[:, None])
    return result


def direction_weights(n_classes: int, index: int, *, contrast: float) -> np.ndarray:
    """Weights ``w`` with ``direction = sum_k w_k v_k``, as :meth:`Release.directions` forms it.

    ``mean + contrast * (v_c - mean)`` weighs class c by ``contrast + (1 - contrast) / C`` and
    every other class by ``(1 - contrast) / C``. The classes' noises are independent (disjoint
    coordinates of the secure sum), so the direction's noise variance is
    ``sum_k w_k^2 sd_k^2``.
    """
    weights = np.full(n_classes, (1.0 - contrast) / n_classes)
    weights[index] += contrast
    return weights


def shrink_factor(
    observed_energy: float, *, noise_sd: float, dim: int, level: float = DEFAULT_LEVEL
) -> float:
    """``sqrt(max(0, 1 - U / observed))`` with ``U = noise_sd^2 * chi2.ppf(1 - level, dim)``.

    1 without noise; 0 for a zero vector with noise.
    """
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level={level}: must be in (0, 1)")
    if noise_sd == 0.0:
        return 1.0
    if observed_energy <= 0.0:
        return 0.0
    upper = noise_sd**2 * float(chi2.ppf(1.0 - level, dim))
    return math.sqrt(max(0.0, 1.0 - upper / observed_energy))


PROJECTION_RANKS = (8, 16, 32, 64)
"""Ranks of the public basis the rule tries per class and layer (up to the basis's rank)."""


def projected_factor(
    direction: np.ndarray, *, basis: np.ndarray, noise_sd: float, level: float = DEFAULT_LEVEL
) -> float:
    """Conservative cosine between ``direction`` projected onto ``basis`` and the noise-free one.

    ``basis`` (k, H) has orthonormal rows fixed before the noise was drawn (public data), so
    the noise inside it has energy ``k * noise_sd**2`` and outside ``(H - k) * noise_sd**2``.
    The factor is the product of two estimates: how well the projected direction points along
    the signal's projection (:func:`shrink_factor` in k dimensions, upper quantile), and the
    square root of the share of the signal's energy that lies inside the basis (observed minus
    expected noise energy, inside over inside plus outside). Without noise it is the cosine
    between the projection and the direction itself.
    """
    rows, hidden = basis.shape
    vector = np.asarray(direction, dtype=np.float64)
    total = float(vector @ vector)
    coefficients = basis @ vector
    inside = float(coefficients @ coefficients)
    if total <= 0.0 or inside <= 0.0:
        return 0.0
    if noise_sd == 0.0:
        return math.sqrt(min(1.0, inside / total))
    within = shrink_factor(inside, noise_sd=noise_sd, dim=rows, level=level)
    signal_in = max(0.0, inside - rows * noise_sd**2)
    signal_out = max(0.0, total - inside - (hidden - rows) * noise_sd**2)
    if signal_in + signal_out == 0.0:
        return 0.0
    return within * math.sqrt(signal_in / (signal_in + signal_out))


def steering_snr(
    release: Release,
    *,
    contrast: float = 1.0,
    level: float = DEFAULT_LEVEL,
    basis: PublicBasis | None = None,
    min_signal_share: float = DEFAULT_MIN_SIGNAL_SHARE,
) -> SteeringSnr:
    """Per class and layer: noise sd, noise energy, observed energy, SNR and shrink factor.

    Applied to what generation actually adds: :meth:`Release.directions` with ``contrast``.
    With a public ``basis`` (:mod:`fedsynth.server.public_basis`), each class and layer also
    tries the projection of its direction onto the top 8, 16, 32 and 64 directions of the
    basis and keeps whichever of those and the whole direction has the largest factor (the
    conservative estimate of its cosine with the noise-free direction). A layer whose factor
    squared is below ``min_signal_share`` gets 0 (the module's docstring says why). Pure
    post-processing of public release content and public text.

    Raises:
        NonPositiveCountError: if a class's noisy count is <= 0 (before anything is computed).
        ConfigError: if a class vector is not finite, ``level`` is outside (0, 1) or
            ``min_signal_share`` outside [0, 1].
    """
    check_contrast(contrast)
    check_min_signal_share(min_signal_share)
    variance, source = noise_variance_present(release)
    sd = coordinate_noise_sd(release, variance=variance)  # (C, L)
    manifest = release.manifest
    if basis is not None:
        basis.check_fits(manifest)
    hidden = manifest.hidden_size
    n_classes = len(release.labels)
    classes = []
    for c, label in enumerate(release.labels):
        weights = direction_weights(n_classes, c, contrast=contrast)
        direction_sd = np.sqrt((weights[:, None] ** 2 * sd**2).sum(axis=0))  # (L,)
        directions = release.directions(label, contrast=contrast)
        entries = []
        for j, layer in enumerate(manifest.layers):
            vector = directions[layer].double().numpy()
            observed = float(np.dot(vector, vector))
            if not math.isfinite(observed):
                raise ConfigError(
                    f"release {release.release_id}: vector of class {label!r} at layer {layer} "
                    "is not finite"
                )
            noise_sd = float(direction_sd[j])
            noise_energy = hidden * noise_sd**2
            snr = (
                math.inf
                if noise_energy == 0.0
                else max(0.0, observed - noise_energy) / noise_energy
            )
            factor = shrink_factor(observed, noise_sd=noise_sd, dim=hidden, level=level)
            rank: int | None = None
            if basis is not None:
                for k in (k for k in PROJECTION_RANKS if k <= basis.rank):
                    projected = projected_factor(
                        vector, basis=basis.of(layer, k), noise_sd=noise_sd, level=level
                    )
                    if projected > factor:
                        factor, rank = projected, k
            if factor**2 < min_signal_share:
                factor, rank = 0.0, None
            entries.append(
                LayerSnr(
                    layer=layer,
                    noise_sd=noise_sd,
                    noise_energy=noise_energy,
                    observed_energy=observed,
                    snr=snr,
                    factor=factor,
                    rank=rank,
                )
            )
        classes.append(ClassSnr(label=label, count=float(release.counts[c]), layers=tuple(entries)))
    return SteeringSnr(
        release_id=release.release_id,
        noise_variance_scaled=variance,
        variance_source=source,
        contrast=contrast,
        level=level,
        classes=tuple(classes),
        basis=basis,
        min_signal_share=float(min_signal_share),
    )


@dataclass(frozen=True)
class ClassPart:
    """How far a class stands apart from the mean of the classes, and how clearly.

    Attributes:
        label: The class.
        share: The class part's length over the mean's, ``||v_c - mean|| / ||mean||`` per
            layer with each energy's expected noise taken off (0 where nothing is left),
            averaged over the layers: what ``contrast`` multiplies, against what it keeps.
        snr: The class part's signal energy over its noise energy, summed over the layers
            (``inf`` without noise).
    """

    label: str
    share: float
    snr: float


def class_parts(release: Release) -> tuple[ClassPart, ...]:
    """Per class the share and SNR of its class part (post-processing of the public release).

    The class part ``v_c - mean`` weighs the classes by ``direction_weights(contrast=1) -
    direction_weights(contrast=0)`` and the mean by ``1 / C`` each, so their noise energies
    follow from :func:`coordinate_noise_sd` as in :func:`steering_snr`.

    Raises:
        NonPositiveCountError: if a class's noisy count is <= 0.
    """
    sd = coordinate_noise_sd(release)  # (C, L)
    hidden = release.manifest.hidden_size
    n_classes = len(release.labels)
    mean_weights = direction_weights(n_classes, 0, contrast=0.0)
    mean_noise = hidden * (mean_weights[:, None] ** 2 * sd**2).sum(axis=0)  # (L,)
    means = release.directions(release.labels[0], contrast=0.0)
    parts = []
    for c, label in enumerate(release.labels):
        weights = direction_weights(n_classes, c, contrast=1.0) - mean_weights
        part_noise = hidden * (weights[:, None] ** 2 * sd**2).sum(axis=0)  # (L,)
        vectors = release.directions(label, contrast=1.0)
        shares, signal, noise = [], 0.0, 0.0
        for j, layer in enumerate(release.manifest.layers):
            part = (vectors[layer] - means[layer]).double().numpy()
            mean = means[layer].double().numpy()
            part_energy = max(0.0, float(part @ part) - float(part_noise[j]))
            mean_energy = max(0.0, float(mean @ mean) - float(mean_noise[j]))
            shares.append(math.sqrt(part_energy / mean_energy) if mean_energy > 0 else 0.0)
            signal += part_energy
            noise += float(part_noise[j])
        snr = math.inf if noise == 0.0 else signal / noise
        parts.append(ClassPart(label=label, share=float(np.mean(shares)), snr=snr))
    return tuple(parts)


def check_min_signal_share(value: float) -> float:
    """``value`` if it is a number in [0, 1], else a ConfigError naming it."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0.0 <= value <= 1.0
    ):
        raise ConfigError(f"min_signal_share={value!r}: must be a number in [0, 1]")
    return float(value)


def steering_lines(report: dict[str, Any]) -> list[str]:
    """Plain lines for a terminal: per class the count, SNR, factor and effective strength.

    Args:
        report: :meth:`SteeringSnr.to_dict` output.
    """
    applied = "applied" if report["applied"] else "not applied: opted out"
    cut = report.get("min_signal_share", 0.0)
    if report["applied"] and cut > 0.0:
        applied += f"; off where the signal share is below {cut:g}"
    lines = [
        f"steering strength {report['strength']:g} x SNR shrink ({applied}), noise variance "
        f"{report['noise_variance_scaled']:.6g} ({report['variance_source']})"
    ]
    for label, entry in report["classes"].items():
        per_layer = ", ".join(
            f"L{layer}: snr {_fmt(item['snr'])} -> {item['effective_strength']:.4g}"
            + (
                f" on {item['projected_rank']} public directions"
                if item.get("projected_rank")
                else ""
            )
            for layer, item in entry["layers"].items()
        )
        lines.append(
            f"  {label}: count {entry['count']:.1f}, snr {_fmt(entry['snr'])}, factor "
            f"{entry['factor']:.3f}, effective strength {entry['effective_strength']:.4g} "
            f"({per_layer})"
        )
    return lines


def _fmt(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.3g}"
