"""Soft delete: deleted backup data stays recoverable for a number of days, then is purged.

Deleting a VM's backup data (`coffer stop-protection --delete-data`, a `DeleteBackupData` job)
in a vault whose `soft_delete_days` is above 0 (14 by default, as Azure Backup's soft delete)
does not remove its recovery points: each moves into a tombstone in the datastore
(controller/datastore/deleted.py, which states the order of writes) and, in the catalog, out of
the live recovery points into the deleted ones, with the time it will be purged (deleted
then, plus the vault's days at that moment). Pruning is not soft: what retention expires is
deleted at once, as the policy says.

While a point is soft-deleted it is listed by `coffer rp list --deleted` with its purge time,
cannot be restored, verified, pruned or copied (nothing that reads live points sees it), and
keeps its chunks: garbage collection marks them through the tombstone. `coffer undelete VM
[--rp RP]` (an `Undelete` job, controller/protection.py) puts it back: its manifest returns
(checked as a commit is) and its row moves back; the VM's item returns to ProtectionStopped.
The daily maintenance purges what is due (a `PurgeDeleted` job, started only when a point is
due), before its garbage collection, which then frees the chunks only they used.

An undelete and a purge of one vault never run at once (a lock per vault): a purge that
removed a point's indexes while an undelete put its manifest back would leave a live point
without indexes. Like a prune, a purge stops between two points when cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from controller.catalog import Catalog, DeletedRecoveryPointRecord, JobRecord, RecoveryPointRecord
from controller.datastore import Datastore
from controller.datastore.deleted import Deletion
from controller.datastores import Datastores
from controller.jobs import JobManager
from controller.jobs.cancel import finishing
from shared.clock import Clock
from shared.model import Operation, Trigger

log = logging.getLogger(__name__)

DAY = 86400.0
MAX_SOFT_DELETE_DAYS = 180
"""The longest a vault may keep deleted data (Azure Backup's limit)."""


@dataclass(frozen=True)
class Deleted:
    """What a deletion of backup data did."""

    recovery_points: list[str]
    purge_at: float | None
    """When they are purged; None when they were deleted at once (soft delete off)."""


def _when(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


class SoftDelete:
    """Soft-deletes, undeletes and purges recovery points, in datastore and catalog together."""

    def __init__(
        self, catalog: Catalog, datastores: Datastores, jobs: JobManager, clock: Clock
    ) -> None:
        self._catalog = catalog
        self._datastores = datastores
        self._jobs = jobs
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, vault: str) -> asyncio.Lock:
        return self._locks.setdefault(vault, asyncio.Lock())

    async def delete(
        self,
        datastore: Datastore,
        rp: RecoveryPointRecord,
        *,
        days: int,
        job_id: str,
        policy: str | None,
    ) -> float:
        """Soft-delete one live recovery point for `days`; when it will be purged.

        The datastore first (the tombstone, then the manifest goes), then the catalog row: a
        failure between the two leaves a row whose manifest is gone, which deleting the data
        again finishes (both steps are idempotent)."""
        now = self._clock.now()
        purge_at = now + days * DAY
        deletion = Deletion(
            deleted_at=now,
            purge_at=purge_at,
            job_id=job_id,
            policy=policy,
            kept_by=rp.kept_by,
            bytes_stored=rp.bytes_stored,
            data_bytes=rp.data_bytes,
        )
        await self._jobs.in_pool(datastore.soft_delete_recovery_point, rp.id, deletion)
        await self._catalog.soft_delete_recovery_point(
            rp.id, deleted_at=now, purge_at=purge_at, deleted_by=job_id, policy=policy
        )
        return purge_at

    async def undelete(self, vault: str, rp_id: str) -> DeletedRecoveryPointRecord:
        """Make a soft-deleted recovery point live again: its manifest back in the datastore
        (ChunkMissing or Conflict, with the point still deleted, if what it needs is no longer
        whole), then its catalog row."""
        datastore = await self._datastores.get(vault)
        async with self._lock(vault):
            await self._jobs.in_pool(datastore.undelete_recovery_point, rp_id)
            return await self._catalog.undelete_recovery_point(rp_id)

    async def purge_due(
        self, vault: str, *, trigger: Trigger = Trigger.MANUAL, wait: bool = True
    ) -> JobRecord | None:
        """A PurgeDeleted job of the vault's soft-deleted points whose time has come; None (and
        no job) when none is due."""
        if not await self._catalog.deleted_due(vault, self._clock.now()):
            return None

        async def body(job: JobRecord) -> None:
            purged: list[str] = []
            job.details["purged_recovery_points"] = purged
            datastore = await self._datastores.get(vault)
            for record in await self._catalog.deleted_due(vault, self._clock.now()):
                await finishing(self._purge_one(vault, datastore, record, purged))

        return await self._jobs.run(
            Operation.PURGE_DELETED, vault, "", body, trigger=trigger, cancellable=True, wait=wait
        )

    async def _purge_one(
        self,
        vault: str,
        datastore: Datastore,
        record: DeletedRecoveryPointRecord,
        purged: list[str],
    ) -> None:
        async with self._lock(vault):
            # The datastore first: a failure between the two leaves a row whose point is gone,
            # which the next purge forgets (both steps are idempotent).
            await self._jobs.in_pool(datastore.purge_deleted_recovery_point, record.id)
            await self._catalog.purge_deleted_recovery_point(record.id)
        purged.append(record.id)
        log.info(
            "vault %s: purged recovery point %s of %s, deleted %s",
            vault,
            record.id,
            record.point.vm_id,
            _when(record.deleted_at).isoformat(),
        )


__all__ = ["DAY", "MAX_SOFT_DELETE_DAYS", "Deleted", "SoftDelete"]
