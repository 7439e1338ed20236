"""Hostile input: malformed protobuf, huge fields, unknown enums, bad UTF-8.

Every parsing path that takes bytes or values from the network or a task file
must end in one of the documented exceptions (TaskError, ConfigError or
protobuf's DecodeError) and never in anything else. The example counts are
kept small so the file runs in seconds; raise them locally to search longer.
"""

from __future__ import annotations

import contextlib
import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stella.agent.v1 import gateway_pb2, result_pb2, task_pb2
from stella_agent.audit import AuditLog, verify_audit_log
from stella_agent.credentials import AgentKeyPair, open_credentials, seal_credentials
from stella_agent.errors import ConfigError, TaskError
from stella_agent.masking import SecretMasker
from stella_agent.orchestrator.gateway import AgentGatewayServicer
from stella_agent.orchestrator.state import AgentConnection, OrchestratorState
from stella_agent.signing import TaskSigner, TaskVerifier, signed_message
from stella_agent.tasks import (
    task_from_dict,
    validate_container_name,
    validate_digest,
    validate_repository,
    validate_task,
)

DOCUMENTED = (TaskError, ConfigError, DecodeError)
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
MAX_MESSAGE_CHARS = 2000
"""Error messages quote at most a slice of a bad value, so they stay short."""

# Text with every code point, lone surrogates included.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=200)
enum_values = st.one_of(
    st.integers(min_value=0, max_value=10),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
)


@contextlib.contextmanager
def only_documented_errors():
    """Let documented exceptions pass and fail the test on any other."""
    try:
        yield
    except DOCUMENTED as exc:
        assert len(str(exc)) < MAX_MESSAGE_CHARS, str(exc)[:200]


def _valid_task_bytes() -> bytes:
    task = task_pb2.AgentTask(
        id="task-1",
        type=task_pb2.TASK_TYPE_DEPLOY,
        target_id="web",
        agent_id="host-1",
        actor="alice",
    )
    task.deploy.image = "registry.example.com/shop/web"
    task.deploy.digest = "sha256:" + "a" * 64
    task.deploy.config.container_name = "web"
    task.deploy.config.environment["KEY"] = "value"
    task.deploy.config.ports.append("8080:80")
    task.deploy.hooks.pre_deploy.command.extend(["sh", "-c", "true"])
    return task.SerializeToString()


VALID_TASK_BYTES = _valid_task_bytes()


@st.composite
def mutated_bytes(draw, original: bytes = VALID_TASK_BYTES) -> bytes:
    """Return `original` with random bytes flipped, cut, inserted or dropped."""
    data = bytearray(original)
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        operation = draw(st.sampled_from(["flip", "cut", "insert", "drop"]))
        position = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
        if operation == "flip" and data:
            data[position] ^= draw(st.integers(min_value=1, max_value=255))
        elif operation == "cut":
            del data[position:]
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif operation == "drop" and data:
            del data[position]
    return bytes(data)


task_bytes = st.one_of(st.binary(max_size=2000), mutated_bytes())


# AgentTask parsing and validation --------------------------------------------


@FUZZ
@given(data=task_bytes)
def test_task_bytes_parse_or_decode_error(data):
    with only_documented_errors():
        validate_task(task_pb2.AgentTask.FromString(data))


@FUZZ
@given(
    task_id=st.text(max_size=200),
    task_type=enum_values,
    executor=enum_values,
    payload=st.sampled_from(
        [None, "deploy", "rollback", "inspect", "health_check", "read_sticker"]
    ),
    priority=st.integers(min_value=-(2**31), max_value=2**31 - 1),
)
def test_task_fields_validate_or_invalid(
    task_id, task_type, executor, payload, priority
):
    task = task_pb2.AgentTask(
        id=task_id, type=task_type, executor=executor, priority=priority
    )
    with only_documented_errors():
        if payload is not None:
            getattr(task, payload).SetInParent()
        validate_task(task)


def test_invalid_utf8_in_string_field_is_decode_error():
    # Field 1 (id), wire type 2, two bytes that are not UTF-8.
    with pytest.raises(DecodeError):
        task_pb2.AgentTask.FromString(b"\x0a\x02\xff\xfe")


def test_deeply_nested_unknown_groups_are_decode_error():
    # 100000 start-group tags of unknown field 100 exceed the parser's depth.
    with pytest.raises(DecodeError):
        task_pb2.AgentTask.FromString(b"\xa3\x06" * 100_000)


def test_unknown_enum_values_survive_and_are_rejected():
    task = task_pb2.AgentTask(id="t1", type=999, executor=77)
    task.inspect.SetInParent()

    parsed = task_pb2.AgentTask.FromString(task.SerializeToString())

    assert parsed.type == 999
    with pytest.raises(TaskError, match="unknown task type 999"):
        validate_task(parsed)


