"""Utility against synthetic samples per label: does "unlimited" mean "more is better"?

For each saved release (and the unsteered prior, and real private texts) it generates the
largest size once per seed and scores nested prefixes (the first n samples of each label) as the
demo scores them: train-on-synthetic accuracy on the held-out real texts and label fidelity
judged by a classifier of other real texts. The split is the demo's for the given seed and
sizes, so give the settings the releases were made with. Generated samples are kept in --out
(``samples-<condition>-seed<S>.jsonl``), so a stopped run resumes without regenerating and a
run to larger sizes only generates what is missing (the smaller prefixes stay the same); the
curve goes to ``curve.csv`` and ``curve.png`` (mean and sd over seeds, log x).

Run: python benchmarks/samples_curve.py --release OUT/release-eps4.safetensors
     --release OUT/release-epsinf.safetensors --seed 0 --out curve
(``--data FILE --instruction TEXT`` or ``--corpus NAME``: releases the demo made on that data.)
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import random
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout

DEFAULT_SIZES = (50, 100, 200, 500, 1000, 2000)
CURVE_COLUMNS = ("condition", "seed", "per_label", "tstr_accuracy", "label_fidelity")


_RT_ASPECTS = (
    "the acting",
    "the story",
    "the direction",
    "the humor",
    "the characters",
    "the pacing",
    "the visuals",
    "the dialogue",
    "the ending",
    "the music",
    "the script",
    "the cast",
)
CORPUS_VARIANTS: dict[str, tuple[str, ...]] = {
    "rotten_tomatoes": tuple(
        f"Here is a {{label}} movie review snippet about {aspect}:\n" for aspect in _RT_ASPECTS
    ),
}
"""``--corpus-variants``: public instruction variants per bundled corpus (what a review of
this kind talks about), one drawn per prompt; measured against the plain prompt in the README
("Instruction variants")."""


@dataclass(frozen=True)
class Point:
    """One condition's scores at one size for one seed."""

    condition: str
    seed: int
    per_label: int
    tstr_accuracy: float
    label_fidelity: float


def prefixes(
    pairs: Sequence[tuple[str, str]], sizes: Sequence[int]
) -> list[tuple[int, list[str], list[str]]]:
    """(size, texts, labels) of the first ``size`` texts of every label, for each size.

    Sizes beyond what some label has are left out (a curve point must hold every label).
    """
    by_label: dict[str, list[str]] = {}
    for label, text in pairs:
        by_label.setdefault(label, []).append(text)
    out = []
    for size in sorted(sizes):
        if not by_label or any(len(texts) < size for texts in by_label.values()):
            continue
        labels = sorted(by_label)
        out.append(
            (
                size,
                [t for lb in labels for t in by_label[lb][:size]],
                [lb for lb in labels for _ in range(size)],
            )
        )
    return out


def score_curve(
    condition: str,
    seed: int,
    pairs: Sequence[tuple[str, str]],
    sizes: Sequence[int],
    *,
    judge: Any,
    test_texts: Sequence[str],
    test_labels: Sequence[str],
) -> list[Point]:
    """Scores of the nested prefixes of one condition's (label, text) pairs."""
    from fedsynth.simulations.metrics import label_fidelity, tstr_scores

    points = []
    for size, texts, labels in prefixes(pairs, sizes):
        tstr = tstr_scores(texts, labels, test_texts, test_labels, seed=0)
        points.append(
            Point(condition, seed, size, tstr["accuracy"], label_fidelity(judge, texts, labels))
        )
    return points


