"""The health-check task: the current health of a container, without side effects.

The report comes from ``docker inspect``: the container's state, Docker's
health status with its recent health log, the restart count and, when the
task asks for one, the result of an HTTP or TCP probe run from inside the
container's network namespace. The probe runs in a sandbox container of the
tool image (``hooks.image``) that joins the namespace
(``network_mode: container:<id>``), so the target runs nothing extra. Without
a tool image it runs with ``docker exec`` in the target, which then needs
busybox-style ``wget`` or ``nc``.

Verdicts (``outputs.status``): ``healthy`` when the container runs, is not
restarting, its health check (if any) reports healthy and the probe (if any)
passed; otherwise ``unhealthy``, ``starting`` (health check undecided) or
``stopped``. Anything but healthy is a finished task with ``success=False`` and
``error_type: unhealthy``; the outputs are the same either way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stella.agent.v1 import task_pb2
from stella_agent.errors import InvalidTaskError, NotFoundError
from stella_agent.executors.base import Outcome, TaskContext
from stella_agent.executors.commands import run_exec
from stella_agent.executors.docker_errors import DOCKER_EXCEPTIONS, docker_error
from stella_agent.executors.sandbox import SandboxSpec, run_sandbox
from stella_agent.tasks import validate_container_name

DEFAULT_PROBE_TIMEOUT_SECONDS = 5.0
HEALTH_LOG_ENTRIES = 5
MAX_LOG_OUTPUT_CHARS = 500
PATH_CHARACTERS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@/?%"
)
"""Characters allowed in a probe path: RFC 3986 path and query characters."""


@dataclass(frozen=True)
class ProbeSpec:
    """A checked probe: what to connect to and for how long."""

    kind: str
    """"http" or "tcp"."""
    port: int
    path: str
    timeout_seconds: float

    def command(self) -> list[str]:
        """Return the busybox argument vector that performs the probe."""
        if self.kind == "http":
            url = f"http://127.0.0.1:{self.port}{self.path}"
            return ["wget", "-q", "-O", "/dev/null", url]
        # nc -e runs the program once connected: exit 0 means the port accepted.
        # Busybox nc takes -e last, because the rest of argv is the program.
        seconds = str(max(1, math.ceil(self.timeout_seconds)))
        return ["nc", "-w", seconds, "127.0.0.1", str(self.port), "-e", "true"]

    def describe(self) -> str:
        if self.kind == "http":
            return f"HTTP GET of port {self.port} path {self.path}"
        return f"TCP connect to port {self.port}"


def parse_probe(probe: task_pb2.Probe, field: str = "health_check.probe") -> ProbeSpec:
    """Check a probe of the task and return it."""
    timeout = DEFAULT_PROBE_TIMEOUT_SECONDS
    if probe.HasField("timeout"):
        seconds = probe.timeout.ToTimedelta().total_seconds()
        if seconds < 0:
            raise InvalidTaskError(f"{field}.timeout is negative")
        timeout = seconds or timeout
    kind = probe.WhichOneof("kind")
    if kind is None:
        raise InvalidTaskError(f"{field} needs http or tcp")
    target = getattr(probe, kind)
    if not 0 < target.port < 65536:
        raise InvalidTaskError(f"{field}.{kind}.port {target.port} is not a valid port")
    path = ""
    if kind == "http":
        path = probe.http.path or "/"
        if not path.startswith("/") or not set(path) <= PATH_CHARACTERS:
            raise InvalidTaskError(
                f"{field}.http.path {path[:200]!r} is invalid: it must start with '/' "
                "and use only URL path characters"
            )
    return ProbeSpec(kind, target.port, path, timeout)


def check_container(context: TaskContext, client: Any) -> Outcome:
    """Run a health-check task of the Docker executor."""
    payload = context.task.health_check
    context.set_phase("validate")
    name = validate_container_name(
        payload.container_name, "health_check.container_name"
    )
    probe = parse_probe(payload.probe) if payload.HasField("probe") else None

    context.set_phase("health")
    attrs = inspect_named(client, name)
    report = container_health(attrs)
    if probe is not None:
        if report["running"]:
            report["probe"] = run_probe(context, client, attrs["Id"], probe)
        else:
            report["probe"] = {"passed": False, "detail": "container is not running"}
    status = verdict(report)
    report["status"] = status
    context.log.info("container %s is %s", name, status)
    return health_outcome(f"container {name}", report)


def health_outcome(subject: str, report: Mapping[str, Any]) -> Outcome:
    """Return the Outcome of a health report with a "status" entry."""
    status = str(report["status"])
    outputs = {
        "status": status,
        "health": str(report.get("health", "")),
        "report": json.dumps(report, sort_keys=True),
    }
    for key in ("container_id", "container_name", "restart_count"):
        if key in report:
            outputs[key] = str(report[key])
    probe = report.get("probe")
    if isinstance(probe, Mapping):
        outputs["probe_passed"] = str(bool(probe.get("passed"))).lower()
    if status == "healthy":
        return Outcome(outputs=outputs)
    return Outcome(
        outputs=outputs,
        success=False,
        error=f"{subject} is {status}: {describe_problem(report)}",
        error_type="unhealthy",
    )


def inspect_named(client: Any, name: str) -> Mapping[str, Any]:
    """Return the inspect data of the container named exactly `name`."""
    try:
        attrs = client.api.inspect_container(name)
    except DOCKER_EXCEPTIONS as exc:
        error = docker_error(exc, f"inspect container {name}")
        if isinstance(error, NotFoundError):
            raise NotFoundError(f"container {name} not found") from None
        raise error from None
    # The engine also resolves id prefixes; only the exact name counts.
    if str(attrs.get("Name", "")).lstrip("/") != name:
        raise NotFoundError(f"container {name} not found")
    return attrs


def container_health(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Return the health-related part of a container's inspect data."""
    state = attrs.get("State") or {}
    health = state.get("Health")
    report: dict[str, Any] = {
        "container_id": attrs.get("Id", ""),
        "container_name": str(attrs.get("Name", "")).lstrip("/"),
        "state": state.get("Status", ""),
        "running": bool(state.get("Running")) and not state.get("Restarting"),
        "restart_count": int(attrs.get("RestartCount") or 0),
        "started_at": state.get("StartedAt", ""),
        "exit_code": state.get("ExitCode"),
        "oom_killed": bool(state.get("OOMKilled")),
        "health": "none",
        "failing_streak": 0,
        "health_log": [],
    }
    if health is not None:
        report["health"] = health.get("Status") or "none"
        report["failing_streak"] = int(health.get("FailingStreak") or 0)
        report["health_log"] = [
            {
                "start": entry.get("Start", ""),
                "end": entry.get("End", ""),
                "exit_code": entry.get("ExitCode"),
                "output": str(entry.get("Output") or "")[-MAX_LOG_OUTPUT_CHARS:],
            }
            for entry in (health.get("Log") or [])[-HEALTH_LOG_ENTRIES:]
        ]
    return report


