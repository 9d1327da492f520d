"""A holder's node runs only the app bundle it pinned: real SuperLink, SuperNode and runs.

The coordinator submits two bundles with ``flwr run``. Both carry a ClientApp module that
writes a marker file the moment it is imported. The node pins the first bundle's SHA-256:

* the pinned bundle runs, and what answers is the holder's *installed* fedsynth ClientApp (its
  refusal of a malformed stage, category ``protocol``), not the bundle's code;
* the second bundle, one line different in its ClientApp, is refused with category ``policy``
  and the node's log names the hash;

and the marker never appears: no bundle code was imported on the node in either run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import add_holder, cli_ok, free_port

from fedsynth.client.app_pin import build_bundle, installed_version, sha256_hex
from fedsynth.client.flower_app import ERROR_CODE_REFUSED
from fedsynth.client.supernode import start_supernode
from fedsynth.protocol.deployment import stop_process
from fedsynth.server.consortium import CoordinatorPaths
from fedsynth.server.coordinator_cli import coordinator_app
from fedsynth.server.superlink import CONNECTION_NAME, start_superlink

pytestmark = pytest.mark.slow

SERVER_APP = """
import json, time
from pathlib import Path
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["out"]))
    deadline = time.monotonic() + 60
    nodes = list(grid.get_node_ids())
    while not nodes and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    messages = [
        Message(RecordDict(), dst_node_id=n, message_type="query.dataset_vector") for n in nodes
    ]
    replies = grid.send_and_receive(messages, timeout=90)
    rows = [
        {"error": r.has_error(), "code": r.error.code if r.has_error() else None,
         "reason": r.error.reason if r.has_error() else None}
        for r in replies
    ]
    out.write_text(json.dumps(rows))
"""

CLIENT_APP = """
from pathlib import Path
Path({marker!r}).write_text("bundle code ran on the node")  # {variant}
from flwr.clientapp import ClientApp
app = ClientApp()
"""

ACQUIRE_WITHOUT_SECRET = """
import sys
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
client = RuntimeHttpClient.from_server_address(
    server_address=sys.argv[1], insecure=True, root_certificates=None, interceptors=[],
    retry_invoker=RetryInvoker(exponential, Exception, max_tries=1, max_time=None),
)
try:
    client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))
    print("acquired")
except Exception as exc:
    print("refused", type(exc).__name__, exc)
"""


def _write_bundle(directory: Path, *, out: Path, marker: Path, variant: str) -> Path:
    directory.mkdir()
    (directory / "pyproject.toml").write_text(
        "[build-system]\n"
        'requires = ["setuptools>=69"]\n'
        'build-backend = "setuptools.build_meta"\n\n'
        "[project]\n"
        'name = "fedsynth"\n'
        f'version = "{installed_version()}"\n'
        "dependencies = []\n\n"
        "[tool.flwr.app]\n"
        'publisher = "fedsynth"\n\n'
        "[tool.flwr.app.components]\n"
        'serverapp = "srv:app"\n'
        'clientapp = "cli:app"\n\n'
        "[tool.flwr.app.config]\n"
        f"out = {json.dumps(str(out))}\n"
    )
    (directory / "srv.py").write_text(SERVER_APP)
    (directory / "cli.py").write_text(CLIENT_APP.format(marker=str(marker), variant=variant))
    return directory


def _wait_for(path: Path, timeout_s: float, logs: list[Path]) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        assert time.monotonic() < deadline, "\n".join(p.read_text()[-3000:] for p in logs)
        time.sleep(0.5)
    rows = json.loads(path.read_text())
    assert isinstance(rows, list)
    return rows


def test_node_runs_only_the_pinned_bundle_and_never_its_code(tmp_path: Path) -> None:
    coord, alice = tmp_path / "coord", tmp_path / "alice"
    cli_ok(coordinator_app, "init", str(coord))
    add_holder(coord, alice, "alice")
    paths = CoordinatorPaths(coord)
    (alice / "roster.json").write_bytes(paths.roster.read_bytes())
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine", "label": "positive"}\n')
    policy = tmp_path / "POLICY.toml"
    policy.write_text('max_epsilon_per_task = 2.0\nallowed_modes = ["distributed"]\n')

    marker = tmp_path / "marker"
    pinned_out, other_out = tmp_path / "pinned.json", tmp_path / "other.json"
    pinned = _write_bundle(tmp_path / "pinned", out=pinned_out, marker=marker, variant="v1")
    other = _write_bundle(tmp_path / "other", out=other_out, marker=marker, variant="v2")
    pinned_hash = sha256_hex(build_bundle(pinned))
    other_hash = sha256_hex(build_bundle(other))
    assert pinned_hash != other_hash

    port = free_port()
    link = start_superlink(coord, host="127.0.0.1", port=port)
    node_log = tmp_path / "alice.log"
    runtime_port = free_port()
    node = None
    try:
        node = start_supernode(
            alice,
            data=data,
            policy=policy,
            superlink=f"127.0.0.1:{port}",
            ca=paths.ca_cert,
            port=runtime_port,
            log_path=node_log,
            trusted_apps=[pinned_hash],
        )
        logs = [node_log, link.log_path]
        for app_dir in (other, pinned):
            run = subprocess.Popen(
                ["flwr", "run", str(app_dir), CONNECTION_NAME],
                env=link.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            assert run.wait(timeout=60) == 0
        refused = _wait_for(other_out, 120, logs)
        answered = _wait_for(pinned_out, 120, logs)
        # The unpinned bundle: refused by the node's policy, the hash in its own log.
        assert refused == [{"error": True, "code": ERROR_CODE_REFUSED, "reason": "policy"}]
        text = node_log.read_text()
        assert f"app bundle sha256 {other_hash} is not pinned" in text
        # The pinned bundle: the installed fedsynth ClientApp answered (it refuses a message
        # without a stage as a protocol error), not the bundle's ClientApp (which has no
        # handler and would have failed to load or answer).
        assert answered == [{"error": True, "code": ERROR_CODE_REFUSED, "reason": "protocol"}]
        assert f"app bundle sha256 {pinned_hash} is pinned" in text
        assert not marker.exists(), "code from a run's app bundle was imported on the node"
        # Another local process cannot take a task from the SuperNode: it lacks the secret.
        probe = subprocess.run(
            [sys.executable, "-c", ACQUIRE_WITHOUT_SECRET, f"127.0.0.1:{runtime_port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "refused" in probe.stdout, probe.stdout + probe.stderr[-2000:]
        assert node.poll() is None
    finally:
        if node is not None:
            stop_process(node)
        link.stop()
