"""Client contribution throughput vs the bare batched forward pass of the same model.

Prints examples/s of (a) the model's full batched forward pass over the same prompts, (b) the
same forward stopped after the last feature layer, (c) the whole client contribution
(features + clipping + per-record rounding + noise share + secure-sum masking) and (d) one
epoch of DP fine-tuning over the same records (LoRA rank 4 on the q/v projections, Opacus
DP-SGD at epsilon = 4: what a DP-FedAvg holder computes per round), and the ratios (c)/(a),
(c)/(b) and (c)/(d). Target: (c)/(a) >= 0.9.

Client compute against DP fine-tuning: besides seconds, the FLOPs per record of the
contribution's forward pass and of one DP-SGD epoch (forward, backward and per-example
gradients), counted by ``torch.utils.flop_counter``. A DP-FedAvg holder of the comparison study
(``studies/compare.toml``) ran ``rounds x epochs`` LoRA epochs and its samples stayed below the
dataset vector's utility at the same epsilon and data (README, "Client compute against DP
fine-tuning"), so that many epochs are a lower bound on what reaching the vector's utility
takes: the target (>= 10x less compute for the vector) is judged on it.

Run: python benchmarks/bench_contribution.py (``figures(quick)`` gives the same numbers to
``python -m benchmarks``.)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsynth.protocol.contribution import encode_contribution, integer_class_sums
from fedsynth.protocol.features import FeatureSpec, encode_example, extract_features
from fedsynth.protocol.identity import HolderIdentity, Roster
from fedsynth.protocol.manifest import PrivacySpec, TaskManifest, array_sha256
from fedsynth.protocol.models import LoadedModel, decoder_layers, load_model
from fedsynth.protocol.secagg import SecAggClient
from fedsynth.simulations.datasets import load_corpus
from fedsynth.simulations.demo import TEMPLATES
from fedsynth.simulations.dp_finetune import (
    DPTrainSettings,
    dp_train,
    encode_examples,
    finetune_pooled,
    lora_model,
)
from fedsynth.simulations.study_config import load_study_config
from fedsynth.simulations.study_report import compare_paired

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: benchmarks.common
from benchmarks.common import QUICK_MODEL, QUICK_NOTE, Figure, compared, info

DEFAULT_LAYERS = (8, 9, 10, 11)
QUICK_LAYERS = (1, 2)
STUDIES = Path(__file__).resolve().parents[1] / "studies"
COMPARISON_STUDY = STUDIES / "compare.toml"
FLOP_RECORDS = 16  # records whose FLOPs are counted (a per-record figure: padding aside, exact)
UTILITY_METRICS = ("tstr_accuracy", "label_fidelity")
UTILITY_EPSILON = 4.0


@dataclass(frozen=True)
class Lead:
    """The federated vector minus a method on one metric, paired by seed: mean, 95 % interval."""

    metric: str
    pairs: int
    mean: float
    low: float
    high: float


def _rows(results: Path) -> list[dict[str, str]]:
    with results.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r["status"] == "ok"]


def vector_lead(
    method_results: Path,
    method: str,
    *,
    vector_results: Path,
    epsilon: float = UTILITY_EPSILON,
) -> list[Lead]:
    """How far ``method``'s samples stayed below the federated vector's at ``epsilon``.

    Each distributed federated-vector cell of ``vector_results`` is paired with the ``method``
    cell of the same seed and partition in ``method_results``; a pooled method's cell of a seed
    is paired with the mean of that seed's vector cells (one pair per seed, so no cell counts
    twice). Where each interval lies above 0 the method did not reach the vector's utility
    with the compute it spent.
    """

    def at_eps(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        return [r for r in rows if float(r["epsilon"]) == epsilon]

    def number(text: str) -> float:
        return float(text) if text else math.nan

    vector = [
        r
        for r in at_eps(_rows(vector_results))
        if r["method"] == "vector" and r["mode"] == "distributed"
    ]
    other = [r for r in at_eps(_rows(method_results)) if r["method"] == method]
    leads = []
    for metric in UTILITY_METRICS:
        mine: dict[tuple[str, str], float] = {}
        theirs: dict[tuple[str, str], float] = {}
        for o in other:
            matched = [
                number(v[metric])
                for v in vector
                if v["seed"] == o["seed"] and o["partition"] in (v["partition"], "pooled")
            ]
            key = (o["seed"], o["partition"])
            mine[key] = statistics.fmean(matched) if matched else math.nan
            theirs[key] = number(o[metric])
        paired = compare_paired(mine, theirs)
        if paired["seeds"] < 2:
            raise ValueError(f"{method_results}: fewer than 2 {method} cells pair with the vector")
        leads.append(
            Lead(metric, paired["seeds"], paired["difference"], paired["low"], paired["high"])
        )
    return leads


@dataclass(frozen=True)
class Comparator:
    """A DP fine-tuning method as a study ran it: epochs per record, and the study's results."""

    name: str
    method: str
    study: Path
    results: Path

    def epochs(self) -> int:
        """LoRA epochs over each record (DP-FedAvg: rounds x epochs per round)."""
        settings = load_study_config(self.study).dp_training
        return settings.rounds * settings.epochs if self.method == "dp-fedavg" else settings.epochs


