"""Stella Agent: the deployment agent of the Stella release orchestrator."""

__version__ = "0.1.0"
