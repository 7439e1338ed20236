"""Task files and task validation."""

from __future__ import annotations

import pytest

from stella.agent.v1 import task_pb2
from stella_agent.errors import ConfigError, InvalidTaskError
from stella_agent.tasks import (
    load_task_file,
    validate_container_name,
    validate_digest,
    validate_repository,
    validate_task,
)

DIGEST = "sha256:" + "a" * 64


def test_yaml_task_file_accepts_canonical_names(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text(
        "id: t1\ntype: health-check\nexecutor: compose\nhealth_check: {stack_name: shop}\n"
        "timeout: 30s\nexpires_at: '2030-01-01T00:00:00Z'\n"
    )

    task = load_task_file(path)

    assert task.type == task_pb2.TASK_TYPE_HEALTH_CHECK
    assert task.executor == task_pb2.EXECUTOR_COMPOSE
    assert task.health_check.stack_name == "shop"
    assert task.timeout.seconds == 30


def test_json_task_file_accepts_enum_names(tmp_path):
    path = tmp_path / "task.json"
    path.write_text(
        '{"id": "t1", "type": "TASK_TYPE_DEPLOY", "deploy": {"image": "x"}}'
    )

    task = load_task_file(path)

    assert task.deploy.image == "x"


def test_task_file_with_unknown_field_names_it(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text("id: t1\ntype: deploy\ndeploy: {imagee: x}\n")

    with pytest.raises(ConfigError) as raised:
        load_task_file(path)

    assert "imagee" in str(raised.value)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (task_pb2.AgentTask(type=task_pb2.TASK_TYPE_DEPLOY), "no id"),
        (task_pb2.AgentTask(id="a b", type=task_pb2.TASK_TYPE_DEPLOY), "is invalid"),
        (task_pb2.AgentTask(id="t"), "unknown task type 0"),
        (task_pb2.AgentTask(id="t", type=99), "unknown task type 99"),
        (
            task_pb2.AgentTask(
                id="t",
                type=task_pb2.TASK_TYPE_DEPLOY,
                inspect=task_pb2.InspectPayload(),
            ),
            "needs the 'deploy' payload, got inspect",
        ),
        (
            task_pb2.AgentTask(
                id="t",
                type=task_pb2.TASK_TYPE_INSPECT,
                inspect=task_pb2.InspectPayload(),
                executor=7,
            ),
            "unknown executor 7",
        ),
    ],
)
def test_invalid_task_is_rejected(task, message):
    with pytest.raises(InvalidTaskError) as raised:
        validate_task(task)

    assert message in str(raised.value)
    assert raised.value.error_type == "invalid_task"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "sha256:abc",
        "sha256:" + "A" * 64,
        "sha512:" + "a" * 64,
        DIGEST + "0",
        "a" * 64,
    ],
)
def test_invalid_digest_is_rejected(value):
    with pytest.raises(InvalidTaskError, match="expected 'sha256:' followed by 64"):
        validate_digest(value)


def test_valid_digest_passes():
    assert validate_digest(DIGEST) == DIGEST


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "required"),
        ("registry/web:1.0", "must not contain a tag"),
        ("registry/web@" + DIGEST, "must not contain a digest"),
        ("Web", "not a valid image repository"),
        ("web//x", "not a valid image repository"),
    ],
)
def test_invalid_repository_is_rejected(value, message):
    with pytest.raises(InvalidTaskError, match=message):
        validate_repository(value)


@pytest.mark.parametrize(
    "value",
    ["web", "library/web", "127.0.0.1:5000/stella-test/web", "reg.example.com/a/b_c"],
)
def test_valid_repository_passes(value):
    assert validate_repository(value) == value


@pytest.mark.parametrize("value", ["", "-web", "we b", "web/x", "x" * 300])
def test_invalid_container_name_is_rejected(value):
    with pytest.raises(InvalidTaskError):
        validate_container_name(value)
