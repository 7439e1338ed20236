"""The upload-files task: files written under a host directory or into a container.

Every file and the whole task are checked before the first byte is written:
each path must be relative, without "." or ".." components (see
``confined_fs.split_relative_path``), listed once, with permission bits only
(no setuid, setgid or sticky bit), a numeric owner "uid" or "uid:gid", content
matching its sha256 when one is given, and all content together within
``tasks.max_upload_bytes``.

On the host, ``target_directory`` must lie under one of ``tasks.upload_roots``
(none are configured by default, which disables host uploads). Directories are
walked with ``O_NOFOLLOW`` from the root's descriptor, so no symbolic link
below the root is followed, and each file is replaced atomically.

In a container, paths are relative to ``container_directory``. Before the
upload, every component below that directory is checked through the Engine's
archive stat (``HEAD /containers/{id}/archive``), and a symbolic link
anywhere on a path is rejected. Then one tar archive built by the agent is
unpacked with ``put_archive``, which applies the modes and owners in its
headers.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stella.agent.v1 import task_pb2
from stella_agent.errors import DigestMismatchError, InvalidTaskError, NotFoundError
from stella_agent.executors.base import Outcome, TaskContext
from stella_agent.executors.confined_fs import (
    Owner,
    display_path,
    locate_under_roots,
    open_directory,
    open_root,
    split_absolute_path,
    split_relative_path,
    write_file_at,
)
from stella_agent.executors.containers import find_container
from stella_agent.executors.docker_errors import DOCKER_EXCEPTIONS, docker_error
from stella_agent.tasks import validate_container_name

DEFAULT_FILE_MODE = 0o644
OWNER_PATTERN = re.compile(r"^([0-9]{1,10})(?::([0-9]{1,10}))?$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
MAX_ID = 2**32 - 2
"""Largest uid or gid; 2**32 - 1 means "unchanged" to chown."""
# Go's os.FileMode bits as Docker reports them in an archive stat.
_GO_MODE_DIR = 1 << 31
_GO_MODE_SYMLINK = 1 << 27


@dataclass(frozen=True)
class UploadFile:
    """One checked file of an upload-files task."""

    path: str
    components: list[str]
    content: bytes
    mode: int
    owner: Owner | None
    sha256: str


def check_files(
    files: Sequence[task_pb2.FileUpload], max_total_bytes: int
) -> list[UploadFile]:
    """Check every file of the task and return them; raise InvalidTaskError or
    DigestMismatchError naming the first bad one."""
    if not files:
        raise InvalidTaskError("upload_files.files is empty; list the files to write")
    seen: set[str] = set()
    total = 0
    checked = []
    for index, upload in enumerate(files):
        field = f"upload_files.files[{index}].path"
        components = split_relative_path(upload.path, field)
        normalised = "/".join(components)
        if normalised in seen:
            raise InvalidTaskError(f"{field} {upload.path!r} is listed twice")
        seen.add(normalised)
        total += len(upload.content)
        if total > max_total_bytes:
            raise InvalidTaskError(
                f"the files of this task exceed tasks.max_upload_bytes "
                f"({max_total_bytes} bytes), reached at {upload.path!r}"
            )
        checked.append(
            UploadFile(
                path=normalised,
                components=components,
                content=upload.content,
                mode=parse_mode(upload.mode, upload.path),
                owner=parse_owner(upload.owner, upload.path),
                sha256=check_sha256(upload, normalised),
            )
        )
    return checked


def parse_mode(mode: int, path: str) -> int:
    """Return the permission bits of a file; zero means 0o644."""
    if mode & ~0o777:
        raise InvalidTaskError(
            f"file {path!r} has mode {mode:#o}, but only permission bits (0o000 to "
            "0o777) are allowed: no setuid, setgid or sticky bit"
        )
    return mode or DEFAULT_FILE_MODE


def parse_owner(owner: str, path: str) -> Owner | None:
    """Parse "uid" or "uid:gid" (numeric); empty means unchanged."""
    if not owner:
        return None
    match = OWNER_PATTERN.match(owner)
    if match is None:
        raise InvalidTaskError(
            f"file {path!r} has owner {owner[:100]!r}; expected a numeric uid or "
            "uid:gid, for example 1000:1000"
        )
    uid = int(match[1])
    gid = int(match[2]) if match[2] is not None else -1
    if uid > MAX_ID or gid > MAX_ID:
        raise InvalidTaskError(f"file {path!r} has owner {owner!r} out of range")
    return Owner(uid, gid)


def check_sha256(upload: task_pb2.FileUpload, path: str) -> str:
    """Return the content's sha256 after checking it against the expected one."""
    actual = hashlib.sha256(upload.content).hexdigest()
    if upload.sha256:
        if not SHA256_PATTERN.match(upload.sha256):
            raise InvalidTaskError(
                f"file {path!r} has an invalid sha256 {upload.sha256[:80]!r}: "
                "expected 64 lowercase hex digits"
            )
        if upload.sha256 != actual:
            raise DigestMismatchError(
                f"file {path!r} has sha256 {actual}, expected {upload.sha256}: the "
                "content was changed or corrupted on the way; nothing was written"
            )
    return actual


