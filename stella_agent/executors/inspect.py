"""The inspect task: what runs on a target, without side effects or secrets.

For the Docker executor the report covers the container named in the task and
the ``<name>-previous-*`` and ``<name>-failed-*`` containers kept beside it:
image reference, image id and repository digests, state, health, published
ports, labels, restart count, restart policy, mounts and command. Environment
variables appear by name only: every value is replaced by ``****``. The
version sticker is read from the task's location or the agent's default; a
missing or unreadable sticker is reported in the report, not as a failure.

Outputs are strings: ``report`` holds the whole report as a JSON document, and
a few flat keys repeat what callers look at most.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import docker.errors

from stella_agent.errors import NotFoundError, TaskError
from stella_agent.executors.base import Outcome, TaskContext
from stella_agent.executors.container_spec import (
    LABEL_DIGEST,
    LABEL_RELEASE_ID,
    LABEL_RELEASE_NAME,
)
from stella_agent.executors.docker_errors import DOCKER_EXCEPTIONS, docker_error
from stella_agent.executors.health_check import container_health, verdict
from stella_agent.executors.stickers import (
    read_sticker,
    resolve_location,
    sticker_document,
)
from stella_agent.tasks import validate_container_name

MASK = "****"


def inspect_container(context: TaskContext, client: Any) -> Outcome:
    """Run an inspect task of the Docker executor."""
    payload = context.task.inspect
    context.set_phase("validate")
    name = validate_container_name(payload.container_name, "inspect.container_name")
    requested = payload.sticker if payload.HasField("sticker") else None
    location = resolve_location(requested, context.config)

    context.set_phase("inspect")
    current, kept = _related_containers(client, name)
    if current is None and not kept:
        raise NotFoundError(
            f"container {name} not found, and no {name}-previous-* or "
            f"{name}-failed-* containers either"
        )
    report: dict[str, Any] = {
        "container_name": name,
        "container": describe(client, current) if current is not None else None,
        "kept": [describe(client, attrs) for attrs in kept],
    }
    report.update(sticker_report(context, client, location))

    outputs = {
        "report": json.dumps(report, sort_keys=True),
        "container_name": name,
        "found": str(current is not None).lower(),
        "kept_containers": str(len(kept)),
        "sticker_found": str(report["sticker"] is not None).lower(),
    }
    if current is not None:
        summary = report["container"]
        for key in ("container_id", "state", "health", "digest", "release_id"):
            outputs[key] = str(summary[key])
        outputs["restart_count"] = str(summary["restart_count"])
    context.log.info(
        "inspected %s: %s, %d kept containers",
        name,
        outputs.get("state", "absent"),
        len(kept),
    )
    return Outcome(outputs=outputs)


def describe(client: Any, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Return the report of one container from its inspect data."""
    config = attrs.get("Config") or {}
    host_config = attrs.get("HostConfig") or {}
    labels = dict(config.get("Labels") or {})
    health = container_health(attrs)
    health["status"] = verdict(health)
    image_id = str(attrs.get("Image", ""))
    return {
        "container_id": attrs.get("Id", ""),
        "name": str(attrs.get("Name", "")).lstrip("/"),
        "image": config.get("Image", ""),
        "image_id": image_id,
        "repo_digests": _repo_digests(client, image_id),
        "digest": labels.get(LABEL_DIGEST, ""),
        "release_id": labels.get(LABEL_RELEASE_ID, ""),
        "release_name": labels.get(LABEL_RELEASE_NAME, ""),
        "created": attrs.get("Created", ""),
        "state": health["state"],
        "running": health["running"],
        "started_at": health["started_at"],
        "exit_code": health["exit_code"],
        "oom_killed": health["oom_killed"],
        "health": health["health"],
        "health_status": health["status"],
        "failing_streak": health["failing_streak"],
        "health_log": health["health_log"],
        "restart_count": health["restart_count"],
        "restart_policy": host_config.get("RestartPolicy") or {},
        "ports": _ports(attrs),
        "labels": labels,
        "environment": masked_environment(config.get("Env") or []),
        "command": config.get("Cmd") or [],
        "mounts": [
            {
                "type": mount.get("Type", ""),
                "source": mount.get("Name") or mount.get("Source", ""),
                "destination": mount.get("Destination", ""),
                "read_only": not mount.get("RW", True),
            }
            for mount in attrs.get("Mounts") or []
        ],
    }


def masked_environment(entries: list[str]) -> dict[str, str]:
    """Return environment variable names with every value masked."""
    return {entry.partition("=")[0]: MASK for entry in entries}


def sticker_report(context: TaskContext, client: Any, location: Any) -> dict[str, Any]:
    """Return the sticker part of a report: the document, or why it is missing."""
    report: dict[str, Any] = {
        "sticker_location": location.outputs(),
        "sticker": None,
        "sticker_error": "",
    }
    try:
        report["sticker"] = sticker_document(read_sticker(context, client, location))
    except TaskError as exc:
        report["sticker_error"] = exc.message
    return report


def _related_containers(
    client: Any, name: str
) -> tuple[Mapping[str, Any] | None, list[Mapping[str, Any]]]:
    """Return the inspect data of `name` and of its kept -previous-/-failed-
    containers, newest first."""
    try:
        listed = client.containers.list(all=True, filters={"name": name})
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"list containers named {name}") from None
    current = None
    kept = []
    for container in listed:
        if container.name == name:
            current = container.attrs
        elif container.name.startswith((f"{name}-previous-", f"{name}-failed-")):
            kept.append(container.attrs)
    kept.sort(key=lambda attrs: str(attrs.get("Name", "")), reverse=True)
    return current, kept


def _repo_digests(client: Any, image_id: str) -> list[str]:
    if not image_id:
        return []
    try:
        image = client.api.inspect_image(image_id)
    except docker.errors.ImageNotFound:
        return []
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"inspect image {image_id}") from None
    return list(image.get("RepoDigests") or [])


def _ports(attrs: Mapping[str, Any]) -> list[dict[str, str]]:
    """Return the published ports as container port, host ip and host port."""
    published = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
    ports = []
    for container_port, bindings in sorted(published.items()):
        for binding in bindings or [{}]:
            ports.append(
                {
                    "container_port": container_port,
                    "host_ip": binding.get("HostIp", ""),
                    "host_port": binding.get("HostPort", ""),
                }
            )
    return ports
