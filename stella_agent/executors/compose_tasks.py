"""The Compose executor's tasks other than deploy and rollback, and its hooks.

A stack's containers are found by the ``com.docker.compose.project`` label of
its project (``project_name_for(stack_name)``), so these tasks need neither
the Compose binary nor the lock file:

- health-check: every container of every service, judged like the Docker
  executor's health-check (see ``health_check``). A one-shot container that
  exited with code 0 and has restart policy "no" counts as completed, which
  is healthy. A probe needs ``probe.service`` and runs in the network
  namespace of that service's first running container.
- inspect: the containers by service (environment values masked), the live
  and the backed-up release records without their environment, the stack's
  ``version.json`` and, when the task names one, the sticker at that location.
- execute-command: runs in a container of ``service``; ``container_name``,
  when set, picks one of that service's containers.
- upload-files, write-sticker, read-sticker: the same as on the Docker
  executor, because they name a container, a host directory or a sticker
  location, not a stack.

Hooks of a Compose deploy run in the sandbox of ``hooks`` with the release's
files mounted read-only at /deploy. Both hooks get the staging snapshot's
copy, never the live deployment directory, whose ``.stella/`` holds the
environment of earlier releases.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stella.agent.v1 import task_pb2
from stella_agent.errors import InvalidTaskError, NotFoundError, TaskError
from stella_agent.executors import commands, files, stickers
from stella_agent.executors.base import Outcome, TaskContext
from stella_agent.executors.compose_stack import (
    StackPaths,
    check_agent_directories,
    project_name_for,
    read_release,
    resolve_stack_directory,
)
from stella_agent.executors.compose_verify import SERVICE_LABEL, project_containers
from stella_agent.executors.containers import is_running
from stella_agent.executors.docker import docker_client, run_in_worker
from stella_agent.executors.docker_errors import DOCKER_EXCEPTIONS, docker_error
from stella_agent.executors.health_check import (
    container_health,
    health_outcome,
    parse_probe,
    run_probe,
    verdict,
)
from stella_agent.executors.hooks import HOOK_STAGES, SandboxHookRunner
from stella_agent.executors.inspect import describe, sticker_report
from stella_agent.executors.stickers import InvalidStickerError, parse_sticker

NUMBER_LABEL = "com.docker.compose.container-number"
STATUS_ORDER = ("stopped", "unhealthy", "starting")
"""Statuses that make a stack unhealthy, worst first. The first one that any
container has becomes the stack's status."""

_HOOK_RUNNER = SandboxHookRunner()

SUPPORTED_TYPES = (
    task_pb2.TASK_TYPE_HEALTH_CHECK,
    task_pb2.TASK_TYPE_INSPECT,
    task_pb2.TASK_TYPE_EXECUTE_COMMAND,
    task_pb2.TASK_TYPE_UPLOAD_FILES,
    task_pb2.TASK_TYPE_WRITE_STICKER,
    task_pb2.TASK_TYPE_READ_STICKER,
)
"""Task types ``run_task`` handles."""


async def run_task(context: TaskContext) -> Outcome:
    """Run a health-check, inspect, execute-command, upload-files,
    write-sticker or read-sticker task of the Compose executor."""
    handlers: dict[int, Callable[[TaskContext, Any], Outcome]] = {
        task_pb2.TASK_TYPE_HEALTH_CHECK: check_stack,
        task_pb2.TASK_TYPE_INSPECT: inspect_stack,
        task_pb2.TASK_TYPE_EXECUTE_COMMAND: execute_in_service,
        task_pb2.TASK_TYPE_UPLOAD_FILES: files.upload_files,
        task_pb2.TASK_TYPE_WRITE_STICKER: stickers.write_sticker_task,
        task_pb2.TASK_TYPE_READ_STICKER: stickers.read_sticker_task,
    }
    handler = handlers[context.task.type]

    def blocking(context: TaskContext) -> Outcome:
        return handler(context, docker_client(context))

    return await run_in_worker(context, blocking)


# Hooks


def validate_hooks(context: TaskContext, hooks: task_pb2.DeployHooks) -> None:
    """Check a Compose deploy's hooks before anything else happens."""
    for stage in HOOK_STAGES:
        if hooks.HasField(stage):
            _HOOK_RUNNER.validate(context, getattr(hooks, stage), stage)


