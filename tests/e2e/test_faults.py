"""Fault tests: real orchestrator and agent processes, the real engine, and the
failures an agent meets in production. Each one is bounded in time."""

from __future__ import annotations

import asyncio
import signal
import time

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from stella.agent.v1 import control_pb2, task_pb2
from tests.conftest import TEST_LABEL, TEST_RUN
from tests.e2e.conftest import (
    AGENT_ID,
    Process,
    control_client,
    free_port,
    run,
    write_agent_config,
)
from tests.e2e.test_deploy_e2e import deploy_task, fetch


def worker_task(task_id, image, name, settle_seconds, **extra):
    """A deploy of the worker image (no health check), so the health phase
    lasts `settle_seconds`."""
    return task_pb2.AgentTask(
        id=task_id,
        type=task_pb2.TASK_TYPE_DEPLOY,
        deploy=task_pb2.DeployPayload(
            image=image.repository,
            digest=image.digest,
            config=task_pb2.DeployConfig(
                container_name=name,
                labels={TEST_LABEL: TEST_RUN},
                release_id=task_id,
                health_check=task_pb2.HealthCheckConfig(
                    settle_period=Duration(seconds=settle_seconds),
                    timeout=Duration(seconds=60),
                ),
            ),
        ),
        **extra,
    )


