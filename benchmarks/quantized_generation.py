"""Would int8 matrix products or a trimmed output head make CPU generation 3x faster?

Two measurements behind the README's answer to the llama.cpp target (steered tokens/s >= 3x the
`transformers` path):

* ``speed``: steered generation of the same prompts on the fp32 `transformers` model and on
  copies whose linear layers (the output head included) torch's dynamic quantization turned
  into int8 (per-tensor and per-channel weights), side by side, every row decoding the whole
  budget (equal work), best of ``--repeats``.
* ``--vocab``: how much of the sampling nucleus a *working vocabulary* would lose. Unsteered
  generation from the task's public template (``--calibration`` batches) accumulates each
  token's nucleus probability; the smallest sets holding 99 %, 99.9 %, ... of it are then
  checked on a held-out batch: the nucleus mass outside the set and the sampled tokens outside
  it. An output head cut to such a set costs its share of the 262k-row head.

Run: python benchmarks/quantized_generation.py [--vocab] [--batch 64] [--tokens 32]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from fedsynth.protocol.models import DEFAULT_MODEL, LoadedModel, load_model
from fedsynth.server.generation import (
    GenerationConfig,
    _FixedBatchDecoder,
    generate_from_prompts,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: benchmarks.common
from benchmarks.common import random_deltas

LAYERS = (8, 9, 10, 11)
TEMPLATE = "Here is a {label} movie review snippet:\n"


def int8_copy(loaded: LoadedModel, *, per_channel: bool) -> LoadedModel:
    """The model with every ``nn.Linear`` (output head included) dynamically quantized to int8."""
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    model = copy.deepcopy(loaded.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's eager quantization is deprecated for torchao
        quantize_dynamic(model, {torch.nn.Linear: qconfig}, inplace=True)  # type: ignore[no-untyped-call]
    return dataclasses.replace(loaded, model=model)


def speed(loaded: LoadedModel, *, batch: int, tokens: int, repeats: int) -> dict[str, float]:
    """Best steered tokens/s of fp32 and the two int8 copies, alternating, same prompts."""
    prompts = [TEMPLATE.format(label=lb) for lb in ("positive", "negative")] * (batch // 2)
    config = GenerationConfig(
        max_new_tokens=tokens, batch_size=batch, stop_at_eos=False, stop_at_newline=False
    )
    layers = tuple(layer for layer in LAYERS if layer < loaded.num_layers) or (0,)
    deltas = random_deltas(loaded.hidden_size, layers, strength=0.01)
    engines = {
        "fp32": loaded,
        "int8 per-tensor": int8_copy(loaded, per_channel=False),
        "int8 per-channel": int8_copy(loaded, per_channel=True),
    }
    best = dict.fromkeys(engines, 0.0)
    for _ in range(repeats):
        for name, engine in engines.items():
            start = time.perf_counter()
            generate_from_prompts(engine, prompts, config=config, deltas=deltas, seed=1)
            best[name] = max(best[name], len(prompts) * tokens / (time.perf_counter() - start))
    return best


@torch.inference_mode()
def nucleus_run(
    loaded: LoadedModel, *, seed: int, batch: int, steps: int, top_p: float = 0.95
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Unsteered top-p sampling from the template; each step's nucleus ids and probabilities.

    Returns the accumulated nucleus probability per token id, and per step the nucleus (ids,
    probabilities) of every row, for checking a vocabulary against.
    """
    prompts = [TEMPLATE.format(label=lb) for lb in ("positive", "negative")] * (batch // 2)
    decoder = _FixedBatchDecoder(loaded)  # the sampling loop's own KV-cache decoder
    logits = decoder.prefill(
        [list(loaded.tokenizer.encode(p, add_special_tokens=True)) for p in prompts]
    )
    generator = torch.Generator().manual_seed(seed)
    mass = torch.zeros(logits.shape[-1], dtype=torch.float64)
    ids_per_step, probs_per_step = [], []
    for _ in range(steps):
        probs = torch.softmax(logits, dim=-1)
        sorted_p, sorted_i = torch.sort(probs, dim=-1, descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
        width = int(keep.sum(-1).max())
        kept_p = (sorted_p * keep)[:, :width]
        kept_i = sorted_i[:, :width]
        mass.index_add_(0, kept_i.flatten(), kept_p.flatten().double())
        ids_per_step.append(kept_i)
        probs_per_step.append(kept_p)
        choice = torch.multinomial(kept_p, 1, generator=generator)
        logits = decoder.step(kept_i.gather(-1, choice).squeeze(-1))
    return mass, ids_per_step, probs_per_step


def vocab_coverage(
    loaded: LoadedModel, *, calibration: int, batch: int, steps: int
) -> list[dict[str, Any]]:
    """Held-out nucleus mass outside the working vocabularies that hold a share of the mass."""
    if calibration < 1:
        raise ValueError(f"calibration={calibration}: at least one batch is needed")
    mass = torch.stack(
        [nucleus_run(loaded, seed=seed, batch=batch, steps=steps)[0] for seed in range(calibration)]
    ).sum(0)
    _, held_ids, held_probs = nucleus_run(loaded, seed=10_000, batch=batch, steps=steps)
    order = torch.argsort(mass, descending=True)
    share = mass[order].cumsum(0) / mass.sum()
    seen = int((mass > 0).sum())
    rows = []
    for level in (0.99, 0.999, 0.9999, 1.0):
        size = min(seen, int((share < level).sum()) + 1)
        inside = torch.zeros(len(mass), dtype=torch.bool)
        inside[order[:size]] = True
        outside = [
            float(((p * ~inside[i]).sum(-1) / p.sum(-1)).mean())
            for i, p in zip(held_ids, held_probs, strict=True)
        ]
        rows.append(
            {
                "level": level,
                "tokens": size,
                "head share": size / len(mass),
                "held-out nucleus mass outside": sum(outside) / len(outside),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the side-by-side speeds, and with ``--vocab`` the working-vocabulary coverage."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vocab", action="store_true", help="measure working vocabularies too")
    parser.add_argument("--calibration", type=int, default=3, help="calibration batches")
    parser.add_argument("--steps", type=int, default=40, help="decoding steps per batch")
    args = parser.parse_args(argv)
    loaded = load_model(args.model)
    best = speed(loaded, batch=args.batch, tokens=args.tokens, repeats=args.repeats)
    print(f"steered tokens/s, batch {args.batch} x {args.tokens} tokens, equal work:")
    for name, value in best.items():
        print(f"  {name:18s} {value:7.1f}  {value / best['fp32']:.2f}x fp32")
    if args.vocab:
        print("working vocabulary (from unsteered template samples) on a held-out batch:")
        for row in vocab_coverage(
            loaded, calibration=args.calibration, batch=args.batch, steps=args.steps
        ):
            print(
                f"  {row['level']:.4%} of calibration mass: {row['tokens']:6d} tokens "
                f"({row['head share']:.1%} of the head), held-out nucleus mass outside "
                f"{row['held-out nucleus mass outside']:.2%}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
