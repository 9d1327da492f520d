"""Privacy accounting for the releases fedsynth makes, built on library accountants.

Adjacency throughout is add/remove one record (``NeighboringRelation.ADD_OR_REMOVE_ONE``).
Mechanisms and the papers implemented:

* Skellam (Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated
  Learning", NeurIPS 2021, arXiv 2110.04995), with the L2 bound inflated by randomized
  rounding, accounted by the tighter of two valid bounds: the multi-dimensional RDP bound
  for integer orders converted with ``dp_accounting.rdp.compute_epsilon`` (Canonne, Kamath,
  Steinke 2020, Prop. 12), and the Gaussian-DP certificate of
  :mod:`fedsynth.protocol.skellam_gdp` (trade-off functions, Dong, Roth, Su 2022), which
  matches the Gaussian mechanism's PLD accounting to about 1e-4 at fedsynth's variances.
* Gaussian (Mironov 2017 RDP; the PLD accountant of ``dp_accounting``, Koskela et al. /
  Doroshenko et al. 2022), composed with ``SelfComposedDpEvent``.
* Private Evolution (Lin et al. 2024, arXiv 2305.15560; Xie et al., Aug-PE, 2024): T rounds of a
  Gaussian histogram of L2 sensitivity 1 are mu-GDP with ``mu = sqrt(T) / sigma`` (Dong, Roth,
  Su 2022, Corollary 2.13 for the (epsilon, delta) conversion).

Neither ``dp_accounting`` nor ``opacus`` implements Skellam; its RDP curve is computed here and
handed to the library conversion.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.mechanisms import TrustMode

if TYPE_CHECKING:
    import dp_accounting

# dp_accounting and scipy are imported where they are used: they take over a second to import,
# and every command and every ClientApp process (one per message in a deployment) imports this
# module, while most of them never calibrate or convert an RDP curve.

__all__ = [
    "MAX_ROUNDING_INFLATION",
    "RDP_ORDERS",
    "PECalibration",
    "PrivacyEvent",
    "VectorReleaseCalibration",
    "calibrate_gaussian",
    "calibrate_pe",
    "calibrate_skellam_variance",
    "calibrate_vector_release",
    "gaussian_epsilon",
    "gdp_delta",
    "gdp_epsilon",
    "gdp_mu",
    "min_vector_scale",
    "pe_aggregate_noise_std",
    "pe_epsilon",
    "pe_min_workable_epsilon",
    "pe_noise_multiplier",
    "rounded_l1_sensitivity",
    "rounded_l2_sensitivity",
    "rounding_inflation",
    "skellam_epsilon",
    "skellam_rdp",
    "skellam_rdp_epsilon",
    "validate_epsilon_delta",
    "vector_record_sensitivity",
]

RDP_ORDERS: tuple[int, ...] = (*range(2, 129), 256)
"""Integer RDP orders 2..128 and 256 (the Skellam bound holds for integer orders only)."""

_SKELLAM_RDP_NAME = "Skellam: dp-accounting RDP (integer orders 2..128, 256), tighter here"
_SKELLAM_GDP_NAME = (
    "Skellam: lattice GDP certificate (fedsynth.protocol.skellam_gdp), tighter than RDP here"
)
_PLD_ACCOUNTANT_NAME = "dp-accounting PLD"
_ACCOUNTANTS = ("rdp", "pld")
_SKELLAM_REL_TOL = 1e-6
MAX_ROUNDING_INFLATION = 1e-3
"""Largest relative growth of a record's L2 bound that per-record rounding may cause (0.1 %).

Below it the fixed-point scale is fine enough that rounding costs almost no extra noise; a task
whose scale would inflate the bound more is refused (see :func:`min_vector_scale`)."""


# --------------------------------------------------------------------------- validation


def _finite_nonneg(name: str, value: float) -> float:
    """Return ``value`` as a float if finite and >= 0, else raise ConfigError."""
    v = float(value)
    if not math.isfinite(v) or v < 0.0:
        raise ConfigError(f"{name}={value!r} must be a finite number >= 0")
    return v


def _finite_pos(name: str, value: float) -> float:
    """Return ``value`` as a float if finite and > 0, else raise ConfigError."""
    v = float(value)
    if not math.isfinite(v) or v <= 0.0:
        raise ConfigError(f"{name}={value!r} must be a finite number > 0")
    return v


def _positive_int(name: str, value: int) -> int:
    """Return ``value`` if it is an integer >= 1, else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name}={value!r} must be an integer >= 1")
    if value < 1:
        raise ConfigError(f"{name}={value} must be >= 1")
    return int(value)


def _check_delta(delta: float) -> float:
    """Return ``delta`` if it lies in (0, 1), else raise ConfigError."""
    d = float(delta)
    if not (0.0 < d < 1.0):
        raise ConfigError(f"delta={delta!r} must be in the open interval (0, 1)")
    return d


def _check_epsilon(epsilon: float) -> float:
    """Return ``epsilon`` if it is > 0 (``math.inf`` allowed), else raise ConfigError."""
    e = float(epsilon)
    if math.isnan(e) or e <= 0.0:
        raise ConfigError(f"epsilon={epsilon!r} must be > 0 (math.inf means non-private)")
    return e


def _check_accountant(accountant: str) -> str:
    """Return ``accountant`` if it names a supported accountant, else raise ConfigError."""
    if accountant not in _ACCOUNTANTS:
        raise ConfigError(f"accountant={accountant!r} must be one of: {', '.join(_ACCOUNTANTS)}")
    return accountant


def validate_epsilon_delta(*, epsilon: float, delta: float, n: int | None = None) -> None:
    """Check a requested (epsilon, delta) budget for add/remove record-level DP.

    Args:
        epsilon: Must be > 0; ``math.inf`` is allowed and means a non-private run.
        delta: Must be in (0, 1) and, when ``n`` is given, below ``1 / n`` (a larger delta
            allows releasing a record outright).
        n: Number of records the guarantee protects, if known.

    Raises:
        ConfigError: Naming the offending field, its value and the limit.
    """
    _check_epsilon(epsilon)
    d = _check_delta(delta)
    if n is not None:
        records = _positive_int("n", n)
        if d >= 1.0 / records:
            raise ConfigError(
                f"delta={delta!r} must be below 1/n={1.0 / records:g} for n={records} records"
            )


