"""How much of a data set's label lives in the class means a release steers with?

A release carries, per class, the mean of the holders' residual-stream features (layers 8-11,
averaged over each record's text tokens, as the holders compute them). Steering can move the
samples only along those means. This diagnostic asks, per data set, on real texts and without
any noise:

* ``tfidf``: TF-IDF + logistic regression on the texts (the evaluator's own view of the label);
* ``centroid``: nearest class mean of the features (what class means alone separate);
* ``probe``: logistic regression on the same features (what the activations hold at all);
* ``between``: the share of the features' variance that lies between the class means.

A label the activations hold but the class means do not (``probe`` well above ``centroid``), or a
small ``between`` share, is one that a mean direction can only weakly push a sample towards.

    python benchmarks/steerability.py --tweets health-tweets.jsonl --per-label 300
(``--tweets`` is the file ``benchmarks/health_tweets.py`` writes; without it, the two bundled
corpora only.)
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsynth.client.data import load_records
from fedsynth.protocol.features import FeatureSpec, PromptTemplate, extract_features
from fedsynth.protocol.models import DEFAULT_MODEL, load_model
from fedsynth.simulations.datasets import load_corpus
from fedsynth.simulations.metrics import train_text_classifier

LAYERS = (8, 9, 10, 11)


@dataclass(frozen=True)
class DataSet:
    """Labelled texts and how many text tokens a holder would read of each."""

    name: str
    texts: tuple[str, ...]
    labels: tuple[str, ...]
    max_text_tokens: int


def bundled(name: str, max_text_tokens: int) -> DataSet:
    """A bundled corpus (``rotten_tomatoes``, ``bbc_news``)."""
    corpus = load_corpus(name)
    return DataSet(
        name,
        tuple(r.text for r in corpus.records),
        tuple(r.label for r in corpus.records),
        max_text_tokens,
    )


def from_jsonl(path: Path, name: str, max_text_tokens: int) -> DataSet:
    """A ``{"text", "label"}`` data file (e.g. the health-news tweets), validated as the demo's
    ``--data`` is."""
    records = load_records(path)
    return DataSet(
        name,
        tuple(r.text for r in records),
        tuple(r.label for r in records),
        max_text_tokens,
    )


def split(data: DataSet, per_label: int, seed: int) -> tuple[list[int], list[int]]:
    """``per_label`` training and ``per_label`` test indices per label, disjoint."""
    rng = random.Random(seed)
    train: list[int] = []
    test: list[int] = []
    for label in sorted(set(data.labels)):
        pool = [i for i, lab in enumerate(data.labels) if lab == label]
        rng.shuffle(pool)
        train += pool[:per_label]
        test += pool[per_label : 2 * per_label]
    return train, test


def standardized(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both scaled by the training features' per-coordinate mean and spread."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    return (train - mean) / std, (test - mean) / std


def centroid_accuracy(
    train: np.ndarray, y_train: Sequence[str], test: np.ndarray, y_test: Sequence[str]
) -> float:
    """Accuracy of assigning each test feature to the nearest training class mean."""
    labels = sorted(set(y_train))
    ytr = np.array(y_train)
    means = np.stack([train[ytr == label].mean(0) for label in labels])
    dist = ((test[:, None, :] - means[None]) ** 2).sum(-1)
    predicted = np.array(labels)[dist.argmin(1)]
    return float((predicted == np.array(y_test)).mean())


def between_share(features: np.ndarray, labels: Sequence[str]) -> float:
    """Trace of the between-class covariance over the total: how much the class means move."""
    y = np.array(labels)
    grand = features.mean(0)
    total = ((features - grand) ** 2).sum()
    between = sum(
        (y == label).sum() * ((features[y == label].mean(0) - grand) ** 2).sum()
        for label in set(labels)
    )
    return float(between / total)


def diagnose(
    data: DataSet, *, per_label: int, seed: int, model: str, layers: tuple[int, ...] = LAYERS
) -> dict[str, float | str]:
    """The four numbers for one data set and one draw of texts."""
    from sklearn.linear_model import LogisticRegression

    train, test = split(data, per_label, seed)
    texts = [data.texts[i] for i in train + test]
    labels = [data.labels[i] for i in train + test]
    y_train, y_test = labels[: len(train)], labels[len(train) :]
    tfidf = train_text_classifier(texts[: len(train)], y_train, seed=seed)
    tfidf_acc = float(np.mean(np.array(tfidf.predict(texts[len(train) :])) == np.array(y_test)))
    flat = _features(model, texts, labels, layers, data.max_text_tokens)
    f_train, f_test = standardized(flat[: len(train)], flat[len(train) :])
    probe = LogisticRegression(C=0.1, max_iter=3000, random_state=seed).fit(f_train, y_train)
    return {
        "data": data.name,
        "labels": len(set(labels)),
        "chance": 1 / len(set(labels)),
        "tfidf": tfidf_acc,
        "centroid": centroid_accuracy(f_train, y_train, f_test, y_test),
        "probe": float(probe.score(f_test, y_test)),
        "between": between_share(f_train, y_train),
    }


def _features(
    model: str, texts: list[str], labels: list[str], layers: tuple[int, ...], tokens: int
) -> np.ndarray:
    """(n, L*H) features under one prefix for every label (class means differ by text only)."""
    names = tuple((label, "") for label in sorted(set(labels)))
    spec = FeatureSpec(
        template=PromptTemplate(instruction="Here is a text{label}:\n", label_names=names),
        layers=layers,
        max_text_tokens=tokens,
    )
    features, _ = extract_features(load_model(model), texts, labels, spec)
    return features.reshape(len(texts), -1).astype(np.float64)


def sample_fidelity(
    data: DataSet,
    samples: Path,
    *,
    per_label: int,
    seed: int,
    model: str,
    layers: tuple[int, ...] = LAYERS,
) -> dict[str, float | str]:
    """Label fidelity of generated samples judged two ways by the same real texts.

    ``activation``: the nearest real class mean of each sample's features (the view the
    release steers in); ``tfidf``: the evaluator's TF-IDF classifier.
    """
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    texts = [str(r["text"]) for r in rows]
    intended = [str(r["label"]) for r in rows]
    train, _ = split(data, per_label, seed)
    real = [data.texts[i] for i in train]
    real_labels = [data.labels[i] for i in train]
    tfidf = train_text_classifier(real, real_labels, seed=seed)
    flat = _features(model, real + texts, real_labels + intended, layers, data.max_text_tokens)
    f_real, f_samples = standardized(flat[: len(real)], flat[len(real) :])
    return {
        "samples": str(samples),
        "n": len(texts),
        "tfidf": float(np.mean(np.array(tfidf.predict(texts)) == np.array(intended))),
        "activation": centroid_accuracy(f_real, real_labels, f_samples, intended),
    }


def main() -> None:
    """Diagnose every data set over the seeds; print means ± sd, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tweets", type=Path, help="health-tweets.jsonl (health_tweets.py)")
    parser.add_argument("--per-label", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--layers", default=",".join(map(str, LAYERS)))
    parser.add_argument(
        "--samples",
        type=Path,
        nargs="+",
        help="generated samples (jsonl) to judge instead: fidelity by activation vs TF-IDF",
    )
    parser.add_argument(
        "--reference",
        default="rotten_tomatoes",
        help="with --samples: the real data (a bundled corpus, or a jsonl file)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.samples:
        tokens = 128 if args.reference == "bbc_news" else 48
        reference = (
            bundled(args.reference, tokens)
            if not args.reference.endswith(".jsonl")
            else from_jsonl(Path(args.reference), Path(args.reference).stem, tokens)
        )
        layers = tuple(int(x) for x in args.layers.split(","))
        for path in args.samples:
            judged = sample_fidelity(
                reference, path, per_label=args.per_label, seed=0, model=args.model, layers=layers
            )
            print(json.dumps(judged), flush=True)
        return
    layers = tuple(int(x) for x in args.layers.split(","))
    sets = [bundled("rotten_tomatoes", 48), bundled("bbc_news", 128)]
    if args.tweets:
        sets.append(from_jsonl(args.tweets, "health_tweets", 48))
    rows = []
    for data in sets:
        for seed in (int(s) for s in args.seeds.split(",")):
            row = diagnose(
                data, per_label=args.per_label, seed=seed, model=args.model, layers=layers
            )
            rows.append(row | {"seed": seed})
            print(json.dumps(row | {"seed": seed}), flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))
    keys = ("tfidf", "centroid", "probe", "between")
    print(f"\n{'data':<16} {'chance':>6} " + " ".join(f"{k:>15}" for k in keys))
    for data in sets:
        mine = [r for r in rows if r["data"] == data.name]
        cells = []
        for k in keys:
            values = np.array([float(r[k]) for r in mine])
            cells.append(
                f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0:.3f}"
            )
        print(
            f"{data.name:<16} {float(mine[0]['chance']):>6.3f} "
            + " ".join(f"{c:>15}" for c in cells)
        )


if __name__ == "__main__":
    main()