def verdict(report: Mapping[str, Any]) -> str:
    """Return healthy, unhealthy, starting or stopped for a health report."""
    if not report["running"]:
        return "stopped"
    probe = report.get("probe")
    if isinstance(probe, Mapping) and not probe.get("passed"):
        return "unhealthy"
    health = report["health"]
    if health in ("healthy", "none"):
        return "healthy"
    if health == "starting":
        return "starting"
    return "unhealthy"


def describe_problem(report: Mapping[str, Any]) -> str:
    """Return why a report is not healthy, in a few words."""
    if report.get("problem"):
        return str(report["problem"])
    if not report.get("running", True):
        return f"state {report.get('state')}, exit code {report.get('exit_code')}"
    probe = report.get("probe")
    if isinstance(probe, Mapping) and not probe.get("passed"):
        return f"probe failed: {probe.get('detail')}"
    log = report.get("health_log") or []
    last = " ".join(str(log[-1]["output"]).split()) if log else "no check yet"
    return f"health {report.get('health')}, last check: {last[:300]}"


def run_probe(
    context: TaskContext, client: Any, container_id: str, probe: ProbeSpec
) -> dict[str, Any]:
    """Run the probe in the container's network namespace and report it."""
    context.log.info("probing: %s", probe.describe())
    if context.config.hooks.image:
        spec = SandboxSpec(
            image=context.config.hooks.image,
            command=probe.command(),
            role="probe",
            description="health probe",
            timeout_seconds=probe.timeout_seconds,
            network_mode=f"container:{container_id}",
            stream_output=False,
        )
        result = run_sandbox(context, client, spec)
        exit_code: int | None = None if result.timed_out else result.exit_code
        output = result.output_text()
        runner = "sandbox"
    else:
        command = run_exec(
            context,
            client,
            container_id,
            probe.command(),
            timeout=probe.timeout_seconds,
            stream=False,
        )
        exit_code = command.exit_code
        text = (command.stdout + command.stderr).decode("utf-8", "replace")
        output = " ".join(text.split())[-500:]
        runner = "exec"
    passed = exit_code == 0
    if exit_code is None:
        detail = f"timed out after {probe.timeout_seconds:g}s"
    elif passed:
        detail = "passed"
    else:
        detail = f"exit code {exit_code}: {output or '(no output)'}"
    context.log.info("probe %s", detail)
    return {
        "kind": probe.kind,
        "port": probe.port,
        "path": probe.path,
        "passed": passed,
        "exit_code": exit_code,
        "detail": detail,
        "ran_in": runner,
    }
