"""Steered generation on a CUDA GPU: tokens/s of each `transformers` decoder, side by side.

For every batch size it times, on the same model, prompt, seed and token budget (every row
decodes the whole budget: newline and end-of-sequence stopping off, the same work on both
sides), the unsteered and the steered run of:

* ``dynamic``: the default decoder (a KV cache that grows by one column a step; ended rows leave);
* ``static``: :class:`~fedsynth.server.generation._StaticCacheDecoder`, a preallocated cache
  of fixed shapes, run eagerly;
* ``compiled``: the same through ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), for
  the batch sizes in ``--compiled-batches`` (each shape is a capture of its own, a minute or
  more; its time is reported apart and not counted in tokens/s).

Run where a GPU is present and the model installed:
    python benchmarks/bench_cuda.py --model gemma3-270m --json cuda.json
``--shape-only DIR`` builds the model from ``DIR/config.json`` and its tokenizer with random
bf16 weights instead of loading them: the same architecture and arithmetic, so the same
tokens/s when every row decodes the whole budget (the samples are noise; for a GPU that cannot
receive the weights). DIR holds ``config.json``, ``tokenizer.json`` and
``tokenizer_config.json``, copied from the model's cache folder (``~/.cache/fedsynth/models/
gemma3-270m`` once the model has been loaded on any machine). It imports only the generation
code (no federation stack), so it runs beside nothing but torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fedsynth.protocol.models import LoadedModel, load_model, loaded_fingerprint
from fedsynth.server.generation import GenerationConfig, generate_from_prompts

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: benchmarks.common
from benchmarks.common import QUICK_MODEL, QUICK_NOTE, Figure, compared, random_deltas

PROMPT = (
    "Here is a movie review from a public collection:\n"
    "a thoughtful, beautifully shot film that never quite earns its ending.\n"
    "Here is a positive movie review snippet:\n"
)
LAYERS = (8, 9, 10, 11)


def shape_only(directory: Path, device: str | None = None) -> LoadedModel:
    """The model of ``directory/config.json`` with random bf16 weights, and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = AutoConfig.from_pretrained(directory)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        name=f"{directory.name} (random weights)",
        model=model,
        tokenizer=tokenizer,
        fingerprint=loaded_fingerprint(model, tokenizer),
        device=torch.device(device),
    )


def equal_work(batch: int, tokens: int, temperature: float) -> GenerationConfig:
    """Every row decodes ``tokens`` tokens: newline and end-of-sequence stopping off."""
    return GenerationConfig(
        max_new_tokens=tokens,
        batch_size=batch,
        stop_at_newline=False,
        stop_at_eos=False,
        temperature=temperature,
    )


