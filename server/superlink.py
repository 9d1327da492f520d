"""Start the coordinator's Flower SuperLink with TLS and node authentication, and admit members.

:func:`start_superlink` checks the TLS files first (an expired or mismatched certificate is a
clear error before any process starts), starts ``flower-superlink`` with ``--ssl-*`` and
``--enable-supernode-auth``, writes a Flower connection (``FLWR_HOME/config.toml``) that pins
the consortium's CA, and registers every member's node key with ``flwr supernode register``.
A SuperNode whose key is not registered, or that does not trust the CA, cannot join.

The SuperLink keeps its state in the coordinator directory (``superlink-state.db``), and the
node id each member got is saved beside the node keys: a restart keeps every node id, running
SuperNodes reconnect by themselves, and a key the state holds that is no current member's is
unregistered.

``insecure=True`` turns TLS off (node authentication stays on); it is only ever an explicit
choice, never a fallback when a certificate is missing or bad.

The command lines and the connection file are built by pure functions; the process handling
is at the bottom.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from fedsynth.protocol.deployment import (
    die_with_parent,
    find_executable,
    flower_environment,
    stop_process,
    wait_for_port,
)
from fedsynth.protocol.errors import DeploymentError
from fedsynth.server.consortium import (
    CoordinatorPaths,
    load_consortium,
    load_node_ids,
    save_node_ids,
)
from fedsynth.server.pki import load_server_credentials

__all__ = [
    "CONNECTION_NAME",
    "DEFAULT_PORT",
    "RunningSuperLink",
    "connect_host",
    "connection_toml",
    "local_address",
    "reconcile_nodes",
    "start_superlink",
    "superlink_command",
]

DEFAULT_PORT: Final = 8000
"""Port of the SuperLink's one HTTP endpoint (Fleet, Control and Runtime APIs; Flower's default)."""

CONNECTION_NAME: Final = "fedsynth"
"""Name of the Flower connection written to the coordinator's FLWR_HOME."""

START_TIMEOUT_S: Final = 60.0
STATE_DATABASE: Final = "superlink-state.db"
_RESET_STATE: Final = (
    f"stop the coordinator, remove {STATE_DATABASE} and nodes/node-ids.json from its directory "
    "(every member is registered again, with new node ids) and start again"
)
"""What an operator does when the saved node ids and the SuperLink's state disagree."""
"""The SuperLink's SQLite state in the coordinator directory (see CoordinatorPaths)."""
_ANY_ADDRESS: Final = frozenset({"0.0.0.0", "::", ""})


def local_address(host: str, port: int) -> str:
    """The address this machine's ``flwr`` commands use to reach a SuperLink bound to ``host``.

    A SuperLink bound to every interface is reached on 127.0.0.1, which the default server
    certificate names; any other host is reached as given (the certificate must name it).
    """
    target = "127.0.0.1" if host in _ANY_ADDRESS else host
    if ":" in target and not target.startswith("["):
        target = f"[{target}]"
    return f"{target}:{port}"


def connect_host(host: str) -> str:
    """The host part of :func:`local_address`: what a local client connects to (no brackets)."""
    return "127.0.0.1" if host in _ANY_ADDRESS else host.strip("[]")


def superlink_command(
    executable: str,
    paths: CoordinatorPaths,
    *,
    host: str,
    port: int,
    insecure: bool,
    database: Path | None = None,
) -> list[str]:
    """The ``flower-superlink`` command line: TLS from ``paths`` unless ``insecure``.

    Node authentication is always on; runtime dependency installation always off (a run's
    app may not install packages on the coordinator's machine).
    """
    command = [executable]
    if insecure:
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile",
            str(paths.ca_cert),
            "--ssl-certfile",
            str(paths.server_cert),
            "--ssl-keyfile",
            str(paths.server_key),
        ]
    command += [
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
    ]
    if database is not None:
        command += ["--database", str(database)]
    return command


