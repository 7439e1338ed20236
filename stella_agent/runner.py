"""Run one task to a TaskResult.

This is the boundary where every failure becomes a result: ``TaskError``s keep
their error type, anything else is logged with its traceback and reported as
an internal error. Both `stella-agent exec` and the dispatcher use it, so a task
behaves the same with and without an orchestrator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from google.protobuf.timestamp_pb2 import Timestamp

from stella.agent.v1 import result_pb2, task_pb2
from stella_agent.config import AgentConfig
from stella_agent.errors import (
    DockerError,
    InvalidTaskError,
    TaskError,
    TaskExpiredError,
)
from stella_agent.executors.base import Executor, Outcome, TaskContext
from stella_agent.logstream import ChunkSink, TaskLog
from stella_agent.masking import SecretMasker, mask_result
from stella_agent.tasks import (
    EXECUTOR_NAMES,
    MAX_TASK_TIMEOUT_SECONDS,
    type_name,
    validate_task,
)

logger = logging.getLogger(__name__)


def now_timestamp() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def check_expiry(task: task_pb2.AgentTask, now: float | None = None) -> None:
    """Raise TaskExpiredError when the task's expires_at has passed."""
    if not task.HasField("expires_at"):
        return
    current = time.time() if now is None else now
    expires = task.expires_at.seconds + task.expires_at.nanos / 1e9
    if current >= expires:
        raise TaskExpiredError(
            f"task {task.id} expired at {task.expires_at.ToJsonString()} before it could run; "
            "send a new task with a later expires_at"
        )


MAX_RESULT_BYTES = 1024 * 1024
"""Largest serialized TaskResult the agent sends: far below the 16 MiB gRPC
message limit of both sides, which a larger result would exceed forever,
blocking every later message on the stream."""
MAX_OUTPUT_VALUE_BYTES = 64 * 1024


def fit_result(result: result_pb2.TaskResult) -> None:
    """Truncate a result's largest texts until it fits in MAX_RESULT_BYTES."""
    if result.ByteSize() <= MAX_RESULT_BYTES:
        return
    result.error = _truncate(result.error, MAX_OUTPUT_VALUE_BYTES)
    for key in sorted(result.outputs, key=lambda k: -len(result.outputs[k])):
        if result.ByteSize() <= MAX_RESULT_BYTES:
            break
        result.outputs[key] = _truncate(result.outputs[key], MAX_OUTPUT_VALUE_BYTES)
    while result.ByteSize() > MAX_RESULT_BYTES and result.outputs:
        largest = max(result.outputs, key=lambda k: len(result.outputs[k]))
        del result.outputs[largest]
        result.outputs["truncated_" + largest[:100]] = (
            "removed: the result was too large"
        )
    if result.ByteSize() > MAX_RESULT_BYTES:
        del result.artifacts[:]
        result.logs = ""
    result.outputs["result_truncated"] = "true"


