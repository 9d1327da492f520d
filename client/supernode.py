"""Start a data holder's Flower SuperNode from its node directory, TLS and node key included.

Everything the node needs is checked before the process starts: the private keys exist and only
the holder can read them, the holder's signing key is in the roster it pins, the policy file
parses, the data file exists, and the CA certificate is a valid CA. The SuperNode then verifies
the SuperLink against that CA (``--root-certificates``) and authenticates with the node key
(``--auth-supernode-private-key``); the ClientApp reads the data, policy, identity, roster and
budget paths from the node config, which only the holder writes.

The SuperNode runs with ``--isolation process``: Flower's own runtime, which would install the
run's app bundle and import the ClientApp it names, never starts. The holder's
:mod:`fedsynth.client.pinned_runtime` takes each task instead, refuses a bundle the node has
not pinned (:mod:`fedsynth.client.app_pin`) before opening it, and runs the installed fedsynth
ClientApp.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from fedsynth.client.app_pin import TrustedApp, resolve_pin
from fedsynth.client.node_dir import NodePaths, check_private_files, ensure_superexec_secret
from fedsynth.client.pinned_runtime import runtime_command
from fedsynth.client.policy_file import PolicyFile, load_policy_file
from fedsynth.protocol.deployment import (
    check_is_ca,
    check_validity,
    find_executable,
    flower_environment,
    load_certificate,
)
from fedsynth.protocol.errors import ConfigError, DataFileError
from fedsynth.protocol.identity import Roster, load_identity

__all__ = [
    "DEFAULT_RUNTIME_PORT",
    "RUNTIME_HOST",
    "node_config",
    "node_config_string",
    "node_pin",
    "start_supernode",
    "supernode_command",
]

DEFAULT_RUNTIME_PORT: Final = 9094
"""Port of the SuperNode's local runtime API (Flower's default; one per SuperNode)."""

RUNTIME_HOST: Final = "127.0.0.1"
"""The runtime API listens on loopback only: it hands out tasks and their messages."""


def node_config(
    paths: NodePaths,
    *,
    data: Path,
    policy_path: Path,
    budget_path: Path,
    model: str | None = None,
    text_field: str = "text",
    label_field: str = "label",
) -> dict[str, str]:
    """The ClientApp's node config: every path absolute, privacy terms from the policy file."""
    config = {
        "data-path": str(Path(data).absolute()),
        "policy-path": str(Path(policy_path).absolute()),
        "identity-path": str(paths.signing_key.absolute()),
        "roster-path": str(paths.roster.absolute()),
        "budget-path": str(Path(budget_path).absolute()),
        "text-field": text_field,
        "label-field": label_field,
    }
    if model is not None:
        config["model"] = model
    return config


def node_config_string(config: Mapping[str, str]) -> str:
    """``key="value" ...`` as ``flower-supernode --node-config`` parses it.

    Raises:
        ConfigError: If a key or value holds a double quote or a line break (it could not be
            quoted unambiguously).
    """
    parts = []
    for key, value in config.items():
        for text in (key, value):
            if '"' in text or "\n" in text or "\r" in text:
                raise ConfigError(
                    f"node config {key}={value!r}: quotes and line breaks are refused"
                )
        parts.append(f'{key}="{value}"')
    return " ".join(parts)


