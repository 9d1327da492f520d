"""The holder's two public keys as the operator reads them: node key and signing key.

Reference fingerprints come from OpenSSH's ``ssh-keygen -lf`` and ``sha256sum``, computed once
outside this code and pinned here, so a fingerprint the operator compares over the phone is
the one their own tools print.
"""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fedsynth.protocol.errors import IdentityError
from fedsynth.protocol.node_keys import (
    MAX_KEY_BYTES,
    NODE_KEY_CURVE,
    generate_node_key,
    node_key_fingerprint,
    node_private_openssh,
    node_public_openssh,
    parse_node_public_key,
    parse_signing_public_key,
    signing_key_fingerprint,
    signing_public_pem,
)

P384_LINE = (
    "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABhBLwnGQAYroCPhyqWUB"
    "tUs+UUz3WtAJFLV4+cZznwzVxZJlvAtIESY+AvFc+4NHIV+Q+CbZ7Hw8ZdYsuwUYilIR3zEWqHzbgQz+aNtJ0bahhEs"
    "is9CQuGuXrJrzNC+MhRSw=="
)
P384_SSH_KEYGEN = "SHA256:kAfxiaLpCapDCupIVahPhvE16Ehoylmu97XUBUJ6h7U"
"""``ssh-keygen -lf`` of P384_LINE."""
P256_LINE = (
    "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBKlOeD8G0VIGMCrJ7aE/"
    "R9tck+q3RVGZdA7dsPk1bhj6Sqa2lgx30c0EV8uJsudUJAc8oWFyknC1UkzYcH6D3po="
)
ED25519_LINE = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF2fFjPuz7zu9idBOnvhZDqopKEMA17ac8KgVfFKPOOM"
SIGNING_RAW = bytes.fromhex("03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8")
"""The Ed25519 public key of the private key bytes 0, 1, ..., 31."""
SIGNING_PEM = (
    "-----BEGIN PUBLIC KEY-----\n"
    "MCowBQYDK2VwAyEAA6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=\n"
    "-----END PUBLIC KEY-----\n"
)
SIGNING_SHA256SUM = "56475aa75463474c0285df5dbf2bcab73da651358839e9b77481b2eab107708c"
"""``sha256sum`` of SIGNING_RAW."""


def test_a_fresh_node_key_is_p384_and_round_trips_through_openssh() -> None:
    key = generate_node_key()
    assert key.curve.name == NODE_KEY_CURVE == "secp384r1"
    assert generate_node_key().private_numbers() != key.private_numbers()
    private = node_private_openssh(key)
    assert private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    loaded = serialization.load_ssh_private_key(private, password=None)  # unencrypted
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.private_numbers() == key.private_numbers()
    line = node_public_openssh(key.public_key())
    assert line.startswith("ecdsa-sha2-nistp384 AAAA") and len(line.split()) == 2
    assert parse_node_public_key(line) == line


def test_the_node_fingerprint_is_what_ssh_keygen_prints() -> None:
    assert node_key_fingerprint(P384_LINE) == P384_SSH_KEYGEN
    assert node_key_fingerprint(P384_LINE + " alice@hospital") == P384_SSH_KEYGEN


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("ecdsa-sha2-nistp384", "^node public key is not an OpenSSH line 'TYPE BASE64'$"),
        ("", "^node public key is not an OpenSSH line 'TYPE BASE64'$"),
        ("ecdsa-sha2-nistp384 AAAA*E2V", "^node public key's base64 part does not decode$"),
        # Decodable once the stray character is dropped: still refused, never fingerprinted.
        ("ecdsa-sha2-nistp384 AAAA*AAAA", "^node public key's base64 part does not decode$"),
    ],
)
def test_a_fingerprint_of_a_broken_line_is_refused(line: str, match: str) -> None:
    with pytest.raises(IdentityError, match=match):
        node_key_fingerprint(line)


def test_a_node_key_is_read_canonically_from_text_or_bytes() -> None:
    for given in (P384_LINE, f"  {P384_LINE} comment\n", f"{P384_LINE}\r\n".encode()):
        assert parse_node_public_key(given) == P384_LINE


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (P256_LINE, "alice's key is on curve secp256r1; node authentication needs secp384r1"),
        (ED25519_LINE, "alice's key is a .*Ed25519PublicKey; node authentication needs an EC key"),
        ("ssh-rsa", "alice's key is not an OpenSSH public key .*'ecdsa-sha2-nistp384 AAAA"),
        ("ecdsa-sha2-nistp384 not-base64", "alice's key is not an OpenSSH public key"),
        (SIGNING_PEM, "alice's key is not an OpenSSH public key .*node.pub"),
        ("ecdsa-sha2-nistp384 AAAA\u00e9", "alice's key is not an OpenSSH public key"),
    ],
)
def test_a_node_key_of_the_wrong_kind_is_refused_by_name(text: str, match: str) -> None:
    with pytest.raises(IdentityError, match=match):
        parse_node_public_key(text, source="alice's key")


def test_an_rsa_node_key_is_refused() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    with pytest.raises(IdentityError, match=r"^node public key is a \w*RSA\w*;"):
        parse_node_public_key(line)


def test_the_key_size_limit_is_inclusive() -> None:
    padded = P384_LINE + " " * (MAX_KEY_BYTES - len(P384_LINE))
    assert len(padded) == MAX_KEY_BYTES
    assert parse_node_public_key(padded) == P384_LINE
    with pytest.raises(IdentityError, match=f"^node public key: {MAX_KEY_BYTES + 1} bytes, more"):
        parse_node_public_key(padded + " ")
    pem = SIGNING_PEM + " " * (MAX_KEY_BYTES - len(SIGNING_PEM))
    assert parse_signing_public_key(pem) == SIGNING_RAW
    with pytest.raises(IdentityError, match=f"^bob: {MAX_KEY_BYTES + 1} bytes, more than"):
        parse_signing_public_key(pem + " ", source="bob")


def test_the_signing_key_round_trips_through_pem() -> None:
    assert signing_public_pem(SIGNING_RAW) == SIGNING_PEM
    assert parse_signing_public_key(SIGNING_PEM) == SIGNING_RAW
    assert parse_signing_public_key(SIGNING_PEM.encode()) == SIGNING_RAW
    fresh = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    assert parse_signing_public_key(signing_public_pem(fresh)) == fresh


def test_the_signing_fingerprint_is_the_sha256_of_the_raw_key() -> None:
    assert signing_key_fingerprint(SIGNING_RAW) == "SHA256:" + SIGNING_SHA256SUM
    assert hashlib.sha256(SIGNING_RAW).hexdigest() == SIGNING_SHA256SUM


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            P384_LINE,
            r"^bob is not a PEM public key \(expected '-----BEGIN PUBLIC KEY-----', as "
            r"`fedsynth node init` writes to signing\.pub\)$",
        ),
        ("", "^bob is not a PEM public key"),
        (SIGNING_PEM.replace("MCow", "MC\u00e9w"), "^bob is not a PEM public key"),
    ],
)
def test_a_signing_key_that_is_not_pem_is_refused(text: str, match: str) -> None:
    with pytest.raises(IdentityError, match=match):
        parse_signing_public_key(text, source="bob")


def test_a_signing_key_that_is_not_ed25519_is_refused() -> None:
    pem = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    name = type(serialization.load_pem_public_key(pem)).__name__
    with pytest.raises(IdentityError) as refused:
        parse_signing_public_key(pem)
    assert str(refused.value) == f"signing public key is a {name}; signing keys are Ed25519"
