"""The agent's connection to the orchestrator.

``AgentSession.run()`` dials the orchestrator with mutual TLS, opens the
Connect stream, sends Hello, waits for Welcome and then, until the stream
breaks: sends heartbeats, hands received tasks to the dispatcher, and sends
log chunks and results. When the stream breaks it reconnects with exponential
backoff and jitter; tasks keep running meanwhile. Results stay in the outbox
until the orchestrator acknowledges them and are sent again on every new
stream, as are the log chunks the orchestrator has not seen (Welcome lists
where each task's log resumes).

The stream uses grpc.aio's read()/write() style: one task reads, and only the
writer task writes.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable

import grpc
from cryptography import x509
from google.protobuf.timestamp_pb2 import Timestamp

from stella.agent.v1 import gateway_pb2, gateway_pb2_grpc, result_pb2
from stella_agent import __version__
from stella_agent.audit import ACTION_SIGNATURE_INVALID
from stella_agent.certs import TlsFiles, certificate_identity, read_tls_files
from stella_agent.config import AgentConfig
from stella_agent.dispatcher import Dispatcher
from stella_agent.errors import CertificateError, StellaError, TaskError
from stella_agent.journal import Journal
from stella_agent.security import AgentSecurity
from stella_agent.signing import ReplayedTaskError, SignatureError
from stella_agent.tasks import TYPE_NAMES

logger = logging.getLogger(__name__)

# Status codes after which reconnecting cannot help: the orchestrator rejected
# who the agent is. Everything else is retried with backoff.
FATAL_STATUS_CODES = {
    grpc.StatusCode.UNAUTHENTICATED: "the orchestrator rejected the agent's certificate",
    grpc.StatusCode.PERMISSION_DENIED: "the orchestrator rejected the agent's identity",
    grpc.StatusCode.UNIMPLEMENTED: "the server does not offer stella.agent.v1.AgentGateway",
}
RETRYABLE_STATUS_CODES = {
    grpc.StatusCode.UNAVAILABLE: "orchestrator unreachable or restarting",
    grpc.StatusCode.DEADLINE_EXCEEDED: "no answer in time",
    grpc.StatusCode.CANCELLED: "stream cancelled",
    grpc.StatusCode.INTERNAL: "transport error",
    grpc.StatusCode.UNKNOWN: "orchestrator failed",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "orchestrator overloaded",
    grpc.StatusCode.ABORTED: "stream aborted",
}

MAX_AUDIT_RECORD_BYTES = 1024 * 1024
"""Audit records larger than this stay local, so that no message comes near
the 16 MiB gRPC limit."""
MAX_SPOOL_BYTES = 32 * 1024 * 1024
"""Log bytes kept per agent for resending after a reconnect."""


EXPIRY_WARNING_INTERVAL_SECONDS = 12 * 3600
SILENCE_LIMIT = 3
"""Heartbeat intervals without any message from the orchestrator after which
the agent treats the stream as dead."""
MIN_SILENCE_SECONDS = 5.0


def tls_fingerprint(config: AgentConfig) -> tuple:
    """Modification time and size of the TLS files, to notice a renewal."""
    result = []
    for path in (config.tls.ca_file, config.tls.cert_file, config.tls.key_file):
        try:
            stat = os.stat(path)
            result.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
        except OSError:
            result.append(None)
    return tuple(result)


def warn_expiry(cert_pem: bytes, config: AgentConfig) -> None:
    """Log a warning when the certificate expires within the configured days."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    if left.total_seconds() < config.tls.expiry_warning_days * 86400:
        logger.warning(
            "the agent certificate %s expires on %s UTC, in %d day(s); renew it",
            config.tls.cert_file,
            cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M"),
            left.days,
        )


class FatalConnectionError(StellaError):
    """The orchestrator rejected the agent in a way a retry cannot fix."""


