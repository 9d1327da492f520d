"""Utility of the federated epsilon = 4 release against the prior and the non-private ceiling.

Runs the default demo for several seeds (each a full federated run on the real model) and prints,
per seed and as mean ± sd, label fidelity and train-on-synthetic/test-on-real accuracy for the
prior (epsilon = 0), epsilon = 4 and epsilon = inf, plus the two target gaps:
accuracy(eps=4) - accuracy(eps=inf) (target >= -0.03) and accuracy(eps=4) - accuracy(prior)
(target >= +0.05). Slow: about 12 minutes per seed on 2 CPU cores.
Run: python benchmarks/bench_utility.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("bench-utility"))
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        out = args.out / f"seed-{seed}"
        if not (out / "summary.json").exists():
            cmd = [
                sys.executable,
                "-m",
                "fedsynth.simulations",
                "demo",
                "--out",
                str(out),
                "--seed",
                str(seed),
                *args.extra,
            ]
            subprocess.run(cmd, check=True)
        scores = json.loads((out / "summary.json").read_text())["scores"]
        rows.append(scores)
        print(
            f"seed {seed}: "
            + ", ".join(
                f"{name}: fid {s['label_fidelity']:.3f} acc {s['tstr_accuracy']:.3f}"
                for name, s in scores.items()
            )
        )
    names = list(rows[0])

    def stat(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    print(f"\n{'condition':15s} {'label fidelity':>16s} {'TSTR accuracy':>16s}")
    for name in names:
        print(
            f"{name:15s} {stat([r[name]['label_fidelity'] for r in rows]):>16s} "
            f"{stat([r[name]['tstr_accuracy'] for r in rows]):>16s}"
        )
    gap_inf = [r["eps=4"]["tstr_accuracy"] - r["eps=inf"]["tstr_accuracy"] for r in rows]
    gap_prior = [r["eps=4"]["tstr_accuracy"] - r["prior (eps=0)"]["tstr_accuracy"] for r in rows]
    print(f"\naccuracy eps=4 - eps=inf = {stat(gap_inf)}  (target >= -0.03)")
    print(f"accuracy eps=4 - prior   = {stat(gap_prior)}  (target >= +0.05)")


if __name__ == "__main__":
    main()
