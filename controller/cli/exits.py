"""What `coffer` exits with: one exit code per class of failure, for calls and jobs alike.

A refused call exits with its error's `exit_code` (shared/errors.py). A job that ended Failed
or Cancelled exits with the exit code of the error it carries, so a restore refused by the
agent's `restore_dirs` exits 6 whether the controller or the agent refused it, and a chunk
that fails its digest check exits 7. A job error no class in shared/errors.py owns (an
agent of another version's) exits 3, "the job failed". README.md's exit code table lists every
error code under its exit code; tests/test_cli.py checks the table, this module and
shared/errors.py against each other.
"""

from __future__ import annotations

from collections.abc import Iterable

from shared.errors import CofferError
from shared.model import JobStatus
from shared.rpc import operator_pb2

SUCCESS = 0
JOB_FAILED = 3

# The table of README.md, in the words `coffer --help` prints.
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "internal error (a bug, or the controller's storage failed), or aborted at a prompt",
    2: "bad usage or argument",
    3: "the job failed or was cancelled",
    4: "not found",
    5: "conflicting state",
    6: "not allowed",
    7: "data integrity",
    8: "unreachable (the controller, or a VM's agent)",
}


def of_error_code(code: str) -> int:
    """The exit code for a job that failed with error `code`."""
    cls = CofferError.class_of(code)
    return JOB_FAILED if cls is None else cls.exit_code


def of_jobs(jobs: Iterable[operator_pb2.Job]) -> int:
    """0 when no job failed; otherwise the exit code of the first one that did."""
    for job in jobs:
        if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            return of_error_code(job.error_code) if job.error_code else JOB_FAILED
    return SUCCESS


def help_text() -> str:
    """The table for `coffer --help` (`\\b` keeps click from rewrapping it)."""
    lines = ["\b", "Exit codes:"]
    lines += [f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items()]
    return "\n".join(lines)
