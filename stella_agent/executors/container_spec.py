"""The container a deploy creates, validated from DeployPayload.

``build_container_spec`` checks every value of the payload and returns a
``ContainerSpec``, or raises ``InvalidTaskError`` naming the bad value. It runs
before the deploy pulls, stops or creates anything. The label names of
``stella.*`` container labels are defined here, because inspect, health-check
and recovery code read the same labels.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import duration_pb2

from stella.agent.v1 import task_pb2
from stella_agent.config import AgentConfig
from stella_agent.errors import InvalidTaskError
from stella_agent.executors.ports import (
    PortMapping,
    VolumeMount,
    parse_ports,
    parse_volumes,
    port_bindings,
)
from stella_agent.tasks import (
    validate_container_name,
    validate_digest,
    validate_repository,
)

LABEL_PREFIX = "stella."
LABEL_RELEASE_ID = "stella.release.id"
LABEL_RELEASE_NAME = "stella.release.name"
LABEL_DIGEST = "stella.digest"
LABEL_DEPLOYED_AT = "stella.deployed.at"
LABEL_IMAGE = "stella.image"
LABEL_TASK_ID = "stella.task.id"
LABEL_AGENT_ID = "stella.agent.id"
LABEL_MANAGED = "stella.managed"
LABEL_ROLE = "stella.role"
LABEL_CONFIG_DIGEST = "stella.config.digest"
"""SHA-256 of the container's settings, so a redeploy of the same digest with
other settings is not mistaken for a no-op."""
LABEL_REPLACED_ID = "stella.replaced.id"
"""Id of the container this one replaced. Labels cannot change after a
container is created, so what the agent learns about a release when it is set
aside is recorded on its successor."""
LABEL_REPLACED_HEALTH = "stella.replaced.health"
"""Health of the replaced container when it was set aside: healthy, unhealthy
or starting (see containers.health_when_replaced)."""

LABEL_SECRET_ENVIRONMENT = "stella.secret-environment"
"""Comma-separated names of the container's secret environment variables (never
their values), so that a later task copying this container's output into its
own log masks them."""

RESTART_POLICIES = ("no", "always", "unless-stopped", "on-failure")
DEFAULT_RESTART_POLICY = "unless-stopped"
MIN_MEMORY_BYTES = 6 * 1024 * 1024
MAX_RESTART_RETRIES = 2**31 - 1
"""Maximum retry count accepted, the largest 32-bit signed integer, so the
engine never receives a count it cannot store."""
MAX_CPUS = 4096
MAX_HEALTHCHECK_DURATION_NS = 24 * 3600 * 1_000_000_000
"""Maximum health check interval or start period accepted: a day, far below
the int64 nanoseconds the engine stores."""
"""Smallest memory limit Docker Engine accepts since release 23 (20.10
accepted 4 MiB)."""
MIN_CPUS = 0.01
"""Smallest CPU limit Docker Engine accepts."""
MIN_HEALTHCHECK_DURATION_NS = 1_000_000
"""Docker rejects health check intervals and start periods under 1 ms."""
NETWORK_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
NETWORKS_WITHOUT_PORTS = ("host", "none")


@dataclass(frozen=True)
class HealthWait:
    """How long the deploy waits for the new container to become healthy."""

    timeout_seconds: float
    """Maximum wait for "healthy" (containers with a health check)."""
    settle_seconds: float
    """Time a container without a health check must keep running."""


@dataclass(frozen=True)
class ContainerSpec:
    """A validated deploy: the image, the container settings and the wait."""

    name: str
    repository: str
    digest: str
    health_wait: HealthWait
    environment: dict[str, str] = field(default_factory=dict)
    ports: list[PortMapping] = field(default_factory=list)
    volumes: list[VolumeMount] = field(default_factory=list)
    restart_policy: dict[str, Any] = field(default_factory=dict)
    memory_limit_bytes: int | None = None
    nano_cpus: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    """User labels; the stella.* labels are added when the container is made."""
    healthcheck: dict[str, Any] | None = None
    """Health check override in the Docker SDK's form; None keeps the image's."""
    command: list[str] | None = None
    network: str | None = None
    release_id: str = ""
    release_name: str = ""
    keep_previous: bool = False

    @property
    def reference(self) -> str:
        """The pinned image reference, repository@digest."""
        return f"{self.repository}@{self.digest}"

    def config_digest(self) -> str:
        """Return a SHA-256 over everything that shapes the running container.

        Release id and name are left out: a new release of the same digest and
        settings changes nothing that runs.
        """
        settings = {
            "image": self.reference,
            "environment": self.environment,
            "ports": port_bindings(self.ports),
            "volumes": [mount.bind_string() for mount in self.volumes],
            "restart_policy": self.restart_policy,
            "memory_limit_bytes": self.memory_limit_bytes,
            "nano_cpus": self.nano_cpus,
            "labels": self.labels,
            "healthcheck": self.healthcheck,
            "command": self.command,
            "network": self.network,
        }
        encoded = json.dumps(settings, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(encoded.encode()).hexdigest()

    def create_arguments(self, stella_labels: dict[str, str]) -> dict[str, Any]:
        """Return the keyword arguments of ``client.containers.create``."""
        arguments: dict[str, Any] = {
            "image": self.reference,
            "name": self.name,
            "environment": dict(self.environment),
            "labels": {**self.labels, **stella_labels},
            "restart_policy": dict(self.restart_policy),
        }
        if self.command is not None:
            arguments["command"] = list(self.command)
        if self.ports:
            arguments["ports"] = port_bindings(self.ports)
        if self.volumes:
            arguments["volumes"] = [mount.bind_string() for mount in self.volumes]
        if self.memory_limit_bytes is not None:
            arguments["mem_limit"] = self.memory_limit_bytes
        if self.nano_cpus is not None:
            arguments["nano_cpus"] = self.nano_cpus
        if self.healthcheck is not None:
            arguments["healthcheck"] = dict(self.healthcheck)
        if self.network is not None:
            arguments["network"] = self.network
        return arguments


def build_container_spec(
    payload: task_pb2.DeployPayload, config: AgentConfig
) -> ContainerSpec:
    """Validate a deploy payload and return the container it describes."""
    deploy_config = payload.config
    repository = validate_repository(payload.image)
    digest = validate_digest(payload.digest)
    name = validate_container_name(
        deploy_config.container_name, "config.container_name"
    )
    if payload.previous_digest:
        validate_digest(payload.previous_digest, "previous_digest")

    network = parse_network(deploy_config.network)
    ports = parse_ports(deploy_config.ports)
    if ports and network in NETWORKS_WITHOUT_PORTS:
        raise InvalidTaskError(
            f"config.ports cannot be published on network {network!r}; "
            "remove the ports or use a bridge network"
        )

    return ContainerSpec(
        name=name,
        repository=repository,
        digest=digest,
        health_wait=parse_health_wait(deploy_config.health_check, config),
        environment=parse_environment(deploy_config.environment),
        ports=ports,
        volumes=parse_volumes(deploy_config.volumes),
        restart_policy=parse_restart_policy(deploy_config.restart_policy),
        memory_limit_bytes=parse_memory_limit(deploy_config.memory_limit_bytes),
        nano_cpus=parse_cpu_limit(deploy_config.cpu_limit),
        labels=parse_labels(deploy_config.labels),
        healthcheck=parse_healthcheck(deploy_config.health_check),
        command=parse_command(deploy_config.command),
        network=network,
        release_id=deploy_config.release_id,
        release_name=deploy_config.release_name,
        keep_previous=deploy_config.keep_previous,
    )


def parse_restart_policy(value: str) -> dict[str, Any]:
    """Parse "no", "always", "unless-stopped" (the default for "") or
    "on-failure[:max_retries]" into the Docker SDK's form."""
    text = value.strip() or DEFAULT_RESTART_POLICY
    name, colon, count = text.partition(":")
    if name not in RESTART_POLICIES:
        raise InvalidTaskError(
            f"config.restart_policy {value[:60]!r} is invalid; "
            "expected no, always, unless-stopped or on-failure[:max_retries]"
        )
    if not colon:
        return {"Name": name}
    if name != "on-failure":
        raise InvalidTaskError(
            f"config.restart_policy {value[:60]!r} is invalid: only on-failure "
            "takes a maximum retry count"
        )
    if not count.isdigit():
        raise InvalidTaskError(
            f"config.restart_policy {value[:60]!r} is invalid: the retry count "
            "after 'on-failure:' must be a non-negative integer"
        )
    if int(count) > MAX_RESTART_RETRIES:
        raise InvalidTaskError(
            f"config.restart_policy {value[:60]!r} is invalid: the retry count must be "
            f"at most {MAX_RESTART_RETRIES}"
        )
    return {"Name": name, "MaximumRetryCount": int(count)}


