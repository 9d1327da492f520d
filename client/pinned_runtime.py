"""The holder's own client runtime: runs a task only if its app bundle is pinned.

``flower-supernode --isolation process`` leaves launching ClientApps to a separate process.
Flower's (``flower-superexec`` + ``flwr-clientapp``) would unzip the run's app bundle and import
the ClientApp it names. This module replaces both:

* ``node``: starts ``flower-supernode`` as its child and polls the SuperNode's local runtime API
  for ClientApp tasks (authenticated with the node directory's SuperExec secret, so no other
  local process can take them). Each task runs in a fresh ``task`` process, or, with
  ``--in-process``, one after another in this process (imports stay loaded: a stage costs its
  work, not a Python start). It exits with the SuperNode's status.
* ``task``: pulls the task's message, context and app bundle, checks the bundle against the pin
  (:func:`fedsynth.client.app_pin.check_bundle`) *before anything in it is extracted or
  imported*, and then runs the holder's installed fedsynth ClientApp, never the bundle's
  code. A bundle that is not pinned gets a refusal of category ``policy``; the hash details go
  to the node's log.

The pin (hex SHA-256 digests) travels on the command line: it is public.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from fedsynth.client.app_pin import TrustedApp, check_bundle, installed_version
from fedsynth.protocol.errors import AppNotTrustedError, FedSynthError, RefusalCategory

if TYPE_CHECKING:  # flwr's runtime client is imported only inside the processes that use it
    from flwr.supercore.runtime import RuntimeHttpClient

__all__ = ["TASK_POLL_S", "main", "runtime_command", "task_command"]

log = logging.getLogger("fedsynth.node")

TASK_POLL_S: Final = 0.5
"""How often the node asks its SuperNode for a new ClientApp task."""

_ACQUIRE_METHOD: Final = "/flwr.proto.Runtime/AcquireTask"


def runtime_command(
    supernode_command: Sequence[str],
    *,
    runtime_address: str,
    fab_sha256: frozenset[str],
    secret_file: Path,
) -> list[str]:
    """The command that runs ``supernode_command`` under the pinned runtime (``node``)."""
    command = [
        sys.executable,
        "-m",
        "fedsynth.client.pinned_runtime",
        "node",
        "--runtime-api-address",
        runtime_address,
        "--superexec-auth-secret-file",
        str(Path(secret_file).absolute()),
    ]
    for digest in sorted(fab_sha256):
        command += ["--fab-sha256", digest]
    return [*command, "--", *supernode_command]


def task_command(runtime_address: str, fab_sha256: frozenset[str]) -> list[str]:
    """The command of one ``task`` process (its token goes to its standard input)."""
    command = [
        sys.executable,
        "-m",
        "fedsynth.client.pinned_runtime",
        "task",
        "--runtime-api-address",
        runtime_address,
        "--parent-pid",
        str(os.getpid()),
    ]
    for digest in sorted(fab_sha256):
        command += ["--fab-sha256", digest]
    return command


def _client(
    runtime_address: str, interceptors: list[object], *, retry: bool = True
) -> RuntimeHttpClient:
    """A runtime API client; without ``retry`` a call fails at once (the caller polls)."""
    from flwr.supercore.retry import RetryInvoker, exponential, make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor

    invoker = (
        make_simple_http_retry_invoker()
        if retry
        else RetryInvoker(exponential, Exception, max_tries=1, max_time=None)
    )
    return RuntimeHttpClient.from_server_address(
        server_address=runtime_address,
        insecure=True,  # loopback only: the SuperNode binds its runtime API to 127.0.0.1
        root_certificates=None,
        interceptors=[RuntimeTracingInterceptor(), *interceptors],  # type: ignore[list-item]
        retry_invoker=invoker,
    )


def run_node(
    supernode_command: Sequence[str],
    *,
    runtime_address: str,
    fab_sha256: frozenset[str],
    secret: bytes,
    process_per_task: bool = True,
) -> int:
    """Start the SuperNode and run each ClientApp task it hands out; return its status.

    With ``process_per_task`` each task gets a fresh ``task`` process (isolation, at the cost
    of a Python start and the client stack's imports per stage); without, tasks run in this
    process one at a time. Either way the bundle is checked against the pin before anything in
    it is used.
    """
    pin = TrustedApp(fab_sha256=fab_sha256, version=installed_version())
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )

    started: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, _frame: object) -> None:
        if started and started[0].poll() is None:
            started[0].send_signal(signum)
        else:  # nothing (left) to stop: a signal must still end this process
            os._exit(128 + signum)

    # Installed before the SuperNode starts: no moment in which a stop signal would end this
    # process and leave the SuperNode running.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    supernode = subprocess.Popen(list(supernode_command), stdin=subprocess.DEVNULL)
    started.append(supernode)
    threading.Thread(
        target=_watchdog, args=(supernode, os.getppid()), name="supernode-watchdog", daemon=True
    ).start()
    client = _client(
        runtime_address,
        [
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={_ACQUIRE_METHOD}),
        ],
        retry=False,  # a SuperNode that exits must end this loop, not a retry back-off
    )
    log.info("pinned runtime: the node runs only %s", TrustedApp(fab_sha256, "").describe())
    children: list[subprocess.Popen[bytes]] = []
    try:
        while supernode.poll() is None:
            try:
                response = client.AcquireTask(
                    AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
                )
            except Exception as exc:  # the SuperNode is starting or stopping
                log.debug("runtime API not ready: %s", type(exc).__name__)
                time.sleep(TASK_POLL_S)
                continue
            if response.HasField("task") and response.token:
                if process_per_task:
                    child = subprocess.Popen(
                        task_command(runtime_address, fab_sha256), stdin=subprocess.PIPE
                    )
                    assert child.stdin is not None
                    child.stdin.write(response.token.encode("ascii"))
                    child.stdin.close()
                    children.append(child)
                else:
                    run_task(runtime_address, response.token, pin)
                    continue  # the next stage is often waiting already
            children = [c for c in children if c.poll() is None]
            time.sleep(TASK_POLL_S)
    finally:
        client.close()
        if supernode.poll() is None:
            supernode.terminate()
        code = supernode.wait()
    return code


def _exit_status(code: int) -> int:
    """A process's exit status as a shell reports it (128 + n for a signal n)."""
    return code if code >= 0 else 128 - code


def _watchdog(supernode: subprocess.Popen[bytes], parent_pid: int) -> None:
    """End this process with its SuperNode, and end both when the node's launcher is gone.

    A runtime API call can block after the SuperNode died (killed, not stopped), and a
    launcher killed without notice leaves this process to its init: neither may leave a
    runtime or a SuperNode running.
    """
    while True:
        code = supernode.poll()
        if code is not None:
            os._exit(_exit_status(code))
        if os.getppid() != parent_pid:
            log.error("the node's launcher is gone: stopping the SuperNode")
            supernode.terminate()
            try:
                supernode.wait(timeout=20)
            except subprocess.TimeoutExpired:
                supernode.kill()
            os._exit(1)
        time.sleep(1.0)


def run_task(runtime_address: str, token: str, pin: TrustedApp) -> int:
    """Run one ClientApp task if its bundle is pinned, else refuse it; return an exit status.

    The bundle's bytes are hashed and checked before anything else touches them; the ClientApp
    that runs is ``fedsynth.client.flower_app:app`` as installed on this node.
    """
    from flwr.app import Context, Error, Message
    from flwr.common.constant import SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    client = _client(
        runtime_address,
        [
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context: Context | None = None
    status, details, code = SubStatus.FAILED, "ClientApp task failed", 1
    try:
        message, context, run, fab = pull_task_input(client)
        try:
            digest = check_bundle(fab.content, fab.hash_str, pin)
        except AppNotTrustedError as exc:
            from fedsynth.client.flower_app import ERROR_CODE_REFUSED

            log.error("run %s refused: %s", run.run_id, exc)
            reason = RefusalCategory.POLICY.value
            push_message(
                client,
                Message(Error(code=ERROR_CODE_REFUSED, reason=reason), reply_to=message),
                context,
            )
            details = "app bundle not pinned by this node"
            return 2
        log.info(
            "run %s: app bundle sha256 %s is pinned; running the installed app", run.run_id, digest
        )
        from fedsynth.client.flower_app import app

        reply = app(message=message, context=context)
        push_message(client, reply, context)
        status, details, code = SubStatus.COMPLETED, "", 0
        return 0
    except Exception:
        log.exception("ClientApp task failed")
        return code
    finally:
        push_task_output(client=client, context=context, sub_status=status, details=details)
        heartbeat.stop()
        client.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedsynth.client.pinned_runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("node", "task"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--runtime-api-address", required=True)
        cmd.add_argument("--fab-sha256", action="append", required=True)
    sub.choices["node"].add_argument("--superexec-auth-secret-file", type=Path, required=True)
    sub.choices["node"].add_argument(
        "--in-process",
        action="store_true",
        help="run the tasks in this process (faster: no imports per stage; less isolation)",
    )
    sub.choices["node"].add_argument("supernode", nargs=argparse.REMAINDER)
    sub.choices["task"].add_argument("--parent-pid", type=int, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of both processes (see the module docstring)."""
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package_log = logging.getLogger("fedsynth")  # flwr's own logger prints Flower's lines
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per runtime API poll
    hashes = frozenset(h.lower() for h in args.fab_sha256)
    if args.command == "node":
        command = args.supernode[1:] if args.supernode[:1] == ["--"] else args.supernode
        secret = Path(args.superexec_auth_secret_file).read_bytes()
        try:
            return run_node(
                command,
                runtime_address=args.runtime_api_address,
                fab_sha256=hashes,
                secret=secret,
                process_per_task=not args.in_process,
            )
        except FedSynthError as exc:  # no installed fedsynth version to pin against
            log.error("%s", exc)
            return 2
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    token = sys.stdin.read().strip()
    try:
        pin = TrustedApp(fab_sha256=hashes, version=installed_version())
    except FedSynthError as exc:
        log.error("%s", exc)
        return 2
    return run_task(args.runtime_api_address, token, pin)


if __name__ == "__main__":
    sys.exit(main())
