"""Agent configuration: a YAML file turned into frozen, validated records.

Every key is checked on load; an error names the key by its dotted path and
states what is expected. Unknown keys are errors too, because a misspelt key that
is silently ignored is worse than a failed start. Environment variables named
``STELLA_AGENT_<SECTION>_<KEY>`` (or ``STELLA_AGENT_<KEY>`` for top-level keys)
override file values, which suits containers and systemd units.

docs/CONFIGURATION in the README lists every key with its default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from stella_agent.errors import ConfigError

AGENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class OrchestratorConfig:
    """Address of the orchestrator and connection settings."""

    address: str = "127.0.0.1:7443"
    """host:port of the orchestrator's AgentGateway."""
    server_name: str = ""
    """Name the orchestrator's certificate must carry; default is the host."""
    connect_timeout_seconds: float = 10.0
    """Time allowed for the TLS handshake and the Welcome."""
    reconnect_initial_seconds: float = 0.5
    """First delay before reconnecting after the stream breaks."""
    reconnect_max_seconds: float = 30.0
    """Upper bound of the reconnect delay, which doubles on each failure."""
    keepalive_seconds: float = 20.0
    """Interval of HTTP/2 keepalive pings, which detect dead connections."""


@dataclass(frozen=True)
class TlsConfig:
    """The agent's certificate, key and the CA that signs the orchestrator's."""

    ca_file: str = ""
    """PEM bundle of the CA(s) trusted for the orchestrator's certificate."""
    cert_file: str = ""
    """PEM client certificate whose identity is the agent id."""
    key_file: str = ""
    """PEM private key of the client certificate."""
    reload_check_seconds: float = 10.0
    """How often to look for a renewed certificate, key or CA on disk; a change
    opens a new stream with them."""
    expiry_warning_days: int = 30
    """Log a warning when the certificate expires within this many days."""


@dataclass(frozen=True)
class DockerConfig:
    """Connection to Docker Engine and its timeouts."""

    host: str = ""
    """Docker host URL; empty uses DOCKER_HOST or the default socket."""
    stop_timeout_seconds: int = 10
    """Grace period of `docker stop` before the container is killed."""
    pull_timeout_seconds: float = 600.0
    """Maximum time of one image pull."""


@dataclass(frozen=True)
class ComposeConfig:
    """Command and timeout of Docker Compose v2."""

    command: tuple[str, ...] = ()
    """Compose command as an argument vector; empty finds `docker compose` or
    `docker-compose` v2 on PATH."""
    command_timeout_seconds: float = 600.0
    """Maximum time of one Compose command before its process group is killed."""


@dataclass(frozen=True)
class TasksConfig:
    """Defaults and limits of task execution."""

    default_timeout_seconds: float = 900.0
    """Timeout of a task that sets none."""
    health_timeout_seconds: float = 120.0
    """Time a new release has to become healthy, when the task sets none."""
    settle_seconds: float = 5.0
    """How long a container without a health check must stay running."""
    max_concurrent: int = 4
    """Tasks that run at the same time (on different targets)."""
    idempotency_window_seconds: float = 86400.0
    """How long idempotency keys and their results are remembered."""
    shutdown_grace_seconds: float = 60.0
    """On SIGTERM, how long running tasks may take to finish before the agent
    exits; unfinished ones are recovered on the next start."""
    busy_policy: str = "wait"
    """A task for a target that another task is using: "wait" or "reject"."""
    allow_host_commands: bool = False
    """Let execute-command run commands on the host (outside containers)."""
    host_command_allowlist: tuple[str, ...] = ()
    """Absolute paths of the host commands execute-command may run."""
    max_upload_bytes: int = 64 * 1024 * 1024
    """Total size limit of the files of one upload-files task."""
    upload_roots: tuple[str, ...] = ()
    """Host directories upload-files may write under; empty means none."""
    allowed_deployment_roots: tuple[str, ...] = ()
    """Directories a Compose task may name as deployment directory, besides
    the default under the state directory."""
    targets: tuple[str, ...] = ()
    """Target ids this agent serves; empty means any."""


@dataclass(frozen=True)
class HooksConfig:
    """Sandbox of pre- and post-deploy hooks."""

    image: str = ""
    """Default hook image, pinned as repository@sha256:digest."""
    allow_network: bool = False
    """Grant network access to hooks that ask for it."""
    timeout_seconds: float = 300.0
    """Default hook timeout."""
    memory_limit_bytes: int = 256 * 1024 * 1024
    """Memory limit of a hook container."""
    cpu_limit: float = 1.0
    """CPU limit of a hook container, in CPUs."""
    pids_limit: int = 128
    """Process limit of a hook container."""


