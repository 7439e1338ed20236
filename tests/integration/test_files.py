"""upload-files to the host and into containers, against the real engine, with
the path tricks it must reject."""

from __future__ import annotations

import hashlib
import os

import pytest

from stella.agent.v1 import task_pb2
from tests.integration.task_support import TaskAgent, run_tools_container, task_of

pytestmark = pytest.mark.docker


@pytest.fixture
def agent(tmp_path, test_images) -> TaskAgent:
    return TaskAgent(tmp_path, test_images["tools:v1"].reference)


def upload(task_id: str, *files: task_pb2.FileUpload, **target) -> task_pb2.AgentTask:
    return task_of(
        task_id, upload_files=task_pb2.UploadFilesPayload(files=list(files), **target)
    )


def file(path: str, content: bytes = b"data\n", **options) -> task_pb2.FileUpload:
    return task_pb2.FileUpload(path=path, content=content, **options)


def test_host_upload_writes_files(agent):
    target = agent.upload_root / "app"
    content = b"key: 'value $(id)'\n"

    result = agent.run(
        upload(
            "up-1",
            file(
                "conf/app.yaml",
                content,
                mode=0o600,
                owner="1234:99",
                sha256=hashlib.sha256(content).hexdigest(),
            ),
            file("README", b"hello\n"),
            target_directory=str(target),
        )
    )

    assert result.success, result.error
    assert result.outputs["files_written"] == "2"
    assert result.outputs["target_directory"] == str(target)
    written = target / "conf" / "app.yaml"
    assert written.read_bytes() == content
    info = os.stat(written)
    assert info.st_mode & 0o777 == 0o600
    assert (info.st_uid, info.st_gid) == (1234, 99)
    assert os.stat(target / "README").st_mode & 0o777 == 0o644
    assert sorted(p.name for p in (target / "conf").iterdir()) == ["app.yaml"]


def test_host_upload_replaces_file(agent):
    target = agent.upload_root
    (target / "a.txt").write_text("old")

    result = agent.run(
        upload("up-2", file("a.txt", b"new"), target_directory=str(target))
    )

    assert result.success, result.error
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]


@pytest.mark.parametrize(
    "path",
    ["../escape.txt", "a/../../escape.txt", "/etc/escape.txt", "./a", "a//b", ""],
)
def test_host_upload_rejects_bad_paths(agent, tmp_path, path):
    result = agent.run(
        upload("up-3", file(path), target_directory=str(agent.upload_root))
    )

    assert result.error_type == "invalid_task"
    assert not (tmp_path / "escape.txt").exists()
    assert not os.path.exists("/etc/escape.txt")
    assert list(agent.upload_root.iterdir()) == []


