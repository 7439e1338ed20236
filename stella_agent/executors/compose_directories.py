"""Stack directories that do not overlap.

A stack's deployment directory must not lie inside another stack's
directory, contain one, or lie inside any ``.stella/`` directory. Otherwise
one stack's release files would overwrite the other's files or its backup,
and ``.stella/`` would be written through a path the agent does not own.

Two sources find the other stacks:

- ``<state_dir>/stack-directories.json`` lists every directory that a stack
  of this agent claimed, with the stack name. An entry counts only while its
  directory still has a ``.stella/`` directory.
- A parent directory that contains ``.stella`` is a stack directory, also
  one claimed before the list existed. NOTE: a stack claimed before the list
  existed is not found below a new stack's directory.

All functions block on disk I/O; callers run them in a worker thread.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from stella_agent.artifacts import write_file_atomic
from stella_agent.config import AgentConfig
from stella_agent.errors import InvalidTaskError
from stella_agent.executors.compose_stack import (
    AGENT_DIRECTORY_NAME,
    PRIVATE_DIRECTORY_MODE,
    StackStateError,
)

REGISTRY_FILE_NAME = "stack-directories.json"
REGISTRY_LOCK_NAME = "stack-directories.lock"


def check_stack_directory(
    config: AgentConfig, stack_name: str, directory: Path
) -> None:
    """Raise InvalidTaskError when `directory` overlaps another stack's
    directory or lies inside a ``.stella/`` directory."""
    _check_parents(directory)
    _check_registered(_read_registry(config), stack_name, directory)


def register_stack_directory(
    config: AgentConfig, stack_name: str, directory: Path
) -> None:
    """Record `directory` as the directory of `stack_name`, after checking
    again, under a lock, that it overlaps no other stack's directory."""
    config.state_path.mkdir(mode=PRIVATE_DIRECTORY_MODE, parents=True, exist_ok=True)
    lock_path = config.state_path / REGISTRY_LOCK_NAME
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(lock_path, flags, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        registry = _read_registry(config)
        _check_parents(directory)
        _check_registered(registry, stack_name, directory)
        if registry.get(str(directory)) == stack_name:
            return
        registry[str(directory)] = stack_name
        body = json.dumps({"directories": registry}, indent=2, sort_keys=True)
        write_file_atomic(
            config.state_path / REGISTRY_FILE_NAME, body.encode("utf-8"), 0o600
        )
    finally:
        os.close(descriptor)


def _check_parents(directory: Path) -> None:
    if AGENT_DIRECTORY_NAME in directory.parts:
        raise InvalidTaskError(
            f"deployment_directory {directory} lies inside a {AGENT_DIRECTORY_NAME} "
            "directory, which contains a stack's agent data; choose a directory "
            "outside it",
            error_type="conflict",
        )
    for parent in directory.parents:
        if os.path.lexists(parent / AGENT_DIRECTORY_NAME):
            raise InvalidTaskError(
                f"deployment_directory {directory} lies inside the stack directory "
                f"{parent}; choose a directory outside every other stack's directory",
                error_type="conflict",
            )


def _check_registered(
    registry: dict[str, str], stack_name: str, directory: Path
) -> None:
    for registered, owner in sorted(registry.items()):
        other = Path(registered)
        if other == directory:
            continue  # the same directory: the stack claim decides
        if not (directory.is_relative_to(other) or other.is_relative_to(directory)):
            continue
        if not os.path.lexists(other / AGENT_DIRECTORY_NAME):
            continue  # that stack's directory was removed
        raise InvalidTaskError(
            f"deployment_directory {directory} of stack {stack_name!r} overlaps "
            f"{other}, the directory of stack {owner!r}; choose a directory that "
            "neither contains nor lies inside another stack's directory",
            error_type="conflict",
        )


def _read_registry(config: AgentConfig) -> dict[str, str]:
    path = config.state_path / REGISTRY_FILE_NAME
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StackStateError(
            f"cannot read the list of stack directories {path}: {exc}. Fix or "
            "remove the file"
        ) from None
    directories = data.get("directories") if isinstance(data, dict) else None
    if not isinstance(directories, dict):
        raise StackStateError(
            f"the list of stack directories {path} has no 'directories' object; "
            "fix or remove the file"
        )
    return {str(key): str(value) for key, value in directories.items()}
