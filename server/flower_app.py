"""Flower ServerApp of the coordinator, and the transport that carries protocol stages over it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsynth.protocol.errors import TooFewParticipantsError
from fedsynth.server.secure_round import Reply

log = logging.getLogger(__name__)
ACTION = "query.dataset_vector"
PE_ACTION = "query.pe_votes"


class FlowerTransport:
    """Carries one stage's requests as Flower messages and collects replies by the deadline."""

    def __init__(self, grid: Grid, *, action: str = ACTION) -> None:
        self.grid = grid
        self.action = action

    def for_action(self, action: str) -> FlowerTransport:
        """The same grid, carrying another kind of task (``PE_ACTION``)."""
        return FlowerTransport(self.grid, action=action)

    def exchange(
        self, stage: str, requests: Mapping[int, RecordDict], *, timeout: float
    ) -> dict[int, Reply]:
        """Send every request, wait up to ``timeout`` seconds, map replies to their nodes."""
        messages = [
            Message(content=content, dst_node_id=node, message_type=self.action)
            for node, content in requests.items()
        ]
        replies: dict[int, Reply] = {}
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if node not in requests or node in replies:
                log.warning("ignoring an unexpected or duplicate reply from node %s", node)
                continue
            if reply.has_error():
                replies[node] = Reply(content=None, error=reply.error.reason)
            else:
                replies[node] = Reply(content=reply.content)
        return replies


def wait_for_nodes(grid: Grid, count: int, *, timeout: float = 120.0) -> tuple[int, ...]:
    """Wait until ``count`` nodes are connected; fail loudly when they do not come."""
    start = time.monotonic()
    while True:
        nodes = tuple(sorted(grid.get_node_ids()))
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() - start > timeout:
            raise TooFewParticipantsError(
                f"only {len(nodes)} of the {count} expected clients connected within {timeout}s"
            )
        time.sleep(1.0)


CoordinatorJob = Callable[[FlowerTransport, tuple[int, ...], Context], None]


def make_server_app(job: CoordinatorJob, *, num_clients: int | None = None) -> ServerApp:
    """A ServerApp that waits for the clients and hands a transport to ``job``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        wanted = num_clients or int(context.run_config.get("num-clients", 3))
        nodes = wait_for_nodes(grid, wanted)
        job(FlowerTransport(grid), nodes, context)

    return app


def _flwr_run_job(transport: FlowerTransport, nodes: tuple[int, ...], context: Context) -> None:
    """The job behind ``flwr run .``: the demo's coordinator half, configured by run_config."""
    from fedsynth.simulations.demo import coordinator_job_from_run_config

    coordinator_job_from_run_config(context.run_config)(transport, nodes, context)


app = make_server_app(_flwr_run_job)
