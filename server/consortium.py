"""The coordinator's consortium directory: CA, SuperLink certificate, and the holders it admits.

``init`` creates, in one directory the operator keeps::

    ca.pem / ca.key                 the consortium's CA (holders pin ca.pem)
    superlink.pem / superlink.key   the SuperLink's TLS certificate, signed by the CA
    consortium.json                 the members: name, node key, signing key, date added
    roster.json                     the fedsynth roster every holder pins (written by add-node)

A member's **node key** (OpenSSH EC P-384) is what the SuperLink's node authentication admits;
its **signing key** (Ed25519) is what its peers check its secure-sum round keys against
(:class:`fedsynth.protocol.identity.Roster`). The operator cannot forge a holder's signature
with the roster: it holds public keys only. Holders compare the roster's digest among themselves
out of band, so an operator that hands out different rosters is caught.

:class:`Consortium` is pure (validation, duplicates, JSON); the functions below it do the I/O.
Every write is atomic (temporary file, fsync, rename) under an exclusive lock, so two
``add-node`` calls never lose one another's member.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fedsynth.protocol.errors import CertificateError, IdentityError
from fedsynth.protocol.identity import ROSTER_FILE, Roster, check_holder_name, holder_entries
from fedsynth.protocol.node_keys import (
    node_key_fingerprint,
    parse_node_public_key,
    parse_signing_public_key,
    signing_key_fingerprint,
)
from fedsynth.server.pki import (
    DEFAULT_HOSTS,
    generate_ca,
    issue_server_certificate,
    write_certificate,
    write_private_key,
)

__all__ = [
    "Consortium",
    "CoordinatorPaths",
    "Member",
    "add_node",
    "export_roster",
    "init",
    "load_consortium",
    "load_node_ids",
    "save_node_ids",
]

MEMBERS_FILE: Final = "consortium.json"
_FORMAT: Final = "fedsynth-consortium"
_VERSION: Final = 1
_MAX_BYTES: Final = 64 * 1024 * 1024
_MEMBER_KEYS: Final = frozenset({"name", "node_public_key", "signing_public_key", "added"})


@dataclass(frozen=True)
class CoordinatorPaths:
    """Where a coordinator directory keeps each file."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        """CA certificate (public; every holder pins it)."""
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """CA private key (0600; keep offline once the SuperLink's certificate is issued)."""
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        """The SuperLink's TLS certificate."""
        return self.directory / "superlink.pem"

    @property
    def server_key(self) -> Path:
        """The SuperLink's TLS private key (0600)."""
        return self.directory / "superlink.key"

    @property
    def members(self) -> Path:
        """The consortium's member list."""
        return self.directory / MEMBERS_FILE

    @property
    def roster(self) -> Path:
        """The fedsynth roster exported for holders to pin."""
        return self.directory / ROSTER_FILE

    @property
    def nodes(self) -> Path:
        """One ``NAME.pub`` per member: the files ``flwr supernode register`` reads."""
        return self.directory / "nodes"

    @property
    def node_ids(self) -> Path:
        """Member name -> the node id the SuperLink gave its key (kept across restarts)."""
        return self.nodes / "node-ids.json"

    @property
    def superlink_state(self) -> Path:
        """The SuperLink's SQLite state: registered node keys (and runs) survive a restart."""
        return self.directory / "superlink-state.db"

    @property
    def lock(self) -> Path:
        """Lock file serializing writers of the member list."""
        return self.directory / ".consortium.lock"


@dataclass(frozen=True)
class Member:
    """One data holder the consortium admits.

    Attributes:
        name: Roster name (1-128 of ``[A-Za-z0-9._@-]``).
        node_public_key: Flower node-authentication key, one canonical OpenSSH line (P-384).
        signing_public_key: Raw 32-byte Ed25519 key of the holder's signing identity.
        added: ISO date (YYYY-MM-DD) the operator added it.
    """

    name: str
    node_public_key: str
    signing_public_key: bytes
    added: str

    def __post_init__(self) -> None:
        """Validate every field.

        Raises:
            IdentityError: Naming the field and the value.
        """
        check_holder_name(self.name)
        canonical = parse_node_public_key(
            self.node_public_key, source=f"node public key of {self.name!r}"
        )
        if canonical != self.node_public_key:
            raise IdentityError(
                f"node public key of {self.name!r} is not in canonical form (one OpenSSH line "
                "without comment)"
            )
        Roster({self.name: self.signing_public_key})  # checks the Ed25519 key
        try:
            dt.date.fromisoformat(self.added)
        except (TypeError, ValueError):
            raise IdentityError(
                f"added={self.added!r} of {self.name!r}: must be a date YYYY-MM-DD"
            ) from None

    @property
    def node_fingerprint(self) -> str:
        """Fingerprint of the node key (as ``fedsynth node init`` printed it)."""
        return node_key_fingerprint(self.node_public_key)

    @property
    def signing_fingerprint(self) -> str:
        """Fingerprint of the signing key (as ``fedsynth node init`` printed it)."""
        return signing_key_fingerprint(self.signing_public_key)

    def to_dict(self) -> dict[str, str]:
        """JSON-ready form (signing key in hex)."""
        return {
            "name": self.name,
            "node_public_key": self.node_public_key,
            "signing_public_key": self.signing_public_key.hex(),
            "added": self.added,
        }


@dataclass(frozen=True)
class Consortium:
    """The admitted holders, in the order added; names and both keys distinct."""

    members: tuple[Member, ...] = ()

    def __post_init__(self) -> None:
        """Refuse a repeated name, node key or signing key.

        Raises:
            IdentityError: Naming both members that clash.
        """
        names: set[str] = set()
        node_keys: dict[str, str] = {}
        signing_keys: dict[bytes, str] = {}
        for member in self.members:
            if not isinstance(member, Member):
                raise IdentityError(f"members must be Member objects, got {type(member).__name__}")
            if member.name in names:
                raise IdentityError(f"holder name {member.name!r} is already in the consortium")
            if member.node_public_key in node_keys:
                raise IdentityError(
                    f"node public key of {member.name!r} ({member.node_fingerprint}) is already "
                    f"registered for {node_keys[member.node_public_key]!r}; every holder needs "
                    "its own"
                )
            if member.signing_public_key in signing_keys:
                raise IdentityError(
                    f"signing public key of {member.name!r} ({member.signing_fingerprint}) is "
                    f"already registered for {signing_keys[member.signing_public_key]!r}; every "
                    "holder needs its own"
                )
            names.add(member.name)
            node_keys[member.node_public_key] = member.name
            signing_keys[member.signing_public_key] = member.name

    def __len__(self) -> int:
        return len(self.members)

    def with_member(self, member: Member) -> Consortium:
        """This consortium plus ``member`` (duplicates refused, see :meth:`__post_init__`)."""
        return Consortium((*self.members, member))

    def roster(self) -> Roster:
        """The fedsynth roster (name -> signing key) every holder pins.

        Raises:
            IdentityError: If the consortium has no member yet.
        """
        if not self.members:
            raise IdentityError(
                "the consortium has no member yet; add one with `fedsynth coordinator add-node`"
            )
        return Roster({m.name: m.signing_public_key for m in self.members})

    def to_json(self) -> str:
        """Pretty-printed JSON (operators read it).

        ``{"format", "version", "holders": [{name, node_public_key, signing_public_key, added}]}``
        """
        return json.dumps(
            {
                "format": _FORMAT,
                "version": _VERSION,
                "holders": [m.to_dict() for m in self.members],
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> Consortium:
        """Parse :meth:`to_json` output strictly.

        Raises:
            IdentityError: If the text is not a consortium file, or an entry is malformed or
                repeated (naming the entry and the field).
        """
        holders = holder_entries(text, what="consortium file", form=_FORMAT, version=_VERSION)
        members: list[Member] = []
        for index, entry in enumerate(holders):
            if not isinstance(entry, dict) or set(entry) != _MEMBER_KEYS:
                raise IdentityError(
                    f"consortium holders[{index}] must hold exactly {sorted(_MEMBER_KEYS)}"
                )
            if not all(isinstance(entry[k], str) for k in _MEMBER_KEYS):
                raise IdentityError(f"consortium holders[{index}]: every field must be a string")
            try:
                signing = bytes.fromhex(entry["signing_public_key"])
            except ValueError:
                raise IdentityError(
                    f"consortium holders[{index}].signing_public_key must be hex"
                ) from None
            members.append(
                Member(
                    name=entry["name"],
                    node_public_key=entry["node_public_key"],
                    signing_public_key=signing,
                    added=entry["added"],
                )
            )
        return cls(tuple(members))


# --------------------------------------------------------------------------------------------
# The directory
# --------------------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    """Write public ``text`` to ``path`` atomically (mode 0644)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@contextmanager
def _locked(paths: CoordinatorPaths) -> Iterator[None]:
    """Hold an exclusive lock on the directory's member list."""
    fd = os.open(paths.lock, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def init(
    directory: Path, hosts: Sequence[str] = DEFAULT_HOSTS, *, now: dt.datetime | None = None
) -> CoordinatorPaths:
    """Create a coordinator directory: CA, SuperLink certificate for ``hosts``, no members.

    The directory is created with mode 0700 (it holds the CA key).

    Raises:
        CertificateError: If the directory already holds a CA, a certificate or a member
            list (nothing is overwritten), a host is malformed, or a file cannot be written.
    """
    paths = CoordinatorPaths(Path(directory))
    existing = [
        p
        for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key, paths.members)
        if p.exists()
    ]
    if existing:
        raise CertificateError(
            f"coordinator directory {paths.directory} already holds {existing[0].name}; "
            "refusing to overwrite a consortium (choose a new directory)"
        )
    try:
        paths.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(paths.directory, 0o700)
    except OSError as exc:
        raise CertificateError(
            f"coordinator directory {paths.directory}: cannot create ({exc.strerror})"
        ) from None
    ca_key, ca_cert = generate_ca(now=now)
    server_key, server_cert = issue_server_certificate(ca_key, ca_cert, hosts, now=now)
    write_private_key(paths.ca_key, ca_key)
    write_certificate(paths.ca_cert, ca_cert)
    write_private_key(paths.server_key, server_key)
    write_certificate(paths.server_cert, server_cert)
    with _locked(paths):
        _write_atomic(paths.members, Consortium().to_json() + "\n")
    return paths


def load_consortium(directory: Path) -> Consortium:
    """Read a coordinator directory's member list.

    Raises:
        IdentityError: If the file is missing, too large or malformed (naming the path).
    """
    path = CoordinatorPaths(Path(directory)).members
    try:
        if path.stat().st_size > _MAX_BYTES:
            raise IdentityError(f"consortium file {path} exceeds {_MAX_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(
            f"consortium file {path}: cannot read ({exc}); run `fedsynth coordinator init` first"
        ) from None
    try:
        return Consortium.from_json(text)
    except IdentityError as exc:
        raise IdentityError(f"consortium file {path}: {exc}") from None


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        if Path(path).stat().st_size > 64 * 1024:
            raise IdentityError(f"{what} file {path} is too large for a public key")
        return Path(path).read_bytes()
    except OSError as exc:
        raise IdentityError(f"{what} file {path}: cannot read ({exc.strerror})") from None


def add_node(
    directory: Path,
    name: str,
    node_public_key_file: Path,
    signing_public_key_file: Path,
    *,
    today: dt.date | None = None,
) -> Member:
    """Admit a holder: check both keys, refuse duplicates, write the member list and roster.

    Raises:
        IdentityError: If a key file is unreadable, a key has the wrong type or curve, or the
            name, node key or signing key is already in the consortium. Nothing is written then.
    """
    paths = CoordinatorPaths(Path(directory))
    node_key = parse_node_public_key(
        _read_key_file(node_public_key_file, "node public key"),
        source=f"node public key file {node_public_key_file}",
    )
    signing_key = parse_signing_public_key(
        _read_key_file(signing_public_key_file, "signing public key"),
        source=f"signing public key file {signing_public_key_file}",
    )
    member = Member(
        name=check_holder_name(name),
        node_public_key=node_key,
        signing_public_key=signing_key,
        added=(today or dt.date.today()).isoformat(),
    )
    with _locked(paths):
        consortium = load_consortium(paths.directory).with_member(member)
        _write_atomic(paths.members, consortium.to_json() + "\n")
        _write_atomic(paths.roster, consortium.roster().to_json() + "\n")
    return member


def export_roster(directory: Path, out: Path | None = None) -> Roster:
    """Write the roster holders pin (to ``out``, default ``DIR/roster.json``) and return it.

    Raises:
        IdentityError: If the consortium has no member or cannot be read.
    """
    paths = CoordinatorPaths(Path(directory))
    roster = load_consortium(paths.directory).roster()
    _write_atomic(Path(out) if out is not None else paths.roster, roster.to_json() + "\n")
    return roster


def load_node_ids(directory: Path) -> dict[str, int]:
    """Member name -> node id as saved at the SuperLink's last start ({} if never saved).

    A file that is not a JSON object of integers reads as {} (it only saves re-registering).
    """
    path = CoordinatorPaths(Path(directory)).node_ids
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool)}


def save_node_ids(directory: Path, node_ids: dict[str, int]) -> None:
    """Save member name -> node id (public: node ids are in every release report)."""
    paths = CoordinatorPaths(Path(directory))
    paths.nodes.mkdir(exist_ok=True)
    _write_atomic(paths.node_ids, json.dumps(node_ids, indent=2, sort_keys=True) + "\n")
