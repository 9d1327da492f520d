"""Noise samplers for the secure-sum releases, and how the noise is split among clients.

Everything here is pure: randomness comes only from an explicitly passed
``np.random.Generator``. Production callers seed it from ``secrets``/``os.urandom``; tests pass a
fixed seed. Note that numpy's PCG64 is not a cryptographically secure generator and its
samplers are neither exact nor constant-time; treat the seed as a secret and never reuse it.

Mechanism implemented: the (distributed) Skellam mechanism of Agarwal, Kairouz and Liu,
"The Skellam Mechanism for Differentially Private Federated Learning", NeurIPS 2021
(arXiv 2110.04995). A symmetric Skellam variable Sk(mu, mu) = Pois(mu) - Pois(mu) has variance
2*mu, and independent Skellams add up to a Skellam whose variance is the sum of the variances,
so each client can add a share and the secure sum carries the full noise.

Privacy (add/remove one record): the noise variance is calibrated in
:mod:`fedsynth.protocol.accounting` from the L1 and L2 sensitivities of one record's rounded,
scaled integer contribution to the aggregate; this module only samples.
"""

from __future__ import annotations

import math
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from fedsynth.protocol.errors import ConfigError

__all__ = [
    "MAX_SKELLAM_VARIANCE",
    "TrustMode",
    "client_noise_variance",
    "gaussian_noise",
    "share_variance",
    "skellam_noise",
    "trust_statement",
]

# numpy's Poisson sampler refuses rates above about int64 max - 10*sqrt(int64 max).
_MAX_POISSON_RATE = float(np.iinfo(np.int64).max) - 10.0 * math.sqrt(float(np.iinfo(np.int64).max))
MAX_SKELLAM_VARIANCE = 2.0 * _MAX_POISSON_RATE
"""The largest Skellam variance :func:`skellam_noise` can draw (two Poisson draws of half of
it): a task whose noise share is larger is refused at setup, before any budget is charged."""


class TrustMode(StrEnum):
    """Who adds the noise, and therefore whom the guarantee protects against."""

    DISTRIBUTED = "distributed"
    """Each client adds a Skellam share; any t surviving shares sum to the full noise."""
    CENTRAL = "central"
    """Clients add no noise; the trusted coordinator adds Gaussian noise after decoding."""
    LOCAL = "local"
    """Each client adds the full Skellam noise to its own sum (no trust in anyone)."""


_TRUST_STATEMENTS = {
    TrustMode.DISTRIBUTED: (
        "no trusted party: each holder adds its own noise share, checked against its own "
        "accountant, and the coordinator sees only the noisy sum of at least t survivors"
    ),
    TrustMode.CENTRAL: (
        "trusted coordinator: the holders add no noise and cannot see whether the coordinator "
        "adds the stated Gaussian noise; the secure sum still hides each holder's input"
    ),
    TrustMode.LOCAL: "no trusted party: each holder fully sanitizes its own contribution",
}


def trust_statement(mode: TrustMode | str) -> str:
    """One plain sentence, for reports, on whom a release in ``mode`` asks holders to trust."""
    try:
        return _TRUST_STATEMENTS[TrustMode(mode)]
    except ValueError:
        raise ConfigError(f"mode={mode!r} must be one of {[m.value for m in TrustMode]}") from None


def _check_variance(name: str, value: float) -> float:
    """Return ``value`` as a float if it is a finite non-negative number, else raise."""
    v = float(value)
    if not math.isfinite(v) or v < 0.0:
        raise ConfigError(f"{name}={value!r} must be a finite number >= 0")
    return v


