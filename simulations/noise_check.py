"""Realized noise of a simulated release: is the noise in it the noise its report states?

In a simulation the curator holds every record, so the noise-free class sums are known and the
noise actually present in a release can be measured: per class, the released sum (the decoded
mean vector times its noisy count, back in the scaled integer domain) minus the sum of the same
records clipped, scaled and rounded as the holders do. Under the stated per-coordinate variance
``s2`` the mean square of those differences over all ``C * (L * H + 1)`` coordinates is
``s2 * chi2(N) / N`` (Skellam and Gaussian noise alike at these variances), so a ratio to
``s2`` outside the chi-square band fails:

* **less noise than stated** is a privacy failure: the release claims a guarantee its noise does
  not give (a share skipped, a component removed twice, a calibration too small);
* **more noise than stated** makes the release's own signal-to-noise figures wrong, so the
  steering strength chosen from them (:mod:`fedsynth.server.snr`) takes noise for signal; it
  happens when holders and coordinator disagree on the noise schedule (e.g. code that changed
  under a running study, so that one side removed components the other never added).

The rounding of each record is randomized, so the holders' rounding and the check's differ by at
most ``n_c / 2`` in variance per coordinate of class c; the upper end of the band allows for it
(the lower end does not need to: rounding only adds). With C = 2, L = 4, H = 640 the band is
about 1 ± 0.07 at the default level, so a release carrying half or twice its stated noise is
never missed. A release without noise (ε = ∞), or whose noisy count of a class fell to the
decoder's floor (the vector no longer equals sum / count), is not checked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2

from fedsynth.protocol.contribution import integer_class_sums
from fedsynth.server.release import Release
from fedsynth.server.snr import noise_variance_present
from fedsynth.simulations.audit import unit_rows

DEFAULT_CHECK_LEVEL = 1e-4  # chance that a release with exactly its stated noise fails


@dataclass(frozen=True)
class NoiseCheck:
    """Realized noise of one release against the variance its report states.

    Attributes:
        ratio: Mean square of the realized noise over the stated per-coordinate variance.
        low: Smallest ratio a release with its stated noise shows, but with chance level/2.
        high: Largest such ratio (rounding slack included).
        coordinates: How many coordinates the ratio averages over.
        stated_variance: The stated per-coordinate variance (scaled integer domain).
    """

    ratio: float
    low: float
    high: float
    coordinates: int
    stated_variance: float

    @property
    def ok(self) -> bool:
        """Whether the realized noise is within the band of the stated variance."""
        return self.low <= self.ratio <= self.high

    @property
    def verdict(self) -> str:
        """``ok``, ``less noise than stated`` or ``more noise than stated``."""
        if self.ratio < self.low:
            return "less noise than stated"
        if self.ratio > self.high:
            return "more noise than stated"
        return "ok"

    def describe(self) -> str:
        """One line: the ratio, its band and the verdict."""
        return (
            f"realized noise {self.ratio:.3f}x the stated variance (band {self.low:.3f}-"
            f"{self.high:.3f} over {self.coordinates} coordinates): {self.verdict}"
        )


def released_scaled_sums(release: Release) -> np.ndarray:
    """The release's class sums back in the scaled integer domain, (C, L*H + 1) float64.

    Inverts the decoder: each vector coordinate times its noisy count over the layer's clip
    norm, times the scale; the count coordinate is the noisy count times γ and the scale.
    """
    result: np.ndarray = (
        unit_rows(release.vectors, release.counts, manifest=release.manifest)
        * release.manifest.scale
    )
    return result


def realized_noise(
    release: Release,
    features: np.ndarray,
    labels: Sequence[str],
    *,
    reference: np.ndarray,
    level: float = DEFAULT_CHECK_LEVEL,
    seed: int = 0,
    min_count: float = 1.0,
) -> NoiseCheck | None:
    """Measure the noise in ``release`` against the records it was computed from.

    Args:
        release: A dataset-vector release.
        features: (n, L, H) features of every record in the release (every survivor's).
        labels: Their n labels.
        reference: (C, L, H) the public per-class reference the holders subtracted.
        level: Chance that a release with exactly its stated noise is outside the band.
        seed: Seed of the check's own randomized rounding.
        min_count: The decoder's floor on a noisy count; a class at or below it is skipped.

    Returns:
        The check, or None where it cannot be made (no noise, or no class above the floor).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level}: must be in (0, 1)")
    variance, _ = noise_variance_present(release)
    if variance <= 0.0:
        return None
    manifest = release.manifest
    true_sums = integer_class_sums(
        features,
        list(labels),
        manifest=manifest,
        reference=reference,
        rng=np.random.default_rng(seed),
    ).astype(np.float64)
    counts = np.asarray(release.counts, dtype=np.float64)
    keep = counts > min_count
    if not keep.any():
        return None
    diff = released_scaled_sums(release)[keep] - true_sums[keep]
    n = int(diff.size)
    ratio = float(np.mean(diff**2) / variance)
    per_class = np.bincount(
        [manifest.labels.index(label) for label in labels], minlength=len(manifest.labels)
    )
    slack = 1.0 + float(per_class[keep].max()) / (2.0 * variance)
    low = float(chi2.ppf(level / 2.0, n) / n)
    high = float(chi2.ppf(1.0 - level / 2.0, n) / n) * slack
    if not (math.isfinite(ratio) and math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"release {release.release_id}: the noise check is not finite")
    return NoiseCheck(ratio=ratio, low=low, high=high, coordinates=n, stated_variance=variance)
