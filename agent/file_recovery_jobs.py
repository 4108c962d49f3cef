"""File-recovery jobs in the agent: a recovery point's disk opened for one FileRecovery
command, its files listed, copied out or left mounted, and what it cost reported back.

A command names one disk of one recovery point and one action:

- `list`: one page of a directory (sorted by name, at most `limit` entries and about
  `LISTING_BYTES` of names and link targets, whatever the file system holds). On a
  partitioned disk, `/` lists the partitions: each mounted file system and each partition
  skipped, with why;
- `get`: files and trees copied into a directory under `restore_dirs`
  (`agent.recovered_files.copy_out`: metadata, links, holes kept; nothing left by a failure),
  with progress over MQTT;
- `mount`: the file systems left mounted for the operator, under
  `<state_dir>/files/mounts/<job>/<p1|p2|…|disk>` in this VM's mount namespace, until the
  TTL runs out or the controller sends `unmount` (or cancels the job, or the session ends).
  While mounted the agent reports every `STATUS_INTERVAL` what it has fetched.

Every job opens the disk through the agent's one `RecoveryMounts` (`FileRecoveryHost`, opened
at the first file recovery and closed with the agent) under the job's id, with the chunks
coming from the controller's DownloadChunks for that job: the controller serves only the
chunks of that disk (`controller.jobs.file_recovery`). Whatever happens, the block that
opened it unmounts and detaches everything before the result goes back.

Reading a mounted file system blocks and is served by this process's event loop (FUSE), so
every read happens in the agent's thread pool, never on the loop. A stopped job (cancelled,
or its session lost) first tells its copy to stop and fails the disk's pending reads, then
waits for the thread to end before unmounting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import grpc

from agent.chunk_source import DownloadChunkSource
from agent.file_recovery import MountedDisk, RecoveryMounts, sweep
from agent.progress import Progress
from agent.recovered_files import Entry, Listing, copy_out, list_directory, resolve
from agent.restore_dirs import check_destination
from agent.runtime import Runtime
from shared.digest import ChunkHash
from shared.errors import CorruptData, InvalidArgument
from shared.index import DiskIndex
from shared.rpc import agent_pb2, common_pb2
from shared.rpc_errors import from_rpc_error

log = logging.getLogger(__name__)

T = TypeVar("T")

STATUS_INTERVAL = 5.0  # seconds between reports of an open mount (when something changed)
LISTING_BYTES = 4 << 20  # names and link targets in one listing page, at most about
MAX_NAME_BYTES = 255  # a file name, as Linux bounds it
MAX_TARGET_BYTES = 4096  # a symbolic link's target, as Linux bounds a path
MAX_SKIPPED_REPORTED = 100  # special files named in a copy's report (all are counted)
ENTRY_OVERHEAD = 64  # bytes a listing entry costs besides its name and target
EARLY_UNMOUNTS = 16  # unmounts remembered that came before their mount's command ran

Report = Callable[[agent_pb2.FileRecoveryStatus], None]


class FileRecoveryHost:
    """The agent's file recovery: its `RecoveryMounts` (opened at first use, since it needs
    FUSE and root), and the mounts an operator can end; an async context manager.

    Entering it sweeps what an agent that died left under `work_dir` (mounts, loop devices,
    its FUSE mount), so a restarted agent starts clean whether or not it ever recovers files
    again.
    """

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self._mounts: RecoveryMounts | None = None
        self._opening = asyncio.Lock()
        self._stack = contextlib.AsyncExitStack()
        self._unmount: dict[str, asyncio.Event] = {}
        # Unmounts asked for before their mount began (a few, the latest).
        self._early: deque[str] = deque(maxlen=EARLY_UNMOUNTS)

    async def __aenter__(self) -> Self:
        if self.work_dir.is_dir():
            await sweep(self.work_dir)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._mounts = None
        await self._stack.aclose()

    async def mounts(self) -> RecoveryMounts:
        async with self._opening:
            if self._mounts is None:
                self._mounts = await self._stack.enter_async_context(RecoveryMounts(self.work_dir))
            return self._mounts

    def unmount(self, job_id: str) -> bool:
        """Ask the mount of job `job_id` to end; False when it is not open (yet: a mount whose
        command is still on its way ends as soon as it is mounted)."""
        event = self._unmount.get(job_id)
        if event is None:
            self._early.append(job_id)
            return False
        event.set()
        return True

    @contextlib.contextmanager
    def unmountable(self, job_id: str) -> Iterator[asyncio.Event]:
        """The event that ends job `job_id`'s mount, while the block lasts."""
        event = self._unmount[job_id] = asyncio.Event()
        if job_id in self._early:
            event.set()
        try:
            yield event
        finally:
            self._unmount.pop(job_id, None)


