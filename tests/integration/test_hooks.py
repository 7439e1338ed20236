"""Deploy hooks in sandbox containers, against the real engine.

Network tests aim only at a web container the test starts itself on Docker's
default bridge.
"""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from google.protobuf.duration_pb2 import Duration

from stella.agent.v1 import task_pb2
from stella_agent.logstream import STDOUT
from tests.conftest import TEST_LABEL, TEST_RUN
from tests.integration.task_support import (
    TaskAgent,
    deploy_task,
    free_port,
    run_tools_container,
)

pytestmark = pytest.mark.docker


@pytest.fixture
def agent(tmp_path, test_images) -> TaskAgent:
    return TaskAgent(tmp_path, test_images["tools:v1"].reference)


def hooks(stage: str, *command: str, **options) -> task_pb2.DeployHooks:
    return task_pb2.DeployHooks(
        **{stage: task_pb2.HookConfig(command=list(command), **options)}
    )


def hook_containers(docker_client, task_id: str) -> list:
    return docker_client.containers.list(
        all=True, filters={"label": ["stella.role=hook", f"stella.task.id={task_id}"]}
    )


def http_get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
        return response.read().decode().strip()


def test_hook_output_streams_and_container_goes(
    agent, test_images, container_name, docker_client
):
    task = deploy_task(
        "hook-ok",
        test_images["worker:v1"],
        container_name,
        hooks=hooks(
            "pre_deploy",
            "sh",
            "-c",
            "echo stage=$STELLA_HOOK_STAGE; grep -E 'CapEff|NoNewPrivs' "
            "/proc/self/status; echo tmp-ok > /tmp/x && cat /tmp/x",
        ),
    )

    result = agent.run(task)

    assert result.success, result.error
    stdout = agent.stream_text(STDOUT)
    assert "stage=pre_deploy" in stdout
    assert "CapEff:\t0000000000000000" in stdout
    assert "NoNewPrivs:\t1" in stdout
    assert "tmp-ok" in stdout
    assert hook_containers(docker_client, "hook-ok") == []


def test_failing_pre_deploy_hook_changes_nothing(
    agent, test_images, container_name, docker_client
):
    port = free_port()
    first = agent.run(
        deploy_task("hook-v1", test_images["web:v1"], container_name, port)
    )
    task = deploy_task(
        "hook-bad",
        test_images["web:v2"],
        container_name,
        port,
        hooks=hooks("pre_deploy", "sh", "-c", "echo refusing >&2; exit 3"),
    )

    result = agent.run(task)

    assert result.error_type == "hook_failed"
    assert "exited with code 3" in result.error
    assert "refusing" in result.error
    assert result.failed_phase == "pre-deploy"
    assert not result.rolled_back
    current = docker_client.containers.get(container_name)
    assert current.id == first.outputs["container_id"]
    assert current.status == "running"
    assert http_get(port) == "v1"
    assert hook_containers(docker_client, "hook-bad") == []


def test_hook_cannot_write_root_filesystem(agent, test_images, container_name):
    task = deploy_task(
        "hook-rofs",
        test_images["worker:v1"],
        container_name,
        hooks=hooks("pre_deploy", "touch", "/evil"),
    )

    result = agent.run(task)

    assert result.error_type == "hook_failed"
    assert "Read-only file system" in result.error


def test_hook_has_no_network(tmp_path, test_images, container_name, docker_client):
    web = run_tools_container(
        docker_client,
        test_images["web:v1"].reference,
        f"{container_name}-peer",
        command=["httpd", "-f", "-p", "8080", "-h", "/www"],
    )
    web.reload()
    address = web.attrs["NetworkSettings"]["IPAddress"]
    url = f"http://{address}:8080/"
    # The peer responds when the network is granted, so the denial below is the
    # sandbox's doing.
    open_agent = TaskAgent(
        tmp_path / "open",
        test_images["tools:v1"].reference,
        hooks={"allow_network": True},
    )
    closed_agent = TaskAgent(tmp_path / "closed", test_images["tools:v1"].reference)
    command = ("wget", "-q", "-O", "-", url)

    granted = open_agent.run(
        deploy_task(
            "hook-net-on",
            test_images["worker:v1"],
            container_name,
            hooks=hooks("pre_deploy", *command, network=True),
        )
    )
    denied = closed_agent.run(
        deploy_task(
            "hook-net-off",
            test_images["worker:v1"],
            f"{container_name}-2",
            hooks=hooks("pre_deploy", *command),
        )
    )

    assert granted.success, granted.error
    assert denied.error_type == "hook_failed"
    assert "network is unreachable" in denied.error.lower()