# --------------------------------------------------------------------------- Skellam


def skellam_rdp(
    *, l1: float, l2: float, variance: float, orders: Sequence[int] = RDP_ORDERS
) -> npt.NDArray[np.float64]:
    """RDP curve of one release of the multi-dimensional Skellam mechanism.

    Implements the RDP bound of Agarwal, Kairouz, Liu 2021 (arXiv 2110.04995) for integer
    orders alpha, in the scaled integer domain::

        eps(alpha) = alpha*l2^2/(2v) + min(((2alpha-1)*l2^2 + 6*l1) / (4v^2), 3*l1/(2v))

    Sensitivity: ``l1`` and ``l2`` bound the L1 and L2 norm of one record's rounded, scaled
    integer contribution (see :func:`rounded_l2_sensitivity`); adjacency is add/remove one
    record. ``variance`` is the per-coordinate variance of the aggregate Skellam noise.

    Args:
        l1: L1 sensitivity (scaled integer domain).
        l2: L2 sensitivity (scaled integer domain).
        variance: Aggregate Skellam variance per coordinate (> 0).
        orders: Integer RDP orders >= 2.

    Returns:
        The RDP epsilon at each order (float64 array).

    Raises:
        ConfigError: If a sensitivity is negative, the variance is not > 0 or an order is
            not an integer >= 2.
    """
    d1 = _finite_nonneg("l1", l1)
    d2 = _finite_nonneg("l2", l2)
    v = _finite_pos("variance", variance)
    for order in orders:
        if isinstance(order, bool) or not isinstance(order, int | np.integer) or order < 2:
            raise ConfigError(f"orders contains {order!r}; every order must be an integer >= 2")
    alpha = np.asarray(orders, dtype=np.float64)
    gaussian_term = alpha * d2**2 / (2.0 * v)
    second_order = ((2.0 * alpha - 1.0) * d2**2 + 6.0 * d1) / (4.0 * v**2)
    first_order = np.full_like(alpha, 3.0 * d1 / (2.0 * v))
    result: npt.NDArray[np.float64] = gaussian_term + np.minimum(second_order, first_order)
    return result


def skellam_epsilon(
    *, l1: float, l2: float, variance: float, delta: float, compositions: int = 1
) -> float:
    """Epsilon of ``compositions`` Skellam releases at ``delta``.

    Skellam mechanism (Agarwal, Kairouz, Liu 2021, arXiv 2110.04995); add/remove adjacency of
    one record whose rounded scaled contribution has L1/L2 norm at most ``l1``/``l2``. The
    smaller of two valid bounds: the RDP curve of :func:`skellam_rdp` on :data:`RDP_ORDERS`,
    multiplied by ``compositions`` and converted with ``dp_accounting.rdp.compute_epsilon``,
    and the GDP certificate :func:`fedsynth.protocol.skellam_gdp.skellam_gdp_epsilon` (where
    it applies: variance up to 1e9, epsilon up to 50).

    Args:
        l1: L1 sensitivity (scaled integer domain).
        l2: L2 sensitivity (scaled integer domain).
        variance: Aggregate Skellam variance per coordinate; 0 means no noise (epsilon inf).
        delta: Target delta in (0, 1).
        compositions: Number of identical releases composed (>= 1).

    Returns:
        The epsilon (``math.inf`` when ``variance == 0`` and ``l2 > 0``).

    Raises:
        ConfigError: On an invalid argument.
    """
    d = _check_delta(delta)
    k = _positive_int("compositions", compositions)
    v = _finite_nonneg("variance", variance)
    d1 = _finite_nonneg("l1", l1)
    d2 = _finite_nonneg("l2", l2)
    eps, _ = _skellam_accounted(l1=d1, l2=d2, variance=v, delta=d, compositions=k)
    return eps


def _skellam_accounted(
    *, l1: float, l2: float, variance: float, delta: float, compositions: int
) -> tuple[float, str]:
    """:func:`skellam_epsilon` and the name of the bound that gave it (none without noise)."""
    if variance <= 0.0:
        return (0.0 if l2 == 0.0 and l1 == 0.0 else math.inf), "none (epsilon = inf)"
    rdp_eps = skellam_rdp_epsilon(
        l1=l1, l2=l2, variance=variance, delta=delta, compositions=compositions
    )
    from fedsynth.protocol.skellam_gdp import skellam_gdp_epsilon

    gdp_eps = skellam_gdp_epsilon(l2=l2, variance=variance, delta=delta, compositions=compositions)
    if gdp_eps is not None and gdp_eps <= rdp_eps:
        return gdp_eps, _SKELLAM_GDP_NAME
    return rdp_eps, _SKELLAM_RDP_NAME


def skellam_rdp_epsilon(
    *, l1: float, l2: float, variance: float, delta: float, compositions: int = 1
) -> float:
    """Epsilon of ``compositions`` Skellam releases from the RDP bound alone.

    The RDP curve of :func:`skellam_rdp` (Agarwal, Kairouz, Liu 2021; add/remove one record of
    rounded scaled sensitivities ``l1``/``l2``) on :data:`RDP_ORDERS`, multiplied by
    ``compositions`` and converted with ``dp_accounting.rdp.compute_epsilon``. One of the two
    bounds :func:`skellam_epsilon` takes the smaller of.

    Raises:
        ConfigError: On an invalid argument (``variance`` must be > 0).
    """
    delta = _check_delta(delta)
    compositions = _positive_int("compositions", compositions)
    variance = _finite_pos("variance", variance)
    l1 = _finite_nonneg("l1", l1)
    l2 = _finite_nonneg("l2", l2)
    curve = compositions * skellam_rdp(l1=l1, l2=l2, variance=variance)
    from dp_accounting import rdp as dp_rdp

    eps, _ = dp_rdp.compute_epsilon(RDP_ORDERS, curve, delta)
    return max(float(eps), 0.0)


