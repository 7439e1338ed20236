"""Project names, stack directories, claims and the release switch on disk."""

from __future__ import annotations

import pytest

from stella_agent.config import config_from_mapping
from stella_agent.errors import InvalidTaskError, TaskError
from stella_agent.executors.compose_stack import (
    ReleaseFile,
    ReleaseRecord,
    StackLock,
    StackPaths,
    claim,
    commit,
    project_name_for,
    promote,
    read_release,
    resolve_stack_directory,
    restore,
    snapshot_files_directory,
    take_backup_for_rollback,
    tidy,
    write_snapshot,
)


@pytest.mark.parametrize(
    ("stack_name", "project"),
    [
        ("shop", "shop"),
        ("Shop", "shop"),
        ("shop-web_2", "shop-web_2"),
        ("Shop Web", "shop-web"),
        ("shop.example.com", "shop-example-com"),
        ("--shop--", "shop"),
        ("_shop", "shop"),
        ("Café Crème", "caf-cr-me"),
        ("a/b\\c", "a-b-c"),
        ("9lives", "9lives"),
        ("x" * 100, "x" * 63),
        ("a" * 62 + "-b", "a" * 62),
    ],
)
def test_project_name_derivation(stack_name, project):
    assert project_name_for(stack_name) == project


@pytest.mark.parametrize("stack_name", ["", "---", "__", "ÄÖÜ", "tab\there", "x" * 254])
def test_project_name_rejects_unusable(stack_name):
    with pytest.raises(InvalidTaskError):
        project_name_for(stack_name)


def test_project_name_is_valid_for_compose():
    import re

    for stack_name in [
        "A",
        "z-9",
        "Mixed_Case-Name",
        "1.2.3",
        "ünïcode-stack",
        "x" * 70 + "!",
    ]:
        assert re.match(r"^[a-z0-9][a-z0-9_-]*$", project_name_for(stack_name))


def config_with_roots(tmp_path, *roots):
    return config_from_mapping(
        {
            "agent_id": "t",
            "state_dir": str(tmp_path / "state"),
            "tasks": {"allowed_deployment_roots": [str(root) for root in roots]},
        }
    )


def test_stack_directory_default(tmp_path):
    config = config_with_roots(tmp_path)

    directory = resolve_stack_directory(config, "shop", "")

    assert directory == (tmp_path / "state" / "stacks" / "shop").resolve()


