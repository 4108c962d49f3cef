"""Vault upgrades: a vault's datastore converted to the current format, as a job that resumes.

`coffer vault upgrade V` starts a `VaultUpgrade` job that converts the vault's format-1
datastore to format 2 in place (controller/datastore/upgrade.py has the layout, the steps and
why each is safe to cut short). This module runs those steps as a job, beside everything else
the vault does, and keeps where it stands in the catalog (`vault_upgrades`, with the old-to-new
chunk names found so far in `upgrade_chunks`):

- Switch: the vault's format-1 datastore becomes the format-1 part of a datastore being
  upgraded, and the vault's datastore is its format-2 one from then on (controller.datastores):
  new backups go there, and a recovery point is read from whichever format holds it. Jobs that
  held the format-1 datastore before keep working (its `LegacyLayout` follows the switch), but
  a prune that started before could delete a point only from format 1 after it is converted,
  so conversion waits for such prunes (and for stop-protection jobs, which delete the same
  way); and a backup that started before commits into format 1, so the upgrade looks there once
  more after such backups have ended.
- Convert, newest recovery point first, each read by the job (not pruned meanwhile), its
  chunks held in the vault's `ChunkGuard` until its format-2 manifest is stored. What the
  catalog says of each point stays: consistency and retention labels (its row does not change)
  and verification state; damaged chunks recorded under old names get the new ones, a chunk
  the conversion cannot read is marked bad under its new name (its points damaged at it, as
  they were), and a chunk known bad that converts whole heals its points (a verify pending).
- Finish: the format-1 part goes, `datastore.json` says format 2, the catalog forgets the
  upgrade, and a GarbageCollection job follows to reclaim the format-1 chunks nothing
  references any more (`after_upgrade`).

It stops between chunks when cancelled (`coffer job cancel`), and when the controller stops; a
stop, even a crash, loses at most the chunks being converted. An upgrade the controller's stop
interrupted runs again when it starts (`resume`); one cancelled or failed waits for `coffer
vault upgrade` to be run again. In between, the vault works half converted.

`--dry-run` counts what would be rewritten (recovery points, disk indexes, chunks and their
stored bytes: one read per index and one stat per chunk) and times the conversion on a sample
to say roughly how long it would take. It changes nothing.

A test can stop an upgrade at a known point (`COFFER_TEST_UPGRADE_PAUSE`, `UpgradePause`) and
kill the controller there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from functools import partial

from controller.catalog import Catalog, JobRecord, UpgradeRecord
from controller.datastore import Datastore, ObjectStore
from controller.datastore.legacy import LegacyLayout
from controller.datastore.store import CONFIG_FORMAT, ENCRYPTED_FORMAT, PLAIN_FORMAT
from controller.datastore.upgrade import (
    PointConversion,
    PointConverter,
    ShouldStop,
    UpgradePlan,
    clean_moved,
    finish,
    lost_digest,
    measure_rate,
    pending_points,
    plan,
    switch,
)
from controller.datastore.verify import DamagedChunk
from controller.datastores import Datastores, LegacyArea
from controller.integrity import Integrity
from controller.jobs import JobManager, RunningBackup
from controller.jobs.cancel import Stopped, finishing
from shared.clock import Clock
from shared.errors import CofferError, Conflict, KeyUnavailable
from shared.model import Operation, Trigger

log = logging.getLogger(__name__)

SWITCH = "switch"
CONVERT = "convert"
PAUSE_ENV = "COFFER_TEST_UPGRADE_PAUSE"
# Jobs that delete recovery points through the datastore they hold: conversion waits for those
# that started before the switch (module note).
_DELETERS = {Operation.PRUNE, Operation.STOP_PROTECTION, Operation.DELETE_BACKUP_DATA}


class UpgradePause:
    """A stop at a known point of an upgrade, for tests that kill the controller there.

    From `COFFER_TEST_UPGRADE_PAUSE`: `switch` (before the switch), `switched` (the format-1
    objects moved aside and `datastore.json` rewritten, their old keys not yet cleaned),
    `objects:N` (after the N-th object the conversion writes in this run), `finishing` (every
    point converted, the format-1 part still there), `finished` (the datastore is plain format
    2, the catalog not yet told). There the upgrade logs "vault upgrade paused at ..." and waits
    until it is stopped; the controller goes on serving everything else meanwhile.
    """

    def __init__(self, spec: str = "") -> None:
        self.point = spec
        self.objects = 0
        self._after = 0
        if spec.startswith("objects:"):
            self.point, self._after = "objects", int(spec.removeprefix("objects:"))

    @classmethod
    def from_env(cls) -> UpgradePause:
        return cls(os.environ.get(PAUSE_ENV, ""))

    async def at(self, point: str, vault: str) -> None:
        if point == self.point:
            log.warning("vault upgrade paused at %s (%s), vault %s", point, PAUSE_ENV, vault)
            await asyncio.Event().wait()  # until the job is cancelled, or the controller stops

    def object_written(self, vault: str, should_stop: ShouldStop) -> None:
        """From the converting thread: after each object written."""
        self.objects += 1
        if self.point != "objects" or self.objects < self._after:
            return
        if self.objects == self._after:
            log.warning(
                "vault upgrade paused at objects:%d (%s), vault %s", self._after, PAUSE_ENV, vault
            )
        while not should_stop():
            time.sleep(0.05)


@dataclass
class _Counts:
    points: int = 0
    points_done: int = 0
    chunks: int = 0
    chunks_done: int = 0
    chunks_written: int = 0
    chunks_present: int = 0
    chunks_unreadable: int = 0
    objects_written: int = 0
    bytes: int = 0
    """Stored bytes of the chunks to convert (their sizes asked of the store when planning)."""
    bytes_read: int = 0
    bytes_written: int = 0


class VaultUpgrades:
    """Starts, runs and resumes VaultUpgrade jobs."""

    def __init__(
        self,
        catalog: Catalog,
        datastores: Datastores,
        jobs: JobManager,
        integrity: Integrity,
        clock: Clock,
        *,
        pause: UpgradePause | None = None,
    ) -> None:
        self._catalog = catalog
        self._datastores = datastores
        self._jobs = jobs
        self._integrity = integrity
        self._clock = clock
        self._pause = pause or UpgradePause.from_env()
        # Jobs running when a vault was switched, which hold its format-1 datastore.
        self._before_switch: dict[str, list[JobRecord]] = {}
        # Called with the vault's name once an upgrade has finished (a garbage collection).
        self.after_upgrade: list[Callable[[str], Awaitable[None]]] = []

    # --- starting ------------------------------------------------------------------------------

    async def start(
        self,
        vault: str,
        *,
        dry_run: bool = False,
        trigger: Trigger = Trigger.MANUAL,
        resumed_from: str = "",
    ) -> JobRecord:
        """A VaultUpgrade job of `vault` (returned as it starts); with `dry_run`, one that only
        says what the upgrade would do. Conflict for a vault in the current format already, or
        with an upgrade running."""
        await self._catalog.vault(vault)
        datastore = await self._datastores.get(vault)
        upgrading = self._datastores.legacy(vault) is not None or (
            await self._catalog.upgrade(vault) is not None
        )
        if datastore.config.format >= CONFIG_FORMAT and not upgrading:
            raise Conflict(
                detail=f"vault {vault!r} is in datastore format {datastore.config.format}, the "
                "current one: there is nothing to upgrade"
            )
        deleted, _ = await self._catalog.deleted_totals(vault)
        if deleted and not upgrading:
            # A tombstone keeps a format-1 manifest whose chunks the upgrade would rename and
            # the garbage collection after it reclaim: the deleted data would not come back.
            raise Conflict(
                detail=f"vault {vault!r} holds {deleted} soft-deleted recovery points, which an "
                "upgrade cannot keep recoverable: undelete them (`coffer undelete`) or let them "
                f"be purged (`coffer rp list --deleted --vault {vault}` says when) first"
            )
        if not dry_run and self._datastores.master is None:
            raise KeyUnavailable(
                what=f"vault {vault!r}",
                detail="the controller has no master key to make the upgraded vault's keys",
            )
        # No await between this check and the new job's admission: two calls cannot both pass.
        for job in self._jobs.running_jobs():
            if job.operation is Operation.VAULT_UPGRADE and job.vault == vault:
                raise Conflict(detail=f"vault {vault!r} is being upgraded by job {job.id}")
        details: dict[str, object] = {
            "from_format": PLAIN_FORMAT,
            "to_format": ENCRYPTED_FORMAT,
        }
        if dry_run:
            details["dry_run"] = True
        if resumed_from:
            details["resumed_from"] = resumed_from

        async def body(job: JobRecord) -> None:
            if dry_run:
                await self._dry_run(job)
            else:
                await self._run(job)

        return await self._jobs.run(
            Operation.VAULT_UPGRADE, vault, "", body, wait=False, details=details,
            trigger=trigger, cancellable=True,
        )  # fmt: skip

    async def resume(self) -> list[JobRecord]:
        """At the controller's start: run again the upgrades its last stop interrupted, and
        take up any datastore found mid-upgrade that the catalog does not know of."""
        started = []
        recorded = {u.vault: u for u in await self._catalog.upgrades()}
        for record in await self._catalog.vaults():
            await self._datastores.get(record.name)
            upgrade = recorded.get(record.name)
            if upgrade is None and self._datastores.legacy(record.name) is None:
                continue
            if upgrade is not None and not upgrade.resume:
                log.warning(
                    "vault %s: its upgrade was stopped (job %s); `coffer vault upgrade %s` "
                    "takes it up again",
                    record.name, upgrade.job_id, record.name,
                )  # fmt: skip
                continue
            try:
                job = await self.start(
                    record.name,
                    trigger=Trigger.SCHEDULED,
                    resumed_from=upgrade.job_id if upgrade is not None else "",
                )
            except CofferError as error:
                log.warning("vault %s: its upgrade could not be resumed: %s", record.name, error)
                continue
            log.info("vault %s: upgrade resumed as job %s", record.name, job.id)
            started.append(job)
        return started

    # --- the job -------------------------------------------------------------------------------

    async def _run(self, job: JobRecord) -> None:
        vault = job.vault
        upgrade = await self._catalog.upgrade(vault) or UpgradeRecord(
            vault, PLAIN_FORMAT, ENCRYPTED_FORMAT, SWITCH, True, job.id, self._clock.now()
        )
        upgrade = replace(upgrade, resume=True, job_id=job.id)
        await self._catalog.save_upgrade(upgrade)
        try:
            await self._upgrade(job, upgrade)
        except asyncio.CancelledError:
            running = self._jobs.running(job.id)
            if running is not None and running.cancel_requested:
                await self._stopped(vault)
            raise  # else the controller stops: the next start resumes it
        except CofferError:
            await self._stopped(vault)
            raise
        finally:
            self._jobs.done_reading(job.id)
            self._datastores.guard(vault).release(job.id)

    async def _stopped(self, vault: str) -> None:
        """Cancelled or failed: not resumed at the next start, only when asked again."""
        upgrade = await self._catalog.upgrade(vault)
        if upgrade is not None:
            await self._catalog.save_upgrade(replace(upgrade, resume=False))

    async def _upgrade(self, job: JobRecord, upgrade: UpgradeRecord) -> None:
        vault = job.vault
        started = time.monotonic()
        counts = _Counts()
        current = await self._datastores.get(vault)
        if not current.encrypted:
            await self._switch(job, vault, current)
            upgrade = replace(upgrade, phase=SWITCH)
        area = self._datastores.legacy(vault)
        if area is not None:
            new = await self._datastores.get(vault)
            if upgrade.phase == SWITCH:
                self._progress(job, "cleaning", counts)
                await self._jobs.abortable(partial(_clean, new))
                upgrade = replace(upgrade, phase=CONVERT)
                await self._catalog.save_upgrade(upgrade)
            await self._wait_for(job, vault, _DELETERS)
            unconvertible = await self._convert(job, area, new, counts)
            # Backups that started before the switch commit into format 1: once they have
            # ended, what they (or a crashed run) left there is converted too.
            await self._wait_for(job, vault, {Operation.BACKUP})
            more = await self._jobs.in_pool(pending_points, area.datastore, new)
            if more:
                area.pending.update(more)
                unconvertible = await self._convert(job, area, new, counts)
            self._before_switch.pop(vault, None)
            if unconvertible:
                await self._unfinished(job, unconvertible, counts, started)
                return
            await self._pause.at("finishing", vault)
            self._progress(job, "finishing", counts)
            await self._jobs.abortable(partial(_finish, new))
            await self._pause.at("finished", vault)
            self._datastores.end_upgrade(vault)
        await self._forget(job, vault)
        self._summary(job, counts, started)
        log.info(
            "vault %s: upgraded to datastore format %d by job %s", vault, CONFIG_FORMAT, job.id
        )
        for step in self.after_upgrade:
            await step(vault)

    # --- the switch ------------------------------------------------------------------------------

    async def _switch(self, job: JobRecord, vault: str, old: Datastore) -> None:
        """Step 1 (datastore/upgrade.py): the vault's datastore becomes one being upgraded."""
        master = self._datastores.master
        if master is None:
            raise KeyUnavailable(what=f"vault {vault!r}", detail="the controller has no master key")
        await self._pause.at("switch", vault)
        layout = old.storage
        assert isinstance(layout, LegacyLayout), "a format-1 datastore has a LegacyLayout"
        before = [other for other in self._jobs.running_jobs() if self._holds_old(other, vault)]
        self._progress(job, "switching", _Counts())

        def begin(storage: ObjectStore) -> Datastore:
            return Datastore.begin_upgrade(storage, old.config, master, vault, clock=self._clock)

        def switched() -> tuple[Datastore, list[str]]:
            new = switch(layout, begin)
            return new, pending_points(old, new)

        # A short step that happens whole, even when cancelled meanwhile (it holds the format-1
        # datastore's index and manifest writes while it copies them): once it has, the vault
        # is read and written as the storage now is, whatever ends the job.
        try:
            new, pending = await finishing(self._jobs.in_pool(switched))
        except Stopped as stopped:
            await self._switched(vault, *stopped.result)
            raise
        await self._switched(vault, new, pending)
        self._before_switch[vault] = before
        await self._pause.at("switched", vault)

    async def _switched(self, vault: str, new: Datastore, pending: list[str]) -> None:
        self._datastores.begin_upgrade(vault, new, pending)
        await self._catalog.set_vault_encrypted(vault)
        log.info(
            "vault %s: switched to datastore format %d; %d recovery points to convert",
            vault, ENCRYPTED_FORMAT, len(pending),
        )  # fmt: skip

    def _holds_old(self, other: JobRecord, vault: str) -> bool:
        """A job of `vault` running now that writes through its format-1 datastore: a backup
        that has started (a queued one starts with the format-2 one), or one that deletes."""
        if other.vault != vault:
            return False
        if other.operation is Operation.BACKUP:
            running = self._jobs.running(other.id)
            return isinstance(running, RunningBackup) and running.started
        return other.operation in _DELETERS

    async def _wait_for(self, job: JobRecord, vault: str, operations: set[Operation]) -> None:
        """Wait for the jobs of `operations` that were running when the vault was switched."""
        for other in self._before_switch.get(vault, []):
            if other.operation not in operations:
                continue
            running = self._jobs.running(other.id)
            if running is None:
                continue
            job.details["waiting_for"] = f"{other.operation} job {other.id}"
            self._touch(job)
            await running.ended.wait()
        job.details.pop("waiting_for", None)

    # --- converting --------------------------------------------------------------------------

    async def _convert(
        self, job: JobRecord, area: LegacyArea, new: Datastore, counts: _Counts
    ) -> list[tuple[str, str]]:
        """Convert every recovery point still in format 1, newest first; those that cannot be
        converted, and why."""
        vault = job.vault
        loop = asyncio.get_running_loop()
        known = await self._catalog.upgrade_chunk_names(vault)
        newest = [rp.id for rp in reversed(await self._catalog.recovery_points(vault=vault))]
        order = [rp_id for rp_id in newest if rp_id in area.pending]
        order += sorted(area.pending - set(order))  # not in the catalog: converted all the same
        self._progress(job, "planning", counts)
        work, _ = await self._jobs.abortable(
            partial(_plan, area.datastore, order, known, sizes=True)
        )  # fmt: skip
        counts.points += work.recovery_points
        counts.chunks += work.chunks
        counts.bytes += work.stored_bytes
        health = await self._datastores.health(vault)

        def record(entries: Mapping[bytes, tuple[bytes, str]]) -> None:  # converting thread
            asyncio.run_coroutine_threadsafe(
                self._catalog.add_upgrade_chunk_names(vault, dict(entries)), loop
            ).result()

        def progressed(chunks: int, read: int) -> None:
            loop.call_soon_threadsafe(self._chunk_done, job, counts, chunks, read)

        converter = PointConverter(
            area.datastore,
            new,
            guard=self._datastores.guard(vault),
            owner=job.id,
            known=known,
            is_bad=health.is_bad,
            record=record,
            on_object=partial(self._pause.object_written, vault),
            progress=progressed,
        )
        unconvertible: list[tuple[str, str]] = []
        self._progress(job, "converting", counts)
        for rp_id in order:
            if rp_id not in area.pending:
                continue  # deleted since
            self._jobs.reading(job.id, [rp_id])
            try:
                result = await self._jobs.abortable(partial(_convert_point, converter, rp_id))
            except Stopped as stopped:
                await self._converted(job, area, stopped.result, counts)
                raise
            finally:
                self._jobs.done_reading(job.id)
            await self._converted(job, area, result, counts)
            # Its manifest references them now (or it is gone): nothing to hold any more.
            self._datastores.guard(vault).release(job.id)
            if result.unconvertible:
                unconvertible.append((rp_id, result.unconvertible))
        return unconvertible

    async def _converted(
        self, job: JobRecord, area: LegacyArea, result: PointConversion, counts: _Counts
    ) -> None:
        """Record what converting one recovery point did (also when it was stopped)."""
        vault = job.vault
        counts.chunks_written += result.chunks_written
        counts.chunks_present += result.chunks_present
        counts.chunks_unreadable += len(result.lost)
        counts.objects_written += result.objects_written
        counts.bytes_written += result.bytes_written
        job.bytes_read = counts.bytes_read
        job.bytes_stored = counts.bytes_written
        await self._catalog.add_stored_bytes(vault, result.bytes_written)
        if result.gone:
            area.pending.discard(result.rp_id)
        if not result.committed:
            self._touch(job)
            return
        area.pending.discard(result.rp_id)  # read from format 2 from now on
        counts.points_done += 1
        await self._catalog.rename_damaged_chunks(vault, [result.rp_id])
        health = await self._datastores.health(vault)
        if result.lost:
            await self._integrity.found_bad(
                vault,
                {lost_digest(old): why for old, why in result.lost.items()},
                since=health.generation,
                by=job.id,
                damage={
                    result.rp_id: [
                        DamagedChunk(disk, position, lost_digest(old), result.lost[old])
                        for old, (disk, position) in result.lost_at.items()
                    ]
                },
            )
        # Chunks known bad under their old names that converted whole: good again.
        whole = [
            new
            for old, new in result.renamed.items()
            if old not in result.lost and health.is_bad(old)
        ]
        if whole:
            await self._catalog.repair_damage(vault, whole, self._clock.now(), job.id)
        self._progress(job, "converting", counts)

    # --- finishing ---------------------------------------------------------------------------

    async def _forget(self, job: JobRecord, vault: str) -> None:
        """The catalog's part of finishing, safe to repeat: every damaged chunk under its new
        name, the unreadable ones marked bad, the upgrade's records gone."""
        await self._catalog.rename_damaged_chunks(vault)
        lost = {
            lost_digest(old): why
            for old, (_, why) in (await self._catalog.upgrade_chunk_names(vault)).items()
            if why
        }
        if lost:
            health = await self._datastores.health(vault)
            marked = await self._integrity.found_bad(
                vault, lost, since=health.generation, by=job.id
            )
            await self._integrity.spread(vault, {d: lost[d] for d in marked}, by=job.id)
        old_bad = await self._catalog.end_upgrade(vault)
        if old_bad:
            (await self._datastores.health(vault)).repaired(old_bad)

    async def _unfinished(
        self,
        job: JobRecord,
        unconvertible: list[tuple[str, str]],
        counts: _Counts,
        started: float,
    ) -> None:
        """Recovery points that cannot be converted keep the upgrade open: it ends with warnings
        naming them, and waits to be run again."""
        await self._stopped(job.vault)
        job.details["warnings"] = [
            f"recovery point {rp_id} cannot be converted ({why}); it stays readable as far as it "
            "is in the old format, and the upgrade stays open until it is deleted"
            for rp_id, why in unconvertible
        ]
        self._summary(job, counts, started)

    # --- dry run -------------------------------------------------------------------------------

    async def _dry_run(self, job: JobRecord) -> None:
        vault = job.vault
        current = await self._datastores.get(vault)
        area = self._datastores.legacy(vault)
        source = area.datastore if area is not None else current
        if area is not None:
            points = sorted(area.pending)
        else:
            points = await self._jobs.in_pool(_listed, source)
        known = await self._catalog.upgrade_chunk_names(vault)
        self._progress(job, "planning", _Counts())
        work, chunks = await self._jobs.abortable(partial(_plan, source, points, known, sizes=True))
        self._progress(job, "measuring", _Counts())
        rate = await self._jobs.in_pool(measure_rate, source, source.storage, chunks)
        job.details.pop("progress", None)
        job.details["plan"] = _plan_details(work, rate.bytes_per_second, rate.objects_per_second,
                                            rate.estimate(work), rate.chunks)  # fmt: skip
        if work.unreadable:
            job.details["warnings"] = [
                f"recovery point {rp_id} cannot be converted (its manifest or an index cannot "
                "be read)"
                for rp_id in work.unreadable
            ]

    # --- progress ------------------------------------------------------------------------------

    def _progress(self, job: JobRecord, phase: str, counts: _Counts) -> None:
        job.details["progress"] = {"phase": phase} | asdict(counts)
        self._touch(job)

    def _chunk_done(self, job: JobRecord, counts: _Counts, chunks: int, read: int) -> None:
        counts.chunks_done += chunks
        counts.bytes_read += read
        job.bytes_read = counts.bytes_read
        if counts.chunks_done % 64 == 0:
            self._progress(job, "converting", counts)

    def _touch(self, job: JobRecord) -> None:
        running = self._jobs.running(job.id)
        if running is not None:
            running.touch()

    def _summary(self, job: JobRecord, counts: _Counts, started: float) -> None:
        seconds = time.monotonic() - started
        job.details.pop("progress", None)
        job.details["upgrade"] = {
            "recovery_points_converted": counts.points_done,
            "chunks_converted": counts.chunks_written,
            "chunks_already_converted": counts.chunks_present,
            "chunks_unreadable": counts.chunks_unreadable,
            "objects_written": counts.objects_written,
            "bytes_read": counts.bytes_read,
            "bytes_written": counts.bytes_written,
            "seconds": round(seconds, 3),
            "rate_mb_per_second": round(counts.bytes_read / seconds / 1e6, 1) if seconds else 0,
            "objects_per_second": round(counts.objects_written / seconds, 1) if seconds else 0,
        }


