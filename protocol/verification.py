"""Holder-side verification of a manifest's privacy terms, recomputed from its public fields.

A data holder never takes a privacy term on the coordinator's word. Before it generates a key
or computes anything from its records, it recomputes with its own accountant
(:mod:`fedsynth.protocol.accounting`):

* the sensitivity of one record (add/remove adjacency): for a dataset-vector task, the
  rounding-inflated L2 bound of one scaled, individually rounded record
  (:func:`~fedsynth.protocol.accounting.vector_record_sensitivity`, Agarwal, Kairouz, Liu 2021,
  arXiv 2110.04995) and its L1 bound; for a Private Evolution round, ``sqrt(top_k)`` and
  ``top_k`` votes;
* the epsilon that the manifest's stated noise variance gives at that sensitivity, for the
  manifest's mode, delta and (PE) number of rounds T: Skellam (the tighter of RDP and the
  GDP certificate) for distributed and local mode, the Gaussian PLD accountant for central
  mode;

and refuses the manifest if a stated sensitivity is below the recomputed one, if the stated
variance gives an epsilon above the stated epsilon, if the noise multiplier does not match the
variance, or if the fixed-point scale is so coarse that rounding inflates a record's bound by
more than :data:`~fedsynth.protocol.accounting.MAX_ROUNDING_INFLATION`. Only float round-off is
tolerated (:data:`REL_TOL`).

Because each client adds exactly the variance share the manifest states
(:func:`~fedsynth.protocol.contribution.noise_share_variance`), a manifest that passes here
means the noise actually added to the secure sum delivers the stated epsilon in distributed
mode (for any t surviving honest clients) and local mode (for each client's own sum).

Central mode: the holder cannot see the coordinator's noise. Verification still checks the
stated numbers, but the guarantee then rests on a TRUSTED COORDINATOR adding that noise; a
holder that does not trust the coordinator must not allow central mode in its policy.

``epsilon = inf`` (a non-private task) has nothing to verify; whether a holder takes part in one
is its own policy's decision, not this module's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from fedsynth.protocol.accounting import (
    MAX_ROUNDING_INFLATION,
    calibrate_gaussian,
    calibrate_skellam_variance,
    gaussian_epsilon,
    min_vector_scale,
    rounding_inflation,
    skellam_epsilon,
    vector_record_sensitivity,
)
from fedsynth.protocol.errors import (
    AdjacencyMismatchError,
    InconsistentNoiseError,
    NoiseTooLowError,
    ScaleTooSmallError,
    SensitivityUnderstatedError,
)
from fedsynth.protocol.manifest import ADJACENCY, PrivacySpec, TaskManifest
from fedsynth.protocol.mechanisms import TrustMode
from fedsynth.protocol.pe_manifest import PE_ADJACENCY, PERoundManifest

__all__ = [
    "REL_TOL",
    "VerifiedTerms",
    "check_adjacency",
    "check_vector_scale",
    "stated_noise_epsilon",
    "verify_manifest",
    "verify_pe_manifest",
    "verify_task_manifest",
]

REL_TOL = 1e-9
"""Relative tolerance for float round-off between the coordinator's and the holder's numbers."""


@dataclass(frozen=True)
class VerifiedTerms:
    """What the holder recomputed for a manifest it accepted.

    Attributes:
        l2_sensitivity: Recomputed L2 sensitivity of one record (add/remove).
        l1_sensitivity: Recomputed L1 sensitivity of one record.
        epsilon: Epsilon the stated noise gives at the recomputed sensitivity (``math.inf``
            for a non-private task).
        trusted_coordinator: True in central mode, where the noise is the coordinator's to add
            and the holder cannot check that it does.
    """

    l2_sensitivity: float
    l1_sensitivity: float
    epsilon: float
    trusted_coordinator: bool


def check_vector_scale(*, scale: float, layers: int, count_weight: float, row_dim: int) -> None:
    """Refuse a fixed-point scale whose rounding inflates a record's L2 bound beyond 0.1 %.

    Args:
        scale: The task's fixed-point scale.
        layers: Number of released layers L.
        count_weight: Weight gamma of the count coordinate.
        row_dim: Coordinates of one class row (``L * hidden + 1``).

    Raises:
        ScaleTooSmallError: Naming the scale, the minimum for these dimensions and the limit.
    """
    minimum = min_vector_scale(layers=layers, count_weight=count_weight, dim=row_dim)
    if scale < minimum * (1.0 - REL_TOL):
        inflation = rounding_inflation(
            scale=scale, layers=layers, count_weight=count_weight, dim=row_dim
        )
        raise ScaleTooSmallError(
            f"scale={scale!r} is below the minimum {minimum:.6g} for {layers} layers and "
            f"{row_dim} coordinates per class row (count_weight={count_weight!r}): rounding "
            f"would inflate a record's L2 bound by {100 * inflation:.3g} %, above the limit "
            f"of {100 * MAX_ROUNDING_INFLATION:g} %"
        )


@functools.lru_cache(maxsize=256)
def _central_epsilon(noise_multiplier: float, delta: float, compositions: int) -> float:
    """Gaussian PLD epsilon (cached: a PE task checks the same terms every round).

    The PLD accountant cannot represent a tiny noise multiplier (its loss grid explodes); the
    RDP accountant, an upper bound on the PLD epsilon, answers then.
    """
    try:
        return gaussian_epsilon(
            noise_multiplier=noise_multiplier,
            delta=delta,
            compositions=compositions,
            accountant="pld",
        )
    except (ValueError, MemoryError, OverflowError):
        return gaussian_epsilon(
            noise_multiplier=noise_multiplier,
            delta=delta,
            compositions=compositions,
            accountant="rdp",
        )


def stated_noise_epsilon(
    privacy: PrivacySpec, *, l2: float, l1: float, compositions: int = 1
) -> float:
    """Epsilon that the manifest's stated variance gives at the given (recomputed) sensitivity.

    distributed / local: Skellam (Agarwal, Kairouz, Liu 2021) with aggregate variance
    ``total_variance`` (distributed: the sum of any t shares of ``total_variance / t``; local:
    each client's own noise), accounted as :func:`skellam_epsilon` does (RDP or the GDP
    certificate, whichever is tighter). central: Gaussian with noise multiplier
    ``sqrt(total_variance) / l2``, PLD accountant. Add/remove adjacency of one record;
    ``compositions`` identical releases (PE rounds).

    Returns:
        The epsilon (``math.inf`` when the variance is 0).
    """
    variance = privacy.total_variance
    if variance <= 0.0:
        return math.inf
    if TrustMode(privacy.mode) is TrustMode.CENTRAL:
        return _central_epsilon(math.sqrt(variance) / l2, privacy.delta, compositions)
    return skellam_epsilon(
        l1=l1, l2=l2, variance=variance, delta=privacy.delta, compositions=compositions
    )


def _required_variance(privacy: PrivacySpec, *, l2: float, l1: float, compositions: int) -> float:
    """The variance the holder's own accountant needs (for the refusal message only)."""
    if TrustMode(privacy.mode) is TrustMode.CENTRAL:
        sigma = calibrate_gaussian(
            epsilon=privacy.epsilon, delta=privacy.delta, compositions=compositions
        )
        return (sigma * l2) ** 2
    return calibrate_skellam_variance(
        epsilon=privacy.epsilon, delta=privacy.delta, l1=l1, l2=l2, compositions=compositions
    )


