"""Artifact names, content checks and atomic, confined writes."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from stella.agent.v1 import task_pb2
from stella_agent.artifacts import (
    confined_path,
    materialise_artifacts,
    validate_artifact_name,
    write_artifacts,
    write_file_atomic,
)
from stella_agent.errors import DigestMismatchError, InvalidTaskError


def reference(name: str, content: bytes, **fields) -> task_pb2.ArtifactReference:
    return task_pb2.ArtifactReference(
        name=name,
        type=fields.pop("type", "config"),
        sha256=fields.pop("sha256", hashlib.sha256(content).hexdigest()),
        content=content,
        **fields,
    )


@pytest.mark.parametrize(
    "name",
    [
        "compose.stella.lock.yml",
        "config/app.env",
        ".env",
        "a/b/c.conf",
        "name with spaces",
        "..hidden",
    ],
)
def test_artifact_name_accepted(name):
    assert validate_artifact_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/etc/passwd",
        "../escape",
        "config/../../escape",
        "a/./b",
        "a//b",
        "trailing/",
        ".",
        "..",
        "back\\slash",
        "new\nline",
        "nul\x00byte",
        "x" * 256,
    ],
)
def test_artifact_name_rejected(name):
    with pytest.raises(InvalidTaskError):
        validate_artifact_name(name)


def test_confined_path_rejects_symlinked_parent(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "config").symlink_to(outside)

    with pytest.raises(InvalidTaskError, match="symbolic link"):
        confined_path(root, "config/app.env", create_parents=True)

    assert list(outside.iterdir()) == []


def test_confined_path_rejects_file_as_parent(tmp_path):
    (tmp_path / "config").write_text("a file")

    with pytest.raises(InvalidTaskError, match="directory"):
        confined_path(tmp_path, "config/app.env", create_parents=True)


def test_write_artifacts_sets_modes(tmp_path):
    files = [
        ("secret.env", b"k=v\n", 0o600),
        ("config/app.conf", b"x", 0o644),
        ("run.sh", b"#!", 0o750),
    ]

    write_artifacts(tmp_path, files)

    assert (tmp_path / "secret.env").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "config" / "app.conf").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "run.sh").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "secret.env").read_bytes() == b"k=v\n"


def test_write_file_atomic_replaces_symlink_not_target(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)

    write_file_atomic(link, b"new", 0o644)

    assert target.read_text() == "keep"
    assert not link.is_symlink()
    assert link.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir() if "stella-tmp" in p.name] == []


def test_materialise_inline_content():
    refs = [
        reference("a.env", b"A=1\n", secret=True),
        reference("b.conf", b"b", mode=0o640),
    ]

    artifacts = asyncio.run(materialise_artifacts(refs, "task-1", None))

    assert [a.content for a in artifacts] == [b"A=1\n", b"b"]
    assert [a.mode for a in artifacts] == [0o600, 0o640]
    assert artifacts[0].secret


def test_materialise_rejects_wrong_sha256():
    ref = reference(
        "a.env", b"tampered", sha256=hashlib.sha256(b"original").hexdigest()
    )

    with pytest.raises(DigestMismatchError, match="a.env"):
        asyncio.run(materialise_artifacts([ref], "task-1", None))


def test_materialise_calls_fetcher_for_missing_content():
    content = b"fetched content"
    ref = reference("big.conf", b"", sha256=hashlib.sha256(content).hexdigest())
    calls = []

    async def fetch(task_id: str, name: str, sha256: str) -> bytes:
        calls.append((task_id, name, sha256))
        return content

    artifacts = asyncio.run(materialise_artifacts([ref], "task-1", fetch))

    assert artifacts[0].content == content
    assert calls == [("task-1", "big.conf", ref.sha256)]


def test_materialise_without_fetcher_needs_inline_content():
    ref = reference("big.conf", b"", sha256="a" * 64)

    with pytest.raises(InvalidTaskError, match="no artifact fetcher"):
        asyncio.run(materialise_artifacts([ref], "task-1", None))


def test_materialise_empty_file_needs_no_fetcher():
    artifacts = asyncio.run(
        materialise_artifacts([reference("empty.env", b"")], "task-1", None)
    )

    assert artifacts[0].content == b""


def test_materialise_checks_every_reference_before_fetching():
    good = reference("good.conf", b"", sha256="b" * 64)
    bad = reference("../bad.conf", b"x")
    calls = []

    async def fetch(task_id: str, name: str, sha256: str) -> bytes:
        calls.append(name)
        return b""

    with pytest.raises(InvalidTaskError):
        asyncio.run(materialise_artifacts([good, bad], "task-1", fetch))
    assert calls == []


@pytest.mark.parametrize(
    ("refs", "message"),
    [
        ([reference("a", b"1"), reference("a", b"1")], "listed twice"),
        ([reference("a", b"1", type="binary")], "unknown type"),
        ([reference("a", b"1", sha256="ABC")], "invalid sha256"),
        ([reference("a", b"1", mode=0o4755)], "setuid"),
        ([reference("a", b"1", size=5)], "its reference gives the size 5"),
    ],
)
def test_materialise_rejects_bad_reference(refs, message):
    with pytest.raises(InvalidTaskError, match=message):
        asyncio.run(materialise_artifacts(refs, "task-1", None))


def test_materialise_enforces_total_size():
    refs = [reference("a", b"x" * 600), reference("b", b"y" * 600)]

    with pytest.raises(InvalidTaskError, match="limit of 1000 bytes"):
        asyncio.run(materialise_artifacts(refs, "task-1", None, max_total_bytes=1000))


def test_write_file_atomic_ignores_umask(tmp_path):
    previous = os.umask(0o077)
    try:
        write_file_atomic(tmp_path / "shared.conf", b"x", 0o644)
    finally:
        os.umask(previous)

    assert (tmp_path / "shared.conf").stat().st_mode & 0o777 == 0o644


def test_materialise_enforces_total_size_after_fetch():
    ref = reference("big.conf", b"", sha256="c" * 64)

    async def fetch(task_id: str, name: str, sha256: str) -> bytes:
        return b"z" * 2000

    with pytest.raises(InvalidTaskError, match="exceed the limit of 1000 bytes"):
        asyncio.run(materialise_artifacts([ref], "task-1", fetch, max_total_bytes=1000))
