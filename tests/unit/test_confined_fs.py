"""Path confinement and atomic writes of confined_fs, on a real temporary
directory."""

from __future__ import annotations

import os

import pytest

from stella_agent.errors import InvalidTaskError, NotFoundError
from stella_agent.executors.confined_fs import (
    Owner,
    locate_under_roots,
    open_directory,
    open_root,
    read_file_at,
    split_absolute_path,
    split_relative_path,
    write_file_at,
)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/abs",
        "..",
        "../x",
        "a/../b",
        "a/./b",
        "a//b",
        "a/",
        "a\\b",
        "a\x00b",
        "a\nb",
        "x" * 256,
    ],
)
def test_split_relative_rejects(path):
    with pytest.raises(InvalidTaskError):
        split_relative_path(path, "path")


def test_split_relative_accepts_nested():
    assert split_relative_path("a/b c/.hidden", "path") == ["a", "b c", ".hidden"]


def test_split_absolute_path():
    assert split_absolute_path("/var/stella/", "path") == ["var", "stella"]
    assert split_absolute_path("/", "path") == []
    with pytest.raises(InvalidTaskError):
        split_absolute_path("var/stella", "path")
    with pytest.raises(InvalidTaskError):
        split_absolute_path("/var/../etc", "path")


def test_locate_under_roots():
    roots = ["/srv/uploads", "/var/stella/"]

    assert locate_under_roots("/srv/uploads/a/b", roots, "p") == (
        "/srv/uploads",
        ["a", "b"],
    )
    assert locate_under_roots("/var/stella", roots, "p") == ("/var/stella", [])
    with pytest.raises(InvalidTaskError, match="outside the directories"):
        locate_under_roots("/srv/uploads-evil/x", roots, "p")
    with pytest.raises(InvalidTaskError, match="none are configured"):
        locate_under_roots("/srv/uploads/x", [], "p")


def test_open_directory_creates_and_rejects_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    (root / "file").write_text("x")
    root_fd = open_root(str(root), create=False)
    try:
        created = open_directory(root_fd, ["a", "b"], create=True, shown="a/b")
        os.close(created)
        with pytest.raises(InvalidTaskError, match="symbolic link"):
            open_directory(root_fd, ["link", "c"], create=True, shown="link/c")
        with pytest.raises(InvalidTaskError, match="not a directory"):
            open_directory(root_fd, ["file", "c"], create=True, shown="file/c")
        with pytest.raises(NotFoundError):
            open_directory(root_fd, ["missing"], create=False, shown="missing")
    finally:
        os.close(root_fd)

    assert (root / "a" / "b").is_dir()
    assert list(outside.iterdir()) == []


def test_write_file_at_is_atomic_and_exact(tmp_path):
    directory_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    old_umask = os.umask(0o077)
    try:
        write_file_at(directory_fd, "f.txt", b"one", 0o644, shown="f.txt")
        write_file_at(directory_fd, "f.txt", b"two", 0o640, shown="f.txt")
        data = read_file_at(directory_fd, "f.txt", 100, shown="f.txt")
    finally:
        os.umask(old_umask)
        os.close(directory_fd)

    assert data == b"two"
    assert os.stat(tmp_path / "f.txt").st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["f.txt"]


def test_write_file_at_sets_owner(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("changing the owner needs root")
    directory_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_file_at(directory_fd, "f", b"x", 0o600, owner=Owner(4321, -1), shown="f")
    finally:
        os.close(directory_fd)

    info = os.stat(tmp_path / "f")
    assert info.st_uid == 4321
    assert info.st_gid == os.getegid()


def test_write_file_at_rejects_link_and_directory(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep")
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "dir").mkdir()
    directory_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(InvalidTaskError, match="symbolic link"):
            write_file_at(directory_fd, "link", b"x", 0o644, shown="link")
        with pytest.raises(InvalidTaskError, match="not a regular file"):
            write_file_at(directory_fd, "dir", b"x", 0o644, shown="dir")
    finally:
        os.close(directory_fd)

    assert target.read_text() == "keep"


def test_read_file_at_limits(tmp_path):
    (tmp_path / "big").write_bytes(b"x" * 11)
    (tmp_path / "link").symlink_to(tmp_path / "big")
    directory_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(InvalidTaskError, match="larger than 10"):
            read_file_at(directory_fd, "big", 10, shown="big")
        with pytest.raises(InvalidTaskError, match="symbolic link"):
            read_file_at(directory_fd, "link", 100, shown="link")
        with pytest.raises(NotFoundError):
            read_file_at(directory_fd, "missing", 100, shown="missing")
    finally:
        os.close(directory_fd)