async def run_hook(
    context: TaskContext, hooks: task_pb2.DeployHooks, stage: str, directory: Path
) -> None:
    """Run the hook of `stage`, if the deploy has one; raise HookFailedError."""
    if not hooks.HasField(stage):
        return
    context.set_phase(stage.replace("_", "-"))
    hook = getattr(hooks, stage)

    def blocking(context: TaskContext) -> None:
        _HOOK_RUNNER(
            context,
            hook,
            stage,
            deployment_directory=directory,
            client=docker_client(context),
        )

    await run_in_worker(context, blocking)


async def write_stack_sticker(
    context: TaskContext,
    requested: task_pb2.StickerConfig,
    *,
    project_name: str,
    release_id: str,
    release_name: str,
    service_digests: dict[str, str],
) -> dict[str, str]:
    """Write the sticker of a live stack to the location the task names.

    Returns outputs; a failure is reported in ``sticker_error``, not raised,
    because the release already runs healthy.
    """
    sticker = task_pb2.VersionSticker(
        release_id=release_id,
        release_name=release_name,
        task_id=context.task.id,
        project_name=project_name,
        service_digests=service_digests,
    )
    sticker.deployed_at.GetCurrentTime()

    def blocking(context: TaskContext) -> dict[str, str]:
        try:
            location = stickers.resolve_location(requested, context.config)
            stickers.write_sticker(context, docker_client(context), location, sticker)
        except TaskError as exc:
            context.log.info("writing the version sticker failed: %s", exc.message)
            return {"sticker_error": exc.message}
        return location.outputs()

    return await run_in_worker(context, blocking)


# health-check


def check_stack(context: TaskContext, client: Any) -> Outcome:
    """Run a health-check task on a stack."""
    payload = context.task.health_check
    context.set_phase("validate")
    project = project_name_for(payload.stack_name)
    probe = None
    if payload.HasField("probe"):
        probe = parse_probe(payload.probe)
        if not payload.probe.service:
            raise InvalidTaskError(
                "health_check.probe.service is required for a stack: name the "
                "service whose network namespace the probe runs in"
            )

    context.set_phase("health")
    containers = _containers(client, project, payload.stack_name)
    services: dict[str, list[dict[str, Any]]] = {}
    for container in containers:
        report = container_health(container.attrs)
        report["status"] = _container_status(container.attrs, report)
        services.setdefault(container.labels.get(SERVICE_LABEL, ""), []).append(report)
    probe_report = None
    if probe is not None:
        probe_report = _probe_service(
            context, client, services, payload.probe.service, probe
        )

    statuses = [report["status"] for group in services.values() for report in group]
    status = next((s for s in STATUS_ORDER if s in statuses), "healthy")
    report = {
        "stack_name": payload.stack_name,
        "project_name": project,
        "status": status,
        "services": services,
        "problem": "; ".join(
            f"{report['container_name']} is {report['status']}"
            for group in services.values()
            for report in group
            if report["status"] in STATUS_ORDER
        ),
    }
    if probe_report is not None:
        report["probe"] = probe_report
    context.log.info("stack %s is %s", payload.stack_name, status)
    outcome = health_outcome(f"stack {payload.stack_name}", report)
    outcome.outputs["project_name"] = project
    for name, group in sorted(services.items()):
        outcome.outputs[f"service.{name}"] = _service_status(group)
    return outcome


def _service_status(group: list[dict[str, Any]]) -> str:
    statuses = [report["status"] for report in group]
    worst = next((status for status in STATUS_ORDER if status in statuses), "")
    if worst:
        return worst
    return "completed" if set(statuses) == {"completed"} else "healthy"


def _container_status(attrs: Any, report: dict[str, Any]) -> str:
    state = attrs.get("State") or {}
    policy = ((attrs.get("HostConfig") or {}).get("RestartPolicy") or {}).get("Name")
    one_shot_done = state.get("Status") == "exited" and state.get("ExitCode") == 0
    if one_shot_done and policy in ("", "no", None):
        return "completed"
    return verdict(report)


