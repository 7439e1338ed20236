"""What every executor gets and returns.

An executor is an object with an async ``run(context)`` method that either
returns an ``Outcome`` or raises a ``TaskError``. The Docker SDK is blocking, so
the Docker executor runs its steps in a worker thread; cancellation and
timeouts reach it through ``TaskContext.checkpoint()``, which it calls between
steps (the safe points where stopping leaves the target consistent).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from stella.agent.v1 import task_pb2
from stella_agent.config import AgentConfig
from stella_agent.errors import TaskCancelledError, TaskTimeoutError
from stella_agent.logstream import TaskLog


@dataclass
class Outcome:
    """What a task produced when it did not raise."""

    outputs: dict[str, str] = field(default_factory=dict)
    success: bool = True
    """False for tasks that ran fine but report a negative finding (an
    unhealthy health-check, for example)."""
    error: str = ""
    error_type: str = ""


@dataclass
class TaskMetricsRecorder:
    """Phase durations in milliseconds, filled in as the task runs."""

    pull_duration_ms: int = 0
    deploy_duration_ms: int = 0
    health_check_duration_ms: int = 0


class TaskContext:
    """Everything an executor may use while running one task."""

    def __init__(
        self,
        task: task_pb2.AgentTask,
        log: TaskLog,
        config: AgentConfig,
        *,
        docker_client: Any = None,
        credentials: task_pb2.Credentials | None = None,
        deadline: float | None = None,
        on_phase: Callable[[str], None] | None = None,
        on_note: Callable[[dict[str, str]], None] | None = None,
    ) -> None:
        self.task = task
        self.log = log
        self.config = config
        self.docker = docker_client
        self.credentials = credentials or task_pb2.Credentials()
        self.deadline = deadline
        """time.monotonic() value after which the task has timed out."""
        self.metrics = TaskMetricsRecorder()
        self.phase = ""
        self.cancel_event = threading.Event()
        self.cancel_reason = ""
        self._on_phase = on_phase
        self._on_note = on_note
        self.notes: dict[str, str] = {}
        self.masker: Any = None
        """SecretMasker of the task's secrets, applied to its log and result."""

    def set_phase(self, phase: str) -> None:
        """Record that the task entered `phase` (pull, stop, create, ...)."""
        self.phase = phase
        if self._on_phase is not None:
            self._on_phase(phase)

    def note(self, **values: str) -> None:
        """Record facts crash recovery needs (which container was renamed to
        what, which one was created) durably, before the step they describe
        takes effect."""
        self.notes.update(values)
        if self._on_note is not None:
            self._on_note(dict(values))

    def cancel(self, reason: str) -> None:
        """Ask the task to stop at its next checkpoint."""
        self.cancel_reason = reason
        self.cancel_event.set()

    def timed_out(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def remaining(self, default: float) -> float:
        """Seconds left before the deadline, capped at `default`."""
        if self.deadline is None:
            return default
        return max(0.0, min(default, self.deadline - time.monotonic()))

    def checkpoint(self) -> None:
        """Raise if the task was cancelled or ran out of time.

        Call it only where stopping is safe: before changing anything, or
        where the caller's error handling restores the previous release.
        """
        if self.cancel_event.is_set():
            raise TaskCancelledError(
                f"task cancelled during {self.phase or 'start'}: {self.cancel_reason or 'no reason given'}",
                phase=self.phase,
            )
        if self.timed_out():
            raise TaskTimeoutError(
                f"task timed out during {self.phase or 'start'}",
                phase=self.phase,
            )

    def registry_auth(self, image: str) -> dict[str, str] | None:
        """Return the Docker auth config for the registry of `image`, if any."""
        registry = registry_of(image)
        for auth in self.credentials.registries:
            if auth.registry == registry:
                if auth.identity_token:
                    return {"identitytoken": auth.identity_token}
                return {"username": auth.username, "password": auth.password}
        return None


def registry_of(image: str) -> str:
    """Return the registry host of an image reference ("docker.io" when none)."""
    first, sep, _ = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


class Executor(Protocol):
    """Runs the tasks of one executor kind."""

    async def run(self, context: TaskContext) -> Outcome: ...
