"""Verify jobs: recovery points read back and recorded whole or damaged, on demand or on schedule.

`coffer verify --vault V [--vm VM] [--rp RP]` starts a `Verify` job over the vault's recovery
points (of one VM, or one point). It reads every distinct chunk they reference once, checks
that it decompresses and hashes to its name (controller.datastore.verify), and records per
recovery point `verified` (at when, by which job) or `damaged` (which chunks are missing or
corrupt; controller.integrity marks those bad, so the next backup that has their content
stores them again, and the vault's other points that reference them damaged too). A job that
found damage fails with `RecoveryPointsDamaged` (exit 7) and says how much; one that found none
completes. Progress is in the job's details while it runs; it can be cancelled (`coffer job
cancel`) and stops when the controller does, between two chunks: what it finished is recorded,
the rest waits for the next verify.

Scheduled by vault settings (`coffer vault update V --verify-new on --reverify-days N`), as
Proxmox Backup Server's verify jobs are:

- verify new: after each backup that committed a recovery point, a Verify job of that point;
- re-verify: on the vault's daily maintenance slot (once its prune is done, beside its garbage
  collection), a Verify job of the points never verified, healed, or last verified more than N
  days ago;
- healing, always: after a backup, when the vault has healed points (their damaged chunks were
  stored again: by this backup or another), a Verify job of those, which marks them verified
  again. Until then they read `healed` (verify pending), never `verified`.

Both settings are off for a new vault: a verify reads back every chunk of what it checks, which
costs as much I/O as a restore, and when to pay it is the operator's choice.

`coffer verify --vault V --from-copy` reads the vault's off-site copy instead (controller.copies):
the points complete in the copy, each chunk checked the same way. What it finds is in the job
(its details, and `RecoveryPointsDamaged` if anything is damaged), not in the points' recorded
integrity, which is that of the vault's own datastore. The chunks it finds missing or corrupt
in the copy are recorded for the copy: the next Copy job sends them again from the datastore.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import asdict
from functools import partial

from controller.catalog import Catalog, JobRecord
from controller.datastore import Datastore
from controller.datastore.copy import VaultCopy
from controller.datastore.health import ChunkHealth
from controller.datastore.verify import VerifyProgress, VerifyReport, verify_recovery_points
from controller.datastores import Datastores
from controller.integrity import Integrity
from controller.jobs import JobManager
from controller.jobs.cancel import ShouldStop, Stopped
from shared.clock import Clock
from shared.errors import CofferError, NotFound, RecoveryPointsDamaged
from shared.model import Operation, Trigger

log = logging.getLogger(__name__)

DAY = 86400.0
DAMAGED_SHOWN = 20
"""Damaged recovery points named in a job's details and error (the rest are counted)."""


