"""File recovery: a recovery point's disk attached read-only in the agent, its file systems
mounted without replaying their journals, everything taken down on close.

Opening a disk (`RecoveryMounts.open`):

1. the disk is a `LazyDisk` published as a file of the agent's FUSE mount (`DiskFiles`);
2. its partition table is read from that file (`agent.partitions`; the kernel may find no
   partitions on a loop device, and the table is untrusted input);
3. each partition (or the whole disk, when it has no table) is attached as a read-only loop
   device by offset and size (`losetup --read-only --offset --sizelimit`), probed (`blkid -p`),
   and mounted `ro,nosuid,nodev,noexec` with what keeps the file system from writing or
   replaying anything: `noload` for ext3/ext4, `norecovery` for XFS (and `nouuid`: the VM may
   have the same file system mounted right now). A partition that holds no supported file
   system (swap, LVM, a BIOS boot partition) is listed in `skipped` with the reason.

Mounts live under `<work_dir>/mounts/<name>/<partition>` (mode 0700), in the agent's own mount
namespace; the FUSE files under `<work_dir>/disks`. Closing unmounts, detaches the loop
devices and withdraws the file in reverse order, also after errors and cancellation; an agent
that died with recovery points open has what it left swept on its next start.

Why here and never in the controller: mounting a file system makes the kernel parse it, and a
crafted file system is an attack on the kernel that mounts it. Only an agent, inside the VM
whose data it is (or a VM the operator chose), ever mounts one (docs/file-recovery.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from agent.chunk_cache import ChunkCache
from agent.chunk_source import ChunkSource
from agent.lazy_disk import LazyDisk
from agent.partitions import Partition, PartitionTable, read_partition_table

if TYPE_CHECKING:
    from agent.disk_files import DiskFiles
from shared.digest import ChunkHash
from shared.errors import (
    CofferError,
    Conflict,
    CorruptData,
    FileRecoveryFailed,
    InvalidArgument,
    NotFound,
)
from shared.index import DiskIndex

log = logging.getLogger(__name__)

CACHE_BYTES = 64 << 20  # verified chunks kept in memory, for all open recovery points
CHECK_THREADS = 2  # threads decompressing and hashing fetched chunks
COMMAND_TIMEOUT = 300.0  # seconds for one losetup, blkid, mount or umount
UNMOUNT_TRIES = 10  # attempts before a busy file system is detached lazily
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# blkid's TYPE -> (type given to mount, options that keep it from writing or replaying).
MOUNT_OPTIONS: dict[str, tuple[str, str]] = {
    "ext4": ("ext4", "noload"),
    "ext3": ("ext4", "noload"),
    "ext2": ("ext4", "noload"),
    "xfs": ("xfs", "norecovery,nouuid"),
    "vfat": ("vfat", ""),
}
BASE_OPTIONS = "ro,nosuid,nodev,noexec"


@dataclass(frozen=True)
class MountedFileSystem:
    """One file system of an open recovery point, mounted read-only at `path`."""

    name: str  # "p1", "p2"... for a partition; "disk" when the disk has no partition table
    partition: Partition | None
    fs_type: str
    path: Path
    device: str  # the loop device


@dataclass(frozen=True)
class Skipped:
    """A partition (or the whole disk) that was not mounted, and why."""

    name: str
    partition: Partition | None
    reason: str


@dataclass
class MountedDisk:
    """An open recovery point's disk: its file systems, mounted, and what could not be."""

    name: str
    recovery_point: str
    disk: LazyDisk
    disk_file: Path
    table: PartitionTable
    file_systems: list[MountedFileSystem] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def partitioned(self) -> bool:
        """Whether paths start with a partition's name (`p1/etc/hosts`)."""
        return self.table.scheme != "none"

    def explain(self, error: OSError) -> CofferError:
        """What to report for an OSError met reading this disk's files: the damaged chunk
        behind an EIO when there is one, else the error itself, typed."""
        if self.disk.errors:
            return self.disk.errors[0]
        return FileRecoveryFailed(
            what="files",
            recovery_point=self.recovery_point,
            disk=self.disk.name,
            detail=f"{error.filename or ''}: {error.strerror or error}".lstrip(": "),
        )

    def locate(self, path: str) -> tuple[MountedFileSystem, tuple[str, ...]]:
        """The file system `path` lies in and its components inside it.

        On a disk with a partition table the first component names the partition (`p2`);
        on a disk without one, `path` is inside its one file system. `..` is refused.
        """
        parts = tuple(part for part in path.split("/") if part not in ("", "."))
        if ".." in parts or "\0" in path:
            raise InvalidArgument(detail=f"path {path!r} may not contain '..' or NUL")
        if not self.partitioned:
            if not self.file_systems:
                raise NotFound(kind="file system", name=self.disk.name)
            return self.file_systems[0], parts
        if not parts:
            raise InvalidArgument(
                detail=f"disk {self.disk.name!r} is partitioned: a path starts with one of "
                + ", ".join(fs.name for fs in self.file_systems)
            )
        for fs in self.file_systems:
            if fs.name == parts[0]:
                return fs, parts[1:]
        raise NotFound(kind="file system", name=parts[0])


