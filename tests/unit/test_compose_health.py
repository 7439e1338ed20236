"""Health verdicts of containers and services, and the wait loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from stella_agent.errors import (
    HealthCheckFailedError,
    TaskCancelledError,
    TaskTimeoutError,
)
from stella_agent.executors import compose_health
from stella_agent.executors.compose_health import (
    ContainerState,
    container_state,
    judge_container,
    judge_service,
    wait_for_health,
)
from stella_agent.executors.compose_verify import ServicePlan
from stella_agent.logstream import TaskLog


def state(
    status="running", *, exit_code=0, restarts=0, health=None, name="shop-web-1"
) -> ContainerState:
    return ContainerState(
        id=name,
        name=name,
        status=status,
        exit_code=exit_code,
        restart_count=restarts,
        health=health,
    )


def plan(name="web", *, one_shot=False, replicas=1) -> ServicePlan:
    return ServicePlan(
        name,
        "127.0.0.1:5000/web",
        "sha256:" + "1" * 64,
        one_shot=one_shot,
        replicas=replicas,
    )


@pytest.mark.parametrize(
    ("one_shot", "container", "running_for", "text", "passed", "failed"),
    [
        (False, state(health="healthy"), 0.0, "healthy", True, False),
        (False, state(health="starting"), 9.0, "health starting", False, False),
        (False, state(health="unhealthy"), 9.0, "unhealthy", False, True),
        (False, state(), 1.0, "settling", False, False),
        (False, state(), 2.0, "running", True, False),
        (False, state(restarts=1), 9.0, "restarting (restarted 1 times)", False, True),
        (False, state("restarting"), None, "restarting", False, True),
        (False, state("exited", exit_code=0), None, "exited with code 0", False, True),
        (False, state("exited", exit_code=3), None, "exited with code 3", False, True),
        (False, state("created"), None, "created", False, False),
        (False, state("dead"), None, "dead", False, True),
        (True, state("exited", exit_code=0), None, "completed", True, False),
        (True, state("exited", exit_code=1), None, "exited with code 1", False, True),
        (True, state(), 9.0, "running (one-shot, waiting for exit)", False, False),
    ],
)
def test_judge_container(one_shot, container, running_for, text, passed, failed):
    verdict = judge_container(one_shot, container, running_for, settle_seconds=2.0)

    assert verdict.text == text
    assert verdict.passed is passed
    assert verdict.failed is failed


def test_judge_service_waits_for_all_replicas():
    verdict = judge_service(
        plan(replicas=2), [state(health="healthy")], {}, now=10.0, settle_seconds=2.0
    )

    assert verdict.text == "missing (1 of 2 containers)"
    assert not verdict.passed
    assert not verdict.failed


def test_judge_service_names_failing_replica():
    states = [
        state(health="healthy", name="shop-web-1"),
        state(health="unhealthy", name="shop-web-2"),
    ]

    verdict = judge_service(plan(replicas=2), states, {}, now=10.0, settle_seconds=2.0)

    assert verdict.text == "shop-web-2 unhealthy"
    assert verdict.failed


def test_judge_service_passes_when_every_replica_passes():
    states = [state(name="shop-web-1"), state(name="shop-web-2")]
    since = {"shop-web-1": 0.0, "shop-web-2": 0.0}

    verdict = judge_service(
        plan(replicas=2), states, since, now=5.0, settle_seconds=2.0
    )

    assert verdict.text == "running"
    assert verdict.passed


def test_judge_service_scaled_to_zero():
    assert judge_service(plan(replicas=0), [], {}, now=0.0, settle_seconds=2.0).passed


def test_container_state_from_inspect():
    attrs = {
        "Id": "abc",
        "Name": "/shop-web-1",
        "RestartCount": 2,
        "State": {"Status": "running", "ExitCode": 0, "Health": {"Status": "healthy"}},
    }

    assert container_state(attrs) == ContainerState(
        "abc", "shop-web-1", "running", 0, 2, "healthy"
    )


def test_container_state_without_health_check():
    attrs = {"Id": "abc", "Name": "/w", "State": {"Status": "exited", "ExitCode": 137}}

    assert container_state(attrs).health is None
    assert container_state(attrs).exit_code == 137


def run_wait(plans, sequence, *, timeout=5.0, settle=0.0, checkpoint=lambda: None):
    """Run wait_for_health against states that follow `sequence`, one per poll."""
    polls = iter(sequence)
    last = {}

    async def read_states():
        nonlocal last
        last = next(polls, last)
        return last

    return asyncio.run(
        wait_for_health(
            plans,
            read_states,
            timeout=timeout,
            settle_seconds=settle,
            log=TaskLog("t"),
            checkpoint=checkpoint,
        )
    )


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(compose_health, "POLL_SECONDS", 0.01)


def test_wait_returns_verdicts_when_all_pass():
    plans = {"web": plan(), "migrate": plan("migrate", one_shot=True)}
    sequence = [
        {"web": [state(health="starting")], "migrate": [state(name="m")]},
        {"web": [state(health="healthy")], "migrate": [state("exited", name="m")]},
    ]

    verdicts = run_wait(plans, sequence)

    assert verdicts == {"web": "healthy", "migrate": "completed"}


def test_wait_fails_fast_on_crash():
    plans = {"web": plan(), "worker": plan("worker")}
    sequence = [
        {
            "web": [state(health="starting")],
            "worker": [state("exited", exit_code=3, name="w")],
        }
    ]

    with pytest.raises(HealthCheckFailedError) as raised:
        run_wait(plans, sequence, timeout=60.0)

    assert "worker: exited with code 3" in raised.value.message
    assert "web: health starting" in raised.value.message
    assert raised.value.phase == "health"


def test_wait_times_out_with_verdicts():
    with pytest.raises(
        HealthCheckFailedError, match="within 0 s: web: health starting"
    ):
        run_wait({"web": plan()}, [{"web": [state(health="starting")]}], timeout=0.05)


def test_wait_requires_unbroken_settle_period():
    plans = {"worker": plan("worker")}
    sequence = [{"worker": [state()]}, {"worker": [state("restarting")]}]

    with pytest.raises(HealthCheckFailedError, match="restarting"):
        run_wait(plans, sequence, settle=10.0)


def test_wait_runs_checkpoint_each_poll():
    def cancelled():
        raise TaskCancelledError("cancelled")

    with pytest.raises(TaskCancelledError):
        run_wait(
            {"web": plan()}, [{"web": [state(health="starting")]}], checkpoint=cancelled
        )


def test_wait_reports_task_deadline_as_timeout():
    deadline = time.monotonic() + 0.05

    def checkpoint():
        if time.monotonic() >= deadline:
            raise TaskTimeoutError("task timed out during health")

    with pytest.raises(TaskTimeoutError):
        run_wait(
            {"web": plan()},
            [{"web": [state(health="starting")]}],
            timeout=0.05,
            checkpoint=checkpoint,
        )
