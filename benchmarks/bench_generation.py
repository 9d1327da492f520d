"""Steered vs unsteered generation throughput at the same batch size, measured side by side.

Prints tokens/s for plain and steered decoding (same prompt, batch, seed, token budget;
newline stopping off so both decode the same number of steps) and their ratio (target >= 0.97).
Run: python benchmarks/bench_generation.py
"""

from __future__ import annotations

import argparse
import time

import torch

from fedsynth.protocol.models import load_model
from fedsynth.server.generation import GenerationConfig, generate_texts, steering_deltas


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    loaded = load_model()
    config = GenerationConfig(
        max_new_tokens=args.tokens, batch_size=args.batch, stop_at_newline=False
    )
    gen = torch.Generator().manual_seed(0)
    layers = (8, 9, 10, 11)
    deltas = steering_deltas(
        {layer: torch.randn(loaded.hidden_size, generator=gen) for layer in layers},
        strength=0.05,
        residual_norms=dict.fromkeys(layers, 8000.0),
    )
    prompt = "Here is a positive movie review snippet:\n"
    results: dict[str, list[float]] = {"unsteered": [], "steered": []}
    generate_texts(loaded, prompt, 4, config=config, seed=0)  # warm-up
    for r in range(args.repeats):
        for name, d in (("unsteered", None), ("steered", deltas)):
            tokens = [0]

            def count(_n: int, t: int, tokens: list[int] = tokens) -> None:
                tokens[0] += t

            t0 = time.perf_counter()
            generate_texts(
                loaded, prompt, args.batch, config=config, deltas=d, seed=r, progress=count
            )
            results[name].append(tokens[0] / (time.perf_counter() - t0))
    best = {k: max(v) for k, v in results.items()}
    print(
        f"model {loaded.name}, batch {args.batch}, {args.tokens} new tokens, best of {args.repeats}"
    )
    for k, v in best.items():
        print(f"  {k:10s} {v:8.1f} tokens/s")
    print(f"ratio steered / unsteered = {best['steered'] / best['unsteered']:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
