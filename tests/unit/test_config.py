"""Agent config loading and validation."""

from __future__ import annotations

import pytest

from stella_agent.config import config_from_mapping, load_config
from stella_agent.errors import ConfigError


def test_minimal_config_uses_defaults():
    config = config_from_mapping({"agent_id": "host-1"})

    assert config.orchestrator.address == "127.0.0.1:7443"
    assert config.docker.stop_timeout_seconds == 10
    assert config.tasks.busy_policy == "wait"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "'agent_id' is required"),
        ({"agent_id": "bad id"}, "'agent_id' is invalid"),
        ({"agent_id": "a", "colour": 1}, "unknown config key 'colour'"),
        (
            {"agent_id": "a", "tasks": {"max_concurent": 2}},
            "unknown config key 'tasks.max_concurent'",
        ),
        (
            {"agent_id": "a", "tasks": {"max_concurrent": "many"}},
            "'tasks.max_concurrent' must be an integer",
        ),
        (
            {"agent_id": "a", "tasks": {"max_concurrent": 0}},
            "'tasks.max_concurrent' must be at least 1",
        ),
        (
            {"agent_id": "a", "orchestrator": {"address": "nohost"}},
            "'orchestrator.address' must be host:port",
        ),
        ({"agent_id": "a", "orchestrator": "x"}, "'orchestrator' must be a mapping"),
        ({"agent_id": "a", "tasks": {"busy_policy": "queue"}}, "'tasks.busy_policy'"),
        (
            {"agent_id": "a", "tasks": {"host_command_allowlist": ["ls"]}},
            "absolute paths",
        ),
        (
            {"agent_id": "a", "docker": {"pull_timeout_seconds": 0}},
            "'docker.pull_timeout_seconds' must be greater",
        ),
        ({"agent_id": "a", "tls": {"ca_file": 5}}, "'tls.ca_file' must be a string"),
    ],
)
def test_invalid_config_names_the_key(raw, message):
    with pytest.raises(ConfigError) as raised:
        config_from_mapping(raw)

    assert message in str(raised.value)


def test_environment_overrides_file_values():
    config = config_from_mapping(
        {"agent_id": "a", "tasks": {"max_concurrent": 2}},
        env={
            "STELLA_AGENT_TASKS_MAX_CONCURRENT": "7",
            "STELLA_AGENT_LOG_LEVEL": "DEBUG",
        },
    )

    assert config.tasks.max_concurrent == 7
    assert config.log_level == "DEBUG"


def test_relative_paths_resolve_against_config_file(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("agent_id: a\nstate_dir: state\ntls: {ca_file: certs/ca.crt}\n")

    config = load_config(path, env={})

    assert config.state_dir == str(tmp_path / "state")
    assert config.tls.ca_file == str(tmp_path / "certs" / "ca.crt")


def test_invalid_yaml_is_reported_with_file(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("agent_id: [unclosed\n")

    with pytest.raises(ConfigError) as raised:
        load_config(path, env={})

    assert str(path) in str(raised.value)
    assert "not valid YAML" in str(raised.value)


def test_missing_config_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml", env={})


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("https://127.0.0.1:7443", "drop the https:// prefix"),
        ("127.0.0.1:74433", "port 74433, outside 1 to 65535"),
    ],
)
def test_orchestrator_address_errors_say_the_fix(address, message):
    with pytest.raises(ConfigError, match=message):
        config_from_mapping({"agent_id": "a", "orchestrator": {"address": address}})


def test_misspelt_environment_variable_is_an_error():
    with pytest.raises(
        ConfigError, match="STELLA_AGENT_TASK_MAX_CONCURRENT names no config key"
    ):
        config_from_mapping(
            {"agent_id": "a"}, env={"STELLA_AGENT_TASK_MAX_CONCURRENT": "2"}
        )
