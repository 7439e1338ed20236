"""Mapping of Docker SDK errors and pull failures to TaskErrors."""

from __future__ import annotations

import inspect

import docker.errors
import pytest
import requests
import requests.exceptions

from stella_agent.errors import (
    DigestMismatchError,
    DockerError,
    NotFoundError,
    PullError,
    TaskError,
)
from stella_agent.executors.docker_errors import (
    DOCKER_EXCEPTIONS,
    docker_error,
    pull_error,
)

REFERENCE = "127.0.0.1:5000/shop/web@sha256:" + "a" * 64


def api_error(status: int, explanation: str, cls=docker.errors.APIError):
    response = requests.Response()
    response.status_code = status
    return cls("request failed", response=response, explanation=explanation)


def instantiate(cls):
    """Build an instance of a docker.errors class, whatever its signature."""
    if issubclass(cls, docker.errors.APIError):
        return api_error(500, "boom", cls)
    if cls is docker.errors.ContainerError:
        return cls("c", 1, "cmd", "image", b"stderr")
    if cls is docker.errors.BuildError:
        return cls("reason", [])
    if cls in (
        docker.errors.ContextAlreadyExists,
        docker.errors.ContextNotFound,
        docker.errors.MissingContextParameter,
    ):
        return cls("name")
    if cls is docker.errors.TLSParameterError:
        return cls("bad tls")
    return cls("boom")


def sdk_exception_classes():
    classes = [
        cls
        for _, cls in inspect.getmembers(docker.errors, inspect.isclass)
        if issubclass(cls, Exception) and cls.__module__ == "docker.errors"
    ]
    assert len(classes) > 10
    return classes


@pytest.mark.parametrize("cls", sdk_exception_classes(), ids=lambda c: c.__name__)
def test_every_sdk_error_is_caught_and_mapped(cls):
    exc = instantiate(cls)

    assert isinstance(exc, DOCKER_EXCEPTIONS)
    mapped = docker_error(exc, "start container web")
    assert isinstance(mapped, TaskError)
    assert mapped.message.startswith("start container web failed")


def test_not_found_maps_to_not_found_error():
    mapped = docker_error(
        api_error(404, "No such container: web", docker.errors.NotFound),
        "stop container web",
    )

    assert isinstance(mapped, NotFoundError)
    assert "No such container: web" in mapped.message


def test_port_in_use_says_what_to_do():
    explanation = (
        "driver failed programming external connectivity on endpoint web: "
        "Error starting userland proxy: listen tcp4 127.0.0.1:8080: bind: "
        "address already in use"
    )

    mapped = docker_error(api_error(500, explanation), "start container web")

    assert isinstance(mapped, DockerError)
    assert "already in use" in mapped.message
    assert "free the port or publish another one" in mapped.message
    assert not mapped.retriable


def test_conflict_is_reported_as_conflict():
    mapped = docker_error(
        api_error(409, 'name "/web" is already in use'), "rename container a to web"
    )

    assert "conflict" in mapped.message


@pytest.mark.parametrize(
    "exc",
    [
        requests.exceptions.ConnectionError("refused"),
        requests.exceptions.ReadTimeout("slow"),
        docker.errors.DockerException(
            "Error while fetching server API version: connection refused"
        ),
    ],
)
def test_unreachable_engine_is_retriable(exc):
    mapped = docker_error(exc, "connect to Docker Engine")

    assert isinstance(mapped, DockerError)
    assert mapped.retriable
    assert "Docker Engine is not reachable" in mapped.message


@pytest.mark.parametrize(
    ("detail", "status", "error_type", "retriable"),
    [
        (
            "manifest for 127.0.0.1:5000/x@sha256:00 not found: manifest unknown",
            404,
            "image_not_found",
            False,
        ),
        ("repository does not exist", None, "image_not_found", False),
        ("no basic auth credentials", 500, "registry_auth_failed", False),
        ("unauthorized: authentication required", 500, "registry_auth_failed", False),
        (
            'Get "http://127.0.0.1:5999/v2/": dial tcp 127.0.0.1:5999: '
            "connect: connection refused",
            500,
            "pull_failed",
            True,
        ),
        ("net/http: TLS handshake timeout", 500, "pull_failed", True),
        ("toomanyrequests: rate limit", 500, "pull_failed", True),
        ("no space left on device", 500, "pull_failed", True),
    ],
)
def test_pull_error_mapping(detail, status, error_type, retriable):
    mapped = pull_error(detail, REFERENCE, status)

    assert isinstance(mapped, PullError)
    assert mapped.error_type == error_type
    assert mapped.retriable is retriable
    assert REFERENCE in mapped.message
    assert detail in mapped.message


def test_pull_verification_failure_is_digest_mismatch():
    mapped = pull_error(
        "manifest verification failed for digest sha256:aa", REFERENCE, 500
    )

    assert isinstance(mapped, DigestMismatchError)
    assert "possible tampering" in mapped.message
