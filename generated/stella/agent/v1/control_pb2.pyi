import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from stella.agent.v1 import gateway_pb2 as _gateway_pb2
from stella.agent.v1 import result_pb2 as _result_pb2
from stella.agent.v1 import task_pb2 as _task_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitTaskRequest(_message.Message):
    __slots__ = ("agent_id", "task", "artifacts", "credentials")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    task: _task_pb2.AgentTask
    artifacts: _containers.RepeatedCompositeFieldContainer[ArtifactContent]
    credentials: _task_pb2.Credentials
    def __init__(self, agent_id: _Optional[str] = ..., task: _Optional[_Union[_task_pb2.AgentTask, _Mapping]] = ..., artifacts: _Optional[_Iterable[_Union[ArtifactContent, _Mapping]]] = ..., credentials: _Optional[_Union[_task_pb2.Credentials, _Mapping]] = ...) -> None: ...

class ArtifactContent(_message.Message):
    __slots__ = ("name", "content")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    content: bytes
    def __init__(self, name: _Optional[str] = ..., content: _Optional[bytes] = ...) -> None: ...

class SubmitTaskResponse(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class WatchTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class WatchTaskResponse(_message.Message):
    __slots__ = ("accepted", "rejected", "log_chunk", "result")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    LOG_CHUNK_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    accepted: _gateway_pb2.TaskAccepted
    rejected: _gateway_pb2.TaskRejected
    log_chunk: _result_pb2.LogChunk
    result: _result_pb2.TaskResult
    def __init__(self, accepted: _Optional[_Union[_gateway_pb2.TaskAccepted, _Mapping]] = ..., rejected: _Optional[_Union[_gateway_pb2.TaskRejected, _Mapping]] = ..., log_chunk: _Optional[_Union[_result_pb2.LogChunk, _Mapping]] = ..., result: _Optional[_Union[_result_pb2.TaskResult, _Mapping]] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentInfo]
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentInfo, _Mapping]]] = ...) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("agent_id", "version", "capabilities", "hostname", "connected_at", "last_heartbeat_at", "peer", "running_task_ids", "public_key")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AT_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    RUNNING_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    version: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    hostname: str
    connected_at: _timestamp_pb2.Timestamp
    last_heartbeat_at: _timestamp_pb2.Timestamp
    peer: str
    running_task_ids: _containers.RepeatedScalarFieldContainer[str]
    public_key: _gateway_pb2.AgentPublicKey
    def __init__(self, agent_id: _Optional[str] = ..., version: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., hostname: _Optional[str] = ..., connected_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_heartbeat_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., peer: _Optional[str] = ..., running_task_ids: _Optional[_Iterable[str]] = ..., public_key: _Optional[_Union[_gateway_pb2.AgentPublicKey, _Mapping]] = ...) -> None: ...

class CancelTaskRequest(_message.Message):
    __slots__ = ("task_id", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    reason: str
    def __init__(self, task_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelTaskResponse(_message.Message):
    __slots__ = ("sent",)
    SENT_FIELD_NUMBER: _ClassVar[int]
    sent: bool
    def __init__(self, sent: bool = ...) -> None: ...
