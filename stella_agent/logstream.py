"""The task log: bytes a task produces, cut into numbered LogChunk messages.

A ``TaskLog`` belongs to one task. Executors write to it from any thread; each
write becomes one or more chunks of at most ``MAX_CHUNK_BYTES`` with a sequence
number (from 1, without gaps) and the byte offset of the chunk in the whole log.
Chunks go to a sink callable, which must not block (the session puts them in a
bounded spool). The last few KiB are kept for ``TaskResult.logs``.

The agent's own log (Python logging, on stderr) is separate: what the operator
of a task must see goes here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from google.protobuf.timestamp_pb2 import Timestamp

from stella.agent.v1 import result_pb2

MAX_CHUNK_BYTES = 64 * 1024
DEFAULT_TAIL_BYTES = 8 * 1024

AGENT = result_pb2.LOG_STREAM_AGENT
STDOUT = result_pb2.LOG_STREAM_STDOUT
STDERR = result_pb2.LOG_STREAM_STDERR

ChunkSink = Callable[[result_pb2.LogChunk], bool | None]
"""Receives each chunk; returning False means the chunk was dropped (the
spool is full), anything else that it was taken."""
Masker = Callable[[bytes], bytes]
"""Masks secrets in bytes. A masker with a ``stream()`` method (SecretMasker)
is used per stream, so a secret split across two writes is masked too."""


class TaskLog:
    """Numbered, bounded-size log chunks of one task."""

    def __init__(
        self,
        task_id: str,
        sink: ChunkSink | None = None,
        *,
        tail_bytes: int = DEFAULT_TAIL_BYTES,
        masker: Masker | None = None,
        first_sequence: int = 1,
        first_offset: int = 0,
    ) -> None:
        self.task_id = task_id
        self._sink = sink
        self._masker = masker
        self._stream_maskers: dict[int, object] = {}
        self._tail_limit = tail_bytes
        self._tail = bytearray()
        self._lock = threading.Lock()
        self._next_sequence = first_sequence
        self._offset = first_offset
        self._pending_dropped = 0
        self.dropped_bytes = 0
        """Bytes the sink dropped over the task's life."""

    @property
    def next_sequence(self) -> int:
        """Sequence number the next chunk will get."""
        return self._next_sequence

    @property
    def total_bytes(self) -> int:
        """Bytes written so far (after masking), dropped ones included."""
        return self._offset

    def info(self, message: str, *args: object) -> None:
        """Write one line from the agent, %-formatted like logging calls."""
        text = message % args if args else message
        self.write(AGENT, (text.rstrip("\n") + "\n").encode("utf-8", "replace"))

    def write(self, stream: int, data: bytes) -> None:
        """Append bytes from `stream`, emitting chunks to the sink."""
        if not data:
            return
        with self._lock:
            data = self._mask(stream, data)
            self._emit(stream, data)

    def flush(self) -> None:
        """Emit bytes held back by stream masking; call when output ends."""
        with self._lock:
            for stream, stream_masker in self._stream_maskers.items():
                self._emit(stream, stream_masker.flush())  # type: ignore[attr-defined]

    def _mask(self, stream: int, data: bytes) -> bytes:
        if self._masker is None:
            return data
        if not hasattr(self._masker, "stream"):
            return self._masker(data)
        stream_masker = self._stream_maskers.get(stream)
        if stream_masker is None:
            stream_masker = self._stream_maskers[stream] = self._masker.stream()
        return stream_masker.write(data)  # type: ignore[attr-defined]

    def _emit(self, stream: int, data: bytes) -> None:
        if data:
            self._remember_tail(data)
            for start in range(0, len(data), MAX_CHUNK_BYTES):
                piece = data[start : start + MAX_CHUNK_BYTES]
                chunk = self._make_chunk(stream, piece)
                if self._sink is None or self._sink(chunk) is not False:
                    self._next_sequence += 1
                    self._pending_dropped = 0
                else:
                    self._pending_dropped += len(piece)
                    self.dropped_bytes += len(piece)
                self._offset += len(piece)

    def tail(self) -> str:
        """Return the last bytes of the log as text, for TaskResult.logs."""
        with self._lock:
            return self._tail.decode("utf-8", "replace")

    def _make_chunk(self, stream: int, piece: bytes) -> result_pb2.LogChunk:
        time = Timestamp()
        time.GetCurrentTime()
        chunk = result_pb2.LogChunk(
            task_id=self.task_id,
            sequence=self._next_sequence,
            stream=stream,  # type: ignore[arg-type]
            data=piece,
            time=time,
            offset=self._offset,
            dropped_bytes=self._pending_dropped,
        )
        return chunk

    def _remember_tail(self, data: bytes) -> None:
        self._tail.extend(data)
        excess = len(self._tail) - self._tail_limit
        if excess > 0:
            del self._tail[:excess]
