"""File-recovery jobs: a disk of a recovery point opened in a VM's agent, its files listed,
copied out or left mounted; what that agent may read, and what is open.

A FileRecovery job reads one disk of one recovery point the way a restore does, through a
restore's session (`RestoreSession`: the disk's index, exactly the chunks it names, and the
holds that keep them from a garbage collection running beside it), so the agents' data path
(FetchIndex, DownloadChunks) serves it that disk and nothing else, and only to the agent
running the job. That agent is the target VM's: the source VM's, unless the operator names
another VM, which must be in the region of the recovery point's vault. It mounts the file
systems inside its VM; nothing of a recovery point is ever mounted by the controller
(docs/file-recovery.md says why).

Actions:

- `ls`: one page of a directory. The page goes back to the caller with the job's end and is
  never stored: what the controller holds of a listing is one page per running job, bounded
  (below);
- `get`: files and trees copied out under the target VM's `restore_dirs`; the job's details
  keep the copy's report;
- `mount`: left open for the operator until its TTL (the agent ends it; the controller sends
  `unmount` itself if the agent has not a while after), `unmount` (`coffer files unmount`),
  a cancel, or the end of the agent's session. The job stays `InProgress` while mounted.

A FileRecovery job does not need its VM to itself (a backup may run beside an open mount).
While it runs its details show what is open (where each file system is mounted, the expiry)
and what it has fetched; the agent reports both (`status`), and the job's `bytes_read` is the
stored bytes it downloaded. Being running restores for the data path, they also keep their
recovery point from pruning while they run (the restores' `in_use`).

What an agent sends back is checked and bounded before it is kept, like anything that comes
from a VM: a listing page holds at most the entries asked for (or the disk's partitions),
each a name of 1-255 bytes without `/` or NUL and a link target of at most 4096 bytes; a mount
reports at most `MAX_FILE_SYSTEMS` file systems; free text (a reason a partition was
skipped) is cut at `MAX_TEXT` characters. Names are kept as bytes; job details show them
escaped (`shared.printable`).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from controller.catalog import Catalog, JobRecord
from controller.datastore.copy import VaultCopy
from controller.datastores import Datastores
from controller.jobs.agent_command import CANCEL_GRACE_SECONDS, MAX_RECORDED, run_command
from controller.jobs.restore import RestoreSession, RunningRestore
from controller.jobs.runner import JobRunner
from controller.registry import AgentRegistry
from shared.clock import Clock
from shared.errors import (
    Conflict,
    CorruptData,
    DiskNotFound,
    FileRecoveryFailed,
    InvalidArgument,
    NotFound,
    RegionMismatch,
)
from shared.model import Operation
from shared.printable import shown
from shared.rpc import agent_pb2

log = logging.getLogger(__name__)

LIST = "ls"
GET = "get"
MOUNT = "mount"

DEFAULT_LIST_LIMIT = 1000
MAX_LIST_LIMIT = 10_000
DEFAULT_TTL_SECONDS = 3600.0
MAX_TTL_SECONDS = 7 * 24 * 3600.0
MIN_TTL_SECONDS = 1.0
MAX_PATHS = 1000  # paths one get copies
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_FILE_SYSTEMS = 256
MAX_TEXT = 500
MAX_SKIPPED_SHOWN = 100
# How long after a mount's expiry the controller waits for its agent to end it by itself.
MOUNT_END_GRACE_SECONDS = 30.0
FILE_TYPES = frozenset({"file", "dir", "symlink", "block", "char", "fifo", "socket", "partition"})


@dataclass(frozen=True)
class FileSource:
    """A disk of a recovery point, and the VM whose agent opens it."""

    vm_id: str
    recovery_point_id: str
    disk: str
    target_vm: str  # the VM whose agent runs the job (vm_id for the source VM itself)
    target_region: str
    copy: VaultCopy | None = None
    """The vault's off-site copy, opened, to read from instead of its datastore."""


@dataclass(eq=False)
class RunningFileRecovery(RunningRestore):
    """A running FileRecovery job: a restore's data path, plus what it has open."""

    action: str = LIST
    ttl_seconds: float = 0.0
    mounted: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once a mount job's file systems are open for the operator."""
    listing: agent_pb2.FileListing | None = None
    """An `ls` job's page, once it has ended."""
    limit: int = DEFAULT_LIST_LIMIT
    unmount_requested: bool = False


