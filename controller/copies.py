"""Off-site copies: where vaults copy their recovery points, the Copy jobs, and reading a copy.

A copy target is a second store named in the controller config (`[[copy_targets]]`: a
bucket of another endpoint, another bucket, or another directory), a root like `[datastore]`
url: a vault's copy is the vault's name under it, a datastore in its own right
(controller/datastore/copy.py says what is in it and how a run fills it). A vault copies to
one target, chosen by the operator (`coffer vault update V --copy-to NAME`; `--no-copy` stops
it, leaving the copy as it is).

When copies run (`Copy` jobs, one per vault at a time):

- after each backup that committed a recovery point (and its prune): the copy follows the
  vault within minutes, and a prune's deletes reach the copy with the next backup's copy;
- on the vault's daily maintenance, after its prune, with a garbage collection of the copy:
  what a day of backups missed (the target down) is caught up;
- by hand (`coffer copy --vault V`), and when a vault is given a target.

A copy asked for while the vault's copy job runs is folded into it: the job makes one more
pass when its current one ends, so no backup is left out and no two runs of one copy overlap
(the copy's garbage collection relies on that). A Copy job shows its progress (points, chunks
and bytes sent) in its details while it runs, can be cancelled (`coffer job cancel`: it stops
between two chunks; what arrived stays, and the next run sends only the rest), and records
per recovery point that it is complete in the copy (`coffer rp list`; the dashboard's copy
lag).

The writer lease. The controller holds each copy target's writer lease (lease.py) for its
life, as it holds its datastores': a second controller given the same target is refused
(its copy jobs fail with `DatastoreLeaseHeld`, naming this one). Unlike the datastores' lease
it does not stop the controller: a copy target that is unreachable when the controller starts,
or whose lease another controller holds, only makes that target's copy jobs fail, with the
reason, while the controller keeps trying to take the lease in the background. A lease lost
(taken over after renewals failed) stops the copy jobs to that target at once
(`DatastoreLeaseLost`), and the controller tries to take it again.

Reading a copy needs no lease: a restore, file recovery or verify `--from-copy` opens the
vault's copy with the master key and checks it is this vault's datastore, using only what the
controller holds in memory of the vault's own datastore, so it works while that datastore is
unreachable (`open_copy`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from types import TracebackType
from typing import Any, Self

from controller.catalog import Catalog, CopyLag, JobFilter, JobRecord
from controller.config import CopyTargetSettings
from controller.datastore import (
    ChunkGuard,
    Datastore,
    LeaseHolder,
    ObjectStore,
    WriterLease,
    keep_writer_lease,
    open_object_store,
)
from controller.datastore.copy import (
    CopyProgress,
    CopyReport,
    VaultCopy,
    check_copied,
    copy_datastore,
    open_copy,
)
from controller.datastores import Datastores, vault_location
from controller.jobs import JobManager
from controller.jobs.cancel import ShouldStop, Stopped
from shared.backoff import Backoff
from shared.clock import Clock
from shared.errors import (
    CofferError,
    Conflict,
    InvalidArgument,
    NotFound,
    RecoveryPointNotCopied,
    Unavailable,
    WriterLeaseLost,
)
from shared.model import Operation, Trigger
from shared.supervision import Policy, Supervisor

log = logging.getLogger(__name__)

LEASE_RETRY = Backoff(first=2.0, cap=60.0)
"""How often the controller tries again to take a copy target's lease it could not take."""
NAMED = 20
"""Recovery points named in a job's warnings (the rest are counted)."""


class CopyTarget:
    """A configured copy target: where it is, and whether this controller holds its lease."""

    def __init__(self, settings: CopyTargetSettings) -> None:
        self.settings = settings
        self.lease: WriterLease | None = None
        self.problem: CofferError = Unavailable(
            detail=f"the controller has not taken copy target {settings.name!r}'s writer lease yet"
        )
        """Why copies to it cannot run now (while it holds no lease)."""
        self._guards: dict[str, ChunkGuard] = {}

    @property
    def name(self) -> str:
        return self.settings.name

    def location(self, vault: str) -> str:
        """Where the vault's copy lives (a directory, or an s3:// URL)."""
        return vault_location(self.settings.url, vault)

    def storage(self, vault: str) -> ObjectStore:
        """The store holding the vault's copy; blocking (S3 is asked once)."""
        return open_object_store(self.location(vault), self.settings.s3)

    def guard(self, vault: str) -> ChunkGuard:
        """What restores from the vault's copy rely on: its garbage collection spares it."""
        return self._guards.setdefault(vault, ChunkGuard())

    def writable(self) -> WriterLease:
        """The lease this controller holds on it; the reason it holds none, raised."""
        if self.lease is None:
            raise self.problem
        return self.lease

    def holds(self, lease: WriterLease) -> bool:
        return self.lease is lease


