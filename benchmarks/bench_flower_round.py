"""A masked federated round against an unmasked Flower round, side by side, in Flower's simulation.

Both rounds run K holders through ``flwr.simulation.run_simulation`` in this process, on the same
partition files and the same task (the tiny random-weight model, so the round and not the model
is what is timed):

* **masked**: fedsynth's real ClientApp and the production coordinator's
  ``run_vector_release`` (signed key agreement, encrypted shares, masked input, consistency
  check, unmasking, exact-noise removal, decoding, the ledger);
* **unmasked**: one Flower message per holder; each holder computes the same contribution
  (features, clipping, per-record rounding, its noise share: ``Contributor.contribution``; a
  plain share, as there is no unmask stage to remove an excess) and uploads it in the clear;
  the server adds the vectors in the field.

The figure is the coordinator-side wall time of the round (from the first message to the sum,
after every node is connected), masked over unmasked. Target (issue: performance and scale):
≤ 2× at K = 50. Simulation start-up (Ray, node processes) is outside both timings.

Run: python benchmarks/bench_flower_round.py [--quick] [--clients 50]
(``figures(quick)`` gives the same numbers to ``python -m benchmarks``.)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: benchmarks.common
from benchmarks.common import QUICK_MODEL, Figure, compared

PLAIN_ACTION = "plain"  # the unmasked round's message type: query.plain
FULL_CLIENTS = 50
QUICK_CLIENTS = 3
TARGET_RATIO = 2.0
LAYERS = (1, 2)


@dataclasses.dataclass(frozen=True)
class RoundTimes:
    """Coordinator-side seconds of one masked and one unmasked round."""

    clients: int
    dim: int
    masked_s: float
    unmasked_s: float


def _config(out: Path, clients: int, per_label: int) -> Any:
    from fedsynth.simulations.demo import demo_config

    return demo_config(
        "quick",
        out_dir=out,
        model=QUICK_MODEL,
        layers=LAYERS,
        clients=clients,
        private_per_label=per_label,
        synthetic_per_label=2,
        prior_per_label=8,
        test_per_label=20,
        include_nonprivate=False,
        max_new_tokens=8,
    )


def plain_client_app(partition_dir: Path) -> Any:
    """Holders that compute their contribution and upload it unmasked (one message)."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp

    from fedsynth.client.contributor import Contributor
    from fedsynth.client.settings import ClientSettings
    from fedsynth.protocol.manifest import TaskManifest
    from fedsynth.protocol.messages import field_to_bytes

    app = ClientApp()

    @app.query(PLAIN_ACTION)
    def contribute(msg: Message, context: Context) -> Message:
        pid = int(context.node_config.get("partition-id", 0))
        task = msg.content.config_records["task"]
        manifest = TaskManifest.from_json(str(task["manifest"]))
        reference = task["reference"]
        if not isinstance(reference, bytes):
            raise TypeError("the task's reference must be bytes")
        settings = ClientSettings(
            data_path=partition_dir / f"partition-{pid}.jsonl", model=manifest.model_name, seed=pid
        )
        vector = Contributor(settings, node_id=int(context.node_id)).contribution(
            manifest, reference, RecordDict()
        )
        field = field_to_bytes(vector, bits=manifest.bits)
        reply = RecordDict({"vector": ConfigRecord({"field": field})})
        return Message(reply, reply_to=msg)

    return app


