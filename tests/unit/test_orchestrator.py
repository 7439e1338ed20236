"""Reference orchestrator input checks."""

from __future__ import annotations

import pytest

from stella.agent.v1 import task_pb2
from stella_agent.errors import ConfigError
from stella_agent.orchestrator.control import _artifact_problem
from stella_agent.orchestrator.server import check_listen_address


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("7443", "must be host:port"),
        (":7445", "must be host:port"),
        ("127.0.0.1:99999", "outside 0 to 65535"),
    ],
)
def test_invalid_listen_address_is_rejected(listen, message):
    with pytest.raises(ConfigError, match=message):
        check_listen_address(listen)


def compose_task() -> task_pb2.AgentTask:
    return task_pb2.AgentTask(
        id="t",
        type=task_pb2.TASK_TYPE_DEPLOY,
        deploy=task_pb2.DeployPayload(
            artifacts=[
                task_pb2.ArtifactReference(
                    name="compose.stella.lock.yml", type="compose_lock"
                )
            ]
        ),
    )


def test_artifact_without_content_names_the_fix():
    problem = _artifact_problem(compose_task(), {})

    assert "--artifact compose.stella.lock.yml=PATH" in problem


def test_artifact_content_for_unknown_name_is_reported():
    problem = _artifact_problem(
        compose_task(), {"compose.stella.lock.yml": b"x", "lock.yml": b"y"}
    )

    assert "'lock.yml'" in problem
    assert "does not reference" in problem


def test_matching_artifacts_pass():
    assert _artifact_problem(compose_task(), {"compose.stella.lock.yml": b"x"}) == ""


def test_oversized_result_is_truncated_to_fit():
    from stella.agent.v1 import result_pb2
    from stella_agent.runner import MAX_RESULT_BYTES, fit_result

    result = result_pb2.TaskResult(
        task_id="t", outputs={"report": "x" * (20 * 1024 * 1024), "status": "ok"}
    )

    fit_result(result)

    assert result.ByteSize() <= MAX_RESULT_BYTES
    assert result.outputs["status"] == "ok"
    assert result.outputs["result_truncated"] == "true"
    assert "more bytes truncated" in result.outputs["report"]
