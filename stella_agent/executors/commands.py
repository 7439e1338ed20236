"""The execute-command task: an argument vector run in a container or on the host.

In a container the command runs with ``docker exec`` through the Engine API
(``exec_create``, then ``exec_start`` streaming stdout and stderr apart); its
exit code comes from ``exec_inspect``. On the host it runs only when the
agent's ``tasks.allow_host_commands`` is true and argv[0] is one of the
absolute paths in ``tasks.host_command_allowlist``; it is started without a
shell, in a new session, with a minimal environment.

Output streams to the task log as it arrives. The result carries the exit code
and the last bytes of each stream. A command that exits non-zero is a finished
task with ``success=False`` and ``error_type: command_failed``; one that runs
past its timeout is killed and reported with ``error_type: timeout``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stella_agent.errors import (
    DockerError,
    InvalidTaskError,
    NotFoundError,
    TaskCancelledError,
)
from stella_agent.executors.base import Outcome, TaskContext
from stella_agent.executors.containers import find_container, is_running
from stella_agent.executors.docker_errors import DOCKER_EXCEPTIONS, docker_error
from stella_agent.logstream import STDERR, STDOUT
from stella_agent.tasks import validate_container_name

OUTPUT_TAIL_BYTES = 4096
"""Bytes of stdout and of stderr kept in the result outputs."""
POLL_SECONDS = 0.1
READER_JOIN_SECONDS = 5.0
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENVIRONMENT_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
USER_PATTERN = re.compile(
    r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?$"
)


@dataclass
class CommandResult:
    """The end state of a command, with the tails of its output."""

    exit_code: int | None
    """None when it was killed before it reported one."""
    timed_out: bool
    stdout: bytes
    stderr: bytes
    duration_ms: int


@dataclass
class _OutputTails:
    """The last OUTPUT_TAIL_BYTES of stdout and stderr, filled by reader threads."""

    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, stream: int, data: bytes) -> None:
        with self.lock:
            tail = self.stdout if stream == STDOUT else self.stderr
            tail.extend(data)
            del tail[:-OUTPUT_TAIL_BYTES]


def validate_argv(argv: Sequence[str], field_name: str) -> list[str]:
    """Return the argument vector after checking it is usable."""
    arguments = list(argv)
    if not arguments or not arguments[0]:
        raise InvalidTaskError(
            f"{field_name} is required: the program and its arguments"
        )
    if any("\0" in argument for argument in arguments):
        raise InvalidTaskError(f"{field_name} has an argument with a NUL character")
    return arguments


def validate_environment(
    environment: Mapping[str, str], field_name: str
) -> dict[str, str]:
    """Return the environment after checking names and values."""
    for name, value in environment.items():
        if not ENVIRONMENT_NAME_PATTERN.match(name):
            raise InvalidTaskError(
                f"{field_name} name {name[:100]!r} is invalid: use letters, digits, "
                "'_', '.' or '-', not starting with a digit"
            )
        if "\0" in value:
            raise InvalidTaskError(f"{field_name} value of {name} contains a NUL")
    return dict(environment)


# Variables that make the dynamic loader, a shell or an interpreter load code
# of the caller's choosing, which would turn one allow-listed host command into
# any command. PATH is fixed by the agent.
HOST_ENVIRONMENT_DENIED_PREFIXES = ("LD_", "DYLD_", "GCONV_", "PYTHON", "PERL", "RUBY")
HOST_ENVIRONMENT_DENIED = frozenset(
    {
        "PATH",
        "IFS",
        "ENV",
        "BASH_ENV",
        "SHELLOPTS",
        "BASHOPTS",
        "PS4",
        "NODE_OPTIONS",
        "NODE_PATH",
        "LOCPATH",
        "NLSPATH",
        "HOSTALIASES",
        "MALLOC_CHECK_",
        "GLIBC_TUNABLES",
        "TMPDIR",
    }
)


def check_host_environment(environment: Mapping[str, str]) -> None:
    """Reject variables that would let a host command load other code."""
    for name in environment:
        upper = name.upper()
        if upper in HOST_ENVIRONMENT_DENIED or upper.startswith(
            HOST_ENVIRONMENT_DENIED_PREFIXES
        ):
            raise InvalidTaskError(
                f"execute_command.environment variable {name!r} is not allowed for "
                "host commands: it can make the command load other code; remove it"
            )


def execute_command(context: TaskContext, client: Any) -> Outcome:
    """Run an execute-command task of the Docker executor."""
    payload = context.task.execute_command
    context.set_phase("validate")
    argv = validate_argv(payload.argv, "execute_command.argv")
    environment = validate_environment(
        payload.environment, "execute_command.environment"
    )
    timeout = command_timeout(context)
    if payload.on_host:
        return run_host_command(context, argv, environment, timeout)

    name = validate_container_name(
        payload.container_name, "execute_command.container_name"
    )
    container = running_container(client, name)
    return run_container_command(context, client, container, argv, environment, timeout)


def command_timeout(context: TaskContext) -> float:
    """Return the command's timeout in seconds, capped by the task deadline."""
    payload = context.task.execute_command
    requested = context.config.tasks.default_timeout_seconds
    if payload.HasField("timeout"):
        seconds = payload.timeout.ToTimedelta().total_seconds()
        if seconds < 0:
            raise InvalidTaskError("execute_command.timeout is negative")
        requested = seconds or requested
    return context.remaining(requested)


