"""Pre-deploy and post-deploy hooks, run in the sandbox (see ``sandbox``).

A hook is an argument vector run in a throwaway container from an image
pinned by digest: the hook's own ``image`` or the agent's ``hooks.image``. It
gets no network unless the hook sets ``network`` and the agent's
``hooks.allow_network`` is true; a hook that asks for the network when the
policy forbids it is rejected before the deploy starts. For a Compose deploy
the release's files are mounted read-only at /deploy, which is also the
working directory.

A hook fails when it exits non-zero, is killed for lack of memory, or runs
past its timeout (``hook.timeout`` or ``hooks.timeout_seconds``), in which
case it is killed. The failure is a ``HookFailedError``: before the deploy
changes anything for a pre-deploy hook, and followed by a rollback for a
post-deploy hook (the deploy flows do that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import docker.types

from stella.agent.v1 import task_pb2
from stella_agent.errors import HookFailedError, InvalidTaskError
from stella_agent.executors.base import TaskContext
from stella_agent.executors.commands import validate_environment
from stella_agent.executors.sandbox import SandboxSpec, parse_pinned_image, run_sandbox

DEPLOY_MOUNT = "/deploy"
HOOK_STAGES = ("pre_deploy", "post_deploy")


class SandboxHookRunner:
    """Runs deploy hooks in sandbox containers; a ``HookRunner``."""

    def validate(
        self, context: TaskContext, hook: task_pb2.HookConfig, stage: str
    ) -> None:
        """Check a hook before the deploy starts; raise InvalidTaskError."""
        field = f"hooks.{stage}"
        if not hook.command:
            raise InvalidTaskError(f"{field}.command is required")
        if any("\0" in argument for argument in hook.command):
            raise InvalidTaskError(f"{field}.command has an argument with a NUL")
        self._image(context, hook, field)
        if hook.network and not context.config.hooks.allow_network:
            raise InvalidTaskError(
                f"{field}.network asks for network access, but this agent's "
                "hooks.allow_network is false; remove the request or allow it in "
                "the agent config"
            )
        validate_environment(hook.environment, f"{field}.environment")
        if hook.HasField("timeout") and (
            hook.timeout.seconds < 0 or hook.timeout.nanos < 0
        ):
            raise InvalidTaskError(f"{field}.timeout is negative")

    def __call__(
        self,
        context: TaskContext,
        hook: task_pb2.HookConfig,
        stage: str,
        *,
        deployment_directory: Path | None = None,
        client: Any = None,
    ) -> None:
        """Run the hook to its end; raise HookFailedError when it fails."""
        self.validate(context, hook, stage)
        field = f"hooks.{stage}"
        timeout = context.config.hooks.timeout_seconds
        if hook.HasField("timeout") and hook.timeout.ToTimedelta().total_seconds() > 0:
            timeout = hook.timeout.ToTimedelta().total_seconds()
        environment = {
            **dict(hook.environment),
            "STELLA_TASK_ID": context.task.id,
            "STELLA_HOOK_STAGE": stage,
        }
        mounts = []
        working_dir = None
        if deployment_directory is not None:
            mounts.append(
                docker.types.Mount(
                    target=DEPLOY_MOUNT,
                    source=str(deployment_directory),
                    type="bind",
                    read_only=True,
                )
            )
            working_dir = DEPLOY_MOUNT
        spec = SandboxSpec(
            image=self._image(context, hook, field),
            command=list(hook.command),
            role="hook",
            description=f"{stage} hook",
            timeout_seconds=timeout,
            environment=environment,
            network_mode="bridge" if hook.network else "none",
            mounts=mounts,
            working_dir=working_dir,
        )
        result = run_sandbox(context, client or context.docker, spec)

        if result.timed_out:
            raise HookFailedError(
                f"the {stage} hook ran longer than its timeout of {timeout:g}s and "
                f"was killed; last output: {result.output_text()}",
                phase=context.phase,
            )
        if result.oom_killed:
            raise HookFailedError(
                f"the {stage} hook was killed because it ran out of memory (limit "
                f"{context.config.hooks.memory_limit_bytes} bytes, "
                "hooks.memory_limit_bytes)",
                phase=context.phase,
            )
        if result.exit_code != 0:
            raise HookFailedError(
                f"the {stage} hook exited with code {result.exit_code}; last "
                f"output: {result.output_text()}",
                phase=context.phase,
            )
        context.log.info("the %s hook succeeded", stage)

    @staticmethod
    def _image(context: TaskContext, hook: task_pb2.HookConfig, field: str) -> str:
        if hook.image:
            parse_pinned_image(hook.image, f"{field}.image")
            return hook.image
        configured = context.config.hooks.image
        if not configured:
            raise InvalidTaskError(
                f"{field}.image is empty and this agent has no hooks.image; pin the "
                "hook image as repository@sha256:digest in the task or the agent "
                "config"
            )
        parse_pinned_image(configured, "hooks.image")
        return configured