def classify(error: grpc.RpcError) -> tuple[bool, str]:
    """Return (fatal, reason) for a failed stream."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    if code in FATAL_STATUS_CODES:
        return True, f"{FATAL_STATUS_CODES[code]}: {details}"
    reason = RETRYABLE_STATUS_CODES.get(code, code.name.lower())
    if details and "CERTIFICATE_VERIFY_FAILED" in details:
        reason = "the orchestrator's certificate is not signed by the configured CA (tls.ca_file)"
    elif details and "Peer name" in details and "not in peer certificate" in details:
        reason = (
            "the orchestrator's certificate does not carry the name the agent dialled; set "
            "orchestrator.server_name to a name in its certificate"
        )
    return False, f"{reason}: {details}"


def channel_options(config: AgentConfig) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.keepalive_time_ms", int(config.orchestrator.keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnects are paced by the session's own backoff.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ]
    if config.orchestrator.server_name:
        options.append(
            ("grpc.ssl_target_name_override", config.orchestrator.server_name)
        )
    return options


class LogSpool:
    """Log chunks of tasks whose results are not acknowledged yet, bounded in
    bytes, kept for sending and for resending after a reconnect.

    Executors offer chunks from worker threads, so every method takes the
    lock. Chunks are sent in the order they were offered. Sent chunks stay
    until their space is needed, because a stream can break after a write
    returned but before the orchestrator stored the chunk. Welcome then gives
    the position to resend from. When even evicting every sent chunk leaves no room,
    the offered chunk is dropped and the TaskLog reports the gap on its next
    chunk.
    """

    def __init__(
        self,
        max_bytes: int = MAX_SPOOL_BYTES,
        on_data: Callable[[], None] | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self._on_data = on_data
        self._lock = threading.Lock()
        self._bytes = 0
        self._chunks: dict[str, list[result_pb2.LogChunk]] = {}
        self._unsent: collections.deque[result_pb2.LogChunk] = collections.deque()
        self._sent: collections.deque[result_pb2.LogChunk] = collections.deque()

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def offer(self, chunk: result_pb2.LogChunk) -> bool:
        """Take a chunk for sending; return False when there is no room."""
        size = len(chunk.data)
        with self._lock:
            while self._bytes + size > self.max_bytes and self._sent:
                self._evict(self._sent.popleft())
            if self._bytes + size > self.max_bytes:
                return False
            self._chunks.setdefault(chunk.task_id, []).append(chunk)
            self._unsent.append(chunk)
            self._bytes += size
        if self._on_data is not None:
            self._on_data()
        return True

    def next_unsent(self) -> result_pb2.LogChunk | None:
        """Return the oldest chunk not sent on the current stream, marking it
        sent."""
        with self._lock:
            while self._unsent:
                chunk = self._unsent.popleft()
                if chunk.task_id in self._chunks:
                    self._sent.append(chunk)
                    return chunk
            return None

    def has_unsent(self) -> bool:
        with self._lock:
            return bool(self._unsent)

    def rewind(self, positions: dict[str, int]) -> None:
        """Mark for sending again every kept chunk at or after the position
        the orchestrator reported for its task (1 when it reported none)."""
        with self._lock:
            resend = []
            for task_id, chunks in self._chunks.items():
                start = positions.get(task_id, 1)
                resend.extend(c for c in chunks if c.sequence >= start)
            # Offer order is time order across tasks; keep it.
            resend.sort(key=lambda c: (c.time.seconds, c.time.nanos, c.sequence))
            self._unsent = collections.deque(resend)
            self._sent = collections.deque(
                c for c in self._sent if c.sequence < positions.get(c.task_id, 1)
            )

    def drop(self, task_id: str) -> None:
        """Forget a task's chunks (its result was acknowledged)."""
        with self._lock:
            for chunk in self._chunks.pop(task_id, []):
                self._bytes -= len(chunk.data)

    def _evict(self, chunk: result_pb2.LogChunk) -> None:
        chunks = self._chunks.get(chunk.task_id)
        if chunks and chunk in chunks:
            chunks.remove(chunk)
            self._bytes -= len(chunk.data)