class Verifier:
    """Starts Verify jobs, by hand and by the vaults' verify settings."""

    def __init__(
        self,
        catalog: Catalog,
        datastores: Datastores,
        jobs: JobManager,
        integrity: Integrity,
        clock: Clock,
    ) -> None:
        self._catalog = catalog
        self._datastores = datastores
        self._jobs = jobs
        self._integrity = integrity
        self._clock = clock

    async def verify(
        self,
        vault: str,
        *,
        vm_id: str = "",
        rp_id: str = "",
        points: list[str] | None = None,
        trigger: Trigger = Trigger.MANUAL,
        after_job: str = "",
        wait: bool = False,
        copy: VaultCopy | None = None,
    ) -> JobRecord:
        """A Verify job of the vault's recovery points: `points` if given, else those of
        `vm_id` (every VM when empty), or the one `rp_id`; in the vault's `copy` (opened), of
        those complete there, if given."""
        await self._catalog.vault(vault)
        if points is None:
            points = await self._choose(vault, vm_id, rp_id)
        if copy is not None:
            copied = await self._catalog.copied_points(vault, copy.target)
            points = [rp_id for rp_id in points if rp_id in copied]
        chosen = list(points)
        details: dict[str, object] = {"recovery_points": len(chosen)}
        if after_job:
            details["after_job"] = after_job
        if copy is not None:
            details["from_copy"] = copy.target

        async def body(job: JobRecord) -> None:
            if rp_id:
                job.recovery_point_id = rp_id
            await self._run(job, chosen, copy)

        return await self._jobs.run(
            Operation.VERIFY, vault, vm_id, body, wait=wait, details=details, trigger=trigger,
            cancellable=True,
        )  # fmt: skip

    async def _choose(self, vault: str, vm_id: str, rp_id: str) -> list[str]:
        if rp_id:
            rp = await self._catalog.recovery_point(rp_id)
            if rp.vault != vault or (vm_id and rp.vm_id != vm_id):
                where = f"vault {vault!r}" + (f", VM {vm_id!r}" if vm_id else "")
                raise NotFound(kind=f"recovery point of {where}", name=rp_id)
            return [rp.id]
        return [rp.id for rp in await self._catalog.recovery_points(vm_id=vm_id, vault=vault)]

    async def _run(self, job: JobRecord, points: list[str], copy: VaultCopy | None) -> None:
        if copy is not None:  # the copy's own chunks: nothing known of them beforehand
            datastore, health = copy.datastore, ChunkHealth()
            route: Callable[[str], Datastore] = lambda rp_id: datastore  # noqa: E731
        else:
            datastore = await self._datastores.get(job.vault)
            health = await self._datastores.health(job.vault)
            # In a vault being upgraded, each point is read from the format it is in.
            route = self._datastores.router(job.vault)
        loop = asyncio.get_running_loop()

        def progress(now: VerifyProgress) -> None:  # from the verify's thread
            loop.call_soon_threadsafe(self._progressed, job, now)

        try:
            report = await self._jobs.abortable(
                partial(self._verify, datastore, points, health, progress, route)
            )
        except Stopped as stopped:  # cancelled: what it finished is recorded all the same
            await self._record(job, stopped.result, copy)
            raise
        await self._record(job, report, copy)
        damaged = [o for o in report.outcomes if not o.whole]
        if damaged:
            raise RecoveryPointsDamaged(
                job_id=job.id,
                damaged=len(damaged),
                checked=len(report.outcomes),
                points=_named([o.rp_id for o in damaged]),
                chunks=_chunks(len(report.bad)),
            )

    @staticmethod
    def _verify(
        datastore: Datastore,
        points: list[str],
        health: ChunkHealth,
        progress: Callable[[VerifyProgress], None],
        route: Callable[[str], Datastore],
        should_stop: ShouldStop,
    ) -> VerifyReport:
        return verify_recovery_points(
            datastore,
            points,
            health=health,
            should_stop=should_stop,
            progress=progress,
            datastore_of=route,
        )

    def _progressed(self, job: JobRecord, now: VerifyProgress) -> None:
        job.details["progress"] = asdict(now)
        running = self._jobs.running(job.id)
        if running is not None:
            running.touch()

    async def _record(self, job: JobRecord, report: VerifyReport, copy: VaultCopy | None) -> None:
        if copy is None:
            await self._integrity.record_verify(job.vault, report, job.id)
        elif report.bad:  # the copy's: for the next copy to send again (module note)
            await self._catalog.add_copy_bad_chunks(
                job.vault, copy.target, list(report.bad), self._clock.now()
            )
        damaged = {o.rp_id: o for o in report.outcomes if not o.whole}
        job.bytes_read = report.bytes_read
        job.details.pop("progress", None)
        job.details["verification"] = {
            "recovery_points_verified": len(report.outcomes) - len(damaged),
            "recovery_points_damaged": len(damaged),
            "recovery_points_deleted_meanwhile": len(report.skipped),
            "chunks_checked": report.chunks_checked,
            "chunks_missing_or_corrupt": len(report.bad),
            "seconds": round(report.seconds, 3),
        }
        if damaged:
            job.details["damaged"] = {
                rp_id: _damage_text(outcome.detail, len(outcome.damage))
                for rp_id, outcome in list(damaged.items())[:DAMAGED_SHOWN]
            }
        log.info(
            "vault %s: verify %s %d recovery points (%d damaged), %d chunks in %.1f s",
            job.vault, "stopped after" if report.stopped else "checked", len(report.outcomes),
            len(damaged), report.chunks_checked, report.seconds,
        )  # fmt: skip

    # --- by schedule ---------------------------------------------------------------------------

    async def after_backup(self, job: JobRecord) -> None:
        """A backup ended: verify its new point (if the vault says so) and the healed ones."""
        try:
            vault = await self._catalog.vault(job.vault)
        except NotFound:
            return
        points: list[str] = []
        if vault.verify_new and job.status.succeeded and job.recovery_point_id:
            points.append(job.recovery_point_id)
        points += await self._catalog.healed_points(vault.name)
        if not points:
            return
        try:
            await self.verify(
                vault.name,
                points=list(dict.fromkeys(points)),
                trigger=Trigger.SCHEDULED,
                after_job=job.id,
            )
        except CofferError as exc:  # e.g. the controller is stopping
            log.warning("verify after backup %s did not start: %s", job.id, exc)

    async def reverify(self, vault: str) -> None:
        """The daily maintenance: verify what the vault's `reverify_days` says is due."""
        record = await self._catalog.vault(vault)
        if record.reverify_days <= 0:
            return
        due = await self._catalog.points_to_verify(
            vault, self._clock.now() - record.reverify_days * DAY
        )
        if due:
            await self.verify(vault, points=due, trigger=Trigger.SCHEDULED)


def _named(rp_ids: list[str]) -> str:
    shown = ", ".join(rp_ids[:DAMAGED_SHOWN])
    return shown + (
        f" and {len(rp_ids) - DAMAGED_SHOWN} more" if len(rp_ids) > DAMAGED_SHOWN else ""
    )


def _chunks(count: int) -> str:
    return f"{count} chunk" if count == 1 else f"{count} chunks"


def _damage_text(detail: str, chunks: int) -> str:
    parts = [f"{_chunks(chunks)} missing or corrupt"] if chunks else []
    return "; ".join([*parts, *([detail] if detail else [])])
