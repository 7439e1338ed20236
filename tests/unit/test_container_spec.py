"""Validation of deploy payloads into container specs."""

from __future__ import annotations

import math

import pytest
from google.protobuf.duration_pb2 import Duration

from stella.agent.v1 import task_pb2
from stella_agent.config import config_from_mapping
from stella_agent.errors import InvalidTaskError
from stella_agent.executors.container_spec import (
    build_container_spec,
    parse_cpu_limit,
    parse_memory_limit,
    parse_restart_policy,
)

DIGEST = "sha256:" + "a" * 64
CONFIG = config_from_mapping(
    {
        "agent_id": "test-agent",
        "tasks": {"health_timeout_seconds": 42, "settle_seconds": 3},
    }
)


def payload(**config) -> task_pb2.DeployPayload:
    config.setdefault("container_name", "web")
    return task_pb2.DeployPayload(
        image="registry.example.com/shop/web",
        digest=DIGEST,
        config=task_pb2.DeployConfig(**config),
    )


def test_spec_from_full_payload():
    spec = build_container_spec(
        payload(
            environment={"MODE": "prod"},
            ports=["127.0.0.1:8080:80"],
            volumes=["data:/data:ro"],
            restart_policy="on-failure:3",
            memory_limit_bytes=64 * 1024 * 1024,
            cpu_limit=0.5,
            labels={"team": "shop"},
            command=["httpd", "-f"],
            network="backend",
            health_check=task_pb2.HealthCheckConfig(
                command=["wget", "-q", "http://127.0.0.1/"],
                interval=Duration(seconds=2),
                retries=4,
                start_period=Duration(seconds=5),
                timeout=Duration(seconds=30),
                settle_period=Duration(seconds=1),
            ),
        ),
        CONFIG,
    )

    arguments = spec.create_arguments({"stella.digest": DIGEST})

    assert arguments["image"] == f"registry.example.com/shop/web@{DIGEST}"
    assert arguments["name"] == "web"
    assert arguments["environment"] == {"MODE": "prod"}
    assert arguments["ports"] == {
        "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]
    }
    assert arguments["volumes"] == ["data:/data:ro"]
    assert arguments["restart_policy"] == {"Name": "on-failure", "MaximumRetryCount": 3}
    assert arguments["mem_limit"] == 64 * 1024 * 1024
    assert arguments["nano_cpus"] == 500_000_000
    assert arguments["labels"] == {"team": "shop", "stella.digest": DIGEST}
    assert arguments["command"] == ["httpd", "-f"]
    assert arguments["network"] == "backend"
    assert arguments["healthcheck"] == {
        "test": ["CMD", "wget", "-q", "http://127.0.0.1/"],
        "interval": 2_000_000_000,
        "retries": 4,
        "start_period": 5_000_000_000,
    }
    assert spec.health_wait.timeout_seconds == 30
    assert spec.health_wait.settle_seconds == 1


def test_spec_defaults():
    spec = build_container_spec(payload(), CONFIG)

    arguments = spec.create_arguments({})

    assert arguments["restart_policy"] == {"Name": "unless-stopped"}
    assert "ports" not in arguments
    assert "mem_limit" not in arguments
    assert "nano_cpus" not in arguments
    assert "healthcheck" not in arguments
    assert "command" not in arguments
    assert "network" not in arguments
    assert spec.health_wait.timeout_seconds == 42
    assert spec.health_wait.settle_seconds == 3


