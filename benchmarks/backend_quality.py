"""Same release, every generation backend: label fidelity, TSTR and tokens/s over several seeds.

Generates ``--per-label`` samples per label from one saved release on each engine of
``--engines`` (the demo's generation settings): `transformers` in fp32 and, as
``transformers-bf16``, in bf16 on the CPU (``-latin``: from the Latin vocabulary); llama.cpp
with the output head where ``auto`` puts it and, as ``llamacpp-own-head``, computed by
llama.cpp; once per seed, and
scores each set as the demo does (fidelity judged by a classifier of other real texts; TSTR
on the held-out texts). The data split is the demo's for the given ``--private-per-label`` and
``--clients`` (the settings the release was made with), so the held-out and judge texts are
texts no holder held. Prints mean +- sd per engine; the llama.cpp ones need the ``llamacpp``
extra.

Run: python benchmarks/backend_quality.py --release OUT/release-eps4.safetensors
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout

from fedsynth.server.backends import open_backend
from fedsynth.server.generation import GenerationConfig
from fedsynth.server.release import load_release
from fedsynth.server.synthesize import generate_from_release
from fedsynth.simulations.demo import demo_config, evaluate_conditions, split_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, required=True)
    parser.add_argument("--per-label", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds run from here (more seeds later)"
    )
    parser.add_argument("--strength", type=float, default=0.03)
    parser.add_argument("--contrast", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--private-per-label", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--engines",
        default="transformers,llamacpp,llamacpp-own-head",
        help="comma-separated: transformers, transformers-bf16 (bf16 on the CPU), llamacpp "
        "(output head placed by 'auto'), llamacpp-own-head (llama.cpp computes the head too); "
        "a '-latin' suffix samples from the Latin vocabulary (e.g. transformers-bf16-latin)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    release = load_release(args.release)
    config = demo_config(
        "default",
        out_dir=Path("/tmp/backend-quality"),
        clients=args.clients,
        private_per_label=args.private_per_label,
        synthetic_per_label=args.per_label,
    )
    data = split_data(config)
    rows: dict[str, dict[str, list[float]]] = {}
    for backend_name in args.engines.split(","):
        latin = backend_name.endswith("-latin")
        engine = backend_name.removesuffix("-latin")
        generation = GenerationConfig(
            max_new_tokens=config.new_tokens,
            batch_size=64,
            top_p=config.top_p,
            vocabulary="latin" if latin else "full",
        )
        backend = open_backend(
            engine.removesuffix("-own-head").removesuffix("-bf16"),
            release.manifest.model_name,
            threads=args.threads,
            head="llamacpp" if engine.endswith("-own-head") else "auto",
            precision="bf16" if engine.endswith("-bf16") else "auto",
        )
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            t0 = time.perf_counter()
            samples = generate_from_release(
                backend,
                release,
                n_per_label=args.per_label,
                strength=args.strength,
                contrast=args.contrast,
                config=generation,
                seed=seed,
            )
            seconds = time.perf_counter() - t0
            scores = evaluate_conditions({backend_name: samples}, data)[backend_name]
            empty = sum(1 for s in samples if not s.text.strip()) / len(samples)
            got = rows.setdefault(backend_name, {})
            for key, value in (
                ("label_fidelity", scores["label_fidelity"]),
                ("tstr_accuracy", scores["tstr_accuracy"]),
                ("tstr_macro_f1", scores["tstr_macro_f1"]),
                ("embedding_fd", scores["embedding_fd"]),
                ("empty", empty),
                ("samples_per_s", len(samples) / seconds),
            ):
                got.setdefault(key, []).append(value)
            print(
                f"{backend_name} seed {seed}: fidelity {scores['label_fidelity']:.3f}, TSTR "
                f"{scores['tstr_accuracy']:.3f}, {len(samples) / seconds:.2f} samples/s",
                flush=True,
            )
    seeds = f"{args.seeds} seeds from {args.first_seed}"
    print(f"\nrelease {release.release_id}, {args.per_label} per label, {seeds}")
    for backend_name, got in rows.items():
        parts = [
            f"{key} {statistics.mean(v):.3f} +- {statistics.stdev(v) if len(v) > 1 else 0:.3f}"
            for key, v in got.items()
        ]
        print(f"{backend_name:12s} " + ", ".join(parts))


if __name__ == "__main__":
    main()
