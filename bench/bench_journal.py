"""Cost of the journal's durability, as a ratio against plain SQLite inserts.

Run: .venv/bin/python bench/bench_journal.py [DIRECTORY]

Each task the agent accepts costs journal writes: recorded before it is
accepted, a phase change, the result and outbox entry, the acknowledgement.
The baseline inserts one row per task into a table of the same size without
WAL or fsync (synchronous=OFF). Both run in DIRECTORY (default: a temporary
directory), because the disk decides the result.
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from stella.agent.v1 import result_pb2, task_pb2
from stella_agent.journal import Journal

TASKS = 500


def make_task(number: int) -> task_pb2.AgentTask:
    return task_pb2.AgentTask(
        id=f"bench-{number}",
        type=task_pb2.TASK_TYPE_DEPLOY,
        deploy=task_pb2.DeployPayload(
            image="registry.example.com/shop/web",
            digest="sha256:" + "a" * 64,
            config=task_pb2.DeployConfig(
                container_name="web", environment={"A": "b" * 40}
            ),
        ),
    )


def baseline(directory: Path) -> None:
    db = sqlite3.connect(directory / "baseline.db", isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("CREATE TABLE t (id TEXT PRIMARY KEY, body BLOB)")
    for number in range(TASKS):
        db.execute(
            "INSERT INTO t VALUES (?, ?)",
            (f"bench-{number}", make_task(number).SerializeToString()),
        )
    db.close()


def journal_lifecycle(directory: Path) -> None:
    journal = Journal(directory / "journal.db")
    for number in range(TASKS):
        task = make_task(number)
        journal.record_received(task, "docker:web")
        journal.set_phase(task.id, "pull")
        journal.finish(result_pb2.TaskResult(task_id=task.id, success=True))
        journal.acknowledge(task.id)
    journal.close()


def main() -> None:
    with tempfile.TemporaryDirectory(
        dir=sys.argv[1] if len(sys.argv) > 1 else None
    ) as tmp:
        directory = Path(tmp)
        results = []
        for name, function in (
            ("baseline: one insert per task, no fsync", baseline),
            ("journal: received, phase, result, ack", journal_lifecycle),
        ):
            started = time.perf_counter()
            function(directory)
            results.append((name, time.perf_counter() - started))
    base = results[0][1]
    print(f"{TASKS} tasks")
    print(f"{'case':42} {'seconds':>8} {'tasks/s':>8} {'x baseline':>10}")
    for name, elapsed in results:
        print(f"{name:42} {elapsed:8.3f} {TASKS / elapsed:8.0f} {elapsed / base:10.1f}")


if __name__ == "__main__":
    main()
