"""The health wait, against scripted container states."""

from __future__ import annotations

import pytest

from stella.agent.v1 import task_pb2
from stella_agent.config import config_from_mapping
from stella_agent.errors import HealthCheckFailedError, TaskCancelledError
from stella_agent.executors.base import TaskContext
from stella_agent.executors.container_spec import HealthWait
from stella_agent.executors.health import (
    describe_failure,
    last_check_output,
    wait_until_healthy,
)
from stella_agent.logstream import TaskLog

STARTED = "2026-01-01T00:00:00.000000001Z"


def state(status="running", health=None, restarts=0, started=STARTED, **extra):
    attrs = {
        "RestartCount": restarts,
        "State": {
            "Status": status,
            "Running": status == "running",
            "Restarting": status == "restarting",
            "ExitCode": extra.pop("exit_code", 0),
            "StartedAt": started,
            **extra,
        },
    }
    if health is not None:
        attrs["State"]["Health"] = {
            "Status": health,
            "FailingStreak": 2 if health == "unhealthy" else 0,
            "Log": [{"ExitCode": 1, "Output": "wget: connection refused\n"}],
        }
    return attrs


class ScriptedApi:
    """Returns the scripted states in order, then repeats the last."""

    def __init__(self, states):
        self.states = list(states)

    def inspect_container(self, container_id):
        if len(self.states) > 1:
            return self.states.pop(0)
        return self.states[0]


class FakeClient:
    def __init__(self, states):
        self.api = ScriptedApi(states)


def make_context() -> TaskContext:
    config = config_from_mapping({"agent_id": "test-agent"})
    task = task_pb2.AgentTask(id="t1", type=task_pb2.TASK_TYPE_DEPLOY)
    return TaskContext(task, TaskLog("t1"), config)


def wait(states, timeout=5.0, settle=0.3, context=None):
    context = context or make_context()
    wait_until_healthy(
        context, FakeClient(states), "id", "web", HealthWait(timeout, settle)
    )
    return context


def test_wait_returns_when_healthy():
    context = wait(
        [state(health="starting"), state(health="starting"), state(health="healthy")]
    )

    assert "health: healthy" in context.log.tail()
    assert context.metrics.health_check_duration_ms > 0


def test_wait_fails_at_once_when_unhealthy():
    with pytest.raises(HealthCheckFailedError) as caught:
        wait([state(health="starting"), state(health="unhealthy")])

    assert "unhealthy after 2 failed health checks" in caught.value.message
    assert "connection refused" in caught.value.message
    assert caught.value.phase == "health"


def test_wait_times_out_while_starting():
    with pytest.raises(HealthCheckFailedError) as caught:
        wait([state(health="starting")], timeout=0.3)

    assert "did not become healthy within 0.3s" in caught.value.message
    assert "health status starting" in caught.value.message


def test_wait_without_healthcheck_settles():
    context = wait([state()], settle=0.3)

    assert "kept running for 0.3s" in context.log.tail()


def test_wait_without_healthcheck_fails_on_exit():
    with pytest.raises(HealthCheckFailedError) as caught:
        wait([state(), state(status="exited", exit_code=3)], settle=5)

    assert "exited with code 3" in caught.value.message


def test_wait_fails_on_restart_between_polls():
    with pytest.raises(HealthCheckFailedError) as caught:
        wait([state(), state(restarts=1, exit_code=3)], settle=5)

    assert "restarted after it exited with code 3" in caught.value.message


def test_wait_stops_on_cancel():
    context = make_context()
    context.cancel("test")

    with pytest.raises(TaskCancelledError):
        wait([state(health="starting")], context=context)


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        (state(), ""),
        (state(health="starting"), ""),
        (state(status="restarting", exit_code=3), "is restarting after it exited"),
        (state(restarts=1), "restarted after it exited"),
        (state(started="2026-01-01T00:00:09Z"), "restarted after it exited"),
        (state(status="exited", exit_code=3), "exited with code 3"),
        (
            state(status="exited", exit_code=127, Error="exec: not found"),
            "exited with code 127: exec: not found",
        ),
        (state(status="dead", exit_code=1), "exited with code 1"),
        (state(status="paused"), "is paused, not running"),
        (state(status="exited", exit_code=137, OOMKilled=True), "ran out of memory"),
    ],
)
def test_describe_failure(attrs, expected):
    problem = describe_failure(attrs, 0, STARTED)

    if expected:
        assert expected in problem
    else:
        assert problem == ""


def test_last_check_output_is_bounded():
    health = {"Log": [{"ExitCode": 1, "Output": "x" * 1000}]}

    text = last_check_output(health)

    assert text.startswith("exit code 1, output 'xxx")
    assert len(text) < 400
    assert last_check_output({}) == "none yet"