class FileRecoveries:
    """Starts FileRecovery jobs, takes their agents' reports, and ends their mounts."""

    def __init__(
        self,
        catalog: Catalog,
        registry: AgentRegistry,
        datastores: Datastores,
        runner: JobRunner,
        pool: Executor,
        clock: Clock,
    ) -> None:
        self._catalog = catalog
        self._registry = registry
        self._datastores = datastores
        self._runner = runner
        self._pool = pool
        self._clock = clock

    # --- starting ------------------------------------------------------------------------------

    async def list_files(
        self, source: FileSource, path: bytes, limit: int, after: bytes
    ) -> RunningFileRecovery:
        limit = limit or DEFAULT_LIST_LIMIT
        if not 0 < limit <= MAX_LIST_LIMIT:
            raise InvalidArgument(detail=f"a listing holds 1 to {MAX_LIST_LIMIT} entries")
        _check_path(path or b"/")
        if len(after) > MAX_NAME_BYTES or b"/" in after or b"\0" in after:
            raise InvalidArgument(detail="`after` must be a file name from a listing")
        action = agent_pb2.ListFilesAction(path=path or b"/", limit=limit, after=after)
        details = {"path": shown(path or b"/")}
        if after:
            details["after"] = shown(after)
        return await self._start(source, LIST, details, list=action, limit=limit)

    async def get_files(
        self, source: FileSource, paths: list[bytes], destination: str
    ) -> RunningFileRecovery:
        if not paths:
            raise InvalidArgument(detail="nothing to copy: give one or more paths")
        if len(paths) > MAX_PATHS:
            raise InvalidArgument(detail=f"at most {MAX_PATHS} paths at once")
        for path in paths:
            _check_path(path)
        if not destination.startswith("/") or "\0" in destination:
            raise InvalidArgument(
                detail=f"the destination {destination!r} must be an absolute directory on "
                "the target VM, under one of its restore_dirs"
            )
        action = agent_pb2.GetFilesAction(paths=paths, destination=destination)
        details: dict[str, Any] = {
            "paths": [shown(path) for path in paths],
            "destination": destination,
        }
        return await self._start(source, GET, details, get=action)

    async def mount(self, source: FileSource, ttl_seconds: float) -> RunningFileRecovery:
        ttl = ttl_seconds or DEFAULT_TTL_SECONDS
        if not MIN_TTL_SECONDS <= ttl <= MAX_TTL_SECONDS:
            raise InvalidArgument(
                detail=f"a mount's TTL is {MIN_TTL_SECONDS:g} s to {MAX_TTL_SECONDS / 86400:g} "
                f"days, not {ttl:g} s"
            )
        action = agent_pb2.MountFilesAction(ttl_seconds=ttl)
        return await self._start(source, MOUNT, {"ttl_seconds": ttl}, mount=action, ttl=ttl)

    async def _start(
        self,
        source: FileSource,
        action: str,
        details: dict[str, Any],
        *,
        limit: int = DEFAULT_LIST_LIMIT,
        ttl: float = 0.0,
        **command: Any,
    ) -> RunningFileRecovery:
        rp = await self._catalog.recovery_point(source.recovery_point_id)
        if rp.vm_id != source.vm_id:
            raise NotFound(
                kind=f"recovery point of VM {source.vm_id!r}", name=source.recovery_point_id
            )
        rp_disk = next((d for d in rp.disks if d.name == source.disk), None)
        if rp_disk is None:
            raise DiskNotFound(
                vm_id=source.vm_id, disk=source.disk, known=", ".join(d.name for d in rp.disks)
            )
        vault = await self._catalog.vault(rp.vault)
        if source.target_region != vault.region:
            raise RegionMismatch(
                f"VM {source.target_vm!r} is in region {source.target_region!r}, but recovery "
                f"point {rp.id} is in vault {vault.name!r} of region {vault.region!r}: its "
                "files are recovered only in VMs of the vault's region."
            )
        agent = self._registry.get(source.target_vm)
        job = self._runner.new_record(
            Operation.FILE_RECOVERY,
            rp.vault,
            source.target_vm,
            recovery_point_id=rp.id,
            disks=(source.disk,),
            details={"action": action, "source_vm": source.vm_id, "disk": source.disk, **details},
        )
        copy = source.copy
        if copy is not None:
            job.details["from_copy"] = copy.target
        session = await RestoreSession.open(
            job.id,
            rp,
            source.disk,
            # Of a vault being upgraded, the format its point is in now (controller.datastores).
            copy.datastore if copy else await self._datastores.reader(rp.vault, rp.id),
            copy.guard if copy else self._datastores.guard(rp.vault),
            self._pool,
            copy=copy.target if copy else "",
        )
        running = RunningFileRecovery(
            job, session=session, action=action, ttl_seconds=ttl, limit=limit
        )
        running.after_end.append(partial(_release, session))
        try:
            await self._runner.admit(running)
        except BaseException:
            session.release()
            raise
        message = agent_pb2.ControllerMessage(
            file_recovery=agent_pb2.FileRecoveryCommand(
                job_id=job.id,
                recovery_point_id=rp.id,
                disk=source.disk,
                size_bytes=rp_disk.size_bytes,
                chunk_size=rp_disk.chunk_size,
                # Never logged: the text form of this message would print it.
                chunk_id_key=session.datastore.chunk_hash.key or b"",
                **command,
            )
        )

        async def work() -> None:
            expiry = None
            if action == MOUNT:
                expiry = self._runner.spawn(self._expire(running), f"expire-{job.id}")
            try:
                result = await run_command(running, agent, message, self._runner.deadlines)
            finally:
                if expiry is not None:
                    expiry.cancel()
            self._ended(running, result.file_recovery)

        self._runner.start(running, work)
        return running

    # --- what the agent reports ----------------------------------------------------------------

    def status(self, vm_id: str, status: agent_pb2.FileRecoveryStatus) -> None:
        """A report from VM `vm_id`'s agent on a FileRecovery job it runs; a report on any
        other job is ignored (and logged)."""
        running = self._runner.get(status.job_id)
        if not isinstance(running, RunningFileRecovery) or running.vm_id != vm_id:
            log.warning("%s reported on job %s, not a file recovery of its own", vm_id,
                        status.job_id)  # fmt: skip
            return
        if running.record.status.ended:
            return
        try:
            self._take_status(running, status)
        except CorruptData as exc:
            log.warning("job %s: a report of %s is refused: %s", running.id, vm_id, exc)
            return
        self._runner.spawn(self._runner.save(running), f"save-{running.id}")

    def _take_status(
        self, running: RunningFileRecovery, status: agent_pb2.FileRecoveryStatus
    ) -> None:
        job = running.record
        if len(status.file_systems) > MAX_FILE_SYSTEMS:
            raise CorruptData(
                what="the agent's report", detail=f"more than {MAX_FILE_SYSTEMS} file systems"
            )
        if status.file_systems:
            job.details["mounts"] = {
                _text(fs.name): f"{_text(fs.path)} ({_text(fs.fs_type)})"
                for fs in status.file_systems
                if fs.path
            }
            skipped = {
                _text(fs.name): _text(fs.skipped) for fs in status.file_systems if fs.skipped
            }
            if skipped:
                job.details["skipped_partitions"] = skipped
        for value in (status.chunks_fetched, status.bytes_fetched, status.raw_bytes_fetched):
            if value > MAX_RECORDED:  # the catalog's integers are signed 64-bit
                raise CorruptData(what="the agent's report", detail=f"a count of {value}")
        job.details["chunks_fetched"] = status.chunks_fetched
        job.details["bytes_fetched"] = status.bytes_fetched
        job.details["raw_bytes_fetched"] = status.raw_bytes_fetched
        job.bytes_read = status.bytes_fetched
        if status.mounted and running.action == MOUNT and not running.mounted.is_set():
            job.details["expires_at"] = self._clock.now() + running.ttl_seconds
            running.mounted.set()

    def _ended(self, running: RunningFileRecovery, result: agent_pb2.FileRecoveryResult) -> None:
        """Take a job's result (it succeeded): its last report, and its listing, copy report
        or how its mount ended."""
        job = running.record
        self._take_status(running, result.status)
        if running.action == LIST:
            running.listing = checked_listing(result.listing, running.limit)
            job.details["entries"] = len(running.listing.entries)
        elif running.action == GET:
            copied = result.copied
            job.details["copied"] = {
                "files": copied.files,
                "directories": copied.directories,
                "symlinks": copied.symlinks,
                "hard_links": copied.hard_links,
                "bytes_written": copied.bytes_written,
                "skipped": copied.skipped_count,
            }
            if copied.skipped:
                job.details["skipped_files"] = [
                    shown(path[:MAX_PATH_BYTES]) for path in copied.skipped[:MAX_SKIPPED_SHOWN]
                ]
        elif running.action == MOUNT:
            job.details["ended_by"] = {"ttl": "its TTL", "unmount": "coffer files unmount"}.get(
                result.ended_by, _text(result.ended_by)
            )

    # --- ending a mount ------------------------------------------------------------------------

    async def unmount(self, job_id: str) -> JobRecord:
        """End mount job `job_id` now; its record once it has ended."""
        running = self._runner.get(job_id)
        if running is None or running.record.status.ended:
            job = running.record if running else await self._catalog.job(job_id)
            raise Conflict(detail=f"job {job_id} has already ended ({job.status})")
        if not isinstance(running, RunningFileRecovery) or running.action != MOUNT:
            raise Conflict(
                detail=f"job {job_id} is a {running.record.operation} job, not a mount of a "
                "recovery point (`coffer job cancel` stops a job)"
            )
        self._send_unmount(running)
        try:
            async with asyncio.timeout(CANCEL_GRACE_SECONDS):
                await asyncio.shield(running.ended.wait())
        except TimeoutError:
            self._give_up(running, "it did not unmount when asked")
            await asyncio.shield(running.ended.wait())
        return running.record

    def _send_unmount(self, running: RunningFileRecovery) -> None:
        running.unmount_requested = True
        session = self._registry.session(running.vm_id)
        if session is not None:
            session.tell(
                agent_pb2.ControllerMessage(unmount=agent_pb2.UnmountCommand(job_id=running.id))
            )

    async def _expire(self, running: RunningFileRecovery) -> None:
        """The agent ends a mount at its TTL; should it not have, a while later, it is told
        to, and then not waited for any more."""
        await running.mounted.wait()
        expires_at = float(running.record.details["expires_at"])
        await asyncio.sleep(max(expires_at - self._clock.now(), 0) + MOUNT_END_GRACE_SECONDS)
        log.warning("job %s: the mount outlived its TTL; asking its agent to end it", running.id)
        self._send_unmount(running)
        await asyncio.sleep(CANCEL_GRACE_SECONDS)
        self._give_up(running, "it did not unmount at its TTL")

    def _give_up(self, running: RunningFileRecovery, why: str) -> None:
        if running.reply is not None and not running.reply.done():
            rp = running.recovery_point
            running.reply.set_exception(
                FileRecoveryFailed(
                    what="a mount",
                    recovery_point=rp.id if rp else "",
                    disk=running.record.disks[0] if running.record.disks else "",
                    detail=f"the agent of VM {running.vm_id!r} did not answer: {why}",
                )
            )


