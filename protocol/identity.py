"""Long-term signing identities of the data holders and the roster every holder pins.

Each holder owns one Ed25519 key pair (:class:`HolderIdentity`); the consortium agrees once, out
of band, on the :class:`Roster` (holder name -> Ed25519 public key) and every holder keeps its
own copy. In each secure sum a holder signs its round keys with its identity, and verifies every
peer's signature under the peer's roster key (Bonawitz et al., CCS 2017, the active-adversary
variant): the coordinator can then neither substitute keys nor invent participants. The roster
is keyed by name, not by node id, because Flower assigns node ids at run time; the signature
binds the name to the node id of the round.

Private keys are written in PKCS#8 PEM with file mode 0600 and refused when group or others may
read them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fedsynth.protocol.errors import IdentityError

__all__ = [
    "MAX_ROSTER_SIZE",
    "ROSTER_FILE",
    "HolderIdentity",
    "Roster",
    "load_identity",
    "simulated_identity_path",
    "simulated_member",
    "write_simulated_consortium",
]

PUBLIC_KEY_BYTES: Final = 32
"""Length of a raw Ed25519 public key."""

MAX_ROSTER_SIZE: Final = 100_000
"""Most holders one roster may list."""

MAX_ROSTER_BYTES: Final = 64 * 1024 * 1024
"""Largest roster file read."""

ROSTER_FILE: Final = "roster.json"
"""File name of the roster in a simulated consortium's directory."""

_ROSTER_FORMAT: Final = "fedsynth-roster"
_ROSTER_VERSION: Final = 1
_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")


def holder_entries(text: str, *, what: str, form: str, version: int) -> list[Any]:
    """The ``holders`` list of a versioned JSON document (roster, consortium file).

    Raises:
        IdentityError: Not JSON, not an object of format ``form``, another version, or no
            ``holders`` list (naming ``what`` and the field).
    """
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        raise IdentityError(f"{what} is not valid JSON") from None
    if not isinstance(data, dict) or data.get("format") != form:
        raise IdentityError(f"{what} must be a JSON object with format={form!r}")
    if data.get("version") != version:
        raise IdentityError(
            f"{what} version={data.get('version')!r} is not supported (expected {version})"
        )
    holders = data.get("holders")
    if not isinstance(holders, list):
        raise IdentityError(f"{what} field 'holders' must be a list")
    return holders


def check_holder_name(name: object, field: str = "name") -> str:
    """Return ``name`` if it is a holder name: 1-128 of ``[A-Za-z0-9._@-]``, no leading symbol.

    Raises:
        IdentityError: Naming the field and the value.
    """
    if not isinstance(name, str) or _NAME_PATTERN.fullmatch(name) is None:
        raise IdentityError(
            f"{field}={name!r} is not a holder name (1-128 characters of A-Z a-z 0-9 . _ @ -, "
            "starting with a letter or digit)"
        )
    return name


