"""In-memory state of the reference orchestrator: agents, tasks, their events.

Everything lives in one asyncio event loop, so no locks are needed. A restart
forgets every task; results that agents deliver afterwards for tasks the
orchestrator no longer knows are still stored and acknowledged, so that
nothing an agent holds is lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from stella.agent.v1 import control_pb2, gateway_pb2, result_pb2, task_pb2

QUEUED = "queued"
SENT = "sent"
ACCEPTED = "accepted"
REJECTED = "rejected"
FINISHED = "finished"

SIGNED_TASK_LIFETIME_SECONDS = 3600
"""expires_at given to signed tasks that set none; agents reject signed tasks
without an expiry."""


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


@dataclass
class TaskRecord:
    """State of one task in the orchestrator."""

    task_id: str
    agent_id: str
    task: task_pb2.AgentTask | None
    status: str = QUEUED
    events: list[control_pb2.WatchTaskResponse] = field(default_factory=list)
    next_log_sequence: int = 1
    result: result_pb2.TaskResult | None = None
    artifacts: dict[str, bytes] = field(default_factory=dict)
    signed: gateway_pb2.SignedTask | None = None
    orphan: bool = False
    """Created from an agent's message for a task this process never queued
    (it was submitted before a restart); a submit of the same id replaces it."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return self.status in (REJECTED, FINISHED)

    def add_event(self, event: control_pb2.WatchTaskResponse) -> None:
        self.events.append(event)
        # Wake every watcher, then arm a fresh event for the next change.
        self.changed.set()
        self.changed = asyncio.Event()


@dataclass
class AgentConnection:
    """A connected agent and the queue of messages to send it."""

    agent_id: str
    session_id: str
    hello: gateway_pb2.Hello
    peer: str
    outgoing: asyncio.Queue[gateway_pb2.ConnectResponse] = field(
        default_factory=asyncio.Queue
    )
    connected_at: Timestamp = field(default_factory=_now)
    last_heartbeat_at: Timestamp = field(default_factory=_now)
    running_task_ids: list[str] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def info(self) -> control_pb2.AgentInfo:
        return control_pb2.AgentInfo(
            agent_id=self.agent_id,
            version=self.hello.version,
            capabilities=list(self.hello.capabilities),
            hostname=self.hello.hostname,
            connected_at=self.connected_at,
            last_heartbeat_at=self.last_heartbeat_at,
            peer=self.peer,
            running_task_ids=self.running_task_ids,
            public_key=self.hello.public_key,
        )


class OrchestratorState:
    """Tasks and connected agents of one orchestrator process."""

    def __init__(self, signer=None) -> None:
        self.signer = signer
        """TaskSigner that signs every task sent, or None to send them unsigned."""
        self.tasks: dict[str, TaskRecord] = {}
        self.agents: dict[str, AgentConnection] = {}
        self.audit_records: list[tuple[str, str]] = []
        """(agent id, JSON line) of every audit record agents sent."""

    def submit(
        self, agent_id: str, task: task_pb2.AgentTask, artifacts: dict[str, bytes]
    ) -> TaskRecord:
        """Queue a task for an agent and send it at once if it is connected."""
        if not task.id:
            task.id = str(uuid.uuid4())
        if not task.HasField("assigned_at"):
            task.assigned_at.CopyFrom(_now())
        _fill_artifact_digests(task, artifacts)
        record = TaskRecord(task.id, agent_id, task, artifacts=dict(artifacts))
        if self.signer is not None:
            # A signed task binds its agent and must expire.
            task.agent_id = agent_id
            if not task.HasField("expires_at"):
                task.expires_at.FromSeconds(
                    task.assigned_at.seconds + SIGNED_TASK_LIFETIME_SECONDS
                )
            record.signed = self.signer.sign(task)
        self.tasks[task.id] = record
        connection = self.agents.get(agent_id)
        if connection is not None:
            self._send_task(connection, record)
        return record

    def record_for(self, task_id: str, agent_id: str) -> TaskRecord:
        """Return the record of a task, creating an empty one for a task this
        process never saw (it was submitted before a restart)."""
        record = self.tasks.get(task_id)
        if record is None:
            record = TaskRecord(task_id, agent_id, None, status=SENT, orphan=True)
            self.tasks[task_id] = record
        return record

    def connect(self, connection: AgentConnection) -> AgentConnection | None:
        """Register a new stream of an agent; return the one it replaces."""
        previous = self.agents.get(connection.agent_id)
        self.agents[connection.agent_id] = connection
        return previous

    def disconnect(self, connection: AgentConnection) -> None:
        if self.agents.get(connection.agent_id) is connection:
            del self.agents[connection.agent_id]
        connection.closed.set()

    def send_pending(self, connection: AgentConnection) -> None:
        """Send the agent every task of it that has no result yet and that it
        did not report as running or finished in its Hello."""
        known = set(connection.hello.running_task_ids) | set(
            connection.hello.unacknowledged_task_ids
        )
        for record in self.tasks.values():
            if (
                record.agent_id != connection.agent_id
                or record.done
                or record.task is None
            ):
                continue
            if record.task_id in known:
                continue
            self._send_task(connection, record)

    def _send_task(self, connection: AgentConnection, record: TaskRecord) -> None:
        assert record.task is not None
        if record.signed is not None:
            message = gateway_pb2.ConnectResponse(signed_task=record.signed)
        else:
            message = gateway_pb2.ConnectResponse(task=record.task)
        connection.outgoing.put_nowait(message)
        if record.status == QUEUED:
            record.status = SENT

    def log_positions(self, agent_id: str) -> list[gateway_pb2.LogPosition]:
        return [
            gateway_pb2.LogPosition(
                task_id=r.task_id, next_sequence=r.next_log_sequence
            )
            for r in self.tasks.values()
            if r.agent_id == agent_id and r.next_log_sequence > 1
        ]


def _fill_artifact_digests(
    task: task_pb2.AgentTask, artifacts: dict[str, bytes]
) -> None:
    """Set sha256 and size of artifact references whose content was given."""
    if task.WhichOneof("payload") != "deploy":
        return
    for reference in task.deploy.artifacts:
        content = artifacts.get(reference.name)
        if content is None:
            continue
        if not reference.sha256:
            reference.sha256 = hashlib.sha256(content).hexdigest()
        if not reference.size:
            reference.size = len(content)