@dataclass(frozen=True)
class StickerConfig:
    """Default location of the version sticker."""

    location: str = "host"
    """"host" (a file) or "volume" (a named Docker volume)."""
    path: str = "/var/stella/version.json"
    """Path of the sticker file."""
    volume: str = "stella-sticker"
    """Volume name when location is "volume"."""


@dataclass(frozen=True)
class SigningConfig:
    """Signed tasks: which orchestrator keys the agent trusts."""

    require_signed_tasks: bool = False
    """Reject every task that is not signed by one of `public_keys`."""
    public_keys: tuple[str, ...] = ()
    """Ed25519 public keys as PEM file paths, optionally "KEY_ID=PATH"; several
    keys may be listed at once while keys are rotated."""
    max_clock_skew_seconds: float = 60.0
    """How far the orchestrator's clock may be from this host's."""
    replay_window_seconds: float = 86400.0
    """Longest accepted time to a signed task's expiry; task ids are
    remembered that long to reject replays."""


@dataclass(frozen=True)
class AgentConfig:
    """Everything `stella-agent run` needs."""

    agent_id: str
    """The agent's id; must equal the identity in its client certificate."""
    state_dir: str = "/var/lib/stella-agent"
    """Directory of the journal, keys, audit log and Compose stacks."""
    log_level: str = "INFO"
    """Level of the agent's own log on stderr."""
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    docker: DockerConfig = field(default_factory=DockerConfig)
    compose: ComposeConfig = field(default_factory=ComposeConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    sticker: StickerConfig = field(default_factory=StickerConfig)
    signing: SigningConfig = field(default_factory=SigningConfig)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)


_SECTIONS: dict[str, type] = {
    "orchestrator": OrchestratorConfig,
    "tls": TlsConfig,
    "docker": DockerConfig,
    "compose": ComposeConfig,
    "tasks": TasksConfig,
    "hooks": HooksConfig,
    "sticker": StickerConfig,
    "signing": SigningConfig,
}


