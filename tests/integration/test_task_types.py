"""health-check, inspect, execute-command and rollback choice on the Docker
executor, against the real engine."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from google.protobuf.duration_pb2 import Duration

from stella.agent.v1 import task_pb2
from stella_agent.logstream import STDERR, STDOUT
from tests.conftest import TEST_LABEL, TEST_RUN
from tests.integration.task_support import (
    TaskAgent,
    deploy_task,
    free_port,
    run_tools_container,
    task_of,
)

pytestmark = pytest.mark.docker


@pytest.fixture
def agent(tmp_path, test_images) -> TaskAgent:
    return TaskAgent(tmp_path, test_images["tools:v1"].reference)


def wait_for_health(client, name: str, status: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = client.api.inspect_container(name)["State"].get("Health") or {}
        if health.get("Status") == status:
            return
        time.sleep(0.2)
    raise AssertionError(f"container {name} did not become {status}")


def health_task(task_id: str, name: str, probe=None) -> task_pb2.AgentTask:
    payload = task_pb2.HealthCheckPayload(container_name=name)
    if probe is not None:
        payload.probe.CopyFrom(probe)
    return task_of(task_id, health_check=payload)


def command_task(task_id: str, name: str, *argv: str, **options) -> task_pb2.AgentTask:
    return task_of(
        task_id,
        execute_command=task_pb2.ExecuteCommandPayload(
            container_name=name, argv=list(argv), **options
        ),
    )


# health-check


def test_health_check_healthy_with_probes(
    agent, test_images, container_name, docker_client
):
    agent.run(deploy_task("hc-web", test_images["web:v1"], container_name))
    before = docker_client.api.inspect_container(container_name)
    http = task_pb2.Probe(http=task_pb2.HttpProbe(port=8080, path="/index.html"))
    tcp = task_pb2.Probe(tcp=task_pb2.TcpProbe(port=8080))

    result = agent.run(health_task("hc-1", container_name, http))
    tcp_result = agent.run(health_task("hc-2", container_name, tcp))

    assert result.success, result.error
    assert result.outputs["status"] == "healthy"
    assert result.outputs["health"] == "healthy"
    assert result.outputs["probe_passed"] == "true"
    report = json.loads(result.outputs["report"])
    assert report["probe"]["ran_in"] == "sandbox"
    assert report["health_log"]
    assert report["health_log"][-1]["exit_code"] == 0
    assert tcp_result.success, tcp_result.error
    after = docker_client.api.inspect_container(container_name)
    assert after["State"]["StartedAt"] == before["State"]["StartedAt"]
    assert after["RestartCount"] == before["RestartCount"]
    probes = docker_client.containers.list(
        all=True, filters={"label": "stella.role=probe"}
    )
    assert [
        p for p in probes if p.labels.get("stella.task.id") in ("hc-1", "hc-2")
    ] == []


def test_health_check_failing_probe(agent, test_images, container_name):
    agent.run(deploy_task("hc-web2", test_images["web:v1"], container_name))
    closed = task_pb2.Probe(tcp=task_pb2.TcpProbe(port=9))
    missing = task_pb2.Probe(http=task_pb2.HttpProbe(port=8080, path="/missing"))

    tcp = agent.run(health_task("hc-3", container_name, closed))
    http = agent.run(health_task("hc-4", container_name, missing))

    assert not tcp.success
    assert tcp.error_type == "unhealthy"
    assert tcp.outputs["status"] == "unhealthy"
    assert tcp.outputs["probe_passed"] == "false"
    assert http.error_type == "unhealthy"
    assert "probe failed" in http.error


def test_health_check_unhealthy_container(
    agent, test_images, container_name, docker_client
):
    run_tools_container(
        docker_client,
        test_images["broken:v1"].reference,
        container_name,
        command=["httpd", "-f", "-p", "8080", "-h", "/www"],
    )
    wait_for_health(docker_client, container_name, "unhealthy")

    result = agent.run(health_task("hc-5", container_name))

    assert not result.success
    assert result.error_type == "unhealthy"
    assert result.outputs["status"] == "unhealthy"
    assert result.outputs["health"] == "unhealthy"
    report = json.loads(result.outputs["report"])
    assert report["failing_streak"] >= 2
    assert report["health_log"][-1]["exit_code"] == 1


def test_health_check_stopped_and_missing(
    agent, test_images, container_name, docker_client
):
    container = run_tools_container(
        docker_client, test_images["tools:v1"].reference, container_name
    )
    container.kill()

    stopped = agent.run(health_task("hc-6", container_name))
    missing = agent.run(health_task("hc-7", f"{container_name}-absent"))

    assert stopped.outputs["status"] == "stopped"
    assert stopped.error_type == "unhealthy"
    assert missing.error_type == "not_found"


def test_health_check_probe_without_tool_image(tmp_path, test_images, container_name):
    agent = TaskAgent(tmp_path, test_images["tools:v1"].reference)
    agent.run(deploy_task("hc-web3", test_images["web:v1"], container_name))
    bare = TaskAgent(tmp_path / "bare", "", hooks={"image": ""})
    probe = task_pb2.Probe(http=task_pb2.HttpProbe(port=8080))

    result = bare.run(health_task("hc-8", container_name, probe))

    assert result.success, result.error
    assert json.loads(result.outputs["report"])["probe"]["ran_in"] == "exec"


# inspect


def test_inspect_reports_and_masks(agent, test_images, container_name):
    port = free_port()
    image = test_images["web:v1"]
    secret = f"s3cret-{uuid.uuid4().hex}"
    agent.run(
        deploy_task(
            "in-1",
            image,
            container_name,
            port,
            environment={"API_TOKEN": secret, "MODE": "plain"},
        )
    )

    result = agent.run(
        task_of("in-2", inspect=task_pb2.InspectPayload(container_name=container_name))
    )

    assert result.success, result.error
    assert secret not in result.outputs["report"]
    assert "plain" not in result.outputs["report"]
    report = json.loads(result.outputs["report"])
    container = report["container"]
    assert container["environment"]["API_TOKEN"] == "****"
    assert container["environment"]["MODE"] == "****"
    assert container["digest"] == image.digest
    assert image.reference in container["repo_digests"]
    assert container["image"] == image.reference
    assert container["state"] == "running"
    assert container["health"] == "healthy"
    assert container["restart_count"] == 0
    assert container["labels"]["stella.release.id"] == "in-1"
    assert container["labels"][TEST_LABEL] == TEST_RUN
    assert {"container_port": "8080/tcp", "host_ip": "127.0.0.1"}.items() <= (
        container["ports"][0].items()
    )
    assert container["ports"][0]["host_port"] == str(port)
    assert report["sticker"]["release_id"] == "in-1"
    assert result.outputs["digest"] == image.digest
    assert result.outputs["release_id"] == "in-1"
    assert result.outputs["sticker_found"] == "true"
    assert result.outputs["state"] == "running"


def test_inspect_lists_kept_containers(agent, test_images, container_name):
    agent.run(deploy_task("in-3", test_images["web:v1"], container_name))
    agent.run(
        deploy_task("in-4", test_images["web:v2"], container_name, keep_previous=True)
    )

    result = agent.run(
        task_of("in-5", inspect=task_pb2.InspectPayload(container_name=container_name))
    )

    report = json.loads(result.outputs["report"])
    assert result.outputs["kept_containers"] == "1"
    assert report["kept"][0]["release_id"] == "in-3"
    assert report["kept"][0]["name"].startswith(f"{container_name}-previous-")
    assert report["container"]["release_id"] == "in-4"


# execute-command


def test_execute_command_output_and_exit_code(
    agent, test_images, container_name, docker_client
):
    run_tools_container(
        docker_client, test_images["tools:v1"].reference, container_name
    )

    failed = agent.run(
        command_task(
            "ex-1",
            container_name,
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; exit 7",
        )
    )
    stdout = agent.stream_text(STDOUT)
    stderr = agent.stream_text(STDERR)

    assert not failed.success
    assert failed.error_type == "command_failed"
    assert failed.outputs["exit_code"] == "7"
    assert "exited with code 7" in failed.error
    assert stdout == "to-out\n"
    assert stderr == "to-err\n"
    assert failed.outputs["stdout"] == "to-out\n"
    assert failed.outputs["stderr"] == "to-err\n"


def test_execute_command_argv_is_not_a_shell(
    agent, test_images, container_name, docker_client
):
    run_tools_container(
        docker_client, test_images["tools:v1"].reference, container_name
    )

    result = agent.run(
        command_task(
            "ex-2",
            container_name,
            "echo",
            "$(id)",
            "`id`",
            "a;b",
            environment={"GREETING": "hi there"},
            working_dir="/tmp",
            user="65534:65534",
        )
    )
    context = agent.run(
        command_task(
            "ex-3",
            container_name,
            "sh",
            "-c",
            'echo "$GREETING"; pwd; id -u',
            environment={"GREETING": "hi there"},
            working_dir="/tmp",
            user="65534:65534",
        )
    )

    assert result.success, result.error
    assert result.outputs["exit_code"] == "0"
    assert result.outputs["stdout"] == "$(id) `id` a;b\n"
    assert context.outputs["stdout"] == "hi there\n/tmp\n65534\n"


def test_execute_command_timeout_kills(
    agent, test_images, container_name, docker_client
):
    container = run_tools_container(
        docker_client, test_images["tools:v1"].reference, container_name
    )

    result = agent.run(
        command_task(
            "ex-4",
            container_name,
            "sh",
            "-c",
            "echo started; sleep 300",
            timeout=Duration(seconds=1),
        )
    )

    assert not result.success
    assert result.error_type == "timeout"
    assert result.outputs["timed_out"] == "true"
    assert result.outputs["stdout"] == "started\n"
    processes = container.exec_run(["ps", "-o", "args"]).output.decode()
    assert "sleep 300" not in processes


def test_execute_command_missing_or_stopped(
    agent, test_images, container_name, docker_client
):
    container = run_tools_container(
        docker_client, test_images["tools:v1"].reference, container_name
    )
    container.kill()

    stopped = agent.run(command_task("ex-5", container_name, "true"))
    missing = agent.run(command_task("ex-6", f"{container_name}-absent", "true"))
    empty = agent.run(command_task("ex-7", container_name))

    assert stopped.error_type == "docker_error"
    assert "is not running" in stopped.error
    assert missing.error_type == "not_found"
    assert empty.error_type == "invalid_task"


def host_task(task_id: str, *argv: str, **options) -> task_pb2.AgentTask:
    return task_of(
        task_id,
        execute_command=task_pb2.ExecuteCommandPayload(
            argv=list(argv), on_host=True, **options
        ),
    )


def test_host_commands_disabled_by_default(agent):
    result = agent.run(host_task("hx-1", "/bin/echo", "hi"))

    assert result.error_type == "unsupported"
    assert "allow_host_commands" in result.error


def test_host_command_allowlist(tmp_path, test_images):
    agent = TaskAgent(
        tmp_path,
        test_images["tools:v1"].reference,
        tasks={
            "allow_host_commands": True,
            "host_command_allowlist": ["/bin/echo", "/bin/sleep"],
        },
    )

    allowed = agent.run(host_task("hx-2", "/bin/echo", "$(id)", "hello"))
    refused = agent.run(host_task("hx-3", "/bin/sh", "-c", "id"))
    relative = agent.run(host_task("hx-4", "echo", "hi"))
    slow = agent.run(host_task("hx-5", "/bin/sleep", "60", timeout=Duration(seconds=1)))

    assert allowed.success, allowed.error
    assert allowed.outputs["stdout"] == "$(id) hello\n"
    assert allowed.outputs["host"] == "true"
    assert refused.error_type == "invalid_task"
    assert "host_command_allowlist" in refused.error
    assert relative.error_type == "invalid_task"
    assert slow.error_type == "timeout"
    assert float(slow.outputs["duration_ms"]) < 10_000


# rollback choice


def create_release(client, image, name: str, release: str, deployed_at: str, **labels):
    """Create (not start) a container as a deploy would have left it."""
    return client.containers.create(
        image.reference,
        name=name,
        labels={
            TEST_LABEL: TEST_RUN,
            "stella.managed": "true",
            "stella.role": "current",
            "stella.release.id": release,
            "stella.release.name": f"release {release}",
            "stella.digest": image.digest,
            "stella.image": image.repository,
            "stella.deployed.at": deployed_at,
            "stella.task.id": f"task-{release}",
            **labels,
        },
    )


def test_rollback_skips_unhealthy_newest(
    agent, test_images, container_name, docker_client
):
    web_v1, web_v2 = test_images["web:v1"], test_images["web:v2"]
    oldest = create_release(
        docker_client,
        web_v1,
        f"{container_name}-previous-20240101T000001000000Z",
        "ra",
        "2024-01-01T00:00:01Z",
    )
    healthy = create_release(
        docker_client,
        web_v2,
        f"{container_name}-previous-20240101T000002000000Z",
        "rb",
        "2024-01-01T00:00:02Z",
        **{"stella.replaced.id": oldest.id, "stella.replaced.health": "healthy"},
    )
    newest = create_release(
        docker_client,
        web_v1,
        f"{container_name}-previous-20240101T000003000000Z",
        "rc",
        "2024-01-01T00:00:03Z",
        **{"stella.replaced.id": healthy.id, "stella.replaced.health": "healthy"},
    )
    current = create_release(
        docker_client,
        web_v2,
        container_name,
        "rd",
        "2024-01-01T00:00:04Z",
        **{"stella.replaced.id": newest.id, "stella.replaced.health": "unhealthy"},
    )
    current.start()

    result = agent.run(
        task_of(
            "rb-3", rollback=task_pb2.RollbackPayload(container_name=container_name)
        )
    )

    assert result.success, result.error
    assert result.outputs["container_id"] == healthy.id
    assert result.outputs["restored_from"].endswith("20240101T000002000000Z")
    running = docker_client.containers.get(container_name)
    assert running.labels["stella.release.id"] == "rb"
    assert "skipping" in agent.log
    sticker = json.loads((agent.sticker_dir / "version.json").read_text())
    assert sticker["release_id"] == "rb"
    leftover = {c.name for c in docker_client.containers.list(all=True)}
    assert newest.name in leftover
    assert oldest.name in leftover


def test_rollback_without_healthy_release(
    agent, test_images, container_name, docker_client
):
    web = test_images["web:v1"]
    only = create_release(
        docker_client,
        web,
        f"{container_name}-previous-20240101T000001000000Z",
        "ra",
        "2024-01-01T00:00:01Z",
    )
    current = create_release(
        docker_client,
        web,
        container_name,
        "rb",
        "2024-01-01T00:00:02Z",
        **{"stella.replaced.id": only.id, "stella.replaced.health": "unhealthy"},
    )
    current.start()

    result = agent.run(
        task_of(
            "rb-4", rollback=task_pb2.RollbackPayload(container_name=container_name)
        )
    )
    empty = agent.run(
        task_of(
            "rb-5",
            rollback=task_pb2.RollbackPayload(container_name=f"{container_name}-x"),
        )
    )

    assert result.error_type == "rollback_failed"
    assert "no healthy previous release" in result.error
    assert docker_client.containers.get(container_name).id == current.id
    assert docker_client.containers.get(container_name).status == "running"
    assert empty.error_type == "rollback_failed"
    assert "no previous container" in empty.error


def test_deploy_records_unhealthy_release(
    agent, test_images, container_name, docker_client
):
    web_v1, web_v2 = test_images["web:v1"], test_images["web:v2"]
    first = agent.run(deploy_task("ru-1", web_v1, container_name))
    second = agent.run(deploy_task("ru-2", web_v2, container_name, keep_previous=True))
    # Break the second release: its health check fetches this page.
    docker_client.containers.get(container_name).exec_run(["rm", "/www/index.html"])
    wait_for_health(docker_client, container_name, "unhealthy")
    third = agent.run(
        deploy_task(
            "ru-3", web_v1, container_name, keep_previous=True, environment={"N": "3"}
        )
    )

    labels = docker_client.containers.get(third.outputs["container_id"]).labels
    kept = docker_client.containers.list(
        all=True, filters={"name": f"{container_name}-previous-"}
    )

    rollback = agent.run(
        task_of(
            "ru-rb", rollback=task_pb2.RollbackPayload(container_name=container_name)
        )
    )

    assert third.success, third.error
    assert len(kept) == 2
    assert labels["stella.replaced.id"] == second.outputs["container_id"]
    assert labels["stella.replaced.health"] == "unhealthy"
    assert rollback.success, rollback.error
    assert rollback.outputs["container_id"] == first.outputs["container_id"]
    assert rollback.outputs["digest"] == web_v1.digest
