"""Domain vocabulary both sides and the CLI share: operations, statuses, item states."""

from __future__ import annotations

import enum


class Operation(enum.StrEnum):
    """What a job does; every operation an operator starts or the scheduler runs is a job."""

    DISCOVERY = "Discovery"
    REGISTER = "Register"
    UNREGISTER = "Unregister"
    CONFIGURE_PROTECTION = "ConfigureProtection"
    BACKUP = "Backup"
    RESTORE = "Restore"
    STOP_PROTECTION = "StopProtection"
    DELETE_BACKUP_DATA = "DeleteBackupData"
    PRUNE = "Prune"
    GARBAGE_COLLECTION = "GarbageCollection"


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


class ItemState(enum.StrEnum):
    """Where a VM registered to a vault stands; the values are what operators read."""

    REGISTERING = "Registering"
    REGISTERED = "Registered"
    PROTECTION_PENDING = "Protected (pending initial backup)"
    PROTECTED = "Protected"
    PROTECTION_ERROR = "ProtectionError"
    PROTECTION_STOPPED = "ProtectionStopped"

    @property
    def protected(self) -> bool:
        """Under a policy: the scheduler backs it up and retention prunes it."""
        return self in (
            ItemState.PROTECTION_PENDING,
            ItemState.PROTECTED,
            ItemState.PROTECTION_ERROR,
        )


class Consistency(enum.StrEnum):
    """What a recovery point guarantees about its disks, strongest first."""

    APPLICATION = "application"  # pre/post scripts ran and the file systems were frozen
    FILE_SYSTEM = "file-system"  # the file systems were frozen
    CRASH = "crash"  # as if the power was cut: no freeze
