"""Would several steering directions per class lift utility? The non-private ceiling, measured.

One direction per class steers every sample of a label the same way. Here each class's
records are split into ``k`` clusters of their clipped feature differences (the quantity a
release averages) and each cluster's mean steers its share of the label's samples (in
proportion to the cluster's size). At k = 1 that is the ε = ∞ release itself (checked). The
clusters are found on the private records (``--centroids private``: the ceiling, nothing
private about it) or on the public prior texts' features, each record going to its nearest
public centroid (``--centroids public``: what a private release could do at no extra privacy
cost, since a record still touches one row). Scored as ``samples_curve.py`` scores: TSTR
accuracy on the demo's held-out texts and label fidelity, nested prefixes.

Run: python benchmarks/subclass_steering.py --release DEMO/release-epsinf.safetensors \
     --seed 0 --k 8 --backend llamacpp --out subclass
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout

from benchmarks.samples_curve import _cached, evaluation, score_curve, write_curve


def cluster_vectors(
    unit: np.ndarray, clip: np.ndarray, assign: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster mean of the clipped differences (as a release decodes them) and sizes.

    Args:
        unit: (n, L, H) clipped unit-domain differences of one class's records.
        clip: (L,) clip norms (the release's vectors are unit means times these).
        assign: (n,) cluster of each record, in ``range(k)``.
    """
    sizes = np.bincount(assign, minlength=k)
    vectors = np.zeros((k, *unit.shape[1:]), dtype=np.float32)
    for j in range(k):
        if sizes[j]:
            vectors[j] = unit[assign == j].mean(axis=0) * clip[:, None]
    return vectors, sizes


def split_counts(n: int, sizes: np.ndarray) -> list[int]:
    """``n`` samples shared out in proportion to ``sizes`` (largest remainders; sums to n)."""
    share = n * sizes / sizes.sum()
    counts = np.floor(share).astype(int)
    for j in np.argsort(-(share - counts))[: n - counts.sum()]:
        counts[j] += 1
    return [int(c) for c in counts]


