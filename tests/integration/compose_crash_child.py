"""Run one Compose task in a child process that stops at a chosen step, so a
test can kill it there with SIGKILL as an agent crash.

Usage: python -m tests.integration.compose_crash_child SPEC_FILE. The spec
(JSON) holds the agent configuration mapping, the task as base64 protobuf, the
events file and where to stop: a phase (`stop_phase`) or a note key
(`stop_note`, optionally only once `stop_after_note` was noted). Each phase and
note is appended to the events file as a JSON line, as the journal would
record it, and `{"paused": true}` marks the stop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from pathlib import Path

import docker

from stella.agent.v1 import task_pb2
from stella_agent.config import config_from_mapping
from stella_agent.executors.compose import ComposeExecutor
from stella_agent.runner import TaskRunner


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    events = open(spec["events"], "a", buffering=1)  # noqa: SIM115 - kept to the end
    task = task_pb2.AgentTask.FromString(base64.b64decode(spec["task"]))
    noted: set[str] = set()

    def record(event: dict) -> None:
        events.write(json.dumps(event) + "\n")
        events.flush()
        os.fsync(events.fileno())

    def pause() -> None:
        record({"paused": True})
        while True:
            time.sleep(60)

    def on_phase(phase: str) -> None:
        record({"phase": phase})
        if phase == spec.get("stop_phase"):
            pause()

    def on_note(values: dict[str, str]) -> None:
        record({"note": values})
        noted.update(values)
        after = spec.get("stop_after_note")
        if spec.get("stop_note") in values and (not after or after in noted):
            pause()

    config = config_from_mapping(spec["config"])
    runner = TaskRunner(config, {"compose": ComposeExecutor()}, docker.from_env)
    context = runner.new_context(task, None, on_phase=on_phase, on_note=on_note)
    result = asyncio.run(runner.run(context))
    record({"finished": result.success, "error": result.error})


if __name__ == "__main__":
    main()
