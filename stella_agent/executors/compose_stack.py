"""The on-disk state of a Compose stack: its directory, releases and backup.

Each stack has one deployment directory, by default
``<state_dir>/stacks/<project name>``. The live release's files sit directly in
it, because Compose resolves relative paths (env files, bind mounts) from the
directory of the compose file. Everything the agent keeps for itself is under
``.stella/``::

    <deployment directory>/
      compose.stella.lock.yml     live release: the lock file ...
      <config artifacts>          ... and its config files
      version.json                version sticker of the live release
      .stella/
        stack.json                claim: the stack name that owns this project
        lock                      flock held by the task working on the stack
        release.json              record of the live release
        staging/                  a new release being verified (snapshot)
        backup/                   the release that was live before (snapshot)
        displaced/                the older backup, kept until a switch succeeds

A snapshot is a directory with ``release.json`` and the release's files under
``files/``. Only files listed in a release record are ever moved or removed,
so data that services write into the directory (bind mounts) is left alone.

All functions here block on disk I/O; callers run them in a worker thread.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stella_agent.artifacts import (
    SECRET_FILE_MODE,
    confined_path,
    read_file_confined,
    write_artifacts,
    write_file_atomic,
)
from stella_agent.config import AgentConfig
from stella_agent.errors import InvalidTaskError, TaskError

LOCK_FILE_NAME = "compose.stella.lock.yml"
VERSION_FILE_NAME = "version.json"
ENV_FILE_NAME = ".env"
"""The environment file Compose reads by default; the agent passes it with
``--env-file`` only when the release lists it."""
AGENT_DIRECTORY_NAME = ".stella"
RESERVED_NAMES = (LOCK_FILE_NAME, VERSION_FILE_NAME, AGENT_DIRECTORY_NAME)
"""Top-level names a config artifact may not take."""
STACKS_DIRECTORY_NAME = "stacks"
MAX_PROJECT_NAME_LENGTH = 63
MAX_STACK_NAME_LENGTH = 253
PRIVATE_DIRECTORY_MODE = 0o700
BACKUP_TEMPORARY_NAME = "backup.tmp"


def validate_stack_name(stack_name: str) -> str:
    """Return `stack_name` if it is usable as a stack name."""
    if not stack_name:
        raise InvalidTaskError("stack_name is required for the Compose executor")
    if len(stack_name) > MAX_STACK_NAME_LENGTH:
        raise InvalidTaskError(
            f"stack_name is longer than {MAX_STACK_NAME_LENGTH} characters"
        )
    if any(not char.isprintable() for char in stack_name):
        raise InvalidTaskError(
            f"stack_name {stack_name[:100]!r} contains a non-printable character"
        )
    return stack_name


def project_name_for(stack_name: str) -> str:
    """Derive the Compose project name of a stack.

    Compose accepts lowercase letters, digits, '-' and '_', starting with a
    letter or digit. The name is lowercased, every run of other characters
    becomes one '-', leading and trailing '-' and '_' are dropped and the
    result is cut to 63 characters. Different stack names can map to the same
    project name ("Shop" and "shop"); the stack claim catches that.
    """
    validate_stack_name(stack_name)
    name = re.sub(r"[^a-z0-9_-]+", "-", stack_name.lower())
    name = name.strip("-_")[:MAX_PROJECT_NAME_LENGTH].rstrip("-_")
    if not name:
        raise InvalidTaskError(
            f"stack_name {stack_name[:100]!r} has no letter or digit to build a "
            "Compose project name from"
        )
    return name


def resolve_stack_directory(
    config: AgentConfig, project_name: str, requested: str
) -> Path:
    """Return the deployment directory of a stack.

    The default is under the state directory. A requested directory must be
    absolute and lie strictly inside one of ``tasks.allowed_deployment_roots``
    after symbolic links are resolved.
    """
    if not requested:
        return (config.state_path / STACKS_DIRECTORY_NAME / project_name).resolve()
    if not os.path.isabs(requested):
        raise InvalidTaskError(
            f"deployment_directory {requested[:200]!r} must be an absolute path"
        )
    candidate = Path(os.path.realpath(requested))
    for root in config.tasks.allowed_deployment_roots:
        resolved_root = Path(os.path.realpath(root))
        if candidate != resolved_root and candidate.is_relative_to(resolved_root):
            return candidate
    allowed = ", ".join(config.tasks.allowed_deployment_roots) or "none configured"
    raise InvalidTaskError(
        f"deployment_directory {requested[:200]!r} is not inside an allowed root "
        f"(tasks.allowed_deployment_roots: {allowed}); leave it empty to use the "
        "default under the state directory"
    )


@dataclass
class ReleaseFile:
    """One file of a release, relative to the deployment directory."""

    name: str
    mode: int
    sha256: str


@dataclass
class ReleaseRecord:
    """A release that the agent deployed, as stored in release.json."""

    stack_name: str
    project_name: str
    task_id: str
    release_id: str = ""
    release_name: str = ""
    deployed_at: str = ""
    """ISO 8601 time at which the release was staged."""
    expected_digests: dict[str, str] = field(default_factory=dict)
    files: list[ReleaseFile] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    """Environment of the Compose commands, needed to bring the release up
    again. It may hold secrets, so release.json is written with mode 0600."""
    health_timeout_seconds: float = 0.0
    """Time the release has to become healthy; 0 means the agent's default."""
    settle_seconds: float = 0.0
    """Settle period of services without a health check; 0 means the agent's default."""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> ReleaseRecord:
        raw = json.loads(data)
        raw["files"] = [ReleaseFile(**item) for item in raw.get("files", [])]
        return cls(**raw)

    @property
    def key(self) -> str:
        """Identity of this release: the id of the task that staged it and
        when. A rollback moves a record unchanged, so the key follows it."""
        return f"{self.task_id}@{self.deployed_at}"


