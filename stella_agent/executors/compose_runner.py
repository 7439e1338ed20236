"""Running Docker Compose v2 as a subprocess.

Compose runs as an asyncio subprocess in a new session, so its process group,
including the plugin process that ``docker compose`` starts, can be killed as a
whole. The child replaces itself with Compose at once (fork and exec), so no
copy of the agent's Python process and its gRPC channel keeps running, as it
would after a bare ``os.fork``. Stdout and stderr stream into the task log as
they arrive, unless the caller captures stdout because it is data: ``config``
prints the resolved model, environment values included.

Compose is found as ``compose.command`` from the configuration, else the
``docker compose`` plugin, else a ``docker-compose`` binary; Compose v1 is
rejected.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stella_agent.errors import ComposeError, TaskCancelledError, TaskTimeoutError
from stella_agent.logstream import STDERR, STDOUT, TaskLog

READ_SIZE = 64 * 1024
STDERR_TAIL_BYTES = 4 * 1024
POLL_SECONDS = 0.2
"""Interval in seconds between checks of a running command for cancellation
and timeouts."""
KILL_GRACE_SECONDS = 5.0
"""Seconds to wait for the pipes to close after the process group is killed."""
DISCOVERY_TIMEOUT_SECONDS = 30.0
CANDIDATES: tuple[tuple[str, ...], ...] = (("docker", "compose"), ("docker-compose",))

PASSTHROUGH_VARIABLES = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "XDG_RUNTIME_DIR")
"""Variables of the agent's environment that Compose needs (HOME locates the
Docker CLI configuration and its plugins)."""
RESERVED_PREFIXES = ("DOCKER_", "COMPOSE_")
"""Variables with these prefixes configure Docker and Compose themselves."""


@dataclass(frozen=True)
class ComposeCommand:
    """A working Compose v2 command."""

    argv: tuple[str, ...]
    version: str


@dataclass(frozen=True)
class CommandResult:
    """The exit status and output of a finished Compose command."""

    returncode: int
    stdout: bytes
    """Captured stdout; empty unless the caller asked to capture it."""
    stderr_tail: str
    """The last few KiB of stderr, for error messages."""


def compose_environment(
    agent_environment: Mapping[str, str],
    docker_host: str,
    task_environment: Mapping[str, str],
) -> dict[str, str]:
    """Build the environment of a Compose command.

    Only a few variables of the agent's own environment pass, so that the
    resolved model does not depend on how the agent was started. The task's
    variables are added as they are: Compose hands them to services byte for
    byte through a bare key (``environment: [NAME]``) or ``${NAME}``, and
    never interpolates a value a second time.
    """
    environment = {
        name: value
        for name, value in agent_environment.items()
        if name in PASSTHROUGH_VARIABLES or name.startswith("DOCKER_")
    }
    if docker_host:
        environment["DOCKER_HOST"] = docker_host
    environment.update(task_environment)
    return environment


def reserved_variable(name: str) -> bool:
    """Return True when `name` is a variable of the Compose command that a task
    may not set."""
    return name in PASSTHROUGH_VARIABLES or name.startswith(RESERVED_PREFIXES)


class ComposeRunner:
    """Finds Compose once and runs its commands with timeouts."""

    def __init__(self, configured: Sequence[str] = ()) -> None:
        self._configured = tuple(configured)
        self._command: ComposeCommand | None = None
        self._discovery_lock = asyncio.Lock()

    async def discover(self, environment: Mapping[str, str]) -> ComposeCommand:
        """Return the Compose v2 command, finding it on first use."""
        async with self._discovery_lock:
            if self._command is None:
                self._command = await self._find(environment)
            return self._command

    async def _find(self, environment: Mapping[str, str]) -> ComposeCommand:
        candidates = (self._configured,) if self._configured else CANDIDATES
        problems = []
        for argv in candidates:
            if shutil.which(argv[0], path=environment.get("PATH")) is None:
                problems.append(f"{' '.join(argv)}: {argv[0]} not found on PATH")
                continue
            try:
                result = await self.run(
                    argv,
                    ["version", "--short"],
                    cwd="/",
                    environment=environment,
                    log=None,
                    timeout=DISCOVERY_TIMEOUT_SECONDS,
                    capture_stdout=True,
                )
            except ComposeError as exc:
                problems.append(f"{' '.join(argv)}: {exc.message}")
                continue
            if result.returncode != 0:
                error = result.stderr_tail.strip()[-300:]
                problems.append(f"{' '.join(argv)} version failed: {error}")
                continue
            version = result.stdout.decode("utf-8", "replace").strip().lstrip("v")
            major = version.split(".", 1)[0]
            if not major.isdigit() or int(major) < 2:
                problems.append(
                    f"{' '.join(argv)} is Compose {version or 'of unknown version'}, "
                    "but Compose v1 is not supported: install Compose v2 (the docker "
                    "compose plugin)"
                )
                continue
            return ComposeCommand(argv=tuple(argv), version=version)
        raise ComposeError(
            "Docker Compose v2 was not found ("
            + "; ".join(problems)
            + "); install the docker compose plugin or set compose.command in the "
            "agent configuration",
            error_type="compose_unavailable",
        )

    async def run(
        self,
        argv: Sequence[str],
        arguments: Sequence[str],
        *,
        cwd: str,
        environment: Mapping[str, str],
        log: TaskLog | None,
        timeout: float,
        deadline: float | None = None,
        cancel_event: threading.Event | None = None,
        capture_stdout: bool = False,
        description: str = "",
        on_start: Callable[[int], None] | None = None,
    ) -> CommandResult:
        """Run ``argv + arguments`` and return its exit status and output.

        The command is killed with its whole process group after `timeout`
        seconds (ComposeError), when the monotonic `deadline` passes
        (TaskTimeoutError) or when `cancel_event` is set (TaskCancelledError).
        A non-zero exit status is returned, not raised. `description` names
        the command in error messages. `on_start` receives the process id
        once the command runs, so that crash recovery can find the command
        if the agent dies before it ends.
        """
        command = [*argv, *arguments]
        description = description or " ".join(command[:3])
        started = time.monotonic()
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                cwd=cwd,
                env=dict(environment),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise ComposeError(f"cannot start {description}: {exc}") from None

        if on_start is not None:
            try:
                on_start(process.pid)
            except BaseException:
                _kill_group(process)
                raise

        stdout = bytearray()
        stderr_tail = bytearray()
        readers = [
            asyncio.create_task(
                _pump(process.stdout, None, STDOUT, stdout)
                if capture_stdout
                else _pump(process.stdout, log, STDOUT, None)
            ),
            asyncio.create_task(
                _pump(process.stderr, log, STDERR, stderr_tail, tail=STDERR_TAIL_BYTES)
            ),
        ]
        waiter = asyncio.create_task(process.wait())
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=POLL_SECONDS)
                if done:
                    break
                _raise_if_stopped(description, started, timeout, deadline, cancel_event)
        except BaseException:
            _kill_group(process)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), KILL_GRACE_SECONDS)
            await _drain(readers)
            raise
        await _drain(readers)
        return CommandResult(
            returncode=waiter.result(),
            stdout=bytes(stdout),
            stderr_tail=stderr_tail.decode("utf-8", "replace"),
        )


def process_start_time(pid: int) -> str:
    """Return when process `pid` started, in clock ticks after boot, or "" when
    it no longer runs.

    A pid together with its start time names one process even after the pid
    is reused. Reads ``/proc/<pid>/stat`` (Linux only); a zombie counts as
    gone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name in brackets may contain spaces and brackets, so the
    # fields are counted from the last ')': state is field 3, starttime 22.
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return ""
    return fields[19]


