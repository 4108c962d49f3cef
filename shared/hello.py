"""What an agent may say about its VM: the limits on every field of its hello.

An agent's hello (its VM's display name, service, region, host name, version and disks) is
stored in the catalog, shown to operators and, for the disks, bounds what the agent may send
later (an index is never larger than the disk it declared). The controller takes nothing of it
on trust: `check_hello` refuses a hello with any field out of these limits (issue 14: a 30 MB
hello with an 8 MiB host name and 20,000 disks was stored), and the agent checks its own before
it dials, so a config the controller would refuse is reported at its start. The limits are
generous for any real VM:

- display name: 1-64 printable characters (letters of any script, punctuation, spaces; no
  control characters or escape sequences, which would reach an operator's terminal);
- service and region: names (letters, digits, `.`, `_`, `-`; at most 64); the region may be
  empty (the VM then belongs to no vault's region);
- host name: at most 255 printable ASCII characters without spaces (Linux allows 64);
- agent version: at most 64 printable ASCII characters;
- disks: at most 64, each named as `shared.index.check_disk_name` says, with a path of 1-4096
  printable characters and a size of at most 16 TiB.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from shared.errors import InvalidArgument
from shared.index import check_disk_name

MAX_DISPLAY_NAME: Final = 64
MAX_HOSTNAME: Final = 255
MAX_AGENT_VERSION: Final = 64
MAX_DISKS: Final = 64
MAX_DISK_PATH: Final = 4096
MAX_DISK_BYTES: Final = 16 << 40
"""The largest disk Coffer backs up: its index (32 bytes per chunk) is 1 GiB at 512 KiB chunks."""

_GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ASCII_WORD = re.compile(r"[!-~]*")  # printable ASCII, no space


@dataclass(frozen=True)
class DeclaredDisk:
    name: str
    path: str
    size_bytes: int


def _printable(value: str, what: str, longest: int, *, empty: bool = False) -> str:
    if not value and not empty:
        raise InvalidArgument(detail=f"{what} is empty")
    if len(value) > longest:
        raise InvalidArgument(detail=f"{what} has {len(value)} characters; at most {longest}")
    if not value.isprintable():
        raise InvalidArgument(
            detail=f"{what} {value[:64]!r} holds characters that are not printable "
            "(control characters, escape sequences)"
        )
    return value


def check_display_name(name: str) -> str:
    """`name` if it can be a VM's display name; InvalidArgument otherwise."""
    return _printable(name, "the display name", MAX_DISPLAY_NAME)


def check_group_name(value: str, what: str, *, empty: bool = False) -> str:
    """`value` if it can be a service or region (`what`); InvalidArgument otherwise."""
    if (empty and value == "") or _GROUP_NAME.fullmatch(value):
        return value
    raise InvalidArgument(
        detail=f"the {what} {value[:80]!r} must be 1-64 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit"
    )


def check_hostname(hostname: str) -> str:
    if len(hostname) > MAX_HOSTNAME or not _ASCII_WORD.fullmatch(hostname):
        raise InvalidArgument(
            detail=f"the host name {hostname[:80]!r} must be at most {MAX_HOSTNAME} printable "
            "ASCII characters without spaces"
        )
    return hostname


def check_agent_version(version: str) -> str:
    if len(version) > MAX_AGENT_VERSION or not _ASCII_WORD.fullmatch(version):
        raise InvalidArgument(
            detail=f"the agent version {version[:80]!r} must be at most {MAX_AGENT_VERSION} "
            "printable ASCII characters without spaces"
        )
    return version


def check_disks(disks: Sequence[DeclaredDisk]) -> tuple[DeclaredDisk, ...]:
    """The disks a VM declares, each checked; InvalidArgument naming the first bad one."""
    if len(disks) > MAX_DISKS:
        raise InvalidArgument(detail=f"{len(disks)} disks; a VM has at most {MAX_DISKS}")
    names = [check_disk_name(disk.name) for disk in disks]
    if len(set(names)) != len(names):
        raise InvalidArgument(detail=f"disk names repeat: {names}")
    for disk in disks:
        _printable(disk.path, f"the path of disk {disk.name!r}", MAX_DISK_PATH)
        if not 0 <= disk.size_bytes <= MAX_DISK_BYTES:
            raise InvalidArgument(
                detail=f"disk {disk.name!r} of {disk.size_bytes} bytes is larger than Coffer "
                f"backs up ({MAX_DISK_BYTES >> 40} TiB)"
            )
    return tuple(disks)


def check_hello(
    *,
    name: str,
    service: str,
    region: str,
    hostname: str,
    agent_version: str,
    disks: Sequence[DeclaredDisk],
) -> None:
    """Every field of a hello within its limits (module docstring); InvalidArgument naming
    the first that is not."""
    check_display_name(name)
    check_group_name(service, "service")
    check_group_name(region, "region", empty=True)
    check_hostname(hostname)
    check_agent_version(agent_version)
    check_disks(disks)
