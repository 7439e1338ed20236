"""All eight task types submitted through the reference orchestrator to a real
agent process, which runs them against the real Docker Engine and registry."""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration

from stella.agent.v1 import task_pb2
from stella_agent.logstream import STDOUT
from tests.conftest import TEST_LABEL, TEST_RUN
from tests.e2e.conftest import (
    AGENT_ID,
    Process,
    control_client,
    free_port,
    run,
    write_agent_config,
)


@pytest.fixture
def task_agent(pki, orchestrator, tmp_path, test_images):
    """An agent with a hook image, an upload root and one allowed host command."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    config = write_agent_config(
        tmp_path / "agent.yaml",
        pki,
        orchestrator.address,
        tmp_path / "state",
        hooks={"image": test_images["tools:v1"].reference, "timeout_seconds": 30},
        tasks={
            "upload_roots": [str(uploads)],
            "allow_host_commands": True,
            "host_command_allowlist": ["/bin/echo"],
        },
    )
    process = Process(["run", "--config", str(config)], tmp_path / "agent.log")
    process.uploads = uploads  # type: ignore[attr-defined]
    process.sticker = tmp_path / "state" / "stella" / "version.json"  # type: ignore[attr-defined]
    process.start()
    yield process
    process.stop()


def deploy(task_id: str, image, name: str, port: int, **config) -> task_pb2.AgentTask:
    hooks = config.pop("hooks", None)
    task = task_pb2.AgentTask(
        id=task_id,
        type=task_pb2.TASK_TYPE_DEPLOY,
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
    if hooks is not None:
        task.deploy.hooks.CopyFrom(hooks)
    return task


def task(task_id: str, **payload) -> task_pb2.AgentTask:
    types = {
        "rollback": task_pb2.TASK_TYPE_ROLLBACK,
        "health_check": task_pb2.TASK_TYPE_HEALTH_CHECK,
        "inspect": task_pb2.TASK_TYPE_INSPECT,
        "execute_command": task_pb2.TASK_TYPE_EXECUTE_COMMAND,
        "upload_files": task_pb2.TASK_TYPE_UPLOAD_FILES,
        "write_sticker": task_pb2.TASK_TYPE_WRITE_STICKER,
        "read_sticker": task_pb2.TASK_TYPE_READ_STICKER,
    }
    ((field, value),) = payload.items()
    return task_pb2.AgentTask(id=task_id, type=types[field], **{field: value})


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
        return response.read().decode().strip()


def test_all_task_types_through_orchestrator(
    pki, orchestrator, task_agent, test_images, container_name
):
    port = free_port()
    prefix = uuid.uuid4().hex[:8]
    marker = f"/tmp/pwned-{uuid.uuid4().hex}"
    hooks = task_pb2.DeployHooks(
        pre_deploy=task_pb2.HookConfig(command=["echo", "hook says pre"]),
        post_deploy=task_pb2.HookConfig(command=["echo", "hook says post"]),
    )
    hostile = task_pb2.VersionSticker(
        release_id=f"x'\"$(touch {marker})`touch {marker}`\nline2"
    )
    logs: dict[str, list] = {}
    results: dict[str, object] = {}

    async def scenario():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)

            async def submit(name: str, agent_task: task_pb2.AgentTask):
                agent_task.id = f"{prefix}-{name}"
                logs[name] = []
                task_id = await client.submit(AGENT_ID, agent_task)
                results[name] = await client.follow(
                    task_id, on_log=logs[name].append, timeout=120
                )

            v1, v2 = test_images["web:v1"], test_images["web:v2"]
            await submit(
                "deploy-v1", deploy("v1", v1, container_name, port, hooks=hooks)
            )
            await submit(
                "deploy-v2", deploy("v2", v2, container_name, port, keep_previous=True)
            )
            results["served-v2"] = fetch(port)
            await submit(
                "health",
                task(
                    "h",
                    health_check=task_pb2.HealthCheckPayload(
                        container_name=container_name,
                        probe=task_pb2.Probe(http=task_pb2.HttpProbe(port=8080)),
                    ),
                ),
            )
            await submit(
                "inspect",
                task(
                    "i", inspect=task_pb2.InspectPayload(container_name=container_name)
                ),
            )
            await submit(
                "command",
                task(
                    "c",
                    execute_command=task_pb2.ExecuteCommandPayload(
                        container_name=container_name,
                        argv=["sh", "-c", "cat /www/index.html; exit 5"],
                    ),
                ),
            )
            await submit(
                "host-command",
                task(
                    "hc",
                    execute_command=task_pb2.ExecuteCommandPayload(
                        argv=["/bin/echo", "from the host"], on_host=True
                    ),
                ),
            )
            await submit(
                "upload",
                task(
                    "u",
                    upload_files=task_pb2.UploadFilesPayload(
                        target_directory=str(task_agent.uploads / "app"),
                        files=[
                            task_pb2.FileUpload(
                                path="conf/a.txt", content=b"A\n", mode=0o640
                            )
                        ],
                    ),
                ),
            )
            await submit(
                "upload-escape",
                task(
                    "ue",
                    upload_files=task_pb2.UploadFilesPayload(
                        target_directory=str(task_agent.uploads),
                        files=[task_pb2.FileUpload(path="../escape", content=b"x")],
                    ),
                ),
            )
            await submit(
                "rollback",
                task(
                    "r",
                    rollback=task_pb2.RollbackPayload(container_name=container_name),
                ),
            )
            results["served-rollback"] = fetch(port)
            await submit(
                "read-deployed", task("rd", read_sticker=task_pb2.ReadStickerPayload())
            )
            await submit(
                "write",
                task("w", write_sticker=task_pb2.WriteStickerPayload(sticker=hostile)),
            )
            await submit("read", task("rr", read_sticker=task_pb2.ReadStickerPayload()))
            missing = task_pb2.StickerConfig(
                path=str(task_agent.sticker.parent / "absent.json")
            )
            await submit(
                "read-missing",
                task("rm", read_sticker=task_pb2.ReadStickerPayload(location=missing)),
            )

    run(scenario())

    for name in ("deploy-v1", "deploy-v2", "health", "inspect", "host-command"):
        assert results[name].success, (name, results[name].error)
    hook_output = b"".join(c.data for c in logs["deploy-v1"] if c.stream == STDOUT)
    assert b"hook says pre" in hook_output
    assert b"hook says post" in hook_output
    assert results["served-v2"] == "v2"
    assert results["health"].outputs["probe_passed"] == "true"
    report = json.loads(results["inspect"].outputs["report"])
    assert report["container"]["release_id"] == "v2"
    assert report["sticker"]["release_id"] == "v2"
    command = results["command"]
    assert command.error_type == "command_failed"
    assert command.outputs["exit_code"] == "5"
    assert b"v2" in b"".join(c.data for c in logs["command"] if c.stream == STDOUT)
    assert results["host-command"].outputs["stdout"] == "from the host\n"
    assert results["upload"].success, results["upload"].error
    assert (task_agent.uploads / "app/conf/a.txt").read_bytes() == b"A\n"
    assert results["upload-escape"].error_type == "invalid_task"
    assert results["rollback"].success, results["rollback"].error
    assert results["served-rollback"] == "v1"
    assert results["read-deployed"].outputs["release_id"] == "v1"
    assert results["write"].success, results["write"].error
    assert results["read"].outputs["release_id"] == hostile.release_id
    assert not Path(marker).exists()
    assert results["read-missing"].error_type == "not_found"
