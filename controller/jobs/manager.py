"""The job manager: the one door to the job layer for the rest of the controller.

Thin. The operator service, the protection manager, the pruner and the agent service start,
cancel and watch jobs here, and the agents' data-path calls find their job's transaction or
restore session here; the work is done by the parts of this package (see its `__init__`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Self, TypeVar

from controller.catalog import Catalog, JobRecord, RecoveryPointRecord
from controller.datastore import Datastore
from controller.datastore.copy import VaultCopy
from controller.datastores import Datastores
from controller.integrity import Integrity
from controller.jobs.agent_command import AgentJob
from controller.jobs.agent_command import cancel as cancel_agent_job
from controller.jobs.backup import (
    MANUAL_BACKUP_WINDOW_SECONDS,
    BackupEnded,
    Backups,
    RunningBackup,
)
from controller.jobs.cancel import ShouldStop, abortable
from controller.jobs.deadlines import ReplyDeadlines
from controller.jobs.drill import DrillJobs
from controller.jobs.file_recovery import FileRecoveries, FileSource, RunningFileRecovery
from controller.jobs.interrupted import record_interrupted
from controller.jobs.restore import Restores, RunningRestore
from controller.jobs.runner import JobRunner, RunningJob
from controller.registry import AgentRegistry
from controller.status import StatusMonitor
from shared.blob import Compression
from shared.clock import Clock
from shared.errors import (
    AgentLimitExceeded,
    ChunkMissing,
    CofferError,
    Conflict,
    CorruptData,
    DataCorrupted,
    PermissionDenied,
)
from shared.index import DiskIndex
from shared.model import JobStatus, Operation, Trigger
from shared.rpc import agent_pb2
from shared.supervision import Policy, Supervisor

T = TypeVar("T")

DISPATCHER_TASK = "backup-dispatcher"


class JobManager:
    """Starts jobs, serves their data path, records their outcome; an async context manager.

    The backup dispatcher runs under `supervisor` with the RESTART policy: the controller's
    own Supervisor when it passes one, else one the job manager owns.
    """

    def __init__(
        self,
        catalog: Catalog,
        registry: AgentRegistry,
        datastores: Datastores,
        status: StatusMonitor | None,
        clock: Clock,
        pool: ThreadPoolExecutor,
        *,
        supervisor: Supervisor | None = None,
        integrity: Integrity | None = None,
        deadlines: ReplyDeadlines | None = None,
        manual_window: float = MANUAL_BACKUP_WINDOW_SECONDS,
    ) -> None:
        self._catalog = catalog
        self._registry = registry
        self._datastores = datastores
        self._clock = clock
        self._pool = pool
        self._runner = JobRunner(catalog, status, clock, deadlines)
        # Where bad chunks found by jobs, and chunks they store again, are recorded.
        self.integrity = integrity or Integrity(catalog, datastores, clock, pool)
        self._backups = Backups(
            catalog,
            registry,
            datastores,
            self._runner,
            clock,
            pool,
            self.integrity,
            manual_window=manual_window,
        )
        self._restores = Restores(catalog, registry, datastores, self._runner, pool, self.integrity)
        self._drills = DrillJobs(
            catalog, registry, datastores, self._runner, clock, pool, self.integrity
        )
        self._files = FileRecoveries(catalog, registry, datastores, self._runner, pool, clock)
        self._supervisor = supervisor
        self._own_supervisor = supervisor is None
        # Jobs the last shutdown interrupted, failed when the manager started.
        self.interrupted: list[JobRecord] = []
        # Recovery points other jobs read (a vault upgrade's), by job id: not pruned meanwhile.
        self._reading: dict[str, set[str]] = {}
        registry.on_connect.append(lambda vm_id: self.kick())
        if status is not None:
            # The monitor shows an agent's progress only for that agent's own running jobs.
            status.set_job_owner(self._vm_of_running)
            status.on_progress.append(self.heard_from)

    async def __aenter__(self) -> Self:
        self.interrupted = await record_interrupted(
            self._catalog, self._datastores, self._clock, self._pool
        )
        await self._runner.__aenter__()
        if self._supervisor is None:
            self._supervisor = Supervisor("jobs")
            await self._supervisor.__aenter__()
        self._supervisor.start(DISPATCHER_TASK, self._backups.dispatcher.run, policy=Policy.RESTART)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._supervisor is not None
        self._runner.stopping()
        # Queued backups stay InProgress in the catalog: the next start fails them as
        # ControllerRestarted (and runs a scheduled one again), in one place.
        await self._supervisor.stop(DISPATCHER_TASK)
        # Whatever ends the block is the caller's to see, not wrapped in our task groups' errors.
        if self._own_supervisor:
            await self._supervisor.__aexit__(None, None, None)
            self._supervisor = None
        await self._runner.__aexit__(None, None, None)

    def stopping(self) -> None:
        """The controller is stopping: failures from here on are the stop's, not the jobs'."""
        self._runner.stopping()

    @property
    def on_backup_ended(self) -> BackupEnded | None:
        """Called with a backup's final record (the protection manager updates its item)."""
        return self._backups.on_ended

    @on_backup_ended.setter
    def on_backup_ended(self, listener: BackupEnded | None) -> None:
        self._backups.on_ended = listener

    # --- starting jobs -------------------------------------------------------------------------

    async def run(
        self,
        operation: Operation,
        vault: str,
        vm_id: str,
        body: Callable[[JobRecord], Awaitable[None]],
        *,
        wait: bool = True,
        details: dict[str, Any] | None = None,
        trigger: Trigger = Trigger.MANUAL,
        slot: float | None = None,
        cancellable: bool = False,
    ) -> JobRecord:
        """Record a job and run `body` as it; with `wait`, return once it has ended.

        A `cancellable` job (maintenance) is cancelled as a task: by `cancel`, and when the
        controller stops; its body should stop between items (controller.jobs.cancel)."""
        job = self._runner.new_record(
            operation, vault, vm_id, trigger=trigger, slot=slot, details=dict(details or {})
        )
        running = RunningJob(job, cancellable=cancellable)
        await self._runner.admit(running)
        self._runner.start(running, lambda: body(job))
        if wait:
            await asyncio.shield(running.ended.wait())
        return job

    async def run_each(
        self,
        operation: Operation,
        vault: str,
        vm_ids: Sequence[str],
        body: Callable[[list[JobRecord]], Awaitable[dict[str, CofferError]]],
    ) -> list[JobRecord]:
        """One job per VM of `vm_ids`, recorded, run and ended together, and returned once
        ended: `body` does the work of them all (in a few catalog transactions, not one per
        VM) and returns the error of each job that failed, by job id; what it raises is every
        job's outcome. The jobs are written in one transaction as they start and one as they
        end."""
        records = [
            self._runner.new_record(operation, vault, vm_id, trigger=Trigger.MANUAL)
            for vm_id in vm_ids
        ]
        jobs = [RunningJob(record) for record in records]
        await self._runner.admit_many(jobs)
        self._runner.start_together(jobs, lambda: body(records))
        for running in jobs:
            await asyncio.shield(running.ended.wait())
        return records

    async def backup(
        self,
        vault: str,
        vm_id: str,
        *,
        disks: Sequence[str] = (),
        trigger: Trigger = Trigger.MANUAL,
        slot: float | None = None,
        deadline: float | None = None,
    ) -> JobRecord:
        """Queue a backup of `vm_id` into `vault`; it starts when its agent and a slot are free.

        A manual backup of an offline VM is refused at once; a scheduled one waits for the
        agent until `deadline` (the scheduler's, which already allows for a late start)."""
        return await self._backups.queue(
            vault, vm_id, disks=disks, trigger=trigger, slot=slot, deadline=deadline
        )

    async def backup_many(
        self, backups: Sequence[tuple[str, str]], *, disks: Sequence[str] = ()
    ) -> list[JobRecord]:
        """Queue manual backups of many (vault, VM id) at once, in one catalog transaction:
        every one, or none when one is refused."""
        return await self._backups.queue_many(backups, disks=disks)

    async def restore(
        self,
        vm_id: str,
        rp_id: str,
        disk: str,
        target_path: str,
        target_vm: str,
        *,
        in_place: bool = False,
        overwrite: bool = False,
        copy: VaultCopy | None = None,
    ) -> JobRecord:
        """A Restore job; from the vault's off-site `copy` (opened) if given."""
        return await self._restores.start(
            vm_id,
            rp_id,
            disk,
            target_path,
            target_vm,
            in_place=in_place,
            overwrite=overwrite,
            copy=copy,
        )

    async def drill(
        self, rp: RecoveryPointRecord, agent: str, directory: str, trigger: Trigger
    ) -> JobRecord:
        """A RestoreDrill job of recovery point `rp` on drill agent `agent` (jobs/drill.py)."""
        return await self._drills.start(rp, agent, directory, trigger)

    async def list_files(
        self, source: FileSource, path: bytes, limit: int, after: bytes
    ) -> RunningFileRecovery:
        """A FileRecovery job listing one page of a directory; returned once it has ended
        (its `listing` is the page when it succeeded)."""
        running = await self._files.list_files(source, path, limit, after)
        await asyncio.shield(running.ended.wait())
        return running

    async def get_files(
        self, source: FileSource, paths: list[bytes], destination: str
    ) -> JobRecord:
        """A FileRecovery job copying files out on the target VM; returned as it starts."""
        return (await self._files.get_files(source, paths, destination)).record

    async def mount_files(self, source: FileSource, ttl_seconds: float) -> JobRecord:
        """A FileRecovery job mounting a recovery point's disk in the target VM; returned
        once it is mounted (its details say where) or has ended."""
        running = await self._files.mount(source, ttl_seconds)
        waits = [
            asyncio.ensure_future(running.mounted.wait()),
            asyncio.ensure_future(running.ended.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return running.record

    async def unmount_files(self, job_id: str) -> JobRecord:
        """End a FileRecovery mount now; its record once it has ended."""
        return await self._files.unmount(job_id)

    def file_recovery_status(self, vm_id: str, status: agent_pb2.FileRecoveryStatus) -> None:
        """What a FileRecovery job of VM `vm_id` has open and has fetched, as its agent says."""
        self.heard_from(vm_id, [status.job_id])
        self._files.status(vm_id, status)

    def set_limit(self, vault: str, limit: int) -> None:
        """A vault's concurrent backups changed: queued backups may start now."""
        self._backups.dispatcher.set_limit(vault, limit)

    def kick(self) -> None:
        """Wake the dispatcher: something that can start or expire a queued backup changed."""
        self._backups.dispatcher.kick()

    async def abortable(self, work: Callable[[ShouldStop], T]) -> T:
        """Blocking work of a cancellable job, in the pool; see controller.jobs.cancel."""
        return await abortable(self._pool, work)

    def in_pool(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # --- cancelling ----------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running backup or restore, or a running prune or collection;
        other jobs run to their end."""
        running = self._runner.get(job_id)
        if running is None:
            job = await self._catalog.job(job_id)
            raise Conflict(detail=f"job {job_id} has already ended ({job.status})")
        job = running.record
        if job.status.ended:
            # Its outcome is decided and its record is being written: too late to cancel
            # (and a Cancelling written now would overwrite that outcome).
            raise Conflict(detail=f"job {job_id} has already ended ({job.status})")
        if isinstance(running, RunningBackup):
            return await self._backups.cancel(running)
        if isinstance(running, AgentJob):
            await cancel_agent_job(running, self._runner, self._registry)
            return job
        if running.cancellable and running.task is not None:
            if not running.cancel_requested:
                running.cancel_requested = True
                running.task.cancel()
                job.status = JobStatus.CANCELLING
                await self._runner.save(running)
            return job
        raise Conflict(detail=f"a {job.operation} job cannot be cancelled; it ends by itself")

    # --- the agents' data path -----------------------------------------------------------------

    def heard_from(self, vm_id: str, job_ids: Sequence[str]) -> None:
        """The agent of `vm_id` said something of `job_ids` (named them in a heartbeat,
        reported their progress): their reply deadlines start again. Jobs that are not its
        own are passed over: an agent keeps only its own jobs alive."""
        for job_id in job_ids:
            running = self._runner.get(job_id)
            if isinstance(running, AgentJob) and running.agent_vm == vm_id:
                running.heard()

    def running_backup(self, vm_id: str, job_id: str) -> RunningBackup:
        running = self._owned(vm_id, job_id)
        if not isinstance(running, RunningBackup) or running.transaction is None:
            raise PermissionDenied(detail=f"job {job_id} is not a running backup")
        return running

    def running_restore(self, vm_id: str, job_id: str) -> RunningRestore:
        running = self._owned(vm_id, job_id)
        if not isinstance(running, RunningRestore):
            raise PermissionDenied(detail=f"job {job_id} is not a restore")
        return running

    def _owned(self, vm_id: str, job_id: str) -> RunningJob:
        running = self._runner.get(job_id)
        # The same answer for "no such job" and "not yours": an agent learns nothing of others.
        if running is None or running.agent_vm != vm_id:
            raise PermissionDenied(detail=f"job {job_id} is not a running job of VM {vm_id!r}")
        if isinstance(running, AgentJob):
            running.heard()  # a data-path call of the job is a word of its agent about it
        return running

    def over_limit(self, running: RunningBackup, error: AgentLimitExceeded) -> AgentLimitExceeded:
        """The agent of `running` went past a limit (controller.agent_limits): the job fails
        with `error` whatever the agent does next, so a hostile agent cannot go on holding what
        the job lets it hold. The error, for the refused call to raise."""
        if running.reply is not None and not running.reply.done():
            running.reply.set_exception(error)
        return error

    def disks_declared(self, vm_id: str, disks: dict[str, int]) -> None:
        """The agent of `vm_id` declared its disks (name: size) again: a backup of it running
        now checks its indexes against these."""
        running = self._runner.get(self._runner.of_vm(vm_id))
        if isinstance(running, RunningBackup):
            running.declared = dict(disks)

    async def index_for(self, vm_id: str, job_id: str, rp_id: str, disk: str) -> DiskIndex:
        """A disk index a running job of `vm_id` may read: its restore's, or its backup's base."""
        running = self._owned(vm_id, job_id)
        if isinstance(running, RunningRestore) and running.session is not None:
            return running.session.index_for(rp_id, disk)
        if isinstance(running, RunningBackup) and running.transaction is not None:
            transaction = running.transaction
            try:
                return await transaction.base_index(rp_id, disk)
            finally:
                if transaction.base_unreadable:
                    # Recorded on the job: these disks were read in full, and why.
                    running.record.details["full_read"] = dict(transaction.base_unreadable)
                    running.touch()
        raise PermissionDenied(detail=f"job {job_id} reads no disk index")

    async def datastore(self, running: RunningJob) -> Datastore:
        """Where the job reads: a restore's session's datastore (the vault's, of a vault being
        upgraded either part, or its copy), a backup's the one it started with (in a vault
        being upgraded, maybe the format-1 part), else its vault's."""
        if isinstance(running, RunningRestore) and running.session is not None:
            return running.session.datastore
        if isinstance(running, RunningBackup) and running.transaction is not None:
            return running.transaction.datastore
        return await self._datastores.get(running.record.vault)

    async def missing_chunks(self, running: RunningBackup, digests: list[bytes]) -> list[bytes]:
        assert running.transaction is not None
        return await running.transaction.missing_chunks(digests)

    def chunk_stored(self, running: RunningBackup, digest: bytes, stored: int, sent: int) -> None:
        assert running.transaction is not None
        running.transaction.chunk_stored(digest, stored)

    async def store_chunk(
        self,
        running: RunningBackup,
        digest: bytes,
        data: bytes,
        compression: Compression,
        raw_size: int,
    ) -> int:
        """Verify and store a chunk a backup uploaded (a bad one replaces what the datastore
        holds under its name); the bytes it added."""
        assert running.transaction is not None
        self._still_running(running)
        return await running.transaction.store_chunk(digest, data, compression, raw_size)

    async def chunk_unreadable(
        self, running: RunningRestore, digest: bytes, error: ChunkMissing | CorruptData
    ) -> DataCorrupted:
        """A chunk a restore downloads cannot be read: marked bad; the error to fail with."""
        return await self._restores.chunk_unreadable(running, digest, error)

    async def commit_chunks(self, running: RunningBackup) -> None:
        """Make the chunks a backup stored so far visible and durable in the datastore."""
        assert running.transaction is not None
        await running.transaction.commit_chunks()

    async def accept_index(self, running: RunningBackup, index: DiskIndex) -> None:
        """Take a disk's index once every chunk it references is known to be durable."""
        assert running.transaction is not None
        self._still_running(running)
        await running.transaction.accept_index(index)

    @staticmethod
    def _still_running(running: RunningBackup) -> None:
        """A stream of a backup that ended meanwhile (failed by an agent's excess) stops."""
        if running.record.status.ended:
            raise PermissionDenied(detail=f"job {running.id} has ended")

    # --- watching ------------------------------------------------------------------------------

    def running(self, job_id: str) -> RunningJob | None:
        return self._runner.get(job_id)

    def on_job_end(self, observer: Callable[[JobRecord], None]) -> None:
        """Tell `observer` of every job that ends, once its outcome is written."""
        self._runner.on_end.append(observer)

    def _vm_of_running(self, job_id: str) -> str | None:
        # The VM whose agent does the work and reports its progress (a drill's drill agent).
        running = self._runner.get(job_id)
        return running.agent_vm if running is not None else None

    def running_job_of(self, vm_id: str) -> str:
        """The job that has the VM to itself now (a backup, queued or running, or a restore)."""
        return self._runner.of_vm(vm_id)

    def running_jobs(self) -> list[JobRecord]:
        """The records of every job running (or queued) now."""
        return [running.record for running in self._runner]

    def running_count(self, vault: str) -> int:
        return sum(1 for running in self._runner if running.record.vault == vault)

    def in_use(self) -> set[str]:
        """Recovery points running jobs read: an incremental's base, a restore's source, what
        a vault upgrade converts."""
        return (
            self._backups.in_use() | self._restores.in_use() | set().union(*self._reading.values())
        )

    def reading(self, job_id: str, rp_ids: Sequence[str]) -> None:
        """Job `job_id` reads recovery points `rp_ids` until `done_reading`: none is pruned."""
        self._reading[job_id] = set(rp_ids)

    def done_reading(self, job_id: str) -> None:
        self._reading.pop(job_id, None)

    async def job(self, job_id: str) -> JobRecord:
        running = self._runner.get(job_id)
        return running.record if running is not None else await self._catalog.job(job_id)
