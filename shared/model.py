"""Domain vocabulary both sides and the CLI share: job operations, statuses, consistency."""

from __future__ import annotations

import enum


class Operation(enum.StrEnum):
    BACKUP = "Backup"
    RESTORE = "Restore"


class JobStatus(enum.StrEnum):
    IN_PROGRESS = "InProgress"
    COMPLETED = "Completed"
    COMPLETED_WITH_WARNINGS = "CompletedWithWarnings"
    FAILED = "Failed"
    CANCELLING = "Cancelling"
    CANCELLED = "Cancelled"

    @property
    def ended(self) -> bool:
        return self not in (JobStatus.IN_PROGRESS, JobStatus.CANCELLING)

    @property
    def succeeded(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.COMPLETED_WITH_WARNINGS)


class Consistency(enum.StrEnum):
    """What a recovery point guarantees about its disks, strongest first."""

    APPLICATION = "application"  # pre/post scripts ran and the file systems were frozen
    FILE_SYSTEM = "file-system"  # the file systems were frozen
    CRASH = "crash"  # as if the power was cut: no freeze


DEFAULT_VAULT = "default"