@pytest.mark.parametrize("size", [10_000, 1_000_000])
def test_huge_fields_give_short_errors(size):
    task = task_pb2.AgentTask(id="x" * size, type=task_pb2.TASK_TYPE_INSPECT)
    task.inspect.container_name = "y" * size

    parsed = task_pb2.AgentTask.FromString(task.SerializeToString())

    with pytest.raises(TaskError) as raised:
        validate_task(parsed)
    assert len(raised.value.message) < MAX_MESSAGE_CHARS
    with pytest.raises(TaskError) as raised:
        validate_container_name(parsed.inspect.container_name)
    assert len(raised.value.message) < MAX_MESSAGE_CHARS


# Text without lone surrogates: a lone surrogate used as a field or enum name
# is a known failure, tested separately below.
json_text = st.text(max_size=200)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | json_text,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(json_text, children, max_size=5)
    ),
    max_leaves=20,
)
task_keys = st.sampled_from(
    [
        "id",
        "type",
        "executor",
        "target_id",
        "priority",
        "timeout",
        "assigned_at",
        "expiresAt",
        "deploy",
        "rollback",
        "health_check",
        "credentials",
        "agent_id",
        "unknown_field",
    ]
)


@FUZZ
@given(data=st.dictionaries(st.one_of(task_keys, json_text), json_values, max_size=8))
def test_task_from_dict_builds_or_config_error(data):
    with only_documented_errors():
        validate_task(task_from_dict(data))


@FUZZ
@given(
    data=st.fixed_dictionaries(
        {
            "id": any_text,
            "type": st.one_of(
                st.sampled_from(["deploy", "inspect", "TASK_TYPE_ROLLBACK"]),
                enum_values,
                json_text,
            ),
            "deploy": st.dictionaries(
                st.sampled_from(["image", "digest", "config", "hooks", "artifacts"]),
                json_values,
                max_size=5,
            ),
        }
    )
)
def test_deploy_dict_builds_or_config_error(data):
    with only_documented_errors():
        validate_task(task_from_dict(data))


@pytest.mark.parametrize("data", [{"\ud800": None}, {"type": "\ud800"}])
def test_task_from_dict_surrogate_name_is_config_error(data):
    # A JSON task file can contain "\ud800", which json.loads turns into a
    # lone surrogate.
    with pytest.raises(ConfigError):
        task_from_dict(data)


@FUZZ
@given(value=any_text)
def test_value_validators_accept_or_invalid(value):
    for validator in (validate_digest, validate_container_name, validate_repository):
        with only_documented_errors():
            assert validator(value) == value


# Orchestrator gateway ---------------------------------------------------------


def _connection() -> AgentConnection:
    return AgentConnection(
        agent_id="host-1",
        session_id="session-1",
        hello=gateway_pb2.Hello(agent_id="host-1"),
        peer="ipv4:127.0.0.1:1",
    )


@st.composite
def connect_requests(draw) -> gateway_pb2.ConnectRequest:
    """Return a ConnectRequest with one body of random content."""
    task_id = draw(st.one_of(st.just("task-1"), st.text(max_size=50)))
    kind = draw(
        st.sampled_from(
            [
                "hello",
                "heartbeat",
                "task_accepted",
                "task_rejected",
                "log_chunk",
                "task_result",
                "audit_record",
                None,
            ]
        )
    )
    request = gateway_pb2.ConnectRequest()
    if kind == "hello":
        request.hello.agent_id = draw(st.text(max_size=50))
        request.hello.running_task_ids.extend(draw(st.lists(st.text(max_size=20))))
    elif kind == "heartbeat":
        request.heartbeat.running_tasks = draw(
            st.integers(min_value=-(2**31), max_value=2**31 - 1)
        )
    elif kind == "task_accepted":
        request.task_accepted.task_id = task_id
        request.task_accepted.duplicate = draw(st.booleans())
    elif kind == "task_rejected":
        request.task_rejected.task_id = task_id
        request.task_rejected.error = draw(st.text(max_size=200))
    elif kind == "log_chunk":
        request.log_chunk.task_id = task_id
        request.log_chunk.sequence = draw(st.integers(min_value=0, max_value=2**64 - 1))
        request.log_chunk.stream = draw(enum_values)
        request.log_chunk.data = draw(st.binary(max_size=500))
    elif kind == "task_result":
        request.task_result.task_id = task_id
        request.task_result.success = draw(st.booleans())
        request.task_result.error_type = draw(st.text(max_size=50))
    elif kind == "audit_record":
        request.audit_record.json = draw(st.text(max_size=200))
    return request


@FUZZ
@given(messages=st.lists(connect_requests(), min_size=1, max_size=10))
def test_gateway_handles_any_request(messages):
    state = OrchestratorState()
    servicer = AgentGatewayServicer(state)
    connection = _connection()

    for message in messages:
        servicer.handle(connection, message)

    for record in state.tasks.values():
        assert record.agent_id == "host-1"


@FUZZ
@given(data=st.one_of(st.binary(max_size=2000), mutated_bytes(_valid_task_bytes())))
def test_gateway_handles_request_bytes(data):
    servicer = AgentGatewayServicer(OrchestratorState())

    with only_documented_errors():
        servicer.handle(_connection(), gateway_pb2.ConnectRequest.FromString(data))


