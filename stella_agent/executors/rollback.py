"""The rollback task of the Docker executor, run in a worker thread.

In its simple form a rollback brings back the last healthy release among the
``<name>-previous-<timestamp>`` containers that the agent deployed. Every such
container was healthy when its deploy finished, so the newest one by its
``stella.deployed.at`` label is taken, unless it was unhealthy when a later
deploy set it aside (recorded in its successor's ``stella.replaced.health``
label); then the next older one is tried. The current
container is stopped and renamed ``<name>-failed-<timestamp>``. The previous one
takes the name, starts and must become healthy, and then the replaced container
is removed. If the previous container does not become healthy, the current one
is put back. With ``target_digest`` the rollback is a full deploy of that
digest.
"""

from __future__ import annotations

import time
from typing import Any

from stella.agent.v1 import task_pb2
from stella_agent.errors import (
    InvalidTaskError,
    RollbackFailedError,
    TaskCancelledError,
    TaskError,
    TaskTimeoutError,
)
from stella_agent.executors.base import Outcome, TaskContext
from stella_agent.executors.container_spec import (
    LABEL_DIGEST,
    LABEL_RELEASE_ID,
    HealthWait,
)
from stella_agent.executors.containers import (
    FAILED,
    aside_name,
    copy_output_to_log,
    describe_container,
    find_container,
    find_previous,
    is_running,
    releases_newest_first,
    remove_container,
    rename_container,
    start_and_verify,
    stop_container,
    unhealthy_when_replaced,
)
from stella_agent.executors.deploy import DeployFlow, HookRunner
from stella_agent.executors.health import wait_until_healthy
from stella_agent.tasks import validate_container_name