def check_adjacency(privacy: PrivacySpec, expected: str) -> None:
    """Refuse a manifest naming another neighbouring relation than the holder accounts for.

    The sensitivity the holder recomputes is for ``expected`` (add/remove one record); the
    release repeats the manifest's label as its guarantee, so a manifest calibrated for
    add/remove but labelled, say, replace-one (which needs about twice the sensitivity) would
    have the holders endorse a guarantee the noise does not give.

    Raises:
        AdjacencyMismatchError: ``privacy.adjacency`` is not exactly ``expected``.
    """
    if privacy.adjacency != expected:
        raise AdjacencyMismatchError(
            f"privacy.adjacency={privacy.adjacency!r}: this holder recomputes the sensitivity "
            f"for {expected!r} and accepts no other relation"
        )


def _check_privacy_terms(
    privacy: PrivacySpec, *, l2: float, l1: float, compositions: int, what: str
) -> VerifiedTerms:
    """Compare a finite-epsilon privacy spec with the recomputed sensitivities and accountant."""
    for name, stated, required in (
        ("l2_sensitivity", privacy.l2_sensitivity, l2),
        ("l1_sensitivity", privacy.l1_sensitivity, l1),
    ):
        if not math.isfinite(stated):
            # More than the bound is conservative, but an infinite one would be stated with a
            # noise multiplier of 0 and published so.
            raise InconsistentNoiseError(f"privacy.{name}={stated!r}: must be finite")
        if not stated >= required * (1.0 - REL_TOL):
            raise SensitivityUnderstatedError(
                f"privacy.{name}={stated!r} is below the bound of one record that this holder "
                f"recomputes for {what}: {required!r}"
            )
    expected_multiplier = math.sqrt(privacy.total_variance) / privacy.l2_sensitivity
    if not math.isclose(privacy.noise_multiplier, expected_multiplier, rel_tol=REL_TOL):
        raise InconsistentNoiseError(
            f"privacy.noise_multiplier={privacy.noise_multiplier!r} does not match "
            f"sqrt(total_variance) / l2_sensitivity = {expected_multiplier!r}"
        )
    central = TrustMode(privacy.mode) is TrustMode.CENTRAL
    required = math.nan
    clearly_low = False
    if central:
        # Epsilon falls as the noise grows: a multiplier clearly below the one the holder's
        # own calibration needs (Brent tolerance 1e-6) is refused without the slow accountant.
        required = _required_variance(privacy, l2=l2, l1=l1, compositions=compositions)
        required_multiplier = math.sqrt(required) / l2
        clearly_low = math.sqrt(privacy.total_variance) / l2 < required_multiplier - 1e-5
    if clearly_low:
        achieved = math.inf
    else:
        achieved = stated_noise_epsilon(privacy, l2=l2, l1=l1, compositions=compositions)
    if not achieved <= privacy.epsilon * (1.0 + REL_TOL):
        if not central:
            required = _required_variance(privacy, l2=l2, l1=l1, compositions=compositions)
        shown = "far more than that" if math.isinf(achieved) else f"epsilon={achieved:.6g}"
        raise NoiseTooLowError(
            f"privacy.total_variance={privacy.total_variance!r} is too little noise for "
            f"epsilon={privacy.epsilon!r}, delta={privacy.delta!r} in {privacy.mode} mode "
            f"({what}): it gives {shown}; this holder's accountant requires "
            f"total_variance >= {required:.6g}"
        )
    return VerifiedTerms(
        l2_sensitivity=l2,
        l1_sensitivity=l1,
        epsilon=achieved,
        trusted_coordinator=TrustMode(privacy.mode) is TrustMode.CENTRAL,
    )


