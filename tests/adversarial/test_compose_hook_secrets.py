"""A Compose post-deploy hook gets the release's files at /deploy. The agent
keeps each release's environment, secrets included, in .stella/ of the
deployment directory, so a hook must not be able to print a secret of another
task unmasked."""

from __future__ import annotations

import asyncio

import pytest

from stella.agent.v1 import task_pb2
from stella_agent.masking import SecretMasker, secrets_of
from tests.integration.test_compose_executor import new_stack_name
from tests.integration.test_compose_tasks import stacks  # noqa: F401

pytestmark = [pytest.mark.docker, pytest.mark.compose]

OLD_SECRET = "old-release-secret-4711"
NEW_SECRET = "new-release-secret-0815"


def run_masked(helper, task: task_pb2.AgentTask):
    """Run `task` with the masker that the agent's dispatcher builds for it."""
    helper.projects.add(task.deploy.config.stack_name)
    helper.chunks = []
    masker = SecretMasker(tuple(secrets_of(task, task_pb2.Credentials()).values()))
    context = helper.runner.new_context(task, helper.chunks.append, masker=masker)
    return asyncio.run(helper.runner.run(context))


def secret_task(helper, name: str, release_id: str, secret: str, hook=None):
    """Build a one-service deploy whose DB_PASSWORD is a secret environment value."""
    lock = helper.lock(
        {
            "worker": {
                "image": helper.image("worker:v1"),
                "environment": ["DB_PASSWORD"],
            }
        }
    )
    task = helper.deploy_task(
        name,
        lock,
        {"worker": helper.digest("worker:v1")},
        release_id=release_id,
        environment={"DB_PASSWORD": secret},
    )
    task.deploy.config.secret_environment.append("DB_PASSWORD")
    if hook is not None:
        task.deploy.hooks.post_deploy.command.extend(hook)
    return task


def test_post_deploy_hook_previous_secret(stacks):  # noqa: F811
    name = new_stack_name()
    first = run_masked(stacks, secret_task(stacks, name, "s1", OLD_SECRET))
    assert first.success, first.error

    second = run_masked(
        stacks,
        secret_task(
            stacks,
            name,
            "s2",
            NEW_SECRET,
            hook=[
                "sh",
                "-c",
                "cat /deploy/.stella/backup/release.json || echo no backup record",
            ],
        ),
    )
    assert second.success, second.error
    log = b"".join(chunk.data for chunk in stacks.chunks).decode()
    assert "no backup record" in log, "the hook read the backup: " + log[-2000:]

    assert OLD_SECRET not in log
    assert OLD_SECRET not in second.logs
