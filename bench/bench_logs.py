"""Throughput of the task log pipeline, as ratios against a plain copy.

Run: .venv/bin/python bench/bench_logs.py

Each case feeds the same 64 MiB of container-like output (lines of 100 bytes,
written 4 KiB at a time, as a pull or exec stream delivers it) and drains it
the way the session's writer does. The baseline cuts the same bytes into
64 KiB pieces with no numbering, spooling or masking. The ratio says how many
times slower each case is than the baseline on this machine, which is what
stays comparable between machines.
"""

from __future__ import annotations

import time
import tracemalloc

from stella_agent.logstream import STDOUT, TaskLog
from stella_agent.masking import SecretMasker
from stella_agent.session import LogSpool

TOTAL_BYTES = 64 * 1024 * 1024
WRITE_BYTES = 4096
LINE = (
    b"2026-12-04T10:00:00Z worker[42]: processed job 1234567 in 12 ms status=ok " * 2
)[:99] + b"\n"
PAYLOAD = (LINE * (WRITE_BYTES // len(LINE) + 1))[:WRITE_BYTES]
WRITES = TOTAL_BYTES // WRITE_BYTES
SECRETS = ("hunter2-password-xyz", "tok_live_51HvQ2eZvKYlo2C", "AKIAIOSFODNN7EXAMPLE")


def baseline() -> int:
    pieces = 0
    buffer = bytearray()
    for _ in range(WRITES):
        buffer += PAYLOAD
        while len(buffer) >= 65536:
            del buffer[:65536]
            pieces += 1
    return pieces


def pipeline(masker: SecretMasker | None) -> int:
    spool = LogSpool(max_bytes=32 * 1024 * 1024)
    log = TaskLog("bench", spool.offer, masker=masker)
    sent = 0
    for index in range(WRITES):
        log.write(STDOUT, PAYLOAD)
        # The writer drains as it goes, like a live stream.
        if index % 16 == 0:
            while spool.next_unsent() is not None:
                sent += 1
    log.flush()
    while spool.next_unsent() is not None:
        sent += 1
    return sent


def measure(name: str, function, *args) -> tuple[str, float, int]:
    tracemalloc.start()
    started = time.perf_counter()
    function(*args)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return name, elapsed, peak


def main() -> None:
    cases = [
        measure("baseline: cut into 64 KiB pieces", baseline),
        measure("TaskLog + LogSpool", pipeline, None),
        measure(
            "TaskLog + LogSpool + masking 3 secrets", pipeline, SecretMasker(SECRETS)
        ),
    ]
    base = cases[0][1]
    mib = TOTAL_BYTES / (1024 * 1024)
    print(f"{mib:.0f} MiB in {WRITE_BYTES}-byte writes")
    print(f"{'case':42} {'seconds':>8} {'MiB/s':>8} {'x baseline':>10} {'peak MiB':>9}")
    for name, elapsed, peak in cases:
        print(
            f"{name:42} {elapsed:8.2f} {mib / elapsed:8.0f} {elapsed / base:10.1f} "
            f"{peak / 1024 / 1024:9.1f}"
        )


if __name__ == "__main__":
    main()
