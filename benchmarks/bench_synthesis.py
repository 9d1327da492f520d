"""Load on the Synthesis service over TLS on loopback: concurrent streams, throughput, latency.

Starts the service on 127.0.0.1 with a model (default: the tiny test model) and a release made
like the tests make one, opens --streams concurrent Generate streams of --n samples each, and
prints samples/s, first-sample latency (p50, p99, max), whether every stream completed, and the
process's resident memory before and after (flat: generation holds one batch per stream).
Run: python benchmarks/bench_synthesis.py [--streams 32 --n 4 --model tiny-llama]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))
from synthesis_harness import TOKEN, make_pki, save_store, write_token_file

from fedsynth.protocol.models import load_model
from fedsynth.server.generation import GenerationConfig
from fedsynth.server.synthesis_client import SynthesisClient
from fedsynth.server.synthesis_service import SynthesisLimits, serve


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--n", type=int, default=4, help="samples per stream")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--batch", type=int, default=8, help="samples generated per model call")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per sample at most")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    loaded = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pki = make_pki(root / "pki")
        limits = SynthesisLimits(
            max_samples=max(args.n, 1),
            sample_burst=10**9,
            request_burst=10**6,
            max_concurrent_rpcs=max(64, 2 * args.streams),
        )
        generation = GenerationConfig(max_new_tokens=args.tokens, batch_size=args.batch)
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
            before = rss_mib()
            print(
                f"model {loaded.name} on {loaded.device}, {args.streams} streams x {args.n} "
                f"samples, batch {args.batch}, <= {args.tokens} new tokens"
            )
            for r in range(args.repeats):
                wall, latencies, counts = run(
                    server.address, pki.ca, streams=args.streams, n=args.n
                )
                first = np.array(latencies)
                complete = sum(c == args.n for c in counts)
                print(
                    f"  run {r}: {sum(counts) / wall:8.1f} samples/s, first sample p50 "
                    f"{np.percentile(first, 50):.3f} s, p99 {np.percentile(first, 99):.3f} s, "
                    f"max {first.max():.3f} s; {complete}/{args.streams} streams complete"
                )
            print(f"  resident memory {before:.0f} MiB before, {rss_mib():.0f} MiB after")


if __name__ == "__main__":
    main()