def verify_task_manifest(manifest: TaskManifest) -> VerifiedTerms:
    """Recompute and check the privacy terms of a dataset-vector task manifest.

    Sensitivity (add/remove one record, in every mode since clients round every record):
    :func:`~fedsynth.protocol.accounting.vector_record_sensitivity` of the manifest's scale,
    number of layers, count weight and class-row dimension. One per-class release is accounted
    (classes hold disjoint records and compose in parallel). In central mode the noise is added
    by a trusted coordinator; only its stated amount is checked.

    Raises:
        ScaleTooSmallError: The scale inflates a record's bound by more than 0.1 %.
        AdjacencyMismatchError: The manifest names another neighbouring relation.
        SensitivityUnderstatedError: A stated sensitivity is below the recomputed bound.
        InconsistentNoiseError: The noise multiplier does not match variance and sensitivity,
            or a stated sensitivity is not finite.
        NoiseTooLowError: The stated variance gives more than the stated epsilon.
    """
    n_layers = len(manifest.layers)
    privacy = manifest.privacy
    check_adjacency(privacy, ADJACENCY)
    if math.isinf(privacy.epsilon):
        return VerifiedTerms(
            l2_sensitivity=math.nan,
            l1_sensitivity=math.nan,
            epsilon=math.inf,
            trusted_coordinator=TrustMode(privacy.mode) is TrustMode.CENTRAL,
        )
    check_vector_scale(
        scale=manifest.scale,
        layers=n_layers,
        count_weight=manifest.count_weight,
        row_dim=manifest.row_dim,
    )
    l2, l1 = vector_record_sensitivity(
        scale=manifest.scale,
        layers=n_layers,
        count_weight=manifest.count_weight,
        dim=manifest.row_dim,
    )
    what = (
        f"scale={manifest.scale!r}, {n_layers} layers, count_weight={manifest.count_weight!r}, "
        f"{manifest.row_dim} coordinates per class row"
    )
    return _check_privacy_terms(privacy, l2=l2, l1=l1, compositions=1, what=what)


def verify_pe_manifest(manifest: PERoundManifest) -> VerifiedTerms:
    """Recompute and check the privacy terms of one round of a federated PE task.

    Sensitivity (add/remove one record): one record votes once for each of ``top_k`` distinct
    candidates of its label, so L2 ``sqrt(top_k)`` and L1 ``top_k`` per round; the stated
    per-round variance must give at most the stated epsilon over all T = ``rounds`` rounds
    (Skellam RDP composition in distributed/local mode, Gaussian PLD in central mode, where the
    coordinator adding the noise is trusted).

    Raises:
        AdjacencyMismatchError: The manifest names another neighbouring relation.
        SensitivityUnderstatedError: A stated sensitivity is below the recomputed bound.
        InconsistentNoiseError: The noise multiplier does not match variance and sensitivity,
            or a stated sensitivity is not finite.
        NoiseTooLowError: The stated variance gives more than the stated epsilon over T rounds.
    """
    privacy = manifest.privacy
    check_adjacency(privacy, PE_ADJACENCY)
    if math.isinf(privacy.epsilon):
        return VerifiedTerms(
            l2_sensitivity=math.nan,
            l1_sensitivity=math.nan,
            epsilon=math.inf,
            trusted_coordinator=TrustMode(privacy.mode) is TrustMode.CENTRAL,
        )
    what = f"top_k={manifest.top_k} votes per record, T={manifest.rounds} rounds"
    return _check_privacy_terms(
        privacy,
        l2=math.sqrt(manifest.top_k),
        l1=float(manifest.top_k),
        compositions=manifest.rounds,
        what=what,
    )


def verify_manifest(manifest: TaskManifest | PERoundManifest) -> VerifiedTerms:
    """Verify a dataset-vector or PE round manifest (see the two functions it dispatches to)."""
    if isinstance(manifest, PERoundManifest):
        return verify_pe_manifest(manifest)
    return verify_task_manifest(manifest)
