import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_TYPE_UNSPECIFIED: _ClassVar[TaskType]
    TASK_TYPE_DEPLOY: _ClassVar[TaskType]
    TASK_TYPE_ROLLBACK: _ClassVar[TaskType]
    TASK_TYPE_HEALTH_CHECK: _ClassVar[TaskType]
    TASK_TYPE_INSPECT: _ClassVar[TaskType]
    TASK_TYPE_EXECUTE_COMMAND: _ClassVar[TaskType]
    TASK_TYPE_UPLOAD_FILES: _ClassVar[TaskType]
    TASK_TYPE_WRITE_STICKER: _ClassVar[TaskType]
    TASK_TYPE_READ_STICKER: _ClassVar[TaskType]

class Executor(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXECUTOR_UNSPECIFIED: _ClassVar[Executor]
    EXECUTOR_DOCKER: _ClassVar[Executor]
    EXECUTOR_COMPOSE: _ClassVar[Executor]

class StickerLocation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STICKER_LOCATION_UNSPECIFIED: _ClassVar[StickerLocation]
    STICKER_LOCATION_HOST: _ClassVar[StickerLocation]
    STICKER_LOCATION_VOLUME: _ClassVar[StickerLocation]
TASK_TYPE_UNSPECIFIED: TaskType
TASK_TYPE_DEPLOY: TaskType
TASK_TYPE_ROLLBACK: TaskType
TASK_TYPE_HEALTH_CHECK: TaskType
TASK_TYPE_INSPECT: TaskType
TASK_TYPE_EXECUTE_COMMAND: TaskType
TASK_TYPE_UPLOAD_FILES: TaskType
TASK_TYPE_WRITE_STICKER: TaskType
TASK_TYPE_READ_STICKER: TaskType
EXECUTOR_UNSPECIFIED: Executor
EXECUTOR_DOCKER: Executor
EXECUTOR_COMPOSE: Executor
STICKER_LOCATION_UNSPECIFIED: StickerLocation
STICKER_LOCATION_HOST: StickerLocation
STICKER_LOCATION_VOLUME: StickerLocation

class AgentTask(_message.Message):
    __slots__ = ("id", "type", "target_id", "credentials", "timeout", "priority", "idempotency_key", "assigned_at", "expires_at", "executor", "agent_id", "actor", "deploy", "rollback", "health_check", "inspect", "execute_command", "upload_files", "write_sticker", "read_sticker")
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TARGET_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    DEPLOY_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CHECK_FIELD_NUMBER: _ClassVar[int]
    INSPECT_FIELD_NUMBER: _ClassVar[int]
    EXECUTE_COMMAND_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_FILES_FIELD_NUMBER: _ClassVar[int]
    WRITE_STICKER_FIELD_NUMBER: _ClassVar[int]
    READ_STICKER_FIELD_NUMBER: _ClassVar[int]
    id: str
    type: TaskType
    target_id: str
    credentials: EncryptedCredentials
    timeout: _duration_pb2.Duration
    priority: int
    idempotency_key: str
    assigned_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    executor: Executor
    agent_id: str
    actor: str
    deploy: DeployPayload
    rollback: RollbackPayload
    health_check: HealthCheckPayload
    inspect: InspectPayload
    execute_command: ExecuteCommandPayload
    upload_files: UploadFilesPayload
    write_sticker: WriteStickerPayload
    read_sticker: ReadStickerPayload
    def __init__(self, id: _Optional[str] = ..., type: _Optional[_Union[TaskType, str]] = ..., target_id: _Optional[str] = ..., credentials: _Optional[_Union[EncryptedCredentials, _Mapping]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., priority: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., assigned_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., executor: _Optional[_Union[Executor, str]] = ..., agent_id: _Optional[str] = ..., actor: _Optional[str] = ..., deploy: _Optional[_Union[DeployPayload, _Mapping]] = ..., rollback: _Optional[_Union[RollbackPayload, _Mapping]] = ..., health_check: _Optional[_Union[HealthCheckPayload, _Mapping]] = ..., inspect: _Optional[_Union[InspectPayload, _Mapping]] = ..., execute_command: _Optional[_Union[ExecuteCommandPayload, _Mapping]] = ..., upload_files: _Optional[_Union[UploadFilesPayload, _Mapping]] = ..., write_sticker: _Optional[_Union[WriteStickerPayload, _Mapping]] = ..., read_sticker: _Optional[_Union[ReadStickerPayload, _Mapping]] = ...) -> None: ...

class EncryptedCredentials(_message.Message):
    __slots__ = ("key_id", "algorithm", "encapsulated_key", "ciphertext")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    ENCAPSULATED_KEY_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    algorithm: str
    encapsulated_key: bytes
    ciphertext: bytes
    def __init__(self, key_id: _Optional[str] = ..., algorithm: _Optional[str] = ..., encapsulated_key: _Optional[bytes] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class Credentials(_message.Message):
    __slots__ = ("registries", "secrets")
    class SecretsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REGISTRIES_FIELD_NUMBER: _ClassVar[int]
    SECRETS_FIELD_NUMBER: _ClassVar[int]
    registries: _containers.RepeatedCompositeFieldContainer[RegistryAuth]
    secrets: _containers.ScalarMap[str, str]
    def __init__(self, registries: _Optional[_Iterable[_Union[RegistryAuth, _Mapping]]] = ..., secrets: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RegistryAuth(_message.Message):
    __slots__ = ("registry", "username", "password", "identity_token")
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    registry: str
    username: str
    password: str
    identity_token: str
    def __init__(self, registry: _Optional[str] = ..., username: _Optional[str] = ..., password: _Optional[str] = ..., identity_token: _Optional[str] = ...) -> None: ...

class DeployPayload(_message.Message):
    __slots__ = ("image", "digest", "config", "artifacts", "previous_digest", "hooks")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    HOOKS_FIELD_NUMBER: _ClassVar[int]
    image: str
    digest: str
    config: DeployConfig
    artifacts: _containers.RepeatedCompositeFieldContainer[ArtifactReference]
    previous_digest: str
    hooks: DeployHooks
    def __init__(self, image: _Optional[str] = ..., digest: _Optional[str] = ..., config: _Optional[_Union[DeployConfig, _Mapping]] = ..., artifacts: _Optional[_Iterable[_Union[ArtifactReference, _Mapping]]] = ..., previous_digest: _Optional[str] = ..., hooks: _Optional[_Union[DeployHooks, _Mapping]] = ...) -> None: ...

class DeployConfig(_message.Message):
    __slots__ = ("container_name", "environment", "ports", "volumes", "restart_policy", "memory_limit_bytes", "cpu_limit", "health_check", "release_id", "release_name", "keep_previous", "deployment_directory", "expected_digests", "sticker", "stack_name", "secret_environment", "labels", "command", "network")
    class EnvironmentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ExpectedDigestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONTAINER_NAME_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    RESTART_POLICY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_LIMIT_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CHECK_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RELEASE_NAME_FIELD_NUMBER: _ClassVar[int]
    KEEP_PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    STICKER_FIELD_NUMBER: _ClassVar[int]
    STACK_NAME_FIELD_NUMBER: _ClassVar[int]
    SECRET_ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    container_name: str
    environment: _containers.ScalarMap[str, str]
    ports: _containers.RepeatedScalarFieldContainer[str]
    volumes: _containers.RepeatedScalarFieldContainer[str]
    restart_policy: str
    memory_limit_bytes: int
    cpu_limit: float
    health_check: HealthCheckConfig
    release_id: str
    release_name: str
    keep_previous: bool
    deployment_directory: str
    expected_digests: _containers.ScalarMap[str, str]
    sticker: StickerConfig
    stack_name: str
    secret_environment: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    command: _containers.RepeatedScalarFieldContainer[str]
    network: str
    def __init__(self, container_name: _Optional[str] = ..., environment: _Optional[_Mapping[str, str]] = ..., ports: _Optional[_Iterable[str]] = ..., volumes: _Optional[_Iterable[str]] = ..., restart_policy: _Optional[str] = ..., memory_limit_bytes: _Optional[int] = ..., cpu_limit: _Optional[float] = ..., health_check: _Optional[_Union[HealthCheckConfig, _Mapping]] = ..., release_id: _Optional[str] = ..., release_name: _Optional[str] = ..., keep_previous: bool = ..., deployment_directory: _Optional[str] = ..., expected_digests: _Optional[_Mapping[str, str]] = ..., sticker: _Optional[_Union[StickerConfig, _Mapping]] = ..., stack_name: _Optional[str] = ..., secret_environment: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., command: _Optional[_Iterable[str]] = ..., network: _Optional[str] = ...) -> None: ...

class HealthCheckConfig(_message.Message):
    __slots__ = ("timeout", "settle_period", "command", "interval", "retries", "start_period")
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    SETTLE_PERIOD_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    START_PERIOD_FIELD_NUMBER: _ClassVar[int]
    timeout: _duration_pb2.Duration
    settle_period: _duration_pb2.Duration
    command: _containers.RepeatedScalarFieldContainer[str]
    interval: _duration_pb2.Duration
    retries: int
    start_period: _duration_pb2.Duration
    def __init__(self, timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., settle_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., command: _Optional[_Iterable[str]] = ..., interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., retries: _Optional[int] = ..., start_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class StickerConfig(_message.Message):
    __slots__ = ("location", "path", "volume")
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    location: StickerLocation
    path: str
    volume: str
    def __init__(self, location: _Optional[_Union[StickerLocation, str]] = ..., path: _Optional[str] = ..., volume: _Optional[str] = ...) -> None: ...

class DeployHooks(_message.Message):
    __slots__ = ("pre_deploy", "post_deploy")
    PRE_DEPLOY_FIELD_NUMBER: _ClassVar[int]
    POST_DEPLOY_FIELD_NUMBER: _ClassVar[int]
    pre_deploy: HookConfig
    post_deploy: HookConfig
    def __init__(self, pre_deploy: _Optional[_Union[HookConfig, _Mapping]] = ..., post_deploy: _Optional[_Union[HookConfig, _Mapping]] = ...) -> None: ...

class HookConfig(_message.Message):
    __slots__ = ("command", "image", "environment", "timeout", "network")
    class EnvironmentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    command: _containers.RepeatedScalarFieldContainer[str]
    image: str
    environment: _containers.ScalarMap[str, str]
    timeout: _duration_pb2.Duration
    network: bool
    def __init__(self, command: _Optional[_Iterable[str]] = ..., image: _Optional[str] = ..., environment: _Optional[_Mapping[str, str]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., network: bool = ...) -> None: ...

class ArtifactReference(_message.Message):
    __slots__ = ("name", "type", "sha256", "size", "content", "mode", "secret")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    sha256: str
    size: int
    content: bytes
    mode: int
    secret: bool
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., content: _Optional[bytes] = ..., mode: _Optional[int] = ..., secret: bool = ...) -> None: ...

class RollbackPayload(_message.Message):
    __slots__ = ("container_name", "target_digest", "image", "config", "stack_name", "deployment_directory")
    CONTAINER_NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_DIGEST_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STACK_NAME_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    container_name: str
    target_digest: str
    image: str
    config: DeployConfig
    stack_name: str
    deployment_directory: str
    def __init__(self, container_name: _Optional[str] = ..., target_digest: _Optional[str] = ..., image: _Optional[str] = ..., config: _Optional[_Union[DeployConfig, _Mapping]] = ..., stack_name: _Optional[str] = ..., deployment_directory: _Optional[str] = ...) -> None: ...

class HealthCheckPayload(_message.Message):
    __slots__ = ("container_name", "stack_name", "deployment_directory", "probe")
    CONTAINER_NAME_FIELD_NUMBER: _ClassVar[int]
    STACK_NAME_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    container_name: str
    stack_name: str
    deployment_directory: str
    probe: Probe
    def __init__(self, container_name: _Optional[str] = ..., stack_name: _Optional[str] = ..., deployment_directory: _Optional[str] = ..., probe: _Optional[_Union[Probe, _Mapping]] = ...) -> None: ...

class Probe(_message.Message):
    __slots__ = ("http", "tcp", "timeout", "service")
    HTTP_FIELD_NUMBER: _ClassVar[int]
    TCP_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    http: HttpProbe
    tcp: TcpProbe
    timeout: _duration_pb2.Duration
    service: str
    def __init__(self, http: _Optional[_Union[HttpProbe, _Mapping]] = ..., tcp: _Optional[_Union[TcpProbe, _Mapping]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., service: _Optional[str] = ...) -> None: ...

class HttpProbe(_message.Message):
    __slots__ = ("port", "path")
    PORT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    port: int
    path: str
    def __init__(self, port: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class TcpProbe(_message.Message):
    __slots__ = ("port",)
    PORT_FIELD_NUMBER: _ClassVar[int]
    port: int
    def __init__(self, port: _Optional[int] = ...) -> None: ...

class InspectPayload(_message.Message):
    __slots__ = ("container_name", "stack_name", "deployment_directory", "sticker")
    CONTAINER_NAME_FIELD_NUMBER: _ClassVar[int]
    STACK_NAME_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    STICKER_FIELD_NUMBER: _ClassVar[int]
    container_name: str
    stack_name: str
    deployment_directory: str
    sticker: StickerConfig
    def __init__(self, container_name: _Optional[str] = ..., stack_name: _Optional[str] = ..., deployment_directory: _Optional[str] = ..., sticker: _Optional[_Union[StickerConfig, _Mapping]] = ...) -> None: ...

class ExecuteCommandPayload(_message.Message):
    __slots__ = ("container_name", "argv", "timeout", "environment", "working_dir", "user", "on_host", "stack_name", "service")
    class EnvironmentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONTAINER_NAME_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    ON_HOST_FIELD_NUMBER: _ClassVar[int]
    STACK_NAME_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    container_name: str
    argv: _containers.RepeatedScalarFieldContainer[str]
    timeout: _duration_pb2.Duration
    environment: _containers.ScalarMap[str, str]
    working_dir: str
    user: str
    on_host: bool
    stack_name: str
    service: str
    def __init__(self, container_name: _Optional[str] = ..., argv: _Optional[_Iterable[str]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., environment: _Optional[_Mapping[str, str]] = ..., working_dir: _Optional[str] = ..., user: _Optional[str] = ..., on_host: bool = ..., stack_name: _Optional[str] = ..., service: _Optional[str] = ...) -> None: ...

class UploadFilesPayload(_message.Message):
    __slots__ = ("target_directory", "container_name", "container_directory", "files")
    TARGET_DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_NAME_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    target_directory: str
    container_name: str
    container_directory: str
    files: _containers.RepeatedCompositeFieldContainer[FileUpload]
    def __init__(self, target_directory: _Optional[str] = ..., container_name: _Optional[str] = ..., container_directory: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileUpload, _Mapping]]] = ...) -> None: ...

class FileUpload(_message.Message):
    __slots__ = ("path", "content", "mode", "owner", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    content: bytes
    mode: int
    owner: str
    sha256: str
    def __init__(self, path: _Optional[str] = ..., content: _Optional[bytes] = ..., mode: _Optional[int] = ..., owner: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class WriteStickerPayload(_message.Message):
    __slots__ = ("location", "sticker")
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    STICKER_FIELD_NUMBER: _ClassVar[int]
    location: StickerConfig
    sticker: VersionSticker
    def __init__(self, location: _Optional[_Union[StickerConfig, _Mapping]] = ..., sticker: _Optional[_Union[VersionSticker, _Mapping]] = ...) -> None: ...

class ReadStickerPayload(_message.Message):
    __slots__ = ("location",)
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    location: StickerConfig
    def __init__(self, location: _Optional[_Union[StickerConfig, _Mapping]] = ...) -> None: ...

class VersionSticker(_message.Message):
    __slots__ = ("release_id", "release_name", "image", "digest", "task_id", "deployed_at", "project_name", "service_digests", "container_name", "metadata")
    class ServiceDigestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RELEASE_NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYED_AT_FIELD_NUMBER: _ClassVar[int]
    PROJECT_NAME_FIELD_NUMBER: _ClassVar[int]
    SERVICE_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_NAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    release_id: str
    release_name: str
    image: str
    digest: str
    task_id: str
    deployed_at: _timestamp_pb2.Timestamp
    project_name: str
    service_digests: _containers.ScalarMap[str, str]
    container_name: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, release_id: _Optional[str] = ..., release_name: _Optional[str] = ..., image: _Optional[str] = ..., digest: _Optional[str] = ..., task_id: _Optional[str] = ..., deployed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., project_name: _Optional[str] = ..., service_digests: _Optional[_Mapping[str, str]] = ..., container_name: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...
