"""The distributed release's noise: what exact sharing costs and how close it comes to central.

Measured side by side in one process, at the default model's release size (2 classes × (4
layers × 640 + 1 count) coordinates: d = 5,122) and at the secure-sum benchmark's d = 65,537:

1. a holder's noise share under exact sharing (a base part plus seeded components: K − t on
   the ladder, six binary blocks beyond K = 26, :mod:`fedsynth.protocol.exact_noise`) against
   a plain share of the same variance v/t;
2. the coordinator's excess removal when all K survive, when one holder dropped (the
   ladder's costliest case: K − 1 survivors × (K − 1 − t) components) and, with blocks, at the
   survivor count that removes the most draws, both ways: redrawn from the revealed seeds and
   from the sums the survivors upload (decode and subtract their vectors), against the secure
   sum's own coordinator target (2 s at K = 100, d = 65,537, which ``bench_secagg`` measures
   without noise); with the survivor's side of an upload (drawing and encoding its sum) and
   its size against the masked vector's;
3. σ/Δ of the distributed release (exact sharing leaves the target variance: exactly on the
   ladder, within 1 + 1/50 with blocks, whose worst case per K is printed) against
   central EPSVec's Gaussian at the same ε, δ: the gap left is the accountant's (the Skellam
   mechanism's GDP certificate, :mod:`fedsynth.protocol.skellam_gdp`, against PLD for the
   Gaussian) and, with blocks, the kept variance's excess. Target ≤ 1.02×.

Run: python benchmarks/bench_noise.py [--quick]
"""

from __future__ import annotations

import math
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: benchmarks.common
from benchmarks.common import Figure, compared, info, run_script
from fedsynth.protocol.accounting import VectorReleaseCalibration, calibrate_vector_release
from fedsynth.protocol.contribution import remove_excess_noise, share_noise
from fedsynth.protocol.exact_noise import (
    SEED_BYTES,
    NoiseSchedule,
    excess_noise,
    removal_mode,
    revealed_seed,
)
from fedsynth.protocol.manifest import NOISE_EXACT, PrivacySpec
from fedsynth.protocol.messages import ints_from_bytes, ints_to_bytes
from fedsynth.server.secure_round import default_threshold

LAYERS, HIDDEN = 4, 640  # the default model's released layers and width
RELEASE_DIM = 2 * (LAYERS * HIDDEN + 1)
SECAGG_DIM = 65_537
FULL_KS = (10, 50, 100)
QUICK_KS = (5, 10)
QUICK_DIM = 4_096
EPSILONS = (1.0, 4.0, 8.0)
DELTA = 1e-5
SCALE, COUNT_WEIGHT = 1000.0, 0.5  # the coordinator's defaults (server/coordinator.py)


def calibration(mode: str, epsilon: float) -> VectorReleaseCalibration:
    """The coordinator's calibration of a default-model release in ``mode`` at ``epsilon``."""
    return calibrate_vector_release(
        mode=mode,
        epsilon=epsilon,
        delta=DELTA,
        layers=LAYERS,
        dim=LAYERS * HIDDEN + 1,
        scale=SCALE,
        count_weight=COUNT_WEIGHT,
    )


def privacy(clients: int, *, epsilon: float = 4.0, sharing: str = NOISE_EXACT) -> PrivacySpec:
    """The distributed terms of a default-model release among ``clients`` holders."""
    c = calibration("distributed", epsilon)
    return PrivacySpec(
        epsilon=epsilon,
        delta=DELTA,
        mode="distributed",
        threshold=default_threshold(clients),
        total_variance=c.total_variance,
        noise_multiplier=c.noise_multiplier,
        l2_sensitivity=c.l2_sensitivity,
        l1_sensitivity=c.l1_sensitivity,
        accountant=c.accountant,
        noise_sharing=sharing,
    )


