"""The job journal: one log line when a job starts and one when it ends, saying why.

Operators read a controller's log (journald, a file) to see what it did; every job leaves two
lines there, `started` and `ended`, each naming the job, its operation, its VM and vault, who
asked and, at the end, its status, duration, bytes and (when it failed, was cancelled or had
warnings) the error code and message. The same fields travel as `extra={"job": ...}`, so with
`--log-format json` (shared/logs.py) each line is one JSON object a log pipeline can index.
"""

from __future__ import annotations

import logging
from typing import Any

from controller.catalog import JobRecord

log = logging.getLogger("coffer.jobs")


def fields(job: JobRecord) -> dict[str, Any]:
    """What a log line says of `job`, as data."""
    data: dict[str, Any] = {
        "id": job.id,
        "operation": str(job.operation),
        "status": str(job.status),
        "vault": job.vault,
        "vm_id": job.vm_id,
        "trigger": str(job.trigger),
        "requested_by": job.requested_by,
    }
    if job.ended_at is not None:
        data["seconds"] = round(job.ended_at - job.started_at, 3)
        data["bytes_read"] = job.bytes_read
        data["bytes_sent"] = job.bytes_sent
        data["bytes_stored"] = job.bytes_stored
        if job.recovery_point_id:
            data["recovery_point_id"] = job.recovery_point_id
        if job.error_code:
            data["error_code"] = job.error_code
            data["error_message"] = job.error_message
    return data


def _subject(job: JobRecord) -> str:
    where = f"VM {job.vm_id} in vault {job.vault}" if job.vm_id else f"vault {job.vault}"
    asked = f", requested by {job.requested_by}" if job.requested_by else ""
    return f"job {job.id}: {job.operation} of {where} ({job.trigger}{asked})"


def started(job: JobRecord) -> None:
    log.info("%s started", _subject(job), extra={"job": fields(job)})


def ended(job: JobRecord) -> None:
    seconds = (job.ended_at or job.started_at) - job.started_at
    why = f": {job.error_code}: {job.error_message}" if job.error_code else ""
    made = f", recovery point {job.recovery_point_id}" if job.recovery_point_id else ""
    level = logging.WARNING if job.error_code and str(job.status) == "Failed" else logging.INFO
    log.log(
        level,
        "%s ended %s after %.1f s (read %d, sent %d, stored %d bytes%s)%s",
        _subject(job),
        job.status,
        seconds,
        job.bytes_read,
        job.bytes_sent,
        job.bytes_stored,
        made,
        why,
        extra={"job": fields(job)},
    )
