"""The session's log spool: bounded, ordered, resendable."""

from __future__ import annotations

from stella_agent.logstream import STDOUT, TaskLog
from stella_agent.session import LogSpool


def drain(spool):
    out = []
    while (chunk := spool.next_unsent()) is not None:
        out.append(chunk)
    return out


def test_chunks_are_sent_in_offer_order():
    spool = LogSpool(max_bytes=1000)
    a, b = TaskLog("a", spool.offer), TaskLog("b", spool.offer)

    a.write(STDOUT, b"a1")
    b.write(STDOUT, b"b1")
    a.write(STDOUT, b"a2")

    assert [(c.task_id, c.data) for c in drain(spool)] == [
        ("a", b"a1"),
        ("b", b"b1"),
        ("a", b"a2"),
    ]


def test_rewind_resends_from_reported_position():
    spool = LogSpool(max_bytes=1000)
    log = TaskLog("a", spool.offer)
    for n in range(5):
        log.write(STDOUT, b"x%d" % n)
    drain(spool)

    spool.rewind({"a": 4})

    assert [c.sequence for c in drain(spool)] == [4, 5]


def test_rewind_without_position_resends_everything():
    spool = LogSpool(max_bytes=1000)
    log = TaskLog("a", spool.offer)
    log.write(STDOUT, b"one")
    log.write(STDOUT, b"two")
    drain(spool)

    spool.rewind({})

    assert [c.sequence for c in drain(spool)] == [1, 2]


def test_full_spool_evicts_sent_chunks_first():
    spool = LogSpool(max_bytes=10)
    log = TaskLog("a", spool.offer)
    log.write(STDOUT, b"12345")
    log.write(STDOUT, b"67890")
    drain(spool)

    log.write(STDOUT, b"abcde")

    assert log.dropped_bytes == 0
    assert spool.bytes == 10


def test_full_spool_of_unsent_chunks_drops_and_marks():
    spool = LogSpool(max_bytes=10)
    log = TaskLog("a", spool.offer)
    log.write(STDOUT, b"1234567890")
    log.write(STDOUT, b"dropped")
    drain(spool)
    log.write(STDOUT, b"ok")

    chunks = drain(spool)

    assert log.dropped_bytes == 7
    assert chunks[-1].data == b"ok"
    assert chunks[-1].dropped_bytes == 7
    assert chunks[-1].sequence == 2


def test_drop_forgets_acknowledged_task():
    spool = LogSpool(max_bytes=100)
    log = TaskLog("a", spool.offer)
    log.write(STDOUT, b"abc")

    spool.drop("a")

    assert spool.bytes == 0
    assert drain(spool) == []
