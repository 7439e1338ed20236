"""Credentials sealed to the agent's X25519 key: key file, sealing, opening."""

from __future__ import annotations

import hashlib
import os
import stat
import threading

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from stella.agent.v1 import task_pb2
from stella_agent.credentials import (
    ALGORITHM,
    KEY_FILE,
    AgentKeyPair,
    CredentialsError,
    open_credentials,
    open_task_credentials,
    seal_credentials,
)
from stella_agent.errors import ConfigError, TaskError


def _credentials() -> task_pb2.Credentials:
    return task_pb2.Credentials(
        registries=[
            task_pb2.RegistryAuth(
                registry="registry.example.com:5000",
                username="deployer",
                password="correct-horse-battery",
            )
        ],
        secrets={"DB_PASSWORD": "s3cret-value"},
    )


def _sealed(keypair: AgentKeyPair, agent_id="host-1", task_id="task-1"):
    return seal_credentials(
        keypair.public_key_message(), agent_id, task_id, _credentials()
    )


def test_load_or_create_writes_private_key(tmp_path):
    keypair = AgentKeyPair.load_or_create(tmp_path)

    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert b"PRIVATE KEY" in path.read_bytes()
    assert len(keypair.public_key_bytes) == 32


def test_load_or_create_reuses_existing_key(tmp_path):
    first = AgentKeyPair.load_or_create(tmp_path)

    second = AgentKeyPair.load_or_create(tmp_path)

    assert second.key_id == first.key_id
    assert second.public_key_bytes == first.public_key_bytes


def test_concurrent_first_start_creates_one_key(tmp_path):
    barrier = threading.Barrier(8)
    key_ids: list[str] = []
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            key_ids.append(AgentKeyPair.load_or_create(tmp_path).key_id)
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(key_ids) == 8
    assert len(set(key_ids)) == 1
    assert os.listdir(tmp_path / KEY_FILE.parent) == [KEY_FILE.name]


def test_raw_key_file_is_accepted(tmp_path):
    private_key = X25519PrivateKey.generate()
    path = tmp_path / KEY_FILE
    path.parent.mkdir(mode=0o700)
    path.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)

    keypair = AgentKeyPair.load_or_create(tmp_path)

    assert keypair.public_key_bytes == private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def test_key_file_readable_by_others_is_rejected(tmp_path):
    AgentKeyPair.load_or_create(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o644)

    with pytest.raises(ConfigError, match="chmod 600"):
        AgentKeyPair.load_or_create(tmp_path)


def test_corrupt_key_file_is_rejected(tmp_path):
    path = tmp_path / KEY_FILE
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b"not a key at all")
    path.chmod(0o600)

    with pytest.raises(ConfigError, match="not an X25519 private key"):
        AgentKeyPair.load_or_create(tmp_path)


def test_public_key_message_fields():
    keypair = AgentKeyPair.generate()

    message = keypair.public_key_message()

    assert message.algorithm == ALGORITHM
    assert message.public_key == keypair.public_key_bytes
    assert message.key_id == hashlib.sha256(keypair.public_key_bytes).hexdigest()[:16]


def test_seal_and_open_round_trip():
    keypair = AgentKeyPair.generate()

    sealed = _sealed(keypair)
    opened = open_credentials(keypair, "host-1", "task-1", sealed)

    assert opened == _credentials()
    assert sealed.key_id == keypair.key_id
    assert sealed.algorithm == ALGORITHM
    assert len(sealed.encapsulated_key) == 32


def test_ciphertext_hides_the_secrets():
    sealed = _sealed(AgentKeyPair.generate())

    assert b"correct-horse-battery" not in sealed.SerializeToString()
    assert b"s3cret-value" not in sealed.SerializeToString()


def test_sealing_twice_gives_different_ciphertext():
    keypair = AgentKeyPair.generate()

    first, second = _sealed(keypair), _sealed(keypair)

    assert first.encapsulated_key != second.encapsulated_key
    assert first.ciphertext != second.ciphertext


def test_matches_control_servicer_call():
    # ControlServicer calls credential_sealer(public_key, agent_id, task_id,
    # credentials) with positional arguments.
    keypair = AgentKeyPair.generate()
    sealer = seal_credentials

    sealed = sealer(keypair.public_key_message(), "host-1", "t-9", _credentials())

    assert open_credentials(keypair, "host-1", "t-9", sealed) == _credentials()


@pytest.mark.parametrize(
    ("agent_id", "task_id"),
    [("host-2", "task-1"), ("host-1", "task-2"), ("", "task-1"), ("host-1", "")],
)
def test_open_for_other_agent_or_task_fails(agent_id, task_id):
    keypair = AgentKeyPair.generate()
    sealed = _sealed(keypair)

    with pytest.raises(CredentialsError, match="failed to decrypt"):
        open_credentials(keypair, agent_id, task_id, sealed)


