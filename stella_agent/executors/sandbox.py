"""Throwaway, locked-down containers: where hooks, probes and the sticker
helper run.

A sandbox container runs one argument vector from an image pinned as
repository@sha256:digest. It has a read-only root filesystem, a small tmpfs at
/tmp, every capability dropped (unless the spec adds one back), no new
privileges, the memory, CPU and process limits of ``config.hooks``, and no
network unless the spec names a network mode. Its stdout and stderr are
streamed to the task log while it runs. It is killed when its timeout passes
or the task is cancelled, and removed in every case.

Every call blocks, so callers run in the executor's worker thread.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import docker.errors
import docker.types

from stella_agent.errors import InvalidTaskError, TaskCancelledError, TaskTimeoutError
from stella_agent.executors.base import TaskContext
from stella_agent.executors.container_spec import (
    LABEL_AGENT_ID,
    LABEL_MANAGED,
    LABEL_ROLE,
    LABEL_TASK_ID,
)
from stella_agent.executors.docker_errors import DOCKER_EXCEPTIONS, docker_error
from stella_agent.executors.pull import pull_image
from stella_agent.logstream import STDERR, STDOUT

PINNED_IMAGE_PATTERN = re.compile(
    r"^(?P<repository>[^@\s]+)@(?P<digest>sha256:[0-9a-f]{64})$"
)
TMPFS_OPTIONS = "rw,nosuid,nodev,noexec,size=64m"
POLL_SECONDS = 0.2
OUTPUT_TAIL_BYTES = 2048
"""Bytes of combined output kept for error messages."""
READER_JOIN_SECONDS = 5.0
"""How long to wait for the output reader after the container has stopped."""
SANDBOX_ROLES = ("hook", "probe", "sticker")
"""Values of the stella.role label that mark sandbox containers."""


@dataclass(frozen=True)
class SandboxSpec:
    """One run of a sandbox container."""

    image: str
    """Pinned image reference, repository@sha256:digest."""
    command: Sequence[str]
    role: str
    """Value of the stella.role label: hook, probe or sticker."""
    description: str
    """Name of what runs, for the task log and messages, e.g. "pre_deploy hook"."""
    timeout_seconds: float
    environment: Mapping[str, str] = field(default_factory=dict)
    network_mode: str = "none"
    mounts: Sequence[docker.types.Mount] = ()
    cap_add: Sequence[str] = ()
    working_dir: str | None = None
    stream_output: bool = True
    """Write the container's output to the task log as it arrives."""


@dataclass(frozen=True)
class SandboxResult:
    """The end state of a sandbox container."""

    exit_code: int
    timed_out: bool
    oom_killed: bool
    output: bytes
    """The last OUTPUT_TAIL_BYTES of stdout and stderr, interleaved."""

    def output_text(self) -> str:
        """Return the output tail as one line of text, for messages."""
        text = self.output.decode("utf-8", "replace")
        return " ".join(text.split())[-500:] or "(no output)"


def parse_pinned_image(reference: str, field_name: str) -> tuple[str, str]:
    """Return (repository, digest) of repository@sha256:digest, or raise."""
    match = PINNED_IMAGE_PATTERN.match(reference)
    if match is None:
        raise InvalidTaskError(
            f"{field_name} {reference[:200]!r} is not pinned by digest: expected "
            "repository@sha256:<64 hex digits>"
        )
    return match["repository"], match["digest"]


def tool_image(context: TaskContext, requested: str = "") -> str:
    """Return the image for a sandbox run: `requested`, or the configured
    hooks.image; raise InvalidTaskError when neither is set or it is unpinned."""
    if requested:
        parse_pinned_image(requested, "image")
        return requested
    configured = context.config.hooks.image
    if not configured:
        raise InvalidTaskError(
            "no tool image is configured: set hooks.image in the agent config to "
            "a busybox-like image pinned as repository@sha256:digest",
            error_type="unsupported",
        )
    parse_pinned_image(configured, "hooks.image")
    return configured


