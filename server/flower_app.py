"""Flower ServerApp of the coordinator, and the transport that carries protocol stages over it.

``flwr run`` with ``task-path`` in the run config (what ``fedsynth task run TASK.toml`` sends)
runs the production coordinator on that task file: no data, no evaluation, a release in the
task's store and a row in its ledger. A run config without ``task-path`` but with ``preset``
(this repository's default run config) runs the demo's coordinator instead; only that path
imports ``fedsynth.simulations``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from flwr.app import Context, Message, RecordDict
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp

from fedsynth.protocol.errors import ConfigError, TooFewParticipantsError
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


def wait_for_holders(
    grid: Grid, expected: int, minimum: int, *, timeout: float, poll_s: float = 1.0
) -> tuple[int, ...]:
    """Wait for ``expected`` holders; after ``timeout`` start with at least ``minimum`` of them.

    Raises:
        TooFewParticipantsError: Fewer than ``minimum`` connected within ``timeout`` seconds.
    """
    start = time.monotonic()
    while True:
        nodes = tuple(sorted(grid.get_node_ids()))
        if len(nodes) >= expected:
            return nodes[:expected]
        if time.monotonic() - start > timeout:
            if len(nodes) >= minimum:
                log.warning(
                    "%s of %s expected holders connected within %ss; starting with them",
                    len(nodes),
                    expected,
                    timeout,
                )
                return nodes
            raise TooFewParticipantsError(
                f"only {len(nodes)} holders connected within deadlines.holders_s={timeout}; the "
                f"task needs federation.min_holders={minimum} (of K={expected})"
            )
        time.sleep(poll_s)


def _stage_progress(stage: str) -> None:
    """Name each secure-sum stage in the run's log (Flower's logger reaches ``flwr run``)."""
    flwr_log(logging.INFO, "secure sum: stage %s", stage)


def run_task_file(grid: Grid, context: Context) -> None:
    """The production job: the task file named by ``task-path`` in the run config."""
    from fedsynth.server.task_file import TaskSpec
    from fedsynth.server.task_runner import run_task

    spec = TaskSpec.from_run_config(context.run_config)
    nodes = wait_for_holders(grid, spec.expected_holders, spec.min_holders, timeout=spec.holders_s)
    outcome = run_task(spec, FlowerTransport(grid), nodes, progress=_stage_progress)
    log.info("task finished: release %s at %s", outcome.task_id, outcome.release_path)


def _flwr_run_job(transport: FlowerTransport, nodes: tuple[int, ...], context: Context) -> None:
    """The demo's coordinator half, configured by run_config (``preset`` and no ``task-path``)."""
    from fedsynth.simulations.demo import coordinator_job_from_run_config

    coordinator_job_from_run_config(context.run_config)(transport, nodes, context)


def _main(grid: Grid, context: Context) -> None:
    """Dispatch ``flwr run``: a task file when one is named, else the demo of the run config."""
    from fedsynth.server.task_file import RUN_CONFIG_KEY

    if str(context.run_config.get(RUN_CONFIG_KEY) or ""):
        run_task_file(grid, context)
        return
    if "preset" not in context.run_config:
        raise ConfigError(
            f"run config: neither {RUN_CONFIG_KEY} (a task file) nor preset (the demo) is set; "
            "run a task with `fedsynth task run TASK.toml`"
        )
    nodes = wait_for_nodes(grid, int(context.run_config.get("num-clients", 3)))
    _flwr_run_job(FlowerTransport(grid), nodes, context)


app = ServerApp()
app.main()(_main)
