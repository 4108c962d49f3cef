"""Restore jobs: one disk of a recovery point written by an agent, and what it may read.

A restore's session fixes what the agent may read while the job runs: one recovery point, one
of its disks, that disk's index, and exactly the chunks the index names (`allowed`); every
data-path call of the agent (FetchIndex, DownloadChunks) is checked against it. The chunks are
held in the vault's `ChunkGuard` first and the recovery point's manifest is read again after,
so a prune and collection that came first are seen (the restore is refused: NotFound) and any
that come later leave the chunks alone; the recovery point itself is not pruned while the
restore reads it (the job manager's `in_use`). The holds are released when the job ends.

The command goes to the target VM's agent (the source VM's by default), which writes the disk
as a new image under its `restore_dirs` (replacing an existing one only with `overwrite`), or
rolls the source VM's own configured disk back in place (`in_place`: only the chunks that
differ are fetched). The target VM must be in the region of the recovery point's vault; the
source VM's agent takes no part in a restore to another VM, and the target agent may read only
the restored disk's chunks, only while the job runs. The job records what was restored where
(`RestoreTarget`) and the bytes the agent compared, fetched and wrote.

A restore that meets a bad chunk fails with `DataCorrupted` (exit 7), naming the recovery
point, disk, chunk and digest: the controller's read of it failed (missing, or its blob
unreadable; `chunk_unreadable`), or the agent's check of what it downloaded did (the agent
names the chunk in its result, and the controller reads it again itself before believing it).
Either way the chunk is marked bad and the recovery points that reference it damaged
(controller.integrity) before the job ends.

A restore may read the vault's off-site copy instead (`--from-copy`, controller.copies): the
session then reads the copy's index and chunks and holds them in the copy's guard; a bad chunk
there fails the restore the same way, but marks nothing (the catalog's integrity records are
of the vault's own datastore).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from functools import partial

from controller.catalog import (
    AgentRecord,
    Catalog,
    JobRecord,
    RecoveryPointRecord,
    RestoreTarget,
)
from controller.datastore import ChunkGuard, Datastore
from controller.datastore.copy import VaultCopy
from controller.datastore.verify import MISSING, DamagedChunk, damage_in
from controller.datastores import Datastores
from controller.integrity import Integrity
from controller.jobs.agent_command import AgentJob, run_command
from controller.jobs.runner import JobRunner
from controller.registry import AgentRegistry
from shared.blob import Compression
from shared.errors import (
    ChunkMissing,
    CorruptData,
    DataCorrupted,
    DiskNotFound,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RestoreRegionMismatch,
    VmNotFound,
)
from shared.index import DiskIndex
from shared.model import Operation, RestoreMode
from shared.rpc import agent_pb2

MAX_TARGET_PATH = 4096  # bytes: Linux's PATH_MAX


@dataclass
class RestoreSession:
    """What one restore job reads: a disk of a recovery point, and only its chunks."""

    job_id: str
    recovery_point: RecoveryPointRecord
    disk: str
    index: DiskIndex
    datastore: Datastore
    guard: ChunkGuard
    pool: Executor
    allowed: frozenset[bytes] = field(default_factory=frozenset)
    copy: str = ""
    """The copy target it reads from ('' for the vault's own datastore)."""

    @classmethod
    async def open(
        cls,
        job_id: str,
        recovery_point: RecoveryPointRecord,
        disk: str,
        datastore: Datastore,
        guard: ChunkGuard,
        pool: Executor,
        *,
        copy: str = "",
    ) -> RestoreSession:
        """Read the disk's index and hold its chunks; NotFound if the recovery point is gone.
        `copy`: the copy target `datastore` is the vault's copy in."""
        loop = asyncio.get_running_loop()
        index = await loop.run_in_executor(pool, datastore.get_index, recovery_point.id, disk)
        # Held, then the recovery point checked again: a prune and collection that came first
        # are seen here, and any that come later leave these chunks alone.
        referenced = index.referenced()
        guard.hold(job_id, referenced)
        try:
            await loop.run_in_executor(pool, datastore.get_manifest, recovery_point.id)
        except NotFound:
            guard.release(job_id)
            raise NotFound(kind="recovery point", name=recovery_point.id) from None
        except BaseException:
            guard.release(job_id)
            raise
        return cls(
            job_id, recovery_point, disk, index, datastore, guard, pool, frozenset(referenced),
            copy,
        )  # fmt: skip

    def index_for(self, rp_id: str, disk: str) -> DiskIndex:
        """The index the agent asks for, if it is the one being restored."""
        if (rp_id, disk) != (self.recovery_point.id, self.disk):
            raise PermissionDenied(detail=f"restore {self.job_id} restores another disk")
        return self.index

    def check_allowed(self, digests: list[bytes]) -> None:
        for digest in digests:
            if digest not in self.allowed:
                raise PermissionDenied(
                    detail=f"chunk {digest.hex()} is not part of the restored disk"
                )

    def read_chunk(self, digest: bytes) -> asyncio.Future[tuple[Compression, int, bytes]]:
        """A chunk's stored blob, read in the pool (not checked: see `check_allowed`)."""
        return asyncio.get_running_loop().run_in_executor(
            self.pool, self.datastore.get_chunk_blob, digest
        )

    def release(self) -> None:
        self.guard.release(self.job_id)

    def position_of(self, digest: bytes) -> int:
        """Where on the disk `digest` first sits (-1: nowhere)."""
        return next((n for n in range(len(self.index)) if self.index.digest_at(n) == digest), -1)

    def corrupted(self, digest: bytes, detail: str) -> DataCorrupted:
        """The error of a restore that met the bad chunk `digest`."""
        vault = self.recovery_point.vault
        where = f"--vault {vault} --from-copy" if self.copy else f"--vault {vault}"
        return DataCorrupted(
            recovery_point=self.recovery_point.id,
            disk=self.disk,
            chunk=self.position_of(digest),
            digest=digest.hex(),
            detail=f"{detail}{f' in the copy {self.copy}' if self.copy else ''} "
            f"(`coffer verify {where}`)",
        )


@dataclass(eq=False)
class RunningRestore(AgentJob):
    session: RestoreSession | None = None
    found_bad: dict[bytes, str] = field(default_factory=dict)
    """Chunks the controller could not read for it (missing, or their blob unreadable)."""
    since: int = 0
    """The vault's chunk health generation when it started (controller.datastore.health)."""

    @property
    def recovery_point(self) -> RecoveryPointRecord | None:
        return self.session.recovery_point if self.session else None

    @property
    def allowed(self) -> frozenset[bytes]:
        return self.session.allowed if self.session else frozenset()


class Restores:
    """Starts restore jobs."""

    def __init__(
        self,
        catalog: Catalog,
        registry: AgentRegistry,
        datastores: Datastores,
        runner: JobRunner,
        pool: Executor,
        integrity: Integrity | None = None,
    ) -> None:
        self._catalog = catalog
        self._registry = registry
        self._datastores = datastores
        self._runner = runner
        self._pool = pool
        self._integrity = integrity

    async def start(
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
        """Restore `disk` of recovery point `rp_id` of `vm_id` to `target_path` on `target_vm`
        (`vm_id` itself when empty), or with `in_place` onto `vm_id`'s own disk; from the
        vault's `copy`, opened, if given."""
        rp = await self._catalog.recovery_point(rp_id)
        if rp.vm_id != vm_id:
            raise NotFound(kind=f"recovery point of VM {vm_id!r}", name=rp_id)
        rp_disk = next((d for d in rp.disks if d.name == disk), None)
        if rp_disk is None:
            raise DiskNotFound(vm_id=vm_id, disk=disk, known=", ".join(d.name for d in rp.disks))
        if in_place:
            if target_path or (target_vm and target_vm != vm_id):
                raise InvalidArgument(
                    detail=f"an in-place restore writes disk {disk!r} of VM {vm_id!r} itself: "
                    "give no target path or target VM (a restore to another VM writes a new "
                    "image there: --target-vm with --target)"
                )
            if overwrite:
                raise InvalidArgument(
                    detail="--overwrite is for a restore to an image; an in-place restore "
                    "writes over the disk by definition"
                )
        elif not target_path:
            raise InvalidArgument(detail="a restore needs a target path on the target VM")
        if "\0" in target_path or len(target_path.encode()) > MAX_TARGET_PATH:
            # Recorded and sent to the agent as it is: a path no file system can hold is
            # refused here, with nothing started.
            raise InvalidArgument(
                detail=f"the target path {target_path[:80]!r} holds a NUL byte or is longer "
                f"than {MAX_TARGET_PATH} bytes"
            )
        target_vm = target_vm or vm_id
        target = await self._target_agent(rp, target_vm)
        if in_place:
            known = {d.name: d.path for d in target.disks}
            if known and disk not in known:
                raise DiskNotFound(vm_id=vm_id, disk=disk, known=", ".join(known))
            target_path = known.get(disk, "")
        agent = self._registry.get(target_vm)
        job = self._runner.new_record(
            Operation.RESTORE,
            rp.vault,
            target_vm,
            recovery_point_id=rp.id,
            disks=(disk,),
            restore=RestoreTarget(
                source_vm_id=vm_id,
                target_vm_id=target_vm,
                target_path=target_path,
                mode=RestoreMode.IN_PLACE if in_place else RestoreMode.NEW_IMAGE,
                overwrite=overwrite,
            ),
        )
        if copy is not None:
            job.details["from_copy"] = copy.target
        session = await RestoreSession.open(
            job.id,
            rp,
            disk,
            # Of a vault being upgraded, the format its point is in now (controller.datastores).
            copy.datastore if copy else await self._datastores.reader(rp.vault, rp.id),
            copy.guard if copy else self._datastores.guard(rp.vault),
            self._pool,
            copy=copy.target if copy else "",
        )
        running = RunningRestore(
            job,
            exclusive=True,
            session=session,
            since=(await self._datastores.health(rp.vault)).generation,
        )
        running.after_end.append(partial(self._release, session))
        try:
            await self._runner.admit(running)
        except BaseException:
            session.release()
            raise
        command = agent_pb2.ControllerMessage(
            restore=agent_pb2.RestoreCommand(
                job_id=job.id,
                recovery_point_id=rp.id,
                disk=disk,
                target_path="" if in_place else target_path,
                size_bytes=rp_disk.size_bytes,
                chunk_size=rp_disk.chunk_size,
                mode=agent_pb2.RESTORE_MODE_IN_PLACE
                if in_place
                else agent_pb2.RESTORE_MODE_NEW_IMAGE,
                overwrite=overwrite,
                # The agent verifies chunks as the datastore names them (never logged).
                chunk_id_key=session.datastore.chunk_hash.key or b"",
            )
        )

        async def work() -> None:
            try:
                result = await run_command(running, agent, command, self._runner.deadlines)
            except DataCorrupted:
                await self._damaged(running)
                raise
            record_result(job, result)

        self._runner.start(running, work)
        return job

    async def _target_agent(self, rp: RecoveryPointRecord, target_vm: str) -> AgentRecord:
        """The enrolled VM a restore writes on; it must be in the region of the recovery
        point's vault (a recovery point leaves its region only by an operator's copy)."""
        vault = await self._catalog.vault(rp.vault)
        agent = await self._catalog.agent(target_vm)
        if agent is None:
            raise VmNotFound(name=target_vm)
        if agent.region != vault.region:
            raise RestoreRegionMismatch(
                vm=target_vm, vm_region=agent.region, vault=vault.name, vault_region=vault.region
            )
        return agent

    @staticmethod
    async def _release(session: RestoreSession) -> None:
        session.release()

    async def chunk_unreadable(
        self, running: RunningRestore, digest: bytes, error: ChunkMissing | CorruptData
    ) -> DataCorrupted:
        """The controller could not read a chunk the restore downloads: it is bad, and the
        restored recovery point damaged. The error the restore fails with."""
        session = running.session
        assert session is not None
        reason = (
            MISSING
            if isinstance(error, ChunkMissing)
            else str(error.fields.get("detail") or error.message)
        )
        running.found_bad[digest] = reason
        if self._integrity is not None and not session.copy:
            rp = session.recovery_point
            await self._integrity.found_bad(
                rp.vault,
                {digest: reason},
                since=running.since,
                by=running.id,
                damage={rp.id: [DamagedChunk(session.disk, session.position_of(digest), digest,
                                             reason)]},
            )  # fmt: skip
        detail = "it is missing" if reason == MISSING else f"it cannot be read ({reason})"
        return session.corrupted(digest, detail)

    async def _damaged(self, running: RunningRestore) -> None:
        await record_damage(running, self._integrity, self._pool)

    def in_use(self) -> set[str]:
        """Recovery points running restores read."""
        return {
            running.recovery_point.id
            for running in self._runner
            if isinstance(running, RunningRestore) and running.recovery_point is not None
        }


async def record_damage(
    running: RunningRestore, integrity: Integrity | None, pool: Executor
) -> None:
    """A restore (or a drill) failed on bad chunks: those the agent named, once the
    controller's own read confirms them, and those the controller could not read, are bad;
    every recovery point that references them is damaged. Called while the job's session is
    still open."""
    session = running.session
    if session is None or integrity is None or session.copy:
        return  # a copy's damage is not the vault's datastore's
    rp = session.recovery_point
    reported = list(running.result.damaged_chunks) if running.result else []
    confirmed, since = await integrity.confirm(
        rp.vault, [d for d in reported if d in session.allowed], session.datastore
    )
    if confirmed:
        damage = await asyncio.get_running_loop().run_in_executor(
            pool, damage_in, session.index, confirmed
        )
        await integrity.found_bad(
            rp.vault, confirmed, since=since, by=running.id, damage={rp.id: damage}
        )
    bad = running.found_bad | confirmed
    await integrity.spread(rp.vault, bad, by=running.id, exclude={rp.id})


def record_result(job: JobRecord, result: agent_pb2.CommandResult) -> None:
    """What the agent reports of a restore, onto its job: the bytes compared, fetched and
    written, and (in place) the disk's path as the agent knows it."""
    restored = result.restore
    job.bytes_compared += restored.bytes_compared
    job.bytes_fetched += restored.bytes_fetched
    job.bytes_written += restored.bytes_written or result.bytes_written
    job.bytes_read = job.bytes_fetched  # what a restore reads: the datastore's chunks
    in_place = job.restore is not None and job.restore.mode is RestoreMode.IN_PLACE
    if in_place and job.restore is not None and restored.target_path:
        job.restore = replace(job.restore, target_path=restored.target_path)
