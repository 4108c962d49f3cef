"""The gRPC service operators call (through the `coffer` CLI): the whole vault workflow.

Thin: each method converts the request into the domain's terms, calls the vaults, protection,
pruning or job manager (or, for identities, enrolment, revocation and the audit log), and
converts the answer back. Protobuf types stop here. That the caller is an operator whose role
may call the method, and that errors leave typed, is checked for every method at the edge
(`controller.interceptors`, `controller.access`): handlers raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Protocol, TypeAlias

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from controller import paging
from controller.audit import AuditLog
from controller.catalog import (
    AgentRecord,
    AuditFilter,
    Catalog,
    CertificateRecord,
    CopyRecord,
    DeletedRecoveryPointRecord,
    DrillRecord,
    ItemRecord,
    JobFilter,
    JobRecord,
    PolicyRecord,
    RecoveryPointRecord,
    VaultRecord,
    VerificationRecord,
)
from controller.config import MAX_LOGIN_LINK_SECONDS
from controller.copies import Copier
from controller.datastore.copy import VaultCopy
from controller.drills import Drills, schedule_of
from controller.enrolment import Enrolment
from controller.interceptors import caller
from controller.jobs import JobManager
from controller.jobs.file_recovery import FileSource
from controller.protection import Protection, service_name
from controller.pruning import Pruner
from controller.registry import AgentRegistry
from controller.revocation import Revocations
from controller.status import StatusMonitor
from controller.upgrades import VaultUpgrades
from controller.vaults import Vaults
from controller.verification import Verifier
from shared.errors import (
    AmbiguousJobId,
    Conflict,
    InvalidArgument,
    InvalidPolicy,
    NotFound,
    RecoveryPointDeleted,
    Unavailable,
    VmNotFound,
)
from shared.model import MAX_CONCURRENT_BACKUPS, ItemState, JobStatus, Operation
from shared.policy import Policy
from shared.rpc import operator_pb2, operator_pb2_grpc
from shared.status import nesting_depth
from shared.tls import peer_certificate_pem

Context: TypeAlias = grpc.aio.ServicerContext
# WatchJob sends the job at least this often, changed or not: a client can tell a live stream
# from a stuck one by its silence.
WATCH_INTERVAL = 0.5
# ... and at most once in this long while the job runs (its end is sent at once): a backup's
# progress changes with every chunk, and a message per change cost the controller and the
# client more CPU than the progress bar needs (on a 2-core machine, time the backup lacked).
WATCH_GAP = 0.1
# Job ids may be shortened to a unique prefix this long or longer.
MIN_JOB_ID_PREFIX = 4
# How many candidates an ambiguous job id prefix lists.
AMBIGUOUS_CANDIDATES = 5
DEFAULT_JOB_LIMIT = 100
MAX_JOB_LIMIT = 10000
# A policy is a few hundred bytes of JSON nested four levels: these bound what is parsed.
MAX_POLICY_JSON = 64 * 1024
MAX_POLICY_NESTING = 16


MAX_ALERT_LIMIT = 10000


class WebLogins(Protocol):
    """The web console, as far as handing out sign-in links goes (controller.web)."""

    @property
    def url(self) -> str: ...

    def issue_link(self, pem: bytes, expires_seconds: float) -> tuple[str, float, str, str]:
        """A one-time link for the holder of `pem`: its URL, expiry, operator and role."""
        ...


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _seconds(stamp: Timestamp, present: bool) -> float | None:
    return stamp.ToNanoseconds() / 1e9 if present else None


def _controller_progress(message: operator_pb2.Job, progress: object) -> None:
    """The progress of a job the controller runs itself (a vault upgrade's), from its details:
    its phase, and the stored bytes it has read of those it is to read."""
    if not isinstance(progress, dict) or not isinstance(progress.get("phase"), str):
        return
    message.progress.phase = progress["phase"]
    done, total = progress.get("bytes_read"), progress.get("bytes")
    if isinstance(done, int) and isinstance(total, int):
        message.progress.bytes_done, message.progress.bytes_total = done, total


class OperatorService(operator_pb2_grpc.OperatorServiceServicer):
    def __init__(
        self,
        catalog: Catalog,
        registry: AgentRegistry,
        jobs: JobManager,
        status: StatusMonitor | None,
        vaults: Vaults,
        protection: Protection,
        pruner: Pruner,
        *,
        verifier: Verifier | None = None,
        upgrades: VaultUpgrades | None = None,
        copier: Copier | None = None,
        enrolment: Enrolment | None = None,
        revocations: Revocations | None = None,
        audit: AuditLog | None = None,
        enrol_address: str = "",
        drills: Drills | None = None,
    ) -> None:
        # The web console, once it listens (set by the controller's wiring: it calls us).
        self.web: WebLogins | None = None
        self._enrolment = enrolment
        self._revocations = revocations
        self._audit = audit
        self._enrol_address = enrol_address
        self._drills_ = drills
        self._catalog = catalog
        self._registry = registry
        self._jobs = jobs
        self._status = status
        self._vaults = vaults
        self._protection = protection
        self._pruner = pruner
        self._verifier = verifier
        self._upgrades = upgrades
        self._copier = copier

    @property
    def copier(self) -> Copier:
        if self._copier is None:
            raise Unavailable(detail="this controller makes no off-site copies")
        return self._copier

    async def _copy_of(self, rp_id: str, from_copy: bool) -> VaultCopy | None:
        """The vault's copy, opened, for a request that reads recovery point `rp_id` from it."""
        if not from_copy:
            return None
        rp = await self._catalog.recovery_point(rp_id)
        return await self.copier.open_copy(rp.vault, rp.id)

    @property
    def _drills(self) -> Drills:
        if self._drills_ is None:  # every controller has them; a test may serve without
            raise Unavailable(detail="restore drills are not served here")
        return self._drills_

    async def _vm_id(self, name: str) -> str:
        """The VM id a name (id, name or service/name) gives; the name itself for a VM that is
        no longer enrolled (its jobs remain)."""
        if not name:
            return ""
        try:
            return (await self._protection.resolve([name]))[0].vm_id
        except VmNotFound:
            return name

    async def _job_id(self, given: str) -> str:
        """The job id `given` names: a whole id, or a prefix of one job's id only."""
        if not given:
            raise InvalidArgument(detail="name a job by its id (`coffer job list` shows them)")
        found = await self._catalog.job_ids(given, AMBIGUOUS_CANDIDATES + 1)
        if found and found[0][0] == given:
            return given
        if len(given) < MIN_JOB_ID_PREFIX:
            raise InvalidArgument(
                detail=f"job id {given!r} is too short: give at least {MIN_JOB_ID_PREFIX} "
                "characters of it"
            )
        if not found:
            raise NotFound(kind="job", name=given)
        if len(found) > 1:
            shown = [
                f"{job_id} ({operation} of {vm_id})" if vm_id else f"{job_id} ({operation})"
                for job_id, operation, vm_id in found[:AMBIGUOUS_CANDIDATES]
            ]
            more = len(found) > AMBIGUOUS_CANDIDATES
            raise AmbiguousJobId(
                prefix=given,
                count=f"more than {AMBIGUOUS_CANDIDATES}" if more else str(len(found)),
                candidates=", ".join(shown) + (", ..." if more else ""),
            )
        return found[0][0]

    async def _names(self, vm_ids: Iterable[str]) -> dict[str, str]:
        """How operators name the VMs `vm_ids` (service/name), those enrolled."""
        return {
            vm_id: service_name(service, name)
            for vm_id, (service, name) in (await self._catalog.agent_names(vm_ids)).items()
        }

    async def _named(self, job: JobRecord) -> operator_pb2.Job:
        """`job` as the wire has it, its VM named as operators name it."""
        return self._job(job, await self._names([job.vm_id]))

    async def _jobs_reply(self, jobs: list[JobRecord]) -> operator_pb2.JobsReply:
        names = await self._names(job.vm_id for job in jobs)
        return operator_pb2.JobsReply(jobs=[self._job(job, names) for job in jobs])

    def _job(self, job: JobRecord, names: dict[str, str] | None = None) -> operator_pb2.Job:
        message = operator_pb2.Job(
            id=job.id,
            operation=job.operation,
            status=job.status,
            vault=job.vault,
            vm_id=job.vm_id,
            started_at=_timestamp(job.started_at),
            ended_at=_timestamp(job.ended_at),
            bytes_read=job.bytes_read,
            bytes_sent=job.bytes_sent,
            bytes_stored=job.bytes_stored,
            error_code=job.error_code,
            error_message=job.error_message,
            recovery_point_id=job.recovery_point_id,
            item=(names or {}).get(job.vm_id, job.vm_id),
            details_json=json.dumps(job.details, sort_keys=True),
            trigger=job.trigger,
            slot=_timestamp(job.slot),
            disks=job.disks,
            requested_by=job.requested_by,
        )
        if job.restore is not None:
            message.restore.CopyFrom(
                operator_pb2.RestoreInfo(
                    source_vm_id=job.restore.source_vm_id,
                    target_vm_id=job.restore.target_vm_id,
                    target_path=job.restore.target_path,
                    mode=job.restore.mode,
                    overwrite=job.restore.overwrite,
                    bytes_compared=job.bytes_compared,
                    bytes_fetched=job.bytes_fetched,
                    bytes_written=job.bytes_written,
                )
            )
        progress = self._status.progress(job.id) if self._status else None
        if progress is None and not JobStatus(job.status).ended:
            _controller_progress(message, job.details.get("progress"))
        if progress is not None and not JobStatus(job.status).ended:
            message.progress.CopyFrom(
                operator_pb2.Progress(
                    phase=progress.phase,
                    bytes_done=progress.bytes_done,
                    bytes_total=progress.bytes_total,
                    rate_bytes_per_second=progress.rate_bytes_per_second,
                )
            )
        return message

    @staticmethod
    def _drill(drill: DrillRecord | None) -> operator_pb2.DrillRecord | None:
        if drill is None:
            return None
        return operator_pb2.DrillRecord(
            at=_timestamp(drill.at),
            job_id=drill.job_id,
            restore_seconds=drill.seconds,
            outcome=drill.outcome,
            summary=drill.summary,
        )

    @staticmethod
    def _recovery_point(
        rp: RecoveryPointRecord,
        verification: VerificationRecord | None = None,
        copy_target: str = "",
        copied: CopyRecord | None = None,
    ) -> operator_pb2.RecoveryPoint:
        message = OperatorService._recovery_point_only(rp)
        message.copy_target = copy_target
        if copied is not None:
            message.copied_at.FromNanoseconds(int(copied.copied_at * 1e9))
            message.copy_job_id = copied.job_id
        if verification is not None:
            message.verification = verification.state
            verified_at = _timestamp(verification.verified_at)
            if verified_at is not None:
                message.verified_at.CopyFrom(verified_at)
            message.verify_job_id = verification.job_id
            message.damaged_chunks = verification.damaged_chunks
            message.verification_detail = verification.detail
            message.damage.extend(
                operator_pb2.DamagedChunk(
                    disk=d.disk, chunk=d.chunk, digest=d.digest.hex(), reason=d.reason
                )
                for d in verification.damage
            )
        return message

    @staticmethod
    def _recovery_point_only(rp: RecoveryPointRecord) -> operator_pb2.RecoveryPoint:
        return operator_pb2.RecoveryPoint(
            id=rp.id,
            vm_id=rp.vm_id,
            vault=rp.vault,
            created_at=_timestamp(rp.created_at),
            consistency=rp.consistency,
            disks=[
                operator_pb2.RecoveryPointDisk(
                    name=d.name,
                    size_bytes=d.size_bytes,
                    chunk_count=d.chunk_count,
                    consistency=d.consistency,
                )
                for d in rp.disks
            ],
            job_id=rp.job_id,
            bytes_stored=rp.bytes_stored,
            kept_by=rp.kept_by,
            data_bytes=rp.data_bytes,
            last_drill=OperatorService._drill(rp.drill),
        )

    async def ListAgents(
        self, request: operator_pb2.ListAgentsRequest, context: Context
    ) -> operator_pb2.ListAgentsReply:
        start = paging.after("agents", request.page_token, (str, str, str))
        size = paging.page_size(request.page_size)
        # One more than the page: whether another page follows, without counting.
        agents = await self._catalog.agents(
            after=None if start is None else (str(start[0]), str(start[1]), str(start[2])),
            limit=size + 1,
        )
        more, agents = len(agents) > size, agents[:size]
        last = agents[-1] if agents else None
        return operator_pb2.ListAgentsReply(
            next_page_token=paging.token("agents", (last.service, last.name, last.vm_id))
            if more and last is not None
            else "",
            total=await self._catalog.agent_count(),
            agents=[
                operator_pb2.Agent(
                    vm_id=a.vm_id,
                    name=a.name,
                    service=a.service,
                    region=a.region,
                    hostname=a.hostname,
                    agent_version=a.agent_version,
                    online=self._registry.online(a.vm_id),
                    last_seen=_timestamp(a.last_seen),
                    disks=[
                        operator_pb2.Disk(name=d.name, path=d.path, size_bytes=d.size_bytes)
                        for d in a.disks
                    ],
                    running_job_id=self._jobs.running_job_of(a.vm_id),
                    warnings=[
                        operator_pb2.AgentWarning(code=w.code, message=w.message)
                        for w in self._registry.warnings(a.vm_id)
                    ],
                )
                for a in agents
            ],
        )

    async def BackupNow(
        self, request: operator_pb2.BackupNowRequest, context: Context
    ) -> operator_pb2.JobsReply:
        # Named before they are queued: the dispatcher starts them at once, and the catalog
        # (one connection, one queue) would serve this reply's names after every write of
        # theirs (2.2 s for 1,000 VMs at a limit of 1,000, tests/bench/fleet). The vault is
        # checked first, as backup_now does.
        if request.vault:
            await self._catalog.vault(request.vault)
        agents = await self._protection.resolve(list(request.vms))
        names = {agent.vm_id: service_name(agent.service, agent.name) for agent in agents}
        jobs = await self._protection.backup_agents(request.vault, agents, list(request.disks))
        return operator_pb2.JobsReply(jobs=[self._job(job, names) for job in jobs])

    async def _not_deleted(self, rp_id: str) -> None:
        """RecoveryPointDeleted if `rp_id` names a soft-deleted point: it cannot be read until
        it is undeleted (the reads themselves would only find no such point)."""
        try:
            record = await self._catalog.deleted_recovery_point(rp_id)
        except NotFound:
            return
        vm = (await self._names([record.point.vm_id])).get(record.point.vm_id, record.point.vm_id)
        raise RecoveryPointDeleted(
            recovery_point=rp_id,
            vm=vm,
            purge_at=_iso(record.purge_at),
            vault=record.point.vault,
        )

    async def Restore(
        self, request: operator_pb2.RestoreRequest, context: Context
    ) -> operator_pb2.Job:
        await self._not_deleted(request.recovery_point_id)
        source = (await self._protection.resolve([request.vm_id]))[0].vm_id
        target = request.target_vm_id
        if target:
            target = (await self._protection.resolve([target]))[0].vm_id
        job = await self._jobs.restore(
            source,
            request.recovery_point_id,
            request.disk,
            request.target_path,
            target,
            copy=await self._copy_of(request.recovery_point_id, request.from_copy),
            in_place=request.in_place,
            overwrite=request.overwrite,
        )
        return await self._named(job)

    async def Drill(
        self, request: operator_pb2.DrillRequest, context: Context
    ) -> operator_pb2.JobsReply:
        return await self._jobs_reply(await self._drills.run(request.vault, list(request.vms)))

    async def ListJobs(
        self, request: operator_pb2.ListJobsRequest, context: Context
    ) -> operator_pb2.ListJobsReply:
        for status in request.status:
            if status not in JobStatus.__members__.values():
                raise InvalidArgument(
                    detail=f"unknown status {status!r}; one of {', '.join(JobStatus)}"
                )
        for operation in request.operation:
            if operation not in Operation.__members__.values():
                raise InvalidArgument(
                    detail=f"unknown operation {operation!r}; one of {', '.join(Operation)}"
                )
        if request.limit > MAX_JOB_LIMIT:
            raise InvalidArgument(
                detail=f"a limit of {request.limit} jobs is too many: at most {MAX_JOB_LIMIT}"
            )
        if request.vault:
            await self._catalog.vault(request.vault)
        start = paging.after("jobs", request.page_token, (float, str))
        limit = request.limit or DEFAULT_JOB_LIMIT
        jobs = await self._catalog.jobs(
            JobFilter(
                before=None if start is None else (float(start[0]), str(start[1])),
                statuses=list(request.status),
                operations=list(request.operation),
                vm_id=await self._vm_id(request.vm_id),
                vault=request.vault,
                started_from=_seconds(request.started_from, request.HasField("started_from")),
                started_to=_seconds(request.started_to, request.HasField("started_to")),
                limit=limit + 1,
            )
        )
        more, jobs = len(jobs) > limit, jobs[:limit]
        # Running jobs: the in-memory record has the live byte counts.
        records = [await self._jobs.job(job.id) for job in jobs]
        names = await self._names(record.vm_id for record in records)
        return operator_pb2.ListJobsReply(
            jobs=[self._job(record, names) for record in records],
            next_page_token=paging.token("jobs", (jobs[-1].started_at, jobs[-1].id))
            if more
            else "",
        )

    async def GetJob(
        self, request: operator_pb2.GetJobRequest, context: Context
    ) -> operator_pb2.Job:
        job_id = await self._job_id(request.id)
        return await self._named(await self._jobs.job(job_id))

    async def CancelJob(
        self, request: operator_pb2.GetJobRequest, context: Context
    ) -> operator_pb2.Job:
        job_id = await self._job_id(request.id)
        return await self._named(await self._jobs.cancel(job_id))

    async def WatchJob(
        self, request: operator_pb2.GetJobRequest, context: Context
    ) -> AsyncIterator[operator_pb2.Job]:
        job_id = await self._job_id(request.id)
        job = await self._jobs.job(job_id)
        names = await self._names([job.vm_id])
        while True:
            sent = self._job(job, names)
            yield sent
            # Judged on what was sent: a running job's record changes while the message is
            # written, and the stream must not end before the client has seen the end.
            if JobStatus(sent.status).ended:
                return
            running = self._jobs.running(job.id)
            if running is not None:
                running.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(running.ended.wait(), WATCH_GAP)
                # Woken by the job's own changes; otherwise a steady tick for MQTT progress.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(running.changed.wait(), WATCH_INTERVAL - WATCH_GAP)
            else:  # its record is being written: look again shortly
                await asyncio.sleep(WATCH_INTERVAL)
            job = await self._jobs.job(job_id)

    async def ListRecoveryPoints(
        self, request: operator_pb2.ListRecoveryPointsRequest, context: Context
    ) -> operator_pb2.ListRecoveryPointsReply:
        vm_id = request.vm_id
        if vm_id:
            try:
                vm_id = (await self._protection.resolve([vm_id]))[0].vm_id
            except VmNotFound:
                # A VM no longer enrolled may still have deleted points, named by its id.
                if not request.deleted:
                    raise
        if request.vault:
            await self._catalog.vault(request.vault)
        if request.deleted:
            deleted = await self._catalog.deleted_recovery_points(vm_id=vm_id, vault=request.vault)
            return operator_pb2.ListRecoveryPointsReply(
                recovery_points=[self._deleted_point(record) for record in deleted]
            )
        points = await self._catalog.recovery_points(vm_id=vm_id, vault=request.vault)
        verifications = await self._catalog.verifications([rp.id for rp in points])
        targets = {v.name: v.copy_target for v in await self._catalog.vaults()}
        copies = await self._catalog.copies([rp.id for rp in points])

        def copied(rp: RecoveryPointRecord) -> CopyRecord | None:
            target = targets.get(rp.vault, "")
            return next((c for c in copies.get(rp.id, ()) if c.target == target), None)

        return operator_pb2.ListRecoveryPointsReply(
            recovery_points=[
                self._recovery_point(
                    rp, verifications.get(rp.id), targets.get(rp.vault, ""), copied(rp)
                )
                for rp in points
            ]
        )

    @staticmethod
    def _deleted_point(record: DeletedRecoveryPointRecord) -> operator_pb2.RecoveryPoint:
        message = OperatorService._recovery_point_only(record.point)
        message.deleted_at.FromNanoseconds(int(record.deleted_at * 1e9))
        message.purge_at.FromNanoseconds(int(record.purge_at * 1e9))
        message.deleted_by_job_id = record.deleted_by
        return message

    async def Undelete(
        self, request: operator_pb2.UndeleteRequest, context: Context
    ) -> operator_pb2.Job:
        if not request.vm:
            raise InvalidArgument(detail="name the VM whose deleted recovery points come back")
        job = await self._protection.undelete(request.vault, request.vm, request.recovery_point_id)
        return await self._named(job)

    # --- file-level recovery ----------------------------------------------------------------

    async def _file_source(self, source: operator_pb2.FileRecoverySource) -> FileSource:
        await self._not_deleted(source.recovery_point_id)
        vm = (await self._protection.resolve([source.vm_id]))[0]
        target = vm
        if source.target_vm_id:
            target = (await self._protection.resolve([source.target_vm_id]))[0]
        return FileSource(
            vm_id=vm.vm_id,
            recovery_point_id=source.recovery_point_id,
            disk=source.disk,
            target_vm=target.vm_id,
            target_region=target.region,
            copy=await self._copy_of(source.recovery_point_id, source.from_copy),
        )

    async def ListFiles(
        self, request: operator_pb2.ListFilesRequest, context: Context
    ) -> operator_pb2.ListFilesReply:
        running = await self._jobs.list_files(
            await self._file_source(request.source), request.path, request.limit, request.after
        )
        reply = operator_pb2.ListFilesReply(job=await self._named(running.record))
        if running.listing is not None:
            reply.path = running.listing.path
            reply.entries.extend(running.listing.entries)
            reply.next_after = running.listing.next_after
        return reply

    async def GetFiles(
        self, request: operator_pb2.GetFilesRequest, context: Context
    ) -> operator_pb2.Job:
        job = await self._jobs.get_files(
            await self._file_source(request.source), list(request.paths), request.destination
        )
        return await self._named(job)

    async def MountFiles(
        self, request: operator_pb2.MountFilesRequest, context: Context
    ) -> operator_pb2.Job:
        job = await self._jobs.mount_files(
            await self._file_source(request.source), request.ttl_seconds
        )
        return await self._named(job)

    async def UnmountFiles(
        self, request: operator_pb2.GetJobRequest, context: Context
    ) -> operator_pb2.Job:
        job = await self._jobs.unmount_files(await self._job_id(request.id))
        return await self._named(job)

    # --- vaults -----------------------------------------------------------------------------

    async def _vault(self, vault: VaultRecord) -> operator_pb2.Vault:
        items = await self._catalog.items(vault.name)
        points, _ = await self._catalog.recovery_point_totals(vault.name)
        deleted, _ = await self._catalog.deleted_totals(vault.name)
        storage = await self._vaults.storage(vault.name)
        message = operator_pb2.Vault(
            name=vault.name,
            region=vault.region,
            chunk_size=vault.chunk_size,
            created_at=_timestamp(vault.created_at),
            max_concurrent_backups=vault.max_concurrent_backups,
            registered_items=len(items),
            protected_items=sum(1 for i in items if ItemState(i.state).protected),
            recovery_points=points,
            stored_bytes=vault.stored_bytes,
            verify_new=vault.verify_new,
            reverify_days=vault.reverify_days,
            datastore=storage.location,
            datastore_format=storage.format,
            encryption=storage.encryption,
            current_data_key=storage.current_data_key,
            shared_dedup=vault.shared_dedup,
            full_read_days=vault.full_read_days,
            upgrading_from_format=storage.upgrading_from,
            points_in_old_format=storage.points_in_old_format,
            copy_target=vault.copy_target,
            copy_location=(
                self._copier.location(vault.name, vault.copy_target)
                if self._copier is not None and vault.copy_target
                else ""
            ),
            soft_delete_days=vault.soft_delete_days,
            deleted_recovery_points=deleted,
        )
        if vault.drill is not None:
            schedule = schedule_of(vault.drill)
            message.drill.CopyFrom(
                operator_pb2.DrillSettings(
                    schedule=schedule.to_text() if schedule else "",
                    schedule_text=schedule.describe() if schedule else "on demand only",
                    agent=vault.drill.agent,
                    directory=vault.drill.directory,
                    next_at=_timestamp(
                        self._drills_.next_at(vault.name) if self._drills_ else None
                    ),
                )
            )
        return message

    async def CreateVault(
        self, request: operator_pb2.CreateVaultRequest, context: Context
    ) -> operator_pb2.Vault:
        vault = await self._vaults.create(
            request.name, request.region, request.max_concurrent_backups, request.timezone
        )
        self._protection.vault_created(vault.name)
        return await self._vault(vault)

    async def ListVaults(
        self, request: operator_pb2.ListVaultsRequest, context: Context
    ) -> operator_pb2.ListVaultsReply:
        return operator_pb2.ListVaultsReply(
            vaults=[await self._vault(v) for v in await self._catalog.vaults()]
        )

    async def GetVault(
        self, request: operator_pb2.VaultRef, context: Context
    ) -> operator_pb2.Vault:
        return await self._vault(await self._catalog.vault(request.name))

    async def UpdateVault(
        self, request: operator_pb2.UpdateVaultRequest, context: Context
    ) -> operator_pb2.Vault:
        drill = request.drill if request.HasField("drill") else None
        verify_new = request.verify_new if request.HasField("verify_new") else None
        reverify_days = request.reverify_days if request.HasField("reverify_days") else None
        shared_dedup = request.shared_dedup if request.HasField("shared_dedup") else None
        copy_to = request.copy_to if request.HasField("copy_to") else None
        soft_delete_days = (
            request.soft_delete_days if request.HasField("soft_delete_days") else None
        )
        full_read_days = request.full_read_days if request.HasField("full_read_days") else None
        verify = verify_new is not None or reverify_days is not None
        drills = drill is not None or request.clear_drill
        if not (
            request.max_concurrent_backups
            or verify
            or drills
            or soft_delete_days is not None
            or copy_to is not None
            or shared_dedup is not None
            or full_read_days is not None
        ):
            # A request that would change nothing is refused: saying nothing about that is how
            # `--max-concurrent-backups 0` went unnoticed.
            raise InvalidArgument(
                detail="nothing to change: give max_concurrent_backups (1 to "
                f"{MAX_CONCURRENT_BACKUPS}), verify_new, "
                "reverify_days, soft_delete_days, shared_dedup, full_read_days, copy_to or "
                "drill settings"
            )
        vault = await self._catalog.vault(request.name)
        # Every value checked before anything is changed: a refused request changes nothing.
        self._vaults.check_update(
            request.max_concurrent_backups,
            reverify_days=reverify_days,
            soft_delete_days=soft_delete_days,
            full_read_days=full_read_days,
        )
        if copy_to:
            await self.copier.check_target(request.name, copy_to)
        if drills:
            # Checked (and written) first of the rest: a refused drill setting changes nothing.
            vault = await self._drills.configure(
                request.name,
                schedule=drill.schedule if drill else "",
                agent=drill.agent if drill else "",
                directory=drill.directory if drill else "",
                clear=request.clear_drill,
            )
        if (
            request.max_concurrent_backups
            or verify
            or soft_delete_days is not None
            or shared_dedup is not None
            or full_read_days is not None
        ):
            vault = await self._vaults.update(
                request.name,
                request.max_concurrent_backups,
                verify_new=verify_new,
                reverify_days=reverify_days,
                soft_delete_days=soft_delete_days,
                shared_dedup=shared_dedup,
                full_read_days=full_read_days,
            )
            self._jobs.set_limit(vault.name, vault.max_concurrent_backups)
        if copy_to is not None:
            await self.copier.set_target(vault.name, copy_to)
            vault = await self._catalog.vault(vault.name)
        return await self._vault(vault)

    async def DeleteVault(
        self, request: operator_pb2.VaultRef, context: Context
    ) -> operator_pb2.Vault:
        vault = await self._vaults.delete(request.name, self._jobs.running_count(request.name))
        self._protection.vault_deleted(vault.name)
        if self._drills_ is not None:
            self._drills_.vault_deleted(vault.name)
        return operator_pb2.Vault(name=vault.name, region=vault.region)

    async def RotateVaultKey(
        self, request: operator_pb2.RotateVaultKeyRequest, context: Context
    ) -> operator_pb2.VaultKeys:
        keys = await self._vaults.rotate_key(request.vault, request.new_data_key)
        return operator_pb2.VaultKeys(
            vault=keys.vault,
            keys_rewrapped=keys.keys_rewrapped,
            current_data_key=keys.current_data_key,
            data_keys=keys.data_keys,
            master_key=keys.master_key,
        )

    async def ExportVaultKeys(
        self, request: operator_pb2.VaultRef, context: Context
    ) -> operator_pb2.VaultKeyExport:
        return operator_pb2.VaultKeyExport(
            vault=request.name, text=await self._vaults.export_keys(request.name)
        )

    async def UpgradeVault(
        self, request: operator_pb2.UpgradeVaultRequest, context: Context
    ) -> operator_pb2.Job:
        if self._upgrades is None:
            raise Unavailable(detail="this controller runs no vault upgrades")
        job = await self._upgrades.start(request.vault, dry_run=request.dry_run)
        return await self._named(job)

    async def Dashboard(
        self, request: operator_pb2.VaultRef, context: Context
    ) -> operator_pb2.DashboardReply:
        board = await self._vaults.dashboard(request.name, self._jobs.running_count(request.name))
        reply = operator_pb2.DashboardReply(
            vault=board.vault,
            protected_items=board.protected_items,
            items_by_state=board.items_by_state,
            jobs_completed_24h=board.jobs_completed,
            jobs_failed_24h=board.jobs_failed,
            jobs_in_progress=board.jobs_in_progress,
            jobs_cancelled_24h=board.jobs_cancelled,
            jobs_with_warnings_24h=board.jobs_with_warnings,
            stored_bytes=board.stored_bytes,
            protected_bytes=board.protected_bytes,
            dedup_ratio=board.dedup_ratio,
            recovery_points=board.recovery_points,
            recovery_points_verified=board.integrity.verified,
            recovery_points_damaged=board.integrity.damaged,
            recovery_points_healed=board.integrity.healed,
            recovery_points_never_verified=board.integrity.never_verified,
            bad_chunks=board.integrity.bad_chunks,
            last_verified_at=_timestamp(board.integrity.last_verified_at),
            drills=await self._vm_drills(request.name),
        )
        copy = await self._copier.status(request.name) if self._copier is not None else None
        if copy is not None:
            lag = copy.lag
            reply.copy_target, reply.copy_location = copy.target, copy.location
            reply.recovery_points_copied = lag.copied
            reply.recovery_points_not_copied = lag.not_copied
            reply.copy_unavailable = copy.writable
            reply.copy_lag_seconds = copy.lag_seconds
            for stamp, at in (
                (reply.oldest_not_copied_at, lag.oldest_not_copied_at),
                (reply.newest_not_copied_at, lag.newest_not_copied_at),
                (reply.newest_copied_at, lag.newest_copied_at),
            ):
                if at is not None:
                    stamp.FromNanoseconds(int(at * 1e9))
            if copy.last_job is not None:
                reply.last_copy_job.CopyFrom(self._job(copy.last_job))
        return reply

    async def _vm_drills(self, vault: str) -> list[operator_pb2.VmDrill]:
        """The last drill of each protected VM of the vault (unset: never drilled)."""
        items = await self._catalog.items(vault)
        names = await self._names(item.vm_id for item in items)
        drilled = await self._catalog.last_drills(vault)
        found = []
        for item in items:
            if not ItemState(item.state).protected:
                continue
            rp = drilled.get(item.vm_id)
            found.append(
                operator_pb2.VmDrill(
                    vm_id=item.vm_id,
                    item=names.get(item.vm_id, item.vm_id),
                    recovery_point_id=rp.id if rp else "",
                    drill=self._drill(rp.drill if rp else None),
                )
            )
        return found

    # --- discovery and items ----------------------------------------------------------------

    async def Discover(
        self, request: operator_pb2.VaultRef, context: Context
    ) -> operator_pb2.DiscoverReply:
        found = await self._protection.discover(request.name)
        return operator_pb2.DiscoverReply(
            job=self._job(found.job),
            vms=[
                operator_pb2.DiscoveredVm(
                    vm_id=d.agent.vm_id,
                    name=d.agent.name,
                    service=d.agent.service,
                    region=d.agent.region,
                    disks=[
                        operator_pb2.Disk(name=k.name, path=k.path, size_bytes=k.size_bytes)
                        for k in d.agent.disks
                    ],
                    online=d.online,
                )
                for d in found.vms
            ],
            notes=found.notes,
        )

    async def Register(
        self, request: operator_pb2.ItemsRequest, context: Context
    ) -> operator_pb2.JobsReply:
        return await self._jobs_reply(
            await self._protection.register(request.vault, list(request.vms))
        )

    async def Unregister(
        self, request: operator_pb2.ItemsRequest, context: Context
    ) -> operator_pb2.JobsReply:
        return await self._jobs_reply(
            await self._protection.unregister(request.vault, list(request.vms))
        )

    def _item(
        self, item: ItemRecord, agent: AgentRecord | None, points: tuple[int, float | None]
    ) -> operator_pb2.Item:
        nxt = self._protection.next_backup(item)
        count, newest = points
        return operator_pb2.Item(
            vm_id=item.vm_id,
            name=agent.name if agent else item.vm_id,
            service=agent.service if agent else "",
            vault=item.vault,
            state=item.state,
            policy=item.policy or "",
            registered_at=_timestamp(item.registered_at),
            last_backup_at=_timestamp(item.last_backup_at),
            last_backup_status=item.last_backup_status,
            error_code=item.error_code,
            error_message=item.error_message,
            next_backup_at=_timestamp(nxt),
            recovery_points=count,
            online=self._registry.online(item.vm_id),
            latest_recovery_point_at=_timestamp(newest),
        )

    async def ListItems(
        self, request: operator_pb2.ListItemsRequest, context: Context
    ) -> operator_pb2.ListItemsReply:
        for state in request.state:
            if state not in ItemState.__members__.values():
                raise InvalidArgument(
                    detail=f"unknown item state {state!r}; one of {', '.join(ItemState)}"
                )
        if request.vault:
            await self._catalog.vault(request.vault)
        start = paging.after("items", request.page_token, (str, str))
        size = paging.page_size(request.page_size)
        items = await self._catalog.items_page(
            request.vault,
            list(request.state),
            None if start is None else (str(start[0]), str(start[1])),
            size + 1,
        )
        more, items = len(items) > size, items[:size]
        agents = {a.vm_id: a for a in await self._catalog.agents()}
        summaries: dict[str, tuple[int, float]] = {}
        for vault in {item.vault for item in items}:
            summaries.update(await self._catalog.recovery_point_summary(vault))
        return operator_pb2.ListItemsReply(
            next_page_token=paging.token("items", (items[-1].vault, items[-1].vm_id))
            if more
            else "",
            items=[
                self._item(item, agents.get(item.vm_id), summaries.get(item.vm_id, (0, None)))
                for item in items
            ],
        )

    # --- policies ---------------------------------------------------------------------------

    @staticmethod
    def _parse_policy(spec_json: str) -> Policy:
        # Bounded before it is parsed: 5,000 nested brackets raised RecursionError (issue 14).
        if len(spec_json) > MAX_POLICY_JSON:
            raise InvalidPolicy(
                detail=f"the policy is {len(spec_json)} characters of JSON; at most "
                f"{MAX_POLICY_JSON}"
            )
        if (depth := nesting_depth(spec_json.encode())) > MAX_POLICY_NESTING:
            raise InvalidPolicy(
                detail=f"the policy's JSON nests {depth} levels deep; at most {MAX_POLICY_NESTING}"
            )
        try:
            document = json.loads(spec_json)
        except ValueError as exc:  # JSONDecodeError, and an integer of over 4,300 digits
            raise InvalidPolicy(detail=f"the policy is not valid JSON: {exc}") from None
        return Policy.from_dict(document)

    async def _policy(self, record: PolicyRecord) -> operator_pb2.Policy:
        policy = Policy.from_dict(record.spec)
        schedule_text, retention_text = policy.describe()
        users = await self._catalog.items(record.vault, policy=record.name)
        return operator_pb2.Policy(
            vault=record.vault,
            name=record.name,
            spec_json=json.dumps(record.spec),
            schedule_text=schedule_text,
            retention_text=retention_text,
            vms=[i.vm_id for i in users],
            created_at=_timestamp(record.created_at),
            updated_at=_timestamp(record.updated_at),
        )

    async def CreatePolicy(
        self, request: operator_pb2.PolicyRequest, context: Context
    ) -> operator_pb2.Policy:
        policy = self._parse_policy(request.spec_json)
        return await self._policy(await self._vaults.create_policy(request.vault, policy))

    async def UpdatePolicy(
        self, request: operator_pb2.PolicyRequest, context: Context
    ) -> operator_pb2.Policy:
        await self._catalog.vault(request.vault)
        policy = self._parse_policy(request.spec_json)
        return await self._policy(await self._vaults.update_policy(request.vault, policy))

    async def GetPolicy(
        self, request: operator_pb2.PolicyRef, context: Context
    ) -> operator_pb2.Policy:
        await self._catalog.vault(request.vault)
        return await self._policy(await self._catalog.policy(request.vault, request.name))

    async def ListPolicies(
        self, request: operator_pb2.VaultRef, context: Context
    ) -> operator_pb2.ListPoliciesReply:
        await self._catalog.vault(request.name)
        return operator_pb2.ListPoliciesReply(
            policies=[await self._policy(p) for p in await self._catalog.policies(request.name)]
        )

    async def DeletePolicy(
        self, request: operator_pb2.PolicyRef, context: Context
    ) -> operator_pb2.Policy:
        record, forgotten = await self._vaults.delete_policy(request.vault, request.name)
        # `vms`: the VMs whose protection was stopped with it, which forgot it.
        return operator_pb2.Policy(vault=record.vault, name=record.name, vms=forgotten)

    # --- protection -------------------------------------------------------------------------

    async def Protect(
        self, request: operator_pb2.ProtectRequest, context: Context
    ) -> operator_pb2.JobsReply:
        new_policy = (
            self._parse_policy(request.new_policy_json) if request.new_policy_json else None
        )
        if new_policy is not None and request.policy:
            raise InvalidArgument(detail="choose an existing policy or define a new one, not both")
        jobs = await self._protection.protect(
            request.vault, list(request.vms), request.policy, new_policy
        )
        return await self._jobs_reply(jobs)

    async def ResumeProtection(
        self, request: operator_pb2.ProtectRequest, context: Context
    ) -> operator_pb2.JobsReply:
        jobs = await self._protection.protect(
            request.vault, list(request.vms), request.policy, None, resume=True
        )
        return await self._jobs_reply(jobs)

    async def StopProtection(
        self, request: operator_pb2.StopProtectionRequest, context: Context
    ) -> operator_pb2.JobsReply:
        jobs = await self._protection.stop(request.vault, list(request.vms), request.delete_data)
        return await self._jobs_reply(jobs)

    # --- retention --------------------------------------------------------------------------

    async def Prune(self, request: operator_pb2.VaultRef, context: Context) -> operator_pb2.Job:
        return self._job(await self._pruner.prune_vault(request.name, wait=False))

    async def CollectGarbage(
        self, request: operator_pb2.VaultRef, context: Context
    ) -> operator_pb2.Job:
        return self._job(await self._pruner.collect(request.name))

    # --- integrity --------------------------------------------------------------------------

    async def Verify(
        self, request: operator_pb2.VerifyRequest, context: Context
    ) -> operator_pb2.Job:
        if self._verifier is None:
            raise Unavailable(detail="this controller runs no verify jobs")
        if not request.vault:
            raise InvalidArgument(detail="name the vault to verify (`--vault`)")
        if request.recovery_point_id:
            await self._not_deleted(request.recovery_point_id)
        vm_id = (await self._protection.resolve([request.vm]))[0].vm_id if request.vm else ""
        copy = await self.copier.open_copy(request.vault) if request.from_copy else None
        job = await self._verifier.verify(
            request.vault, vm_id=vm_id, rp_id=request.recovery_point_id, copy=copy
        )
        return await self._named(job)

    # --- off-site copies --------------------------------------------------------------------

    async def Copy(self, request: operator_pb2.VaultRef, context: Context) -> operator_pb2.Job:
        return await self._named(await self.copier.copy(request.name))

    # --- identities -------------------------------------------------------------------------

    async def CreateEnrolmentToken(
        self, request: operator_pb2.CreateEnrolmentTokenRequest, context: Context
    ) -> operator_pb2.EnrolmentToken:
        if self._enrolment is None or not self._enrol_address:
            raise Conflict(
                detail="enrolment is off on this controller: set `enrol_listen` in its config "
                "(or issue the agent's certificate on the CA host: `coffer pki issue-agent`)"
            )
        token, record = await self._enrolment.create_token(
            request.vm_id, request.expires_seconds, caller().name
        )
        return operator_pb2.EnrolmentToken(
            token=str(token),
            vm_id=record.vm_id,
            expires_at=_timestamp(record.expires_at),
            ca_fingerprint=token.ca_fingerprint,
            enrol_address=self._enrol_address,
        )

    def _revocation(self) -> Revocations:
        if self._revocations is None:
            raise Unavailable("this controller keeps no record of certificates")
        return self._revocations

    def _certificates(self, records: list[CertificateRecord]) -> operator_pb2.ListCertificatesReply:
        revocations = self._revocation()
        return operator_pb2.ListCertificatesReply(
            certificates=[
                operator_pb2.Certificate(
                    serial=r.serial,
                    kind=r.kind,
                    name=r.name,
                    role=r.role,
                    fingerprint=r.fingerprint,
                    not_before=_timestamp(r.not_before),
                    not_after=_timestamp(r.not_after),
                    issued_by=r.issued_by,
                    first_used_at=_timestamp(r.first_used_at),
                    status=revocations.status(r),
                    revoked_at=_timestamp(r.revoked_at),
                    revoked_by=r.revoked_by,
                )
                for r in records
            ]
        )

    async def ListCertificates(
        self, request: operator_pb2.ListCertificatesRequest, context: Context
    ) -> operator_pb2.ListCertificatesReply:
        return self._certificates(await self._revocation().certificates(request.name))

    async def RevokeCertificates(
        self, request: operator_pb2.RevokeCertificatesRequest, context: Context
    ) -> operator_pb2.ListCertificatesReply:
        if not request.name:
            raise InvalidArgument(detail="name the agent (VM id) or operator to revoke")
        revoked = await self._revocation().revoke(request.name, caller().name)
        return self._certificates(revoked)

    async def ListAudit(
        self, request: operator_pb2.ListAuditRequest, context: Context
    ) -> operator_pb2.ListAuditReply:
        if self._audit is None:
            raise Unavailable("this controller keeps no audit log")
        if request.limit > MAX_JOB_LIMIT:
            raise InvalidArgument(
                detail=f"a limit of {request.limit} entries is too many: at most {MAX_JOB_LIMIT}"
            )
        entries = await self._audit.entries(
            AuditFilter(
                started_from=_seconds(getattr(request, "from"), request.HasField("from")),
                started_to=_seconds(request.to, request.HasField("to")),
                who=request.who,
                method=request.method,
                limit=request.limit or DEFAULT_JOB_LIMIT,
            )
        )
        return operator_pb2.ListAuditReply(
            entries=[
                operator_pb2.AuditEntry(
                    id=e.id,
                    at=_timestamp(e.at),
                    who=e.who,
                    kind=e.kind,
                    role=e.role,
                    method=e.method,
                    arguments=e.arguments,
                    outcome=e.outcome,
                    peer=e.peer,
                    message=e.message,
                )
                for e in entries
            ]
        )

    # --- the web console and alerts ---------------------------------------------------------

    async def CreateWebLogin(
        self, request: operator_pb2.CreateWebLoginRequest, context: Context
    ) -> operator_pb2.WebLogin:
        if self.web is None:
            raise Conflict(
                detail="the web console is off on this controller: add a [web] section with "
                '`listen` to its config (README "The web console")'
            )
        if request.expires_seconds > MAX_LOGIN_LINK_SECONDS:
            raise InvalidArgument(
                detail=f"a sign-in link lasts at most {MAX_LOGIN_LINK_SECONDS:.0f} seconds, not "
                f"{request.expires_seconds}"
            )
        url, expires_at, operator, role = self.web.issue_link(
            peer_certificate_pem(context), float(request.expires_seconds)
        )
        return operator_pb2.WebLogin(
            url=url,
            expires_at=_timestamp(expires_at),
            operator=operator,
            role=role,
            console=self.web.url,
        )

    async def ListAlerts(
        self, request: operator_pb2.ListAlertsRequest, context: Context
    ) -> operator_pb2.ListAlertsReply:
        if request.limit > MAX_ALERT_LIMIT:
            raise InvalidArgument(
                detail=f"a limit of {request.limit} alerts is too many: at most {MAX_ALERT_LIMIT}"
            )
        alerts = await self._catalog.alerts(
            include_resolved=request.include_resolved, limit=request.limit or DEFAULT_JOB_LIMIT
        )
        names = await self._names(a.vm_id for a in alerts)
        return operator_pb2.ListAlertsReply(
            alerts=[
                operator_pb2.Alert(
                    id=a.id,
                    key=a.key,
                    kind=a.kind,
                    severity=a.severity,
                    state="firing" if a.firing else "resolved",
                    vault=a.vault,
                    vm_id=a.vm_id,
                    item=names.get(a.vm_id, a.vm_id),
                    summary=a.summary,
                    details_json=json.dumps(a.details, sort_keys=True),
                    raised_at=_timestamp(a.raised_at),
                    resolved_at=_timestamp(a.resolved_at),
                )
                for a in alerts
            ]
        )
