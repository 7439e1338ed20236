"""The steps a Compose task takes on one stack, and the boundaries they cross.

``StackSteps`` belongs to one task on one stack. Its methods are the steps that
deploy, rollback and recovery share: resolve the model, pull, up, wait for
health, take down, write the sticker. Every call into Compose, the Docker SDK
and the disk goes through one of three boundaries here (``compose``,
``docker``, ``disk``), which map third-party errors to ``TaskError``s.

A step is either forward (part of the requested change) or recovery (bringing
the previous release back). Forward steps end on cancellation and at the task
deadline. Recovery steps ignore both and are bounded only by their own
timeouts, so that they can finish after the deadline that caused them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from google.protobuf.timestamp_pb2 import Timestamp

from stella_agent.errors import (
    ComposeError,
    DigestMismatchError,
    DockerError,
    InvalidTaskError,
    NotFoundError,
)
from stella_agent.executors.base import TaskContext
from stella_agent.executors.compose_directories import (
    check_stack_directory,
    register_stack_directory,
)
from stella_agent.executors.compose_health import read_project_states, wait_for_health
from stella_agent.executors.compose_runner import (
    CommandResult,
    ComposeCommand,
    ComposeRunner,
    compose_environment,
    process_start_time,
)
from stella_agent.executors.compose_stack import (
    ENV_FILE_NAME,
    LOCK_FILE_NAME,
    PRIVATE_DIRECTORY_MODE,
    ReleaseRecord,
    StackLock,
    StackPaths,
    StackStateError,
    Switch,
    check_agent_directories,
    check_claim,
    claim,
    project_name_for,
    read_claim,
    resolve_stack_directory,
    restore,
    tidy,
    validate_stack_name,
)
from stella_agent.executors.compose_sticker import write_version_file
from stella_agent.executors.compose_verify import (
    WORKING_DIR_LABEL,
    ServicePlan,
    check_running_images,
    ensure_image,
    missing_containers,
    project_containers,
    verify_model,
)

Result = TypeVar("Result")


class StackSteps:
    """The steps of one task on one stack."""

    def __init__(
        self,
        context: TaskContext,
        runner: ComposeRunner,
        compose: ComposeCommand,
        stack_name: str,
        project: str,
        paths: StackPaths,
    ) -> None:
        self.context = context
        self.client = context.docker
        self.runner = runner
        self.compose_command = compose
        self.stack_name = stack_name
        self.project = project
        self.paths = paths

    @classmethod
    async def open(
        cls,
        context: TaskContext,
        runner: ComposeRunner,
        stack_name: str,
        requested_directory: str,
    ) -> StackSteps:
        """Find the stack's directory and Compose, and check that the project
        belongs to this stack. Writes nothing to the stack; notes the project
        and directory for crash recovery."""
        stack_name = validate_stack_name(stack_name)
        project = project_name_for(stack_name)
        directory = resolve_stack_directory(
            context.config, project, requested_directory
        )
        paths = StackPaths(directory)
        context.note(
            stack_name=stack_name,
            project_name=project,
            deployment_directory=str(directory),
        )
        await disk(check_stack_directory, context.config, stack_name, directory)
        await disk(check_agent_directories, paths)
        await disk(check_claim, paths, stack_name, project)

        if context.docker is None:
            context.docker = await docker_call(docker.from_env)
        compose = await runner.discover(compose_environment_of(context, {}))
        context.log.info(
            "stack %s: project %s in %s, Compose %s",
            stack_name,
            project,
            directory,
            compose.version,
        )

        # A project started from another directory belongs to someone else,
        # and --remove-orphans would remove its containers.
        containers = await docker_call(project_containers, context.docker, project)
        directories = {c.labels.get(WORKING_DIR_LABEL, "") for c in containers}
        elsewhere = directories - {str(directory)}
        if elsewhere:
            raise InvalidTaskError(
                f"Compose project {project!r} already has containers started from "
                f"{', '.join(sorted(elsewhere))}, not from {directory}; remove "
                "that project or rename the stack",
                error_type="conflict",
            )
        return cls(context, runner, compose, stack_name, project, paths)

    @contextlib.asynccontextmanager
    async def locked(
        self, *, create: bool, tidy_first: bool = True
    ) -> AsyncIterator[None]:
        """Hold the stack's lock; with `create`, claim the directory first.

        With `tidy_first`, what an interrupted task left behind is put back
        first; crash recovery passes False and reads those leftovers itself.
        """
        paths = self.paths
        if not create and await disk(read_claim, paths) is None:
            raise NotFoundError(
                f"stack {self.stack_name!r} was never deployed in {paths.directory}"
            )
        if create:
            await disk(
                register_stack_directory,
                self.context.config,
                self.stack_name,
                paths.directory,
            )
        await disk(check_agent_directories, paths)
        await disk(paths.agent_directory.mkdir, PRIVATE_DIRECTORY_MODE, True, True)
        await disk(check_agent_directories, paths)
        lock = StackLock(paths)
        await disk(lock.acquire)
        try:
            await disk(claim, paths, self.stack_name, self.project)
            if tidy_first:
                await disk(tidy, paths)
            yield
        finally:
            lock.release()

    async def resolved_model(
        self,
        files_directory: Path,
        record: ReleaseRecord,
        *,
        forward: bool = True,
    ) -> dict[str, Any]:
        """Return the effective model of the lock file in `files_directory`."""
        result = await self.compose(
            ["config", "--format", "json"],
            files_directory,
            record,
            forward=forward,
            capture_stdout=True,
        )
        if result.returncode != 0:
            summary = stderr_summary(result)
            raise InvalidTaskError(
                f"docker compose config rejected the lock file: {summary}"
            )
        try:
            model = json.loads(result.stdout)
        except ValueError as exc:
            # Compose 2.40.3 exits 0 with nothing on stdout for some invalid
            # files (an invalid port, say) and names the problem on stderr.
            if result.stderr_tail.strip():
                raise InvalidTaskError(
                    "docker compose config rejected the lock file: "
                    f"{stderr_summary(result)}"
                ) from None
            raise ComposeError(
                f"docker compose config printed invalid JSON: {exc}"
            ) from None
        if not isinstance(model, dict):
            raise ComposeError(
                "docker compose config printed JSON that is not an object"
            )
        return model

    async def pull(
        self, plans: Mapping[str, ServicePlan], *, forward: bool
    ) -> dict[str, str]:
        """Make every service's image present and return the image ids by service."""
        context = self.context
        started = time.monotonic()
        by_reference: dict[str, str] = {}
        image_ids = {}
        for name, plan in sorted(plans.items()):
            reference = plan.pull_reference
            if reference not in by_reference:
                auth = context.registry_auth(plan.repository)
                by_reference[reference] = await docker_call(
                    ensure_image, self.client, plan, auth, context.log
                )
                if forward:
                    context.checkpoint()
            image_ids[name] = by_reference[reference]
        if forward:
            context.metrics.pull_duration_ms = int((time.monotonic() - started) * 1000)
        return image_ids

    async def up(
        self,
        record: ReleaseRecord,
        plans: Mapping[str, ServicePlan],
        image_ids: Mapping[str, str],
        *,
        forward: bool,
    ) -> None:
        """Check the live model, run ``up``, check that it created every
        container, and check their images."""
        # The live directory is resolved again and must give the plans that
        # were verified, because a file that only the live directory has
        # would otherwise change what ``up`` runs.
        live_model = await self.resolved_model(
            self.paths.directory, record, forward=forward
        )
        live_plans = verify_model(live_model, record.expected_digests)
        if live_plans != dict(plans):
            raise DigestMismatchError(
                f"the release resolves differently in {self.paths.directory} than "
                "when it was verified (possible tampering); up was not run"
            )
        arguments = [
            "up",
            "--detach",
            "--remove-orphans",
            "--force-recreate",
            "--pull",
            "never",
            "--no-build",
            "--timeout",
            str(self.context.config.docker.stop_timeout_seconds),
        ]
        await self.compose_checked(arguments, record, forward=forward)

        # Compose can exit 0 after it printed an engine error for one service
        # (seen with 2.40.3 when a container was removed while it was being
        # recreated), so its exit status alone does not prove convergence.
        missing = await docker_call(
            missing_containers, self.client, self.project, plans, image_ids
        )
        if missing:
            raise ComposeError(
                "docker compose up exited 0 but left the project incomplete: "
                + "; ".join(missing)
            )
        await docker_call(
            check_running_images, self.client, self.project, plans, image_ids
        )

    async def take_down(self, record: ReleaseRecord) -> None:
        """Run ``down`` on the project. Volumes are kept, because they may hold data."""
        arguments = [
            "down",
            "--remove-orphans",
            "--timeout",
            str(self.context.config.docker.stop_timeout_seconds),
        ]
        await self.compose_checked(arguments, record, forward=False)

    async def wait_for_health(
        self,
        plans: Mapping[str, ServicePlan],
        record: ReleaseRecord,
        *,
        forward: bool,
    ) -> dict[str, str]:
        """Wait until every service is healthy and return each service's verdict."""
        context = self.context
        tasks_config = context.config.tasks
        timeout = record.health_timeout_seconds or tasks_config.health_timeout_seconds
        settle = record.settle_seconds or tasks_config.settle_seconds
        if forward:
            timeout = context.remaining(timeout)

        async def read_states() -> Any:
            return await docker_call(read_project_states, self.client, self.project)

        return await wait_for_health(
            plans,
            read_states,
            timeout=timeout,
            settle_seconds=settle,
            log=context.log,
            checkpoint=context.checkpoint if forward else _no_checkpoint,
        )

    async def verify_live(
        self, record: ReleaseRecord
    ) -> tuple[dict[str, ServicePlan], dict[str, str]]:
        """Check that the live release `record` runs healthy, changing nothing;
        return its plans and each service's verdict."""
        model = await self.resolved_model(self.paths.directory, record, forward=False)
        plans = verify_model(model, record.expected_digests)
        verdicts = await self.wait_for_health(plans, record, forward=False)
        return plans, verdicts

    async def bring_up(
        self, record: ReleaseRecord, *, take_down_first: bool = False
    ) -> dict[str, str]:
        """Bring the live release `record` up again, verified, and return each
        service's verdict. A recovery step: no cancellation, no deadline.

        With `take_down_first`, the project is taken down before ``up``. Crash
        recovery needs it because a killed ``up`` can leave containers under
        temporary names (``<id>_<name>``), and a later ``up`` fails on them
        with a name conflict (seen with Compose 2.40.3).
        """
        if take_down_first:
            await self.take_down(record)
        model = await self.resolved_model(self.paths.directory, record, forward=False)
        plans = verify_model(model, record.expected_digests)
        image_ids = await self.pull(plans, forward=False)
        await self.up(record, plans, image_ids, forward=False)
        verdicts = await self.wait_for_health(plans, record, forward=False)
        await self.write_sticker(record, plans)
        return verdicts

    async def restore_previous(
        self, switch: Switch, failed: ReleaseRecord, *, take_down_first: bool = False
    ) -> str:
        """Undo `switch` after the release `failed` went live, and return a
        sentence saying what runs now.

        The backup's files go live again and that release is brought up,
        verified. Without a previous release, the project is taken down and
        its files are removed. Raises a TaskError when that fails.
        `take_down_first` is passed to ``bring_up``.
        """
        if switch.previous is None:
            await self.take_down(failed)
            await disk(restore, self.paths, switch)
            await disk(self.paths.version_file.unlink, True)
            return "there was no previous release, so the failed one was taken down"
        await disk(restore, self.paths, switch)
        await self.bring_up(switch.previous, take_down_first=take_down_first)
        release = switch.previous.release_id or "without id"
        return f"the previous release ({release}) was restored and is running"

    async def write_sticker(
        self, record: ReleaseRecord, plans: Mapping[str, ServicePlan]
    ) -> None:
        """Write version.json for the release that is now live."""
        await disk(
            write_version_file,
            self.paths.version_file,
            release_id=record.release_id,
            release_name=record.release_name,
            task_id=self.context.task.id,
            deployed_at=now_rfc3339(),
            project_name=self.project,
            service_digests={name: plan.digest for name, plan in plans.items()},
        )

    async def compose_checked(
        self, arguments: list[str], record: ReleaseRecord, *, forward: bool
    ) -> None:
        """Run a Compose command in the deployment directory and raise on a
        non-zero exit status."""
        result = await self.compose(
            arguments, self.paths.directory, record, forward=forward
        )
        if result.returncode != 0:
            raise ComposeError(
                f"docker compose {arguments[0]} failed with exit status "
                f"{result.returncode}: {stderr_summary(result)}"
            )

    async def compose(
        self,
        arguments: list[str],
        directory: Path,
        record: ReleaseRecord,
        *,
        forward: bool,
        capture_stdout: bool = False,
    ) -> CommandResult:
        """Run one Compose command on the project, with the lock file in `directory`.

        Compose gets its project directory, lock file and environment file
        explicitly, so it reads the same inputs in the staging snapshot and
        in the live directory: the release's own ``.env`` when the release
        lists one, else an empty one.
        """
        context = self.context
        argv = self.compose_command.argv
        compose_file = directory / LOCK_FILE_NAME
        env_file = os.devnull
        if any(item.name == ENV_FILE_NAME for item in record.files):
            env_file = str(directory / ENV_FILE_NAME)
        options = [
            "--project-name",
            self.project,
            "--project-directory",
            str(directory),
            "--file",
            str(compose_file),
            "--env-file",
            env_file,
        ]

        def note_process(pid: int) -> None:
            # Compose runs in its own session and outlives an agent killed
            # with SIGKILL; recovery stops it by this pid and start time.
            context.note(compose_pid=str(pid), compose_started=process_start_time(pid))

        context.log.info("$ %s %s", " ".join((*argv, *options)), " ".join(arguments))
        return await self.runner.run(
            argv,
            [*options, *arguments],
            cwd=str(directory),
            environment=compose_environment_of(context, record.environment),
            log=context.log,
            timeout=context.config.compose.command_timeout_seconds,
            deadline=context.deadline if forward else None,
            cancel_event=context.cancel_event if forward else None,
            capture_stdout=capture_stdout,
            description=f"docker compose {arguments[0]}",
            on_start=note_process,
        )


