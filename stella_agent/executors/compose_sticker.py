"""The version sticker of a Compose stack: ``version.json`` in its directory.

The JSON object has the field names of the VersionSticker message. This writer
only covers the stack directory; the configured sticker location
(DeployConfig.sticker) belongs to the general sticker writer.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from stella.agent.v1 import task_pb2
from stella_agent.artifacts import write_file_atomic

STICKER_FILE_MODE = 0o644


def write_version_file(
    path: Path,
    *,
    release_id: str,
    release_name: str,
    task_id: str,
    deployed_at: str,
    project_name: str,
    service_digests: Mapping[str, str],
) -> None:
    """Write the sticker of a deployed stack to `path` atomically.

    `deployed_at` is an RFC 3339 time, as in the release record.
    """
    sticker = task_pb2.VersionSticker(
        release_id=release_id,
        release_name=release_name,
        task_id=task_id,
        project_name=project_name,
        service_digests=dict(service_digests),
    )
    if deployed_at:
        stamp = Timestamp()
        stamp.FromJsonString(deployed_at)
        sticker.deployed_at.CopyFrom(stamp)
    text = json_format.MessageToJson(
        sticker, preserving_proto_field_name=True, sort_keys=True
    )
    write_file_atomic(path, (text + "\n").encode("utf-8"), STICKER_FILE_MODE)
