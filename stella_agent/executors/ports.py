"""Parsing of published ports and mounts, as written in DeployConfig.

Both parsers reject bad values with an ``InvalidTaskError`` that names the
value, before the deploy touches anything. Their results convert to the forms
the Docker SDK takes: ``ports=`` of ``containers.create`` (a mapping from
"port/proto" to a list of bindings) and ``volumes=`` (a list of
"source:target:mode" bind strings).
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass

from stella_agent.errors import InvalidTaskError

PROTOCOLS = ("tcp", "udp")
MAX_PORT = 65535
# Docker's rule for volume names.
VOLUME_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
_DIGITS = re.compile(r"^[0-9]+$")


@dataclass(frozen=True)
class PortMapping:
    """One published port: a container port and where the host exposes it."""

    container_port: int
    protocol: str
    host_ip: str | None = None
    """Host address to bind; None binds all addresses."""
    host_port: int | None = None
    """Host port; None lets Docker pick a free one."""

    @property
    def key(self) -> str:
        """The "port/proto" key the Docker SDK uses."""
        return f"{self.container_port}/{self.protocol}"

    def binding(self) -> dict[str, str]:
        """Return the binding in the Docker API's HostIp/HostPort form."""
        return {
            "HostIp": self.host_ip or "",
            "HostPort": "" if self.host_port is None else str(self.host_port),
        }


@dataclass(frozen=True)
class VolumeMount:
    """One mount: a host path (bind) or a named volume, at a container path."""

    source: str
    target: str
    read_only: bool = False

    @property
    def is_bind(self) -> bool:
        """True for a host path, False for a named volume."""
        return self.source.startswith("/")

    def bind_string(self) -> str:
        """Return the "source:target:mode" string of the Docker API."""
        mode = "ro" if self.read_only else "rw"
        return f"{self.source}:{self.target}:{mode}"


def parse_port(spec: str) -> PortMapping:
    """Parse "[ip:]host:container[/proto]" or "container[/proto]".

    An IPv6 host address goes in brackets ("[::1]:8080:80"). An empty host
    port after an address ("127.0.0.1::80") lets Docker pick the host port.
    """
    text = spec.strip()
    if not text:
        raise _port_error(spec, "it is empty")

    rest, protocol = text, "tcp"
    if "/" in text:
        rest, _, protocol = text.rpartition("/")
        protocol = protocol.lower()
        if protocol not in PROTOCOLS:
            raise _port_error(spec, f"protocol {protocol!r} is not tcp or udp")

    host_ip: str | None = None
    if rest.startswith("["):
        address, bracket, after = rest[1:].partition("]")
        if not bracket or not after.startswith(":"):
            raise _port_error(spec, "expected [ipv6]:host_port:container_port")
        host_ip = _parse_ip(spec, address, version=6)
        parts = after[1:].split(":")
        if len(parts) != 2:
            raise _port_error(spec, "expected [ipv6]:host_port:container_port")
        host_text, container_text = parts
    else:
        parts = rest.split(":")
        if len(parts) == 1:
            host_text, container_text = None, parts[0]
        elif len(parts) == 2:
            host_text, container_text = parts
            if not host_text:
                raise _port_error(spec, "the host port before ':' is empty")
        elif len(parts) == 3:
            host_ip = _parse_ip(spec, parts[0], version=4)
            host_text, container_text = parts[1], parts[2]
        else:
            raise _port_error(
                spec,
                "too many ':'; write an IPv6 address in brackets, as [::1]:8080:80",
            )

    container_port = _parse_port_number(spec, container_text, "container port")
    host_port = None
    if host_text:
        host_port = _parse_port_number(spec, host_text, "host port")
    return PortMapping(container_port, protocol, host_ip, host_port)


def parse_ports(specs: Iterable[str]) -> list[PortMapping]:
    """Parse every port spec and reject two that bind the same host port."""
    mappings = [parse_port(spec) for spec in specs]
    for index, mapping in enumerate(mappings):
        for earlier in mappings[:index]:
            if _same_host_port(mapping, earlier):
                raise InvalidTaskError(
                    f"ports publish host port {mapping.host_port}/{mapping.protocol} "
                    "twice on overlapping addresses; give each binding its own host port"
                )
    return mappings


