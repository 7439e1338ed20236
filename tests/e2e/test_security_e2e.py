"""Security end to end: sealed registry credentials against a registry that
requires a login, signed tasks, the audit log, and a canary scan of every
output the agent produces."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration

from stella.agent.v1 import task_pb2
from stella_agent.signing import generate_signing_key
from tests.e2e.conftest import (
    AGENT_ID,
    Process,
    control_client,
    free_port,
    run,
    write_agent_config,
)
from tests.e2e.test_deploy_e2e import deploy_task, fetch

REGISTRY_USER = "stella-dev"
REGISTRY_PASSWORD = "stella-dev-password"
CANARY = "canary-Zq8vW3xK7p"


def registry_credentials() -> task_pb2.Credentials:
    return task_pb2.Credentials(
        registries=[
            task_pb2.RegistryAuth(
                registry="127.0.0.1:5001",
                username=REGISTRY_USER,
                password=REGISTRY_PASSWORD,
            )
        ]
    )


@pytest.fixture
def private_image(test_images, docker_client):
    image = test_images["auth/private:v1"]
    yield image
    # Keep the image out of the engine's cache, or the next pull would not
    # need the registry's login.
    try:
        docker_client.images.remove(image.reference, force=True)
    except Exception:  # noqa: BLE001 - absent when the pull failed
        pass


def test_sealed_credentials_open_a_private_registry(
    pki, orchestrator, agent, private_image, container_name
):
    port = free_port()

    async def scenario():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            without = await client.follow(
                await client.submit(
                    AGENT_ID,
                    deploy_task("auth-none", private_image, container_name, port),
                ),
                timeout=120,
            )
            with_credentials = await client.follow(
                await client.submit(
                    AGENT_ID,
                    deploy_task("auth-sealed", private_image, container_name, port),
                    credentials=registry_credentials(),
                ),
                timeout=120,
            )
            return without, with_credentials

    without, with_credentials = run(scenario())

    assert not without.success
    assert without.error_type == "registry_auth_failed", without.error
    assert with_credentials.success, with_credentials.error
    assert fetch(port) == "private"
    for result in (without, with_credentials):
        assert REGISTRY_PASSWORD not in str(result)


def test_credentials_sealed_to_another_task_do_not_open(
    pki, orchestrator, agent, private_image, container_name
):
    from stella_agent.credentials import seal_credentials

    async def scenario():
        async with control_client(pki, orchestrator.address) as client:
            info = await client.wait_for_agent(AGENT_ID)
            task = deploy_task(
                "moved-creds", private_image, container_name, free_port()
            )
            task.credentials.CopyFrom(
                seal_credentials(
                    info.public_key, AGENT_ID, "some-other-task", registry_credentials()
                )
            )
            return await client.follow(await client.submit(AGENT_ID, task), timeout=60)

    result = run(scenario())

    assert result.error_type == "credentials_invalid"


def test_signed_tasks_required_and_verified(pki, tmp_path, test_images, container_name):
    key = tmp_path / "signing.key"
    generate_signing_key(key)
    port = free_port()
    signing_orchestrator = Process(
        [
            "orchestrator",
            "--listen",
            f"127.0.0.1:{port}",
            "--certs",
            str(pki),
            "--signing-key",
            str(key),
        ],
        tmp_path / "orchestrator.log",
    )
    plain_port = free_port()
    plain_orchestrator = Process(
        ["orchestrator", "--listen", f"127.0.0.1:{plain_port}", "--certs", str(pki)],
        tmp_path / "plain-orchestrator.log",
    )
    signing = {"require_signed_tasks": True, "public_keys": [str(key) + ".pub"]}
    agent = Process(
        [
            "run",
            "--config",
            str(
                write_agent_config(
                    tmp_path / "agent.yaml",
                    pki,
                    f"127.0.0.1:{port}",
                    tmp_path / "state",
                    signing=signing,
                )
            ),
        ],
        tmp_path / "agent.log",
    )
    unsigned_agent = Process(
        [
            "run",
            "--config",
            str(
                write_agent_config(
                    tmp_path / "agent2.yaml",
                    pki,
                    f"127.0.0.1:{plain_port}",
                    tmp_path / "state2",
                    signing=signing,
                )
            ),
        ],
        tmp_path / "agent2.log",
    )
    web_port = free_port()
    try:
        for process in (signing_orchestrator, plain_orchestrator):
            process.start()
            process.wait_for_output("orchestrator listening")
        agent.start()
        unsigned_agent.start()

        async def scenario():
            async with control_client(pki, f"127.0.0.1:{port}") as client:
                await client.wait_for_agent(AGENT_ID)
                signed = await client.follow(
                    await client.submit(
                        AGENT_ID,
                        deploy_task(
                            "signed-1", test_images["web:v1"], container_name, web_port
                        ),
                    ),
                    timeout=120,
                )
            async with control_client(pki, f"127.0.0.1:{plain_port}") as client:
                await client.wait_for_agent(AGENT_ID)
                unsigned = await client.follow(
                    await client.submit(
                        AGENT_ID,
                        deploy_task(
                            "unsigned-1",
                            test_images["web:v2"],
                            container_name,
                            web_port,
                        ),
                    ),
                    timeout=60,
                )
            return signed, unsigned

        signed, unsigned = run(scenario())
    finally:
        for process in (
            agent,
            unsigned_agent,
            signing_orchestrator,
            plain_orchestrator,
        ):
            process.stop()

    assert signed.success, signed.error
    assert unsigned.error_type == "signature_invalid"
    assert "not signed" in unsigned.error
    assert fetch(web_port) == "v1"
    audit = (tmp_path / "state2" / "audit.log").read_text()
    assert "security.signature_invalid" in audit


def encoded_forms(secret: str) -> list[str]:
    raw = secret.encode()
    return [
        secret,
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        urllib.parse.quote(secret, safe=""),
        json.dumps(secret)[1:-1],
    ]


def test_canary_secrets_never_leave_in_clear(
    pki, orchestrator, tmp_path, test_images, private_image, container_name
):
    state = tmp_path / "state"
    config = write_agent_config(
        tmp_path / "agent.yaml", pki, orchestrator.address, state
    )
    agent = Process(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.start()
    port = free_port()
    outputs: list[str] = []

    def leaky_task(task_id: str, image) -> task_pb2.AgentTask:
        """A deploy whose container prints the secret, plain and base64,
        and then fails its health check, so its output lands in the log."""
        task = deploy_task(task_id, image, container_name, port)
        config = task.deploy.config
        config.environment["API_TOKEN"] = CANARY
        config.secret_environment.append("API_TOKEN")
        config.command.extend(
            [
                "sh",
                "-c",
                'echo "token=$API_TOKEN"; printf %s "$API_TOKEN" | base64; sleep 600',
            ]
        )
        config.health_check.CopyFrom(
            task_pb2.HealthCheckConfig(
                command=["sh", "-c", "exit 1"],
                interval=Duration(seconds=1),
                retries=1,
                timeout=Duration(seconds=8),
            )
        )
        return task

    async def scenario():
        async with control_client(pki, orchestrator.address) as client:
            await client.wait_for_agent(AGENT_ID)
            tasks = [
                (leaky_task("canary-1", test_images["tools:v1"]), None),
                (
                    deploy_task("canary-2", private_image, container_name, port),
                    registry_credentials(),
                ),
                (
                    leaky_task("canary-3", test_images["tools:v1"]),
                    registry_credentials(),
                ),
            ]
            for task, credentials in tasks:
                task_id = await client.submit(AGENT_ID, task, credentials=credentials)
                result = await client.follow(
                    task_id,
                    on_log=lambda chunk: outputs.append(
                        chunk.data.decode("utf-8", "replace")
                    ),
                    timeout=120,
                )
                outputs.append(str(result))
                outputs.append(json.dumps(dict(result.outputs)))

    try:
        run(scenario())
    finally:
        agent.stop()

    outputs.append(agent.output())
    for path in Path(state).rglob("*"):
        if path.is_file():
            outputs.append(path.read_bytes().decode("utf-8", "replace"))
    verify = subprocess.run(
        [
            sys.executable,
            "-m",
            "stella_agent.cli",
            "audit",
            "verify",
            "--file",
            str(state / "audit.log"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    everything = "\n".join(outputs)

    for secret in (CANARY, REGISTRY_PASSWORD):
        for form in encoded_forms(secret):
            assert form not in everything, f"{form!r} (a form of a secret) leaked"
    assert "token=****" in everything
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert '"action":"task.finished"' in (state / "audit.log").read_text()