def rounded_l2_sensitivity(*, scaled_clip: float, dim: int, beta: float = math.exp(-0.5)) -> float:
    """L2 bound of one record's vector after scaling and (conditional) randomized rounding.

    From Agarwal, Kairouz, Liu 2021 (arXiv 2110.04995) and the DDG paper (Kairouz, Liu, Steinke
    2021): a vector of L2 norm at most ``c_s = clip * scale`` in ``dim`` coordinates, rounded
    coordinate-wise to a neighbouring integer at random, has norm at most::

        min(c_s + sqrt(d), sqrt(c_s^2 + d/4 + sqrt(2 ln(1/beta)) * (c_s + sqrt(d)/2)))

    with probability at least ``1 - beta`` for the second term. The bound is a worst case only
    if the encoder re-rounds (conditional rounding) until the rounded norm is within it; this
    is the add/remove L2 sensitivity of one record in the scaled integer domain.

    Args:
        scaled_clip: ``clip * scale``, the L2 norm bound before rounding (>= 0).
        dim: Number of coordinates (including padding).
        beta: Failure probability of one rounding attempt, in (0, 1).

    Returns:
        The L2 sensitivity after rounding.

    Raises:
        ConfigError: On an invalid argument.
    """
    c = _finite_nonneg("scaled_clip", scaled_clip)
    d = _positive_int("dim", dim)
    b = float(beta)
    if not (0.0 < b < 1.0):
        raise ConfigError(f"beta={beta!r} must be in the open interval (0, 1)")
    root_d = math.sqrt(d)
    bound_1 = c + root_d
    bound_2 = math.sqrt(c**2 + d / 4.0 + math.sqrt(2.0 * math.log(1.0 / b)) * (c + root_d / 2.0))
    return min(bound_1, bound_2)


def rounded_l1_sensitivity(*, l2: float, dim: int) -> float:
    """L1 bound of an integer vector with L2 norm at most ``l2`` in ``dim`` coordinates.

    ``l2 * min(sqrt(dim), l2)``: Cauchy-Schwarz gives ``sqrt(dim) * l2``, and for an integer
    vector ``|x_i| <= x_i^2`` gives ``l2^2`` (Agarwal, Kairouz, Liu 2021, arXiv 2110.04995).
    This is the add/remove L1 sensitivity of one record in the scaled integer domain.

    Args:
        l2: L2 sensitivity in the scaled integer domain (e.g. :func:`rounded_l2_sensitivity`).
        dim: Number of coordinates.

    Returns:
        The L1 sensitivity.

    Raises:
        ConfigError: On an invalid argument.
    """
    d2 = _finite_nonneg("l2", l2)
    d = _positive_int("dim", dim)
    return d2 * min(math.sqrt(d), d2)


def vector_record_sensitivity(
    *, scale: float, layers: int, count_weight: float, dim: int
) -> tuple[float, float]:
    """L2 and L1 sensitivity of one record of a dataset-vector release (scaled integer domain).

    One record contributes ``layers`` unit-clipped layer vectors and a count coordinate
    ``count_weight`` (gamma) to one class row of ``dim`` coordinates; the row is multiplied by
    ``scale`` and randomly rounded on its own, conditionally on staying within the rounded bound
    (Agarwal, Kairouz, Liu 2021, arXiv 2110.04995). Adjacency: add/remove one record. The same
    bound holds in every trust mode, because clients round every record in every mode.

    Args:
        scale: Unit-to-integer scale factor (> 0).
        layers: Number of released layers L (>= 1).
        count_weight: Weight gamma of the count coordinate (>= 0).
        dim: Coordinates of one class row (``L * hidden + 1``).

    Returns:
        ``(l2, l1)``: :func:`rounded_l2_sensitivity` of ``scale * sqrt(L + gamma^2)`` and
        :func:`rounded_l1_sensitivity` of that.

    Raises:
        ConfigError: On an invalid argument.
    """
    s = _finite_pos("scale", scale)
    n_layers = _positive_int("layers", layers)
    gamma = _finite_nonneg("count_weight", count_weight)
    n_dim = _positive_int("dim", dim)
    l2 = rounded_l2_sensitivity(scaled_clip=s * math.sqrt(n_layers + gamma**2), dim=n_dim)
    return l2, rounded_l1_sensitivity(l2=l2, dim=n_dim)


def rounding_inflation(*, scale: float, layers: int, count_weight: float, dim: int) -> float:
    """Relative growth of one record's L2 bound caused by rounding: ``rounded / unrounded - 1``.

    The unrounded bound is ``scale * sqrt(layers + count_weight^2)``; the rounded one is
    :func:`vector_record_sensitivity`'s L2 (add/remove one record). The inflation shrinks as the
    scale grows, so the accountant's noise tends to the unrounded mechanism's.

    Raises:
        ConfigError: On an invalid argument.
    """
    l2, _ = vector_record_sensitivity(
        scale=scale, layers=layers, count_weight=count_weight, dim=dim
    )
    return l2 / (float(scale) * math.sqrt(layers + float(count_weight) ** 2)) - 1.0


def min_vector_scale(
    *,
    layers: int,
    count_weight: float,
    dim: int,
    max_inflation: float = MAX_ROUNDING_INFLATION,
) -> float:
    """Smallest fixed-point scale whose rounding inflates a record's L2 bound by <= max_inflation.

    With ``c = scale * sqrt(layers + gamma^2)`` and ``k = sqrt(2 ln(1/beta)) = 1`` (beta =
    exp(-0.5)), the rounded bound of :func:`rounded_l2_sensitivity` is
    ``min(c + sqrt(d), sqrt(c^2 + d/4 + k (c + sqrt(d)/2)))``; both terms over ``c`` decrease in
    ``c``, so the limit is the smaller ``c`` at which either ratio reaches ``1 + max_inflation``
    (a quadratic for the second), then nudged up until :func:`rounding_inflation` confirms it.

    Args:
        layers: Number of released layers L (>= 1).
        count_weight: Weight gamma of the count coordinate (>= 0).
        dim: Coordinates of one class row (``L * hidden + 1``).
        max_inflation: Largest allowed ``rounded / unrounded - 1`` (> 0).

    Returns:
        The minimum scale.

    Raises:
        ConfigError: On an invalid argument.
    """
    n_layers = _positive_int("layers", layers)
    gamma = _finite_nonneg("count_weight", count_weight)
    n_dim = _positive_int("dim", dim)
    tau = _finite_pos("max_inflation", max_inflation)
    k = math.sqrt(2.0 * math.log(1.0 / math.exp(-0.5)))
    root_d = math.sqrt(n_dim)
    c_linear = root_d / tau
    a = (1.0 + tau) ** 2 - 1.0
    b = n_dim / 4.0 + k * root_d / 2.0
    c_quadratic = (k + math.sqrt(k * k + 4.0 * a * b)) / (2.0 * a)
    unit = math.sqrt(n_layers + gamma**2)
    scale = min(c_linear, c_quadratic) / unit
    for _ in range(100):  # float round-off only: a few ulps at most
        inflation = rounding_inflation(scale=scale, layers=n_layers, count_weight=gamma, dim=n_dim)
        if inflation <= tau:
            return scale
        scale = math.nextafter(scale, math.inf) * (1.0 + 1e-15)
    raise ConfigError(  # pragma: no cover - the closed form is exact up to round-off
        f"no scale found with rounding inflation <= max_inflation={max_inflation!r}"
    )