async def _release(session: RestoreSession) -> None:
    session.release()


def _check_path(path: bytes) -> None:
    if len(path) > MAX_PATH_BYTES or b"\0" in path:
        raise InvalidArgument(detail=f"a path is at most {MAX_PATH_BYTES} bytes without NUL")


def _text(value: str) -> str:
    """Free text from an agent, as kept in a job's details: shown safely, and bounded."""
    return shown(value[:MAX_TEXT])


def checked_listing(listing: agent_pb2.FileListing, limit: int) -> agent_pb2.FileListing:
    """The agent's listing page if it is within the bounds asked for; CorruptData if not."""

    def refused(detail: str) -> CorruptData:
        return CorruptData(what="the agent's listing", detail=detail)

    # A partitioned disk's "/" lists its partitions, all of them (a table has a few).
    partitions = all(entry.type == "partition" for entry in listing.entries)
    bound = MAX_FILE_SYSTEMS if partitions else limit
    if len(listing.entries) > bound:
        raise refused(f"{len(listing.entries)} entries where at most {bound} were asked for")
    for entry in listing.entries:
        name = entry.name
        if not 0 < len(name) <= MAX_NAME_BYTES or b"/" in name or b"\0" in name:
            raise refused(f"a name of {len(name)} bytes, or with '/' or NUL")
        if len(entry.link_target) > MAX_PATH_BYTES:
            raise refused("a link target longer than 4096 bytes")
        if entry.type not in FILE_TYPES:
            raise refused(f"an entry of unknown type {entry.type[:32]!r}")
        if len(entry.fs_type) > 64 or len(entry.note) > MAX_TEXT:
            raise refused("a partition's note is too long")
    if len(listing.next_after) > MAX_NAME_BYTES or len(listing.path) > MAX_PATH_BYTES:
        raise refused("a path or name too long")
    return listing
