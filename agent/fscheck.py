"""Read-only file system checks of a restored disk image: what a restore drill proves.

Each file system on the image is found by probing its bytes (`blkid -p`, never a name or a
label) and checked by its own tool in no-change mode: ext2/3/4 with `e2fsck -fn`, XFS with
`xfs_repair -n`. Nothing is mounted and nothing is written: the checker reads the image
through a descriptor the agent holds (`/dev/fd/N`), so what is checked is exactly what was
restored. A file system is clean only when its checker exits 0; one the checker cannot even
read (a damaged superblock: e2fsck exits 8) is damaged too. A file system no checker here
knows, or a disk holding none, is `unchecked`, which a drill reports as a warning.

Partitions: the image's partition table is read by `agent.partitions` (GPT and MBR, in
Python: the table is untrusted input, and the kernel here finds no partitions on a loop
device), and each partition is checked through a read-only loop device over that descriptor,
mapped by the partition's offset and size (`losetup --read-only --offset --sizelimit`),
detached when its check ends, also when the drill is cancelled. A table that cannot be read
is damage; what the reader noted about one it could read (a damaged primary GPT, the backup
used) is a warning. A disk without a table is checked whole.

Checks run as child processes that a cancelled drill kills; each has `CHECK_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from agent.partitions import PartitionTable, read_partition_table
from shared.errors import CorruptData
from shared.rpc import agent_pb2

log = logging.getLogger(__name__)

CHECK_SECONDS = 3 * 3600.0  # one file system's check, at most
COMMAND_SECONDS = 300.0  # one blkid or losetup
TAIL_LINES = 20
TAIL_CHARS = 2000

CLEAN, DAMAGED, UNCHECKED = "clean", "damaged", "unchecked"

# fstype (as blkid names it) → the read-only check; "{dev}" is the image's /dev/fd path, or
# a loop device of one of its partitions.
CHECKERS: dict[str, tuple[str, ...]] = {
    "ext2": ("e2fsck", "-fn", "{dev}"),
    "ext3": ("e2fsck", "-fn", "{dev}"),
    "ext4": ("e2fsck", "-fn", "{dev}"),
    "xfs": ("xfs_repair", "-n", "-f", "{dev}"),
}


@dataclass(frozen=True)
class Region:
    """A stretch of the disk that may hold a file system."""

    where: str  # "whole disk", "partition N"
    offset: int
    size: int


@dataclass(frozen=True)
class FsCheck:
    """One file system's read-only check."""

    where: str
    fstype: str
    command: str
    exit_code: int
    verdict: str  # clean, damaged, unchecked
    output_tail: str

    def to_proto(self) -> agent_pb2.FileSystemCheck:
        return agent_pb2.FileSystemCheck(
            where=self.where,
            fstype=self.fstype,
            command=self.command,
            exit_code=self.exit_code,
            verdict=self.verdict,
            output_tail=self.output_tail,
        )


def tail(output: str) -> str:
    """The last lines of a checker's output (blank ones left out), bounded."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    return "\n".join(lines[-TAIL_LINES:])[-TAIL_CHARS:]


async def _run(argv: list[str], fd: int, seconds: float = CHECK_SECONDS) -> tuple[int, str]:
    """Run a command with the image's descriptor; its exit code and its output (out and err
    together, in order). Killed if cancelled or past `seconds`."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        pass_fds=(fd,),
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), seconds)
    except TimeoutError:
        process.kill()
        await process.wait()
        return -1, f"{argv[0]} did not finish within {seconds:g} s"
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def probe(device: str, fd: int) -> dict[str, str]:
    """What blkid finds on `device`: TYPE (a file system) or PTTYPE (a partition table)."""
    code, output = await _run(["blkid", "-p", "-o", "export", device], fd, COMMAND_SECONDS)
    if code != 0:  # 2: nothing recognised
        return {}
    found = {}
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found[key] = value
    return found


def regions(table: PartitionTable, size: int) -> list[Region]:
    """Where file systems may lie: each partition, or the whole disk when it has no table."""
    if table.scheme == "none":
        return [Region("whole disk", 0, size)]
    return [Region(f"partition {p.number}", p.offset, p.size) for p in table.partitions]


@contextlib.asynccontextmanager
async def _attached(fd: int, region: Region) -> AsyncIterator[str]:
    """A read-only loop device over `region` of the image open at `fd`; detached on the way
    out, whatever happened (a cancel waits for the detach: a leaked device would keep the
    deleted image alive)."""
    code, output = await _run(
        ["losetup", "--read-only", "--find", "--show", "--offset", str(region.offset),
         "--sizelimit", str(region.size), f"/dev/fd/{fd}"],
        fd, COMMAND_SECONDS,
    )  # fmt: skip
    if code != 0:
        raise OSError(f"losetup: {output.strip()}")
    device = output.strip()
    try:
        yield device
    finally:
        detach = asyncio.ensure_future(_run(["losetup", "--detach", device], fd, COMMAND_SECONDS))
        try:
            await asyncio.shield(detach)
        except asyncio.CancelledError:
            await detach
            raise
        if detach.result()[0] != 0:
            log.error("could not detach %s: %s", device, detach.result()[1].strip())


async def _check_device(where: str, device: str, fd: int) -> FsCheck:
    """Check the file system on `device` (the image's /dev/fd path, or a loop device of one
    of its partitions)."""
    found = await probe(device, fd)
    fstype = found.get("TYPE", "")
    if not fstype:
        table = found.get("PTTYPE")
        why = (
            f"a partition table ({table}) that Coffer cannot read"
            if table
            else "no file system found on it"
        )
        return FsCheck(where, "", "", 0, UNCHECKED, why)
    checker = CHECKERS.get(fstype)
    if checker is None:
        return FsCheck(where, fstype, "", 0, UNCHECKED, f"no read-only checker for {fstype}")
    argv = [part.format(dev=device) for part in checker]
    code, output = await _run(argv, fd)
    command = " ".join(part for part in checker if part != "{dev}")
    verdict = CLEAN if code == 0 else DAMAGED
    return FsCheck(where, fstype, command, code, verdict, tail(output))


async def _check_region(fd: int, region: Region) -> FsCheck:
    if region.where == "whole disk":
        return await _check_device(region.where, f"/dev/fd/{fd}", fd)
    try:
        async with _attached(fd, region) as device:
            return await _check_device(region.where, device, fd)
    except OSError as exc:
        return FsCheck(region.where, "", "", 0, UNCHECKED, f"could not attach it: {exc}")


async def check_image(fd: int, size: int) -> list[FsCheck]:
    """Check every file system of the image open at `fd` (`size` bytes), read-only."""
    try:
        table = await asyncio.to_thread(
            read_partition_table, lambda offset, length: os.pread(fd, length, offset), size
        )
    except CorruptData as exc:
        return [FsCheck("partition table", "", "", 0, DAMAGED, exc.message)]
    checks = []
    if table.notes:
        checks.append(
            FsCheck("partition table", table.scheme, "", 0, UNCHECKED, "; ".join(table.notes))
        )
    for region in regions(table, size):
        checks.append(await _check_region(fd, region))
    return checks
