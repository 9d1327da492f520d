"""Records per class a release needs before the signal-share cut lets its steering in.

From a noiseless release (ε = ∞: its class vectors are the noise-free signal) and the noise
each ε calibrates to, this solves, per class and layer, for the number of records n at which
the expected factor squared of the SNR rule reaches the cut (``min_signal_share``, 1/2 by
default): with observed energy ``S + H s²``, ``s = m σ / (scale n)`` and ``U = s² q`` (q the
chi-square quantile the rule uses), ``1 − U / (S + H s²) = c`` gives
``s² = (1 − c) S / (q − (1 − c) H)``. Public arithmetic on a release; nothing is generated.

Run: python benchmarks/signal_share_records.py RELEASE.safetensors [--epsilon 1 --epsilon 4]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import chi2


def records_needed(
    release: Any, *, mode: str, epsilon: float, delta: float, cut: float
) -> tuple[float, list[tuple[str, int, float, float]]]:
    """σ/Δ at ``epsilon``, and per class and layer: (label, layer, signal energy, records).

    ``release`` must be noiseless: its class directions are the signal.
    """
    from fedsynth.protocol.accounting import calibrate_vector_release
    from fedsynth.server.snr import DEFAULT_LEVEL

    manifest = release.manifest
    hidden = manifest.hidden_size
    quantile = float(chi2.ppf(1.0 - DEFAULT_LEVEL, hidden))
    calibration = calibrate_vector_release(
        mode=mode,
        epsilon=epsilon,
        delta=delta,
        layers=len(manifest.layers),
        dim=len(manifest.layers) * hidden + 1,
        scale=manifest.scale,
        count_weight=manifest.count_weight,
    )
    sd = math.sqrt(calibration.total_variance) / manifest.scale
    out = []
    for label in release.labels:
        directions = release.directions(label, contrast=1.0)
        for j, layer in enumerate(manifest.layers):
            energy = float((directions[layer].double() ** 2).sum())
            s_max = math.sqrt((1.0 - cut) * energy / (quantile - (1.0 - cut) * hidden))
            out.append((label, layer, energy, manifest.clip_norms[j] * sd / s_max))
    return calibration.noise_multiplier, out


def main(argv: list[str] | None = None) -> int:
    """Print the records per class needed, per mode and ε (min, median, max over class-layers)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("release", type=Path, help="a noiseless (ε = ∞) release file")
    parser.add_argument("--epsilon", type=float, action="append", help="default: 1, 2, 4")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--min-signal-share", type=float, default=None)
    args = parser.parse_args(argv)

    from fedsynth.server.release import load_release
    from fedsynth.server.snr import DEFAULT_MIN_SIGNAL_SHARE, noise_variance_present

    release = load_release(args.release)
    if noise_variance_present(release)[0] != 0.0:
        print(f"{args.release} carries noise: the signal needs an ε = ∞ release", file=sys.stderr)
        return 2
    cut = DEFAULT_MIN_SIGNAL_SHARE if args.min_signal_share is None else args.min_signal_share
    print(f"{args.release}: {len(release.labels)} classes, layers {list(release.manifest.layers)}")
    for mode in ("central", "distributed"):
        for epsilon in args.epsilon or [1.0, 2.0, 4.0]:
            multiplier, rows = records_needed(
                release, mode=mode, epsilon=epsilon, delta=args.delta, cut=cut
            )
            needed = [n for *_, n in rows]
            print(
                f"{mode:11s} ε={epsilon:g} (σ/Δ {multiplier:.3f}): "
                f"{min(needed):.0f} / {float(np.median(needed)):.0f} / {max(needed):.0f} records "
                f"per class (min / median / max over class-layers) for factor² ≥ {cut:g}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
