"""The agent's security services, bundled for the session and dispatcher.

``AgentSecurity`` holds what every task passes through: the key that sealed
credentials open with, the verifier of signed tasks, the registry of secrets
of running tasks (which masks the agent's own log and the audit log), and the
audit log itself. ``prepare()`` opens a task's credentials and collects its
secrets before the task is accepted, so a task whose credentials do not open
or whose secrets are too short to mask is rejected before any Docker call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stella.agent.v1 import gateway_pb2, task_pb2
from stella_agent.audit import AuditLog
from stella_agent.config import AgentConfig
from stella_agent.credentials import AgentKeyPair, open_task_credentials
from stella_agent.masking import (
    MaskingLogFilter,
    SecretMasker,
    SecretRegistry,
    check_secret_lengths,
    secrets_of,
)
from stella_agent.signing import TaskVerifier, load_public_keys

logger = logging.getLogger(__name__)

SECRET_PLACEHOLDER = "<secret: not journaled>"
"""Stands in for secret environment values in the journal's copy of a task."""


@dataclass
class PreparedTask:
    """Credentials and secrets of a task, kept in memory only."""

    credentials: task_pb2.Credentials
    masker: SecretMasker
    secrets: tuple[str, ...]


class AgentSecurity:
    """Credentials, signatures, masking and audit for one agent process."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        keypair: AgentKeyPair | None = None,
        on_audit_record: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.keypair = keypair or AgentKeyPair.load_or_create(config.state_dir)
        self.registry = SecretRegistry()
        signing = config.signing
        self.verifier = TaskVerifier(
            load_public_keys(signing.public_keys),
            config.agent_id,
            require_signatures=signing.require_signed_tasks,
            max_clock_skew=signing.max_clock_skew_seconds,
            replay_window=signing.replay_window_seconds,
            replay_file=Path(config.state_dir) / "signed-tasks.seen",
        )
        self.audit = AuditLog.in_state_dir(
            config.state_dir,
            config.agent_id,
            self.registry.mask_text,
            on_record=on_audit_record,
        )

    def public_key(self) -> gateway_pb2.AgentPublicKey:
        return self.keypair.public_key_message()

    def log_filter(self) -> MaskingLogFilter:
        """Return a filter for the agent's log handlers that masks running
        tasks' secrets."""
        return MaskingLogFilter(self.registry)

    def prepare(self, task: task_pb2.AgentTask) -> PreparedTask:
        """Open the task's credentials and collect its secrets.

        Raises CredentialsError when the credentials do not open for this
        agent and task, and InvalidTaskError for secrets too short to mask.
        """
        credentials = open_task_credentials(self.keypair, self.config.agent_id, task)
        secrets = secrets_of(task, credentials)
        check_secret_lengths(secrets)
        values = tuple(value for value in secrets.values() if value)
        return PreparedTask(credentials, SecretMasker(values), values)

    def register(self, task_id: str, prepared: PreparedTask) -> None:
        self.registry.add(task_id, prepared.secrets)

    def forget(self, task_id: str) -> None:
        self.registry.remove(task_id)

    def record(
        self, action: str, task: task_pb2.AgentTask | None = None, **fields
    ) -> None:
        """Write an audit record; a failure to write is logged, not raised,
        because the task's own result must still be delivered."""
        try:
            self.audit.record(
                action,
                task_id=task.id if task is not None else fields.pop("task_id", ""),
                actor=task.actor if task is not None else "",
                **fields,
            )
        except Exception:  # noqa: BLE001 - the audit log must never break a task
            logger.exception("cannot write audit record %s", action)

    def close(self) -> None:
        self.audit.close()


def journal_copy(task: task_pb2.AgentTask) -> task_pb2.AgentTask:
    """Return the task with secret environment values replaced, for the
    journal. Sealed credentials stay: they open only with the agent's key."""
    payload_name = task.WhichOneof("payload")
    config = None
    if payload_name == "deploy":
        config = task.deploy.config
    elif payload_name == "rollback" and task.rollback.HasField("config"):
        config = task.rollback.config
    if config is None or not config.secret_environment:
        return task
    copy = task_pb2.AgentTask()
    copy.CopyFrom(task)
    target = copy.deploy.config if payload_name == "deploy" else copy.rollback.config
    for name in target.secret_environment:
        if name in target.environment:
            target.environment[name] = SECRET_PLACEHOLDER
    return copy


def lost_secrets(task: task_pb2.AgentTask) -> bool:
    """Tell whether a task read back from the journal misses secret values."""
    payload_name = task.WhichOneof("payload")
    if payload_name == "deploy":
        environment = task.deploy.config.environment
    elif payload_name == "rollback":
        environment = task.rollback.config.environment
    else:
        return False
    return SECRET_PLACEHOLDER in environment.values()
