"""Shared pieces of the Synthesis service tests: certificates, release files, tokens, servers."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import releases
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedsynth.protocol.models import LoadedModel
from fedsynth.protocol.wire import synthesis_pb2 as pb
from fedsynth.server.release import Release, save_release

TOKEN = "consumer-token-0123456789abcdef"
OTHER_TOKEN = "second-consumer-token-fedcba9876543210"
SERVICE = "/fedsynth.synthesis.v1.Synthesis/"


def make_test_release(
    loaded: LoadedModel, *, release_id: str = "release-1", mode: str = "distributed"
) -> Release:
    """A three-label release made the way the coordinator makes one (no refusals reported)."""
    return releases.make_test_release(loaded, release_id=release_id, mode=mode, refusals={})


def tamper(path: Path) -> None:
    """Flip one byte of the tensor data at the end of a safetensors file (metadata intact)."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def write_token_file(path: Path, *tokens: str, mode: int = 0o600) -> Path:
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    os.chmod(path, mode)
    return path


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path
    expired_cert: Path
    wrong_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _ca(now: dt.datetime, common: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(_name("synthesis"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, and some bad material."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key, ca_cert = _ca(now, "fedsynth test CA")
    _, other_ca = _ca(now, "someone else's CA")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _server_cert(
        ca_key,
        ca_cert,
        key,
        not_before=now - dt.timedelta(hours=1),
        not_after=now + dt.timedelta(days=7),
    )
    expired = _server_cert(
        ca_key,
        ca_cert,
        key,
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    paths = Pki(
        ca=directory / "ca.pem",
        cert=directory / "server.pem",
        key=directory / "server.key",
        other_ca=directory / "other-ca.pem",
        expired_cert=directory / "expired.pem",
        wrong_key=directory / "wrong.key",
    )
    paths.ca.write_bytes(_pem(ca_cert))
    paths.cert.write_bytes(_pem(cert))
    paths.key.write_bytes(_key_pem(key))
    os.chmod(paths.key, 0o600)
    paths.other_ca.write_bytes(_pem(other_ca))
    paths.expired_cert.write_bytes(_pem(expired))
    paths.wrong_key.write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1())))
    os.chmod(paths.wrong_key, 0o600)
    return paths


def save_store(directory: Path, loaded: LoadedModel) -> Path:
    """A release store with one valid release and one whose file was altered after writing."""
    directory.mkdir(parents=True, exist_ok=True)
    save_release(make_test_release(loaded), directory / "release-1.safetensors")
    tampered = save_release(
        make_test_release(loaded, release_id="release-2"), directory / "release-2.safetensors"
    )
    tamper(tampered)
    return directory


def raw_call(channel: grpc.Channel, method: str, payload: bytes, *, token: str = TOKEN) -> object:
    """Send raw bytes as the request of ``method``; return the response bytes (or the stream)."""
    metadata = (("authorization", f"Bearer {token}"),)
    if method == "Generate":
        stream = channel.unary_stream(SERVICE + method)
        return list(stream(payload, metadata=metadata, timeout=30))
    call = channel.unary_unary(SERVICE + method)
    return call(payload, metadata=metadata, timeout=30)


def secure_channel(address: str, ca: Path) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    return grpc.secure_channel(address, credentials)


def release_ids(response: pb.ListReleasesResponse) -> list[str]:
    return [r.release_id for r in response.releases]