# --- blocking steps, run in the pool ----------------------------------------------------------


def _clean(new: Datastore, should_stop: ShouldStop) -> int:
    return clean_moved(new, should_stop)


def _finish(new: Datastore, should_stop: ShouldStop) -> int:
    return finish(new, should_stop)


def _convert_point(
    converter: PointConverter, rp_id: str, should_stop: ShouldStop
) -> PointConversion:
    return converter.convert(rp_id, should_stop)


def _plan(
    source: Datastore,
    points: Iterable[str],
    known: dict[bytes, tuple[bytes, str]],
    should_stop: ShouldStop,
    *,
    sizes: bool = False,
) -> tuple[UpgradePlan, list[bytes]]:
    return plan(source, points, known, sizes=sizes, should_stop=should_stop)


def _listed(datastore: Datastore) -> list[str]:
    return sorted(datastore.list_recovery_point_ids())


def _plan_details(
    work: UpgradePlan,
    bytes_per_second: float,
    objects_per_second: float,
    seconds: float,
    sampled: int,
) -> dict[str, object]:
    return {
        "recovery_points": work.recovery_points,
        "disk_indexes": work.indexes,
        "chunks": work.chunks,
        "stored_bytes": work.stored_bytes,
        "objects": work.objects,
        "sampled_chunks": sampled,
        "rate_mb_per_second": round(bytes_per_second / 1e6, 1),
        "objects_per_second": round(objects_per_second, 1),
        "estimated_seconds": round(seconds, 1),
    }


__all__ = ["PAUSE_ENV", "UpgradePause", "VaultUpgrades"]
