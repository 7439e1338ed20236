"""The Compose executor against the real engine, Compose v2 and the registry.

Every stack is a web service (health check, port published on loopback), a
worker (no health check) and a one-shot migration the web service waits for.
Each test tears down every project it created with ``docker compose down -v``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import subprocess
import urllib.request
import uuid
from pathlib import Path

import docker
import pytest
import yaml
from google.protobuf.duration_pb2 import Duration

from stella.agent.v1 import task_pb2
from stella_agent.config import config_from_mapping
from stella_agent.executors.compose import ComposeExecutor
from stella_agent.executors.compose_stack import project_name_for
from stella_agent.runner import TaskRunner
from tests.conftest import TEST_LABEL, TEST_RUN

pytestmark = [pytest.mark.docker, pytest.mark.compose]

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
        return response.read().decode().strip()


class Stacks:
    """Builds lock files and tasks, runs them, and remembers projects to remove."""

    def __init__(self, tmp_path: Path, images, compose_command: list[str]) -> None:
        self.state_dir = tmp_path / "state"
        self.srv = tmp_path / "srv"
        self.images = images
        self.compose_command = compose_command
        self.projects: set[str] = set()
        self.config_mapping = {
            "agent_id": "t",
            "state_dir": str(self.state_dir),
            "tasks": {
                "health_timeout_seconds": 30,
                "settle_seconds": 2,
                "allowed_deployment_roots": [str(tmp_path / "srv")],
            },
            "docker": {"stop_timeout_seconds": 1},
        }
        config = config_from_mapping(self.config_mapping)
        self.runner = TaskRunner(
            config, {"compose": ComposeExecutor()}, docker.from_env
        )

    def image(self, name: str) -> str:
        return self.images[name].reference

    def digest(self, name: str) -> str:
        return self.images[name].digest

    def lock(self, services: dict) -> str:
        for spec in services.values():
            spec.setdefault("labels", {})[TEST_LABEL] = TEST_RUN
            # Compose 2.40.3 stops orphans with this grace period, not up --timeout.
            spec.setdefault("stop_grace_period", "1s")
        return yaml.safe_dump({"services": services}, sort_keys=True)

    def web_stack(
        self, port: int, web: str = "web:v1", worker_extra: dict | None = None
    ) -> tuple[str, dict[str, str]]:
        """Return the lock file and expected digests of the standard stack."""
        services = {
            "web": {
                "image": self.image(web),
                "ports": [f"127.0.0.1:{port}:8080"],
                "depends_on": {
                    "migrate": {"condition": "service_completed_successfully"}
                },
            },
            "worker": {"image": self.image("worker:v1"), **(worker_extra or {})},
            "migrate": {
                "image": self.image("tools:v1"),
                "restart": "no",
                "command": ["sh", "-c", "echo migrated"],
            },
        }
        expected = {
            "web": self.digest(web),
            "worker": self.digest("worker:v1"),
            "migrate": self.digest("tools:v1"),
        }
        return self.lock(services), expected

    def deploy_task(
        self,
        stack_name: str,
        lock: str,
        expected: dict[str, str],
        *,
        release_id: str = "r1",
        environment: dict[str, str] | None = None,
        configs: list[task_pb2.ArtifactReference] = (),
        deployment_directory: str = "",
        health_check: task_pb2.HealthCheckConfig | None = None,
        timeout_seconds: int = 0,
    ) -> task_pb2.AgentTask:
        content = lock.encode()
        artifacts = [
            task_pb2.ArtifactReference(
                name="compose.stella.lock.yml",
                type="compose_lock",
                sha256=hashlib.sha256(content).hexdigest(),
                content=content,
            ),
            *configs,
        ]
        config = task_pb2.DeployConfig(
            stack_name=stack_name,
            expected_digests=expected,
            release_id=release_id,
            release_name=f"release {release_id}",
            environment=environment or {},
            deployment_directory=deployment_directory,
            health_check=health_check,
        )
        task = task_pb2.AgentTask(
            id=f"task-{uuid.uuid4().hex[:8]}",
            executor=task_pb2.EXECUTOR_COMPOSE,
            type=task_pb2.TASK_TYPE_DEPLOY,
            deploy=task_pb2.DeployPayload(config=config, artifacts=artifacts),
        )
        if timeout_seconds:
            task.timeout.seconds = timeout_seconds
        return task

    def rollback_task(self, stack_name: str) -> task_pb2.AgentTask:
        return task_pb2.AgentTask(
            id=f"task-{uuid.uuid4().hex[:8]}",
            executor=task_pb2.EXECUTOR_COMPOSE,
            type=task_pb2.TASK_TYPE_ROLLBACK,
            rollback=task_pb2.RollbackPayload(stack_name=stack_name),
        )

    def run(self, task: task_pb2.AgentTask):
        if task.HasField("deploy"):
            self.projects.add(project_name_for(task.deploy.config.stack_name))
        context = self.runner.new_context(task, None)
        return asyncio.run(self.runner.run(context))

    def stack_directory(self, project: str) -> Path:
        return self.state_dir / "stacks" / project

    def tear_down(self) -> None:
        for project in self.projects:
            subprocess.run(
                [
                    *self.compose_command,
                    "-p",
                    project,
                    "down",
                    "-v",
                    "--remove-orphans",
                    "-t",
                    "1",
                ],
                capture_output=True,
                timeout=120,
                check=False,
            )


@pytest.fixture
def stacks(tmp_path, test_images, compose_command):
    helper = Stacks(tmp_path, test_images, compose_command)
    yield helper
    helper.tear_down()


def succeeded(result) -> bool:
    """Return result.success, printing the task log when it failed."""
    if not result.success:
        print(f"task failed: {result.error}\n{result.logs}")
    return result.success


def new_stack_name() -> str:
    return f"stella-test-{uuid.uuid4().hex[:8]}"


def containers_of(client, project: str) -> dict[str, list]:
    grouped: dict[str, list] = {}
    for container in client.containers.list(
        all=True, filters={"label": [f"{PROJECT_LABEL}={project}"]}
    ):
        grouped.setdefault(container.labels[SERVICE_LABEL], []).append(container)
    return grouped


def test_compose_first_deploy(stacks, docker_client):
    name = new_stack_name()
    port = free_port()
    mount = {"volumes": ["./config/app.env:/config/app.env:ro"]}
    lock, expected = stacks.web_stack(port, worker_extra=mount)
    secret = b"password=s3cret\n"
    config_file = task_pb2.ArtifactReference(
        name="config/app.env",
        type="config",
        sha256=hashlib.sha256(secret).hexdigest(),
        content=secret,
        secret=True,
    )

    result = stacks.run(stacks.deploy_task(name, lock, expected, configs=[config_file]))

    assert succeeded(result)
    assert result.outputs["project_name"] == name
    assert result.outputs["service.web"] == "healthy"
    assert result.outputs["service.worker"] == "running"
    assert result.outputs["service.migrate"] == "completed"
    assert result.outputs["release_id"] == "r1"
    assert "previous_release_id" not in result.outputs
    assert http_get(port) == "v1"
    directory = stacks.stack_directory(name)
    assert (directory / "compose.stella.lock.yml").read_text() == lock
    assert (directory / "config" / "app.env").stat().st_mode & 0o777 == 0o600
    (worker,) = containers_of(docker_client, name)["worker"]
    assert worker.exec_run(["cat", "/config/app.env"]).output == secret
    sticker = json.loads((directory / "version.json").read_text())
    assert sticker["project_name"] == name
    assert sticker["release_id"] == "r1"
    assert sticker["service_digests"] == expected
    assert result.metrics.pull_duration_ms >= 0
    assert result.metrics.health_check_duration_ms > 0


def test_compose_upgrade(stacks, docker_client):
    name = new_stack_name()
    port = free_port()
    lock_v1, expected_v1 = stacks.web_stack(port)
    lock_v2, expected_v2 = stacks.web_stack(port, web="web:v2")
    assert succeeded(stacks.run(stacks.deploy_task(name, lock_v1, expected_v1)))

    result = stacks.run(stacks.deploy_task(name, lock_v2, expected_v2, release_id="r2"))

    assert succeeded(result)
    assert result.outputs["previous_release_id"] == "r1"
    assert http_get(port) == "v2"
    web = containers_of(docker_client, name)["web"]
    assert len(web) == 1
    assert web[0].image.id == docker_client.images.get(stacks.image("web:v2")).id
    backup = (
        stacks.stack_directory(name)
        / ".stella"
        / "backup"
        / "files"
        / "compose.stella.lock.yml"
    )
    assert backup.read_text() == lock_v1


def test_compose_failing_health_rolls_back(stacks, docker_client):
    name = new_stack_name()
    port = free_port()
    lock_v1, expected_v1 = stacks.web_stack(port)
    lock_broken, expected_broken = stacks.web_stack(port, web="broken:v1")
    assert succeeded(stacks.run(stacks.deploy_task(name, lock_v1, expected_v1)))

    result = stacks.run(
        stacks.deploy_task(name, lock_broken, expected_broken, release_id="r2")
    )

    assert not result.success
    assert result.error_type == "health_check_failed"
    assert result.rolled_back
    assert "web: unhealthy" in result.error
    assert http_get(port) == "v1"
    web = containers_of(docker_client, name)["web"]
    assert [c.image.id for c in web] == [
        docker_client.images.get(stacks.image("web:v1")).id
    ]
    directory = stacks.stack_directory(name)
    assert (directory / "compose.stella.lock.yml").read_text() == lock_v1
    assert json.loads((directory / "version.json").read_text())["release_id"] == "r1"


def test_compose_unpinned_image_rejected(stacks, docker_client):
    name = new_stack_name()
    lock = stacks.lock({"web": {"image": "127.0.0.1:5000/stella-test/web:v1"}})

    result = stacks.run(
        stacks.deploy_task(name, lock, {"web": stacks.digest("web:v1")})
    )

    assert not result.success
    assert result.error_type == "invalid_task"
    assert "not pinned by digest" in result.error
    assert containers_of(docker_client, name) == {}
    assert not (stacks.stack_directory(name) / "compose.stella.lock.yml").exists()


def test_compose_wrong_digest_touches_nothing(stacks, docker_client):
    name = new_stack_name()
    port = free_port()
    lock_v1, expected_v1 = stacks.web_stack(port)
    assert succeeded(stacks.run(stacks.deploy_task(name, lock_v1, expected_v1)))
    before = {
        c.id for group in containers_of(docker_client, name).values() for c in group
    }
    lock_v2, _ = stacks.web_stack(port, web="web:v2")

    result = stacks.run(stacks.deploy_task(name, lock_v2, expected_v1, release_id="r2"))

    assert not result.success
    assert result.error_type == "digest_mismatch"
    assert not result.rolled_back
    after = {
        c.id for group in containers_of(docker_client, name).values() for c in group
    }
    assert after == before
    assert http_get(port) == "v1"
    assert (
        stacks.stack_directory(name) / "compose.stella.lock.yml"
    ).read_text() == lock_v1


def test_compose_crash_loop_fails_and_takes_down(stacks, docker_client):
    name = new_stack_name()
    lock = stacks.lock(
        {"app": {"image": stacks.image("crash:v1"), "restart": "always"}}
    )

    result = stacks.run(
        stacks.deploy_task(name, lock, {"app": stacks.digest("crash:v1")})
    )

    assert not result.success
    assert result.error_type == "health_check_failed"
    assert not result.rolled_back
    assert "app: " in result.error
    assert "taken down" in result.error
    assert containers_of(docker_client, name) == {}
    assert not (stacks.stack_directory(name) / "compose.stella.lock.yml").exists()


def test_compose_orphan_removal_spares_other_stack(stacks, docker_client):
    first = new_stack_name()
    second = new_stack_name()
    worker = stacks.image("worker:v1")
    digest = stacks.digest("worker:v1")
    two_services = stacks.lock(
        {"worker": {"image": worker}, "extra": {"image": worker}}
    )
    one_service = stacks.lock({"worker": {"image": worker}})
    assert succeeded(
        stacks.run(
            stacks.deploy_task(first, two_services, {"worker": digest, "extra": digest})
        )
    )
    assert succeeded(
        stacks.run(
            stacks.deploy_task(
                second, two_services, {"worker": digest, "extra": digest}
            )
        )
    )
    second_before = {
        c.id for group in containers_of(docker_client, second).values() for c in group
    }

    result = stacks.run(
        stacks.deploy_task(first, one_service, {"worker": digest}, release_id="r2")
    )

    assert succeeded(result)
    assert set(containers_of(docker_client, first)) == {"worker"}
    second_after = containers_of(docker_client, second)
    assert {c.id for group in second_after.values() for c in group} == second_before
    assert all(c.status == "running" for group in second_after.values() for c in group)


def test_compose_environment_arrives_intact(stacks, docker_client):
    name = new_stack_name()
    values = {
        "TRICKY_DOLLAR": "$HOME and ${PATH}",
        "TRICKY_QUOTES": "a'b\"c",
        "TRICKY_HASH": "#x # y",
        "TRICKY_NEWLINE": "line one\nline two",
    }
    services = {
        "worker": {
            "image": stacks.image("worker:v1"),
            "environment": [*values, "LITERAL=$$HOME"],
        }
    }
    lock = stacks.lock(services)

    result = stacks.run(
        stacks.deploy_task(
            name, lock, {"worker": stacks.digest("worker:v1")}, environment=values
        )
    )

    assert succeeded(result)
    (container,) = containers_of(docker_client, name)["worker"]
    environment = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
    for key, value in values.items():
        assert environment[key] == value
    assert environment["LITERAL"] == "$HOME"
    printed = container.exec_run(
        ["sh", "-c", 'printf %s "$TRICKY_NEWLINE"']
    ).output.decode()
    assert printed == values["TRICKY_NEWLINE"]


def test_compose_rollback_task_restores_previous(stacks, docker_client):
    name = new_stack_name()
    port = free_port()
    lock_v1, expected_v1 = stacks.web_stack(port)
    lock_v2, expected_v2 = stacks.web_stack(port, web="web:v2")
    assert succeeded(stacks.run(stacks.deploy_task(name, lock_v1, expected_v1)))
    assert succeeded(
        stacks.run(stacks.deploy_task(name, lock_v2, expected_v2, release_id="r2"))
    )

    result = stacks.run(stacks.rollback_task(name))

    assert succeeded(result)
    assert result.outputs["release_id"] == "r1"
    assert result.outputs["previous_release_id"] == "r2"
    assert http_get(port) == "v1"
    directory = stacks.stack_directory(name)
    assert (directory / "compose.stella.lock.yml").read_text() == lock_v1
    assert (
        directory / ".stella" / "backup" / "files" / "compose.stella.lock.yml"
    ).read_text() == lock_v2


def test_compose_rollback_without_backup_fails(stacks):
    name = new_stack_name()
    lock = stacks.lock({"worker": {"image": stacks.image("worker:v1")}})
    assert succeeded(
        stacks.run(
            stacks.deploy_task(name, lock, {"worker": stacks.digest("worker:v1")})
        )
    )

    result = stacks.run(stacks.rollback_task(name))

    assert not result.success
    assert result.error_type == "rollback_failed"
    assert "no previous release" in result.error


def test_compose_project_name_conflict_rejected(stacks, docker_client):
    name = new_stack_name()
    lock = stacks.lock({"worker": {"image": stacks.image("worker:v1")}})
    expected = {"worker": stacks.digest("worker:v1")}
    assert succeeded(stacks.run(stacks.deploy_task(name, lock, expected)))
    before = {
        c.id for group in containers_of(docker_client, name).values() for c in group
    }

    result = stacks.run(
        stacks.deploy_task(name.upper(), lock, expected, release_id="r2")
    )

    assert not result.success
    assert result.error_type == "conflict"
    assert name.upper() in result.error
    after = {
        c.id for group in containers_of(docker_client, name).values() for c in group
    }
    assert after == before


def test_compose_task_timeout_restores_previous(stacks, docker_client):
    name = new_stack_name()
    port = free_port()
    lock_v1, expected_v1 = stacks.web_stack(port)
    lock_v2, expected_v2 = stacks.web_stack(port, web="web:v2")
    assert succeeded(stacks.run(stacks.deploy_task(name, lock_v1, expected_v1)))
    never_settles = task_pb2.HealthCheckConfig(settle_period=Duration(seconds=600))
    task = stacks.deploy_task(
        name,
        lock_v2,
        expected_v2,
        release_id="r2",
        health_check=never_settles,
        timeout_seconds=6,
    )

    result = stacks.run(task)

    assert not result.success
    assert result.error_type == "timeout"
    assert result.failed_phase == "health"
    assert result.rolled_back
    assert "(r1) was restored" in result.error
    assert http_get(port) == "v1"


def test_compose_custom_deployment_directory(stacks, docker_client):
    name = new_stack_name()
    directory = stacks.srv / name
    lock = stacks.lock({"worker": {"image": stacks.image("worker:v1")}})
    expected = {"worker": stacks.digest("worker:v1")}
    task = stacks.deploy_task(name, lock, expected, deployment_directory=str(directory))

    result = stacks.run(task)

    assert succeeded(result)
    assert result.outputs["deployment_directory"] == str(directory.resolve())
    assert (directory / "compose.stella.lock.yml").read_text() == lock
    assert not stacks.stack_directory(name).exists()
    (worker,) = containers_of(docker_client, name)["worker"]
    working_dir = worker.labels["com.docker.compose.project.working_dir"]
    assert working_dir == str(directory.resolve())