class RecoveryMounts:
    """Where an agent opens recovery points for file recovery; an async context manager.

    Owns the agent's FUSE mount of disk files (one per process), the directory the file
    systems are mounted under, the chunk cache and the threads that check chunks. Recovery
    points are opened inside its block; any still open when it closes are taken down.
    """

    def __init__(self, work_dir: Path, *, cache_bytes: int = CACHE_BYTES) -> None:
        self.work_dir = work_dir
        self.cache = ChunkCache(cache_bytes)
        self.opened: dict[str, MountedDisk] = {}
        self._reserved: set[str] = set()  # names open or opening
        # Chunks are checked in threads of their own: the agent's pool may be full of
        # readers of these very file systems, each waiting for a chunk to be checked.
        self._pool: ThreadPoolExecutor | None = None
        self._disks_dir = work_dir / "disks"
        self._mounts_dir = work_dir / "mounts"
        self._files: DiskFiles | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Self:
        self.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        await sweep(self.work_dir)
        self._mounts_dir.mkdir(mode=0o700, exist_ok=True)
        async with contextlib.AsyncExitStack() as stack:
            self._pool = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="chunk-check")
            stack.callback(self._pool.shutdown, wait=True, cancel_futures=True)
            # Imported only when files are recovered: pyfuse3 and trio cost every agent 6 MiB
            # of resident memory otherwise (issue 11's budget is 100 MiB in a backup).
            from agent.disk_files import DiskFiles

            self._files = await stack.enter_async_context(DiskFiles(self._disks_dir))
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._reserved:
            # Their blocks should have ended first (they run inside this one); take down
            # what they hold anyway, so the FUSE mount below goes with nothing left on it.
            log.error("recovery points still open at close: %s", ", ".join(self._reserved))
            await sweep(self.work_dir, fuse=False)
        await self._stack.aclose()
        self._files = None
        self._pool = None

    @contextlib.asynccontextmanager
    async def open(
        self,
        name: str,
        index: DiskIndex,
        source: ChunkSource,
        *,
        recovery_point: str,
        chunk_hash: ChunkHash,
    ) -> AsyncIterator[MountedDisk]:
        """Open a disk of a recovery point as `name` (unique among those open) and mount its
        file systems read-only; everything is taken down when the block ends."""
        if self._files is None:
            raise Conflict(detail="file recovery is not running in this agent")
        if _NAME.fullmatch(name) is None:
            raise InvalidArgument(detail=f"recovery mount name {name!r} is not a plain name")
        if name in self._reserved:
            raise Conflict(detail=f"a recovery point is already open as {name!r}")
        files = self._files
        async with contextlib.AsyncExitStack() as stack:
            self._reserved.add(name)
            stack.callback(self._reserved.discard, name)
            stack.callback(self.opened.pop, name, None)
            disk = await stack.enter_async_context(
                LazyDisk(
                    index,
                    source,
                    recovery_point=recovery_point,
                    chunk_hash=chunk_hash,
                    cache=self.cache,
                    pool=self._pool,
                )
            )
            disk_file = files.publish(name, disk)
            stack.callback(files.withdraw, name)
            root = self._mounts_dir / name
            root.mkdir(mode=0o700)
            stack.callback(_rmdir, root)
            opener = _Opener(stack, disk, recovery_point)
            table = await opener.partition_table(disk_file)
            mounted = MountedDisk(name, recovery_point, disk, disk_file, table)
            if table.scheme == "none":
                targets: list[tuple[str, Partition | None, int, int]] = [
                    ("disk", None, 0, disk.size)
                ]
            else:
                targets = [(f"p{p.number}", p, p.offset, p.size) for p in table.partitions]
            for label, partition, offset, size in targets:
                result = await opener.mount(disk_file, label, partition, offset, size, root)
                if isinstance(result, Skipped):
                    mounted.skipped.append(result)
                else:
                    mounted.file_systems.append(result)
            if not mounted.file_systems:
                disk.check()  # a damaged chunk is the cause worth reporting
                reasons = "; ".join(f"{s.name}: {s.reason}" for s in mounted.skipped)
                raise FileRecoveryFailed(
                    what="a file system",
                    recovery_point=recovery_point,
                    disk=index.disk,
                    detail=f"none could be mounted ({reasons or 'the disk has no partitions'})",
                )
            self.opened[name] = mounted
            yield mounted


