"""The gRPC service operators call (through the `coffer` CLI): agents, jobs, recovery points."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import wraps
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from controller.catalog import Catalog, JobFilter, JobRecord, RecoveryPointRecord
from controller.jobs import JobManager
from controller.registry import AgentRegistry
from controller.status import StatusMonitor
from shared.errors import CofferError, InvalidArgument, PermissionDenied
from shared.model import JobStatus, Operation
from shared.rpc import operator_pb2, operator_pb2_grpc
from shared.rpc_errors import abort
from shared.tls import peer_identity

Context: TypeAlias = grpc.aio.ServicerContext
R = TypeVar("R")
WATCH_INTERVAL = 0.5


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _seconds(stamp: Timestamp, present: bool) -> float | None:
    return stamp.ToNanoseconds() / 1e9 if present else None


def operator_only(
    method: Callable[[Any, Any, Context], Awaitable[R]],
) -> Callable[[Any, Any, Context], Awaitable[R]]:
    """Check the caller is an operator, and send CofferErrors back typed."""

    @wraps(method)
    async def checked(self: Any, request: Any, context: Context) -> R:
        try:
            identity = peer_identity(context)
            if identity.role != "operator":
                raise PermissionDenied(detail=f"{identity} may not use the operator API")
            return await method(self, request, context)
        except CofferError as exc:
            await abort(context, exc)

    return checked


class OperatorService(operator_pb2_grpc.OperatorServiceServicer):
    def __init__(
        self,
        catalog: Catalog,
        registry: AgentRegistry,
        jobs: JobManager,
        status: StatusMonitor | None,
    ) -> None:
        self._catalog = catalog
        self._registry = registry
        self._jobs = jobs
        self._status = status

    def _job(self, job: JobRecord) -> operator_pb2.Job:
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
        )
        progress = self._status.progress(job.id) if self._status else None
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
    def _recovery_point(rp: RecoveryPointRecord) -> operator_pb2.RecoveryPoint:
        return operator_pb2.RecoveryPoint(
            id=rp.id,
            vm_id=rp.vm_id,
            vault=rp.vault,
            created_at=_timestamp(rp.created_at),
            consistency=rp.consistency,
            disks=[
                operator_pb2.RecoveryPointDisk(
                    name=d.name, size_bytes=d.size_bytes, chunk_count=d.chunk_count
                )
                for d in rp.disks
            ],
            job_id=rp.job_id,
            bytes_stored=rp.bytes_stored,
        )

    @operator_only
    async def ListAgents(
        self, request: operator_pb2.ListAgentsRequest, context: Context
    ) -> operator_pb2.ListAgentsReply:
        agents = await self._catalog.agents()
        return operator_pb2.ListAgentsReply(
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
                )
                for a in agents
            ]
        )

    @operator_only
    async def BackupNow(
        self, request: operator_pb2.BackupNowRequest, context: Context
    ) -> operator_pb2.Job:
        return self._job(await self._jobs.backup_now(request.vm_id, list(request.disks)))

    @operator_only
    async def Restore(
        self, request: operator_pb2.RestoreRequest, context: Context
    ) -> operator_pb2.Job:
        job = await self._jobs.restore(
            request.vm_id,
            request.recovery_point_id,
            request.disk,
            request.target_path,
            request.target_vm_id,
        )
        return self._job(job)

    @operator_only
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
        jobs = await self._catalog.jobs(
            JobFilter(
                statuses=list(request.status),
                operations=list(request.operation),
                vm_id=request.vm_id,
                started_from=_seconds(request.started_from, request.HasField("started_from")),
                started_to=_seconds(request.started_to, request.HasField("started_to")),
                limit=request.limit or 100,
            )
        )
        # Running jobs: the in-memory record has the live byte counts.
        return operator_pb2.ListJobsReply(
            jobs=[self._job(await self._jobs.job(job.id)) for job in jobs]
        )

    @operator_only
    async def GetJob(
        self, request: operator_pb2.GetJobRequest, context: Context
    ) -> operator_pb2.Job:
        return self._job(await self._jobs.job(request.id))

    async def WatchJob(
        self, request: operator_pb2.GetJobRequest, context: Context
    ) -> AsyncIterator[operator_pb2.Job]:
        try:
            identity = peer_identity(context)
            if identity.role != "operator":
                raise PermissionDenied(detail=f"{identity} may not use the operator API")
            job = await self._jobs.job(request.id)
        except CofferError as exc:
            await abort(context, exc)
        while True:
            yield self._job(job)
            if JobStatus(job.status).ended:
                return
            running = self._jobs.running(job.id)
            if running is not None:
                running.changed.clear()
                # Woken by the job's own changes; otherwise a steady tick for MQTT progress.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(running.changed.wait(), WATCH_INTERVAL)
            job = await self._jobs.job(request.id)

    @operator_only
    async def ListRecoveryPoints(
        self, request: operator_pb2.ListRecoveryPointsRequest, context: Context
    ) -> operator_pb2.ListRecoveryPointsReply:
        points = await self._catalog.recovery_points(request.vm_id)
        return operator_pb2.ListRecoveryPointsReply(
            recovery_points=[self._recovery_point(rp) for rp in points]
        )
