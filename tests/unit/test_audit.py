"""Audit log: record format, hash chain, resume, tamper detection, masking."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from stella_agent.audit import (
    ACTION_TASK_ACCEPTED,
    AUDIT_FILE,
    GENESIS_HASH,
    AuditError,
    AuditLog,
    record_hash,
    verify_audit_log,
)
from stella_agent.masking import SecretMasker


def _write_records(path: Path, count: int) -> list[str]:
    with AuditLog(path, "host-1") as log:
        return [
            log.record(
                ACTION_TASK_ACCEPTED,
                task_id=f"task-{index}",
                actor="alice",
                outcome="ok",
                index=index,
            )
            for index in range(1, count + 1)
        ]


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_record_has_every_field_in_order(tmp_path):
    path = tmp_path / AUDIT_FILE

    with AuditLog(path, "host-1") as log:
        line = log.record(
            "deploy.phase", task_id="t1", actor="ci", outcome="ok", phase="pull"
        )

    record = json.loads(line)
    assert list(record) == [
        "time",
        "seq",
        "agent_id",
        "task_id",
        "actor",
        "action",
        "outcome",
        "details",
        "prev_hash",
        "hash",
    ]
    assert record["seq"] == 1
    assert record["agent_id"] == "host-1"
    assert record["task_id"] == "t1"
    assert record["actor"] == "ci"
    assert record["action"] == "deploy.phase"
    assert record["outcome"] == "ok"
    assert record["details"] == {"phase": "pull"}
    assert record["prev_hash"] == GENESIS_HASH
    assert record["hash"] == record_hash(record)


def test_record_time_is_utc_iso_8601(tmp_path):
    with AuditLog(tmp_path / AUDIT_FILE, "host-1") as log:
        record = json.loads(log.record("task.started"))

    assert record["time"].endswith("Z")
    moment = datetime.datetime.fromisoformat(record["time"])
    assert moment.utcoffset() == datetime.timedelta(0)
    now = datetime.datetime.now(datetime.UTC)
    assert abs((now - moment).total_seconds()) < 60


def test_records_are_chained_by_previous_line(tmp_path):
    path = tmp_path / AUDIT_FILE

    lines = _write_records(path, 3)

    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[1]["prev_hash"] == hashlib.sha256(lines[0].encode()).hexdigest()
    assert records[2]["prev_hash"] == hashlib.sha256(lines[1].encode()).hexdigest()
    assert path.read_text() == "".join(line + "\n" for line in lines)


def test_file_is_private(tmp_path):
    path = tmp_path / AUDIT_FILE

    _write_records(path, 1)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_in_state_dir_uses_audit_file(tmp_path):
    with AuditLog.in_state_dir(tmp_path, "host-1") as log:
        log.record("task.started")

    assert (tmp_path / "audit.log").exists()


def test_chain_resumes_after_reopen(tmp_path):
    path = tmp_path / AUDIT_FILE
    first = _write_records(path, 2)

    with AuditLog(path, "host-1") as log:
        assert log.last_seq == 2
        line = log.record("task.started")

    record = json.loads(line)
    assert record["seq"] == 3
    assert record["prev_hash"] == hashlib.sha256(first[-1].encode()).hexdigest()
    assert verify_audit_log(path) == []


def test_intact_log_verifies(tmp_path):
    path = tmp_path / AUDIT_FILE
    _write_records(path, 5)

    assert verify_audit_log(path) == []


def test_empty_log_verifies(tmp_path):
    path = tmp_path / AUDIT_FILE
    AuditLog(path, "host-1").close()

    assert verify_audit_log(path) == []


def test_missing_log_is_reported(tmp_path):
    problems = verify_audit_log(tmp_path / "none.log")

    assert len(problems) == 1
    assert "cannot read" in problems[0]


def test_edited_record_is_detected(tmp_path):
    path = tmp_path / AUDIT_FILE
    _write_records(path, 3)
    lines = _lines(path)
    lines[1] = lines[1].replace(b'"outcome":"ok"', b'"outcome":"failed"')
    path.write_bytes(b"".join(lines))

    problems = verify_audit_log(path)

    assert len(problems) == 2
    assert problems[0].startswith("line 2 (seq 2): hash does not match")
    assert problems[1].startswith("line 3 (seq 3): prev_hash does not match")


def test_edited_last_record_is_detected(tmp_path):
    path = tmp_path / AUDIT_FILE
    _write_records(path, 3)
    lines = _lines(path)
    lines[2] = lines[2].replace(b'"actor":"alice"', b'"actor":"mallory"')
    path.write_bytes(b"".join(lines))

    problems = verify_audit_log(path)

    assert problems == [
        "line 3 (seq 3): hash does not match the content; the record was edited"
    ]


def test_edit_with_recomputed_hash_is_detected(tmp_path):
    path = tmp_path / AUDIT_FILE
    _write_records(path, 3)
    lines = _lines(path)
    record = json.loads(lines[1])
    record["outcome"] = "failed"
    record["hash"] = record_hash(record)
    lines[1] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))

    problems = verify_audit_log(path)

    assert len(problems) == 1
    assert problems[0].startswith("line 3 (seq 3): prev_hash does not match")


def test_reformatted_record_is_detected(tmp_path):
    path = tmp_path / AUDIT_FILE
    _write_records(path, 2)
    lines = _lines(path)
    lines[0] = json.dumps(json.loads(lines[0]), indent=None).encode() + b"\n"
    path.write_bytes(b"".join(lines))

    problems = verify_audit_log(path)

    assert len(problems) == 1
    assert "line 2 (seq 2): prev_hash does not match" in problems[0]


def test_deleted_record_is_detected(tmp_path):
    path = tmp_path / AUDIT_FILE
    _write_records(path, 4)
    lines = _lines(path)
    del lines[1]
    path.write_bytes(b"".join(lines))

    problems = verify_audit_log(path)

    assert any("line 2 (seq 3): prev_hash does not match" in p for p in problems)
    assert any("line 2 (seq 3): expected seq 2" in p for p in problems)
    assert not any(p.startswith("line 3") for p in problems)


def test_deleted_first_record_is_detected(tmp_path):
    path = tmp_path / AUDIT_FILE
    _write_records(path, 3)
    path.write_bytes(b"".join(_lines(path)[1:]))

    problems = verify_audit_log(path)

    assert any("line 1 (seq 2): expected seq 1" in p for p in problems)
    assert any("line 1 (seq 2): prev_hash does not match" in p for p in problems)


def test_reordered_records_are_detected(tmp_path):
    path = tmp_path / AUDIT_FILE
    _write_records(path, 4)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(b"".join(lines))

    problems = verify_audit_log(path)

    assert any(p.startswith("line 2 (seq 3)") for p in problems)
    assert any(p.startswith("line 3 (seq 2)") for p in problems)
    assert any(p.startswith("line 4 (seq 4)") for p in problems)


def test_truncated_middle_record_is_detected(tmp_path):
    path = tmp_path / AUDIT_FILE
    _write_records(path, 3)
    lines = _lines(path)
    lines[1] = lines[1][:40] + b"\n"
    path.write_bytes(b"".join(lines))

    problems = verify_audit_log(path)

    assert problems[0] == "line 2: not valid JSON"
    assert problems[1].startswith("line 3 (seq 3): prev_hash does not match")
    assert len(problems) == 2


def test_inserted_blank_line_is_detected(tmp_path):
    path = tmp_path / AUDIT_FILE
    _write_records(path, 2)
    lines = _lines(path)
    lines.insert(1, b"\n")
    path.write_bytes(b"".join(lines))

    problems = verify_audit_log(path)

    assert "line 2: not valid JSON" in problems
    assert any(p.startswith("line 3 (seq 2)") for p in problems)


def test_torn_last_line_is_kept_and_chain_resumes(tmp_path):
    path = tmp_path / AUDIT_FILE
    _write_records(path, 2)
    with open(path, "ab") as handle:
        handle.write(b'{"time":"2025-01-01T00:00:00.000000Z","seq":3,"ag')

    with AuditLog(path, "host-1") as log:
        line = log.record("task.started")

    assert json.loads(line)["seq"] == 4
    assert verify_audit_log(path) == ["line 3: not valid JSON"]


def test_unterminated_last_line_is_reported(tmp_path):
    path = tmp_path / AUDIT_FILE
    _write_records(path, 2)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))

    problems = verify_audit_log(path)

    assert len(problems) == 1
    assert problems[0].startswith("line 2: incomplete")


def test_resume_reads_records_longer_than_a_block(tmp_path):
    path = tmp_path / AUDIT_FILE
    with AuditLog(path, "host-1") as log:
        log.record("files.written", content="x" * 200_000)
        log.record("files.written", content="y" * 100_000)

    with AuditLog(path, "host-1") as log:
        record = json.loads(log.record("task.finished"))

    assert record["seq"] == 3
    assert verify_audit_log(path) == []


def test_secrets_are_masked_in_every_string(tmp_path):
    secret = "hunter2-secret"
    path = tmp_path / AUDIT_FILE
    masker = SecretMasker([secret])

    with AuditLog(path, "host-1", masker=masker.mask_text) as log:
        log.record(
            "command.executed",
            task_id="t1",
            actor=f"user {secret}",
            outcome=f"failed: {secret}",
            argv=["login", f"--password={secret}"],
            env={"TOKEN": secret, secret: "as key"},
            output=f"echo {secret}".encode(),
        )

    text = path.read_text()
    assert secret not in text
    record = json.loads(text)
    assert record["actor"] == "user ****"
    assert record["outcome"] == "failed: ****"
    assert record["details"]["argv"] == ["login", "--password=****"]
    assert record["details"]["env"] == {"TOKEN": "****", "****": "as key"}
    assert record["details"]["output"] == "echo ****"


def test_non_json_details_become_strings(tmp_path):
    with AuditLog(tmp_path / AUDIT_FILE, "host-1") as log:
        line = log.record(
            "files.written",
            path=Path("/srv/app/config.yml"),
            sizes=(1, 2),
            ratio=float("nan"),
            flag=True,
            nothing=None,
        )

    details = json.loads(line)["details"]
    assert details == {
        "path": "/srv/app/config.yml",
        "sizes": [1, 2],
        "ratio": "nan",
        "flag": True,
        "nothing": None,
    }


def test_on_record_gets_lines_in_order(tmp_path):
    received: list[str] = []
    path = tmp_path / AUDIT_FILE

    with AuditLog(path, "host-1", on_record=received.append) as log:
        lines = [log.record("task.started", task_id=f"t{i}") for i in range(3)]

    assert received == lines


def test_concurrent_records_form_one_chain(tmp_path):
    path = tmp_path / AUDIT_FILE
    log = AuditLog(path, "host-1")

    def write(worker: int) -> None:
        for index in range(50):
            log.record("deploy.phase", task_id=f"w{worker}", index=index)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()

    seqs = [json.loads(line)["seq"] for line in _lines(path)]
    assert seqs == list(range(1, 401))
    assert verify_audit_log(path) == []


def test_closed_log_raises(tmp_path):
    log = AuditLog(tmp_path / AUDIT_FILE, "host-1")
    log.close()

    with pytest.raises(AuditError, match="closed"):
        log.record("task.started")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_write_failure_raises_audit_error():
    log = AuditLog("/dev/full", "host-1")

    with pytest.raises(AuditError) as raised:
        log.record("task.started")
    log.close()

    assert raised.value.error_type == "audit_failed"
    assert "cannot write the audit log /dev/full" in raised.value.message