def connection_toml(name: str, address: str, root_certificates: Path | None) -> str:
    """A Flower ``config.toml`` with one default connection (``insecure`` without a CA)."""
    lines = [
        "[superlink]",
        f"default = {json.dumps(name)}",
        "",
        f"[superlink.{name}]",
        f"address = {json.dumps(address)}",
    ]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(Path(root_certificates).absolute()))}")
    return "\n".join(lines) + "\n"


@dataclass
class RunningSuperLink:
    """A started SuperLink and the members registered with it.

    Attributes:
        process: The ``flower-superlink`` process (own process group).
        address: Where this machine's ``flwr`` commands reach it.
        flwr_home: FLWR_HOME holding the ``fedsynth`` connection (pins the CA).
        node_ids: Member name -> the node id the SuperLink gave its registered key.
        unregistered: Node ids of the persisted state that were no member's (removed).
        log_path: The SuperLink's log.
    """

    process: subprocess.Popen[bytes]
    address: str
    flwr_home: Path
    log_path: Path
    node_ids: dict[str, int] = field(default_factory=dict)
    unregistered: list[int] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """Environment for ``flwr`` commands against this SuperLink."""
        return flower_environment(self.flwr_home)

    def flwr(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` against this SuperLink's connection."""
        return subprocess.run(
            [find_executable("flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def list_nodes(self) -> list[dict[str, object]]:
        """``flwr supernode ls --format json``: every node with its status.

        Raises:
            DeploymentError: If the command fails or prints no JSON.
        """
        proc = self.flwr("supernode", "ls", CONNECTION_NAME, "--format", "json")
        data = _last_json(proc.stdout)
        if proc.returncode != 0 or not isinstance(data, dict):
            raise DeploymentError(
                f"flwr supernode ls failed (status {proc.returncode}): {proc.stderr[-500:]}"
            )
        nodes = data.get("nodes", [])
        return [n for n in nodes if isinstance(n, dict)] if isinstance(nodes, list) else []

    def stop(self) -> None:
        """Stop the SuperLink and its children."""
        stop_process(self.process)

    def __enter__(self) -> RunningSuperLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _last_json(text: str) -> object:
    """The last line of ``text`` that parses as a JSON object, else None."""
    start = text.rfind("\n{")
    for candidate in (text[start + 1 :] if start >= 0 else text, text.strip()):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    return None


_KEY_IN_USE: Final = "[code: 23]"
"""How ``flwr supernode register`` reports a key the SuperLink's state already holds."""


def register_node(
    link: RunningSuperLink, name: str, public_key_file: Path, *, known_id: int | None = None
) -> int:
    """Register one member's node key with the running SuperLink; return its node id.

    A key the SuperLink's persisted state already holds keeps the node id saved for it at an
    earlier start (``known_id``).

    Raises:
        DeploymentError: If ``flwr supernode register`` fails (naming the member), or the key
            is registered already under a node id that was not saved.
    """
    proc = link.flwr(
        "supernode", "register", str(public_key_file), CONNECTION_NAME, "--format", "json"
    )
    data = _last_json(proc.stdout)
    if isinstance(data, dict) and _KEY_IN_USE in str(data.get("error-message", "")):
        if known_id is not None:
            return known_id
        raise DeploymentError(
            f"the node key of {name!r} is registered with the SuperLink already, but its node "
            f"id was not saved; {_RESET_STATE}"
        )
    if proc.returncode != 0 or not isinstance(data, dict) or not data.get("success"):
        detail = (proc.stdout + proc.stderr).strip()[-500:]
        raise DeploymentError(
            f"registering the node key of {name!r} failed (status {proc.returncode}): {detail}"
        )
    try:
        return int(str(data["node-id"]))
    except (KeyError, ValueError):
        raise DeploymentError(f"registering {name!r}: flwr printed no node id ({data!r})") from None


def reconcile_nodes(link: RunningSuperLink) -> list[int]:
    """Check the members' node ids against the SuperLink's state; unregister every other node.

    Returns the ids unregistered. With persisted state, a key registered at an earlier start
    stays registered; a holder removed from the member list must not keep its way in.

    Raises:
        DeploymentError: A member's saved node id is not in the SuperLink's state (the saved ids
            and the state disagree), or listing or unregistering fails.
    """
    listed = {str(n["node-id"]) for n in link.list_nodes() if n.get("status") != "unregistered"}
    members = {str(node_id): name for name, node_id in link.node_ids.items()}
    lost = sorted(name for node_id, name in members.items() if node_id not in listed)
    if lost:
        raise DeploymentError(
            f"the saved node ids of {', '.join(lost)} are not in the SuperLink's state; "
            f"{_RESET_STATE}"
        )
    strangers = sorted(int(node_id) for node_id in listed - members.keys())
    for node_id in strangers:
        proc = link.flwr(
            "supernode", "unregister", str(node_id), CONNECTION_NAME, "--format", "json"
        )
        data = _last_json(proc.stdout)
        if proc.returncode != 0 or not isinstance(data, dict) or not data.get("success"):
            detail = (proc.stdout + proc.stderr).strip()[-500:]
            raise DeploymentError(f"unregistering node {node_id} failed: {detail}")
    return strangers


def start_superlink(
    directory: Path,
    *,
    host: str,
    port: int = DEFAULT_PORT,
    insecure: bool = False,
    log_path: Path | None = None,
    timeout_s: float = START_TIMEOUT_S,
    persist: bool = True,
) -> RunningSuperLink:
    """Check the TLS files, start the SuperLink and register every member's node key.

    With ``persist`` the SuperLink keeps its state in the coordinator directory: after a
    restart every node keeps its node id and a running SuperNode reconnects by itself. Nodes
    the state holds that are no current member's are unregistered.

    Raises:
        CertificateError: A certificate expired, is not signed by the CA, does not name the
            address this machine reaches it on, or its key does not match (nothing started).
        IdentityError: The member list cannot be read (nothing started).
        DeploymentError: The SuperLink did not start or a registration failed (the SuperLink
            is stopped again).
    """
    paths = CoordinatorPaths(Path(directory))
    address = local_address(host, port)
    target = connect_host(host)
    if not insecure:
        load_server_credentials(paths.ca_cert, paths.server_cert, paths.server_key, hosts=[target])
    consortium = load_consortium(paths.directory)
    flwr_home = paths.directory / "flwr-home"
    flwr_home.mkdir(mode=0o700, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        connection_toml(CONNECTION_NAME, address, None if insecure else paths.ca_cert),
        encoding="utf-8",
    )
    paths.nodes.mkdir(exist_ok=True)
    log = Path(log_path) if log_path is not None else paths.directory / "superlink.log"
    command = superlink_command(
        find_executable("flower-superlink"),
        paths,
        host=host,
        port=port,
        insecure=insecure,
        database=paths.superlink_state if persist else None,
    )
    with log.open("ab") as handle:
        process = subprocess.Popen(
            command,
            env=flower_environment(flwr_home),
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),  # SIGTERM when this process dies (Linux)
            cwd=paths.directory,
        )
    link = RunningSuperLink(process=process, address=address, flwr_home=flwr_home, log_path=log)
    try:
        wait_for_port(target, port, timeout_s=timeout_s, process=process)
        saved = load_node_ids(paths.directory) if persist else {}
        for member in consortium.members:
            key_file = paths.nodes / f"{member.name}.pub"
            key_file.write_text(member.node_public_key + "\n", encoding="ascii")
            link.node_ids[member.name] = register_node(
                link, member.name, key_file, known_id=saved.get(member.name)
            )
        if persist:
            save_node_ids(paths.directory, link.node_ids)
            link.unregistered = reconcile_nodes(link)
    except BaseException:
        link.stop()
        raise
    return link