COMPARATORS = (
    Comparator(
        "DP-FedAvg holder",
        "dp-fedavg",
        COMPARISON_STUDY,
        STUDIES / "results" / "compare" / "results.csv",
    ),
    Comparator(
        "DP-SGD (pooled)",
        "dp-sgd",
        COMPARISON_STUDY,
        STUDIES / "results" / "compare" / "results.csv",
    ),
)


@dataclass(frozen=True)
class Flops:
    """FLOPs per record (matrix products and attention, as ``FlopCounterMode`` counts them)."""

    features: float  # the contribution's forward pass (stopped after the last feature layer)
    dp_epoch: float  # one DP-SGD epoch: forward, backward, per-example gradients of the LoRA


def flops_per_record(
    loaded: Any,
    records: Any,
    template: Any,
    spec: FeatureSpec,
    settings: DPTrainSettings | None = None,
) -> Flops:
    """Count the FLOPs of the contribution's features and of a DP-SGD epoch over ``records``.

    The epoch runs as one step over every record (sample rate 1: Poisson sampling then takes
    each record once), so the count is per record exactly, not an expected batch's.
    """
    from torch.utils.flop_counter import FlopCounterMode

    settings = settings or DPTrainSettings()
    texts, labels = [r.text for r in records], [r.label for r in records]
    counter = FlopCounterMode(display=False)
    with counter:
        extract_features(loaded, texts, labels, spec)
    features = counter.get_total_flops() / len(records)
    dataset = encode_examples(loaded, records, template, settings.max_tokens)
    model = lora_model(loaded, rank=settings.lora_rank)
    counter = FlopCounterMode(display=False)
    with counter:
        dp_train(
            model,
            dataset,
            settings=replace(settings, batch_size=len(dataset)),
            noise_multiplier=1.0,
            epochs=1,
            seed=0,
        )
    return Flops(features=features, dp_epoch=counter.get_total_flops() / len(records))


def bare_forward(
    loaded: LoadedModel,
    texts: Sequence[str],
    labels: Sequence[str],
    spec: FeatureSpec,
    *,
    stop_layer: int | None,
) -> None:
    """Batched forward over the same token ids, no hooks that capture anything."""
    tok = loaded.tokenizer
    enc = [
        encode_example(tok, spec.template.prefix(lab), t, spec.max_text_tokens)[0]
        for t, lab in zip(texts, labels, strict=True)
    ]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    blocks = decoder_layers(loaded.model)

    class StopError(Exception):
        pass

    def hook(*_args: object) -> None:
        raise StopError

    handle = blocks[stop_layer].register_forward_hook(hook) if stop_layer is not None else None
    try:
        with torch.inference_mode():
            for s in range(0, len(enc), spec.batch_size):
                batch = [enc[i] for i in order[s : s + spec.batch_size]]
                width = max(map(len, batch))
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                att = torch.zeros_like(ids)
                for r, seq in enumerate(batch):
                    ids[r, : len(seq)] = torch.tensor(seq)
                    att[r, : len(seq)] = 1
                with contextlib.suppress(StopError):
                    loaded.model(input_ids=ids, attention_mask=att, use_cache=False)
    finally:
        if handle is not None:
            handle.remove()


@dataclass
class Rates:
    """Examples/s of the three measured paths (best of the repeats) and the run's settings."""

    model: str
    n: int
    batch_size: int
    repeats: int
    full_forward: float
    truncated_forward: float
    contribution: float
    dp_finetune: float  # one DP-SGD epoch over the same records (examples/s)
    flops: Flops


