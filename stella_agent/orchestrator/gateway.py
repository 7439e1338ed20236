"""The orchestrator side of AgentGateway: one Connect stream per agent.

The stream uses grpc.aio's read()/write() style on both directions: a reader
task handles what the agent sends while the handler writes what the state
queues for the agent. The agent's identity comes from its client certificate
alone; a Hello naming any other id ends the stream with PERMISSION_DENIED.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import grpc
from google.protobuf.duration_pb2 import Duration

from stella.agent.v1 import control_pb2, gateway_pb2, gateway_pb2_grpc
from stella_agent.certs import peer_identity
from stella_agent.orchestrator.state import (
    ACCEPTED,
    FINISHED,
    REJECTED,
    AgentConnection,
    OrchestratorState,
    _now,
)

logger = logging.getLogger(__name__)

ARTIFACT_CHUNK_BYTES = 1024 * 1024
HELLO_TIMEOUT_SECONDS = 30.0


class AgentGatewayServicer(gateway_pb2_grpc.AgentGatewayServicer):
    """Serves Connect and FetchArtifact to agents."""

    def __init__(
        self,
        state: OrchestratorState,
        heartbeat_interval: float = 10.0,
        operator_identities: frozenset[str] = frozenset(),
    ) -> None:
        self.state = state
        self.heartbeat_interval = heartbeat_interval
        self.operator_identities = operator_identities
        """Identities that may use ControlService; they may not act as agents."""

    async def Connect(self, request_iterator, context: grpc.aio.ServicerContext):  # noqa: N802
        identity = peer_identity(context.auth_context())
        if identity is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "a client certificate with exactly one common name is required",
            )

        if identity in self.operator_identities:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate identity {identity!r} is an operator, not an agent",
            )

        # The first message must be a Hello from the certificate's owner.
        try:
            first = await asyncio.wait_for(context.read(), HELLO_TIMEOUT_SECONDS)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "no Hello within 30 seconds"
            )
        if first is grpc.aio.EOF or first.WhichOneof("body") != "hello":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a Hello"
            )
        hello = first.hello
        if hello.agent_id != identity:
            logger.warning(
                "rejected stream from %s: Hello names agent %r but the certificate is %r",
                context.peer(),
                hello.agent_id,
                identity,
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"agent id {hello.agent_id!r} in Hello does not match the client certificate "
                f"identity {identity!r}; set agent_id in the agent config to the certificate's "
                "common name",
            )

        connection = AgentConnection(
            agent_id=identity,
            session_id=str(uuid.uuid4()),
            hello=hello,
            peer=context.peer(),
            running_task_ids=list(hello.running_task_ids),
        )
        replaced = self.state.connect(connection)
        if replaced is not None:
            logger.info("agent %s opened a new stream; closing the old one", identity)
            replaced.closed.set()
        logger.info(
            "agent %s connected from %s (session %s)",
            identity,
            connection.peer,
            connection.session_id,
        )

        welcome = gateway_pb2.Welcome(
            session_id=connection.session_id,
            heartbeat_interval=Duration(
                seconds=int(self.heartbeat_interval),
                nanos=int(self.heartbeat_interval % 1 * 1e9),
            ),
            log_positions=self.state.log_positions(identity),
        )
        await context.write(gateway_pb2.ConnectResponse(welcome=welcome))
        self.state.send_pending(connection)

        reader = asyncio.create_task(self._read_loop(context, connection))
        heartbeats = asyncio.create_task(self._heartbeat_loop(connection))
        try:
            await self._write_loop(context, connection, reader)
        finally:
            reader.cancel()
            heartbeats.cancel()
            self.state.disconnect(connection)
            logger.info(
                "agent %s disconnected (session %s)", identity, connection.session_id
            )

    async def _write_loop(
        self, context, connection: AgentConnection, reader: asyncio.Task
    ) -> None:
        closed = asyncio.create_task(connection.closed.wait())
        try:
            while True:
                getter = asyncio.create_task(connection.outgoing.get())
                done, _ = await asyncio.wait(
                    {getter, reader, closed}, return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    getter.cancel()
                    if reader in done and reader.exception() is not None:
                        logger.warning(
                            "stream of agent %s failed: %s",
                            connection.agent_id,
                            reader.exception(),
                        )
                    return
                await context.write(getter.result())
        finally:
            closed.cancel()

    async def _heartbeat_loop(self, connection: AgentConnection) -> None:
        """Send a heartbeat every interval: agents end a stream on which
        nothing arrives for three intervals."""
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            stamp = _now()
            connection.outgoing.put_nowait(
                gateway_pb2.ConnectResponse(
                    heartbeat=gateway_pb2.Heartbeat(sent_at=stamp)
                )
            )

    async def _read_loop(self, context, connection: AgentConnection) -> None:
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                return
            self.handle(connection, message)

    def handle(
        self, connection: AgentConnection, message: gateway_pb2.ConnectRequest
    ) -> None:
        """Apply one message from an agent to the state."""
        kind = message.WhichOneof("body")
        agent_id = connection.agent_id
        if kind == "heartbeat":
            connection.last_heartbeat_at = _now()
        elif kind == "task_accepted":
            record = self.state.record_for(message.task_accepted.task_id, agent_id)
            if record.agent_id != agent_id:
                return
            record.status = ACCEPTED
            record.add_event(
                control_pb2.WatchTaskResponse(accepted=message.task_accepted)
            )
        elif kind == "task_rejected":
            record = self.state.record_for(message.task_rejected.task_id, agent_id)
            if record.agent_id != agent_id:
                return
            record.status = REJECTED
            record.add_event(
                control_pb2.WatchTaskResponse(rejected=message.task_rejected)
            )
        elif kind == "log_chunk":
            self._handle_log_chunk(agent_id, message)
        elif kind == "task_result":
            self._handle_result(connection, message)
        elif kind == "audit_record":
            self.state.audit_records.append((agent_id, message.audit_record.json))
        elif kind == "hello":
            logger.warning("agent %s sent a second Hello; ignored", agent_id)

    def _handle_log_chunk(
        self, agent_id: str, message: gateway_pb2.ConnectRequest
    ) -> None:
        chunk = message.log_chunk
        record = self.state.record_for(chunk.task_id, agent_id)
        if record.agent_id != agent_id:
            logger.warning(
                "agent %s sent a log chunk for task %s of agent %s",
                agent_id,
                chunk.task_id,
                record.agent_id,
            )
            return
        # Chunks arrive in order; a resend after reconnect may repeat some.
        if chunk.sequence < record.next_log_sequence:
            return
        if chunk.sequence > record.next_log_sequence:
            logger.warning(
                "task %s: log chunks %d to %d are missing",
                chunk.task_id,
                record.next_log_sequence,
                chunk.sequence - 1,
            )
        record.next_log_sequence = chunk.sequence + 1
        record.add_event(control_pb2.WatchTaskResponse(log_chunk=chunk))

    def _handle_result(
        self, connection: AgentConnection, message: gateway_pb2.ConnectRequest
    ) -> None:
        result = message.task_result
        record = self.state.record_for(result.task_id, connection.agent_id)
        if record.agent_id != connection.agent_id:
            logger.warning(
                "agent %s sent a result for task %s of agent %s; ignored",
                connection.agent_id,
                result.task_id,
                record.agent_id,
            )
            return
        if record.result is None:
            record.result = result
            record.status = FINISHED
            record.add_event(control_pb2.WatchTaskResponse(result=result))
            logger.info(
                "task %s on agent %s finished: %s",
                result.task_id,
                connection.agent_id,
                "success" if result.success else f"{result.error_type}: {result.error}",
            )
        connection.outgoing.put_nowait(
            gateway_pb2.ConnectResponse(
                result_ack=gateway_pb2.ResultAck(task_id=result.task_id)
            )
        )

    async def FetchArtifact(self, request, context: grpc.aio.ServicerContext):  # noqa: N802
        identity = peer_identity(context.auth_context())
        record = self.state.tasks.get(request.task_id)
        if record is None or record.agent_id != identity:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no task {request.task_id!r} assigned to agent {identity!r}",
            )
        content = record.artifacts.get(request.name)
        if content is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"task {request.task_id} has no artifact named {request.name!r}",
            )
        first = True
        for start in range(0, max(len(content), 1), ARTIFACT_CHUNK_BYTES):
            response = gateway_pb2.FetchArtifactResponse(
                data=content[start : start + ARTIFACT_CHUNK_BYTES]
            )
            if first:
                response.total_size = len(content)
                first = False
            yield response