def kmeans(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means centroids of row vectors (each row L2-normalized first)."""
    from sklearn.cluster import KMeans

    rows = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
    centers: np.ndarray = (
        KMeans(n_clusters=k, n_init=4, random_state=seed).fit(rows).cluster_centers_
    )
    return centers


def nearest(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (cosine) for each row."""
    rows = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
    index: np.ndarray = np.argmax(rows @ centroids.T, axis=1)
    return index


def main(argv: Sequence[str] | None = None) -> None:
    import torch

    from fedsynth.protocol.cli_common import PlainProgress, console
    from fedsynth.protocol.features import clip_to_unit, extract_features
    from fedsynth.protocol.models import load_model
    from fedsynth.server.backends import open_backend
    from fedsynth.server.coordinator import compute_public_reference
    from fedsynth.server.generation import steering_deltas
    from fedsynth.server.release import load_release
    from fedsynth.server.synthesize import iter_label_texts
    from fedsynth.simulations.demo import (
        demo_config,
        generation_config,
        split_data,
        task_config,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, required=True, help="an ε = ∞ demo release")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, nargs="+", default=[8])
    parser.add_argument("--centroids", choices=("private", "public"), default="private")
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 500, 1000])
    parser.add_argument("--strength", type=float, default=0.03)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--pool", type=int, default=16, help="shot pool per cluster")
    parser.add_argument("--backend", default="transformers")
    parser.add_argument("--out", type=Path, default=Path("subclass"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    release = load_release(args.release)
    manifest = release.manifest
    report = PlainProgress(console)
    config = demo_config("default", out_dir=args.out, seed=args.seed, model=manifest.model_name)
    data = split_data(config)
    loaded = load_model(manifest.model_name)
    reference = compute_public_reference(loaded, task_config(config, config.epsilon))
    spec = manifest.feature_spec
    clip = np.asarray(manifest.clip_norms, dtype=np.float64)
    labels = manifest.labels
    texts = [r.text for r in data.train]
    record_labels = [r.label for r in data.train]
    features, _ = extract_features(
        loaded, texts, record_labels, spec, progress=lambda d: report("features", d, len(texts))
    )
    public_features = None
    if args.centroids == "public":
        prior = [(lb, t) for lb in labels for t in reference.texts[lb] if t.strip()]
        public_features, _ = extract_features(
            loaded,
            [t for _, t in prior],
            [lb for lb, _ in prior],
            spec,
            progress=lambda d: report("prior features", d, len(prior)),
        )
        prior_labels = np.array([lb for lb, _ in prior])
    record_labels_arr = np.array(record_labels)
    # The clipped differences of each class's records (and prior texts), whatever k is.
    units = {
        label: clip_to_unit(features[record_labels_arr == label] - reference.means[c], clip)
        for c, label in enumerate(labels)
    }
    public_units = (
        {
            label: clip_to_unit(public_features[prior_labels == label] - reference.means[c], clip)
            for c, label in enumerate(labels)
        }
        if public_features is not None
        else None
    )
    engine = open_backend(args.backend, manifest.model_name)
    generation = generation_config(config)
    scoring = evaluation(data)
    residual_norms = release.residual_norms()
    points = []
    for k in args.k:
        plans: dict[str, list[tuple[dict[int, Any], int, int]]] = {}
        for c, label in enumerate(labels):
            unit = units[label]
            flat = unit.reshape(len(unit), -1)
            if k == 1:
                assign = np.zeros(len(unit), dtype=np.int64)
            elif public_units is not None:
                public_unit = public_units[label]
                centroids = kmeans(public_unit.reshape(len(public_unit), -1), k, args.seed)
                assign = nearest(flat, centroids)
            else:
                centroids = kmeans(flat, k, args.seed)
                assign = nearest(flat, centroids)
            vectors, sizes = cluster_vectors(unit, clip, assign, k)
            if k == 1:
                gap = float(np.abs(vectors[0] - release.vectors[c]).max())
                print(f"k=1 {label}: max |cluster mean - release vector| = {gap:.2e}")
            plans[label] = [
                (
                    steering_deltas(
                        {
                            layer: torch.from_numpy(vectors[j, i].copy())
                            for i, layer in enumerate(manifest.layers)
                        },
                        strength=args.strength,
                        residual_norms=residual_norms,
                    ),
                    j,
                    int(sizes[j]),
                )
                for j in range(k)
                if sizes[j]
            ]
            print(f"k={k} {label}: cluster sizes {sorted(sizes.tolist(), reverse=True)}")

        def make(
            n: int, seed: int, k: int = k, plans: dict[str, Any] = plans
        ) -> list[tuple[str, str]]:
            out: list[tuple[str, str]] = []
            for index, label in enumerate(labels):
                kept = plans[label]
                counts = split_counts(n, np.array([size for _, _, size in kept]))
                texts_of_label: list[str] = []
                for (deltas, j, _), count in zip(kept, counts, strict=True):
                    if count == 0:
                        continue
                    texts_of_label += list(
                        iter_label_texts(
                            engine,
                            manifest.template,
                            label,
                            n=count,
                            deltas=deltas,
                            config=generation,
                            seed=seed * 1_000_003 + index * 10_007 + j * 101,
                            shots=args.shots,
                            pool_size=min(args.pool, count),
                        )
                    )
                    report(f"generate k={k} {label}", len(texts_of_label), n)
                random.Random(seed + index).shuffle(texts_of_label)
                out += [(label, t) for t in texts_of_label]
            return out

        pairs = _cached(
            args.out / f"samples-k{k}-{args.centroids}-seed{args.seed}.jsonl",
            make,
            per_label=max(args.sizes),
            seed=args.seed + 101,
        )
        points += score_curve(
            f"k={k} {args.centroids}",
            args.seed,
            pairs,
            args.sizes,
            **scoring,
        )
        write_curve(points, args.out)


if __name__ == "__main__":
    main()
