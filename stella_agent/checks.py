"""`stella-agent check`: is the agent's TLS setup usable, and if not, why?

``run_checks`` reads the CA bundle, client certificate and key from the agent
config and checks them one by one, then opens a TLS connection to the
orchestrator the way the agent does (client certificate, the configured CA,
server name checking, ALPN "h2") and reports the exact cause of a failure:
connection refused, wrong CA, expired certificate, name mismatch, or the
orchestrator rejecting the agent's certificate.

Every check returns a ``CheckResult``; none raises. The checks run in the
calling thread and block for at most the connect timeout per connection.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from stella_agent.config import AgentConfig
from stella_agent.errors import StellaError

EXPIRY_WARNING_DAYS = 30
"""A certificate with fewer days left than this is reported as a warning."""
PROBE_TIMEOUT_SECONDS = 5.0
"""Maximum wait in seconds for the orchestrator's first HTTP/2 frame."""

# The HTTP/2 client connection preface followed by an empty SETTINGS frame
# (RFC 9113). A gRPC server replies with its own SETTINGS frame.
_HTTP2_PREFACE = (
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
)
_HTTP2_SETTINGS_TYPE = 0x04

# OpenSSL's X509_V_ERR_* verification codes, as in ssl.SSLCertVerificationError.
# verify_code: issuer not found (2, 20), self-signed (18, 19), leaf signature
# not verifiable (21), not yet valid (9), expired (10), host name (62) and IP
# address (64) mismatch.
_WRONG_CA_CODES = {2, 18, 19, 20, 21}
_NOT_YET_VALID = 9
_EXPIRED = 10
_NAME_MISMATCH_CODES = {62, 64}


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check."""

    name: str
    """Short name of what was checked, for example "orchestrator connection"."""
    ok: bool
    """False when the agent cannot work until this is fixed."""
    message: str
    """The finding, and on failure the fix."""
    warning: bool = False
    """True for a passed check that needs attention soon."""

    @property
    def status(self) -> str:
        """ "ok", "warning" or "failed"."""
        if not self.ok:
            return "failed"
        return "warning" if self.warning else "ok"


def format_results(results: list[CheckResult]) -> str:
    """Return the results as aligned text lines, one per check."""
    width = max((len(result.name) for result in results), default=0)
    labels = {"ok": "OK", "warning": "WARN", "failed": "FAIL"}
    return "\n".join(
        f"{labels[result.status]:4}  {result.name:{width}}  {result.message}"
        for result in results
    )


def run_checks(
    config: AgentConfig, *, now: datetime.datetime | None = None
) -> list[CheckResult]:
    """Check the agent's certificate, key and CA, then its connection to the
    orchestrator, and return one result per check."""
    current = now or datetime.datetime.now(datetime.UTC)
    results: list[CheckResult] = []

    ca_certs = _load("tls.ca_file", config.tls.ca_file, _parse_ca_bundle, results)
    cert = _load("tls.cert_file", config.tls.cert_file, _parse_cert, results)
    key = _load("tls.key_file", config.tls.key_file, _parse_key, results)
    if key is not None:
        results.append(check_key_permissions(config.tls.key_file))
    if cert is not None:
        results.append(check_validity(cert, current))
        results.append(check_agent_id(cert, config.agent_id))
        if key is not None:
            results.append(check_key_matches(cert, key))
        if ca_certs is not None:
            results.append(check_ca_signs(cert, ca_certs))

    if config.signing.public_keys:
        results.append(check_signing_keys(config.signing.public_keys))

    if ca_certs is None or cert is None or key is None:
        results.append(
            CheckResult(
                "orchestrator connection",
                False,
                "not tried, because the TLS files above are unusable",
            )
        )
    else:
        results.append(check_orchestrator(config))
    return results


def check_signing_keys(specs: tuple[str, ...]) -> CheckResult:
    """Check that every configured signing public key loads."""
    from stella_agent.signing import load_public_keys

    try:
        keys = load_public_keys(specs)
    except StellaError as exc:
        return CheckResult("signing.public_keys", False, str(exc))
    return CheckResult(
        "signing.public_keys", True, f"{len(keys)} key(s): {', '.join(sorted(keys))}"
    )


def _load(key_name, path, parse, results):
    """Read and parse one configured file, appending a result; return the
    parsed value or None."""
    if not path:
        results.append(
            CheckResult(key_name, False, f"config key '{key_name}' is not set")
        )
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        results.append(
            CheckResult(key_name, False, f"cannot read {path}: {exc.strerror}")
        )
        return None
    try:
        value = parse(data)
    except (ValueError, TypeError) as exc:
        results.append(CheckResult(key_name, False, f"{path}: {exc}"))
        return None
    results.append(CheckResult(key_name, True, f"{path} is readable"))
    return value


def _parse_ca_bundle(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError("not a PEM bundle of CA certificates") from None


def _parse_cert(data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ValueError("not a PEM certificate") from None


def _parse_key(data: bytes):
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ValueError("not an unencrypted PEM private key") from None


def check_key_permissions(path: str) -> CheckResult:
    """Warn when the private key file is readable by group or others."""
    try:
        mode = stat.S_IMODE(Path(path).stat().st_mode)
    except OSError as exc:
        return CheckResult(
            "key file mode", False, f"cannot stat {path}: {exc.strerror}"
        )
    if mode & 0o077:
        return CheckResult(
            "key file mode",
            True,
            f"{path} has mode {mode:04o}, so other users can read the agent's "
            f"private key; run `chmod 600 {path}`",
            warning=True,
        )
    return CheckResult("key file mode", True, f"{path} has mode {mode:04o}")


def check_validity(cert: x509.Certificate, now: datetime.datetime) -> CheckResult:
    """Check that the certificate is valid now, warning when it expires soon."""
    name = "certificate validity"
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < not_before:
        return CheckResult(
            name, False, f"not valid before {_format_time(not_before)}; check the clock"
        )
    if now >= not_after:
        return CheckResult(
            name,
            False,
            f"expired on {_format_time(not_after)}; issue a new certificate",
        )
    days_left = (not_after - now).days
    message = f"valid until {_format_time(not_after)}, {days_left} days left"
    if days_left < EXPIRY_WARNING_DAYS:
        return CheckResult(
            name,
            True,
            f"{message}; renew it before it expires (warning below "
            f"{EXPIRY_WARNING_DAYS} days)",
            warning=True,
        )
    return CheckResult(name, True, message)


def check_agent_id(cert: x509.Certificate, agent_id: str) -> CheckResult:
    """Check that the certificate's common name is the configured agent id."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    if common_name != agent_id:
        return CheckResult(
            "agent id",
            False,
            f"the certificate names {common_name!r} but agent_id is {agent_id!r}; "
            "the orchestrator rejects the agent. Use the certificate issued for "
            "this agent id, or set agent_id to its common name",
        )
    return CheckResult(
        "agent id", True, f"agent_id {agent_id!r} matches the certificate"
    )


