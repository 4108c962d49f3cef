"""Jobs: every backup and restore, from the operator's request to its recorded outcome.

The job manager is the controller's authority on what runs. It creates the job record, sends
the command down the agent's session, serves the agent's data-path calls only for jobs that
are running for that agent (`running_backup`, `running_restore`), and records the outcome.

A backup's recovery point is committed in this order, so that it is visible only when
complete: every chunk is durable (checked as each index arrives), the indexes are written, then
the manifest (the datastore's commit point), then the catalog row, then the job's status.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from types import TracebackType
from typing import Self, TypeVar

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
from shared.errors import (
    ChunkMissing,
    CofferError,
    Conflict,
    DiskNotFound,
    InvalidArgument,
    NotFound,
    OperationInProgress,
    PermissionDenied,
)
from shared.index import DiskIndex
from shared.manifest import ManifestDisk, RecoveryPointManifest
from shared.model import DEFAULT_VAULT, Consistency, JobStatus, Operation
from shared.rpc import agent_pb2
from shared.rpc_errors import from_proto
from shared.status import JobState

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RunningJob:
    record: JobRecord
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def touch(self) -> None:
        self.changed.set()


@dataclass
class RunningBackup(RunningJob):
    previous: RecoveryPointRecord | None = None
    rp_id: str = ""
    chunk_size: int = 0
    vm: dict[str, str] = field(default_factory=dict)
    # Digests this job has seen durable in the datastore: checked, uploaded or in the previous
    # recovery point. An index may reference only these (or what a datastore check finds).
    known: set[bytes] = field(default_factory=set)
    indexes: dict[str, tuple[DiskIndex, str]] = field(default_factory=dict)


@dataclass
class RunningRestore(RunningJob):
    recovery_point: RecoveryPointRecord | None = None
    disk: str = ""
    target_vm: str = ""
    index: DiskIndex | None = None
    allowed: frozenset[bytes] = frozenset()


def _record(manifest: RecoveryPointManifest, bytes_stored: int) -> RecoveryPointRecord:
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
            RecoveryPointDiskRecord(d.name, d.size_bytes, d.chunk_size, d.chunk_count)
            for d in manifest.disks
        ),
    )


def new_id() -> str:
    return secrets.token_hex(6)


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
        self._tasks: asyncio.TaskGroup | None = None

    async def __aenter__(self) -> Self:
        await self._recover_committed_backups()
        interrupted = await self._catalog.fail_interrupted_jobs(
            self._clock.now(),
            "ControllerRestarted",
            "The controller stopped while this job ran; it did not complete and left no "
            "recovery point. Run it again.",
        )
        if interrupted:
            log.warning("marked %d jobs interrupted by the last shutdown as failed", interrupted)
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tasks is not None
        # Shutting down: the agents' sessions are closed by now, so every job's command has
        # failed with AgentDisconnected and its task is finishing its record.
        await self._tasks.__aexit__(exc_type, exc, tb)
        self._tasks = None

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
            await self._catalog.insert_recovery_point(_record(manifest, job.bytes_stored))
            job.status, job.ended_at, job.recovery_point_id = (
                JobStatus.COMPLETED,
                self._clock.now(),
                manifest.id,
            )
            await self._catalog.update_job(job)
            log.warning("job %s: recorded recovery point %s committed before a stop", job.id, rp_id)

    async def datastore(self, running: RunningJob) -> Datastore:
        return await self._datastores.get(running.record.vault)

    def in_pool(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # --- operator requests ------------------------------------------------------------------

    async def backup_now(self, vm_id: str, disks: list[str]) -> JobRecord:
        session = self._registry.get(vm_id)
        known = [d.name for d in session.hello.disks]
        for disk in disks:
            if disk not in known:
                raise DiskNotFound(vm_id=vm_id, disk=disk, known=", ".join(known))
        vault = DEFAULT_VAULT
        datastore = await self._datastores.get(vault)
        job = self._new_job(Operation.BACKUP, vm_id, vault)
        running = RunningBackup(
            job,
            previous=await self._catalog.latest_recovery_point(vm_id),
            rp_id=secrets.token_hex(8),
            chunk_size=datastore.chunk_size,
            vm={
                "name": session.hello.name,
                "service": session.hello.service,
                "region": session.hello.region,
                "hostname": session.hello.hostname,
            },
        )
        job.details = {"disks": disks or known, "recovery_point_id": running.rp_id}
        await self._admit(running)
        command = agent_pb2.ControllerMessage(
            backup=agent_pb2.BackupCommand(
                job_id=job.id,
                chunk_size=datastore.chunk_size,
                disks=disks,
                previous_recovery_point_id=running.previous.id if running.previous else "",
            )
        )
        self._spawn(running, session, command, self._finish_backup)
        return job

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
        await self._admit(running)
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
        self._spawn(running, session, command, self._finish_restore)
        return job

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

    def _spawn(
        self,
        running: RunningJob,
        session: AgentSession,
        command: agent_pb2.ControllerMessage,
        finish: Callable[[RunningJob, agent_pb2.CommandResult], object],
    ) -> None:
        assert self._tasks is not None, "job manager is not running"
        self._tasks.create_task(
            self._run(running, session, command, finish), name=f"job-{running.record.id}"
        )

    async def _run(
        self,
        running: RunningJob,
        session: AgentSession,
        command: agent_pb2.ControllerMessage,
        finish: Callable[[RunningJob, agent_pb2.CommandResult], object],
    ) -> None:
        job = running.record
        try:
            result = await session.send(command, job.id)
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
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job.id)
            job.status, job.error_code = JobStatus.FAILED, "InternalError"
            job.error_message = f"internal error in the controller: {exc!r}"
        finally:
            job.ended_at = self._clock.now()
            try:
                await self._catalog.update_job(job)
            except Exception:
                log.exception("job %s: its outcome could not be recorded", job.id)
            finally:
                self._forget(running)
                self._publish(job)
                running.touch()

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
                    vm_id=job.vm_id,
                    error_code=job.error_code or None,
                    ts=datetime.fromtimestamp(self._clock.now(), UTC),
                )
            )

    async def _finish_backup(self, running: RunningJob, result: agent_pb2.CommandResult) -> None:
        assert isinstance(running, RunningBackup)
        job = running.record
        disks: list[ManifestDisk] = []
        for disk in result.disks:
            job.bytes_read += disk.bytes_read
            job.bytes_sent += disk.bytes_sent
            if disk.disk not in running.indexes:
                raise Conflict(detail=f"the agent reported disk {disk.disk!r} without its index")
            index, index_sha = running.indexes[disk.disk]
            disks.append(
                ManifestDisk(
                    name=disk.disk,
                    size_bytes=index.size_bytes,
                    chunk_size=index.chunk_size,
                    chunk_count=len(index),
                    index_sha256=index_sha,
                )
            )
        wanted = set(job.details.get("disks", ()))
        if {d.name for d in disks} != wanted:
            raise Conflict(
                detail=f"the agent backed up disks {sorted(d.name for d in disks)}, "
                f"not the {sorted(wanted)} this backup was for"
            )
        manifest = RecoveryPointManifest(
            id=running.rp_id,
            vm_id=job.vm_id,
            vault=job.vault,
            job_id=job.id,
            created_at=datetime.fromtimestamp(self._clock.now(), UTC),
            consistency=result.consistency or Consistency.CRASH,
            disks=tuple(disks),
            vm=running.vm,
        )
        datastore = await self._datastores.get(job.vault)
        # accept_index already made sure every chunk the indexes name is durable.
        await self.in_pool(partial(datastore.put_manifest, manifest, verify_chunks=False))
        await self._catalog.insert_recovery_point(_record(manifest, job.bytes_stored))
        job.recovery_point_id = running.rp_id

    def _finish_restore(self, running: RunningJob, result: agent_pb2.CommandResult) -> None:
        running.record.bytes_read = result.bytes_written

    # --- the agents' data path --------------------------------------------------------------

    def running_backup(self, vm_id: str, job_id: str) -> RunningBackup:
        running = self._owned(vm_id, job_id)
        if not isinstance(running, RunningBackup):
            raise PermissionDenied(detail=f"job {job_id} is not a backup")
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
        running.known.update(index.referenced())
        return index

    async def missing_chunks(self, running: RunningBackup, digests: list[bytes]) -> list[bytes]:
        datastore = await self._datastores.get(running.record.vault)
        unknown = [d for d in digests if d not in running.known]
        missing = await self.in_pool(datastore.missing_chunks, unknown)
        running.known.update(set(unknown) - set(missing))
        return missing

    def chunk_stored(self, running: RunningBackup, digest: bytes, stored: int, sent: int) -> None:
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
        absent = await self.in_pool(datastore.missing_chunks, unknown)
        if absent:
            raise ChunkMissing(digest=absent[0].hex())
        running.known.update(unknown)
        index_sha = await self.in_pool(datastore.put_index, running.rp_id, index)
        running.indexes[index.disk] = (index, index_sha)

    # --- watching ---------------------------------------------------------------------------

    def running(self, job_id: str) -> RunningJob | None:
        return self._running.get(job_id)

    def running_job_of(self, vm_id: str) -> str:
        return self._by_vm.get(vm_id, "")

    async def job(self, job_id: str) -> JobRecord:
        running = self._running.get(job_id)
        return running.record if running else await self._catalog.job(job_id)
