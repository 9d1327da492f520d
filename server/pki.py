"""The consortium's small PKI: one CA, the SuperLink's TLS certificate, and checks before start.

The coordinator's operator creates a CA (EC P-384 key, self-signed certificate) and signs the
SuperLink's server certificate with it; every holder pins the CA certificate (``--ca``), so a
holder's SuperNode talks only to the SuperLink the consortium agreed on. TLS keeps the holders'
masked contributions and node-authentication messages away from the network; it does not make
the coordinator trusted (the secure sum and each holder's own noise do that).

Building keys and certificates is pure (:func:`generate_ca`, :func:`issue_server_certificate`,
:func:`check_server_certificate`); reading and writing files is at the bottom. Private keys are
written unencrypted in PKCS#8 PEM with mode 0600 and refused on load when group or others may
read them. Every check raises :class:`~fedsynth.protocol.errors.CertificateError` naming the
file or certificate, the value found and what was expected, before any process starts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsynth.protocol.deployment import (
    MAX_PEM_BYTES,
    check_validity,
    load_certificate,
    utcnow,
)
from fedsynth.protocol.deployment import (
    describe_certificate as _describe,
)
from fedsynth.protocol.errors import CertificateError

__all__ = [
    "CA_VALIDITY_DAYS",
    "DEFAULT_HOSTS",
    "SERVER_VALIDITY_DAYS",
    "ServerCredentials",
    "check_key_matches",
    "check_server_certificate",
    "check_validity",
    "generate_ca",
    "issue_server_certificate",
    "load_certificate",
    "load_private_key",
    "load_server_credentials",
    "parse_hosts",
    "write_certificate",
    "write_private_key",
]

CA_VALIDITY_DAYS: Final = 3650
"""A CA outlives many server certificates; ten years, then the consortium re-keys."""

SERVER_VALIDITY_DAYS: Final = 397
"""Server certificates: at most 397 days, the limit browsers and most TLS stacks enforce."""

DEFAULT_HOSTS: Final = ("localhost", "127.0.0.1")
"""Subject alternative names of a SuperLink certificate when the operator names none."""

CURVE: Final = ec.SECP384R1()
"""Curve of the CA and server keys (NIST P-384)."""

_BACKDATE: Final = dt.timedelta(minutes=5)  # tolerate a little clock skew between machines


def _check_days(days: int, field: str) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise CertificateError(f"{field}={days!r}: must be an int >= 1")
    return days


def parse_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Subject alternative names for ``hosts``: IP addresses as IPs, everything else as DNS.

    Raises:
        CertificateError: If ``hosts`` is empty, or a name is empty, has spaces or a scheme,
            or is a wildcard.
    """
    if not hosts:
        raise CertificateError("hosts is empty: a server certificate needs at least one name")
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in hosts:
        if not isinstance(host, str) or not host or host != host.strip():
            raise CertificateError(f"host={host!r}: must be a non-empty name without spaces")
        if host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if "*" in host or "/" in host or ":" in host or " " in host:
            raise CertificateError(
                f"host={host!r}: must be a DNS name or an IP address (no wildcard, port or scheme)"
            )
        names.append(x509.DNSName(host))
    return names