def plain_server_app(
    manifest_for: Any, reference: bytes, clients: int, times: dict[str, float]
) -> Any:
    """One round: the task to every holder, their vectors back, summed in the field."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.serverapp import Grid, ServerApp

    from fedsynth.protocol.codec import field_add
    from fedsynth.protocol.messages import field_from_bytes
    from fedsynth.server.flower_app import wait_for_nodes

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = wait_for_nodes(grid, clients)
        manifest = manifest_for(nodes)
        start = time.perf_counter()
        content = RecordDict(
            {"task": ConfigRecord({"manifest": manifest.to_json(), "reference": reference})}
        )
        messages = [
            Message(content=content, dst_node_id=node, message_type=f"query.{PLAIN_ACTION}")
            for node in nodes
        ]
        total = np.zeros(manifest.dim, dtype=np.uint64)
        received = 0
        for reply in grid.send_and_receive(messages, timeout=3600):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
            field = field_from_bytes(
                reply.content.config_records["vector"]["field"],
                bits=manifest.bits,
                length=manifest.dim,
            )
            total = field_add(total, field, bits=manifest.bits)
            received += 1
        times["unmasked"] = time.perf_counter() - start
        if received != clients:
            raise RuntimeError(f"{received} of {clients} holders replied")

    return app


def measure(clients: int, *, per_label: int) -> RoundTimes:
    """One masked and one unmasked round of ``clients`` holders over the same partitions."""
    from flwr.simulation import run_simulation

    from fedsynth.protocol.messages import vector_to_bytes
    from fedsynth.server.coordinator import build_manifest
    from fedsynth.simulations.demo import (
        CoordinatorOutcome,
        load_coordinator,
        make_coordinator_job,
        prepare_data,
        run_job_in_simulation,
        task_config,
    )

    with tempfile.TemporaryDirectory(prefix="fedsynth-bench-round-") as tmp:
        config = _config(Path(tmp), clients, per_label)
        data = prepare_data(config)
        loaded, reference = load_coordinator(config)
        times: dict[str, float] = {}
        outcome = CoordinatorOutcome()
        inner = make_coordinator_job(config, loaded, reference, outcome)

        def timed(transport: Any, nodes: tuple[int, ...], context: Any) -> None:
            start = time.perf_counter()
            inner(transport, nodes, context)
            times["masked"] = time.perf_counter() - start

        errors = run_job_in_simulation(config, data, timed, embedder="hashing-64")
        if errors or "masked" not in times:
            raise RuntimeError(f"masked round failed: {errors}")
        tc = task_config(config, config.epsilon)

        def manifest_for(nodes: tuple[int, ...]) -> Any:
            # A plain noise share: without an unmask stage no excess could be removed.
            manifest = build_manifest(tc, loaded, reference, nodes)
            privacy = dataclasses.replace(manifest.privacy, noise_sharing="plain")
            return dataclasses.replace(manifest, privacy=privacy)

        run_simulation(
            server_app=plain_server_app(
                manifest_for, vector_to_bytes(reference.means.reshape(-1)), clients, times
            ),
            client_app=plain_client_app(data.partition_dir),
            num_supernodes=clients,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"include_dashboard": False, "log_to_driver": False},
            },
        )
        if "unmasked" not in times:
            raise RuntimeError("unmasked round failed (see the log above)")
        dim = manifest_for(tuple(range(1, clients + 1))).dim
    return RoundTimes(clients, dim, times["masked"], times["unmasked"])


def figures(quick: bool) -> list[Figure]:
    """Masked over unmasked round time at K = 50 (K = 5 under --quick, not judged)."""
    clients = QUICK_CLIENTS if quick else FULL_CLIENTS
    r = measure(clients, per_label=max(40, 2 * clients))
    at_target = r.clients == FULL_CLIENTS
    return [
        compared(
            "flower_round",
            f"masked round vs unmasked Flower round (K={r.clients}, d={r.dim:,})",
            r.masked_s,
            "s",
            baseline=r.unmasked_s,
            at_most=TARGET_RATIO,
            judge=at_target and not quick,
            note=f"{QUICK_MODEL}, Flower simulation in one process; both include the holders' "
            "features, rounding and noise share"
            + ("" if at_target else "; target stated for K = 50, not judged here"),
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"K = {QUICK_CLIENTS}")
    parser.add_argument("--clients", type=int, default=None)
    args = parser.parse_args()
    clients = args.clients or (QUICK_CLIENTS if args.quick else FULL_CLIENTS)
    r = measure(clients, per_label=max(40, 2 * clients))
    print(
        f"K={r.clients}, d={r.dim}: masked {r.masked_s:.2f} s, unmasked {r.unmasked_s:.2f} s, "
        f"ratio {r.masked_s / r.unmasked_s:.2f} (target <= {TARGET_RATIO:g} at K = 50)"
    )


if __name__ == "__main__":
    main()
