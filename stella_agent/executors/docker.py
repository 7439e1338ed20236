"""The Docker executor: deploys and rolls back single containers.

``DockerExecutor.run`` dispatches on the task type and runs the flow in a
worker thread, because the Docker SDK blocks. The flows live beside this
module: ``deploy.py`` (deploy), ``rollback.py`` (rollback), with their parts in
``container_spec.py``, ``ports.py``, ``pull.py``, ``health.py``,
``containers.py`` and ``docker_errors.py``. ``docker_recovery.py`` restores
the target of a task that an agent crash interrupted.

The worker thread calls ``TaskContext.set_phase`` and writes the task log, so
phase callbacks and log sinks must be safe to call from another thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import docker

from stella.agent.v1 import task_pb2
from stella_agent.errors import InvalidTaskError
from stella_agent.executors.base import Outcome, TaskContext
from stella_agent.executors.deploy import DeployFlow, HookRunner
from stella_agent.executors.docker_errors import DOCKER_EXCEPTIONS, docker_error
from stella_agent.executors.docker_recovery import recover_task
from stella_agent.executors.rollback import RollbackFlow
from stella_agent.tasks import type_name

SUPPORTED_TYPES = (task_pb2.TASK_TYPE_DEPLOY, task_pb2.TASK_TYPE_ROLLBACK)


class DockerExecutor:
    """Runs deploy and rollback tasks against Docker Engine."""

    def __init__(self, hook_runner: HookRunner | None = None) -> None:
        self.hook_runner = hook_runner
        """Runs pre- and post-deploy hooks; without one, tasks with hooks are
        rejected as unsupported."""

    async def run(self, context: TaskContext) -> Outcome:
        """Run a deploy or rollback task; raise a TaskError on failure."""
        task_type = context.task.type
        if task_type not in SUPPORTED_TYPES:
            raise InvalidTaskError(
                f"task type {type_name(task_type)} is not supported by the docker "
                "executor yet",
                error_type="unsupported",
            )
        return await run_in_worker(context, self._run_blocking)

    async def recover(self, context: TaskContext, phase: str) -> Outcome:
        """Restore the target of a task that an agent crash interrupted in
        `phase`, using the notes the task wrote; see docker_recovery."""

        def recover_blocking(context: TaskContext) -> Outcome:
            return recover_task(context, _client(context), phase)

        return await run_in_worker(context, recover_blocking)

    def _run_blocking(self, context: TaskContext) -> Outcome:
        client = _client(context)
        if context.task.type == task_pb2.TASK_TYPE_DEPLOY:
            flow = DeployFlow(context, client, context.task.deploy, self.hook_runner)
            return flow.run()
        return RollbackFlow(context, client, self.hook_runner).run()


def _client(context: TaskContext) -> Any:
    """Return the context's Docker client, creating one from the environment."""
    if context.docker is None:
        try:
            context.docker = docker.from_env()
        except DOCKER_EXCEPTIONS as exc:
            raise docker_error(exc, "connect to Docker Engine") from None
    return context.docker


async def run_in_worker(
    context: TaskContext, function: Callable[[TaskContext], Any]
) -> Any:
    """Run `function(context)` in a worker thread and return its result.

    A thread cannot be interrupted, so when the awaiting asyncio task is
    cancelled, the context is cancelled instead: the flow stops at its next
    checkpoint and restores the previous release. The cancellation goes on
    once the thread has finished, or at once on a second cancellation.
    """
    work = asyncio.ensure_future(asyncio.to_thread(function, context))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        context.cancel("the agent cancelled the task")
        try:
            await asyncio.shield(work)
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - cancelling anyway
            pass
        raise
