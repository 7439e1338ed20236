"""Signed tasks: signing, verification, binding, expiry, replay, key files."""

from __future__ import annotations

import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from stella.agent.v1 import gateway_pb2, task_pb2
from stella_agent.errors import ConfigError, InvalidTaskError, TaskExpiredError
from stella_agent.signing import (
    ReplayCacheError,
    ReplayedTaskError,
    SignatureError,
    TaskSigner,
    TaskVerifier,
    generate_signing_key,
    key_id_for,
    load_public_key,
    load_public_keys,
    signed_message,
)

NOW = 1_750_000_000.0
AGENT = "host-1"


class Clock:
    """A settable time.time() replacement."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _task(task_id="task-1", *, agent_id=AGENT, assigned=NOW, lifetime=600.0):
    task = task_pb2.AgentTask(
        id=task_id,
        type=task_pb2.TASK_TYPE_INSPECT,
        agent_id=agent_id,
        inspect=task_pb2.InspectPayload(container_name="web"),
    )
    task.assigned_at.FromNanoseconds(int(assigned * 1e9))
    task.expires_at.FromNanoseconds(int((assigned + lifetime) * 1e9))
    return task


def _sign_raw(key: Ed25519PrivateKey, key_id: str, task: task_pb2.AgentTask):
    """Sign without TaskSigner's field checks, for tasks it would reject."""
    data = task.SerializeToString(deterministic=True)
    return gateway_pb2.SignedTask(
        task=data, key_id=key_id, signature=key.sign(signed_message(key_id, data))
    )


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(key, clock) -> TaskVerifier:
    return TaskVerifier({"orch-1": key.public_key()}, AGENT, clock=clock)


def test_signature_covers_documented_bytes(key):
    task = _task()

    signed = TaskSigner(key, "orch-1").sign(task)

    expected = b"stella.agent.v1.SignedTask\x00orch-1\x00" + task.SerializeToString(
        deterministic=True
    )
    key.public_key().verify(signed.signature, expected)
    assert signed.key_id == "orch-1"
    assert signed.task == task.SerializeToString(deterministic=True)


def test_signer_derives_key_id(key):
    signer = TaskSigner(key)

    assert signer.key_id == key_id_for(key.public_key())
    assert len(signer.key_id) == 16


def test_verify_returns_task(key, verifier):
    task = _task()

    verified = verifier.verify(TaskSigner(key, "orch-1").sign(task))

    assert verified == task


@pytest.mark.parametrize("missing", ["id", "agent_id", "assigned_at", "expires_at"])
def test_signer_requires_binding_fields(key, missing):
    task = _task()
    task.ClearField(missing)

    with pytest.raises(InvalidTaskError, match=missing):
        TaskSigner(key, "orch-1").sign(task)


def test_unsigned_task_rejected_when_required(verifier):
    with pytest.raises(SignatureError, match="not signed") as raised:
        verifier.check_unsigned(_task())

    assert raised.value.error_type == "signature_invalid"
    assert raised.value.task_id == "task-1"


def test_unsigned_task_passes_when_optional(key, clock):
    verifier = TaskVerifier(
        {"orch-1": key.public_key()}, AGENT, require_signatures=False, clock=clock
    )
    task = _task()

    assert verifier.check_unsigned(task) is task


def test_unknown_key_id_is_rejected(key, verifier):
    signed = TaskSigner(key, "orch-9").sign(_task())

    with pytest.raises(SignatureError, match="orch-9") as raised:
        verifier.verify(signed)

    assert "trusted keys: orch-1" in raised.value.message
    assert raised.value.task_id == "task-1"


def test_tampered_task_bytes_are_rejected(key, verifier):
    signed = TaskSigner(key, "orch-1").sign(_task())
    changed = task_pb2.AgentTask.FromString(signed.task)
    changed.inspect.container_name = "db"
    signed.task = changed.SerializeToString(deterministic=True)

    with pytest.raises(SignatureError, match="does not match"):
        verifier.verify(signed)


@pytest.mark.parametrize("signature", [b"", b"\x00" * 64, b"\x01" * 63])
def test_bad_signature_is_rejected(key, verifier, signature):
    signed = TaskSigner(key, "orch-1").sign(_task())
    signed.signature = signature

    with pytest.raises(SignatureError, match="does not match"):
        verifier.verify(signed)


def test_untrusted_key_using_trusted_id_is_rejected(verifier):
    impostor = Ed25519PrivateKey.generate()
    signed = TaskSigner(impostor, "orch-1").sign(_task())

    with pytest.raises(SignatureError, match="does not match"):
        verifier.verify(signed)


