"""Development certificates and the TLS material of both sides.

`stella-agent certs init` creates a small PKI for development and tests: a CA,
the orchestrator's server certificate (SANs localhost and 127.0.0.1), one
client certificate per agent whose common name is the agent id, and an
operator client certificate for the control service. Production users bring
their own PKI and point the config at the files.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stella_agent.errors import CertificateError

OPERATOR_IDENTITY = "stella-operator"
"""Common name of the operator certificate `certs init` creates."""
ORCHESTRATOR_IDENTITY = "stella-orchestrator"
DEFAULT_VALIDITY_DAYS = 365


@dataclass(frozen=True)
class IssuedFiles:
    """Paths written by `certs init`."""

    ca_cert: Path
    orchestrator_cert: Path
    orchestrator_key: Path
    agent_cert: Path
    agent_key: Path
    operator_cert: Path
    operator_key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to a file created with mode 0600 from the start."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Stella Agent development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(subject: str, issuer: x509.Name, public_key, days: int, not_before=None):
    now = datetime.datetime.now(datetime.UTC)
    start = not_before or now - datetime.timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
    )


def create_ca(common_name: str = "Stella Agent development CA", days: int = 3650):
    """Return a new self-signed CA certificate and its key."""
    key = _new_key()
    cert = (
        _builder(common_name, _name(common_name), key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    server_names: tuple[str, ...] = (),
    client: bool = True,
    days: int = DEFAULT_VALIDITY_DAYS,
    not_before: datetime.datetime | None = None,
):
    """Return a new leaf certificate signed by the CA, and its key.

    With `server_names`, the certificate is a server certificate for those DNS
    names and IP addresses; otherwise a client certificate.
    """
    key = _new_key()
    builder = _builder(common_name, ca_cert.subject, key.public_key(), days, not_before)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server_names else []
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = builder.add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True
    )
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
        critical=False,
    )
    if server_names:
        sans: list[x509.GeneralName] = []
        for name in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        builder = builder.add_extension(
            x509.SubjectAlternativeName(sans), critical=False
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert, key


def init_dev_pki(directory: str | os.PathLike[str], agent_id: str) -> IssuedFiles:
    """Create (or extend) the development PKI in `directory`.

    An existing CA in the directory is reused, so running it again with
    another agent id adds that agent's certificate to the same PKI.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    ca_cert_path, ca_key_path = root / "ca.crt", root / "ca.key"
    if ca_cert_path.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        ca_key = serialization.load_pem_private_key(
            ca_key_path.read_bytes(), password=None
        )
    else:
        ca_cert, ca_key = create_ca()
        _write_private(ca_key_path, _key_pem(ca_key))
        _write_public(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))

    def issue(stem: str, common_name: str, **kwargs) -> tuple[Path, Path]:
        cert_path, key_path = root / f"{stem}.crt", root / f"{stem}.key"
        if cert_path.exists() and key_path.exists():
            return cert_path, key_path
        cert, key = issue_certificate(ca_cert, ca_key, common_name, **kwargs)
        _write_private(key_path, _key_pem(key))
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    orchestrator = issue(
        "orchestrator",
        ORCHESTRATOR_IDENTITY,
        server_names=("localhost", "127.0.0.1"),
        client=False,
    )
    agent = issue(f"agent-{agent_id}", agent_id)
    operator = issue("operator", OPERATOR_IDENTITY)
    return IssuedFiles(ca_cert_path, *orchestrator, *agent, *operator)


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes of one side's TLS material, read together."""

    ca: bytes
    cert: bytes
    key: bytes


def read_tls_files(
    ca_file: str, cert_file: str, key_file: str, *, key_name: str = "tls"
) -> TlsFiles:
    """Read and sanity-check a CA bundle, certificate and key.

    Raises CertificateError naming the file when one is missing, unreadable,
    expired, or when the key does not belong to the certificate.
    """
    data = {}
    for label, path in (
        ("ca_file", ca_file),
        ("cert_file", cert_file),
        ("key_file", key_file),
    ):
        if not path:
            raise CertificateError(f"config key '{key_name}.{label}' is required")
        try:
            data[label] = Path(path).read_bytes()
        except OSError as exc:
            raise CertificateError(
                f"cannot read {key_name}.{label} {path}: {exc.strerror}"
            ) from None
    try:
        cert = x509.load_pem_x509_certificate(data["cert_file"])
    except ValueError:
        raise CertificateError(f"{cert_file} is not a PEM certificate") from None
    try:
        x509.load_pem_x509_certificates(data["ca_file"])
    except ValueError:
        raise CertificateError(f"{ca_file} is not a PEM CA bundle") from None
    try:
        key = serialization.load_pem_private_key(data["key_file"], password=None)
    except (ValueError, TypeError):
        raise CertificateError(
            f"{key_file} is not an unencrypted PEM private key"
        ) from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CertificateError(
            f"key {key_file} does not belong to certificate {cert_file}"
        )
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc <= now:
        raise CertificateError(
            f"certificate {cert_file} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "issue a new one"
        )
    if cert.not_valid_before_utc > now:
        raise CertificateError(
            f"certificate {cert_file} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    return TlsFiles(ca=data["ca_file"], cert=data["cert_file"], key=data["key_file"])


def certificate_identity(cert_pem: bytes) -> str:
    """Return the common name of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise CertificateError(
            "certificate has no common name, so it names no identity"
        )
    return str(names[0].value)


def peer_identity(auth_context: dict[str, list[bytes]]) -> str | None:
    """Return the common name of the client certificate of a gRPC call."""
    names = auth_context.get("x509_common_name") or []
    if len(names) != 1:
        return None
    return names[0].decode("utf-8", "replace")
