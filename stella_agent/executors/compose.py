"""The Compose executor: deploys and rolls back stacks pinned by digest.

A deploy reads as the steps below, each a short block of ``_deploy``:

1. prepare: check the task, derive the project name, find the stack directory
   and Compose, and check that no other stack owns the project;
2. artifacts: obtain the lock file and config files and verify their sha256;
3. verify: write them into a staging snapshot and check the model that
   ``docker compose config`` resolves against the expected digests;
4. pull: make every image present and check its repository digest;
5. pre-deploy hook, in the sandbox of ``hooks`` (see ``compose_tasks``);
6. switch: the live release becomes the backup, the staged one goes live,
   ``up --remove-orphans --force-recreate`` runs, the running containers'
   image ids are checked, and every service must become healthy;
7. sticker: ``version.json`` records what runs.

Nothing running is touched before step 6. A failure in step 6 restores the
backup and brings it up again, verified, or takes the project down when there
was no previous release. A rollback task promotes the backup with the same
switch, so the release it replaces becomes the new backup. After an agent
crash, ``recover`` (see ``compose_recovery``) finishes or undoes the switch.

The task's ``DeployConfig.environment`` becomes the environment of the Compose
commands. Services receive a value byte for byte through a bare key
(``environment: [NAME]``) or ``${NAME}`` in the lock file, which the agent
writes verbatim. A literal ``$`` in the lock file itself is written ``$$``,
because Compose interpolates the file.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from google.protobuf.duration_pb2 import Duration

from stella.agent.v1 import task_pb2
from stella_agent.artifacts import (
    Artifact,
    ArtifactFetcher,
    materialise_artifacts,
    validate_artifact_name,
)
from stella_agent.errors import (
    DigestMismatchError,
    InvalidTaskError,
    RollbackFailedError,
    TaskError,
)
from stella_agent.executors import compose_tasks
from stella_agent.executors.base import Outcome, TaskContext
from stella_agent.executors.compose_recovery import recover_stack
from stella_agent.executors.compose_runner import ComposeRunner, reserved_variable
from stella_agent.executors.compose_stack import (
    AGENT_DIRECTORY_NAME,
    LOCK_FILE_NAME,
    RESERVED_NAMES,
    ReleaseFile,
    ReleaseRecord,
    Switch,
    commit,
    promote,
    read_release,
    snapshot_files_directory,
    take_backup_for_rollback,
    write_snapshot,
)
from stella_agent.executors.compose_steps import (
    StackSteps,
    disk,
    now_rfc3339,
    release_outputs,
)
from stella_agent.executors.compose_verify import (
    ServicePlan,
    validate_expected_digests,
    verify_model,
)
from stella_agent.tasks import type_name

logger = logging.getLogger(__name__)

ENVIRONMENT_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ComposeExecutor:
    """Runs deploy and rollback tasks of the Compose executor.

    `artifact_fetcher` obtains artifacts that a task names without inline
    content; without one, such tasks are rejected. `runner` replaces the
    Compose runner, which is otherwise built from the agent configuration.
    """

    def __init__(
        self,
        artifact_fetcher: ArtifactFetcher | None = None,
        *,
        runner: ComposeRunner | None = None,
    ) -> None:
        self._fetcher = artifact_fetcher
        self._runner = runner

    async def run(self, context: TaskContext) -> Outcome:
        task_type = context.task.type
        try:
            if task_type == task_pb2.TASK_TYPE_DEPLOY:
                return await self._deploy(context)
            if task_type == task_pb2.TASK_TYPE_ROLLBACK:
                return await self._rollback(context)
            if task_type in compose_tasks.SUPPORTED_TYPES:
                return await compose_tasks.run_task(context)
        except DigestMismatchError as exc:
            # TODO: record this in the audit log once it exists. Until then
            # the agent log and the task result carry it.
            logger.warning(
                "digest mismatch in task %s: %s", context.task.id, exc.message
            )
            raise
        raise InvalidTaskError(
            f"the Compose executor does not run {type_name(task_type)} tasks",
            error_type="unsupported",
        )

    async def recover(self, context: TaskContext, phase: str) -> Outcome:
        """Bring the stack of a task that an agent crash interrupted in `phase`
        to one consistent release, using the notes the task wrote; see
        compose_recovery."""
        return await recover_stack(context, self._compose_runner(context), phase)

    def _compose_runner(self, context: TaskContext) -> ComposeRunner:
        # The runner is built on first use because it needs the configuration,
        # and kept so that Compose is discovered once.
        if self._runner is None:
            self._runner = ComposeRunner(context.config.compose.command)
        return self._runner

    # Deploy

    async def _deploy(self, context: TaskContext) -> Outcome:
        payload = context.task.deploy
        config = payload.config

        context.set_phase("prepare")
        compose_tasks.validate_hooks(context, payload.hooks)
        expected = validate_expected_digests(config.expected_digests)
        environment = validate_environment(config.environment)
        _check_release_layout(payload.artifacts)
        steps = await StackSteps.open(
            context,
            self._compose_runner(context),
            config.stack_name,
            config.deployment_directory,
        )

        context.set_phase("artifacts")
        artifacts = await materialise_artifacts(
            payload.artifacts, context.task.id, self._fetcher
        )
        files, release_files = _release_files(artifacts)
        record = ReleaseRecord(
            stack_name=steps.stack_name,
            project_name=steps.project,
            task_id=context.task.id,
            release_id=config.release_id,
            release_name=config.release_name,
            deployed_at=now_rfc3339(),
            expected_digests=expected,
            files=release_files,
            environment=environment,
            health_timeout_seconds=_seconds(config.health_check.timeout),
            settle_seconds=_seconds(config.health_check.settle_period),
        )
        context.checkpoint()

        async with steps.locked(create=True):
            staging = steps.paths.staging
            await disk(write_snapshot, staging, files, record)
            try:
                context.set_phase("verify")
                files_directory = snapshot_files_directory(staging)
                model = await steps.resolved_model(files_directory, record)
                plans = verify_model(model, expected)
                context.checkpoint()

                context.set_phase("pull")
                image_ids = await steps.pull(plans, forward=True)
                context.checkpoint()

                # After the images are pulled and verified, before anything
                # running changes.
                await compose_tasks.run_hook(
                    context, payload.hooks, "pre_deploy", files_directory
                )
                context.checkpoint()
            except BaseException:
                await disk(shutil.rmtree, staging, True)
                raise
            switch, verdicts = await self._switch(
                steps, staging, record, plans, image_ids, payload.hooks
            )
        context.log.info(
            "stack %s deployed as project %s", steps.stack_name, steps.project
        )
        outputs = release_outputs(steps, record, switch.previous, verdicts)
        if config.HasField("sticker"):
            outputs.update(await _write_sticker(context, config.sticker, record, plans))
        return Outcome(outputs=outputs)

    # Rollback

    async def _rollback(self, context: TaskContext) -> Outcome:
        payload = context.task.rollback

        context.set_phase("prepare")
        if payload.target_digest or payload.image:
            raise InvalidTaskError(
                "rollback to a target_digest is not supported by the Compose "
                "executor; deploy the earlier lock file instead",
                error_type="unsupported",
            )
        steps = await StackSteps.open(
            context,
            self._compose_runner(context),
            payload.stack_name,
            payload.deployment_directory,
        )

        async with steps.locked(create=False):
            paths = steps.paths
            record = await disk(read_release, paths.backup / "release.json")
            if record is None:
                raise RollbackFailedError(
                    f"stack {steps.stack_name!r} has no previous release to roll "
                    f"back to in {paths.directory}"
                )

            context.set_phase("verify")
            files_directory = snapshot_files_directory(paths.backup)
            try:
                model = await steps.resolved_model(files_directory, record)
                plans = verify_model(model, record.expected_digests)
            except InvalidTaskError as exc:
                raise RollbackFailedError(
                    f"the previous release cannot be deployed again: {exc.message}"
                ) from None
            context.checkpoint()

            context.set_phase("pull")
            image_ids = await steps.pull(plans, forward=True)
            context.checkpoint()

            await disk(take_backup_for_rollback, paths)
            switch, verdicts = await self._switch(
                steps, paths.displaced, record, plans, image_ids
            )
        context.log.info(
            "stack %s rolled back to release %s",
            steps.stack_name,
            record.release_id or "(no id)",
        )
        outputs = release_outputs(steps, record, switch.previous, verdicts)
        if payload.config.HasField("sticker"):
            sticker = payload.config.sticker
            outputs.update(await _write_sticker(context, sticker, record, plans))
        return Outcome(outputs=outputs)

    # Switch and recovery

    async def _switch(
        self,
        steps: StackSteps,
        source: Path,
        record: ReleaseRecord,
        plans: Mapping[str, ServicePlan],
        image_ids: Mapping[str, str],
        hooks: task_pb2.DeployHooks | None = None,
    ) -> tuple[Switch, dict[str, str]]:
        """Make the snapshot `source` live and healthy, or restore the previous
        release and re-raise."""
        context = steps.context
        context.set_phase("up")
        live = await disk(read_release, steps.paths.release_file)
        context.note(
            switch_to=record.key,
            switch_to_release_id=record.release_id,
            switch_from=live.key if live is not None else "",
            switch_from_release_id=live.release_id if live is not None else "",
        )
        skipped: list[str] = []
        # NOTE: a disk error inside promote can leave the live files half
        # switched; nothing running has changed then, but no restore runs.
        switch = await disk(promote, steps.paths, source, skipped)
        context.note(files_switched="true")
        for line in skipped:
            context.log.info("%s", line)
        try:
            context.note(up_started="true")
            await steps.up(record, plans, image_ids, forward=True)

            context.set_phase("health")
            started = time.monotonic()
            verdicts = await steps.wait_for_health(plans, record, forward=True)
            elapsed = time.monotonic() - started
            context.metrics.health_check_duration_ms = int(elapsed * 1000)

            # Once the release is healthy; its failure rolls back like a
            # failed health check. The hook gets the snapshot's copy of the
            # release files, not the live directory, because .stella/ there
            # holds the previous release's environment.
            if hooks is not None:
                await compose_tasks.run_hook(
                    context, hooks, "post_deploy", snapshot_files_directory(source)
                )
                context.checkpoint()

            context.set_phase("sticker")
            await steps.write_sticker(record, plans)
            await disk(commit, steps.paths)
        except BaseException as failure:
            await self._recover(steps, switch, record, failure)
            raise
        return switch, verdicts

    async def _recover(
        self,
        steps: StackSteps,
        switch: Switch,
        failed: ReleaseRecord,
        failure: BaseException,
    ) -> None:
        """Bring the previous release back after `failure` and add the outcome
        to the failure's message.

        Raises RollbackFailedError when that fails too. For a failure that is
        not a TaskError (cancellation of the asyncio task, a bug) the caller
        re-raises the original exception.
        """
        context = steps.context
        failed_phase = context.phase
        context.set_phase("rollback")
        reason = str(failure) or type(failure).__name__
        context.log.info("task failed during %s: %s", failed_phase, reason)
        try:
            outcome = await steps.restore_previous(switch, failed)
        except Exception as recovery_error:
            # Any exception, a bug included, ends as rollback_failed.
            if isinstance(recovery_error, TaskError):
                detail = recovery_error.message
            else:
                detail = repr(recovery_error)
            context.log.info("restoring the previous release failed: %s", detail)
            logger.error(
                "task %s: restoring the previous release of stack %s failed: %s",
                context.task.id,
                steps.stack_name,
                detail,
            )
            if isinstance(failure, TaskError):
                raise RollbackFailedError(
                    f"{failure.message}; restoring the previous release failed "
                    f"too: {detail}",
                    phase=failure.phase or failed_phase,
                ) from failure
            return

        context.log.info("%s", outcome)
        if isinstance(failure, TaskError):
            failure.message = f"{failure.message}; {outcome}"
            failure.args = (failure.message,)
            failure.phase = failure.phase or failed_phase
            failure.rolled_back = switch.previous is not None


def validate_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """Return the task's environment after checking names and values.

    The values become the environment of the Compose commands, from which
    services take them byte for byte (see compose_environment).
    """
    for name, value in environment.items():
        if not ENVIRONMENT_NAME_PATTERN.match(name):
            raise InvalidTaskError(
                f"environment variable name {name[:100]!r} is invalid: use letters, "
                "digits and '_', not starting with a digit"
            )
        if reserved_variable(name):
            raise InvalidTaskError(
                f"environment variable {name} is reserved for running Docker "
                "Compose; set it in the lock file instead"
            )
        if "\x00" in value:
            raise InvalidTaskError(
                f"environment variable {name} contains a NUL byte, which no process "
                "can receive"
            )
    return dict(environment)


async def _write_sticker(
    context: TaskContext,
    requested: task_pb2.StickerConfig,
    record: ReleaseRecord,
    plans: Mapping[str, ServicePlan],
) -> dict[str, str]:
    """Write the sticker to the location the task names, besides version.json."""
    return await compose_tasks.write_stack_sticker(
        context,
        requested,
        project_name=record.project_name,
        release_id=record.release_id,
        release_name=record.release_name,
        service_digests={name: plan.digest for name, plan in plans.items()},
    )


def _check_release_layout(references: Sequence[task_pb2.ArtifactReference]) -> None:
    """Check that a deploy names exactly one lock file and no reserved file."""
    locks = [ref for ref in references if ref.type == "compose_lock"]
    if len(locks) != 1:
        raise InvalidTaskError(
            "a Compose deploy needs exactly one artifact of type compose_lock, "
            f"got {len(locks)}"
        )
    for reference in references:
        validate_artifact_name(reference.name)
        parts = reference.name.split("/")
        if reference.type != "compose_lock" and parts[0] in RESERVED_NAMES:
            raise InvalidTaskError(
                f"config artifact name {reference.name!r} is reserved by the agent; "
                f"choose a name outside {', '.join(RESERVED_NAMES)}"
            )
        # A .stella directory further down may be another stack's.
        if AGENT_DIRECTORY_NAME in parts:
            raise InvalidTaskError(
                f"config artifact name {reference.name!r} contains a "
                f"{AGENT_DIRECTORY_NAME} directory, which the agent keeps for "
                "itself; rename it"
            )


def _release_files(
    artifacts: list[Artifact],
) -> tuple[list[tuple[str, bytes, int]], list[ReleaseFile]]:
    """Map artifacts to release files: the compose_lock artifact is written as
    the lock file, config artifacts under their own names."""
    files = []
    records = []
    for artifact in artifacts:
        name = LOCK_FILE_NAME if artifact.type == "compose_lock" else artifact.name
        files.append((name, artifact.content, artifact.mode))
        records.append(
            ReleaseFile(name=name, mode=artifact.mode, sha256=artifact.sha256)
        )
    return files, records


def _seconds(duration: Duration) -> float:
    return duration.seconds + duration.nanos / 1e9
