"""The Compose executor verifies the model that `docker compose config`
resolves in the staging snapshot, then runs `up` in the live deployment
directory. Anything there that Compose reads but the release does not list (a
`.env` file written by a service through a bind mount, or by an upload) makes
`up` run a model that was never verified."""

from __future__ import annotations

import time

import pytest

from stella_agent.executors.compose_stack import project_name_for
from tests.integration.test_compose_executor import (  # noqa: F401
    new_stack_name,
    stacks,
)

pytestmark = [pytest.mark.docker, pytest.mark.compose]


def test_live_env_file_changes_image(stacks, docker_client):  # noqa: F811
    name = new_stack_name()
    project = project_name_for(name)
    verified = stacks.image("worker:v1")
    unverified = stacks.image("tools:v1")
    # The image must be present, because up runs with --pull never.
    docker_client.images.pull(unverified)
    directory = stacks.stack_directory(project)
    directory.mkdir(parents=True)
    # A service that has the directory bind-mounted can write this file.
    (directory / ".env").write_text(f"IMG={unverified}\n")
    lock = stacks.lock(
        {"worker": {"image": "${IMG:-" + verified + "}", "command": ["sleep", "600"]}}
    )
    task = stacks.deploy_task(name, lock, {"worker": stacks.digest("worker:v1")})

    since = int(time.time()) - 1
    result = stacks.run(task)
    until = int(time.time()) + 1

    created = [
        event["Actor"]["Attributes"].get("image", "")
        for event in docker_client.events(
            since=since,
            until=until,
            decode=True,
            filters={
                "type": "container",
                "event": "create",
                "label": f"com.docker.compose.project={project}",
            },
        )
    ]
    assert created == [] or set(created) == {verified}, (
        f"up created containers of unverified images {created}; result "
        f"{result.error_type}: {result.error}"
    )