class _Opener:
    """The steps of opening one disk, each registering its undoing on `stack`."""

    def __init__(
        self,
        stack: contextlib.AsyncExitStack,
        disk: LazyDisk,
        recovery_point: str,
    ) -> None:
        self._stack = stack
        self._disk = disk
        self._recovery_point = recovery_point

    def _failed(self, what: str, detail: str) -> FileRecoveryFailed:
        return FileRecoveryFailed(
            what=what, recovery_point=self._recovery_point, disk=self._disk.name, detail=detail
        )

    async def partition_table(self, disk_file: Path) -> PartitionTable:
        def read_table() -> PartitionTable:
            # Read through the FUSE file, from a thread: the event loop serves the reads.
            fd = os.open(disk_file, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return read_partition_table(
                    lambda offset, length: os.pread(fd, length, offset), self._disk.size
                )
            finally:
                os.close(fd)

        try:
            return await asyncio.to_thread(read_table)
        except OSError as exc:
            self._disk.check()
            raise self._failed("the partition table", exc.strerror or str(exc)) from exc
        except CorruptData as exc:
            raise self._failed("the partition table", exc.message) from exc

    async def mount(
        self,
        disk_file: Path,
        label: str,
        partition: Partition | None,
        offset: int,
        size: int,
        root: Path,
    ) -> MountedFileSystem | Skipped:
        what = f"partition {label}" if partition is not None else "the disk"
        attach = await _run(
            "losetup", "--read-only", "--find", "--show",
            "--offset", str(offset), "--sizelimit", str(size), str(disk_file),
        )  # fmt: skip
        if attach.returncode != 0:
            raise self._failed(what, f"losetup: {attach.stderr.strip()}")
        device = attach.stdout.strip()
        self._stack.push_async_callback(_uncancelled, _detach, device)
        probe = await _run("blkid", "-p", "-o", "export", device, abort=self._disk.abort)
        fields = dict(line.split("=", 1) for line in probe.stdout.splitlines() if "=" in line)
        fs_type = fields.get("TYPE", "")
        if fs_type not in MOUNT_OPTIONS:
            await _uncancelled(_detach, device)
            reason = (
                f"file system type {fs_type!r} is not supported"
                if fs_type
                else "no file system found"
            )
            if probe.returncode not in (0, 2):
                reason = f"blkid: {probe.stderr.strip()}"
            return Skipped(label, partition, reason)
        kernel_type, extra = MOUNT_OPTIONS[fs_type]
        target = root / label
        target.mkdir(mode=0o700)
        self._stack.callback(_rmdir, target)
        options = ",".join(filter(None, (BASE_OPTIONS, extra)))
        done = await _run(
            "mount", "-t", kernel_type, "-o", options, device, str(target), abort=self._disk.abort
        )
        if done.returncode != 0:
            return Skipped(label, partition, f"mount failed: {done.stderr.strip()}")
        self._stack.push_async_callback(_uncancelled, _unmount, target)
        return MountedFileSystem(label, partition, fs_type, target, device)


# --- commands, and taking things down ----------------------------------------------------


@dataclass(frozen=True)
class _Done:
    returncode: int
    stdout: str
    stderr: str


async def _run(*argv: str, abort: Callable[[], None] | None = None) -> _Done:
    """Run a command to its end (killed after COMMAND_TIMEOUT or when cancelled); its exit
    status and output. `abort` is called before waiting for a killed command: one stuck in
    the kernel reading a disk from this process (mount, blkid) dies only once those reads
    are answered, and `abort` makes them fail."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            stdout, stderr = await process.communicate()
    except BaseException:
        if process.returncode is None:
            process.kill()
            if abort is not None:
                abort()
            await process.wait()
        raise
    assert process.returncode is not None
    return _Done(
        process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")
    )


async def _uncancelled(step: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
    """Run a clean-up step to its end even if the caller is cancelled meanwhile (then the
    cancellation goes on once the step is done): a half-done unmount leaks a mount."""
    task = asyncio.create_task(step(*args), name=f"cleanup {step.__name__}")
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    task.result()


async def _unmount(target: Path) -> None:
    for attempt in range(UNMOUNT_TRIES):
        done = await _run("umount", str(target))
        if done.returncode == 0 or target not in mountpoints():
            return
        log.info("umount %s (attempt %d): %s", target, attempt + 1, done.stderr.strip())
        await asyncio.sleep(0.2 * (attempt + 1))
    # Still busy (someone's shell sits in it): detach it from the tree now; the kernel
    # drops it when its last user goes.
    done = await _run("umount", "--lazy", str(target))
    if done.returncode != 0:
        log.error("could not unmount %s: %s", target, done.stderr.strip())


async def _detach(device: str) -> None:
    # A device still in use (a lazily unmounted file system) is detached by the kernel
    # when its last user closes it.
    done = await _run("losetup", "--detach", device)
    if done.returncode != 0:
        log.error("could not detach %s: %s", device, done.stderr.strip())


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc.strerror)


def mountpoints() -> list[Path]:
    """Where something is mounted in this process's mount namespace (a read of /proc)."""
    with open("/proc/self/mountinfo") as table:
        # The fifth field; space, tab, newline and backslash are written as octal escapes.
        return [
            Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]))
            for line in table
        ]


