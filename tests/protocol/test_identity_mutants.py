"""Holder identities and the pinned roster, where mutation testing found them unchecked.

``scripts/mutmut.sh protocol/identity.py`` left alive: the roster's canonical JSON without its
sorted keys or compact separators (its digest is what holders compare out of band, so two
versions must agree on it byte for byte), a roster entry with extra fields or a key that is not
a string accepted or crashing, a private key file created with the default mode until its
``fchmod``, ``True`` taken for one simulated holder, the size limits' inclusive edges, the
roster's hash and repr, and the refusals' texts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedsynth.protocol import identity as identity_module
from fedsynth.protocol.errors import IdentityError
from fedsynth.protocol.identity import (
    HolderIdentity,
    Roster,
    check_holder_name,
    load_identity,
    write_simulated_consortium,
)
from tests.protocol.test_identity import _mode


def _key(index: int) -> bytes:
    """A fixed, valid Ed25519 public key (from a deterministic private key)."""
    private = Ed25519PrivateKey.from_private_bytes(bytes([index + 1]) * 32)
    return private.public_key().public_bytes_raw()


def _entry(name: str, key: bytes) -> dict[str, str]:
    return {"name": name, "public_key": key.hex()}


def _document(holders: list[object]) -> str:
    return json.dumps({"format": "fedsynth-roster", "version": 1, "holders": holders})


def test_the_canonical_json_and_its_digest_are_a_fixed_format() -> None:
    roster = Roster({"b-clinic": _key(1), "a-clinic": _key(0)})
    expected = (
        '{"format":"fedsynth-roster","holders":['
        f'{{"name":"a-clinic","public_key":"{_key(0).hex()}"}},'
        f'{{"name":"b-clinic","public_key":"{_key(1).hex()}"}}'
        '],"version":1}'
    )
    assert roster.to_json() == expected
    assert roster.digest() == hashlib.sha256(expected.encode()).hexdigest()


def test_roster_entries_of_another_shape_are_refused_by_index() -> None:
    extra = {**_entry("a", _key(0)), "role": "admin"}
    with pytest.raises(IdentityError) as caught:
        Roster.from_json(_document([extra]))
    assert str(caught.value) == "roster holders[0] must hold 'name' and 'public_key'"
    with pytest.raises(IdentityError) as caught:
        Roster.from_json(_document([_entry("a", _key(0)), "b"]))
    assert str(caught.value) == "roster holders[1] must hold 'name' and 'public_key'"
    for raw in (12, None, "zz"):
        with pytest.raises(IdentityError) as caught:
            Roster.from_json(_document([{"name": "a", "public_key": raw}]))
        assert str(caught.value) == "roster holders[0].public_key must be a hex string"
    with pytest.raises(IdentityError) as caught:
        Roster.from_json(_document([{"name": "-a", "public_key": _key(0).hex()}]))
    assert str(caught.value).startswith("holders[0].name='-a' is not a holder name")


def test_roster_documents_are_refused_with_what_is_wrong() -> None:
    with pytest.raises(IdentityError) as caught:
        Roster.from_json(json.dumps({"format": "fedsynth-roster", "version": 7, "holders": []}))
    assert str(caught.value) == "roster version=7 is not supported (expected 1)"
    with pytest.raises(IdentityError) as caught:
        Roster.from_json(json.dumps({"format": "fedsynth-roster", "version": 1, "holders": {}}))
    assert str(caught.value) == "roster field 'holders' must be a list"
    with pytest.raises(IdentityError) as caught:
        Roster.from_json("{")
    assert str(caught.value) == "roster is not valid JSON"


def test_roster_members_are_refused_by_name_and_key() -> None:
    with pytest.raises(IdentityError) as caught:
        Roster([("a", _key(0))])  # type: ignore[arg-type]
    assert str(caught.value) == "members must be a mapping, got list"
    with pytest.raises(IdentityError) as caught:
        Roster({"a": _key(0), "b": _key(0)})
    assert str(caught.value) == (
        "holders 'a' and 'b' share one public key; every holder needs its own"
    )
    with pytest.raises(IdentityError) as caught:
        Roster({"a b": _key(0)})
    assert str(caught.value) == (
        "roster name='a b' is not a holder name (1-128 characters of A-Z a-z 0-9 . _ @ -, "
        "starting with a letter or digit)"
    )
    with pytest.raises(IdentityError) as caught:
        Roster({"a": _key(0)[:31]})
    assert str(caught.value) == "public key of 'a' must be a 32-byte Ed25519 key, got 31"
    with pytest.raises(IdentityError) as caught:
        Roster({"a": _key(0).hex()})  # type: ignore[dict-item]
    assert str(caught.value) == "public key of 'a' must be a 32-byte Ed25519 key, got str"
    with pytest.raises(IdentityError) as caught:
        check_holder_name(7)
    assert str(caught.value).startswith("name=7 is not a holder name")


def test_the_roster_size_limit_is_inclusive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity_module, "MAX_ROSTER_SIZE", 2)
    assert len(Roster({"a": _key(0), "b": _key(1)})) == 2
    with pytest.raises(IdentityError) as caught:
        Roster({"a": _key(0), "b": _key(1), "c": _key(2)})
    assert str(caught.value) == "roster lists 3 holders, must list 1 to 2"


def test_the_roster_file_size_limit_is_inclusive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "roster.json"
    Roster({"a": _key(0)}).save(path)
    size = path.stat().st_size
    monkeypatch.setattr(identity_module, "MAX_ROSTER_BYTES", size)
    assert "a" in Roster.load(path)
    monkeypatch.setattr(identity_module, "MAX_ROSTER_BYTES", size - 1)
    with pytest.raises(IdentityError) as caught:
        Roster.load(path)
    assert str(caught.value) == f"roster file {path} exceeds {size - 1} bytes"


def test_roster_files_say_which_file_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "roster.json"
    path.write_text(_document([{"name": "a"}]))
    with pytest.raises(IdentityError) as caught:
        Roster.load(path)
    assert str(caught.value) == (
        f"roster file {path}: roster holders[0] must hold 'name' and 'public_key'"
    )
    with pytest.raises(IdentityError) as caught:
        Roster({"a": _key(0)}).save(tmp_path / "missing" / "roster.json")
    assert str(caught.value) == (
        f"roster file {tmp_path / 'missing' / 'roster.json'}: cannot write "
        "(No such file or directory)"
    )


def test_a_roster_is_hashable_by_its_members_and_shows_key_prefixes_only() -> None:
    one, same = Roster({"a": _key(0), "b": _key(1)}), Roster({"b": _key(1), "a": _key(0)})
    other = Roster({"a": _key(0), "b": _key(2)})
    assert hash(one) == hash(same) and one == same
    assert len({one, same, other}) == 2
    shown = repr(one.members)
    assert shown == f"{{'a': {_key(0).hex()[:16]}..., 'b': {_key(1).hex()[:16]}...}}"


def test_a_private_key_file_is_never_readable_by_others_even_before_its_chmod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temporary file is created with mode 0600, not fixed up afterwards: between the two
    another local user could open it and read the key once written."""
    monkeypatch.setattr(os, "fchmod", lambda fd, mode: None)
    before = os.umask(0o022)
    try:
        HolderIdentity.generate("clinic-a").save(tmp_path / "id.pem")
    finally:
        os.umask(before)
    assert _mode(tmp_path / "id.pem") == 0o600


