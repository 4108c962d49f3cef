"""Read-only file system checks of a restored disk image: what a restore drill proves.

Each file system on the image is found by probing its bytes (`blkid -p`, never a name or a
label) and checked by its own tool in no-change mode: ext2/3/4 with `e2fsck -fn`, XFS with
`xfs_repair -n`. Nothing is mounted and nothing is written: the checker reads the image
through a descriptor the agent holds (`/dev/fd/N`), so what is checked is exactly what was
restored. A file system is clean only when its checker exits 0; one the checker cannot even
read (a damaged superblock: e2fsck exits 8) is damaged too. A file system no checker here
knows, or a disk holding none, is `unchecked`, which a drill reports as a warning.

Partitions: a disk with a partition table is reported `unchecked` as a whole for now.
TODO(partitions): with `agent/partitions.py` (GPT and MBR read in Python, on the file-recovery
branch), `regions` returns one region per partition, and `_check_region` runs the checker on
a read-only loop device made with `losetup --read-only --offset --sizelimit` over the
descriptor, detached afterwards; the kernel finds no partitions on loop devices here, so each
is mapped by its offset and size.

Checks run as child processes that a cancelled drill kills; each has `CHECK_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from shared.rpc import agent_pb2

CHECK_SECONDS = 3 * 3600.0  # one file system's check, at most
TAIL_LINES = 20
TAIL_CHARS = 2000

CLEAN, DAMAGED, UNCHECKED = "clean", "damaged", "unchecked"

# fstype (as blkid names it) → the read-only check; "{dev}" is the image's /dev/fd path.
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


async def _run(argv: list[str], fd: int) -> tuple[int, str]:
    """Run a checker with the image's descriptor; its exit code and its output (out and err
    together, in order). Killed if cancelled or past `CHECK_SECONDS`."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        pass_fds=(fd,),
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), CHECK_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        return -1, f"{argv[0]} did not finish within {CHECK_SECONDS:g} s"
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def probe(fd: int) -> dict[str, str]:
    """What blkid finds on the image: TYPE (a file system) or PTTYPE (a partition table)."""
    code, output = await _run(["blkid", "-p", "-o", "export", f"/dev/fd/{fd}"], fd)
    if code != 0:  # 2: nothing recognised
        return {}
    found = {}
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found[key] = value
    return found


def regions(size: int) -> list[Region]:
    """Where file systems may lie: the whole disk (see the module note on partitions)."""
    return [Region("whole disk", 0, size)]


async def _check_region(fd: int, region: Region) -> FsCheck:
    found = await probe(fd)
    fstype = found.get("TYPE", "")
    if not fstype:
        table = found.get("PTTYPE")
        why = (
            f"a partitioned disk ({table}): its partitions are not checked yet"
            if table
            else "no file system found on it"
        )
        return FsCheck(region.where, "", "", 0, UNCHECKED, why)
    checker = CHECKERS.get(fstype)
    if checker is None:
        return FsCheck(region.where, fstype, "", 0, UNCHECKED, f"no read-only checker for {fstype}")
    argv = [part.format(dev=f"/dev/fd/{fd}") for part in checker]
    code, output = await _run(argv, fd)
    command = " ".join(part for part in checker if part != "{dev}")
    verdict = CLEAN if code == 0 else DAMAGED
    return FsCheck(region.where, fstype, command, code, verdict, tail(output))


async def check_image(fd: int, size: int) -> list[FsCheck]:
    """Check every file system of the image open at `fd` (`size` bytes), read-only."""
    return [await _check_region(fd, region) for region in regions(size)]