def calibrate_skellam_variance(
    *, epsilon: float, delta: float, l1: float, l2: float, compositions: int = 1
) -> float:
    """Smallest aggregate Skellam variance whose ``compositions`` releases are (epsilon, delta)-DP.

    Skellam mechanism (Agarwal, Kairouz, Liu 2021, arXiv 2110.04995), add/remove adjacency of
    one record with rounded scaled sensitivities ``l1``/``l2``, accounted as in
    :func:`skellam_epsilon`: the smaller of the RDP bound's variance (bisection in log space to
    a relative tolerance of 1e-6) and the GDP certificate's
    (:func:`fedsynth.protocol.skellam_gdp.skellam_gdp_variance`). The returned variance always
    satisfies ``skellam_epsilon(...) <= epsilon``. With orders up to 256 the RDP conversion
    cannot express epsilon below about 0.02 (at delta = 1e-5) except through its epsilon-0 KL
    bound, so a smaller target yields a very large (but valid) variance.

    Args:
        epsilon: Target epsilon (> 0; ``math.inf`` returns 0.0, i.e. no noise).
        delta: Target delta in (0, 1).
        l1: L1 sensitivity (scaled integer domain).
        l2: L2 sensitivity (scaled integer domain, > 0).
        compositions: Number of identical releases composed (>= 1).

    Returns:
        The aggregate per-coordinate variance.

    Raises:
        ConfigError: On an invalid argument.
    """
    eps = _check_epsilon(epsilon)
    d = _check_delta(delta)
    k = _positive_int("compositions", compositions)
    d1 = _finite_nonneg("l1", l1)
    d2 = _finite_pos("l2", l2)
    if math.isinf(eps):
        return 0.0
    from fedsynth.protocol.skellam_gdp import skellam_gdp_variance

    gdp_variance = skellam_gdp_variance(epsilon=eps, delta=d, l2=d2, compositions=k)
    try:
        rdp_variance = _calibrate_skellam_rdp(epsilon=eps, delta=d, l1=d1, l2=d2, compositions=k)
    except ConfigError:
        if gdp_variance is None:
            raise
        return gdp_variance
    return rdp_variance if gdp_variance is None else min(rdp_variance, gdp_variance)


def _calibrate_skellam_rdp(
    *, epsilon: float, delta: float, l1: float, l2: float, compositions: int
) -> float:
    """Smallest variance the RDP bound alone accepts (validated arguments, finite epsilon)."""
    eps, d, d1, d2, k = epsilon, delta, l1, l2, compositions

    def eps_at(log_v: float) -> float:
        return skellam_rdp_epsilon(l1=d1, l2=d2, variance=math.exp(log_v), delta=d, compositions=k)

    # Gaussian-like starting point: sigma = 1 per unit of L2 sensitivity.
    hi = 2.0 * math.log(d2)
    step = math.log(4.0)
    for _ in range(400):
        if eps_at(hi) <= eps:
            break
        hi += step
    else:
        raise ConfigError(
            f"epsilon={epsilon!r} is unreachable at delta={delta!r}: below the floor of the RDP "
            f"conversion on orders up to {max(RDP_ORDERS)}, whatever the Skellam variance"
        )
    lo = hi - step
    for _ in range(400):
        if eps_at(lo) > eps:
            break
        hi, lo = lo, lo - step
    else:  # pragma: no cover - epsilon(v) grows without bound as v -> 0
        return math.exp(lo)
    tol = math.log1p(_SKELLAM_REL_TOL)
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if eps_at(mid) <= eps:
            hi = mid
        else:
            lo = mid
    return math.exp(hi)


# --------------------------------------------------------------------------- Gaussian


def _gaussian_event(noise_multiplier: float, compositions: int) -> dp_accounting.DpEvent:
    """The DpEvent of ``compositions`` Gaussian releases with the given noise multiplier."""
    import dp_accounting

    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if compositions > 1:
        event = dp_accounting.SelfComposedDpEvent(event, compositions)
    return event


def _fresh_accountant(accountant: str) -> dp_accounting.PrivacyAccountant:
    """A new add/remove accountant of the named kind."""
    import dp_accounting

    if accountant == "rdp":
        return dp_accounting.rdp.RdpAccountant(orders=list(RDP_ORDERS))
    return dp_accounting.pld.PLDAccountant()


def gaussian_epsilon(
    *, noise_multiplier: float, delta: float, compositions: int = 1, accountant: str = "rdp"
) -> float:
    """Epsilon of ``compositions`` Gaussian releases with the given noise multiplier.

    Gaussian mechanism with noise std ``noise_multiplier * l2_sensitivity``, where the L2
    sensitivity bounds one record's contribution (add/remove adjacency). Accounted with
    ``dp_accounting`` (``GaussianDpEvent`` composed by ``SelfComposedDpEvent``): ``"rdp"``
    (Mironov 2017, orders :data:`RDP_ORDERS`) or ``"pld"`` (privacy loss distributions,
    tight up to discretisation).

    Args:
        noise_multiplier: Noise std divided by the L2 sensitivity (>= 0; 0 gives inf).
        delta: Target delta in (0, 1).
        compositions: Number of identical releases composed (>= 1).
        accountant: ``"rdp"`` or ``"pld"``.

    Returns:
        The epsilon.

    Raises:
        ConfigError: On an invalid argument.
    """
    sigma = _finite_nonneg("noise_multiplier", noise_multiplier)
    d = _check_delta(delta)
    k = _positive_int("compositions", compositions)
    kind = _check_accountant(accountant)
    if sigma == 0.0:
        return math.inf
    acc = _fresh_accountant(kind)
    acc.compose(_gaussian_event(sigma, k))
    return max(float(acc.get_epsilon(d)), 0.0)