def running_container(client: Any, name: str) -> Any:
    """Return the running container `name`; NotFoundError or DockerError if not."""
    container = find_container(client, name)
    if container is None:
        raise NotFoundError(f"container {name} not found")
    if not is_running(container):
        status = container.attrs.get("State", {}).get("Status")
        raise DockerError(
            f"container {name} is not running (status {status}); start it or "
            "deploy it first"
        )
    return container


def run_container_command(
    context: TaskContext,
    client: Any,
    container: Any,
    argv: list[str],
    environment: dict[str, str],
    timeout: float,
) -> Outcome:
    """Run `argv` in `container` and turn how it ended into an Outcome."""
    payload = context.task.execute_command
    if payload.user and not USER_PATTERN.match(payload.user):
        raise InvalidTaskError(
            f"execute_command.user {payload.user[:100]!r} is invalid: use "
            "user[:group], names or numeric ids"
        )
    if payload.working_dir and not payload.working_dir.startswith("/"):
        raise InvalidTaskError("execute_command.working_dir must be an absolute path")
    context.set_phase("exec")
    context.log.info("running %s in container %s", _shown(argv), container.name)
    result = run_exec(
        context,
        client,
        container.id,
        argv,
        timeout=timeout,
        environment=environment,
        working_dir=payload.working_dir or None,
        user=payload.user,
    )
    outputs = {"container_name": container.name, "container_id": container.id}
    return command_outcome(argv, result, timeout, outputs)


def run_exec(
    context: TaskContext,
    client: Any,
    container_id: str,
    argv: list[str],
    *,
    timeout: float,
    environment: Mapping[str, str] | None = None,
    working_dir: str | None = None,
    user: str = "",
    stream: bool = True,
) -> CommandResult:
    """Run `argv` with docker exec, streaming its output; kill it at `timeout`."""
    started = time.monotonic()
    try:
        exec_id = client.api.exec_create(
            container_id,
            argv,
            stdout=True,
            stderr=True,
            environment=dict(environment or {}) or None,
            workdir=working_dir,
            user=user,
        )["Id"]
        frames = client.api.exec_start(exec_id, stream=True, demux=True)
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(
            exc, f"run {_shown(argv)} in container {container_id[:12]}"
        ) from None
    tails = _OutputTails()
    reader = threading.Thread(
        target=_copy_frames, args=(context, frames, tails, stream), daemon=True
    )
    reader.start()

    deadline = started + timeout
    timed_out = False
    while True:
        details = _inspect_exec(client, exec_id)
        if not details.get("Running") and details.get("ExitCode") is not None:
            break
        if context.cancel_event.is_set() or time.monotonic() >= deadline:
            _kill_exec(context, details, container_id)
            if context.cancel_event.is_set():
                raise TaskCancelledError(
                    f"task cancelled while {_shown(argv)} ran: "
                    f"{context.cancel_reason or 'no reason given'}",
                    phase=context.phase,
                )
            timed_out = True
            break
        context.cancel_event.wait(POLL_SECONDS)

    reader.join(READER_JOIN_SECONDS)
    exit_code = None if timed_out else details.get("ExitCode")
    return CommandResult(
        exit_code=exit_code,
        timed_out=timed_out,
        stdout=bytes(tails.stdout),
        stderr=bytes(tails.stderr),
        duration_ms=int((time.monotonic() - started) * 1000),
    )


def run_host_command(
    context: TaskContext,
    argv: list[str],
    environment: dict[str, str],
    timeout: float,
) -> Outcome:
    """Run an allowed host command without a shell and return its Outcome."""
    check_host_environment(environment)
    payload = context.task.execute_command
    tasks = context.config.tasks
    if not tasks.allow_host_commands:
        raise InvalidTaskError(
            "host commands are disabled on this agent (tasks.allow_host_commands "
            "is false); run the command in a container instead",
            error_type="unsupported",
        )
    if argv[0] not in tasks.host_command_allowlist:
        raise InvalidTaskError(
            f"host command {argv[0][:200]!r} is not in tasks.host_command_allowlist; "
            "give the absolute path of an allowed program"
        )
    if payload.user:
        raise InvalidTaskError(
            "execute_command.user is not supported for host commands; the command "
            "runs as the agent's user"
        )
    working_dir = payload.working_dir or "/"
    if not working_dir.startswith("/"):
        raise InvalidTaskError("execute_command.working_dir must be an absolute path")

    context.set_phase("exec")
    context.log.info("running %s on the host", _shown(argv))
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=working_dir,
            env={"PATH": HOST_PATH, "LANG": "C.UTF-8", **environment},
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        raise NotFoundError(f"cannot start host command {argv[0]}: {exc}") from None

    tails = _OutputTails()
    readers = [
        threading.Thread(
            target=_copy_pipe, args=(context, pipe, stream, tails), daemon=True
        )
        for pipe, stream in ((process.stdout, STDOUT), (process.stderr, STDERR))
    ]
    for reader in readers:
        reader.start()
    timed_out = _wait_host_process(context, process, started + timeout, argv)
    for reader in readers:
        reader.join(READER_JOIN_SECONDS)
    result = CommandResult(
        exit_code=None if timed_out else process.returncode,
        timed_out=timed_out,
        stdout=bytes(tails.stdout),
        stderr=bytes(tails.stderr),
        duration_ms=int((time.monotonic() - started) * 1000),
    )
    return command_outcome(argv, result, timeout, {"host": "true"})


