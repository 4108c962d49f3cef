"""Integrity: which chunks are bad, which recovery points that damages, and how they heal.

The datastore is content-addressed, so one damaged chunk file damages every recovery point
that references it, and a backup that deduplicates against it makes the next one damaged too.
This module keeps the record of it, the same from every place damage is found:

- **Bad chunks** (`ChunkHealth` in memory, the catalog's `bad_chunks` table): a chunk read
  and found missing or corrupt, by a verify (`controller.verification`), by the controller's
  read of a chunk a restore downloads, by the controller re-reading a chunk an agent reported
  bad (an agent's word alone marks nothing: a lying agent could otherwise make a vault
  re-upload, or show damaged, what other VMs stored), or by an incremental backup's check that
  its base's chunks exist. A bad chunk is never answered "already stored" to a backup, and an
  index naming it is not committed (controller.jobs.transaction).
- **Damaged recovery points** (the `verifications` and `damaged_chunks` tables): which chunks
  each needs are bad, and where on which disk. What a verify reads it records itself; a chunk
  found bad elsewhere damages the recovery point being read at once, and the others of the
  vault that reference it once their indexes have been read (`spread`, indexes only).
- **Healing**: a backup that has a bad chunk's content stores it again
  (`Datastore.put_chunk(replace=True)`): it is good from then on (`repaired`). Recovery points
  whose every damaged chunk is good again become `healed`, which means "repaired, verify
  pending": nothing has read them whole yet. The backup's end starts a Verify job of the
  vault's healed points (controller.verification), which marks them `verified` again.

Races are settled by the health's generation: a mark from a read older than a repair of the
same chunk is dropped (controller.datastore.health).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from typing import TypeVar

from controller.catalog import Catalog, DamageRecord
from controller.datastore import Datastore
from controller.datastore.health import ChunkHealth
from controller.datastore.verify import MISSING, DamagedChunk, VerifyReport, find_damage
from controller.datastores import Datastores
from shared.clock import Clock
from shared.errors import ChunkMissing, CorruptData

log = logging.getLogger(__name__)

T = TypeVar("T")


def damage_records(damage: Iterable[DamagedChunk]) -> list[DamageRecord]:
    return [DamageRecord(d.disk, d.chunk, d.digest, d.reason) for d in damage]


class Integrity:
    """The bad chunks of every vault, and the recovery points they damage."""

    def __init__(
        self, catalog: Catalog, datastores: Datastores, clock: Clock, pool: Executor
    ) -> None:
        self._catalog = catalog
        self._datastores = datastores
        self._clock = clock
        self._pool = pool

    def _in_pool(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def health(self, vault: str) -> ChunkHealth:
        return await self._datastores.health(vault)

    # --- found bad ---------------------------------------------------------------------------

    async def found_bad(
        self,
        vault: str,
        found: Mapping[bytes, str],
        *,
        since: int,
        by: str,
        damage: Mapping[str, Sequence[DamagedChunk]] | None = None,
    ) -> set[bytes]:
        """Chunks read at health generation `since` and found missing or corrupt (digest →
        why): marked bad, unless stored again since, and the recovery points in `damage`
        recorded damaged by them. `by` names the job that found them. The chunks marked."""
        if not found:
            return set()
        health = await self.health(vault)
        marked = health.mark(found, since)
        if not marked:
            return marked
        now = self._clock.now()
        await self._catalog.add_bad_chunks(vault, {d: found[d] for d in marked}, now, by)
        log.warning(
            "vault %s: %d chunks found missing or corrupt by job %s (e.g. %s: %s)",
            vault, len(marked), by, next(iter(marked)).hex(), found[next(iter(marked))],
        )  # fmt: skip
        if damage:
            await self._catalog.record_damage(
                {
                    rp_id: damage_records(d for d in chunks if d.digest in marked)
                    for rp_id, chunks in damage.items()
                },
                now,
                by,
            )
        return marked

    async def confirm(
        self, vault: str, digests: Iterable[bytes], datastore: Datastore | None = None
    ) -> tuple[dict[bytes, str], int]:
        """The controller's own read of chunks someone else reported bad (an agent): those it
        finds missing or corrupt, and the generation they were read at (for `found_bad`).
        Read from `datastore` (a restore's: in a vault being upgraded, its point's format), by
        default the vault's."""
        if datastore is None:
            datastore = await self._datastores.get(vault)
        since = (await self.health(vault)).generation
        return await self._in_pool(_unreadable, datastore, list(dict.fromkeys(digests))), since

    async def spread(
        self, vault: str, bad: Mapping[bytes, str], *, by: str, exclude: Iterable[str] = ()
    ) -> dict[str, list[DamagedChunk]]:
        """Record damaged every other recovery point of the vault that references `bad`
        (their indexes are read, in the pool); what was found."""
        if not bad:
            return {}
        skip = set(exclude)
        points = [rp.id for rp in await self._catalog.recovery_points(vault=vault)]
        await self._datastores.get(vault)
        found: dict[str, list[DamagedChunk]] = {}
        # In a vault being upgraded, each point from the format it is in.
        for datastore, ids in self._datastores.partition(
            vault, [rp_id for rp_id in points if rp_id not in skip]
        ):
            found |= await self._in_pool(find_damage, datastore, ids, dict(bad))
        if found:
            await self._catalog.record_damage(
                {rp_id: damage_records(chunks) for rp_id, chunks in found.items()},
                self._clock.now(),
                by,
            )
        return found

    async def unreadable(self, vault: str, rp_id: str, detail: str, *, by: str) -> None:
        """Recovery point `rp_id` cannot be read for a reason that is not a chunk's (an index
        that does not decode, a manifest gone): damaged from now, with `detail`."""
        log.warning("vault %s: recovery point %s is damaged (job %s): %s", vault, rp_id, by, detail)
        await self._catalog.record_point_damaged(rp_id, detail, self._clock.now(), by)

    async def check_manifests(self) -> list[str]:
        """Mark damaged every recovery point the catalog lists whose manifest is gone from its
        datastore (deleted or lost by hand): listed as it was, it would be offered for restore
        and as a backup's base. One listing of each vault's manifests; the ids marked."""
        marked: list[str] = []
        for vault in await self._catalog.vaults():
            datastore = await self._datastores.get(vault.name)
            present = set(
                await self._in_pool(lambda d=datastore: list(d.list_recovery_point_ids()))
            )
            legacy = self._datastores.legacy(vault.name)
            if legacy is not None:  # an upgrade under way: the rest is still in format 1
                present |= legacy.pending
            for rp in await self._catalog.recovery_points(vault=vault.name):
                if rp.id not in present:
                    await self.unreadable(
                        vault.name, rp.id, "its manifest is gone from the datastore", by=""
                    )
                    marked.append(rp.id)
        return marked

    # --- found good ----------------------------------------------------------------------------

    async def repaired(self, vault: str, digests: Iterable[bytes], *, by: str) -> list[str]:
        """Bad chunks stored again by job `by` (or read whole by a verify): good from now on.
        The recovery points this healed (no damaged chunk left; a verify pending)."""
        health = await self.health(vault)
        was = health.repaired(digests)
        if not was:
            return []
        await self._catalog.remove_bad_chunks(vault, list(was))
        healed = await self._catalog.repair_damage(vault, list(was), self._clock.now(), by)
        log.info(
            "vault %s: job %s stored %d bad chunks again; %d recovery points healed",
            vault, by, len(was), len(healed),
        )  # fmt: skip
        return healed

    # --- a verify's findings -------------------------------------------------------------------

    async def record_verify(self, vault: str, report: VerifyReport, job_id: str) -> None:
        """What a verify found: chunks it read whole are good again, the points it read are
        verified or damaged, the bad chunks it found are marked and damage the vault's other
        points that reference them."""
        if report.whole_again:
            await self.repaired(vault, report.whole_again, by=job_id)
        await self._catalog.record_verified(
            [(o.rp_id, damage_records(o.damage), o.detail) for o in report.outcomes],
            self._clock.now(),
            job_id,
        )
        marked = await self.found_bad(vault, report.bad, since=report.generation, by=job_id)
        if marked:
            await self.spread(
                vault,
                {d: report.bad[d] for d in marked},
                by=job_id,
                exclude={o.rp_id for o in report.outcomes} | set(report.skipped),
            )


def _unreadable(datastore: Datastore, digests: list[bytes]) -> dict[bytes, str]:
    bad: dict[bytes, str] = {}
    for digest in digests:
        try:
            datastore.read_chunk(digest)
        except ChunkMissing:
            bad[digest] = MISSING
        except CorruptData as error:
            bad[digest] = str(error.fields.get("detail") or error.message)
    return bad
