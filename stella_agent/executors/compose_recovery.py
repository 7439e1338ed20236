"""Recovery of a Compose deploy or rollback that an agent crash interrupted.

Before each risky step the flows write notes to the journal: the stack and
project, which release the switch makes live (``switch_to``) and which one it
replaces (``switch_from``), both as ``ReleaseRecord.key``, then
``files_switched`` after ``promote`` and ``up_started`` before ``up``. Every
Compose command also notes its pid. After a restart the runner calls
``ComposeExecutor.recover`` with those notes and the phase the task was in:

- before ``up`` (prepare, artifacts, verify, pull, pre-deploy), nothing live
  had changed: the staging snapshot is dropped and the task is reported
  ``interrupted``;
- in ``sticker`` the new release had been declared healthy: if it still is,
  the switch is finished and the task succeeds with ``recovered=true``;
- otherwise the previous release's files go live again and it is brought up,
  verified, as after a failed health check, or, with no previous release, the
  project is taken down. The task is reported ``interrupted`` (retriable).

The release record on disk decides what happened, not the notes alone,
because ``promote`` writes the new record last: a crash between a step and
its note cannot mislead recovery.

The stack lock is an ``flock`` that the kernel releases when the process
holding it dies, so a crashed agent never leaves the stack locked.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from stella.agent.v1 import task_pb2
from stella_agent.errors import (
    HealthCheckFailedError,
    RollbackFailedError,
    TaskError,
)
from stella_agent.executors import compose_tasks
from stella_agent.executors.base import Outcome, TaskContext
from stella_agent.executors.compose_runner import ComposeRunner, kill_orphaned_command
from stella_agent.executors.compose_stack import (
    ReleaseRecord,
    StackLock,
    StackPaths,
    StackStateError,
    Switch,
    check_agent_directories,
    commit,
    project_name_for,
    read_release,
    resolve_stack_directory,
    restore,
    tidy,
    undo_unfinished_promote,
)
from stella_agent.executors.compose_steps import StackSteps, disk, release_outputs
from stella_agent.executors.sandbox import remove_task_sandboxes
from stella_agent.tasks import type_name

INTERRUPTED = "interrupted"

HEALTHY_PHASES = frozenset({"sticker", "finalize"})
"""Phases that start once every service of the new release was healthy."""


async def recover_stack(
    context: TaskContext, runner: ComposeRunner, phase: str
) -> Outcome:
    """Bring the stack of an interrupted task to one consistent release."""
    context.log.info("recovering after a restart during phase %s", phase or "start")
    await _stop_orphaned_compose(context)
    if context.docker is not None:
        await asyncio.to_thread(remove_task_sandboxes, context, context.docker)

    task_type = context.task.type
    if task_type not in (task_pb2.TASK_TYPE_DEPLOY, task_pb2.TASK_TYPE_ROLLBACK):
        raise _interrupted(
            phase,
            f"a {type_name(task_type)} task changes no release, so there was "
            "nothing to restore; check what it did before the restart",
            rolled_back=False,
        )

    stack_name, requested_directory = _stack_of(context.task)
    # The switch notes are written in phase "up" before anything live
    # changes, so without them nothing had.
    if "switch_to" not in context.notes:
        await _tidy_untouched(context, stack_name, requested_directory)
        raise _interrupted(
            phase,
            "it had not changed anything live yet, so nothing changed",
            rolled_back=False,
        )

    steps = await StackSteps.open(context, runner, stack_name, requested_directory)
    async with steps.locked(create=False, tidy_first=False):
        return await _recover_switch(steps, phase)


async def _recover_switch(steps: StackSteps, phase: str) -> Outcome:
    """Finish or undo the switch the task had started."""
    context = steps.context
    paths = steps.paths
    target = context.notes["switch_to"]
    replaced = context.notes.get("switch_from", "")
    live = await disk(read_release, paths.release_file)
    live_key = live.key if live is not None else ""

    if live is not None and live_key == target:
        previous = await _backup_of(paths, replaced)
        if phase in HEALTHY_PHASES:
            try:
                return await _finish(steps, live, previous)
            except HealthCheckFailedError as exc:
                context.log.info(
                    "the new release is no longer healthy (%s); restoring the "
                    "previous release",
                    exc.message,
                )
        context.set_phase("rollback")
        switch = Switch(previous=previous)
        try:
            if previous is not None and context.notes.get("up_started") != "true":
                # Only the files had switched: the previous release's
                # containers still run and are not recreated.
                await disk(restore, paths, switch)
                await _ensure_running(steps, previous, phase)
                release = previous.release_id or "without id"
                outcome = (
                    f"the previous release ({release}) was restored and is running"
                )
            else:
                outcome = await steps.restore_previous(
                    switch, live, take_down_first=True
                )
        except TaskError as exc:
            raise _restore_failed(phase, exc) from None
        context.log.info("%s", outcome)
        raise _interrupted(phase, outcome, rolled_back=previous is not None)

    if live_key != replaced:
        raise StackStateError(
            f"the live release in {paths.directory} is {live_key or 'none'}, neither "
            f"the release this task switched to ({target}) nor the one it replaced "
            f"({replaced or 'none'}); inspect the stack and deploy it again",
            phase=phase,
        )

    # The new release never went live, or its files were already restored.
    context.set_phase("rollback")
    await disk(undo_unfinished_promote, paths, live)
    if live is None:
        raise _interrupted(
            phase,
            "there was no previous release and the new one never went live, so "
            "nothing runs",
            rolled_back=False,
        )
    try:
        await _ensure_running(steps, live, phase)
    except TaskError as exc:
        raise _restore_failed(phase, exc) from None
    release = live.release_id or "without id"
    outcome = f"the previous release ({release}) was restored and is running"
    context.log.info("%s", outcome)
    raise _interrupted(phase, outcome, rolled_back=True)


async def _finish(
    steps: StackSteps, live: ReleaseRecord, previous: ReleaseRecord | None
) -> Outcome:
    """Check that the release declared healthy still is, and finish the switch."""
    context = steps.context
    context.log.info(
        "release %s was declared healthy before the restart; checking it again",
        live.release_id or "without id",
    )
    plans, verdicts = await steps.verify_live(live)
    await steps.write_sticker(live, plans)
    await disk(commit, steps.paths)
    outputs = release_outputs(steps, live, previous, verdicts)
    outputs["recovered"] = "true"
    config = _config_of(context.task)
    if config.HasField("sticker"):
        outputs.update(
            await compose_tasks.write_stack_sticker(
                context,
                config.sticker,
                project_name=live.project_name,
                release_id=live.release_id,
                release_name=live.release_name,
                service_digests={name: plan.digest for name, plan in plans.items()},
            )
        )
    context.log.info("the release is healthy; finished the task's switch")
    return Outcome(outputs=outputs)


async def _ensure_running(steps: StackSteps, live: ReleaseRecord, phase: str) -> None:
    """Make sure the live, previous release runs healthy.

    When ``up`` never ran for the new release, the previous release's
    containers were never touched and only their health is checked; they are
    brought up again only if that check fails.
    """
    notes = steps.context.notes
    if notes.get("up_started") != "true" and phase != "rollback":
        try:
            await steps.verify_live(live)
            return
        except HealthCheckFailedError as exc:
            steps.context.log.info(
                "the previous release is not healthy (%s); bringing it up again",
                exc.message,
            )
    await steps.bring_up(live, take_down_first=True)


async def _backup_of(paths: StackPaths, replaced: str) -> ReleaseRecord | None:
    """Return the backup's record when the task replaced a release, after
    checking that the backup is that release."""
    if not replaced:
        return None
    backup = await disk(read_release, paths.backup / "release.json")
    if backup is None or backup.key != replaced:
        found = backup.key if backup is not None else "no backup"
        raise RollbackFailedError(
            f"the agent restarted during a switch, and the backup in {paths.backup} "
            f"is not the release that was live before ({replaced}, found {found}); "
            "deploy the previous release again",
            phase="rollback",
        )
    return backup


async def _tidy_untouched(
    context: TaskContext, stack_name: str, requested_directory: str
) -> None:
    """Drop the staging snapshot of a task that changed nothing live."""
    directory = context.notes.get("deployment_directory")
    if not directory:
        try:
            project = project_name_for(stack_name)
            path = resolve_stack_directory(context.config, project, requested_directory)
        except TaskError:
            return  # invalid task: it never got as far as the disk
        directory = str(path)
    paths = StackPaths(Path(directory))
    await disk(check_agent_directories, paths)
    if not await disk(paths.agent_directory.is_dir):
        return
    lock = StackLock(paths)
    await disk(lock.acquire)
    try:
        await disk(tidy, paths)
    finally:
        lock.release()


async def _stop_orphaned_compose(context: TaskContext) -> None:
    """Kill the last Compose command of the task if it still runs."""
    pid = context.notes.get("compose_pid", "")
    started = context.notes.get("compose_started", "")
    if not pid.isdigit():
        return
    if await asyncio.to_thread(kill_orphaned_command, int(pid), started):
        context.log.info(
            "killed docker compose (pid %s), which the agent started before it "
            "restarted",
            pid,
        )


def _stack_of(task: task_pb2.AgentTask) -> tuple[str, str]:
    if task.type == task_pb2.TASK_TYPE_ROLLBACK:
        return task.rollback.stack_name, task.rollback.deployment_directory
    config = task.deploy.config
    return config.stack_name, config.deployment_directory


def _config_of(task: task_pb2.AgentTask) -> task_pb2.DeployConfig:
    if task.type == task_pb2.TASK_TYPE_ROLLBACK:
        return task.rollback.config
    return task.deploy.config


def _interrupted(phase: str, state: str, *, rolled_back: bool) -> TaskError:
    return TaskError(
        f"the agent restarted during phase {phase or 'start'} of this task, and "
        f"{state}. Send the task again",
        error_type=INTERRUPTED,
        retriable=True,
        phase=phase,
        rolled_back=rolled_back,
    )


def _restore_failed(phase: str, exc: TaskError) -> RollbackFailedError:
    return RollbackFailedError(
        f"the agent restarted during phase {phase or 'start'} of this task, and "
        f"restoring the previous release failed: {exc.message}",
        phase=phase,
    )
