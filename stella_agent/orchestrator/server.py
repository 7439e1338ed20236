"""Start the reference orchestrator: AgentGateway, ControlService, health and
reflection on one port that requires client certificates."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from stella.agent.v1 import control_pb2, control_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from stella_agent.certs import OPERATOR_IDENTITY, read_tls_files
from stella_agent.credentials import seal_credentials
from stella_agent.errors import CertificateError, ConfigError
from stella_agent.orchestrator.control import ControlServicer
from stella_agent.orchestrator.gateway import AgentGatewayServicer
from stella_agent.orchestrator.state import OrchestratorState
from stella_agent.signing import TaskSigner

logger = logging.getLogger(__name__)

# Keepalive settings compatible with the agent's: the agent pings every 20 s
# by default, and the server allows pings every 10 s, so it never answers with
# GOAWAY "too_many_pings".
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # gRPC sets SO_REUSEPORT by default, which lets a second orchestrator bind
    # the same port and split the agents between the two.
    ("grpc.so_reuseport", 0),
]


@dataclass
class OrchestratorConfig:
    """Settings of `stella-agent orchestrator`."""

    listen: str = "127.0.0.1:7443"
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    operator_identities: frozenset[str] = field(
        default_factory=lambda: frozenset({OPERATOR_IDENTITY})
    )
    heartbeat_interval: float = 10.0
    signing_key_file: str = ""
    """Ed25519 private key (PEM) to sign every task with; empty sends tasks
    unsigned."""


def _certificate_configuration(tls):
    return grpc.ssl_server_certificate_configuration(
        [(tls.key, tls.cert)], root_certificates=tls.ca
    )


def check_listen_address(listen: str) -> None:
    """Raise ConfigError unless `listen` is host:port with a valid port."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(
            f"--listen {listen!r} must be host:port, for example 127.0.0.1:7443"
        )
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen {listen!r} has port {port}, outside 0 to 65535")


class Orchestrator:
    """A running reference orchestrator."""

    def __init__(self, config: OrchestratorConfig) -> None:
        self.config = config
        signer = (
            TaskSigner.from_file(config.signing_key_file)
            if config.signing_key_file
            else None
        )
        self.state = OrchestratorState(signer)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        """Bind and start serving; return the bound port."""
        tls = read_tls_files(
            self.config.ca_file,
            self.config.cert_file,
            self.config.key_file,
            key_name="orchestrator",
        )
        credentials = grpc.dynamic_ssl_server_credentials(
            _certificate_configuration(tls),
            self._fetch_certificate_configuration,
            require_client_authentication=True,
        )
        self._tls = tls
        self._tls_stat = self._stat_tls_files()

        server = grpc.aio.server(options=SERVER_OPTIONS)
        gateway_pb2_grpc.add_AgentGatewayServicer_to_server(
            AgentGatewayServicer(
                self.state,
                self.config.heartbeat_interval,
                self.config.operator_identities,
            ),
            server,
        )
        control_pb2_grpc.add_ControlServiceServicer_to_server(
            ControlServicer(
                self.state,
                self.config.operator_identities,
                credential_sealer=seal_credentials,
            ),
            server,
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        service_names = (
            gateway_pb2.DESCRIPTOR.services_by_name["AgentGateway"].full_name,
            control_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(service_names, server)
        check_listen_address(self.config.listen)
        try:
            self.port = server.add_secure_port(self.config.listen, credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise ConfigError(
                f"cannot listen on {self.config.listen}: the port is in use or the "
                "address is not on this host; stop the other process or choose "
                "another --listen host:port"
            )
        await server.start()
        for name in ("", *service_names[:2]):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.server = server
        logger.info(
            "orchestrator listening on %s (port %d)", self.config.listen, self.port
        )
        return self.port

    def _stat_tls_files(self) -> tuple:
        stats = []
        for path in (self.config.ca_file, self.config.cert_file, self.config.key_file):
            try:
                stat = os.stat(path)
                stats.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
            except OSError:
                stats.append(None)
        return tuple(stats)

    def _fetch_certificate_configuration(self):
        """Called by gRPC before each TLS handshake: return a new certificate
        configuration when the files changed, None to keep the current one."""
        current = self._stat_tls_files()
        if current == self._tls_stat:
            return None
        self._tls_stat = current
        try:
            tls = read_tls_files(
                self.config.ca_file,
                self.config.cert_file,
                self.config.key_file,
                key_name="orchestrator",
            )
        except CertificateError as exc:
            logger.error("TLS files changed but were not reloaded: %s", exc)
            return None
        if tls == self._tls:
            return None
        self._tls = tls
        logger.info("reloaded the server certificate from %s", self.config.cert_file)
        return _certificate_configuration(tls)

    async def stop(self, grace: float = 2.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)


async def serve(config: OrchestratorConfig) -> None:
    """Run the orchestrator until SIGINT or SIGTERM."""
    orchestrator = Orchestrator(config)
    await orchestrator.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"orchestrator listening on port {orchestrator.port}", flush=True)
    await stop.wait()
    logger.info("stopping orchestrator")
    await orchestrator.stop()
