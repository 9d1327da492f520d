"""The two public keys a data holder sends its operator, and how both sides read them.

A holder has two key pairs with two jobs:

* the **node key** (EC P-384, OpenSSH format, as Flower's node authentication wants): the
  SuperLink admits only SuperNodes whose node key the operator registered, so an outsider
  cannot join the federation and pose as a holder;
* the **signing key** (Ed25519, :class:`fedsynth.protocol.identity.HolderIdentity`): every
  holder signs its secure-sum round keys with it and checks its peers' signatures against the
  pinned roster, so the coordinator cannot substitute keys or invent holders.

Both public keys travel out of band (e-mail, a ticket); each side compares the fingerprints
printed here over a second channel (a call). Pure functions only; no files.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedsynth.protocol.errors import IdentityError

__all__ = [
    "NODE_KEY_CURVE",
    "generate_node_key",
    "node_key_fingerprint",
    "node_private_openssh",
    "node_public_openssh",
    "parse_node_public_key",
    "parse_signing_public_key",
    "signing_key_fingerprint",
    "signing_public_pem",
]

NODE_KEY_CURVE: Final = "secp384r1"
"""Curve of node-authentication keys (NIST P-384; Flower accepts NIST curves only)."""

MAX_KEY_BYTES: Final = 16 * 1024
"""Largest public key text read."""


def generate_node_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-384 node-authentication key from the operating system's secure randomness."""
    return ec.generate_private_key(ec.SECP384R1())


def node_private_openssh(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private node key in OpenSSH format, unencrypted (what ``flower-supernode`` reads)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def node_public_openssh(key: ec.EllipticCurvePublicKey) -> str:
    """The public node key as one OpenSSH line (``ecdsa-sha2-nistp384 AAAA...``)."""
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode("ascii")


def parse_node_public_key(text: str | bytes, *, source: str = "node public key") -> str:
    """Check a node public key and return it as one canonical OpenSSH line (no comment).

    Raises:
        IdentityError: If it is not an OpenSSH public key, not EC, or not on P-384 (the
            message names ``source`` and what was found).
    """
    data = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
    if len(data) > MAX_KEY_BYTES:
        raise IdentityError(f"{source}: {len(data)} bytes, more than {MAX_KEY_BYTES}")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise IdentityError(
            f"{source} is not an OpenSSH public key (expected one line 'ecdsa-sha2-nistp384 "
            "AAAA...', as `fedsynth node init` writes to node.pub)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise IdentityError(
            f"{source} is a {type(key).__name__}; node authentication needs an EC key on "
            f"{NODE_KEY_CURVE}"
        )
    if key.curve.name != NODE_KEY_CURVE:
        raise IdentityError(
            f"{source} is on curve {key.curve.name}; node authentication needs {NODE_KEY_CURVE}"
        )
    return node_public_openssh(key)


def node_key_fingerprint(openssh_line: str) -> str:
    """``SHA256:<base64>`` of the key blob, the form ``ssh-keygen -lf node.pub`` prints."""
    parts = openssh_line.split()
    if len(parts) < 2:
        raise IdentityError("node public key is not an OpenSSH line 'TYPE BASE64'")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise IdentityError("node public key's base64 part does not decode") from None
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    return f"SHA256:{digest}"


def signing_public_pem(public_key: bytes) -> str:
    """A raw 32-byte Ed25519 public key as PEM (SubjectPublicKeyInfo)."""
    key = Ed25519PublicKey.from_public_bytes(public_key)
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def parse_signing_public_key(text: str | bytes, *, source: str = "signing public key") -> bytes:
    """Check an Ed25519 signing public key (PEM) and return its raw 32 bytes.

    Raises:
        IdentityError: If it is not a PEM public key or not Ed25519 (naming ``source``).
    """
    data = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
    if len(data) > MAX_KEY_BYTES:
        raise IdentityError(f"{source}: {len(data)} bytes, more than {MAX_KEY_BYTES}")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise IdentityError(
            f"{source} is not a PEM public key (expected '-----BEGIN PUBLIC KEY-----', as "
            "`fedsynth node init` writes to signing.pub)"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityError(f"{source} is a {type(key).__name__}; signing keys are Ed25519")
    return key.public_bytes_raw()


def signing_key_fingerprint(public_key: bytes) -> str:
    """``SHA256:<hex>`` of the raw Ed25519 public key (compare it with the roster's entry)."""
    return "SHA256:" + hashlib.sha256(public_key).hexdigest()
