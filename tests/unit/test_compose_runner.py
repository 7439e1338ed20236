"""The Compose subprocess runner: streaming, timeouts, process groups, discovery."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from stella_agent.errors import ComposeError, TaskCancelledError, TaskTimeoutError
from stella_agent.executors.compose_runner import (
    ComposeRunner,
    compose_environment,
    reserved_variable,
)
from stella_agent.logstream import STDERR, STDOUT, TaskLog

ENVIRONMENT = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def run_shell(script: str, log: TaskLog | None = None, **options):
    runner = ComposeRunner()
    options.setdefault("timeout", 30.0)
    return asyncio.run(
        runner.run(
            ["sh", "-c"], [script], cwd="/", environment=ENVIRONMENT, log=log, **options
        )
    )


def collecting_log() -> tuple[TaskLog, list]:
    chunks: list = []
    return TaskLog("t", chunks.append), chunks


def test_run_streams_both_pipes():
    log, chunks = collecting_log()

    result = run_shell("echo out; echo err >&2; exit 4", log)

    assert result.returncode == 4
    assert b"".join(c.data for c in chunks if c.stream == STDOUT) == b"out\n"
    assert b"".join(c.data for c in chunks if c.stream == STDERR) == b"err\n"
    assert result.stderr_tail == "err\n"
    assert result.stdout == b""


def test_run_captures_stdout_without_logging_it():
    log, chunks = collecting_log()

    result = run_shell("printf 'secret model'; echo note >&2", log, capture_stdout=True)

    assert result.stdout == b"secret model"
    assert all(c.stream != STDOUT for c in chunks)
    assert b"".join(c.data for c in chunks) == b"note\n"


def test_run_keeps_only_stderr_tail():
    result = run_shell("head -c 10000 /dev/zero | tr '\\0' x >&2; echo END >&2")

    assert result.stderr_tail.endswith("END\n")
    assert len(result.stderr_tail) == 4096


def process_gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_timeout_kills_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"

    started = time.monotonic()
    with pytest.raises(ComposeError) as raised:
        run_shell(f"sleep 60 & echo $! > {pid_file}; wait", timeout=0.5)

    assert time.monotonic() - started < 10
    assert raised.value.error_type == "timeout"
    assert raised.value.retriable
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while not process_gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_gone(child)


def test_deadline_raises_task_timeout():
    with pytest.raises(TaskTimeoutError):
        run_shell("sleep 60", deadline=time.monotonic() + 0.3)


def test_cancel_event_kills_command():
    event = threading.Event()
    threading.Timer(0.3, event.set).start()

    with pytest.raises(TaskCancelledError):
        run_shell("sleep 60", cancel_event=event)


def test_missing_program_raises_compose_error():
    runner = ComposeRunner()

    with pytest.raises(ComposeError, match="cannot start"):
        asyncio.run(
            runner.run(
                ["/nonexistent/compose"],
                [],
                cwd="/",
                environment=ENVIRONMENT,
                log=None,
                timeout=5,
            )
        )


def fake_compose(tmp_path: Path, version_output: str, status: int = 0) -> str:
    script = tmp_path / "fake-compose"
    script.write_text(f"#!/bin/sh\necho '{version_output}'\nexit {status}\n")
    script.chmod(0o755)
    return str(script)


def test_discovery_accepts_v2(tmp_path):
    runner = ComposeRunner((fake_compose(tmp_path, "v2.40.3"),))

    command = asyncio.run(runner.discover(ENVIRONMENT))

    assert command.version == "2.40.3"


def test_discovery_rejects_v1(tmp_path):
    runner = ComposeRunner((fake_compose(tmp_path, "1.29.2"),))

    with pytest.raises(ComposeError) as raised:
        asyncio.run(runner.discover(ENVIRONMENT))

    assert raised.value.error_type == "compose_unavailable"
    assert "Compose 1.29.2" in raised.value.message
    assert "v1 is not supported" in raised.value.message


def test_discovery_reports_failing_command(tmp_path):
    runner = ComposeRunner((fake_compose(tmp_path, "broken", status=2),))

    with pytest.raises(ComposeError, match="version failed"):
        asyncio.run(runner.discover(ENVIRONMENT))


def test_discovery_reports_missing_command():
    runner = ComposeRunner(("no-such-compose-binary",))

    with pytest.raises(ComposeError, match="not found on PATH"):
        asyncio.run(runner.discover(ENVIRONMENT))


def test_discovery_is_cached(tmp_path):
    script = fake_compose(tmp_path, "2.40.3")
    runner = ComposeRunner((script,))
    first = asyncio.run(runner.discover(ENVIRONMENT))
    os.unlink(script)

    assert asyncio.run(runner.discover(ENVIRONMENT)) == first


def test_compose_environment_filters_agent_environment():
    agent = {
        "PATH": "/bin",
        "HOME": "/root",
        "DOCKER_CONFIG": "/etc/docker-cli",
        "COMPOSE_PROFILES": "debug",
        "COMPOSE_FILE": "other.yml",
        "AWS_SECRET_ACCESS_KEY": "agent secret",
    }

    environment = compose_environment(
        agent, "unix:///run/docker.sock", {"TOKEN": "a$b"}
    )

    assert environment == {
        "PATH": "/bin",
        "HOME": "/root",
        "DOCKER_CONFIG": "/etc/docker-cli",
        "DOCKER_HOST": "unix:///run/docker.sock",
        "TOKEN": "a$b",
    }


@pytest.mark.parametrize(
    ("name", "reserved"),
    [
        ("PATH", True),
        ("HOME", True),
        ("DOCKER_HOST", True),
        ("COMPOSE_FILE", True),
        ("APP_TOKEN", False),
    ],
)
def test_reserved_variables(name, reserved):
    assert reserved_variable(name) is reserved


def test_asyncio_cancellation_kills_command(tmp_path):
    pid_file = tmp_path / "child.pid"
    runner = ComposeRunner()

    async def cancel_while_running() -> None:
        command = asyncio.create_task(
            runner.run(
                ["sh", "-c"],
                [f"sleep 60 & echo $! > {pid_file}; wait"],
                cwd="/",
                environment=ENVIRONMENT,
                log=None,
                timeout=30,
            )
        )
        while not pid_file.exists() or not pid_file.read_text().strip():
            await asyncio.sleep(0.05)
        command.cancel()
        with pytest.raises(asyncio.CancelledError):
            await command

    asyncio.run(cancel_while_running())

    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while not process_gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_gone(child)
