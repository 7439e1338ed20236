"""Task credentials sealed to one agent's key.

The agent owns an X25519 key pair, created on first start in
``<state_dir>/keys/credentials.key`` and sent to the orchestrator in Hello as
an ``AgentPublicKey``. The orchestrator seals a task's ``Credentials`` to that
key with ``seal_credentials``. Only the agent can open them, and only for the
agent id and task id they were sealed for.

The scheme, named ``X25519-HKDF-SHA256-AES256GCM``:

1. The sender creates an ephemeral X25519 key pair and computes the shared
   secret with the agent's public key.
2. HKDF-SHA256 derives a 32-byte AES key from the shared secret. Its info
   string binds the algorithm name, the ephemeral public key and the agent's
   public key, so a key derived for one recipient is useless for another.
3. AES-256-GCM encrypts the serialized ``Credentials`` with a random 12-byte
   nonce. The associated data binds the key id, the agent id and the task id,
   so ciphertext copied into another task or sent to another agent fails to
   open.

``EncryptedCredentials.ciphertext`` is the nonce followed by the AES-GCM output
(ciphertext and 16-byte tag). Every variable-length part of the info string and
the associated data is prefixed with its length, so ("a", "bc") and ("ab", "c")
never produce the same bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from google.protobuf.message import DecodeError

from stella.agent.v1 import gateway_pb2, task_pb2
from stella_agent.errors import ConfigError, TaskError

logger = logging.getLogger(__name__)

ALGORITHM = "X25519-HKDF-SHA256-AES256GCM"
"""Name of the sealing scheme, sent in AgentPublicKey and EncryptedCredentials."""

KEY_FILE = Path("keys") / "credentials.key"
"""Location of the agent's private key, relative to the state directory."""

PUBLIC_KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_AAD_LABEL = b"stella.agent.v1.EncryptedCredentials"


class CredentialsError(TaskError):
    """Sealed credentials cannot be opened, or cannot be sealed."""

    error_type = "credentials_invalid"


def key_id_for(public_key_bytes: bytes) -> str:
    """Return the key id of a raw public key: 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_key_bytes).hexdigest()[:16]


@dataclass(frozen=True)
class AgentKeyPair:
    """The agent's X25519 key pair for opening sealed credentials."""

    private_key: X25519PrivateKey

    @property
    def public_key_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def key_id(self) -> str:
        """Key id sent in Hello and echoed in EncryptedCredentials.key_id."""
        return key_id_for(self.public_key_bytes)

    def public_key_message(self) -> gateway_pb2.AgentPublicKey:
        """Return the public key as sent in Hello.public_key."""
        return gateway_pb2.AgentPublicKey(
            key_id=self.key_id,
            algorithm=ALGORITHM,
            public_key=self.public_key_bytes,
        )

    @classmethod
    def generate(cls) -> AgentKeyPair:
        """Return a new key pair that is kept in memory only."""
        return cls(X25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, state_dir: str | os.PathLike[str]) -> AgentKeyPair:
        """Load the key pair from the state directory, creating it on first use.

        The key directory is created with mode 0700 and the key file with mode
        0600. Raises ConfigError when the file is readable by group or others,
        or is not an X25519 private key.
        """
        path = Path(state_dir) / KEY_FILE
        if not path.exists():
            _create_key_file(path)
        return cls(_read_key_file(path))


