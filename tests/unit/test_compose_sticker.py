"""The version.json sticker of a Compose stack."""

from __future__ import annotations

import json

from stella_agent.executors.compose_sticker import write_version_file

DIGEST = "sha256:" + "1" * 64


def test_version_file_fields(tmp_path):
    path = tmp_path / "version.json"

    write_version_file(
        path,
        release_id="r7",
        release_name="spring release",
        task_id="task-7",
        deployed_at="2026-03-01T12:00:00Z",
        project_name="shop",
        service_digests={"web": DIGEST},
    )

    sticker = json.loads(path.read_text())
    assert sticker == {
        "release_id": "r7",
        "release_name": "spring release",
        "task_id": "task-7",
        "deployed_at": "2026-03-01T12:00:00Z",
        "project_name": "shop",
        "service_digests": {"web": DIGEST},
    }
    assert path.stat().st_mode & 0o777 == 0o644


def test_version_file_replaces_previous(tmp_path):
    path = tmp_path / "version.json"
    path.write_text("old")

    write_version_file(
        path,
        release_id="",
        release_name="",
        task_id="task-8",
        deployed_at="",
        project_name="shop",
        service_digests={},
    )

    sticker = json.loads(path.read_text())
    assert sticker == {"task_id": "task-8", "project_name": "shop"}