def timed(run: Callable[[], object], device: torch.device) -> float:
    """Seconds for one run, the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(
    loaded: LoadedModel,
    variant: str,
    batch: int,
    *,
    tokens: int,
    repeats: int,
    temperature: float = 1.0,
    layers: tuple[int, ...] = LAYERS,
) -> dict[str, Any]:
    """Best tokens/s of the unsteered and steered run of one decoder at one batch size."""
    config = equal_work(batch, tokens, temperature)
    prompts = [PROMPT] * batch
    deltas = random_deltas(int(loaded.model.config.hidden_size), layers, strength=0.05)
    options = {
        "dynamic": {"refill": False},
        "static": {"static_cache": True},
        "compiled": {"static_cache": True, "compile_steps": True},
    }[variant]

    def run(steered: bool) -> list[str]:
        return generate_from_prompts(
            loaded,
            prompts,
            config=config,
            deltas=deltas if steered else None,
            seed=0,
            **options,  # type: ignore[arg-type]
        )

    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loaded.device)
    texts: dict[bool, list[str]] = {}

    def first(steered: bool) -> None:  # the run that captures (compiled); its texts are kept
        texts[steered] = run(steered)

    warm = {side: timed(partial(first, side), loaded.device) for side in (False, True)}
    best = {False: float("inf"), True: float("inf")}
    for _ in range(repeats):
        for side in (False, True):
            best[side] = min(best[side], timed(partial(run, side), loaded.device))
    work = batch * tokens
    peak = torch.cuda.max_memory_allocated(loaded.device) if loaded.device.type == "cuda" else 0
    return {
        "variant": variant,
        "batch": batch,
        "tokens": tokens,
        "temperature": temperature,
        "unsteered_tokens_per_s": work / best[False],
        "steered_tokens_per_s": work / best[True],
        "steered_over_unsteered": best[False] / best[True],
        "first_run_seconds": warm,
        "peak_gib": peak / 2**30,
        # Share of rows the release changed (same seed): 0 would mean the steering was lost.
        "steered_rows_changed": sum(a != b for a, b in zip(texts[False], texts[True], strict=True))
        / batch,
    }


def figures(quick: bool) -> list[Figure]:
    """Compiled static-cache decoding against the default decoder; steered against unsteered.

    On CUDA at full size: the default model at batches 64 and 1024. Without a GPU (or
    ``--quick``): the tiny model on the CPU, which checks the code paths, not the speed.
    """
    on_gpu = torch.cuda.is_available() and not quick
    loaded = load_model("gemma3-270m" if on_gpu else QUICK_MODEL)
    layers = LAYERS if on_gpu else (1,)
    batches = (64, 1024) if on_gpu else (4,)
    tokens, repeats = (48, 3) if on_gpu else (4, 1)
    note = "every row decodes the whole budget" if on_gpu else f"{QUICK_NOTE}; no GPU here"
    out = []
    for batch in batches:
        rows = {
            v: measure(loaded, v, batch, tokens=tokens, repeats=repeats, layers=layers)
            for v in ("dynamic", "compiled")
        }
        where = f"{loaded.name}, batch {batch}, {tokens} tokens; {note}"
        out.append(
            compared(
                "cuda",
                f"compiled static-cache vs default decoder, steered (batch {batch})",
                rows["compiled"]["steered_tokens_per_s"],
                "tokens/s",
                baseline=rows["dynamic"]["steered_tokens_per_s"],
                judge=False,
                note=where,
            )
        )
        out.append(
            compared(
                "cuda",
                f"steered vs unsteered, compiled (batch {batch})",
                rows["compiled"]["steered_tokens_per_s"],
                "tokens/s",
                baseline=rows["compiled"]["unsteered_tokens_per_s"],
                at_least=0.97,
                judge=on_gpu,
                note=where,
            )
        )
    return out


def main() -> None:
    """Time every decoder at every batch size; print a table, write JSON as rows finish."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--shape-only", type=Path, help="config + tokenizer folder")
    parser.add_argument("--batches", default="64,256,1024")
    parser.add_argument("--compiled-batches", default="256")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="random weights give near-uniform logits, a nucleus of most of the vocabulary "
        "(the sampler's worst case); a low temperature gives a real model's few dozen tokens",
    )
    parser.add_argument("--layers", default=",".join(map(str, LAYERS)), help="steered blocks")
    parser.add_argument("--profile", action="store_true", help="profile one dynamic run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    layers = tuple(int(x) for x in args.layers.split(","))
    started = time.perf_counter()
    loaded = shape_only(args.shape_only) if args.shape_only else load_model(args.model)
    import transformers

    report: dict[str, Any] = {
        "model": loaded.name,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_seconds": time.perf_counter() - started,
        "rows": [],
        "errors": [],
    }
    plan = [(v, int(b)) for v in ("dynamic", "static") for b in args.batches.split(",")]
    plan += [("compiled", int(b)) for b in args.compiled_batches.split(",") if b]
    print(f"{'decoder':<9} {'batch':>6} {'plain tok/s':>12} {'steered tok/s':>14} {'ratio':>6}")
    for variant, batch in plan:
        try:
            row = measure(
                loaded,
                variant,
                batch,
                tokens=args.tokens,
                repeats=args.repeats,
                temperature=args.temperature,
                layers=layers,
            )
        except Exception as exc:  # one decoder failing must not lose the others' figures
            report["errors"].append(
                {"variant": variant, "batch": batch, "error": repr(exc)}
                | {"trace": traceback.format_exc()}
            )
            print(f"{variant:<9} {batch:>6} failed: {exc!r}")
        else:
            report["rows"].append(row)
            first = row["first_run_seconds"]
            print(
                f"{variant:<9} {batch:>6} {row['unsteered_tokens_per_s']:>12.0f} "
                f"{row['steered_tokens_per_s']:>14.0f} {row['steered_over_unsteered']:>6.3f}"
                f"   (changed {row['steered_rows_changed']:.2f}; first runs "
                f"{first[False]:.1f}/{first[True]:.1f} s, peak {row['peak_gib']:.1f} GiB)",
                flush=True,
            )
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))
    if args.profile:
        report["profile"] = profile(loaded, plan[0][1], args.tokens, args.temperature, layers)
        print(report["profile"])
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))


def profile(
    loaded: LoadedModel, batch: int, tokens: int, temperature: float, layers: tuple[int, ...]
) -> str:
    """The operators that took the most time in one steered run of the default decoder."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    config = equal_work(batch, tokens, temperature)
    deltas = random_deltas(int(loaded.model.config.hidden_size), layers, strength=0.05)
    activities = [ProfilerActivity.CPU]
    if loaded.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        generate_from_prompts(
            loaded, [PROMPT] * batch, config=config, deltas=deltas, seed=0, refill=False
        )
    key = "self_cuda_time_total" if loaded.device.type == "cuda" else "self_cpu_time_total"
    return str(prof.key_averages().table(sort_by=key, row_limit=18))


if __name__ == "__main__":
    main()
