"""Federated Private Evolution costs per round: client time, upload bytes, coordinator split.

Runs two real PE rounds in one process: K PEVoter clients (real all-MiniLM-L6-v2 embedder,
rotten_tomatoes records split IID among them) behind an in-process transport that passes every
message through Flower's protobuf serialization, the real secure sum, and the coordinator's
generator (gemma3-270m) for the population. Measures, side by side:

1. client throughput of a full first round (setup, share_keys, masked_input, unmask: record
   loading, embedding, voting, noise, masking, key agreement) against the bare
   ``embedder.embed(texts)`` throughput on the same texts (target >= 0.9), and the seconds of a
   later round whose private embeddings are cached in the node process (vote + noise + mask);
2. bytes each client uploads per round, from the serialized reply RecordDicts: the masked
   vector against the raw int32 histogram (target <= 1.1) and the key material (O(K));
3. the coordinator's seconds per round, split into generation (variations + embedding the
   population) and aggregation (its side of the secure sum + decoding).

All clients share one process here. The voter's in-process embedding cache (client/pe_voter.py)
is keyed by data file; whether each node's embeddings were cached is read from that cache just
before its masked_input stage and printed next to its times (a hit is what every node gets in a
deployment, one node per process). Round 2 runs in reverse node order, so even a cache that
held a single data file would serve the node embedded last in round 1.
Run: python benchmarks/bench_pe.py [--threads 2] [--per-label 10] [--private-per-label 500]
(``figures(quick)`` gives the same numbers to ``python -m benchmarks``; quick runs the tiny
model as generator and a hashing embedder.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from fedsynth.client import pe_voter
from fedsynth.client.pe_voter import PEVoter
from fedsynth.client.policy import ClientPolicy
from fedsynth.client.settings import ClientSettings
from fedsynth.protocol.accounting import calibrate_pe, pe_aggregate_noise_std
from fedsynth.protocol.embedding import load_embedder
from fedsynth.protocol.identity import simulated_member, write_simulated_consortium
from fedsynth.protocol.messages import vector_to_bytes
from fedsynth.protocol.models import load_model
from fedsynth.protocol.pe import Embedder, Population, threshold_histogram
from fedsynth.protocol.pe_manifest import PERoundManifest, decode_histogram
from fedsynth.protocol.secagg import ROUND_STAGES
from fedsynth.server.pe_coordinator import (
    PEConfig,
    build_round_manifest,
    initial_population,
    next_population,
)
from fedsynth.server.pe_text import TextRandomAPI, TextVariationAPI, VariationConfig
from fedsynth.server.secure_round import Reply, RoundResult, run_secure_sum
from fedsynth.simulations.datasets import (
    load_corpus,
    partition_iid,
    subsample_per_label,
    write_jsonl,
)
from fedsynth.simulations.demo import TEMPLATES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: benchmarks.common
from benchmarks.common import QUICK_MODEL, QUICK_NOTE, Figure, compared, info

STAGES = tuple(stage.value for stage in ROUND_STAGES)
EMBEDDER = "all-minilm-l6-v2"
GENERATOR = "gemma3-270m"
CORPUS = "rotten_tomatoes"
QUICK_EMBEDDER = "hashing-64"


@dataclass
class Node:
    """One client: its voter, its persistent state and its private texts."""

    voter: PEVoter
    path: Path
    texts: list[str]
    state: RecordDict = field(default_factory=RecordDict)


@dataclass
class RoundLog:
    """What the transport saw in one round."""

    handle_s: dict[int, dict[str, float]] = field(default_factory=dict)
    reply_bytes: dict[int, dict[str, int]] = field(default_factory=dict)
    masked_bytes: dict[int, int] = field(default_factory=dict)
    cache_hit: dict[int, bool] = field(default_factory=dict)
    serde_s: float = 0.0

    def client_s(self, node_id: int) -> float:
        """All of one client's handle() seconds in this round."""
        return sum(self.handle_s.get(node_id, {}).values())

    def all_clients_s(self) -> float:
        """Every client's handle() seconds together."""
        return sum(self.client_s(n) for n in self.handle_s)


