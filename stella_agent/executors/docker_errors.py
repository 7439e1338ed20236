"""The one place where errors of the Docker SDK become TaskErrors.

The executor catches ``DOCKER_EXCEPTIONS`` around each engine call and passes
them to ``docker_error`` (for containers) or ``pull_error`` (for image pulls),
which name the operation and the next step to take. Messages of Docker Engine are
matched by substring because the engine reports most failures as HTTP 500 with
free text; the texts matched are those of Engine 20.10 to 28 and of the CNCF
distribution registry.
"""

from __future__ import annotations

import docker.errors
import requests.exceptions

from stella_agent.errors import (
    DigestMismatchError,
    DockerError,
    NotFoundError,
    PullError,
    TaskError,
)

DOCKER_EXCEPTIONS: tuple[type[Exception], ...] = (
    docker.errors.DockerException,
    docker.errors.StreamParseError,
    requests.exceptions.RequestException,
)
"""Exceptions the Docker SDK raises, including transport errors it passes on."""

_PORT_IN_USE = ("port is already allocated", "address already in use")
_UNREACHABLE = (
    "connection refused",
    "no such host",
    "i/o timeout",
    "timeout",
    "context deadline exceeded",
    "connection reset",
    "network is unreachable",
    "service unavailable",
    "bad gateway",
    "toomanyrequests",
    "too many requests",
    "unexpected eof",
)
_UNAUTHORIZED = (
    "unauthorized",
    "authentication required",
    "no basic auth credentials",
    "incorrect username or password",
    "denied",
    "forbidden",
)
_NOT_FOUND = (
    "manifest unknown",
    "not found",
    "name unknown",
    "repository does not exist",
)
_TAMPERED = (
    "manifest verification failed",
    "digest did not match",
    "does not match digest",
    "filesystem layer verification failed",
)


def docker_error(exc: BaseException, action: str) -> TaskError:
    """Map an exception of the Docker SDK raised while doing `action`.

    `action` names the operation and its subject, for example
    "start container web".
    """
    detail = _detail(exc)
    lowered = detail.lower()

    if isinstance(exc, docker.errors.NotFound):
        return NotFoundError(f"{action} failed: {detail}")
    if any(text in lowered for text in _PORT_IN_USE):
        return DockerError(
            f"{action} failed: a published host port is already in use ({detail}); "
            "free the port or publish another one"
        )
    if isinstance(exc, docker.errors.APIError):
        if exc.status_code == 409:
            return DockerError(f"{action} failed because of a conflict: {detail}")
        return DockerError(f"{action} failed: {detail}")
    if isinstance(exc, requests.exceptions.RequestException) or _is_unreachable(exc):
        return DockerError(
            f"{action} failed: Docker Engine is not reachable ({detail}); "
            "check that dockerd runs and DOCKER_HOST or docker.host points at it",
            retriable=True,
        )
    return DockerError(f"{action} failed: {type(exc).__name__}: {detail}")


def pull_error(
    detail: str, reference: str, status_code: int | None = None
) -> TaskError:
    """Map the error text of a failed pull of `reference`.

    `detail` comes from the engine's HTTP error or from an "error" entry of the
    pull stream.
    """
    lowered = detail.lower()
    if any(text in lowered for text in _TAMPERED):
        return DigestMismatchError(
            f"image {reference} failed verification while pulling ({detail}): "
            "possible tampering; nothing running was changed"
        )
    if status_code == 404 or any(text in lowered for text in _NOT_FOUND):
        return PullError(
            f"image {reference} not found in the registry ({detail}); "
            "check the repository and the digest",
            error_type="image_not_found",
            retriable=False,
        )
    if any(text in lowered for text in _UNAUTHORIZED):
        return PullError(
            f"the registry rejected the pull of {reference} ({detail}); "
            "send valid registry credentials for it with the task",
            error_type="registry_auth_failed",
            retriable=False,
        )
    if any(text in lowered for text in _UNREACHABLE):
        return PullError(
            f"the registry of {reference} is unreachable ({detail}); "
            "retry when it is back",
            retriable=True,
        )
    return PullError(f"pull of {reference} failed: {detail}", retriable=True)


def _detail(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        explanation = exc.explanation
        if isinstance(explanation, bytes):
            explanation = explanation.decode("utf-8", "replace")
        return str(explanation).strip()
    return str(exc).strip() or type(exc).__name__


def _is_unreachable(exc: BaseException) -> bool:
    # docker.from_env() wraps a refused socket connection in a DockerException
    # whose text starts with this.
    return str(exc).startswith("Error while fetching server API version")
