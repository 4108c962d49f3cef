"""Jobs the last stop interrupted: recorded when the job manager starts, before anything runs.

A controller that stops (or crashes) leaves jobs `InProgress` in the catalog: those it was
running, and queued backups. At the next start:

- a backup whose manifest reached the datastore (found by its `pending_recovery_point_id`)
  committed and only lacked its catalog row: the recovery point is complete, so its row is
  written and the job is `Completed`;
- every other job is `Failed` with `ControllerRestarted`, and a backup's uploads are counted in
  its vault's stored bytes (they are in the datastore until collected); a file recovery's
  message says its agent closed what it had open (the session ended with the stop, and a
  mount ends with its session).

The job manager keeps the failed ones (`JobManager.interrupted`): the protection manager shows
an interrupted backup's failure on its item and runs an interrupted scheduled backup again for
its slot.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor

from controller.catalog import Catalog, JobFilter, JobRecord
from controller.datastores import Datastores
from controller.jobs.outcome import CONTROLLER_RESTARTED
from controller.jobs.transaction import data_bytes, recovery_point_record
from shared.clock import Clock
from shared.errors import NotFound
from shared.model import JobStatus, Operation

log = logging.getLogger(__name__)

INTERRUPTED_MESSAGE = (
    "The controller stopped while this job ran; it did not complete and left no recovery "
    "point. Run it again."
)
# A file recovery's agent lost its session with the stop and took down what it had opened.
FILE_RECOVERY_INTERRUPTED = (
    "The controller stopped while this file recovery ran; its agent closed what it had "
    "opened (a mount is unmounted). Run it again."
)


async def record_interrupted(
    catalog: Catalog, datastores: Datastores, clock: Clock, pool: Executor
) -> list[JobRecord]:
    """Record what the last stop left running; returns the jobs now recorded as failed."""
    await _recover_committed_backups(catalog, datastores, clock, pool)
    interrupted = await catalog.fail_interrupted_jobs(
        clock.now(), CONTROLLER_RESTARTED, INTERRUPTED_MESSAGE
    )
    if interrupted:
        log.warning("marked %d jobs interrupted by the last shutdown as failed", len(interrupted))
    for job in interrupted:
        if job.operation is Operation.BACKUP:  # its uploads are in the datastore
            await catalog.add_stored_bytes(job.vault, job.bytes_stored)
        elif job.operation is Operation.FILE_RECOVERY:
            job.error_message = FILE_RECOVERY_INTERRUPTED
            await catalog.update_job(job)
    return interrupted


async def _recover_committed_backups(
    catalog: Catalog, datastores: Datastores, clock: Clock, pool: Executor
) -> None:
    loop = asyncio.get_running_loop()
    for job in await catalog.jobs(
        JobFilter(statuses=[JobStatus.IN_PROGRESS], operations=[Operation.BACKUP], limit=-1)
    ):
        rp_id = job.pending_recovery_point_id
        if not rp_id:
            continue
        datastore = await datastores.reader(job.vault, rp_id)
        try:
            manifest = await loop.run_in_executor(pool, datastore.get_manifest, rp_id)
        except NotFound:
            continue  # never committed: failed with the other interrupted jobs
        sizes = [
            data_bytes(await loop.run_in_executor(pool, datastore.get_index, rp_id, disk.name))
            for disk in manifest.disks
        ]
        await catalog.insert_recovery_point(
            recovery_point_record(manifest, job.bytes_stored, sum(sizes))
        )
        job.status, job.ended_at, job.recovery_point_id = (
            JobStatus.COMPLETED,
            clock.now(),
            manifest.id,
        )
        await catalog.update_job(job)
        await catalog.add_stored_bytes(job.vault, job.bytes_stored)
        log.warning("job %s: recorded recovery point %s committed before a stop", job.id, rp_id)
