"""Ed25519 signatures on tasks, made by the orchestrator and checked by the agent.

A ``SignedTask`` carries a serialized ``AgentTask``, the id of the signing key
and an Ed25519 signature over::

    b"stella.agent.v1.SignedTask" + b"\\x00" + key_id + b"\\x00" + task bytes

The signed task must name the agent (``agent_id``), its issue time
(``assigned_at``) and its expiry (``expires_at``), so the signature binds all
three and the task id. ``TaskVerifier`` checks, in this order:

1. the key id is configured and the signature is valid;
2. the bytes are an AgentTask that names this agent;
3. the issue time is not in the future and the task has not expired;
4. the expiry is within the replay window, and the id was not seen before.

Task ids are remembered until the task expires, which bounds the replay cache
by time: a task replayed later is rejected as expired. With ``replay_file`` the
cache survives restarts.

Several public keys may be configured at once, so the orchestrator can switch
to a new key while tasks signed with the old one are still in flight.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from google.protobuf.message import DecodeError

from stella.agent.v1 import gateway_pb2, task_pb2
from stella_agent.errors import (
    ConfigError,
    InvalidTaskError,
    TaskError,
    TaskExpiredError,
)

logger = logging.getLogger(__name__)

SIGNATURE_CONTEXT = b"stella.agent.v1.SignedTask\x00"
"""Prefix of every signed message, so the signature is valid for nothing else."""
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
SIGNATURE_BYTES = 64
DEFAULT_MAX_CLOCK_SKEW_SECONDS = 60.0
DEFAULT_REPLAY_WINDOW_SECONDS = 24 * 3600.0


class SignatureError(TaskError):
    """A task is unsigned where signatures are required, or its signature or
    binding is invalid."""

    error_type = "signature_invalid"

    def __init__(self, message: str, *, task_id: str = "") -> None:
        super().__init__(message)
        self.task_id = task_id
        """Id the rejected task claims, for the TaskRejected message; unverified."""


class SignedTaskExpiredError(TaskExpiredError):
    """A validly signed task that arrived after its expires_at."""

    def __init__(self, message: str, *, task_id: str) -> None:
        super().__init__(message)
        self.task_id = task_id


class ReplayedTaskError(TaskError):
    """A validly signed task whose id was accepted before."""

    error_type = "replayed"

    def __init__(self, message: str, task: task_pb2.AgentTask) -> None:
        super().__init__(message)
        self.task = task
        """The verified task, so the caller can handle a known id as a duplicate."""
        self.task_id = task.id


class ReplayCacheError(TaskError):
    """The replay cache file cannot be written, so the task is rejected."""

    error_type = "replay_cache_failed"
    retriable = True

    def __init__(self, message: str, *, task_id: str = "") -> None:
        super().__init__(message)
        self.task_id = task_id


def signed_message(key_id: str, task_bytes: bytes) -> bytes:
    """Return the bytes an Ed25519 task signature covers."""
    return SIGNATURE_CONTEXT + key_id.encode("utf-8") + b"\x00" + task_bytes


def key_id_for(public_key: Ed25519PublicKey) -> str:
    """Return a key id derived from a public key: 16 hex digits of the SHA-256
    of its raw bytes."""
    raw = public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return hashlib.sha256(raw).hexdigest()[:16]


def _validate_key_id(key_id: str) -> str:
    if not KEY_ID_PATTERN.match(key_id):
        raise ConfigError(
            f"signing key id {key_id[:80]!r} is invalid: use 1 to 64 letters, digits, "
            "'.', '_', ':' or '-', starting with a letter or digit"
        )
    return key_id


class TaskSigner:
    """Signs tasks with the orchestrator's Ed25519 key."""

    def __init__(self, private_key: Ed25519PrivateKey, key_id: str = "") -> None:
        self.private_key = private_key
        self.key_id = _validate_key_id(key_id or key_id_for(private_key.public_key()))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], key_id: str = "") -> TaskSigner:
        """Load the signer from a PEM private key file."""
        return cls(load_private_key(path), key_id)

    def sign(self, task: task_pb2.AgentTask) -> gateway_pb2.SignedTask:
        """Return the task signed, serialized deterministically.

        Raises InvalidTaskError when the task lacks id, agent_id, assigned_at or
        expires_at, which the agent requires of signed tasks.
        """
        missing = [name for name in ("id", "agent_id") if not getattr(task, name)]
        missing += [
            name for name in ("assigned_at", "expires_at") if not task.HasField(name)
        ]
        if missing:
            raise InvalidTaskError(
                f"task {task.id or '(no id)'} cannot be signed without "
                f"{', '.join(missing)}; set them before signing"
            )
        task_bytes = task.SerializeToString(deterministic=True)
        return gateway_pb2.SignedTask(
            task=task_bytes,
            key_id=self.key_id,
            signature=self.private_key.sign(signed_message(self.key_id, task_bytes)),
        )