def parse_memory_limit(value: int) -> int | None:
    """Return the memory limit in bytes, or None for unlimited (zero)."""
    if value < 0:
        raise InvalidTaskError(
            f"config.memory_limit_bytes {value} is negative; use 0 for unlimited"
        )
    if value == 0:
        return None
    if value < MIN_MEMORY_BYTES:
        raise InvalidTaskError(
            f"config.memory_limit_bytes {value} is below Docker's minimum of "
            f"{MIN_MEMORY_BYTES} bytes (6 MiB)"
        )
    return value


def parse_cpu_limit(value: float) -> int | None:
    """Return the CPU limit in nano-CPUs, or None for unlimited (zero)."""
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise InvalidTaskError(
            f"config.cpu_limit {value} is invalid: expected a non-negative number "
            "of CPUs, 0 for unlimited"
        )
    if value == 0:
        return None
    if value < MIN_CPUS:
        raise InvalidTaskError(
            f"config.cpu_limit {value} is below Docker's minimum of {MIN_CPUS} CPUs"
        )
    if value > MAX_CPUS:
        raise InvalidTaskError(
            f"config.cpu_limit {value:g} is invalid: expected at most {MAX_CPUS} CPUs"
        )
    return round(value * 1e9)


def parse_environment(environment: Any) -> dict[str, str]:
    """Check environment variable names and values and return them as a dict."""
    result: dict[str, str] = {}
    for key, value in environment.items():
        if not key:
            raise InvalidTaskError("config.environment has an empty variable name")
        if "=" in key or "\0" in key:
            raise InvalidTaskError(
                f"config.environment name {key[:100]!r} is invalid: "
                "it must not contain '=' or NUL"
            )
        if "\0" in value:
            raise InvalidTaskError(
                f"config.environment value of {key[:100]!r} contains a NUL character"
            )
        result[key] = value
    return result


