"""The Docker executor: single containers, and the tasks around them.

``DockerExecutor.run`` dispatches on the task type and runs the flow in a
worker thread, because the Docker SDK blocks. The flows live beside this
module: ``deploy.py`` (deploy), ``rollback.py`` (rollback), with their parts in
``container_spec.py``, ``ports.py``, ``pull.py``, ``health.py``,
``containers.py`` and ``docker_errors.py``; ``health_check.py``,
``inspect.py``, ``commands.py`` (execute-command), ``files.py``
(upload-files) and ``stickers.py`` (write-sticker, read-sticker and the
sticker every deploy and rollback writes). Hooks run in the sandbox of
``hooks.py``. ``docker_recovery.py`` restores the target of a task that an
agent crash interrupted.

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
from stella_agent.executors import commands, files, health_check, inspect, stickers
from stella_agent.executors.base import Outcome, TaskContext
from stella_agent.executors.deploy import DeployFlow, HookRunner
from stella_agent.executors.docker_errors import DOCKER_EXCEPTIONS, docker_error
from stella_agent.executors.docker_recovery import recover_task
from stella_agent.executors.hooks import SandboxHookRunner
from stella_agent.executors.rollback import RollbackFlow
from stella_agent.tasks import type_name

_DEFAULT_HOOK_RUNNER = object()


class DockerExecutor:
    """Runs every task type against Docker Engine, one container per target."""

    def __init__(self, hook_runner: HookRunner | None | object = _DEFAULT_HOOK_RUNNER):
        if hook_runner is _DEFAULT_HOOK_RUNNER:
            hook_runner = SandboxHookRunner()
        self.hook_runner: HookRunner | None = hook_runner  # type: ignore[assignment]
        """Runs pre- and post-deploy hooks, by default in sandbox containers;
        with None, tasks with hooks are rejected as unsupported."""

    async def run(self, context: TaskContext) -> Outcome:
        """Run the task in a worker thread; raise a TaskError on failure."""
        if context.task.type not in self._handlers():
            raise InvalidTaskError(
                f"task type {type_name(context.task.type)} is not supported by the "
                "docker executor",
                error_type="unsupported",
            )
        return await run_in_worker(context, self._run_blocking)

    async def recover(self, context: TaskContext, phase: str) -> Outcome:
        """Restore the target of a task that an agent crash interrupted in
        `phase`, using the notes the task wrote; see docker_recovery."""

        def recover_blocking(context: TaskContext) -> Outcome:
            return recover_task(context, docker_client(context), phase)

        return await run_in_worker(context, recover_blocking)

    def _handlers(self) -> dict[int, Callable[[TaskContext, Any], Outcome]]:
        return {
            task_pb2.TASK_TYPE_DEPLOY: self._deploy,
            task_pb2.TASK_TYPE_ROLLBACK: self._rollback,
            task_pb2.TASK_TYPE_HEALTH_CHECK: health_check.check_container,
            task_pb2.TASK_TYPE_INSPECT: inspect.inspect_container,
            task_pb2.TASK_TYPE_EXECUTE_COMMAND: commands.execute_command,
            task_pb2.TASK_TYPE_UPLOAD_FILES: files.upload_files,
            task_pb2.TASK_TYPE_WRITE_STICKER: stickers.write_sticker_task,
            task_pb2.TASK_TYPE_READ_STICKER: stickers.read_sticker_task,
        }

    def _run_blocking(self, context: TaskContext) -> Outcome:
        handler = self._handlers()[context.task.type]
        return handler(context, docker_client(context))

    def _deploy(self, context: TaskContext, client: Any) -> Outcome:
        payload = context.task.deploy
        outcome = DeployFlow(context, client, payload, self.hook_runner).run()
        sticker = payload.config.sticker if payload.config.HasField("sticker") else None
        outcome.outputs.update(
            stickers.write_release_sticker(
                context, client, outcome.outputs["container_id"], sticker, "deploy"
            )
        )
        return outcome

    def _rollback(self, context: TaskContext, client: Any) -> Outcome:
        payload = context.task.rollback
        outcome = RollbackFlow(context, client, self.hook_runner).run()
        config = payload.config
        sticker = config.sticker if config.HasField("sticker") else None
        outcome.outputs.update(
            stickers.write_release_sticker(
                context, client, outcome.outputs["container_id"], sticker, "rollback"
            )
        )
        return outcome


def docker_client(context: TaskContext) -> Any:
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