def _probe_service(
    context: TaskContext,
    client: Any,
    services: dict[str, list[dict[str, Any]]],
    service: str,
    probe: Any,
) -> dict[str, Any]:
    """Run the probe in the service's first running container and return
    its result, which is also added to that container's report."""
    group = services.get(service)
    if not group:
        raise NotFoundError(f"service {service} has no containers in this stack")
    running = [report for report in group if report["running"]]
    if not running:
        failed = {"passed": False, "detail": "no container is running"}
        group[0]["probe"] = failed
        group[0]["status"] = "unhealthy"
        return failed
    target = running[0]
    target["probe"] = run_probe(context, client, target["container_id"], probe)
    target["status"] = verdict(target)
    return dict(target["probe"])


# inspect


def inspect_stack(context: TaskContext, client: Any) -> Outcome:
    """Run an inspect task on a stack."""
    payload = context.task.inspect
    context.set_phase("validate")
    project = project_name_for(payload.stack_name)
    directory = resolve_stack_directory(
        context.config, project, payload.deployment_directory
    )
    paths = StackPaths(directory)
    check_agent_directories(paths)

    context.set_phase("inspect")
    try:
        containers = project_containers(client, project)
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"list the containers of project {project}") from None
    live = _release_summary(paths.release_file)
    if not containers and live is None:
        raise NotFoundError(
            f"stack {payload.stack_name} (project {project}) has no containers and "
            f"no release in {directory}"
        )
    services: dict[str, list[dict[str, Any]]] = {}
    for container in containers:
        service = container.labels.get(SERVICE_LABEL, "")
        services.setdefault(service, []).append(describe(client, container.attrs))

    report: dict[str, Any] = {
        "stack_name": payload.stack_name,
        "project_name": project,
        "deployment_directory": str(directory),
        "services": services,
        "release": live,
        "previous_release": _release_summary(paths.backup / "release.json"),
        "version_file": _version_file(paths.version_file),
    }
    if payload.HasField("sticker"):
        location = stickers.resolve_location(payload.sticker, context.config)
        report.update(sticker_report(context, client, location))

    outputs = {
        "report": json.dumps(report, sort_keys=True),
        "project_name": project,
        "deployment_directory": str(directory),
        "services": ",".join(sorted(services)),
        "release_id": (live or {}).get("release_id", ""),
    }
    context.log.info(
        "inspected stack %s: %d services", payload.stack_name, len(services)
    )
    return Outcome(outputs=outputs)


def _release_summary(record_file: Path) -> dict[str, Any] | None:
    """Return a release record without its environment, which may hold
    secrets, or None when there is none."""
    record = read_release(record_file)
    if record is None:
        return None
    return {
        "release_id": record.release_id,
        "release_name": record.release_name,
        "task_id": record.task_id,
        "deployed_at": record.deployed_at,
        "expected_digests": dict(record.expected_digests),
        "files": [{"name": item.name, "sha256": item.sha256} for item in record.files],
        "environment": sorted(record.environment),
    }


def _version_file(path: Path) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return stickers.sticker_document(parse_sticker(data, str(path)))
    except InvalidStickerError as exc:
        return {"error": exc.message}


# execute-command


def execute_in_service(context: TaskContext, client: Any) -> Outcome:
    """Run an execute-command task in a container of a stack's service."""
    payload = context.task.execute_command
    context.set_phase("validate")
    argv = commands.validate_argv(payload.argv, "execute_command.argv")
    environment = commands.validate_environment(
        payload.environment, "execute_command.environment"
    )
    timeout = commands.command_timeout(context)
    if payload.on_host:
        return commands.run_host_command(context, argv, environment, timeout)

    if not payload.service:
        raise InvalidTaskError(
            "execute_command.service is required for the Compose executor"
        )
    project = project_name_for(payload.stack_name)
    candidates = [
        container
        for container in _containers(client, project, payload.stack_name)
        if container.labels.get(SERVICE_LABEL) == payload.service
    ]
    if payload.container_name:
        candidates = [c for c in candidates if c.name == payload.container_name]

    running = [c for c in candidates if is_running(c)]
    if not running:
        which = payload.container_name or f"service {payload.service}"
        raise NotFoundError(
            f"no running container of {which} in stack {payload.stack_name}"
        )
    running.sort(key=lambda c: int(c.labels.get(NUMBER_LABEL) or 0))
    return commands.run_container_command(
        context, client, running[0], argv, environment, timeout
    )


def _containers(client: Any, project: str, stack_name: str) -> list[Any]:
    try:
        containers = project_containers(client, project)
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"list the containers of project {project}") from None
    if not containers:
        raise NotFoundError(f"stack {stack_name} (project {project}) has no containers")
    return containers
