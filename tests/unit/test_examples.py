"""Every task file in examples/ loads and passes task validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from stella_agent.tasks import load_task_file, validate_task

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


def test_examples_exist():
    assert len(EXAMPLES) >= 8


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_task_file_valid(path):
    task = load_task_file(path)
    task.id = path.stem

    validate_task(task)

    assert task.WhichOneof("payload")
