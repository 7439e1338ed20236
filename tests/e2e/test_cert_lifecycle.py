"""Certificate renewal on both sides without a restart, and the expiry
warning."""

from __future__ import annotations

import datetime
import shutil
import socket
import ssl
import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from stella_agent.certs import ORCHESTRATOR_IDENTITY, issue_certificate
from tests.e2e.conftest import (
    AGENT_ID,
    Process,
    control_client,
    free_port,
    run,
    write_agent_config,
)
from tests.e2e.test_faults import worker_task


def renew(pki, stem: str, common_name: str, **kwargs) -> int:
    """Issue a new certificate for `stem` in `pki` and return its serial."""
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    cert, key = issue_certificate(ca_cert, ca_key, common_name, **kwargs)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Replace key and certificate with renames, as a renewal tool would.
    (pki / f"{stem}.key.new").write_bytes(key_pem)
    (pki / f"{stem}.crt.new").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (pki / f"{stem}.key.new").rename(pki / f"{stem}.key")
    (pki / f"{stem}.crt.new").rename(pki / f"{stem}.crt")
    return cert.serial_number


def served_serial(pki, port: int) -> int:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "operator.crt"), str(pki / "operator.key"))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def test_agent_reloads_renewed_certificate_without_disturbing_a_task(
    pki, orchestrator, tmp_path, test_images, container_name
):
    own_pki = tmp_path / "pki"
    shutil.copytree(pki, own_pki)
    config = write_agent_config(
        tmp_path / "agent.yaml",
        own_pki,
        orchestrator.address,
        tmp_path / "state",
        tls={"reload_check_seconds": 0.5},
    )
    agent = Process(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.start()
    task = worker_task(
        "renewal-1", test_images["worker:v1"], container_name, settle_seconds=6
    )
    try:

        async def scenario():
            async with control_client(pki, orchestrator.address) as client:
                before = await client.wait_for_agent(AGENT_ID)
                task_id = await client.submit(AGENT_ID, task)
                agent.wait_for_output("accepted", timeout=30)
                renew(own_pki, f"agent-{AGENT_ID}", AGENT_ID)
                agent.wait_for_output("reloaded the agent certificate", timeout=30)
                result = await client.follow(task_id, timeout=120)
                after = await client.wait_for_agent(AGENT_ID)
                return before, after, result

        before, after, result = run(scenario())
    finally:
        agent.stop()

    assert result.success, result.error
    assert after.connected_at.ToNanoseconds() > before.connected_at.ToNanoseconds()
    assert agent.output().count(f"task {task.id} (deploy) accepted") == 1


def test_orchestrator_reloads_renewed_certificate(pki, tmp_path):
    own_pki = tmp_path / "pki"
    shutil.copytree(pki, own_pki)
    port = free_port()
    orchestrator = Process(
        ["orchestrator", "--listen", f"127.0.0.1:{port}", "--certs", str(own_pki)],
        tmp_path / "orchestrator.log",
    )
    orchestrator.start()
    try:
        orchestrator.wait_for_output("orchestrator listening")
        first = served_serial(own_pki, port)
        renewed = renew(
            own_pki,
            "orchestrator",
            ORCHESTRATOR_IDENTITY,
            server_names=("localhost", "127.0.0.1"),
            client=False,
        )
        deadline = time.monotonic() + 10
        second = served_serial(own_pki, port)
        while second != renewed and time.monotonic() < deadline:
            time.sleep(0.2)
            second = served_serial(own_pki, port)
    finally:
        orchestrator.stop()

    assert first != renewed
    assert second == renewed
    assert "reloaded the server certificate" in orchestrator.output()


def test_agent_warns_ahead_of_certificate_expiry(pki, orchestrator, tmp_path):
    own_pki = tmp_path / "pki"
    shutil.copytree(pki, own_pki)
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    renew(own_pki, f"agent-{AGENT_ID}", AGENT_ID, days=6, not_before=start)
    config = write_agent_config(
        tmp_path / "agent.yaml", own_pki, orchestrator.address, tmp_path / "state"
    )
    agent = Process(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.start()
    try:
        agent.wait_for_output("expires on", timeout=30)
        connected = agent.output()
    finally:
        agent.stop()

    assert "in 4 day(s); renew it" in connected
