"""Steered vs unsteered generation throughput at the same batch size, measured side by side.

Prints tokens/s for plain and steered decoding (same prompt, batch, seed, token budget;
newline and end-of-sequence stopping off, so every row of both sides decodes the whole budget:
the same work, as vLLM's ignore_eos; ``--as-sampled`` lets rows end at EOS, where steering that
ends rows earlier leaves ragged batches) and their ratio (target >= 0.97),
on the `transformers` backend and, at full size, on llama.cpp (the packaged GGUF model; needs
the ``llamacpp`` extra): steered llama.cpp against steered `transformers` (target >= 3x), at
equal work and in samples/s made as the demo makes them (rows end at a newline or EOS); on a
CPU with native bf16 products also `transformers` in bf16 against fp32 (target >= 3x), and
bf16 with the Latin vocabulary against the fp32 path as it decoded before single-query
attention and the in-place KV cache (``previous_decoding``; target >= 3x).
Run: python benchmarks/bench_generation.py [--backend llamacpp] [--precision bf16]
(``figures(quick)`` gives the same numbers to ``python -m benchmarks``.)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from fedsynth.protocol.models import DEFAULT_MODEL
from fedsynth.server.backends import open_backend
from fedsynth.server.generation import GenerationConfig
from fedsynth.server.output_head import native_bf16

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: benchmarks.common
from benchmarks.common import QUICK_MODEL, QUICK_NOTE, Figure, compared, random_deltas

DEFAULT_LAYERS = (8, 9, 10, 11)
QUICK_LAYERS = (1, 2)


@dataclass
class Throughput:
    """Best tokens/s of each side and the run's settings."""

    model: str
    backend: str
    batch: int
    tokens: int
    repeats: int
    unsteered: float
    steered: float
    equal_work: bool = True


def measure(
    model: str | None = None,
    *,
    backend: str = "transformers",
    batch: int = 64,
    tokens: int = 32,
    repeats: int = 3,
    layers: tuple[int, ...] = DEFAULT_LAYERS,
    threads: int | None = None,
    equal_work: bool = True,
    head: str = "auto",
    precision: str = "auto",
    vocabulary: str = "full",
    previous: bool = False,
) -> Throughput:
    """Alternate unsteered and steered runs ``repeats`` times; keep the best of each.

    ``head``: llama.cpp's output-head placement (``llamacpp``: llama.cpp computes it too).
    ``precision``: the `transformers` dtype (``bf16`` on a CPU with native bf16 products).
    ``vocabulary``: the tokens that may be sampled (``latin``: the head computes only those).
    ``previous``: decode as `transformers` did before single-query attention and the in-place
    KV cache (:func:`previous_decoding`), the baseline those are measured against.
    """
    name = model or DEFAULT_MODEL
    engine = open_backend(backend, name, threads=threads, head=head, precision=precision)
    if precision != "auto":
        backend = f"{backend} {precision}"
    if vocabulary != "full":
        backend = f"{backend} {vocabulary}"
    if previous:
        backend = f"{backend} (previous decoding)"
    config = GenerationConfig(
        max_new_tokens=tokens,
        batch_size=batch,
        stop_at_newline=False,
        stop_at_eos=not equal_work,
        vocabulary=vocabulary,
    )
    deltas = random_deltas(engine.hidden_size, layers, strength=0.05)
    prompt = "Here is a positive movie review snippet:\n"
    results: dict[str, list[float]] = {"unsteered": [], "steered": []}
    with previous_decoding() if previous else contextlib.nullcontext():
        engine.generate([prompt] * 4, config=config, deltas=None, seed=0)  # warm-up
        for r in range(repeats):
            for side, d in (("unsteered", None), ("steered", deltas)):
                counted = [0]

                def count(_n: int, t: int, counted: list[int] = counted) -> None:
                    counted[0] += t

                t0 = time.perf_counter()
                engine.generate([prompt] * batch, config=config, deltas=d, seed=r, progress=count)
                results[side].append(counted[0] / (time.perf_counter() - t0))
    return Throughput(
        model=name,
        backend=backend,
        batch=batch,
        tokens=tokens,
        repeats=repeats,
        unsteered=max(results["unsteered"]),
        steered=max(results["steered"]),
        equal_work=equal_work,
    )


