"""Development PKI and TLS file checks."""

from __future__ import annotations

import datetime
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from stella_agent.certs import (
    certificate_identity,
    create_ca,
    init_dev_pki,
    issue_certificate,
    read_tls_files,
)
from stella_agent.errors import CertificateError


def test_init_creates_keys_with_private_mode(tmp_path):
    files = init_dev_pki(tmp_path, "host-1")

    for key in (
        files.orchestrator_key,
        files.agent_key,
        files.operator_key,
        tmp_path / "ca.key",
    ):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert certificate_identity(files.agent_cert.read_bytes()) == "host-1"


def test_orchestrator_certificate_names_localhost_and_loopback(tmp_path):
    files = init_dev_pki(tmp_path, "host-1")
    cert = x509.load_pem_x509_certificate(files.orchestrator_cert.read_bytes())

    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1"
    ]


def test_init_again_reuses_ca_and_adds_agent(tmp_path):
    first = init_dev_pki(tmp_path, "host-1")
    ca_before = first.ca_cert.read_bytes()

    second = init_dev_pki(tmp_path, "host-2")

    assert second.ca_cert.read_bytes() == ca_before
    assert certificate_identity(second.agent_cert.read_bytes()) == "host-2"
    assert first.agent_cert.exists()


def _write_pair(tmp_path, cert, key, name):
    cert_path = tmp_path / f"{name}.crt"
    key_path = tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def test_expired_certificate_is_reported(tmp_path):
    files = init_dev_pki(tmp_path, "host-1")
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(
        (tmp_path / "ca.key").read_bytes(), None
    )
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    cert, key = issue_certificate(ca_cert, ca_key, "host-1", days=2, not_before=past)
    cert_path, key_path = _write_pair(tmp_path, cert, key, "old")

    with pytest.raises(CertificateError, match="expired on"):
        read_tls_files(str(files.ca_cert), cert_path, key_path)


def test_key_of_another_certificate_is_reported(tmp_path):
    files = init_dev_pki(tmp_path, "host-1")

    with pytest.raises(CertificateError, match="does not belong to certificate"):
        read_tls_files(
            str(files.ca_cert), str(files.agent_cert), str(files.operator_key)
        )


def test_missing_file_names_the_key(tmp_path):
    files = init_dev_pki(tmp_path, "host-1")

    with pytest.raises(CertificateError, match="tls.ca_file"):
        read_tls_files(
            str(tmp_path / "absent.crt"), str(files.agent_cert), str(files.agent_key)
        )


def test_ca_from_other_pki_still_loads(tmp_path):
    other_ca, _ = create_ca()
    (tmp_path / "other.crt").write_bytes(
        other_ca.public_bytes(serialization.Encoding.PEM)
    )
    files = init_dev_pki(tmp_path / "pki", "host-1")

    tls = read_tls_files(
        str(tmp_path / "other.crt"), str(files.agent_cert), str(files.agent_key)
    )

    assert tls.ca.startswith(b"-----BEGIN CERTIFICATE-----")
