"""The Docker executor against the real engine and the loopback registries.

Tasks run through TaskRunner, as the agent runs them. Every container gets the
``stella-test`` label and a name from the ``container_name`` fixture, which
removes it (and its -previous- and -failed- copies) after the test. Ports are
published on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import urllib.request
from collections.abc import Callable

import docker
import pytest
from google.protobuf.duration_pb2 import Duration

from stella.agent.v1 import result_pb2, task_pb2
from stella_agent.config import config_from_mapping
from stella_agent.executors.base import TaskContext
from stella_agent.executors.docker import DockerExecutor
from stella_agent.runner import TaskRunner
from tests.conftest import TEST_LABEL, TEST_RUN

pytestmark = pytest.mark.docker

MISSING_DIGEST = "sha256:" + "0" * 64
AUTH_REGISTRY = "127.0.0.1:5001"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
        return response.read().decode().strip()


def deploy_task(
    task_id: str, image, name: str, port: int | None = None, **config
) -> task_pb2.AgentTask:
    """Build a deploy task of `image` (a TestImage) into container `name`."""
    config.setdefault("ports", [f"127.0.0.1:{port}:8080"] if port else [])
    config.setdefault(
        "health_check", task_pb2.HealthCheckConfig(timeout=Duration(seconds=15))
    )
    labels = {TEST_LABEL: TEST_RUN, **config.pop("labels", {})}
    return task_pb2.AgentTask(
        id=task_id,
        type=task_pb2.TASK_TYPE_DEPLOY,
        executor=task_pb2.EXECUTOR_DOCKER,
        deploy=task_pb2.DeployPayload(
            image=config.pop("repository", image.repository),
            digest=config.pop("digest", image.digest),
            config=task_pb2.DeployConfig(
                container_name=name,
                labels=labels,
                release_id=task_id,
                release_name=f"release {task_id}",
                **config,
            ),
        ),
    )


def rollback_task(task_id: str, name: str) -> task_pb2.AgentTask:
    return task_pb2.AgentTask(
        id=task_id,
        type=task_pb2.TASK_TYPE_ROLLBACK,
        rollback=task_pb2.RollbackPayload(container_name=name),
    )


class SimulatedCrash(BaseException):
    """Stops a flow the way a killed agent would: no rollback code runs."""


class Agent:
    """A TaskRunner with the Docker executor, and the log and recovery notes
    of the last task."""

    def __init__(self, tmp_path) -> None:
        config = config_from_mapping(
            {
                "agent_id": "test-agent",
                "state_dir": str(tmp_path),
                "docker": {"stop_timeout_seconds": 1},
                "tasks": {"health_timeout_seconds": 15, "settle_seconds": 2},
                # Keep the version sticker every deploy writes out of /var/stella.
                "sticker": {"path": str(tmp_path / "stella" / "version.json")},
            }
        )
        self.runner = TaskRunner(config, {"docker": DockerExecutor()}, docker.from_env)
        self.log = ""
        self.notes: dict[str, str] = {}

    def run(
        self,
        task: task_pb2.AgentTask,
        on_phase: Callable[[TaskContext, str], None] | None = None,
        credentials: task_pb2.Credentials | None = None,
        crash_phase: str = "",
    ) -> result_pb2.TaskResult:
        """Run `task`; with `crash_phase`, raise SimulatedCrash on entering it."""
        chunks: list[bytes] = []
        holder: list[TaskContext] = []
        self.notes = {}

        def phase_changed(phase: str) -> None:
            if phase == crash_phase:
                raise SimulatedCrash(phase)
            if on_phase is not None:
                on_phase(holder[0], phase)

        context = self.runner.new_context(
            task,
            lambda chunk: chunks.append(chunk.data),
            credentials=credentials,
            on_phase=phase_changed,
            on_note=self.notes.update,
        )
        holder.append(context)
        try:
            return asyncio.run(self.runner.run(context))
        finally:
            self.log = b"".join(chunks).decode()

    def recover(self, task: task_pb2.AgentTask, phase: str) -> result_pb2.TaskResult:
        """Recover `task` after a SimulatedCrash in `phase`, with its notes."""
        chunks: list[bytes] = []
        result = asyncio.run(
            self.runner.recover(
                task, phase, dict(self.notes), lambda c: chunks.append(c.data)
            )
        )
        self.log = b"".join(chunks).decode()
        return result


@pytest.fixture
def agent(tmp_path) -> Agent:
    return Agent(tmp_path)


def containers_named(client, name: str) -> list[str]:
    """Return the names of all containers whose name starts with `name`."""
    found = client.containers.list(all=True, filters={"name": name})
    return sorted(c.name for c in found if c.name.startswith(name))


def running_state(client, name: str) -> tuple[str, str, bool]:
    """Return the id, start time and running flag of container `name`."""
    attrs = client.api.inspect_container(name)
    return attrs["Id"], attrs["State"]["StartedAt"], attrs["State"]["Running"]


def test_first_deploy_serves_and_labels(
    agent, test_images, container_name, docker_client
):
    port = free_port()
    image = test_images["web:v1"]

    result = agent.run(deploy_task("first-1", image, container_name, port))

    assert result.success, result.error
    assert http_get(port) == "v1"
    outputs = dict(result.outputs)
    assert outputs["container_name"] == container_name
    assert outputs["digest"] == image.digest
    assert outputs["changed"] == "true"
    assert outputs["previous_digest"] == ""
    assert outputs["previous_container_id"] == ""
    container = docker_client.containers.get(outputs["container_id"])
    assert container.name == container_name
    labels = container.labels
    assert labels["stella.digest"] == image.digest
    assert labels["stella.release.id"] == "first-1"
    assert labels["stella.release.name"] == "release first-1"
    assert labels["stella.image"] == image.repository
    assert labels["stella.task.id"] == "first-1"
    assert labels["stella.managed"] == "true"
    assert labels["stella.role"] == "current"
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", labels["stella.deployed.at"]
    )
    assert labels[TEST_LABEL] == TEST_RUN
    assert container.attrs["Config"]["Image"] == image.reference
    assert container.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert result.metrics.health_check_duration_ms > 0
    assert result.metrics.deploy_duration_ms >= result.metrics.health_check_duration_ms
    assert "health: healthy" in agent.log


def test_upgrade_removes_previous(agent, test_images, container_name, docker_client):
    port = free_port()
    first = agent.run(deploy_task("up-1", test_images["web:v1"], container_name, port))

    second = agent.run(deploy_task("up-2", test_images["web:v2"], container_name, port))

    assert first.success, first.error
    assert second.success, second.error
    assert http_get(port) == "v2"
    assert second.outputs["previous_digest"] == test_images["web:v1"].digest
    assert second.outputs["previous_container_id"] == first.outputs["container_id"]
    assert containers_named(docker_client, container_name) == [container_name]
    assert "-previous-" in agent.log


@pytest.mark.parametrize("bad_image", ["broken:v1", "crash:v1"])
def test_unhealthy_release_rolls_back(
    agent, test_images, container_name, docker_client, bad_image
):
    port = free_port()
    good = agent.run(deploy_task("rb-1", test_images["web:v2"], container_name, port))

    bad = agent.run(deploy_task("rb-2", test_images[bad_image], container_name, port))

    assert good.success, good.error
    assert not bad.success
    assert bad.error_type == "health_check_failed"
    assert bad.failed_phase == "health"
    assert bad.rolled_back
    assert not bad.retriable
    assert http_get(port) == "v2"
    container_id, _, running = running_state(docker_client, container_name)
    assert container_id == good.outputs["container_id"]
    assert running
    assert containers_named(docker_client, container_name) == [container_name]
    assert "rolling back" in agent.log
    assert "restored the previous container" in agent.log


def test_crash_reports_exit_code(agent, test_images, container_name):
    result = agent.run(deploy_task("crash-1", test_images["crash:v1"], container_name))

    assert not result.success
    assert result.error_type == "health_check_failed"
    assert "code 3" in result.error
    assert not result.rolled_back
    assert "no previous container to restore" in agent.log


@pytest.mark.parametrize(
    ("repository", "digest"),
    [
        # A digest that exists, but in another repository.
        ("127.0.0.1:5000/stella-test/worker", "web:v1"),
        # A digest that exists nowhere.
        ("127.0.0.1:5000/stella-test/web", MISSING_DIGEST),
    ],
)
def test_missing_image_leaves_running_container(
    agent, test_images, container_name, docker_client, repository, digest
):
    port = free_port()
    digest = test_images[digest].digest if digest in test_images else digest
    good = agent.run(deploy_task("miss-1", test_images["web:v1"], container_name, port))
    before = running_state(docker_client, container_name)

    result = agent.run(
        deploy_task(
            "miss-2",
            test_images["web:v1"],
            container_name,
            port,
            repository=repository,
            digest=digest,
        )
    )

    assert good.success, good.error
    assert not result.success
    assert result.error_type == "image_not_found"
    assert not result.retriable
    assert result.failed_phase == "pull"
    assert not result.rolled_back
    assert f"{repository}@{digest}" in result.error
    assert running_state(docker_client, container_name) == before
    assert http_get(port) == "v1"


def test_unreachable_registry_is_retriable(agent, test_images, container_name):
    image = test_images["web:v1"]
    closed = free_port()

    result = agent.run(
        deploy_task(
            "unreach-1",
            image,
            container_name,
            repository=f"127.0.0.1:{closed}/stella-test/web",
            digest=test_images["web:v2"].digest,
        )
    )

    assert not result.success
    assert result.error_type == "pull_failed"
    assert result.retriable
    assert "connection refused" in result.error


def test_private_registry_needs_credentials(agent, test_images, container_name):
    # The private registry holds only web:v1. Asked for web:v2's digest, it
    # answers 401 without a login and "manifest unknown" with one.
    task = deploy_task(
        "auth-1",
        test_images["web:v2"],
        container_name,
        repository=f"{AUTH_REGISTRY}/stella-test/web",
    )
    credentials = task_pb2.Credentials(
        registries=[
            task_pb2.RegistryAuth(
                registry=AUTH_REGISTRY,
                username="stella-dev",
                password="stella-dev-password",
            )
        ]
    )

    anonymous = agent.run(task)
    authenticated = agent.run(task, credentials=credentials)

    assert anonymous.error_type == "registry_auth_failed"
    assert not anonymous.retriable
    assert authenticated.error_type == "image_not_found"
    assert "stella-dev-password" not in agent.log


def test_private_registry_pull_with_credentials(
    agent, test_images, container_name, docker_client
):
    port = free_port()
    image = test_images["auth/web:v1"]
    credentials = task_pb2.Credentials(
        registries=[
            task_pb2.RegistryAuth(
                registry=AUTH_REGISTRY,
                username="stella-dev",
                password="stella-dev-password",
            )
        ]
    )

    try:
        result = agent.run(
            deploy_task("auth-2", image, container_name, port), credentials=credentials
        )
        assert result.success, result.error
        served = http_get(port)
        container = docker_client.containers.get(result.outputs["container_id"])
    finally:
        # Remove the private registry's reference again, as the image build
        # script does, so later tests find the engine as the build left it.
        for leftover in docker_client.containers.list(
            all=True, filters={"name": container_name}
        ):
            leftover.remove(force=True)
        docker_client.images.remove(image.reference)

    assert served == "v1"
    assert container.attrs["Config"]["Image"] == image.reference


def test_invalid_port_rejected_before_stop(
    agent, test_images, container_name, docker_client
):
    port = free_port()
    good = agent.run(deploy_task("inv-1", test_images["web:v1"], container_name, port))
    before = running_state(docker_client, container_name)

    result = agent.run(
        deploy_task(
            "inv-2",
            test_images["web:v2"],
            container_name,
            ports=[f"127.0.0.1:{port}:8080", "127.0.0.1:70000:8080"],
        )
    )

    assert good.success, good.error
    assert result.error_type == "invalid_task"
    assert result.failed_phase == "validate"
    assert "'127.0.0.1:70000:8080'" in result.error
    assert running_state(docker_client, container_name) == before
    assert "pulling" not in agent.log


def test_port_in_use_restores_previous(
    agent, test_images, container_name, docker_client
):
    port = free_port()
    good = agent.run(deploy_task("busy-1", test_images["web:v1"], container_name, port))
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        busy = blocker.getsockname()[1]

        result = agent.run(
            deploy_task(
                "busy-2",
                test_images["web:v2"],
                container_name,
                ports=[f"127.0.0.1:{port}:8080", f"127.0.0.1:{busy}:8081"],
            )
        )

    assert good.success, good.error
    assert not result.success
    assert result.error_type == "docker_error"
    assert result.failed_phase == "start"
    assert result.rolled_back
    assert "already in use" in result.error
    container_id, _, running = running_state(docker_client, container_name)
    assert container_id == good.outputs["container_id"]
    assert running
    assert http_get(port) == "v1"
    assert containers_named(docker_client, container_name) == [container_name]


def test_keep_previous_then_rollback(agent, test_images, container_name, docker_client):
    port = free_port()
    first = agent.run(
        deploy_task("keep-1", test_images["web:v1"], container_name, port)
    )
    second = agent.run(
        deploy_task(
            "keep-2", test_images["web:v2"], container_name, port, keep_previous=True
        )
    )
    kept_name = second.outputs["previous_container_name"]
    kept_container = docker_client.containers.get(kept_name)

    rollback = agent.run(rollback_task("keep-3", container_name))

    assert first.success, first.error
    assert second.success, second.error
    assert re.fullmatch(
        re.escape(container_name) + r"-previous-\d{8}T\d{12}Z", kept_name
    )
    assert kept_container.id == first.outputs["container_id"]
    assert kept_container.status == "exited"
    assert kept_container.labels["stella.digest"] == test_images["web:v1"].digest
    assert rollback.success, rollback.error
    assert rollback.outputs["container_id"] == first.outputs["container_id"]
    assert rollback.outputs["digest"] == test_images["web:v1"].digest
    assert rollback.outputs["previous_digest"] == test_images["web:v2"].digest
    assert rollback.outputs["restored_from"] == kept_name
    assert http_get(port) == "v1"
    assert containers_named(docker_client, container_name) == [container_name]


def test_keep_previous_keeps_only_newest(
    agent, test_images, container_name, docker_client
):
    port = free_port()
    for index, image in enumerate(["web:v1", "web:v2", "web:v1"]):
        result = agent.run(
            deploy_task(
                f"gen-{index}",
                test_images[image],
                container_name,
                port,
                keep_previous=True,
            )
        )
        assert result.success, result.error

    names = containers_named(docker_client, container_name)

    assert len(names) == 2
    assert names[0] == container_name
    assert names[1] == result.outputs["previous_container_name"]


def test_rollback_without_previous_fails(agent, container_name):
    result = agent.run(rollback_task("norb-1", container_name))

    assert result.error_type == "rollback_failed"
    assert f"no previous container for {container_name}" in result.error


def test_same_digest_redeploy_is_unchanged(
    agent, test_images, container_name, docker_client
):
    port = free_port()
    image = test_images["web:v1"]
    first = agent.run(deploy_task("same-1", image, container_name, port))

    again = agent.run(deploy_task("same-2", image, container_name, port))
    new_env = agent.run(
        deploy_task("same-3", image, container_name, port, environment={"A": "1"})
    )

    assert first.success, first.error
    assert again.success, again.error
    assert again.outputs["changed"] == "false"
    assert again.outputs["container_id"] == first.outputs["container_id"]
    assert new_env.success, new_env.error
    assert new_env.outputs["changed"] == "true"
    assert new_env.outputs["container_id"] != first.outputs["container_id"]
    assert http_get(port) == "v1"


def test_cancel_during_health_rolls_back(
    agent, test_images, container_name, docker_client
):
    port = free_port()
    good = agent.run(
        deploy_task("cancel-1", test_images["web:v1"], container_name, port)
    )

    def cancel_soon(context: TaskContext, phase: str) -> None:
        if phase == "health":
            threading.Timer(1.0, context.cancel, ["test cancel"]).start()

    # worker:v1 has no health check, so the wait lasts the settle period.
    slow = deploy_task(
        "cancel-2",
        test_images["worker:v1"],
        container_name,
        port,
        health_check=task_pb2.HealthCheckConfig(settle_period=Duration(seconds=30)),
    )
    result = agent.run(slow, on_phase=cancel_soon)

    assert good.success, good.error
    assert result.error_type == "cancelled"
    assert result.failed_phase == "health"
    assert result.rolled_back
    assert "test cancel" in result.error
    assert http_get(port) == "v1"
    container_id, _, running = running_state(docker_client, container_name)
    assert container_id == good.outputs["container_id"]
    assert running


def test_asyncio_cancel_waits_for_rollback(
    agent, test_images, container_name, docker_client
):
    port = free_port()
    good = agent.run(
        deploy_task("acancel-1", test_images["web:v1"], container_name, port)
    )
    slow = deploy_task(
        "acancel-2",
        test_images["worker:v1"],
        container_name,
        port,
        health_check=task_pb2.HealthCheckConfig(settle_period=Duration(seconds=30)),
    )

    async def run_and_cancel() -> None:
        in_health = asyncio.Event()
        loop = asyncio.get_running_loop()

        def phase_changed(phase: str) -> None:
            if phase == "health":
                loop.call_soon_threadsafe(in_health.set)

        context = agent.runner.new_context(slow, None, on_phase=phase_changed)
        running = asyncio.create_task(agent.runner.run(context))
        await asyncio.wait_for(in_health.wait(), timeout=30)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running

    asyncio.run(run_and_cancel())

    assert good.success, good.error
    container_id, _, running = running_state(docker_client, container_name)
    assert container_id == good.outputs["container_id"]
    assert running
    assert http_get(port) == "v1"
    assert containers_named(docker_client, container_name) == [container_name]


def test_inspect_of_missing_container(agent, container_name):
    result = agent.run(
        task_pb2.AgentTask(
            id="inspect-1",
            type=task_pb2.TASK_TYPE_INSPECT,
            inspect=task_pb2.InspectPayload(container_name=container_name),
        )
    )

    assert result.error_type == "not_found"
    assert f"container {container_name} not found" in result.error


@pytest.mark.parametrize("phase", ["stop", "rename", "create", "health"])
def test_recovery_after_crash_restores_previous(
    agent, test_images, container_name, docker_client, phase
):
    port = free_port()
    good = agent.run(
        deploy_task("crash-a1", test_images["web:v1"], container_name, port)
    )
    upgrade = deploy_task("crash-a2", test_images["web:v2"], container_name, port)
    with pytest.raises(SimulatedCrash):
        agent.run(upgrade, crash_phase=phase)

    result = agent.recover(upgrade, phase)

    assert good.success, good.error
    assert result.error_type == "interrupted"
    assert result.retriable
    assert result.rolled_back
    assert result.failed_phase == phase
    container_id, _, running = running_state(docker_client, container_name)
    assert container_id == good.outputs["container_id"]
    assert running
    assert http_get(port) == "v1"
    assert containers_named(docker_client, container_name) == [container_name]


def test_recovery_after_crash_in_finalize_completes(
    agent, test_images, container_name, docker_client
):
    port = free_port()
    good = agent.run(
        deploy_task("crash-b1", test_images["web:v1"], container_name, port)
    )
    upgrade = deploy_task("crash-b2", test_images["web:v2"], container_name, port)
    with pytest.raises(SimulatedCrash):
        agent.run(upgrade, crash_phase="finalize")

    result = agent.recover(upgrade, "finalize")

    assert good.success, good.error
    assert result.success, result.error
    assert result.outputs["recovered"] == "true"
    assert result.outputs["previous_digest"] == test_images["web:v1"].digest
    assert http_get(port) == "v2"
    assert containers_named(docker_client, container_name) == [container_name]


def test_recovery_of_first_deploy_removes_new(
    agent, test_images, container_name, docker_client
):
    first = deploy_task("crash-c1", test_images["web:v1"], container_name, free_port())
    with pytest.raises(SimulatedCrash):
        agent.run(first, crash_phase="health")

    result = agent.recover(first, "health")

    assert result.error_type == "interrupted"
    assert not result.rolled_back
    assert containers_named(docker_client, container_name) == []


def test_recovery_of_rollback_restores_current(
    agent, test_images, container_name, docker_client
):
    port = free_port()
    agent.run(deploy_task("crash-d1", test_images["web:v1"], container_name, port))
    current = agent.run(
        deploy_task(
            "crash-d2", test_images["web:v2"], container_name, port, keep_previous=True
        )
    )
    rollback = rollback_task("crash-d3", container_name)
    with pytest.raises(SimulatedCrash):
        agent.run(rollback, crash_phase="health")

    result = agent.recover(rollback, "health")

    assert current.success, current.error
    assert result.error_type == "interrupted"
    assert result.rolled_back
    container_id, _, running = running_state(docker_client, container_name)
    assert container_id == current.outputs["container_id"]
    assert running
    assert http_get(port) == "v2"
    assert containers_named(docker_client, container_name) == sorted(
        [container_name, current.outputs["previous_container_name"]]
    )