def load_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> AgentConfig:
    """Read, override from the environment and validate an agent config file."""
    file_path = Path(path)
    try:
        raw = yaml.safe_load(file_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {file_path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {file_path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {file_path} is not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {file_path} must hold a mapping of keys")
    config = config_from_mapping(raw, env=os.environ if env is None else env)
    return _resolve_paths(config, file_path.parent)


def config_from_mapping(
    raw: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> AgentConfig:
    """Build an AgentConfig from parsed YAML, applying environment overrides."""
    merged: dict[str, Any] = {key: value for key, value in raw.items()}
    if env:
        _apply_env_overrides(merged, env)

    top_level = {f.name for f in fields(AgentConfig)}
    for key in merged:
        if key not in top_level:
            raise ConfigError(
                f"unknown config key '{key}'; known keys: {', '.join(sorted(top_level))}"
            )

    kwargs: dict[str, Any] = {}
    for f in fields(AgentConfig):
        if f.name not in merged:
            continue
        value = merged[f.name]
        if f.name in _SECTIONS:
            kwargs[f.name] = _build_section(f.name, _SECTIONS[f.name], value)
        else:
            kwargs[f.name] = _coerce(f.name, f.type, value)

    if "agent_id" not in kwargs or not kwargs["agent_id"]:
        raise ConfigError(
            "config key 'agent_id' is required: set it to the identity in the agent's certificate"
        )
    config = AgentConfig(**kwargs)
    _validate(config)
    return config


def _build_section(name: str, cls: type, value: Any) -> Any:
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise ConfigError(
            f"config key '{name}' must be a mapping, got {type(value).__name__}"
        )
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, item in value.items():
        if key not in known:
            raise ConfigError(
                f"unknown config key '{name}.{key}'; known keys in '{name}': {', '.join(sorted(known))}"
            )
        kwargs[key] = _coerce(f"{name}.{key}", known[key].type, item)
    return cls(**kwargs)


def _coerce(key: str, type_name: Any, value: Any) -> Any:
    """Check one value against the field's annotation, given as a string."""
    expected = str(type_name)
    if expected == "str":
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if expected == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "false",
            "1",
            "0",
            "yes",
            "no",
        ):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if expected == "int":
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(
                f"config key '{key}' must be an integer, got {value!r}"
            ) from None
    if expected == "float":
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(
                f"config key '{key}' must be a number, got {value!r}"
            ) from None
    if expected.startswith("tuple[str"):
        if isinstance(value, str):
            value = [part for part in value.split(",") if part]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(
                f"config key '{key}' must be a list of strings, got {value!r}"
            )
        return tuple(value)
    raise ConfigError(
        f"config key '{key}' has an unsupported type {expected}"
    )  # pragma: no cover


def _apply_env_overrides(merged: dict[str, Any], env: Mapping[str, str]) -> None:
    prefix = "STELLA_AGENT_"
    for name, value in env.items():
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :].lower()
        for section in _SECTIONS:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1 :]
                current = merged.get(section) or {}
                if not isinstance(current, dict):
                    break
                merged[section] = {**current, key: value}
                break
        else:
            if rest in {f.name for f in fields(AgentConfig)}:
                merged[rest] = value
            else:
                raise ConfigError(
                    f"environment variable {name} names no config key; use "
                    "STELLA_AGENT_<KEY> or STELLA_AGENT_<SECTION>_<KEY>, for example "
                    "STELLA_AGENT_TASKS_MAX_CONCURRENT"
                )


def _validate(config: AgentConfig) -> None:
    if not AGENT_ID_PATTERN.match(config.agent_id):
        raise ConfigError(
            f"config key 'agent_id' is invalid: {config.agent_id!r}; use 1 to 128 letters, "
            "digits, '.', '_' or '-', starting with a letter or digit"
        )
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(
            f"config key 'log_level' must be DEBUG, INFO, WARNING or ERROR, got {config.log_level!r}"
        )
    address = config.orchestrator.address
    if "://" in address:
        raise ConfigError(
            f"config key 'orchestrator.address' must be host:port without a scheme, "
            f"got {address!r}; drop the {address.split('://')[0]}:// prefix"
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"config key 'orchestrator.address' must be host:port, got {address!r}"
        )
    if not 0 < int(port) < 65536:
        raise ConfigError(
            f"config key 'orchestrator.address' has port {port}, outside 1 to 65535"
        )
    if config.orchestrator.keepalive_seconds < 10:
        raise ConfigError(
            "config key 'orchestrator.keepalive_seconds' must be at least 10, got "
            f"{config.orchestrator.keepalive_seconds:g}: orchestrators reject more frequent "
            "pings with GOAWAY too_many_pings"
        )
    if config.tasks.busy_policy not in ("wait", "reject"):
        raise ConfigError(
            f"config key 'tasks.busy_policy' must be 'wait' or 'reject', got {config.tasks.busy_policy!r}"
        )
    if config.tasks.max_concurrent < 1:
        raise ConfigError(
            f"config key 'tasks.max_concurrent' must be at least 1, got {config.tasks.max_concurrent}"
        )
    if config.sticker.location not in ("host", "volume"):
        raise ConfigError(
            f"config key 'sticker.location' must be 'host' or 'volume', got {config.sticker.location!r}"
        )
    if config.signing.require_signed_tasks and not config.signing.public_keys:
        raise ConfigError(
            "config key 'signing.require_signed_tasks' is true but 'signing.public_keys' "
            "is empty; list the orchestrator's signing public key files"
        )
    for command in config.tasks.host_command_allowlist:
        if not command.startswith("/"):
            raise ConfigError(
                f"config key 'tasks.host_command_allowlist' must list absolute paths, got {command!r}"
            )
    positive = {
        "orchestrator.connect_timeout_seconds": config.orchestrator.connect_timeout_seconds,
        "orchestrator.reconnect_initial_seconds": config.orchestrator.reconnect_initial_seconds,
        "orchestrator.reconnect_max_seconds": config.orchestrator.reconnect_max_seconds,
        "orchestrator.keepalive_seconds": config.orchestrator.keepalive_seconds,
        "tls.reload_check_seconds": config.tls.reload_check_seconds,
        "tasks.default_timeout_seconds": config.tasks.default_timeout_seconds,
        "tasks.health_timeout_seconds": config.tasks.health_timeout_seconds,
        "docker.pull_timeout_seconds": config.docker.pull_timeout_seconds,
        "compose.command_timeout_seconds": config.compose.command_timeout_seconds,
        "hooks.timeout_seconds": config.hooks.timeout_seconds,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be greater than 0, got {value}")


def _resolve_paths(config: AgentConfig, base: Path) -> AgentConfig:
    """Make relative file paths relative to the config file's directory."""
    from dataclasses import replace

    def resolve(value: str) -> str:
        if not value or os.path.isabs(value):
            return value
        return str((base / value).resolve())

    tls = replace(
        config.tls,
        ca_file=resolve(config.tls.ca_file),
        cert_file=resolve(config.tls.cert_file),
        key_file=resolve(config.tls.key_file),
    )
    signing = replace(
        config.signing,
        public_keys=tuple(
            _resolve_key_spec(spec, resolve) for spec in config.signing.public_keys
        ),
    )
    return replace(
        config, tls=tls, signing=signing, state_dir=resolve(config.state_dir)
    )


def _resolve_key_spec(spec: str, resolve) -> str:
    key_id, sep, path = spec.partition("=")
    if sep and "/" not in key_id:
        return f"{key_id}={resolve(path)}"
    return resolve(spec)