def supernode_command(
    executable: str,
    *,
    superlink: str,
    ca: Path,
    node_key: Path,
    config: Mapping[str, str],
    port: int = DEFAULT_RUNTIME_PORT,
    max_retries: int | None = None,
    superexec_secret: Path | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line: TLS pinned to ``ca``, authenticated by ``node_key``.

    There is no insecure variant: a holder's node always verifies the SuperLink. Isolation is
    always ``process``: the SuperNode starts no runtime of its own, so a run's app bundle is
    only ever opened by the holder's pinned runtime, which authenticates with
    ``superexec_secret``.
    """
    command = [
        executable,
        "--superlink",
        superlink,
        "--root-certificates",
        str(Path(ca).absolute()),
        "--auth-supernode-private-key",
        str(Path(node_key).absolute()),
        "--isolation",
        "process",
        "--host",
        RUNTIME_HOST,
        "--port",
        str(port),
        "--node-config",
        node_config_string(config),
    ]
    if superexec_secret is not None:
        command += ["--superexec-auth-secret-file", str(Path(superexec_secret).absolute())]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    return command


def _check_ca(path: Path) -> None:
    """Refuse a ``--ca`` file that is not a currently valid CA certificate."""
    cert = load_certificate(path)
    check_validity(cert, what=f"CA certificate {path}")
    check_is_ca(cert, what=f"--ca {path} (use the ca.pem the operator sent)")


def prepare(directory: Path, *, data: Path, policy: Path, ca: Path) -> tuple[NodePaths, PolicyFile]:
    """Check everything a node needs before it starts.

    Raises:
        IdentityError: A key or the roster is missing, readable by others, or the signing key
            is not in the roster.
        ConfigError: The policy file is refused.
        DataFileError: The data file does not exist.
        CertificateError: The CA file is not a valid CA certificate.
    """
    paths = check_private_files(directory)
    load_identity(paths.signing_key, Roster.load(paths.roster))
    loaded = load_policy_file(policy)
    if not Path(data).is_file():
        raise DataFileError(f"data file {data} does not exist")
    _check_ca(ca)
    return paths, loaded


def node_pin(paths: NodePaths, trusted_apps: list[str] | None = None) -> TrustedApp:
    """The app bundles the node runs: ``trusted_apps``, else its pin file, else the installed one.

    ``trusted_apps`` are hashes, ``.fab`` files or app directories; the pin file is the node
    directory's ``trusted-app.toml``; the default is the bundle built from the installed
    fedsynth's source tree.

    Raises:
        ConfigError: There is nothing to pin, or a pin is malformed.
    """
    return resolve_pin(paths.trusted_app, trusted_apps)


def start_supernode(
    directory: Path,
    *,
    data: Path,
    policy: Path,
    superlink: str,
    ca: Path,
    port: int = DEFAULT_RUNTIME_PORT,
    model: str | None = None,
    text_field: str = "text",
    label_field: str = "label",
    log_path: Path | None = None,
    max_retries: int | None = None,
    trusted_apps: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Check the node directory, then start the pinned runtime and its ``flower-supernode``.

    Both run in one new process group; the returned process is the runtime, which exits with
    the SuperNode's status. Output goes to ``log_path`` (default: inherited). Stop it with
    :func:`fedsynth.protocol.deployment.stop_process`.

    Raises:
        IdentityError, ConfigError, DataFileError, CertificateError: See :func:`prepare` and
            :func:`node_pin`.
        DeploymentError: ``flower-supernode`` is not installed.
    """
    paths, loaded = prepare(directory, data=data, policy=policy, ca=ca)
    pin = node_pin(paths, trusted_apps)
    secret = ensure_superexec_secret(paths)
    config = node_config(
        paths,
        data=data,
        policy_path=policy,
        budget_path=loaded.budget_path or paths.budget,
        model=model,
        text_field=text_field,
        label_field=label_field,
    )
    command = supernode_command(
        find_executable("flower-supernode"),
        superlink=superlink,
        ca=ca,
        node_key=paths.node_key,
        config=config,
        port=port,
        max_retries=max_retries,
        superexec_secret=secret,
    )
    command = runtime_command(
        command,
        runtime_address=f"{RUNTIME_HOST}:{port}",
        fab_sha256=pin.fab_sha256,
        secret_file=secret,
    )
    env = flower_environment(paths.directory / "flwr-home")
    if log_path is None:
        return subprocess.Popen(command, env=env, start_new_session=True, cwd=paths.directory)
    with Path(log_path).open("ab") as handle:
        return subprocess.Popen(
            command,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=paths.directory,
        )
