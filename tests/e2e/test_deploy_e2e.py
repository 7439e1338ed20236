"""Deploys submitted through the reference orchestrator to a real agent process,
which runs them against the real Docker Engine and registry."""

from __future__ import annotations

import asyncio
import time
import urllib.request

from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration

from stella.agent.v1 import control_pb2, task_pb2
from tests.conftest import TEST_LABEL, TEST_RUN
from tests.e2e.conftest import AGENT_ID, Process, control_client, free_port, run


def deploy_task(
    task_id: str, image, name: str, port: int, **config
) -> task_pb2.AgentTask:
    return task_pb2.AgentTask(
        id=task_id,
        type=task_pb2.TASK_TYPE_DEPLOY,
        executor=task_pb2.EXECUTOR_DOCKER,
        deploy=task_pb2.DeployPayload(
            image=image.repository,
            digest=image.digest,
            config=task_pb2.DeployConfig(
                container_name=name,
                ports=[f"127.0.0.1:{port}:8080"],
                labels={TEST_LABEL: TEST_RUN},
                release_id=task_id,
                release_name=f"release {task_id}",
                health_check=task_pb2.HealthCheckConfig(timeout=Duration(seconds=20)),
                **config,
            ),
        ),
    )


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
        return response.read().decode().strip()


def test_deploy_upgrade_and_rollback_through_orchestrator(
    pki, orchestrator, agent, test_images, container_name
):
    port = free_port()
    chunks = []

    async def scenario():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            first = await client.follow(
                await client.submit(
                    AGENT_ID,
                    deploy_task("e2e-v1", test_images["web:v1"], container_name, port),
                ),
                on_log=chunks.append,
                timeout=120,
            )
            served_v1 = fetch(port)
            second = await client.follow(
                await client.submit(
                    AGENT_ID,
                    deploy_task("e2e-v2", test_images["web:v2"], container_name, port),
                ),
                timeout=120,
            )
            broken = await client.follow(
                await client.submit(
                    AGENT_ID,
                    deploy_task(
                        "e2e-broken", test_images["broken:v1"], container_name, port
                    ),
                ),
                timeout=120,
            )
            return first, served_v1, second, broken

    first, served_v1, second, broken = run(scenario())

    assert first.success, first.error
    assert served_v1 == "v1"
    assert first.outputs["container_id"]
    assert [c.sequence for c in chunks] == list(range(1, len(chunks) + 1))
    assert b"".join(c.data for c in chunks).decode().count("\n") >= 3
    assert second.success, second.error
    assert second.outputs["previous_digest"] == test_images["web:v1"].digest
    assert not broken.success
    assert broken.error_type == "health_check_failed", broken.error
    assert broken.rolled_back
    assert fetch(port) == "v2"


def test_agent_delivers_held_result_after_orchestrator_restart(
    pki, orchestrator, agent, test_images, container_name, tmp_path
):
    port = free_port()

    async def submit_and_wait_accepted():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            task = deploy_task(
                "e2e-restart", test_images["web:v1"], container_name, port
            )
            task_id = await client.submit(AGENT_ID, task)
            watch = client.stub.WatchTask(control_pb2.WatchTaskRequest(task_id=task_id))
            async for event in watch:
                if event.WhichOneof("event") == "accepted":
                    return task_id

    task_id = run(submit_and_wait_accepted())
    orchestrator.kill()
    # The deploy goes on without the orchestrator; give it time to finish.
    agent.wait_for_output(f"task {task_id} finished", timeout=60)
    orchestrator.restart("orchestrator listening")

    async def collect():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID, timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    return await client.follow(task_id, timeout=10)
                except Exception:  # noqa: BLE001 - the result may not have arrived yet
                    await asyncio.sleep(0.3)
            raise AssertionError("result never arrived after restart")

    result = run(collect())

    assert result.success, result.error
    assert result.task_id == task_id
    assert fetch(port) == "v1"
    assert agent.output().count(f"task {task_id} (deploy) accepted") == 1


def test_exec_runs_task_locally(test_images, container_name, tmp_path):
    port = free_port()
    task = deploy_task("exec-1", test_images["web:v1"], container_name, port)
    path = tmp_path / "task.json"
    path.write_text(json_format.MessageToJson(task))
    process = Process(
        ["exec", str(path), "--state-dir", str(tmp_path / "state")],
        tmp_path / "exec.log",
    )
    process.start()

    status = process.proc.wait(120)

    assert status == 0, process.output()
    assert '"success": true' in process.output()
    assert fetch(port) == "v1"
