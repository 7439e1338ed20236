"""`stella-agent check` against real TLS listeners on loopback."""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from stella_agent.certs import init_dev_pki, issue_certificate
from stella_agent.checks import (
    EXPIRY_WARNING_DAYS,
    CheckResult,
    check_validity,
    format_results,
    run_checks,
)
from stella_agent.config import config_from_mapping

AGENT = "host-1"
HTTP2_SETTINGS_FRAME = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


class TlsListener:
    """A TLS server on 127.0.0.1 that requires client certificates and
    replies to the HTTP/2 preface with `reply`."""

    def __init__(self, cert: Path, key: Path, client_ca: Path, reply: bytes) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.context.load_verify_locations(cafile=client_ca)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.set_alpn_protocols(["h2"])
        self.reply = reply
        self.sock = socket.create_server(("127.0.0.1", 0))
        # accept() wakes up regularly to see whether close() was called.
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.sock.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(5)
                try:
                    with self.context.wrap_socket(connection, server_side=True) as tls:
                        tls.recv(33)
                        tls.sendall(self.reply)
                except (ssl.SSLError, OSError):
                    pass

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def pki(tmp_path):
    return init_dev_pki(tmp_path / "pki", AGENT)


@pytest.fixture
def other_pki(tmp_path):
    return init_dev_pki(tmp_path / "other-pki", AGENT)


@pytest.fixture
def listeners():
    started: list[TlsListener] = []

    def start(cert, key, client_ca, reply=HTTP2_SETTINGS_FRAME) -> int:
        listener = TlsListener(cert, key, client_ca, reply)
        started.append(listener)
        return listener.port

    yield start
    for listener in started:
        listener.close()


def _config(pki, port, **overrides):
    tls = {
        "ca_file": str(pki.ca_cert),
        "cert_file": str(pki.agent_cert),
        "key_file": str(pki.agent_key),
    }
    tls.update(overrides.pop("tls", {}))
    orchestrator = {
        "address": f"127.0.0.1:{port}",
        "connect_timeout_seconds": 5,
        **overrides.pop("orchestrator", {}),
    }
    return config_from_mapping(
        {
            "agent_id": overrides.pop("agent_id", AGENT),
            "tls": tls,
            "orchestrator": orchestrator,
        }
    )


def _result(results: list[CheckResult], name: str) -> CheckResult:
    matches = [result for result in results if result.name == name]
    assert len(matches) == 1, [r.name for r in results]
    return matches[0]


