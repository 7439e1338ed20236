"""Secret masking: encoded forms, overlaps, streams, length rules, log records."""

from __future__ import annotations

import base64
import io
import json
import logging
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stella.agent.v1 import result_pb2, task_pb2
from stella_agent.errors import InvalidTaskError
from stella_agent.logstream import STDOUT, TaskLog
from stella_agent.masking import (
    MASK,
    MIN_SECRET_LENGTH,
    MaskingLogFilter,
    SecretMasker,
    SecretRegistry,
    check_secret_lengths,
    mask_result,
    secrets_of,
)

SECRET = 'p@ss/w+rd "q" é~'
"""A secret whose encoded forms all differ from it."""


def _masked(text: str | bytes, *secrets: str) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return SecretMasker(secrets or (SECRET,)).mask_bytes(data)


def test_plain_secret_is_masked():
    assert _masked(f"login with {SECRET} now") == b"login with **** now"


@pytest.mark.parametrize(
    "form",
    [
        base64.b64encode(SECRET.encode()).decode(),
        base64.b64encode(SECRET.encode()).decode().rstrip("="),
        base64.urlsafe_b64encode(SECRET.encode()).decode(),
        base64.urlsafe_b64encode(SECRET.encode()).decode().rstrip("="),
        quote(SECRET, safe=""),
        quote(SECRET),
        quote_plus(SECRET),
        json.dumps(SECRET)[1:-1],
        json.dumps(SECRET, ensure_ascii=False)[1:-1],
        json.dumps(json.dumps(SECRET)[1:-1])[1:-1],
    ],
)
def test_encoded_form_is_masked(form):
    masked = _masked(f"value=[{form}]")

    assert masked == b"value=[****]"


