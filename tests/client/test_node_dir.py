"""A holder's node directory and the SuperNode command it starts."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from manifests import FINGERPRINT, make_manifest
from typer.testing import CliRunner

from fedsynth.client import node_dir
from fedsynth.client.budget import ClientBudget
from fedsynth.client.node_cli import node_app
from fedsynth.client.supernode import node_config, node_config_string, prepare, supernode_command
from fedsynth.protocol.errors import CertificateError, ConfigError, IdentityError
from fedsynth.protocol.identity import HolderIdentity, Roster
from fedsynth.protocol.node_keys import (
    node_key_fingerprint,
    node_public_openssh,
    parse_signing_public_key,
    signing_key_fingerprint,
)
from fedsynth.server.coordinator_cli import coordinator_app
from fedsynth.server.pki import generate_ca, issue_server_certificate, write_certificate


def test_init_writes_both_key_pairs_owner_only(tmp_path: Path) -> None:
    keys = node_dir.init(tmp_path / "node")
    paths = keys.paths
    assert stat.S_IMODE(paths.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(paths.node_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.signing_key.stat().st_mode) == 0o600
    # The node key is what flower-supernode reads: OpenSSH, EC P-384, matching node.pub.
    private = serialization.load_ssh_private_key(paths.node_key.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert node_public_openssh(private.public_key()) == paths.node_pub.read_text().strip()
    assert keys.node_public_key.startswith("ecdsa-sha2-nistp384 ")
    assert keys.node_fingerprint == node_key_fingerprint(keys.node_public_key)
    # The signing key is a fedsynth identity whose public half is signing.pub.
    identity = HolderIdentity.load(paths.signing_key, name="alice")
    assert identity.public_key == keys.signing_public_key
    assert parse_signing_public_key(paths.signing_pub.read_bytes()) == identity.public_key
    assert keys.signing_fingerprint == signing_key_fingerprint(identity.public_key)
    assert node_dir.public_keys(paths.directory) == keys


def test_two_holders_get_different_keys(tmp_path: Path) -> None:
    a, b = node_dir.init(tmp_path / "a"), node_dir.init(tmp_path / "b")
    assert a.node_public_key != b.node_public_key
    assert a.signing_public_key != b.signing_public_key


def test_init_never_overwrites_keys(tmp_path: Path) -> None:
    keys = node_dir.init(tmp_path / "node")
    before = keys.paths.node_key.read_bytes(), keys.paths.signing_key.read_bytes()
    with pytest.raises(IdentityError, match=r"already holds node.key; refusing to overwrite"):
        node_dir.init(tmp_path / "node")
    assert (keys.paths.node_key.read_bytes(), keys.paths.signing_key.read_bytes()) == before
    # Even one leftover key file blocks a new init.
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    (other / "signing.key").write_text("old")
    with pytest.raises(IdentityError, match=r"already holds signing.key"):
        node_dir.init(other)
    assert (other / "signing.key").read_text() == "old"


def test_init_refuses_a_directory_others_can_read(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    with pytest.raises(IdentityError, match=r"has mode 0755.*chmod 700"):
        node_dir.init(shared)
    assert not any(shared.iterdir())


def _ready_node(tmp_path: Path) -> tuple[node_dir.NodePublicKeys, Path, Path, Path]:
    keys = node_dir.init(tmp_path / "node")
    Roster({"alice": keys.signing_public_key}).save(keys.paths.roster)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "x", "label": "a"}\n')
    policy = tmp_path / "POLICY.toml"
    policy.write_text("max_epsilon_per_task = 2.0\n")
    _, ca_cert = generate_ca()
    ca = tmp_path / "ca.pem"
    write_certificate(ca, ca_cert)
    return keys, data, policy, ca


def test_a_ready_node_passes_every_check(tmp_path: Path) -> None:
    keys, data, policy, ca = _ready_node(tmp_path)
    paths, loaded = prepare(keys.paths.directory, data=data, policy=policy, ca=ca)
    assert paths == keys.paths
    assert loaded.policy.max_epsilon_per_task == 2.0


def test_a_readable_private_key_or_a_missing_roster_stops_the_start(tmp_path: Path) -> None:
    keys, data, policy, ca = _ready_node(tmp_path)
    os.chmod(keys.paths.node_key, 0o644)
    with pytest.raises(IdentityError, match=r"node.key has mode 0644"):
        prepare(keys.paths.directory, data=data, policy=policy, ca=ca)
    os.chmod(keys.paths.node_key, 0o600)
    keys.paths.roster.unlink()
    with pytest.raises(IdentityError, match=r"roster.json is missing"):
        prepare(keys.paths.directory, data=data, policy=policy, ca=ca)


def test_a_roster_without_this_holder_stops_the_start(tmp_path: Path) -> None:
    keys, data, policy, ca = _ready_node(tmp_path)
    Roster({"mallory": HolderIdentity.generate("mallory").public_key}).save(keys.paths.roster)
    with pytest.raises(IdentityError, match="its public key is not in the roster"):
        prepare(keys.paths.directory, data=data, policy=policy, ca=ca)


def test_a_server_certificate_or_an_expired_ca_is_not_accepted_as_ca(tmp_path: Path) -> None:
    keys, data, policy, ca = _ready_node(tmp_path)
    ca_key, ca_cert = generate_ca()
    _, server_cert = issue_server_certificate(ca_key, ca_cert)
    write_certificate(ca, server_cert)
    with pytest.raises(CertificateError, match="is not a CA certificate"):
        prepare(keys.paths.directory, data=data, policy=policy, ca=ca)
    _, old_ca = generate_ca(days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    write_certificate(ca, old_ca)
    with pytest.raises(CertificateError, match="expired"):
        prepare(keys.paths.directory, data=data, policy=policy, ca=ca)


def test_the_supernode_verifies_the_superlink_and_authenticates(tmp_path: Path) -> None:
    keys, data, policy, ca = _ready_node(tmp_path)
    config = node_config(keys.paths, data=data, policy_path=policy, budget_path=keys.paths.budget)
    command = supernode_command(
        "flower-supernode",
        superlink="coord.example.org:9092",
        ca=ca,
        node_key=keys.paths.node_key,
        config=config,
    )
    assert "--insecure" not in command
    assert command[command.index("--root-certificates") + 1] == str(ca.absolute())
    assert command[command.index("--auth-supernode-private-key") + 1] == str(
        keys.paths.node_key.absolute()
    )
    text = command[command.index("--node-config") + 1]
    for key in ("data-path", "policy-path", "identity-path", "roster-path", "budget-path"):
        assert f'{key}="' in text
    assert f'identity-path="{keys.paths.signing_key.absolute()}"' in text
    assert f'budget-path="{keys.paths.budget.absolute()}"' in text


def test_a_node_config_value_with_a_quote_is_refused() -> None:
    with pytest.raises(ConfigError, match="quotes and line breaks are refused"):
        node_config_string({"data-path": '/tmp/x" allow-non-private="true'})


def test_status_reads_the_holder_s_own_store_and_policy(tmp_path: Path) -> None:
    keys, _, policy, _ = _ready_node(tmp_path)
    policy.write_text(f'max_total_epsilon = 20.0\nallowed_fingerprints = ["{FINGERPRINT}"]\n')
    ClientBudget(keys.paths.budget).charge(make_manifest("task-7", epsilon=1.5))
    result = CliRunner().invoke(
        node_app, ["status", str(keys.paths.directory), "--policy", str(policy)]
    )
    assert result.exit_code == 0, result.output
    assert "epsilon spent 1.5 of 20" in result.output
    assert "delta spent 1e-06 of 0.001" in " ".join(result.output.split())
    assert "task-7" in result.output and "charged" in result.output
    assert FINGERPRINT in result.output
    assert "refusals: not recorded in the budget store" in result.output
    assert keys.node_fingerprint in result.output


def test_every_command_has_help_with_h() -> None:
    for app, command in [(node_app, c) for c in ("init", "start", "status")] + [
        (coordinator_app, c) for c in ("init", "add-node", "start")
    ]:
        result = CliRunner().invoke(app, [command, "-h"])
        assert result.exit_code == 0 and "Usage" in result.output, result.output
