"""Digest verification of a Compose stack, in three steps.

1. ``verify_model`` checks the effective model that ``docker compose config
   --format json`` resolved (interpolation, env files, profiles and
   ``extends`` applied): every service is expected, every expected service is
   present, nothing is built, and each image is pinned ``@sha256:`` to the
   expected digest. It is a pure function.
2. ``ensure_image`` makes each image present (pulling it when missing) and
   checks that the image's RepoDigests contain the pinned digest.
3. ``check_running_images`` checks, after ``up``, that every container of the
   project runs the image id that the pinned digest resolved to.

A wrong digest raises ``DigestMismatchError``, a security event; a malformed
stack raises ``InvalidTaskError``. The functions of steps 2 and 3 block on the
Docker SDK; callers run them in a worker thread.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import docker.errors

from stella_agent.errors import DigestMismatchError, InvalidTaskError, PullError
from stella_agent.logstream import TaskLog
from stella_agent.tasks import validate_digest

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
ONEOFF_LABEL = "com.docker.compose.oneoff"
WORKING_DIR_LABEL = "com.docker.compose.project.working_dir"
COMPLETION_CONDITION = "service_completed_successfully"
PINNED_IMAGE_PATTERN = re.compile(
    r"^(?P<name>[^@\s]+)@(?P<digest>sha256:[0-9a-f]{64})$"
)
DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class ServicePlan:
    """One service of a verified model: what it runs and how to judge its health."""

    name: str
    repository: str
    """Image repository without tag or digest."""
    digest: str
    one_shot: bool
    """The service must run to completion and exit 0: its restart policy is
    "no", or another service waits for it with service_completed_successfully."""
    replicas: int

    @property
    def pull_reference(self) -> str:
        return f"{self.repository}@{self.digest}"


def split_pinned_image(image: str) -> tuple[str, str] | None:
    """Split ``repository[:tag]@sha256:...`` into repository and digest.

    Returns None when the image is not pinned by a sha256 digest. A tag
    beside the digest is dropped, because the digest alone identifies the
    image.
    """
    match = PINNED_IMAGE_PATTERN.match(image)
    if match is None:
        return None
    name = match.group("name")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name = name[:colon]
    return name, match.group("digest")


def normalize_repository(repository: str) -> str:
    """Return the fully qualified form of a repository (``nginx`` becomes
    ``docker.io/library/nginx``)."""
    first, separator, rest = repository.partition("/")
    has_registry = separator and ("." in first or ":" in first or first == "localhost")
    if not has_registry:
        path = repository if "/" in repository else f"library/{repository}"
        return f"docker.io/{path}"
    if first in DOCKER_HUB_HOSTS:
        path = rest if "/" in rest else f"library/{rest}"
        return f"docker.io/{path}"
    return repository


def validate_expected_digests(expected: Mapping[str, str]) -> dict[str, str]:
    """Return a copy of `expected` after checking that it is usable."""
    if not expected:
        raise InvalidTaskError(
            "expected_digests is required for a Compose deploy: map every service "
            "to the sha256 digest it must run"
        )
    for service, digest in expected.items():
        validate_digest(digest, f"expected_digests[{service!r}]")
    return dict(expected)


def verify_model(
    model: Mapping[str, Any], expected: Mapping[str, str]
) -> dict[str, ServicePlan]:
    """Check a resolved Compose model against the expected digests.

    Every problem found is reported in one error. Returns the plan of each
    service, by service name.
    """
    services = model.get("services")
    if not isinstance(services, dict) or not services:
        raise InvalidTaskError("the compose lock file defines no services")

    mismatches = []
    problems = []
    for name in sorted(set(expected) - set(services)):
        problems.append(
            f"service {name!r} is in expected_digests but not in the lock file"
        )
    pinned: dict[str, tuple[str, str]] = {}
    for name in sorted(services):
        spec = services[name] or {}
        if name not in expected:
            problems.append(f"service {name!r} is not in expected_digests")
            continue
        if spec.get("build") is not None:
            problems.append(
                f"service {name!r} has a build section, but the agent deploys "
                "pulled images only"
            )
        image = spec.get("image")
        if not isinstance(image, str) or not image:
            problems.append(f"service {name!r} has no image")
            continue
        parts = split_pinned_image(image)
        if parts is None:
            problems.append(
                f"service {name!r} image {image!r} is not pinned by digest "
                "(repository@sha256:...)"
            )
        elif parts[1] != expected[name]:
            mismatches.append(
                f"service {name!r} is pinned to {parts[1]}, but the task expects "
                f"{expected[name]}"
            )
        else:
            pinned[name] = parts

    if mismatches:
        raise DigestMismatchError(
            "the lock file does not pin the expected digests (possible tampering): "
            + "; ".join(mismatches + problems)
        )
    if problems:
        raise InvalidTaskError(
            "the compose lock file was rejected: " + "; ".join(problems)
        )

    completion_dependencies = _completion_dependencies(services)
    return {
        name: ServicePlan(
            name=name,
            repository=repository,
            digest=digest,
            one_shot=name in completion_dependencies
            or services[name].get("restart") == "no",
            replicas=_replicas(services[name]),
        )
        for name, (repository, digest) in pinned.items()
    }


def _completion_dependencies(services: Mapping[str, Any]) -> set[str]:
    """Return the services that another service waits to complete successfully."""
    names = set()
    for spec in services.values():
        depends_on = (spec or {}).get("depends_on") or {}
        for dependency, options in depends_on.items():
            if (
                isinstance(options, dict)
                and options.get("condition") == COMPLETION_CONDITION
            ):
                names.add(dependency)
    return names


def _replicas(spec: Mapping[str, Any]) -> int:
    deploy = spec.get("deploy") or {}
    if deploy.get("replicas") is not None:
        return int(deploy["replicas"])
    if spec.get("scale") is not None:
        return int(spec["scale"])
    return 1


def ensure_image(
    client: Any, plan: ServicePlan, auth: dict[str, str] | None, log: TaskLog
) -> str:
    """Make the service's image present, check its RepoDigests and return its id.

    An image already present under the pinned reference is not pulled again:
    Docker records a repository digest only when it pulled or pushed that
    manifest, so the local copy is the same content.
    """
    reference = plan.pull_reference
    image = _local_image(client, reference)
    if image is None:
        log.info("pull %s", reference)
        _pull(client, reference, auth, log)
        image = _local_image(client, reference)
        if image is None:
            raise PullError(
                f"pull of {reference} finished, but the engine does not have the image"
            )
    else:
        log.info("image %s is present; pull skipped", reference)
    check_repo_digests(image.attrs, plan)
    return str(image.id)


def check_repo_digests(attrs: Mapping[str, Any], plan: ServicePlan) -> None:
    """Raise unless the image's RepoDigests contain the plan's repository@digest."""
    expected_repository = normalize_repository(plan.repository)
    recorded = attrs.get("RepoDigests") or []
    for entry in recorded:
        repository, _, digest = entry.partition("@")
        if (
            digest == plan.digest
            and normalize_repository(repository) == expected_repository
        ):
            return
    raise DigestMismatchError(
        f"image of service {plan.name!r} does not carry the digest {plan.digest} "
        f"of {plan.repository} "
        f"(its repository digests: {', '.join(recorded) or 'none'}); possible tampering"
    )


def project_containers(client: Any, project: str) -> list[Any]:
    """Return the containers of a Compose project, except one-off ``run``
    containers."""
    containers = client.containers.list(
        all=True, filters={"label": [f"{PROJECT_LABEL}={project}"]}, ignore_removed=True
    )
    return [c for c in containers if c.labels.get(ONEOFF_LABEL) != "True"]


def missing_containers(
    client: Any,
    project: str,
    plans: Mapping[str, ServicePlan],
    image_ids: Mapping[str, str],
) -> list[str]:
    """Describe each service that has fewer containers of its pinned image than
    replicas; an empty list means ``up`` created everything."""
    counts: dict[str, int] = {}
    for container in project_containers(client, project):
        service = container.labels.get(SERVICE_LABEL, "")
        state = (container.attrs.get("State") or {}).get("Status", "")
        if (
            service in image_ids
            and container.attrs.get("Image") == image_ids[service]
            and state not in ("removing", "dead")
        ):
            counts[service] = counts.get(service, 0) + 1
    return [
        f"{name} has {counts.get(name, 0)} of {plan.replicas} containers"
        for name, plan in sorted(plans.items())
        if counts.get(name, 0) < plan.replicas
    ]


def check_running_images(
    client: Any,
    project: str,
    plans: Mapping[str, ServicePlan],
    image_ids: Mapping[str, str],
) -> None:
    """Raise unless every container of the project runs its service's pinned image."""
    problems = []
    for container in project_containers(client, project):
        service = container.labels.get(SERVICE_LABEL, "")
        running = container.attrs.get("Image", "")
        if service not in plans:
            problems.append(
                f"container {container.name} of service {service!r} is not part "
                "of the release"
            )
        elif running != image_ids[service]:
            problems.append(
                f"container {container.name} runs image {running}, but "
                f"{plans[service].pull_reference} "
                f"is image {image_ids[service]}"
            )
    if problems:
        raise DigestMismatchError(
            "after up, the project does not run what was verified (possible "
            "tampering): " + "; ".join(problems)
        )


def _local_image(client: Any, reference: str) -> Any:
    try:
        return client.images.get(reference)
    except docker.errors.ImageNotFound:
        return None


def _pull(
    client: Any, reference: str, auth: dict[str, str] | None, log: TaskLog
) -> None:
    try:
        for event in client.api.pull(
            reference, stream=True, decode=True, auth_config=auth
        ):
            if "error" in event:
                raise PullError(f"pull of {reference} failed: {event['error']}")
            # Progress bars arrive many times a second; only state changes are logged.
            if event.get("status") and "progress" not in event:
                layer = f"{event['id']}: " if event.get("id") else ""
                log.info("%s%s", layer, event["status"])
    except docker.errors.NotFound as exc:
        raise PullError(
            f"pull of {reference} failed: {exc.explanation or exc}",
            error_type="image_not_found",
            retriable=False,
        ) from None
    except docker.errors.APIError as exc:
        raise PullError(
            f"pull of {reference} failed: {exc.explanation or exc}"
        ) from None