def calibrate_gaussian(
    *, epsilon: float, delta: float, compositions: int = 1, accountant: str = "pld"
) -> float:
    """Smallest Gaussian noise multiplier for ``compositions`` releases to be (epsilon, delta)-DP.

    Gaussian mechanism, add/remove adjacency of one record; the multiplier is relative to the
    L2 sensitivity of one record's contribution. Uses ``dp_accounting.calibrate_dp_mechanism``
    (Brent's method, absolute tolerance 1e-6, result guaranteed on the private side) with the
    named accountant (see :func:`gaussian_epsilon`).

    Args:
        epsilon: Target epsilon (> 0; ``math.inf`` returns 0.0, i.e. no noise).
        delta: Target delta in (0, 1).
        compositions: Number of identical releases composed (>= 1).
        accountant: ``"pld"`` (default, tight) or ``"rdp"``.

    Returns:
        The noise multiplier.

    Raises:
        ConfigError: On an invalid argument.
    """
    eps = _check_epsilon(epsilon)
    d = _check_delta(delta)
    k = _positive_int("compositions", compositions)
    kind = _check_accountant(accountant)
    if math.isinf(eps):
        return 0.0
    return _calibrate_gaussian_cached(eps, d, k, kind)


@functools.lru_cache(maxsize=256)
def _calibrate_gaussian_cached(eps: float, delta: float, compositions: int, kind: str) -> float:
    """Calibrate (validated arguments); cached because PLD calibration takes seconds."""
    import dp_accounting

    def calibrate(
        kind_: str, bracket: dp_accounting.mechanism_calibration.BracketInterval | None
    ) -> float:
        def make_accountant() -> dp_accounting.PrivacyAccountant:
            return _fresh_accountant(kind_)

        return float(
            dp_accounting.calibrate_dp_mechanism(
                make_accountant,
                lambda sigma: _gaussian_event(sigma, compositions),
                eps,
                delta,
                bracket_interval=bracket,
            )
        )

    rdp_sigma = calibrate("rdp", None)
    if kind == "rdp":
        return rdp_sigma
    # The RDP multiplier is an upper bound on the PLD one, which is rarely 30 % smaller; PLD
    # calls are slow at small multipliers, so try a narrow bracket first.
    try:
        return calibrate("pld", dp_accounting.ExplicitBracketInterval(0.7 * rdp_sigma, rdp_sigma))
    except ValueError:
        return calibrate("pld", None)


# --------------------------------------------------------------------------- Private Evolution


def gdp_delta(*, epsilon: float, mu: float) -> float:
    """Delta of a mu-GDP mechanism at ``epsilon`` (Dong, Roth, Su 2022, Corollary 2.13).

    ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps * Phi(-eps/mu - mu/2)``. Used for Private
    Evolution (Lin et al. 2024, arXiv 2305.15560), where T Gaussian histograms of add/remove
    L2 sensitivity 1 and noise multiplier sigma compose to ``mu = sqrt(T) / sigma``.

    Args:
        epsilon: Epsilon >= 0.
        mu: GDP parameter >= 0 (0 gives delta 0; ``math.inf`` gives 1).

    Returns:
        The delta, in [0, 1].

    Raises:
        ConfigError: On an invalid argument.
    """
    eps = float(epsilon)
    if math.isnan(eps) or eps < 0.0:
        raise ConfigError(f"epsilon={epsilon!r} must be >= 0")
    m = float(mu)
    if math.isnan(m) or m < 0.0:
        raise ConfigError(f"mu={mu!r} must be >= 0")
    if m == 0.0:
        return 0.0
    if math.isinf(m):
        return 1.0
    if math.isinf(eps):
        return 0.0
    from scipy import stats

    first = float(stats.norm.cdf(-eps / m + m / 2.0))
    # e^eps * Phi(x) computed in log space so that a large epsilon cannot overflow.
    second = math.exp(eps + float(stats.norm.logcdf(-eps / m - m / 2.0)))
    return min(max(first - second, 0.0), 1.0)


def gdp_mu(*, epsilon: float, delta: float) -> float:
    """The largest GDP mu (to about 1e-14) whose :func:`gdp_delta` at ``epsilon`` is <= ``delta``.

    Brentq on ``gdp_delta(epsilon, mu) - delta`` (delta grows with mu), then moved down until
    the root is on the private side: a calibration from it never exceeds ``delta``.
    """

    def gap(mu: float) -> float:
        return gdp_delta(epsilon=epsilon, mu=mu) - delta

    lo, hi = 1e-3, 1.0
    for _ in range(200):
        if gap(hi) >= 0.0:
            break
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        if gap(lo) < 0.0:
            break
        hi, lo = lo, lo / 2.0
    from scipy import optimize

    mu = float(optimize.brentq(gap, lo, hi, xtol=1e-14, rtol=1e-14, maxiter=500))
    while gap(mu) > 0.0:
        mu *= 1.0 - 1e-12
    return mu


def gdp_epsilon(*, mu: float, delta: float) -> float:
    """The smallest epsilon (to about 1e-12) at which a mu-GDP mechanism meets ``delta``.

    0.0 if epsilon 0 already does; otherwise brentq on ``gdp_delta(eps, mu) - delta``, moved up
    until the root is on the private side: never below the exact epsilon.
    """

    def gap(eps: float) -> float:
        return gdp_delta(epsilon=eps, mu=mu) - delta

    if gap(0.0) <= 0.0:
        return 0.0
    hi = 1.0
    for _ in range(200):
        if gap(hi) <= 0.0:
            break
        hi *= 2.0
    from scipy import optimize

    eps = float(optimize.brentq(gap, 0.0, hi, xtol=1e-12, rtol=1e-14, maxiter=500))
    while gap(eps) > 0.0:
        eps = math.nextafter(eps, math.inf) * (1.0 + 1e-12)
    return eps


