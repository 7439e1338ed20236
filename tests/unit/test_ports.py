"""Parsing of published ports and mounts."""

from __future__ import annotations

import pytest

from stella_agent.errors import InvalidTaskError
from stella_agent.executors.ports import (
    PortMapping,
    VolumeMount,
    parse_port,
    parse_ports,
    parse_volume,
    parse_volumes,
    port_bindings,
)

GOOD_PORTS = [
    ("80", PortMapping(80, "tcp")),
    ("80/udp", PortMapping(80, "udp")),
    ("53/UDP", PortMapping(53, "udp")),
    ("8080:80", PortMapping(80, "tcp", None, 8080)),
    ("8080:80/tcp", PortMapping(80, "tcp", None, 8080)),
    ("127.0.0.1:8080:80", PortMapping(80, "tcp", "127.0.0.1", 8080)),
    ("127.0.0.1::80", PortMapping(80, "tcp", "127.0.0.1", None)),
    ("0.0.0.0:1:65535/udp", PortMapping(65535, "udp", "0.0.0.0", 1)),
    ("[::1]:8080:80", PortMapping(80, "tcp", "::1", 8080)),
    ("[::1]::80", PortMapping(80, "tcp", "::1", None)),
    ("[2001:db8::1]:443:8443/tcp", PortMapping(8443, "tcp", "2001:db8::1", 443)),
    (" 8080:80 ", PortMapping(80, "tcp", None, 8080)),
]

BAD_PORTS = [
    ("", "empty"),
    ("0", "outside 1-65535"),
    ("65536", "outside 1-65535"),
    ("8080:0", "outside 1-65535"),
    ("70000:80", "outside 1-65535"),
    ("80/sctp", "protocol 'sctp'"),
    ("80/", "protocol ''"),
    ("http", "not a number"),
    ("8080:http", "not a number"),
    ("-1", "port ranges"),
    ("8000-8010:8000-8010", "port ranges"),
    (":80", "host port before ':' is empty"),
    ("localhost:8080:80", "not an IP address"),
    ("300.1.1.1:8080:80", "not an IP address"),
    ("::1:8080:80", "too many ':'"),
    ("[::1]:8080", "expected [ipv6]"),
    ("[::1:8080:80", "expected [ipv6]"),
    ("[127.0.0.1]:8080:80", "use an IPv6 address"),
    ("::1:80", "too many ':'"),
    (":8080:80", "not an IP address"),
    ("1:2:3:4", "too many ':'"),
    ("8080:80:tcp", "not an IP address"),
]


@pytest.mark.parametrize(("spec", "expected"), GOOD_PORTS)
def test_parse_port_accepts(spec, expected):
    assert parse_port(spec) == expected


@pytest.mark.parametrize(("spec", "reason"), BAD_PORTS)
def test_parse_port_rejects(spec, reason):
    with pytest.raises(InvalidTaskError) as caught:
        parse_port(spec)

    assert reason in caught.value.message
    assert repr(spec) in caught.value.message
    assert caught.value.error_type == "invalid_task"


def test_parse_ports_rejects_duplicate_host_port():
    with pytest.raises(InvalidTaskError) as caught:
        parse_ports(["127.0.0.1:8080:80", "8080:81"])

    assert "host port 8080/tcp twice" in caught.value.message


def test_parse_ports_allows_distinct_bindings():
    mappings = parse_ports(["127.0.0.1:8080:80", "127.0.0.2:8080:80", "8080:80/udp"])

    assert len(mappings) == 3


def test_port_bindings_groups_by_container_port():
    mappings = parse_ports(["127.0.0.1:8080:80", "[::1]:8081:80", "9000/udp"])

    bindings = port_bindings(mappings)

    assert bindings == {
        "80/tcp": [
            {"HostIp": "127.0.0.1", "HostPort": "8080"},
            {"HostIp": "::1", "HostPort": "8081"},
        ],
        "9000/udp": [{"HostIp": "", "HostPort": ""}],
    }


GOOD_VOLUMES = [
    ("data:/var/lib/data", VolumeMount("data", "/var/lib/data", False)),
    ("data:/var/lib/data:ro", VolumeMount("data", "/var/lib/data", True)),
    ("data:/var/lib/data:rw", VolumeMount("data", "/var/lib/data", False)),
    ("/srv/www:/www:ro", VolumeMount("/srv/www", "/www", True)),
    ("/srv/www/:/www/", VolumeMount("/srv/www", "/www", False)),
    ("my_vol.1-x:/data", VolumeMount("my_vol.1-x", "/data", False)),
]

BAD_VOLUMES = [
    ("", "expected source:target"),
    ("/data", "expected source:target"),
    ("a:b:c:d", "expected source:target"),
    (":/data", "source is empty"),
    ("data:relative", "not an absolute path"),
    ("data:/", "must not be '/'"),
    ("data:/data:z", "mode 'z'"),
    ("data:/data:RO", "mode 'RO'"),
    ("x:/data", "neither an absolute host path nor a volume name"),
    ("./data:/data", "neither an absolute host path nor a volume name"),
    ("-data:/data", "neither an absolute host path nor a volume name"),
    ("/srv/../etc:/data", "must not contain '..'"),
    ("data:/app/../etc", "must not contain '..'"),
]


@pytest.mark.parametrize(("spec", "expected"), GOOD_VOLUMES)
def test_parse_volume_accepts(spec, expected):
    assert parse_volume(spec) == expected


@pytest.mark.parametrize(("spec", "reason"), BAD_VOLUMES)
def test_parse_volume_rejects(spec, reason):
    with pytest.raises(InvalidTaskError) as caught:
        parse_volume(spec)

    assert reason in caught.value.message
    assert repr(spec) in caught.value.message


def test_parse_volumes_rejects_duplicate_target():
    with pytest.raises(InvalidTaskError) as caught:
        parse_volumes(["a1:/data", "/srv:/data/"])

    assert "target /data is mounted twice" in caught.value.message


def test_volume_bind_string_and_kind():
    bind = parse_volume("/srv/www:/www:ro")
    named = parse_volume("data:/data")

    assert bind.bind_string() == "/srv/www:/www:ro"
    assert bind.is_bind
    assert named.bind_string() == "data:/data:rw"
    assert not named.is_bind
