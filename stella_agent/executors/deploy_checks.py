"""Checks a deploy makes before it changes anything.

They run after the payload is validated (``container_spec``) and read the host
only: its CPU count and networks, whether hooks can run, and whether the
running container already is the requested release.
"""

from __future__ import annotations

from typing import Any

from stella.agent.v1 import task_pb2
from stella_agent.errors import InvalidTaskError, NotFoundError
from stella_agent.executors.container_spec import (
    LABEL_CONFIG_DIGEST,
    LABEL_DIGEST,
    ContainerSpec,
)
from stella_agent.executors.containers import is_running
from stella_agent.executors.docker_errors import DOCKER_EXCEPTIONS, docker_error
from stella_agent.logstream import TaskLog

BUILTIN_NETWORKS = ("bridge", "host", "none")
HOOK_STAGES = ("pre_deploy", "post_deploy")


def check_host(client: Any, spec: ContainerSpec) -> None:
    """Check the CPU limit and the network against the host."""
    try:
        if spec.nano_cpus is not None:
            cpus = int(client.info().get("NCPU") or 0)
            if cpus and spec.nano_cpus > cpus * 1_000_000_000:
                raise InvalidTaskError(
                    f"config.cpu_limit {spec.nano_cpus / 1e9:g} exceeds the "
                    f"{cpus} CPUs of this host"
                )
        if spec.network is not None and spec.network not in BUILTIN_NETWORKS:
            networks = client.networks.list(names=[spec.network])
            if not any(network.name == spec.network for network in networks):
                raise NotFoundError(
                    f"network {spec.network} not found on this host; "
                    "create it first or leave config.network empty"
                )
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, "read the host's CPUs and networks") from None


def check_hooks(payload: task_pb2.DeployPayload, can_run_hooks: bool) -> None:
    """Reject hooks without a command, and any hook when none can run."""
    hooks = payload.hooks
    for stage in HOOK_STAGES:
        if not hooks.HasField(stage):
            continue
        if not getattr(hooks, stage).command:
            raise InvalidTaskError(f"hooks.{stage}.command is required")
        if not can_run_hooks:
            raise InvalidTaskError(
                f"hooks.{stage} is set but this agent's docker executor cannot "
                "run hooks yet; remove the hook",
                error_type="unsupported",
            )


def is_unchanged(container: Any, spec: ContainerSpec, log: TaskLog) -> bool:
    """Return True when `container` runs spec's digest and settings, healthy.

    A container with the digest but other settings, stopped or not healthy
    counts as changed, and the reason goes to the task log.
    """
    labels = container.labels or {}
    if labels.get(LABEL_DIGEST) != spec.digest:
        return False
    if labels.get(LABEL_CONFIG_DIGEST) != spec.config_digest():
        log.info("container %s runs this digest with other settings", spec.name)
        return False
    if not is_running(container):
        log.info("container %s has this digest but is not running", spec.name)
        return False
    health = container.attrs.get("State", {}).get("Health")
    if health is not None and health.get("Status") != "healthy":
        log.info(
            "container %s has this digest but is %s",
            spec.name,
            health.get("Status"),
        )
        return False
    return True