def test_config_digest_tracks_settings_not_release():
    base = build_container_spec(payload(environment={"A": "1"}), CONFIG)
    other_release = build_container_spec(
        payload(environment={"A": "1"}, release_id="r2", release_name="two"), CONFIG
    )
    other_env = build_container_spec(payload(environment={"A": "2"}), CONFIG)

    assert base.config_digest() == other_release.config_digest()
    assert base.config_digest() != other_env.config_digest()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"container_name": ""}, "config.container_name is required"),
        ({"container_name": "-web"}, "config.container_name '-web' is invalid"),
        ({"ports": ["99999"]}, "port '99999' is invalid"),
        ({"volumes": ["data:rel"]}, "volume 'data:rel' is invalid"),
        ({"restart_policy": "sometimes"}, "config.restart_policy 'sometimes'"),
        ({"memory_limit_bytes": -1}, "is negative"),
        ({"memory_limit_bytes": 1024}, "below Docker's minimum"),
        ({"cpu_limit": -0.5}, "config.cpu_limit -0.5 is invalid"),
        ({"cpu_limit": 0.001}, "below Docker's minimum"),
        ({"labels": {"stella.digest": "x"}}, "reserved for the agent"),
        ({"labels": {"Stella.Role": "x"}}, "reserved for the agent"),
        ({"labels": {"": "x"}}, "empty label key"),
        ({"environment": {"": "x"}}, "empty variable name"),
        ({"environment": {"A=B": "x"}}, "must not contain '='"),
        ({"environment": {"A": "x\0y"}}, "NUL"),
        ({"command": ["a\0b"]}, "NUL"),
        ({"network": "bad name"}, "not a valid network name"),
        (
            {"network": "host", "ports": ["8080:80"]},
            "cannot be published on network 'host'",
        ),
        (
            {"health_check": task_pb2.HealthCheckConfig(retries=-1)},
            "retries -1 is negative",
        ),
        (
            {"health_check": task_pb2.HealthCheckConfig(interval=Duration(nanos=1000))},
            "at least 1ms",
        ),
        (
            {"health_check": task_pb2.HealthCheckConfig(timeout=Duration(seconds=-1))},
            "health_check.timeout is negative",
        ),
        (
            {
                "health_check": task_pb2.HealthCheckConfig(
                    settle_period=Duration(seconds=-5)
                )
            },
            "settle_period is negative",
        ),
    ],
)
def test_spec_rejects_bad_config(changes, message):
    with pytest.raises(InvalidTaskError) as caught:
        build_container_spec(payload(**changes), CONFIG)

    assert message in caught.value.message


@pytest.mark.parametrize(
    ("image", "digest", "message"),
    [
        ("", DIGEST, "image is required"),
        ("registry.example.com/web:1.0", DIGEST, "must not contain a tag"),
        ("registry.example.com/web", "sha256:abc", "digest 'sha256:abc' is invalid"),
        ("registry.example.com/web", "latest", "digest 'latest' is invalid"),
    ],
)
def test_spec_rejects_bad_image(image, digest, message):
    bad = task_pb2.DeployPayload(
        image=image, digest=digest, config=task_pb2.DeployConfig(container_name="w")
    )

    with pytest.raises(InvalidTaskError) as caught:
        build_container_spec(bad, CONFIG)

    assert message in caught.value.message


def test_spec_rejects_bad_previous_digest():
    bad = payload()
    bad.previous_digest = "sha256:nope"

    with pytest.raises(InvalidTaskError) as caught:
        build_container_spec(bad, CONFIG)

    assert "previous_digest" in caught.value.message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", {"Name": "unless-stopped"}),
        ("no", {"Name": "no"}),
        ("always", {"Name": "always"}),
        ("unless-stopped", {"Name": "unless-stopped"}),
        ("on-failure", {"Name": "on-failure"}),
        ("on-failure:0", {"Name": "on-failure", "MaximumRetryCount": 0}),
        ("on-failure:5", {"Name": "on-failure", "MaximumRetryCount": 5}),
    ],
)
def test_restart_policy_accepts(value, expected):
    assert parse_restart_policy(value) == expected


@pytest.mark.parametrize(
    "value", ["never", "always:3", "on-failure:", "on-failure:-1", "on-failure:x"]
)
def test_restart_policy_rejects(value):
    with pytest.raises(InvalidTaskError):
        parse_restart_policy(value)


def test_limits_zero_means_unlimited():
    assert parse_memory_limit(0) is None
    assert parse_cpu_limit(0.0) is None


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_cpu_limit_rejects_non_finite(value):
    with pytest.raises(InvalidTaskError):
        parse_cpu_limit(value)
