"""Assemble and run the agent: config, executors, dispatcher and session."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
from collections.abc import Mapping

import grpc

from stella.agent.v1 import gateway_pb2, gateway_pb2_grpc
from stella_agent.certs import certificate_identity, read_tls_files
from stella_agent.config import AgentConfig
from stella_agent.dispatcher import Dispatcher
from stella_agent.errors import CertificateError, InvalidTaskError, TaskError
from stella_agent.executors.base import Executor
from stella_agent.journal import Journal
from stella_agent.runner import TaskRunner
from stella_agent.security import AgentSecurity
from stella_agent.session import AgentSession

logger = logging.getLogger(__name__)


def docker_client_factory(config: AgentConfig):
    """Return a callable creating the Docker client the config names."""

    def create():
        import docker

        if config.docker.host:
            return docker.DockerClient(base_url=config.docker.host)
        return docker.from_env()

    return create


def build_executors(
    config: AgentConfig, artifact_fetcher=None
) -> Mapping[str, Executor]:
    """Return the executors by name ("docker", "compose")."""
    from stella_agent.executors.compose import ComposeExecutor
    from stella_agent.executors.docker import DockerExecutor

    return {
        "docker": DockerExecutor(),
        "compose": ComposeExecutor(artifact_fetcher=artifact_fetcher),
    }


class ArtifactFetcher:
    """Fetches artifact content from the orchestrator over the agent's channel."""

    def __init__(self, session_getter) -> None:
        self._session_getter = session_getter

    async def __call__(self, task_id: str, name: str, sha256: str) -> bytes:
        session: AgentSession = self._session_getter()
        channel = session._channel
        if channel is None:
            raise TaskError(
                f"cannot fetch artifact {name!r}: not connected to the orchestrator",
                error_type="artifact_unavailable",
                retriable=True,
            )
        stub = gateway_pb2_grpc.AgentGatewayStub(channel)
        digest = hashlib.sha256()
        parts: list[bytes] = []
        try:
            async for response in stub.FetchArtifact(
                gateway_pb2.FetchArtifactRequest(
                    task_id=task_id, name=name, sha256=sha256
                )
            ):
                digest.update(response.data)
                parts.append(response.data)
        except grpc.RpcError as exc:
            retriable = exc.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
            raise TaskError(
                f"fetching artifact {name!r} failed: {exc.code().name}: {exc.details()}",
                error_type="artifact_unavailable",
                retriable=retriable,
            ) from None
        if sha256 and digest.hexdigest() != sha256:
            raise InvalidTaskError(
                f"artifact {name!r} has sha256 {digest.hexdigest()}, expected {sha256}",
                error_type="artifact_digest_mismatch",
            )
        return b"".join(parts)


async def run_agent(config: AgentConfig) -> int:
    """Run the agent until SIGINT or SIGTERM; return the exit status."""
    tls = read_tls_files(config.tls.ca_file, config.tls.cert_file, config.tls.key_file)
    identity = certificate_identity(tls.cert)
    if identity != config.agent_id:
        raise CertificateError(
            f"the agent certificate {config.tls.cert_file} names {identity!r}, but agent_id is "
            f"{config.agent_id!r}; the orchestrator would reject the agent. Use the certificate "
            "issued for this agent id, or set agent_id to its common name"
        )
    # The journal and keys are the agent's alone.
    config.state_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    config.state_path.chmod(0o700)

    session_holder: list[AgentSession] = []
    fetcher = ArtifactFetcher(lambda: session_holder[0])
    runner = TaskRunner(
        config, build_executors(config, fetcher), docker_client_factory(config)
    )

    journal = Journal(config.state_path / "journal.db")
    security = AgentSecurity(
        config,
        on_audit_record=lambda line: (
            session_holder[0].send_audit_record(line) if session_holder else None
        ),
    )
    # The agent's own log must not show the secrets of running tasks either.
    for handler in logging.getLogger().handlers:
        handler.addFilter(security.log_filter())

    def make_dispatcher(session: AgentSession) -> Dispatcher:
        return Dispatcher(
            runner,
            journal,
            on_event=session.send_event,
            chunk_sink_for=session.chunk_sink,
            on_result=session.deliver_result,
            security=security,
        )

    session = AgentSession(
        config, tls, make_dispatcher, journal=journal, security=security
    )
    session_holder.append(session)

    # SIGTERM and SIGINT drain gracefully; a second signal stops at once.
    loop = asyncio.get_running_loop()
    shutdown_tasks: list[asyncio.Task] = []

    def on_signal() -> None:
        if shutdown_tasks:
            logger.warning("second stop signal: stopping now")
            session.stop()
            return
        shutdown_tasks.append(
            loop.create_task(session.shutdown(config.tasks.shutdown_grace_seconds))
        )

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    logger.info(
        "agent %s starting; orchestrator %s",
        config.agent_id,
        config.orchestrator.address,
    )
    try:
        await session.run()
    finally:
        journal.close()
        security.close()
    logger.info("agent %s stopped", config.agent_id)
    return 0