def samples_per_s(
    model: str | None = None,
    *,
    backend: str = "transformers",
    batch: int = 64,
    per_label: int = 256,
    repeats: int = 2,
    layers: tuple[int, ...] = DEFAULT_LAYERS,
    precision: str = "auto",
    vocabulary: str = "full",
    previous: bool = False,
    shots: int = 0,
    share_prompts: bool = True,
    park_prompts: bool = True,
    share_prefixes: bool = True,
    template_shots: int = 0,
) -> float:
    """Best steered samples/s generated as the demo generates (rows end at a newline or EOS,
    48-token budget; prompts of a label go through :func:`iter_label_texts`, which gives a
    refilling backend several batches per call). ``vocabulary``, ``previous``: as in
    :func:`measure`. ``shots``: shots per sample from a pool of plain samples generated first
    (the demo's default is 1; the pool's time counts). ``share_prompts`` False: llama.cpp
    decodes every prompt, also one a live row already holds. ``park_prompts`` False: llama.cpp
    keeps no finished row's prompt in a spare sequence. ``share_prefixes`` False: llama.cpp
    decodes a prompt no sequence holds whole from its first token. ``template_shots``: fixed
    public shots of the template (a task file's), the same before every prompt."""
    from fedsynth.protocol.features import PromptTemplate
    from fedsynth.server.llamacpp import _LlamaDecoder
    from fedsynth.server.synthesize import iter_label_texts

    engine = open_backend(backend, model or DEFAULT_MODEL, precision=precision)
    config = GenerationConfig(max_new_tokens=48, batch_size=batch, vocabulary=vocabulary)
    template = PromptTemplate(
        instruction="Here is a {label} movie review snippet:\n",
        label_names=(("pos", "positive"), ("neg", "negative")),
        shots=TEMPLATE_SHOTS[:template_shots],
    )
    deltas = random_deltas(engine.hidden_size, layers, strength=0.01)
    best = 0.0
    with (
        previous_decoding() if previous else contextlib.nullcontext(),
        mock.patch.object(_LlamaDecoder, "share_live_prompts", share_prompts),
        mock.patch.object(_LlamaDecoder, "park_prompts", park_prompts),
        mock.patch.object(_LlamaDecoder, "share_prefixes", share_prefixes),
    ):
        engine.generate(["warm-up"] * 4, config=config, deltas=None, seed=0)
        for r in range(repeats):
            t0 = time.perf_counter()
            made = 0
            for label in ("pos", "neg"):
                for _ in iter_label_texts(
                    engine,
                    template,
                    label,
                    n=per_label,
                    deltas=deltas,
                    config=config,
                    seed=r,
                    shots=shots,
                ):
                    made += 1
            best = max(best, made / (time.perf_counter() - t0))
    return best


TEMPLATE_SHOTS = (
    ("pos", "A warm, funny and beautifully acted film that earns every one of its tears."),
    ("neg", "The plot goes nowhere, slowly, and the jokes land with a dull thud."),
    ("pos", "A sharp script and a fearless lead performance make this one to remember."),
)
"""Public shots written for the benchmark, for a template that shows fixed shots."""


@contextlib.contextmanager
def previous_decoding() -> Iterator[None]:
    """Decode on the CPU as before 2026-12-06: `transformers`' sdpa attention for every step
    and its concatenating dynamic KV cache (the baseline of the issue's "today's path")."""
    from transformers import DynamicCache

    from fedsynth.server import generation, kv_cache

    with (
        mock.patch.object(generation, "use_for_decoding", lambda _model: False),
        mock.patch.object(kv_cache, "growing_cache", lambda config: DynamicCache(config=config)),
    ):
        yield


