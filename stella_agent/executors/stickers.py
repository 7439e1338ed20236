"""The version sticker: a JSON file that records what is deployed on a target.

The JSON object has the field names of the ``VersionSticker`` message. It is
kept in one of two places:

- ``host``: a file on the host, written atomically through directory
  descriptors (see ``confined_fs``). A path that a task names must lie under
  the directory of the configured ``sticker.path`` or under one of
  ``tasks.upload_roots``; reading is confined the same way, so read-sticker
  cannot read arbitrary host files.
- ``volume``: a file in a named Docker volume, which containers mount at
  /var/stella. The agent writes it through the Docker API only: the JSON goes
  into a tar archive that ``put_archive`` unpacks into a helper container
  (created from the tool image, ``hooks.image``, with the volume mounted) as a
  temporary file, and the helper then runs ``["mv", "-f", temporary, path]``,
  an argument vector of names the agent generated. Reading uses
  ``get_archive`` on a helper that never starts. No sticker content is ever
  part of a command.

Every successful deploy and rollback writes the sticker; see
``write_release_sticker``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import docker.errors
import docker.types
from google.protobuf import json_format

from stella.agent.v1 import task_pb2
from stella_agent.config import AgentConfig
from stella_agent.errors import DockerError, InvalidTaskError, NotFoundError, TaskError
from stella_agent.executors.base import Outcome, TaskContext
from stella_agent.executors.confined_fs import (
    locate_under_roots,
    open_directory,
    open_root,
    read_file_at,
    split_absolute_path,
    write_file_at,
)
from stella_agent.executors.container_spec import (
    LABEL_AGENT_ID,
    LABEL_DEPLOYED_AT,
    LABEL_DIGEST,
    LABEL_IMAGE,
    LABEL_MANAGED,
    LABEL_RELEASE_ID,
    LABEL_RELEASE_NAME,
    LABEL_ROLE,
    LABEL_TASK_ID,
)
from stella_agent.executors.docker_errors import DOCKER_EXCEPTIONS, docker_error
from stella_agent.executors.sandbox import (
    SandboxSpec,
    ensure_image,
    run_sandbox,
    tool_image,
)

HOST = "host"
VOLUME = "volume"
VOLUME_MOUNT = "/var/stella"
"""Mount point of a sticker volume in containers."""
DEFAULT_VOLUME_PATH = "/var/stella/version.json"
STICKER_FILE_MODE = 0o644
MAX_STICKER_BYTES = 1024 * 1024
HELPER_TIMEOUT_SECONDS = 60.0
VOLUME_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,254}$")
CONTAINER_ID_KEY = "container_id"
"""Metadata key of the container the sticker describes."""
WRITTEN_BY_KEY = "written_by"
"""Metadata key of the task type that wrote the sticker."""


class InvalidStickerError(TaskError):
    """The sticker file exists but is not a valid VersionSticker document."""

    error_type = "invalid_sticker"


@dataclass(frozen=True)
class StickerLocation:
    """The location of one sticker."""

    kind: str
    """HOST or VOLUME."""
    path: str
    """Absolute path: on the host, or in the volume as mounted at /var/stella."""
    volume: str = ""

    def describe(self) -> str:
        """Return the location for messages."""
        if self.kind == VOLUME:
            return f"{self.path} in volume {self.volume}"
        return f"host file {self.path}"

    def outputs(self) -> dict[str, str]:
        """Return the location as result outputs."""
        return {
            "sticker_location": self.kind,
            "sticker_path": self.path,
            "sticker_volume": self.volume,
        }


def resolve_location(
    requested: task_pb2.StickerConfig | None, config: AgentConfig
) -> StickerLocation:
    """Merge the task's sticker settings with the agent's defaults and check them."""
    defaults = config.sticker
    kind = defaults.location
    path = ""
    volume = ""
    if requested is not None:
        if requested.location == task_pb2.STICKER_LOCATION_HOST:
            kind = HOST
        elif requested.location == task_pb2.STICKER_LOCATION_VOLUME:
            kind = VOLUME
        path = requested.path
        volume = requested.volume

    if kind == VOLUME:
        if not path:
            under_mount = defaults.path.startswith(VOLUME_MOUNT + "/")
            path = defaults.path if under_mount else DEFAULT_VOLUME_PATH
        components = split_absolute_path(path, "sticker path")
        if components[:2] != ["var", "stella"] or len(components) < 3:
            raise InvalidTaskError(
                f"sticker path {path[:200]!r} must lie under {VOLUME_MOUNT} when the "
                "sticker is in a volume"
            )
        volume = volume or defaults.volume
        if not VOLUME_NAME_PATTERN.match(volume):
            raise InvalidTaskError(
                f"sticker volume {volume[:100]!r} is not a valid volume name"
            )
        return StickerLocation(VOLUME, "/" + "/".join(components), volume)

    if volume:
        raise InvalidTaskError(
            "sticker volume is set but the sticker location is host; set location "
            "to STICKER_LOCATION_VOLUME or leave volume empty"
        )
    path = path or defaults.path
    components = split_absolute_path(path, "sticker path")
    if not components:
        raise InvalidTaskError("sticker path must name a file, not /")
    return StickerLocation(HOST, "/" + "/".join(components))


def sticker_json(sticker: task_pb2.VersionSticker) -> bytes:
    """Return the sticker as the JSON document that is written."""
    text = json_format.MessageToJson(
        sticker, preserving_proto_field_name=True, sort_keys=True, indent=2
    )
    return (text + "\n").encode("utf-8")


def parse_sticker(data: bytes, where: str) -> task_pb2.VersionSticker:
    """Parse a sticker document; raise InvalidStickerError when it is not one."""
    sticker = task_pb2.VersionSticker()
    try:
        json_format.Parse(data.decode("utf-8"), sticker, ignore_unknown_fields=True)
    except (UnicodeDecodeError, json_format.ParseError) as exc:
        raise InvalidStickerError(
            f"the sticker at {where} is not a valid version sticker: {exc}"
        ) from None
    return sticker


def write_sticker(
    context: TaskContext,
    client: Any,
    location: StickerLocation,
    sticker: task_pb2.VersionSticker,
) -> str:
    """Write the sticker and return the sha256 of the written document."""
    data = sticker_json(sticker)
    if location.kind == VOLUME:
        _write_volume(context, client, location, data)
    else:
        _write_host(context.config, location, data)
    context.log.info("wrote the version sticker to %s", location.describe())
    return hashlib.sha256(data).hexdigest()


def read_sticker(
    context: TaskContext, client: Any, location: StickerLocation
) -> task_pb2.VersionSticker:
    """Read the sticker; raise NotFoundError when there is none."""
    if location.kind == VOLUME:
        data = _read_volume(context, client, location)
    else:
        data = _read_host(context.config, location)
    return parse_sticker(data, location.describe())


def sticker_outputs(sticker: task_pb2.VersionSticker) -> dict[str, str]:
    """Return the sticker as flat result outputs plus the whole document."""
    outputs = {
        "release_id": sticker.release_id,
        "release_name": sticker.release_name,
        "image": sticker.image,
        "digest": sticker.digest,
        "task_id": sticker.task_id,
        "container_name": sticker.container_name,
        "project_name": sticker.project_name,
        "deployed_at": "",
        "sticker": sticker_json(sticker).decode("utf-8"),
    }
    if sticker.HasField("deployed_at"):
        outputs["deployed_at"] = sticker.deployed_at.ToJsonString()
    return outputs


def container_sticker(
    container: Any, task_id: str, written_by: str
) -> task_pb2.VersionSticker:
    """Build the sticker of a container deployed by the agent, from its labels."""
    labels = container.labels or {}
    sticker = task_pb2.VersionSticker(
        release_id=labels.get(LABEL_RELEASE_ID, ""),
        release_name=labels.get(LABEL_RELEASE_NAME, ""),
        image=labels.get(LABEL_IMAGE, ""),
        digest=labels.get(LABEL_DIGEST, ""),
        task_id=task_id,
        container_name=container.name,
        metadata={CONTAINER_ID_KEY: container.id, WRITTEN_BY_KEY: written_by},
    )
    deployed_at = labels.get(LABEL_DEPLOYED_AT, "")
    if deployed_at:
        try:
            sticker.deployed_at.FromJsonString(deployed_at)
        except ValueError:
            sticker.metadata["deployed_at_label"] = deployed_at
    else:
        sticker.deployed_at.FromDatetime(datetime.now(UTC))
    return sticker


def write_release_sticker(
    context: TaskContext,
    client: Any,
    container_id: str,
    requested: task_pb2.StickerConfig | None,
    written_by: str,
) -> dict[str, str]:
    """Write the sticker of the container a deploy or rollback left running.

    Returns outputs for the result. A failure is reported in the outputs
    (``sticker_error``) and the task log, not raised, because the release
    already runs healthy and undoing it for a sticker would do more harm.
    The task stays in its finalize phase, so crash recovery treats the release
    as done.
    """
    try:
        location = resolve_location(requested, context.config)
        container = client.containers.get(container_id)
        sticker = container_sticker(container, context.task.id, written_by)
        write_sticker(context, client, location, sticker)
    except TaskError as exc:
        context.log.info("writing the version sticker failed: %s", exc.message)
        return {"sticker_error": exc.message}
    except DOCKER_EXCEPTIONS as exc:
        message = docker_error(exc, "read the deployed container's labels").message
        context.log.info("writing the version sticker failed: %s", message)
        return {"sticker_error": message}
    return location.outputs()


def write_sticker_task(context: TaskContext, client: Any) -> Outcome:
    """Run a write-sticker task: write the payload's sticker as given."""
    payload = context.task.write_sticker
    context.set_phase("validate")
    if not payload.HasField("sticker"):
        raise InvalidTaskError("write_sticker.sticker is required")
    requested = payload.location if payload.HasField("location") else None
    location = resolve_location(requested, context.config)
    context.set_phase("write")
    sha256 = write_sticker(context, client, location, payload.sticker)
    return Outcome(outputs={**location.outputs(), "sha256": sha256})


