"""Task files, task validation and the value checks executors share.

A task file is the protobuf JSON mapping of AgentTask, written as JSON or YAML.
For convenience ``type`` may also be given by its canonical name ("deploy",
"health-check", ...) and ``executor`` as "docker" or "compose".
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from stella.agent.v1 import task_pb2
from stella_agent.errors import ConfigError, InvalidTaskError

TYPE_NAMES: dict[int, str] = {
    task_pb2.TASK_TYPE_DEPLOY: "deploy",
    task_pb2.TASK_TYPE_ROLLBACK: "rollback",
    task_pb2.TASK_TYPE_HEALTH_CHECK: "health-check",
    task_pb2.TASK_TYPE_INSPECT: "inspect",
    task_pb2.TASK_TYPE_EXECUTE_COMMAND: "execute-command",
    task_pb2.TASK_TYPE_UPLOAD_FILES: "upload-files",
    task_pb2.TASK_TYPE_WRITE_STICKER: "write-sticker",
    task_pb2.TASK_TYPE_READ_STICKER: "read-sticker",
}
"""Canonical name of each task type."""

PAYLOAD_FIELDS: dict[int, str] = {
    task_pb2.TASK_TYPE_DEPLOY: "deploy",
    task_pb2.TASK_TYPE_ROLLBACK: "rollback",
    task_pb2.TASK_TYPE_HEALTH_CHECK: "health_check",
    task_pb2.TASK_TYPE_INSPECT: "inspect",
    task_pb2.TASK_TYPE_EXECUTE_COMMAND: "execute_command",
    task_pb2.TASK_TYPE_UPLOAD_FILES: "upload_files",
    task_pb2.TASK_TYPE_WRITE_STICKER: "write_sticker",
    task_pb2.TASK_TYPE_READ_STICKER: "read_sticker",
}
"""Name of the payload field each task type requires."""

EXECUTOR_NAMES = {
    task_pb2.EXECUTOR_UNSPECIFIED: "docker",
    task_pb2.EXECUTOR_DOCKER: "docker",
    task_pb2.EXECUTOR_COMPOSE: "compose",
}

DIGEST_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")
# Docker's own rule for container names.
CONTAINER_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,253}$")
# A repository reference without tag or digest: optional registry host[:port],
# then lowercase path components.
REPOSITORY_PATTERN = re.compile(
    r"^(?:(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*(?::[0-9]{1,5})?)/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
MAX_TASK_ID_LENGTH = 128
MAX_TASK_TIMEOUT_SECONDS = 7 * 86400
TASK_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def type_name(task_type: int) -> str:
    """Return the canonical name of a task type, or "unknown(N)"."""
    return TYPE_NAMES.get(task_type, f"unknown({task_type})")


def load_task_file(path: str | Path) -> task_pb2.AgentTask:
    """Read a task file (JSON or YAML) into an AgentTask."""
    file_path = Path(path)
    try:
        text = file_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"task file {file_path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read task file {file_path}: {exc}") from None
    try:
        if file_path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"task file {file_path} is not valid JSON or YAML: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"task file {file_path} must hold a mapping (an AgentTask in JSON form)"
        )
    try:
        return task_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"task file {file_path}: {exc}") from None


def task_from_dict(data: dict[str, Any]) -> task_pb2.AgentTask:
    """Build an AgentTask from its JSON mapping, accepting canonical names."""
    data = dict(data)
    task_type = data.get("type")
    if isinstance(task_type, str) and task_type in TYPE_NAMES.values():
        data["type"] = next(k for k, v in TYPE_NAMES.items() if v == task_type)
    elif isinstance(task_type, str) and task_type not in task_pb2.TaskType.keys():
        raise ConfigError(
            f"invalid AgentTask: unknown type {task_type!r}; expected one of "
            f"{', '.join(TYPE_NAMES.values())}"
        )
    executor = data.get("executor")
    if isinstance(executor, str) and executor in ("docker", "compose"):
        data["executor"] = "EXECUTOR_" + executor.upper()
    task = task_pb2.AgentTask()
    try:
        json_format.ParseDict(data, task)
    except json_format.ParseError as exc:
        raise ConfigError(f"invalid AgentTask: {exc}") from None
    except SystemError:
        # protobuf's C extension raises SystemError for a name that is not
        # valid UTF-8, such as a lone surrogate from a JSON "\ud800" escape.
        raise ConfigError(
            "invalid AgentTask: a field name or enum value is not valid UTF-8"
        ) from None
    return task


def validate_task(task: task_pb2.AgentTask) -> None:
    """Check the envelope of a task: id, type and matching payload."""
    if not task.id:
        raise InvalidTaskError("task has no id; set AgentTask.id")
    if not TASK_ID_PATTERN.match(task.id):
        raise InvalidTaskError(
            f"task id {task.id[:80]!r} is invalid: use up to {MAX_TASK_ID_LENGTH} letters, "
            "digits, '.', '_', ':' or '-'"
        )
    if task.type not in TYPE_NAMES:
        raise InvalidTaskError(
            f"unknown task type {task.type}; expected one of: {', '.join(TYPE_NAMES.values())}"
        )
    expected_payload = PAYLOAD_FIELDS[task.type]
    actual_payload = task.WhichOneof("payload")
    if actual_payload != expected_payload:
        raise InvalidTaskError(
            f"task type {type_name(task.type)} needs the '{expected_payload}' payload, "
            f"got {actual_payload or 'none'}"
        )
    if task.HasField("timeout"):
        seconds = task.timeout.seconds + task.timeout.nanos / 1e9
        if not 0 <= seconds <= MAX_TASK_TIMEOUT_SECONDS:
            raise InvalidTaskError(
                f"timeout {seconds:g}s is invalid: use 0 (the agent's default) up to "
                f"{MAX_TASK_TIMEOUT_SECONDS}s (7 days)"
            )
    if task.executor not in EXECUTOR_NAMES:
        raise InvalidTaskError(
            f"unknown executor {task.executor}; expected docker or compose"
        )


def validate_digest(value: str, field: str = "digest") -> str:
    """Return `value` if it is "sha256:" plus 64 lowercase hex digits."""
    if not DIGEST_PATTERN.match(value):
        raise InvalidTaskError(
            f"{field} {value[:100]!r} is invalid: expected 'sha256:' followed by 64 lowercase "
            "hex digits, the manifest digest the registry printed on push"
        )
    return value


def validate_container_name(value: str, field: str = "container_name") -> str:
    """Return `value` if Docker accepts it as a container name."""
    if not value:
        raise InvalidTaskError(f"{field} is required")
    if not CONTAINER_NAME_PATTERN.match(value):
        raise InvalidTaskError(
            f"{field} {value[:100]!r} is invalid: use letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value


def validate_repository(value: str, field: str = "image") -> str:
    """Return `value` if it is an image repository without tag or digest."""
    if not value:
        raise InvalidTaskError(
            f"{field} is required: the image repository, without tag or digest"
        )
    if "@" in value:
        raise InvalidTaskError(
            f"{field} {value[:200]!r} must not contain a digest; put the digest in the digest field"
        )
    if not REPOSITORY_PATTERN.match(value):
        last = value.rsplit("/", 1)[-1]
        if ":" in last:
            raise InvalidTaskError(
                f"{field} {value[:200]!r} must not contain a tag: the agent deploys by digest "
                "only; give the repository here and its sha256 digest in deploy.digest"
            )
        raise InvalidTaskError(
            f"{field} {value[:200]!r} is not a valid image repository "
            "(expected [registry[:port]/]path in lowercase)"
        )
    return value
