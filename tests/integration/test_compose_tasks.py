"""Hooks, stickers and the non-deploy task types on the Compose executor,
against the real engine, Compose v2 and the registry. The stacks come from the
Compose executor's own test helper."""

from __future__ import annotations

import json

import docker
import pytest

from stella.agent.v1 import task_pb2
from stella_agent.config import config_from_mapping
from stella_agent.executors.compose import ComposeExecutor
from stella_agent.logstream import STDOUT
from stella_agent.runner import TaskRunner
from tests.integration.test_compose_executor import (
    Stacks,
    free_port,
    http_get,
    new_stack_name,
)

pytestmark = [pytest.mark.docker, pytest.mark.compose]


class TaskStacks(Stacks):
    """Stacks with a tool image for hooks, a sticker path in tmp_path, and the
    log chunks of the last task."""

    def __init__(self, tmp_path, images, compose_command) -> None:
        super().__init__(tmp_path, images, compose_command)
        self.sticker_path = tmp_path / "stella" / "version.json"
        config = config_from_mapping(
            {
                "agent_id": "t",
                "state_dir": str(self.state_dir),
                "tasks": {"health_timeout_seconds": 30, "settle_seconds": 2},
                "docker": {"stop_timeout_seconds": 1},
                "hooks": {"image": images["tools:v1"].reference},
                "sticker": {"path": str(self.sticker_path)},
            }
        )
        self.runner = TaskRunner(
            config, {"compose": ComposeExecutor()}, docker.from_env
        )
        self.chunks = []

    def run(self, task: task_pb2.AgentTask):
        import asyncio

        if task.HasField("deploy"):
            self.projects.add(task.deploy.config.stack_name)
        self.chunks = []
        context = self.runner.new_context(task, self.chunks.append)
        return asyncio.run(self.runner.run(context))

    def stdout(self) -> str:
        return b"".join(c.data for c in self.chunks if c.stream == STDOUT).decode()


@pytest.fixture
def stacks(tmp_path, test_images, compose_command):
    helper = TaskStacks(tmp_path, test_images, compose_command)
    yield helper
    helper.tear_down()


def compose_task(task_id: str, **payload) -> task_pb2.AgentTask:
    types = {
        "health_check": task_pb2.TASK_TYPE_HEALTH_CHECK,
        "inspect": task_pb2.TASK_TYPE_INSPECT,
        "execute_command": task_pb2.TASK_TYPE_EXECUTE_COMMAND,
        "read_sticker": task_pb2.TASK_TYPE_READ_STICKER,
    }
    ((field, value),) = payload.items()
    return task_pb2.AgentTask(
        id=task_id,
        type=types[field],
        executor=task_pb2.EXECUTOR_COMPOSE,
        **{field: value},
    )


def test_stack_hooks_sticker_and_tasks(stacks):
    name = new_stack_name()
    port = free_port()
    lock, expected = stacks.web_stack(port)
    task = stacks.deploy_task(name, lock, expected, release_id="c1")
    task.deploy.hooks.pre_deploy.command.extend(
        ["sh", "-c", "echo pre sees $(ls /deploy)"]
    )
    task.deploy.hooks.post_deploy.command.extend(["sh", "-c", "echo post $PWD"])
    task.deploy.config.sticker.path = str(stacks.sticker_path)

    deployed = stacks.run(task)
    deploy_stdout = stacks.stdout()
    health = stacks.run(
        compose_task(
            "c-hc",
            health_check=task_pb2.HealthCheckPayload(
                stack_name=name,
                probe=task_pb2.Probe(http=task_pb2.HttpProbe(port=8080), service="web"),
            ),
        )
    )
    inspected = stacks.run(
        compose_task("c-in", inspect=task_pb2.InspectPayload(stack_name=name))
    )
    command = stacks.run(
        compose_task(
            "c-ex",
            execute_command=task_pb2.ExecuteCommandPayload(
                stack_name=name, service="web", argv=["cat", "/www/index.html"]
            ),
        )
    )
    sticker = stacks.run(
        compose_task("c-rs", read_sticker=task_pb2.ReadStickerPayload())
    )

    assert deployed.success, deployed.error
    assert "pre sees compose.stella.lock.yml" in deploy_stdout
    assert "post /deploy" in deploy_stdout
    assert deployed.outputs["sticker_path"] == str(stacks.sticker_path)
    assert health.success, health.error
    assert health.outputs["status"] == "healthy"
    assert health.outputs["service.migrate"] == "completed"
    assert health.outputs["probe_passed"] == "true"
    report = json.loads(inspected.outputs["report"])
    assert sorted(report["services"]) == ["migrate", "web", "worker"]
    assert report["release"]["release_id"] == "c1"
    assert report["version_file"]["service_digests"] == expected
    assert inspected.outputs["release_id"] == "c1"
    assert command.success, command.error
    assert command.outputs["stdout"] == "v1\n"
    assert sticker.success, sticker.error
    assert sticker.outputs["project_name"] == name
    assert json.loads(sticker.outputs["sticker"])["service_digests"] == expected


def test_stack_post_deploy_hook_rolls_back(stacks):
    name = new_stack_name()
    port = free_port()
    lock_v1, expected_v1 = stacks.web_stack(port)
    lock_v2, expected_v2 = stacks.web_stack(port, web="web:v2")
    first = stacks.run(stacks.deploy_task(name, lock_v1, expected_v1))
    task = stacks.deploy_task(name, lock_v2, expected_v2, release_id="r2")
    task.deploy.hooks.post_deploy.command.extend(["sh", "-c", "exit 4"])

    result = stacks.run(task)

    assert first.success, first.error
    assert result.error_type == "hook_failed"
    assert result.rolled_back
    assert http_get(port) == "v1"


def test_stack_health_check_missing(stacks):
    result = stacks.run(
        compose_task(
            "c-hc2",
            health_check=task_pb2.HealthCheckPayload(stack_name=new_stack_name()),
        )
    )

    assert result.error_type == "not_found"