def ensure_image(context: TaskContext, client: Any, reference: str) -> None:
    """Pull a pinned image unless the engine already has it under that digest.

    The pull duration metric belongs to the task's own image, so it is kept.
    """
    repository, digest = parse_pinned_image(reference, "image")
    try:
        client.api.inspect_image(reference)
        return
    except docker.errors.ImageNotFound:
        pass
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"inspect image {reference}") from None
    kept_ms = context.metrics.pull_duration_ms
    try:
        pull_image(context, client, repository, digest)
    finally:
        context.metrics.pull_duration_ms = kept_ms


def remove_task_sandboxes(context: TaskContext, client: Any) -> None:
    """Remove the sandbox containers a task left behind when the agent died
    while they ran; crash recovery calls this."""
    selector = [f"{LABEL_TASK_ID}={context.task.id}", f"{LABEL_MANAGED}=true"]
    try:
        containers = client.containers.list(all=True, filters={"label": selector})
    except DOCKER_EXCEPTIONS as exc:
        context.log.info("could not list the task's sandbox containers: %s", exc)
        return
    for container in containers:
        if (container.labels or {}).get(LABEL_ROLE) not in SANDBOX_ROLES:
            continue
        context.log.info("removing the leftover sandbox container %s", container.name)
        try:
            container.remove(force=True, v=True)
        except DOCKER_EXCEPTIONS as exc:
            context.log.info("could not remove %s: %s", container.name, exc)


def run_sandbox(
    context: TaskContext,
    client: Any,
    spec: SandboxSpec,
    *,
    before_start: Callable[[Any], None] | None = None,
) -> SandboxResult:
    """Run `spec` to its end and return how it ended.

    `before_start` is called with the created container before it starts, for
    example to copy files into it.

    Raises TaskCancelledError or TaskTimeoutError when the task is cancelled
    or reaches its deadline first; the container is killed and removed either
    way. A timeout of the spec itself is reported in the result.
    """
    ensure_image(context, client, spec.image)
    container = _create(context, client, spec)
    try:
        if before_start is not None:
            before_start(container)
        return _start_and_wait(context, client, container, spec)
    finally:
        try:
            container.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass
        except DOCKER_EXCEPTIONS as exc:
            context.log.info(
                "could not remove the %s container %s: %s; remove it by hand",
                spec.description,
                container.name,
                exc,
            )


def _create(context: TaskContext, client: Any, spec: SandboxSpec) -> Any:
    hooks = context.config.hooks
    name = f"stella-{spec.role}-{uuid.uuid4().hex[:12]}"
    labels = {
        LABEL_MANAGED: "true",
        LABEL_ROLE: spec.role,
        LABEL_TASK_ID: context.task.id,
        LABEL_AGENT_ID: context.config.agent_id,
    }
    arguments: dict[str, Any] = {
        "image": spec.image,
        "command": list(spec.command),
        "name": name,
        "labels": labels,
        "environment": dict(spec.environment),
        "network_mode": spec.network_mode,
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "tmpfs": {"/tmp": TMPFS_OPTIONS},
        "pids_limit": hooks.pids_limit,
        "detach": True,
    }
    if spec.cap_add:
        arguments["cap_add"] = list(spec.cap_add)
    if hooks.memory_limit_bytes > 0:
        arguments["mem_limit"] = hooks.memory_limit_bytes
        # Equal to mem_limit: no swap on top of the memory limit.
        arguments["memswap_limit"] = hooks.memory_limit_bytes
    if hooks.cpu_limit > 0:
        arguments["nano_cpus"] = round(hooks.cpu_limit * 1e9)
    if spec.mounts:
        arguments["mounts"] = list(spec.mounts)
    if spec.working_dir:
        arguments["working_dir"] = spec.working_dir
    try:
        return client.containers.create(**arguments)
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"create the {spec.description} container") from None


