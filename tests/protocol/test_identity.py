"""Tests of the holders' signing identities and the roster they pin."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedsynth.client.settings import load_credentials
from fedsynth.protocol.errors import IdentityError
from fedsynth.protocol.identity import (
    ROSTER_FILE,
    HolderIdentity,
    Roster,
    load_identity,
    simulated_identity_path,
    simulated_member,
    write_simulated_consortium,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_identity_round_trip_is_owner_only(tmp_path: Path) -> None:
    identity = HolderIdentity.generate("clinic-a")
    path = tmp_path / "id.pem"
    identity.save(path)
    assert _mode(path) == 0o600
    loaded = HolderIdentity.load(path, name="clinic-a")
    assert loaded.public_key == identity.public_key
    message = b"round keys"
    assert len(loaded.sign(message)) == 64
    assert loaded.sign(message) == identity.sign(message)  # Ed25519 is deterministic
    assert "private_key" not in repr(loaded)


def test_identity_load_refuses_readable_foreign_or_garbage_files(tmp_path: Path) -> None:
    path = tmp_path / "id.pem"
    HolderIdentity.generate("a").save(path)
    path.chmod(0o644)
    with pytest.raises(IdentityError, match=r"mode 0644.*chmod 600"):
        HolderIdentity.load(path, name="a")
    other = tmp_path / "x25519.pem"
    other.write_bytes(
        X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    other.chmod(0o600)
    with pytest.raises(IdentityError, match="expected an Ed25519 key"):
        HolderIdentity.load(other, name="a")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    junk.chmod(0o600)
    with pytest.raises(IdentityError, match="not an unencrypted PEM key"):
        HolderIdentity.load(junk, name="a")
    with pytest.raises(IdentityError, match="cannot read"):
        HolderIdentity.load(tmp_path / "missing.pem", name="a")
    with pytest.raises(IdentityError, match="not a holder name"):
        HolderIdentity.generate("has space")


def test_roster_round_trip_and_lookup(tmp_path: Path) -> None:
    a, b = HolderIdentity.generate("a"), HolderIdentity.generate("b.lab@x")
    roster = Roster({a.name: a.public_key, b.name: b.public_key})
    path = tmp_path / "roster.json"
    roster.save(path)
    again = Roster.load(path)
    assert again == roster and again.digest() == roster.digest()
    assert again.key_of("a") == a.public_key
    assert again.name_of(b.public_key) == "b.lab@x"
    assert again.name_of(bytes(32)) is None
    assert "a" in again and "c" not in again and len(again) == 2
    with pytest.raises(IdentityError, match="'c' is not in the roster"):
        again.key_of("c")
    with pytest.raises(TypeError):
        again.members["c"] = a.public_key  # type: ignore[index]


def test_roster_refuses_repeated_names_and_keys_and_malformed_entries() -> None:
    a = HolderIdentity.generate("a")
    with pytest.raises(IdentityError, match="share one public key"):
        Roster({"a": a.public_key, "b": a.public_key})
    with pytest.raises(IdentityError, match="1 to"):
        Roster({})
    with pytest.raises(IdentityError, match="32-byte"):
        Roster({"a": b"short"})
    with pytest.raises(IdentityError, match="not a holder name"):
        Roster({"-bad": a.public_key})
    holder = {"name": "a", "public_key": a.public_key.hex()}
    base = {"format": "fedsynth-roster", "version": 1}
    with pytest.raises(IdentityError, match="lists holder 'a' twice"):
        Roster.from_json(json.dumps({**base, "holders": [holder, holder]}))
    with pytest.raises(IdentityError, match="hex string"):
        Roster.from_json(json.dumps({**base, "holders": [{"name": "a", "public_key": "zz"}]}))
    with pytest.raises(IdentityError, match="version"):
        Roster.from_json(json.dumps({**base, "version": 2, "holders": [holder]}))
    with pytest.raises(IdentityError, match="format"):
        Roster.from_json(json.dumps({"holders": [holder]}))
    with pytest.raises(IdentityError, match="not valid JSON"):
        Roster.from_json("{")


def test_identity_is_named_by_the_roster(tmp_path: Path) -> None:
    a, b = HolderIdentity.generate("a"), HolderIdentity.generate("b")
    roster = Roster({a.name: a.public_key})
    a.save(tmp_path / "a.pem")
    b.save(tmp_path / "b.pem")
    assert load_identity(tmp_path / "a.pem", roster).name == "a"
    with pytest.raises(IdentityError, match="not in the roster"):
        load_identity(tmp_path / "b.pem", roster)


def test_simulated_consortium(tmp_path: Path) -> None:
    roster = write_simulated_consortium(tmp_path, 3)
    assert sorted(roster.members) == ["holder-0", "holder-1", "holder-2"]
    for i in range(3):
        assert _mode(simulated_identity_path(tmp_path, i)) == 0o600
        identity, pinned = simulated_member(tmp_path, i)
        assert identity.name == f"holder-{i}" and pinned == roster
    # A new run gets new keys.
    assert write_simulated_consortium(tmp_path, 3) != roster
    with pytest.raises(IdentityError, match="k=0"):
        write_simulated_consortium(tmp_path, 0)


def test_node_config_credentials(tmp_path: Path) -> None:
    write_simulated_consortium(tmp_path, 2)
    node = {
        "identity-path": str(simulated_identity_path(tmp_path, 1)),
        "roster-path": str(tmp_path / ROSTER_FILE),
    }
    identity, roster = load_credentials(node)
    assert identity is not None and identity.name == "holder-1" and roster is not None
    with pytest.raises(IdentityError, match="identity-path alone"):
        load_credentials({"identity-path": node["identity-path"]})
    with pytest.raises(IdentityError, match="roster file"):
        load_credentials({**node, "roster-path": str(tmp_path / "nope.json")})
    assert load_credentials({}) == (None, None)
    assert load_credentials({}, simulated_dir=tmp_path / "empty") == (None, None)
    sim_identity, _ = load_credentials({}, simulated_dir=tmp_path, partition_id=0)
    assert sim_identity is not None and sim_identity.name == "holder-0"