def port_bindings(mappings: Iterable[PortMapping]) -> dict[str, list[dict[str, str]]]:
    """Group mappings by container port, as ``containers.create(ports=...)``
    takes them."""
    bindings: dict[str, list[dict[str, str]]] = {}
    for mapping in mappings:
        bindings.setdefault(mapping.key, []).append(mapping.binding())
    return bindings


def parse_volume(spec: str) -> VolumeMount:
    """Parse "source:target[:ro|rw]".

    A source starting with "/" is a host path, anything else a named volume.
    The target must be an absolute path other than "/". Paths containing ".."
    are rejected so that the mount that runs is the one written in the task.
    """
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise _volume_error(spec, "expected source:target or source:target:ro|rw")
    source, target = parts[0], parts[1]
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise _volume_error(spec, f"mode {mode!r} is not ro or rw")

    if not source:
        raise _volume_error(spec, "the source is empty")
    if source.startswith("/"):
        _check_path(spec, source, "source")
        source = posixpath.normpath(source)
    elif not VOLUME_NAME_PATTERN.match(source):
        raise _volume_error(
            spec,
            f"source {source!r} is neither an absolute host path nor a volume name "
            "(letters, digits, '_', '.' or '-', at least 2 characters)",
        )

    if not target.startswith("/"):
        raise _volume_error(spec, f"target {target!r} is not an absolute path")
    _check_path(spec, target, "target")
    target = posixpath.normpath(target)
    if target == "/":
        raise _volume_error(spec, "the target must not be '/'")
    return VolumeMount(source, target, read_only=mode == "ro")


def parse_volumes(specs: Iterable[str]) -> list[VolumeMount]:
    """Parse every mount spec and reject two mounts at the same target."""
    mounts: list[VolumeMount] = []
    targets: set[str] = set()
    for spec in specs:
        mount = parse_volume(spec)
        if mount.target in targets:
            raise _volume_error(spec, f"target {mount.target} is mounted twice")
        targets.add(mount.target)
        mounts.append(mount)
    return mounts


def _parse_port_number(spec: str, text: str, field: str) -> int:
    if "-" in text:
        raise _port_error(spec, "port ranges are not supported; list each port")
    if not _DIGITS.match(text):
        raise _port_error(spec, f"{field} {text!r} is not a number")
    number = int(text)
    if not 1 <= number <= MAX_PORT:
        raise _port_error(spec, f"{field} {number} is outside 1-{MAX_PORT}")
    return number


def _parse_ip(spec: str, text: str, *, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise _port_error(spec, f"host address {text!r} is not an IP address") from None
    if address.version != version:
        hint = (
            "put IPv6 addresses in brackets" if version == 4 else "use an IPv6 address"
        )
        raise _port_error(spec, f"host address {text!r} is not valid here; {hint}")
    return str(address)


def _same_host_port(first: PortMapping, second: PortMapping) -> bool:
    if first.host_port is None or first.host_port != second.host_port:
        return False
    if first.protocol != second.protocol:
        return False
    wildcard = (None, "0.0.0.0", "::")
    if first.host_ip in wildcard or second.host_ip in wildcard:
        return True
    return first.host_ip == second.host_ip


def _check_path(spec: str, path: str, field: str) -> None:
    if ".." in path.split("/"):
        raise _volume_error(spec, f"{field} {path!r} must not contain '..'")
    if "\0" in path:
        raise _volume_error(spec, f"{field} contains a NUL character")


def _port_error(spec: str, reason: str) -> InvalidTaskError:
    return InvalidTaskError(
        f"port {spec[:100]!r} is invalid: {reason}; "
        "expected [ip:]host_port:container_port[/tcp|udp] or container_port[/tcp|udp]"
    )


def _volume_error(spec: str, reason: str) -> InvalidTaskError:
    return InvalidTaskError(f"volume {spec[:200]!r} is invalid: {reason}")