class TaskVerifier:
    """Checks tasks before the dispatcher receives them. Thread-safe."""

    def __init__(
        self,
        public_keys: Mapping[str, Ed25519PublicKey],
        agent_id: str,
        *,
        require_signatures: bool = True,
        max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW_SECONDS,
        replay_window: float = DEFAULT_REPLAY_WINDOW_SECONDS,
        replay_file: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.public_keys = {
            _validate_key_id(key_id): key for key_id, key in public_keys.items()
        }
        self.agent_id = agent_id
        self.require_signatures = require_signatures
        self.max_clock_skew = max_clock_skew
        """Seconds the orchestrator's clock may be ahead or behind this host's."""
        self.replay_window = replay_window
        """Maximum seconds from now to expires_at that are accepted, which is
        also the maximum time a task id is remembered."""
        self._clock = clock
        self._lock = threading.Lock()
        self._seen = _ReplayCache(Path(replay_file) if replay_file else None)

    def check_unsigned(self, task: task_pb2.AgentTask) -> task_pb2.AgentTask:
        """Return an unsigned task, or raise SignatureError when signatures are
        required."""
        if self.require_signatures:
            raise SignatureError(
                f"task {task.id[:128]!r} is not signed, and this agent accepts only "
                "signed tasks; configure the orchestrator with a signing key",
                task_id=task.id,
            )
        return task

    def verify(self, signed: gateway_pb2.SignedTask) -> task_pb2.AgentTask:
        """Check a signed task and return the task it carries.

        Raises SignatureError for an unknown key, a bad signature, malformed
        bytes or a wrong binding, TaskExpiredError when it has expired, and
        ReplayedTaskError when its id was accepted before.
        """
        claimed_id = _claimed_task_id(signed.task)
        key = self.public_keys.get(signed.key_id)
        if key is None:
            known = ", ".join(sorted(self.public_keys)) or "none"
            raise SignatureError(
                f"task {claimed_id!r} is signed with key {signed.key_id[:80]!r}, which "
                f"this agent does not trust (trusted keys: {known}); add the "
                "orchestrator's public key to the agent config",
                task_id=claimed_id,
            )
        try:
            if len(signed.signature) != SIGNATURE_BYTES:
                raise InvalidSignature
            key.verify(signed.signature, signed_message(signed.key_id, signed.task))
        except InvalidSignature:
            raise SignatureError(
                f"task {claimed_id!r}: the signature of key {signed.key_id} does not "
                "match; the task was changed after signing or signed with another key",
                task_id=claimed_id,
            ) from None
        try:
            task = task_pb2.AgentTask.FromString(signed.task)
        except DecodeError:
            raise SignatureError(
                f"signed task bytes from key {signed.key_id} are not an AgentTask",
                task_id=claimed_id,
            ) from None

        self._check_binding(task)
        with self._lock:
            now = self._clock()
            self._seen.forget_before(now - self.max_clock_skew)
            if self._seen.contains(task.id):
                raise ReplayedTaskError(
                    f"task {task.id} was already received with a valid signature; "
                    "this copy is a replay and is not run",
                    task,
                )
            self._seen.add(task.id, _seconds(task.expires_at))
        return task

    def _check_binding(self, task: task_pb2.AgentTask) -> None:
        """Raise unless the task names this agent and a valid time window."""
        if not task.id:
            raise SignatureError("signed task has no id")
        if task.agent_id != self.agent_id:
            raise SignatureError(
                f"signed task {task.id} is for agent {task.agent_id[:128]!r}, not for "
                f"{self.agent_id!r}",
                task_id=task.id,
            )
        missing = [f for f in ("assigned_at", "expires_at") if not task.HasField(f)]
        if missing:
            raise SignatureError(
                f"signed task {task.id} lacks {', '.join(missing)}; the orchestrator "
                "must set both before signing",
                task_id=task.id,
            )

        now = self._clock()
        assigned, expires = _seconds(task.assigned_at), _seconds(task.expires_at)
        if assigned > now + self.max_clock_skew:
            raise SignatureError(
                f"signed task {task.id} was issued at "
                f"{task.assigned_at.ToJsonString()}, in the future by "
                f"{assigned - now:.0f} s; check the clocks of agent and orchestrator",
                task_id=task.id,
            )
        if expires <= assigned:
            raise SignatureError(
                f"signed task {task.id} expires at {task.expires_at.ToJsonString()}, "
                "not after it was issued",
                task_id=task.id,
            )
        if now >= expires + self.max_clock_skew:
            raise SignedTaskExpiredError(
                f"signed task {task.id} expired at {task.expires_at.ToJsonString()}; "
                "send a new task with a later expires_at",
                task_id=task.id,
            )
        if expires - now > self.replay_window + self.max_clock_skew:
            raise SignatureError(
                f"signed task {task.id} expires at {task.expires_at.ToJsonString()}, "
                f"more than {self.replay_window:.0f} s ahead; the agent accepts "
                "signed tasks only within its replay window",
                task_id=task.id,
            )


def _seconds(stamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def _claimed_task_id(task_bytes: bytes) -> str:
    """Return the id in unverified task bytes, for error messages, or ""."""
    try:
        return task_pb2.AgentTask.FromString(task_bytes).id[:128]
    except DecodeError:
        return ""


class _ReplayCache:
    """Task ids with the time until which they are kept, optionally in a file.

    The file contains one "<expiry seconds> <task id>" line per accepted task and
    is rewritten without expired ids once they make up most of it.
    """

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._expiry: dict[str, float] = {}
        self._lines_in_file = 0
        if path is not None:
            self._load(path)

    def contains(self, task_id: str) -> bool:
        return task_id in self._expiry

    def add(self, task_id: str, expires: float) -> None:
        """Remember `task_id` until `expires`, in the file first if there is one."""
        if self._path is not None:
            try:
                fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, f"{expires:.3f} {task_id}\n".encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise _cache_error(self._path, exc, task_id) from None
            self._lines_in_file += 1
        self._expiry[task_id] = expires

    def forget_before(self, cutoff: float) -> None:
        expired = [task_id for task_id, until in self._expiry.items() if until < cutoff]
        for task_id in expired:
            del self._expiry[task_id]
        if self._path is not None and self._lines_in_file > 2 * len(self._expiry) + 64:
            self._rewrite(self._path)

    def _load(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the replay cache {path}: {exc}") from None
        for line in text.splitlines():
            expires, _, task_id = line.partition(" ")
            try:
                self._expiry[task_id] = float(expires)
            except ValueError:
                logger.warning("replay cache %s: skipped a malformed line", path)
                continue
            self._lines_in_file += 1

    def _rewrite(self, path: Path) -> None:
        temporary = path.with_name(path.name + ".tmp")
        data = "".join(
            f"{until:.3f} {task_id}\n" for task_id, until in self._expiry.items()
        )
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except OSError as exc:
            raise _cache_error(path, exc, "") from None
        self._lines_in_file = len(self._expiry)


def _cache_error(path: Path, exc: OSError, task_id: str) -> ReplayCacheError:
    return ReplayCacheError(
        f"cannot write the replay cache {path}: {exc.strerror}; the task is "
        "rejected because a replay of it could not be detected",
        task_id=task_id,
    )


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from a PEM file."""
    key = _load_pem(path, private=True)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file (a private key file works too)."""
    key = _load_pem(path, private=False)
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return key


def _load_pem(path: str | os.PathLike[str], *, private: bool):
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read signing key {path}: {exc.strerror}") from None
    try:
        if private or b"PRIVATE KEY" in data:
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{path} is not an unencrypted PEM {'private' if private else 'public'} key"
        ) from None


def load_public_keys(specs: Iterable[str]) -> dict[str, Ed25519PublicKey]:
    """Load trusted public keys from "PATH" or "KEY_ID=PATH" entries.

    Without a key id, the id is derived from the key as ``key_id_for`` does, which
    is also what ``TaskSigner`` uses by default.
    """
    keys: dict[str, Ed25519PublicKey] = {}
    for spec in specs:
        key_id, separator, path = spec.partition("=")
        if not separator:
            key_id, path = "", spec
        key = load_public_key(path)
        key_id = _validate_key_id(key_id or key_id_for(key))
        if key_id in keys:
            raise ConfigError(f"signing key id {key_id!r} is configured twice")
        keys[key_id] = key
    return keys


@dataclass(frozen=True)
class SigningKeyFiles:
    """Files written by ``generate_signing_key``."""

    key_id: str
    private_key: Path
    public_key: Path


def generate_signing_key(path: str | os.PathLike[str]) -> SigningKeyFiles:
    """Create an Ed25519 key: the private key at `path` (mode 0600) and the
    public key at `path` + ".pub". Raises ConfigError if either exists."""
    private_path = Path(path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for existing in (private_path, public_path):
        if existing.exists():
            raise ConfigError(
                f"{existing} already exists; choose another path or remove it first"
            )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
        handle.flush()
        os.fsync(handle.fileno())
    public_path.write_bytes(public_pem)
    return SigningKeyFiles(key_id_for(key.public_key()), private_path, public_path)
