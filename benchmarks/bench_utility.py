"""Utility of the federated epsilon = 4 release against the prior and the non-private ceiling.

Runs the default demo for several seeds (each a full federated run on the real model) and prints,
per seed and as mean ± sd, label fidelity and train-on-synthetic/test-on-real accuracy for the
prior (epsilon = 0), epsilon = 4 and epsilon = inf (and, where the demo reports them, MAUVE,
Self-BLEU and distinct-2), plus the targets: accuracy(eps=4) - accuracy(eps=inf) >= -0.02,
accuracy(eps=4) - accuracy(prior) >= +0.08 and label fidelity(eps=4) >= 0.75, and the share of
the gap between the prior and the same number of real texts that eps=4 closes (>= 0.5). Other
data: ``--extra --corpus bbc_news`` or ``--extra --data FILE ...`` (the demo's options). Slow:
about 12 minutes per seed on 2 CPU cores.
Run: python benchmarks/bench_utility.py --seeds 0 1 2

``figures(quick=True)`` (``python -m benchmarks --quick``) runs the same pipeline at tiny sizes
in one process: the tiny random-weight model, a few dozen private records split among three
real holders (``Contributor``) behind an in-process transport (each message through Flower's
protobuf serialization), the production coordinator's ``run_vector_release`` for epsilon = 4
and epsilon = inf, steered generation of a handful of samples per label, and the same label
fidelity and TSTR scores. Its numbers say that the pipeline runs end to end, not how useful
the release is: the model's weights are random, so the targets are not judged.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: benchmarks.common
from benchmarks.common import QUICK_MODEL, Figure, compared, info

PRIOR, PRIVATE, CEILING = "prior (eps=0)", "eps=4", "eps=inf"
DEFAULT_SEEDS = (0, 1, 2)
GAP_CEILING_TARGET = -0.02  # TSTR accuracy eps=4 - eps=inf
GAP_PRIOR_TARGET = 0.08  # TSTR accuracy eps=4 - prior
FIDELITY_TARGET = 0.75  # label fidelity of eps=4
GAP_CLOSED_TARGET = 0.5  # share of the prior -> same-number-real TSTR gap eps=4 closes
SHOWN = (
    ("label_fidelity", "label fidelity"),
    ("tstr_accuracy", "TSTR accuracy"),
    ("mauve", "MAUVE"),
    ("self_bleu", "Self-BLEU"),
    ("distinct_2", "distinct-2"),
)
QUICK_LAYERS = (1, 2)


def demo_scores(seed: int, out: Path, extra: list[str]) -> dict[str, dict[str, float]]:
    """Scores of one seed's demo run (``summary.json``), running the demo when it is missing."""
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
            *extra,
        ]
        subprocess.run(cmd, check=True)
    scores: dict[str, dict[str, float]] = json.loads((out / "summary.json").read_text())["scores"]
    return scores


class _InProcessTransport:
    """Carries each stage to real holders as serialized RecordDicts, one after the other."""

    def __init__(self, holders: Mapping[int, Any]) -> None:
        from flwr.app import RecordDict

        self.holders = holders
        self.states = {n: RecordDict() for n in holders}

    def exchange(
        self, stage: str, requests: Mapping[int, Any], *, timeout: float
    ) -> dict[int, Any]:
        from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

        from fedsynth.client.contributor import refusal_reason
        from fedsynth.protocol.errors import FedSynthError
        from fedsynth.server.secure_round import Reply

        out: dict[int, Reply] = {}
        for node_id, content in requests.items():
            wire = recorddict_from_proto(recorddict_to_proto(content))
            try:
                reply = self.holders[node_id].handle(stage, wire, self.states[node_id])
            except FedSynthError as exc:  # a refusal, as the coordinator would receive it
                out[node_id] = Reply(content=None, error=refusal_reason(exc))
                continue
            out[node_id] = Reply(content=recorddict_from_proto(recorddict_to_proto(reply)))
        return out


def quick_scores(seed: int = 0) -> dict[str, dict[str, float]]:
    """The demo's pipeline at tiny sizes, in process: label fidelity and TSTR per condition."""
    from fedsynth.client.contributor import Contributor
    from fedsynth.client.policy import ClientPolicy
    from fedsynth.client.settings import ClientSettings
    from fedsynth.protocol.identity import simulated_member
    from fedsynth.server.coordinator import epsilon_label
    from fedsynth.server.ledger import PrivacyLedger, ledger_path
    from fedsynth.server.task_runner import run_vector_release
    from fedsynth.simulations import demo as d
    from fedsynth.simulations.metrics import label_fidelity, train_text_classifier, tstr_scores

    with tempfile.TemporaryDirectory() as tmp:
        config = d.demo_config(
            "quick",
            out_dir=Path(tmp) / "out",
            model=QUICK_MODEL,
            layers=QUICK_LAYERS,
            private_per_label=24,
            synthetic_per_label=6,
            prior_per_label=6,
            test_per_label=30,
            max_new_tokens=12,
            generation_batch=12,
            seed=seed,
        )
        config.check_federation()
        data = d.split_data(config)
        config.out_dir.mkdir(parents=True)
        d.write_partitions(data)
        with d.removed_on_failure(data):
            loaded, reference = d.load_coordinator(config)
            holders: dict[int, Contributor] = {}
            for index in range(config.clients):
                identity, roster = simulated_member(data.partition_dir, index)
                settings = ClientSettings(
                    data_path=data.partition_dir / f"partition-{index}.jsonl",
                    model=config.model,
                    policy=ClientPolicy(allow_non_private=True),
                    identity=identity,
                    roster=roster,
                )
                holders[1001 + index] = Contributor(settings, node_id=1001 + index)
            transport = _InProcessTransport(holders)
            ledger = PrivacyLedger(ledger_path(config.out_dir))
            releases: dict[str, Path] = {}
            for epsilon in d.release_epsilons(config):
                name = f"release-eps{epsilon_label(epsilon)}"
                _, row = run_vector_release(
                    transport,
                    tuple(holders),
                    d.task_config(config, epsilon),
                    loaded,
                    reference,
                    ledger=ledger,
                    path=config.out_dir / f"{name}.safetensors",
                )
                releases[epsilon_label(epsilon)] = Path(row["release"])
            samples = d.generate_conditions(config, loaded, reference, releases)
        classifier = train_text_classifier(
            [r.text for r in data.train], [r.label for r in data.train], seed=0
        )
        test_texts = [r.text for r in data.test]
        test_labels = [r.label for r in data.test]
        scores: dict[str, dict[str, float]] = {}
        for condition, rows in samples.items():
            texts = [s.text for s in rows]
            labels = [s.label for s in rows]
            tstr = tstr_scores(texts, labels, test_texts, test_labels, seed=0)
            scores[condition] = {
                "label_fidelity": label_fidelity(classifier, texts, labels),
                "tstr_accuracy": tstr["accuracy"],
                "n": float(len(texts)),
            }
    return scores