def summarize(points: Sequence[Point]) -> list[dict[str, Any]]:
    """Mean and sd over seeds per (condition, size), in the order the conditions first appear."""
    groups: dict[tuple[str, int], list[Point]] = {}
    for p in points:
        groups.setdefault((p.condition, p.per_label), []).append(p)
    rows = []
    for (condition, size), group in groups.items():
        row: dict[str, Any] = {"condition": condition, "per_label": size, "seeds": len(group)}
        for metric in ("tstr_accuracy", "label_fidelity"):
            values = [getattr(p, metric) for p in group]
            row[metric] = statistics.fmean(values)
            row[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def plot(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """TSTR accuracy and label fidelity against samples per label, one line per condition."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    for ax, metric, title in (
        (axes[0], "tstr_accuracy", "train-on-synthetic accuracy"),
        (axes[1], "label_fidelity", "label fidelity"),
    ):
        for condition in conditions:
            mine = [r for r in rows if r["condition"] == condition]
            ax.errorbar(
                [r["per_label"] for r in mine],
                [r[metric] for r in mine],
                yerr=[r[f"{metric}_sd"] for r in mine],
                marker="o",
                capsize=3,
                label=condition,
            )
        ax.set_xscale("log")
        sizes = sorted({r["per_label"] for r in rows})
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("texts per label")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluation(data: Any) -> dict[str, Any]:
    """The demo's evaluator for one split, as :func:`score_curve`'s keywords: the fidelity
    judge (``judge``), the held-out texts and labels (``test_texts``, ``test_labels``)."""
    from fedsynth.simulations.demo import judge_records
    from fedsynth.simulations.metrics import train_text_classifier

    judge_texts, _ = judge_records(data)
    judge = train_text_classifier(
        [r.text for r in judge_texts], [r.label for r in judge_texts], seed=0
    )
    return {
        "judge": judge,
        "test_texts": [r.text for r in data.test],
        "test_labels": [r.label for r in data.test],
    }


def _cached(
    path: Path, make: Callable[[int, int], list[tuple[str, str]]], *, per_label: int, seed: int
) -> list[tuple[str, str]]:
    """(label, text) pairs from ``path``, topped up to ``per_label`` of every label first.

    ``make(n, seed)`` generates ``n`` texts of every label. A kept file with fewer texts (a
    run made for smaller sizes) grows by what is missing, generated with a seed of its own, so
    a curve extends to larger sizes without regenerating, and its smaller prefixes stay the
    texts they were scored on.
    """
    rows: list[dict[str, str]] = []
    if path.exists():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    pairs = [(r["label"], r["text"]) for r in rows]
    counts = Counter(label for label, _ in pairs)
    have = min(counts.values()) if counts else 0
    if pairs and have >= per_label:
        return pairs
    # Distinct seeds for the first batch and each top-up (keyed by how many were there).
    pairs += make(per_label - have, seed + 100_003 * have)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for label, text in pairs:
            handle.write(json.dumps({"label": label, "text": text}) + "\n")
    tmp.replace(path)
    return pairs


def _prior_pairs(
    engine: Any, template: Any, *, report: Callable[[str, int, int], None], **kwargs: Any
) -> list[tuple[str, str]]:
    """Unsteered (label, text) pairs of every label of ``template``."""
    from fedsynth.server.synthesize import iter_labelled_texts

    return list(
        iter_labelled_texts(
            engine,
            template,
            template.labels,
            deltas_of=lambda _label: None,
            progress=lambda d, t: report("generate prior", d, t),
            **kwargs,
        )
    )


def _release_pairs(
    engine: Any, release: Any, *, name: str, report: Callable[[str, int, int], None], **kwargs: Any
) -> list[tuple[str, str]]:
    """Steered (label, text) pairs of every label of ``release``."""
    from fedsynth.server.synthesize import iter_release_samples

    return [
        (s.label, s.text)
        for s in iter_release_samples(
            engine, release, progress=lambda d, t: report(f"generate {name}", d, t), **kwargs
        )
    ]


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the arguments and run the curve with its --out folder locked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, action="append", default=[])
    parser.add_argument("--seed", type=int, action="append", help="demo seed(s) of the split")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument(
        "--pool", type=int, default=None, help="shot pool per label (default: the demo's, 64)"
    )
    parser.add_argument("--strength", type=float, default=0.03)
    parser.add_argument("--contrast", type=float, default=1.0, help="class contrast c")
    parser.add_argument(
        "--select", type=float, default=1.0, help="keep this fraction of the releases' samples"
    )
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (1: all)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="public instruction variant with a {label} slot, one drawn per prompt (repeatable)",
    )
    parser.add_argument(
        "--corpus-variants",
        action="store_true",
        help="draw from the corpus's bundled instruction variants",
    )
    parser.add_argument("--preset", default="default")
    parser.add_argument(
        "--data", type=Path, default=None, help="the demo's --data file the releases were made on"
    )
    parser.add_argument("--instruction", default=None, help="the demo's --instruction with --data")
    parser.add_argument("--corpus", default=None, help="the demo's --corpus (bundled data)")
    parser.add_argument("--private-per-label", type=int, default=None)
    parser.add_argument("--model", default=None, help="for the prior (default: the release's)")
    parser.add_argument("--backend", default="transformers")
    parser.add_argument(
        "--batch", type=int, default=None, help="generation batch (default: the demo's 64)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="transformers: static cache and CUDA graphs"
    )
    parser.add_argument("--no-prior", action="store_true")
    parser.add_argument("--no-real", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("samples-curve"))
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="combine the curve.csv of earlier runs (e.g. one per seed) into --out; no generation",
    )
    args = parser.parse_args(argv)
    from fedsynth.simulations.folder_lock import exclusive_folder

    with exclusive_folder(args.out, "samples curve"):
        _run(args, parser)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The curve (or the merge) into ``args.out``, which the caller holds locked."""
    from fedsynth.protocol.cli_common import PlainProgress, console
    from fedsynth.server.backends import open_backend
    from fedsynth.server.release import load_release
    from fedsynth.server.selection import scorer_for
    from fedsynth.simulations.demo import (
        demo_config,
        generation_config,
        split_data,
    )

    if args.merge:
        merged: list[Point] = []
        for folder in args.merge:
            with (folder / "curve.csv").open(newline="") as handle:
                merged += [
                    Point(
                        r["condition"],
                        int(r["seed"]),
                        int(r["per_label"]),
                        float(r["tstr_accuracy"]),
                        float(r["label_fidelity"]),
                    )
                    for r in csv.DictReader(handle)
                ]
        write_curve(merged, args.out)
        return
    seeds = args.seed or [0]
    releases = {p.stem.removeprefix("release-"): load_release(p) for p in args.release}
    model = args.model or next((r.manifest.model_name for r in releases.values()), None)
    if model is None:
        parser.error("give --release or --model")
    report = PlainProgress(console)
    engine = open_backend(args.backend, model, compiled=args.compile)
    scorer = scorer_for(args.backend, model, args.select)
    largest = max(args.sizes)
    points: list[Point] = []
    for seed in seeds:
        config = demo_config(
            args.preset,
            out_dir=args.out,
            seed=seed,
            model=model,
            top_p=args.top_p,
            data_path=args.data,
            instruction=args.instruction,
            corpus=args.corpus,
            private_per_label=args.private_per_label,
        )
        data = split_data(config)
        scoring = evaluation(data)
        generation = generation_config(config)  # the demo's sampling settings
        if args.batch is not None:
            generation = replace(generation, batch_size=args.batch)
        conditions: dict[str, Callable[..., list[tuple[str, str]]]] = {}
        variants = list(args.variant)
        if args.corpus_variants:
            variants += CORPUS_VARIANTS.get(config.corpus, ())
        common = {"config": generation, "variants": variants}
        pool = {} if args.pool is None else {"pool_size": args.pool}
        if not args.no_prior:
            # Unsteered, with shots from its own plain-prompt samples as the releases' samples.
            conditions["prior"] = functools.partial(
                _prior_pairs,
                engine,
                config.template,
                shots=args.shots,
                report=report,
                **pool,
                **common,
            )
        for name, release in releases.items():
            conditions[name] = functools.partial(
                _release_pairs,
                engine,
                release,
                name=name,
                strength=args.strength,
                contrast=args.contrast,
                shots=args.shots,
                select=args.select,
                scorer=scorer,
                report=report,
                **({} if args.pool is None else {"shot_pool": args.pool}),
                **common,
            )
        for name, make in conditions.items():

            def sized(n: int, s: int, make: Callable[..., Any] = make) -> list[tuple[str, str]]:
                return list(make(n_per_label=n, seed=s))

            pairs = _cached(
                args.out / f"samples-{name}-seed{seed}.jsonl",
                sized,
                per_label=largest,
                seed=seed + 101,
            )
            points += score_curve(
                name,
                seed,
                pairs,
                args.sizes,
                **scoring,
            )
        if not args.no_real:
            rng = random.Random(seed)
            real = [(r.label, r.text) for r in rng.sample(data.train, len(data.train))]
            points += score_curve(
                "real",
                seed,
                real,
                args.sizes,
                **scoring,
            )
    write_curve(points, args.out)


def write_curve(points: Sequence[Point], out: Path) -> None:
    """curve.csv (every point), curve.png (mean and sd over seeds) and the table on stdout."""
    with (out / "curve.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CURVE_COLUMNS)
        writer.writeheader()
        for p in points:
            writer.writerow(asdict(p))
    rows = summarize(points)
    plot(rows, out / "curve.png")
    print(f"{'condition':12s} {'per label':>9s} {'TSTR accuracy':>16s} {'label fidelity':>16s}")
    for r in rows:
        print(
            f"{r['condition']:12s} {r['per_label']:9d} "
            f"{r['tstr_accuracy']:.3f} ± {r['tstr_accuracy_sd']:.3f}  "
            f"{r['label_fidelity']:.3f} ± {r['label_fidelity_sd']:.3f}  ({r['seeds']} seeds)"
        )
    print(f"wrote {out / 'curve.csv'} and {out / 'curve.png'}")


if __name__ == "__main__":
    main()