class FileRecoveryRun:
    """One FileRecovery command, from its index to its result."""

    def __init__(
        self,
        runtime: Runtime,
        host: FileRecoveryHost,
        command: agent_pb2.FileRecoveryCommand,
        report: Report,
    ) -> None:
        self._runtime = runtime
        self._host = host
        self._command = command
        self._report = report

    async def run(self) -> agent_pb2.FileRecoveryResult:
        command = self._command
        action = command.WhichOneof("action")
        if action == "get":
            # Refused before anything is fetched: the controller cannot know restore_dirs.
            check_destination(self._runtime.config.restore_dirs, command.get.destination)
            if not command.get.paths:
                raise InvalidArgument(detail="nothing to copy: give one or more paths")
        elif action == "mount":
            if not command.mount.ttl_seconds > 0:
                raise InvalidArgument(detail="a mount needs a TTL above zero")
        elif action != "list":
            raise InvalidArgument(detail=f"unknown file recovery action {action!r}")
        index = await self._index()
        mounts = await self._host.mounts()
        source = DownloadChunkSource(self._runtime.stub, command.job_id)
        result = agent_pb2.FileRecoveryResult()
        async with mounts.open(
            command.job_id,
            index,
            source,
            recovery_point=command.recovery_point_id,
            chunk_hash=ChunkHash(command.chunk_id_key or None),
        ) as mounted:
            try:
                if action == "list":
                    result.listing.CopyFrom(await self._list(mounted))
                elif action == "get":
                    result.copied.CopyFrom(await self._get(mounted))
                else:
                    result.ended_by = await self._mount(mounted)
            except BaseException:
                # What it fetched, for the job's record: a failed result carries only its error.
                self._report(status(command.job_id, mounted, mounted=False))
                raise
            result.status.CopyFrom(status(command.job_id, mounted, mounted=False))
        return result

    async def _index(self) -> DiskIndex:
        command = self._command
        request = agent_pb2.FetchIndexRequest(
            job_id=command.job_id, recovery_point_id=command.recovery_point_id, disk=command.disk
        )
        try:
            digests = b"".join(
                [part.digests async for part in self._runtime.stub.FetchIndex(request)]
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        try:
            return DiskIndex(command.disk, command.size_bytes, command.chunk_size, digests)
        except InvalidArgument as exc:
            raise CorruptData(what="the recovery point's index", detail=exc.message) from exc

    # --- list --------------------------------------------------------------------------------

    async def _list(self, mounted: MountedDisk) -> agent_pb2.FileListing:
        action = self._command.list
        path = os.fsdecode(action.path) or "/"
        if mounted.partitioned and not [p for p in path.split("/") if p not in ("", ".")]:
            return partitions(mounted, action.path or b"/")
        fs, parts = mounted.locate(path)
        after = os.fsdecode(action.after) if action.after else None
        listing = await self._read(
            mounted, lambda stop: list_directory(fs.path, parts, limit=action.limit, after=after)
        )
        return page(action.path or b"/", listing)

    # --- get ---------------------------------------------------------------------------------

    async def _get(self, mounted: MountedDisk) -> agent_pb2.FileCopyReport:
        action = self._command.get
        sources = [mounted.locate(os.fsdecode(path)) for path in action.paths]
        roots = [(fs.path, parts) for fs, parts in sources]
        restore_dirs = self._runtime.config.restore_dirs
        job_id = self._command.job_id
        status_publisher = self._runtime.status

        def copy(stop: threading.Event) -> agent_pb2.FileCopyReport:
            progress = Progress(status_publisher, job_id, data_bytes(roots))

            def advance(nbytes: int) -> None:
                if stop.is_set():
                    raise InterruptedError("the job was stopped")
                progress.advance("copy", nbytes)

            report = copy_out(roots, restore_dirs, action.destination, progress=advance)
            progress.total = progress.done
            progress.advance("copy", 0)
            return agent_pb2.FileCopyReport(
                files=report.files,
                directories=report.directories,
                symlinks=report.symlinks,
                hard_links=report.hard_links,
                bytes_written=report.bytes_written,
                skipped_count=len(report.skipped),
                skipped=[os.fsencode(p) for p in report.skipped[:MAX_SKIPPED_REPORTED]],
            )

        return await self._read(mounted, copy)

    # --- mount -------------------------------------------------------------------------------

    async def _mount(self, mounted: MountedDisk) -> str:
        job_id = self._command.job_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._command.mount.ttl_seconds
        with self._host.unmountable(job_id) as unmount:
            last = status(job_id, mounted, mounted=True)
            self._report(last)
            log.info(
                "file recovery %s: mounted %s until its TTL (%.0f s)",
                job_id,
                ", ".join(f"{fs.name} at {fs.path}" for fs in mounted.file_systems),
                self._command.mount.ttl_seconds,
            )
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    return "ttl"
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(STATUS_INTERVAL, left)):
                        await unmount.wait()
                if unmount.is_set():
                    return "unmount"
                now = status(job_id, mounted, mounted=True)
                if now != last:
                    self._report(now)
                    last = now

    # --- reading in threads ------------------------------------------------------------------

    async def _read(self, mounted: MountedDisk, work: Callable[[threading.Event], T]) -> T:
        """Run `work` (which reads the mounted file systems) in the pool and return what it
        returns; an OSError it meets becomes the error worth reporting (a damaged chunk).

        If the job is stopped meanwhile, `work` is told (its `stop` is set), the disk's
        pending reads fail, and the thread is waited for: nothing may still read the file
        systems when they are unmounted."""
        stop = threading.Event()
        future = self._runtime.in_pool(work, stop)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()
            mounted.disk.abort()
            while not future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({future})
            if not future.cancelled():
                future.exception()  # retrieved: the job is cancelled, that is its outcome
            raise
        except OSError as exc:
            raise mounted.explain(exc) from exc


