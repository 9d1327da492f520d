"""A real SuperLink with TLS and node authentication, set up only with fedsynth's own commands.

`coordinator init`, two `node init`, one `add-node`; the SuperLink is started by
`start_superlink` and SuperNodes by `start_supernode`. The registered holder connects; a holder
the operator never added is refused by the SuperLink; a node that pins another CA cannot
connect. Every process is stopped at the end.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from processes import add_holder, cli_ok, free_port, wait_exit

from fedsynth.client.node_cli import node_app
from fedsynth.client.supernode import start_supernode
from fedsynth.protocol.deployment import stop_process
from fedsynth.protocol.identity import Roster
from fedsynth.protocol.node_keys import parse_signing_public_key
from fedsynth.server.consortium import CoordinatorPaths
from fedsynth.server.coordinator_cli import coordinator_app
from fedsynth.server.pki import generate_ca, write_certificate
from fedsynth.server.superlink import start_superlink

pytestmark = pytest.mark.slow


def test_tls_and_node_authentication_admit_only_registered_holders(tmp_path: Path) -> None:
    coord = tmp_path / "coord"
    alice, outsider = tmp_path / "alice", tmp_path / "outsider"
    cli_ok(coordinator_app, "init", str(coord))
    add_holder(coord, alice, "alice")
    cli_ok(node_app, "init", str(outsider))
    paths = CoordinatorPaths(coord)
    (alice / "roster.json").write_bytes(paths.roster.read_bytes())  # sent out of band
    # The outsider forges a roster naming itself: fedsynth's own checks pass, so only the
    # SuperLink's node authentication stands between it and the federation.
    outsider_key = (outsider / "signing.pub").read_bytes()
    Roster({"outsider": parse_signing_public_key(outsider_key)}).save(outsider / "roster.json")
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine", "label": "positive"}\n')
    policy = tmp_path / "POLICY.toml"
    policy.write_text('max_epsilon_per_task = 2.0\nallowed_modes = ["distributed"]\n')
    _, other_ca = generate_ca()
    wrong_ca = tmp_path / "other-ca.pem"
    write_certificate(wrong_ca, other_ca)

    port = free_port()
    link = start_superlink(coord, host="127.0.0.1", port=port)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        assert set(link.node_ids) == {"alice"}
        address = f"127.0.0.1:{port}"

        def node(directory: Path, ca: Path, name: str, retries: int | None) -> Path:
            log = tmp_path / f"{name}.log"
            procs.append(
                start_supernode(
                    directory,
                    data=data,
                    policy=policy,
                    superlink=address,
                    ca=ca,
                    port=free_port(),
                    log_path=log,
                    max_retries=retries,
                )
            )
            return log

        node(alice, paths.ca_cert, "alice", None)
        outsider_log = node(outsider, paths.ca_cert, "outsider", 1)
        wrong_ca_log = node(alice, wrong_ca, "alice-wrong-ca", 1)

        # The SuperLink logs each node it activates (cheaper to watch than `flwr supernode ls`).
        activated = f"Activated node_id={link.node_ids['alice']}"
        deadline = time.monotonic() + 40
        while activated not in link.log_path.read_text():
            assert time.monotonic() < deadline, (tmp_path / "alice.log").read_text()[-2000:]
            time.sleep(0.5)

        assert wait_exit(procs[1], 30) not in (None, 0), outsider_log.read_text()[-2000:]
        assert "Failed to activate SuperNode" in outsider_log.read_text()
        assert wait_exit(procs[2], 30) not in (None, 0), wrong_ca_log.read_text()[-2000:]
        assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca_log.read_text()
        assert "Failed to activate SuperNode" not in wrong_ca_log.read_text()
        # Only the registered node is known to the SuperLink, and it stayed online.
        nodes = link.list_nodes()
        assert [str(n["node-id"]) for n in nodes] == [str(link.node_ids["alice"])]
        assert nodes[0]["status"] == "online"
        assert procs[0].poll() is None
        assert "No SuperNode found with the given public key" in link.log_path.read_text()
    finally:
        for proc in procs:
            stop_process(proc)
        link.stop()