def read_sticker_task(context: TaskContext, client: Any) -> Outcome:
    """Run a read-sticker task; NotFoundError when there is no sticker."""
    payload = context.task.read_sticker
    context.set_phase("validate")
    requested = payload.location if payload.HasField("location") else None
    location = resolve_location(requested, context.config)
    context.set_phase("read")
    sticker = read_sticker(context, client, location)
    context.log.info("read the version sticker from %s", location.describe())
    return Outcome(outputs={**location.outputs(), **sticker_outputs(sticker)})


# Host


def _host_roots(config: AgentConfig) -> list[str]:
    return [os.path.dirname(config.sticker.path), *config.tasks.upload_roots]


def _write_host(config: AgentConfig, location: StickerLocation, data: bytes) -> None:
    root, components = locate_under_roots(
        location.path, _host_roots(config), "sticker path"
    )
    create_root = root == os.path.dirname(config.sticker.path)
    root_fd = open_root(root, create=create_root)
    try:
        directory_fd = open_directory(
            root_fd, components[:-1], create=True, shown=location.path
        )
    finally:
        os.close(root_fd)
    try:
        write_file_at(
            directory_fd,
            components[-1],
            data,
            STICKER_FILE_MODE,
            shown=location.path,
        )
    finally:
        os.close(directory_fd)


