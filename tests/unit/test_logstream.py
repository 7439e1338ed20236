"""Task log chunking: sequence numbers, offsets, chunk size, tail."""

from __future__ import annotations

from stella_agent.logstream import AGENT, MAX_CHUNK_BYTES, STDOUT, TaskLog


def test_chunks_are_numbered_without_gaps():
    chunks = []
    log = TaskLog("t1", chunks.append)

    log.info("first %s", "line")
    log.write(STDOUT, b"abc")
    log.write(STDOUT, b"")

    assert [c.sequence for c in chunks] == [1, 2]
    assert chunks[0].data == b"first line\n"
    assert chunks[0].stream == AGENT
    assert chunks[1].offset == len(b"first line\n")
    assert all(c.task_id == "t1" for c in chunks)


def test_large_write_is_split_at_chunk_limit():
    chunks = []
    log = TaskLog("t1", chunks.append)
    data = bytes(range(256)) * (MAX_CHUNK_BYTES * 3 // 256 + 7)

    log.write(STDOUT, data)

    assert all(len(c.data) <= MAX_CHUNK_BYTES for c in chunks)
    assert b"".join(c.data for c in chunks) == data
    assert [c.offset for c in chunks] == [
        i * MAX_CHUNK_BYTES for i in range(len(chunks))
    ]
    assert log.total_bytes == len(data)


def test_tail_keeps_last_bytes():
    log = TaskLog("t1", None, tail_bytes=10)

    log.write(STDOUT, b"0123456789abcdef")

    assert log.tail() == "6789abcdef"


def test_masker_applies_before_chunking():
    chunks = []
    log = TaskLog(
        "t1", chunks.append, masker=lambda data: data.replace(b"hunter2", b"****")
    )

    log.write(STDOUT, b"password=hunter2\n")

    assert chunks[0].data == b"password=****\n"
    assert "hunter2" not in log.tail()


def test_dropped_chunk_is_reported_on_next_chunk():
    chunks = []
    refuse = {"on": False}

    def sink(chunk):
        if refuse["on"]:
            return False
        chunks.append(chunk)
        return True

    log = TaskLog("t1", sink)
    log.write(STDOUT, b"kept\n")
    refuse["on"] = True
    log.write(STDOUT, b"lost bytes\n")
    refuse["on"] = False
    log.write(STDOUT, b"after\n")

    assert [c.sequence for c in chunks] == [1, 2]
    assert chunks[1].dropped_bytes == len(b"lost bytes\n")
    assert chunks[1].offset == len(b"kept\nlost bytes\n")
    assert log.dropped_bytes == len(b"lost bytes\n")
