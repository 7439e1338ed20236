"""Task checks of the Compose executor that fail before Docker is contacted."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from stella.agent.v1 import task_pb2
from stella_agent.config import config_from_mapping
from stella_agent.errors import InvalidTaskError
from stella_agent.executors.compose import ComposeExecutor, validate_environment
from stella_agent.runner import TaskRunner

DIGEST = "sha256:" + "1" * 64
LOCK = b"services: {}\n"


def lock_reference(**fields) -> task_pb2.ArtifactReference:
    return task_pb2.ArtifactReference(
        name=fields.pop("name", "compose.stella.lock.yml"),
        type=fields.pop("type", "compose_lock"),
        sha256=hashlib.sha256(LOCK).hexdigest(),
        content=LOCK,
        **fields,
    )


def deploy_task(**changes) -> task_pb2.AgentTask:
    config = task_pb2.DeployConfig(stack_name="shop", expected_digests={"web": DIGEST})
    payload = task_pb2.DeployPayload(config=config, artifacts=[lock_reference()])
    for key, value in changes.items():
        if key == "artifacts":
            del payload.artifacts[:]
            payload.artifacts.extend(value)
        elif key == "hooks":
            payload.hooks.CopyFrom(value)
        elif key in ("environment", "expected_digests"):
            field = getattr(payload.config, key)
            field.clear()
            field.update(value)
        else:
            setattr(payload.config, key, value)
    return task_pb2.AgentTask(
        id="task-1",
        executor=task_pb2.EXECUTOR_COMPOSE,
        type=task_pb2.TASK_TYPE_DEPLOY,
        deploy=payload,
    )


def run(task: task_pb2.AgentTask, tmp_path):
    config = config_from_mapping({"agent_id": "t", "state_dir": str(tmp_path)})
    runner = TaskRunner(config, {"compose": ComposeExecutor()})
    return asyncio.run(runner.run(runner.new_context(task, None)))


def test_command_needs_service(tmp_path):
    task = task_pb2.AgentTask(
        id="task-1",
        executor=task_pb2.EXECUTOR_COMPOSE,
        type=task_pb2.TASK_TYPE_EXECUTE_COMMAND,
        execute_command=task_pb2.ExecuteCommandPayload(stack_name="shop", argv=["id"]),
    )

    result = run(task, tmp_path)

    assert result.error_type == "invalid_task"
    assert "execute_command.service is required" in result.error


def test_hook_without_image_rejected(tmp_path):
    hooks = task_pb2.DeployHooks(pre_deploy=task_pb2.HookConfig(command=["true"]))

    result = run(deploy_task(hooks=hooks), tmp_path)

    assert result.error_type == "invalid_task"
    assert "hooks.pre_deploy.image is empty" in result.error


def test_rollback_to_target_digest_unsupported(tmp_path):
    task = task_pb2.AgentTask(
        id="task-1",
        executor=task_pb2.EXECUTOR_COMPOSE,
        type=task_pb2.TASK_TYPE_ROLLBACK,
        rollback=task_pb2.RollbackPayload(
            stack_name="shop", target_digest=DIGEST, image="web"
        ),
    )

    result = run(task, tmp_path)

    assert result.error_type == "unsupported"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"stack_name": ""}, "stack_name is required"),
        ({"stack_name": "---"}, "no letter or digit"),
        ({"expected_digests": {}}, "expected_digests is required"),
        ({"artifacts": []}, "exactly one artifact of type compose_lock"),
        (
            {"artifacts": [lock_reference(), lock_reference(name="b.yml")]},
            "exactly one",
        ),
        (
            {
                "artifacts": [
                    lock_reference(),
                    lock_reference(name="version.json", type="config"),
                ]
            },
            "reserved",
        ),
        (
            {
                "artifacts": [
                    lock_reference(),
                    lock_reference(name=".stella/x", type="config"),
                ]
            },
            "reserved",
        ),
        ({"artifacts": [lock_reference(name="../compose.yml")]}, "'..'"),
        (
            {"environment": {"DOCKER_HOST": "tcp://elsewhere"}},
            "reserved for running Docker Compose",
        ),
        ({"deployment_directory": "/etc"}, "not inside an allowed root"),
    ],
)
def test_invalid_deploy_rejected(tmp_path, changes, message):
    task = deploy_task(**changes)

    result = run(task, tmp_path)

    assert not result.success
    assert result.error_type == "invalid_task"
    assert message in result.error
    assert not (tmp_path / "stacks").exists()


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"1BAD": "x"}, "invalid"),
        ({"BAD-NAME": "x"}, "invalid"),
        ({"PATH": "/tmp"}, "reserved"),
        ({"COMPOSE_PROFILES": "debug"}, "reserved"),
        ({"OK": "nul\x00byte"}, "NUL"),
    ],
)
def test_environment_rejected(environment, message):
    with pytest.raises(InvalidTaskError, match=message):
        validate_environment(environment)


def test_environment_keeps_values_verbatim():
    values = {"A": "$HOME", "B": "a'b\"c", "C": "#x", "D": "line\nbreak", "E": ""}

    assert validate_environment(values) == values