def check_key_matches(cert: x509.Certificate, key) -> CheckResult:
    """Check that the private key belongs to the certificate."""
    public_format = (
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    if key.public_key().public_bytes(*public_format) != cert.public_key().public_bytes(
        *public_format
    ):
        return CheckResult(
            "key matches certificate",
            False,
            "the private key in tls.key_file does not belong to the certificate in "
            "tls.cert_file; configure the key issued with the certificate",
        )
    return CheckResult(
        "key matches certificate", True, "the key belongs to the certificate"
    )


def check_ca_signs(
    cert: x509.Certificate, ca_certs: list[x509.Certificate]
) -> CheckResult:
    """Check whether a CA in the bundle issued the agent's certificate.

    Only a warning when not: tls.ca_file is the CA trusted for the
    orchestrator's certificate, and the orchestrator may trust another CA for
    agents.
    """
    for ca in ca_certs:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return CheckResult(
            "CA signs agent certificate",
            True,
            f"issued by {ca.subject.rfc4514_string()} from tls.ca_file",
        )
    return CheckResult(
        "CA signs agent certificate",
        True,
        f"no CA in tls.ca_file issued the agent certificate (issuer "
        f"{cert.issuer.rfc4514_string()}); that is fine only if the orchestrator "
        "trusts that issuer for agents",
        warning=True,
    )


def split_address(address: str) -> tuple[str, int]:
    """Split "host:port" or "[ipv6]:port" into host and port."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def check_orchestrator(config: AgentConfig) -> CheckResult:
    """Connect to the orchestrator with the agent's TLS settings and report
    the exact cause of a failure."""
    name = "orchestrator connection"
    address = config.orchestrator.address
    host, port = split_address(address)
    server_name = config.orchestrator.server_name or host
    timeout = config.orchestrator.connect_timeout_seconds
    try:
        context = _client_context(config, verify=True)
    except ssl.SSLError as exc:
        return CheckResult(name, False, f"cannot load the TLS files: {exc.reason}")

    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        return CheckResult(
            name,
            False,
            f"connection to {address} refused: nothing listens there; start the "
            "orchestrator or fix orchestrator.address",
        )
    except socket.gaierror as exc:
        return CheckResult(name, False, f"cannot resolve host {host!r}: {exc.strerror}")
    except TimeoutError:
        return CheckResult(
            name,
            False,
            f"no answer from {address} within {timeout:g} s; a firewall may drop "
            "the connection",
        )
    except OSError as exc:
        return CheckResult(name, False, f"cannot connect to {address}: {exc.strerror}")

    with sock:
        try:
            tls = context.wrap_socket(sock, server_hostname=server_name)
        except ssl.SSLCertVerificationError as exc:
            return CheckResult(
                name, False, _explain_verify_error(exc, config, server_name)
            )
        except ssl.SSLError as exc:
            return CheckResult(
                name, False, f"TLS handshake with {address} failed: {exc.reason}"
            )
        except (TimeoutError, OSError) as exc:
            return CheckResult(
                name, False, f"TLS handshake with {address} failed: {exc}"
            )
        with tls:
            return _probe_http2(tls, address, server_name)


def _client_context(config: AgentConfig, *, verify: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        context.load_verify_locations(cafile=config.tls.ca_file)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    context.set_alpn_protocols(["h2"])
    return context


def _explain_verify_error(
    exc: ssl.SSLCertVerificationError, config: AgentConfig, server_name: str
) -> str:
    code = exc.verify_code
    detail = exc.verify_message
    server_cert = _fetch_server_certificate(config, server_name)
    if code in _NAME_MISMATCH_CODES:
        names = _certificate_names(server_cert) if server_cert else []
        listed = ", ".join(names) if names else "names that could not be read"
        return (
            f"name mismatch: the orchestrator's certificate does not name "
            f"{server_name!r}; it names {listed}. Set orchestrator.server_name to "
            "one of them, or issue a certificate for this name"
        )
    if code == _EXPIRED:
        when = (
            f" on {_format_time(server_cert.not_valid_after_utc)}"
            if server_cert
            else ""
        )
        return (
            f"the orchestrator's certificate expired{when}; renew the orchestrator's "
            f"certificate ({detail})"
        )
    if code == _NOT_YET_VALID:
        return (
            f"the orchestrator's certificate is not valid yet; check the clocks of "
            f"both hosts ({detail})"
        )
    if code in _WRONG_CA_CODES:
        issuer = (
            f" (its issuer is {_describe_issuer(server_cert)})" if server_cert else ""
        )
        return (
            f"wrong CA: the orchestrator's certificate{issuer} is not signed by a CA "
            f"in tls.ca_file {config.tls.ca_file}; configure the CA that issued it "
            f"({detail})"
        )
    return f"the orchestrator's certificate failed verification: {detail}"


def _describe_issuer(cert: x509.Certificate) -> str:
    """Return the issuer's name and, when present, its key id, which
    distinguishes two CAs with the same name."""
    name = cert.issuer.rfc4514_string()
    try:
        identifier = cert.extensions.get_extension_for_class(
            x509.AuthorityKeyIdentifier
        ).value.key_identifier
    except x509.ExtensionNotFound:
        return name
    if not identifier:
        return name
    return f"{name}, key id {identifier.hex(':')}"


def _fetch_server_certificate(
    config: AgentConfig, server_name: str
) -> x509.Certificate | None:
    """Return the orchestrator's certificate without verifying it, to explain a
    verification failure; None when it cannot be fetched."""
    host, port = split_address(config.orchestrator.address)
    try:
        context = _client_context(config, verify=False)
        with socket.create_connection(
            (host, port), timeout=config.orchestrator.connect_timeout_seconds
        ) as sock:
            with context.wrap_socket(sock, server_hostname=server_name) as tls:
                der = tls.getpeercert(binary_form=True)
    except (ssl.SSLError, OSError):
        return None
    if not der:
        return None
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def _certificate_names(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return [str(names[0].value)] if names else []
    dns = sans.value.get_values_for_type(x509.DNSName)
    addresses = [str(ip) for ip in sans.value.get_values_for_type(x509.IPAddress)]
    return [*dns, *addresses]


def _probe_http2(tls: ssl.SSLSocket, address: str, server_name: str) -> CheckResult:
    """Send the HTTP/2 preface and read the reply, which shows whether the
    orchestrator accepted the agent's certificate.

    With TLS 1.3 the server checks the client certificate after the client's
    handshake has finished, so a rejection arrives as an alert on the first
    read.
    """
    name = "orchestrator connection"
    verified = (
        f"TLS to {address} verified: the certificate names {server_name!r} and is "
        "signed by a CA in tls.ca_file"
    )
    tls.settimeout(PROBE_TIMEOUT_SECONDS)
    try:
        tls.sendall(_HTTP2_PREFACE)
        answer = tls.recv(9)
    except ssl.SSLError as exc:
        return CheckResult(
            name,
            False,
            f"{verified}, but the orchestrator rejected the agent's certificate "
            f"({exc.reason}); it must trust the CA that issued the agent certificate",
        )
    except TimeoutError:
        return CheckResult(
            name,
            True,
            f"{verified}; no HTTP/2 answer within {PROBE_TIMEOUT_SECONDS:g} s",
            warning=True,
        )
    except OSError as exc:
        return CheckResult(
            name, False, f"{verified}, but the connection failed afterwards: {exc}"
        )
    if not answer:
        return CheckResult(
            name,
            False,
            f"{verified}, but the orchestrator closed the connection; it may have "
            "rejected the agent's certificate",
        )
    if len(answer) >= 4 and answer[3] == _HTTP2_SETTINGS_TYPE:
        return CheckResult(name, True, f"{verified}; it answers HTTP/2")
    return CheckResult(
        name,
        True,
        f"{verified}, but its answer is not HTTP/2; is this the orchestrator's port?",
        warning=True,
    )


def _format_time(moment: datetime.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"