def _read_host(config: AgentConfig, location: StickerLocation) -> bytes:
    root, components = locate_under_roots(
        location.path, _host_roots(config), "sticker path"
    )
    missing = f"no version sticker at {location.describe()}"
    try:
        root_fd = open_root(root, create=False)
    except NotFoundError:
        raise NotFoundError(missing) from None
    try:
        directory_fd = open_directory(
            root_fd, components[:-1], create=False, shown=location.path
        )
    except NotFoundError:
        raise NotFoundError(missing) from None
    finally:
        os.close(root_fd)
    try:
        return read_file_at(
            directory_fd, components[-1], MAX_STICKER_BYTES, shown=location.path
        )
    except NotFoundError:
        raise NotFoundError(missing) from None
    finally:
        os.close(directory_fd)


# Volume


def _volume_mount(volume: str, read_only: bool) -> docker.types.Mount:
    return docker.types.Mount(
        target=VOLUME_MOUNT, source=volume, type="volume", read_only=read_only
    )


def _ensure_volume(context: TaskContext, client: Any, volume: str) -> None:
    try:
        client.volumes.get(volume)
        return
    except docker.errors.NotFound:
        pass
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"inspect volume {volume}") from None
    context.log.info("creating volume %s for the version sticker", volume)
    labels = {LABEL_MANAGED: "true", LABEL_ROLE: "sticker"}
    try:
        client.volumes.create(name=volume, labels=labels)
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"create volume {volume}") from None


