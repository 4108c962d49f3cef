"""Jobs: every operation, from the request that starts it to its recorded outcome.

The job manager is the controller's authority on what runs. It creates the job record, runs
the job's body, and records the outcome; for backups and restores it sends the command down
the agent's session and serves the agent's data-path calls only for jobs running for that
agent (`running_backup`, `running_restore`).

Backups queue. A backup job is recorded `InProgress` at once and waits in its vault's queue
until the agent is online and the vault has a free slot (`max_concurrent_backups`); a VM never
has two jobs at once. A queued backup whose window closes first (its agent stayed offline)
fails with `BackupWindowMissed`. The dispatcher is woken by the events that can change its
answer (a backup ends, an agent connects, a backup is queued, the nearest deadline) and never
walks the items of a vault on a timer.

A backup's recovery point is committed in this order, so that it is visible only when
complete: every chunk is durable (checked as each index arrives), the indexes are written, then
the manifest (the datastore's commit point), then the catalog row, then the job's status. A
cancelled backup is stopped before its manifest is written, so it leaves no recovery point.
Digests a backup relies on without a manifest referencing them yet are held in the vault's
`ChunkGuard`, so garbage collection can run beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from types import TracebackType
from typing import Any, Self, TypeVar

from controller.catalog import (
    Catalog,
    JobFilter,
    JobRecord,
    RecoveryPointDiskRecord,
    RecoveryPointRecord,
)
from controller.datastore import Datastore
from controller.datastores import Datastores
from controller.registry import AgentRegistry, AgentSession
from controller.status import StatusMonitor
from shared.clock import Clock
from shared.digest import ZERO_DIGEST
from shared.errors import (
    AgentUnreachable,
    BackupWindowMissed,
    ChunkMissing,
    CofferError,
    Conflict,
    DiskNotFound,
    InvalidArgument,
    JobCancelled,
    NotFound,
    OperationInProgress,
    PermissionDenied,
)
from shared.index import DiskIndex
from shared.manifest import ManifestDisk, RecoveryPointManifest
from shared.model import Consistency, JobStatus, Operation, weakest
from shared.rpc import agent_pb2
from shared.rpc_errors import from_proto
from shared.status import JobState

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a cancelled job may take to stop on its agent before the controller stops waiting.
CANCEL_GRACE_SECONDS = 30.0
# A manual backup waits this long in the queue for its agent before it fails.
MANUAL_BACKUP_WINDOW_SECONDS = 2 * 3600.0
QUEUED = "Queued"
DISPATCH_RETRY_SECONDS = 5.0


@dataclass
class RunningJob:
    record: JobRecord
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_requested: bool = False
    # The agent's answer to the job's command, while one is awaited.
    reply: asyncio.Future[agent_pb2.CommandResult] | None = None
    # Set once the job's outcome is recorded.
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def touch(self) -> None:
        self.changed.set()


@dataclass
class RunningBackup(RunningJob):
    previous: RecoveryPointRecord | None = None
    rp_id: str = ""
    chunk_size: int = 0
    vm: dict[str, str] = field(default_factory=dict)
    disks: list[str] = field(default_factory=list)
    deadline: float = 0.0
    started: bool = False
    committing: bool = False
    # Digests this job has seen durable in the datastore: checked, uploaded or in the previous
    # recovery point. An index may reference only these (or what a datastore check finds).
    known: set[bytes] = field(default_factory=set)
    indexes: dict[str, tuple[DiskIndex, str, int]] = field(default_factory=dict)


@dataclass
class RunningRestore(RunningJob):
    recovery_point: RecoveryPointRecord | None = None
    disk: str = ""
    target_vm: str = ""
    index: DiskIndex | None = None
    allowed: frozenset[bytes] = frozenset()


def _record(
    manifest: RecoveryPointManifest, bytes_stored: int, data_bytes: int
) -> RecoveryPointRecord:
    """The catalog's row for a committed recovery point: what its manifest says."""
    return RecoveryPointRecord(
        id=manifest.id,
        vault=manifest.vault,
        vm_id=manifest.vm_id,
        job_id=manifest.job_id,
        created_at=manifest.created_at.timestamp(),
        consistency=manifest.consistency,
        bytes_stored=bytes_stored,
        disks=tuple(
            RecoveryPointDiskRecord(
                d.name, d.size_bytes, d.chunk_size, d.chunk_count, d.consistency
            )
            for d in manifest.disks
        ),
        data_bytes=data_bytes,
    )