def generate_ca(
    *,
    common_name: str = "fedsynth consortium CA",
    days: int = CA_VALIDITY_DAYS,
    now: dt.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh CA: P-384 key and self-signed certificate (CA:TRUE, path length 0).

    Path length 0: the CA signs end-entity certificates only, never another CA.
    """
    start = utcnow(now) - _BACKDATE
    key = ec.generate_private_key(CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=_check_days(days, "days")))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def issue_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    days: int = SERVER_VALIDITY_DAYS,
    now: dt.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh P-384 server key and its certificate, signed by the CA, naming ``hosts``.

    The first host is the subject's common name; all are subject alternative names (TLS
    clients check the SANs). The certificate never outlives the CA.

    Raises:
        CertificateError: If ``ca_key`` does not match ``ca_cert``, or a host is malformed.
    """
    check_key_matches(ca_cert, ca_key, what="CA certificate")
    sans = parse_hosts(hosts)
    start = utcnow(now) - _BACKDATE
    end = min(start + dt.timedelta(days=_check_days(days, "days")), ca_cert.not_valid_after_utc)
    key = ec.generate_private_key(CURVE)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def check_key_matches(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, *, what: str | None = None
) -> None:
    """Refuse a private key whose public key is not the one ``cert`` certifies.

    Raises:
        CertificateError: Naming the certificate.
    """
    pem = serialization.Encoding.PEM
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(pem, spki) != cert.public_key().public_bytes(pem, spki):
        raise CertificateError(
            f"the private key does not match {what or _describe(cert)}: they are not one pair"
        )


def check_server_certificate(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    *,
    now: dt.datetime | None = None,
    hosts: Sequence[str] = (),
) -> None:
    """Refuse a server certificate that TLS clients pinning ``ca_cert`` would refuse.

    Checks the CA's and the certificate's validity windows, that the CA issued and signed it,
    that it is not itself a CA, and that it names every host in ``hosts``.

    Raises:
        CertificateError: Naming the certificate and what is wrong.
    """
    check_validity(ca_cert, now=now, what=f"CA {_describe(ca_cert)}")
    check_validity(cert, now=now, what=f"server {_describe(cert)}")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(
            f"server {_describe(cert)} is not signed by CA {_describe(ca_cert)}; TLS clients "
            "that pin this CA would refuse the SuperLink"
        ) from None
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = basic.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca:
        raise CertificateError(f"server {_describe(cert)} is a CA certificate, not a server one")
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateError(
            f"server {_describe(cert)} has no subject alternative names; TLS clients check them"
        ) from None
    listed = {str(n) for n in names.get_values_for_type(x509.DNSName)}
    listed |= {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    for host in hosts:
        wanted = str(ipaddress.ip_address(host)) if _is_ip(host) else host
        if wanted not in listed:
            raise CertificateError(
                f"server {_describe(cert)} does not name host={host!r} (it names "
                f"{sorted(listed)}); re-issue it with that host"
            )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically with file mode ``mode`` from the first byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, mode 0600, atomically.

    Raises:
        CertificateError: If the file cannot be written (naming the path).
    """
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        _write_atomic(Path(path), pem, 0o600)
    except OSError as exc:
        raise CertificateError(f"key file {path}: cannot write ({exc.strerror})") from None


def write_certificate(path: Path, cert: x509.Certificate) -> None:
    """Write ``cert`` as PEM, mode 0644 (public), atomically.

    Raises:
        CertificateError: If the file cannot be written (naming the path).
    """
    try:
        _write_atomic(Path(path), cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as exc:
        raise CertificateError(f"certificate file {path}: cannot write ({exc.strerror})") from None


def _read_key(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_PEM_BYTES:
            raise CertificateError(f"key file {path} exceeds {MAX_PEM_BYTES} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"key file {path}: cannot read ({exc.strerror})") from None


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read an unencrypted PEM EC private key readable by its owner only.

    Raises:
        CertificateError: If the file is missing, readable by group or others, not a PEM
            key, or not an EC key.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise CertificateError(f"key file {path}: cannot read ({exc.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CertificateError(
            f"key file {path} has mode {stat.S_IMODE(mode):04o}; a private key must be readable "
            "by its owner only (chmod 600)"
        )
    data = _read_key(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise CertificateError(f"key file {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(
            f"key file {path} holds a {type(key).__name__}, expected an EC private key"
        )
    return key


@dataclass(frozen=True)
class ServerCredentials:
    """The SuperLink's TLS files, checked: the CA, the server certificate and its key.

    Attributes:
        ca_path: The CA certificate every holder pins.
        cert_path: The SuperLink's certificate, signed by the CA.
        key_path: The SuperLink's private key (mode 0600).
        certificate: The parsed server certificate.
    """

    ca_path: Path
    cert_path: Path
    key_path: Path
    certificate: x509.Certificate = field(repr=False)


def load_server_credentials(
    ca_path: Path,
    cert_path: Path,
    key_path: Path,
    *,
    hosts: Sequence[str] = (),
    now: dt.datetime | None = None,
) -> ServerCredentials:
    """Read and check the SuperLink's TLS files before any process starts.

    Raises:
        CertificateError: If a file is unreadable, a certificate expired or is not yet valid,
            the server certificate is not signed by the CA or does not name ``hosts``, or the
            key does not match the certificate. The message names the file.
    """
    ca_cert = load_certificate(ca_path)
    cert = load_certificate(cert_path)
    key = load_private_key(key_path)
    try:
        check_server_certificate(cert, ca_cert, now=now, hosts=hosts)
    except CertificateError as exc:
        raise CertificateError(f"{cert_path}: {exc}") from None
    try:
        check_key_matches(cert, key, what=f"certificate {cert_path}")
    except CertificateError as exc:
        raise CertificateError(f"{key_path}: {exc}") from None
    return ServerCredentials(
        ca_path=Path(ca_path), cert_path=Path(cert_path), key_path=Path(key_path), certificate=cert
    )