def measure(
    model: str | None = None,
    *,
    n: int = 256,
    repeats: int = 2,
    layers: tuple[int, ...] = DEFAULT_LAYERS,
    batch_size: int = 32,
) -> Rates:
    """Time the full forward, the truncated forward and the whole contribution on ``n`` texts."""
    loaded = load_model(model) if model else load_model()
    template = TEMPLATES["rotten_tomatoes"]
    records = load_corpus("rotten_tomatoes").records[:n]
    texts, labels = [r.text for r in records], [r.label for r in records]
    spec = FeatureSpec(template, layers, 64, batch_size)
    hidden = loaded.hidden_size
    reference = np.zeros((2, len(layers), hidden), dtype=np.float32)
    node_ids = (1, 2, 3)
    manifest = TaskManifest(
        task_id="bench",
        model_name=loaded.name,
        model_fingerprint=loaded.fingerprint,
        hidden_size=hidden,
        template=template,
        layers=spec.layers,
        max_text_tokens=64,
        clip_norms=(1000.0,) * len(layers),
        residual_norms=(1.0,) * len(layers),
        count_weight=0.5,
        scale=1000.0,
        bits=64,
        node_ids=node_ids,
        privacy=PrivacySpec(
            epsilon=4.0,
            delta=1e-5,
            mode="distributed",
            threshold=2,
            total_variance=5.7e6,
            noise_multiplier=1.16,
            l2_sensitivity=2062.0,
            l1_sensitivity=1e5,
            accountant="bench",
        ),
        reference_sha256=array_sha256(reference),
    )
    # Secure-sum setup for node 1 with two peers (keys only; masking cost is what we measure).
    identities = {n: HolderIdentity.generate(f"holder-{n}") for n in node_ids}
    roster = Roster({i.name: i.public_key for i in identities.values()})
    clients = {
        n: SecAggClient(n, manifest.secagg_config(), identity=identities[n], roster=roster)
        for n in node_ids
    }
    keys = {n: c.setup() for n, c in clients.items()}
    cts = {n: c.share_keys(keys).ciphertexts for n, c in clients.items()}
    mine = {s: cts[s][1] for s in node_ids if s != 1}

    def contribution() -> None:
        feats, _ = extract_features(loaded, texts, labels, spec)
        rng = np.random.default_rng(0)
        sums = integer_class_sums(feats, labels, manifest=manifest, reference=reference, rng=rng)
        value = encode_contribution(sums, manifest=manifest, rng=rng)
        fresh = SecAggClient.from_state(
            clients[1].export_state(), identity=identities[1], roster=roster
        )
        fresh.masked_input(mine, value)

    timings: dict[str, list[float]] = {
        "full forward": [],
        "truncated forward": [],
        "client contribution": [],
    }
    bare_forward(loaded, texts[:32], labels[:32], spec, stop_layer=None)  # warm-up
    runs: tuple[tuple[str, Callable[[], None]], ...] = (
        ("full forward", partial(bare_forward, loaded, texts, labels, spec, stop_layer=None)),
        (
            "truncated forward",
            partial(bare_forward, loaded, texts, labels, spec, stop_layer=spec.layers[-1]),
        ),
        ("client contribution", contribution),
    )
    for _ in range(repeats):
        for name, fn in runs:
            t0 = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t0)
    rate = {k: len(texts) / min(v) for k, v in timings.items()}
    rate["dp fine-tuning epoch"] = dp_epoch_rate(loaded, records, template)
    flops = flops_per_record(loaded, records[:FLOP_RECORDS], template, spec)
    return Rates(
        model=loaded.name,
        n=len(texts),
        batch_size=spec.batch_size,
        repeats=repeats,
        full_forward=rate["full forward"],
        truncated_forward=rate["truncated forward"],
        contribution=rate["client contribution"],
        dp_finetune=rate["dp fine-tuning epoch"],
        flops=flops,
    )


def dp_epoch_rate(loaded: Any, records: Any, template: Any) -> float:
    """Examples/s of one DP-SGD epoch (LoRA, Opacus, epsilon = 4) over ``records``."""
    start = time.perf_counter()
    finetune_pooled(
        loaded,
        records,
        template,
        epsilon=4.0,
        delta=1e-5,
        settings=DPTrainSettings(epochs=1),
        seed=0,
    )
    return len(records) / (time.perf_counter() - start)


