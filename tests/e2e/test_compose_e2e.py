"""Compose deploys submitted through the reference orchestrator. The lock file
is not inline: the agent fetches it over the mTLS connection with
AgentGateway.FetchArtifact and checks its sha256."""

from __future__ import annotations

import subprocess
import uuid

import pytest
import yaml
from google.protobuf.duration_pb2 import Duration

from stella.agent.v1 import task_pb2
from stella_agent.executors.compose_stack import project_name_for
from tests.conftest import TEST_LABEL, TEST_RUN
from tests.e2e.conftest import AGENT_ID, control_client, free_port, run
from tests.e2e.test_deploy_e2e import fetch

LOCK_NAME = "compose.stella.lock.yml"


def stack_lock(images, port: int, web: str) -> tuple[bytes, dict[str, str]]:
    services = {
        "web": {
            "image": images[web].reference,
            "ports": [f"127.0.0.1:{port}:8080"],
            "depends_on": {"migrate": {"condition": "service_completed_successfully"}},
        },
        "worker": {"image": images["worker:v1"].reference},
        "migrate": {
            "image": images["tools:v1"].reference,
            "restart": "no",
            "command": ["sh", "-c", "echo migrated"],
        },
    }
    for spec in services.values():
        spec["labels"] = {TEST_LABEL: TEST_RUN}
        spec["stop_grace_period"] = "1s"
    expected = {
        "web": images[web].digest,
        "worker": images["worker:v1"].digest,
        "migrate": images["tools:v1"].digest,
    }
    return yaml.safe_dump({"services": services}).encode(), expected


def compose_task(
    task_id: str, stack: str, expected: dict[str, str]
) -> task_pb2.AgentTask:
    return task_pb2.AgentTask(
        id=task_id,
        type=task_pb2.TASK_TYPE_DEPLOY,
        executor=task_pb2.EXECUTOR_COMPOSE,
        deploy=task_pb2.DeployPayload(
            config=task_pb2.DeployConfig(
                stack_name=stack,
                expected_digests=expected,
                release_id=task_id,
                health_check=task_pb2.HealthCheckConfig(timeout=Duration(seconds=30)),
            ),
            # No content and no sha256: the orchestrator fills in the digest
            # of the content given to SubmitTask and serves it on request.
            artifacts=[task_pb2.ArtifactReference(name=LOCK_NAME, type="compose_lock")],
        ),
    )


@pytest.fixture
def stack_name(compose_command):
    name = f"e2e-{uuid.uuid4().hex[:8]}"
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


def test_compose_deploy_upgrade_and_rollback_through_orchestrator(
    pki, orchestrator, agent, test_images, stack_name
):
    port = free_port()
    v1, v1_digests = stack_lock(test_images, port, "web:v1")
    v2, v2_digests = stack_lock(test_images, port, "web:v2")
    broken, broken_digests = stack_lock(test_images, port, "broken:v1")

    async def scenario():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            results = []
            for task_id, lock, digests in (
                ("c-v1", v1, v1_digests),
                ("c-v2", v2, v2_digests),
                ("c-broken", broken, broken_digests),
            ):
                task_id = f"{task_id}-{stack_name}"
                submitted = await client.submit(
                    AGENT_ID,
                    compose_task(task_id, stack_name, digests),
                    artifacts={LOCK_NAME: lock},
                )
                results.append(await client.follow(submitted, timeout=180))
                if len(results) == 1:
                    results.append(fetch(port))
            return results

    first, served_v1, second, third = run(scenario())

    assert first.success, first.error
    assert served_v1 == "v1"
    assert first.outputs["service.web"] == "healthy"
    assert first.outputs["service.migrate"] == "completed"
    assert first.outputs["project_name"] == project_name_for(stack_name)
    assert second.success, second.error
    assert not third.success
    assert third.error_type == "health_check_failed", third.error
    assert third.rolled_back
    assert fetch(port) == "v2"


def test_compose_artifact_with_wrong_sha256_is_refused(
    pki, orchestrator, agent, test_images, stack_name
):
    port = free_port()
    lock, digests = stack_lock(test_images, port, "web:v1")
    task = compose_task(f"c-sha-{stack_name}", stack_name, digests)
    task.deploy.artifacts[0].sha256 = "0" * 64

    async def scenario():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            submitted = await client.submit(AGENT_ID, task, artifacts={LOCK_NAME: lock})
            return await client.follow(submitted, timeout=120)

    result = run(scenario())

    assert not result.success
    assert "sha256" in result.error
