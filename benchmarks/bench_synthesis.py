"""Load on the Synthesis service over TLS on loopback: concurrent streams, throughput, latency.

Starts the service on 127.0.0.1 with a model (default: the tiny test model) and a release made
like the tests make one, opens --streams concurrent Generate streams of --n samples each, and
prints samples/s, first-sample latency (p50, p99, max), whether every stream completed, and the
process's resident memory before and after (flat: generation holds one batch per stream).
Run: python benchmarks/bench_synthesis.py [--streams 32 --n 4 --model tiny-llama]
(``figures(quick)`` gives the same numbers to ``python -m benchmarks``.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))
from synthesis_harness import TOKEN, make_pki, save_store, write_token_file

from fedsynth.protocol.models import load_model
from fedsynth.server.generation import GenerationConfig
from fedsynth.server.synthesis_client import SynthesisClient
from fedsynth.server.synthesis_service import SynthesisLimits, serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: benchmarks.common
from benchmarks.common import QUICK_MODEL, Figure, info


def rss_mib() -> float:
    """Resident memory of this process (Linux)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * 4096 / 2**20


def run(address: str, ca: Path, *, streams: int, n: int) -> tuple[float, list[float], list[int]]:
    latencies = [float("inf")] * streams
    counts = [0] * streams
    barrier = threading.Barrier(streams + 1)

    def one(i: int) -> None:
        with SynthesisClient(address, token=TOKEN, ca_cert=ca, timeout=600) as client:
            client.list_releases()  # connected before the clock starts
            barrier.wait()
            began = time.perf_counter()
            for _sample in client.generate("release-1", n, seed=i):
                if counts[i] == 0:
                    latencies[i] = time.perf_counter() - began
                counts[i] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    barrier.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began, latencies, counts


@dataclass
class LoadRun:
    """One measured run: throughput, first-sample latencies, streams that completed."""

    samples_per_s: float
    first_p50_s: float
    first_p99_s: float
    first_max_s: float
    complete: int


@dataclass
class LoadResult:
    """Every run of one benchmark and the process's resident memory around them."""

    model: str
    device: str
    streams: int
    n: int
    batch: int
    tokens: int
    runs: list[LoadRun] = field(default_factory=list)
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0


def measure(
    model: str = QUICK_MODEL,
    *,
    streams: int = 32,
    n: int = 4,
    batch: int = 8,
    tokens: int = 16,
    repeats: int = 2,
    on_run: Callable[[int, LoadRun], None] | None = None,
) -> LoadResult:
    """Serve a release over TLS on loopback and run ``repeats`` loads of ``streams`` streams."""
    loaded = load_model(model)
    result = LoadResult(loaded.name, str(loaded.device), streams, n, batch, tokens)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pki = make_pki(root / "pki")
        limits = SynthesisLimits(
            max_samples=max(n, 1),
            sample_burst=10**9,
            request_burst=10**6,
            max_concurrent_rpcs=max(64, 2 * streams),
            max_calls_per_token=max(64, 2 * streams),  # every stream uses the one token
        )
        generation = GenerationConfig(max_new_tokens=tokens, batch_size=batch)
        with serve(
            releases=save_store(root / "releases", loaded),
            loaded=loaded,
            token_file=write_token_file(root / "tokens", TOKEN),
            tls_cert=pki.cert,
            tls_key=pki.key,
            limits=limits,
            generation=generation,
        ) as server:
            run(server.address, pki.ca, streams=2, n=1)  # warm-up
            result.rss_before_mib = rss_mib()
            for r in range(repeats):
                wall, latencies, counts = run(server.address, pki.ca, streams=streams, n=n)
                first = np.array(latencies)
                one = LoadRun(
                    samples_per_s=sum(counts) / wall,
                    first_p50_s=float(np.percentile(first, 50)),
                    first_p99_s=float(np.percentile(first, 99)),
                    first_max_s=float(first.max()),
                    complete=sum(c == n for c in counts),
                )
                result.runs.append(one)
                if on_run is not None:
                    on_run(r, one)
            result.rss_after_mib = rss_mib()
    return result


def figures(quick: bool) -> list[Figure]:
    """Samples/s, first-sample latency, completed streams and resident memory under load."""
    r = measure(QUICK_MODEL, streams=4, n=2, batch=4, tokens=8, repeats=1) if quick else measure()
    best = max(r.runs, key=lambda x: x.samples_per_s)
    where = (
        f"{r.model} on {r.device}, {r.streams} streams x {r.n} samples, batch {r.batch}, "
        f"<= {r.tokens} new tokens, best of {len(r.runs)}"
    )
    complete = min(x.complete for x in r.runs)
    return [
        info(
            "synthesis",
            "samples/s over TLS on loopback",
            best.samples_per_s,
            "samples/s",
            note=where,
        ),
        info("synthesis", "first-sample latency p50", best.first_p50_s, "s", note=where),
        info("synthesis", "first-sample latency p99", best.first_p99_s, "s", note=where),
        Figure(
            benchmark="synthesis",
            figure="streams that completed (worst run)",
            value=float(complete),
            unit="streams",
            baseline=float(r.streams),
            ratio=complete / r.streams,
            target="all",
            met=complete == r.streams,
            note=where,
        ),
        info(
            "synthesis",
            "resident memory after the loads vs before",
            r.rss_after_mib,
            "MiB",
            baseline=r.rss_before_mib,
            target="flat",
            note="generation holds one batch per stream",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--n", type=int, default=4, help="samples per stream")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--batch", type=int, default=8, help="samples generated per model call")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per sample at most")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(
        f"model {args.model}, {args.streams} streams x {args.n} samples, batch {args.batch}, "
        f"<= {args.tokens} new tokens"
    )

    def show(r: int, one: LoadRun) -> None:
        print(
            f"  run {r}: {one.samples_per_s:8.1f} samples/s, first sample p50 "
            f"{one.first_p50_s:.3f} s, p99 {one.first_p99_s:.3f} s, "
            f"max {one.first_max_s:.3f} s; {one.complete}/{args.streams} streams complete"
        )

    result = measure(
        args.model,
        streams=args.streams,
        n=args.n,
        batch=args.batch,
        tokens=args.tokens,
        repeats=args.repeats,
        on_run=show,
    )
    print(
        f"  resident memory {result.rss_before_mib:.0f} MiB before, "
        f"{result.rss_after_mib:.0f} MiB after"
    )


if __name__ == "__main__":
    main()
