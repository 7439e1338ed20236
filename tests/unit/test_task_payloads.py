"""Checks of task payloads that need no engine: uploads, sticker locations,
probes, pinned images and upload archives."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest
from google.protobuf.duration_pb2 import Duration

from stella.agent.v1 import task_pb2
from stella_agent.config import config_from_mapping
from stella_agent.errors import DigestMismatchError, InvalidTaskError
from stella_agent.executors.confined_fs import Owner
from stella_agent.executors.files import build_archive, check_files, parse_owner
from stella_agent.executors.health_check import parse_probe, verdict
from stella_agent.executors.sandbox import parse_pinned_image
from stella_agent.executors.stickers import (
    parse_sticker,
    resolve_location,
    sticker_json,
)

DIGEST = "sha256:" + "b" * 64


def config(**sticker):
    return config_from_mapping({"agent_id": "a", "sticker": sticker})


def test_check_files_accepts_and_hashes():
    content = b"hello"
    files = check_files(
        [
            task_pb2.FileUpload(
                path="a/b.txt",
                content=content,
                mode=0o600,
                owner="10:20",
                sha256=hashlib.sha256(content).hexdigest(),
            )
        ],
        100,
    )

    assert files[0].components == ["a", "b.txt"]
    assert files[0].mode == 0o600
    assert files[0].owner == Owner(10, 20)
    assert files[0].sha256 == hashlib.sha256(content).hexdigest()


def test_check_files_rejects():
    with pytest.raises(InvalidTaskError, match="empty"):
        check_files([], 10)
    with pytest.raises(InvalidTaskError, match="max_upload_bytes"):
        check_files([task_pb2.FileUpload(path="a", content=b"x" * 11)], 10)
    with pytest.raises(InvalidTaskError, match="listed twice"):
        check_files([task_pb2.FileUpload(path="a"), task_pb2.FileUpload(path="a")], 10)
    with pytest.raises(DigestMismatchError):
        check_files([task_pb2.FileUpload(path="a", sha256="0" * 64)], 10)
    with pytest.raises(InvalidTaskError, match="invalid sha256"):
        check_files([task_pb2.FileUpload(path="a", sha256="XYZ")], 10)
    with pytest.raises(InvalidTaskError, match="setuid"):
        check_files([task_pb2.FileUpload(path="a", mode=0o2755)], 10)


@pytest.mark.parametrize("owner", ["root", "1:", ":1", "1:2:3", "-1", "99999999999"])
def test_parse_owner_rejects(owner):
    with pytest.raises(InvalidTaskError):
        parse_owner(owner, "f")


def test_parse_owner_uid_only():
    assert parse_owner("1000", "f") == Owner(1000, -1)
    assert parse_owner("", "f") is None


def test_build_archive_entries():
    files = check_files(
        [task_pb2.FileUpload(path="c/d", content=b"xy", mode=0o640, owner="7")], 100
    )

    data = build_archive(files, prefix=["srv"])

    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        (member,) = archive.getmembers()
        assert member.name == "srv/c/d"
        assert member.mode == 0o640
        assert (member.uid, member.gid) == (7, 0)
        assert archive.extractfile(member).read() == b"xy"


def test_resolve_location_defaults_and_overrides():
    agent = config(path="/srv/state/version.json", volume="vol-a")

    host = resolve_location(None, agent)
    volume = resolve_location(
        task_pb2.StickerConfig(location=task_pb2.STICKER_LOCATION_VOLUME), agent
    )
    named = resolve_location(
        task_pb2.StickerConfig(
            location=task_pb2.STICKER_LOCATION_VOLUME,
            path="/var/stella/x/v.json",
            volume="other",
        ),
        agent,
    )

    assert (host.kind, host.path) == ("host", "/srv/state/version.json")
    assert (volume.kind, volume.path, volume.volume) == (
        "volume",
        "/var/stella/version.json",
        "vol-a",
    )
    assert (named.path, named.volume) == ("/var/stella/x/v.json", "other")


@pytest.mark.parametrize(
    "requested",
    [
        task_pb2.StickerConfig(
            location=task_pb2.STICKER_LOCATION_VOLUME, path="/etc/v.json"
        ),
        task_pb2.StickerConfig(
            location=task_pb2.STICKER_LOCATION_VOLUME, path="/var/stella"
        ),
        task_pb2.StickerConfig(
            location=task_pb2.STICKER_LOCATION_VOLUME, volume="bad name!"
        ),
        task_pb2.StickerConfig(path="relative/v.json"),
        task_pb2.StickerConfig(path="/var/stella/../etc/v.json"),
        task_pb2.StickerConfig(location=task_pb2.STICKER_LOCATION_HOST, volume="v"),
    ],
)
def test_resolve_location_rejects(requested):
    with pytest.raises(InvalidTaskError):
        resolve_location(requested, config())


def test_sticker_json_round_trip():
    sticker = task_pb2.VersionSticker(
        release_id="r1\n$(x)", service_digests={"web": DIGEST}
    )

    assert parse_sticker(sticker_json(sticker), "here") == sticker


def test_parse_probe():
    http = parse_probe(task_pb2.Probe(http=task_pb2.HttpProbe(port=80)))
    tcp = parse_probe(
        task_pb2.Probe(tcp=task_pb2.TcpProbe(port=5432), timeout=Duration(seconds=2))
    )

    assert http.command() == ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:80/"]
    assert tcp.command() == ["nc", "-w", "2", "127.0.0.1", "5432", "-e", "true"]
    with pytest.raises(InvalidTaskError, match="http or tcp"):
        parse_probe(task_pb2.Probe())
    with pytest.raises(InvalidTaskError, match="not a valid port"):
        parse_probe(task_pb2.Probe(tcp=task_pb2.TcpProbe(port=70000)))
    with pytest.raises(InvalidTaskError, match="path"):
        parse_probe(task_pb2.Probe(http=task_pb2.HttpProbe(port=80, path="/a b")))


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ({"running": True, "health": "healthy"}, "healthy"),
        ({"running": True, "health": "none"}, "healthy"),
        ({"running": True, "health": "starting"}, "starting"),
        ({"running": True, "health": "unhealthy"}, "unhealthy"),
        ({"running": False, "health": "healthy"}, "stopped"),
        (
            {"running": True, "health": "healthy", "probe": {"passed": False}},
            "unhealthy",
        ),
    ],
)
def test_health_verdict(report, expected):
    assert verdict(report) == expected


def test_parse_pinned_image():
    assert parse_pinned_image(f"127.0.0.1:5000/tools@{DIGEST}", "image") == (
        "127.0.0.1:5000/tools",
        DIGEST,
    )
    for unpinned in ("busybox", "busybox:latest", "busybox@sha256:abc"):
        with pytest.raises(InvalidTaskError, match="not pinned"):
            parse_pinned_image(unpinned, "image")
