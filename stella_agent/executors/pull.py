"""Pulling an image by digest and proving that the pulled image is that digest.

The pull streams Docker's progress into the task log, one line per change of a
layer's status rather than one per byte count. Afterwards the image's
RepoDigests must contain repository@digest; anything else is a
``DigestMismatchError`` (possible tampering), raised before any container is
touched.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import docker.errors

from stella_agent.errors import DigestMismatchError, PullError
from stella_agent.executors.base import TaskContext
from stella_agent.executors.docker_errors import (
    DOCKER_EXCEPTIONS,
    docker_error,
    pull_error,
)
from stella_agent.logstream import STDERR, STDOUT, TaskLog

_DIGEST_STATUS = "Digest: "
# Docker Hub images appear in RepoDigests under their short ("familiar") name.
_DEFAULT_REGISTRY_PREFIXES = ("docker.io/", "index.docker.io/", "registry-1.docker.io/")


class PullProgress:
    """Writes the pull stream to the task log, collapsing repeated statuses.

    Docker sends "Downloading" and "Extracting" many times per layer with a
    growing byte count; only the first of each is written.
    """

    def __init__(self, log: TaskLog) -> None:
        self._log = log
        self._last_status: dict[str, str] = {}
        self.reported_digest = ""
        """The digest Docker printed in its "Digest: sha256:..." line."""

    def record(self, event: Mapping[str, Any]) -> None:
        """Write one pull stream entry if its status is new for its layer."""
        status = str(event.get("status") or "")
        if not status:
            return
        if status.startswith(_DIGEST_STATUS):
            self.reported_digest = status[len(_DIGEST_STATUS) :].strip()
        layer = str(event.get("id") or "")
        if self._last_status.get(layer) == status:
            return
        self._last_status[layer] = status
        line = f"{layer}: {status}" if layer else status
        self._log.write(STDOUT, (line + "\n").encode("utf-8", "replace"))


def pull_image(context: TaskContext, client: Any, repository: str, digest: str) -> str:
    """Pull repository@digest, verify it and return the local image id.

    Raises PullError (pull_failed, image_not_found, registry_auth_failed) or
    DigestMismatchError. Checks for cancellation and for the pull timeout
    between entries of the pull stream.
    """
    reference = f"{repository}@{digest}"
    timeout = context.config.docker.pull_timeout_seconds
    progress = PullProgress(context.log)
    context.log.info("pulling %s", reference)
    started = time.monotonic()
    try:
        # NOTE: the checks run only when the engine sends progress. A registry
        # that stalls without any progress holds the pull until the engine's
        # own network timeouts end it.
        for event in _pull_stream(client, repository, digest, context):
            error = _stream_error(event)
            if error:
                context.log.write(STDERR, (error + "\n").encode("utf-8", "replace"))
                raise pull_error(error, reference)
            progress.record(event)
            context.checkpoint()
            if time.monotonic() - started > timeout:
                raise PullError(
                    f"pull of {reference} timed out after {timeout:.0f}s "
                    "(docker.pull_timeout_seconds); retry, or raise the limit",
                    retriable=True,
                )
    finally:
        context.metrics.pull_duration_ms = int((time.monotonic() - started) * 1000)

    if progress.reported_digest and progress.reported_digest != digest:
        raise DigestMismatchError(
            f"pull of {reference} reported digest {progress.reported_digest}: "
            "possible tampering; nothing running was changed"
        )
    image = _inspect_pulled(client, reference)
    verify_repo_digests(repository, digest, image.get("RepoDigests") or [])
    context.log.info("pulled %s (image %s)", reference, image["Id"])
    return str(image["Id"])


def verify_repo_digests(
    repository: str, digest: str, repo_digests: Iterable[str]
) -> None:
    """Raise DigestMismatchError unless `repo_digests` has repository@digest.

    Entries of other repositories are ignored; repository names are compared
    in normalized form, so "docker.io/library/redis" matches "redis".
    """
    expected_name = normalize_repository(repository)
    found: list[str] = []
    for entry in repo_digests:
        name, at, entry_digest = entry.rpartition("@")
        if not at or normalize_repository(name) != expected_name:
            continue
        if entry_digest == digest:
            return
        found.append(entry_digest)
    seen = ", ".join(found) if found else "none for this repository"
    raise DigestMismatchError(
        f"image pulled as {repository}@{digest} has digests {seen}: "
        "possible tampering; nothing running was changed"
    )


def normalize_repository(repository: str) -> str:
    """Return the short form Docker uses for a repository name."""
    name = repository
    for prefix in _DEFAULT_REGISTRY_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    else:
        return name
    if name.startswith("library/") and name.count("/") == 1:
        name = name[len("library/") :]
    return name


def _pull_stream(
    client: Any, repository: str, digest: str, context: TaskContext
) -> Iterable[Mapping[str, Any]]:
    reference = f"{repository}@{digest}"
    try:
        # Docker Engine takes a digest in the tag parameter of a pull.
        stream = client.api.pull(
            repository,
            tag=digest,
            stream=True,
            decode=True,
            auth_config=context.registry_auth(repository),
        )
        yield from stream
    except docker.errors.APIError as exc:
        detail = str(exc.explanation or exc)
        context.log.write(STDERR, (detail + "\n").encode("utf-8", "replace"))
        raise pull_error(detail, reference, exc.status_code) from None
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"pull of {reference}") from None


def _stream_error(event: Mapping[str, Any]) -> str:
    detail = event.get("errorDetail")
    if isinstance(detail, Mapping) and detail.get("message"):
        return str(detail["message"])
    return str(event.get("error") or "")


def _inspect_pulled(client: Any, reference: str) -> Mapping[str, Any]:
    try:
        return client.api.inspect_image(reference)
    except docker.errors.ImageNotFound:
        raise DigestMismatchError(
            f"pull of {reference} finished but the engine has no image under that "
            "reference: possible tampering; nothing running was changed"
        ) from None
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"inspect of the pulled image {reference}") from None