def _start_and_wait(
    context: TaskContext, client: Any, container: Any, spec: SandboxSpec
) -> SandboxResult:
    context.log.info(
        "running %s in container %s (image %s, network %s, timeout %gs)",
        spec.description,
        container.name,
        spec.image,
        spec.network_mode,
        spec.timeout_seconds,
    )
    # Attach before start, so that no output of a short run is missed.
    try:
        frames = client.api.attach(
            container.id, stdout=True, stderr=True, stream=True, demux=True
        )
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"attach to the {spec.description} container") from None
    reader = _OutputReader(context, frames, container.id, spec.stream_output)
    reader.start()
    try:
        container.start()
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"start the {spec.description} container") from None
    deadline = time.monotonic() + spec.timeout_seconds
    timed_out = False
    stop_error: Exception | None = None
    while True:
        state = _state(client, container.id, spec)
        if state.get("Status") in ("exited", "dead"):
            break
        if context.cancel_event.is_set() or context.timed_out():
            _kill(context, container, spec)
            stop_error = _stop_error(context, spec)
            break
        if time.monotonic() >= deadline:
            _kill(context, container, spec)
            timed_out = True
            break
        context.cancel_event.wait(POLL_SECONDS)

    reader.join(READER_JOIN_SECONDS)
    if stop_error is not None:
        raise stop_error
    state = _state(client, container.id, spec)
    return SandboxResult(
        exit_code=int(state.get("ExitCode") or 0),
        timed_out=timed_out,
        oom_killed=bool(state.get("OOMKilled")),
        output=reader.tail(),
    )


def _state(client: Any, container_id: str, spec: SandboxSpec) -> Mapping[str, Any]:
    try:
        return client.api.inspect_container(container_id).get("State") or {}
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"inspect the {spec.description} container") from None


def _kill(context: TaskContext, container: Any, spec: SandboxSpec) -> None:
    context.log.info("killing the %s container %s", spec.description, container.name)
    try:
        container.kill()
    except docker.errors.APIError as exc:
        # 409: the container stopped on its own meanwhile.
        if exc.status_code != 409:
            raise docker_error(exc, f"kill the {spec.description} container") from None
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"kill the {spec.description} container") from None


def _stop_error(context: TaskContext, spec: SandboxSpec) -> Exception:
    if context.cancel_event.is_set():
        return TaskCancelledError(
            f"task cancelled while the {spec.description} ran: "
            f"{context.cancel_reason or 'no reason given'}",
            phase=context.phase,
        )
    return TaskTimeoutError(
        f"task timed out while the {spec.description} ran", phase=context.phase
    )


class _OutputReader(threading.Thread):
    """Copies a container's stdout and stderr to the task log as they arrive.

    A thread, because the attach stream blocks until the container stops and
    the caller must keep watching the timeout meanwhile.
    """

    def __init__(
        self, context: TaskContext, frames: Any, container_id: str, stream: bool
    ) -> None:
        super().__init__(name=f"sandbox-output-{container_id[:12]}", daemon=True)
        self._context = context
        self._frames = frames
        self._stream = stream
        self._tail = bytearray()
        self._lock = threading.Lock()

    def run(self) -> None:
        try:
            for stdout, stderr in self._frames:
                self._record(STDOUT, stdout)
                self._record(STDERR, stderr)
        except DOCKER_EXCEPTIONS as exc:
            # The container may be removed while the stream is still open.
            self._context.log.info("reading the output of a sandbox ended: %s", exc)

    def _record(self, stream: int, data: bytes | None) -> None:
        if not data:
            return
        if self._stream:
            self._context.log.write(stream, data)
        with self._lock:
            self._tail.extend(data)
            del self._tail[:-OUTPUT_TAIL_BYTES]

    def tail(self) -> bytes:
        with self._lock:
            return bytes(self._tail)