def release_outputs(
    steps: StackSteps,
    record: ReleaseRecord,
    previous: ReleaseRecord | None,
    verdicts: Mapping[str, str],
) -> dict[str, str]:
    """Return the outputs of a deploy or rollback that made `record` live."""
    outputs = {
        "project_name": steps.project,
        "deployment_directory": str(steps.paths.directory),
        "compose_version": steps.compose_command.version,
        "release_id": record.release_id,
    }
    if previous is not None:
        outputs["previous_release_id"] = previous.release_id
    for name, verdict in verdicts.items():
        outputs[f"service.{name}"] = verdict
    return outputs


def compose_environment_of(
    context: TaskContext, task_environment: Mapping[str, str]
) -> dict[str, str]:
    """Return the environment of a Compose command of this task."""
    return compose_environment(os.environ, context.config.docker.host, task_environment)


async def docker_call(function: Callable[..., Result], *args: Any) -> Result:
    """Run a blocking Docker SDK call in a worker thread, mapping its errors."""
    try:
        return await asyncio.to_thread(function, *args)
    except docker.errors.DockerException as exc:
        raise DockerError(f"Docker Engine error: {exc}") from None
    except requests.exceptions.RequestException as exc:
        raise DockerError(
            f"cannot reach Docker Engine: {exc}", retriable=True
        ) from None


async def disk(function: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
    """Run a blocking file operation in a worker thread, mapping OS errors."""
    try:
        return await asyncio.to_thread(function, *args, **kwargs)
    except OSError as exc:
        raise StackStateError(
            f"file operation on the stack directory failed: {exc}"
        ) from None


def stderr_summary(result: CommandResult) -> str:
    """Return the last lines of a command's stderr, joined on one line."""
    lines = result.stderr_tail.strip().splitlines()
    return " | ".join(lines[-5:]) or "no error output"


def now_rfc3339() -> str:
    """Return the current time in RFC 3339 form with a Z suffix."""
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp.ToJsonString()


def _no_checkpoint() -> None:
    return None
