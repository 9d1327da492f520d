"""A data holder's node directory: its two key pairs, the roster it pins, its budget store.

``init`` creates, in a directory only the holder can read (mode 0700)::

    node.key / node.pub         Flower node-authentication key pair (EC P-384, OpenSSH format)
    signing.key / signing.pub   fedsynth signing identity (Ed25519; PKCS#8 PEM / PEM)

and the holder later adds ``roster.json`` (from the operator; compare its digest with the
other holders). ``budget.sqlite`` appears at the first task. ``trusted-app.toml`` (optional)
pins the app bundles the node runs (see :mod:`fedsynth.client.app_pin`); ``superexec.secret``
(0600, created at the first start) lets only the node's own runtime take its tasks. The holder
sends the two ``.pub`` files to the operator and reads both fingerprints to the operator over a
second channel, so a key swapped in transit is noticed. Private keys are mode 0600 and never
leave the directory.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fedsynth.protocol.errors import IdentityError
from fedsynth.protocol.identity import ROSTER_FILE, HolderIdentity
from fedsynth.protocol.node_keys import (
    generate_node_key,
    node_key_fingerprint,
    node_private_openssh,
    node_public_openssh,
    parse_node_public_key,
    parse_signing_public_key,
    signing_key_fingerprint,
    signing_public_pem,
)

__all__ = ["NodePaths", "NodePublicKeys", "ensure_superexec_secret", "init", "public_keys"]

BUDGET_FILE: Final = "budget.sqlite"
TRUSTED_APP_FILE: Final = "trusted-app.toml"
SUPEREXEC_SECRET_FILE: Final = "superexec.secret"
_UNNAMED: Final = "unnamed"  # the roster gives the name; the key file holds no name


@dataclass(frozen=True)
class NodePaths:
    """Where a node directory keeps each file."""

    directory: Path

    @property
    def node_key(self) -> Path:
        """Node-authentication private key (OpenSSH, 0600): ``--auth-supernode-private-key``."""
        return self.directory / "node.key"

    @property
    def node_pub(self) -> Path:
        """Node-authentication public key (send to the operator)."""
        return self.directory / "node.pub"

    @property
    def signing_key(self) -> Path:
        """Signing identity private key (PKCS#8 PEM, 0600): node config ``identity-path``."""
        return self.directory / "signing.key"

    @property
    def signing_pub(self) -> Path:
        """Signing public key (send to the operator)."""
        return self.directory / "signing.pub"

    @property
    def roster(self) -> Path:
        """The consortium roster this holder pins: node config ``roster-path``."""
        return self.directory / ROSTER_FILE

    @property
    def budget(self) -> Path:
        """The holder's SQLite budget store (default ``budget-path``)."""
        return self.directory / BUDGET_FILE

    @property
    def trusted_app(self) -> Path:
        """The app bundles this node runs (SHA-256 pins; default: the installed fedsynth's)."""
        return self.directory / TRUSTED_APP_FILE

    @property
    def superexec_secret(self) -> Path:
        """Secret (0600) shared by the SuperNode and the node's runtime for task hand-over."""
        return self.directory / SUPEREXEC_SECRET_FILE

    def key_files(self) -> tuple[Path, ...]:
        """Every key file ``init`` writes."""
        return (self.node_key, self.node_pub, self.signing_key, self.signing_pub)


@dataclass(frozen=True)
class NodePublicKeys:
    """What a holder sends its operator (public keys) and reads out to it (fingerprints).

    Attributes:
        node_public_key: OpenSSH line of the node-authentication key.
        node_fingerprint: ``SHA256:<base64>`` of it (as ``ssh-keygen -l`` prints).
        signing_public_key: Raw 32-byte Ed25519 key of the signing identity.
        signing_fingerprint: ``SHA256:<hex>`` of it.
        paths: The node directory's files.
    """

    node_public_key: str
    node_fingerprint: str
    signing_public_key: bytes
    signing_fingerprint: str
    paths: NodePaths


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode``; refuse if it exists (O_EXCL: no race, no overwrite)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def init(directory: Path) -> NodePublicKeys:
    """Create a node directory with fresh keys and return the public keys to send.

    Raises:
        IdentityError: If any key file already exists (nothing is overwritten: a holder's
            registered keys are irreplaceable), the directory is readable by group or others,
            or a file cannot be written.
    """
    paths = NodePaths(Path(directory))
    existing = [p for p in paths.key_files() if p.exists() or p.is_symlink()]
    if existing:
        raise IdentityError(
            f"node directory {paths.directory} already holds {existing[0].name}; refusing to "
            "overwrite its keys (the operator has registered them)"
        )
    try:
        created = not paths.directory.exists()
        paths.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if created:
            os.chmod(paths.directory, 0o700)
        mode = stat.S_IMODE(paths.directory.stat().st_mode)
    except OSError as exc:
        raise IdentityError(
            f"node directory {paths.directory}: cannot create ({exc.strerror})"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"node directory {paths.directory} has mode {mode:04o}; it will hold private keys, "
            "so only its owner may use it (chmod 700)"
        )
    node_key = generate_node_key()
    node_pub = node_public_openssh(node_key.public_key())
    identity = HolderIdentity.generate(_UNNAMED)
    try:
        _write_new(paths.node_key, node_private_openssh(node_key), 0o600)
        _write_new(paths.node_pub, (node_pub + "\n").encode("ascii"), 0o644)
        _write_new(
            paths.signing_pub, signing_public_pem(identity.public_key).encode("ascii"), 0o644
        )
    except OSError as exc:
        raise IdentityError(
            f"node directory {paths.directory}: cannot write {exc.filename} ({exc.strerror})"
        ) from None
    identity.save(paths.signing_key)
    return public_keys(paths.directory)


def public_keys(directory: Path) -> NodePublicKeys:
    """Read a node directory's public keys and fingerprints (to print them again).

    Raises:
        IdentityError: If a public key file is missing or malformed.
    """
    paths = NodePaths(Path(directory))
    try:
        node_text = paths.node_pub.read_bytes()
        signing_text = paths.signing_pub.read_bytes()
    except OSError as exc:
        raise IdentityError(
            f"node directory {paths.directory}: cannot read {exc.filename} ({exc.strerror}); "
            "run `fedsynth node init` first"
        ) from None
    node_pub = parse_node_public_key(node_text, source=str(paths.node_pub))
    signing = parse_signing_public_key(signing_text, source=str(paths.signing_pub))
    return NodePublicKeys(
        node_public_key=node_pub,
        node_fingerprint=node_key_fingerprint(node_pub),
        signing_public_key=signing,
        signing_fingerprint=signing_key_fingerprint(signing),
        paths=paths,
    )


def check_private_files(directory: Path) -> NodePaths:
    """Refuse to start a node whose private keys others may read, or that lacks a file.

    Raises:
        IdentityError: Naming the file and its mode, or the missing file.
    """
    paths = NodePaths(Path(directory))
    for path in (paths.node_key, paths.signing_key, paths.roster):
        if not path.is_file():
            hint = (
                "copy the roster.json the operator sent you here (compare its digest with the "
                "other holders first)"
                if path == paths.roster
                else "run `fedsynth node init` first"
            )
            raise IdentityError(f"{path} is missing; {hint}")
    for path in (paths.node_key, paths.signing_key):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"key file {path} has mode {mode:04o}; a private key must be readable by its "
                "owner only (chmod 600)"
            )
    return paths


def ensure_superexec_secret(paths: NodePaths) -> Path:
    """Create the SuperExec secret (32 random bytes, mode 0600) if missing; return its path.

    The SuperNode hands a task, and its token, only to a runtime that proves it knows this
    secret, so another local process cannot take a task and run the bundle itself.

    Raises:
        IdentityError: The file exists with a mode others can read, or cannot be written.
    """
    path = paths.superexec_secret
    if not path.exists():
        try:
            _write_new(path, secrets.token_hex(32).encode("ascii"), 0o600)
        except FileExistsError:
            pass  # a concurrent start wrote it first
        except OSError as exc:
            raise IdentityError(f"{path}: cannot write ({exc.strerror})") from None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"secret file {path} has mode {mode:04o}; it must be readable by its owner only "
            "(chmod 600)"
        )
    return path