@dataclass(frozen=True)
class Removal:
    """The coordinator's excess removal for one survivor count, both ways, and an upload's cost."""

    survivors: int
    components: int  # removed per survivor (1 when all survive: the whole-round component)
    seeds_s: float
    upload_s: float
    upload_holder_s: float
    upload_bytes: int
    auto: str


@dataclass(frozen=True)
class NoiseCost:
    """Seconds of one holder's share (exact and plain) and of the coordinator's removal."""

    clients: int
    dim: int
    threshold: int
    exact_share_s: float
    plain_share_s: float
    removals: tuple[Removal, ...]  # all surviving, one dropped (where t < K - 1), costliest
    components: int = 0  # seeded components per holder
    worst_kept_sigma: float = 1.0  # max over survivor counts of sqrt(kept / target)


def _best(seconds: list[float]) -> float:
    return min(seconds)


def measure_removal(spec: PrivacySpec, clients: int, survivors: int, dim: int) -> Removal:
    """Remove every survivor's excess from seeds and from uploads; one survivor's upload."""
    schedule = NoiseSchedule(spec.total_variance, spec.threshold, clients)
    nodes = list(range(1, survivors + 1))
    revealed = {
        node: revealed_seed(secrets.token_bytes(SEED_BYTES), schedule, survivors) for node in nodes
    }
    field_sum = np.zeros(dim, dtype=np.uint64)
    start = time.perf_counter()
    _, removed = remove_excess_noise(
        field_sum, revealed, privacy=spec, clients=clients, survivors=nodes, bits=64
    )
    seeds_s = time.perf_counter() - start
    if survivors > spec.threshold and len(removed) != survivors:
        raise RuntimeError(f"removed the excess of {len(removed)} of {survivors} survivors")
    # Uploads: one survivor draws and encodes its sum; the coordinator decodes s of that size.
    start = time.perf_counter()
    own = excess_noise(secrets.token_bytes(SEED_BYTES), schedule, survivors, dim)
    payload = ints_to_bytes(own if own is not None else np.zeros(dim, dtype=np.int64))
    holder_s = time.perf_counter() - start
    start = time.perf_counter()
    uploaded = {node: ints_from_bytes(payload, length=dim) for node in nodes}
    remove_excess_noise(
        field_sum,
        {},
        privacy=spec,
        clients=clients,
        survivors=nodes,
        bits=64,
        uploaded=uploaded,
    )
    upload_s = time.perf_counter() - start
    return Removal(
        survivors,
        len(schedule.removed(survivors)),
        seeds_s,
        upload_s,
        holder_s,
        len(payload),
        removal_mode("auto", schedule, survivors, dim),
    )


def measure(clients: int, dim: int, *, repeats: int = 3) -> NoiseCost:
    """Time one holder's share both ways and the removal of every survivor's excess."""
    spec = privacy(clients)
    plain = privacy(clients, sharing="plain")
    rng = np.random.default_rng(secrets.randbits(128))
    exact_s, plain_s = [], []
    for _ in range(repeats):
        top = secrets.token_bytes(SEED_BYTES)
        start = time.perf_counter()
        share_noise(spec, clients=clients, dim=dim, rng=rng, noise_seed=top)
        exact_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        share_noise(plain, clients=clients, dim=dim, rng=rng, noise_seed=None)
        plain_s.append(time.perf_counter() - start)
    counts = [clients] + ([clients - 1] if clients - 1 > spec.threshold else [])
    schedule = NoiseSchedule(spec.total_variance, spec.threshold, clients)
    costliest = max(
        range(spec.threshold + 1, clients + 1), key=lambda s: s * len(schedule.removed(s))
    )
    if schedule.uses_blocks and costliest not in counts:
        counts.append(costliest)  # with blocks, the most draws may be at another count
    return NoiseCost(
        clients,
        dim,
        spec.threshold,
        _best(exact_s),
        _best(plain_s),
        tuple(measure_removal(spec, clients, s, dim) for s in counts),
        len(schedule.components),
        max(
            math.sqrt(s * schedule.kept_variance(s) / spec.total_variance)
            for s in range(spec.threshold, clients + 1)
        ),
    )


