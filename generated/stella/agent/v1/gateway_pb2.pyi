import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from stella.agent.v1 import result_pb2 as _result_pb2
from stella.agent.v1 import task_pb2 as _task_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConnectRequest(_message.Message):
    __slots__ = ("hello", "heartbeat", "task_accepted", "task_rejected", "log_chunk", "task_result", "audit_record")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    TASK_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TASK_REJECTED_FIELD_NUMBER: _ClassVar[int]
    LOG_CHUNK_FIELD_NUMBER: _ClassVar[int]
    TASK_RESULT_FIELD_NUMBER: _ClassVar[int]
    AUDIT_RECORD_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    task_accepted: TaskAccepted
    task_rejected: TaskRejected
    log_chunk: _result_pb2.LogChunk
    task_result: _result_pb2.TaskResult
    audit_record: AuditRecord
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., task_accepted: _Optional[_Union[TaskAccepted, _Mapping]] = ..., task_rejected: _Optional[_Union[TaskRejected, _Mapping]] = ..., log_chunk: _Optional[_Union[_result_pb2.LogChunk, _Mapping]] = ..., task_result: _Optional[_Union[_result_pb2.TaskResult, _Mapping]] = ..., audit_record: _Optional[_Union[AuditRecord, _Mapping]] = ...) -> None: ...

class ConnectResponse(_message.Message):
    __slots__ = ("welcome", "task", "signed_task", "cancel", "result_ack", "heartbeat")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    SIGNED_TASK_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    RESULT_ACK_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    task: _task_pb2.AgentTask
    signed_task: SignedTask
    cancel: CancelTask
    result_ack: ResultAck
    heartbeat: Heartbeat
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., task: _Optional[_Union[_task_pb2.AgentTask, _Mapping]] = ..., signed_task: _Optional[_Union[SignedTask, _Mapping]] = ..., cancel: _Optional[_Union[CancelTask, _Mapping]] = ..., result_ack: _Optional[_Union[ResultAck, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("agent_id", "version", "capabilities", "running_task_ids", "unacknowledged_task_ids", "hostname", "public_key", "target_ids")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    UNACKNOWLEDGED_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    TARGET_IDS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    version: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    running_task_ids: _containers.RepeatedScalarFieldContainer[str]
    unacknowledged_task_ids: _containers.RepeatedScalarFieldContainer[str]
    hostname: str
    public_key: AgentPublicKey
    target_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agent_id: _Optional[str] = ..., version: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., running_task_ids: _Optional[_Iterable[str]] = ..., unacknowledged_task_ids: _Optional[_Iterable[str]] = ..., hostname: _Optional[str] = ..., public_key: _Optional[_Union[AgentPublicKey, _Mapping]] = ..., target_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AgentPublicKey(_message.Message):
    __slots__ = ("key_id", "algorithm", "public_key")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    algorithm: str
    public_key: bytes
    def __init__(self, key_id: _Optional[str] = ..., algorithm: _Optional[str] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("session_id", "heartbeat_interval", "log_positions")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    LOG_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    heartbeat_interval: _duration_pb2.Duration
    log_positions: _containers.RepeatedCompositeFieldContainer[LogPosition]
    def __init__(self, session_id: _Optional[str] = ..., heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., log_positions: _Optional[_Iterable[_Union[LogPosition, _Mapping]]] = ...) -> None: ...

class LogPosition(_message.Message):
    __slots__ = ("task_id", "next_sequence")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    next_sequence: int
    def __init__(self, task_id: _Optional[str] = ..., next_sequence: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_at", "running_tasks")
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    RUNNING_TASKS_FIELD_NUMBER: _ClassVar[int]
    sent_at: _timestamp_pb2.Timestamp
    running_tasks: int
    def __init__(self, sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., running_tasks: _Optional[int] = ...) -> None: ...

class TaskAccepted(_message.Message):
    __slots__ = ("task_id", "duplicate", "original_task_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    duplicate: bool
    original_task_id: str
    def __init__(self, task_id: _Optional[str] = ..., duplicate: bool = ..., original_task_id: _Optional[str] = ...) -> None: ...

class TaskRejected(_message.Message):
    __slots__ = ("task_id", "error_type", "error", "retriable")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRIABLE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    error_type: str
    error: str
    retriable: bool
    def __init__(self, task_id: _Optional[str] = ..., error_type: _Optional[str] = ..., error: _Optional[str] = ..., retriable: bool = ...) -> None: ...

class SignedTask(_message.Message):
    __slots__ = ("task", "key_id", "signature")
    TASK_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    task: bytes
    key_id: str
    signature: bytes
    def __init__(self, task: _Optional[bytes] = ..., key_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class CancelTask(_message.Message):
    __slots__ = ("task_id", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    reason: str
    def __init__(self, task_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ResultAck(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class FetchArtifactRequest(_message.Message):
    __slots__ = ("task_id", "name", "sha256")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    name: str
    sha256: str
    def __init__(self, task_id: _Optional[str] = ..., name: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class FetchArtifactResponse(_message.Message):
    __slots__ = ("data", "total_size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_size: int
    def __init__(self, data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...
