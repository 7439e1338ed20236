"""Repeated tasks and idempotency keys across agent restarts: each task must
run at most once, and every task must get exactly one result."""

from __future__ import annotations

import signal
import time

from stella.agent.v1 import task_pb2
from tests.conftest import TEST_RUN
from tests.e2e.conftest import AGENT_ID, control_client, run
from tests.e2e.test_faults import wait_for, worker_task


def test_idempotent_repeat_during_recovery(
    pki, orchestrator, agent, test_images, docker_client
):
    worker = test_images["worker:v1"]
    prefix = f"stella-test-adv-{TEST_RUN}-{int(time.time())}"
    names = [f"{prefix}-a", f"{prefix}-b"]
    try:
        first = [
            worker_task(f"adv-idem-first-{i}", worker, name, settle_seconds=1)
            for i, name in enumerate(names)
        ]
        slow = [
            worker_task(
                f"adv-idem-slow-{i}",
                worker,
                name,
                settle_seconds=120,
                idempotency_key=f"adv-idem-key-{i}",
            )
            for i, name in enumerate(names)
        ]
        for task in slow:
            task.deploy.config.environment["GENERATION"] = "2"
        repeat = worker_task(
            "adv-idem-repeat",
            worker,
            names[-1],
            settle_seconds=1,
            idempotency_key=slow[-1].idempotency_key,
        )

        async def deploy_then_start_slow():
            async with control_client(pki, orchestrator.address) as client:
                await client.wait_for_agent(AGENT_ID)
                ids = [await client.submit(AGENT_ID, task) for task in first]
                for task_id in ids:
                    result = await client.follow(task_id, timeout=120)
                    assert result.success, result.error
                for task in slow:
                    await client.submit(AGENT_ID, task)
                    time.sleep(0.2)

        run(deploy_then_start_slow())
        for task in slow:
            wait_for(
                lambda task=task: docker_client.containers.list(
                    all=True, filters={"label": f"stella.task.id={task.id}"}
                ),
                60,
                f"the container of {task.id}",
            )
        time.sleep(1)
        agent.stop(signal.SIGKILL)

        async def submit_repeat():
            async with control_client(pki, orchestrator.address) as client:
                return await client.submit(AGENT_ID, repeat)

        # Queued while the agent is down, so it arrives while the restarted
        # agent recovers the first crashed task.
        repeat_id = run(submit_repeat())
        agent.start()

        async def collect():
            async with control_client(pki, orchestrator.address) as client:
                await client.wait_for_agent(AGENT_ID, timeout=30)
                original = await client.follow(slow[-1].id, timeout=120)
                return original, await client.follow(repeat_id, timeout=30)

        original, repeated = run(collect())

        assert original.error_type == "interrupted", original.error
        assert repeated.error_type == original.error_type
        assert repeated.outputs["original_task_id"] == slow[-1].id
    finally:
        for container in docker_client.containers.list(
            all=True, filters={"name": prefix}
        ):
            container.remove(force=True, v=True)


def test_idempotent_retry_after_drain_runs(
    pki, orchestrator, agent, test_images, container_name
):
    worker = test_images["worker:v1"]
    running = worker_task("adv-drain-running", worker, container_name, settle_seconds=6)
    waiting = worker_task(
        "adv-drain-waiting",
        worker,
        container_name,
        settle_seconds=1,
        idempotency_key="adv-drain-key",
    )
    waiting.deploy.config.environment["GENERATION"] = "2"
    retry = task_pb2.AgentTask()
    retry.CopyFrom(waiting)
    retry.id = "adv-drain-retry"

    async def submit_both():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            await client.submit(AGENT_ID, running)
            # The second task waits for the first one's target.
            return await client.submit(AGENT_ID, waiting)

    waiting_id = run(submit_both())
    agent.wait_for_output(f"task {waiting_id} (deploy) accepted")
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(60) == 0
    agent.start()

    async def collect():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID, timeout=30)
            first = await client.follow(waiting_id, timeout=30)
            second = await client.follow(
                await client.submit(AGENT_ID, retry), timeout=120
            )
            return first, second

    first, second = run(collect())

    assert first.error_type == "shutting_down", first.error
    assert first.retriable
    assert second.success, second.error