def _create_key_file(path: Path) -> None:
    """Write a new private key to `path` unless another process got there first."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    pem = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # mkstemp creates the file with mode 0600 under a unique name.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        # link() fails when the file exists, so two agents starting at once
        # cannot overwrite each other's key.
        try:
            os.link(temporary, path)
        except FileExistsError:
            return
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    logger.info("created the credentials key %s", path)


def _read_key_file(path: Path) -> X25519PrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"credentials key {path} has mode {mode:04o}, so other users can read "
            f"it; run `chmod 600 {path}`"
        )
    data = path.read_bytes()
    try:
        if len(data) == PUBLIC_KEY_BYTES:
            return X25519PrivateKey.from_private_bytes(data)
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, X25519PrivateKey):
        raise ConfigError(
            f"credentials key {path} is not an X25519 private key (PEM or 32 raw "
            "bytes); remove it to create a new one, after which the orchestrator "
            "must seal credentials to the new key"
        )
    return key


def _length_prefixed(*parts: bytes) -> bytes:
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def _derive_key(shared: bytes, sender_public: bytes, recipient_public: bytes) -> bytes:
    info = _length_prefixed(ALGORITHM.encode(), sender_public, recipient_public)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
        shared
    )


def _associated_data(key_id: str, agent_id: str, task_id: str) -> bytes:
    return _length_prefixed(
        _AAD_LABEL, key_id.encode(), agent_id.encode(), task_id.encode()
    )


def seal_credentials(
    public_key: gateway_pb2.AgentPublicKey,
    agent_id: str,
    task_id: str,
    credentials: task_pb2.Credentials,
) -> task_pb2.EncryptedCredentials:
    """Seal `credentials` to an agent's public key for one task.

    Raises CredentialsError when the public key is not a valid X25519 key
    for this scheme.
    """
    if public_key.algorithm != ALGORITHM:
        raise CredentialsError(
            f"agent {agent_id} offers key algorithm {public_key.algorithm!r}, "
            f"expected {ALGORITHM!r}; upgrade the agent or the orchestrator"
        )
    if len(public_key.public_key) != PUBLIC_KEY_BYTES:
        raise CredentialsError(
            f"agent {agent_id} sent a public key of {len(public_key.public_key)} "
            f"bytes, expected {PUBLIC_KEY_BYTES}"
        )
    key_id = public_key.key_id or key_id_for(public_key.public_key)
    recipient = X25519PublicKey.from_public_bytes(public_key.public_key)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    try:
        shared = ephemeral.exchange(recipient)
    except ValueError:
        # A low-order point gives an all-zero shared secret, which
        # cryptography rejects.
        raise CredentialsError(
            f"agent {agent_id} sent an unusable public key (a low-order point)"
        ) from None

    key = _derive_key(shared, ephemeral_public, public_key.public_key)
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(
        nonce,
        credentials.SerializeToString(deterministic=True),
        _associated_data(key_id, agent_id, task_id),
    )
    return task_pb2.EncryptedCredentials(
        key_id=key_id,
        algorithm=ALGORITHM,
        encapsulated_key=ephemeral_public,
        ciphertext=nonce + sealed,
    )


def open_credentials(
    keypair: AgentKeyPair,
    agent_id: str,
    task_id: str,
    sealed: task_pb2.EncryptedCredentials,
) -> task_pb2.Credentials:
    """Decrypt credentials sealed to `keypair` for this agent and task.

    Raises CredentialsError when they were sealed to another key, with another
    scheme, for another agent or task, or were changed on the way.
    """
    if sealed.algorithm != ALGORITHM:
        raise CredentialsError(
            f"task {task_id}: credentials use algorithm {sealed.algorithm!r}, but "
            f"this agent supports only {ALGORITHM!r}"
        )
    if sealed.key_id != keypair.key_id:
        raise CredentialsError(
            f"task {task_id}: credentials are sealed to key {sealed.key_id!r}, but "
            f"this agent's key is {keypair.key_id!r}; the orchestrator must seal "
            "them to the key in the agent's latest Hello"
        )
    if len(sealed.encapsulated_key) != PUBLIC_KEY_BYTES:
        raise CredentialsError(
            f"task {task_id}: credentials carry an encapsulated key of "
            f"{len(sealed.encapsulated_key)} bytes, expected {PUBLIC_KEY_BYTES}"
        )
    if len(sealed.ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise CredentialsError(
            f"task {task_id}: credentials ciphertext is {len(sealed.ciphertext)} "
            f"bytes, too short to hold a nonce and a tag"
        )

    failure = CredentialsError(
        f"task {task_id}: credentials failed to decrypt: they were changed, or "
        f"sealed for another agent or task than agent {agent_id!r}, task "
        f"{task_id!r}"
    )
    try:
        shared = keypair.private_key.exchange(
            X25519PublicKey.from_public_bytes(sealed.encapsulated_key)
        )
    except ValueError:
        raise failure from None
    key = _derive_key(shared, sealed.encapsulated_key, keypair.public_key_bytes)
    nonce, body = sealed.ciphertext[:NONCE_BYTES], sealed.ciphertext[NONCE_BYTES:]
    try:
        plaintext = AESGCM(key).decrypt(
            nonce, body, _associated_data(sealed.key_id, agent_id, task_id)
        )
    except InvalidTag:
        raise failure from None

    try:
        return task_pb2.Credentials.FromString(plaintext)
    except DecodeError:
        raise CredentialsError(
            f"task {task_id}: decrypted credentials are not a Credentials message"
        ) from None


def open_task_credentials(
    keypair: AgentKeyPair, agent_id: str, task: task_pb2.AgentTask
) -> task_pb2.Credentials:
    """Return the task's decrypted credentials, or empty ones when it has none."""
    if not task.HasField("credentials") or task.credentials.ByteSize() == 0:
        return task_pb2.Credentials()
    return open_credentials(keypair, agent_id, task.id, task.credentials)
