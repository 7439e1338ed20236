"""Helpers of the task-type, hook, sticker and upload tests: an agent with the
Docker executor whose config points every host path into the test's tmp_path,
and builders of the tasks."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import docker
from google.protobuf.duration_pb2 import Duration

from stella.agent.v1 import result_pb2, task_pb2
from stella_agent.config import config_from_mapping
from stella_agent.executors.docker import DockerExecutor
from stella_agent.runner import TaskRunner
from tests.conftest import TEST_LABEL, TEST_RUN


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TaskAgent:
    """A TaskRunner with the Docker executor; the log of the last task is kept."""

    def __init__(self, tmp_path, tools_image: str, **sections: dict[str, Any]) -> None:
        self.sticker_dir = tmp_path / "stella"
        self.upload_root = tmp_path / "uploads"
        self.upload_root.mkdir(parents=True)
        raw: dict[str, Any] = {
            "agent_id": "test-agent",
            "state_dir": str(tmp_path / "state"),
            "docker": {"stop_timeout_seconds": 1},
            "tasks": {
                "health_timeout_seconds": 15,
                "settle_seconds": 2,
                "upload_roots": [str(self.upload_root)],
            },
            "hooks": {"image": tools_image, "timeout_seconds": 20},
            "sticker": {"path": str(self.sticker_dir / "version.json")},
        }
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        self.config = config_from_mapping(raw)
        self.runner = TaskRunner(
            self.config, {"docker": DockerExecutor()}, docker.from_env
        )
        self.log = ""
        self.chunks: list[result_pb2.LogChunk] = []

    def run(self, task: task_pb2.AgentTask) -> result_pb2.TaskResult:
        self.chunks = []
        context = self.runner.new_context(task, self.chunks.append)
        try:
            return asyncio.run(self.runner.run(context))
        finally:
            self.log = b"".join(chunk.data for chunk in self.chunks).decode()

    def stream_text(self, stream: int) -> str:
        """Return what the last task wrote to one log stream."""
        return b"".join(c.data for c in self.chunks if c.stream == stream).decode()


def deploy_task(
    task_id: str, image, name: str, port: int | None = None, **config
) -> task_pb2.AgentTask:
    """Build a deploy task of `image` (a TestImage) into container `name`."""
    hooks = config.pop("hooks", None)
    config.setdefault("ports", [f"127.0.0.1:{port}:8080"] if port else [])
    config.setdefault(
        "health_check", task_pb2.HealthCheckConfig(timeout=Duration(seconds=15))
    )
    labels = {TEST_LABEL: TEST_RUN, **config.pop("labels", {})}
    task = task_pb2.AgentTask(
        id=task_id,
        type=task_pb2.TASK_TYPE_DEPLOY,
        executor=task_pb2.EXECUTOR_DOCKER,
        deploy=task_pb2.DeployPayload(
            image=image.repository,
            digest=image.digest,
            config=task_pb2.DeployConfig(
                container_name=name,
                labels=labels,
                release_id=task_id,
                release_name=f"release {task_id}",
                **config,
            ),
        ),
    )
    if hooks is not None:
        task.deploy.hooks.CopyFrom(hooks)
    return task


def task_of(task_id: str, **payload) -> task_pb2.AgentTask:
    """Build a task from its one payload, e.g. task_of("t", inspect=...)."""
    (field, value), *_ = payload.items()
    types = {
        "rollback": task_pb2.TASK_TYPE_ROLLBACK,
        "health_check": task_pb2.TASK_TYPE_HEALTH_CHECK,
        "inspect": task_pb2.TASK_TYPE_INSPECT,
        "execute_command": task_pb2.TASK_TYPE_EXECUTE_COMMAND,
        "upload_files": task_pb2.TASK_TYPE_UPLOAD_FILES,
        "write_sticker": task_pb2.TASK_TYPE_WRITE_STICKER,
        "read_sticker": task_pb2.TASK_TYPE_READ_STICKER,
    }
    return task_pb2.AgentTask(id=task_id, type=types[field], **{field: value})


def run_tools_container(
    client, image: str, name: str, command: list[str] | None = None, **options
) -> Any:
    """Start a container labelled for the final sweep; by default it sleeps."""
    return client.containers.run(
        image,
        command=command or ["sleep", "600"],
        name=name,
        detach=True,
        labels={TEST_LABEL: TEST_RUN},
        **options,
    )
