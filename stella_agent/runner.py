"""Run one task to a TaskResult.

This is the boundary where every failure becomes a result: ``TaskError``s keep
their error type, anything else is logged with its traceback and reported as
an internal error. Both `stella-agent exec` and the dispatcher use it, so a task
behaves the same with and without an orchestrator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from google.protobuf.timestamp_pb2 import Timestamp
from stella.agent.v1 import result_pb2, task_pb2

from stella_agent.config import AgentConfig
from stella_agent.errors import InvalidTaskError, TaskError, TaskExpiredError
from stella_agent.executors.base import Executor, TaskContext
from stella_agent.logstream import ChunkSink, TaskLog
from stella_agent.tasks import EXECUTOR_NAMES, type_name, validate_task

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

    def new_context(
        self,
        task: task_pb2.AgentTask,
        sink: ChunkSink | None,
        *,
        credentials: task_pb2.Credentials | None = None,
        masker: Callable[[bytes], bytes] | None = None,
        on_phase: Callable[[str], None] | None = None,
    ) -> TaskContext:
        timeout = self.config.tasks.default_timeout_seconds
        if task.HasField("timeout") and task.timeout.ToTimedelta().total_seconds() > 0:
            timeout = task.timeout.ToTimedelta().total_seconds()
        return TaskContext(
            task,
            TaskLog(task.id, sink, masker=masker),
            self.config,
            credentials=credentials,
            deadline=time.monotonic() + timeout,
            on_phase=on_phase,
        )

    async def run(self, context: TaskContext) -> result_pb2.TaskResult:
        """Run the task of `context` and return its result; never raises
        except for asyncio.CancelledError."""
        task = context.task
        result = result_pb2.TaskResult(task_id=task.id, started_at=now_timestamp())
        started = time.monotonic()
        try:
            validate_task(task)
            check_expiry(task)
            executor_name = EXECUTOR_NAMES[task.executor]
            executor = self.executors.get(executor_name)
            if executor is None:
                raise InvalidTaskError(
                    f"executor {executor_name} is not available on this agent",
                    error_type="unsupported",
                )
            if context.docker is None:
                context.docker = self.docker_client()
            context.log.info(
                "task %s (%s) started on the %s executor",
                task.id,
                type_name(task.type),
                executor_name,
            )
            outcome = await executor.run(context)
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
        result.completed_at.CopyFrom(now_timestamp())
        result.logs = context.log.tail()
        return result