def _write_volume(
    context: TaskContext, client: Any, location: StickerLocation, data: bytes
) -> None:
    _ensure_volume(context, client, location.volume)
    # "var/stella/<rest>": the archive is unpacked at the mount point.
    relative = split_absolute_path(location.path, "sticker path")[2:]
    temporary = f".{relative[-1][:200]}.stella-{uuid.uuid4().hex[:12]}.tmp"
    temporary_relative = [*relative[:-1], temporary]
    archive = _single_file_tar("/".join(temporary_relative), data)

    def put_file(container: Any) -> None:
        try:
            container.put_archive(VOLUME_MOUNT, archive)
        except DOCKER_EXCEPTIONS as exc:
            raise docker_error(
                exc, f"copy the sticker into volume {location.volume}"
            ) from None

    spec = SandboxSpec(
        image=tool_image(context),
        command=[
            "mv",
            "-f",
            "/".join([VOLUME_MOUNT, *temporary_relative]),
            location.path,
        ],
        role="sticker",
        description="sticker helper",
        timeout_seconds=HELPER_TIMEOUT_SECONDS,
        mounts=[_volume_mount(location.volume, read_only=False)],
        # The volume may belong to another user than root.
        cap_add=["DAC_OVERRIDE"],
    )
    result = run_sandbox(context, client, spec, before_start=put_file)
    if result.exit_code != 0 or result.timed_out:
        raise DockerError(
            f"moving the sticker into place in volume {location.volume} failed "
            f"(exit code {result.exit_code}): {result.output_text()}"
        )


def _read_volume(context: TaskContext, client: Any, location: StickerLocation) -> bytes:
    try:
        client.volumes.get(location.volume)
    except docker.errors.NotFound:
        raise NotFoundError(
            f"no version sticker at {location.describe()}: the volume does not exist"
        ) from None
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"inspect volume {location.volume}") from None

    image = tool_image(context)
    ensure_image(context, client, image)
    # The helper is created but never started: get_archive reads the volume
    # through it.
    try:
        helper = client.containers.create(
            image=image,
            command=["true"],
            name=f"stella-sticker-{uuid.uuid4().hex[:12]}",
            labels={
                LABEL_MANAGED: "true",
                LABEL_ROLE: "sticker",
                LABEL_TASK_ID: context.task.id,
                LABEL_AGENT_ID: context.config.agent_id,
            },
            network_mode="none",
            mounts=[_volume_mount(location.volume, read_only=True)],
        )
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, "create the sticker helper container") from None
    try:
        return _get_file(helper, location)
    finally:
        try:
            helper.remove(force=True)
        except DOCKER_EXCEPTIONS as exc:
            context.log.info("could not remove the sticker helper: %s", exc)


def _get_file(helper: Any, location: StickerLocation) -> bytes:
    try:
        stream, info = helper.get_archive(location.path)
    except docker.errors.NotFound:
        raise NotFoundError(f"no version sticker at {location.describe()}") from None
    except DOCKER_EXCEPTIONS as exc:
        raise docker_error(exc, f"read {location.describe()}") from None
    if int(info.get("size") or 0) > MAX_STICKER_BYTES:
        raise InvalidStickerError(
            f"the sticker at {location.describe()} is larger than "
            f"{MAX_STICKER_BYTES} bytes"
        )
    buffer = io.BytesIO()
    for piece in stream:
        buffer.write(piece)
        if buffer.tell() > MAX_STICKER_BYTES + 64 * 1024:
            raise InvalidStickerError(
                f"the sticker at {location.describe()} is larger than "
                f"{MAX_STICKER_BYTES} bytes"
            )
    buffer.seek(0)
    with tarfile.open(fileobj=buffer, mode="r") as archive:
        member = archive.next()
        if member is None or not member.isfile():
            raise InvalidStickerError(
                f"the sticker at {location.describe()} is not a regular file"
            )
        extracted = archive.extractfile(member)
        assert extracted is not None
        return extracted.read()


def _single_file_tar(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = STICKER_FILE_MODE
        info.uid = 0
        info.gid = 0
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sticker_document(sticker: task_pb2.VersionSticker) -> dict[str, Any]:
    """Return the sticker as a JSON-ready dict (for inspect reports)."""
    return json.loads(sticker_json(sticker))