class StackStateError(TaskError):
    """The stack directory is in a state the agent cannot work with."""

    error_type = "stack_state_error"


class StackPaths:
    """Paths of one stack's deployment directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.agent_directory = directory / AGENT_DIRECTORY_NAME
        self.claim_file = self.agent_directory / "stack.json"
        self.lock_file = self.agent_directory / "lock"
        self.release_file = self.agent_directory / "release.json"
        self.staging = self.agent_directory / "staging"
        self.backup = self.agent_directory / "backup"
        self.displaced = self.agent_directory / "displaced"
        self.compose_file = directory / LOCK_FILE_NAME
        self.version_file = directory / VERSION_FILE_NAME


def snapshot_files_directory(snapshot: Path) -> Path:
    """Return the directory holding a snapshot's release files."""
    return snapshot / "files"


def check_agent_directories(paths: StackPaths) -> None:
    """Raise StackStateError when the deployment directory, ``.stella/`` or a
    snapshot directory in it is a symbolic link or not a directory.

    Anyone who can write the deployment directory (a service with it
    bind-mounted) could plant such a link to make the agent write or delete
    outside the directory. Missing directories pass, because the agent
    creates them. NOTE: a link planted between this check and a later use
    of a directory is still followed, except by the reads and the lock that
    open their final component with O_NOFOLLOW.
    """
    directories = [paths.directory, paths.agent_directory]
    for snapshot in (
        paths.staging,
        paths.backup,
        paths.displaced,
        paths.agent_directory / BACKUP_TEMPORARY_NAME,
    ):
        directories += [snapshot, snapshot_files_directory(snapshot)]
    for directory in directories:
        try:
            info = os.lstat(directory)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode):
            raise StackStateError(
                f"{directory} is a symbolic link, which the agent does not follow "
                "in a stack's own directories; remove the link and send the task "
                "again"
            )
        if not stat.S_ISDIR(info.st_mode):
            raise StackStateError(
                f"{directory} is not a directory; remove it and send the task again"
            )


