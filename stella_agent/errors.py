"""The exceptions of Stella Agent.

Every failure a task can meet is a ``TaskError`` carrying what its result needs:
the machine-readable ``error_type``, whether a retry may help, and the phase the
task was in. Errors of third-party libraries (docker, grpc, subprocess) are
mapped to these at one boundary each, never passed through raw.

    StellaError                      root of everything raised on purpose
    ├── ConfigError                  invalid agent configuration or task file
    ├── CertificateError             unusable certificate, key or CA
    └── TaskError                    a task failed; becomes a TaskResult
        ├── InvalidTaskError         malformed task, bad value (invalid_task)
        ├── TaskExpiredError         received after expires_at (expired)
        ├── DigestMismatchError      pulled image is not what was asked (digest_mismatch)
        ├── PullError                pull failed (pull_failed, image_not_found)
        ├── HealthCheckFailedError   new release never became healthy
        ├── RollbackFailedError      no previous release, or it would not run
        ├── HookFailedError          a pre- or post-deploy hook failed
        ├── DockerError              the engine refused an operation
        ├── ComposeError             a Compose command failed
        ├── NotFoundError            the thing to act on does not exist
        ├── TaskTimeoutError         ran past its timeout (timeout)
        └── TaskCancelledError       cancelled by the orchestrator (cancelled)
"""

from __future__ import annotations


class StellaError(Exception):
    """Root of the exceptions Stella Agent raises on purpose."""


class ConfigError(StellaError):
    """The agent configuration or a task file is invalid."""


class CertificateError(StellaError):
    """A certificate, key or CA bundle cannot be used."""


class TaskError(StellaError):
    """A task failed. The attributes fill the TaskResult."""

    error_type = "internal"
    retriable = False

    def __init__(
        self,
        message: str,
        *,
        phase: str = "",
        error_type: str | None = None,
        retriable: bool | None = None,
        rolled_back: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.phase = phase
        if error_type is not None:
            self.error_type = error_type
        if retriable is not None:
            self.retriable = retriable
        self.rolled_back = rolled_back


class InvalidTaskError(TaskError):
    """The task is malformed or names an invalid value."""

    error_type = "invalid_task"


class TaskExpiredError(TaskError):
    """The task arrived after its expires_at."""

    error_type = "expired"


class DigestMismatchError(TaskError):
    """The image is not the one the digest names: possible tampering."""

    error_type = "digest_mismatch"


class PullError(TaskError):
    """The image could not be pulled."""

    error_type = "pull_failed"
    retriable = True


class HealthCheckFailedError(TaskError):
    """The new release did not become healthy in time."""

    error_type = "health_check_failed"


class RollbackFailedError(TaskError):
    """There is no previous release to return to, or it would not run."""

    error_type = "rollback_failed"


class HookFailedError(TaskError):
    """A pre-deploy or post-deploy hook failed."""

    error_type = "hook_failed"


class DockerError(TaskError):
    """The Docker Engine rejected or failed an operation."""

    error_type = "docker_error"


class ComposeError(TaskError):
    """A Docker Compose command failed."""

    error_type = "compose_error"


class NotFoundError(TaskError):
    """The container, stack or file the task acts on does not exist."""

    error_type = "not_found"


class TaskTimeoutError(TaskError):
    """The task ran longer than its timeout."""

    error_type = "timeout"
    retriable = True


class TaskCancelledError(TaskError):
    """The orchestrator cancelled the task."""

    error_type = "cancelled"