def test_binding_is_length_prefixed():
    keypair = AgentKeyPair.generate()
    sealed = _sealed(keypair, agent_id="a", task_id="bc")

    with pytest.raises(CredentialsError):
        open_credentials(keypair, "ab", "c", sealed)
    assert open_credentials(keypair, "a", "bc", sealed) == _credentials()


def test_open_with_other_key_reports_key_id():
    sealed = _sealed(AgentKeyPair.generate())
    other = AgentKeyPair.generate()

    with pytest.raises(CredentialsError, match="sealed to key") as raised:
        open_credentials(other, "host-1", "task-1", sealed)

    assert other.key_id in raised.value.message


def test_forged_key_id_fails_to_open():
    sealed = _sealed(AgentKeyPair.generate())
    other = AgentKeyPair.generate()
    sealed.key_id = other.key_id

    with pytest.raises(CredentialsError, match="failed to decrypt"):
        open_credentials(other, "host-1", "task-1", sealed)


@pytest.mark.parametrize("field", ["ciphertext", "encapsulated_key"])
@pytest.mark.parametrize("index", [0, 13, -1])
def test_tampered_bytes_fail_to_open(field, index):
    keypair = AgentKeyPair.generate()
    sealed = _sealed(keypair)
    data = bytearray(getattr(sealed, field))
    data[index] ^= 0x01
    setattr(sealed, field, bytes(data))

    with pytest.raises(CredentialsError):
        open_credentials(keypair, "host-1", "task-1", sealed)


def test_changed_key_id_in_associated_data_fails():
    keypair = AgentKeyPair.generate()
    sealed = _sealed(keypair)
    sealed.key_id = "0" * 16

    with pytest.raises(CredentialsError, match="sealed to key"):
        open_credentials(keypair, "host-1", "task-1", sealed)


def test_truncated_ciphertext_fails():
    keypair = AgentKeyPair.generate()
    sealed = _sealed(keypair)
    sealed.ciphertext = sealed.ciphertext[:20]

    with pytest.raises(CredentialsError, match="too short"):
        open_credentials(keypair, "host-1", "task-1", sealed)


def test_short_encapsulated_key_fails():
    keypair = AgentKeyPair.generate()
    sealed = _sealed(keypair)
    sealed.encapsulated_key = sealed.encapsulated_key[:31]

    with pytest.raises(CredentialsError, match="encapsulated key of 31 bytes"):
        open_credentials(keypair, "host-1", "task-1", sealed)


def test_low_order_encapsulated_key_fails():
    keypair = AgentKeyPair.generate()
    sealed = _sealed(keypair)
    sealed.encapsulated_key = bytes(32)

    with pytest.raises(CredentialsError):
        open_credentials(keypair, "host-1", "task-1", sealed)


def test_unknown_algorithm_fails():
    keypair = AgentKeyPair.generate()
    sealed = _sealed(keypair)
    sealed.algorithm = "RSA-OAEP"

    with pytest.raises(CredentialsError, match="RSA-OAEP"):
        open_credentials(keypair, "host-1", "task-1", sealed)


def test_error_is_a_task_error_with_type():
    keypair = AgentKeyPair.generate()

    with pytest.raises(TaskError) as raised:
        open_credentials(keypair, "h", "t", task_pb2.EncryptedCredentials())

    assert raised.value.error_type == "credentials_invalid"
    assert raised.value.retriable is False


def test_seal_rejects_wrong_algorithm():
    message = AgentKeyPair.generate().public_key_message()
    message.algorithm = "X448"

    with pytest.raises(CredentialsError, match="X448"):
        seal_credentials(message, "host-1", "t", _credentials())


def test_seal_rejects_short_public_key():
    message = AgentKeyPair.generate().public_key_message()
    message.public_key = message.public_key[:16]

    with pytest.raises(CredentialsError, match="16 bytes"):
        seal_credentials(message, "host-1", "t", _credentials())


def test_seal_rejects_low_order_public_key():
    message = AgentKeyPair.generate().public_key_message()
    message.public_key = bytes(32)

    with pytest.raises(CredentialsError, match="low-order"):
        seal_credentials(message, "host-1", "t", _credentials())


def test_open_task_credentials_without_credentials():
    task = task_pb2.AgentTask(id="t1")

    assert open_task_credentials(AgentKeyPair.generate(), "host-1", task) == (
        task_pb2.Credentials()
    )


def test_open_task_credentials_uses_task_id():
    keypair = AgentKeyPair.generate()
    task = task_pb2.AgentTask(id="task-1", credentials=_sealed(keypair))

    assert open_task_credentials(keypair, "host-1", task) == _credentials()
    task.id = "task-2"
    with pytest.raises(CredentialsError):
        open_task_credentials(keypair, "host-1", task)