@pytest.mark.parametrize("prefix", [b"", b"a", b"ab", b"abc", b"abcd"])
@pytest.mark.parametrize("suffix", [b"", b"z", b"yz"])
def test_base64_inside_longer_text_is_masked(prefix, suffix):
    secret = SECRET.encode()
    encoded = base64.b64encode(prefix + secret + suffix)

    masked = _masked(encoded)

    # Every character whose 6 bits all come from the secret is masked. At most
    # one character on each side mixes secret bits with its neighbours and may
    # stay, unless the secret ends the text and its whole encoding is masked.
    first = -(-8 * len(prefix) // 6)
    end = 8 * (len(prefix) + len(secret)) // 6
    kept_tail = masked[first + len(MASK) :]
    assert masked[:first] == encoded[:first]
    assert masked[first : first + len(MASK)] == MASK
    assert encoded.endswith(kept_tail)
    assert len(kept_tail) <= len(encoded) - end


def test_docker_config_auth_is_masked():
    credentials = task_pb2.Credentials(
        registries=[
            task_pb2.RegistryAuth(
                registry="r.example:5000",
                username="deployer",
                password="hunter2hunter2",
            )
        ]
    )
    masker = SecretMasker(secrets_of(task_pb2.AgentTask(), credentials).values())
    auth = base64.b64encode(b"deployer:hunter2hunter2").decode()
    config = json.dumps({"auths": {"r.example:5000": {"auth": auth}}})

    masked = masker.mask_text(config)

    assert auth not in masked
    assert "hunter2hunter2" not in masked
    assert '"auth": "****"' in masked


def test_registry_auth_header_is_masked():
    header = base64.urlsafe_b64encode(
        json.dumps({"username": "deployer", "password": SECRET}).encode()
    )

    masked = _masked(header)

    assert MASK in masked
    assert base64.urlsafe_b64encode(SECRET.encode()).rstrip(b"=") not in masked


def test_overlapping_secrets_mask_their_union():
    masked = _masked("x abcdefghijklmn y", "abcdefgh", "ghijklmn")

    assert masked == b"x **** y"


def test_longest_form_wins_at_same_position():
    masked = _masked("token=abcdef-long-part", "abcdef", "abcdef-long-part")

    assert masked == b"token=****"


def test_repeated_occurrences_are_all_masked():
    assert _masked(f"{SECRET}{SECRET} and {SECRET}") == b"**** and ****"


def test_masker_without_secrets_passes_data():
    masker = SecretMasker(["", ""])

    assert not masker
    assert masker.mask_bytes(b"anything") == b"anything"
    assert masker.mask_text("anything") == "anything"


def test_mask_text_keeps_unicode_around():
    masker = SecretMasker(["pässwörd-ü"])

    assert masker.mask_text("ä pässwörd-ü ö") == "ä **** ö"


def test_masker_is_a_task_log_masker():
    chunks = []
    log = TaskLog("t1", chunks.append, masker=SecretMasker([SECRET]))

    log.write(STDOUT, f"password={SECRET}\n".encode())

    assert chunks[0].data == b"password=****\n"


def test_mask_result_masks_text_fields():
    result = result_pb2.TaskResult(
        task_id="t1",
        error=f"login failed with {SECRET}",
        logs=f"tail {SECRET}",
        outputs={"token": SECRET, SECRET: "as key", "container_id": "abc"},
    )

    mask_result(result, SecretMasker([SECRET]))

    assert result.error == "login failed with ****"
    assert result.logs == "tail ****"
    assert dict(result.outputs) == {
        "token": "****",
        "****": "as key",
        "container_id": "abc",
    }
    assert result.task_id == "t1"


# StreamMasker ----------------------------------------------------------------


def _stream_all(masker: SecretMasker, pieces: list[bytes]) -> bytes:
    stream = masker.stream()
    output = b"".join(stream.write(piece) for piece in pieces)
    return output + stream.flush()


def test_stream_masks_secret_split_at_every_byte():
    masker = SecretMasker([SECRET])
    data = f"before {SECRET} after".encode()

    for split in range(len(data) + 1):
        output = _stream_all(masker, [data[:split], data[split:]])

        assert output == b"before **** after", split


def test_stream_masks_secret_written_byte_by_byte():
    masker = SecretMasker([SECRET])
    data = f"a {SECRET} b {base64.b64encode(SECRET.encode()).decode()} c".encode()

    output = _stream_all(masker, [data[i : i + 1] for i in range(len(data))])

    assert output == b"a **** b **** c"


def test_stream_holds_back_less_than_longest_form():
    masker = SecretMasker([SECRET])
    stream = masker.stream()

    emitted = stream.write(b"x" * 500)

    assert stream.pending_bytes == masker.max_form_length - 1
    assert emitted == b"x" * (500 - stream.pending_bytes)


def test_stream_releases_complete_lines_at_once():
    stream = SecretMasker([SECRET]).stream()

    emitted = stream.write(f"line with {SECRET}\n".encode())

    assert emitted == b"line with ****\n"
    assert stream.pending_bytes == 0


def test_stream_flush_masks_held_bytes():
    stream = SecretMasker([SECRET]).stream()

    emitted = stream.write(f"tail {SECRET}".encode())
    rest = stream.flush()

    assert emitted + rest == b"tail ****"
    assert stream.pending_bytes == 0


def test_stream_masks_multiline_secret():
    masker = SecretMasker(["first-line\nsecond-line"])
    stream = masker.stream()

    output = stream.write(b"key: first-line\n")
    output += stream.write(b"second-line end\n")
    output += stream.flush()

    assert output == b"key: **** end\n"


def test_stream_without_secrets_passes_data():
    stream = SecretMasker([]).stream()

    assert stream.write(b"abc") == b"abc"
    assert stream.flush() == b""


@settings(max_examples=200, deadline=None)
@given(
    secrets=st.lists(
        st.text(min_size=MIN_SECRET_LENGTH, max_size=20), min_size=1, max_size=3
    ),
    filler=st.lists(st.text(max_size=30), min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_stream_equals_one_shot_masking(secrets, filler, cuts):
    masker = SecretMasker(secrets)
    parts = []
    for index, text in enumerate(filler):
        parts.append(text)
        parts.append(secrets[index % len(secrets)])
    data = "".join(parts).encode("utf-8", "surrogatepass")
    bounds = sorted({0, len(data), *(cut for cut in cuts if cut < len(data))})
    pieces = [data[start:end] for start, end in zip(bounds, bounds[1:], strict=False)]

    output = _stream_all(masker, pieces)

    assert output == masker.mask_bytes(data)
    for secret in secrets:
        assert secret.encode("utf-8", "surrogatepass") not in output


# Secret lengths and collection ------------------------------------------------


def test_short_secret_is_rejected():
    with pytest.raises(InvalidTaskError) as raised:
        check_secret_lengths({"secret API_KEY": "12345", "secret OK": "123456"})

    assert raised.value.error_type == "secret_too_short"
    assert "secret API_KEY" in raised.value.message
    assert "12345" not in raised.value.message
    assert "secret OK" not in raised.value.message


def test_secret_of_minimum_length_passes():
    check_secret_lengths({"secret A": "x" * MIN_SECRET_LENGTH})


def test_empty_secret_passes_length_check():
    check_secret_lengths({"secret EMPTY": ""})


def _deploy_task() -> task_pb2.AgentTask:
    task = task_pb2.AgentTask(id="t1", type=task_pb2.TASK_TYPE_DEPLOY)
    config = task.deploy.config
    config.environment["DB_PASSWORD"] = "db-password-1"
    config.environment["LOG_LEVEL"] = "debug"
    config.secret_environment.extend(["DB_PASSWORD", "NOT_SET"])
    task.deploy.hooks.pre_deploy.environment["DB_PASSWORD"] = "hook-password-2"
    return task


def test_secrets_of_collects_every_source():
    credentials = task_pb2.Credentials(
        registries=[
            task_pb2.RegistryAuth(
                registry="r.example", username="me", password="registry-pass"
            ),
            task_pb2.RegistryAuth(registry="q.example", identity_token="oauth-token"),
        ],
        secrets={"API_KEY": "api-key-value"},
    )

    found = secrets_of(_deploy_task(), credentials)

    assert found == {
        "registry r.example password": "registry-pass",
        "registry r.example login": "me:registry-pass",
        "registry q.example identity token": "oauth-token",
        "secret API_KEY": "api-key-value",
        "environment DB_PASSWORD": "db-password-1",
        "hook 1 environment DB_PASSWORD": "hook-password-2",
    }


def test_secrets_of_reads_rollback_config():
    task = task_pb2.AgentTask(id="t1", type=task_pb2.TASK_TYPE_ROLLBACK)
    task.rollback.config.environment["TOKEN"] = "rollback-token"
    task.rollback.config.secret_environment.append("TOKEN")

    found = secrets_of(task, task_pb2.Credentials())

    assert found == {"environment TOKEN": "rollback-token"}


def test_secrets_of_task_without_secrets_is_empty():
    task = task_pb2.AgentTask(id="t1", type=task_pb2.TASK_TYPE_INSPECT)

    assert secrets_of(task, task_pb2.Credentials()) == {}


# Registry and log filter ------------------------------------------------------


def test_registry_masks_until_removed():
    registry = SecretRegistry()
    registry.add("task-1", ["first-secret"])
    registry.add("task-2", ["second-secret"])

    assert registry.mask_text("first-secret second-secret") == "**** ****"
    registry.remove("task-1")
    assert registry.mask_text("first-secret second-secret") == "first-secret ****"
    registry.remove("task-unknown")


def _logger_with_filter(registry: SecretRegistry) -> tuple[logging.Logger, io.StringIO]:
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.addFilter(MaskingLogFilter(registry))
    logger = logging.getLogger(f"test-masking-{id(output)}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return logger, output


def test_log_filter_masks_message_arguments():
    registry = SecretRegistry()
    registry.add("task-1", [SECRET])
    logger, output = _logger_with_filter(registry)

    logger.info("pulling with %s as %r", SECRET, {"password": SECRET})

    assert SECRET not in output.getvalue()
    assert "pulling with ****" in output.getvalue()


def test_log_filter_masks_exception_text():
    registry = SecretRegistry()
    registry.add("task-1", [SECRET])
    logger, output = _logger_with_filter(registry)

    try:
        raise ValueError(f"login failed for {SECRET}")
    except ValueError:
        logger.exception("pull failed")

    assert "ValueError: login failed for ****" in output.getvalue()
    assert SECRET not in output.getvalue()


def test_log_filter_masks_records_from_child_loggers():
    registry = SecretRegistry()
    registry.add("task-1", [SECRET])
    parent, output = _logger_with_filter(registry)
    child = logging.getLogger(parent.name + ".child")

    child.warning("child saw %s", SECRET)

    assert output.getvalue() == "child saw ****\n"


def test_log_filter_keeps_bad_format_for_handler():
    registry = SecretRegistry()
    registry.add("task-1", [SECRET])
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d", ("nan",), None)

    assert MaskingLogFilter(registry).filter(record) is True
    assert record.args == ("nan",)
