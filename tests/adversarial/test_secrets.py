"""Secrets delivered by one task must not leak through a later task that
touches the same container."""

from __future__ import annotations

import base64

from stella.agent.v1 import task_pb2
from tests.e2e.conftest import AGENT_ID, control_client, run
from tests.e2e.test_faults import worker_task

CANARY = "adv-canary-5f0c9d2e7b41"


def test_rollback_log_masks_replaced_secrets(
    pki, orchestrator, agent, test_images, container_name
):
    first = worker_task(
        "adv-secret-v1", test_images["worker:v1"], container_name, settle_seconds=1
    )
    leaky = worker_task(
        "adv-secret-v2", test_images["tools:v1"], container_name, settle_seconds=1
    )
    config = leaky.deploy.config
    config.keep_previous = True
    config.environment["API_TOKEN"] = CANARY
    config.secret_environment.append("API_TOKEN")
    # An application that logs its configuration at start.
    config.command.extend(
        [
            "sh",
            "-c",
            'echo "token=$API_TOKEN"; printf %s "$API_TOKEN" | base64; exec sleep 600',
        ]
    )
    rollback = task_pb2.AgentTask(
        id="adv-secret-rollback",
        type=task_pb2.TASK_TYPE_ROLLBACK,
        rollback=task_pb2.RollbackPayload(container_name=container_name),
    )
    seen: list[bytes] = []

    async def scenario():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            for task in (first, leaky, rollback):
                result = await client.follow(
                    await client.submit(AGENT_ID, task),
                    on_log=lambda chunk: seen.append(chunk.data),
                    timeout=120,
                )
                assert result.success, result.error
                seen.append(result.SerializeToString())

    run(scenario())
    text = b"\n".join(seen)

    assert CANARY.encode() not in text
    assert base64.b64encode(CANARY.encode()) not in text