def sigma_ratio(epsilon: float) -> tuple[float, float]:
    """σ/Δ of the distributed release (exact sharing) and of central EPSVec at ``epsilon``."""
    return (
        calibration("distributed", epsilon).noise_multiplier,
        calibration("central", epsilon).noise_multiplier,
    )


def figures(quick: bool) -> list[Figure]:
    """Holder share and coordinator removal seconds per K and d; σ/Δ against central."""
    ks = QUICK_KS if quick else FULL_KS
    dims = (QUICK_DIM,) if quick else (RELEASE_DIM, SECAGG_DIM)
    out: list[Figure] = []
    for dim in dims:
        for k in ks:
            cost = measure(k, dim, repeats=1 if quick else 3)
            where = f"K={k}, t={cost.threshold}, d={dim:,}"
            out.append(
                info(
                    "noise",
                    f"holder noise share, exact vs plain sharing ({where})",
                    cost.exact_share_s,
                    "s",
                    baseline=cost.plain_share_s,
                    note=f"{cost.components} seeded components plus the base part",
                )
            )
            out.append(
                info(
                    "noise",
                    f"noise kept per survivor count, worst σ over the target ({where})",
                    cost.worst_kept_sigma,
                    "×",
                    note="binary blocks (K > 26) keep up to 1 + 1/50 of the target variance "
                    "between the ends; the ladder exactly the target",
                )
            )
            for removal in cost.removals:
                s = removal.survivors
                survive = "all survive" if s == k else f"{k - s} dropped"
                out.append(
                    info(
                        "noise",
                        f"coordinator excess removal, {survive}, from seeds ({where})",
                        removal.seeds_s,
                        "s",
                        target="part of the coordinator's round time (bench_secagg: < 2 s)",
                        note=f"{s} survivors × {removal.components} components redrawn"
                        + (" (the whole-round one)" if s == k and removal.components == 1 else ""),
                    )
                )
                out.append(
                    info(
                        "noise",
                        f"coordinator excess removal, {survive}, from uploads ({where})",
                        removal.upload_s,
                        "s",
                        baseline=removal.seeds_s,
                        target="part of the coordinator's round time (bench_secagg: < 2 s)",
                        note=f"{s} uploads decoded and subtracted; baseline: from seeds; "
                        f"'auto' picks {removal.auto} here",
                    )
                )
            # the costliest case to redraw: one dropped on the ladder, a count chosen above
            # with blocks
            dropped = max(
                cost.removals[1:] or cost.removals, key=lambda r: r.survivors * r.components
            )
            out.append(
                info(
                    "noise",
                    f"survivor's excess upload: draw and encode ({where}, "
                    f"{dropped.survivors} survive)",
                    dropped.upload_holder_s,
                    "s",
                    baseline=cost.exact_share_s,
                    note="baseline: its whole exact share at masked input",
                )
            )
            out.append(
                info(
                    "noise",
                    f"survivor's excess upload, bytes ({where}, {dropped.survivors} survive)",
                    dropped.upload_bytes,
                    "B",
                    baseline=8 * dim,
                    note="baseline: the masked vector (64-bit field)",
                )
            )
    for epsilon in EPSILONS:
        distributed, central = sigma_ratio(epsilon)
        out.append(
            compared(
                "noise",
                f"σ/Δ distributed (exact sharing, any survivors) vs central, ε={epsilon:g}",
                distributed,
                "",
                baseline=central,
                at_most=1.02,
                note="Skellam: GDP certificate (or RDP if tighter); central Gaussian: PLD",
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the figures (``--quick``: small sizes)."""
    return run_script(__doc__ or "", figures, argv)


if __name__ == "__main__":
    sys.exit(main())
