"""Steered vs unsteered generation throughput at the same batch size, measured side by side.

Prints tokens/s for plain and steered decoding (same prompt, batch, seed, token budget;
newline stopping off so both decode the same number of steps) and their ratio (target >= 0.97).
Run: python benchmarks/bench_generation.py
(``figures(quick)`` gives the same numbers to ``python -m benchmarks``.)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsynth.protocol.models import load_model
from fedsynth.server.generation import GenerationConfig, generate_texts, steering_deltas

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: benchmarks.common
from benchmarks.common import QUICK_MODEL, QUICK_NOTE, Figure, compared

DEFAULT_LAYERS = (8, 9, 10, 11)
QUICK_LAYERS = (1, 2)


@dataclass
class Throughput:
    """Best tokens/s of each side and the run's settings."""

    model: str
    batch: int
    tokens: int
    repeats: int
    unsteered: float
    steered: float


def measure(
    model: str | None = None,
    *,
    batch: int = 64,
    tokens: int = 32,
    repeats: int = 3,
    layers: tuple[int, ...] = DEFAULT_LAYERS,
) -> Throughput:
    """Alternate unsteered and steered runs ``repeats`` times; keep the best of each."""
    loaded = load_model(model) if model else load_model()
    config = GenerationConfig(max_new_tokens=tokens, batch_size=batch, stop_at_newline=False)
    gen = torch.Generator().manual_seed(0)
    deltas = steering_deltas(
        {layer: torch.randn(loaded.hidden_size, generator=gen) for layer in layers},
        strength=0.05,
        residual_norms=dict.fromkeys(layers, 8000.0),
    )
    prompt = "Here is a positive movie review snippet:\n"
    results: dict[str, list[float]] = {"unsteered": [], "steered": []}
    generate_texts(loaded, prompt, 4, config=config, seed=0)  # warm-up
    for r in range(repeats):
        for name, d in (("unsteered", None), ("steered", deltas)):
            counted = [0]

            def count(_n: int, t: int, counted: list[int] = counted) -> None:
                counted[0] += t

            t0 = time.perf_counter()
            generate_texts(loaded, prompt, batch, config=config, deltas=d, seed=r, progress=count)
            results[name].append(counted[0] / (time.perf_counter() - t0))
    return Throughput(
        model=loaded.name,
        batch=batch,
        tokens=tokens,
        repeats=repeats,
        unsteered=max(results["unsteered"]),
        steered=max(results["steered"]),
    )


def figures(quick: bool) -> list[Figure]:
    """Steered tokens/s against unsteered tokens/s."""
    if quick:
        r = measure(QUICK_MODEL, batch=8, tokens=8, repeats=2, layers=QUICK_LAYERS)
    else:
        r = measure()
    where = f"{r.model}, batch {r.batch}, {r.tokens} new tokens, best of {r.repeats}"
    return [
        compared(
            "generation",
            "steered vs unsteered generation",
            r.steered,
            "tokens/s",
            baseline=r.unsteered,
            judge=not quick,
            at_least=0.97,
            note=f"{where}. {QUICK_NOTE}" if quick else where,
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    r = measure(batch=args.batch, tokens=args.tokens, repeats=args.repeats)
    print(f"model {r.model}, batch {r.batch}, {r.tokens} new tokens, best of {r.repeats}")
    for k, v in (("unsteered", r.unsteered), ("steered", r.steered)):
        print(f"  {k:10s} {v:8.1f} tokens/s")
    print(f"ratio steered / unsteered = {r.steered / r.unsteered:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
