"""Container operations the deploy and rollback flows share.

Containers are found by exact name, set aside under
``<name>-previous-<timestamp>`` or ``<name>-failed-<timestamp>`` and restored.
The timestamp is UTC, ``YYYYMMDDTHHMMSSffffffZ``, so names sort by time. Every
function maps Docker SDK errors through ``docker_error``.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

import docker.errors

from stella_agent.errors import DockerError
from stella_agent.executors.base import TaskContext
from stella_agent.executors.container_spec import (
    LABEL_DEPLOYED_AT,
    LABEL_DIGEST,
    LABEL_REPLACED_HEALTH,
    LABEL_REPLACED_ID,
    LABEL_SECRET_ENVIRONMENT,
)
from stella_agent.executors.docker_errors import DOCKER_EXCEPTIONS, docker_error
from stella_agent.logstream import STDERR, STDOUT
from stella_agent.masking import SecretMasker

PREVIOUS = "previous"
FAILED = "failed"
LOG_TAIL_LINES = 50
"""Lines of each output stream of a failed container copied to the task log."""
RUNNING_CHECK_SECONDS = 1.0
"""How long a restored container must stay running to count as restored."""


def timestamp_suffix(now: datetime | None = None) -> str:
    """Return the UTC time as YYYYMMDDTHHMMSSffffffZ."""
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%fZ")


def aside_name(name: str, kind: str, now: datetime | None = None) -> str:
    """Return the name a container gets when set aside: previous or failed."""
    return f"{name}-{kind}-{timestamp_suffix(now)}"


def find_container(client: Any, name: str) -> Any | None:
    """Return the container named exactly `name`, or None.

    Docker's name filter matches substrings as a regular expression, and
    looking a name up directly also matches container id prefixes, so the
    listed names are compared here.
    """
    try:
        candidates = client.containers.list(all=True, filters={"name": name})
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"list containers named {name}") from None
    for container in candidates:
        if container.name == name:
            return container
    return None


def find_previous(client: Any, name: str) -> list[Any]:
    """Return the `<name>-previous-<timestamp>` containers deployed by the
    agent (they carry the stella.digest label), newest first."""
    pattern = re.compile(re.escape(name) + r"-previous-([0-9]{8}T[0-9]{12}Z)")
    try:
        candidates = client.containers.list(
            all=True, filters={"name": f"{name}-previous-", "label": LABEL_DIGEST}
        )
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"list previous containers of {name}") from None
    matches = [c for c in candidates if pattern.fullmatch(c.name)]
    return sorted(matches, key=lambda container: container.name, reverse=True)


def health_when_replaced(container: Any) -> str:
    """Return the health of a container that is about to be set aside.

    "healthy" for a running container whose health check passes or that has
    none, "starting" while its health check has not decided yet, and
    "unhealthy" for a failing health check or a container that is not running.
    """
    if not is_running(container):
        return "unhealthy"
    health = container.attrs.get("State", {}).get("Health")
    if health is None:
        return "healthy"
    status = str(health.get("Status") or "")
    return status if status in ("healthy", "starting") else "unhealthy"


def unhealthy_when_replaced(client: Any) -> set[str]:
    """Return the ids of containers that were unhealthy when a deploy set them
    aside, as recorded in the stella.replaced.* labels of their successors."""
    try:
        successors = client.containers.list(
            all=True, filters={"label": LABEL_REPLACED_ID}
        )
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, "list containers that replaced others") from None
    return {
        container.labels[LABEL_REPLACED_ID]
        for container in successors
        if container.labels.get(LABEL_REPLACED_HEALTH) == "unhealthy"
    }


def releases_newest_first(containers: list[Any]) -> list[Any]:
    """Sort containers by their stella.deployed.at label, newest first, and by
    name (whose suffix is the time they were set aside) between equal times."""
    return sorted(
        containers,
        key=lambda container: (
            (container.labels or {}).get(LABEL_DEPLOYED_AT, ""),
            container.name,
        ),
        reverse=True,
    )


def is_running(container: Any) -> bool:
    """Return True when the container's state is running (not restarting)."""
    state = container.attrs.get("State", {})
    return bool(state.get("Running")) and not state.get("Restarting")


def stop_container(context: TaskContext, container: Any, name: str) -> None:
    """Stop a container, giving it the configured grace period."""
    timeout = context.config.docker.stop_timeout_seconds
    context.log.info("stopping container %s (grace period %ds)", name, timeout)
    try:
        container.stop(timeout=timeout)
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"stop container {name}") from None


def rename_container(context: TaskContext, container: Any, new_name: str) -> None:
    """Rename a container and refresh its attributes."""
    old_name = container.name
    context.log.info("renaming container %s to %s", old_name, new_name)
    try:
        container.rename(new_name)
        container.reload()
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"rename container {old_name} to {new_name}") from None


def start_and_verify(context: TaskContext, container: Any) -> None:
    """Start a container and check that it is still running a moment later."""
    name = container.name
    context.log.info("starting container %s", name)
    try:
        container.start()
        time.sleep(RUNNING_CHECK_SECONDS)
        container.reload()
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"start container {name}") from None
    if not is_running(container):
        state = container.attrs.get("State", {})
        raise DockerError(
            f"container {name} did not keep running after start "
            f"(status {state.get('Status')}, exit code {state.get('ExitCode')})"
        )


def copy_output_to_log(context: TaskContext, container: Any, label: str) -> None:
    """Write the last lines of a container's stdout and stderr to the task log.

    Failures are logged, not raised: this runs while cleaning up after another
    error.
    """
    for stream, flags in ((STDOUT, {"stderr": False}), (STDERR, {"stdout": False})):
        try:
            output = container.logs(tail=LOG_TAIL_LINES, **flags)
        except DOCKER_EXCEPTIONS as exc:
            context.log.info("could not read the output of %s: %s", label, exc)
            return
        if output:
            output = _mask_container_secrets(container, output)
            header = f"--- last output of {label} ---\n".encode()
            context.log.write(stream, header + output.rstrip(b"\n") + b"\n")


def _mask_container_secrets(container: Any, output: bytes) -> bytes:
    """Mask the values of the container's own secret environment variables.

    The container may belong to an earlier task, whose secrets the current
    task's masker does not know; the names are in a label, the values in the
    container's config.
    """
    names = {
        name
        for name in (container.labels or {})
        .get(LABEL_SECRET_ENVIRONMENT, "")
        .split(",")
        if name
    }
    if not names:
        return output
    values = []
    for entry in container.attrs.get("Config", {}).get("Env") or []:
        name, _, value = entry.partition("=")
        if name in names and value:
            values.append(value)
    return SecretMasker(values).mask_bytes(output) if values else output


def remove_container(context: TaskContext, container: Any, label: str) -> None:
    """Force-remove a container and its anonymous volumes."""
    context.log.info("removing %s (%s)", label, container.name)
    try:
        container.remove(force=True, v=True)
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"remove {label} {container.name}") from None


def describe_container(container: Any) -> str:
    """Return "name (id, status)" with fresh state, for messages on rollback."""
    try:
        container.reload()
    except docker.errors.NotFound:
        return f"{container.name} ({container.short_id}, removed)"
    except DOCKER_EXCEPTIONS:
        return f"{container.name} ({container.short_id}, state unknown)"
    return f"{container.name} ({container.short_id}, {container.status})"