class CopyTargets:
    """The copy targets of the controller config, each with its writer lease held (module
    note); an async context manager whose lease tasks run under `supervisor`."""

    def __init__(
        self,
        settings: Sequence[CopyTargetSettings],
        holder: LeaseHolder,
        supervisor: Supervisor,
    ) -> None:
        self._targets = {target.name: CopyTarget(target) for target in settings}
        self._holder = holder
        self._supervisor = supervisor
        self.on_lost: list[Callable[[str], None]] = []

    async def __aenter__(self) -> Self:
        for target in self._targets.values():
            self._supervisor.start(
                _task(target.name), partial(self._hold, target), policy=Policy.RESTART
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for name in self._targets:
            await self._supervisor.stop(_task(name))

    def __iter__(self) -> Iterator[CopyTarget]:
        return iter(self._targets.values())

    def get(self, name: str) -> CopyTarget:
        """The target `name`; InvalidArgument naming the configured ones if there is none."""
        target = self._targets.get(name)
        if target is None:
            known = ", ".join(sorted(self._targets)) or "none"
            raise InvalidArgument(
                detail=f"no copy target is named {name!r} in the controller config "
                f"([[copy_targets]]; configured: {known})"
            )
        return target

    async def _hold(self, target: CopyTarget) -> None:
        """Take the target's lease (retrying while it cannot be had), keep it, take it again
        if it is lost; release it when cancelled."""
        attempt = 0
        try:
            while True:
                try:
                    lease = await asyncio.to_thread(self._acquire, target.settings)
                except CofferError as error:  # unreachable, refused, or another holds it
                    target.problem = error
                    delay = LEASE_RETRY.delay(attempt)
                    attempt += 1
                    log.warning(
                        "copy target %s: no writer lease (%s); copies to it wait, trying "
                        "again in %.0f s",
                        target.name,
                        error,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                attempt = 0
                target.lease = lease
                log.info("copy target %s at %s: writer lease held", target.name,
                         target.settings.url)  # fmt: skip
                try:
                    await keep_writer_lease(lease)
                    await asyncio.Event().wait()  # a lease that never expires (a directory)
                except WriterLeaseLost as error:
                    self._lost(target, error)
                except CofferError as error:  # a renewal refused outright
                    self._lost(target, WriterLeaseLost(location=lease.location, detail=str(error)))
        finally:
            lease_held = target.lease
            target.lease = None
            target.problem = Unavailable(detail="the controller is stopping")
            if lease_held is not None:
                try:
                    await asyncio.to_thread(lease_held.release)
                except CofferError as error:  # it expires by itself
                    log.warning("copy target %s: lease not released: %s", target.name, error)

    def _acquire(self, settings: CopyTargetSettings) -> WriterLease:
        root = open_object_store(settings.url, settings.s3)
        return root.acquire_writer_lease(self._holder, duration=settings.lease_seconds)

    def _lost(self, target: CopyTarget, error: WriterLeaseLost) -> None:
        target.lease, target.problem = None, error
        log.error("copy target %s: %s; copy jobs to it stop", target.name, error)
        for listener in self.on_lost:
            listener(target.name)


def _task(name: str) -> str:
    return f"copy-target-lease:{name}"


@dataclass(frozen=True)
class CopyStatus:
    """A vault's copy, for its dashboard."""

    target: str
    location: str
    lag: CopyLag
    lag_seconds: float
    """How long the oldest point not in the copy yet has existed (0: every point is there)."""
    writable: str
    """'' while the controller holds the target's lease; otherwise why it does not."""
    last_job: JobRecord | None = None


@dataclass
class _Totals:
    """What the passes of one Copy job did, summed."""

    points_copied: int = 0
    points_deleted: int = 0
    chunks_sent: int = 0
    chunk_bytes_sent: int = 0
    chunks_present: int = 0
    chunks_asked: int = 0
    objects_sent: int = 0
    bytes_sent: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def add(self, report: CopyReport) -> None:
        self.points_copied += len(report.copied)
        self.points_deleted += len(report.deleted)
        self.chunks_sent += report.chunks_sent
        self.chunk_bytes_sent += report.chunk_bytes_sent
        self.chunks_present += report.chunks_present
        self.chunks_asked += report.chunks_asked
        self.objects_sent += report.objects_sent
        self.bytes_sent += report.bytes_sent
        self.bytes_read += report.bytes_read
        self.seconds += report.seconds


class Copier:
    """Starts Copy jobs (by hand, after backups, daily), opens vaults' copies to be read."""

    def __init__(
        self,
        catalog: Catalog,
        datastores: Datastores,
        targets: CopyTargets,
        jobs: JobManager,
        clock: Clock,
        gc_grace_seconds: float,
    ) -> None:
        self._catalog = catalog
        self._datastores = datastores
        self._targets = targets
        self._jobs = jobs
        self._clock = clock
        self._grace = gc_grace_seconds
        self._active: dict[str, JobRecord] = {}
        """The Copy job running for each vault."""
        self._again: dict[str, bool] = {}
        """Vaults whose running Copy job is to make another pass (True: with a collection)."""
        self._starting = asyncio.Lock()
        targets.on_lost.append(self._lease_lost)

    # --- the vault's setting -----------------------------------------------------------------

    async def check_target(self, vault: str, name: str) -> None:
        """Whether `vault` can copy to the target `name`: it is configured, and the vault is
        encrypted. InvalidArgument or Conflict if not."""
        await self._catalog.vault(vault)
        self._targets.get(name)
        datastore = await self._datastores.get(vault)
        if not datastore.encrypted:
            raise Conflict(
                detail=f"vault {vault!r} is not encrypted (format 1): off-site copies are made "
                "of encrypted vaults only, since a copy goes where others may read it. Upgrade "
                "the vault first"
            )

    async def set_target(self, vault: str, name: str) -> None:
        """Copy `vault` to the target `name` from now on ('' stops copying; the copy stays
        where it is). The first copy starts at once."""
        record = await self._catalog.vault(vault)
        if name:
            await self.check_target(vault, name)
        if name == record.copy_target:
            return
        await self._catalog.set_copy_target(vault, name)
        log.info("vault %s: copies %s", vault, f"to target {name}" if name else "stopped")
        if name:
            await self.copy(vault)

    def location(self, vault: str, name: str) -> str:
        """Where the vault's copy in target `name` lives ('' if it is not configured)."""
        try:
            return self._targets.get(name).location(vault)
        except InvalidArgument:
            return ""

    async def status(self, vault: str) -> CopyStatus | None:
        """The vault's copy and its lag; None when the vault copies nowhere."""
        record = await self._catalog.vault(vault)
        if not record.copy_target:
            return None
        lag = await self._catalog.copy_lag(vault, record.copy_target)
        newest = await self._catalog.jobs(
            JobFilter(operations=[Operation.COPY.value], vault=vault, limit=1)
        )
        last = await self._jobs.job(newest[0].id) if newest else None
        oldest = lag.oldest_not_copied_at
        behind = max(0.0, self._clock.now() - oldest) if oldest is not None else 0.0
        try:
            target = self._targets.get(record.copy_target)
        except InvalidArgument as error:  # the config no longer names it
            return CopyStatus(record.copy_target, "", lag, behind, error.message, last)
        writable = "" if target.lease is not None else target.problem.message
        return CopyStatus(target.name, target.location(vault), lag, behind, writable, last)

    # --- Copy jobs ---------------------------------------------------------------------------

    async def copy(
        self,
        vault: str,
        *,
        trigger: Trigger = Trigger.MANUAL,
        after_job: str = "",
        collect: bool = False,
    ) -> JobRecord:
        """A Copy job of the vault's recovery points to its copy target; the running one
        (which makes another pass) if there is one."""
        record = await self._catalog.vault(vault)
        if not record.copy_target:
            raise Conflict(
                detail=f"vault {vault!r} copies nowhere: give it a copy target first "
                f"(`coffer vault update {vault} --copy-to NAME`)"
            )
        target = self._targets.get(record.copy_target)
        async with self._starting:
            running = self._active.get(vault)
            if running is not None:
                self._again[vault] = self._again.get(vault, False) or collect
                return running
            details: dict[str, Any] = {
                "copy_target": target.name,
                "copy_location": target.location(vault),
            }
            if after_job:
                details["after_job"] = after_job

            async def body(job: JobRecord) -> None:
                try:
                    await self._passes(job, collect)
                finally:
                    if self._active.get(job.vault) is job:
                        del self._active[job.vault]
                    self._again.pop(job.vault, None)

            job = await self._jobs.run(
                Operation.COPY, vault, "", body, wait=False, details=details, trigger=trigger,
                cancellable=True,
            )  # fmt: skip
            self._active[vault] = job
            return job

    async def _passes(self, job: JobRecord, collect: bool) -> None:
        totals = _Totals()
        passes = 0
        while True:
            passes += 1
            await self._pass(job, collect, totals)
            again = self._again.pop(job.vault, None)
            if again is None:
                break
            collect = again
        if passes > 1:
            job.details["passes"] = passes

    async def _pass(self, job: JobRecord, collect: bool, totals: _Totals) -> None:
        record = await self._catalog.vault(job.vault)
        if not record.copy_target:
            raise Conflict(detail=f"vault {job.vault!r} no longer copies anywhere")
        target = self._targets.get(record.copy_target)
        lease = target.writable()
        source = await self._datastores.get(job.vault)
        known = {
            rp.id: (rp.vm_id, rp.created_at)
            for rp in await self._catalog.recovery_points(vault=job.vault)
        }
        # Soft-deleted points stay in the copy until they are purged (an undelete brings them
        # back there too); they are not copied while deleted.
        deleted = frozenset(
            point.point.id for point in await self._catalog.deleted_recovery_points(vault=job.vault)
        )
        keep = set(known) | deleted
        # Found damaged in the copy by a verify of it: sent again first.
        resend = await self._catalog.copy_bad_chunks(job.vault, target.name)
        loop = asyncio.get_running_loop()

        def progress(now: CopyProgress) -> None:  # from the run's thread
            loop.call_soon_threadsafe(self._progressed, job, totals, now)

        work = partial(
            self._run, source, target, job.vault, lease, keep, known, collect, resend, job.id,
            progress,
        )  # fmt: skip
        try:
            report = await self._jobs.abortable(work)
        except Stopped as stopped:  # cancelled: what it did is recorded all the same
            await self._record(job, target, stopped.result, totals, deleted)
            raise
        finally:
            self._datastores.guard(job.vault).release(job.id)
        await self._record(job, target, report, totals, deleted)
        if report.stopped and not target.holds(lease):
            raise target.problem  # the lease was lost while it ran

    def _run(
        self,
        source: Datastore,
        target: CopyTarget,
        vault: str,
        lease: WriterLease,
        keep: set[str],
        known: dict[str, tuple[str, float]],
        collect: bool,
        resend: list[bytes],
        owner: str,
        progress: Callable[[CopyProgress], None],
        should_stop: ShouldStop,
    ) -> CopyReport:
        return copy_datastore(
            source,
            target.storage(vault),
            self._datastores.master,
            keep=keep,
            known=known,
            source_guard=self._datastores.guard(vault),
            owner=owner,
            collect=collect,
            cutoff=self._clock.now() - self._grace,
            target_guard=target.guard(vault),
            resend=resend,
            # A lease lost stops the run as a cancel does (module note).
            should_stop=lambda: should_stop() or not target.holds(lease),
            progress=progress,
        )

    def _progressed(self, job: JobRecord, totals: _Totals, now: CopyProgress) -> None:
        job.details["progress"] = asdict(now)
        job.bytes_sent = totals.bytes_sent + now.bytes_sent
        running = self._jobs.running(job.id)
        if running is not None:
            running.touch()

    async def _record(
        self,
        job: JobRecord,
        target: CopyTarget,
        report: CopyReport,
        totals: _Totals,
        deleted: frozenset[str],
    ) -> None:
        """What a pass found in the copy and did, into the catalog and the job's record.
        `deleted`: the vault's soft-deleted points, kept in the copy without a word."""
        only_in_copy = tuple(rp_id for rp_id in report.only_in_copy if rp_id not in deleted)
        in_copy = sorted({*report.copied, *report.present, *only_in_copy})
        await self._catalog.record_copies(target.name, in_copy, self._clock.now(), job.id)
        await self._catalog.remove_copy_bad_chunks(job.vault, target.name, report.resent)
        if report.planned:
            recorded = await self._catalog.copied_points(job.vault, target.name)
            await self._catalog.forget_copies(target.name, sorted(recorded - set(in_copy)))
        totals.add(report)
        for rp_id, why in list(report.not_copied.items())[:NAMED]:
            totals.warnings.append(f"recovery point {rp_id} was not copied: {why}")
        if len(report.not_copied) > NAMED:
            totals.warnings.append(
                f"{len(report.not_copied) - NAMED} more recovery points were not copied"
            )
        if only_in_copy:
            totals.warnings.append(
                f"{len(only_in_copy)} recovery points are in the copy but missing from "
                f"the vault's datastore ({_named(only_in_copy)}): kept in the copy; "
                f"`coffer verify --vault {job.vault}` checks the datastore"
            )
        if totals.warnings:
            job.details["warnings"] = list(totals.warnings)
        job.bytes_sent, job.bytes_read = totals.bytes_sent, totals.bytes_read
        job.details.pop("progress", None)
        job.details["copy"] = {
            "recovery_points_copied": totals.points_copied,
            "recovery_points_in_copy": len(in_copy),
            "recovery_points_deleted": totals.points_deleted,
            "chunks_sent": totals.chunks_sent,
            "chunk_bytes_sent": totals.chunk_bytes_sent,
            "chunks_already_there": totals.chunks_present,
            "chunks_asked": totals.chunks_asked,
            "indexes_and_manifests_sent": totals.objects_sent,
            "bytes_sent": totals.bytes_sent,
            "bytes_read": totals.bytes_read,
            "seconds": round(totals.seconds, 3),
        }
        if report.copied:
            job.details["copied_recovery_points"] = _named(report.copied)
        if report.resent:
            job.details["damaged_chunks_sent_again"] = len(report.resent)
        if report.deleted:
            job.details["deleted_from_copy"] = _named(report.deleted)
        if report.gc is not None:
            job.details["copy_gc"] = asdict(report.gc)
        log.info(
            "vault %s: copy to %s %s %d recovery points (%d chunks, %d bytes sent), deleted "
            "%d, in %.1f s",
            job.vault, target.name, "stopped after" if report.stopped else "copied",
            len(report.copied), report.chunks_sent, report.bytes_sent, len(report.deleted),
            report.seconds,
        )  # fmt: skip

    def _lease_lost(self, name: str) -> None:
        # The running jobs to that target see it at their next chunk (`should_stop`); here only
        # the log says which they are.
        for vault, job in self._active.items():
            log.warning("vault %s: copy job %s to %s stops: lease lost", vault, job.id, name)

    # --- by schedule ---------------------------------------------------------------------------

    async def after_backup(self, job: JobRecord) -> None:
        """A backup committed a recovery point: copy it (if the vault copies anywhere)."""
        if not job.status.succeeded or not job.recovery_point_id:
            return
        try:
            record = await self._catalog.vault(job.vault)
            if record.copy_target:
                await self.copy(job.vault, trigger=Trigger.SCHEDULED, after_job=job.id)
        except CofferError as error:  # e.g. the controller is stopping
            log.warning("copy after backup %s did not start: %s", job.id, error)

    async def after_maintenance(self, vault: str) -> None:
        """The daily maintenance: copy what is missing, mirror prunes, collect the copy."""
        try:
            record = await self._catalog.vault(vault)
            if record.copy_target:
                await self.copy(vault, trigger=Trigger.SCHEDULED, collect=True)
        except CofferError as error:
            log.warning("daily copy of vault %s did not start: %s", vault, error)

    # --- reading a copy ----------------------------------------------------------------------

    async def open_copy(self, vault: str, rp_id: str = "") -> VaultCopy:
        """The vault's copy opened to be read (`rp_id`: which must be complete in it);
        RecoveryPointNotCopied if it is not, Conflict if the vault copies nowhere."""
        record = await self._catalog.vault(vault)
        if not record.copy_target:
            raise Conflict(
                detail=f"vault {vault!r} has no copy to read from (`coffer vault update "
                f"{vault} --copy-to NAME` gives it one)"
            )
        target = self._targets.get(record.copy_target)
        # In memory since the controller started: the vault's own datastore is not read.
        source = await self._datastores.get(vault)
        location = target.location(vault)

        def opened() -> Datastore:
            copy = open_copy(source, target.storage(vault), self._datastores.master)
            if rp_id:
                check_copied(copy, vault, rp_id)
            return copy

        try:
            datastore = await asyncio.to_thread(opened)
        except NotFound as error:
            if isinstance(error, RecoveryPointNotCopied):
                raise
            raise RecoveryPointNotCopied(
                rp_id=rp_id or "(any)",
                vault=vault,
                location=location,
                detail="nothing has been copied there yet",
            ) from None
        return VaultCopy(target.name, location, datastore, target.guard(vault))


def _named(rp_ids: Sequence[str]) -> str:
    shown = ", ".join(rp_ids[:NAMED])
    return shown + (f" and {len(rp_ids) - NAMED} more" if len(rp_ids) > NAMED else "")


__all__ = ["Copier", "CopyStatus", "CopyTarget", "CopyTargets", "VaultCopy"]
