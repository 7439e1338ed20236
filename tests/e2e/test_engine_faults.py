"""Faults of the host rather than the network: a flood of task output, and
Docker Engine restarting while the agent is idle."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import docker
from google.protobuf.duration_pb2 import Duration

from stella.agent.v1 import task_pb2
from tests.conftest import require
from tests.e2e.conftest import AGENT_ID, control_client, free_port, run
from tests.e2e.test_deploy_e2e import deploy_task, fetch
from tests.e2e.test_faults import worker_task

FLOOD_BYTES = 128 * 1024 * 1024
"""Output of the flooding command: four times the agent's 32 MiB log spool."""
MAX_AGENT_RSS_BYTES = 256 * 1024 * 1024
"""Ceiling for the agent's peak resident memory while it relays the flood.
The spool is bounded at 32 MiB; the rest is the interpreter, gRPC and the
Docker SDK (about 110 MiB peak measured with a 40 MiB flood). A spool that
kept every chunk would need more than the 128 MiB of the flood on top."""


def peak_rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def test_output_flood_bounded_and_accounted(
    pki, orchestrator, agent, test_images, container_name
):
    target = worker_task(
        "flood-target", test_images["worker:v1"], container_name, settle_seconds=1
    )
    flood = task_pb2.AgentTask(
        id="flood-1",
        type=task_pb2.TASK_TYPE_EXECUTE_COMMAND,
        execute_command=task_pb2.ExecuteCommandPayload(
            container_name=container_name,
            argv=["sh", "-c", f"head -c {FLOOD_BYTES} /dev/zero | tr '\\0' x"],
            timeout=Duration(seconds=300),
        ),
    )
    received = {"data": 0, "dropped": 0, "last_end": 0, "sequences": []}

    def on_log(chunk) -> None:
        received["sequences"].append(chunk.sequence)
        received["dropped"] += chunk.dropped_bytes
        assert chunk.offset == received["last_end"] + chunk.dropped_bytes
        received["last_end"] = chunk.offset + len(chunk.data)
        received["data"] += chunk.data.count(b"x")

    async def scenario():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            deployed = await client.follow(
                await client.submit(AGENT_ID, target), timeout=120
            )
            assert deployed.success, deployed.error
            return await client.follow(
                await client.submit(AGENT_ID, flood), on_log=on_log, timeout=600
            )

    result = run(scenario())

    assert result.success, result.error
    assert result.outputs["exit_code"] == "0"
    sequences = received["sequences"]
    assert sequences == list(range(1, len(sequences) + 1))
    # Every byte arrived, or drop markers report exactly how many were dropped.
    dropped_total = int(result.outputs.get("log_dropped_bytes", "0"))
    assert received["dropped"] <= dropped_total
    assert received["data"] + dropped_total >= FLOOD_BYTES
    assert peak_rss_bytes(agent.proc.pid) < MAX_AGENT_RSS_BYTES


def dockerd_pid() -> int | None:
    out = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    return pids[0] if pids else None


def restart_dockerd() -> None:
    pid = dockerd_pid()
    require(pid is not None, "dockerd is not running as a local process")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while dockerd_pid() is not None:
        assert time.monotonic() < deadline, "dockerd did not stop"
        time.sleep(0.2)
    with open("/var/log/dockerd.log", "ab") as log:
        subprocess.Popen(
            ["dockerd", "--host", "unix:///var/run/docker.sock"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    while True:
        try:
            # from_env() requests the engine's API version, so it fails too
            # while the socket is not there yet.
            docker.from_env().ping()
            return
        except Exception:  # noqa: BLE001 - not up yet
            assert time.monotonic() < deadline + 60, "dockerd did not come back"
            time.sleep(0.3)


def test_engine_restart_while_idle_next_task_works(
    pki, orchestrator, agent, test_images, container_name
):
    port = free_port()

    async def wait_connected():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)

    run(wait_connected())
    restart_dockerd()

    async def deploy():
        async with control_client(pki, orchestrator.address) as client:
            task = deploy_task(
                "after-engine-restart", test_images["web:v1"], container_name, port
            )
            return await client.follow(await client.submit(AGENT_ID, task), timeout=180)

    result = run(deploy())

    assert result.success, result.error
    assert fetch(port) == "v1"