def data_bytes(index: DiskIndex) -> int:
    """Bytes of the disk that hold data: every chunk but the all-zero ones."""
    return sum(index.extent(i)[1] for i in range(len(index)) if index.digest_at(i) != ZERO_DIGEST)


def new_id() -> str:
    return secrets.token_hex(6)


BackupEnded = Callable[[JobRecord], Awaitable[None]]


class JobManager:
    """Starts jobs, serves their data path, records their outcome; an async context manager."""

    def __init__(
        self,
        catalog: Catalog,
        registry: AgentRegistry,
        datastores: Datastores,
        status: StatusMonitor | None,
        clock: Clock,
        pool: ThreadPoolExecutor,
    ) -> None:
        self._catalog = catalog
        self._registry = registry
        self._datastores = datastores
        self._status = status
        self._clock = clock
        self._pool = pool
        self._running: dict[str, RunningJob] = {}
        self._by_vm: dict[str, str] = {}
        self._queues: dict[str, list[RunningBackup]] = {}
        self._started: dict[str, int] = {}
        self._limits: dict[str, int] = {}
        self._kick = asyncio.Event()
        self._stopping = False
        self._tasks: asyncio.TaskGroup | None = None
        # Called with a backup's final record (the protection manager updates its item).
        self.on_backup_ended: BackupEnded | None = None
        # Jobs the last shutdown interrupted, failed when the manager started.
        self.interrupted: list[JobRecord] = []
        registry.on_connect.append(lambda vm_id: self.kick())

    async def __aenter__(self) -> Self:
        await self._recover_committed_backups()
        self.interrupted = await self._catalog.fail_interrupted_jobs(
            self._clock.now(),
            "ControllerRestarted",
            "The controller stopped while this job ran; it did not complete and left no "
            "recovery point. Run it again.",
        )
        if self.interrupted:
            log.warning(
                "marked %d jobs interrupted by the last shutdown as failed", len(self.interrupted)
            )
        for job in self.interrupted:
            if job.operation == Operation.BACKUP:  # its uploads are in the datastore
                await self._catalog.add_stored_bytes(job.vault, job.bytes_stored)
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        self._dispatcher = self._spawn(self._dispatch_loop(), "dispatcher")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tasks is not None
        self.stopping()
        self._dispatcher.cancel()
        # Shutting down: the agents' sessions are closed by now, so every job's command has
        # failed with AgentDisconnected and its task is finishing. Queued backups and jobs
        # the stop cut short stay InProgress in the catalog: the next start fails them as
        # ControllerRestarted (and runs a scheduled backup again), in one place.
        await self._tasks.__aexit__(exc_type, exc, tb)
        self._tasks = None

    def stopping(self) -> None:
        """The controller is stopping: failures from here on are the stop's, not the jobs'."""
        self._stopping = True

    async def _recover_committed_backups(self) -> None:
        """Backups that committed their manifest before the controller stopped, but not yet
        their catalog row: the recovery point is complete, so it is recorded, not lost."""
        for job in await self._catalog.jobs(JobFilter(statuses=[JobStatus.IN_PROGRESS])):
            rp_id = job.details.get("recovery_point_id")
            if job.operation != Operation.BACKUP or not rp_id:
                continue
            datastore = await self._datastores.get(job.vault)
            try:
                manifest = await self.in_pool(datastore.get_manifest, rp_id)
            except NotFound:
                continue  # never committed: failed below with the other interrupted jobs
            sizes = [
                data_bytes(await self.in_pool(datastore.get_index, rp_id, disk.name))
                for disk in manifest.disks
            ]
            await self._catalog.insert_recovery_point(
                _record(manifest, job.bytes_stored, sum(sizes))
            )
            job.status, job.ended_at, job.recovery_point_id = (
                JobStatus.COMPLETED,
                self._clock.now(),
                manifest.id,
            )
            await self._catalog.update_job(job)
            await self._catalog.add_stored_bytes(job.vault, job.bytes_stored)
            log.warning("job %s: recorded recovery point %s committed before a stop", job.id, rp_id)

    async def datastore(self, running: RunningJob) -> Datastore:
        return await self._datastores.get(running.record.vault)

    def in_pool(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def set_limit(self, vault: str, limit: int) -> None:
        """A vault's concurrent backups changed: queued backups may start now."""
        self._limits[vault] = limit
        self.kick()

    def kick(self) -> None:
        """Wake the dispatcher: something that can start or expire a queued backup changed."""
        self._kick.set()

    # --- jobs without an agent command ------------------------------------------------------

    async def run(
        self,
        operation: Operation,
        vault: str,
        vm_id: str,
        body: Callable[[JobRecord], Awaitable[None]],
        *,
        wait: bool = True,
        details: dict[str, Any] | None = None,
    ) -> JobRecord:
        """Record a job and run `body` as it; with `wait`, return once it has ended."""
        job = self._new_job(operation, vm_id, vault)
        job.details = dict(details or {})
        running = RunningJob(job)
        self._running[job.id] = running
        await self._catalog.insert_job(job)
        self._publish(job)
        # The body runs as a task of the manager, never in the caller's: a caller that goes away
        # (an operator's RPC cancelled) must not leave the job half done and recorded running.
        self._spawn(self._conclude(running, body(job)), f"job-{job.id}")
        if wait:
            await asyncio.shield(running.ended.wait())
        return job

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run `work` in the manager's task group; whatever it raises is logged, never let
        through: an exception reaching the group would cancel every job and the controller."""
        assert self._tasks is not None, "job manager is not running"

        async def supervised() -> None:
            try:
                await work
            except Exception:
                log.exception("task %s failed", name)

        task = self._tasks.create_task(supervised(), name=name)
        # A task cancelled before its first step never awaits `work`: close it quietly.
        task.add_done_callback(lambda _: work.close())
        return task

    async def _conclude(self, running: RunningJob, work: Awaitable[None]) -> None:
        job = running.record
        try:
            await work
            job.status = (
                JobStatus.COMPLETED_WITH_WARNINGS
                if job.details.get("warnings")
                else JobStatus.COMPLETED
            )
        except CofferError as exc:
            job.status, job.error_code, job.error_message = JobStatus.FAILED, exc.code, exc.message
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job.id)
            job.status, job.error_code = JobStatus.FAILED, "InternalError"
            job.error_message = f"internal error in the controller: {exc!r}"
        except asyncio.CancelledError:
            job.status, job.error_code = JobStatus.FAILED, "ControllerRestarted"
            job.error_message = "The controller stopped while this job ran. Run it again."
            raise
        finally:
            await self._record_end(running)

    async def _record_end(self, running: RunningJob) -> None:
        job = running.record
        job.ended_at = self._clock.now()
        try:
            if self._left_for_next_start(job):
                # Cut short by the stop: left InProgress, with what it did so far (its bytes),
                # for the next start to record.
                log.info("job %s interrupted by the controller's stop", job.id)
                await self._catalog.update_job(
                    dataclasses.replace(
                        job, status=JobStatus.IN_PROGRESS, ended_at=None, error_code="",
                        error_message="",
                    )
                )  # fmt: skip
                return
            await self._catalog.update_job(job)
        except Exception:
            log.exception("job %s: its outcome could not be recorded", job.id)
        finally:
            self._forget(running)
            self._publish(job)
            running.ended.set()
            running.touch()

    # --- backups ----------------------------------------------------------------------------

    async def backup(
        self,
        vault: str,
        vm_id: str,
        *,
        disks: list[str] | None = None,
        trigger: str = "manual",
        slot: float | None = None,
        deadline: float | None = None,
    ) -> JobRecord:
        """Queue a backup of `vm_id` into `vault`; it starts when its agent and a slot are free.

        A manual backup of an offline VM is refused at once; a scheduled one waits for the
        agent until `deadline` (the scheduler's, which already allows for a late start)."""
        disks = list(disks or ())
        session = self._registry.session(vm_id)
        if session is None and trigger == "manual":
            raise AgentUnreachable(vm_id=vm_id)
        if session is not None:
            known = [d.name for d in session.hello.disks]
            for disk in disks:
                if disk not in known:
                    raise DiskNotFound(vm_id=vm_id, disk=disk, known=", ".join(known))
        vault_record = await self._catalog.vault(vault)
        self._limits[vault] = vault_record.max_concurrent_backups
        now = self._clock.now()
        job = self._new_job(Operation.BACKUP, vm_id, vault)
        running = RunningBackup(
            job,
            rp_id=secrets.token_hex(8),
            disks=disks,
            deadline=now + MANUAL_BACKUP_WINDOW_SECONDS if deadline is None else deadline,
        )
        job.details = {
            "trigger": trigger,
            "disks": disks,
            "recovery_point_id": running.rp_id,
            "phase": QUEUED,
        }
        if slot is not None:
            job.details["slot"] = slot
        await self._admit(running)
        self._queues.setdefault(vault, []).append(running)
        self.kick()
        return job

    async def _dispatch_loop(self) -> None:
        while True:
            self._kick.clear()
            timeout: float | None = DISPATCH_RETRY_SECONDS
            try:
                timeout = await self._dispatch()
            except Exception:
                # The dispatcher must outlive any one job's trouble: every queued backup of
                # every vault waits on it. Log, and look again shortly.
                log.exception("the backup dispatcher failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout)

    async def _dispatch(self) -> float | None:
        """Start what can start, fail what waited too long; seconds until the next deadline."""
        now = self._clock.now()
        nearest: float | None = None
        # Ending a queued job awaits, and a new vault's queue may appear meanwhile: iterate
        # over copies.
        for vault, queue in list(self._queues.items()):
            for running in list(queue):
                vm_id = running.record.vm_id
                if now >= running.deadline:
                    queue.remove(running)
                    online = self._registry.online(vm_id)
                    await self._end_queued(
                        running,
                        JobStatus.FAILED,
                        BackupWindowMissed.code,
                        BackupWindowMissed(
                            vm=vm_id,
                            slot=_iso(
                                running.record.details.get("slot", running.record.started_at)
                            ),
                            deadline=_iso(running.deadline),
                            reason="the vault's other backups used every slot"
                            if online
                            else "its agent was not connected",
                            fix="Raise the vault's concurrent backups or spread the policies' "
                            "schedules; the next scheduled backup will try again."
                            if online
                            else "Check that the VM runs and its agent is connected (`coffer "
                            "agents`); the next scheduled backup will try again, or run "
                            "`coffer backup-now`.",
                        ).message,
                    )
                elif self._started.get(vault, 0) < self._limits.get(vault, 1) and (
                    self._registry.online(vm_id)
                ):
                    queue.remove(running)
                    self._started[vault] = self._started.get(vault, 0) + 1
                    running.started = True
                    self._spawn(self._start_backup(running), f"job-{running.record.id}")
                else:
                    left = running.deadline - now
                    nearest = left if nearest is None else min(nearest, left)
        return nearest

    async def _end_queued(
        self, running: RunningBackup, status: str, code: str, message: str
    ) -> None:
        job = running.record
        job.status, job.error_code, job.error_message = status, code, message
        job.details.pop("phase", None)
        await self._record_end(running)
        await self._backup_ended(job)

    async def _start_backup(self, running: RunningBackup) -> None:
        job = running.record
        try:
            session = self._registry.get(job.vm_id)
            datastore = await self._datastores.get(job.vault)
            running.chunk_size = datastore.chunk_size
            running.previous = await self._catalog.latest_recovery_point(job.vm_id)
            if running.previous is not None and running.previous.vault != job.vault:
                running.previous = None  # registered anew to another vault: a full backup
            running.vm = {
                "name": session.hello.name,
                "service": session.hello.service,
                "region": session.hello.region,
                "hostname": session.hello.hostname,
            }
            known = [d.name for d in session.hello.disks]
            job.details["disks"] = running.disks or known
            job.details.pop("phase", None)
            await self._catalog.update_job(job)
            running.touch()
            command = agent_pb2.ControllerMessage(
                backup=agent_pb2.BackupCommand(
                    job_id=job.id,
                    chunk_size=datastore.chunk_size,
                    disks=running.disks,
                    previous_recovery_point_id=running.previous.id if running.previous else "",
                )
            )
        except Exception as exc:  # e.g. the agent went away between dispatch and start
            self._started[job.vault] -= 1
            error = exc if isinstance(exc, CofferError) else None
            if error is None:
                log.exception("job %s could not start", job.id)
            await self._end_queued(
                running,
                JobStatus.FAILED,
                error.code if error else "InternalError",
                error.message if error else f"internal error in the controller: {exc!r}",
            )
            self.kick()
            return
        try:
            await self._run(running, session, command, self._finish_backup)
        finally:
            self._started[job.vault] -= 1
            self._datastores.guard(job.vault).release(job.id)
            self.kick()
            await self._backup_ended(job)

    def _left_for_next_start(self, job: JobRecord) -> bool:
        """A job the stop cut short: the next start records its failure (and its bytes)."""
        return self._stopping and job.status == JobStatus.FAILED

    async def _backup_ended(self, job: JobRecord) -> None:
        if self.on_backup_ended is None or self._left_for_next_start(job):
            return
        try:
            await self.on_backup_ended(job)
        except Exception:
            # The job's own record is written; what follows it (item state, pruning) must not
            # take the job manager down with it.
            log.exception("job %s: follow-up after the backup failed", job.id)

    async def _finish_backup(self, running: RunningJob, result: agent_pb2.CommandResult) -> None:
        assert isinstance(running, RunningBackup)
        job = running.record
        disks: list[ManifestDisk] = []
        total_data = 0
        for disk in result.disks:
            job.bytes_read += disk.bytes_read
            job.bytes_sent += disk.bytes_sent
            if disk.disk not in running.indexes:
                raise Conflict(detail=f"the agent reported disk {disk.disk!r} without its index")
            index, index_sha, size = running.indexes[disk.disk]
            total_data += size
            disks.append(
                ManifestDisk(
                    name=disk.disk,
                    size_bytes=index.size_bytes,
                    chunk_size=index.chunk_size,
                    chunk_count=len(index),
                    index_sha256=index_sha,
                    consistency=disk.consistency,
                    snapshot=disk.snapshot_provider,
                )
            )
        wanted = set(job.details.get("disks", ()))
        if {d.name for d in disks} != wanted:
            raise Conflict(
                detail=f"the agent backed up disks {sorted(d.name for d in disks)}, "
                f"not the {sorted(wanted)} this backup was for"
            )
        if running.cancel_requested:
            raise JobCancelled(job_id=job.id)
        # From here the recovery point is being committed: a cancel is refused, not half done.
        running.committing = True
        job.details["frozen_ms"] = round(result.frozen_ms, 1)
        job.details["consistency"] = {
            d.disk: f"{d.consistency or Consistency.CRASH} ({d.snapshot_provider or 'live'})"
            for d in result.disks
        }
        manifest = RecoveryPointManifest(
            id=running.rp_id,
            vm_id=job.vm_id,
            vault=job.vault,
            job_id=job.id,
            created_at=datetime.fromtimestamp(self._clock.now(), UTC),
            # Never more than its weakest disk, whatever the agent says overall.
            consistency=weakest(
                [result.consistency or Consistency.CRASH]
                + [d.consistency or Consistency.CRASH for d in result.disks]
            ),
            disks=tuple(disks),
            vm=running.vm,
        )
        datastore = await self._datastores.get(job.vault)
        # accept_index already made sure every chunk the indexes name is durable.
        await self.in_pool(partial(datastore.put_manifest, manifest, verify_chunks=False))
        await self._catalog.insert_recovery_point(_record(manifest, job.bytes_stored, total_data))
        job.recovery_point_id = running.rp_id

    # --- restores ---------------------------------------------------------------------------

    async def restore(
        self, vm_id: str, rp_id: str, disk: str, target_path: str, target_vm: str
    ) -> JobRecord:
        rp = await self._catalog.recovery_point(rp_id)
        if rp.vm_id != vm_id:
            raise NotFound(kind=f"recovery point of VM {vm_id!r}", name=rp_id)
        rp_disk = next((d for d in rp.disks if d.name == disk), None)
        if rp_disk is None:
            raise DiskNotFound(vm_id=vm_id, disk=disk, known=", ".join(d.name for d in rp.disks))
        if not target_path:
            raise InvalidArgument(detail="a restore needs a target path on the target VM")
        target_vm = target_vm or vm_id
        session = self._registry.get(target_vm)
        datastore = await self._datastores.get(rp.vault)
        index = await self.in_pool(datastore.get_index, rp.id, disk)
        job = self._new_job(Operation.RESTORE, target_vm, rp.vault)
        # Held, then the recovery point checked again: a prune and collection that came first
        # are seen here, and any that come later leave these chunks alone.
        guard = self._datastores.guard(rp.vault)
        guard.hold(job.id, index.referenced())
        try:
            await self.in_pool(datastore.get_manifest, rp.id)
        except NotFound:
            guard.release(job.id)
            raise NotFound(kind="recovery point", name=rp.id) from None
        job.recovery_point_id = rp.id
        job.details = {"source_vm": vm_id, "disk": disk, "target_path": target_path}
        running = RunningRestore(
            job,
            recovery_point=rp,
            disk=disk,
            target_vm=target_vm,
            index=index,
            allowed=frozenset(index.referenced()),
        )
        try:
            await self._admit(running)
        except BaseException:
            guard.release(job.id)
            raise
        command = agent_pb2.ControllerMessage(
            restore=agent_pb2.RestoreCommand(
                job_id=job.id,
                recovery_point_id=rp.id,
                disk=disk,
                target_path=target_path,
                size_bytes=rp_disk.size_bytes,
                chunk_size=rp_disk.chunk_size,
            )
        )
        self._spawn(self._run(running, session, command, self._finish_restore), f"job-{job.id}")
        return job

    def _finish_restore(self, running: RunningJob, result: agent_pb2.CommandResult) -> None:
        running.record.bytes_read = result.bytes_written

    # --- cancelling -------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running backup or restore; other jobs run to their end."""
        running = self._running.get(job_id)
        if running is None:
            job = await self._catalog.job(job_id)
            raise Conflict(detail=f"job {job_id} has already ended ({job.status})")
        job = running.record
        if JobStatus(job.status).ended:
            # Its outcome is decided and its record is being written: too late to cancel
            # (and a Cancelling written now would overwrite that outcome).
            raise Conflict(detail=f"job {job_id} has already ended ({job.status})")
        if not isinstance(running, RunningBackup | RunningRestore):
            raise Conflict(detail=f"a {job.operation} job cannot be cancelled; it ends by itself")
        if isinstance(running, RunningBackup) and running.committing:
            raise Conflict(
                detail=f"backup {job_id} is committing its recovery point and can no longer "
                "be cancelled; delete the recovery point afterwards if it is not wanted"
            )
        if running.cancel_requested:
            return job
        running.cancel_requested = True
        if isinstance(running, RunningBackup) and not running.started:
            self._queues[job.vault].remove(running)
            await self._end_queued(
                running,
                JobStatus.CANCELLED,
                JobCancelled.code,
                JobCancelled(job_id=job.id).message,
            )
            return job
        job.status = JobStatus.CANCELLING
        await self._catalog.update_job(job)
        self._publish(job)
        running.touch()
        session = self._registry.session(job.vm_id)
        if session is not None:
            session.outbox.put_nowait(
                agent_pb2.ControllerMessage(cancel=agent_pb2.CancelCommand(job_id=job.id))
            )
        self._spawn(self._cancel_deadline(running), f"cancel-{job.id}")
        return job

    async def _cancel_deadline(self, running: RunningJob) -> None:
        """An agent that does not stop a cancelled job in time is not waited for any more."""
        # Waits for the job's end, not a fixed time: a shutdown waits for this task.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(running.ended.wait(), CANCEL_GRACE_SECONDS)
        if running.reply is not None and not running.reply.done():
            running.reply.set_exception(JobCancelled(job_id=running.record.id))

    # --- the common path of agent jobs ------------------------------------------------------

    def _new_job(self, operation: Operation, vm_id: str, vault: str) -> JobRecord:
        return JobRecord(
            id=new_id(),
            operation=operation,
            status=JobStatus.IN_PROGRESS,
            vault=vault,
            vm_id=vm_id,
            started_at=self._clock.now(),
        )

    async def _admit(self, running: RunningJob) -> None:
        """One job per VM at a time: a second one is refused, not queued behind a stuck one."""
        vm_id = running.record.vm_id
        if vm_id in self._by_vm:
            raise OperationInProgress(vm_id=vm_id, job_id=self._by_vm[vm_id])
        self._by_vm[vm_id] = running.record.id
        self._running[running.record.id] = running
        try:
            await self._catalog.insert_job(running.record)
        except BaseException:
            self._forget(running)
            raise
        self._publish(running.record)

    async def _run(
        self,
        running: RunningJob,
        session: AgentSession,
        command: agent_pb2.ControllerMessage,
        finish: Callable[[RunningJob, agent_pb2.CommandResult], object],
    ) -> None:
        job = running.record
        try:
            if running.cancel_requested:  # cancelled while its command was being prepared
                raise JobCancelled(job_id=job.id)
            running.reply = session.send(command, job.id)
            result = await running.reply
            if not result.ok:
                raise from_proto(result.error)
            outcome = finish(running, result)
            if asyncio.iscoroutine(outcome):
                await outcome
            job.status = (
                JobStatus.COMPLETED_WITH_WARNINGS if result.warnings else JobStatus.COMPLETED
            )
            if result.warnings:
                job.details["warnings"] = list(result.warnings)
        except CofferError as exc:
            job.status, job.error_code, job.error_message = JobStatus.FAILED, exc.code, exc.message
            if running.cancel_requested:
                job.status = JobStatus.CANCELLED
                job.error_code, job.error_message = (
                    JobCancelled.code,
                    JobCancelled(job_id=job.id).message,
                )
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job.id)
            job.status, job.error_code = JobStatus.FAILED, "InternalError"
            job.error_message = f"internal error in the controller: {exc!r}"
        finally:
            running.reply = None
            await self._record_end(running)
            self._datastores.guard(job.vault).release(job.id)
            if job.operation == Operation.BACKUP and not self._left_for_next_start(job):
                try:
                    await self._catalog.add_stored_bytes(job.vault, job.bytes_stored)
                except Exception:
                    log.exception("job %s: the vault's stored bytes could not be updated", job.id)

    def _forget(self, running: RunningJob) -> None:
        self._running.pop(running.record.id, None)
        if self._by_vm.get(running.record.vm_id) == running.record.id:
            del self._by_vm[running.record.vm_id]
        if self._status is not None:
            self._status.forget_job(running.record.id)

    def _publish(self, job: JobRecord) -> None:
        if self._status is not None:
            self._status.publish_job_state(
                JobState(
                    job_id=job.id,
                    operation=job.operation,
                    status=JobStatus(job.status),
                    vm_id=job.vm_id or None,
                    error_code=job.error_code or None,
                    ts=datetime.fromtimestamp(self._clock.now(), UTC),
                )
            )

    # --- the agents' data path --------------------------------------------------------------

    def running_backup(self, vm_id: str, job_id: str) -> RunningBackup:
        running = self._owned(vm_id, job_id)
        if not isinstance(running, RunningBackup) or not running.started:
            raise PermissionDenied(detail=f"job {job_id} is not a running backup")
        return running

    def running_restore(self, vm_id: str, job_id: str) -> RunningRestore:
        running = self._owned(vm_id, job_id)
        if not isinstance(running, RunningRestore):
            raise PermissionDenied(detail=f"job {job_id} is not a restore")
        return running

    def _owned(self, vm_id: str, job_id: str) -> RunningJob:
        running = self._running.get(job_id)
        # The same answer for "no such job" and "not yours": an agent learns nothing of others.
        if running is None or running.record.vm_id != vm_id:
            raise PermissionDenied(detail=f"job {job_id} is not a running job of VM {vm_id!r}")
        return running

    async def index_for(self, vm_id: str, job_id: str, rp_id: str, disk: str) -> DiskIndex:
        """A disk index a running job of `vm_id` may read: its restore's, or its backup's base."""
        running = self._owned(vm_id, job_id)
        if isinstance(running, RunningRestore):
            assert running.index is not None
            if running.recovery_point is None or (rp_id, disk) != (
                running.recovery_point.id,
                running.disk,
            ):
                raise PermissionDenied(detail=f"restore {job_id} restores another disk")
            return running.index
        assert isinstance(running, RunningBackup)
        if running.previous is None or running.previous.id != rp_id:
            raise PermissionDenied(
                detail=f"recovery point {rp_id} is not the base of backup {running.record.id}"
            )
        if disk not in {d.name for d in running.previous.disks}:
            raise NotFound(kind="disk in the previous recovery point", name=disk)
        datastore = await self._datastores.get(running.record.vault)
        index = await self.in_pool(datastore.get_index, rp_id, disk)
        # The base recovery point is not pruned while this backup runs (`in_use`), so its
        # manifest keeps its chunks; held as well, for a prune that came first.
        referenced = index.referenced()
        self._datastores.guard(running.record.vault).hold(running.record.id, referenced)
        running.known.update(referenced)
        return index

    async def missing_chunks(self, running: RunningBackup, digests: list[bytes]) -> list[bytes]:
        datastore = await self._datastores.get(running.record.vault)
        unknown = [d for d in digests if d not in running.known]
        # Held before asking: garbage collection either deleted a chunk already (it is then
        # reported missing and uploaded again) or will leave it alone.
        self._datastores.guard(running.record.vault).hold(running.record.id, unknown)
        missing = await self.in_pool(datastore.missing_chunks, unknown)
        running.known.update(set(unknown) - set(missing))
        return missing

    def chunk_stored(self, running: RunningBackup, digest: bytes, stored: int, sent: int) -> None:
        self._datastores.guard(running.record.vault).hold(running.record.id, (digest,))
        running.known.add(digest)
        running.record.bytes_stored += stored
        running.touch()

    async def accept_index(self, running: RunningBackup, index: DiskIndex) -> None:
        """Take a disk's index once every chunk it references is known to be durable."""
        if index.chunk_size != running.chunk_size:
            raise InvalidArgument(
                detail=f"index chunk size {index.chunk_size} is not the job's {running.chunk_size}"
            )
        datastore = await self._datastores.get(running.record.vault)
        unknown = index.referenced() - running.known
        self._datastores.guard(running.record.vault).hold(running.record.id, unknown)
        absent = await self.in_pool(datastore.missing_chunks, unknown)
        if absent:
            raise ChunkMissing(digest=absent[0].hex())
        running.known.update(unknown)
        index_sha = await self.in_pool(datastore.put_index, running.rp_id, index)
        size = await self.in_pool(data_bytes, index)
        running.indexes[index.disk] = (index, index_sha, size)

    # --- watching ---------------------------------------------------------------------------

    def running(self, job_id: str) -> RunningJob | None:
        return self._running.get(job_id)

    def running_job_of(self, vm_id: str) -> str:
        return self._by_vm.get(vm_id, "")

    def running_count(self, vault: str) -> int:
        return sum(1 for r in self._running.values() if r.record.vault == vault)

    def in_use(self) -> set[str]:
        """Recovery points running jobs read: an incremental's base, a restore's source."""
        used: set[str] = set()
        for running in self._running.values():
            if isinstance(running, RunningBackup) and running.previous is not None:
                used.add(running.previous.id)
            elif isinstance(running, RunningRestore) and running.recovery_point is not None:
                used.add(running.recovery_point.id)
        return used

    async def job(self, job_id: str) -> JobRecord:
        running = self._running.get(job_id)
        return running.record if running else await self._catalog.job(job_id)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")