def figures(quick: bool) -> list[Figure]:
    """Contribution examples/s against the full and the truncated forward pass."""
    if quick:
        r = measure(QUICK_MODEL, n=32, repeats=1, layers=QUICK_LAYERS, batch_size=16)
    else:
        r = measure()
    where = f"{r.model}, {r.n} examples, batch {r.batch_size}, best of {r.repeats}"
    return [
        compared(
            "contribution",
            "client contribution vs full batched forward",
            r.contribution,
            "examples/s",
            baseline=r.full_forward,
            judge=not quick,
            at_least=0.9,
            note=f"{where}. {QUICK_NOTE}" if quick else where,
        ),
        info(
            "contribution",
            "client contribution vs forward stopped after the last feature layer",
            r.contribution,
            "examples/s",
            baseline=r.truncated_forward,
            note=where,
        ),
        info(
            "contribution",
            "client contribution vs one DP fine-tuning epoch (LoRA, DP-SGD)",
            r.contribution,
            "examples/s",
            baseline=r.dp_finetune,
            note=f"{where}; the epoch: Opacus, rank-4 LoRA on q/v, batch 16, epsilon 4; "
            "wall time of finetune_pooled with epochs=1, LoRA setup and merge included",
        ),
        info(
            "contribution",
            "FLOP per record: one DP fine-tuning epoch vs the contribution's forward pass",
            r.flops.dp_epoch,
            "FLOP",
            baseline=r.flops.features,
            note=f"{r.model}, {FLOP_RECORDS} records, torch.utils.flop_counter; the epoch's "
            "forward covers the whole model and output head at every position, its backward "
            "the activations' and the adapters' per-example gradients",
        ),
        *to_equal_utility(r, quick=quick, note=where),
    ]


def to_equal_utility(r: Rates, *, quick: bool, note: str) -> list[Figure]:
    """The >= 10x target, in seconds and in FLOPs, on the compute each DP fine-tuning method
    spent in its study. Judged only where its samples stayed below the federated vector's
    utility (then that compute is a lower bound on what reaching it takes)."""
    rows: list[Figure] = []
    for c in COMPARATORS:
        if not c.results.exists():
            continue
        epochs = c.epochs()
        spent = f"{epochs} epoch" + ("s" if epochs != 1 else "")
        leads = vector_lead(c.results, c.method, vector_results=COMPARATORS[0].results)
        below = all(lead.low > 0 for lead in leads)
        premise = (
            f"{c.name} as {c.study.relative_to(STUDIES.parent)} ran it: {spent} of LoRA "
            f"over each record at epsilon {UTILITY_EPSILON:g}; the federated vector minus it, "
            f"{leads[0].pairs} cells paired by seed (mean [95 % interval]): "
            + "; ".join(f"{x.metric} {x.mean:+.3f} [{x.low:+.3f}, {x.high:+.3f}]" for x in leads)
            + (
                ": it stayed below the vector's utility, so its compute is a lower bound on "
                "what reaching that utility takes"
                if below
                else ": not shown below the vector's utility, so not a bound (not judged)"
            )
        )
        judged = f"{note}. {QUICK_NOTE}" if quick else note
        rows += [
            compared(
                "contribution",
                f"client seconds to reach the vector's utility: {c.name} ({spent}) "
                "vs the contribution",
                r.contribution,
                "examples/s",
                baseline=r.dp_finetune / epochs,
                judge=below and not quick,
                at_least=10.0,
                note=f"{judged}; {premise}",
            ),
            compared(
                "contribution",
                f"client FLOP to reach the vector's utility: {c.name} ({spent}) vs "
                "the contribution",
                r.flops.dp_epoch * epochs,
                "FLOP/record",
                baseline=r.flops.features,
                judge=below and not quick,
                at_least=10.0,
                note=f"{r.model}, {FLOP_RECORDS} records counted; {premise}",
            ),
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    r = measure(n=args.n, repeats=args.repeats)
    rate = {
        "full forward": r.full_forward,
        "truncated forward": r.truncated_forward,
        "client contribution": r.contribution,
        "dp fine-tuning epoch": r.dp_finetune,
    }
    print(
        f"model {r.model}, {r.n} examples, batch {r.batch_size}, "
        f"{torch.get_num_threads()} threads, best of {r.repeats}"
    )
    for k, v in rate.items():
        print(f"  {k:22s} {v:8.1f} examples/s")
    print(
        f"ratio contribution / full forward      = "
        f"{rate['client contribution'] / rate['full forward']:.2f}  (target >= 0.9)"
    )
    print(
        f"ratio contribution / truncated forward = "
        f"{rate['client contribution'] / rate['truncated forward']:.2f}"
    )
    print(
        f"ratio contribution / DP fine-tuning epoch = "
        f"{rate['client contribution'] / rate['dp fine-tuning epoch']:.2f}"
    )
    print(
        f"FLOP per record: contribution {r.flops.features:.3g}, one DP-SGD epoch "
        f"{r.flops.dp_epoch:.3g} ({r.flops.dp_epoch / r.flops.features:.2f}x)"
    )
    for row in to_equal_utility(r, quick=False, note=""):
        print(f"{row.figure}: {row.ratio:.2f}x (target >= 10x, met: {row.met})")
        print(f"  {row.note.lstrip('; ')}")
    assert math.isfinite(rate["client contribution"])


if __name__ == "__main__":
    main()
