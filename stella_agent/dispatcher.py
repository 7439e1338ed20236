"""Decide whether, when and where a received task runs.

The dispatcher owns every task the agent receives:

- it records the task in the journal before accepting it;
- it rejects invalid and expired tasks, and tasks for other agents or targets,
  before anything runs, and still produces a result for them;
- it never runs a task id twice, and responds to a task whose idempotency key was
  seen within the window with the first task's result (joining it while it
  runs);
- it runs tasks by priority, then arrival, at most ``tasks.max_concurrent`` at
  a time, and never two on the same target (container name or Compose stack)
  at once: the second waits, or is rejected as busy when ``tasks.busy_policy``
  is ``reject``;
- on start it finishes the tasks the journal shows as unfinished, through the
  executors' crash recovery;
- on drain it stops accepting and lets running tasks finish within a grace
  period.

Results go to ``on_result`` after they are in the journal's outbox.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from stella.agent.v1 import gateway_pb2, result_pb2, task_pb2
from stella_agent.audit import (
    ACTION_COMMAND_EXECUTED,
    ACTION_CREDENTIALS_INVALID,
    ACTION_DEPLOY_PHASE,
    ACTION_DIGEST_MISMATCH,
    ACTION_FILES_WRITTEN,
    ACTION_ROLLBACK,
    ACTION_STICKER_WRITTEN,
    ACTION_TASK_ACCEPTED,
    ACTION_TASK_FINISHED,
    ACTION_TASK_REJECTED,
)
from stella_agent.errors import InvalidTaskError, TaskError
from stella_agent.executors.base import TaskContext
from stella_agent.executors.compose_stack import project_name_for
from stella_agent.journal import FINISHED, RECEIVED, REJECTED, Journal, JournalTask
from stella_agent.logstream import ChunkSink
from stella_agent.masking import SecretMasker
from stella_agent.runner import TaskRunner, check_expiry, now_timestamp
from stella_agent.security import (
    AgentSecurity,
    PreparedTask,
    journal_copy,
    lost_secrets,
)
from stella_agent.tasks import EXECUTOR_NAMES, TASK_ID_PATTERN, type_name, validate_task

logger = logging.getLogger(__name__)

TYPE_ACTIONS = {
    task_pb2.TASK_TYPE_EXECUTE_COMMAND: ACTION_COMMAND_EXECUTED,
    task_pb2.TASK_TYPE_UPLOAD_FILES: ACTION_FILES_WRITTEN,
    task_pb2.TASK_TYPE_WRITE_STICKER: ACTION_STICKER_WRITTEN,
}
"""Audit actions for task types whose success is itself an auditable act."""


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
        if stack:
            # Stacks whose names map to one Compose project are one target.
            try:
                return f"compose:{project_name_for(stack)}"
            except TaskError:
                return f"compose:{stack}"
    name = getattr(payload, "container_name", "") or (
        payload.config.container_name if payload_name == "deploy" else ""
    )
    if name:
        return f"docker:{name}"
    # Tasks that touch no container (stickers, host uploads) lock nothing shared.
    return f"task:{task.id}"


@dataclass
class TaskEntry:
    """A task kept in memory while it is pending or running."""

    task: task_pb2.AgentTask
    key: str
    context: TaskContext | None = None
    result: result_pb2.TaskResult | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Dispatcher:
    """Receives tasks and runs them under the agent's scheduling rules."""

    def __init__(
        self,
        runner: TaskRunner,
        journal: Journal,
        *,
        on_event: Callable[[gateway_pb2.ConnectRequest], None],
        chunk_sink_for: Callable[[str], ChunkSink],
        on_result: Callable[[result_pb2.TaskResult], None],
        security: AgentSecurity | None = None,
    ) -> None:
        self.runner = runner
        self.security = security
        self._prepared: dict[str, PreparedTask] = {}
        self.journal = journal
        self.config = runner.config
        self._on_event = on_event
        self._chunk_sink_for = chunk_sink_for
        self._on_result = on_result
        self.entries: dict[str, TaskEntry] = {}
        self._pending: list[tuple[int, int, str]] = []
        self._busy_targets: set[str] = set()
        self._running: dict[str, asyncio.Task] = {}
        self._arrival = itertools.count()
        self._accepting = True
        self._to_recover: list[tuple[TaskEntry, JournalTask]] | None = None
        """Running tasks found by prepare_recovery, until recover() takes them."""

    # Queries ------------------------------------------------------------------

    def running_task_ids(self) -> list[str]:
        return [
            task_id for task_id, entry in self.entries.items() if entry.result is None
        ]

    @property
    def accepting(self) -> bool:
        return self._accepting

    # Receiving ----------------------------------------------------------------

    def receive(self, task: task_pb2.AgentTask) -> None:
        """Handle a task from the orchestrator: reject, join or queue it, or return its stored result."""
        if self._answer_known_task_id(task):
            return

        key = target_key(task)
        try:
            validate_task(task)
            check_expiry(task)
            self._check_addressing(task)
            if self.security is not None:
                self._prepared[task.id] = self.security.prepare(task)
        except TaskError as exc:
            self._reject(task, key, exc)
            return

        if self._answer_known_idempotency_key(task, key):
            return

        if not self._accepting:
            self._reject(
                task,
                key,
                TaskError(
                    "the agent is shutting down; send the task again later",
                    error_type="shutting_down",
                    retriable=True,
                ),
            )
            return
        if self.config.tasks.busy_policy == "reject" and self._target_in_use(key):
            self._reject(
                task,
                key,
                TaskError(
                    f"target {key.split(':', 1)[1]!r} is busy with another task; "
                    "send the task again when that one has finished",
                    error_type="busy",
                    retriable=True,
                ),
            )
            return

        # Durable before accepted: a crash after this line still yields a result.
        self.journal.record_received(journal_copy(task), key)
        entry = TaskEntry(task, key)
        self.entries[task.id] = entry
        self._audit(ACTION_TASK_ACCEPTED, task, outcome="accepted")
        self._emit_accepted(task.id)
        logger.info("task %s (%s) accepted for %s", task.id, type_name(task.type), key)
        heapq.heappush(self._pending, (-task.priority, next(self._arrival), task.id))
        self._schedule()

    def _answer_known_task_id(self, task: task_pb2.AgentTask) -> bool:
        """Respond to a task id seen before without running it again."""
        entry = self.entries.get(task.id)
        if entry is not None:
            self._emit_accepted(task.id, duplicate=True, original=task.id)
            if entry.result is not None:
                self._on_result(entry.result)
            return True
        if not task.id:
            return False
        stored = self.journal.get(task.id)
        if stored is None:
            return False
        self._emit_accepted(task.id, duplicate=True, original=task.id)
        if stored.result is not None:
            self._on_result(stored.result)
        return True

    def _answer_known_idempotency_key(self, task: task_pb2.AgentTask, key: str) -> bool:
        """Respond to a task whose idempotency key an earlier task used."""
        if not task.idempotency_key:
            return False
        window = self.config.tasks.idempotency_window_seconds
        original = self.journal.find_by_key(task.idempotency_key, window)
        if original is None:
            return False
        original_id = original.task.id
        self.journal.record_received(
            journal_copy(task), key, original_task_id=original_id
        )
        self._emit_accepted(task.id, duplicate=True, original=original_id)
        logger.info(
            "task %s has the idempotency key of task %s; returning that task's result instead of running it",
            task.id,
            original_id,
        )
        running = self.entries.get(original_id)
        if original.result is not None:
            self._finish_joined(task, original.result, original_id)
        elif running is not None:

            async def deliver() -> None:
                await running.done.wait()
                assert running.result is not None
                self._finish_joined(task, running.result, original_id)

            asyncio.get_running_loop().create_task(deliver())
        return True

    def _finish_joined(
        self,
        task: task_pb2.AgentTask,
        original: result_pb2.TaskResult,
        original_id: str,
    ) -> None:
        result = result_pb2.TaskResult()
        result.CopyFrom(original)
        result.task_id = task.id
        result.outputs["original_task_id"] = original_id
        self.journal.finish(result)
        self._on_result(result)

    def _check_addressing(self, task: task_pb2.AgentTask) -> None:
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

    def _reject(self, task: task_pb2.AgentTask, key: str, exc: TaskError) -> None:
        task_id = task.id or "(none)"
        self._prepared.pop(task.id, None)
        logger.warning("task %s rejected: %s", task_id, exc.message)
        action = (
            ACTION_CREDENTIALS_INVALID
            if exc.error_type == "credentials_invalid"
            else ACTION_TASK_REJECTED
        )
        self._audit(
            action,
            task,
            outcome="rejected",
            error_type=exc.error_type,
            reason=exc.message,
        )
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
        if TASK_ID_PATTERN.match(task.id):
            self.journal.record_received(journal_copy(task), key, state=REJECTED)
            self.journal.finish(result, state=REJECTED)
        self._on_result(result)

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

    # Cancelling ---------------------------------------------------------------

    def cancel(self, task_id: str, reason: str) -> bool:
        """Cancel a pending or running task; return False when it is unknown
        or already finished."""
        entry = self.entries.get(task_id)
        if entry is None or entry.result is not None:
            return False
        reason = reason or "cancelled by the orchestrator"
        if entry.context is None:
            # Still pending: the task never ran, so there is nothing to undo.
            self._pending = [p for p in self._pending if p[2] != task_id]
            heapq.heapify(self._pending)
            self._complete(
                entry,
                result_pb2.TaskResult(
                    task_id=task_id,
                    success=False,
                    error=f"task cancelled before it started: {reason}",
                    error_type="cancelled",
                    started_at=now_timestamp(),
                    completed_at=now_timestamp(),
                ),
                state=REJECTED,
            )
            return True
        entry.context.cancel(reason)
        logger.info("task %s: cancel requested (%s)", task_id, reason)
        return True

    # Scheduling ---------------------------------------------------------------

    def _target_in_use(self, key: str) -> bool:
        if key in self._busy_targets:
            return True
        return any(self.entries[p[2]].key == key for p in self._pending)

    def _schedule(self) -> None:
        """Start the best pending tasks whose targets are free."""
        limit = self.config.tasks.max_concurrent
        skipped: list[tuple[int, int, str]] = []
        while self._pending and len(self._running) < limit:
            item = heapq.heappop(self._pending)
            entry = self.entries[item[2]]
            if entry.key in self._busy_targets:
                skipped.append(item)
                continue
            self._busy_targets.add(entry.key)
            self._running[entry.task.id] = asyncio.get_running_loop().create_task(
                self._run(entry)
            )
        for item in skipped:
            heapq.heappush(self._pending, item)

    def _new_context(self, task: task_pb2.AgentTask) -> TaskContext:
        prepared = self._prepared_for(task)
        if self.security is not None:
            self.security.register(task.id, prepared)

        def on_phase(phase: str) -> None:
            self.journal.set_phase(task.id, phase)
            self._audit(ACTION_DEPLOY_PHASE, task, outcome=phase)

        return self.runner.new_context(
            task,
            self._chunk_sink_for(task.id),
            credentials=prepared.credentials,
            masker=prepared.masker,
            on_phase=on_phase,
            on_note=lambda notes: self.journal.add_notes(task.id, notes),
        )

    def _prepared_for(self, task: task_pb2.AgentTask) -> PreparedTask:
        prepared = self._prepared.pop(task.id, None)
        if prepared is not None:
            return prepared
        if self.security is None:
            return PreparedTask(task_pb2.Credentials(), SecretMasker(()), ())
        # A task read back from the journal after a restart: the sealed
        # credentials open again with the agent's key.
        return self.security.prepare(task)

    async def _run(self, entry: TaskEntry) -> None:
        task_id = entry.task.id
        try:
            entry.context = self._new_context(entry.task)
            self.journal.set_phase(task_id, "start")
            result = await self.runner.run(entry.context)
        finally:
            self._running.pop(task_id, None)
            self._busy_targets.discard(entry.key)
        self._complete(entry, result)
        logger.info(
            "task %s finished: %s",
            task_id,
            "success" if result.success else f"{result.error_type}: {result.error}",
        )
        self._schedule()

    def _complete(
        self, entry: TaskEntry, result: result_pb2.TaskResult, state: str = FINISHED
    ) -> None:
        self._audit_result(entry.task, result)
        if self.security is not None:
            self.security.forget(entry.task.id)
        self.journal.finish(result, state=state)
        entry.result = result
        entry.done.set()
        self._on_result(result)

    # Audit --------------------------------------------------------------------

    def _audit(self, action: str, task: task_pb2.AgentTask, **fields) -> None:
        if self.security is not None:
            self.security.record(action, task, type=type_name(task.type), **fields)

    def _audit_result(
        self, task: task_pb2.AgentTask, result: result_pb2.TaskResult
    ) -> None:
        """Record what a finished task did, in the words of its type."""
        if self.security is None:
            return
        if result.error_type == "digest_mismatch":
            self._audit(
                ACTION_DIGEST_MISMATCH, task, outcome="rejected", reason=result.error
            )
        if result.rolled_back:
            self._audit(
                ACTION_ROLLBACK, task, outcome="rolled_back", reason=result.error
            )
        specific = TYPE_ACTIONS.get(task.type)
        if specific is not None and result.success:
            self._audit(specific, task, outcome="done", outputs=dict(result.outputs))
        self._audit(
            ACTION_TASK_FINISHED,
            task,
            outcome="success" if result.success else "failure",
            error_type=result.error_type,
            error=result.error,
            failed_phase=result.failed_phase,
        )

    # Start and stop -----------------------------------------------------------

    def prepare_recovery(self) -> None:
        """Load the journal's unfinished tasks and claim their targets.

        Call it before the first stream opens: every target with a task to
        recover is busy from then until that task's recovery ends, so a new
        task for it waits, and a task repeating a recovering task's
        idempotency key joins it instead of finding nothing.
        """
        self._to_recover = []
        removed = self.journal.prune(self.config.tasks.idempotency_window_seconds)
        if removed:
            logger.info("forgot %d task(s) older than the idempotency window", removed)
        for stored in self.journal.unfinished():
            task = stored.task
            key = target_key(task)
            entry = TaskEntry(task, key)
            self.entries[task.id] = entry
            if stored.state == RECEIVED:
                self._requeue(entry)
                continue
            self._busy_targets.add(key)
            self._to_recover.append((entry, stored))

    def _requeue(self, entry: TaskEntry) -> None:
        task = entry.task
        try:
            check_expiry(task)
            if lost_secrets(task):
                raise TaskError(
                    "the agent restarted before the task started, and its secret "
                    "environment values are not kept on disk; send the task again",
                    error_type="interrupted",
                    retriable=True,
                )
        except TaskError as exc:
            self._complete(entry, _failed(task.id, exc), state=REJECTED)
            return
        logger.info("task %s was accepted before a restart; queueing it again", task.id)
        heapq.heappush(self._pending, (-task.priority, next(self._arrival), task.id))

    async def recover(self) -> None:
        """Finish the tasks the journal shows as unfinished after a restart.

        A task that never started is queued again, unless it expired. A task
        that was running is handed to its executor's recovery, which returns
        the target to a consistent release and reports what happened.
        """
        if self._to_recover is None:
            self.prepare_recovery()
        to_recover, self._to_recover = self._to_recover, []
        self._schedule()
        for entry, stored in to_recover:
            task = entry.task
            logger.warning(
                "task %s was running (phase %s) when the agent stopped; recovering",
                task.id,
                stored.phase or "unknown",
            )
            try:
                prepared = self._prepared_for(task)
                result = await self.runner.recover(
                    task,
                    stored.phase,
                    stored.notes,
                    self._chunk_sink_for(task.id),
                    credentials=prepared.credentials,
                    masker=prepared.masker,
                )
            except TaskError as exc:
                result = _failed(task.id, exc)
            finally:
                self._busy_targets.discard(entry.key)
            self._complete(entry, result)
            self._schedule()

    async def drain(self, grace_seconds: float) -> None:
        """Stop accepting tasks and wait up to `grace_seconds` for running ones.

        Tasks still pending get a retriable `shutting_down` result without running. Tasks still
        running after the grace period stay in the journal and are recovered
        on the next start.
        """
        self._accepting = False
        for _, _, task_id in list(self._pending):
            entry = self.entries[task_id]
            # Never started: recorded as rejected, so the key stays free for a retry.
            self._complete(
                entry,
                _failed(
                    task_id,
                    TaskError(
                        "the agent shut down before the task started; send it again",
                        error_type="shutting_down",
                        retriable=True,
                    ),
                ),
                state=REJECTED,
            )
        self._pending.clear()
        running = list(self._running.values())
        if running:
            logger.info(
                "waiting up to %.0fs for %d running task(s)",
                grace_seconds,
                len(running),
            )
            _, still_running = await asyncio.wait(running, timeout=grace_seconds)
            if still_running:
                logger.warning(
                    "%d task(s) still running after the grace period; they will be "
                    "recovered on the next start",
                    len(still_running),
                )

    async def stop(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)


def _failed(task_id: str, exc: TaskError) -> result_pb2.TaskResult:
    return result_pb2.TaskResult(
        task_id=task_id,
        success=False,
        error=exc.message,
        error_type=exc.error_type,
        retriable=exc.retriable,
        started_at=now_timestamp(),
        completed_at=now_timestamp(),
    )


__all__ = ["Dispatcher", "FINISHED", "TaskEntry", "target_key"]