def _check_threshold(threshold: int) -> int:
    """Return ``threshold`` if it is an integer >= 1, else raise."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | np.integer):
        raise ConfigError(f"threshold={threshold!r} must be an integer >= 1")
    if threshold < 1:
        raise ConfigError(f"threshold={threshold} must be >= 1")
    return int(threshold)


def skellam_noise(
    shape: int | tuple[int, ...], *, variance: float, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """Sample symmetric Skellam noise Sk(mu, mu) = Pois(mu) - Pois(mu) with mu = variance / 2.

    Implements the noise of the Skellam mechanism (Agarwal, Kairouz, Liu 2021, arXiv
    2110.04995). Privacy: adding Skellam noise of aggregate variance ``v`` to a sum of
    scaled, randomly rounded integer vectors gives the RDP bound of
    :func:`fedsynth.protocol.accounting.skellam_rdp` for add/remove adjacency of one record,
    with the L1/L2 sensitivities of one record's rounded contribution. This function only
    samples; the variance must come from that calibration (or from :func:`share_variance`).

    Args:
        shape: Shape of the noise array.
        variance: Variance of each coordinate (``2 * mu``); 0 gives zeros.
        rng: Source of randomness (seed it from ``secrets`` in production).

    Returns:
        An int64 array of independent Skellam samples.

    Raises:
        ConfigError: If ``variance`` is negative, not finite, or too large for the sampler.
    """
    v = _check_variance("variance", variance)
    mu = v / 2.0
    if mu > _MAX_POISSON_RATE:
        raise ConfigError(
            f"variance={variance!r} is too large: the Poisson rate {mu:g} exceeds the sampler "
            f"limit {_MAX_POISSON_RATE:g}"
        )
    if mu == 0.0:
        return np.zeros(shape, dtype=np.int64)
    first = rng.poisson(mu, size=shape).astype(np.int64)
    second = rng.poisson(mu, size=shape).astype(np.int64)
    return first - second


def share_variance(*, total_variance: float, threshold: int) -> float:
    """Per-client Skellam variance so that any ``threshold`` shares add up to ``total_variance``.

    Skellam variables are closed under independent sums (Agarwal, Kairouz, Liu 2021, arXiv
    2110.04995), so each client adds Sk with variance ``total_variance / threshold``. Whenever
    at least ``threshold`` clients survive, the aggregate noise variance is at least
    ``total_variance`` and the add/remove record-level guarantee computed for
    ``total_variance`` (with the rounded sensitivities of one record) holds against the
    coordinator. If K > threshold clients survive the aggregate variance is
    ``K / threshold * total_variance`` (more noise, same guarantee). Clients that collude with
    the coordinator know their own shares, so the guarantee assumes at least ``threshold``
    surviving clients add their shares honestly.

    Args:
        total_variance: Variance of the aggregate noise required by the accountant.
        threshold: Reconstruction threshold t of the secure sum (minimum survivors).

    Returns:
        The per-client variance ``total_variance / threshold``.

    Raises:
        ConfigError: If ``threshold < 1`` or ``total_variance`` is negative or not finite.
    """
    v = _check_variance("total_variance", total_variance)
    t = _check_threshold(threshold)
    return v / t


def gaussian_noise(
    shape: int | tuple[int, ...], *, std: float, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    """Sample i.i.d. centred Gaussian noise N(0, std^2).

    Used by the trusted coordinator in :attr:`TrustMode.CENTRAL` (the Gaussian mechanism,
    Dwork & Roth 2014; accounted with the RDP of Mironov 2017 or the PLD accountant in
    :mod:`fedsynth.protocol.accounting`). Privacy: ``std = noise_multiplier * l2_sensitivity``
    where ``l2_sensitivity`` bounds one record's L2 contribution (add/remove adjacency).

    Args:
        shape: Shape of the noise array.
        std: Standard deviation of each coordinate; 0 gives zeros.
        rng: Source of randomness (seed it from ``secrets`` in production).

    Returns:
        A float64 array of independent Gaussian samples.

    Raises:
        ConfigError: If ``std`` is negative or not finite.
    """
    s = _check_variance("std", std)
    if s == 0.0:
        return np.zeros(shape, dtype=np.float64)
    return rng.normal(0.0, s, size=shape).astype(np.float64)


def client_noise_variance(*, mode: TrustMode | str, total_variance: float, threshold: int) -> float:
    """Skellam variance one client adds under a trust mode.

    Privacy (add/remove one record, Skellam mechanism of Agarwal, Kairouz, Liu 2021, arXiv
    2110.04995): ``total_variance`` is the aggregate variance calibrated for the rounded L1/L2
    sensitivities of one record.

    * distributed: :func:`share_variance` (``total_variance / threshold``); the guarantee
      holds for the secure sum of at least ``threshold`` honest survivors.
    * local: ``total_variance``; each client's own noisy sum is private on its own.
    * central: ``0.0``; the coordinator adds Gaussian noise after decoding.

    Args:
        mode: A :class:`TrustMode` or its string value.
        total_variance: Aggregate Skellam variance from the accountant.
        threshold: Reconstruction threshold t of the secure sum.

    Returns:
        The per-client Skellam variance.

    Raises:
        ConfigError: If the mode is unknown, ``threshold < 1`` or the variance is invalid.
    """
    try:
        trust = TrustMode(mode)
    except ValueError:
        allowed = ", ".join(m.value for m in TrustMode)
        raise ConfigError(f"mode={mode!r} must be one of: {allowed}") from None
    v = _check_variance("total_variance", total_variance)
    t = _check_threshold(threshold)
    if trust is TrustMode.DISTRIBUTED:
        return share_variance(total_variance=v, threshold=t)
    if trust is TrustMode.LOCAL:
        return v
    return 0.0
