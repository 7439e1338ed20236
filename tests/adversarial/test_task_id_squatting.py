"""An agent may send results only for its own tasks. The reference
orchestrator creates a record for a result whose task id it never saw (a task
submitted before the orchestrator restarted), so it must not let that record
block or supply the result of a task that an operator later submits for another agent."""

from __future__ import annotations

import asyncio

import grpc

from stella.agent.v1 import (
    control_pb2,
    control_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    result_pb2,
    task_pb2,
)
from tests.e2e.conftest import AGENT_ID, run

TASK_ID = "adv-deploy-prod-42"


def channel(pki, name: str, address: str) -> grpc.aio.Channel:
    """Return a mutual-TLS channel with the certificate `name` of the test PKI."""
    credentials = grpc.ssl_channel_credentials(
        (pki / "ca.crt").read_bytes(),
        (pki / f"{name}.key").read_bytes(),
        (pki / f"{name}.crt").read_bytes(),
    )
    return grpc.aio.secure_channel(address, credentials)


def test_foreign_result_claims_task_id(pki, orchestrator):
    async def scenario():
        async with channel(pki, "agent-other-agent", orchestrator.address) as agent:
            stream = gateway_pb2_grpc.AgentGatewayStub(agent).Connect()
            hello = gateway_pb2.Hello(agent_id="other-agent")
            await stream.write(gateway_pb2.ConnectRequest(hello=hello))
            welcome = await stream.read()
            assert welcome.WhichOneof("body") == "welcome"
            forged = result_pb2.TaskResult(task_id=TASK_ID, success=True)
            await stream.write(gateway_pb2.ConnectRequest(task_result=forged))
            # Wait until the orchestrator acknowledged the forged result.
            while (await stream.read()).WhichOneof("body") != "result_ack":
                pass
            stream.cancel()

        async with channel(pki, "operator", orchestrator.address) as operator:
            control = control_pb2_grpc.ControlServiceStub(operator)
            task = task_pb2.AgentTask(
                id=TASK_ID,
                type=task_pb2.TASK_TYPE_INSPECT,
                inspect=task_pb2.InspectPayload(container_name="adv-absent"),
            )
            request = control_pb2.SubmitTaskRequest(agent_id=AGENT_ID, task=task)
            try:
                await control.SubmitTask(request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details()
            return grpc.StatusCode.OK, ""

    code, details = run(asyncio.wait_for(scenario(), 30))

    assert code == grpc.StatusCode.OK, details
