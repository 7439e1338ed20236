"""Crash recovery of the Compose executor against the real engine and Compose.

Each crash is real: the task runs in a child process
(``compose_crash_child``) that stops at a chosen phase or note and is killed
with SIGKILL there, holding the stack lock. The test then calls
``TaskRunner.recover`` with the phase and notes the journal would hold.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stella.agent.v1 import task_pb2
from stella_agent.executors.compose_runner import process_start_time
from stella_agent.executors.compose_stack import (
    StackLock,
    StackPaths,
    project_name_for,
)
from tests.integration.test_compose_executor import (
    Stacks,
    containers_of,
    free_port,
    http_get,
    new_stack_name,
    succeeded,
)

pytestmark = [pytest.mark.docker, pytest.mark.compose]

REPOSITORY = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_SECONDS = 120


class Crash:
    """The phase and notes the journal contains after the child was killed."""

    def __init__(self, phase: str, notes: dict[str, str]) -> None:
        self.phase = phase
        self.notes = notes


def crash_at(stacks: Stacks, task, tmp_path: Path, **stop: str) -> Crash:
    """Run `task` in a child process, kill it with SIGKILL at the point that
    `stop` names, and return the last phase and the merged notes."""
    stack_name = task.deploy.config.stack_name or task.rollback.stack_name
    stacks.projects.add(project_name_for(stack_name))
    events = tmp_path / f"events-{task.id}.jsonl"
    spec = tmp_path / f"spec-{task.id}.json"
    spec.write_text(
        json.dumps(
            {
                "config": stacks.config_mapping,
                "task": base64.b64encode(task.SerializeToString()).decode(),
                "events": str(events),
                **stop,
            }
        )
    )

    child = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.compose_crash_child", str(spec)],
        cwd=REPOSITORY,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            text = events.read_text() if events.exists() else ""
            if '"paused"' in text or '"finished"' in text or child.poll() is not None:
                break
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)

    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert {"paused": True} in lines, f"the child never stopped: {lines[-3:]}"
    phase = ""
    notes: dict[str, str] = {}
    for line in lines:
        phase = line.get("phase", phase)
        notes.update(line.get("note", {}))
    return Crash(phase, notes)


def recover(stacks: Stacks, task, crash: Crash):
    return asyncio.run(stacks.runner.recover(task, crash.phase, crash.notes, None))


def container_ids(client, project: str) -> set[str]:
    return {c.id for group in containers_of(client, project).values() for c in group}


def assert_lock_free(directory: Path) -> None:
    lock = StackLock(StackPaths(directory))
    lock.acquire()
    lock.release()


@pytest.fixture
def stacks(tmp_path, test_images, compose_command):
    helper = Stacks(tmp_path, test_images, compose_command)
    yield helper
    helper.tear_down()


@pytest.fixture
def v1_stack(stacks, docker_client):
    """A stack with release r1 (web v1) deployed; returns name, port, lock."""
    name = new_stack_name()
    port = free_port()
    lock_v1, expected_v1 = stacks.web_stack(port)
    assert succeeded(stacks.run(stacks.deploy_task(name, lock_v1, expected_v1)))
    return name, port, lock_v1


def test_recover_before_switch_changes_nothing(
    stacks, v1_stack, docker_client, tmp_path
):
    name, port, lock_v1 = v1_stack
    before = container_ids(docker_client, name)
    lock_v2, expected_v2 = stacks.web_stack(port, web="web:v2")
    task = stacks.deploy_task(name, lock_v2, expected_v2, release_id="r2")
    crash = crash_at(stacks, task, tmp_path, stop_phase="pull")
    directory = stacks.stack_directory(name)
    assert (directory / ".stella" / "staging").exists()

    result = recover(stacks, task, crash)

    assert not result.success
    assert result.error_type == "interrupted"
    assert result.retriable
    assert not result.rolled_back
    assert result.failed_phase == "pull"
    assert "nothing changed" in result.error
    assert not (directory / ".stella" / "staging").exists()
    assert container_ids(docker_client, name) == before
    assert http_get(port) == "v1"
    assert_lock_free(directory)


def test_recover_files_switched_before_up(stacks, v1_stack, docker_client, tmp_path):
    name, port, lock_v1 = v1_stack
    before = container_ids(docker_client, name)
    lock_v2, expected_v2 = stacks.web_stack(port, web="web:v2")
    task = stacks.deploy_task(name, lock_v2, expected_v2, release_id="r2")
    crash = crash_at(stacks, task, tmp_path, stop_note="files_switched")
    directory = stacks.stack_directory(name)
    assert "up_started" not in crash.notes
    assert (directory / "compose.stella.lock.yml").read_text() == lock_v2

    result = recover(stacks, task, crash)

    assert result.error_type == "interrupted", result.error
    assert result.rolled_back
    assert "(r1) was restored and is running" in result.error
    assert (directory / "compose.stella.lock.yml").read_text() == lock_v1
    release = json.loads((directory / ".stella" / "release.json").read_text())
    assert release["release_id"] == "r1"
    assert not (directory / ".stella" / "backup").exists()
    assert not (directory / ".stella" / "displaced").exists()
    # up never ran for r2, so the r1 containers were left running.
    assert container_ids(docker_client, name) == before
    assert http_get(port) == "v1"
    assert_lock_free(directory)


def test_recover_during_health_restores_previous(
    stacks, v1_stack, docker_client, tmp_path
):
    name, port, lock_v1 = v1_stack
    lock_broken, expected_broken = stacks.web_stack(port, web="broken:v1")
    task = stacks.deploy_task(name, lock_broken, expected_broken, release_id="r2")
    crash = crash_at(stacks, task, tmp_path, stop_phase="health")
    web = containers_of(docker_client, name)["web"]
    broken_id = docker_client.images.get(stacks.image("broken:v1")).id
    assert [c.image.id for c in web] == [broken_id]

    result = recover(stacks, task, crash)

    assert result.error_type == "interrupted", result.error
    assert result.retriable
    assert result.rolled_back
    assert result.failed_phase == "health"
    assert "(r1) was restored and is running" in result.error
    assert http_get(port) == "v1"
    grouped = containers_of(docker_client, name)
    assert sorted(grouped) == ["migrate", "web", "worker"]
    assert all(len(group) == 1 for group in grouped.values())
    v1_id = docker_client.images.get(stacks.image("web:v1")).id
    assert [c.image.id for c in grouped["web"]] == [v1_id]
    directory = stacks.stack_directory(name)
    assert (directory / "compose.stella.lock.yml").read_text() == lock_v1
    version = json.loads((directory / "version.json").read_text())
    assert version["release_id"] == "r1"
    assert_lock_free(directory)
    # The next task on the stack runs normally.
    lock_v2, expected_v2 = stacks.web_stack(port, web="web:v2")
    assert succeeded(
        stacks.run(stacks.deploy_task(name, lock_v2, expected_v2, release_id="r3"))
    )
    assert http_get(port) == "v2"


def test_recover_after_healthy_finishes(stacks, v1_stack, docker_client, tmp_path):
    name, port, _ = v1_stack
    lock_v2, expected_v2 = stacks.web_stack(port, web="web:v2")
    task = stacks.deploy_task(name, lock_v2, expected_v2, release_id="r2")
    crash = crash_at(stacks, task, tmp_path, stop_phase="sticker")

    result = recover(stacks, task, crash)

    assert succeeded(result)
    assert result.outputs["recovered"] == "true"
    assert result.outputs["release_id"] == "r2"
    assert result.outputs["previous_release_id"] == "r1"
    assert result.outputs["service.web"] == "healthy"
    assert http_get(port) == "v2"
    directory = stacks.stack_directory(name)
    version = json.loads((directory / "version.json").read_text())
    assert version["release_id"] == "r2"
    backup = json.loads((directory / ".stella" / "backup" / "release.json").read_text())
    assert backup["release_id"] == "r1"
    assert not (directory / ".stella" / "displaced").exists()
    assert not (directory / ".stella" / "staging").exists()


def test_recover_after_healthy_but_broken_now(
    stacks, v1_stack, docker_client, tmp_path
):
    name, port, _ = v1_stack
    lock_v2, expected_v2 = stacks.web_stack(port, web="web:v2")
    task = stacks.deploy_task(name, lock_v2, expected_v2, release_id="r2")
    crash = crash_at(stacks, task, tmp_path, stop_phase="sticker")
    (web,) = containers_of(docker_client, name)["web"]
    web.kill()

    result = recover(stacks, task, crash)

    assert result.error_type == "interrupted", result.error
    assert result.rolled_back
    assert "(r1) was restored" in result.error
    assert http_get(port) == "v1"


def test_recover_first_deploy_takes_down(stacks, docker_client, tmp_path):
    name = new_stack_name()
    port = free_port()
    lock_broken, expected_broken = stacks.web_stack(port, web="broken:v1")
    task = stacks.deploy_task(name, lock_broken, expected_broken)
    crash = crash_at(stacks, task, tmp_path, stop_phase="health")
    assert containers_of(docker_client, name)

    result = recover(stacks, task, crash)

    assert result.error_type == "interrupted", result.error
    assert not result.rolled_back
    assert "no previous release" in result.error
    assert containers_of(docker_client, name) == {}
    directory = stacks.stack_directory(name)
    assert not (directory / "compose.stella.lock.yml").exists()
    assert not (directory / "version.json").exists()
    assert not (directory / ".stella" / "release.json").exists()


def test_recover_kills_orphaned_up(stacks, v1_stack, docker_client, tmp_path):
    name, port, lock_v1 = v1_stack
    lock_v2, expected_v2 = stacks.web_stack(port, web="web:v2")
    task = stacks.deploy_task(name, lock_v2, expected_v2, release_id="r2")
    crash = crash_at(
        stacks, task, tmp_path, stop_note="compose_pid", stop_after_note="up_started"
    )
    pid = int(crash.notes["compose_pid"])
    started = crash.notes["compose_started"]
    assert started

    result = recover(stacks, task, crash)

    assert process_start_time(pid) != started
    assert result.error_type == "interrupted", result.error
    assert result.rolled_back
    assert http_get(port) == "v1"
    grouped = containers_of(docker_client, name)
    assert all(len(group) == 1 for group in grouped.values())


def test_recover_rollback_task_during_health(stacks, v1_stack, docker_client, tmp_path):
    name, port, _ = v1_stack
    lock_v2, expected_v2 = stacks.web_stack(port, web="web:v2")
    assert succeeded(
        stacks.run(stacks.deploy_task(name, lock_v2, expected_v2, release_id="r2"))
    )
    task = stacks.rollback_task(name)
    crash = crash_at(stacks, task, tmp_path, stop_phase="health")
    assert http_get(port) == "v1"

    result = recover(stacks, task, crash)

    assert result.error_type == "interrupted", result.error
    assert result.rolled_back
    assert "(r2) was restored" in result.error
    assert http_get(port) == "v2"
    directory = stacks.stack_directory(name)
    backup = json.loads((directory / ".stella" / "backup" / "release.json").read_text())
    assert backup["release_id"] == "r1"


def test_recover_other_task_type_reports_interrupted(stacks, v1_stack):
    name, _, _ = v1_stack
    task = stacks.rollback_task(name)
    task.type = task_pb2.TASK_TYPE_HEALTH_CHECK
    crash = Crash("health", {})

    result = recover(stacks, task, crash)

    assert result.error_type == "interrupted"
    assert "nothing to restore" in result.error