def test_key_id_is_bound_into_signature(key, clock):
    # The same key trusted under two ids: the signature still names one.
    verifier = TaskVerifier(
        {"old": key.public_key(), "new": key.public_key()}, AGENT, clock=clock
    )
    signed = TaskSigner(key, "old").sign(_task())
    signed.key_id = "new"

    with pytest.raises(SignatureError, match="does not match"):
        verifier.verify(signed)


def test_rotation_accepts_old_and_new_key(clock):
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    verifier = TaskVerifier(
        {"old": old.public_key(), "new": new.public_key()}, AGENT, clock=clock
    )

    first = verifier.verify(TaskSigner(old, "old").sign(_task("task-1")))
    second = verifier.verify(TaskSigner(new, "new").sign(_task("task-2")))

    assert first.id == "task-1"
    assert second.id == "task-2"


def test_wrong_agent_is_rejected(key, verifier):
    signed = TaskSigner(key, "orch-1").sign(_task(agent_id="host-2"))

    with pytest.raises(SignatureError, match="for agent 'host-2'"):
        verifier.verify(signed)


@pytest.mark.parametrize("missing", ["assigned_at", "expires_at"])
def test_missing_time_is_rejected(key, verifier, missing):
    task = _task()
    task.ClearField(missing)

    with pytest.raises(SignatureError, match=f"lacks {missing}"):
        verifier.verify(_sign_raw(key, "orch-1", task))


def test_missing_id_is_rejected(key, verifier):
    task = _task()
    task.ClearField("id")

    with pytest.raises(SignatureError, match="no id"):
        verifier.verify(_sign_raw(key, "orch-1", task))


def test_garbage_task_bytes_are_rejected(key, verifier):
    data = b"\xff\xff\xff"
    signed = gateway_pb2.SignedTask(
        task=data, key_id="orch-1", signature=key.sign(signed_message("orch-1", data))
    )

    with pytest.raises(SignatureError, match="not an AgentTask"):
        verifier.verify(signed)


def test_expired_task_is_rejected(key, verifier, clock):
    signed = TaskSigner(key, "orch-1").sign(_task(lifetime=600))
    clock.now = NOW + 600 + verifier.max_clock_skew

    with pytest.raises(TaskExpiredError) as raised:
        verifier.verify(signed)

    assert raised.value.error_type == "expired"
    assert raised.value.task_id == "task-1"


def test_expiry_allows_clock_skew(key, verifier, clock):
    signed = TaskSigner(key, "orch-1").sign(_task(lifetime=600))
    clock.now = NOW + 600 + verifier.max_clock_skew - 1

    assert verifier.verify(signed).id == "task-1"


def test_task_from_the_future_is_rejected(key, verifier):
    task = _task(assigned=NOW + verifier.max_clock_skew + 5)

    with pytest.raises(SignatureError, match="in the future"):
        verifier.verify(TaskSigner(key, "orch-1").sign(task))


def test_small_future_issue_time_is_accepted(key, verifier):
    task = _task(assigned=NOW + verifier.max_clock_skew - 5)

    assert verifier.verify(TaskSigner(key, "orch-1").sign(task)) == task


def test_expiry_before_issue_is_rejected(key, verifier):
    task = _task(lifetime=-1)

    with pytest.raises(SignatureError, match="not after it was issued"):
        verifier.verify(TaskSigner(key, "orch-1").sign(task))


def test_expiry_beyond_replay_window_is_rejected(key, clock):
    verifier = TaskVerifier(
        {"orch-1": key.public_key()}, AGENT, replay_window=3600, clock=clock
    )
    task = _task(lifetime=3600 + verifier.max_clock_skew + 1)

    with pytest.raises(SignatureError, match="replay window"):
        verifier.verify(TaskSigner(key, "orch-1").sign(task))


def test_replayed_task_is_rejected(key, verifier):
    signed = TaskSigner(key, "orch-1").sign(_task())
    verifier.verify(signed)

    with pytest.raises(ReplayedTaskError) as raised:
        verifier.verify(signed)

    assert raised.value.error_type == "replayed"
    assert raised.value.task.id == "task-1"
    assert raised.value.task_id == "task-1"


def test_resigned_task_with_same_id_is_replay(key, verifier, clock):
    verifier.verify(TaskSigner(key, "orch-1").sign(_task()))
    clock.now += 10
    again = _task(assigned=clock.now)

    with pytest.raises(ReplayedTaskError):
        verifier.verify(TaskSigner(key, "orch-1").sign(again))