class AgentSession:
    """Keeps the agent connected and moves messages between stream and
    dispatcher."""

    def __init__(
        self,
        config: AgentConfig,
        tls: TlsFiles,
        dispatcher_factory: Callable[[AgentSession], Dispatcher],
        *,
        journal: Journal,
        security: AgentSecurity | None = None,
        capabilities: list[str] | None = None,
    ) -> None:
        self.config = config
        self.security = security
        self.tls = tls
        self.journal = journal
        self.capabilities = capabilities or [*TYPE_NAMES.values(), "docker", "compose"]
        # Results survive restarts in the journal's outbox until acknowledged.
        self.outbox: dict[str, result_pb2.TaskResult] = {
            result.task_id: result for result in journal.outbox()
        }
        self._data_ready = asyncio.Event()
        self.spool = LogSpool(on_data=self._wake_writer)
        self._outgoing: asyncio.Queue[gateway_pb2.ConnectRequest] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stopping = asyncio.Event()
        self._tls_changed = asyncio.Event()
        self._last_received = time.monotonic()
        self._tls_fingerprint = tls_fingerprint(config)
        self.connected = asyncio.Event()
        self.streams_opened = 0
        self._loop = asyncio.get_event_loop()
        self._loop_thread = threading.get_ident()
        self.dispatcher = dispatcher_factory(self)

    # Callbacks for the dispatcher and task logs -------------------------------

    def send_event(self, message: gateway_pb2.ConnectRequest) -> None:
        """Send a message now if a stream is open; otherwise drop it (events
        such as TaskAccepted only matter on a live stream)."""
        if self._outgoing is not None:
            self._outgoing.put_nowait(message)

    def chunk_sink(self, task_id: str) -> Callable[[result_pb2.LogChunk], bool]:
        """Return a sink for a task's log chunks; safe to call from worker
        threads, and never blocks."""
        return self.spool.offer

    def _wake_writer(self) -> None:
        if threading.get_ident() == self._loop_thread:
            self._data_ready.set()
        else:
            self._loop.call_soon_threadsafe(self._data_ready.set)

    def deliver_result(self, result: result_pb2.TaskResult) -> None:
        """Keep a result until acknowledged and send it if a stream is open.
        The writer sends every spooled chunk before it, so the result comes
        after the task's log."""
        self.outbox[result.task_id] = result
        if self._outgoing is not None:
            self._outgoing.put_nowait(gateway_pb2.ConnectRequest(task_result=result))

    # Connection loop ----------------------------------------------------------

    def stop(self) -> None:
        """Close the stream and return from run() at once."""
        self._stopping.set()

    async def shutdown(self, grace_seconds: float, flush_seconds: float = 10.0) -> None:
        """Stop gracefully: take no new tasks, let running ones finish within
        the grace period, wait for the orchestrator to acknowledge results,
        then stop."""
        # Stop taking tasks and wait for the running ones.
        logger.info("shutting down: no new tasks; draining")
        await self.dispatcher.drain(grace_seconds)

        # Flush results: wait until the outbox is acknowledged, if connected.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + flush_seconds
        while self.outbox and self.connected.is_set() and loop.time() < deadline:
            await asyncio.sleep(0.1)
        if self.outbox:
            logger.warning(
                "%d result(s) not acknowledged yet; they stay in the journal and are "
                "sent after the next start",
                len(self.outbox),
            )

        # Close the stream.
        self.stop()

    async def run(self) -> None:
        """Stay connected until stop(); raise FatalConnectionError when the
        orchestrator rejects the agent."""
        # Claim the targets of unfinished tasks before any new task can arrive.
        self.dispatcher.prepare_recovery()
        recovery = asyncio.create_task(self.dispatcher.recover())
        watcher = asyncio.create_task(self._watch_tls())
        delay = self.config.orchestrator.reconnect_initial_seconds
        try:
            while not self._stopping.is_set():
                try:
                    await self._run_stream()
                    delay = self.config.orchestrator.reconnect_initial_seconds
                    reason = "stream closed by the orchestrator"
                    if self._tls_changed.is_set():
                        # Tasks and results do not depend on the stream, so
                        # switching streams disturbs no running task.
                        self._tls_changed.clear()
                        logger.info(
                            "opening a new stream with the reloaded certificate"
                        )
                        continue
                except grpc.RpcError as exc:
                    fatal, reason = classify(exc)
                    if fatal:
                        raise FatalConnectionError(reason) from None
                except (ConnectionError, TimeoutError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                if self._stopping.is_set():
                    break
                if self.connected.is_set():
                    # The stream had been up, so start the backoff afresh.
                    delay = self.config.orchestrator.reconnect_initial_seconds
                self.connected.clear()
                wait = delay * random.uniform(0.5, 1.0)
                logger.warning(
                    "disconnected from %s (%s); reconnecting in %.1fs",
                    self.config.orchestrator.address,
                    reason,
                    wait,
                )
                try:
                    await asyncio.wait_for(self._stopping.wait(), wait)
                except TimeoutError:
                    pass
                delay = min(delay * 2, self.config.orchestrator.reconnect_max_seconds)
        finally:
            self.connected.clear()
            recovery.cancel()
            watcher.cancel()
            await asyncio.gather(recovery, watcher, return_exceptions=True)
            await self.dispatcher.stop()
            if self._channel is not None:
                await self._channel.close()

    async def _watch_tls(self) -> None:
        """Reload the certificate, key and CA when their files change, and
        warn ahead of the certificate's expiry."""
        warn_expiry(self.tls.cert, self.config)
        last_warning = time.monotonic()
        while True:
            await asyncio.sleep(self.config.tls.reload_check_seconds)
            if time.monotonic() - last_warning > EXPIRY_WARNING_INTERVAL_SECONDS:
                warn_expiry(self.tls.cert, self.config)
                last_warning = time.monotonic()
            fingerprint = tls_fingerprint(self.config)
            if fingerprint == self._tls_fingerprint:
                continue
            tls = self.config.tls
            try:
                # Read as a pair: a half-written renewal fails here and is
                # tried again on the next check.
                renewed = read_tls_files(tls.ca_file, tls.cert_file, tls.key_file)
                identity = certificate_identity(renewed.cert)
                if identity != self.config.agent_id:
                    raise CertificateError(
                        f"the new certificate names {identity!r}, not {self.config.agent_id!r}"
                    )
            except CertificateError as exc:
                logger.error("TLS files changed but were not reloaded: %s", exc)
                continue
            self._tls_fingerprint = fingerprint
            if renewed == self.tls:
                continue
            self.tls = renewed
            logger.info("reloaded the agent certificate from %s", tls.cert_file)
            warn_expiry(renewed.cert, self.config)
            self._tls_changed.set()

    async def _run_stream(self) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.tls.ca,
            private_key=self.tls.key,
            certificate_chain=self.tls.cert,
        )
        if self._channel is not None:
            await self._channel.close()
        self._channel = grpc.aio.secure_channel(
            self.config.orchestrator.address,
            credentials,
            options=channel_options(self.config),
        )
        stub = gateway_pb2_grpc.AgentGatewayStub(self._channel)
        call = stub.Connect()
        await call.write(gateway_pb2.ConnectRequest(hello=self._hello()))
        response = await asyncio.wait_for(
            call.read(), self.config.orchestrator.connect_timeout_seconds
        )
        if response is grpc.aio.EOF:
            await call.wait_for_connection()
            code = await call.code()
            if code != grpc.StatusCode.OK:
                raise _StatusError(code, await call.details())
            raise ConnectionError("stream ended before Welcome")
        if response.WhichOneof("body") != "welcome":
            raise ConnectionError(
                f"expected Welcome, got {response.WhichOneof('body')}"
            )
        welcome = response.welcome
        self.streams_opened += 1
        logger.info(
            "connected to %s (session %s)",
            self.config.orchestrator.address,
            welcome.session_id,
        )

        outgoing: asyncio.Queue[gateway_pb2.ConnectRequest] = asyncio.Queue()
        self._resend(outgoing, welcome)
        self._outgoing = outgoing
        self.connected.set()
        interval = welcome.heartbeat_interval.ToTimedelta().total_seconds() or 10.0
        tasks = [
            asyncio.create_task(self._read_loop(call)),
            asyncio.create_task(self._write_loop(call, outgoing)),
            asyncio.create_task(self._heartbeat_loop(outgoing, interval)),
            asyncio.create_task(self._stopping.wait()),
            asyncio.create_task(self._tls_changed.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for finished in done:
                if finished.exception() is not None:
                    raise finished.exception()  # type: ignore[misc]
        finally:
            self._outgoing = None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            call.cancel()

    def _hello(self) -> gateway_pb2.Hello:
        hello = gateway_pb2.Hello(
            agent_id=self.config.agent_id,
            version=__version__,
            capabilities=self.capabilities,
            running_task_ids=self.dispatcher.running_task_ids(),
            unacknowledged_task_ids=list(self.outbox),
            hostname=socket.gethostname(),
            target_ids=list(self.config.tasks.targets),
        )
        if self.security is not None:
            hello.public_key.CopyFrom(self.security.public_key())
        return hello

    def _resend(self, outgoing: asyncio.Queue, welcome: gateway_pb2.Welcome) -> None:
        """Queue what the orchestrator may have missed while disconnected."""
        positions = {p.task_id: p.next_sequence for p in welcome.log_positions}
        self.spool.rewind(positions)
        self._data_ready.set()
        for result in self.outbox.values():
            outgoing.put_nowait(gateway_pb2.ConnectRequest(task_result=result))

    async def _read_loop(self, call) -> None:
        while True:
            message = await call.read()
            self._last_received = time.monotonic()
            if message is grpc.aio.EOF:
                code = await call.code()
                if code != grpc.StatusCode.OK:
                    raise _StatusError(code, await call.details())
                return
            self._handle(message)

    def _handle(self, message: gateway_pb2.ConnectResponse) -> None:
        kind = message.WhichOneof("body")
        if kind == "task":
            self._receive_verified(
                lambda: self._verify_unsigned(message.task), message.task.id
            )
        elif kind == "signed_task":
            self._receive_verified(lambda: self._verify_signed(message.signed_task), "")
        elif kind == "cancel":
            self.dispatcher.cancel(message.cancel.task_id, message.cancel.reason)
        elif kind == "result_ack":
            task_id = message.result_ack.task_id
            if self.outbox.pop(task_id, None) is not None:
                self.journal.acknowledge(task_id)
                self.spool.drop(task_id)
                logger.debug("result of task %s acknowledged", task_id)
        elif kind == "signed_task":
            logger.warning(
                "received a signed task, but signed tasks are not enabled; ignored"
            )
        elif kind in ("heartbeat", "welcome"):
            pass

    def _verify_unsigned(self, task):
        if self.security is None:
            return task
        return self.security.verifier.check_unsigned(task)

    def _verify_signed(self, signed):
        if self.security is None:
            raise SignatureError(
                "received a signed task, but this agent has no signing keys configured",
                task_id="",
            )
        return self.security.verifier.verify(signed)

    def _receive_verified(self, verify, claimed_task_id: str) -> None:
        """Hand a task to the dispatcher once its signature checks out; reject
        it, before any Docker call, when it does not."""
        try:
            task = verify()
        except ReplayedTaskError as exc:
            # A task id seen before: the dispatcher responds from the journal
            # without running it again.
            self.dispatcher.receive(exc.task)
            return
        except TaskError as exc:
            task_id = getattr(exc, "task_id", "") or claimed_task_id or "(unknown)"
            logger.warning("task %s failed verification: %s", task_id, exc.message)
            if self.security is not None:
                self.security.record(
                    ACTION_SIGNATURE_INVALID,
                    task_id=task_id,
                    outcome="rejected",
                    error_type=exc.error_type,
                    reason=exc.message,
                )
            self.send_event(
                gateway_pb2.ConnectRequest(
                    task_rejected=gateway_pb2.TaskRejected(
                        task_id=task_id,
                        error_type=exc.error_type,
                        error=exc.message,
                        retriable=exc.retriable,
                    )
                )
            )
            self.send_event(
                gateway_pb2.ConnectRequest(
                    task_result=result_pb2.TaskResult(
                        task_id=task_id,
                        success=False,
                        error=exc.message,
                        error_type=exc.error_type,
                        retriable=exc.retriable,
                    )
                )
            )
            return
        self.dispatcher.receive(task)

    def send_audit_record(self, line: str) -> None:
        """Forward an audit record to the orchestrator; safe from any thread.

        NOTE: records written while no stream is open are only in the local
        audit log; the protocol has no acknowledgement for audit records.
        """

        if len(line) > MAX_AUDIT_RECORD_BYTES:
            logger.warning(
                "audit record of %d bytes not sent to the orchestrator (limit %d); "
                "it is in the local audit log",
                len(line),
                MAX_AUDIT_RECORD_BYTES,
            )
            return

        def send() -> None:
            if self._outgoing is not None:
                self._outgoing.put_nowait(
                    gateway_pb2.ConnectRequest(
                        audit_record=gateway_pb2.AuditRecord(json=line)
                    )
                )

        if threading.get_ident() == self._loop_thread:
            send()
        else:
            self._loop.call_soon_threadsafe(send)

    async def _write_loop(self, call, outgoing: asyncio.Queue) -> None:
        """Send spooled log chunks first, then queued messages, so a result
        never overtakes its task's log."""
        while True:
            chunk = self.spool.next_unsent()
            if chunk is not None:
                await call.write(gateway_pb2.ConnectRequest(log_chunk=chunk))
                continue
            if not outgoing.empty():
                await call.write(outgoing.get_nowait())
                continue
            self._data_ready.clear()
            if self.spool.has_unsent():
                continue
            getter = asyncio.ensure_future(outgoing.get())
            data = asyncio.ensure_future(self._data_ready.wait())
            done, pending = await asyncio.wait(
                {getter, data}, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in pending:
                waiter.cancel()
            if getter in done:
                await call.write(getter.result())

    async def _heartbeat_loop(self, outgoing: asyncio.Queue, interval: float) -> None:
        """Send a heartbeat every interval, and end the stream when nothing
        came from the orchestrator for SILENCE_LIMIT intervals (it sends its
        own heartbeats), which catches a half-open connection that HTTP/2
        keepalive may take longer to notice."""
        self._last_received = time.monotonic()
        limit = max(interval * SILENCE_LIMIT, MIN_SILENCE_SECONDS)
        while True:
            await asyncio.sleep(interval)
            silent = time.monotonic() - self._last_received
            if silent > limit:
                raise ConnectionError(
                    f"nothing received from the orchestrator for {silent:.0f}s; the "
                    "connection is dead or half-open"
                )
            sent_at = Timestamp()
            sent_at.GetCurrentTime()
            outgoing.put_nowait(
                gateway_pb2.ConnectRequest(
                    heartbeat=gateway_pb2.Heartbeat(
                        sent_at=sent_at,
                        running_tasks=len(self.dispatcher.running_task_ids()),
                    )
                )
            )


class _StatusError(grpc.RpcError):
    """A stream that ended with a non-OK status, in the shape classify() reads."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details