def _mean(rows: list[dict[str, dict[str, float]]], condition: str, metric: str) -> float:
    return statistics.fmean(r[condition][metric] for r in rows)


def figures(quick: bool) -> list[Figure]:
    """Label fidelity and TSTR accuracy of eps=4 against the prior and the eps=inf ceiling."""
    if quick:
        rows = [quick_scores(seed=0)]
        where = (
            f"quick: {QUICK_MODEL} (random weights), 3 holders in process, "
            f"{int(rows[0][PRIVATE]['n'])} samples per condition; not judged"
        )
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [demo_scores(seed, Path(tmp) / f"seed-{seed}", []) for seed in DEFAULT_SEEDS]
        where = f"default demo, mean of seeds {list(DEFAULT_SEEDS)}"
    acc = {c: _mean(rows, c, "tstr_accuracy") for c in (PRIOR, PRIVATE, CEILING)}
    fid = {c: _mean(rows, c, "label_fidelity") for c in (PRIOR, PRIVATE, CEILING)}
    gap_ceiling = acc[PRIVATE] - acc[CEILING]
    gap_prior = acc[PRIVATE] - acc[PRIOR]
    return [
        info(
            "utility",
            "TSTR accuracy eps=4 vs eps=inf ceiling",
            acc[PRIVATE],
            "",
            baseline=acc[CEILING],
            note=where,
        ),
        compared(
            "utility",
            "TSTR accuracy gap eps=4 - eps=inf",
            gap_ceiling,
            "",
            at_least=GAP_CEILING_TARGET,
            judge=not quick,
            note=where,
        ),
        info(
            "utility",
            "TSTR accuracy eps=4 vs prior (eps=0)",
            acc[PRIVATE],
            "",
            baseline=acc[PRIOR],
            note=where,
        ),
        compared(
            "utility",
            "TSTR accuracy gap eps=4 - prior",
            gap_prior,
            "",
            at_least=GAP_PRIOR_TARGET,
            judge=not quick,
            note=where,
        ),
        info(
            "utility",
            "label fidelity eps=4 vs prior (eps=0)",
            fid[PRIVATE],
            "",
            baseline=fid[PRIOR],
            note=where,
        ),
        compared(
            "utility",
            "label fidelity eps=4",
            fid[PRIVATE],
            "",
            at_least=FIDELITY_TARGET,
            judge=not quick,
            note=where,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--out", type=Path, default=Path("bench-utility"))
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        scores = demo_scores(seed, args.out / f"seed-{seed}", args.extra)
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

    shown = [(key, title) for key, title in SHOWN if all(key in r[n] for r in rows for n in names)]
    print("\n" + f"{'condition':15s}" + "".join(f" {title:>16s}" for _, title in shown))
    for name in names:
        print(
            f"{name:15s}"
            + "".join(f" {stat([r[name][key] for r in rows]):>16s}" for key, _ in shown)
        )
    gap_prior = [r[PRIVATE]["tstr_accuracy"] - r[PRIOR]["tstr_accuracy"] for r in rows]
    fidelity = [r[PRIVATE]["label_fidelity"] for r in rows]
    print()
    if all(CEILING in r for r in rows):  # absent with --no-baseline
        gap_inf = [r[PRIVATE]["tstr_accuracy"] - r[CEILING]["tstr_accuracy"] for r in rows]
        print(f"accuracy eps=4 - eps=inf = {stat(gap_inf)}  (target >= {GAP_CEILING_TARGET:+.2f})")
    print(f"accuracy eps=4 - prior   = {stat(gap_prior)}  (target >= {GAP_PRIOR_TARGET:+.2f})")
    print(f"label fidelity eps=4     = {stat(fidelity)}  (target >= {FIDELITY_TARGET:.2f})")
    reals = [
        json.loads((args.out / f"seed-{seed}" / "summary.json").read_text()).get("real_reference")
        for seed in args.seeds
    ]
    if all(reals):
        from fedsynth.simulations.demo import gap_closed

        real_acc = [float(r["tstr_accuracy"]) for r in reals]
        closed = [
            gap_closed(r[PRIOR]["tstr_accuracy"], r[PRIVATE]["tstr_accuracy"], real)
            for r, real in zip(rows, real_acc, strict=True)
        ]
        print(f"real texts, same number  = {stat(real_acc)}  (TSTR accuracy)")
        print(f"gap prior->real closed   = {stat(closed)}  (target >= {GAP_CLOSED_TARGET:.2f})")


if __name__ == "__main__":
    main()