def upload_files(context: TaskContext, client: Any) -> Outcome:
    """Run an upload-files task of the Docker executor."""
    payload = context.task.upload_files
    context.set_phase("validate")
    files = check_files(payload.files, context.config.tasks.max_upload_bytes)
    if payload.container_name:
        name = validate_container_name(
            payload.container_name, "upload_files.container_name"
        )
        container = find_container(client, name)
        if container is None:
            raise NotFoundError(f"container {name} not found")
        return upload_to_container(context, client, container, files)
    return upload_to_host(context, payload.target_directory, files)


def upload_to_host(
    context: TaskContext, target_directory: str, files: list[UploadFile]
) -> Outcome:
    """Write the files under `target_directory` on the host."""
    if not target_directory:
        raise InvalidTaskError(
            "upload_files.target_directory is required when no container_name is set"
        )
    root, below = locate_under_roots(
        target_directory,
        context.config.tasks.upload_roots,
        "upload_files.target_directory",
    )
    target = display_path(root, below)
    root_fd = open_root(root, create=False)
    try:
        # Check every path before writing, so that a link or a file in the
        # way of the last file does not leave the first ones written.
        for upload in files:
            _check_host_path(root_fd, [*below, *upload.components], root)

        context.set_phase("write")
        target_fd = open_directory(root_fd, below, create=True, shown=target)
        try:
            for upload in files:
                shown = display_path(target, upload.components)
                directory_fd = open_directory(
                    target_fd, upload.components[:-1], create=True, shown=shown
                )
                try:
                    write_file_at(
                        directory_fd,
                        upload.components[-1],
                        upload.content,
                        upload.mode,
                        owner=upload.owner,
                        shown=shown,
                    )
                finally:
                    os.close(directory_fd)
                context.log.info(
                    "wrote %s (%d bytes, mode %#o)",
                    shown,
                    len(upload.content),
                    upload.mode,
                )
        finally:
            os.close(target_fd)
    finally:
        os.close(root_fd)
    return Outcome(outputs=_outputs(files, {"target_directory": target}))


def upload_to_container(
    context: TaskContext, client: Any, container: Any, files: list[UploadFile]
) -> Outcome:
    """Write the files into `container` under the payload's container_directory."""
    directory = context.task.upload_files.container_directory or "/"
    root_components = split_absolute_path(directory, "upload_files.container_directory")
    root = "/" + "/".join(root_components)
    # put_archive needs an existing directory: unpack at the deepest existing
    # one, with the missing directories as a prefix of every archive entry.
    base, missing = _existing_base(client, container, root_components)
    if not missing:
        for upload in files:
            _check_container_path(client, container, root, upload)

    context.set_phase("write")
    archive = build_archive(files, prefix=missing)
    try:
        container.put_archive(base, archive)
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(
            exc, f"copy files into {root} of container {container.name}"
        ) from None
    for upload in files:
        context.log.info(
            "wrote %s in container %s (%d bytes, mode %#o)",
            display_path(root, upload.components),
            container.name,
            len(upload.content),
            upload.mode,
        )
    outputs = {"container_name": container.name, "container_directory": root}
    return Outcome(outputs=_outputs(files, outputs))