async def sweep(work_dir: Path, *, fuse: bool = True) -> None:
    """Take down what an agent that died left under `work_dir`: file systems mounted there,
    loop devices attached to its disk files, and (with `fuse`) its FUSE mount."""
    disks_dir = work_dir / "disks"
    mounted = [path for path in mountpoints() if path.is_relative_to(work_dir)]
    # Deepest first: file systems, then the FUSE mount their loop devices read.
    for mountpoint in sorted(mounted, key=lambda p: len(p.parts), reverse=True):
        if mountpoint != disks_dir:
            log.warning("unmounting %s, left by an earlier run", mountpoint)
            await _run("umount", "--lazy", str(mountpoint))
    listing = await _run("losetup", "--list", "--json", "--output", "NAME,BACK-FILE")
    devices = json.loads(listing.stdout).get("loopdevices", []) if listing.stdout.strip() else []
    for device in devices:
        backing = device.get("back-file") or ""
        # losetup appends " (deleted)" to a backing file that no longer exists.
        if Path(backing.removesuffix(" (deleted)")).is_relative_to(disks_dir):
            log.warning("detaching %s, left by an earlier run", device["name"])
            await _detach(str(device["name"]))
    if fuse and disks_dir in mounted:
        log.warning("unmounting %s, left by an earlier run", disks_dir)
        await _run("umount", "--lazy", str(disks_dir))
    mounts_dir = work_dir / "mounts"
    if mounts_dir.is_dir():
        for leftover in sorted(mounts_dir.glob("*/*"), reverse=True):
            _rmdir(leftover)
        for leftover in mounts_dir.iterdir():
            _rmdir(leftover)
