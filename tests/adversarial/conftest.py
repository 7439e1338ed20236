"""The end-to-end fixtures (real orchestrator and agent processes over mTLS),
for the adversarial tests."""

from tests.e2e.conftest import _no_proxy, agent, orchestrator, pki  # noqa: F401
