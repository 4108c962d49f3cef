"""Pruning and garbage collection: giving back what retention no longer keeps.

Two steps, each a job. `Prune` applies the policies' retention rules (`shared.retention`) to a
vault's recovery points: it records which rules keep each point and deletes the rest (its
manifest — the datastore's commit point — first, then its indexes, then the catalog row).
A VM's newest recovery point is never pruned (labelled `latest` when no rule keeps it): a VM
whose backups keep failing still has one.
`GarbageCollection` then reclaims the chunks no recovery point references
(`controller.datastore.gc`, mark-and-sweep with a grace period and the vault's chunk guard, so
it runs beside backups).

A VM is pruned after each of its successful backups; once a day (`MAINTENANCE_AT`, UTC) every
vault is pruned and garbage-collected. A maintenance missed while the controller was down is
not caught up at start (unlike backups): the next backups prune their VMs anyway, and the next
day's run collects what they freed. Recovery points a running job reads (an incremental's
base, a restore's source) are left for the next prune. Points of VMs whose protection was
stopped with retained data are never pruned: retaining is what the operator asked for.
"""

from __future__ import annotations

import logging
import time as monotonic_time
from dataclasses import asdict
from datetime import UTC, datetime, time

from controller.catalog import Catalog, JobRecord, RecoveryPointRecord
from controller.datastore import collect_garbage
from controller.datastores import Datastores
from controller.jobs import JobManager
from controller.scheduler import Plan
from shared.clock import Clock
from shared.errors import CofferError, Conflict
from shared.model import ItemState, Operation
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
        self._collecting: set[str] = set()

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

    async def _delete(self, vault: str, points: list[RecoveryPointRecord]) -> list[str]:
        datastore = await self._datastores.get(vault)
        deleted: list[str] = []
        for rp in points:
            # The datastore first (its manifest, the commit point, goes first), then the row:
            # a failure between the two leaves a row whose point is gone, which the next prune
            # deletes again (both deletes are idempotent). The other order would leave a
            # manifest no row names, which nothing would ever delete.
            await self._jobs.in_pool(datastore.delete_recovery_point, rp.id)
            await self._catalog.delete_recovery_point(rp.id)
            deleted.append(rp.id)
        return deleted

    async def prune_vm(self, vault: str, vm_id: str, *, after_job: str = "") -> JobRecord | None:
        """Apply the VM's policy; a Prune job is recorded only when it deletes something."""
        item = await self._catalog.item(vm_id)
        # A stopped item keeps its policy's name for resuming, but its points are retained.
        if (
            item is None
            or item.vault != vault
            or item.policy is None
            or not ItemState(item.state).protected
        ):
            return None
        policy = Policy.from_dict((await self._catalog.policy(vault, item.policy)).spec)
        expired, kept = await self._expired(vault, vm_id, policy)
        await self._catalog.set_kept_by(kept)
        if not expired:
            return None

        async def body(job: JobRecord) -> None:
            job.details["deleted_recovery_points"] = await self._delete(vault, expired)

        details = {"after_job": after_job, "policy": policy.name} if after_job else {}
        return await self._jobs.run(Operation.PRUNE, vault, vm_id, body, details=details)

    async def prune_vault(self, vault: str) -> JobRecord:
        """A Prune job over every protected VM of the vault."""
        await self._catalog.vault(vault)

        async def body(job: JobRecord) -> None:
            deleted: list[str] = []
            for item in await self._catalog.items(vault):
                if not ItemState(item.state).protected or item.policy is None:
                    continue
                policy = Policy.from_dict((await self._catalog.policy(vault, item.policy)).spec)
                expired, kept = await self._expired(vault, item.vm_id, policy)
                await self._catalog.set_kept_by(kept)
                deleted += await self._delete(vault, expired)
            job.details["deleted_recovery_points"] = deleted

        return await self._jobs.run(Operation.PRUNE, vault, "", body)

    async def delete_all(self, vault: str, vm_id: str) -> list[str]:
        """Delete every recovery point of a VM in the vault (DeleteBackupData)."""
        points = await self._catalog.recovery_points(vm_id=vm_id, vault=vault)
        in_use = self._jobs.in_use() & {rp.id for rp in points}
        if in_use:
            raise Conflict(
                detail=f"recovery points {', '.join(sorted(in_use))} are being read by a running "
                "job (a restore); wait for it to finish and delete the data again"
            )
        return await self._delete(vault, points)

    # --- garbage collection -----------------------------------------------------------------

    async def collect(self, vault: str, *, wait: bool = False) -> JobRecord:
        """A GarbageCollection job for the vault (one at a time per vault)."""
        await self._catalog.vault(vault)
        if vault in self._collecting:
            raise Conflict(detail=f"garbage collection of vault {vault!r} is already running")
        self._collecting.add(vault)

        async def body(job: JobRecord) -> None:
            try:
                datastore = await self._datastores.get(vault)
                started = monotonic_time.monotonic()
                report = await self._jobs.in_pool(
                    lambda: collect_garbage(
                        datastore,
                        cutoff=self._clock.now() - self._grace,
                        guard=self._datastores.guard(vault),
                    )
                )
                await self._catalog.add_stored_bytes(vault, -report.bytes_freed)
                job.details["report"] = asdict(report)
                job.details["grace_seconds"] = self._grace
                job.bytes_stored = report.bytes_freed
                log.info(
                    "vault %s: GC freed %d chunks (%d bytes) in %.1f s",
                    vault,
                    report.chunks_deleted,
                    report.bytes_freed,
                    monotonic_time.monotonic() - started,
                )
            finally:
                self._collecting.discard(vault)

        return await self._jobs.run(Operation.GARBAGE_COLLECTION, vault, "", body, wait=wait)

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
            await self.prune_vault(vault)
            await self.collect(vault)
        except CofferError as exc:
            log.warning("maintenance of vault %s: %s", vault, exc)


_RULE_ORDER = ["daily", "weekly", "monthly", "yearly"]
# The label of a point kept only because it is the VM's newest.
LATEST = "latest"
