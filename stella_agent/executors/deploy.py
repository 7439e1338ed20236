"""The deploy flow of the Docker executor, run in a worker thread.

Each step is a phase of the task. The flow validates the whole task, pulls and
verifies the image and runs the pre-deploy hook. It then stops the running
container and renames it ``<name>-previous-<timestamp>``, creates and starts
the new container from repository@digest, waits for health and runs the
post-deploy hook. Last, it removes the previous container, or keeps it stopped
when keep_previous is set.

Nothing running is touched before the previous container is stopped. After
that, any failure, cancel or timeout removes the new container and restores the
previous one under its name, so the host ends on the new release healthy or on
the previous one running.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any, NoReturn, Protocol

from stella.agent.v1 import task_pb2
from stella_agent.errors import (
    DigestMismatchError,
    RollbackFailedError,
    TaskError,
)
from stella_agent.executors.base import Outcome, TaskContext
from stella_agent.executors.container_spec import (
    LABEL_AGENT_ID,
    LABEL_CONFIG_DIGEST,
    LABEL_DEPLOYED_AT,
    LABEL_DIGEST,
    LABEL_IMAGE,
    LABEL_MANAGED,
    LABEL_RELEASE_ID,
    LABEL_RELEASE_NAME,
    LABEL_REPLACED_HEALTH,
    LABEL_REPLACED_ID,
    LABEL_ROLE,
    LABEL_SECRET_ENVIRONMENT,
    LABEL_TASK_ID,
    ContainerSpec,
    build_container_spec,
)
from stella_agent.executors.containers import (
    FAILED,
    PREVIOUS,
    aside_name,
    copy_output_to_log,
    describe_container,
    find_container,
    find_previous,
    health_when_replaced,
    is_running,
    releases_newest_first,
    remove_container,
    rename_container,
    start_and_verify,
    stop_container,
    unhealthy_when_replaced,
)
from stella_agent.executors.deploy_checks import (
    HOOK_STAGES,
    check_hooks,
    check_host,
    is_unchanged,
)
from stella_agent.executors.docker_errors import DOCKER_EXCEPTIONS, docker_error
from stella_agent.executors.health import wait_until_healthy
from stella_agent.executors.pull import pull_image

logger = logging.getLogger(__name__)


class HookRunner(Protocol):
    """Runs a deploy hook in the worker thread; raises HookFailedError."""

    def __call__(
        self, context: TaskContext, hook: task_pb2.HookConfig, stage: str
    ) -> None: ...


class DeployFlow:
    """One deploy of one container, from validation to cleanup."""

    def __init__(
        self,
        context: TaskContext,
        client: Any,
        payload: task_pb2.DeployPayload,
        hook_runner: HookRunner | None = None,
    ) -> None:
        self.context = context
        self.client = client
        self.payload = payload
        self.hook_runner = hook_runner
        self.spec: ContainerSpec | None = None
        self.previous: Any = None
        """The replaced container once it is stopped and renamed aside."""
        self.previous_was_running = False
        self.previous_health = ""
        """Health of the replaced container when it was set aside."""
        self.new: Any = None

    def run(self) -> Outcome:
        """Deploy and return the outputs; raise a TaskError on failure."""
        started = time.monotonic()
        try:
            return self._run()
        finally:
            elapsed_ms = int((time.monotonic() - started) * 1000)
            self.context.metrics.deploy_duration_ms = elapsed_ms

    def _run(self) -> Outcome:
        context = self.context

        # Validate the whole task before pulling or touching anything.
        context.set_phase("validate")
        spec = self.spec = build_container_spec(self.payload, context.config)
        check_host(self.client, spec)
        check_hooks(self.payload, self.hook_runner is not None)
        self._validate_hooks()
        context.checkpoint()

        # Pull and verify the image. A failure here changes nothing running.
        context.set_phase("pull")
        image_id = pull_image(context, self.client, spec.repository, spec.digest)
        context.checkpoint()

        # A container that already runs this digest with these settings stays.
        current = find_container(self.client, spec.name)
        if current is not None and is_unchanged(current, spec, context.log):
            return self._unchanged_outcome(current, spec)

        self._run_hook("pre_deploy")
        context.checkpoint()

        if current is not None:
            self._set_aside(current, spec)

        # From here on, every failure restores the previous container.
        try:
            self._create_and_start(spec, image_id)
            context.set_phase("health")
            wait_until_healthy(
                context, self.client, self.new.id, spec.name, spec.health_wait
            )
            self._run_hook("post_deploy")
            context.checkpoint()
        except Exception as exc:  # noqa: BLE001 - every failure must roll back
            self._roll_back(spec, exc)

        return self._finalize(spec)

    def _validate_hooks(self) -> None:
        validate = getattr(self.hook_runner, "validate", None)
        if validate is None:
            return
        for stage in HOOK_STAGES:
            if self.payload.hooks.HasField(stage):
                validate(self.context, getattr(self.payload.hooks, stage), stage)

    def _run_hook(self, stage: str) -> None:
        if not self.payload.hooks.HasField(stage) or self.hook_runner is None:
            return
        self.context.set_phase(stage.replace("_", "-"))
        self.hook_runner(self.context, getattr(self.payload.hooks, stage), stage)

    def _unchanged_outcome(self, container: Any, spec: ContainerSpec) -> Outcome:
        self.context.log.info(
            "container %s already runs %s with these settings and is healthy; "
            "nothing changed",
            spec.name,
            spec.reference,
        )
        return Outcome(
            outputs={
                "container_id": container.id,
                "container_name": spec.name,
                "digest": spec.digest,
                "previous_digest": spec.digest,
                "previous_container_id": "",
                "changed": "false",
            }
        )

    def _set_aside(self, current: Any, spec: ContainerSpec) -> None:
        """Stop the running container and rename it <name>-previous-<ts>."""
        context = self.context
        was_running = is_running(current)
        if not (current.labels or {}).get(LABEL_DIGEST):
            context.log.info(
                "container %s was not deployed by Stella; replacing it", spec.name
            )
        previous_name = aside_name(spec.name, PREVIOUS)
        self.previous_health = health_when_replaced(current)
        # Recovery after an agent crash reads these notes to restore the host.
        context.note(
            container_name=spec.name,
            previous_container_id=current.id,
            previous_name=previous_name,
            previous_was_running=str(was_running).lower(),
            keep_previous=str(spec.keep_previous).lower(),
        )
        try:
            context.set_phase("stop")
            stop_container(context, current, spec.name)
            context.set_phase("rename")
            rename_container(context, current, previous_name)
        except TaskError as exc:
            # The container kept its name; bring it back to how it was.
            if was_running:
                try:
                    start_and_verify(context, current)
                except TaskError as restart_error:
                    raise RollbackFailedError(
                        f"{exc.message}; starting container {spec.name} again "
                        f"failed too: {restart_error.message}. Start it by hand",
                        phase=exc.phase or context.phase,
                    ) from exc
            exc.rolled_back = was_running
            raise
        self.previous = current
        self.previous_was_running = was_running

    def _create_and_start(self, spec: ContainerSpec, image_id: str) -> None:
        context = self.context
        context.set_phase("create")
        context.checkpoint()
        context.log.info("creating container %s from %s", spec.name, spec.reference)
        arguments = spec.create_arguments(self._stella_labels(spec))
        context.note(container_name=spec.name)
        try:
            self.new = self.client.containers.create(**arguments)
        except DOCKER_EXCEPTIONS as exc:
            action = f"create container {spec.name} from {spec.reference}"
            raise docker_error(exc, action) from None
        context.note(new_container_id=self.new.id)
        if self.new.attrs.get("Image") != image_id:
            raise DigestMismatchError(
                f"container {spec.name} was created from image "
                f"{self.new.attrs.get('Image')}, not {image_id} pulled as "
                f"{spec.reference}: possible tampering"
            )

        context.set_phase("start")
        context.log.info("starting container %s", spec.name)
        try:
            self.new.start()
        except DOCKER_EXCEPTIONS as exc:
            raise docker_error(exc, f"start container {spec.name}") from None

    def _stella_labels(self, spec: ContainerSpec) -> dict[str, str]:
        deployed_at = datetime.now(UTC).isoformat(timespec="seconds")
        replaced: dict[str, str] = {}
        if self.previous is not None:
            replaced = {
                LABEL_REPLACED_ID: self.previous.id,
                LABEL_REPLACED_HEALTH: self.previous_health,
            }
        return {
            **replaced,
            LABEL_MANAGED: "true",
            LABEL_ROLE: "current",
            LABEL_RELEASE_ID: spec.release_id,
            LABEL_RELEASE_NAME: spec.release_name,
            LABEL_DIGEST: spec.digest,
            LABEL_IMAGE: spec.repository,
            LABEL_DEPLOYED_AT: deployed_at.replace("+00:00", "Z"),
            LABEL_TASK_ID: self.context.task.id,
            LABEL_AGENT_ID: self.context.config.agent_id,
            LABEL_CONFIG_DIGEST: spec.config_digest(),
            LABEL_SECRET_ENVIRONMENT: ",".join(self.payload.config.secret_environment),
        }

    def _roll_back(self, spec: ContainerSpec, error: Exception) -> NoReturn:
        """Remove the new container, restore the previous one and re-raise."""
        context = self.context
        failed_phase = context.phase
        task_error: TaskError | None
        if isinstance(error, TaskError):
            task_error = error
        elif isinstance(error, DOCKER_EXCEPTIONS):
            task_error = docker_error(error, f"{failed_phase} container {spec.name}")
        else:
            task_error = None
        reason = (
            task_error.message if task_error else f"{type(error).__name__}: {error}"
        )
        if task_error is not None and not task_error.phase:
            task_error.phase = failed_phase

        context.set_phase("rollback")
        context.log.info(
            "deploy failed during %s: %s; rolling back", failed_phase, reason
        )
        leftover = self._discard_new(spec)

        if self.previous is None:
            context.log.info("there was no previous container to restore")
        else:
            try:
                if leftover:
                    raise RollbackFailedError(leftover)
                rename_container(context, self.previous, spec.name)
                if self.previous_was_running:
                    start_and_verify(context, self.previous)
            except TaskError as restore_error:
                raise RollbackFailedError(
                    self._rollback_failure(spec, failed_phase, reason, restore_error),
                    phase=failed_phase,
                ) from error
            context.log.info(
                "restored the previous container %s (%s)",
                spec.name,
                self.previous.short_id,
            )

        if task_error is None:
            raise error
        task_error.rolled_back = self.previous is not None
        if task_error is error:
            raise error
        raise task_error from error

    def _discard_new(self, spec: ContainerSpec) -> str:
        """Remove the new container after keeping its output in the task log.

        Returns "" once the name is free again, else a description of the
        new container that still has it.
        """
        if self.new is None:
            return ""
        label = f"the new container {spec.name}"
        copy_output_to_log(self.context, self.new, label)
        try:
            remove_container(self.context, self.new, "the new container")
            return ""
        except TaskError as remove_error:
            failed_name = aside_name(spec.name, FAILED)
            try:
                rename_container(self.context, self.new, failed_name)
            except TaskError as rename_error:
                return (
                    f"the new container {self.new.short_id} could not be removed "
                    f"({remove_error.message}) or renamed ({rename_error.message})"
                )
            self.context.log.info(
                "could not remove the new container (%s); it is stopped as %s",
                remove_error.message,
                failed_name,
            )
            return ""

    def _rollback_failure(
        self, spec: ContainerSpec, phase: str, reason: str, restore_error: TaskError
    ) -> str:
        new_state = describe_container(self.new) if self.new is not None else "none"
        return (
            f"deploy of {spec.reference} failed during {phase} ({reason}), and "
            f"restoring the previous container failed: {restore_error.message}. "
            f"Previous container: {describe_container(self.previous)}. "
            f"New container: {new_state}. Rename the previous container to "
            f"{spec.name} and start it by hand"
        )

    def _finalize(self, spec: ContainerSpec) -> Outcome:
        context = self.context
        context.set_phase("finalize")
        assert self.new is not None
        outputs = {
            "container_id": self.new.id,
            "container_name": spec.name,
            "digest": spec.digest,
            "previous_digest": self.payload.previous_digest,
            "previous_container_id": "",
            "changed": "true",
        }
        previous = self.previous
        if previous is not None:
            labels = previous.labels or {}
            outputs["previous_digest"] = (
                labels.get(LABEL_DIGEST) or outputs["previous_digest"]
            )
            outputs["previous_container_id"] = previous.id
            if spec.keep_previous:
                outputs["previous_container_name"] = previous.name
                context.log.info(
                    "kept the previous container stopped as %s", previous.name
                )
                self._remove_older_previous(spec, keep=previous)
            else:
                self._remove_quietly(previous, "the previous container")

        context.log.info(
            "deployed %s as container %s (%s)",
            spec.reference,
            spec.name,
            self.new.short_id,
        )
        return Outcome(outputs=outputs)

    def _remove_older_previous(self, spec: ContainerSpec, keep: Any) -> None:
        """Remove previous containers older than `keep`; one is enough to roll
        back to, and older ones would pile up with every deploy.

        When `keep` was unhealthy as it was set aside, the newest older one
        that was not is kept too, so that a rollback still finds a healthy
        release.
        """
        try:
            candidates = releases_newest_first(find_previous(self.client, spec.name))
            unhealthy = unhealthy_when_replaced(self.client)
        except TaskError as exc:
            self.context.log.info("could not list older previous containers: %s", exc)
            return
        kept = {keep.id}
        if self.previous_health == "unhealthy":
            for container in candidates:
                if container.id != keep.id and container.id not in unhealthy:
                    kept.add(container.id)
                    self.context.log.info(
                        "kept %s too: the replaced release was unhealthy and this "
                        "is the newest healthy one before it",
                        container.name,
                    )
                    break
        for container in candidates:
            if container.id not in kept:
                self._remove_quietly(container, "an older previous container")

    def _remove_quietly(self, container: Any, label: str) -> None:
        """Remove a container after a successful deploy; a failure is logged,
        not raised, because the new release already runs."""
        try:
            remove_container(self.context, container, label)
        except TaskError as exc:
            logger.warning("task %s: %s", self.context.task.id, exc.message)
            self.context.log.info(
                "could not remove %s %s: %s; remove it by hand",
                label,
                container.name,
                exc.message,
            )