def pe_noise_multiplier(*, epsilon: float, delta: float, rounds: int) -> float:
    """Gaussian noise multiplier for ``rounds`` Private Evolution histograms under (eps, delta).

    Private Evolution (Lin et al. 2024, arXiv 2305.15560; Aug-PE, Xie et al. 2024): each round
    releases a nearest-neighbour vote histogram in which one private record casts one vote, so
    its add/remove L2 sensitivity is 1. T rounds with noise multiplier sigma are mu-GDP with
    ``mu = sqrt(T) / sigma``; this takes :func:`gdp_mu` at (epsilon, delta) and returns
    ``sqrt(T) / mu``.

    Args:
        epsilon: Target epsilon (> 0; ``math.inf`` returns 0.0, i.e. no noise).
        delta: Target delta in (0, 1).
        rounds: Number of PE rounds T (>= 1).

    Returns:
        The per-round noise multiplier sigma.

    Raises:
        ConfigError: On an invalid argument.
    """
    eps = _check_epsilon(epsilon)
    d = _check_delta(delta)
    t = _positive_int("rounds", rounds)
    if math.isinf(eps):
        return 0.0
    return math.sqrt(t) / gdp_mu(epsilon=eps, delta=d)


def pe_epsilon(*, noise_multiplier: float, delta: float, rounds: int) -> float:
    """Epsilon of ``rounds`` Private Evolution histograms with noise multiplier sigma.

    Same model as :func:`pe_noise_multiplier` (add/remove one record, L2 sensitivity 1 per
    round, mu-GDP with ``mu = sqrt(T) / sigma``); :func:`gdp_epsilon` of that mu.

    Args:
        noise_multiplier: Per-round noise multiplier sigma (>= 0; 0 gives inf).
        delta: Target delta in (0, 1).
        rounds: Number of PE rounds T (>= 1).

    Returns:
        The epsilon (0.0 if even epsilon 0 meets ``delta``).

    Raises:
        ConfigError: On an invalid argument.
    """
    sigma = _finite_nonneg("noise_multiplier", noise_multiplier)
    d = _check_delta(delta)
    t = _positive_int("rounds", rounds)
    if sigma == 0.0:
        return math.inf
    return gdp_epsilon(mu=math.sqrt(t) / sigma, delta=d)


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class PrivacyEvent:
    """One accounted release, for a privacy ledger or a report.

    Attributes:
        mechanism: ``"skellam"``, ``"gaussian"``, ``"local-skellam"``, ``"pe-gaussian"``, ...
        adjacency: The neighbouring relation, e.g. ``"add/remove"`` (record level).
        epsilon: Epsilon of the release (``math.inf`` for a non-private one).
        delta: Delta of the release.
        accountant: The accountant used, e.g. ``"dp-accounting RDP (integer orders 2..128, 256)"``.
        noise: Noise parameters, e.g. ``{"variance": ..., "l2_sensitivity": ...}``.
        compositions: Number of identical releases this event covers (>= 1).
    """

    mechanism: str
    adjacency: str
    epsilon: float
    delta: float
    accountant: str
    noise: dict[str, float]
    compositions: int

    def __post_init__(self) -> None:
        """Reject values that cannot describe a release."""
        if math.isnan(self.epsilon) or self.epsilon < 0.0:
            raise ConfigError(f"epsilon={self.epsilon!r} must be >= 0")
        if math.isnan(self.delta) or not (0.0 <= self.delta <= 1.0):
            raise ConfigError(f"delta={self.delta!r} must be in [0, 1]")
        _positive_int("compositions", self.compositions)

    def to_dict(self) -> dict[str, object]:
        """Plain dict of the event (``noise`` copied; ``math.inf`` kept as a float)."""
        return {
            "mechanism": self.mechanism,
            "adjacency": self.adjacency,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "noise": dict(self.noise),
            "compositions": self.compositions,
        }


@dataclass(frozen=True)
class VectorReleaseCalibration:
    """Noise for one per-class release of L unit-clipped layers in the scaled integer domain.

    The release also carries one count coordinate of weight gamma (``count_weight``).

    Attributes:
        mode: ``"distributed"``, ``"local"`` or ``"central"``.
        epsilon: Target epsilon of one per-class release.
        delta: Target delta.
        layers: Number of released layers L.
        dim: Total number of coordinates (``L * hidden + 1``, plus any padding).
        scale: Factor from the unit domain to the scaled integer domain.
        count_weight: Weight gamma of the count coordinate.
        l2_sensitivity: L2 sensitivity of one record in the scaled domain, rounding-inflated
            in every mode (see :func:`vector_record_sensitivity`).
        l1_sensitivity: L1 sensitivity of one record in the scaled domain (the Gaussian
            accountant of central mode does not use it).
        total_variance: Per-coordinate noise variance of the aggregate in the scaled domain
            (Skellam for distributed/local; ``(noise_multiplier * l2_sensitivity)^2`` for central).
        noise_multiplier: ``sqrt(total_variance) / l2_sensitivity``.
        epsilon_achieved: Epsilon the accountant gives for this noise (<= ``epsilon``).
        accountant: The accountant used.
    """

    mode: str
    epsilon: float
    delta: float
    layers: int
    dim: int
    scale: float
    count_weight: float
    l2_sensitivity: float
    l1_sensitivity: float
    total_variance: float
    noise_multiplier: float
    epsilon_achieved: float
    accountant: str

    def to_event(self) -> PrivacyEvent:
        """The :class:`PrivacyEvent` of this release, for a ledger."""
        mechanism = {
            TrustMode.DISTRIBUTED.value: "skellam",
            TrustMode.LOCAL.value: "local-skellam",
            TrustMode.CENTRAL.value: "gaussian",
        }[self.mode]
        return PrivacyEvent(
            mechanism=mechanism,
            adjacency="add/remove",
            epsilon=self.epsilon_achieved,
            delta=self.delta,
            accountant=self.accountant,
            noise={
                "variance": self.total_variance,
                "noise_multiplier": self.noise_multiplier,
                "l2_sensitivity": self.l2_sensitivity,
                "l1_sensitivity": self.l1_sensitivity,
                "scale": self.scale,
            },
            compositions=1,
        )


