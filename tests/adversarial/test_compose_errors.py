"""Compose errors must reach the result with the value that caused them."""

from __future__ import annotations

import pytest

from tests.integration.test_compose_executor import (  # noqa: F401
    new_stack_name,
    stacks,
)

pytestmark = [pytest.mark.docker, pytest.mark.compose]


def test_invalid_port_named_in_error(stacks):  # noqa: F811
    lock = stacks.lock(
        {"worker": {"image": stacks.image("worker:v1"), "ports": ["not-a-port"]}}
    )
    task = stacks.deploy_task(
        new_stack_name(), lock, {"worker": stacks.digest("worker:v1")}
    )

    result = stacks.run(task)

    assert not result.success
    assert result.failed_phase == "verify"
    assert "not-a-port" in result.error, result.error
