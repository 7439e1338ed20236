"""Real processes for end-to-end tests: `stella-agent orchestrator` and
`stella-agent run`, talking mutual TLS on loopback with certificates made by
`stella-agent certs init`."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stella_agent.certs import init_dev_pki
from stella_agent.orchestrator.client import ControlClient

AGENT_ID = "e2e-agent"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(coro):
    """Run a coroutine to completion in a fresh event loop."""
    return asyncio.run(coro)


class Process:
    """A stella-agent subcommand running in the background, its output in a file."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stella_agent.cli", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def output(self) -> str:
        return (
            self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        )

    def mark(self) -> int:
        """Return the current length of the output, for wait_for_output."""
        return len(self.output())

    def restart(self, ready_text: str) -> None:
        """Start the process again and wait until it prints `ready_text` anew."""
        mark = self.mark()
        self.start()
        self.wait_for_output(ready_text, since=mark)

    def wait_for_output(self, text: str, timeout: float = 30, since: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output()[since:]:
                return
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(
            f"{text!r} not in output of {self.args[0]}:\n{self.output()[-4000:]}"
        )


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init_dev_pki(directory, AGENT_ID)
    init_dev_pki(directory, "other-agent")
    return directory


@pytest.fixture
def orchestrator(pki, tmp_path):
    port = free_port()
    process = Process(
        [
            "orchestrator",
            "--listen",
            f"127.0.0.1:{port}",
            "--certs",
            str(pki),
            "--heartbeat-interval",
            "1",
        ],
        tmp_path / "orchestrator.log",
    )
    process.port = port  # type: ignore[attr-defined]
    process.address = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    process.start()
    process.wait_for_output("orchestrator listening")
    yield process
    process.stop()


def write_agent_config(
    path: Path,
    pki: Path,
    address: str,
    state_dir: Path,
    agent_id: str = AGENT_ID,
    cert_id: str | None = None,
    **sections,
) -> Path:
    cert_id = cert_id or agent_id
    config = {
        "agent_id": agent_id,
        "state_dir": str(state_dir),
        "log_level": "DEBUG",
        "orchestrator": {
            "address": address,
            "reconnect_initial_seconds": 0.2,
            "reconnect_max_seconds": 2,
        },
        "tls": {
            "ca_file": str(pki / "ca.crt"),
            "cert_file": str(pki / f"agent-{cert_id}.crt"),
            "key_file": str(pki / f"agent-{cert_id}.key"),
        },
        "tasks": {"health_timeout_seconds": 20, "settle_seconds": 2},
        # busybox as PID 1 ignores SIGTERM, so every stop would wait the
        # full grace period; keep it short.
        "docker": {"stop_timeout_seconds": 2},
        # Every deploy writes the version sticker; keep it out of /var/stella.
        "sticker": {"path": str(state_dir / "stella" / "version.json")},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def agent(pki, orchestrator, tmp_path):
    config = write_agent_config(
        tmp_path / "agent.yaml", pki, orchestrator.address, tmp_path / "state"
    )
    process = Process(["run", "--config", str(config)], tmp_path / "agent.log")
    process.start()
    yield process
    process.stop()


def control_client(pki: Path, address: str) -> ControlClient:
    return ControlClient(
        address,
        ca_file=str(pki / "ca.crt"),
        cert_file=str(pki / "operator.crt"),
        key_file=str(pki / "operator.key"),
    )


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # gRPC honours http_proxy; loopback traffic must never go through one.
    for name in (
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "grpc_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