def _llama_cpp_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def figures(quick: bool) -> list[Figure]:
    """Steered tokens/s against unsteered tokens/s; llama.cpp against transformers."""
    if quick:
        r = measure(QUICK_MODEL, batch=8, tokens=8, repeats=2, layers=QUICK_LAYERS)
        where = f"{r.model}, batch {r.batch}, {r.tokens} new tokens, best of {r.repeats}"
        return [
            compared(
                "generation",
                "steered vs unsteered generation",
                r.steered,
                "tokens/s",
                baseline=r.unsteered,
                judge=False,
                at_least=0.97,
                note=f"{where}. {QUICK_NOTE} (llama.cpp runs only the packaged models)",
            )
        ]
    runs = [measure()]
    own_head = None
    if _llama_cpp_installed():
        runs.append(measure(backend="llamacpp"))
        own_head = measure(backend="llamacpp", head="llamacpp")
    low = measure(precision="bf16") if native_bf16() else None
    fastest = measure(precision="bf16", vocabulary="latin") if native_bf16() else None
    before = measure(previous=True)  # fp32, as transformers decoded before 2026-12-06
    as_demo: dict[tuple[str, int, bool, bool, bool], float] = {}  # samples/s as the demo

    def demo_rate(
        engine: str, shots: int = 0, share: bool = True, park: bool = True, prefixes: bool = True
    ) -> float:
        """``engine``: "backend[ precision[ vocabulary]]", "previous" for the old decoding;
        ``shots``, ``share``, ``park`` and ``prefixes`` (``share_prefixes``): as in
        :func:`samples_per_s`."""
        key = (engine, shots, share, park, prefixes)
        if key not in as_demo:
            parts = engine.split(" ")
            backend = parts[0]
            precision = parts[1] if len(parts) > 1 else "auto"
            vocabulary = parts[2] if len(parts) > 2 else "full"
            as_demo[key] = samples_per_s(
                backend=backend,
                precision="auto" if precision == "previous" else precision,
                vocabulary=vocabulary,
                previous=precision == "previous",
                shots=shots,
                share_prompts=share,
                park_prompts=park,
                share_prefixes=prefixes,
            )
        return as_demo[key]

    out = []
    for r in [*runs, *([low] if low else [])]:
        where = (
            f"{r.model}, batch {r.batch}, every row {r.tokens} new tokens (no EOS stop), "
            f"best of {r.repeats}"
        )
        out.append(
            compared(
                "generation",
                f"steered vs unsteered generation ({r.backend})",
                r.steered,
                "tokens/s",
                baseline=r.unsteered,
                at_least=0.97,
                note=where,
            )
        )
    if own_head is not None:
        out.append(
            compared(
                "generation",
                "steered llama.cpp, output head in torch bf16 vs in llama.cpp",
                runs[1].steered,
                "tokens/s",
                baseline=own_head.steered,
                judge=False,
                note=f"same batch {own_head.batch}; 'auto' puts the head in torch where the CPU "
                "has native bf16 products and the head is most of the model (Gemma 3 270M)",
            )
        )
    if low is not None:
        out.append(
            compared(
                "generation",
                "steered transformers bf16 vs fp32 (CPU)",
                low.steered,
                "tokens/s",
                baseline=runs[0].steered,
                at_least=3.0,
                note=f"same batch {low.batch}; --precision bf16 on a CPU with native bf16 "
                "products (AMX / AVX512-BF16)",
            )
        )
        out.append(
            compared(
                "generation",
                "steered transformers bf16 vs fp32, samples as the demo makes them",
                demo_rate("transformers bf16"),
                "samples/s",
                baseline=demo_rate("transformers"),
                at_least=3.0,
                note="rows end at a newline or EOS (48-token budget), 256 per label, 2 labels, "
                "batch 64",
            )
        )
    out.append(
        compared(
            "generation",
            "steered transformers fp32, single-query attention and in-place KV cache vs before",
            runs[0].steered,
            "tokens/s",
            baseline=before.steered,
            judge=False,
            note=f"same batch {before.batch}; exact changes (same samples up to float rounding)",
        )
    )
    if fastest is not None:
        out.append(
            compared(
                "generation",
                "steered transformers bf16 + latin vocabulary vs the fp32 path before 2026-12-06",
                fastest.steered,
                "tokens/s",
                baseline=before.steered,
                at_least=3.0,
                note=f"same batch {before.batch}; --precision bf16 --vocabulary latin against "
                "fp32 with sdpa decoding steps and a concatenating KV cache",
            )
        )
        out.append(
            compared(
                "generation",
                "same, samples as the demo makes them",
                demo_rate("transformers bf16 latin"),
                "samples/s",
                baseline=demo_rate("transformers previous"),
                at_least=3.0,
                note="rows end at a newline or EOS (48-token budget), 256 per label, 2 labels, "
                "batch 64",
            )
        )
    if len(runs) == 2:
        out.append(
            compared(
                "generation",
                "steered llama.cpp vs transformers, samples as the demo makes them",
                demo_rate("llamacpp"),
                "samples/s",
                baseline=demo_rate("transformers"),
                at_least=3.0,
                note="rows end at a newline or EOS (48-token budget), 256 per label, 2 labels, "
                "batch 64; llama.cpp refills its batch as rows end",
            )
        )
        one_shot = "one shot per sample from a pool of 64 plain samples (the demo's default; "
        out.append(
            compared(
                "generation",
                "steered llama.cpp vs transformers, samples as the demo makes them, one shot",
                demo_rate("llamacpp", shots=1),
                "samples/s",
                baseline=demo_rate("transformers previous", shots=1),
                at_least=3.0,
                note=one_shot + "the pool's time counts), 256 per label, 2 labels, batch 64; "
                "against the fp32 transformers path before 2026-12-06",
            )
        )
        out.append(
            compared(
                "generation",
                "steered llama.cpp, one shot: a prompt a live row holds copied vs decoded again",
                demo_rate("llamacpp", shots=1, park=False),
                "samples/s",
                baseline=demo_rate("llamacpp", shots=1, share=False, park=False),
                judge=False,
                note=one_shot + "most refills draw a shot a live row already shows); neither "
                "keeps finished rows' prompts",
            )
        )
        out.append(
            compared(
                "generation",
                "steered llama.cpp, one shot: finished rows' prompts kept in spare sequences "
                "vs not",
                demo_rate("llamacpp", shots=1),
                "samples/s",
                baseline=demo_rate("llamacpp", shots=1, park=False),
                judge=False,
                note=one_shot + "a shot no live row shows is copied from a spare sequence "
                "instead of decoded again)",
            )
        )
        out.append(
            compared(
                "generation",
                "steered llama.cpp, one shot: a new prompt started from the longest prefix "
                "held vs decoded whole",
                demo_rate("llamacpp", shots=1),
                "samples/s",
                baseline=demo_rate("llamacpp", shots=1, prefixes=False),
                judge=False,
                note=one_shot + "each new shot prompt copies the instruction before its shot "
                "from a sequence holding it)",
            )
        )
        out.append(
            compared(
                "generation",
                "steered llama.cpp + latin vocabulary vs transformers, one shot",
                demo_rate("llamacpp auto latin", shots=1),
                "samples/s",
                baseline=demo_rate("transformers previous", shots=1),
                at_least=3.0,
                note=one_shot + "the pool's time counts); --vocabulary latin: the torch output "
                "head multiplies only the kept rows; against the fp32 transformers path before "
                "2026-12-06 with the full vocabulary",
            )
        )
        out.append(
            compared(
                "generation",
                "steered llama.cpp vs steered transformers",
                runs[1].steered,
                "tokens/s",
                baseline=runs[0].steered,
                at_least=3.0,
                note=f"same batch {runs[0].batch}; llama.cpp on torch's thread count",
            )
        )
    else:
        out.append(
            compared(
                "generation",
                "steered llama.cpp vs steered transformers",
                float("nan"),
                "tokens/s",
                baseline=runs[0].steered,
                at_least=3.0,
                judge=False,
                note='not measured: pip install "fedsynth[llamacpp]"',
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="transformers")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", default="auto", help="transformers: auto, fp32 or bf16")
    parser.add_argument(
        "--as-sampled", action="store_true", help="let rows end at EOS (ragged batches)"
    )
    args = parser.parse_args()
    r = measure(
        backend=args.backend,
        batch=args.batch,
        tokens=args.tokens,
        repeats=args.repeats,
        threads=args.threads,
        equal_work=not args.as_sampled,
        precision=args.precision,
    )
    work = "rows may end at EOS" if args.as_sampled else "every row decodes all of them"
    print(f"{r.backend}: model {r.model}, batch {r.batch}, {r.tokens} new tokens ({work})")
    for k, v in (("unsteered", r.unsteered), ("steered", r.steered)):
        print(f"  {k:10s} {v:8.1f} tokens/s")
    print(f"ratio steered / unsteered = {r.steered / r.unsteered:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