def read_file_no_follow(path: Path) -> bytes:
    """Read `path`, raising OSError (ELOOP) when it is a symbolic link."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(descriptor, "rb") as file:
        return file.read()


def read_claim(paths: StackPaths) -> str | None:
    """Return the stack name that claimed this directory, if any."""
    try:
        data = json.loads(read_file_no_follow(paths.claim_file))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StackStateError(
            f"cannot read the stack claim {paths.claim_file}: {exc}"
        ) from None
    return str(data.get("stack_name", ""))


def check_claim(paths: StackPaths, stack_name: str, project_name: str) -> None:
    """Raise when the directory belongs to another stack of the same project name."""
    owner = read_claim(paths)
    if owner is not None and owner != stack_name:
        raise InvalidTaskError(
            f"stack {stack_name!r} maps to Compose project {project_name!r}, which "
            f"stack {owner!r} already uses in {paths.directory}; rename one of the "
            "stacks",
            error_type="conflict",
        )


def claim(paths: StackPaths, stack_name: str, project_name: str) -> None:
    """Create the stack directory and record which stack owns it."""
    check_agent_directories(paths)
    paths.directory.mkdir(parents=True, exist_ok=True)
    paths.agent_directory.mkdir(mode=PRIVATE_DIRECTORY_MODE, exist_ok=True)
    check_agent_directories(paths)
    check_claim(paths, stack_name, project_name)
    if read_claim(paths) is None:
        body = json.dumps(
            {"stack_name": stack_name, "project_name": project_name}, indent=2
        )
        write_file_atomic(paths.claim_file, body.encode("utf-8"), 0o644)


class StackLock:
    """An exclusive flock on the stack, so two tasks never change it at once."""

    def __init__(self, paths: StackPaths) -> None:
        self._path = paths.lock_file
        self._descriptor: int | None = None

    def acquire(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        descriptor = os.open(self._path, flags, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(descriptor)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise TaskError(
                    "another task is working on the stack in "
                    f"{self._path.parent.parent}; send this one again when it has "
                    "finished",
                    error_type="busy",
                    retriable=True,
                ) from None
            raise
        self._descriptor = descriptor

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


def read_release(record_file: Path) -> ReleaseRecord | None:
    """Read a release record, or return None when there is none."""
    try:
        return ReleaseRecord.from_json(read_file_no_follow(record_file))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise StackStateError(
            f"cannot read the release record {record_file}: {exc}"
        ) from None


def tidy(paths: StackPaths) -> None:
    """Put back what an interrupted task left behind, before a new task starts.

    A leftover staging snapshot, or half-written backup, is dropped. A
    leftover displaced backup means a switch never finished: it becomes the
    backup again unless a newer backup exists.
    """
    check_agent_directories(paths)
    shutil.rmtree(paths.staging, ignore_errors=True)
    shutil.rmtree(paths.agent_directory / BACKUP_TEMPORARY_NAME, ignore_errors=True)
    if paths.displaced.exists():
        # A backup without its record was being removed when the task died.
        if (paths.backup / "release.json").is_file():
            shutil.rmtree(paths.displaced)
        else:
            shutil.rmtree(paths.backup, ignore_errors=True)
            os.rename(paths.displaced, paths.backup)


def write_snapshot(
    snapshot: Path, files: list[tuple[str, bytes, int]], record: ReleaseRecord
) -> None:
    """Write a release's files and record into a fresh snapshot directory."""
    shutil.rmtree(snapshot, ignore_errors=True)
    snapshot.mkdir(mode=PRIVATE_DIRECTORY_MODE)
    files_directory = snapshot_files_directory(snapshot)
    files_directory.mkdir()
    write_artifacts(files_directory, files)
    write_file_atomic(snapshot / "release.json", record.to_json(), SECRET_FILE_MODE)


@dataclass
class Switch:
    """The change made by ``promote``, which ``restore`` undoes."""

    previous: ReleaseRecord | None
    """The release that was live before, now in the backup; None when the
    stack had no live release."""


def promote(paths: StackPaths, source: Path, log: list[str]) -> Switch:
    """Make the snapshot `source` the live release, keeping the live one as backup.

    The existing backup moves to ``displaced`` unless `source` is that
    directory already (a rollback promotes the displaced backup). Lines
    describing skipped files are appended to `log`.
    """
    if source != paths.displaced and paths.backup.exists():
        shutil.rmtree(paths.displaced, ignore_errors=True)
        os.rename(paths.backup, paths.displaced)

    previous = read_release(paths.release_file)
    if previous is not None:
        _snapshot_live(paths, previous, log)

    record = read_release(source / "release.json")
    if record is None:
        raise StackStateError(f"snapshot {source} has no release.json")
    _install(paths, snapshot_files_directory(source), record, previous)
    return Switch(previous=previous)


