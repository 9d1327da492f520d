"""A Gaussian-DP certificate for the Skellam mechanism: PLD-tight accounting of lattice noise.

The Skellam mechanism (Agarwal, Kairouz, Liu 2021, arXiv 2110.04995) adds independent
symmetric Skellam noise ``Z ~ Sk(v/2, v/2)`` (variance ``v``) to each coordinate of an
integer sum. Its RDP bound, converted to (epsilon, delta), needs about 7 % more noise than
the Gaussian mechanism accounted with a privacy loss distribution (the conversion loses it,
not Skellam). This module bounds the mechanism's *trade-off function* instead (f-DP, Dong,
Roth, Su 2022) and so inherits the Gaussian mechanism's exact (epsilon, delta) curve.

Adjacency and sensitivity: add/remove one record whose rounded, scaled contribution is an
integer vector ``x`` with ``||x||_2 <= l2`` (the same bound as the RDP analysis; L1 is not
needed). The argument, each step a standard fact:

1. One coordinate, shift ``m``: ``Z`` is log-concave (a difference of two Poissons), so
   ``(Z, Z + m)`` has a monotone likelihood ratio and its optimal tests are thresholds. With
   ``g(j) = Phi^-1(P(Z <= j))`` the threshold test at ``j`` has errors ``(1 - Phi(g(j)),
   Phi(g(j - m)))``; the trade-off function is the polygon through these points, and it lies
   above the Gaussian one ``G_mu`` exactly when ``g(j) - g(j - m) <= mu`` at every ``j``
   (``G_mu`` is convex, so the vertices suffice). Telescoping, ``mu(m) = m * max_j (g(j) -
   g(j - 1))``; the certificate's factor is ``c = sigma * max_j (g(j) - g(j - 1))``.
2. Beyond ``J``, where ``P(Z > J) <= e^-650``, the tails are replaced by geometric ones of the
   same mass (``Z'``: still log-concave, since a log-concave survival ratio never exceeds the
   pmf ratio). There ``g`` grows by at most ``-log(rho) / r(g(J))`` per step (``rho`` the
   survival ratio at ``J``, ``r`` the inverse Mills ratio; log Phi-bar is concave), so the
   maximum over all ``j`` is computed exactly on ``[0, J]`` (by symmetry ``h(-j) = h(j)``).
3. Coordinates: trade-off functions of product pairs are tensor products, tensoring is
   monotone (Blackwell), and ``G_a x G_b = G_sqrt(a^2 + b^2)``; so the vector mechanism with
   ``Z'`` noise is ``c * ||x||_2 / sigma <= c * l2 / sigma``-GDP. Randomized rounding and the
   other records' contributions are a common mixture (joint convexity), the field's modular
   reduction is post-processing, ``k`` releases compose to ``sqrt(k)`` times it (adaptive
   composition of GDP).
4. ``Z`` and ``Z'`` differ in total variation by at most ``2 e^-650`` per coordinate, so the
   real mechanism's delta exceeds the GDP one by at most ``(1 + e^eps) * 2 k d e^-650``:
   below 1e-200 for ``eps <= 50`` and ``k * d <= 1e20`` coordinate-releases. It is charged
   against delta (:data:`DELTA_SLACK`).

The factor is computed in floating point (scipy's exponentially scaled Bessel function for
the pmf, sums in extended precision) with a relative margin of :data:`FLOAT_MARGIN`. scipy's
Bessel function returns NaN for arguments of 1e10 and more; above :data:`MAX_VARIANCE` no
certificate is given and callers keep the RDP bound. At the variances fedsynth's releases
use (a few hundred to 1e9) the factor is within 1e-3 of 1; at variance 2 it is about 1.12,
where the RDP bound may be the better of the two.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = [
    "DELTA_SLACK",
    "FLOAT_MARGIN",
    "MAX_EPSILON",
    "MAX_VARIANCE",
    "MIN_DELTA",
    "TAIL_LOG_SURVIVAL",
    "skellam_gdp_epsilon",
    "skellam_gdp_factor",
    "skellam_gdp_mu",
    "skellam_gdp_variance",
]

MAX_VARIANCE = 1e9
"""Largest per-coordinate Skellam variance the certificate covers (scipy's Bessel range)."""

TAIL_LOG_SURVIVAL = -650.0
"""The exact part reaches the first ``J`` with ``log P(Z > J) <= TAIL_LOG_SURVIVAL``."""

FLOAT_MARGIN = 1e-4
"""Relative margin added to the computed factor for floating-point error (bounded by ~1e-5)."""

DELTA_SLACK = 1e-200
"""Upper bound on the delta added by replacing the tails beyond ``J`` (step 4 above)."""

MIN_DELTA = 1e-150
"""Smallest delta for which the certificate is used (the slack must be negligible)."""

MAX_EPSILON = 50.0
"""Largest epsilon for which the certificate is used (the slack bound holds up to it)."""

_PMF_FLOOR = 1e-300
_VARIANCE_REL_TOL = 1e-6


@functools.lru_cache(maxsize=512)
def skellam_gdp_factor(variance: float) -> float | None:
    """Factor ``c >= 1`` with which one Skellam coordinate of ``variance`` is dominated.

    A shift of the integer ``m`` under noise ``Sk(v/2, v/2)`` is ``c * m / sqrt(v)``-GDP,
    after the tail replacement of the module docstring (its total-variation cost is
    :data:`DELTA_SLACK`). Returns ``None`` when the variance is not positive and finite or
    above :data:`MAX_VARIANCE`, or the Bessel function misbehaves: no certificate then.
    """
    v = float(variance)
    if not (math.isfinite(v) and 0.0 < v <= MAX_VARIANCE):
        return None
    from scipy import special

    sigma = math.sqrt(v)
    # The pmf of Sk(v/2, v/2) at j is exp(-v) * I_j(v) = ive(j, v).
    n = math.ceil(40.0 * sigma + 400.0)
    pmf = special.ive(np.arange(n + 1, dtype=np.float64), v)
    if not np.all(np.isfinite(pmf)):
        return None
    kept = np.nonzero(pmf > _PMF_FLOOR)[0]
    if kept.size < 3 or kept[-1] != kept.size - 1:
        return None
    last = int(kept[-1])
    p = pmf[: last + 1].astype(np.longdouble)
    # Mass beyond `last`: at most a geometric series with the last pmf ratio (log-concavity).
    ratio = p[last] / p[last - 1]
    if not ratio < 1:
        return None
    beyond = p[last] * ratio / (1 - ratio)
    # survival[j] = P(Z > j), summed from the tail in extended precision.
    at_least = np.cumsum(p[::-1])[::-1]
    survival = np.append(at_least[1:], np.longdouble(0)) + beyond
    log_survival = np.log(survival.astype(np.float64))
    reached = np.nonzero(log_survival <= TAIL_LOG_SURVIVAL)[0]
    if reached.size == 0 or reached[0] < 1 or reached[0] >= last:
        return None
    tail_start = int(reached[0])
    s = survival[: tail_start + 1].astype(np.float64)
    g = -special.ndtri(s)  # g(j) = Phi^-1(P(Z <= j)), j = 0..J
    steps = np.empty_like(g)
    steps[0] = 2.0 * g[0]  # g(0) - g(-1), and g(-1) = -g(0) by symmetry
    steps[1:] = np.diff(g)
    centre = float(steps.max())
    # Geometric tail beyond J: slope at most -log(rho) / r(g(J)), r the inverse Mills ratio.
    rho = float(survival[tail_start] / survival[tail_start - 1])
    z = float(g[tail_start])
    log_mills_inverse = -0.5 * z * z - 0.5 * math.log(2.0 * math.pi) - float(special.log_ndtr(-z))
    tail = -math.log(rho) / math.exp(log_mills_inverse)
    factor = sigma * max(centre, tail) * (1.0 + FLOAT_MARGIN)
    if not math.isfinite(factor):
        return None
    return max(factor, 1.0)


def skellam_gdp_mu(*, l2: float, variance: float, compositions: int = 1) -> float | None:
    """GDP ``mu`` of ``compositions`` Skellam releases of L2 sensitivity ``l2`` (or ``None``).

    Add/remove one record whose rounded scaled contribution has L2 norm at most ``l2``
    (integer coordinates); ``variance`` is the aggregate per-coordinate Skellam variance.
    """
    factor = skellam_gdp_factor(variance)
    if factor is None:
        return None
    return factor * float(l2) * math.sqrt(compositions) / math.sqrt(float(variance))


def skellam_gdp_epsilon(
    *, l2: float, variance: float, delta: float, compositions: int = 1
) -> float | None:
    """Epsilon at ``delta`` that the certificate gives, or ``None`` where it does not apply.

    The GDP curve of :func:`skellam_gdp_mu` is converted exactly (Dong, Roth, Su 2022,
    Corollary 2.13) at ``delta - DELTA_SLACK`` by
    :func:`~fedsynth.protocol.accounting.gdp_epsilon`, which never answers below the root.
    """
    from fedsynth.protocol.accounting import gdp_epsilon

    d = float(delta)
    if d < MIN_DELTA:
        return None
    mu = skellam_gdp_mu(l2=l2, variance=variance, compositions=compositions)
    if mu is None:
        return None
    eps = gdp_epsilon(mu=mu, delta=d - DELTA_SLACK)
    return eps if eps <= MAX_EPSILON else None


def skellam_gdp_variance(
    *, epsilon: float, delta: float, l2: float, compositions: int = 1
) -> float | None:
    """Smallest variance (to 1e-6 relative) the certificate proves (epsilon, delta)-DP, or ``None``.

    Takes the largest ``mu`` meeting ``delta - DELTA_SLACK`` at ``epsilon``
    (:func:`~fedsynth.protocol.accounting.gdp_mu`), then bisects (in log space) for the
    smallest variance ``v`` with ``c(v) * l2 * sqrt(k) / sqrt(v) <= mu``; the result is checked
    with :func:`skellam_gdp_epsilon` before it is returned.
    """
    from fedsynth.protocol.accounting import gdp_mu

    eps, d = float(epsilon), float(delta)
    if not (0.0 < eps <= MAX_EPSILON) or d < MIN_DELTA:
        return None
    mu = gdp_mu(epsilon=eps, delta=d - DELTA_SLACK)
    unit = float(l2) * math.sqrt(compositions) / mu

    def proven(variance: float) -> bool:
        # A relative pad of 1e-12 absorbs the rounding of the square and the square root.
        factor = skellam_gdp_factor(variance)
        return factor is not None and (factor * unit) ** 2 * (1.0 + 1e-12) <= variance

    lo = unit**2  # never proven: the factor is at least 1, and the pad asks for more
    factor = skellam_gdp_factor(lo)
    if factor is None:
        return None
    hi = (factor * unit) ** 2 * (1.0 + 1e-9)
    for _ in range(60):
        if proven(hi):
            break
        lo, hi = hi, hi * 1.5
    else:
        return None
    while hi / lo - 1.0 > _VARIANCE_REL_TOL:
        mid = math.sqrt(lo * hi)
        if proven(mid):
            hi = mid
        else:
            lo = mid
    achieved = skellam_gdp_epsilon(l2=l2, variance=hi, delta=d, compositions=compositions)
    if achieved is None or achieved > eps:  # pragma: no cover - mu is monotone in the conversion
        return None
    return hi
