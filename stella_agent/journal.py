"""The agent's durable journal: SQLite in the state directory.

The journal is what lets the agent keep its promises across crashes:

- every task is recorded before the agent accepts it, with its state and the
  phase it is in, plus notes an executor writes before a risky step (which
  container it renamed, which one it created), so that recovery after a crash
  can find what to undo;
- results wait in an outbox until the orchestrator acknowledges them;
- idempotency keys map to the first task that used them, for a configured
  window, so that a repeated task is answered instead of run again.

The database runs in WAL mode with ``synchronous=FULL``: a commit returns only
after its WAL frames are on disk. All access goes through one connection
guarded by a lock, because executors record phases from worker threads.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from stella.agent.v1 import result_pb2, task_pb2

RECEIVED = "received"
RUNNING = "running"
FINISHED = "finished"
REJECTED = "rejected"
RETRIABLE = "failed_retriable"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL,
    target_key TEXT NOT NULL,
    state TEXT NOT NULL,
    phase TEXT NOT NULL DEFAULT '',
    notes TEXT NOT NULL DEFAULT '{}',
    task BLOB NOT NULL,
    result BLOB,
    original_task_id TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_key ON tasks (idempotency_key);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state);
CREATE TABLE IF NOT EXISTS outbox (
    task_id TEXT PRIMARY KEY,
    result BLOB NOT NULL,
    created_at REAL NOT NULL
);
"""


@dataclass
class JournalTask:
    """A task row of the journal."""

    task: task_pb2.AgentTask
    state: str
    phase: str
    notes: dict[str, str]
    result: result_pb2.TaskResult | None
    original_task_id: str
    received_at: float


class Journal:
    """Task states, the result outbox and idempotency keys, on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, params: tuple) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(sql, params)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # Tasks --------------------------------------------------------------------

    def record_received(
        self,
        task: task_pb2.AgentTask,
        target_key: str,
        *,
        state: str = RECEIVED,
        original_task_id: str = "",
    ) -> None:
        """Record a task before it is accepted (or as rejected)."""
        now = time.time()
        self._write(
            "INSERT OR IGNORE INTO tasks (task_id, idempotency_key, target_key, state, task, "
            "original_task_id, received_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                task.id,
                task.idempotency_key or task.id,
                target_key,
                state,
                task.SerializeToString(),
                original_task_id,
                now,
                now,
            ),
        )

    def set_state(self, task_id: str, state: str) -> None:
        self._write(
            "UPDATE tasks SET state = ?, updated_at = ? WHERE task_id = ?",
            (state, time.time(), task_id),
        )

    def set_phase(self, task_id: str, phase: str) -> None:
        self._write(
            "UPDATE tasks SET phase = ?, state = ?, updated_at = ? WHERE task_id = ?",
            (phase, RUNNING, time.time(), task_id),
        )

    def add_notes(self, task_id: str, notes: dict[str, str]) -> None:
        """Merge recovery notes into a task's row, durably."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT notes FROM tasks WHERE task_id = ?", (task_id,)
                ).fetchone()
                merged = json.loads(row[0]) if row else {}
                merged.update(notes)
                self._db.execute(
                    "UPDATE tasks SET notes = ?, updated_at = ? WHERE task_id = ?",
                    (json.dumps(merged), time.time(), task_id),
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def finish(self, result: result_pb2.TaskResult, state: str = FINISHED) -> None:
        """Store a task's result and put it in the outbox, in one transaction.

        A retriable failure frees the task's idempotency key (state
        RETRIABLE), so a retry with the same key runs instead of getting the
        failure again; a repeat of the same task id still gets it.
        """
        if state == FINISHED and not result.success and result.retriable:
            state = RETRIABLE
        blob = result.SerializeToString()
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "UPDATE tasks SET state = ?, result = ?, updated_at = ? WHERE task_id = ?",
                    (state, blob, now, result.task_id),
                )
                self._db.execute(
                    "INSERT OR REPLACE INTO outbox (task_id, result, created_at) VALUES (?, ?, ?)",
                    (result.task_id, blob, now),
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def get(self, task_id: str) -> JournalTask | None:
        with self._lock:
            row = self._db.execute(
                "SELECT task, state, phase, notes, result, original_task_id, received_at "
                "FROM tasks WHERE task_id = ?",
                (task_id,),
            ).fetchone()
        return _row_to_task(row) if row else None

    def find_by_key(self, key: str, window_seconds: float) -> JournalTask | None:
        """Return the first task that used idempotency key `key` within the
        window, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT task, state, phase, notes, result, original_task_id, received_at "
                "FROM tasks WHERE idempotency_key = ? AND original_task_id = '' "
                "AND state NOT IN (?, ?) AND received_at >= ? "
                "ORDER BY received_at DESC LIMIT 1",
                (key, REJECTED, RETRIABLE, time.time() - window_seconds),
            ).fetchone()
        return _row_to_task(row) if row else None

    def unfinished(self) -> list[JournalTask]:
        """Tasks received or running when the agent last stopped."""
        with self._lock:
            rows = self._db.execute(
                "SELECT task, state, phase, notes, result, original_task_id, received_at "
                "FROM tasks WHERE state IN (?, ?) ORDER BY received_at",
                (RECEIVED, RUNNING),
            ).fetchall()
        return [_row_to_task(row) for row in rows]

    # Outbox -------------------------------------------------------------------

    def outbox(self) -> list[result_pb2.TaskResult]:
        with self._lock:
            rows = self._db.execute(
                "SELECT result FROM outbox ORDER BY created_at"
            ).fetchall()
        return [result_pb2.TaskResult.FromString(row[0]) for row in rows]

    def acknowledge(self, task_id: str) -> None:
        self._write("DELETE FROM outbox WHERE task_id = ?", (task_id,))

    def prune(self, window_seconds: float) -> int:
        """Forget finished tasks older than the window whose results were
        acknowledged; return how many rows were removed."""
        cutoff = time.time() - window_seconds
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM tasks WHERE state IN (?, ?, ?) AND updated_at < ? "
                "AND task_id NOT IN (SELECT task_id FROM outbox)",
                (FINISHED, REJECTED, RETRIABLE, cutoff),
            )
            return cursor.rowcount


def _row_to_task(row: tuple) -> JournalTask:
    task_blob, state, phase, notes, result_blob, original, received_at = row
    return JournalTask(
        task=task_pb2.AgentTask.FromString(task_blob),
        state=state,
        phase=phase,
        notes=json.loads(notes),
        result=result_pb2.TaskResult.FromString(result_blob) if result_blob else None,
        original_task_id=original,
        received_at=received_at,
    )
