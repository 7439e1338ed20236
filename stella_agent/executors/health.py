"""Waiting for a started container to count as healthy.

A container with a health check (from its image or the task) must reach the
"healthy" status. Docker marks a container "unhealthy" only after `retries`
consecutive failed checks outside the start period, so "unhealthy" fails the
wait at once: an image that needs longer to start should set a start period.
A container without a health check must keep running for the settle period.
In both cases a container that exits, restarts, is paused or is killed for
lack of memory fails the wait.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from stella_agent.errors import HealthCheckFailedError
from stella_agent.executors.base import TaskContext
from stella_agent.executors.container_spec import HealthWait
from stella_agent.executors.docker_errors import DOCKER_EXCEPTIONS, docker_error

POLL_INTERVAL_SECONDS = 0.25
MAX_CHECK_OUTPUT_CHARS = 300


def wait_until_healthy(
    context: TaskContext, client: Any, container_id: str, name: str, wait: HealthWait
) -> None:
    """Return once container `name` is healthy; raise HealthCheckFailedError
    when it fails or the time runs out.

    Calls context.checkpoint() between polls, so a cancel or the task timeout
    ends the wait with TaskCancelledError or TaskTimeoutError.
    """
    started = time.monotonic()
    try:
        _wait(context, client, container_id, name, wait, started)
    finally:
        elapsed_ms = int((time.monotonic() - started) * 1000)
        context.metrics.health_check_duration_ms = elapsed_ms


def _wait(
    context: TaskContext,
    client: Any,
    container_id: str,
    name: str,
    wait: HealthWait,
    started: float,
) -> None:
    first = _inspect(client, container_id, name)
    restart_count = first.get("RestartCount", 0)
    started_at = first["State"].get("StartedAt")
    has_healthcheck = first["State"].get("Health") is not None
    if has_healthcheck:
        limit = wait.timeout_seconds
        context.log.info(
            "waiting up to %gs for container %s to report healthy", limit, name
        )
    else:
        limit = max(wait.timeout_seconds, wait.settle_seconds)
        context.log.info(
            "container %s has no health check; it must keep running for %gs",
            name,
            wait.settle_seconds,
        )

    last_status = ""
    while True:
        attrs = _inspect(client, container_id, name)
        problem = describe_failure(attrs, restart_count, started_at)
        if problem:
            raise HealthCheckFailedError(f"container {name} {problem}", phase="health")

        elapsed = time.monotonic() - started
        if has_healthcheck:
            health = attrs["State"].get("Health") or {}
            status = str(health.get("Status") or "none")
            if status != last_status:
                context.log.info("container %s health: %s", name, status)
                last_status = status
            if status == "healthy":
                return
            if status == "unhealthy":
                raise HealthCheckFailedError(
                    f"container {name} is unhealthy after "
                    f"{health.get('FailingStreak', 0)} failed health checks; "
                    f"last check: {last_check_output(health)}",
                    phase="health",
                )
        elif elapsed >= wait.settle_seconds:
            context.log.info(
                "container %s kept running for %gs", name, wait.settle_seconds
            )
            return

        if elapsed >= limit:
            raise HealthCheckFailedError(
                f"container {name} did not become healthy within {limit:g}s "
                f"(health status {last_status or 'none'}); "
                f"last check: {last_check_output(attrs['State'].get('Health') or {})}",
                phase="health",
            )
        context.checkpoint()
        context.cancel_event.wait(POLL_INTERVAL_SECONDS)


def describe_failure(
    attrs: Mapping[str, Any], restart_count: int, started_at: str | None
) -> str:
    """Return why a container is not running steadily, or "" when it is.

    `restart_count` and `started_at` are the values seen when the wait began;
    a change of either means the container restarted between two polls.
    """
    state = attrs["State"]
    exit_code = state.get("ExitCode")
    if state.get("OOMKilled"):
        return "was killed because it ran out of memory; raise its memory limit"
    if state.get("Restarting"):
        return f"is restarting after it exited with code {exit_code}"
    if attrs.get("RestartCount", 0) != restart_count or (
        state.get("StartedAt") != started_at
    ):
        return f"restarted after it exited with code {exit_code}"
    status = state.get("Status")
    if status in ("exited", "dead"):
        error = state.get("Error")
        suffix = f": {error}" if error else ""
        return f"exited with code {exit_code}{suffix}"
    if status != "running":
        return f"is {status}, not running"
    return ""


def last_check_output(health: Mapping[str, Any]) -> str:
    """Return the exit code and output of the most recent health check."""
    log = health.get("Log") or []
    if not log:
        return "none yet"
    entry = log[-1]
    output = " ".join(str(entry.get("Output") or "").split())
    if len(output) > MAX_CHECK_OUTPUT_CHARS:
        output = output[:MAX_CHECK_OUTPUT_CHARS] + "..."
    return f"exit code {entry.get('ExitCode')}, output {output!r}"


def _inspect(client: Any, container_id: str, name: str) -> Mapping[str, Any]:
    try:
        return client.api.inspect_container(container_id)
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"inspect container {name}") from None
