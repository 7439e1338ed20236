"""The agent's own directory of a stack, `.stella/`, contains the release record
with the environment, the lock and the snapshots it removes with rmtree. A
symbolic link planted there by anyone who can write the deployment directory
(a service with the directory bind-mounted, say) must not make the agent
write or delete files outside the deployment directory."""

from __future__ import annotations

import os

import pytest

from tests.integration.test_compose_executor import (  # noqa: F401
    new_stack_name,
    stacks,
)

pytestmark = [pytest.mark.docker, pytest.mark.compose]

SECRET = "stack-link-secret-2718"


def test_agent_directory_link_not_followed(stacks, tmp_path):  # noqa: F811
    outside = tmp_path / "outside"
    (outside / "staging").mkdir(parents=True)
    foreign_file = outside / "staging" / "foreign_file.txt"
    foreign_file.write_text("data of someone else\n")
    directory = stacks.srv / "app"
    directory.mkdir(parents=True)
    os.symlink(outside, directory / ".stella")
    lock = stacks.lock({"worker": {"image": stacks.image("worker:v1")}})
    task = stacks.deploy_task(
        new_stack_name(),
        lock,
        {"worker": stacks.digest("worker:v1")},
        deployment_directory=str(directory),
        environment={"DB_PASSWORD": SECRET},
    )

    result = stacks.run(task)

    assert foreign_file.exists(), (
        f"{foreign_file} was deleted; task result: {result.error!r}"
    )
    assert sorted(os.listdir(outside)) == ["staging"]
    if not result.success:
        assert ".stella" in result.error, result.error


def test_nested_stack_keeps_backup(stacks):  # noqa: F811
    first_stack = new_stack_name()
    second_stack = new_stack_name()
    directory = stacks.srv / "first"
    first_lock = stacks.lock({"worker": {"image": stacks.image("worker:v1")}})
    first_digests = {"worker": stacks.digest("worker:v1")}
    for release in ("a1", "a2"):
        deployed = stacks.run(
            stacks.deploy_task(
                first_stack,
                first_lock,
                first_digests,
                deployment_directory=str(directory),
                release_id=release,
            )
        )
        assert deployed.success, deployed.error
    second_lock = stacks.lock(
        {"worker": {"image": stacks.image("tools:v1"), "command": ["sleep", "600"]}}
    )
    nested = directory / ".stella" / "backup" / "files"

    second = stacks.run(
        stacks.deploy_task(
            second_stack,
            second_lock,
            {"worker": stacks.digest("tools:v1")},
            deployment_directory=str(nested),
            release_id="b1",
        )
    )
    rollback = stacks.rollback_task(first_stack)
    rollback.rollback.deployment_directory = str(directory)
    rolled_back = stacks.run(rollback)

    if not second.success:
        assert str(nested) in second.error, second.error
    assert rolled_back.success, f"{rolled_back.error_type}: {rolled_back.error}"