def _check_public_key(value: object, field: str) -> bytes:
    """Return a raw 32-byte Ed25519 public key that parses, else raise IdentityError."""
    if not isinstance(value, bytes) or len(value) != PUBLIC_KEY_BYTES:
        size = len(value) if isinstance(value, bytes) else type(value).__name__
        raise IdentityError(f"{field} must be a {PUBLIC_KEY_BYTES}-byte Ed25519 key, got {size}")
    try:
        Ed25519PublicKey.from_public_bytes(value)
    except ValueError:
        raise IdentityError(f"{field} is not a valid Ed25519 public key") from None
    return value


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by the owner only (mode 0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass(frozen=True)
class HolderIdentity:
    """A holder's long-term Ed25519 signing key and the name the roster lists it under.

    Attributes:
        name: The holder's roster name.
        private_key: The Ed25519 private key; never sent anywhere, never logged.
    """

    name: str
    private_key: Ed25519PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        """Validate the name and the key type.

        Raises:
            IdentityError: If the name is malformed or the key is not an Ed25519 private key.
        """
        check_holder_name(self.name)
        if not isinstance(self.private_key, Ed25519PrivateKey):
            raise IdentityError(
                f"private_key must be an Ed25519 private key, got {type(self.private_key).__name__}"
            )

    @classmethod
    def generate(cls, name: str) -> HolderIdentity:
        """A fresh identity from the operating system's secure randomness."""
        return cls(name=name, private_key=Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key (what the roster lists)."""
        return self.private_key.public_key().public_bytes_raw()

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature of ``message`` (64 bytes)."""
        return self.private_key.sign(message)

    def save(self, path: Path) -> None:
        """Write the private key as unencrypted PKCS#8 PEM, file mode 0600 (atomically).

        Raises:
            IdentityError: If the file cannot be written (the message names the path).
        """
        pem = self.private_key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            encryption_algorithm=serialization.NoEncryption(),
        )
        try:
            _write_private(Path(path), pem)
        except OSError as exc:
            raise IdentityError(f"identity file {path}: cannot write ({exc.strerror})") from None

    @classmethod
    def load(cls, path: Path, *, name: str) -> HolderIdentity:
        """Read a private key written by :meth:`save` and give it the roster name ``name``.

        Raises:
            IdentityError: If the file is missing, readable by group or others, or not an
                Ed25519 private key in PEM.
        """
        path = Path(path)
        try:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise IdentityError(
                    f"identity file {path} has mode {stat.S_IMODE(mode):04o}; a private key "
                    "must be readable by its owner only (chmod 600)"
                )
            data = path.read_bytes()
        except OSError as exc:
            raise IdentityError(f"identity file {path}: cannot read ({exc.strerror})") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise IdentityError(f"identity file {path} is not an unencrypted PEM key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(
                f"identity file {path} holds a {type(key).__name__}, expected an Ed25519 key"
            )
        return cls(name=name, private_key=key)


@dataclass(frozen=True)
class Roster:
    """The consortium's holders: name -> raw Ed25519 public key, pinned by every holder.

    Attributes:
        members: ``{name: public_key}``; names valid and distinct (a mapping cannot repeat
            one), keys valid Ed25519 points and distinct, at least one member.
    """

    members: Mapping[str, bytes]

    def __post_init__(self) -> None:
        """Validate names and keys and freeze the mapping.

        Raises:
            IdentityError: Naming the offending holder or key.
        """
        if not isinstance(self.members, Mapping):
            raise IdentityError(f"members must be a mapping, got {type(self.members).__name__}")
        if not 1 <= len(self.members) <= MAX_ROSTER_SIZE:
            raise IdentityError(
                f"roster lists {len(self.members)} holders, must list 1 to {MAX_ROSTER_SIZE}"
            )
        checked: dict[str, bytes] = {}
        owner_of: dict[bytes, str] = {}
        for name in sorted(self.members):
            check_holder_name(name, "roster name")
            key = _check_public_key(self.members[name], f"public key of {name!r}")
            if key in owner_of:
                raise IdentityError(
                    f"holders {owner_of[key]!r} and {name!r} share one public key; every "
                    "holder needs its own"
                )
            owner_of[key] = name
            checked[name] = key
        object.__setattr__(self, "members", _FrozenMembers(checked))

    def __contains__(self, name: object) -> bool:
        return name in self.members

    def __len__(self) -> int:
        return len(self.members)

    def key_of(self, name: str) -> bytes:
        """The public key of ``name``.

        Raises:
            IdentityError: If ``name`` is not in the roster.
        """
        try:
            return self.members[name]
        except KeyError:
            raise IdentityError(f"holder {name!r} is not in the roster") from None

    def name_of(self, public_key: bytes) -> str | None:
        """The name listed with ``public_key``, or None."""
        for name, key in self.members.items():
            if key == public_key:
                return name
        return None

    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON: compare it out of band to agree on a roster."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def to_json(self) -> str:
        """Canonical JSON: ``{"format", "version", "holders": [{"name", "public_key"}]}``."""
        holders = [
            {"name": name, "public_key": self.members[name].hex()} for name in sorted(self.members)
        ]
        return json.dumps(
            {"format": _ROSTER_FORMAT, "version": _ROSTER_VERSION, "holders": holders},
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Roster:
        """Parse :meth:`to_json` output, refusing repeated names.

        Raises:
            IdentityError: If the text is not a roster, or a name or key is malformed or
                repeated.
        """
        holders = holder_entries(text, what="roster", form=_ROSTER_FORMAT, version=_ROSTER_VERSION)
        members: dict[str, bytes] = {}
        for index, entry in enumerate(holders):
            if not isinstance(entry, dict) or set(entry) != {"name", "public_key"}:
                raise IdentityError(f"roster holders[{index}] must hold 'name' and 'public_key'")
            name = check_holder_name(entry["name"], f"holders[{index}].name")
            if name in members:
                raise IdentityError(f"roster lists holder {name!r} twice")
            raw = entry["public_key"]
            try:
                key = bytes.fromhex(raw) if isinstance(raw, str) else None
            except ValueError:
                key = None
            if key is None:
                raise IdentityError(f"roster holders[{index}].public_key must be a hex string")
            members[name] = key
        return cls(members)

    def save(self, path: Path) -> None:
        """Write the roster as canonical JSON (public data, mode 0644 is fine).

        Raises:
            IdentityError: If the file cannot be written.
        """
        try:
            Path(path).write_text(self.to_json() + "\n", encoding="utf-8")
        except OSError as exc:
            raise IdentityError(f"roster file {path}: cannot write ({exc.strerror})") from None

    @classmethod
    def load(cls, path: Path) -> Roster:
        """Read a roster file.

        Raises:
            IdentityError: If the file is missing, too large or not a valid roster.
        """
        path = Path(path)
        try:
            if path.stat().st_size > MAX_ROSTER_BYTES:
                raise IdentityError(f"roster file {path} exceeds {MAX_ROSTER_BYTES} bytes")
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise IdentityError(f"roster file {path}: cannot read ({exc})") from None
        try:
            return cls.from_json(text)
        except IdentityError as exc:
            raise IdentityError(f"roster file {path}: {exc}") from None


class _FrozenMembers(Mapping[str, bytes]):
    """A read-only ``{name: key}`` mapping (keeps a frozen Roster hashable and immutable)."""

    def __init__(self, items: Mapping[str, bytes]) -> None:
        self._items = dict(items)

    def __getitem__(self, name: str) -> bytes:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._items.items())))

    def __repr__(self) -> str:
        return f"{{{', '.join(f'{n!r}: {k.hex()[:16]}...' for n, k in self._items.items())}}}"