def _truncate(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    kept = data[:limit].decode("utf-8", "ignore")
    return f"{kept}... [{len(data) - limit} more bytes truncated]"


class TaskRunner:
    """Builds task contexts and runs them with the right executor."""

    def __init__(
        self,
        config: AgentConfig,
        executors: Mapping[str, Executor],
        docker_client_factory: Callable[[], object] | None = None,
    ) -> None:
        self.config = config
        self.executors = executors
        self._docker_client_factory = docker_client_factory
        self._docker_client: object | None = None

    def docker_client(self) -> object | None:
        """Return the shared Docker client, created on first use."""
        if self._docker_client is None and self._docker_client_factory is not None:
            self._docker_client = self._docker_client_factory()
        return self._docker_client

    def _connect_docker(self) -> object | None:
        try:
            return self.docker_client()
        except Exception as exc:  # noqa: BLE001 - docker raises several unrelated types here
            raise DockerError(
                f"cannot reach Docker Engine: {exc}; check that dockerd runs and "
                "docker.host (or DOCKER_HOST) points at it",
                error_type="docker_unavailable",
                retriable=True,
            ) from None

    def new_context(
        self,
        task: task_pb2.AgentTask,
        sink: ChunkSink | None,
        *,
        credentials: task_pb2.Credentials | None = None,
        masker: SecretMasker | None = None,
        on_phase: Callable[[str], None] | None = None,
        on_note: Callable[[dict[str, str]], None] | None = None,
    ) -> TaskContext:
        timeout = self.config.tasks.default_timeout_seconds
        requested = task.timeout.seconds + task.timeout.nanos / 1e9
        if 0 < requested <= MAX_TASK_TIMEOUT_SECONDS:
            timeout = requested
        context = TaskContext(
            task,
            TaskLog(task.id, sink, masker=masker),
            self.config,
            credentials=credentials,
            deadline=time.monotonic() + timeout,
            on_phase=on_phase,
            on_note=on_note,
        )
        context.masker = masker
        return context

    async def run(self, context: TaskContext) -> result_pb2.TaskResult:
        """Run the task of `context` and return its result; never raises
        except for asyncio.CancelledError."""

        async def call(executor: Executor) -> Outcome:
            task = context.task
            validate_task(task)
            check_expiry(task)
            context.log.info(
                "task %s (%s) started on the %s executor",
                task.id,
                type_name(task.type),
                EXECUTOR_NAMES[task.executor],
            )
            return await executor.run(context)

        return await self._execute(context, call)

    async def recover(
        self,
        task: task_pb2.AgentTask,
        phase: str,
        notes: dict[str, str],
        sink: ChunkSink | None,
        *,
        credentials: task_pb2.Credentials | None = None,
        masker: SecretMasker | None = None,
    ) -> result_pb2.TaskResult:
        """Finish a task that was running when the agent stopped, through its
        executor's recovery, and return the result to report."""
        context = self.new_context(task, sink, credentials=credentials, masker=masker)
        context.notes.update(notes)
        context.phase = phase
        # Recovery must run to its end: it is what restores the target.
        context.deadline = None

        async def call(executor: Executor) -> Outcome:
            context.log.info(
                "the agent restarted while task %s was in phase %s; recovering the target",
                task.id,
                phase or "unknown",
            )
            recover = getattr(executor, "recover", None)
            if recover is None:
                raise TaskError(
                    f"the agent restarted during phase {phase or 'unknown'} and the "
                    f"{EXECUTOR_NAMES.get(task.executor, 'docker')} executor cannot recover "
                    "this task type; inspect the target",
                    error_type="interrupted",
                    phase=phase,
                )
            return await recover(context, phase)

        return await self._execute(context, call)

    async def _execute(
        self, context: TaskContext, call: Callable[[Executor], Awaitable[Outcome]]
    ) -> result_pb2.TaskResult:
        task = context.task
        result = result_pb2.TaskResult(task_id=task.id, started_at=now_timestamp())
        started = time.monotonic()
        try:
            executor_name = EXECUTOR_NAMES.get(task.executor, "")
            executor = self.executors.get(executor_name)
            if executor is None:
                raise InvalidTaskError(
                    f"executor {executor_name or task.executor} is not available on this agent",
                    error_type="unsupported",
                )
            if context.docker is None:
                context.docker = self._connect_docker()
            outcome = await call(executor)
        except TaskError as exc:
            result.success = False
            result.error = exc.message
            result.error_type = exc.error_type
            result.retriable = exc.retriable
            result.failed_phase = exc.phase or context.phase
            result.rolled_back = exc.rolled_back
            context.log.info("task failed: %s", exc.message)
        except Exception as exc:  # noqa: BLE001 - the boundary that turns any bug into a result
            logger.exception("task %s failed with an unexpected error", task.id)
            result.success = False
            result.error = f"internal error in the agent: {type(exc).__name__}: {exc}"
            result.error_type = "internal"
            result.failed_phase = context.phase
            context.log.info("task failed: %s", result.error)
        else:
            result.success = outcome.success
            result.outputs.update(outcome.outputs)
            if not outcome.success:
                result.error = outcome.error
                result.error_type = outcome.error_type
            context.log.info(
                "task %s",
                "succeeded" if outcome.success else "finished: " + outcome.error,
            )
        metrics = context.metrics
        result.metrics.pull_duration_ms = metrics.pull_duration_ms
        result.metrics.deploy_duration_ms = metrics.deploy_duration_ms or int(
            (time.monotonic() - started) * 1000
        )
        result.metrics.health_check_duration_ms = metrics.health_check_duration_ms
        context.log.flush()
        if context.masker is not None:
            mask_result(result, context.masker)
        if context.log.dropped_bytes:
            # The spool was full, so chunks were dropped; report how many bytes.
            result.outputs["log_dropped_bytes"] = str(context.log.dropped_bytes)
        result.completed_at.CopyFrom(now_timestamp())
        result.logs = context.log.tail()
        fit_result(result)
        return result
