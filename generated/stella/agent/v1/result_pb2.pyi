import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from stella.agent.v1 import task_pb2 as _task_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LogStream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOG_STREAM_UNSPECIFIED: _ClassVar[LogStream]
    LOG_STREAM_AGENT: _ClassVar[LogStream]
    LOG_STREAM_STDOUT: _ClassVar[LogStream]
    LOG_STREAM_STDERR: _ClassVar[LogStream]
LOG_STREAM_UNSPECIFIED: LogStream
LOG_STREAM_AGENT: LogStream
LOG_STREAM_STDOUT: LogStream
LOG_STREAM_STDERR: LogStream

class TaskResult(_message.Message):
    __slots__ = ("task_id", "success", "started_at", "completed_at", "outputs", "artifacts", "error", "error_type", "retriable", "logs", "metrics", "failed_phase", "rolled_back")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    RETRIABLE_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    FAILED_PHASE_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    success: bool
    started_at: _timestamp_pb2.Timestamp
    completed_at: _timestamp_pb2.Timestamp
    outputs: _containers.ScalarMap[str, str]
    artifacts: _containers.RepeatedCompositeFieldContainer[_task_pb2.ArtifactReference]
    error: str
    error_type: str
    retriable: bool
    logs: str
    metrics: TaskMetrics
    failed_phase: str
    rolled_back: bool
    def __init__(self, task_id: _Optional[str] = ..., success: bool = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., completed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., outputs: _Optional[_Mapping[str, str]] = ..., artifacts: _Optional[_Iterable[_Union[_task_pb2.ArtifactReference, _Mapping]]] = ..., error: _Optional[str] = ..., error_type: _Optional[str] = ..., retriable: bool = ..., logs: _Optional[str] = ..., metrics: _Optional[_Union[TaskMetrics, _Mapping]] = ..., failed_phase: _Optional[str] = ..., rolled_back: bool = ...) -> None: ...

class TaskMetrics(_message.Message):
    __slots__ = ("pull_duration_ms", "deploy_duration_ms", "health_check_duration_ms")
    PULL_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    DEPLOY_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CHECK_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    pull_duration_ms: int
    deploy_duration_ms: int
    health_check_duration_ms: int
    def __init__(self, pull_duration_ms: _Optional[int] = ..., deploy_duration_ms: _Optional[int] = ..., health_check_duration_ms: _Optional[int] = ...) -> None: ...

class LogChunk(_message.Message):
    __slots__ = ("task_id", "sequence", "stream", "data", "time", "offset", "dropped_bytes")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DROPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    sequence: int
    stream: LogStream
    data: bytes
    time: _timestamp_pb2.Timestamp
    offset: int
    dropped_bytes: int
    def __init__(self, task_id: _Optional[str] = ..., sequence: _Optional[int] = ..., stream: _Optional[_Union[LogStream, str]] = ..., data: _Optional[bytes] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., offset: _Optional[int] = ..., dropped_bytes: _Optional[int] = ...) -> None: ...