class RollbackFlow:
    """One rollback of one container to the previous release kept aside."""

    def __init__(
        self, context: TaskContext, client: Any, hook_runner: HookRunner | None = None
    ) -> None:
        self.context = context
        self.client = client
        self.hook_runner = hook_runner
        self.payload = context.task.rollback

    def run(self) -> Outcome:
        """Roll back and return the outputs; raise a TaskError on failure."""
        started = time.monotonic()
        try:
            return self._run()
        finally:
            elapsed_ms = int((time.monotonic() - started) * 1000)
            self.context.metrics.deploy_duration_ms = elapsed_ms

    def _run(self) -> Outcome:
        context = self.context
        context.set_phase("validate")
        name = validate_container_name(self.payload.container_name)
        if self.payload.target_digest:
            return self._deploy_target(name)

        previous = self._choose_previous(name)
        current = find_container(self.client, name)
        context.log.info("rolling %s back to %s", name, previous.name)
        context.checkpoint()

        current_was_running = current is not None and is_running(current)
        replaced_name = aside_name(name, FAILED)
        # Recovery after an agent crash reads these notes to restore the host.
        context.note(
            container_name=name,
            restore_container_id=previous.id,
            restore_name=previous.name,
            replaced_container_id=current.id if current is not None else "",
            replaced_name=replaced_name,
            replaced_was_running=str(current_was_running).lower(),
        )
        if current is not None:
            context.set_phase("stop")
            stop_container(context, current, name)
            context.set_phase("rename")
            try:
                rename_container(context, current, replaced_name)
            except TaskError:
                if current_was_running:
                    start_and_verify(context, current)
                raise

        previous_name = previous.name
        try:
            context.set_phase("rollback")
            rename_container(context, previous, name)
            start_and_verify(context, previous)
            context.set_phase("health")
            wait_until_healthy(context, self.client, previous.id, name, self._wait())
        except Exception as exc:  # noqa: BLE001 - every failure puts current back
            self._undo(name, previous, previous_name, current, current_was_running, exc)

        context.set_phase("finalize")
        if current is not None:
            copy_output_to_log(context, current, f"the replaced container {name}")
            try:
                remove_container(context, current, "the replaced container")
            except TaskError as exc:
                context.log.info("%s; remove it by hand", exc.message)
        context.log.info("rolled %s back to %s", name, previous_name)
        return Outcome(
            outputs={
                "container_id": previous.id,
                "container_name": name,
                "digest": (previous.labels or {}).get(LABEL_DIGEST, ""),
                "previous_digest": _digest_label(current),
                "previous_container_id": current.id if current is not None else "",
                "restored_from": previous_name,
                "changed": "true",
            }
        )

    def _choose_previous(self, name: str) -> Any:
        """Return the last healthy release kept aside; raise RollbackFailedError
        when there is none."""
        candidates = releases_newest_first(find_previous(self.client, name))
        if not candidates:
            raise RollbackFailedError(
                f"no previous container for {name}: nothing named {name}-previous-* "
                "was kept by an earlier deploy; deploy the wanted digest instead",
                phase="validate",
            )
        unhealthy = unhealthy_when_replaced(self.client)
        for candidate in candidates:
            if candidate.id not in unhealthy:
                return candidate
            self.context.log.info(
                "skipping %s (release %s): it was unhealthy when a later deploy "
                "replaced it",
                candidate.name,
                (candidate.labels or {}).get(LABEL_RELEASE_ID) or "without id",
            )
        names = ", ".join(candidate.name for candidate in candidates)
        raise RollbackFailedError(
            f"no healthy previous release of {name}: {names} were unhealthy when "
            "they were replaced; deploy a known good digest instead",
            phase="validate",
        )

    def _wait(self) -> HealthWait:
        tasks = self.context.config.tasks
        return HealthWait(
            timeout_seconds=tasks.health_timeout_seconds,
            settle_seconds=tasks.settle_seconds,
        )

    def _undo(
        self,
        name: str,
        previous: Any,
        previous_name: str,
        current: Any,
        current_was_running: bool,
        error: Exception,
    ) -> None:
        """Set the previous container aside again and restore the current one,
        then raise."""
        context = self.context
        failed_phase = context.phase
        reason = error.message if isinstance(error, TaskError) else str(error)
        context.set_phase("rollback")
        context.log.info("restoring %s failed: %s; undoing", previous_name, reason)
        copy_output_to_log(context, previous, f"the previous container {name}")
        try:
            stop_container(context, previous, name)
            if previous.name != previous_name:
                rename_container(context, previous, previous_name)
            if current is not None:
                rename_container(context, current, name)
                if current_was_running:
                    start_and_verify(context, current)
        except TaskError as undo_error:
            current_state = describe_container(current) if current else "none"
            raise RollbackFailedError(
                f"rollback of {name} to {previous_name} failed during {failed_phase} "
                f"({reason}), and undoing it failed: {undo_error.message}. "
                f"Previous container: {describe_container(previous)}. Replaced "
                f"container: {current_state}. Rename and start them by hand",
                phase=failed_phase,
            ) from error
        if isinstance(error, TaskCancelledError | TaskTimeoutError):
            error.rolled_back = True
            raise error
        raise RollbackFailedError(
            f"rollback of {name} to {previous_name} failed during {failed_phase}: "
            f"{reason}; {name} runs as before",
            phase=failed_phase,
            rolled_back=True,
        ) from error

    def _deploy_target(self, name: str) -> Outcome:
        """Deploy `target_digest` with the full deploy flow."""
        if not self.payload.HasField("config"):
            raise InvalidTaskError(
                "rollback with target_digest needs config: this agent cannot yet "
                "reuse the settings of the running container",
                error_type="unsupported",
            )
        config = task_pb2.DeployConfig()
        config.CopyFrom(self.payload.config)
        config.container_name = name
        payload = task_pb2.DeployPayload(
            image=self.payload.image,
            digest=self.payload.target_digest,
            config=config,
            previous_digest="",
        )
        flow = DeployFlow(self.context, self.client, payload, self.hook_runner)
        return flow.run()


def _digest_label(container: Any) -> str:
    if container is None:
        return ""
    return str((container.labels or {}).get(LABEL_DIGEST, ""))