class TimedTransport:
    """Calls the voters in a fixed order, through protobuf, timing and sizing every reply."""

    def __init__(self, nodes: Mapping[int, Node], order: Sequence[int]) -> None:
        self.nodes = nodes
        self.order = list(order)
        self.log = RoundLog()

    def exchange(
        self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        replies: dict[int, Reply] = {}
        for node_id in [n for n in self.order if n in requests]:
            node = self.nodes[node_id]
            t0 = time.perf_counter()
            content = recorddict_from_proto(recorddict_to_proto(requests[node_id]))
            self.log.serde_s += time.perf_counter() - t0
            if stage == "masked_input":  # were this node's private embeddings cached?
                cached = {key[0] for key in pe_voter._EMBEDDINGS}
                self.log.cache_hit[node_id] = str(node.path.resolve()) in cached
            t0 = time.perf_counter()
            reply = node.voter.handle(stage, content, node.state)  # refusals raise: loud
            self.log.handle_s.setdefault(node_id, {})[stage] = time.perf_counter() - t0
            t0 = time.perf_counter()
            proto = recorddict_to_proto(reply)
            self.log.reply_bytes.setdefault(node_id, {})[stage] = proto.ByteSize()
            replies[node_id] = Reply(content=recorddict_from_proto(proto))
            self.log.serde_s += time.perf_counter() - t0
            if stage == "masked_input":
                masked = reply.config_records["fedsynth"]["masked"]
                assert isinstance(masked, bytes)
                self.log.masked_bytes[node_id] = len(masked)
        return replies


@dataclass
class RoundOutcome:
    """One PE round as the coordinator sees it."""

    manifest: PERoundManifest
    result: RoundResult
    histogram: np.ndarray
    log: RoundLog
    embed_s: float
    secure_sum_s: float
    decode_s: float

    @property
    def aggregation_s(self) -> float:
        """Coordinator side of the secure sum (wall minus client compute and serde) + decode."""
        return self.secure_sum_s - self.log.all_clients_s() - self.log.serde_s + self.decode_s


def run_round(
    nodes: Mapping[int, Node],
    order: Sequence[int],
    config: PEConfig,
    population: Population,
    *,
    round_number: int,
    embedder: Embedder,
) -> RoundOutcome:
    """Embed the population, run one secure sum of the clients' votes, decode the histogram."""
    calibration = calibrate_pe(
        mode=config.mode, epsilon=config.epsilon, delta=config.delta, rounds=config.rounds
    )
    t0 = time.perf_counter()
    candidates = embedder.embed(list(population.samples))
    embed_s = time.perf_counter() - t0
    manifest = build_round_manifest(
        config,
        calibration,
        pe_task_id="pe-bench",
        round_number=round_number,
        embedder=embedder,
        candidates=candidates,
        nodes=tuple(nodes),
    )
    transport = TimedTransport(nodes, order)
    fields = {"manifest": manifest.to_json(), "candidates": vector_to_bytes(candidates.reshape(-1))}
    t0 = time.perf_counter()
    result = run_secure_sum(transport, manifest, fields)
    secure_sum_s = time.perf_counter() - t0
    if result.dropped or result.refusals:
        raise RuntimeError(f"round {round_number} lost clients: {result.refusals}")
    t0 = time.perf_counter()
    histogram = decode_histogram(
        result.field_sum,
        manifest=manifest,
        survivors=len(result.survivors),
        rng=np.random.default_rng(round_number),
    )
    decode_s = time.perf_counter() - t0
    return RoundOutcome(manifest, result, histogram, transport.log, embed_s, secure_sum_s, decode_s)


def measure_bare(
    embedder: Embedder, nodes: Mapping[int, Node], runs: dict[int, list[float]], repeats: int
) -> None:
    """Append ``repeats`` timings of the bare ``embedder.embed`` on each client's texts."""
    for node_id, node in nodes.items():
        for _ in range(repeats):
            t0 = time.perf_counter()
            embedder.embed(node.texts)
            runs[node_id].append(time.perf_counter() - t0)


@dataclass(frozen=True)
class Options:
    """What one benchmark run measures (the command-line options)."""

    per_label: int = 10
    private_per_label: int = 500
    max_new_tokens: int = VariationConfig().generation.max_new_tokens
    clients: int = 3
    epsilon: float = 4.0
    repeats: int = 1
    seed: int = 0
    embedder: str = EMBEDDER
    generator: str = GENERATOR


@dataclass
class Measurement:
    """Everything two measured PE rounds produced."""

    args: Options
    ids: list[int]
    n_texts: dict[int, int]
    round1: RoundOutcome
    round2: RoundOutcome
    bare_runs: dict[int, list[float]]
    bare_s: dict[int, float]
    embedder_load_s: float
    model_load_s: float
    random_s: float
    vary_s: float

    @property
    def bare_rate(self) -> float:
        """Bare embedder texts/s over every client's texts (median runs)."""
        return sum(self.n_texts.values()) / sum(self.bare_s.values())

    @property
    def round1_rate(self) -> float:
        """Client texts/s of the whole first round (all four stages, every client)."""
        return sum(self.n_texts.values()) / self.round1.log.all_clients_s()

    @property
    def key_bytes(self) -> int:
        """Key material one client uploads in round 1 (setup, share_keys, unmask replies)."""
        b = self.round1.log.reply_bytes[self.ids[0]]
        return b["setup"] + b["share_keys"] + b["unmask"]

    @property
    def cached_later_s(self) -> float | None:
        """Mean round-2 seconds of the clients served from the embedding cache (None: none)."""
        hits = [n for n in self.ids if self.round2.log.cache_hit[n]]
        if not hits:
            return None
        return float(np.mean([self.round2.log.client_s(n) for n in hits]))


def measure(args: Options) -> Measurement:
    """Two real PE rounds (see the module docstring); the clients' and coordinator's costs."""
    t0 = time.perf_counter()
    embedder = load_embedder(args.embedder, None)  # the same cached object the voters load
    embedder_load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = load_model(args.generator)
    model_load_s = time.perf_counter() - t0
    template = TEMPLATES[CORPUS]
    corpus = load_corpus(CORPUS)
    variation = VariationConfig(
        generation=replace(VariationConfig().generation, max_new_tokens=args.max_new_tokens)
    )
    random_api = TextRandomAPI(loaded, template, variation.generation)
    variation_api = TextVariationAPI(loaded, template, variation)
    config = PEConfig(
        labels=corpus.labels,
        rounds=2,
        per_label=args.per_label,
        keep_selected=False,  # every candidate of the next population is a fresh variation
        epsilon=args.epsilon,
        mode="distributed",
        seed=args.seed,
    )
    noise_std = pe_aggregate_noise_std(
        calibrate_pe(mode=config.mode, epsilon=config.epsilon, delta=config.delta, rounds=2),
        clients=args.clients,
    )

    private = subsample_per_label(corpus.records, per_label=args.private_per_label, seed=args.seed)
    parts = partition_iid(private, num_clients=args.clients, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        nodes: dict[int, Node] = {}
        write_simulated_consortium(Path(tmp), len(parts))
        for index, records in enumerate(parts):
            identity, roster = simulated_member(Path(tmp), index)
            path = Path(tmp) / f"private-{index}.jsonl"
            write_jsonl(records, path)
            settings = ClientSettings(
                data_path=path,
                embedder=args.embedder,
                policy=ClientPolicy(allow_non_private=True),
                seed=args.seed + index,
                identity=identity,
                roster=roster,
            )
            node_id = 1001 + index
            voter = PEVoter(settings, node_id=node_id)
            nodes[node_id] = Node(voter, path, [r.text for r in records])
        ids = list(nodes)

        # Round-0 population (one-off, public prior).
        t0 = time.perf_counter()
        population = initial_population(config, random_api)
        random_s = time.perf_counter() - t0

        # Warm-up pass over every client's texts (first batches of each padded shape are slow),
        # then the bare embedder right before and right after round 1 (median of both sides).
        for n in ids:
            embedder.embed(nodes[n].texts)
        bare_runs: dict[int, list[float]] = {n: [] for n in ids}
        measure_bare(embedder, nodes, bare_runs, args.repeats)
        round1 = run_round(nodes, ids, config, population, round_number=1, embedder=embedder)
        measure_bare(embedder, nodes, bare_runs, args.repeats)
        bare_s = {n: float(np.median(v)) for n, v in bare_runs.items()}
        # Later rounds: selection and variations, then round 2 in reverse order (cache hit).
        t0 = time.perf_counter()
        population, _ = next_population(
            config,
            population,
            threshold_histogram(round1.histogram, config.threshold_std * noise_std),
            variation_api,
            round_number=1,
            rng=np.random.default_rng(args.seed),
        )
        vary_s = time.perf_counter() - t0
        round2 = run_round(nodes, ids[::-1], config, population, round_number=2, embedder=embedder)

    return Measurement(
        args=args,
        ids=ids,
        n_texts={n: len(nodes[n].texts) for n in ids},
        round1=round1,
        round2=round2,
        bare_runs=bare_runs,
        bare_s=bare_s,
        embedder_load_s=embedder_load_s,
        model_load_s=model_load_s,
        random_s=random_s,
        vary_s=vary_s,
    )


def report(m: Measurement) -> None:
    """Print the per-stage tables and the summary (what ``main`` shows)."""
    args, ids, n_texts, round1, round2 = m.args, m.ids, m.n_texts, m.round1, m.round2
    bare_runs, bare_s = m.bare_runs, m.bare_s
    embedder_load_s, model_load_s, random_s, vary_s = (
        m.embedder_load_s,
        m.model_load_s,
        m.random_s,
        m.vary_s,
    )
    # ---------------------------------------------------------------------------- report
    dim = round1.manifest.dim
    raw = dim * 4
    print(
        f"federated PE: {args.clients} clients, {sum(n_texts.values())} private texts "
        f"({args.private_per_label}/label, {CORPUS}), N={args.per_label}/label, histogram "
        f"dim={dim}, bits={round1.manifest.bits}, epsilon={args.epsilon} distributed, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"one-off loads (not in any round): embedder {embedder_load_s:.1f} s, generator "
        f"{model_load_s:.1f} s; round-0 random API {random_s:.1f} s"
    )
    print(
        f"\nclient seconds per stage (handle() only; bare embed = median of {2 * args.repeats} "
        "runs, before and after round 1)"
    )
    head = "".join(f"{s:>13s}" for s in STAGES)
    print(f"  {'node':>6s} {'round':>5s}{head}{'total':>9s}{'bare embed':>12s}  texts/s")
    for label, log in (("1", round1.log), ("2", round2.log)):
        for n in ids:
            stages = "".join(f"{log.handle_s[n][s]:13.3f}" for s in STAGES)
            note = "  (embeddings cached)" if log.cache_hit[n] else "  (embeds)"
            rate = n_texts[n] / log.client_s(n)
            print(
                f"  {n:>6d} {label:>5s}{stages}{log.client_s(n):9.3f}"
                f"{bare_s[n]:12.3f}  {rate:7.1f}{note}"
            )
    runs = ", ".join(f"{n}: " + "/".join(f"{t:.2f}" for t in bare_runs[n]) for n in ids)
    print(f"  bare embed runs (s, before/after round 1): {runs}")
    bare_rate = sum(n_texts.values()) / sum(bare_s.values())
    round1_rate = sum(n_texts.values()) / round1.log.all_clients_s()
    per_client = [bare_s[n] / round1.log.client_s(n) for n in ids]
    hits = [n for n in ids if round2.log.cache_hit[n]]
    later = "no node was served from the cache"
    if hits:
        later_s = float(np.mean([round2.log.client_s(n) for n in hits]))
        first_s = float(np.mean([round1.log.client_s(n) for n in hits]))
        later = f"{later_s:.3f} s = {later_s / first_s:.3f} x round 1"
    print(f"  bare embedder {bare_rate:.1f} texts/s, client round 1 {round1_rate:.1f} texts/s")

    b = round1.log.reply_bytes[ids[0]]
    keys = b["setup"] + b["share_keys"] + b["unmask"]
    masked = round1.log.masked_bytes[ids[0]]
    peers = args.clients - 1
    print(f"\nupload per client per round (serialized replies, node {ids[0]}, round 1)")
    print(f"  raw int32 histogram        {raw:8d} B  ({dim} x 4)")
    print(f"  masked vector              {masked:8d} B")
    print(f"  masked_input message       {b['masked_input']:8d} B  (envelope included)")
    print(
        f"  key material               {keys:8d} B  (setup {b['setup']}, share_keys "
        f"{b['share_keys']}, unmask {b['unmask']}; {peers} peers)"
    )

    print("\ncoordinator seconds per round")
    print(f"  {'round':>5s}{'generation':>12s}{'embed pop.':>12s}{'aggregation':>13s}{'serde':>9s}")
    for label, out, gen in (("1", round1, random_s), ("2", round2, vary_s)):
        print(
            f"  {label:>5s}{gen:12.2f}{out.embed_s:12.3f}{out.aggregation_s:13.4f}"
            f"{out.log.serde_s:9.4f}"
        )
    print(
        "  generation: round 1 = random API (round-0 population), round 2 = variations of "
        "round 1's selection; aggregation = secure-sum wall - client handle() - serde + decode"
    )

    print("\nsummary")
    rows = [
        (
            "client round-1 throughput / bare embedder",
            f"{round1_rate / bare_rate:.2f} (min per client {min(per_client):.2f})",
            ">= 0.9",
        ),
        (
            f"later round, cached clients ({len(hits)} of {len(ids)}), s",
            later,
            "vote+noise+mask",
        ),
        ("masked vector / raw int32 histogram", f"{masked / raw:.3f}", "<= 1.1"),
        ("masked_input message / raw histogram", f"{b['masked_input'] / raw:.3f}", "(info)"),
        (
            "key material per client per round",
            f"{keys} B = {keys / peers:.0f} B per peer",
            "O(K)",
        ),
        (
            "coordinator generation (vary + embed)",
            f"{vary_s + round2.embed_s:.2f} s",
            "(info)",
        ),
        ("coordinator aggregation (+ decode)", f"{round2.aggregation_s:.4f} s", "(info)"),
    ]
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    for name, value, target in rows:
        print(f"  {name:<{width}s}  {value:<{vwidth}s}  target {target}")


def figures(quick: bool) -> list[Figure]:
    """Client throughput vs the bare embedder, upload bytes, coordinator seconds per round."""
    if quick:
        options = Options(
            per_label=3,
            private_per_label=12,
            max_new_tokens=8,
            embedder=QUICK_EMBEDDER,
            generator=QUICK_MODEL,
        )
    else:
        options = Options()
    m = measure(options)
    where = (
        f"{options.clients} clients, {sum(m.n_texts.values())} private texts, "
        f"N={options.per_label}/label, {options.embedder}, generator {options.generator}"
    )
    note = f"{where}. {QUICK_NOTE}" if quick else where
    raw = m.round1.manifest.dim * 4
    first = m.ids[0]
    masked = m.round1.log.masked_bytes[first]
    out = [
        compared(
            "pe",
            "client round 1 (embed, vote, noise, mask) vs bare embedder",
            m.round1_rate,
            "texts/s",
            baseline=m.bare_rate,
            judge=not quick,
            at_least=0.9,
            note=note,
        ),
        compared(
            "pe",
            "masked vector uploaded vs raw int32 histogram",
            float(masked),
            "B",
            baseline=float(raw),
            at_most=1.1,
            note=f"histogram dim {m.round1.manifest.dim}, {m.round1.manifest.bits}-bit field",
        ),
        info(
            "pe",
            f"key material per client per round (K={options.clients})",
            float(m.key_bytes),
            "B",
            target="O(K)",
            note=f"{m.key_bytes / (options.clients - 1):.0f} B per peer",
        ),
        info(
            "pe",
            "coordinator generation per round (variations + embedding)",
            m.vary_s + m.round2.embed_s,
            "s",
            note=note,
        ),
        info(
            "pe",
            "coordinator aggregation per round (secure sum + decode)",
            m.round2.aggregation_s,
            "s",
        ),
    ]
    later = m.cached_later_s
    if later is not None:
        hits = [n for n in m.ids if m.round2.log.cache_hit[n]]
        out.append(
            info(
                "pe",
                "client later round, embeddings cached, vs round 1",
                later,
                "s",
                baseline=float(np.mean([m.round1.log.client_s(n) for n in hits])),
                note=f"{len(hits)} of {len(m.ids)} clients served from the cache",
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-label", type=int, default=10, help="candidates N per label")
    parser.add_argument(
        "--private-per-label",
        type=int,
        default=500,
        help="private records per label, split IID among the clients",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=VariationConfig().generation.max_new_tokens,
        help="generation budget of the random and variation APIs",
    )
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=4.0)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="bare-embedder runs per client before and after round 1 (median is used)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    options = Options(
        per_label=args.per_label,
        private_per_label=args.private_per_label,
        max_new_tokens=args.max_new_tokens,
        clients=args.clients,
        epsilon=args.epsilon,
        repeats=args.repeats,
        seed=args.seed,
    )
    report(measure(options))


if __name__ == "__main__":
    main()
