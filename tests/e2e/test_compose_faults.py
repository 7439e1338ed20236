"""An agent killed with SIGKILL in the middle of a Compose upgrade, with the
real orchestrator, agent processes, Compose and registry."""

from __future__ import annotations

import signal
import subprocess
import uuid

import pytest
from google.protobuf.duration_pb2 import Duration

from stella_agent.executors.compose_stack import project_name_for
from tests.e2e.conftest import AGENT_ID, control_client, free_port, run
from tests.e2e.test_compose_e2e import LOCK_NAME, compose_task, stack_lock
from tests.e2e.test_deploy_e2e import fetch
from tests.e2e.test_faults import wait_for

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


@pytest.fixture
def compose_stack_name(compose_command):
    name = f"e2e-crash-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(
        [
            *compose_command,
            "-p",
            project_name_for(name),
            "down",
            "-v",
            "--timeout",
            "1",
        ],
        capture_output=True,
        timeout=120,
    )


def project_containers(docker_client, project: str) -> list:
    return docker_client.containers.list(
        all=True, filters={"label": f"{PROJECT_LABEL}={project}"}
    )


def test_compose_upgrade_crash_recovers(
    pki, orchestrator, agent, test_images, docker_client, compose_stack_name
):
    port = free_port()
    project = project_name_for(compose_stack_name)
    v1, v1_digests = stack_lock(test_images, port, "web:v1")
    v2, v2_digests = stack_lock(test_images, port, "web:v2")
    first = compose_task(
        f"crash-v1-{compose_stack_name}", compose_stack_name, v1_digests
    )
    second = compose_task(
        f"crash-v2-{compose_stack_name}", compose_stack_name, v2_digests
    )
    # The worker never settles within the task, so the upgrade is still under
    # way (in up or health) when the agent is killed.
    second.deploy.config.health_check.settle_period.CopyFrom(Duration(seconds=600))
    second.deploy.config.health_check.timeout.CopyFrom(Duration(seconds=600))

    async def deploy_first_then_submit_second():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            submitted = await client.submit(AGENT_ID, first, artifacts={LOCK_NAME: v1})
            result = await client.follow(submitted, timeout=180)
            assert result.success, result.error
            return await client.submit(AGENT_ID, second, artifacts={LOCK_NAME: v2})

    task_id = run(deploy_first_then_submit_second())
    assert fetch(port) == "v1"
    v2_image = docker_client.images.get(test_images["web:v2"].reference).id

    def new_web_created():
        return [
            c
            for c in project_containers(docker_client, project)
            if c.labels.get(SERVICE_LABEL) == "web" and c.image.id == v2_image
        ]

    wait_for(new_web_created, 120, "the upgrade's web container")
    agent.stop(signal.SIGKILL)
    agent.start()

    async def collect():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID, timeout=30)
            return await client.follow(task_id, timeout=180)

    result = run(collect())

    assert result.task_id == task_id
    assert not result.success
    assert result.error_type == "interrupted", result.logs
    assert result.retriable
    assert result.rolled_back
    assert "was restored and is running" in result.error
    assert fetch(port) == "v1"
    containers = project_containers(docker_client, project)
    services = sorted(c.labels.get(SERVICE_LABEL) for c in containers)
    assert services == ["migrate", "web", "worker"]
    (web,) = [c for c in containers if c.labels.get(SERVICE_LABEL) == "web"]
    v1_image = docker_client.images.get(test_images["web:v1"].reference).id
    assert web.image.id == v1_image
    assert web.status == "running"