def restore(paths: StackPaths, switch: Switch) -> None:
    """Undo ``promote``: the backup becomes live again and the displaced backup
    becomes the backup. Without a previous release the live files are removed."""
    current = read_release(paths.release_file)
    if switch.previous is not None:
        backup_record = read_release(paths.backup / "release.json")
        if backup_record is None:
            raise StackStateError(f"the backup in {paths.backup} has no release.json")
        _install(paths, snapshot_files_directory(paths.backup), backup_record, current)
        shutil.rmtree(paths.backup)
    else:
        _remove_live_files(paths, current, keep=set())
        paths.release_file.unlink(missing_ok=True)
    if paths.displaced.exists():
        shutil.rmtree(paths.backup, ignore_errors=True)
        os.rename(paths.displaced, paths.backup)


def undo_unfinished_promote(paths: StackPaths, live: ReleaseRecord | None) -> None:
    """Put the stack back as it was before a ``promote`` that a crash
    interrupted before the new release record went live.

    ``promote`` writes the new record last, so `live` (the record still live)
    is the release from before the switch. When the backup already contains a
    copy of it, some live files may have been overwritten, so the copy is
    installed again and the older backup moves back. Without a live release,
    the files the staged release may have written are removed.
    """
    if live is not None:
        backup = read_release(paths.backup / "release.json")
        if backup is not None and backup.key == live.key:
            restore(paths, Switch(previous=live))
    else:
        staged = read_release(paths.staging / "release.json")
        _remove_live_files(paths, staged, keep=set())
    tidy(paths)


def commit(paths: StackPaths) -> None:
    """Drop what ``promote`` kept for ``restore``, once the switch succeeded."""
    shutil.rmtree(paths.displaced, ignore_errors=True)
    shutil.rmtree(paths.staging, ignore_errors=True)


def take_backup_for_rollback(paths: StackPaths) -> ReleaseRecord:
    """Move the backup aside as the snapshot a rollback promotes."""
    record = read_release(paths.backup / "release.json")
    if record is None:
        raise StackStateError(f"the backup in {paths.backup} has no release.json")
    shutil.rmtree(paths.displaced, ignore_errors=True)
    os.rename(paths.backup, paths.displaced)
    return record


def _snapshot_live(paths: StackPaths, live: ReleaseRecord, log: list[str]) -> None:
    """Copy the live release into a new backup snapshot."""
    temporary = paths.agent_directory / BACKUP_TEMPORARY_NAME
    shutil.rmtree(temporary, ignore_errors=True)
    files = []
    for item in live.files:
        try:
            content = read_file_confined(paths.directory, item.name)
        except FileNotFoundError:
            # NOTE: the backup then lacks this file, and bringing it back up
            # fails if Compose needs it; the rollback reports that.
            log.append(
                f"live file {item.name} is missing; the backup is saved without it"
            )
            continue
        files.append((item.name, content, item.mode))
    write_snapshot(temporary, files, live)
    shutil.rmtree(paths.backup, ignore_errors=True)
    os.rename(temporary, paths.backup)


def _install(
    paths: StackPaths,
    files_directory: Path,
    record: ReleaseRecord,
    replaced: ReleaseRecord | None,
) -> None:
    """Copy a snapshot's files into the deployment directory and make its
    record the live one."""
    new_names = {item.name for item in record.files}
    _remove_live_files(paths, replaced, keep=new_names)
    files = [
        (item.name, read_file_confined(files_directory, item.name), item.mode)
        for item in record.files
    ]
    write_artifacts(paths.directory, files)
    write_file_atomic(paths.release_file, record.to_json(), SECRET_FILE_MODE)


def _remove_live_files(
    paths: StackPaths, record: ReleaseRecord | None, keep: set[str]
) -> None:
    if record is None:
        return
    for item in record.files:
        if item.name in keep:
            continue
        path = confined_path(paths.directory, item.name)
        path.unlink(missing_ok=True)
