"""Pull progress, digest verification and pull failures, with a fake engine."""

from __future__ import annotations

import docker.errors
import pytest

from stella.agent.v1 import task_pb2
from stella_agent.config import config_from_mapping
from stella_agent.errors import DigestMismatchError, PullError, TaskCancelledError
from stella_agent.executors.base import TaskContext
from stella_agent.executors.pull import (
    PullProgress,
    normalize_repository,
    pull_image,
    verify_repo_digests,
)
from stella_agent.logstream import TaskLog

REPOSITORY = "127.0.0.1:5000/shop/web"
DIGEST = "sha256:" + "a" * 64
OTHER_DIGEST = "sha256:" + "b" * 64


class FakeApi:
    """The two calls of docker.APIClient that pull_image makes."""

    def __init__(self, events, repo_digests=None, image_missing=False):
        self.events = events
        self.repo_digests = repo_digests
        self.image_missing = image_missing
        self.pulls = []

    def pull(self, repository, **kwargs):
        self.pulls.append((repository, kwargs))
        return iter(self.events)

    def inspect_image(self, reference):
        if self.image_missing:
            raise docker.errors.ImageNotFound(f"no such image: {reference}")
        return {"Id": "sha256:" + "c" * 64, "RepoDigests": self.repo_digests}


class FakeClient:
    def __init__(self, api):
        self.api = api


def make_context(credentials=None) -> TaskContext:
    config = config_from_mapping({"agent_id": "test-agent"})
    task = task_pb2.AgentTask(id="t1", type=task_pb2.TASK_TYPE_DEPLOY)
    return TaskContext(task, TaskLog("t1"), config, credentials=credentials)


def layer_events(layer: str):
    return [
        {"status": "Pulling fs layer", "id": layer},
        {"status": "Downloading", "progressDetail": {"current": 1}, "id": layer},
        {"status": "Downloading", "progressDetail": {"current": 2}, "id": layer},
        {"status": "Downloading", "progressDetail": {"current": 3}, "id": layer},
        {"status": "Download complete", "id": layer},
        {"status": "Extracting", "progressDetail": {"current": 1}, "id": layer},
        {"status": "Extracting", "progressDetail": {"current": 2}, "id": layer},
        {"status": "Pull complete", "id": layer},
    ]


def test_progress_writes_each_status_once_per_layer():
    log = TaskLog("t1")
    progress = PullProgress(log)

    for event in layer_events("abc") + layer_events("def"):
        progress.record(event)
    progress.record({"status": f"Digest: {DIGEST}"})

    lines = log.tail().splitlines()
    assert lines.count("abc: Downloading") == 1
    assert lines.count("abc: Extracting") == 1
    assert lines.count("def: Pull complete") == 1
    assert len(lines) == 11
    assert progress.reported_digest == DIGEST


def test_pull_image_succeeds_and_passes_credentials():
    api = FakeApi(
        [{"status": f"Digest: {DIGEST}"}], repo_digests=[f"{REPOSITORY}@{DIGEST}"]
    )
    credentials = task_pb2.Credentials(
        registries=[
            task_pb2.RegistryAuth(registry="127.0.0.1:5000", username="u", password="p")
        ]
    )
    context = make_context(credentials)

    image_id = pull_image(context, FakeClient(api), REPOSITORY, DIGEST)

    assert image_id == "sha256:" + "c" * 64
    repository, kwargs = api.pulls[0]
    assert repository == REPOSITORY
    assert kwargs["tag"] == DIGEST
    assert kwargs["stream"] is True
    assert kwargs["auth_config"] == {"username": "u", "password": "p"}


def test_pull_image_maps_stream_error():
    api = FakeApi(
        [
            {"status": "Pulling fs layer", "id": "abc"},
            {
                "error": "unauthorized: authentication required",
                "errorDetail": {"message": "unauthorized: authentication required"},
            },
        ]
    )
    context = make_context()

    with pytest.raises(PullError) as caught:
        pull_image(context, FakeClient(api), REPOSITORY, DIGEST)

    assert caught.value.error_type == "registry_auth_failed"
    assert "unauthorized" in context.log.tail()


def test_pull_image_rejects_other_reported_digest():
    api = FakeApi(
        [{"status": f"Digest: {OTHER_DIGEST}"}],
        repo_digests=[f"{REPOSITORY}@{DIGEST}"],
    )

    with pytest.raises(DigestMismatchError) as caught:
        pull_image(make_context(), FakeClient(api), REPOSITORY, DIGEST)

    assert "possible tampering" in caught.value.message


def test_pull_image_rejects_image_without_repo_digest():
    api = FakeApi([], repo_digests=[f"{REPOSITORY}@{OTHER_DIGEST}"])

    with pytest.raises(DigestMismatchError) as caught:
        pull_image(make_context(), FakeClient(api), REPOSITORY, DIGEST)

    assert OTHER_DIGEST in caught.value.message


def test_pull_image_rejects_missing_image_after_pull():
    api = FakeApi([], image_missing=True)

    with pytest.raises(DigestMismatchError):
        pull_image(make_context(), FakeClient(api), REPOSITORY, DIGEST)


def test_pull_image_stops_on_cancel():
    api = FakeApi(layer_events("abc"), repo_digests=[f"{REPOSITORY}@{DIGEST}"])
    context = make_context()
    context.cancel("test")

    with pytest.raises(TaskCancelledError):
        pull_image(context, FakeClient(api), REPOSITORY, DIGEST)


def test_pull_image_maps_http_error():
    class NotFoundApi(FakeApi):
        def pull(self, repository, **kwargs):
            raise docker.errors.NotFound(
                "404", explanation="manifest unknown: manifest unknown"
            )

    with pytest.raises(PullError) as caught:
        pull_image(make_context(), FakeClient(NotFoundApi([])), REPOSITORY, DIGEST)

    assert caught.value.error_type == "image_not_found"
    assert not caught.value.retriable


@pytest.mark.parametrize(
    "repo_digests",
    [
        [f"{REPOSITORY}@{DIGEST}"],
        [f"127.0.0.1:5001/shop/web@{OTHER_DIGEST}", f"{REPOSITORY}@{DIGEST}"],
    ],
)
def test_verify_repo_digests_accepts(repo_digests):
    verify_repo_digests(REPOSITORY, DIGEST, repo_digests)


@pytest.mark.parametrize(
    "repo_digests",
    [
        [],
        [f"{REPOSITORY}@{OTHER_DIGEST}"],
        [f"127.0.0.1:5001/shop/web@{DIGEST}"],
        [f"{REPOSITORY}-evil@{DIGEST}"],
        [f"{REPOSITORY}"],
    ],
)
def test_verify_repo_digests_rejects(repo_digests):
    with pytest.raises(DigestMismatchError) as caught:
        verify_repo_digests(REPOSITORY, DIGEST, repo_digests)

    assert "possible tampering" in caught.value.message


def test_verify_repo_digests_matches_docker_hub_short_names():
    verify_repo_digests("docker.io/library/redis", DIGEST, [f"redis@{DIGEST}"])
    verify_repo_digests("docker.io/acme/app", DIGEST, [f"acme/app@{DIGEST}"])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("docker.io/library/redis", "redis"),
        ("index.docker.io/library/redis", "redis"),
        ("docker.io/acme/app", "acme/app"),
        ("docker.io/library/a/b", "library/a/b"),
        ("127.0.0.1:5000/library/redis", "127.0.0.1:5000/library/redis"),
        ("redis", "redis"),
    ],
)
def test_normalize_repository(name, expected):
    assert normalize_repository(name) == expected
