"""Host file access confined under a root directory.

Paths from tasks are split into components, and every directory below the root
is opened with ``O_NOFOLLOW`` relative to the descriptor of its parent, the way
``openat(2)`` walks work. A symbolic link anywhere below the root, even one
created between a check and the write, makes the open fail instead of leading
outside the root. Only the root itself, which comes from the agent's
configuration, is opened by its full path.

Files are replaced atomically: a temporary file in the same directory is
written, fsynced and renamed over the target, and the directory is fsynced, so
a reader sees the old file or the new one, never a partial one.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from stella_agent.errors import InvalidTaskError, NotFoundError, TaskError

DIRECTORY_MODE = 0o755
MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class FileAccessError(TaskError):
    """Reading or writing a host file failed (permissions, disk full)."""

    error_type = "file_error"


@dataclass(frozen=True)
class Owner:
    """Numeric owner of a written file; -1 keeps the current value."""

    uid: int = -1
    gid: int = -1


def split_relative_path(path: str, field: str) -> list[str]:
    """Return the components of a relative POSIX path that stays below its root.

    Rejects empty and absolute paths, ".", ".." and empty components, NUL and
    other control characters, and backslashes (which some tools treat as
    separators).
    """
    shown = repr(path[:200])
    if not path:
        raise InvalidTaskError(f"{field} is empty; give a path relative to the root")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise InvalidTaskError(f"{field} {shown} is longer than {MAX_PATH_BYTES} bytes")
    if any(ord(char) < 0x20 or char in "\x7f\\" for char in path):
        raise InvalidTaskError(
            f"{field} {shown} contains a control character or a backslash"
        )
    if path.startswith("/"):
        raise InvalidTaskError(
            f"{field} {shown} is absolute; give a path relative to the root"
        )
    components = path.split("/")
    for component in components:
        if component in ("", ".", ".."):
            raise InvalidTaskError(
                f"{field} {shown} is invalid: it must not contain empty, '.' or "
                "'..' components"
            )
        if len(component.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
            raise InvalidTaskError(
                f"{field} {shown} has a component longer than "
                f"{MAX_COMPONENT_BYTES} bytes"
            )
    return components


def split_absolute_path(path: str, field: str) -> list[str]:
    """Return the components of a normalised absolute path."""
    if not path.startswith("/"):
        raise InvalidTaskError(f"{field} {path[:200]!r} must be an absolute path")
    if path == "/":
        return []
    return split_relative_path(path.rstrip("/")[1:], field)


def locate_under_roots(
    path: str, roots: Iterable[str], field: str
) -> tuple[str, list[str]]:
    """Return (root, components below it) for an absolute `path` that lies
    under one of `roots`; raise InvalidTaskError when it lies under none."""
    components = split_absolute_path(path, field)
    allowed = [root for root in roots if root]
    for root in allowed:
        root_components = split_absolute_path(os.path.normpath(root), "root")
        if components[: len(root_components)] == root_components:
            return os.path.normpath(root), components[len(root_components) :]
    listed = ", ".join(allowed) if allowed else "none are configured"
    raise InvalidTaskError(
        f"{field} {path[:200]!r} is outside the directories this agent may write "
        f"({listed}); use a path under one of them"
    )


def open_root(root: str, *, create: bool) -> int:
    """Open the configured root directory and return its descriptor."""
    if create:
        try:
            os.makedirs(root, DIRECTORY_MODE, exist_ok=True)
        except OSError as exc:
            raise FileAccessError(f"cannot create directory {root}: {exc}") from None
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFoundError(
            f"directory {root} does not exist; create it or fix the agent config"
        ) from None
    except OSError as exc:
        raise FileAccessError(f"cannot open directory {root}: {exc}") from None


def open_directory(
    root_fd: int, components: Sequence[str], *, create: bool, shown: str
) -> int:
    """Walk `components` below `root_fd` and return a descriptor of the last.

    Missing directories are created (mode 0755) when `create` is set; without
    it a missing one raises NotFoundError. A symbolic link or a file on the
    way raises InvalidTaskError. `shown` names the whole path in messages.
    """
    current = os.dup(root_fd)
    try:
        for index, component in enumerate(components):
            walked = "/".join(components[: index + 1])
            kind = _entry_kind(current, component)
            if kind is None:
                if not create:
                    raise NotFoundError(f"{shown}: directory {walked} does not exist")
                try:
                    os.mkdir(component, DIRECTORY_MODE, dir_fd=current)
                except FileExistsError:
                    pass
            elif kind == "link":
                raise InvalidTaskError(
                    f"{shown} passes through the symbolic link {walked}; "
                    "links are not followed below the root"
                )
            elif kind != "directory":
                raise InvalidTaskError(f"{shown}: {walked} is not a directory")
            following = _open_component(current, component, shown, walked)
            os.close(current)
            current = following
        return current
    except BaseException:
        os.close(current)
        raise


def write_file_at(
    directory_fd: int,
    name: str,
    data: bytes,
    mode: int,
    *,
    owner: Owner | None = None,
    shown: str,
) -> None:
    """Replace `name` in the directory atomically with `data`.

    The existing entry must be absent or a regular file: a symbolic link or a
    directory under that name raises InvalidTaskError.
    """
    kind = _entry_kind(directory_fd, name)
    if kind == "link":
        raise InvalidTaskError(
            f"{shown} is a symbolic link; remove it, links are never replaced"
        )
    if kind not in (None, "file"):
        raise InvalidTaskError(f"{shown} exists and is not a regular file")

    temporary = f".{name[:200]}.stella-{uuid.uuid4().hex[:12]}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        descriptor = os.open(temporary, flags, 0o600, dir_fd=directory_fd)
    except OSError as exc:
        raise FileAccessError(
            f"cannot create a temporary file for {shown}: {exc}"
        ) from None
    try:
        try:
            _write_all(descriptor, data)
            if owner is not None and (owner.uid >= 0 or owner.gid >= 0):
                os.fchown(descriptor, owner.uid, owner.gid)
            # After chown, which clears set-id bits; the umask does not apply.
            os.fchmod(descriptor, mode)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.rename(temporary, name, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
    except OSError as exc:
        _unlink_quietly(directory_fd, temporary)
        raise FileAccessError(f"writing {shown} failed: {exc}") from None
    except BaseException:
        _unlink_quietly(directory_fd, temporary)
        raise
    os.fsync(directory_fd)


def read_file_at(directory_fd: int, name: str, limit: int, *, shown: str) -> bytes:
    """Read the regular file `name` of the directory, at most `limit` bytes.

    Raises NotFoundError when it is missing, InvalidTaskError for a link or a
    file larger than `limit`.
    """
    try:
        descriptor = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory_fd
        )
    except FileNotFoundError:
        raise NotFoundError(f"{shown} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidTaskError(
                f"{shown} is a symbolic link; links are not followed"
            ) from None
        raise FileAccessError(f"cannot open {shown}: {exc}") from None
    with os.fdopen(descriptor, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise InvalidTaskError(f"{shown} is not a regular file")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise InvalidTaskError(f"{shown} is larger than {limit} bytes")
    return data


def display_path(root: str, components: Sequence[str]) -> str:
    """Return the full path of `components` below `root`, for messages."""
    return str(PurePosixPath(root, *components))


def _entry_kind(directory_fd: int, name: str) -> str | None:
    try:
        info = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return "link"
    if stat.S_ISDIR(info.st_mode):
        return "directory"
    if stat.S_ISREG(info.st_mode):
        return "file"
    return "other"


def _open_component(directory_fd: int, component: str, shown: str, walked: str) -> int:
    try:
        return os.open(component, _DIRECTORY_FLAGS, dir_fd=directory_fd)
    except OSError as exc:
        # ELOOP or ENOTDIR: the entry was swapped for a link or a file after
        # it was checked.
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise InvalidTaskError(
                f"{shown}: {walked} changed into a symbolic link or a file "
                "while it was opened"
            ) from None
        raise FileAccessError(
            f"cannot open directory {walked} of {shown}: {exc}"
        ) from None


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(descriptor, view)
        view = view[written:]


def _unlink_quietly(directory_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=directory_fd)
    except OSError:
        pass