def containers_named(docker_client, name):
    return [c for c in docker_client.containers.list(all=True) if c.name == name]


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def follow_after_restart(client, task_id, timeout=60):
    """Follow a task whose record the orchestrator may only get back when the
    agent resends it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            chunks = []
            result = await client.follow(task_id, on_log=chunks.append, timeout=timeout)
            return result, chunks
        except Exception:  # noqa: BLE001 - not delivered yet
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


def test_orchestrator_killed_during_health_wait(
    pki, orchestrator, agent, test_images, container_name, docker_client
):
    task = worker_task(
        "fault-orch", test_images["worker:v1"], container_name, settle_seconds=6
    )

    async def submit():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            return await client.submit(AGENT_ID, task)

    task_id = run(submit())
    wait_for(
        lambda: containers_named(docker_client, container_name), 60, "the new container"
    )
    orchestrator.kill()
    time.sleep(2)
    orchestrator.restart("orchestrator listening")

    async def collect():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID, timeout=30)
            return await follow_after_restart(client, task_id)

    result, chunks = run(collect())

    assert result.success, result.error
    assert [c.sequence for c in chunks] == list(range(1, len(chunks) + 1))
    assert b"task succeeded" in b"".join(c.data for c in chunks)
    assert agent.output().count(f"task {task_id} (deploy) accepted") == 1
    running = containers_named(docker_client, container_name)
    assert len(running) == 1
    assert running[0].labels["stella.release.id"] == "fault-orch"


def test_agent_killed_after_create_recovers(
    pki, orchestrator, agent, test_images, container_name, docker_client, tmp_path
):
    first = worker_task(
        "fault-v1", test_images["worker:v1"], container_name, settle_seconds=1
    )
    second = worker_task(
        "fault-v2", test_images["web:v1"], container_name, settle_seconds=30
    )

    async def deploy_first_then_submit_second():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            result = await client.follow(
                await client.submit(AGENT_ID, first), timeout=120
            )
            assert result.success, result.error
            return await client.submit(AGENT_ID, second)

    task_id = run(deploy_first_then_submit_second())

    def new_container_created():
        return [
            c
            for c in docker_client.containers.list(
                all=True, filters={"label": f"stella.task.id={task_id}"}
            )
        ]

    wait_for(new_container_created, 60, "the second release's container")
    agent.stop(signal.SIGKILL)
    agent.start()

    async def collect():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID, timeout=30)
            return await client.follow(task_id, timeout=120)

    result = run(collect())

    named = containers_named(docker_client, container_name)
    assert len(named) == 1
    assert named[0].status == "running"
    assert named[0].labels["stella.release.id"] in ("fault-v1", "fault-v2")
    leftovers = [
        c.name
        for c in docker_client.containers.list(
            all=True, filters={"name": container_name}
        )
        if c.name != container_name
    ]
    assert leftovers == []
    assert result.task_id == task_id
    if named[0].labels["stella.release.id"] == "fault-v1":
        assert not result.success
        assert result.rolled_back


def test_expired_task_is_not_run(
    pki, orchestrator, agent, test_images, container_name, docker_client
):
    task = deploy_task(
        "fault-expired", test_images["web:v1"], container_name, free_port()
    )
    task.expires_at.CopyFrom(Timestamp(seconds=int(time.time()) - 5))

    async def scenario():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            return await client.follow(await client.submit(AGENT_ID, task), timeout=60)

    result = run(scenario())

    assert result.error_type == "expired"
    assert containers_named(docker_client, container_name) == []


def test_timeout_rolls_back(pki, orchestrator, agent, test_images, container_name):
    port = free_port()
    good = deploy_task("fault-good", test_images["web:v1"], container_name, port)
    slow = worker_task(
        "fault-slow", test_images["worker:v1"], container_name, settle_seconds=60
    )
    slow.timeout.CopyFrom(Duration(seconds=8))

    async def scenario():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            assert (
                await client.follow(await client.submit(AGENT_ID, good), timeout=120)
            ).success
            return await client.follow(await client.submit(AGENT_ID, slow), timeout=120)

    result = run(scenario())

    assert result.error_type == "timeout"
    assert result.rolled_back
    assert result.failed_phase == "health"
    assert fetch(port) == "v1"


def test_cancel_rolls_back(pki, orchestrator, agent, test_images, container_name):
    port = free_port()
    good = deploy_task("fault-keep", test_images["web:v1"], container_name, port)
    slow = worker_task(
        "fault-cancel", test_images["worker:v1"], container_name, settle_seconds=60
    )

    async def scenario():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            assert (
                await client.follow(await client.submit(AGENT_ID, good), timeout=120)
            ).success
            task_id = await client.submit(AGENT_ID, slow)
            async for event in client.stub.WatchTask(
                control_pb2.WatchTaskRequest(task_id=task_id)
            ):
                if (
                    event.WhichOneof("event") == "log_chunk"
                    and b"health" in event.log_chunk.data.lower()
                ):
                    break
            assert await client.cancel(task_id, "operator stopped it")
            return await client.follow(task_id, timeout=120)

    result = run(scenario())

    assert result.error_type == "cancelled"
    assert result.rolled_back
    assert "operator stopped it" in result.error
    assert fetch(port) == "v1"


def test_registry_down_during_pull_is_retriable(
    pki, orchestrator, agent, test_images, container_name, tmp_path
):
    port = free_port()
    good = deploy_task("fault-before", test_images["web:v1"], container_name, port)
    registry_port = free_port()
    # A registry of our own, stopped before the deploy: the pull cannot connect.
    unreachable = deploy_task(
        "fault-registry", test_images["web:v2"], container_name, port
    )
    unreachable.deploy.image = f"127.0.0.1:{registry_port}/stella-test/web"

    async def scenario():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            assert (
                await client.follow(await client.submit(AGENT_ID, good), timeout=120)
            ).success
            return await client.follow(
                await client.submit(AGENT_ID, unreachable), timeout=120
            )

    result = run(scenario())

    assert not result.success
    assert result.error_type == "pull_failed"
    assert result.retriable
    assert fetch(port) == "v1"


def test_sigterm_drains_running_task(
    pki, orchestrator, test_images, container_name, tmp_path
):
    config = write_agent_config(
        tmp_path / "agent.yaml", pki, orchestrator.address, tmp_path / "state"
    )
    agent = Process(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.start()
    task = worker_task(
        "fault-drain", test_images["worker:v1"], container_name, settle_seconds=4
    )
    try:

        async def submit():
            async with control_client(pki, orchestrator.address) as client:
                await client.wait_for_agent(AGENT_ID)
                task_id = await client.submit(AGENT_ID, task)
                async for event in client.stub.WatchTask(
                    control_pb2.WatchTaskRequest(task_id=task_id)
                ):
                    if event.WhichOneof("event") == "accepted":
                        return task_id

        task_id = run(submit())
        agent.proc.send_signal(signal.SIGTERM)
        status = agent.proc.wait(60)

        async def result():
            async with control_client(pki, orchestrator.address) as client:
                return await client.follow(task_id, timeout=10)

        delivered = run(result())
    finally:
        agent.stop()

    assert status == 0
    assert delivered.success, delivered.error
    assert "draining" in agent.output()


def test_fifty_concurrent_duplicates_deploy_once(
    pki, orchestrator, agent, test_images, container_name, docker_client
):
    port = free_port()

    async def scenario():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            ids = []
            for n in range(50):
                task = deploy_task(
                    f"dup-{n}", test_images["web:v1"], container_name, port
                )
                task.idempotency_key = f"release-{container_name}"
                ids.append(await client.submit(AGENT_ID, task))
            return await asyncio.gather(
                *(client.follow(task_id, timeout=180) for task_id in ids)
            )

    results = run(scenario())

    assert all(r.success for r in results), [r.error for r in results if not r.success]
    originals = {r.outputs.get("original_task_id", r.task_id) for r in results}
    assert len(originals) == 1
    created = docker_client.containers.list(all=True, filters={"name": container_name})
    assert [c.name for c in created] == [container_name]
    assert fetch(port) == "v1"


def test_frozen_orchestrator_is_detected_and_agent_reconnects(
    pki, orchestrator, tmp_path
):
    config = write_agent_config(
        tmp_path / "agent.yaml",
        pki,
        orchestrator.address,
        tmp_path / "state",
        orchestrator={"keepalive_seconds": 10},
    )
    agent = Process(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.start()
    try:
        agent.wait_for_output("connected to", timeout=30)
        mark = agent.mark()
        # A stopped process keeps its sockets open: a half-open connection.
        orchestrator.proc.send_signal(signal.SIGSTOP)
        try:
            agent.wait_for_output("disconnected from", timeout=45, since=mark)
        finally:
            orchestrator.proc.send_signal(signal.SIGCONT)
        agent.wait_for_output("connected to", timeout=60, since=agent.mark())
    finally:
        agent.stop()