def test_replay_after_expiry_is_rejected_as_expired(key, verifier, clock):
    signed = TaskSigner(key, "orch-1").sign(_task(lifetime=60))
    verifier.verify(signed)
    clock.now = NOW + 3600

    with pytest.raises(TaskExpiredError):
        verifier.verify(signed)


def test_replay_cache_survives_restart(key, clock, tmp_path):
    path = tmp_path / "signed-tasks.seen"
    signed = TaskSigner(key, "orch-1").sign(_task())
    first = TaskVerifier(
        {"orch-1": key.public_key()}, AGENT, replay_file=path, clock=clock
    )
    first.verify(signed)

    second = TaskVerifier(
        {"orch-1": key.public_key()}, AGENT, replay_file=path, clock=clock
    )

    with pytest.raises(ReplayedTaskError):
        second.verify(signed)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_replay_file_drops_expired_ids(key, clock, tmp_path):
    path = tmp_path / "signed-tasks.seen"
    verifier = TaskVerifier(
        {"orch-1": key.public_key()}, AGENT, replay_file=path, clock=clock
    )
    signer = TaskSigner(key, "orch-1")
    for index in range(100):
        verifier.verify(signer.sign(_task(f"old-{index}", lifetime=60)))

    clock.now = NOW + 3600
    verifier.verify(signer.sign(_task("new-1", assigned=clock.now)))

    lines = path.read_text().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(" new-1")


def test_unwritable_replay_file_rejects_task(key, clock, tmp_path):
    path = tmp_path / "missing-dir" / "signed-tasks.seen"
    verifier = TaskVerifier(
        {"orch-1": key.public_key()}, AGENT, replay_file=path, clock=clock
    )

    with pytest.raises(ReplayCacheError) as raised:
        verifier.verify(TaskSigner(key, "orch-1").sign(_task()))

    assert raised.value.error_type == "replay_cache_failed"
    assert raised.value.retriable is True


def test_invalid_key_id_is_rejected(key):
    with pytest.raises(ConfigError, match="key id"):
        TaskSigner(key, "bad id with spaces")
    with pytest.raises(ConfigError, match="key id"):
        TaskVerifier({"a\x00b": key.public_key()}, AGENT)


# Key files --------------------------------------------------------------------


def test_generate_signing_key_writes_pair(tmp_path):
    files = generate_signing_key(tmp_path / "orchestrator-signing.key")

    assert stat.S_IMODE(files.private_key.stat().st_mode) == 0o600
    assert files.public_key.name == "orchestrator-signing.key.pub"
    assert files.key_id == key_id_for(load_public_key(files.public_key))


def test_generate_signing_key_keeps_existing(tmp_path):
    path = tmp_path / "signing.key"
    generate_signing_key(path)

    with pytest.raises(ConfigError, match="already exists"):
        generate_signing_key(path)


def test_key_files_round_trip(tmp_path, clock):
    files = generate_signing_key(tmp_path / "signing.key")
    signer = TaskSigner.from_file(files.private_key)
    keys = load_public_keys([str(files.public_key)])
    verifier = TaskVerifier(keys, AGENT, clock=clock)

    task = verifier.verify(signer.sign(_task()))

    assert list(keys) == [files.key_id]
    assert signer.key_id == files.key_id
    assert task.id == "task-1"


def test_load_public_keys_with_explicit_ids(tmp_path):
    old = generate_signing_key(tmp_path / "old.key")
    new = generate_signing_key(tmp_path / "new.key")

    keys = load_public_keys([f"old={old.public_key}", f"new={new.private_key}"])

    assert sorted(keys) == ["new", "old"]


def test_load_public_keys_rejects_duplicate_id(tmp_path):
    files = generate_signing_key(tmp_path / "signing.key")

    with pytest.raises(ConfigError, match="configured twice"):
        load_public_keys([str(files.public_key), str(files.private_key)])


def test_load_public_key_rejects_other_key_types(tmp_path):
    path = tmp_path / "x25519.pem"
    path.write_bytes(
        X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    with pytest.raises(ConfigError, match="not an Ed25519 public key"):
        load_public_key(path)


def test_load_public_key_rejects_garbage(tmp_path):
    path = tmp_path / "garbage.pem"
    path.write_text("not a key")

    with pytest.raises(ConfigError, match="not an unencrypted PEM"):
        load_public_key(path)


def test_load_public_key_reports_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read signing key"):
        load_public_key(tmp_path / "none.pem")