def calibrate_vector_release(
    *,
    mode: str,
    epsilon: float,
    delta: float,
    layers: int,
    dim: int,
    scale: float,
    count_weight: float,
) -> VectorReleaseCalibration:
    """Calibrate the noise of one per-class dataset-vector release.

    Sensitivity and adjacency (add/remove one record): one example contributes, for each of
    ``layers`` layers, a vector clipped to L2 norm 1, plus a count coordinate equal to
    ``count_weight`` (gamma), so its unit-domain L2 sensitivity is ``sqrt(layers + gamma^2)``.
    The coordinates are multiplied by ``scale`` and randomly rounded to integers.

    * distributed / local: Skellam mechanism (Agarwal, Kairouz, Liu 2021, arXiv 2110.04995)
      with the rounding-inflated ``l2 = rounded_l2_sensitivity(scaled_clip=scale * sqrt(layers
      + gamma^2), dim=dim)`` and ``l1 = rounded_l1_sensitivity(l2=l2, dim=dim)``; the aggregate
      variance comes from :func:`calibrate_skellam_variance` (RDP or the GDP certificate,
      whichever needs less). In distributed
      mode it is split among clients with :func:`~fedsynth.protocol.mechanisms.share_variance`;
      in local mode every client adds all of it to its own sum. Each record must be rounded on
      its own (conditionally, see :func:`rounded_l2_sensitivity`) before the integer sums.
    * central: Gaussian mechanism added by the TRUSTED coordinator after decoding, calibrated
      with :func:`calibrate_gaussian` (PLD, one release of the joint vector; equivalently the
      per-layer composition, since Gaussians compose by adding squared sensitivities). Clients
      still scale and round every record on its own before the secure sum, so one record moves
      the decoded sum by up to the same rounding-inflated ``l2`` as in the other modes; the
      noise is calibrated to that bound (``l1`` is stated for completeness, the Gaussian
      accountant does not use it).

    Different classes use disjoint records, so the per-class releases compose in parallel:
    the task's epsilon is the epsilon of one class's release. ``epsilon = math.inf`` gives a
    non-private release (no noise, ``epsilon_achieved = inf``).

    Args:
        mode: ``"distributed"``, ``"local"`` or ``"central"``.
        epsilon: Target epsilon of one per-class release (> 0 or ``math.inf``).
        delta: Target delta in (0, 1).
        layers: Number of released layers L (>= 1).
        dim: Total number of coordinates, ``L * hidden + 1`` (>= ``layers + 1``).
        scale: Unit-to-integer scale factor (> 0).
        count_weight: Weight gamma of the count coordinate (>= 0).

    Returns:
        The calibration.

    Raises:
        ConfigError: On an invalid argument.
    """
    try:
        trust = TrustMode(mode)
    except ValueError:
        allowed = ", ".join(m.value for m in TrustMode)
        raise ConfigError(f"mode={mode!r} must be one of: {allowed}") from None
    validate_epsilon_delta(epsilon=epsilon, delta=delta)
    n_layers = _positive_int("layers", layers)
    n_dim = _positive_int("dim", dim)
    if n_dim < n_layers + 1:
        raise ConfigError(f"dim={dim} must be at least layers + 1 = {n_layers + 1}")
    s = _finite_pos("scale", scale)
    gamma = _finite_nonneg("count_weight", count_weight)
    eps = float(epsilon)
    d = float(delta)
    l2, l1 = vector_record_sensitivity(scale=s, layers=n_layers, count_weight=gamma, dim=n_dim)

    if trust is TrustMode.CENTRAL:
        sigma = calibrate_gaussian(epsilon=eps, delta=d, compositions=1, accountant="pld")
        variance = (sigma * l2) ** 2
        achieved = gaussian_epsilon(noise_multiplier=sigma, delta=d, accountant="pld")
        accountant = _PLD_ACCOUNTANT_NAME
    else:
        variance = calibrate_skellam_variance(epsilon=eps, delta=d, l1=l1, l2=l2)
        sigma = math.sqrt(variance) / l2
        achieved, accountant = _skellam_accounted(
            l1=l1, l2=l2, variance=variance, delta=d, compositions=1
        )
    return VectorReleaseCalibration(
        mode=trust.value,
        epsilon=eps,
        delta=d,
        layers=n_layers,
        dim=n_dim,
        scale=s,
        count_weight=gamma,
        l2_sensitivity=l2,
        l1_sensitivity=l1,
        total_variance=variance,
        noise_multiplier=sigma,
        epsilon_achieved=achieved,
        accountant=accountant,
    )


# --------------------------------------------------------------------------- PE histograms


@dataclass(frozen=True)
class PECalibration:
    """Noise of the T vote histograms of one federated Private Evolution task.

    Attributes:
        mode: ``"distributed"``, ``"local"`` or ``"central"``.
        epsilon: Target epsilon of the whole task (all T rounds).
        delta: Target delta of the whole task.
        rounds: Number of histogram releases T.
        top_k: Votes per private example (distinct candidates).
        l2_sensitivity: ``sqrt(top_k)`` (add/remove one example).
        l1_sensitivity: ``top_k``.
        total_variance: Per-coordinate variance of the aggregate noise of one round, in votes
            (in local mode: of one client's noise).
        noise_multiplier: ``sqrt(total_variance) / l2_sensitivity``.
        epsilon_achieved: Epsilon of the T rounds for this noise (<= ``epsilon``).
        gdp_epsilon: Central mode only: the closed-form GDP epsilon of the same noise (the
            cross-check used by the PE papers); ``nan`` otherwise.
        accountant: The accountant used.
    """

    mode: str
    epsilon: float
    delta: float
    rounds: int
    top_k: int
    l2_sensitivity: float
    l1_sensitivity: float
    total_variance: float
    noise_multiplier: float
    epsilon_achieved: float
    gdp_epsilon: float
    accountant: str

    def to_event(self) -> PrivacyEvent:
        """The :class:`PrivacyEvent` of all T rounds, for a ledger."""
        mechanism = {
            TrustMode.DISTRIBUTED.value: "pe-skellam",
            TrustMode.LOCAL.value: "pe-local-skellam",
            TrustMode.CENTRAL.value: "pe-gaussian",
        }[self.mode]
        return PrivacyEvent(
            mechanism=mechanism,
            adjacency="add/remove",
            epsilon=self.epsilon_achieved,
            delta=self.delta,
            accountant=self.accountant,
            noise={
                "variance": self.total_variance,
                "noise_multiplier": self.noise_multiplier,
                "l2_sensitivity": self.l2_sensitivity,
                "l1_sensitivity": self.l1_sensitivity,
            },
            compositions=self.rounds,
        )