# --- what goes back -----------------------------------------------------------------------


def status(job_id: str, disk: MountedDisk, *, mounted: bool) -> agent_pb2.FileRecoveryStatus:
    """What job `job_id` has open (where each file system is mounted, or why not) and what
    it has fetched so far."""
    systems = [
        agent_pb2.RecoveredFileSystem(
            name=fs.name,
            fs_type=fs.fs_type,
            path=str(fs.path),
            partition=fs.partition.number if fs.partition else 0,
            offset_bytes=fs.partition.offset if fs.partition else 0,
            size_bytes=fs.partition.size if fs.partition else disk.disk.size,
        )
        for fs in disk.file_systems
    ] + [
        agent_pb2.RecoveredFileSystem(
            name=skipped.name,
            partition=skipped.partition.number if skipped.partition else 0,
            offset_bytes=skipped.partition.offset if skipped.partition else 0,
            size_bytes=skipped.partition.size if skipped.partition else disk.disk.size,
            skipped=skipped.reason,
        )
        for skipped in disk.skipped
    ]
    systems.sort(key=lambda fs: (fs.partition, fs.name))
    stats = disk.disk.stats
    return agent_pb2.FileRecoveryStatus(
        job_id=job_id,
        file_systems=systems,
        mounted=mounted,
        chunks_fetched=stats.chunks_fetched,
        bytes_fetched=stats.bytes_fetched,
        raw_bytes_fetched=stats.raw_bytes_fetched,
    )


def partitions(disk: MountedDisk, path: bytes) -> agent_pb2.FileListing:
    """`/` of a partitioned disk: its partitions, those mounted and those skipped."""
    entries = [
        common_pb2.FileEntry(
            name=fs.name.encode(),
            type="partition",
            size_bytes=fs.size_bytes,
            fs_type=fs.fs_type,
            note=fs.skipped,
        )
        for fs in status("", disk, mounted=False).file_systems
    ]
    return agent_pb2.FileListing(path=path, entries=entries)


def entry(found: Entry) -> common_pb2.FileEntry:
    target = os.fsencode(found.target) if found.target is not None else b""
    return common_pb2.FileEntry(
        name=os.fsencode(found.name),
        type=found.type,
        size_bytes=found.size,
        mtime_ns=found.mtime_ns,
        mode=found.mode,
        uid=found.uid,
        gid=found.gid,
        nlink=found.nlink,
        # Linux bounds a link target by PATH_MAX; a crafted file system is cut there.
        link_target=target[:MAX_TARGET_BYTES],
        note="link target cut at 4096 bytes" if len(target) > MAX_TARGET_BYTES else "",
    )


def page(path: bytes, listing: Listing) -> agent_pb2.FileListing:
    """A listing as it goes back: at most about LISTING_BYTES of names and targets (the next
    page starts after the last entry given)."""
    result = agent_pb2.FileListing(path=path)
    used = 0
    for found in listing.entries:
        converted = entry(found)
        if len(converted.name) > MAX_NAME_BYTES:
            continue  # no Linux file system makes one; not worth a crafted image's bytes
        used += len(converted.name) + len(converted.link_target) + ENTRY_OVERHEAD
        if used > LISTING_BYTES and result.entries:
            result.next_after = result.entries[-1].name
            return result
        result.entries.append(converted)
    if listing.next_after is not None:
        result.next_after = os.fsencode(listing.next_after)
    return result


def data_bytes(sources: Sequence[tuple[Path, Sequence[str]]]) -> int:
    """About how many bytes copying `sources` writes (regular files' data, holes left out):
    the total a progress bar fills up to. Blocking: it reads the file systems' metadata."""
    total = 0
    for root, parts in sources:
        parent, name = resolve(root, parts, follow_last=False)
        try:
            info = os.stat(name or ".", dir_fd=parent, follow_symlinks=False)
            if stat.S_ISREG(info.st_mode):
                total += min(info.st_size, info.st_blocks * 512)
            elif stat.S_ISDIR(info.st_mode):
                for _, _, files, directory in os.fwalk(name or ".", dir_fd=parent):
                    for file in files:
                        with contextlib.suppress(FileNotFoundError):
                            found = os.stat(file, dir_fd=directory, follow_symlinks=False)
                            if stat.S_ISREG(found.st_mode):
                                total += min(found.st_size, found.st_blocks * 512)
        finally:
            os.close(parent)
    return total