def parse_labels(labels: Any) -> dict[str, str]:
    """Check user labels: non-empty keys outside the reserved stella. prefix."""
    result: dict[str, str] = {}
    for key, value in labels.items():
        if not key:
            raise InvalidTaskError("config.labels has an empty label key")
        if key.lower().startswith(LABEL_PREFIX):
            raise InvalidTaskError(
                f"config.labels key {key[:100]!r} is invalid: keys starting with "
                f"{LABEL_PREFIX!r} are reserved for the agent"
            )
        result[key] = value
    return result


def parse_command(command: Any) -> list[str] | None:
    """Return the command override, or None to keep the image's CMD."""
    arguments = list(command)
    if not arguments:
        return None
    if any("\0" in argument for argument in arguments):
        raise InvalidTaskError("config.command has an argument with a NUL character")
    return arguments


def parse_network(value: str) -> str | None:
    """Return the network name, or None for Docker's default bridge."""
    if not value:
        return None
    if not NETWORK_NAME_PATTERN.match(value):
        raise InvalidTaskError(
            f"config.network {value[:100]!r} is not a valid network name"
        )
    return value


def parse_healthcheck(health: task_pb2.HealthCheckConfig) -> dict[str, Any] | None:
    """Return the health check override in the Docker SDK's form, or None.

    Without a command, interval, retries and start period still override the
    image's HEALTHCHECK, whose test Docker keeps.
    """
    override: dict[str, Any] = {}
    command = list(health.command)
    if command:
        if any("\0" in argument for argument in command):
            raise InvalidTaskError(
                "config.health_check.command has an argument with a NUL character"
            )
        override["test"] = ["CMD", *command]
    for name in ("interval", "start_period"):
        if health.HasField(name):
            nanoseconds = _duration_ns(getattr(health, name), f"health_check.{name}")
            if 0 < nanoseconds < MIN_HEALTHCHECK_DURATION_NS:
                raise InvalidTaskError(
                    f"config.health_check.{name} must be at least 1ms or unset"
                )
            if nanoseconds > MAX_HEALTHCHECK_DURATION_NS:
                raise InvalidTaskError(
                    f"config.health_check.{name} {nanoseconds / 1e9:g}s is invalid: "
                    "use at most 24h"
                )
            if nanoseconds:
                override[name] = nanoseconds
    if health.retries < 0:
        raise InvalidTaskError(
            f"config.health_check.retries {health.retries} is negative"
        )
    if health.retries > MAX_RESTART_RETRIES:
        raise InvalidTaskError(
            f"config.health_check.retries {health.retries} is invalid: use at most "
            f"{MAX_RESTART_RETRIES}"
        )
    if health.retries:
        override["retries"] = health.retries
    return override or None


def parse_health_wait(
    health: task_pb2.HealthCheckConfig, config: AgentConfig
) -> HealthWait:
    """Return the health timeout and settle period, filling agent defaults."""
    timeout = config.tasks.health_timeout_seconds
    if health.HasField("timeout"):
        seconds = _duration_ns(health.timeout, "health_check.timeout") / 1e9
        timeout = seconds or timeout
    settle = config.tasks.settle_seconds
    if health.HasField("settle_period"):
        settle = _duration_ns(health.settle_period, "health_check.settle_period") / 1e9
    return HealthWait(timeout_seconds=timeout, settle_seconds=settle)


def _duration_ns(duration: duration_pb2.Duration, name: str) -> int:
    if duration.seconds < 0 or duration.nanos < 0:
        raise InvalidTaskError(f"config.{name} is negative")
    return duration.seconds * 1_000_000_000 + duration.nanos
