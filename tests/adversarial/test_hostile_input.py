"""Hostile task fields sent over the real stream: the agent must reply to each
task with a result that names the invalid value, and keep serving."""

from __future__ import annotations

import pytest
from google.protobuf.duration_pb2 import Duration

from stella.agent.v1 import task_pb2
from tests.e2e.conftest import AGENT_ID, control_client, free_port, run
from tests.e2e.test_deploy_e2e import deploy_task


def inspect_task(task_id: str, name: str) -> task_pb2.AgentTask:
    """Return an inspect task of container `name`."""
    return task_pb2.AgentTask(
        id=task_id,
        type=task_pb2.TASK_TYPE_INSPECT,
        inspect=task_pb2.InspectPayload(container_name=name),
    )


def test_huge_task_timeout_gets_result(pki, orchestrator, agent, container_name):
    huge = inspect_task("adv-huge-timeout", container_name)
    # Valid on the wire, but beyond what datetime.timedelta can hold.
    huge.timeout.CopyFrom(Duration(seconds=10**14))
    after = inspect_task("adv-after-huge-timeout", container_name)

    async def scenario():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            first = await client.follow(await client.submit(AGENT_ID, huge), timeout=20)
            second = await client.follow(
                await client.submit(AGENT_ID, after), timeout=20
            )
            return first, second

    first, second = run(scenario())

    assert first.error_type == "invalid_task", first.error
    assert "timeout" in first.error
    assert second.error_type == "not_found", second.error


OUT_OF_RANGE = {
    "restart-retries": (
        "config.restart_policy",
        {"restart_policy": "on-failure:99999999999999999999"},
    ),
    "health-interval": (
        "config.health_check.interval",
        {
            "health_check": task_pb2.HealthCheckConfig(
                interval=Duration(seconds=10**12), timeout=Duration(seconds=20)
            )
        },
    ),
    "cpu-limit": ("config.cpu_limit", {"cpu_limit": 1e300}),
}


@pytest.mark.parametrize("case", sorted(OUT_OF_RANGE))
def test_out_of_range_number_rejected(
    pki, orchestrator, agent, test_images, container_name, docker_client, case
):
    field, settings = OUT_OF_RANGE[case]
    port = free_port()
    good = deploy_task(
        f"adv-range-good-{case}", test_images["web:v1"], container_name, port
    )
    bad = deploy_task(
        f"adv-range-bad-{case}", test_images["web:v2"], container_name, port
    )
    for name, value in settings.items():
        if isinstance(value, task_pb2.HealthCheckConfig):
            getattr(bad.deploy.config, name).CopyFrom(value)
        else:
            setattr(bad.deploy.config, name, value)

    async def submit(task):
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            return await client.follow(await client.submit(AGENT_ID, task), timeout=120)

    deployed = run(submit(good))
    assert deployed.success, deployed.error
    before = docker_client.containers.get(container_name).attrs["State"]["StartedAt"]

    result = run(submit(bad))

    assert result.error_type == "invalid_task", result.error
    assert field in result.error
    assert result.failed_phase == "validate"
    # The running release was never stopped.
    after = docker_client.containers.get(container_name)
    assert after.attrs["State"]["StartedAt"] == before
