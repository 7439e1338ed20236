"""Recovery of a Docker deploy or rollback that an agent crash interrupted.

The flows write notes to the journal before each risky step: which container
was set aside under which name, whether it was running, and which container
was created. After a restart the runner calls ``DockerExecutor.recover`` with
those notes and the phase the task was in. If the task crashed in
``finalize``, its new release was already healthy, so recovery finishes the
cleanup and reports success. In any other phase, recovery removes what the task
created and puts the earlier container back under its name. It then reports
the retriable error type ``interrupted``, so the orchestrator may send the
task again.
"""

from __future__ import annotations

from typing import Any

import docker.errors

from stella.agent.v1 import task_pb2
from stella_agent.errors import RollbackFailedError, TaskError
from stella_agent.executors.base import Outcome, TaskContext
from stella_agent.executors.container_spec import LABEL_DIGEST, LABEL_TASK_ID
from stella_agent.executors.containers import (
    copy_output_to_log,
    find_container,
    is_running,
    remove_container,
    rename_container,
    start_and_verify,
    stop_container,
)
from stella_agent.executors.docker_errors import DOCKER_EXCEPTIONS, docker_error
from stella_agent.executors.sandbox import remove_task_sandboxes
from stella_agent.tasks import validate_container_name

INTERRUPTED = "interrupted"


def recover_task(context: TaskContext, client: Any, phase: str) -> Outcome:
    """Bring the target of an interrupted task back to a consistent state."""
    context.log.info("recovering after a restart during phase %s", phase or "start")
    remove_task_sandboxes(context, client)
    rollback = context.task.rollback
    if context.task.type == task_pb2.TASK_TYPE_ROLLBACK and not rollback.target_digest:
        return _recover_rollback(context, client, phase)
    # A rollback to a given digest runs the deploy flow and writes its notes.
    return _recover_deploy(context, client, phase)


def _recover_deploy(context: TaskContext, client: Any, phase: str) -> Outcome:
    notes = context.notes
    name = validate_container_name(
        notes.get("container_name")
        or context.task.deploy.config.container_name
        or context.task.rollback.container_name
    )
    new = _find_new(context, client, name)
    previous = _get(client, notes.get("previous_container_id", ""))

    if phase == "finalize" and new is not None and is_running(new):
        if previous is not None and notes.get("keep_previous") != "true":
            _remove_quietly(context, previous, "the previous container")
        context.log.info("the new release was healthy; finished its cleanup")
        return Outcome(
            outputs={
                "container_id": new.id,
                "container_name": name,
                "digest": (new.labels or {}).get(LABEL_DIGEST, ""),
                "previous_digest": _digest_label(previous),
                "previous_container_id": notes.get("previous_container_id", ""),
                "changed": "true",
                "recovered": "true",
            }
        )

    context.set_phase("rollback")
    if new is not None:
        copy_output_to_log(context, new, f"the new container {name}")
        remove_container(context, new, "the new container")
    restored = _restore(
        context,
        client,
        name,
        previous,
        notes.get("previous_container_id", ""),
        notes.get("previous_was_running") == "true",
    )
    raise _interrupted(phase, name, restored)


def _recover_rollback(context: TaskContext, client: Any, phase: str) -> Outcome:
    notes = context.notes
    name = validate_container_name(
        notes.get("container_name") or context.task.rollback.container_name
    )
    restoring = _get(client, notes.get("restore_container_id", ""))
    replaced = _get(client, notes.get("replaced_container_id", ""))

    if (
        phase == "finalize"
        and restoring is not None
        and restoring.name == name
        and is_running(restoring)
    ):
        if replaced is not None:
            _remove_quietly(context, replaced, "the replaced container")
        context.log.info("the rollback had finished; completed its cleanup")
        return Outcome(
            outputs={
                "container_id": restoring.id,
                "container_name": name,
                "digest": _digest_label(restoring),
                "previous_digest": _digest_label(replaced),
                "previous_container_id": notes.get("replaced_container_id", ""),
                "restored_from": notes.get("restore_name", ""),
                "changed": "true",
                "recovered": "true",
            }
        )

    # Undo: the container being restored goes back aside, the replaced one
    # gets its name back.
    context.set_phase("rollback")
    if restoring is not None:
        stop_container(context, restoring, restoring.name)
        aside = notes.get("restore_name", "")
        if aside and restoring.name != aside:
            rename_container(context, restoring, aside)
    restored = _restore(
        context,
        client,
        name,
        replaced,
        notes.get("replaced_container_id", ""),
        notes.get("replaced_was_running") == "true",
    )
    raise _interrupted(phase, name, restored)


def _restore(
    context: TaskContext,
    client: Any,
    name: str,
    container: Any,
    noted_id: str,
    start: bool,
) -> bool:
    """Give `container` its name back and start it if it was running.

    Returns False when no container was noted, so there was nothing to
    restore.
    """
    if container is None:
        if noted_id:
            raise RollbackFailedError(
                f"container {noted_id[:12]}, which was {name} before the agent "
                f"restarted, no longer exists; deploy {name} again",
                phase="rollback",
            )
        return False
    holder = find_container(client, name)
    if holder is not None and holder.id != container.id:
        raise RollbackFailedError(
            f"cannot restore container {container.short_id} as {name}: another "
            f"container ({holder.short_id}) has that name; remove or rename it",
            phase="rollback",
        )
    if container.name != name:
        rename_container(context, container, name)
    if start and not is_running(container):
        start_and_verify(context, container)
    context.log.info("restored container %s (%s)", name, container.short_id)
    return True


def _interrupted(phase: str, name: str, restored: bool) -> TaskError:
    state = "the earlier container was restored" if restored else "nothing is left"
    return TaskError(
        f"the agent restarted during phase {phase or 'start'} of this task; "
        f"{state} under {name}. Send the task again",
        error_type=INTERRUPTED,
        retriable=True,
        phase=phase,
        rolled_back=restored,
    )


def _find_new(context: TaskContext, client: Any, name: str) -> Any | None:
    """Return the container this task created, by noted id or by its task label."""
    noted = _get(client, context.notes.get("new_container_id", ""))
    if noted is not None:
        return noted
    candidate = find_container(client, name)
    if candidate is None:
        return None
    if (candidate.labels or {}).get(LABEL_TASK_ID) != context.task.id:
        return None
    return candidate


def _get(client: Any, container_id: str) -> Any | None:
    if not container_id:
        return None
    try:
        container = client.containers.get(container_id)
    except docker.errors.NotFound:
        return None
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"inspect container {container_id[:12]}") from None
    # Docker also resolves names and id prefixes, so only an exact id counts.
    return container if container.id == container_id else None


def _digest_label(container: Any) -> str:
    if container is None:
        return ""
    return str((container.labels or {}).get(LABEL_DIGEST, ""))


def _remove_quietly(context: TaskContext, container: Any, label: str) -> None:
    try:
        remove_container(context, container, label)
    except TaskError as exc:
        context.log.info("%s; remove it by hand", exc.message)
