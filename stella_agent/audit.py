"""The agent's audit log: append-only JSON Lines with a hash chain.

Each line of ``<state_dir>/audit.log`` is one JSON object with these keys, in
this order:

    time       ISO 8601 UTC with microseconds, for example
               "2025-01-31T12:00:00.123456Z"
    seq        1 for the first record, then one more for each line
    agent_id   the agent that wrote it
    task_id    the task it concerns, or ""
    actor      who asked for the task (AgentTask.actor), or ""
    action     what happened, one of the ``ACTION_*`` names below
    outcome    "ok", "failed", "rejected" and similar, or ""
    details    an object of further facts; secrets are masked
    prev_hash  SHA-256 (hex) of the previous line's bytes without its line
               feed, or 64 zeros for the first record
    hash       SHA-256 (hex) of this record without "hash", serialized as JSON
               with sorted keys, "," and ":" as separators and ASCII escapes

Every record is written with one ``write`` on a file opened with O_APPEND and
is fsynced before ``record`` returns. After a restart the chain continues from
the last line of the file. ``verify_audit_log`` reports lines whose content,
order or predecessor changed.

The chain has no key, so someone who can rewrite the whole file can also
recompute every hash. What detects that is a copy elsewhere: every record is
also sent to the orchestrator, and the ``hash`` of the last record it holds must
appear in the file.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from stella_agent.errors import TaskError

logger = logging.getLogger(__name__)

AUDIT_FILE = "audit.log"
"""Name of the audit log in the state directory."""
GENESIS_HASH = "0" * 64
"""prev_hash of the first record."""

ACTION_TASK_ACCEPTED = "task.accepted"
ACTION_TASK_REJECTED = "task.rejected"
ACTION_TASK_STARTED = "task.started"
ACTION_TASK_FINISHED = "task.finished"
ACTION_DEPLOY_PHASE = "deploy.phase"
ACTION_ROLLBACK = "deploy.rollback"
ACTION_HOOK_RUN = "hook.run"
ACTION_COMMAND_EXECUTED = "command.executed"
ACTION_FILES_WRITTEN = "files.written"
ACTION_STICKER_WRITTEN = "sticker.written"
ACTION_DIGEST_MISMATCH = "security.digest_mismatch"
ACTION_SIGNATURE_INVALID = "security.signature_invalid"
ACTION_CREDENTIALS_INVALID = "security.credentials_invalid"

_FIELDS = ("time", "seq", "agent_id", "task_id", "actor", "action", "outcome")
_READ_BLOCK_BYTES = 64 * 1024

TextMasker = Callable[[str], str]
RecordSink = Callable[[str], None]


class AuditError(TaskError):
    """The audit log could not be written. A task must not go on unaudited."""

    error_type = "audit_failed"
    retriable = True


def record_hash(record: dict[str, Any]) -> str:
    """Return the hash of a record: SHA-256 of its canonical JSON without "hash"."""
    body = {key: value for key, value in record.items() if key != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def line_hash(line: bytes) -> str:
    """Return the prev_hash that follows `line` (its bytes without line feed)."""
    return hashlib.sha256(line).hexdigest()


class AuditLog:
    """Appends hash-chained records to one audit log file.

    Safe to use from several threads of one process. Two processes writing the
    same file would fork the chain, which ``verify_audit_log`` reports.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        agent_id: str,
        masker: TextMasker | None = None,
        *,
        on_record: RecordSink | None = None,
    ) -> None:
        self.path = Path(path)
        self.agent_id = agent_id
        self._masker = masker
        self._on_record = on_record
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        self._seq, self._prev_hash = self._resume()

    @classmethod
    def in_state_dir(
        cls,
        state_dir: str | os.PathLike[str],
        agent_id: str,
        masker: TextMasker | None = None,
        *,
        on_record: RecordSink | None = None,
    ) -> AuditLog:
        """Open ``<state_dir>/audit.log``."""
        return cls(Path(state_dir) / AUDIT_FILE, agent_id, masker, on_record=on_record)

    @property
    def last_seq(self) -> int:
        """seq of the last record written, 0 for an empty log."""
        return self._seq

    def record(
        self,
        action: str,
        *,
        task_id: str = "",
        actor: str = "",
        outcome: str = "",
        **details: Any,
    ) -> str:
        """Append one record, fsync it, and return its JSON line.

        Detail values that are not JSON types are stored as their str(). Every
        string is masked first. Raises AuditError when the file cannot be
        written.
        """
        with self._lock:
            if self._fd < 0:
                raise AuditError(f"audit log {self.path} is closed")
            record: dict[str, Any] = {
                "time": _utc_now(),
                "seq": self._seq + 1,
                "agent_id": self.agent_id,
                "task_id": self._mask(task_id),
                "actor": self._mask(actor),
                "action": self._mask(action),
                "outcome": self._mask(outcome),
                "details": _json_safe(details, self._mask),
                "prev_hash": self._prev_hash,
            }
            record["hash"] = record_hash(record)
            line = json.dumps(record, separators=(",", ":"))
            data = line.encode("ascii")
            self._append(data + b"\n")
            self._seq += 1
            self._prev_hash = line_hash(data)
            if self._on_record is not None:
                # Called under the lock, so the sink gets records in file
                # order. It must not block and must not raise.
                self._on_record(line)
        return line

    def close(self) -> None:
        """Close the file; later records raise AuditError."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _mask(self, text: str) -> str:
        return self._masker(text) if self._masker is not None else text

    def _append(self, data: bytes) -> None:
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)
        except OSError as exc:
            # Part of the line may be in the file now; start the next record
            # from what the file holds.
            self._seq, self._prev_hash = self._resume()
            raise AuditError(
                f"cannot write the audit log {self.path}: {exc.strerror}; free space "
                "or fix its permissions"
            ) from None

    def _resume(self) -> tuple[int, str]:
        """Return (seq, hash of the last line) to continue the chain from."""
        try:
            with open(self.path, "rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                if size == 0:
                    return 0, GENESIS_HASH
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    logger.warning(
                        "audit log %s ends in an incomplete line, probably from a "
                        "crash while writing; it stays in the file and "
                        "verification reports it",
                        self.path,
                    )
                    os.write(self._fd, b"\n")
                    os.fsync(self._fd)
                return _chain_position(handle)
        except OSError as exc:
            raise AuditError(
                f"cannot read the audit log {self.path}: {exc.strerror}"
            ) from None


def _chain_position(handle) -> tuple[int, str]:
    """Return (seq, prev_hash) after the last line of an audit log.

    An unreadable line takes one seq, like a record, so that verification and
    the next record agree on the numbering.
    """
    last_hash = ""
    unreadable = 0
    for line in _lines_from_end(handle):
        if not last_hash:
            last_hash = line_hash(line)
        seq = _record_seq(line)
        if seq is not None:
            return seq + unreadable, last_hash
        unreadable += 1
    return unreadable, last_hash or GENESIS_HASH


def _record_seq(line: bytes) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    seq = record.get("seq")
    if isinstance(seq, int) and not isinstance(seq, bool):
        return seq
    return None


def _lines_from_end(handle) -> Iterator[bytes]:
    """Yield the lines of a file that ends in a line feed, last line first."""
    # Start before the final line feed, which ends the last line.
    position = handle.seek(0, os.SEEK_END) - 1
    remainder = b""
    while position > 0:
        step = min(_READ_BLOCK_BYTES, position)
        position -= step
        handle.seek(position)
        block = handle.read(step) + remainder
        lines = block.split(b"\n")
        remainder = lines[0]
        yield from reversed(lines[1:])
    yield remainder


def _utc_now() -> str:
    now = datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json_safe(value: Any, mask: TextMasker) -> Any:
    """Return `value` as JSON types with every string masked."""
    if isinstance(value, str):
        return mask(value)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes):
        return mask(value.decode("utf-8", "replace"))
    if isinstance(value, dict):
        return {mask(str(key)): _json_safe(item, mask) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_safe(item, mask) for item in value]
    return mask(str(value))


def verify_audit_log(path: str | os.PathLike[str]) -> list[str]:
    """Check the hash chain of an audit log and return the problems found.

    An empty list means every record is intact and in order. A problem names
    the line and what is wrong: unreadable, edited (its hash does not match),
    a record before it edited, deleted or moved (prev_hash does not match), or
    a gap or step back in seq. Records removed from the end of the file leave
    no trace in it: compare the last hash with the orchestrator's copy.
    """
    problems: list[str] = []
    previous = GENESIS_HASH
    expected_seq = 1
    try:
        handle = open(path, "rb")
    except OSError as exc:
        return [f"cannot read {path}: {exc.strerror}"]
    with handle:
        for number, raw in enumerate(handle, 1):
            if not raw.endswith(b"\n"):
                problems.append(
                    f"line {number}: incomplete, without a line feed; the agent "
                    "stopped while writing it"
                )
            line = raw.rstrip(b"\n")
            record = _parse_record(line)
            if isinstance(record, str):
                problems.append(f"line {number}: {record}")
                expected_seq += 1
            else:
                problems.extend(_check_record(number, record, previous, expected_seq))
                expected_seq = record["seq"] + 1
            previous = line_hash(line)
    return problems


def _parse_record(line: bytes) -> dict[str, Any] | str:
    """Return the record of a line, or a sentence saying why it is unreadable."""
    try:
        record = json.loads(line)
    except ValueError:
        return "not valid JSON"
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [
        key for key in (*_FIELDS, "details", "prev_hash", "hash") if key not in record
    ]
    if missing:
        return f"not an audit record: missing {', '.join(missing)}"
    seq = record["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool):
        return f"seq {seq!r} is not an integer"
    return record


def _check_record(
    number: int, record: dict[str, Any], previous: str, expected_seq: int
) -> list[str]:
    where = f"line {number} (seq {record['seq']})"
    problems = []
    if record["hash"] != record_hash(record):
        problems.append(
            f"{where}: hash does not match the content; the record was edited"
        )
    if record["prev_hash"] != previous:
        problems.append(
            f"{where}: prev_hash does not match the line before; a record before "
            "it was edited, deleted or moved"
        )
    if record["seq"] != expected_seq:
        problems.append(
            f"{where}: expected seq {expected_seq}; records were deleted or moved"
        )
    return problems
