"""ControlService of the reference orchestrator: submit, watch, list, cancel.

Only callers whose client certificate names an operator identity may use it,
so a stolen agent certificate cannot hand tasks to other agents.
"""

from __future__ import annotations

import logging
import uuid

import grpc

from stella.agent.v1 import control_pb2, control_pb2_grpc, gateway_pb2
from stella_agent.certs import peer_identity
from stella_agent.orchestrator.state import OrchestratorState
from stella_agent.tasks import TASK_ID_PATTERN

logger = logging.getLogger(__name__)


class ControlServicer(control_pb2_grpc.ControlServiceServicer):
    """Serves the ControlService to operators."""

    def __init__(
        self,
        state: OrchestratorState,
        operator_identities: frozenset[str],
        credential_sealer=None,
    ) -> None:
        self.state = state
        self.operator_identities = operator_identities
        self.credential_sealer = credential_sealer

    async def _authorize(self, context: grpc.aio.ServicerContext) -> str:
        identity = peer_identity(context.auth_context())
        if identity is None or identity not in self.operator_identities:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate identity {identity!r} is not an operator of this orchestrator; "
                f"operators: {', '.join(sorted(self.operator_identities))}",
            )
        return identity

    async def SubmitTask(self, request, context):  # noqa: N802
        operator = await self._authorize(context)
        if not request.agent_id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "agent_id is required"
            )
        task = request.task
        if task.id and not TASK_ID_PATTERN.match(task.id):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"task id {task.id[:80]!r} is invalid: use letters, digits, '.', '_', ':' or '-'",
            )
        existing = self.state.tasks.get(task.id)
        if existing is not None and not existing.orphan:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"task {task.id} was already submitted"
            )
        if not task.actor:
            task.actor = operator
        if request.HasField("credentials") and (
            request.credentials.registries or request.credentials.secrets
        ):
            if self.credential_sealer is None:
                await context.abort(
                    grpc.StatusCode.UNIMPLEMENTED,
                    "this orchestrator cannot seal credentials",
                )
            agent = self.state.agents.get(request.agent_id)
            if agent is None or not agent.hello.public_key.public_key:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"agent {request.agent_id} must be connected so that credentials can be "
                    "sealed to its key",
                )
            if not task.id:
                task.id = str(uuid.uuid4())
            task.credentials.CopyFrom(
                self.credential_sealer(
                    agent.hello.public_key,
                    request.agent_id,
                    task.id,
                    request.credentials,
                )
            )
        artifacts = {item.name: item.content for item in request.artifacts}
        problem = _artifact_problem(task, artifacts)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        record = self.state.submit(request.agent_id, task, artifacts)
        logger.info(
            "operator %s submitted task %s for agent %s",
            operator,
            record.task_id,
            request.agent_id,
        )
        return control_pb2.SubmitTaskResponse(task_id=record.task_id)

    async def WatchTask(self, request, context):  # noqa: N802
        await self._authorize(context)
        record = self.state.tasks.get(request.task_id)
        if record is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no task {request.task_id!r}"
            )
        sent = 0
        while True:
            changed = record.changed
            while sent < len(record.events):
                yield record.events[sent]
                sent += 1
            if record.done:
                return
            await changed.wait()

    async def ListAgents(self, request, context):  # noqa: N802
        await self._authorize(context)
        return control_pb2.ListAgentsResponse(
            agents=[connection.info() for connection in self.state.agents.values()]
        )

    async def CancelTask(self, request, context):  # noqa: N802
        await self._authorize(context)
        record = self.state.tasks.get(request.task_id)
        if record is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no task {request.task_id!r}"
            )
        connection = self.state.agents.get(record.agent_id)
        if connection is None or record.done:
            return control_pb2.CancelTaskResponse(sent=False)
        connection.outgoing.put_nowait(
            gateway_pb2.ConnectResponse(
                cancel=gateway_pb2.CancelTask(
                    task_id=record.task_id, reason=request.reason
                )
            )
        )
        return control_pb2.CancelTaskResponse(sent=True)


def _artifact_problem(task, artifacts: dict[str, bytes]) -> str:
    """Return why the task's artifact references and the given content do not
    match, or "" when they do."""
    references = (
        list(task.deploy.artifacts) if task.WhichOneof("payload") == "deploy" else []
    )
    names = {reference.name for reference in references}
    for reference in references:
        if not reference.content and reference.name not in artifacts:
            return (
                f"artifact {reference.name!r} has no content: give it with "
                f"`stella-agent submit --artifact {reference.name}=PATH`, or inline"
            )
    unknown = sorted(set(artifacts) - names)
    if unknown:
        return (
            f"artifact content given for {', '.join(map(repr, unknown))}, which the task "
            f"does not reference; its artifacts are: {', '.join(sorted(names)) or 'none'}"
        )
    return ""
