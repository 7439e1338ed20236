"""Deciding whether a Compose stack is healthy after ``up``.

The exit status of ``up --wait`` is not enough: it ignores services without a
health check that crash a few seconds later, and one-shot services. So every
container of every service is judged from its inspected state:

- a one-shot service (``ServicePlan.one_shot``) must exit with status 0;
- a service whose containers have a health check must report healthy;
- any other service must stay running, never restarted, for the settle period.

A restart, an exit, a dead container or an unhealthy report fails the stack at
once. Otherwise the wait ends when every service passes in the same poll, or
fails when the timeout passes. ``up --force-recreate`` creates every container
afresh, so any restart count above zero means a restart since the deploy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stella_agent.errors import HealthCheckFailedError
from stella_agent.executors.compose_verify import (
    SERVICE_LABEL,
    ServicePlan,
    project_containers,
)
from stella_agent.logstream import TaskLog

POLL_SECONDS = 0.5


@dataclass(frozen=True)
class ContainerState:
    """The part of ``docker inspect`` that health is judged on."""

    id: str
    name: str
    status: str
    """Docker's State.Status: created, running, restarting, exited, paused, dead."""
    exit_code: int
    restart_count: int
    health: str | None
    """starting, healthy or unhealthy; None when the container has no health check."""


@dataclass(frozen=True)
class Verdict:
    """The judgement of one container or service at one poll."""

    text: str
    passed: bool = False
    failed: bool = False
    """A final failure: waiting longer cannot make it pass."""


StateReader = Callable[[], Awaitable[Mapping[str, Sequence[ContainerState]]]]
"""Returns the current container states of a project, by service name."""


def container_state(attrs: Mapping[str, Any]) -> ContainerState:
    """Extract a ContainerState from a container's inspect data."""
    state = attrs.get("State") or {}
    health = state.get("Health")
    return ContainerState(
        id=str(attrs.get("Id", "")),
        name=str(attrs.get("Name", "")).lstrip("/"),
        status=str(state.get("Status", "")),
        exit_code=int(state.get("ExitCode") or 0),
        restart_count=int(attrs.get("RestartCount") or 0),
        health=str(health.get("Status")) if health else None,
    )


def read_project_states(client: Any, project: str) -> dict[str, list[ContainerState]]:
    """Inspect the containers of a project, grouped by service (blocking)."""
    states: dict[str, list[ContainerState]] = {}
    for container in project_containers(client, project):
        service = container.labels.get(SERVICE_LABEL, "")
        states.setdefault(service, []).append(container_state(container.attrs))
    return states


def judge_container(
    one_shot: bool,
    state: ContainerState,
    running_for: float | None,
    settle_seconds: float,
) -> Verdict:
    """Judge one container; `running_for` is how long it has been seen running."""
    if state.restart_count > 0:
        return Verdict(
            f"restarting (restarted {state.restart_count} times)", failed=True
        )
    if state.status == "exited":
        if one_shot and state.exit_code == 0:
            return Verdict("completed", passed=True)
        return Verdict(f"exited with code {state.exit_code}", failed=True)
    if state.status in ("restarting", "dead", "paused", "removing"):
        return Verdict(state.status, failed=True)
    if state.status != "running":
        return Verdict(state.status or "unknown")
    if one_shot:
        return Verdict("running (one-shot, waiting for exit)")
    if state.health == "healthy":
        return Verdict("healthy", passed=True)
    if state.health == "unhealthy":
        return Verdict("unhealthy", failed=True)
    if state.health is not None:
        return Verdict(f"health {state.health}")
    if running_for is not None and running_for >= settle_seconds:
        return Verdict("running", passed=True)
    return Verdict("settling")


def judge_service(
    plan: ServicePlan,
    states: Sequence[ContainerState],
    running_since: Mapping[str, float],
    now: float,
    settle_seconds: float,
) -> Verdict:
    """Judge a service from the states of its containers."""
    if plan.replicas == 0 and not states:
        return Verdict("scaled to 0", passed=True)
    if len(states) < plan.replicas:
        return Verdict(f"missing ({len(states)} of {plan.replicas} containers)")
    verdicts = []
    for state in states:
        since = running_since.get(state.id)
        running_for = None if since is None else now - since
        verdicts.append(
            (state, judge_container(plan.one_shot, state, running_for, settle_seconds))
        )
    several = len(states) > 1
    for state, verdict in verdicts:
        if verdict.failed:
            text = f"{state.name} {verdict.text}" if several else verdict.text
            return Verdict(text, failed=True)
    for state, verdict in verdicts:
        if not verdict.passed:
            text = f"{state.name} {verdict.text}" if several else verdict.text
            return Verdict(text)
    return Verdict(verdicts[0][1].text, passed=True)


async def wait_for_health(
    plans: Mapping[str, ServicePlan],
    read_states: StateReader,
    *,
    timeout: float,
    settle_seconds: float,
    log: TaskLog,
    checkpoint: Callable[[], None],
) -> dict[str, str]:
    """Poll until every service passes; return each service's verdict.

    Raises HealthCheckFailedError listing every service's verdict when one
    fails for good or `timeout` seconds pass. `checkpoint` runs before each
    poll, so cancellation and the task deadline can end the wait.
    """
    started = time.monotonic()
    running_since: dict[str, float] = {}
    last_summary = ""
    while True:
        checkpoint()
        states = await read_states()
        now = time.monotonic()
        _track_running(states, running_since, now)
        verdicts = {
            name: judge_service(
                plan, states.get(name, ()), running_since, now, settle_seconds
            )
            for name, plan in sorted(plans.items())
        }
        summary = "; ".join(
            f"{name}: {verdict.text}" for name, verdict in verdicts.items()
        )
        if summary != last_summary:
            log.info("health: %s", summary)
            last_summary = summary

        if all(verdict.passed for verdict in verdicts.values()):
            return {name: verdict.text for name, verdict in verdicts.items()}
        if any(verdict.failed for verdict in verdicts.values()):
            raise HealthCheckFailedError(
                f"the stack is not healthy: {summary}", phase="health"
            )
        if now - started >= timeout:
            # When the task deadline capped `timeout`, report the task timeout.
            checkpoint()
            raise HealthCheckFailedError(
                f"the stack did not become healthy within {timeout:.0f} s: {summary}",
                phase="health",
            )
        await asyncio.sleep(POLL_SECONDS)


def _track_running(
    states: Mapping[str, Sequence[ContainerState]],
    running_since: dict[str, float],
    now: float,
) -> None:
    """Record when each container was first seen running in an unbroken stretch."""
    for service_states in states.values():
        for state in service_states:
            if state.status == "running":
                running_since.setdefault(state.id, now)
            else:
                running_since.pop(state.id, None)
