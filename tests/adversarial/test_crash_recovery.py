"""Agent crashes (SIGKILL) in the middle of Docker tasks, then a restart:
the target must end on exactly one running release under its name, with no
leftovers, and the task must get a result that describes what the agent
did."""

from __future__ import annotations

import signal
import time

from google.protobuf.duration_pb2 import Duration

from stella.agent.v1 import task_pb2
from tests.conftest import TEST_LABEL, TEST_RUN
from tests.e2e.conftest import AGENT_ID, control_client, run
from tests.e2e.test_faults import containers_named, wait_for, worker_task


def leftovers(docker_client, name):
    """Return the names of the containers whose name contains `name`, other
    than `name` itself (the -previous- and -failed- copies)."""
    return sorted(
        container.name
        for container in docker_client.containers.list(all=True, filters={"name": name})
        if container.name != name
    )


def test_target_digest_rollback_crash_restores_previous(
    pki, orchestrator, agent, test_images, container_name, docker_client
):
    first = worker_task(
        "adv-rb-v1", test_images["worker:v1"], container_name, settle_seconds=1
    )
    broken = test_images["broken:v1"]
    rollback = task_pb2.AgentTask(
        id="adv-rb-target",
        type=task_pb2.TASK_TYPE_ROLLBACK,
        rollback=task_pb2.RollbackPayload(
            container_name=container_name,
            image=broken.repository,
            target_digest=broken.digest,
            config=task_pb2.DeployConfig(
                labels={TEST_LABEL: TEST_RUN},
                release_id="adv-rb-target",
                health_check=task_pb2.HealthCheckConfig(timeout=Duration(seconds=60)),
            ),
        ),
    )

    async def deploy_then_roll_back():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            result = await client.follow(
                await client.submit(AGENT_ID, first), timeout=120
            )
            assert result.success, result.error
            return await client.submit(AGENT_ID, rollback)

    task_id = run(deploy_then_roll_back())
    # The rollback's new container exists and is waiting for health.
    wait_for(
        lambda: docker_client.containers.list(
            all=True, filters={"label": f"stella.task.id={task_id}"}
        ),
        60,
        "the rollback's container",
    )
    time.sleep(2)
    agent.stop(signal.SIGKILL)
    agent.start()

    async def collect():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID, timeout=30)
            return await client.follow(task_id, timeout=120)

    result = run(collect())

    assert not result.success
    named = containers_named(docker_client, container_name)
    assert len(named) == 1
    named[0].reload()
    # The new container was never declared healthy, so the release from
    # before the task must run again.
    assert named[0].labels["stella.release.id"] == "adv-rb-v1", result.error
    assert named[0].status == "running"
    assert leftovers(docker_client, container_name) == []
    assert result.rolled_back


def test_new_task_waits_for_recovery(
    pki, orchestrator, agent, test_images, docker_client
):
    worker = test_images["worker:v1"]
    prefix = f"stella-test-adv-{TEST_RUN}-{int(time.time())}"
    names = [f"{prefix}-a1", f"{prefix}-a2", f"{prefix}-a3", f"{prefix}-b"]
    target = names[-1]
    try:
        first = [
            worker_task(f"adv-first-{i}", worker, name, settle_seconds=1)
            for i, name in enumerate(names)
        ]
        # Received in this order, so the restarted agent recovers the a*
        # targets (each a rename, a start and a check) before b.
        slow = [
            worker_task(f"adv-slow-{i}", worker, name, settle_seconds=120)
            for i, name in enumerate(names)
        ]
        fresh = worker_task("adv-fresh-b", worker, target, settle_seconds=1)
        # Other settings than the running release, so nothing is "unchanged".
        for task in slow:
            task.deploy.config.environment["GENERATION"] = "2"
        fresh.deploy.config.environment["GENERATION"] = "3"

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

        async def submit_fresh():
            async with control_client(pki, orchestrator.address) as client:
                return await client.submit(AGENT_ID, fresh)

        # Queued while the agent is down: the orchestrator sends it right
        # after the restarted agent's Welcome.
        fresh_id = run(submit_fresh())
        agent.start()

        async def collect():
            async with control_client(pki, orchestrator.address) as client:
                await client.wait_for_agent(AGENT_ID, timeout=30)
                interrupted = await client.follow(slow[-1].id, timeout=120)
                return interrupted, await client.follow(fresh_id, timeout=120)

        interrupted, result = run(collect())

        # Recovery of the crashed task on b puts the earlier release back, and
        # then the fresh task deploys over it.
        assert interrupted.error_type == "interrupted", interrupted.error
        assert interrupted.rolled_back
        assert result.success, result.error
        named = containers_named(docker_client, target)
        assert len(named) == 1
        assert named[0].status == "running"
        assert named[0].labels["stella.release.id"] == "adv-fresh-b"
        assert leftovers(docker_client, target) == []
    finally:
        for container in docker_client.containers.list(
            all=True, filters={"name": prefix}
        ):
            container.remove(force=True, v=True)
