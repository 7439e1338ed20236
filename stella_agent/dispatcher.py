"""Decide whether, when and where a received task runs.

The dispatcher owns every task the agent has seen: it rejects invalid and
expired ones before they run, answers a repeated task id or idempotency key
with the first task instead of running it again, runs tasks by priority and
arrival with a bounded number at a time, and never runs two tasks on the same
target (container name or Compose stack) at once. Results go to a callback;
the session keeps them until the orchestrator acknowledges them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from stella.agent.v1 import gateway_pb2, result_pb2, task_pb2

from stella_agent.errors import InvalidTaskError, TaskError
from stella_agent.executors.base import TaskContext
from stella_agent.logstream import ChunkSink
from stella_agent.runner import TaskRunner, check_expiry, now_timestamp
from stella_agent.tasks import EXECUTOR_NAMES, type_name, validate_task

logger = logging.getLogger(__name__)


def target_key(task: task_pb2.AgentTask) -> str:
    """Return the lock key of the thing a task changes or reads."""
    executor = EXECUTOR_NAMES.get(task.executor, "docker")
    payload_name = task.WhichOneof("payload")
    payload = getattr(task, payload_name) if payload_name else None
    if payload is None:
        return f"task:{task.id}"
    if executor == "compose":
        stack = getattr(payload, "stack_name", "") or (
            payload.config.stack_name if payload_name == "deploy" else ""
        )
        return f"compose:{stack}"
    name = getattr(payload, "container_name", "") or (
        payload.config.container_name if payload_name == "deploy" else ""
    )
    if name:
        return f"docker:{name}"
    # Tasks that touch no container (stickers, host uploads) lock their task id.
    return f"task:{task.id}"


@dataclass
class TaskEntry:
    """A task the dispatcher knows about."""

    task: task_pb2.AgentTask
    context: TaskContext | None = None
    result: result_pb2.TaskResult | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    joined_task_ids: list[str] = field(default_factory=list)


class Dispatcher:
    """Receives tasks and runs them under the agent's scheduling rules."""

    def __init__(
        self,
        runner: TaskRunner,
        *,
        on_event: Callable[[gateway_pb2.ConnectRequest], None],
        chunk_sink_for: Callable[[str], ChunkSink],
        on_result: Callable[[result_pb2.TaskResult], None],
    ) -> None:
        self.runner = runner
        self.config = runner.config
        self._on_event = on_event
        self._chunk_sink_for = chunk_sink_for
        self._on_result = on_result
        self.entries: dict[str, TaskEntry] = {}
        self._by_key: dict[str, str] = {}
        self._slots = asyncio.Semaphore(self.config.tasks.max_concurrent)
        self._target_locks: dict[str, asyncio.Lock] = {}
        self._queue: asyncio.PriorityQueue = asyncio.PriorityQueue()
        self._arrival = itertools.count()
        self._workers: list[asyncio.Task] = []
        self._accepting = True

    def start(self) -> None:
        for _ in range(self.config.tasks.max_concurrent):
            self._workers.append(asyncio.create_task(self._worker()))

    async def stop(self) -> None:
        self._accepting = False
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    def running_task_ids(self) -> list[str]:
        return [
            task_id for task_id, entry in self.entries.items() if entry.result is None
        ]

    def receive(self, task: task_pb2.AgentTask) -> None:
        """Handle a task from the orchestrator: reject, join or queue it."""
        existing = self.entries.get(task.id)
        if existing is not None:
            # The same task id again (a resend after reconnect): never run twice.
            self._emit_accepted(task.id, duplicate=True, original=task.id)
            if existing.result is not None:
                self._on_result(existing.result)
            return

        try:
            validate_task(task)
            check_expiry(task)
            self._check_target(task)
        except TaskError as exc:
            self._reject(task, exc)
            return

        key = task.idempotency_key or task.id
        original_id = self._by_key.get(key)
        if original_id is not None:
            self._join(task, original_id)
            return

        if not self._accepting:
            self._reject(
                task,
                TaskError(
                    "the agent is shutting down; send the task again later",
                    error_type="shutting_down",
                    retriable=True,
                ),
            )
            return

        entry = TaskEntry(task)
        self.entries[task.id] = entry
        self._by_key[key] = task.id
        self._emit_accepted(task.id)
        logger.info("task %s (%s) accepted", task.id, type_name(task.type))
        self._queue.put_nowait((-task.priority, next(self._arrival), task.id))

    def cancel(self, task_id: str, reason: str) -> bool:
        entry = self.entries.get(task_id)
        if entry is None or entry.result is not None:
            return False
        if entry.context is None:
            # Not started yet: it will see the cancel as soon as it starts.
            entry.context = self._new_context(entry.task)
        entry.context.cancel(reason or "cancelled by the orchestrator")
        logger.info("task %s: cancel requested (%s)", task_id, reason)
        return True

    def _check_target(self, task: task_pb2.AgentTask) -> None:
        targets = self.config.tasks.targets
        if targets and task.target_id not in targets:
            raise InvalidTaskError(
                f"target {task.target_id!r} is not served by agent {self.config.agent_id}; "
                f"it serves: {', '.join(targets)}",
                error_type="unknown_target",
            )
        if task.agent_id and task.agent_id != self.config.agent_id:
            raise InvalidTaskError(
                f"task is addressed to agent {task.agent_id!r}, not to {self.config.agent_id!r}",
                error_type="wrong_agent",
            )

    def _reject(self, task: task_pb2.AgentTask, exc: TaskError) -> None:
        task_id = task.id or "(none)"
        logger.warning("task %s rejected: %s", task_id, exc.message)
        self._on_event(
            gateway_pb2.ConnectRequest(
                task_rejected=gateway_pb2.TaskRejected(
                    task_id=task_id,
                    error_type=exc.error_type,
                    error=exc.message,
                    retriable=exc.retriable,
                )
            )
        )
        if not task.id:
            return
        result = result_pb2.TaskResult(
            task_id=task.id,
            success=False,
            error=exc.message,
            error_type=exc.error_type,
            retriable=exc.retriable,
            started_at=now_timestamp(),
            completed_at=now_timestamp(),
        )
        entry = TaskEntry(task, result=result)
        entry.done.set()
        self.entries[task.id] = entry
        self._on_result(result)

    def _join(self, task: task_pb2.AgentTask, original_id: str) -> None:
        original = self.entries[original_id]
        entry = TaskEntry(task)
        self.entries[task.id] = entry
        self._emit_accepted(task.id, duplicate=True, original=original_id)
        logger.info(
            "task %s has the idempotency key of task %s; joined, not run",
            task.id,
            original_id,
        )

        async def deliver() -> None:
            await original.done.wait()
            assert original.result is not None
            result = result_pb2.TaskResult()
            result.CopyFrom(original.result)
            result.task_id = task.id
            result.outputs["original_task_id"] = original_id
            entry.result = result
            entry.done.set()
            self._on_result(result)

        asyncio.get_running_loop().create_task(deliver())

    def _emit_accepted(
        self, task_id: str, duplicate: bool = False, original: str = ""
    ) -> None:
        self._on_event(
            gateway_pb2.ConnectRequest(
                task_accepted=gateway_pb2.TaskAccepted(
                    task_id=task_id,
                    duplicate=duplicate,
                    original_task_id=original if duplicate else "",
                )
            )
        )

    def _new_context(self, task: task_pb2.AgentTask) -> TaskContext:
        return self.runner.new_context(task, self._chunk_sink_for(task.id))

    async def _worker(self) -> None:
        while True:
            _, _, task_id = await self._queue.get()
            entry = self.entries[task_id]
            lock = self._target_locks.setdefault(target_key(entry.task), asyncio.Lock())
            async with lock:
                if entry.context is None:
                    entry.context = self._new_context(entry.task)
                result = await self.runner.run(entry.context)
            entry.result = result
            entry.done.set()
            logger.info(
                "task %s finished: %s",
                task_id,
                "success" if result.success else f"{result.error_type}: {result.error}",
            )
            self._on_result(result)