def _pe_noise_std_to_epsilon(
    trust: TrustMode, *, std: float, delta: float, rounds: int, top_k: int, clients: int
) -> float:
    """Epsilon of T rounds whose aggregate noise has per-coordinate std ``std`` (votes)."""
    l2 = math.sqrt(top_k)
    if std <= 0:
        return math.inf
    if trust is TrustMode.CENTRAL:
        return gaussian_epsilon(
            noise_multiplier=std / l2, delta=delta, compositions=rounds, accountant="pld"
        )
    # Local mode: K clients each add the full variance, so the sum has K times it; the
    # guarantee itself comes from one client's share.
    per_client = std**2 / (clients if trust is TrustMode.LOCAL else 1)
    return skellam_epsilon(
        l1=float(top_k), l2=l2, variance=per_client, delta=delta, compositions=rounds
    )


def calibrate_pe(
    *, mode: str, epsilon: float, delta: float, rounds: int, top_k: int = 1
) -> PECalibration:
    """Calibrate the per-round histogram noise of a federated PE task from (epsilon, delta, T).

    Each private example gives one vote to each of its ``top_k`` nearest candidates of its
    label, so one example changes the histogram by L2 ``sqrt(top_k)`` and L1 ``top_k``
    (add/remove adjacency). The T rounds are composed by a library accountant:

    * central: Gaussian noise added by the coordinator; T-fold composition with dp-accounting's
      PLD accountant (matches the closed-form mu-GDP composition mu = sqrt(T)/sigma used by PE
      and Aug-PE to 8 digits; reported as ``gdp_epsilon``).
    * distributed / local: Skellam noise (Agarwal, Kairouz, Liu 2021) on the integer votes, T-fold
      composition accounted as in :func:`skellam_epsilon` (RDP converted with dp-accounting, or
      the GDP certificate where it is tighter). Distributed: the aggregate variance is split
      among the t clients a round needs; local: every client adds all of it.

    ``epsilon = math.inf`` gives no noise.
    """
    try:
        trust = TrustMode(mode)
    except ValueError:
        allowed = ", ".join(m.value for m in TrustMode)
        raise ConfigError(f"mode={mode!r} must be one of: {allowed}") from None
    validate_epsilon_delta(epsilon=epsilon, delta=delta)
    t_rounds = _positive_int("rounds", rounds)
    k = _positive_int("top_k", top_k)
    eps, d = float(epsilon), float(delta)
    l2, l1 = math.sqrt(k), float(k)
    gdp = math.nan
    if math.isinf(eps):
        variance, achieved = 0.0, math.inf
        accountant = "none (epsilon = inf)"
    elif trust is TrustMode.CENTRAL:
        sigma = calibrate_gaussian(epsilon=eps, delta=d, compositions=t_rounds, accountant="pld")
        variance = (sigma * l2) ** 2
        achieved = gaussian_epsilon(
            noise_multiplier=sigma, delta=d, compositions=t_rounds, accountant="pld"
        )
        gdp = pe_epsilon(noise_multiplier=sigma, delta=d, rounds=t_rounds)
        accountant = _PLD_ACCOUNTANT_NAME
    else:
        variance = calibrate_skellam_variance(
            epsilon=eps, delta=d, l1=l1, l2=l2, compositions=t_rounds
        )
        achieved, accountant = _skellam_accounted(
            l1=l1, l2=l2, variance=variance, delta=d, compositions=t_rounds
        )
    return PECalibration(
        mode=trust.value,
        epsilon=eps,
        delta=d,
        rounds=t_rounds,
        top_k=k,
        l2_sensitivity=l2,
        l1_sensitivity=l1,
        total_variance=variance,
        noise_multiplier=math.sqrt(variance) / l2,
        epsilon_achieved=achieved,
        gdp_epsilon=gdp,
        accountant=accountant,
    )


def pe_aggregate_noise_std(calibration: PECalibration, *, clients: int) -> float:
    """Per-coordinate noise std of the summed histogram the coordinator sees (votes).

    Distributed mode is calibrated for t survivors: with exact noise sharing (the default) the
    sum carries exactly this for any number of survivors once their excess is removed, with
    plain shares at least this. Local mode: every one of ``clients`` adds the full variance.
    """
    factor = clients if calibration.mode == TrustMode.LOCAL.value else 1
    return math.sqrt(calibration.total_variance * factor)


def pe_min_workable_epsilon(
    *,
    mode: str,
    delta: float,
    rounds: int,
    top_k: int,
    per_label: int,
    records_per_label: int,
    clients: int,
    signal_to_noise: float = 2.0,
) -> float:
    """Smallest epsilon at which an average candidate's votes stand out of the noise.

    Workable means: the mean votes per candidate, ``records_per_label * top_k / per_label``
    (records_per_label is a public planning figure, e.g. the holders' declared sizes), is at
    least ``signal_to_noise`` times the aggregate noise std. Below that, selection is mostly
    noise and the budget is wasted. Computed exactly by the accountant at that noise.
    """
    try:
        trust = TrustMode(mode)
    except ValueError:
        raise ConfigError(f"mode={mode!r} is not a trust mode") from None
    if records_per_label < 1 or per_label < 1:
        raise ConfigError("records_per_label and per_label must be >= 1")
    _positive_int("top_k", top_k)
    _positive_int("rounds", rounds)
    _positive_int("clients", clients)
    _finite_pos("signal_to_noise", signal_to_noise)
    mean_votes = records_per_label * top_k / per_label
    std = mean_votes / signal_to_noise
    return _pe_noise_std_to_epsilon(
        trust, std=std, delta=delta, rounds=rounds, top_k=top_k, clients=clients
    )