def kill_orphaned_command(pid: int, start_time: str) -> bool:
    """Kill the process group of a Compose command that an earlier agent
    process started and return True, or return False when it has ended.

    Commands run in their own session, so they outlive an agent killed with
    SIGKILL, and an ``up`` left running would race the recovery's own
    ``up``. Waits up to KILL_GRACE_SECONDS for the process to go (blocking).
    """
    if not start_time or process_start_time(pid) != start_time:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_GRACE_SECONDS
    while process_start_time(pid) == start_time and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def _raise_if_stopped(
    description: str,
    started: float,
    timeout: float,
    deadline: float | None,
    cancel_event: threading.Event | None,
) -> None:
    now = time.monotonic()
    if cancel_event is not None and cancel_event.is_set():
        raise TaskCancelledError(
            f"task cancelled while running {description}; the command was killed"
        )
    if deadline is not None and now >= deadline:
        raise TaskTimeoutError(
            f"task timed out while running {description}; the command was killed"
        )
    if now - started >= timeout:
        raise ComposeError(
            f"{description} timed out after {timeout:.0f} s "
            "(compose.command_timeout_seconds) and was killed",
            error_type="timeout",
            retriable=True,
        )


async def _pump(
    stream: asyncio.StreamReader | None,
    log: TaskLog | None,
    log_stream: int,
    keep: bytearray | None,
    *,
    tail: int = 0,
) -> None:
    """Copy a pipe into the task log (when `log` is set) and into `keep` (its
    last `tail` bytes when `tail` is set)."""
    if stream is None:
        return
    while True:
        data = await stream.read(READ_SIZE)
        if not data:
            return
        if log is not None:
            log.write(log_stream, data)
        if keep is not None:
            keep.extend(data)
            if tail and len(keep) > tail:
                del keep[: len(keep) - tail]


def _kill_group(process: asyncio.subprocess.Process) -> None:
    # Once the leader is reaped its pid may be reused, so the group id is no
    # longer safe to signal.
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


async def _drain(readers: list[asyncio.Task[None]]) -> None:
    """Wait for the pipes to close. A grandchild that left the process group
    can keep them open, so the readers get a bounded time and are then
    cancelled, dropping what that grandchild writes later."""
    _, pending = await asyncio.wait(readers, timeout=KILL_GRACE_SECONDS)
    for reader in pending:
        reader.cancel()
