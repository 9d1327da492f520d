"""The coordinator's directory: init, admitting holders, the roster they pin, and start checks."""

from __future__ import annotations

import datetime as dt
import json
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fedsynth.client import node_dir
from fedsynth.protocol.errors import CertificateError, DeploymentError, IdentityError
from fedsynth.protocol.identity import HolderIdentity, Roster, load_identity
from fedsynth.protocol.node_keys import node_public_openssh
from fedsynth.server import consortium, superlink
from fedsynth.server.consortium import Consortium, CoordinatorPaths
from fedsynth.server.pki import (
    generate_ca,
    issue_server_certificate,
    write_certificate,
    write_private_key,
)

TODAY = dt.date(2030, 6, 1)


@pytest.fixture
def coordinator(tmp_path: Path) -> CoordinatorPaths:
    return consortium.init(tmp_path / "coord")


def holder_keys(tmp_path: Path, name: str) -> node_dir.NodePublicKeys:
    return node_dir.init(tmp_path / name)


def add(coord: CoordinatorPaths, name: str, keys: node_dir.NodePublicKeys) -> consortium.Member:
    return consortium.add_node(
        coord.directory, name, keys.paths.node_pub, keys.paths.signing_pub, today=TODAY
    )


def test_init_creates_ca_certificate_and_an_empty_consortium(coordinator: CoordinatorPaths) -> None:
    assert stat.S_IMODE(coordinator.directory.stat().st_mode) == 0o700
    for key in (coordinator.ca_key, coordinator.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert consortium.load_consortium(coordinator.directory) == Consortium()
    with pytest.raises(IdentityError, match="no member yet"):
        consortium.export_roster(coordinator.directory)


def test_init_never_overwrites_a_consortium(coordinator: CoordinatorPaths) -> None:
    before = coordinator.ca_key.read_bytes()
    with pytest.raises(CertificateError, match=r"already holds ca.pem; refusing to overwrite"):
        consortium.init(coordinator.directory)
    assert coordinator.ca_key.read_bytes() == before


def test_added_holders_land_in_the_roster_every_holder_pins(
    tmp_path: Path, coordinator: CoordinatorPaths
) -> None:
    alice, bob = holder_keys(tmp_path, "a"), holder_keys(tmp_path, "b")
    member = add(coordinator, "alice", alice)
    add(coordinator, "bob", bob)
    assert member.added == "2030-06-01"
    assert member.node_fingerprint == alice.node_fingerprint
    assert member.signing_fingerprint == alice.signing_fingerprint
    roster = Roster.load(coordinator.roster)
    assert roster.key_of("alice") == alice.signing_public_key
    assert roster.key_of("bob") == bob.signing_public_key
    assert consortium.export_roster(coordinator.directory) == roster
    # The holder's own private signing key resolves to its roster name.
    assert load_identity(alice.paths.signing_key, roster).name == "alice"
    stored = json.loads(coordinator.members.read_text())["holders"]
    assert [h["node_public_key"] for h in stored] == [alice.node_public_key, bob.node_public_key]


@pytest.mark.parametrize("clash", ["name", "node key", "signing key"])
def test_a_repeated_name_or_key_is_refused_and_nothing_is_written(
    tmp_path: Path, coordinator: CoordinatorPaths, clash: str
) -> None:
    alice, bob = holder_keys(tmp_path, "a"), holder_keys(tmp_path, "b")
    add(coordinator, "alice", alice)
    members, roster = coordinator.members.read_bytes(), coordinator.roster.read_bytes()
    name = "alice" if clash == "name" else "bob"
    node_pub = alice.paths.node_pub if clash == "node key" else bob.paths.node_pub
    signing_pub = alice.paths.signing_pub if clash == "signing key" else bob.paths.signing_pub
    with pytest.raises(IdentityError, match="already"):
        consortium.add_node(coordinator.directory, name, node_pub, signing_pub, today=TODAY)
    assert coordinator.members.read_bytes() == members
    assert coordinator.roster.read_bytes() == roster


def _ssh_line(key: object) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


@pytest.mark.parametrize(
    ("make_key", "message"),
    [
        (lambda: ec.generate_private_key(ec.SECP256R1()), "curve secp256r1"),
        (lambda: ed25519.Ed25519PrivateKey.generate(), "needs an EC key"),
        (lambda: rsa.generate_private_key(65537, 2048), "needs an EC key"),
    ],
)
def test_a_node_key_of_the_wrong_type_or_curve_is_refused(
    tmp_path: Path, coordinator: CoordinatorPaths, make_key: object, message: str
) -> None:
    keys = holder_keys(tmp_path, "a")
    bad = tmp_path / "bad.pub"
    bad.write_bytes(_ssh_line(make_key()))  # type: ignore[operator]
    with pytest.raises(IdentityError, match=message):
        consortium.add_node(coordinator.directory, "alice", bad, keys.paths.signing_pub)
    assert consortium.load_consortium(coordinator.directory) == Consortium()


def test_a_signing_key_that_is_not_ed25519_is_refused(
    tmp_path: Path, coordinator: CoordinatorPaths
) -> None:
    keys = holder_keys(tmp_path, "a")
    bad = tmp_path / "bad.pem"
    bad.write_bytes(
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(IdentityError, match="signing keys are Ed25519"):
        consortium.add_node(coordinator.directory, "alice", keys.paths.node_pub, bad)
    # Swapped files (node key where the signing key belongs) are refused too.
    with pytest.raises(IdentityError, match="is not a PEM public key"):
        consortium.add_node(
            coordinator.directory, "alice", keys.paths.node_pub, keys.paths.node_pub
        )
    with pytest.raises(IdentityError, match="is not an OpenSSH public key"):
        consortium.add_node(
            coordinator.directory, "alice", keys.paths.signing_pub, keys.paths.signing_pub
        )


def test_a_malformed_holder_name_is_refused(tmp_path: Path, coordinator: CoordinatorPaths) -> None:
    keys = holder_keys(tmp_path, "a")
    with pytest.raises(IdentityError, match="is not a holder name"):
        add(coordinator, "-alice; rm", keys)


def test_the_member_list_parses_strictly(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    member = consortium.Member(
        name="alice",
        node_public_key=node_public_openssh(key.public_key()),
        signing_public_key=HolderIdentity.generate("alice").public_key,
        added="2030-06-01",
    )
    text = Consortium((member,)).to_json()
    assert Consortium.from_json(text) == Consortium((member,))
    data = json.loads(text)
    data["holders"][0]["extra"] = 1
    with pytest.raises(IdentityError, match=r"holders\[0\] must hold exactly"):
        Consortium.from_json(json.dumps(data))
    data = json.loads(text)
    data["version"] = 2
    with pytest.raises(IdentityError, match="version=2 is not supported"):
        Consortium.from_json(json.dumps(data))
    data = json.loads(text)
    data["holders"].append(dict(data["holders"][0]))
    with pytest.raises(IdentityError, match="'alice' is already in the consortium"):
        Consortium.from_json(json.dumps(data))
    with pytest.raises(IdentityError, match="added='June'"):
        consortium.Member(
            name="alice",
            node_public_key=member.node_public_key,
            signing_public_key=member.signing_public_key,
            added="June",
        )


# ---------------------------------------------------------------------------------------------
# Start: the command line, and the checks that run before any process
# ---------------------------------------------------------------------------------------------


def test_the_superlink_runs_with_tls_and_node_authentication(
    coordinator: CoordinatorPaths,
) -> None:
    command = superlink.superlink_command(
        "flower-superlink", coordinator, host="0.0.0.0", port=9443, insecure=False
    )
    assert "--insecure" not in command
    assert "--enable-supernode-auth" in command
    for flag, path in (
        ("--ssl-ca-certfile", coordinator.ca_cert),
        ("--ssl-certfile", coordinator.server_cert),
        ("--ssl-keyfile", coordinator.server_key),
    ):
        assert command[command.index(flag) + 1] == str(path)
    insecure = superlink.superlink_command(
        "flower-superlink", coordinator, host="0.0.0.0", port=9443, insecure=True
    )
    assert "--insecure" in insecure and "--enable-supernode-auth" in insecure
    assert not any(flag.startswith("--ssl") for flag in insecure)


def test_the_flwr_connection_pins_the_ca(coordinator: CoordinatorPaths) -> None:
    text = superlink.connection_toml("fedsynth", "127.0.0.1:9443", coordinator.ca_cert)
    assert f'root-certificates = "{coordinator.ca_cert.absolute()}"' in text
    assert "insecure" not in text
    assert superlink.local_address("0.0.0.0", 9443) == "127.0.0.1:9443"
    assert superlink.local_address("::1", 9443) == "[::1]:9443"


def _no_process(*args: object, **kwargs: object) -> None:
    raise AssertionError("a process was started despite a bad certificate")


def test_start_refuses_an_expired_certificate_before_any_process(
    coordinator: CoordinatorPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    ca_key, ca_cert = generate_ca(now=past)
    key, cert = issue_server_certificate(ca_key, ca_cert, days=30, now=past)
    write_certificate(coordinator.ca_cert, ca_cert)
    write_certificate(coordinator.server_cert, cert)
    write_private_key(coordinator.server_key, key)
    monkeypatch.setattr(subprocess, "Popen", _no_process)
    with pytest.raises(CertificateError, match="expired"):
        superlink.start_superlink(coordinator.directory, host="127.0.0.1", port=9443)


def test_start_refuses_a_mismatched_key_or_an_unnamed_host_before_any_process(
    coordinator: CoordinatorPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subprocess, "Popen", _no_process)
    with pytest.raises(CertificateError, match=r"does not name host='10.1.2.3'"):
        superlink.start_superlink(coordinator.directory, host="10.1.2.3", port=9443)
    write_private_key(coordinator.server_key, ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(CertificateError, match="private key does not match"):
        superlink.start_superlink(coordinator.directory, host="127.0.0.1", port=9443)


def test_saved_node_ids_round_trip_and_a_damaged_file_reads_as_none(tmp_path: Path) -> None:
    coord = tmp_path / "coord"
    consortium.init(coord)
    assert consortium.load_node_ids(coord) == {}
    consortium.save_node_ids(coord, {"alice": 17, "bob": 2**62})
    assert consortium.load_node_ids(coord) == {"alice": 17, "bob": 2**62}
    # Damaged: only what is a whole integer is kept (a lost id costs a fresh registration).
    CoordinatorPaths(coord).node_ids.write_text('{"alice": "17", "bob": 3, "carol": true}')
    assert consortium.load_node_ids(coord) == {"bob": 3}
    CoordinatorPaths(coord).node_ids.write_text("not json")
    assert consortium.load_node_ids(coord) == {}


def test_the_superlink_command_keeps_its_state_in_the_coordinator_directory(
    tmp_path: Path,
) -> None:
    paths = CoordinatorPaths(tmp_path)
    command = superlink.superlink_command(
        "flower-superlink",
        paths,
        host="127.0.0.1",
        port=9000,
        insecure=False,
        database=paths.superlink_state,
    )
    assert command[command.index("--database") + 1] == str(tmp_path / "superlink-state.db")


class _ListedLink(superlink.RunningSuperLink):
    """A SuperLink whose `flwr supernode ls` lists ``nodes``; records every unregister call."""

    def __init__(self, tmp_path: Path, nodes: list[dict[str, object]]) -> None:
        super().__init__(
            process=subprocess.Popen(["true"]),
            address="127.0.0.1:1",
            flwr_home=tmp_path,
            log_path=tmp_path / "log",
        )
        self.nodes = nodes
        self.unregister_calls: list[str] = []

    def list_nodes(self) -> list[dict[str, object]]:
        return self.nodes

    def flwr(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        assert args[:2] == ("supernode", "unregister")
        self.unregister_calls.append(args[2])
        return subprocess.CompletedProcess(list(args), 0, '{"success": true}', "")


def test_reconcile_unregisters_every_node_that_is_no_members(tmp_path: Path) -> None:
    link = _ListedLink(
        tmp_path,
        [
            {"node-id": "11", "status": "online"},
            {"node-id": "22", "status": "registered"},
            {"node-id": "33", "status": "offline"},
            {"node-id": "44", "status": "unregistered"},
        ],
    )
    link.node_ids = {"alice": 11}
    assert superlink.reconcile_nodes(link) == [22, 33]
    assert link.unregister_calls == ["22", "33"]


def test_reconcile_refuses_saved_ids_the_superlink_does_not_hold(tmp_path: Path) -> None:
    link = _ListedLink(tmp_path, [{"node-id": "11", "status": "online"}])
    link.node_ids = {"alice": 11, "bob": 99}
    with pytest.raises(DeploymentError, match=r"saved node ids of bob are not in the SuperLink"):
        superlink.reconcile_nodes(link)
    assert link.unregister_calls == []