def test_hook_network_request_needs_policy(agent, test_images, container_name):
    task = deploy_task(
        "hook-net-policy",
        test_images["worker:v1"],
        container_name,
        hooks=hooks("pre_deploy", "true", network=True),
    )

    result = agent.run(task)

    assert result.error_type == "invalid_task"
    assert "hooks.allow_network is false" in result.error
    assert result.failed_phase == "validate"


def test_unpinned_hook_image_rejected(agent, test_images, container_name):
    task = deploy_task(
        "hook-unpinned",
        test_images["worker:v1"],
        container_name,
        hooks=hooks("post_deploy", "true", image="127.0.0.1:5000/stella-test/tools:v1"),
    )

    result = agent.run(task)

    assert result.error_type == "invalid_task"
    assert "not pinned by digest" in result.error
    assert result.failed_phase == "validate"


def test_pre_deploy_hook_timeout_changes_nothing(
    agent, test_images, container_name, docker_client
):
    port = free_port()
    first = agent.run(
        deploy_task("hto-v1", test_images["web:v1"], container_name, port)
    )
    task = deploy_task(
        "hto-pre",
        test_images["web:v2"],
        container_name,
        port,
        hooks=hooks("pre_deploy", "sleep", "60", timeout=Duration(seconds=2)),
    )

    result = agent.run(task)

    assert result.error_type == "hook_failed"
    assert "timeout of 2s" in result.error
    assert (
        docker_client.containers.get(container_name).id == first.outputs["container_id"]
    )
    assert http_get(port) == "v1"
    assert hook_containers(docker_client, "hto-pre") == []


def test_post_deploy_hook_timeout_rolls_back(
    agent, test_images, container_name, docker_client
):
    port = free_port()
    first = agent.run(
        deploy_task("hto-v1b", test_images["web:v1"], container_name, port)
    )
    task = deploy_task(
        "hto-post",
        test_images["web:v2"],
        container_name,
        port,
        hooks=hooks("post_deploy", "sleep", "60", timeout=Duration(seconds=2)),
    )

    result = agent.run(task)

    assert result.error_type == "hook_failed"
    assert result.failed_phase == "post-deploy"
    assert result.rolled_back
    current = docker_client.containers.get(container_name)
    assert current.id == first.outputs["container_id"]
    assert http_get(port) == "v1"
    names = [c.name for c in docker_client.containers.list(all=True)]
    assert not [n for n in names if n.startswith(f"{container_name}-")]
    assert hook_containers(docker_client, "hto-post") == []


def test_recovery_removes_leftover_hook(
    agent, test_images, container_name, docker_client
):
    task = deploy_task(
        "hook-crash",
        test_images["worker:v1"],
        container_name,
        hooks=hooks("pre_deploy", "sleep", "60"),
    )
    leftover = docker_client.containers.create(
        test_images["tools:v1"].reference,
        command=["sleep", "60"],
        labels={
            "stella.managed": "true",
            "stella.role": "hook",
            "stella.task.id": "hook-crash",
            TEST_LABEL: TEST_RUN,
        },
    )

    result = asyncio.run(agent.runner.recover(task, "pre-deploy", {}, None))

    assert result.error_type == "interrupted"
    assert hook_containers(docker_client, "hook-crash") == []
    assert leftover.id not in [c.id for c in docker_client.containers.list(all=True)]
