"""Domain vocabulary both sides and the CLI share: operations, statuses, item states."""

from __future__ import annotations

import enum
from collections.abc import Iterable

from shared.errors import InvalidArgument

MAX_CONCURRENT_BACKUPS = 10_000
"""The most backups a vault may run at once (`max_concurrent_backups`, the operator's choice
from 1): as many as one controller holds agents (docs/fleet.md)."""


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
    VERIFY = "Verify"
    FILE_RECOVERY = "FileRecovery"  # files of a recovery point listed, copied out or mounted
    VAULT_UPGRADE = "VaultUpgrade"  # a vault's datastore converted to the current format
    COPY = "Copy"  # a vault's recovery points copied to its off-site copy
    UNDELETE = "Undelete"  # soft-deleted recovery points made live again
    PURGE_DELETED = "PurgeDeleted"  # soft-deleted recovery points past their days removed
    RESTORE_DRILL = "RestoreDrill"


class Trigger(enum.StrEnum):
    """Who started a job: an operator (or an API call), or the controller's schedule."""

    MANUAL = "manual"
    SCHEDULED = "scheduled"


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


class Verification(enum.StrEnum):
    """What the last look at a recovery point's chunks found (no value: never verified)."""

    VERIFIED = "verified"  # a verify read every chunk it references, each whole
    DAMAGED = "damaged"  # chunks it references are missing or corrupt (or its index is)
    HEALED = "healed"  # its damaged chunks were stored again since; a verify is pending


class Consistency(enum.StrEnum):
    """What a recovery point guarantees about its disks, strongest first."""

    APPLICATION = "application"  # pre/post scripts ran and the file systems were frozen
    FILE_SYSTEM = "file-system"  # the file systems were frozen
    CRASH = "crash"  # as if the power was cut: no freeze


_STRENGTH = {Consistency.APPLICATION: 2, Consistency.FILE_SYSTEM: 1, Consistency.CRASH: 0}


def weakest(levels: Iterable[Consistency | str]) -> Consistency:
    """The consistency of a set of disks: that of the weakest (crash for none). A value that
    is no consistency level is an error (InvalidArgument)."""
    found = []
    for level in levels:
        try:
            found.append(Consistency(level))
        except ValueError:
            raise InvalidArgument(detail=f"{level!r} is not a consistency level") from None
    return min(found, key=_STRENGTH.__getitem__, default=Consistency.CRASH)


class RestoreMode(enum.StrEnum):
    """Where a restore writes a recovery point's disk."""

    NEW_IMAGE = "new-image"  # an image file (or a spare device) under the agent's restore_dirs
    IN_PLACE = "in-place"  # the VM's own configured disk, rolled back chunk by chunk
    DRILL = "drill"  # scratch space on a drill agent, checked read-only, then deleted


class DrillOutcome(enum.StrEnum):
    """What a restore drill found, as recorded on the recovery point."""

    CLEAN = "clean"  # restored, and every file system checked clean
    DAMAGED = "damaged"  # restored, but a file system check found damage (or could not read it)
    UNCHECKED = "unchecked"  # restored, but no file system on it that Coffer can check
    FAILED = "failed"  # the restore itself failed: the recovery point could not be read back