def test_stack_directory_under_allowed_root(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    config = config_with_roots(tmp_path, root)

    directory = resolve_stack_directory(config, "shop", str(root / "shop"))

    assert directory == (root / "shop").resolve()


@pytest.mark.parametrize(
    "requested",
    ["relative/shop", "/etc/shop", "{root}", "{root}/../escape", "{root}2/shop"],
)
def test_stack_directory_outside_roots_rejected(tmp_path, requested):
    root = tmp_path / "srv"
    root.mkdir()
    config = config_with_roots(tmp_path, root)

    with pytest.raises(InvalidTaskError):
        resolve_stack_directory(config, "shop", requested.format(root=root))


def test_stack_directory_symlink_escape_rejected(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (root / "shop").symlink_to(tmp_path / "elsewhere")
    config = config_with_roots(tmp_path, root)

    with pytest.raises(InvalidTaskError, match="not inside an allowed root"):
        resolve_stack_directory(config, "shop", str(root / "shop"))


def test_claim_rejects_other_stack(tmp_path):
    paths = StackPaths(tmp_path / "shop")
    claim(paths, "shop", "shop")

    with pytest.raises(InvalidTaskError) as raised:
        claim(paths, "Shop", "shop")

    assert raised.value.error_type == "conflict"
    assert "'shop'" in raised.value.message


def test_claim_accepts_same_stack_again(tmp_path):
    paths = StackPaths(tmp_path / "shop")
    claim(paths, "shop", "shop")

    claim(paths, "shop", "shop")

    assert paths.claim_file.exists()


def test_stack_lock_is_exclusive(tmp_path):
    paths = StackPaths(tmp_path / "shop")
    claim(paths, "shop", "shop")
    first = StackLock(paths)
    first.acquire()
    try:
        with pytest.raises(TaskError) as raised:
            StackLock(paths).acquire()
        assert raised.value.error_type == "busy"
        assert raised.value.retriable
    finally:
        first.release()
    second = StackLock(paths)
    second.acquire()
    second.release()


def release(
    release_id: str, files: dict[str, bytes]
) -> tuple[list[tuple[str, bytes, int]], ReleaseRecord]:
    record = ReleaseRecord(
        stack_name="shop",
        project_name="shop",
        task_id=f"task-{release_id}",
        release_id=release_id,
        files=[ReleaseFile(name=name, mode=0o644, sha256="") for name in files],
    )
    return [(name, content, 0o644) for name, content in files.items()], record


def deploy(paths: StackPaths, release_id: str, files: dict[str, bytes]):
    content, record = release(release_id, files)
    write_snapshot(paths.staging, content, record)
    return promote(paths, paths.staging, [])


def live_release_id(paths: StackPaths) -> str | None:
    record = read_release(paths.release_file)
    return None if record is None else record.release_id


def backup_release_id(paths: StackPaths) -> str | None:
    record = read_release(paths.backup / "release.json")
    return None if record is None else record.release_id


@pytest.fixture
def paths(tmp_path):
    stack = StackPaths(tmp_path / "shop")
    claim(stack, "shop", "shop")
    return stack


def test_first_promote_has_no_previous(paths):
    switch = deploy(paths, "r1", {"compose.stella.lock.yml": b"v1", "app.env": b"A=1"})
    commit(paths)

    assert switch.previous is None
    assert (paths.directory / "compose.stella.lock.yml").read_bytes() == b"v1"
    assert live_release_id(paths) == "r1"
    assert not paths.backup.exists()
    assert not paths.staging.exists()


def test_promote_keeps_previous_as_backup(paths):
    deploy(paths, "r1", {"compose.stella.lock.yml": b"v1", "old.env": b"old"})
    commit(paths)

    switch = deploy(paths, "r2", {"compose.stella.lock.yml": b"v2"})
    commit(paths)

    assert switch.previous.release_id == "r1"
    assert (paths.directory / "compose.stella.lock.yml").read_bytes() == b"v2"
    assert not (paths.directory / "old.env").exists()
    assert backup_release_id(paths) == "r1"
    backup_files = snapshot_files_directory(paths.backup)
    assert (backup_files / "old.env").read_bytes() == b"old"


def test_restore_brings_back_previous_and_older_backup(paths):
    for release_id in ("r1", "r2"):
        deploy(paths, release_id, {"compose.stella.lock.yml": release_id.encode()})
        commit(paths)
    switch = deploy(paths, "r3", {"compose.stella.lock.yml": b"r3", "new.env": b"n"})

    restore(paths, switch)

    assert live_release_id(paths) == "r2"
    assert (paths.directory / "compose.stella.lock.yml").read_bytes() == b"r2"
    assert not (paths.directory / "new.env").exists()
    assert backup_release_id(paths) == "r1"
    assert not paths.displaced.exists()


def test_restore_without_previous_clears_live(paths):
    switch = deploy(paths, "r1", {"compose.stella.lock.yml": b"v1"})

    restore(paths, switch)

    assert live_release_id(paths) is None
    assert not (paths.directory / "compose.stella.lock.yml").exists()


def test_rollback_swaps_live_and_backup(paths):
    for release_id in ("r1", "r2"):
        deploy(paths, release_id, {"compose.stella.lock.yml": release_id.encode()})
        commit(paths)

    take_backup_for_rollback(paths)
    switch = promote(paths, paths.displaced, [])
    commit(paths)

    assert switch.previous.release_id == "r2"
    assert live_release_id(paths) == "r1"
    assert backup_release_id(paths) == "r2"


def test_failed_rollback_restores_both(paths):
    for release_id in ("r1", "r2"):
        deploy(paths, release_id, {"compose.stella.lock.yml": release_id.encode()})
        commit(paths)

    take_backup_for_rollback(paths)
    switch = promote(paths, paths.displaced, [])
    restore(paths, switch)

    assert live_release_id(paths) == "r2"
    assert backup_release_id(paths) == "r1"


def test_promote_leaves_other_files_alone(paths):
    deploy(paths, "r1", {"compose.stella.lock.yml": b"v1"})
    commit(paths)
    (paths.directory / "data").mkdir()
    (paths.directory / "data" / "db").write_bytes(b"service data")

    deploy(paths, "r2", {"compose.stella.lock.yml": b"v2"})
    commit(paths)

    assert (paths.directory / "data" / "db").read_bytes() == b"service data"


def test_backup_skips_missing_live_file(paths):
    deploy(paths, "r1", {"compose.stella.lock.yml": b"v1", "gone.env": b"x"})
    commit(paths)
    (paths.directory / "gone.env").unlink()
    notes: list[str] = []

    content, record = release("r2", {"compose.stella.lock.yml": b"v2"})
    write_snapshot(paths.staging, content, record)
    promote(paths, paths.staging, notes)

    assert notes == ["live file gone.env is missing; the backup is saved without it"]


def test_tidy_returns_displaced_backup(paths):
    deploy(paths, "r1", {"compose.stella.lock.yml": b"v1"})
    commit(paths)
    deploy(paths, "r2", {"compose.stella.lock.yml": b"v2"})
    commit(paths)
    take_backup_for_rollback(paths)

    tidy(paths)

    assert backup_release_id(paths) == "r1"
    assert not paths.displaced.exists()


def test_release_record_is_private(paths):
    deploy(paths, "r1", {"compose.stella.lock.yml": b"v1"})

    assert paths.release_file.stat().st_mode & 0o777 == 0o600
    assert paths.agent_directory.stat().st_mode & 0o777 == 0o700
