"""Client of the reference orchestrator's ControlService, used by
`stella-agent submit`, `stella-agent agents` and the tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import grpc
import yaml
from google.protobuf import json_format

from stella.agent.v1 import control_pb2, control_pb2_grpc, result_pb2, task_pb2
from stella_agent.certs import read_tls_files
from stella_agent.errors import ConfigError, StellaError


class ControlError(StellaError):
    """A ControlService call failed."""


def parse_artifact_args(values: list[str]) -> dict[str, bytes]:
    """Read `NAME=PATH` or `PATH` arguments into artifact content by name."""
    artifacts: dict[str, bytes] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).name, value
        try:
            artifacts[name] = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read artifact {name!r} from {path}: {exc.strerror}"
            ) from None
    return artifacts


def load_credentials_file(path: str) -> task_pb2.Credentials:
    """Read a Credentials message from a JSON or YAML file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        return json_format.ParseDict(data or {}, task_pb2.Credentials())
    except OSError as exc:
        raise ConfigError(
            f"cannot read credentials file {path}: {exc.strerror}"
        ) from None
    except (ValueError, yaml.YAMLError, json_format.ParseError) as exc:
        raise ConfigError(f"credentials file {path} is invalid: {exc}") from None


class ControlClient:
    """An mTLS connection to ControlService with an operator certificate."""

    def __init__(
        self,
        address: str,
        *,
        ca_file: str,
        cert_file: str,
        key_file: str,
        server_name: str = "",
    ) -> None:
        tls = read_tls_files(ca_file, cert_file, key_file, key_name="operator")
        credentials = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
        options = (
            [("grpc.ssl_target_name_override", server_name)] if server_name else []
        )
        self.address = address
        self.channel = grpc.aio.secure_channel(address, credentials, options=options)
        self.stub = control_pb2_grpc.ControlServiceStub(self.channel)

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.channel.close()

    async def submit(
        self,
        agent_id: str,
        task: task_pb2.AgentTask,
        artifacts: dict[str, bytes] | None = None,
        credentials: task_pb2.Credentials | None = None,
    ) -> str:
        request = control_pb2.SubmitTaskRequest(
            agent_id=agent_id,
            task=task,
            artifacts=[
                control_pb2.ArtifactContent(name=n, content=c)
                for n, c in (artifacts or {}).items()
            ],
        )
        if credentials is not None:
            request.credentials.CopyFrom(credentials)
        try:
            response = await self.stub.SubmitTask(request, timeout=30)
        except grpc.RpcError as exc:
            raise ControlError(
                f"SubmitTask to {self.address} failed: {exc.code().name}: {exc.details()}"
            ) from None
        return response.task_id

    async def follow(
        self,
        task_id: str,
        on_log: Callable[[result_pb2.LogChunk], None] | None = None,
        timeout: float | None = None,
    ) -> result_pb2.TaskResult:
        """Stream a task's events until its result; return the result."""
        rejected = None
        try:
            async for event in self.stub.WatchTask(
                control_pb2.WatchTaskRequest(task_id=task_id), timeout=timeout
            ):
                kind = event.WhichOneof("event")
                if kind == "log_chunk" and on_log is not None:
                    on_log(event.log_chunk)
                elif kind == "result":
                    return event.result
                elif kind == "rejected":
                    rejected = event.rejected
        except grpc.RpcError as exc:
            raise ControlError(
                f"WatchTask {task_id} failed: {exc.code().name}: {exc.details()}"
            ) from None
        if rejected is not None:
            # A rejection ends the watch; the result with the same error follows
            # on the agent's side, so report the rejection as that result.
            return result_pb2.TaskResult(
                task_id=task_id,
                success=False,
                error=rejected.error,
                error_type=rejected.error_type,
                retriable=rejected.retriable,
            )
        raise ControlError(f"WatchTask {task_id} ended without a result")

    async def wait_for_agent(
        self, agent_id: str, timeout: float = 30.0
    ) -> control_pb2.AgentInfo:
        """Poll ListAgents until `agent_id` is connected."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for agent in (await self.list_agents()).agents:
                if agent.agent_id == agent_id:
                    return agent
            if loop.time() > deadline:
                raise ControlError(
                    f"agent {agent_id} did not connect within {timeout:.0f}s"
                )
            await asyncio.sleep(0.2)

    async def list_agents(self) -> control_pb2.ListAgentsResponse:
        try:
            return await self.stub.ListAgents(
                control_pb2.ListAgentsRequest(), timeout=30
            )
        except grpc.RpcError as exc:
            raise ControlError(
                f"ListAgents on {self.address} failed: {exc.code().name}: {exc.details()}"
            ) from None

    async def cancel(self, task_id: str, reason: str = "") -> bool:
        response = await self.stub.CancelTask(
            control_pb2.CancelTaskRequest(task_id=task_id, reason=reason), timeout=30
        )
        return response.sent