def test_identity_files_are_refused_with_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(IdentityError) as caught:
        HolderIdentity("clinic-a", X25519PrivateKey.generate())  # type: ignore[arg-type]
    assert str(caught.value) == "private_key must be an Ed25519 private key, got X25519PrivateKey"
    path = tmp_path / "x25519.pem"
    path.write_bytes(
        X25519PrivateKey.generate().private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            encryption_algorithm=serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    with pytest.raises(IdentityError) as caught:
        HolderIdentity.load(path, name="clinic-a")
    assert str(caught.value) == (
        f"identity file {path} holds a X25519PrivateKey, expected an Ed25519 key"
    )
    path.chmod(0o640)
    with pytest.raises(IdentityError) as caught:
        HolderIdentity.load(path, name="clinic-a")
    assert str(caught.value) == (
        f"identity file {path} has mode 0640; a private key must be readable by its owner only "
        "(chmod 600)"
    )
    with pytest.raises(IdentityError) as caught:
        HolderIdentity.generate("clinic-a").save(tmp_path / "missing" / "id.pem")
    assert str(caught.value) == (
        f"identity file {tmp_path / 'missing' / 'id.pem'}: cannot write (No such file or directory)"
    )


def test_a_key_off_the_roster_names_the_rosters_digest(tmp_path: Path) -> None:
    roster = Roster({"a": _key(0)})
    path = tmp_path / "id.pem"
    HolderIdentity.generate("stranger").save(path)
    with pytest.raises(IdentityError) as caught:
        load_identity(path, roster)
    assert str(caught.value) == (
        f"identity file {path}: its public key is not in the roster "
        f"(roster digest {roster.digest()[:16]})"
    )


def test_a_simulated_consortium_needs_a_whole_number_of_holders(tmp_path: Path) -> None:
    assert len(write_simulated_consortium(tmp_path, 1)) == 1
    for bad in (True, 0, 1.0):
        with pytest.raises(IdentityError) as caught:
            write_simulated_consortium(tmp_path, bad)  # type: ignore[arg-type]
        assert str(caught.value) == f"k={bad!r} simulated holders: must be an int >= 1"
