"""Shared fixtures: the real Docker Engine, the loopback registry and its images.

Tests that need Docker, the registry or Compose skip when they are missing on a
developer's machine, and fail when CI=true, because in CI a skipped Docker test
would hide that the feature was never exercised. scripts/test.sh starts all of
them before running pytest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

DEV_STATE = Path(os.environ.get("STELLA_DEV_STATE", "/var/lib/stella-dev"))
TEST_LABEL = "stella-test"
"""Label on everything tests create, so a final sweep can remove leftovers."""
TEST_RUN = uuid.uuid4().hex[:12]
"""Value of TEST_LABEL for this pytest run: the sweep removes only what this
run created, never the containers of another run on the same engine."""
TEST_LABELS = {TEST_LABEL: TEST_RUN}


def require(condition: bool, reason: str) -> None:
    """Skip the test when `condition` is false, or fail it in CI."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: Docker tests must run, not skip)")
    pytest.skip(reason)


@dataclass(frozen=True)
class TestImage:
    """An image pushed by scripts/build-test-images.sh."""

    __test__ = False  # not a test class, despite the name
    repository: str
    digest: str

    @property
    def reference(self) -> str:
        return f"{self.repository}@{self.digest}"


@pytest.fixture(scope="session")
def docker_client():
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means no usable engine
        require(False, f"Docker Engine is not reachable: {exc}; run scripts/dev-env.sh")
    yield client
    _remove_labelled(client)
    client.close()


@pytest.fixture(scope="session")
def test_images(docker_client) -> dict[str, TestImage]:
    path = DEV_STATE / "test-images.json"
    require(
        path.exists(),
        f"{path} is missing; run scripts/dev-env.sh to build the test images",
    )
    data = json.loads(path.read_text())
    images = {
        name: TestImage(entry["repository"], entry["digest"])
        for name, entry in data.items()
    }
    import urllib.request

    try:
        urllib.request.urlopen("http://127.0.0.1:5000/v2/", timeout=5).close()
    except OSError as exc:
        require(
            False,
            f"registry on 127.0.0.1:5000 is not answering: {exc}; run scripts/dev-env.sh",
        )
    return images


@pytest.fixture
def container_name(docker_client):
    """A unique container name; every container whose name starts with it is
    removed after the test (including -previous- and -failed- copies)."""
    name = f"stella-test-{uuid.uuid4().hex[:10]}"
    yield name
    for container in docker_client.containers.list(all=True, filters={"name": name}):
        container.remove(force=True, v=True)


@pytest.fixture(scope="session")
def compose_command(docker_client) -> list[str]:
    """The Compose v2 command, as `docker compose` or `docker-compose`."""
    for candidate in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(candidate[0]) is None:
            continue
        try:
            out = subprocess.run(
                candidate + ["version", "--short"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip().lstrip("v").startswith("2"):
            return candidate
    require(False, "Docker Compose v2 is not installed; run scripts/dev-env.sh")
    return []


def _remove_labelled(client) -> None:
    selector = f"{TEST_LABEL}={TEST_RUN}"
    for container in client.containers.list(all=True, filters={"label": selector}):
        container.remove(force=True, v=True)
    for volume in client.volumes.list(filters={"label": selector}):
        volume.remove(force=True)