def load_identity(path: Path, roster: Roster) -> HolderIdentity:
    """Read a holder's private key and name it after its entry in the pinned roster.

    Raises:
        IdentityError: If the key cannot be read or its public key is not in the roster.
    """
    probe = HolderIdentity.load(path, name="unnamed")
    name = roster.name_of(probe.public_key)
    if name is None:
        raise IdentityError(
            f"identity file {path}: its public key is not in the roster "
            f"(roster digest {roster.digest()[:16]})"
        )
    return HolderIdentity(name=name, private_key=probe.private_key)


# --------------------------------------------------------------------------------------------
# Simulated consortia (one directory of key files, one per simulated holder)
# --------------------------------------------------------------------------------------------


def simulated_identity_path(directory: Path, index: int) -> Path:
    """Private key file of simulated holder ``index`` (partition ``index``)."""
    return Path(directory) / f"identity-{index}.pem"


def write_simulated_consortium(directory: Path, k: int) -> Roster:
    """Give K simulated holders fresh identities: ``identity-i.pem`` (0600) and ``roster.json``.

    Holder i is named ``holder-i`` and reads partition i. Existing files are replaced, so every
    simulated run starts with new keys.

    Raises:
        IdentityError: If ``k < 1`` or a file cannot be written.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise IdentityError(f"k={k!r} simulated holders: must be an int >= 1")
    directory = Path(directory)
    identities = [HolderIdentity.generate(f"holder-{i}") for i in range(k)]
    roster = Roster({identity.name: identity.public_key for identity in identities})
    for index, identity in enumerate(identities):
        identity.save(simulated_identity_path(directory, index))
    roster.save(directory / ROSTER_FILE)
    return roster


def simulated_member(directory: Path, index: int) -> tuple[HolderIdentity, Roster]:
    """Identity and roster of simulated holder ``index`` from :func:`write_simulated_consortium`.

    Raises:
        IdentityError: If the files are missing or do not match.
    """
    roster = Roster.load(Path(directory) / ROSTER_FILE)
    return load_identity(simulated_identity_path(directory, index), roster), roster
