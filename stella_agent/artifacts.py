"""Artifacts: the files a task carries or names, checked and written to disk.

An ``ArtifactReference`` either carries its content inline or is fetched from
the orchestrator through an ``ArtifactFetcher``. Either way the content must
match the reference's sha256 before anything is written. Names are relative
POSIX paths confined to a root directory: absolute names, ``.`` and ``..``
components and paths through symbolic links are rejected.

Files are written atomically (a temporary file in the same directory, fsync,
rename, fsync of the directory), so a reader sees the old file or the new one,
never a partial one. Secret artifacts are always written with mode 0600.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from stella.agent.v1 import task_pb2
from stella_agent.errors import DigestMismatchError, InvalidTaskError

ArtifactFetcher = Callable[[str, str, str], Awaitable[bytes]]
"""``async fetch(task_id, name, sha256) -> bytes``: the content of one artifact.
It must raise a ``TaskError`` (for example ``NotFoundError``) when it fails."""

ARTIFACT_TYPES = ("compose_lock", "config")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MAX_NAME_BYTES = 1024
MAX_COMPONENT_BYTES = 255
DEFAULT_MAX_TOTAL_BYTES = 256 * 1024 * 1024
"""Maximum total size in bytes of the artifacts of one task. It guards the
agent's memory against a wrong size or a misbehaving fetcher, because the
content is held in memory until it is written."""
DEFAULT_FILE_MODE = 0o644
SECRET_FILE_MODE = 0o600
DIRECTORY_MODE = 0o755


@dataclass(frozen=True)
class Artifact:
    """An artifact whose content was obtained and matched its sha256."""

    name: str
    """Relative POSIX path, already checked by ``validate_artifact_name``."""
    type: str
    sha256: str
    content: bytes
    mode: int
    """Permission bits the file is written with."""
    secret: bool


def validate_artifact_name(name: str) -> str:
    """Return `name` if it is a relative path that stays inside its root."""
    if not name:
        raise InvalidTaskError(
            "artifact name is empty; give a path relative to the deployment directory"
        )
    shown = repr(name[:200])  # bounded, so a huge name cannot flood the log
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidTaskError(
            f"artifact name {shown} is longer than {MAX_NAME_BYTES} bytes"
        )
    if any(ord(char) < 0x20 or char in "\x7f\\" for char in name):
        raise InvalidTaskError(
            f"artifact name {shown} contains a control character or a backslash"
        )
    if name.startswith("/"):
        raise InvalidTaskError(
            f"artifact name {shown} is absolute; "
            "give a path relative to the deployment directory"
        )
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise InvalidTaskError(
                f"artifact name {shown} is invalid: "
                "it must not contain empty, '.' or '..' components"
            )
        if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
            raise InvalidTaskError(
                f"artifact name {shown} has a component longer than "
                f"{MAX_COMPONENT_BYTES} bytes"
            )
    return name


def validate_sha256(value: str, name: str) -> str:
    """Return `value` if it is 64 lowercase hex digits."""
    if not SHA256_PATTERN.match(value):
        raise InvalidTaskError(
            f"artifact {name!r} has an invalid sha256 {value[:80]!r}: "
            "expected 64 lowercase hex digits"
        )
    return value


def file_mode(reference: task_pb2.ArtifactReference) -> int:
    """Return the permission bits an artifact is written with."""
    if reference.mode & ~0o777:
        raise InvalidTaskError(
            f"artifact {reference.name!r} has mode {reference.mode:#o}, but only "
            "permission bits (0o000 to 0o777) are allowed: no setuid, setgid or "
            "sticky bit"
        )
    if reference.secret:
        return SECRET_FILE_MODE
    return reference.mode or DEFAULT_FILE_MODE


async def materialise_artifacts(
    references: Sequence[task_pb2.ArtifactReference],
    task_id: str,
    fetcher: ArtifactFetcher | None,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> list[Artifact]:
    """Check every reference, obtain its content and verify its sha256.

    Inline content is used when present, and `fetcher` is called otherwise.
    All references are checked before the first fetch, so a malformed task
    fails without network traffic.
    """
    seen: set[str] = set()
    declared_total = 0
    for reference in references:
        validate_artifact_name(reference.name)
        if reference.name in seen:
            raise InvalidTaskError(f"artifact {reference.name!r} is listed twice")
        seen.add(reference.name)
        if reference.type not in ARTIFACT_TYPES:
            raise InvalidTaskError(
                f"artifact {reference.name!r} has unknown type {reference.type!r}; "
                f"expected one of: {', '.join(ARTIFACT_TYPES)}"
            )
        validate_sha256(reference.sha256, reference.name)
        file_mode(reference)
        declared_total += max(reference.size, len(reference.content))
    if declared_total > max_total_bytes:
        raise InvalidTaskError(
            f"the task's artifacts total {declared_total} bytes, more than the "
            f"limit of {max_total_bytes} bytes"
        )

    artifacts = []
    total = 0
    for reference in references:
        content = await _content_of(reference, task_id, fetcher)
        total += len(content)
        if total > max_total_bytes:
            raise InvalidTaskError(
                f"the task's artifacts exceed the limit of {max_total_bytes} bytes "
                f"(reached at {reference.name!r})"
            )
        actual = hashlib.sha256(content).hexdigest()
        if actual != reference.sha256:
            raise DigestMismatchError(
                f"artifact {reference.name!r} has sha256 {actual}, expected "
                f"{reference.sha256}: the content was changed or corrupted on the way "
                "(possible tampering)"
            )
        if reference.size and reference.size != len(content):
            raise InvalidTaskError(
                f"artifact {reference.name!r} is {len(content)} bytes, but its "
                f"reference gives the size {reference.size}"
            )
        artifacts.append(
            Artifact(
                name=reference.name,
                type=reference.type,
                sha256=reference.sha256,
                content=content,
                mode=file_mode(reference),
                secret=reference.secret,
            )
        )
    return artifacts


async def _content_of(
    reference: task_pb2.ArtifactReference, task_id: str, fetcher: ArtifactFetcher | None
) -> bytes:
    # Empty inline content is the same on the wire as "fetch it", so an empty
    # file is recognised by its hash instead.
    if reference.content or reference.sha256 == EMPTY_SHA256:
        return reference.content
    if fetcher is None:
        raise InvalidTaskError(
            f"artifact {reference.name!r} has no inline content and this agent has "
            "no artifact fetcher; put the content in ArtifactReference.content or "
            "run the agent connected to an orchestrator"
        )
    return await fetcher(task_id, reference.name, reference.sha256)


def confined_path(root: Path, name: str, *, create_parents: bool = False) -> Path:
    """Return ``root / name`` after checking that no parent is a symbolic link.

    The final component may be a symbolic link, because callers replace it
    with ``rename``, which replaces the link itself and never follows it.
    Missing parent directories are created when `create_parents` is set.
    """
    validate_artifact_name(name)
    parts = PurePosixPath(name).parts
    current = root
    for part in parts[:-1]:
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            if not create_parents:
                return root.joinpath(*parts)
            os.mkdir(current, DIRECTORY_MODE)
            continue
        if stat.S_ISLNK(info.st_mode):
            raise InvalidTaskError(
                f"artifact {name!r} would be written through the symbolic link "
                f"{current}; remove the link from the deployment directory"
            )
        if not stat.S_ISDIR(info.st_mode):
            raise InvalidTaskError(
                f"artifact {name!r} needs {current} to be a directory, but it is a file"
            )
    return root.joinpath(*parts)


def write_file_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` atomically, with permission bits `mode`."""
    temporary = path.with_name(f".{path.name}.stella-tmp-{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(temporary, flags, mode)
    try:
        # The umask may have removed bits from `mode`, so set them exactly.
        os.fchmod(descriptor, mode)
        view = memoryview(data)
        while view:
            written = os.write(descriptor, view)
            view = view[written:]
        os.fsync(descriptor)
    except BaseException:
        os.close(descriptor)
        _unlink_quietly(temporary)
        raise
    os.close(descriptor)
    try:
        os.rename(temporary, path)
    except BaseException:
        _unlink_quietly(temporary)
        raise
    fsync_directory(path.parent)


def read_file_confined(root: Path, name: str) -> bytes:
    """Read ``root / name`` without following a symbolic link anywhere in `name`."""
    path = confined_path(root, name)
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(descriptor, "rb") as file:
        return file.read()


def write_artifacts(root: Path, files: Iterable[tuple[str, bytes, int]]) -> None:
    """Write each ``(name, content, mode)`` under `root`, atomically and confined."""
    for name, content, mode in files:
        path = confined_path(root, name, create_parents=True)
        write_file_atomic(path, content, mode)


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries, so that a rename in it survives a crash."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
