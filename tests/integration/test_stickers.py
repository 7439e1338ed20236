"""Version stickers on the host and in a named volume, against the real engine.

The sticker content carries shell syntax; the tests check that it is stored
byte for byte and that nothing in it ran.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from stella.agent.v1 import task_pb2
from tests.conftest import TEST_LABEL, TEST_RUN
from tests.integration.task_support import TaskAgent, deploy_task, free_port, task_of

pytestmark = pytest.mark.docker


@pytest.fixture
def agent(tmp_path, test_images) -> TaskAgent:
    return TaskAgent(tmp_path, test_images["tools:v1"].reference)


@pytest.fixture
def volume(docker_client):
    name = f"stella-test-sticker-{uuid.uuid4().hex[:10]}"
    docker_client.volumes.create(name, labels={TEST_LABEL: TEST_RUN})
    yield name
    docker_client.volumes.get(name).remove(force=True)


def hostile_sticker(marker: str) -> task_pb2.VersionSticker:
    """A sticker whose strings would run commands if a shell ever saw them."""
    return task_pb2.VersionSticker(
        release_id=f"r1'\"; $(touch /tmp/pwned-{marker})",
        release_name=f"`touch /tmp/pwned-{marker}-tick` \n second line ' \"",
        image="127.0.0.1:5000/stella-test/web",
        digest="sha256:" + "a" * 64,
        task_id="t1",
        metadata={"note": f"a\nb\\c $HOME ${{IFS}} $(id) && touch /tmp/pwned-{marker}"},
    )


def volume_listing(docker_client, tools_image: str, volume: str) -> str:
    output = docker_client.containers.run(
        tools_image,
        command=["find", "/var/stella"],
        volumes={volume: {"bind": "/var/stella", "mode": "ro"}},
        network_mode="none",
        labels={TEST_LABEL: TEST_RUN},
        remove=True,
    )
    return output.decode()


def volume_file(docker_client, tools_image: str, volume: str, path: str) -> bytes:
    return docker_client.containers.run(
        tools_image,
        command=["cat", path],
        volumes={volume: {"bind": "/var/stella", "mode": "ro"}},
        network_mode="none",
        labels={TEST_LABEL: TEST_RUN},
        remove=True,
    )


def test_host_sticker_written_intact(agent):
    marker = uuid.uuid4().hex
    sticker = hostile_sticker(marker)

    written = agent.run(
        task_of("ws-1", write_sticker=task_pb2.WriteStickerPayload(sticker=sticker))
    )
    read = agent.run(task_of("rs-1", read_sticker=task_pb2.ReadStickerPayload()))

    assert written.success, written.error
    assert written.outputs["sticker_location"] == "host"
    assert written.outputs["sticker_path"] == str(agent.sticker_dir / "version.json")
    assert read.success, read.error
    assert read.outputs["release_id"] == sticker.release_id
    assert read.outputs["release_name"] == sticker.release_name
    document = json.loads((agent.sticker_dir / "version.json").read_text())
    assert document["release_id"] == sticker.release_id
    assert document["metadata"]["note"] == sticker.metadata["note"]
    assert list(Path("/tmp").glob(f"pwned-{marker}*")) == []
    mode = os.stat(agent.sticker_dir / "version.json").st_mode & 0o777
    assert mode == 0o644
    leftovers = [p.name for p in agent.sticker_dir.iterdir()]
    assert leftovers == ["version.json"]


def test_volume_sticker_written_intact(agent, volume, docker_client, test_images):
    marker = uuid.uuid4().hex
    sticker = hostile_sticker(marker)
    location = task_pb2.StickerConfig(
        location=task_pb2.STICKER_LOCATION_VOLUME,
        path="/var/stella/app/version.json",
        volume=volume,
    )
    tools = test_images["tools:v1"].reference

    written = agent.run(
        task_of(
            "wsv-1",
            write_sticker=task_pb2.WriteStickerPayload(
                location=location, sticker=sticker
            ),
        )
    )
    read = agent.run(
        task_of("rsv-1", read_sticker=task_pb2.ReadStickerPayload(location=location))
    )

    assert written.success, written.error
    assert written.outputs["sticker_volume"] == volume
    assert read.success, read.error
    assert read.outputs["release_id"] == sticker.release_id
    assert read.outputs["release_name"] == sticker.release_name
    raw = volume_file(docker_client, tools, volume, "/var/stella/app/version.json")
    assert json.loads(raw)["metadata"]["note"] == sticker.metadata["note"]
    listing = volume_listing(docker_client, tools, volume).split()
    assert sorted(listing) == [
        "/var/stella",
        "/var/stella/app",
        "/var/stella/app/version.json",
    ]
    assert list(Path("/tmp").glob(f"pwned-{marker}*")) == []
    helpers = docker_client.containers.list(
        all=True, filters={"label": ["stella.role=sticker", "stella.task.id=wsv-1"]}
    )
    assert helpers == []


def test_read_missing_host_sticker(agent):
    result = agent.run(task_of("rs-2", read_sticker=task_pb2.ReadStickerPayload()))

    assert not result.success
    assert result.error_type == "not_found"
    assert "no version sticker at host file" in result.error


def test_read_missing_volume(agent):
    location = task_pb2.StickerConfig(
        location=task_pb2.STICKER_LOCATION_VOLUME,
        volume=f"stella-test-absent-{uuid.uuid4().hex[:8]}",
    )

    result = agent.run(
        task_of("rs-3", read_sticker=task_pb2.ReadStickerPayload(location=location))
    )

    assert result.error_type == "not_found"
    assert "volume does not exist" in result.error


def test_read_missing_file_in_volume(agent, volume):
    location = task_pb2.StickerConfig(
        location=task_pb2.STICKER_LOCATION_VOLUME, volume=volume
    )

    result = agent.run(
        task_of("rs-4", read_sticker=task_pb2.ReadStickerPayload(location=location))
    )

    assert result.error_type == "not_found"
    assert volume in result.error


def test_host_sticker_outside_roots_rejected(agent):
    location = task_pb2.StickerConfig(
        location=task_pb2.STICKER_LOCATION_HOST, path="/etc/stella-version.json"
    )

    written = agent.run(
        task_of(
            "ws-3",
            write_sticker=task_pb2.WriteStickerPayload(
                location=location, sticker=task_pb2.VersionSticker(release_id="x")
            ),
        )
    )
    read = agent.run(
        task_of("rs-5", read_sticker=task_pb2.ReadStickerPayload(location=location))
    )

    assert written.error_type == "invalid_task"
    assert "outside the directories" in written.error
    assert not Path("/etc/stella-version.json").exists()
    assert read.error_type == "invalid_task"


def test_host_sticker_link_rejected(agent, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    agent.sticker_dir.mkdir()
    (agent.sticker_dir / "app").symlink_to(outside)
    location = task_pb2.StickerConfig(path=str(agent.sticker_dir / "app/version.json"))

    result = agent.run(
        task_of(
            "ws-4",
            write_sticker=task_pb2.WriteStickerPayload(
                location=location, sticker=task_pb2.VersionSticker(release_id="x")
            ),
        )
    )

    assert result.error_type == "invalid_task"
    assert "symbolic link" in result.error
    assert list(outside.iterdir()) == []


def test_invalid_sticker_reported(agent):
    agent.sticker_dir.mkdir()
    (agent.sticker_dir / "version.json").write_text("not json {")

    result = agent.run(task_of("rs-6", read_sticker=task_pb2.ReadStickerPayload()))

    assert result.error_type == "invalid_sticker"


def test_deploy_and_rollback_write_sticker(
    agent, test_images, container_name, docker_client
):
    port = free_port()
    agent.run(deploy_task("st-v1", test_images["web:v1"], container_name, port))
    second = agent.run(
        deploy_task(
            "st-v2", test_images["web:v2"], container_name, port, keep_previous=True
        )
    )
    after_deploy = json.loads((agent.sticker_dir / "version.json").read_text())

    rollback = agent.run(
        task_of(
            "st-rb",
            rollback=task_pb2.RollbackPayload(container_name=container_name),
        )
    )
    after_rollback = json.loads((agent.sticker_dir / "version.json").read_text())

    assert second.success, second.error
    assert second.outputs["sticker_path"] == str(agent.sticker_dir / "version.json")
    assert after_deploy["release_id"] == "st-v2"
    assert after_deploy["release_name"] == "release st-v2"
    assert after_deploy["digest"] == test_images["web:v2"].digest
    assert after_deploy["image"] == test_images["web:v2"].repository
    assert after_deploy["container_name"] == container_name
    assert after_deploy["task_id"] == "st-v2"
    assert after_deploy["metadata"]["container_id"] == second.outputs["container_id"]
    assert after_deploy["deployed_at"].endswith("Z")
    assert rollback.success, rollback.error
    assert after_rollback["release_id"] == "st-v1"
    assert after_rollback["digest"] == test_images["web:v1"].digest
    assert after_rollback["task_id"] == "st-rb"
    assert after_rollback["metadata"]["written_by"] == "rollback"


def test_deploy_sticker_in_volume(agent, test_images, container_name, volume):
    location = task_pb2.StickerConfig(
        location=task_pb2.STICKER_LOCATION_VOLUME, volume=volume
    )
    deployed = agent.run(
        deploy_task("stv-1", test_images["worker:v1"], container_name, sticker=location)
    )
    read = agent.run(
        task_of("stv-r", read_sticker=task_pb2.ReadStickerPayload(location=location))
    )

    assert deployed.success, deployed.error
    assert deployed.outputs["sticker_volume"] == volume
    assert "sticker_error" not in deployed.outputs
    assert read.outputs["release_id"] == "stv-1"
    assert read.outputs["container_name"] == container_name