def _issue_files(directory: Path, stem: str, ca_dir: Path, common_name: str, **kwargs):
    """Issue a certificate from the CA in `ca_dir` and write it with its key."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key(
        (ca_dir / "ca.key").read_bytes(), password=None
    )
    cert, key = issue_certificate(ca_cert, ca_key, common_name, **kwargs)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def test_healthy_setup_passes_every_check(pki, listeners):
    port = listeners(pki.orchestrator_cert, pki.orchestrator_key, pki.ca_cert)

    results = run_checks(_config(pki, port))

    assert [r.status for r in results] == ["ok"] * len(results)
    assert [r.name for r in results] == [
        "tls.ca_file",
        "tls.cert_file",
        "tls.key_file",
        "key file mode",
        "certificate validity",
        "agent id",
        "key matches certificate",
        "CA signs agent certificate",
        "orchestrator connection",
    ]
    assert "answers HTTP/2" in _result(results, "orchestrator connection").message


def test_reference_orchestrator_passes(pki, tmp_path):
    from stella_agent.orchestrator.server import Orchestrator, OrchestratorConfig

    async def main() -> list[CheckResult]:
        orchestrator = Orchestrator(
            OrchestratorConfig(
                listen="127.0.0.1:0",
                ca_file=str(pki.ca_cert),
                cert_file=str(pki.orchestrator_cert),
                key_file=str(pki.orchestrator_key),
            )
        )
        port = await orchestrator.start()
        try:
            return await asyncio.to_thread(run_checks, _config(pki, port))
        finally:
            await orchestrator.stop(grace=0)

    results = asyncio.run(main())

    connection = _result(results, "orchestrator connection")
    assert connection.status == "ok", connection.message
    assert "answers HTTP/2" in connection.message


def test_wrong_ca_is_reported(pki, other_pki, listeners):
    port = listeners(
        other_pki.orchestrator_cert, other_pki.orchestrator_key, pki.ca_cert
    )

    connection = _result(run_checks(_config(pki, port)), "orchestrator connection")

    assert not connection.ok
    assert connection.message.startswith("wrong CA")
    assert str(pki.ca_cert) in connection.message
    # Both development CAs have the same name, so the key id must be shown.
    other_ca = x509.load_pem_x509_certificate(other_pki.ca_cert.read_bytes())
    other_key_id = other_ca.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value.digest
    assert f"key id {other_key_id.hex(':')}" in connection.message


def test_expired_server_certificate_is_reported(pki, listeners, tmp_path):
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=400)
    cert, key = _issue_files(
        tmp_path,
        "expired-server",
        pki.ca_cert.parent,
        "stella-orchestrator",
        server_names=("localhost", "127.0.0.1"),
        client=False,
        not_before=start,
        days=365,
    )
    port = listeners(cert, key, pki.ca_cert)

    connection = _result(run_checks(_config(pki, port)), "orchestrator connection")

    assert not connection.ok
    assert "certificate expired on" in connection.message
    expired_on = (start + datetime.timedelta(days=365)).strftime("%Y-%m-%d")
    assert expired_on in connection.message


def test_name_mismatch_lists_certificate_names(pki, listeners, tmp_path):
    cert, key = _issue_files(
        tmp_path,
        "other-name",
        pki.ca_cert.parent,
        "stella-orchestrator",
        server_names=("orchestrator.example",),
        client=False,
    )
    port = listeners(cert, key, pki.ca_cert)

    connection = _result(run_checks(_config(pki, port)), "orchestrator connection")

    assert not connection.ok
    assert connection.message.startswith("name mismatch")
    assert "'127.0.0.1'" in connection.message
    assert "orchestrator.example" in connection.message


def test_configured_server_name_is_checked(pki, listeners):
    port = listeners(pki.orchestrator_cert, pki.orchestrator_key, pki.ca_cert)
    config = _config(pki, port, orchestrator={"server_name": "wrong.example"})

    connection = _result(run_checks(config), "orchestrator connection")

    assert not connection.ok
    assert "does not name 'wrong.example'" in connection.message
    assert "localhost, 127.0.0.1" in connection.message


def test_configured_server_name_that_matches_passes(pki, listeners):
    port = listeners(pki.orchestrator_cert, pki.orchestrator_key, pki.ca_cert)
    config = _config(pki, port, orchestrator={"server_name": "localhost"})

    connection = _result(run_checks(config), "orchestrator connection")

    assert connection.status == "ok", connection.message


def test_connection_refused_is_reported(pki):
    connection = _result(
        run_checks(_config(pki, _free_port())), "orchestrator connection"
    )

    assert not connection.ok
    assert "refused" in connection.message


def test_rejected_client_certificate_is_reported(pki, other_pki, listeners):
    port = listeners(pki.orchestrator_cert, pki.orchestrator_key, other_pki.ca_cert)

    connection = _result(run_checks(_config(pki, port)), "orchestrator connection")

    assert not connection.ok
    assert "rejected the agent's certificate" in connection.message


def test_non_http2_answer_is_a_warning(pki, listeners):
    port = listeners(
        pki.orchestrator_cert, pki.orchestrator_key, pki.ca_cert, reply=b"HTTP/1.1 400"
    )

    connection = _result(run_checks(_config(pki, port)), "orchestrator connection")

    assert connection.status == "warning"
    assert "not HTTP/2" in connection.message


def test_agent_id_mismatch_fails(pki):
    results = run_checks(_config(pki, _free_port(), agent_id="host-2"))

    agent_id = _result(results, "agent id")
    assert not agent_id.ok
    assert "names 'host-1' but agent_id is 'host-2'" in agent_id.message


def test_key_of_other_certificate_fails(pki):
    config = _config(pki, _free_port(), tls={"key_file": str(pki.operator_key)})

    key_check = _result(run_checks(config), "key matches certificate")

    assert not key_check.ok
    assert "does not belong" in key_check.message


def test_readable_key_file_is_a_warning(pki):
    pki.agent_key.chmod(0o644)

    mode = _result(run_checks(_config(pki, _free_port())), "key file mode")

    assert mode.status == "warning"
    assert "chmod 600" in mode.message


def test_ca_that_did_not_issue_agent_certificate_warns(pki, other_pki):
    config = _config(pki, _free_port(), tls={"ca_file": str(other_pki.ca_cert)})

    ca_check = _result(run_checks(config), "CA signs agent certificate")

    assert ca_check.status == "warning"
    assert "no CA in tls.ca_file issued" in ca_check.message


def test_missing_files_skip_connection(pki, tmp_path):
    config = _config(
        pki,
        _free_port(),
        tls={"cert_file": "", "key_file": str(tmp_path / "missing.key")},
    )

    results = run_checks(config)

    assert _result(results, "tls.cert_file").message == (
        "config key 'tls.cert_file' is not set"
    )
    assert "cannot read" in _result(results, "tls.key_file").message
    assert "not tried" in _result(results, "orchestrator connection").message
    assert all(r.name != "certificate validity" for r in results)


def test_unparsable_certificate_fails(pki, tmp_path):
    bad = tmp_path / "bad.crt"
    bad.write_text("not a certificate")

    results = run_checks(_config(pki, _free_port(), tls={"cert_file": str(bad)}))

    assert "not a PEM certificate" in _result(results, "tls.cert_file").message


def test_validity_warns_before_expiry(pki):
    cert = x509.load_pem_x509_certificate(pki.agent_cert.read_bytes())
    soon = cert.not_valid_after_utc - datetime.timedelta(days=EXPIRY_WARNING_DAYS - 1)
    later = cert.not_valid_after_utc - datetime.timedelta(days=EXPIRY_WARNING_DAYS + 1)

    warning = check_validity(cert, soon)
    fine = check_validity(cert, later)

    assert warning.status == "warning"
    assert f"{EXPIRY_WARNING_DAYS - 1} days left" in warning.message
    assert fine.status == "ok"


def test_validity_fails_when_expired_or_early(pki):
    cert = x509.load_pem_x509_certificate(pki.agent_cert.read_bytes())

    expired = check_validity(cert, cert.not_valid_after_utc)
    early = check_validity(
        cert, cert.not_valid_before_utc - datetime.timedelta(seconds=1)
    )

    assert not expired.ok
    assert "expired on" in expired.message
    assert not early.ok
    assert "not valid before" in early.message


def test_expired_agent_certificate_fails(pki, tmp_path):
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    cert, key = _issue_files(
        tmp_path, "old-agent", pki.ca_cert.parent, AGENT, not_before=start, days=10
    )
    config = _config(
        pki, _free_port(), tls={"cert_file": str(cert), "key_file": str(key)}
    )

    validity = _result(run_checks(config), "certificate validity")

    assert not validity.ok
    assert "issue a new certificate" in validity.message


def test_format_results_aligns_columns():
    text = format_results(
        [
            CheckResult("a", True, "fine"),
            CheckResult("longer name", True, "soon", warning=True),
            CheckResult("b", False, "broken"),
        ]
    )

    assert text.splitlines() == [
        "OK    a            fine",
        "WARN  longer name  soon",
        "FAIL  b            broken",
    ]


def test_missing_signing_key_fails_check(tmp_path):
    from stella_agent.checks import check_signing_keys

    result = check_signing_keys((str(tmp_path / "absent.pub"),))

    assert not result.ok
    assert "absent.pub" in result.message
