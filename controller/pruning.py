"""Pruning and garbage collection: giving back what retention no longer keeps.

Two steps, each a job. `Prune` applies the policies' retention rules (`shared.retention`) to a
vault's recovery points: it records which rules keep each point and deletes the rest (its
manifest — the datastore's commit point — first, then its indexes, then the catalog row).
A VM's newest recovery point is never pruned (labelled `latest` when no rule keeps it): a VM
whose backups keep failing still has one.
`GarbageCollection` then reclaims the chunks no recovery point references
(`controller.datastore.gc`, mark-and-sweep with a grace period and the vault's chunk guard, so
it runs beside backups).

A VM is pruned after each of its successful backups, by a Prune job that is recorded even when
it deletes nothing (so the operator sees that retention ran, and which rules keep what); once a
day (`MAINTENANCE_AT`, UTC) every vault is pruned, its soft-deleted points past their days are
purged (controller/soft_delete.py), and it is garbage-collected. A maintenance missed
while the controller was down is not caught up at start (unlike backups): the next backups
prune their VMs anyway, and the next day's run collects what they freed. Recovery points a
running job reads (an incremental's base, a restore's source) are left for the next prune.
Points of VMs whose protection was stopped with retained data are never pruned: retaining is
what the operator asked for. Deleting a VM's backup data (`delete_all`) is not pruning: in a
vault that keeps deleted data (`soft_delete_days`, 14 by default) the points are soft-deleted,
recoverable until they are purged.

Both jobs can be cancelled (`coffer job cancel`) and stop when the controller does: a prune
between two recovery points (each deleted whole: manifest, indexes, catalog row), a collection
between two items (it checks for abort on every one, `controller.datastore.gc`). What they
deleted stays deleted; the rest waits for the next run.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime, time
from functools import partial

from controller.catalog import Catalog, JobRecord, RecoveryPointRecord
from controller.datastore import ChunkGuard, Datastore, GcReport, collect_garbage
from controller.datastores import Datastores
from controller.jobs import JobManager
from controller.jobs.cancel import ShouldStop, Stopped, finishing
from controller.scheduler import Plan
from controller.soft_delete import Deleted, SoftDelete
from shared.clock import Clock
from shared.errors import CofferError, Conflict
from shared.model import Operation, Trigger
from shared.policy import Frequency, Policy, Schedule
from shared.retention import retained

log = logging.getLogger(__name__)

MAINTENANCE_PREFIX = "maintenance:"
MAINTENANCE_AT = time(3, 30)


class Pruner:
    def __init__(
        self,
        catalog: Catalog,
        datastores: Datastores,
        jobs: JobManager,
        clock: Clock,
        gc_grace_seconds: float,
    ) -> None:
        self._catalog = catalog
        self._datastores = datastores
        self._jobs = jobs
        self._clock = clock
        self._grace = gc_grace_seconds
        self.soft_delete = SoftDelete(catalog, datastores, jobs, clock)
        # Run with the vault's name once its daily prune is done and its collection started
        # (the verifier starts a re-verify of what its `reverify_days` says is due; it runs
        # beside the collection, which deletes only chunks no recovery point references).
        self.after_maintenance: list[Callable[[str], Awaitable[None]]] = []

    # --- retention --------------------------------------------------------------------------

    async def _expired(
        self, vault: str, vm_id: str, policy: Policy
    ) -> tuple[list[RecoveryPointRecord], dict[str, tuple[str, ...]]]:
        points = await self._catalog.recovery_points(vm_id=vm_id, vault=vault)
        keep = retained(
            ((rp.id, datetime.fromtimestamp(rp.created_at, UTC)) for rp in points),
            policy.retention,
            policy.schedule.timezone,
            datetime.fromtimestamp(self._clock.now(), UTC),
        )
        in_use = self._jobs.in_use()
        labels = {
            rp_id: tuple(sorted(rules, key=_RULE_ORDER.index)) for rp_id, rules in keep.items()
        }
        # The newest point is never pruned, whatever the rules say: a VM whose backups have
        # been failing for longer than its retention must not be left with nothing.
        if points:
            newest = max(points, key=lambda rp: rp.created_at)
            labels.setdefault(newest.id, (LATEST,))
        expired = [rp for rp in points if rp.id not in labels and rp.id not in in_use]
        # Every survivor's labels: one spared only because a running job reads it gets none,
        # not the rules that kept it before.
        kept = {rp.id: labels.get(rp.id, ()) for rp in points if rp.id in labels or rp.id in in_use}
        return expired, kept

    async def _delete(
        self, vault: str, points: list[RecoveryPointRecord], deleted: list[str]
    ) -> None:
        """Delete `points`, adding each to `deleted` once it is gone; a cancel takes effect
        between two points, never inside one."""
        for rp in points:
            await finishing(self._delete_one(rp, deleted))

    async def _delete_one(self, rp: RecoveryPointRecord, deleted: list[str]) -> None:
        # The datastore first (its manifest, the commit point, goes first), then the row: a
        # failure between the two leaves a row whose point is gone, which the next prune
        # deletes again (both deletes are idempotent). The other order would leave a manifest
        # no row names, which nothing would ever delete. A vault being upgraded deletes it from
        # both formats (controller.datastores).
        await self._datastores.delete_recovery_point(rp.vault, rp.id)
        await self._catalog.delete_recovery_point(rp.id)
        deleted.append(rp.id)

    async def prune_vm(
        self,
        vault: str,
        vm_id: str,
        *,
        after_job: str = "",
        trigger: Trigger = Trigger.MANUAL,
    ) -> JobRecord | None:
        """A Prune job applying the VM's policy (None when it has none: not protected, or its
        protection stopped with the data retained). Recorded even when nothing expired."""
        item = await self._catalog.item(vm_id)
        # A stopped item keeps its policy's name for resuming, but its points are retained.
        if item is None or item.vault != vault or item.policy is None or not item.state.protected:
            return None
        policy = Policy.from_dict((await self._catalog.policy(vault, item.policy)).spec)

        async def body(job: JobRecord) -> None:
            deleted: list[str] = []
            job.details["deleted_recovery_points"] = deleted
            expired, kept = await self._expired(vault, vm_id, policy)
            await self._catalog.set_kept_by(kept)
            await self._delete(vault, expired, deleted)

        details = {"policy": policy.name} | ({"after_job": after_job} if after_job else {})
        return await self._jobs.run(
            Operation.PRUNE, vault, vm_id, body, details=details, trigger=trigger,
            cancellable=True,
        )  # fmt: skip

    async def prune_vault(
        self, vault: str, *, wait: bool = True, trigger: Trigger = Trigger.MANUAL
    ) -> JobRecord:
        """A Prune job over every protected VM of the vault."""
        await self._catalog.vault(vault)

        async def body(job: JobRecord) -> None:
            deleted: list[str] = []
            job.details["deleted_recovery_points"] = deleted
            for item in await self._catalog.items(vault):
                if not item.state.protected or item.policy is None:
                    continue
                policy = Policy.from_dict((await self._catalog.policy(vault, item.policy)).spec)
                expired, kept = await self._expired(vault, item.vm_id, policy)
                await self._catalog.set_kept_by(kept)
                await self._delete(vault, expired, deleted)

        return await self._jobs.run(
            Operation.PRUNE, vault, "", body, wait=wait, trigger=trigger, cancellable=True
        )

    async def delete_all(
        self, vault: str, vm_id: str, *, job_id: str = "", policy: str | None = None
    ) -> Deleted:
        """Delete every recovery point of a VM in the vault (DeleteBackupData): soft-deleted
        when the vault keeps deleted data (`policy`, the VM's, is kept for an undelete),
        deleted at once otherwise."""
        points = await self._catalog.recovery_points(vm_id=vm_id, vault=vault)
        in_use = self._jobs.in_use() & {rp.id for rp in points}
        if in_use:
            raise Conflict(
                detail=f"recovery points {', '.join(sorted(in_use))} are being read by a running "
                "job (a restore); wait for it to finish and delete the data again"
            )
        deleted: list[str] = []
        days = (await self._catalog.vault(vault)).soft_delete_days
        if not days:
            await self._delete(vault, points, deleted)
            return Deleted(deleted, None)
        datastore = await self._datastores.get(vault)
        old = [rp.id for rp in points if self._datastores.in_old_format(vault, rp.id)]
        if old:
            # A tombstone is written where the point's manifest is; the format-1 part of a vault
            # being upgraded gets none, or the upgrade would convert a deleted point.
            raise Conflict(
                detail=f"vault {vault!r} is being upgraded and {len(old)} of these recovery "
                "points are still in format 1, where deleted data cannot be kept recoverable: "
                "delete the data after the upgrade (`coffer job list --operation VaultUpgrade`), "
                f"or at once with `coffer vault update {vault} --soft-delete-days 0`"
            )
        purge_at: float | None = None
        for rp in points:
            purge_at = await finishing(
                self.soft_delete.delete(datastore, rp, days=days, job_id=job_id, policy=policy)
            )
            deleted.append(rp.id)
        return Deleted(deleted, purge_at)

    # --- garbage collection -----------------------------------------------------------------

    async def collect(
        self, vault: str, *, wait: bool = False, trigger: Trigger = Trigger.MANUAL
    ) -> JobRecord:
        """A GarbageCollection job for the vault (one at a time per vault)."""
        await self._catalog.vault(vault)
        # No await between this check and the new job's admission: two calls cannot both pass.
        if any(
            job.operation is Operation.GARBAGE_COLLECTION and job.vault == vault
            for job in self._jobs.running_jobs()
        ):
            raise Conflict(detail=f"garbage collection of vault {vault!r} is already running")

        async def body(job: JobRecord) -> None:
            datastore = await self._datastores.get(vault)
            # A vault being upgraded is collected with its format-1 part (gc.py).
            legacy = self._datastores.legacy(vault)
            try:
                report = await self._jobs.abortable(
                    partial(
                        self._collect_garbage,
                        datastore,
                        cutoff=self._clock.now() - self._grace,
                        guard=self._datastores.guard(vault),
                        legacy=legacy.datastore if legacy is not None else None,
                        skip=frozenset(legacy.pending) if legacy is not None else frozenset(),
                    )
                )
            except Stopped as stopped:  # cancelled: what it freed is freed all the same
                await self._collected(vault, job, stopped.result)
                raise
            await self._collected(vault, job, report)

        return await self._jobs.run(
            Operation.GARBAGE_COLLECTION, vault, "", body, wait=wait, trigger=trigger,
            cancellable=True,
        )  # fmt: skip

    async def _collected(self, vault: str, job: JobRecord, report: GcReport) -> None:
        await self._catalog.add_stored_bytes(vault, -report.bytes_freed)
        job.details["report"] = asdict(report)
        job.details["grace_seconds"] = self._grace
        job.bytes_stored = report.bytes_freed
        log.info(
            "vault %s: GC %s %d chunks (%d bytes) in %.1f s",
            vault,
            "stopped after freeing" if report.stopped else "freed",
            report.chunks_deleted,
            report.bytes_freed,
            report.seconds,
        )

    @staticmethod
    def _collect_garbage(
        datastore: Datastore,
        should_stop: ShouldStop,
        *,
        cutoff: float,
        guard: ChunkGuard,
        legacy: Datastore | None = None,
        skip: frozenset[str] = frozenset(),
    ) -> GcReport:
        return collect_garbage(
            datastore,
            cutoff=cutoff,
            guard=guard,
            should_stop=should_stop,
            legacy=legacy,
            skip=skip,
        )

    # --- the daily maintenance --------------------------------------------------------------

    def plan_maintenance(self, plan: Plan, vault: str) -> None:
        schedule = Schedule(Frequency.DAILY, (MAINTENANCE_AT,), timezone="UTC")
        plan.set(self.maintenance_key(vault), schedule, self._clock.now())

    @staticmethod
    def maintenance_key(vault: str) -> str:
        return MAINTENANCE_PREFIX + vault

    @staticmethod
    def is_maintenance(key: str) -> bool:
        return key.startswith(MAINTENANCE_PREFIX)

    async def maintain(self, key: str) -> None:
        vault = key.removeprefix(MAINTENANCE_PREFIX)
        try:
            await self.prune_vault(vault, trigger=Trigger.SCHEDULED)
            # Before the collection, which then frees what only the purged points used.
            await self.soft_delete.purge_due(vault, trigger=Trigger.SCHEDULED)
            await self.collect(vault, trigger=Trigger.SCHEDULED)
            for step in self.after_maintenance:
                await step(vault)
        except CofferError as exc:
            log.warning("maintenance of vault %s: %s", vault, exc)


_RULE_ORDER = ["daily", "weekly", "monthly", "yearly"]
# The label of a point kept only because it is the VM's newest.
LATEST = "latest"
