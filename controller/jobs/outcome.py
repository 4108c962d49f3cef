"""A job's outcome: its status, error code and message, from how its work ended.

Pure. Every kind of job ends through `outcome_of`, so a backup, a restore, a prune and a
registration that end the same way are recorded the same way:

- its work returned: `Completed`, or `CompletedWithWarnings` when it left warnings in its
  details;
- a cancel was asked for, and the work stopped with a typed error (the agent's `JobCancelled`,
  or whatever its stop caused) or was cancelled: `Cancelled`, code `JobCancelled`;
- a typed error (`CofferError`): `Failed`, with the error's stable code and message;
- cancelled without a cancel being asked for: the controller is stopping, `Failed` with
  `ControllerRestarted` (the runner leaves such a job for the next start to record);
- any other exception, a bug: `Failed`, `InternalError` (the runner logs its traceback).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from controller.catalog import JobRecord
from shared.errors import CofferError, ControllerRestarted, JobCancelled
from shared.model import JobStatus, Operation

CONTROLLER_RESTARTED = ControllerRestarted.code
"""The code of a job the controller's stop (or crash) cut short."""
INTERNAL_ERROR = CofferError.code


@dataclass(frozen=True)
class Outcome:
    status: JobStatus
    error_code: str = ""
    error_message: str = ""


def outcome_of(job: JobRecord, error: BaseException | None, *, cancel_requested: bool) -> Outcome:
    """How `job` ended, given what its work raised (None: it returned)."""
    if error is None:
        if job.details.get("warnings"):
            return Outcome(JobStatus.COMPLETED_WITH_WARNINGS)
        return Outcome(JobStatus.COMPLETED)
    if cancel_requested and isinstance(error, CofferError | asyncio.CancelledError):
        return cancelled(job)
    if isinstance(error, CofferError):
        return Outcome(JobStatus.FAILED, error.code, error.message)
    if isinstance(error, asyncio.CancelledError):
        return Outcome(
            JobStatus.FAILED,
            CONTROLLER_RESTARTED,
            "The controller stopped while this job ran. Run it again.",
        )
    return Outcome(JobStatus.FAILED, INTERNAL_ERROR, f"internal error in the controller: {error!r}")


def cancelled(job: JobRecord) -> Outcome:
    """A cancel that took effect: what the operator is told depends on what the job does."""
    message = _CANCELLED.get(job.operation)
    return Outcome(
        JobStatus.CANCELLED,
        JobCancelled.code,
        message.format(job_id=job.id) if message else JobCancelled(job_id=job.id).message,
    )


_CANCELLED = {
    Operation.PRUNE: "Job {job_id} was cancelled; the recovery points it had deleted stay "
    "deleted, the others are left for the next prune.",
    Operation.GARBAGE_COLLECTION: "Job {job_id} was cancelled; the chunks it had deleted stay "
    "deleted, the others are left for the next collection.",
    Operation.VERIFY: "Job {job_id} was cancelled; what it found of the recovery points it had "
    "checked is recorded, the others are left for the next verify.",
    Operation.VAULT_UPGRADE: "Job {job_id} was cancelled; the recovery points it converted stay "
    "converted, the others stay readable in the old format until `coffer vault upgrade` runs "
    "again.",
    Operation.COPY: "Job {job_id} was cancelled; the recovery points it had copied are in the "
    "copy, and the next copy sends only what had not arrived.",
}