def test_host_upload_rejects_directory_link(agent, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (agent.upload_root / "link").symlink_to(outside)

    through_path = agent.run(
        upload("up-4", file("link/x.txt"), target_directory=str(agent.upload_root))
    )
    through_target = agent.run(
        upload("up-5", file("x.txt"), target_directory=str(agent.upload_root / "link"))
    )

    assert through_path.error_type == "invalid_task"
    assert "symbolic link" in through_path.error
    assert through_target.error_type == "invalid_task"
    assert "symbolic link" in through_target.error
    assert list(outside.iterdir()) == []


def test_host_upload_rejects_file_link(agent, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (agent.upload_root / "config.txt").symlink_to(victim)

    result = agent.run(
        upload("up-6", file("config.txt"), target_directory=str(agent.upload_root))
    )

    assert result.error_type == "invalid_task"
    assert victim.read_text() == "keep"
    assert (agent.upload_root / "config.txt").is_symlink()


def test_host_upload_checks_all_before_writing(agent, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (agent.upload_root / "link").symlink_to(outside)

    result = agent.run(
        upload(
            "up-7",
            file("first.txt"),
            file("link/second.txt"),
            target_directory=str(agent.upload_root),
        )
    )

    assert result.error_type == "invalid_task"
    assert not (agent.upload_root / "first.txt").exists()


def test_host_upload_outside_roots(agent, tmp_path):
    outside = agent.run(
        upload("up-8", file("x.txt"), target_directory=str(tmp_path / "elsewhere"))
    )
    dotted = agent.run(
        upload(
            "up-9",
            file("x.txt"),
            target_directory=f"{agent.upload_root}/../elsewhere",
        )
    )

    assert outside.error_type == "invalid_task"
    assert "outside the directories" in outside.error
    assert dotted.error_type == "invalid_task"
    assert not (tmp_path / "elsewhere").exists()


def test_host_upload_disabled_without_roots(tmp_path, test_images):
    agent = TaskAgent(
        tmp_path, test_images["tools:v1"].reference, tasks={"upload_roots": []}
    )

    result = agent.run(
        upload("up-10", file("x.txt"), target_directory=str(agent.upload_root))
    )

    assert result.error_type == "invalid_task"
    assert "none are configured" in result.error


def test_host_upload_limits_and_digests(tmp_path, test_images):
    agent = TaskAgent(
        tmp_path, test_images["tools:v1"].reference, tasks={"max_upload_bytes": 10}
    )
    root = str(agent.upload_root)

    too_big = agent.run(
        upload(
            "up-11", file("a", b"123456"), file("b", b"123456"), target_directory=root
        )
    )
    wrong_digest = agent.run(
        upload("up-12", file("a", b"12", sha256="0" * 64), target_directory=root)
    )
    setuid = agent.run(
        upload("up-13", file("a", b"1", mode=0o4755), target_directory=root)
    )
    named_owner = agent.run(
        upload("up-14", file("a", b"1", owner="root"), target_directory=root)
    )
    duplicate = agent.run(
        upload("up-15", file("a", b"1"), file("a", b"2"), target_directory=root)
    )

    assert too_big.error_type == "invalid_task"
    assert "max_upload_bytes" in too_big.error
    assert wrong_digest.error_type == "digest_mismatch"
    assert setuid.error_type == "invalid_task"
    assert named_owner.error_type == "invalid_task"
    assert duplicate.error_type == "invalid_task"
    assert list(agent.upload_root.iterdir()) == []


def test_container_upload_writes_files(
    agent, test_images, container_name, docker_client
):
    container = run_tools_container(
        docker_client, test_images["tools:v1"].reference, container_name
    )

    result = agent.run(
        upload(
            "upc-1",
            file("conf/app.env", b"A=1\n", mode=0o640, owner="1234:99"),
            file("top.txt", b"top\n"),
            container_name=container_name,
            container_directory="/srv/app",
        )
    )

    assert result.success, result.error
    assert result.outputs["container_directory"] == "/srv/app"
    listing = container.exec_run(
        ["stat", "-c", "%n %a %u %g", "/srv/app/conf/app.env", "/srv/app/top.txt"]
    ).output.decode()
    assert "/srv/app/conf/app.env 640 1234 99" in listing
    assert "/srv/app/top.txt 644 0 0" in listing
    assert container.exec_run(["cat", "/srv/app/conf/app.env"]).output == b"A=1\n"


def test_container_upload_rejects_links(
    agent, test_images, container_name, docker_client
):
    container = run_tools_container(
        docker_client, test_images["tools:v1"].reference, container_name
    )
    container.exec_run(["mkdir", "-p", "/srv/app"])
    container.exec_run(["ln", "-s", "/etc", "/srv/app/link"])
    container.exec_run(["ln", "-s", "/etc/hostname", "/srv/app/name"])

    through_dir = agent.run(
        upload(
            "upc-2",
            file("link/evil.txt"),
            container_name=container_name,
            container_directory="/srv/app",
        )
    )
    onto_link = agent.run(
        upload(
            "upc-3",
            file("name"),
            container_name=container_name,
            container_directory="/srv/app",
        )
    )
    dotted = agent.run(
        upload(
            "upc-4",
            file("../../etc/evil.txt"),
            container_name=container_name,
            container_directory="/srv/app",
        )
    )

    assert through_dir.error_type == "invalid_task"
    assert "symbolic link" in through_dir.error
    assert onto_link.error_type == "invalid_task"
    assert dotted.error_type == "invalid_task"
    assert container.exec_run(["test", "-e", "/etc/evil.txt"]).exit_code == 1


def test_container_upload_missing_container(agent, container_name):
    result = agent.run(
        upload(
            "upc-5",
            file("x"),
            container_name=container_name,
            container_directory="/srv",
        )
    )

    assert result.error_type == "not_found"
