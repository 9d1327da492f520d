"""The consortium's PKI: CA, SuperLink certificate, and the checks that run before any process."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedsynth.protocol.errors import CertificateError
from fedsynth.server.pki import (
    check_key_matches,
    check_server_certificate,
    generate_ca,
    issue_server_certificate,
    load_private_key,
    load_server_credentials,
    parse_hosts,
    write_certificate,
    write_private_key,
)

NOW = dt.datetime(2030, 6, 1, tzinfo=dt.UTC)


def write_chain(
    tmp_path: Path,
    *,
    issued: dt.datetime = NOW,
    days: int = 397,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
) -> tuple[Path, Path, Path]:
    ca_key, ca_cert = generate_ca(now=issued)
    key, cert = issue_server_certificate(ca_key, ca_cert, hosts, days=days, now=issued)
    paths = tmp_path / "ca.pem", tmp_path / "superlink.pem", tmp_path / "superlink.key"
    write_certificate(paths[0], ca_cert)
    write_certificate(paths[1], cert)
    write_private_key(paths[2], key)
    return paths


def test_a_fresh_chain_verifies_and_names_the_default_hosts(tmp_path: Path) -> None:
    ca, cert, key = write_chain(tmp_path)
    creds = load_server_credentials(ca, cert, key, hosts=["localhost", "127.0.0.1"], now=NOW)
    sans = creds.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert isinstance(creds.certificate.public_key(), ec.EllipticCurvePublicKey)
    assert creds.certificate.public_key().curve.name == "secp384r1"
    basic = creds.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.value.ca is False


def test_the_ca_is_a_ca_limited_to_end_entities() -> None:
    _, ca_cert = generate_ca(now=NOW)
    basic = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is True and basic.path_length == 0
    assert ca_cert.not_valid_after_utc - ca_cert.not_valid_before_utc == dt.timedelta(days=3650)


def test_private_keys_are_written_owner_only(tmp_path: Path) -> None:
    _, _, key = write_chain(tmp_path)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    os.chmod(key, 0o644)
    with pytest.raises(CertificateError, match=r"superlink.key has mode 0644.*chmod 600"):
        load_private_key(key)


def test_an_expired_server_certificate_is_a_clear_error(tmp_path: Path) -> None:
    ca, cert, key = write_chain(tmp_path, issued=NOW - dt.timedelta(days=40), days=30)
    with pytest.raises(CertificateError, match=r"superlink.pem: server certificate .* expired at"):
        load_server_credentials(ca, cert, key, now=NOW)
    # Within its window the same files load.
    load_server_credentials(ca, cert, key, now=NOW - dt.timedelta(days=20))


def test_a_certificate_not_yet_valid_points_at_the_clock(tmp_path: Path) -> None:
    ca, cert, key = write_chain(tmp_path, issued=NOW + dt.timedelta(days=2))
    with pytest.raises(CertificateError, match=r"not valid before .* check this machine's clock"):
        load_server_credentials(ca, cert, key, now=NOW)


def test_an_expired_ca_is_refused_even_with_a_valid_server_certificate() -> None:
    ca_key, ca_cert = generate_ca(days=10, now=NOW - dt.timedelta(days=11))
    _, cert = issue_server_certificate(ca_key, ca_cert, now=NOW - dt.timedelta(days=11))
    with pytest.raises(CertificateError, match=r"CA certificate .* expired"):
        check_server_certificate(cert, ca_cert, now=NOW)
    # A server certificate never outlives its CA.
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc


def test_a_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    ca, cert, key = write_chain(tmp_path)
    _, other_ca = generate_ca(now=NOW)
    write_certificate(ca, other_ca)  # same subject name, other key
    with pytest.raises(CertificateError, match=r"is not signed by CA"):
        load_server_credentials(ca, cert, key, now=NOW)


def test_a_key_that_does_not_match_its_certificate_is_refused(tmp_path: Path) -> None:
    ca, cert, key = write_chain(tmp_path)
    write_private_key(key, ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(CertificateError, match=r"superlink.key: the private key does not match"):
        load_server_credentials(ca, cert, key, now=NOW)


def test_a_ca_key_that_does_not_match_cannot_issue() -> None:
    _, ca_cert = generate_ca(now=NOW)
    other_key, _ = generate_ca(now=NOW)
    with pytest.raises(CertificateError, match="does not match CA certificate"):
        issue_server_certificate(other_key, ca_cert, now=NOW)
    good_key, good_cert = generate_ca(now=NOW)
    check_key_matches(good_cert, good_key)


def test_a_host_the_certificate_does_not_name_is_refused(tmp_path: Path) -> None:
    ca, cert, key = write_chain(tmp_path, hosts=("coord.example.org", "10.0.0.5"))
    load_server_credentials(ca, cert, key, hosts=["coord.example.org", "10.0.0.5"], now=NOW)
    with pytest.raises(CertificateError, match=r"does not name host='127.0.0.1'"):
        load_server_credentials(ca, cert, key, hosts=["127.0.0.1"], now=NOW)


def test_a_ca_certificate_is_not_accepted_as_the_server_certificate() -> None:
    _, ca_cert = generate_ca(now=NOW)
    with pytest.raises(CertificateError, match="is a CA certificate"):
        check_server_certificate(ca_cert, ca_cert, now=NOW)


@pytest.mark.parametrize("host", ["", " localhost", "*.example.org", "https://x", "a:80"])
def test_malformed_hosts_are_refused(host: str) -> None:
    with pytest.raises(CertificateError, match="host="):
        parse_hosts([host])
    with pytest.raises(CertificateError, match="hosts is empty"):
        parse_hosts([])


def test_ipv6_hosts_are_ip_names() -> None:
    names = parse_hosts(["::1", "node.local"])
    assert names == [x509.IPAddress(ipaddress.ip_address("::1")), x509.DNSName("node.local")]


def test_garbage_files_are_clear_errors(tmp_path: Path) -> None:
    ca, cert, key = write_chain(tmp_path)
    cert.write_text("not a certificate")
    with pytest.raises(CertificateError, match="is not a PEM certificate"):
        load_server_credentials(ca, cert, key, now=NOW)
    with pytest.raises(CertificateError, match="cannot read"):
        load_server_credentials(tmp_path / "missing.pem", cert, key, now=NOW)