def command_outcome(
    argv: list[str], result: CommandResult, timeout: float, outputs: dict[str, str]
) -> Outcome:
    """Return the Outcome of a finished command: success only on exit code 0."""
    outputs = {
        **outputs,
        "exit_code": "" if result.exit_code is None else str(result.exit_code),
        "stdout": result.stdout.decode("utf-8", "replace"),
        "stderr": result.stderr.decode("utf-8", "replace"),
        "duration_ms": str(result.duration_ms),
        "timed_out": str(result.timed_out).lower(),
    }
    if result.timed_out:
        return Outcome(
            outputs=outputs,
            success=False,
            error=f"command {_shown(argv)} ran longer than {timeout:g}s and was killed",
            error_type="timeout",
        )
    if result.exit_code != 0:
        return Outcome(
            outputs=outputs,
            success=False,
            error=f"command {_shown(argv)} exited with code {result.exit_code}",
            error_type="command_failed",
        )
    return Outcome(outputs=outputs)


def _wait_host_process(
    context: TaskContext,
    process: subprocess.Popen[bytes],
    deadline: float,
    argv: list[str],
) -> bool:
    """Wait for the process; kill its process group on timeout or cancel.
    Returns True when it timed out."""
    while True:
        try:
            process.wait(POLL_SECONDS)
            return False
        except subprocess.TimeoutExpired:
            pass
        if context.cancel_event.is_set() or time.monotonic() >= deadline:
            context.log.info("killing %s and its process group", _shown(argv))
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
            if context.cancel_event.is_set():
                raise TaskCancelledError(
                    f"task cancelled while {_shown(argv)} ran: "
                    f"{context.cancel_reason or 'no reason given'}",
                    phase=context.phase,
                )
            return True


def _inspect_exec(client: Any, exec_id: str) -> Mapping[str, Any]:
    try:
        return client.api.exec_inspect(exec_id)
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, "inspect the running command") from None


def _kill_exec(
    context: TaskContext, details: Mapping[str, Any], container_id: str
) -> None:
    """Kill an exec'd process and its descendants by host pid.

    Docker Engine has no API to stop an exec, so the process is killed through
    its host pid, after checking that it belongs to the container's cgroup.
    """
    pid = int(details.get("Pid") or 0)
    if pid <= 0:
        return
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as cgroup:
            belongs = container_id in cgroup.read()
    except OSError:
        belongs = False
    if not belongs:
        # NOTE: this happens when the agent runs in its own PID namespace (in
        # a container itself); the command then keeps running after the task
        # reports the timeout.
        context.log.info(
            "cannot kill the command (host pid %d is not visible to the agent); "
            "it may still be running in the container",
            pid,
        )
        return
    context.log.info("killing the command (host pid %d) and its children", pid)
    for target in [*_descendants(pid), pid]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _descendants(pid: int) -> list[int]:
    """Return the host pids of every descendant of `pid`, deepest first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as stat_file:
                # The command name may contain spaces and ')', so split after
                # its last ')': the field after the state is the parent pid.
                fields = stat_file.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    pending = list(children.get(pid, []))
    while pending:
        child = pending.pop()
        found.append(child)
        pending.extend(children.get(child, []))
    return list(reversed(found))


def _copy_frames(
    context: TaskContext, frames: Iterable[Any], tails: _OutputTails, stream: bool
) -> None:
    try:
        for stdout, stderr in frames:
            for kind, data in ((STDOUT, stdout), (STDERR, stderr)):
                if data:
                    if stream:
                        context.log.write(kind, data)
                    tails.add(kind, data)
    except DOCKER_EXCEPTIONS as exc:
        context.log.info("reading the command's output ended: %s", exc)


def _copy_pipe(
    context: TaskContext, pipe: Any, stream: int, tails: _OutputTails
) -> None:
    with pipe:
        for data in iter(lambda: pipe.read1(65536), b""):
            context.log.write(stream, data)
            tails.add(stream, data)


def _shown(argv: list[str]) -> str:
    """Return the program name and argument count, for logs: arguments may
    hold secrets."""
    rest = len(argv) - 1
    return f"{argv[0][:200]!r}" + (f" with {rest} arguments" if rest else "")