def build_archive(files: list[UploadFile], prefix: Sequence[str] = ()) -> bytes:
    """Return an uncompressed tar of the files, with their modes and owners,
    each path below the directories `prefix`.

    The archive holds no directory entries: Docker creates missing parents
    (mode 0755, owned by root) and leaves existing directories as they are.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for upload in files:
            info = tarfile.TarInfo("/".join([*prefix, *upload.components]))
            info.size = len(upload.content)
            info.mode = upload.mode
            owner = upload.owner or Owner(0, 0)
            info.uid = max(owner.uid, 0)
            info.gid = max(owner.gid, 0)
            archive.addfile(info, io.BytesIO(upload.content))
    return buffer.getvalue()


def _check_host_path(root_fd: int, components: list[str], root: str) -> None:
    """Raise when an existing component of the path is a link, or a file where
    a directory must be. Missing components are fine: they are created."""
    current = os.dup(root_fd)
    try:
        for index, component in enumerate(components):
            walked = display_path(root, components[: index + 1])
            try:
                info = os.stat(component, dir_fd=current, follow_symlinks=False)
            except FileNotFoundError:
                return
            last = index == len(components) - 1
            if stat.S_ISLNK(info.st_mode):
                raise InvalidTaskError(
                    f"{display_path(root, components)} passes through the symbolic "
                    f"link {walked}; links are not followed"
                )
            if last:
                if not stat.S_ISREG(info.st_mode):
                    raise InvalidTaskError(f"{walked} exists and is not a regular file")
                return
            if not stat.S_ISDIR(info.st_mode):
                raise InvalidTaskError(f"{walked} is not a directory")
            following = os.open(
                component,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=current,
            )
            os.close(current)
            current = following
    finally:
        os.close(current)


def _existing_base(
    client: Any, container: Any, components: list[str]
) -> tuple[str, list[str]]:
    """Return the deepest existing directory of the path `components` in the
    container, and the components below it that are missing."""
    for depth in range(len(components), 0, -1):
        path = "/" + "/".join(components[:depth])
        info = _container_stat(client, container, path)
        if info is None:
            continue
        mode = int(info.get("mode") or 0)
        if not mode & (_GO_MODE_DIR | _GO_MODE_SYMLINK):
            raise InvalidTaskError(
                f"{path} in container {container.name} is not a directory"
            )
        return path, components[depth:]
    return "/", components


def _check_container_path(
    client: Any, container: Any, root: str, upload: UploadFile
) -> None:
    # NOTE: a process inside the container can still swap a directory for a
    # link between this check and put_archive. Docker then keeps the write
    # inside the container's root filesystem, but not inside the directory.
    for index in range(len(upload.components)):
        walked = display_path(root, upload.components[: index + 1])
        info = _container_stat(client, container, walked)
        if info is None:
            return
        mode = int(info.get("mode") or 0)
        last = index == len(upload.components) - 1
        if mode & _GO_MODE_SYMLINK:
            raise InvalidTaskError(
                f"{display_path(root, upload.components)} passes through the symbolic "
                f"link {walked} in container {container.name}; links are not followed"
            )
        if not last and not mode & _GO_MODE_DIR:
            raise InvalidTaskError(
                f"{walked} in container {container.name} is not a directory"
            )
        if last and mode & _GO_MODE_DIR:
            raise InvalidTaskError(
                f"{walked} in container {container.name} is a directory, not a file"
            )


def _container_stat(client: Any, container: Any, path: str) -> dict[str, Any] | None:
    """Return Docker's stat of `path` in the container, or None if missing."""
    api = client.api
    # docker-py has no method for this request, which returns only the
    # X-Docker-Container-Path-Stat header.
    url = api._url("/containers/{0}/archive", container.id)
    try:
        response = api.head(url, params={"path": path})
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"check {path} in container {container.name}") from None
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise InvalidTaskError(
            f"checking {path} in container {container.name} failed with HTTP "
            f"{response.status_code}"
        )
    header = response.headers.get("X-Docker-Container-Path-Stat", "")
    return json.loads(base64.b64decode(header)) if header else {}


def _outputs(files: list[UploadFile], extra: dict[str, str]) -> dict[str, str]:
    listing = [
        {"path": upload.path, "size": len(upload.content), "sha256": upload.sha256}
        for upload in files
    ]
    return {
        **extra,
        "files_written": str(len(files)),
        "bytes_written": str(sum(len(upload.content) for upload in files)),
        "files": json.dumps(listing, sort_keys=True),
    }
