"""A result larger than the orchestrator's 16 MiB message limit: the agent
must still deliver a result for that task, and the results of later tasks."""

from __future__ import annotations

import asyncio

import pytest

from tests.adversarial.test_hostile_input import inspect_task
from tests.e2e.conftest import AGENT_ID, control_client, free_port, run
from tests.e2e.test_deploy_e2e import deploy_task

pytestmark = pytest.mark.docker

LABEL_BYTES = 9 * 1024 * 1024
"""Size of one label value: each deploy task stays under 16 MiB, but the
inspect report of two such containers does not."""


def test_oversized_result_blocks_later(
    pki, orchestrator, agent, test_images, container_name
):
    port = free_port()
    big = "x" * LABEL_BYTES
    first = deploy_task("adv-big-1", test_images["web:v1"], container_name, port)
    second = deploy_task(
        "adv-big-2", test_images["web:v2"], container_name, port, keep_previous=True
    )
    for task in (first, second):
        task.deploy.config.labels["adv.big"] = big
    huge = inspect_task("adv-big-inspect", container_name)
    small = inspect_task("adv-small-inspect", f"{container_name}-absent")

    async def scenario():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            for task in (first, second):
                result = await client.follow(
                    await client.submit(AGENT_ID, task), timeout=120
                )
                assert result.success, result.error
            await client.submit(AGENT_ID, huge)
            # Give the agent time to run the inspect and send its result.
            await asyncio.sleep(3)
            return await client.follow(await client.submit(AGENT_ID, small), timeout=60)

    later = run(scenario())

    assert later.error_type == "not_found", later.error
