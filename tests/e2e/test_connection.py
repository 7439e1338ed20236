"""The mTLS stream between real agent and orchestrator processes."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from stella.agent.v1 import gateway_pb2, gateway_pb2_grpc, task_pb2
from stella_agent.certs import read_tls_files
from tests.conftest import require
from tests.e2e.conftest import (
    AGENT_ID,
    Process,
    control_client,
    run,
    write_agent_config,
)


def test_agent_connects_and_is_listed(pki, orchestrator, agent):
    async def scenario():
        async with control_client(pki, orchestrator.address) as client:
            return await client.wait_for_agent(AGENT_ID, timeout=30)

    info = run(scenario())

    assert info.agent_id == AGENT_ID
    assert "deploy" in info.capabilities
    assert "health-check" in info.capabilities


def test_malformed_task_gets_result_and_agent_keeps_serving(pki, orchestrator, agent):
    async def scenario():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            no_payload = task_pb2.AgentTask(id="bad-1", type=task_pb2.TASK_TYPE_DEPLOY)
            first = await client.follow(
                await client.submit(AGENT_ID, no_payload), timeout=30
            )
            unknown_type = task_pb2.AgentTask(id="bad-2", type=42)
            second = await client.follow(
                await client.submit(AGENT_ID, unknown_type), timeout=30
            )
            bad_digest = task_pb2.AgentTask(
                id="bad-3",
                type=task_pb2.TASK_TYPE_DEPLOY,
                deploy=task_pb2.DeployPayload(
                    image="127.0.0.1:5000/stella-test/web",
                    digest="sha256:1234",
                    config=task_pb2.DeployConfig(container_name="stella-test-never"),
                ),
            )
            third = await client.follow(
                await client.submit(AGENT_ID, bad_digest), timeout=60
            )
            return first, second, third

    first, second, third = run(scenario())

    assert first.error_type == "invalid_task"
    assert "needs the 'deploy' payload" in first.error
    assert second.error_type == "invalid_task"
    assert "unknown task type 42" in second.error
    assert third.error_type == "invalid_task"
    assert "'sha256:1234'" in third.error
    assert agent.proc.poll() is None


def test_hello_with_foreign_agent_id_is_rejected(pki, orchestrator):
    # The certificate names e2e-agent, but the Hello claims other-agent.
    tls = read_tls_files(
        str(pki / "ca.crt"),
        str(pki / f"agent-{AGENT_ID}.crt"),
        str(pki / f"agent-{AGENT_ID}.key"),
    )

    async def scenario():
        credentials = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
        async with grpc.aio.secure_channel(
            orchestrator.address, credentials
        ) as channel:
            call = gateway_pb2_grpc.AgentGatewayStub(channel).Connect()
            await call.write(
                gateway_pb2.ConnectRequest(
                    hello=gateway_pb2.Hello(agent_id="other-agent")
                )
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call.read()
            return raised.value

    error = run(scenario())

    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'other-agent'" in error.details()
    assert f"'{AGENT_ID}'" in error.details()


def test_agent_refuses_to_start_with_foreign_certificate(pki, orchestrator, tmp_path):
    config = write_agent_config(
        tmp_path / "agent.yaml",
        pki,
        orchestrator.address,
        tmp_path / "state",
        agent_id="other-agent",
        cert_id=AGENT_ID,
    )
    process = Process(["run", "--config", str(config)], tmp_path / "agent.log")
    process.start()

    status = process.proc.wait(30)

    assert status == 2
    assert f"names '{AGENT_ID}', but agent_id is 'other-agent'" in process.output()


def test_agent_with_wrong_ca_reports_cause_and_retries(pki, orchestrator, tmp_path):
    from stella_agent.certs import init_dev_pki

    other = tmp_path / "other-pki"
    init_dev_pki(other, AGENT_ID)
    config = write_agent_config(
        tmp_path / "agent.yaml", pki, orchestrator.address, tmp_path / "state"
    )
    text = config.read_text().replace(str(pki / "ca.crt"), str(other / "ca.crt"))
    config.write_text(text)
    process = Process(["run", "--config", str(config)], tmp_path / "agent.log")
    process.start()
    try:
        process.wait_for_output("reconnecting in", timeout=30)
        assert process.proc.poll() is None
    finally:
        process.stop()


def test_grpcurl_lists_services_by_reflection(pki, orchestrator):
    # The venv's bin/ contains grpcurl, which may not be on PATH when pytest runs
    # from the venv's interpreter directly.
    grpcurl = shutil.which("grpcurl") or shutil.which(
        "grpcurl", path=str(Path(sys.executable).parent)
    )
    require(grpcurl is not None, "grpcurl is not installed; run scripts/dev-env.sh")
    tls = [
        "-cacert",
        str(pki / "ca.crt"),
        "-cert",
        str(pki / "operator.crt"),
        "-key",
        str(pki / "operator.key"),
    ]

    listing = subprocess.run(
        [grpcurl, *tls, orchestrator.address, "list"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    health = subprocess.run(
        [grpcurl, *tls, orchestrator.address, "grpc.health.v1.Health/Check"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    anonymous = subprocess.run(
        [grpcurl, "-cacert", str(pki / "ca.crt"), orchestrator.address, "list"],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert listing.returncode == 0, listing.stderr
    services = listing.stdout.split()
    assert "stella.agent.v1.AgentGateway" in services
    assert "stella.agent.v1.ControlService" in services
    assert "grpc.health.v1.Health" in services
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["status"] == "SERVING"
    assert anonymous.returncode != 0


def test_agent_certificate_cannot_use_control_service(pki, orchestrator):
    from stella_agent.orchestrator.client import ControlClient, ControlError

    async def scenario():
        async with ControlClient(
            orchestrator.address,
            ca_file=str(pki / "ca.crt"),
            cert_file=str(pki / f"agent-{AGENT_ID}.crt"),
            key_file=str(pki / f"agent-{AGENT_ID}.key"),
        ) as client:
            with pytest.raises(ControlError) as raised:
                await client.list_agents()
            return str(raised.value)

    message = run(scenario())

    assert "PERMISSION_DENIED" in message
    assert "not an operator" in message


def test_operator_certificate_cannot_connect_as_agent(pki, orchestrator):
    tls = read_tls_files(
        str(pki / "ca.crt"), str(pki / "operator.crt"), str(pki / "operator.key")
    )

    async def scenario():
        credentials = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
        async with grpc.aio.secure_channel(
            orchestrator.address, credentials
        ) as channel:
            call = gateway_pb2_grpc.AgentGatewayStub(channel).Connect()
            # The orchestrator rejects the stream before reading anything, so
            # the write may already fail. The call's status gives the reason.
            try:
                await call.write(
                    gateway_pb2.ConnectRequest(
                        hello=gateway_pb2.Hello(agent_id="stella-operator")
                    )
                )
                await call.read()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass
            return await call.code(), await call.details()

    code, details = run(scenario())

    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "is an operator, not an agent" in details
