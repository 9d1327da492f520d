"""A steering rule changed, paired on a study's own releases: what does it change?

For every dataset-vector release a study kept (``cells/*/release*.safetensors``), the samples
are generated again exactly as the study generated them (same release, same settings, same
sampling seed) but with one rule changed, and scored by the study's own scorer. Each pair
differs only in the rule, so the paired differences isolate it from the DP noise and the
sampling. Rows go to ``OUT/pairs.csv`` (appended as they finish: a stopped run resumes), and a
summary (mean ± sd of each metric with and without, and of the paired difference, per ε) is
printed and written to ``OUT/summary.md``.

The change (one of):

* default: ``[steering] denoise`` on (projection onto the public basis);
* ``--min-signal-share S``: the SNR rule switches off layers whose signal share is below S.
  A release whose factors are the same under both rules generates the same samples, so it is
  not generated again (its row says ``regenerated = 0`` and repeats the study's scores).

``--before-min-signal-share B`` says which cut the study's rows were made with (default: the
config's; results made before the cut existed were made with 0). ``--contrast C`` also
generates at class contrast C (the study's is 1): the pairs then differ in two settings, which
the summary's title says.

Run: python benchmarks/steering_ablation.py studies/compare.toml studies/results/compare
     --out denoise-ablation [--epsilon 1] [--contrast 2]
     [--min-signal-share 0.5 --before-min-signal-share 0]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

METRICS = ("tstr_accuracy", "tstr_macro_f1", "label_fidelity", "mauve", "self_bleu", "distinct_2")
METHODS = ("vector", "vector-pooled")


def _summary(rows: list[dict[str, str]], metrics: list[str]) -> list[str]:
    lines = [
        "| ε | releases | metric | the study's rule | the changed rule | paired difference |",
        "|---|---|---|---|---|---|",
    ]

    def fmt(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        return f"{statistics.fmean(values):.3f} ± {sd:.3f}"

    for eps in sorted({r["epsilon"] for r in rows}, key=float):
        group = [r for r in rows if r["epsilon"] == eps]
        for metric in metrics:
            before = [float(r[f"{metric}_before"]) for r in group]
            after = [float(r[f"{metric}_after"]) for r in group]
            diff = [a - b for a, b in zip(after, before, strict=True)]
            lines.append(
                f"| {eps} | {len(group)} | {metric} | {fmt(before)} | {fmt(after)} | {fmt(diff)} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path, help="the study's config (TOML)")
    parser.add_argument("results", type=Path, help="the study's results folder")
    parser.add_argument("--out", type=Path, default=Path("denoise-ablation"))
    parser.add_argument("--epsilon", type=float, action="append", help="only these ε")
    parser.add_argument(
        "--contrast", type=float, default=1.0, help="class contrast of the new samples"
    )
    parser.add_argument(
        "--min-signal-share", type=float, default=None, help="the cut of the new samples"
    )
    parser.add_argument(
        "--before-min-signal-share",
        type=float,
        default=None,
        help="the cut the study's rows were made with (default: the config's)",
    )
    args = parser.parse_args(argv)

    from fedsynth.protocol.errors import ModelMismatchError
    from fedsynth.server.backends import check_release_backend
    from fedsynth.server.release import load_release
    from fedsynth.server.snr import check_min_signal_share, steering_snr
    from fedsynth.simulations import scoring
    from fedsynth.simulations.demo import public_basis_for
    from fedsynth.simulations.methods.common import release_samples
    from fedsynth.simulations.study import StudyRunner, _slug, read_results
    from fedsynth.simulations.study_config import load_study_config

    config = load_study_config(args.config)
    before_cut = check_min_signal_share(
        config.steering.min_signal_share
        if args.before_min_signal_share is None
        else args.before_min_signal_share
    )
    if args.min_signal_share is None:
        if config.steering.denoise:
            print("the study already denoises: nothing to compare", file=sys.stderr)
            return 2
        after = dataclasses.replace(config.steering, denoise=True, min_signal_share=before_cut)
        change = "--denoise"
    else:
        cut = check_min_signal_share(args.min_signal_share)
        if cut == before_cut:
            print(f"the study's rows already use min_signal_share={cut:g}", file=sys.stderr)
            return 2
        after = dataclasses.replace(config.steering, min_signal_share=cut)
        change = f"min_signal_share {before_cut:g} -> {cut:g}"
    changed = dataclasses.replace(config, steering=after)
    contrast = args.contrast

    class _Runner(StudyRunner):
        def demo_config(self, cell: Any) -> Any:
            return dataclasses.replace(super().demo_config(cell), contrast=contrast)

    runner = _Runner(changed, args.out / "study")
    finished = {r["key"]: r for r in read_results(args.results) if r["status"] == "ok"}
    cells = [
        c
        for c in changed.cells()
        if c.method in METHODS
        and c.key in finished
        and (args.epsilon is None or c.epsilon in args.epsilon)
    ]
    if not cells:
        print("no release cells finished in the results folder", file=sys.stderr)
        return 2
    metrics = [m for m in METRICS if finished[cells[0].key].get(m)]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "pairs.csv"
    columns = ["key", "method", "mode", "epsilon", "seed", "ranks", "regenerated"] + [
        f"{m}_{side}" for m in metrics for side in ("before", "after")
    ]
    done: dict[str, dict[str, str]] = {}
    if path.exists():
        with path.open(newline="", encoding="utf-8") as handle:
            done = {r["key"]: r for r in csv.DictReader(handle)}
    for cell in cells:
        files = sorted((args.results / "cells" / _slug(cell.key)).glob("release*.safetensors"))
        if cell.key in done or not files:
            continue
        release = load_release(files[0])
        try:
            check_release_backend(runner.loaded, release)
        except ModelMismatchError as exc:
            print(f"{cell.key}: skipped, {exc}", flush=True)
            continue
        basis = public_basis_for(runner.demo_config(cell), runner.loaded, runner.reference, release)
        snr = steering_snr(
            release, basis=basis, contrast=contrast, min_signal_share=after.min_signal_share
        )
        old_snr = steering_snr(
            release,
            basis=basis if config.steering.denoise else None,
            contrast=1.0,
            min_signal_share=before_cut,
        )
        regenerate = (
            contrast != 1.0
            or after.denoise != config.steering.denoise
            or any(
                new.factors != old.factors
                for new, old in zip(snr.classes, old_snr.classes, strict=True)
            )
        )
        if regenerate:
            print(f"{cell.key}: generating with {change}", flush=True)
            output = release_samples(runner, release, cell, {})
            scores = scoring.score(runner, cell, output.samples)
        else:
            print(f"{cell.key}: the same factors under both rules, the same samples", flush=True)
            scores = {metric: float(finished[cell.key][metric]) for metric in metrics}
        row: dict[str, object] = {
            "key": cell.key,
            "method": cell.method,
            "mode": cell.mode,
            "epsilon": f"{cell.epsilon:g}",
            "seed": cell.seed,
            "ranks": json.dumps({c.label: [item.rank for item in c.layers] for c in snr.classes}),
            "regenerated": int(regenerate),
        }
        for metric in metrics:
            row[f"{metric}_before"] = finished[cell.key][metric]
            row[f"{metric}_after"] = f"{float(scores[metric]):.6g}"
        new = not path.exists()
        with path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            if new:
                writer.writeheader()
            writer.writerow(row)
        done[cell.key] = {k: str(v) for k, v in row.items()}
        print(
            "  "
            + ", ".join(
                f"{m} {float(str(row[f'{m}_before'])):.3f} -> {float(str(row[f'{m}_after'])):.3f}"
                for m in metrics
            ),
            flush=True,
        )
    rows = [done[c.key] for c in cells if c.key in done]
    if not rows:
        print("no release cells with a release file in the results folder", file=sys.stderr)
        return 2
    title = [f"With {change}" + (f" and contrast {contrast:g}" if contrast != 1.0 else ""), ""]
    summary = title + _summary(rows, metrics)
    (args.out / "summary.md").write_text("\n".join(summary) + "\n", encoding="utf-8")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