def test_gateway_ignores_results_for_other_agents_tasks():
    state = OrchestratorState()
    servicer = AgentGatewayServicer(state)
    record = state.record_for("task-1", "host-2")
    result = result_pb2.TaskResult(task_id="task-1", success=True)

    servicer.handle(_connection(), gateway_pb2.ConnectRequest(task_result=result))

    assert record.result is None
    assert record.agent_id == "host-2"


# Signed tasks and sealed credentials ------------------------------------------

SIGNING_KEY = Ed25519PrivateKey.generate()
AGENT_KEYS = AgentKeyPair.generate()


def _verifier() -> TaskVerifier:
    return TaskVerifier({"orch-1": SIGNING_KEY.public_key()}, "host-1")


@FUZZ
@given(
    task=task_bytes,
    key_id=st.one_of(st.just("orch-1"), st.text(max_size=80)),
    signature=st.binary(max_size=128),
)
def test_verifier_rejects_forged_signed_tasks(task, key_id, signature):
    signed = gateway_pb2.SignedTask(task=task, key_id=key_id, signature=signature)

    with pytest.raises(TaskError):
        _verifier().verify(signed)


@FUZZ
@given(task=task_bytes)
def test_verifier_handles_validly_signed_garbage(task):
    signed = gateway_pb2.SignedTask(
        task=task,
        key_id="orch-1",
        signature=SIGNING_KEY.sign(signed_message("orch-1", task)),
    )

    with only_documented_errors():
        verified = _verifier().verify(signed)
        # Whatever passes verification names this agent and a time window.
        assert verified.agent_id == "host-1"
        assert verified.HasField("expires_at")


@FUZZ
@given(
    agent_id=st.text(max_size=50),
    lifetime=st.floats(min_value=-1e6, max_value=1e7, allow_nan=False),
    skew=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
)
def test_verifier_time_window_never_crashes(agent_id, lifetime, skew):
    now = time.time()
    task = task_pb2.AgentTask(id="task-1", agent_id=agent_id)
    task.assigned_at.FromNanoseconds(int((now + skew) * 1e9))
    task.expires_at.FromNanoseconds(int((now + skew + lifetime) * 1e9))

    with only_documented_errors():
        _verifier().verify(TaskSigner(SIGNING_KEY, "orch-1").sign(task))


@FUZZ
@given(
    key_id=st.one_of(st.just(AGENT_KEYS.key_id), st.text(max_size=40)),
    algorithm=st.one_of(st.just("X25519-HKDF-SHA256-AES256GCM"), st.text(max_size=40)),
    encapsulated_key=st.binary(max_size=64),
    ciphertext=st.binary(max_size=300),
)
def test_opener_rejects_forged_credentials(
    key_id, algorithm, encapsulated_key, ciphertext
):
    sealed = task_pb2.EncryptedCredentials(
        key_id=key_id,
        algorithm=algorithm,
        encapsulated_key=encapsulated_key,
        ciphertext=ciphertext,
    )

    with pytest.raises(TaskError):
        open_credentials(AGENT_KEYS, "host-1", "task-1", sealed)


SEALED_BYTES = seal_credentials(
    AGENT_KEYS.public_key_message(),
    "host-1",
    "task-1",
    task_pb2.Credentials(secrets={"TOKEN": "token-value-1"}),
).SerializeToString()


@FUZZ
@given(data=mutated_bytes(SEALED_BYTES))
def test_opener_rejects_mutated_credentials(data):
    with only_documented_errors():
        sealed = task_pb2.EncryptedCredentials.FromString(data)
        if sealed.SerializeToString() == SEALED_BYTES:
            return
        with pytest.raises(TaskError):
            open_credentials(AGENT_KEYS, "host-1", "task-1", sealed)


# Masking and audit with arbitrary text ----------------------------------------


@FUZZ
@given(secrets=st.lists(any_text, max_size=4), text=any_text)
def test_masker_accepts_any_text(secrets, text):
    masker = SecretMasker(secrets)

    masked = masker.mask_text(text)

    assert isinstance(masked, str)
    stream = masker.stream()
    data = text.encode("utf-8", "surrogatepass")
    assert stream.write(data) + stream.flush() == masker.mask_bytes(data)


@FUZZ
@given(
    details=st.dictionaries(
        st.text(max_size=20).filter(
            lambda key: (
                key.isidentifier()
                and key not in ("self", "action", "task_id", "actor", "outcome")
            )
        ),
        json_values,
        max_size=5,
    ),
    actor=any_text,
)
def test_audit_accepts_any_details(tmp_path_factory, details, actor):
    path = tmp_path_factory.mktemp("audit") / "audit.log"

    with AuditLog(path, "host-1") as log:
        line = log.record("task.started", actor=actor, **details)

    assert json.loads(line)["seq"] == 1
    assert verify_audit_log(path) == []
