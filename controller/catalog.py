"""The catalog: the controller's SQLite record of vaults, agents, items, jobs and recovery points.

SQLite in WAL mode through aiosqlite (one connection, its own thread). The schema is versioned
with `PRAGMA user_version` and migrated forward at open; a catalog newer than this code is
refused. Heartbeats are not written one by one: `touch_agent` records them in memory and
`flush` writes them in one transaction (the server calls it every 30 s, and at shutdown);
whatever reads `last_seen` gets the later of the row and the one in memory.

The catalog is a cache of what the datastores hold: recovery point manifests are the source
of truth, so `synchronous=NORMAL` (durable on application crash, may lose the last
transactions on power loss) is enough. What only the catalog decides (a vault's settings and
policies, which policy protects a VM, retention labels, verify verdicts) is written to the
datastores too (controller/descriptions.py): every change to it is announced to the
`on_change` listeners as (vault, VM id), the VM id empty for the vault's own facts, after its
transaction commits. `coffer-controller recover` rebuilds a catalog from the datastores
(controller/recovery.py).

Soft-deleted recovery points (controller/soft_delete.py) move out of `recovery_points` into
`deleted_recovery_points`, so nothing that reads live points ever sees them.

Rows become records by column name (`sqlite3.Row`), never by position, so adding a column
cannot shift a field; values with a domain type (operations, statuses, item states,
consistency levels, triggers) are enums in the records and their `.value` in the rows. What
drives decisions about a job (its trigger, schedule slot, disks, pending recovery point) has
columns of its own; a job's `details` JSON holds only what operators read (warnings, frozen
time, per-disk consistency, prune and collection reports).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite

from shared.errors import (
    CatalogFull,
    CofferError,
    Conflict,
    InvalidArgument,
    NotFound,
    UnsupportedFormat,
)
from shared.model import (
    Consistency,
    DrillOutcome,
    ItemState,
    JobStatus,
    Operation,
    RestoreMode,
    Trigger,
    Verification,
)
from shared.policy import default_policy

_DEFAULT_POLICY = default_policy("UTC")
# SQLite's answer for a write that found no room (ENOSPC, a quota): the file system is full.
_FULL = frozenset({sqlite3.SQLITE_FULL})
_ID_BATCH = 500

MIGRATIONS: list[str] = [
    # 1: the foundation
    """
    CREATE TABLE vaults (
        name TEXT PRIMARY KEY,
        region TEXT NOT NULL,
        chunk_size INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE agents (
        vm_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        service TEXT NOT NULL,
        region TEXT NOT NULL,
        hostname TEXT NOT NULL,
        agent_version TEXT NOT NULL,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL
    );
    CREATE TABLE disks (
        vm_id TEXT NOT NULL REFERENCES agents(vm_id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        path TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        PRIMARY KEY (vm_id, name)
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        operation TEXT NOT NULL,
        status TEXT NOT NULL,
        vault TEXT NOT NULL,
        vm_id TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        bytes_read INTEGER NOT NULL DEFAULT 0,
        bytes_sent INTEGER NOT NULL DEFAULT 0,
        bytes_stored INTEGER NOT NULL DEFAULT 0,
        error_code TEXT NOT NULL DEFAULT '',
        error_message TEXT NOT NULL DEFAULT '',
        recovery_point_id TEXT NOT NULL DEFAULT '',
        details TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX jobs_by_start ON jobs (started_at);
    CREATE INDEX jobs_by_vm ON jobs (vm_id, started_at);
    CREATE INDEX jobs_by_status ON jobs (status);
    CREATE TABLE recovery_points (
        id TEXT PRIMARY KEY,
        vault TEXT NOT NULL REFERENCES vaults(name),
        vm_id TEXT NOT NULL,
        job_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        consistency TEXT NOT NULL,
        bytes_stored INTEGER NOT NULL
    );
    CREATE INDEX recovery_points_by_vm ON recovery_points (vm_id, created_at);
    CREATE TABLE recovery_point_disks (
        recovery_point_id TEXT NOT NULL REFERENCES recovery_points(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        chunk_size INTEGER NOT NULL,
        chunk_count INTEGER NOT NULL,
        PRIMARY KEY (recovery_point_id, name)
    );
    """,
    # 2: the vault workflow: policies, registered items, retention labels, storage accounting
    f"""
    ALTER TABLE vaults ADD COLUMN max_concurrent_backups INTEGER NOT NULL DEFAULT 4;
    ALTER TABLE vaults ADD COLUMN stored_bytes INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE policies (
        vault TEXT NOT NULL REFERENCES vaults(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        spec TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (vault, name)
    );
    CREATE TABLE items (
        vm_id TEXT PRIMARY KEY,
        vault TEXT NOT NULL REFERENCES vaults(name),
        state TEXT NOT NULL,
        policy TEXT,
        registered_at REAL NOT NULL,
        protected_at REAL,
        last_slot REAL,
        last_backup_at REAL,
        last_backup_status TEXT NOT NULL DEFAULT '',
        error_code TEXT NOT NULL DEFAULT '',
        error_message TEXT NOT NULL DEFAULT '',
        FOREIGN KEY (vault, policy) REFERENCES policies(vault, name)
    );
    CREATE INDEX items_by_vault ON items (vault, state);
    ALTER TABLE recovery_points ADD COLUMN kept_by TEXT NOT NULL DEFAULT '';
    ALTER TABLE recovery_points ADD COLUMN data_bytes INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE recovery_point_disks ADD COLUMN consistency TEXT NOT NULL DEFAULT '';
    CREATE INDEX recovery_points_by_vault ON recovery_points (vault, vm_id, created_at);
    CREATE INDEX jobs_by_vault ON jobs (vault, started_at);
    -- A foundation catalog: its vault gets the default policy, and the VMs with recovery points
    -- become items whose protection is stopped with data retained, so that an operator can
    -- resume their protection or delete their data (and then the vault).
    INSERT OR IGNORE INTO policies (vault, name, spec, created_at, updated_at)
        SELECT name, '{_DEFAULT_POLICY.name}', '{json.dumps(_DEFAULT_POLICY.to_dict())}',
               created_at, created_at FROM vaults;
    INSERT OR IGNORE INTO items (vm_id, vault, state, policy, registered_at)
        SELECT vm_id, vault, '{ItemState.PROTECTION_STOPPED}', NULL, min(created_at)
        FROM recovery_points GROUP BY vm_id;
    """,
    # 3: what drives decisions about a job gets typed columns, out of its display `details`:
    # a backup's trigger and schedule slot (a restart reruns an interrupted scheduled backup
    # for its slot), its disks, and the recovery point it is to create (`recovery_point_id`
    # names one only once it is committed). Existing backups move theirs over.
    """
    ALTER TABLE jobs ADD COLUMN trigger TEXT NOT NULL DEFAULT 'manual';
    ALTER TABLE jobs ADD COLUMN slot REAL;
    ALTER TABLE jobs ADD COLUMN disks TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE jobs ADD COLUMN pending_recovery_point_id TEXT NOT NULL DEFAULT '';
    UPDATE jobs SET
        trigger = coalesce(json_extract(details, '$.trigger'), 'manual'),
        slot = json_extract(details, '$.slot'),
        disks = CASE json_type(details, '$.disks')
                    WHEN 'array' THEN json_extract(details, '$.disks') ELSE '[]' END,
        pending_recovery_point_id = coalesce(json_extract(details, '$.recovery_point_id'), ''),
        details = json_remove(details, '$.trigger', '$.slot', '$.disks', '$.recovery_point_id')
    WHERE operation = 'Backup' AND json_valid(details);
    """,
    # 4: integrity. A vault's verify schedule; the chunks of its datastore known missing or
    # corrupt until a backup stores them again (controller.datastore.health); what the last
    # verify (or a failed read since) found of each recovery point, and which chunks it needs
    # are damaged. A recovery point without a `verifications` row was never verified.
    """
    ALTER TABLE vaults ADD COLUMN verify_new INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE vaults ADD COLUMN reverify_days INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE bad_chunks (
        vault TEXT NOT NULL REFERENCES vaults(name) ON DELETE CASCADE,
        digest BLOB NOT NULL,
        reason TEXT NOT NULL,
        found_at REAL NOT NULL,
        found_by TEXT NOT NULL,
        PRIMARY KEY (vault, digest)
    );
    CREATE TABLE verifications (
        recovery_point_id TEXT PRIMARY KEY
            REFERENCES recovery_points(id) ON DELETE CASCADE,
        state TEXT NOT NULL,
        verified_at REAL,
        changed_at REAL NOT NULL,
        job_id TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE damaged_chunks (
        recovery_point_id TEXT NOT NULL REFERENCES recovery_points(id) ON DELETE CASCADE,
        digest BLOB NOT NULL,
        disk TEXT NOT NULL,
        chunk INTEGER NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (recovery_point_id, digest)
    );
    CREATE INDEX damaged_chunks_by_digest ON damaged_chunks (digest);
    """,
    # 5: encryption at rest: whether a vault's datastore is encrypted (format 2). Once it is,
    # a datastore.json that says otherwise was replaced, and the vault is not opened with it
    # (docs/encryption.md, "Downgrade"). Vaults made before this are format 1.
    """
    ALTER TABLE vaults ADD COLUMN encrypted INTEGER NOT NULL DEFAULT 0;
    """,
    # 6: identities: who asked for each job, the certificates the CA issued and their
    # revocation, enrolment tokens (their secrets only hashed), and the audit log. Jobs from
    # before say "schedule" when the scheduler started them and nothing otherwise.
    """
    ALTER TABLE jobs ADD COLUMN requested_by TEXT NOT NULL DEFAULT '';
    UPDATE jobs SET requested_by = 'schedule' WHERE trigger = 'scheduled';
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        role TEXT NOT NULL DEFAULT '',
        fingerprint TEXT NOT NULL,
        not_before REAL NOT NULL,
        not_after REAL NOT NULL,
        issued_by TEXT NOT NULL,
        first_used_at REAL,
        revoked_at REAL,
        revoked_reason TEXT NOT NULL DEFAULT '',
        revoked_by TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX certificates_by_name ON certificates (name, kind);
    CREATE TABLE enrolment_tokens (
        id TEXT PRIMARY KEY,
        vm_id TEXT NOT NULL,
        secret_sha256 TEXT NOT NULL,
        created_at REAL NOT NULL,
        created_by TEXT NOT NULL,
        expires_at REAL NOT NULL,
        used_at REAL,
        used_by TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        who TEXT NOT NULL,
        kind TEXT NOT NULL,
        role TEXT NOT NULL DEFAULT '',
        method TEXT NOT NULL,
        arguments TEXT NOT NULL DEFAULT '',
        outcome TEXT NOT NULL DEFAULT '',
        message TEXT NOT NULL DEFAULT '',
        peer TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX audit_by_time ON audit (at);
    """,
    # 7: every way back. A restore records what it restored where (source VM, target VM and
    # path, mode, overwrite) and what it moved (compared, fetched, written), in columns; the
    # restores recorded before move theirs out of `details` (their bytes_read was the bytes
    # written). Agents report their restore_dirs (drill directories are checked against
    # them); a vault may have restore drills (where and when), and a recovery point records
    # its last drill.
    """
    ALTER TABLE agents ADD COLUMN restore_dirs TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE vaults ADD COLUMN drill_schedule TEXT NOT NULL DEFAULT '';
    ALTER TABLE vaults ADD COLUMN drill_agent TEXT NOT NULL DEFAULT '';
    ALTER TABLE vaults ADD COLUMN drill_dir TEXT NOT NULL DEFAULT '';
    ALTER TABLE vaults ADD COLUMN drill_last_slot REAL;
    ALTER TABLE jobs ADD COLUMN source_vm_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN target_vm_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN target_path TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN restore_mode TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN overwrite INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN bytes_compared INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN bytes_fetched INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN bytes_written INTEGER NOT NULL DEFAULT 0;
    UPDATE jobs SET
        source_vm_id = coalesce(json_extract(details, '$.source_vm'), vm_id),
        target_vm_id = vm_id,
        target_path = coalesce(json_extract(details, '$.target_path'), ''),
        restore_mode = 'new-image',
        bytes_written = bytes_read,
        details = json_remove(details, '$.source_vm', '$.disk', '$.target_path')
    WHERE operation = 'Restore' AND json_valid(details);
    ALTER TABLE recovery_points ADD COLUMN drilled_at REAL;
    ALTER TABLE recovery_points ADD COLUMN drill_job_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE recovery_points ADD COLUMN drill_seconds REAL NOT NULL DEFAULT 0;
    ALTER TABLE recovery_points ADD COLUMN drill_outcome TEXT NOT NULL DEFAULT '';
    ALTER TABLE recovery_points ADD COLUMN drill_summary TEXT NOT NULL DEFAULT '';
    """,
    # 8: soft delete. How many days a vault keeps deleted backup data recoverable (0: off),
    # and the recovery points deleted that way: out of `recovery_points` (nothing that reads
    # live points sees them), with what an undelete gives back and when they are purged.
    """
    ALTER TABLE vaults ADD COLUMN soft_delete_days INTEGER NOT NULL DEFAULT 14;
    CREATE TABLE deleted_recovery_points (
        id TEXT PRIMARY KEY,
        vault TEXT NOT NULL REFERENCES vaults(name),
        vm_id TEXT NOT NULL,
        job_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        consistency TEXT NOT NULL,
        bytes_stored INTEGER NOT NULL,
        data_bytes INTEGER NOT NULL,
        kept_by TEXT NOT NULL DEFAULT '',
        disks TEXT NOT NULL DEFAULT '[]',
        policy TEXT,
        deleted_at REAL NOT NULL,
        purge_at REAL NOT NULL,
        deleted_by TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX deleted_recovery_points_by_vault
        ON deleted_recovery_points (vault, vm_id, created_at);
    CREATE INDEX deleted_recovery_points_by_purge ON deleted_recovery_points (vault, purge_at);
    """,
    # 9: off-site copies. The copy target a vault copies its recovery points to ('' for none;
    # a name from the controller config's [[copy_targets]]), which points are complete in
    # which target's copy, since when and by which Copy job, and the chunks a verify of a copy
    # found missing or corrupt there, which the next Copy job sends again (controller.copies).
    """
    ALTER TABLE vaults ADD COLUMN copy_target TEXT NOT NULL DEFAULT '';
    CREATE TABLE copies (
        recovery_point_id TEXT NOT NULL REFERENCES recovery_points(id) ON DELETE CASCADE,
        target TEXT NOT NULL,
        copied_at REAL NOT NULL,
        job_id TEXT NOT NULL,
        PRIMARY KEY (recovery_point_id, target)
    );
    CREATE INDEX copies_by_target ON copies (target);
    CREATE TABLE copy_bad_chunks (
        vault TEXT NOT NULL REFERENCES vaults(name) ON DELETE CASCADE,
        target TEXT NOT NULL,
        digest BLOB NOT NULL,
        found_at REAL NOT NULL,
        PRIMARY KEY (vault, target, digest)
    );
    """,
    # 10: vault upgrades (issue 16): a vault whose datastore is being converted to the current
    # format. Where it stands (`phase`: 'switch' until the old format's objects are moved aside
    # and their old keys cleaned, then 'convert'), whether the controller runs it again when it
    # starts (`resume`: it was running when the controller stopped; not after a cancel or a
    # failure), and the old-to-new chunk names found so far (`lost`: why a chunk could not be
    # read), so that a conversion cut short reads no chunk twice. Both go when it ends.
    """
    CREATE TABLE vault_upgrades (
        vault TEXT PRIMARY KEY REFERENCES vaults(name) ON DELETE CASCADE,
        from_format INTEGER NOT NULL,
        to_format INTEGER NOT NULL,
        phase TEXT NOT NULL,
        resume INTEGER NOT NULL DEFAULT 1,
        job_id TEXT NOT NULL,
        started_at REAL NOT NULL
    );
    CREATE TABLE upgrade_chunks (
        vault TEXT NOT NULL REFERENCES vaults(name) ON DELETE CASCADE,
        old_digest BLOB NOT NULL,
        new_digest BLOB NOT NULL,
        lost TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (vault, old_digest)
    );
    """,
    # 11: a hostile agent's reach (issue 14): whether a vault's VMs are one trust domain, whose
    # backups deduplicate against everything its datastore holds. Off: each VM's against what
    # it stored itself (controller.jobs.transaction).
    """
    ALTER TABLE vaults ADD COLUMN shared_dedup INTEGER NOT NULL DEFAULT 0;
    """,
    # 12: alerts (controller/alerts): one row per time a condition held, firing until resolved;
    # at most one firing row per condition (its key).
    """
    CREATE TABLE alerts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL,
        kind TEXT NOT NULL,
        severity TEXT NOT NULL,
        vault TEXT NOT NULL DEFAULT '',
        vm_id TEXT NOT NULL DEFAULT '',
        summary TEXT NOT NULL,
        details TEXT NOT NULL DEFAULT '{}',
        raised_at REAL NOT NULL,
        resolved_at REAL
    );
    CREATE UNIQUE INDEX alerts_firing ON alerts (key) WHERE resolved_at IS NULL;
    CREATE INDEX alerts_by_time ON alerts (raised_at);
    """,
    # 13: listings page through the fleet in their order (controller/paging.py): agents by
    # service, name and VM id; jobs newest first.
    """
    CREATE INDEX agents_in_order ON agents (service, name, vm_id);
    CREATE INDEX jobs_in_order ON jobs (started_at, id);
    """,
    # 14: changed-block tracking (agent/tracking.py): a backup reads every disk in full at
    # least every this many days, whatever tracking says changed; 0 turns tracking off.
    """
    ALTER TABLE vaults ADD COLUMN full_read_days INTEGER NOT NULL DEFAULT 7;
    """,
]

DEFAULT_SOFT_DELETE_DAYS = 14
DEFAULT_FULL_READ_DAYS = 7
MAX_FULL_READ_DAYS = 3650
"""Days deleted backup data stays recoverable in a new vault (Azure Backup's default)."""


@dataclass(frozen=True)
class DiskRecord:
    name: str
    path: str
    size_bytes: int


@dataclass(frozen=True)
class AgentHello:
    """What an agent's hello records: who it is, its disks, when it said so."""

    vm_id: str
    name: str
    service: str
    region: str
    hostname: str
    agent_version: str
    disks: tuple[DiskRecord, ...]
    now: float
    restore_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentRecord:
    vm_id: str
    name: str
    service: str
    region: str
    hostname: str
    agent_version: str
    first_seen: float
    last_seen: float
    disks: tuple[DiskRecord, ...]
    restore_dirs: tuple[str, ...] = ()
    """Where its agent may restore to, as its last hello said."""


@dataclass(frozen=True)
class DrillSettings:
    """Where a vault's restore drills run (an agent, a directory there) and when."""

    agent: str
    directory: str
    schedule: dict[str, Any] | None = None
    """The schedule's JSON form (`shared.policy.Schedule.to_dict`); None: on demand only."""
    last_slot: float | None = None
    """The scheduled drill slot last started: a restart plans from here."""


@dataclass(frozen=True)
class VaultRecord:
    name: str
    region: str
    chunk_size: int
    created_at: float
    max_concurrent_backups: int = 4
    stored_bytes: int = 0
    verify_new: bool = False
    """Verify every new recovery point after its backup."""
    reverify_days: int = 0
    """Verify, on the daily maintenance, points not verified for this many days (0: never)."""
    encrypted: bool = False
    """Its datastore is encrypted (format 2): never to be opened as a plain one."""
    shared_dedup: bool = False
    """Its VMs are one trust domain: a backup deduplicates against the whole datastore, not
    only against what its own VM stored."""
    copy_target: str = ""
    """The copy target (controller config) its recovery points are copied to; '' for none."""
    soft_delete_days: int = DEFAULT_SOFT_DELETE_DAYS
    """Deleted backup data stays recoverable this many days (0: deleted at once)."""
    full_read_days: int = DEFAULT_FULL_READ_DAYS
    """Backups read every disk in full at least every this many days; between those, a disk
    snapshotted as a reflink clone is read only where it changed (0: always in full)."""
    drill: DrillSettings | None = None


@dataclass(frozen=True)
class PolicyRecord:
    vault: str
    name: str
    spec: dict[str, Any]
    created_at: float
    updated_at: float


@dataclass
class ItemRecord:
    """A VM registered to a vault, and where its protection stands."""

    vm_id: str
    vault: str
    state: ItemState
    policy: str | None
    registered_at: float
    protected_at: float | None = None
    # The schedule slot the scheduler last started (or gave up) a backup for: a restarted
    # controller plans from here, so a missed slot runs once, not once per missed slot.
    last_slot: float | None = None
    last_backup_at: float | None = None
    last_backup_status: JobStatus | None = None
    error_code: str = ""
    error_message: str = ""

    def __post_init__(self) -> None:
        self.state = ItemState(self.state)
        if self.last_backup_status is not None:
            self.last_backup_status = JobStatus(self.last_backup_status)


@dataclass(frozen=True)
class RestoreTarget:
    """What a restore (or a drill) restores where."""

    source_vm_id: str
    target_vm_id: str
    """The VM whose agent writes it."""
    target_path: str
    """The image written; in place: the disk's path (once the agent said it); a drill: the
    scratch directory."""
    mode: RestoreMode
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", RestoreMode(self.mode))


@dataclass
class JobRecord:
    id: str
    operation: Operation
    status: JobStatus
    vault: str
    vm_id: str
    started_at: float
    ended_at: float | None = None
    bytes_read: int = 0
    bytes_sent: int = 0
    bytes_stored: int = 0
    error_code: str = ""
    error_message: str = ""
    recovery_point_id: str = ""
    """The recovery point the job made (a backup, once it is committed) or read (a restore)."""
    trigger: Trigger = Trigger.MANUAL
    slot: float | None = None
    """The schedule slot a scheduled backup (or a skipped slot's failure) is for."""
    disks: tuple[str, ...] = ()
    """A backup's disks (those asked for, then once it starts every disk it backs up), or the
    disk a restore writes."""
    pending_recovery_point_id: str = ""
    """The id a backup's recovery point gets if it commits; a restart looks for its manifest."""
    details: dict[str, Any] = field(default_factory=dict)
    """For operators only (warnings, frozen time, consistency per disk, reports): nothing
    decides on it."""
    requested_by: str = ""
    """Who asked for it: an operator's name, or "schedule" (`controller.audit`)."""
    restore: RestoreTarget | None = None
    """A restore's or drill's source and target."""
    bytes_compared: int = 0
    """Bytes of a disk read to find which chunks differ (an in-place restore)."""
    bytes_fetched: int = 0
    """Chunk bytes a restore read from the datastore, as stored."""
    bytes_written: int = 0
    """Bytes a restore wrote to its target."""

    def __post_init__(self) -> None:
        self.operation = Operation(self.operation)
        self.status = JobStatus(self.status)
        self.trigger = Trigger(self.trigger)
        self.disks = tuple(self.disks)


@dataclass(frozen=True)
class RecoveryPointDiskRecord:
    name: str
    size_bytes: int
    chunk_size: int
    chunk_count: int
    consistency: Consistency | None = None
    """None for points taken before it was recorded per disk."""

    def __post_init__(self) -> None:
        if self.consistency is not None:
            object.__setattr__(self, "consistency", Consistency(self.consistency))


@dataclass(frozen=True)
class RecoveryPointRecord:
    id: str
    vault: str
    vm_id: str
    job_id: str
    created_at: float
    consistency: Consistency
    bytes_stored: int
    disks: tuple[RecoveryPointDiskRecord, ...]
    # Bytes of the disks that hold data (not holes, not zeros): what a restore gives back.
    data_bytes: int = 0
    # The retention rules keeping it, as of the last prune: daily, weekly, monthly, yearly.
    kept_by: tuple[str, ...] = ()
    drill: DrillRecord | None = None
    """Its last restore drill; None if it was never drilled."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "consistency", Consistency(self.consistency))


@dataclass(frozen=True)
class DeletedRecoveryPointRecord:
    """A soft-deleted recovery point: what it was, and until when it can be undeleted."""

    point: RecoveryPointRecord
    deleted_at: float
    purge_at: float
    """When the daily maintenance purges it for good."""
    deleted_by: str = ""
    """The job that deleted it."""
    policy: str | None = None
    """The policy its VM had when the data was deleted (an undelete gives it back)."""

    @property
    def id(self) -> str:
        return self.point.id


@dataclass(frozen=True)
class DamageRecord:
    """A chunk a recovery point needs that is missing or corrupt."""

    disk: str
    chunk: int
    """Its position on the disk (the first, if the disk holds it more than once)."""
    digest: bytes
    reason: str


@dataclass(frozen=True)
class VerificationRecord:
    """Where a recovery point's integrity stands (a point without one was never verified)."""

    recovery_point_id: str
    state: Verification
    verified_at: float | None
    """When a verify last read it (None: only a failed read has looked at it)."""
    changed_at: float
    job_id: str
    """The job that last changed it: a verify, a restore that met damage, a backup."""
    detail: str = ""
    """Damage that is not a chunk's (an index that cannot be read)."""
    damaged_chunks: int = 0
    damage: tuple[DamageRecord, ...] = ()
    """The first few damaged chunks (`damaged_chunks` counts them all)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", Verification(self.state))


@dataclass(frozen=True)
class UpgradeRecord:
    """A vault whose datastore is being converted to the current format (controller.upgrades)."""

    vault: str
    from_format: int
    to_format: int
    phase: str
    """'switch' until the old format's objects are moved aside, then 'convert'."""
    resume: bool
    """Run it again when the controller starts (it was running when the controller stopped)."""
    job_id: str
    """The last VaultUpgrade job that worked on it."""
    started_at: float


@dataclass(frozen=True)
class CopyRecord:
    """A recovery point complete in a copy target's copy of its vault."""

    recovery_point_id: str
    target: str
    copied_at: float
    job_id: str


@dataclass(frozen=True)
class CopyLag:
    """How far a vault's copy is behind it."""

    copied: int
    """Recovery points complete in the copy."""
    not_copied: int
    oldest_not_copied_at: float | None
    """When the oldest point not in the copy yet was taken: its data has one home since."""
    newest_not_copied_at: float | None
    newest_copied_at: float | None


@dataclass(frozen=True)
class DrillRecord:
    """A restore drill of a recovery point: when, by which job, how long the restore took,
    and what the read-only file system checks found."""

    at: float
    job_id: str
    seconds: float
    outcome: DrillOutcome
    summary: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "outcome", DrillOutcome(self.outcome))


@dataclass(frozen=True)
class JobFilter:
    statuses: Sequence[str] = ()
    operations: Sequence[str] = ()
    vm_id: str = ""
    vault: str = ""
    started_from: float | None = None
    started_to: float | None = None
    limit: int = 100
    before: tuple[float, str] | None = None
    """Only jobs before this (started_at, id) in the listing's order (newest first): the
    next page after the job that ended the last."""


@dataclass(frozen=True)
class CertificateRecord:
    """A certificate of the CA's ledger, and where it stands."""

    serial: str
    kind: str
    name: str
    role: str
    fingerprint: str
    not_before: float
    not_after: float
    issued_by: str
    """pki (on the CA host), enrolment, renewal, or seen (issued before the ledger)."""
    first_used_at: float | None = None
    revoked_at: float | None = None
    revoked_reason: str = ""
    """revoked (by an admin) or superseded (by a newer certificate of the same identity)."""
    revoked_by: str = ""


@dataclass(frozen=True)
class EnrolmentTokenRecord:
    """An enrolment token as the controller keeps it: its secret only hashed."""

    id: str
    vm_id: str
    secret_sha256: str
    created_at: float
    created_by: str
    expires_at: float
    used_at: float | None = None
    used_by: str = ""


@dataclass(frozen=True)
class AuditRecord:
    """One call in the audit log."""

    at: float
    who: str
    kind: str
    method: str
    role: str = ""
    arguments: str = ""
    outcome: str = ""
    message: str = ""
    peer: str = ""
    id: int = 0


@dataclass(frozen=True)
class AlertRecord:
    """One alert: a condition that held from `raised_at` until `resolved_at` (None: firing)."""

    key: str
    kind: str
    severity: str
    summary: str
    raised_at: float
    vault: str = ""
    vm_id: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    resolved_at: float | None = None
    id: int = 0

    @property
    def firing(self) -> bool:
        return self.resolved_at is None


_ALERT_COLUMNS = (
    "id", "key", "kind", "severity", "vault", "vm_id", "summary", "details", "raised_at",
    "resolved_at",
)  # fmt: skip


def _alert(row: sqlite3.Row) -> AlertRecord:
    data = dict(row)
    data["details"] = json.loads(data["details"] or "{}")
    return AlertRecord(**data)


@dataclass(frozen=True)
class AuditFilter:
    started_from: float | None = None
    started_to: float | None = None
    who: str = ""
    method: str = ""
    limit: int = 100


def _equal(**columns: str) -> tuple[str, tuple[str, ...]]:
    """A WHERE clause (and its parameters) for the columns given a non-empty value."""
    given = {column: value for column, value in columns.items() if value}
    clause = " AND ".join(f"{column} = ?" for column in given) or "1"
    return clause, tuple(given.values())


def _columns(names: Sequence[str]) -> str:
    return ", ".join(names)


def _in_batches(ids: Sequence[str], size: int = _ID_BATCH) -> Iterator[tuple[list[str], str]]:
    """`ids` in slices of `size`, each with its `?,?,...` for an `IN (...)`: SQLite bounds
    the variables of one statement (999 before 3.32, 32,766 since)."""
    for start in range(0, len(ids), size):
        batch = list(ids[start : start + size])
        yield batch, ",".join("?" * len(batch))


def _placeholders(names: Sequence[str]) -> str:
    """Named parameters for `names`: rows are written from dicts, by name."""
    return ", ".join(f":{name}" for name in names)


def _assignments(names: Sequence[str]) -> str:
    return ", ".join(f"{name} = :{name}" for name in names)


# --- rows and records, by column name ------------------------------------------------------

_VAULT_COLUMNS = (
    "name", "region", "chunk_size", "created_at", "max_concurrent_backups", "stored_bytes",
    "verify_new", "reverify_days",
    "encrypted",
    "shared_dedup",
    "copy_target",
    "soft_delete_days",
    "full_read_days",
    "drill_schedule", "drill_agent", "drill_dir", "drill_last_slot",
)  # fmt: skip


def _vault(row: sqlite3.Row) -> VaultRecord:
    drill = None
    if row["drill_agent"]:
        drill = DrillSettings(
            agent=row["drill_agent"],
            directory=row["drill_dir"],
            schedule=json.loads(row["drill_schedule"]) if row["drill_schedule"] else None,
            last_slot=row["drill_last_slot"],
        )
    return VaultRecord(
        name=row["name"],
        region=row["region"],
        chunk_size=row["chunk_size"],
        created_at=row["created_at"],
        max_concurrent_backups=row["max_concurrent_backups"],
        stored_bytes=row["stored_bytes"],
        verify_new=bool(row["verify_new"]),
        reverify_days=row["reverify_days"],
        encrypted=bool(row["encrypted"]),
        shared_dedup=bool(row["shared_dedup"]),
        copy_target=row["copy_target"],
        soft_delete_days=row["soft_delete_days"],
        full_read_days=row["full_read_days"],
        drill=drill,
    )


_POLICY_COLUMNS = ("vault", "name", "spec", "created_at", "updated_at")


def _policy(row: sqlite3.Row) -> PolicyRecord:
    return PolicyRecord(
        vault=row["vault"],
        name=row["name"],
        spec=json.loads(row["spec"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


_ITEM_COLUMNS = (
    "vm_id", "vault", "state", "policy", "registered_at", "protected_at", "last_slot",
    "last_backup_at", "last_backup_status", "error_code", "error_message",
)  # fmt: skip


def _item(row: sqlite3.Row) -> ItemRecord:
    return ItemRecord(
        vm_id=row["vm_id"],
        vault=row["vault"],
        state=ItemState(row["state"]),
        policy=row["policy"],
        registered_at=row["registered_at"],
        protected_at=row["protected_at"],
        last_slot=row["last_slot"],
        last_backup_at=row["last_backup_at"],
        last_backup_status=JobStatus(row["last_backup_status"])
        if row["last_backup_status"]
        else None,
        error_code=row["error_code"],
        error_message=row["error_message"],
    )


def _item_row(item: ItemRecord) -> dict[str, Any]:
    return {
        "vm_id": item.vm_id,
        "vault": item.vault,
        "state": item.state.value,
        "policy": item.policy,
        "registered_at": item.registered_at,
        "protected_at": item.protected_at,
        "last_slot": item.last_slot,
        "last_backup_at": item.last_backup_at,
        "last_backup_status": item.last_backup_status.value if item.last_backup_status else "",
        "error_code": item.error_code,
        "error_message": item.error_message,
    }


_AGENT_COLUMNS = (
    "vm_id", "name", "service", "region", "hostname", "agent_version", "first_seen", "last_seen",
    "restore_dirs",
)  # fmt: skip
_DISK_COLUMNS = ("vm_id", "name", "path", "size_bytes")


def _disk(row: sqlite3.Row) -> DiskRecord:
    return DiskRecord(name=row["name"], path=row["path"], size_bytes=row["size_bytes"])


_JOB_COLUMNS = (
    "id", "operation", "status", "vault", "vm_id", "started_at", "ended_at", "bytes_read",
    "bytes_sent", "bytes_stored", "error_code", "error_message", "recovery_point_id", "trigger",
    "slot", "disks", "pending_recovery_point_id", "details", "requested_by", "source_vm_id",
    "target_vm_id", "target_path", "restore_mode", "overwrite", "bytes_compared", "bytes_fetched",
    "bytes_written",
)  # fmt: skip


def _job(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        operation=Operation(row["operation"]),
        status=JobStatus(row["status"]),
        vault=row["vault"],
        vm_id=row["vm_id"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        bytes_read=row["bytes_read"],
        bytes_sent=row["bytes_sent"],
        bytes_stored=row["bytes_stored"],
        error_code=row["error_code"],
        error_message=row["error_message"],
        recovery_point_id=row["recovery_point_id"],
        trigger=Trigger(row["trigger"]),
        slot=row["slot"],
        disks=tuple(json.loads(row["disks"])),
        pending_recovery_point_id=row["pending_recovery_point_id"],
        details=json.loads(row["details"]),
        requested_by=row["requested_by"],
        restore=RestoreTarget(
            source_vm_id=row["source_vm_id"],
            target_vm_id=row["target_vm_id"],
            target_path=row["target_path"],
            mode=RestoreMode(row["restore_mode"]),
            overwrite=bool(row["overwrite"]),
        )
        if row["restore_mode"]
        else None,
        bytes_compared=row["bytes_compared"],
        bytes_fetched=row["bytes_fetched"],
        bytes_written=row["bytes_written"],
    )


def _job_row(job: JobRecord) -> dict[str, Any]:
    return {
        "id": job.id,
        "operation": job.operation.value,
        "status": job.status.value,
        "vault": job.vault,
        "vm_id": job.vm_id,
        "started_at": job.started_at,
        "ended_at": job.ended_at,
        "bytes_read": job.bytes_read,
        "bytes_sent": job.bytes_sent,
        "bytes_stored": job.bytes_stored,
        "error_code": job.error_code,
        "error_message": job.error_message,
        "recovery_point_id": job.recovery_point_id,
        "trigger": job.trigger.value,
        "slot": job.slot,
        "disks": json.dumps(list(job.disks)),
        "pending_recovery_point_id": job.pending_recovery_point_id,
        "details": json.dumps(job.details),
        "requested_by": job.requested_by,
        "source_vm_id": job.restore.source_vm_id if job.restore else "",
        "target_vm_id": job.restore.target_vm_id if job.restore else "",
        "target_path": job.restore.target_path if job.restore else "",
        "restore_mode": job.restore.mode.value if job.restore else "",
        "overwrite": int(job.restore.overwrite) if job.restore else 0,
        "bytes_compared": job.bytes_compared,
        "bytes_fetched": job.bytes_fetched,
        "bytes_written": job.bytes_written,
    }


_RP_COLUMNS = (
    "id", "vault", "vm_id", "job_id", "created_at", "consistency", "bytes_stored", "data_bytes",
    "kept_by",
)  # fmt: skip
# Read with a recovery point, written only by `record_drill`.
_RP_DRILL_COLUMNS = (
    "drilled_at", "drill_job_id", "drill_seconds", "drill_outcome", "drill_summary"
)  # fmt: skip
_RP_DISK_COLUMNS = (
    "recovery_point_id", "name", "size_bytes", "chunk_size", "chunk_count", "consistency"
)  # fmt: skip


_CERTIFICATE_COLUMNS = tuple(f.name for f in dataclasses.fields(CertificateRecord))
_TOKEN_COLUMNS = tuple(f.name for f in dataclasses.fields(EnrolmentTokenRecord))
_AUDIT_COLUMNS = tuple(f.name for f in dataclasses.fields(AuditRecord))


def _rp_disk(row: sqlite3.Row) -> RecoveryPointDiskRecord:
    return RecoveryPointDiskRecord(
        name=row["name"],
        size_bytes=row["size_bytes"],
        chunk_size=row["chunk_size"],
        chunk_count=row["chunk_count"],
        consistency=Consistency(row["consistency"]) if row["consistency"] else None,
    )


def _recovery_point(
    row: sqlite3.Row, disks: Sequence[RecoveryPointDiskRecord]
) -> RecoveryPointRecord:
    return RecoveryPointRecord(
        id=row["id"],
        vault=row["vault"],
        vm_id=row["vm_id"],
        job_id=row["job_id"],
        created_at=row["created_at"],
        consistency=Consistency(row["consistency"]),
        bytes_stored=row["bytes_stored"],
        disks=tuple(disks),
        data_bytes=row["data_bytes"],
        kept_by=tuple(row["kept_by"].split(",")) if row["kept_by"] else (),
        drill=_drill(row),
    )


def _drill(row: sqlite3.Row) -> DrillRecord | None:
    # A soft-deleted point's row has no drill columns: its last drill is not kept. (`in` on a
    # Row looks at its values, hence keys().)
    if "drilled_at" not in row.keys() or row["drilled_at"] is None:  # noqa: SIM118
        return None
    return DrillRecord(
        at=row["drilled_at"],
        job_id=row["drill_job_id"],
        seconds=row["drill_seconds"],
        outcome=DrillOutcome(row["drill_outcome"]),
        summary=row["drill_summary"],
    )


_DELETED_COLUMNS = (
    *_RP_COLUMNS, "disks", "policy", "deleted_at", "purge_at", "deleted_by",
)  # fmt: skip


def _deleted(row: sqlite3.Row) -> DeletedRecoveryPointRecord:
    disks = [
        RecoveryPointDiskRecord(
            name=d["name"],
            size_bytes=d["size_bytes"],
            chunk_size=d["chunk_size"],
            chunk_count=d["chunk_count"],
            consistency=Consistency(d["consistency"]) if d.get("consistency") else None,
        )
        for d in json.loads(row["disks"])
    ]
    return DeletedRecoveryPointRecord(
        point=_recovery_point(row, disks),
        deleted_at=row["deleted_at"],
        purge_at=row["purge_at"],
        deleted_by=row["deleted_by"],
        policy=row["policy"],
    )


def _deleted_row(record: DeletedRecoveryPointRecord) -> dict[str, Any]:
    rp = record.point
    return {
        **_rp_row(rp),
        "disks": json.dumps(
            [
                {
                    "name": d.name,
                    "size_bytes": d.size_bytes,
                    "chunk_size": d.chunk_size,
                    "chunk_count": d.chunk_count,
                    "consistency": d.consistency.value if d.consistency else "",
                }
                for d in rp.disks
            ]
        ),
        "policy": record.policy,
        "deleted_at": record.deleted_at,
        "purge_at": record.purge_at,
        "deleted_by": record.deleted_by,
    }


def _rp_row(rp: RecoveryPointRecord) -> dict[str, Any]:
    return {
        "id": rp.id,
        "vault": rp.vault,
        "vm_id": rp.vm_id,
        "job_id": rp.job_id,
        "created_at": rp.created_at,
        "consistency": rp.consistency.value,
        "bytes_stored": rp.bytes_stored,
        "data_bytes": rp.data_bytes,
        "kept_by": ",".join(rp.kept_by),
    }


Change = Callable[[str, str], None]
"""`listener(vault, vm_id)`: what the datastore descriptions hold of it changed (vm_id "" for
the vault's own facts)."""


class Catalog:
    """Async access to the catalog file; an async context manager."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None
        self._heartbeats: dict[str, float] = {}
        # One connection serves every coroutine: writers take turns, so one's commit never
        # lands another's half-done statements, and a failed write is rolled back whole.
        self._write_lock = asyncio.Lock()
        self.on_change: list[Change] = []
        """Told of every change to what the datastore descriptions hold, once committed."""

    def _changed(self, owners: Iterable[tuple[str, str]]) -> None:
        for vault, vm_id in owners:
            for listener in self.on_change:
                listener(vault, vm_id)

    async def _owners(
        self, db: aiosqlite.Connection, rp_ids: Sequence[str]
    ) -> set[tuple[str, str]]:
        """The (vault, VM) of each of `rp_ids` still in the catalog (only with listeners)."""
        found: set[tuple[str, str]] = set()
        if not self.on_change:
            return found
        ids = list(rp_ids)
        for batch, marks in _in_batches(ids):
            async with db.execute(
                f"SELECT DISTINCT vault, vm_id FROM recovery_points WHERE id IN ({marks})",
                batch,
            ) as cursor:
                found.update((row["vault"], row["vm_id"]) for row in await cursor.fetchall())
        return found

    async def __aenter__(self) -> Self:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self._path)
        self._db.row_factory = sqlite3.Row
        try:
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=NORMAL")
            await self._db.execute("PRAGMA foreign_keys=ON")
            await self._migrate()
        except BaseException:
            await self._db.close()
            self._db = None
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._db is not None:
            await self.flush()
            await self._db.close()
            self._db = None

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write, all or nothing. A full file system (CatalogFull) and a number SQLite
        cannot hold (InvalidArgument) leave as typed errors, with nothing of it kept."""
        async with self._write_lock:
            try:
                yield self.db
                await self.db.commit()
            except BaseException as exc:
                await self.db.rollback()
                typed = self._write_error(exc)
                if typed is not None:
                    raise typed from exc
                raise

    def _write_error(self, exc: BaseException) -> CofferError | None:
        if isinstance(exc, sqlite3.Error) and exc.sqlite_errorcode in _FULL:
            return CatalogFull(path=str(self._path))
        if isinstance(exc, OverflowError):  # a Python int past SQLite's signed 64 bits
            return InvalidArgument(
                detail=f"a value is out of the range the catalog records ({exc}); nothing was "
                "changed"
            )
        return None

    @property
    def db(self) -> aiosqlite.Connection:
        assert self._db is not None, "catalog is not open"
        return self._db

    async def _migrate(self) -> None:
        version = await self.schema_version()
        if version > len(MIGRATIONS):
            raise UnsupportedFormat(
                what=str(self._path), version=version, supported=len(MIGRATIONS)
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            # executescript commits first; the migration and its version bump are one transaction.
            await self.db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")

    async def schema_version(self) -> int:
        async with self.db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        return int(row["user_version"]) if row else 0

    # --- vaults ----------------------------------------------------------------------------

    async def create_vault(self, vault: VaultRecord, default_policy: PolicyRecord) -> VaultRecord:
        """A new vault with its default policy, in one transaction; Conflict if it exists."""
        async with self._transaction() as db:
            try:
                await db.execute(
                    f"INSERT INTO vaults ({_columns(_VAULT_COLUMNS)})"
                    f" VALUES ({_placeholders(_VAULT_COLUMNS)})",
                    {
                        "name": vault.name,
                        "region": vault.region,
                        "chunk_size": vault.chunk_size,
                        "created_at": vault.created_at,
                        "max_concurrent_backups": vault.max_concurrent_backups,
                        "stored_bytes": 0,
                        "verify_new": int(vault.verify_new),
                        "reverify_days": vault.reverify_days,
                        "encrypted": int(vault.encrypted),
                        "shared_dedup": int(vault.shared_dedup),
                        "copy_target": vault.copy_target,
                        "soft_delete_days": vault.soft_delete_days,
                        "full_read_days": vault.full_read_days,
                        "drill_schedule": "",
                        "drill_agent": "",
                        "drill_dir": "",
                        "drill_last_slot": None,
                    },
                )
            except sqlite3.IntegrityError:
                raise Conflict(detail=f"vault {vault.name!r} already exists") from None
            await self._insert_policy(db, default_policy)
        self._changed([(vault.name, "")])
        return await self.vault(vault.name)

    async def delete_vault(self, name: str) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM policies WHERE vault = ?", (name,))
            cursor = await db.execute("DELETE FROM vaults WHERE name = ?", (name,))
            if cursor.rowcount == 0:
                raise NotFound(kind="vault", name=name)

    async def vault(self, name: str) -> VaultRecord:
        async with self.db.execute(
            f"SELECT {_columns(_VAULT_COLUMNS)} FROM vaults WHERE name = ?", (name,)
        ) as cursor:
            row = await cursor.fetchone()
        if row is None:
            raise NotFound(kind="vault", name=name)
        return _vault(row)

    async def vaults(self) -> list[VaultRecord]:
        async with self.db.execute(
            f"SELECT {_columns(_VAULT_COLUMNS)} FROM vaults ORDER BY name"
        ) as cursor:
            return [_vault(row) for row in await cursor.fetchall()]

    async def set_vault_encrypted(self, vault: str) -> None:
        """Record that the vault's datastore is encrypted; never undone."""
        async with self._transaction() as db:
            cursor = await db.execute("UPDATE vaults SET encrypted = 1 WHERE name = ?", (vault,))
            if cursor.rowcount == 0:
                raise NotFound(kind="vault", name=vault)

    async def set_drill(self, vault: str, drill: DrillSettings | None) -> None:
        """A vault's restore drill settings (None: it has none)."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE vaults SET drill_schedule = ?, drill_agent = ?, drill_dir = ?,"
                " drill_last_slot = ? WHERE name = ?",
                (
                    json.dumps(drill.schedule) if drill and drill.schedule else "",
                    drill.agent if drill else "",
                    drill.directory if drill else "",
                    drill.last_slot if drill else None,
                    vault,
                ),
            )
            if cursor.rowcount == 0:
                raise NotFound(kind="vault", name=vault)

    async def set_drill_slot(self, vault: str, slot: float) -> None:
        """The scheduled drill slot a vault last started."""
        async with self._transaction() as db:
            await db.execute("UPDATE vaults SET drill_last_slot = ? WHERE name = ?", (slot, vault))

    async def add_stored_bytes(self, vault: str, delta: int) -> None:
        """Account chunk bytes written to (positive) or freed from (negative) a vault's store."""
        if delta:
            async with self._transaction() as db:
                await db.execute(
                    "UPDATE vaults SET stored_bytes = max(0, stored_bytes + ?) WHERE name = ?",
                    (delta, vault),
                )

    # --- policies --------------------------------------------------------------------------

    @staticmethod
    async def _insert_policy(db: aiosqlite.Connection, policy: PolicyRecord) -> None:
        try:
            await db.execute(
                f"INSERT INTO policies ({_columns(_POLICY_COLUMNS)})"
                f" VALUES ({_placeholders(_POLICY_COLUMNS)})",
                {
                    "vault": policy.vault,
                    "name": policy.name,
                    "spec": json.dumps(policy.spec),
                    "created_at": policy.created_at,
                    "updated_at": policy.updated_at,
                },
            )
        except sqlite3.IntegrityError:
            raise Conflict(
                detail=f"vault {policy.vault!r} already has a policy named {policy.name!r}"
            ) from None

    async def create_policy(self, policy: PolicyRecord) -> None:
        async with self._transaction() as db:
            await self._insert_policy(db, policy)
        self._changed([(policy.vault, "")])

    async def update_policy(self, vault: str, name: str, spec: dict[str, Any], now: float) -> None:
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE policies SET spec = ?, updated_at = ? WHERE vault = ? AND name = ?",
                (json.dumps(spec), now, vault, name),
            )
            if cursor.rowcount == 0:
                raise NotFound(kind=f"policy of vault {vault!r}", name=name)
        self._changed([(vault, "")])

    async def delete_policy(self, vault: str, name: str) -> list[str]:
        """Delete a policy. Items whose protection is stopped forget it in the same
        transaction (they kept its name to resume with); their VM ids are returned."""
        async with self._transaction() as db:
            async with db.execute(
                "SELECT vm_id FROM items WHERE vault = ? AND policy = ? AND state = ?"
                " ORDER BY vm_id",
                (vault, name, ItemState.PROTECTION_STOPPED),
            ) as cursor:
                forgotten = [vm_id for (vm_id,) in await cursor.fetchall()]
            await db.execute(
                "UPDATE items SET policy = NULL WHERE vault = ? AND policy = ? AND state = ?",
                (vault, name, ItemState.PROTECTION_STOPPED),
            )
            cursor = await db.execute(
                "DELETE FROM policies WHERE vault = ? AND name = ?", (vault, name)
            )
            if cursor.rowcount == 0:
                raise NotFound(kind=f"policy of vault {vault!r}", name=name)
        self._changed([(vault, ""), *((vault, vm_id) for vm_id in forgotten)])
        return forgotten

    async def policy(self, vault: str, name: str) -> PolicyRecord:
        found = await self._policies("vault = ? AND name = ?", (vault, name))
        if not found:
            raise NotFound(kind=f"policy of vault {vault!r}", name=name)
        return found[0]

    async def policies(self, vault: str = "") -> list[PolicyRecord]:
        if vault:
            return await self._policies("vault = ?", (vault,))
        return await self._policies("1", ())

    async def _policies(self, where: str, params: tuple[str, ...]) -> list[PolicyRecord]:
        async with self.db.execute(
            f"SELECT {_columns(_POLICY_COLUMNS)} FROM policies WHERE {where} ORDER BY vault, name",
            params,
        ) as cursor:
            return [_policy(row) for row in await cursor.fetchall()]

    # --- items -----------------------------------------------------------------------------

    async def insert_item(self, item: ItemRecord) -> None:
        """Register a VM to a vault; Conflict if it is registered already (to any vault)."""
        if await self.insert_items([item]):
            raise Conflict(detail=f"VM {item.vm_id!r} is already registered")

    async def update_item(self, item: ItemRecord) -> None:
        await self.update_items([item])

    async def insert_items(self, items: Sequence[ItemRecord]) -> set[str]:
        """Register many VMs in one transaction; the VM ids of those registered already (to
        any vault), which are left as they were while the others are written."""
        taken: set[str] = set()
        async with self._transaction() as db:
            for item in items:
                try:
                    await db.execute(
                        f"INSERT INTO items ({_columns(_ITEM_COLUMNS)})"
                        f" VALUES ({_placeholders(_ITEM_COLUMNS)})",
                        _item_row(item),
                    )
                except sqlite3.IntegrityError:
                    taken.add(item.vm_id)
        self._changed((item.vault, item.vm_id) for item in items if item.vm_id not in taken)
        return taken

    async def update_items(self, items: Sequence[ItemRecord]) -> None:
        """`update_item` for many items, in one transaction."""
        async with self._transaction() as db:
            await db.executemany(
                f"UPDATE items SET {_assignments(_ITEM_COLUMNS[1:])} WHERE vm_id = :vm_id",
                [_item_row(item) for item in items],
            )
        self._changed((item.vault, item.vm_id) for item in items)

    async def items_of(self, vm_ids: Sequence[str]) -> dict[str, ItemRecord]:
        """The items of `vm_ids` that are registered, by VM id."""
        found: dict[str, ItemRecord] = {}
        ids = list(dict.fromkeys(vm_ids))
        for batch, marks in _in_batches(ids):
            for item in await self._items(f"vm_id IN ({marks})", tuple(batch)):
                found[item.vm_id] = item
        return found

    async def delete_item(self, vm_id: str) -> None:
        async with self._transaction() as db:
            async with db.execute("SELECT vault FROM items WHERE vm_id = ?", (vm_id,)) as cursor:
                vaults = [row["vault"] for row in await cursor.fetchall()]
            await db.execute("DELETE FROM items WHERE vm_id = ?", (vm_id,))
        self._changed((vault, vm_id) for vault in vaults)

    async def item(self, vm_id: str) -> ItemRecord | None:
        found = await self._items("vm_id = ?", (vm_id,))
        return found[0] if found else None

    async def items(self, vault: str = "", *, policy: str = "") -> list[ItemRecord]:
        return await self._items(*_equal(vault=vault, policy=policy))

    async def items_page(
        self, vault: str, states: Sequence[str], after: tuple[str, str] | None, limit: int
    ) -> list[ItemRecord]:
        """Up to `limit` items (of `vault`, in `states`; empty: any) after the (vault, VM id)
        `after`, by vault and VM id."""
        clauses, params = ["1"], []
        if vault:
            clauses.append("vault = ?")
            params.append(vault)
        if states:
            clauses.append(f"state IN ({','.join('?' * len(states))})")
            params += list(states)
        if after is not None:
            clauses.append("(vault, vm_id) > (?, ?)")
            params += list(after)
        async with self.db.execute(
            f"SELECT {_columns(_ITEM_COLUMNS)} FROM items WHERE {' AND '.join(clauses)}"
            " ORDER BY vault, vm_id LIMIT ?",
            [*params, limit],
        ) as cursor:
            return [_item(row) for row in await cursor.fetchall()]

    async def _items(self, where: str, params: tuple[str, ...]) -> list[ItemRecord]:
        async with self.db.execute(
            f"SELECT {_columns(_ITEM_COLUMNS)} FROM items WHERE {where} ORDER BY vault, vm_id",
            params,
        ) as cursor:
            return [_item(row) for row in await cursor.fetchall()]

    # --- agents ----------------------------------------------------------------------------

    async def upsert_agent(
        self,
        *,
        vm_id: str,
        name: str,
        service: str,
        region: str,
        hostname: str,
        agent_version: str,
        disks: Sequence[DiskRecord],
        now: float,
        restore_dirs: Sequence[str] = (),
    ) -> None:
        """Record an agent's hello: who it is and the disks it has now."""
        await self.upsert_agents(
            [
                AgentHello(
                    vm_id=vm_id,
                    name=name,
                    service=service,
                    region=region,
                    hostname=hostname,
                    agent_version=agent_version,
                    disks=tuple(disks),
                    now=now,
                    restore_dirs=tuple(restore_dirs),
                )
            ]
        )

    async def upsert_agents(self, hellos: Sequence[AgentHello]) -> None:
        """Record agents' hellos, all in one transaction (a fleet reconnecting at once)."""
        owners: list[tuple[str, str]] = []
        async with self._transaction() as db:
            await db.executemany(
                f"""INSERT INTO agents ({_columns(_AGENT_COLUMNS)})
                   VALUES ({_placeholders(_AGENT_COLUMNS)})
                   ON CONFLICT (vm_id) DO UPDATE SET name=excluded.name, service=excluded.service,
                     region=excluded.region, hostname=excluded.hostname,
                     agent_version=excluded.agent_version, last_seen=excluded.last_seen,
                     restore_dirs=excluded.restore_dirs""",
                [
                    {
                        "vm_id": hello.vm_id,
                        "name": hello.name,
                        "service": hello.service,
                        "region": hello.region,
                        "hostname": hello.hostname,
                        "agent_version": hello.agent_version,
                        "first_seen": hello.now,
                        "last_seen": hello.now,
                        "restore_dirs": json.dumps(list(hello.restore_dirs)),
                    }
                    for hello in hellos
                ],
            )
            await db.executemany(
                "DELETE FROM disks WHERE vm_id = ?", [(hello.vm_id,) for hello in hellos]
            )
            await db.executemany(
                f"INSERT INTO disks ({_columns(_DISK_COLUMNS)})"
                f" VALUES ({_placeholders(_DISK_COLUMNS)})",
                [
                    {
                        "vm_id": hello.vm_id,
                        "name": d.name,
                        "path": d.path,
                        "size_bytes": d.size_bytes,
                    }
                    for hello in hellos
                    for d in hello.disks
                ],
            )
            if self.on_change:
                for hello in hellos:
                    async with db.execute(
                        "SELECT vault FROM items WHERE vm_id = ?", (hello.vm_id,)
                    ) as cursor:
                        owners += [(row["vault"], hello.vm_id) for row in await cursor.fetchall()]
        self._changed(owners)

    def touch_agent(self, vm_id: str, now: float) -> None:
        """Note a heartbeat; written by the next `flush`."""
        self._heartbeats[vm_id] = now

    async def flush(self) -> None:
        if not self._heartbeats:
            return
        beats, self._heartbeats = self._heartbeats, {}
        async with self._transaction() as db:
            await db.executemany(
                "UPDATE agents SET last_seen = ? WHERE vm_id = ?",
                [(now, vm_id) for vm_id, now in beats.items()],
            )

    async def agent_count(self) -> int:
        async with self.db.execute("SELECT count(*) AS n FROM agents") as cursor:
            row = await cursor.fetchone()
        return int(row["n"]) if row else 0

    async def agent(self, vm_id: str) -> AgentRecord | None:
        """One enrolled VM (and its disks), or None."""
        async with self.db.execute(
            f"SELECT {_columns(_AGENT_COLUMNS)} FROM agents WHERE vm_id = ?", (vm_id,)
        ) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        # Built as every other agent record is: this one left out its restore directories.
        [record] = await self._agent_records([row])
        return record

    async def agent_names(self, vm_ids: Iterable[str]) -> dict[str, tuple[str, str]]:
        """The (service, name) of each enrolled VM among `vm_ids`: what a reply naming a
        few VMs needs, without reading the whole fleet (10,000 agents and their disks for
        every job shown, issue 13)."""
        found: dict[str, tuple[str, str]] = {}
        for batch, marks in _in_batches(list(dict.fromkeys(vm_ids))):
            async with self.db.execute(
                f"SELECT vm_id, service, name FROM agents WHERE vm_id IN ({marks})", batch
            ) as cursor:
                async for row in cursor:
                    found[row["vm_id"]] = (row["service"], row["name"])
        return found

    async def agents(
        self, *, after: tuple[str, str, str] | None = None, limit: int = -1
    ) -> list[AgentRecord]:
        """Enrolled VMs by service, name and VM id; a page of `limit` (-1: every one) of
        those after the (service, name, VM id) `after`."""
        where, params = "", []
        if after is not None:
            where, params = "WHERE (service, name, vm_id) > (?, ?, ?)", list(after)
        async with self.db.execute(
            f"SELECT {_columns(_AGENT_COLUMNS)} FROM agents {where}"
            " ORDER BY service, name, vm_id LIMIT ?",
            [*params, limit],
        ) as cursor:
            rows = await cursor.fetchall()
        return await self._agent_records(list(rows), every=after is None and limit < 0)

    async def agents_named(self, keys: Iterable[str]) -> list[AgentRecord]:
        """The enrolled VMs whose VM id or name is one of `keys` (every VM of a name, so that
        a caller can tell an ambiguous name), without reading the rest of the fleet."""
        rows: dict[str, Any] = {}
        # Each batch is bound twice: half a batch keeps the statement within SQLite's bound.
        for batch, marks in _in_batches(list(dict.fromkeys(keys)), _ID_BATCH // 2):
            async with self.db.execute(
                f"SELECT {_columns(_AGENT_COLUMNS)} FROM agents"
                f" WHERE vm_id IN ({marks}) OR name IN ({marks})",
                [*batch, *batch],
            ) as cursor:
                for row in await cursor.fetchall():
                    rows[row["vm_id"]] = row
        return await self._agent_records(list(rows.values()))

    async def _agent_records(
        self, rows: Sequence[Any], *, every: bool = False
    ) -> list[AgentRecord]:
        """Records of the agents `rows`, with their disks (`every`: the rows are the whole
        table, and so are the disks read)."""
        disks: dict[str, list[DiskRecord]] = {}
        if every:
            async with self.db.execute(
                f"SELECT {_columns(_DISK_COLUMNS)} FROM disks ORDER BY vm_id, name"
            ) as cursor:
                async for row in cursor:
                    disks.setdefault(row["vm_id"], []).append(_disk(row))
        else:
            ids = [row["vm_id"] for row in rows]
            for batch, marks in _in_batches(ids):
                async with self.db.execute(
                    f"SELECT {_columns(_DISK_COLUMNS)} FROM disks"
                    f" WHERE vm_id IN ({marks}) ORDER BY vm_id, name",
                    batch,
                ) as cursor:
                    async for row in cursor:
                        disks.setdefault(row["vm_id"], []).append(_disk(row))
        return [
            AgentRecord(
                vm_id=row["vm_id"],
                name=row["name"],
                service=row["service"],
                region=row["region"],
                hostname=row["hostname"],
                agent_version=row["agent_version"],
                first_seen=row["first_seen"],
                last_seen=max(row["last_seen"], self._heartbeats.get(row["vm_id"], 0.0)),
                disks=tuple(disks.get(row["vm_id"], ())),
                restore_dirs=tuple(json.loads(row["restore_dirs"])),
            )
            for row in rows
        ]

    # --- jobs ------------------------------------------------------------------------------

    async def insert_job(self, job: JobRecord) -> None:
        async with self._transaction() as db:
            await db.execute(
                f"INSERT INTO jobs ({_columns(_JOB_COLUMNS)})"
                f" VALUES ({_placeholders(_JOB_COLUMNS)})",
                _job_row(job),
            )

    async def insert_jobs(self, jobs: Sequence[JobRecord]) -> None:
        """Many jobs' records in one transaction (an operator's call naming many VMs)."""
        async with self._transaction() as db:
            await db.executemany(
                f"INSERT INTO jobs ({_columns(_JOB_COLUMNS)})"
                f" VALUES ({_placeholders(_JOB_COLUMNS)})",
                [_job_row(job) for job in jobs],
            )

    async def update_job(self, job: JobRecord) -> None:
        """Write the job's record; what it is (operation, vault, VM, start) never changes."""
        await self.update_jobs([job])

    async def update_jobs(self, jobs: Sequence[JobRecord]) -> None:
        """`update_job` for many jobs, in one transaction."""
        changing = [
            c for c in _JOB_COLUMNS if c not in ("id", "operation", "vault", "vm_id", "started_at")
        ]
        async with self._transaction() as db:
            await db.executemany(
                f"UPDATE jobs SET {_assignments(changing)} WHERE id = :id",
                [_job_row(job) for job in jobs],
            )

    async def job_ids(self, prefix: str, limit: int) -> list[tuple[str, str, str]]:
        """(id, operation, vm id) of up to `limit` jobs whose id begins with `prefix`."""
        async with self.db.execute(
            "SELECT id, operation, vm_id FROM jobs WHERE id >= ? AND id < ? ORDER BY id LIMIT ?",
            (prefix, prefix + "\U0010ffff", limit),
        ) as cursor:
            return [(job_id, op, vm_id) for job_id, op, vm_id in await cursor.fetchall()]

    async def job(self, job_id: str) -> JobRecord:
        async with self.db.execute(
            f"SELECT {_columns(_JOB_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)
        ) as cursor:
            row = await cursor.fetchone()
        if row is None:
            raise NotFound(kind="job", name=job_id)
        return _job(row)

    async def jobs(self, where: JobFilter) -> list[JobRecord]:
        clauses: list[str] = []
        params: list[Any] = []
        if where.statuses:
            clauses.append(f"status IN ({','.join('?' * len(where.statuses))})")
            params += where.statuses
        if where.operations:
            clauses.append(f"operation IN ({','.join('?' * len(where.operations))})")
            params += where.operations
        if where.vm_id:
            clauses.append("vm_id = ?")
            params.append(where.vm_id)
        if where.vault:
            clauses.append("vault = ?")
            params.append(where.vault)
        if where.started_from is not None:
            clauses.append("started_at >= ?")
            params.append(where.started_from)
        if where.started_to is not None:
            clauses.append("started_at < ?")
            params.append(where.started_to)
        if where.before is not None:
            clauses.append("(started_at, id) < (?, ?)")
            params += list(where.before)
        sql = f"SELECT {_columns(_JOB_COLUMNS)} FROM jobs"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY started_at DESC, id DESC LIMIT ?"
        params.append(where.limit)
        async with self.db.execute(sql, params) as cursor:
            return [_job(row) for row in await cursor.fetchall()]

    async def fail_interrupted_jobs(self, now: float, code: str, message: str) -> list[JobRecord]:
        """Jobs left running by a controller that stopped: they cannot finish any more.
        Returns them as they are now recorded (failed)."""
        unfinished = (JobStatus.IN_PROGRESS.value, JobStatus.CANCELLING.value)
        async with self._transaction() as db:
            async with db.execute(
                f"SELECT {_columns(_JOB_COLUMNS)} FROM jobs WHERE status IN (?,?)", unfinished
            ) as cursor:
                jobs = [_job(row) for row in await cursor.fetchall()]
            await db.execute(
                "UPDATE jobs SET status=?, ended_at=?, error_code=?, error_message=?"
                " WHERE status IN (?,?)",
                (JobStatus.FAILED.value, now, code, message, *unfinished),
            )
        for job in jobs:
            job.status, job.ended_at, job.error_code, job.error_message = (
                JobStatus.FAILED, now, code, message,
            )  # fmt: skip
        return jobs

    async def job_counts(self, vault: str, since: float) -> dict[JobStatus, int]:
        """Jobs of a vault started at or after `since`, counted by status."""
        async with self.db.execute(
            "SELECT status, count(*) AS jobs FROM jobs WHERE vault = ? AND started_at >= ?"
            " GROUP BY status",
            (vault, since),
        ) as cursor:
            return {JobStatus(row["status"]): row["jobs"] for row in await cursor.fetchall()}

    # --- recovery points -------------------------------------------------------------------

    async def insert_recovery_point(self, rp: RecoveryPointRecord) -> None:
        async with self._transaction() as db:
            await self._insert_recovery_point(db, rp)
        self._changed([(rp.vault, rp.vm_id)])

    @staticmethod
    async def _insert_recovery_point(db: aiosqlite.Connection, rp: RecoveryPointRecord) -> None:
        await db.execute(
            f"INSERT OR IGNORE INTO recovery_points ({_columns(_RP_COLUMNS)})"
            f" VALUES ({_placeholders(_RP_COLUMNS)})",
            _rp_row(rp),
        )
        await db.executemany(
            f"INSERT OR IGNORE INTO recovery_point_disks ({_columns(_RP_DISK_COLUMNS)})"
            f" VALUES ({_placeholders(_RP_DISK_COLUMNS)})",
            [
                {
                    "recovery_point_id": rp.id,
                    "name": d.name,
                    "size_bytes": d.size_bytes,
                    "chunk_size": d.chunk_size,
                    "chunk_count": d.chunk_count,
                    "consistency": d.consistency.value if d.consistency else "",
                }
                for d in rp.disks
            ],
        )

    async def set_kept_by(self, kept: dict[str, tuple[str, ...]]) -> None:
        """Record which retention rules keep each recovery point (after a prune)."""
        async with self._transaction() as db:
            await db.executemany(
                "UPDATE recovery_points SET kept_by = ? WHERE id = ?",
                [(",".join(rules), rp_id) for rp_id, rules in kept.items()],
            )
            owners = await self._owners(db, list(kept))
        self._changed(owners)

    async def record_drill(self, rp_id: str, drill: DrillRecord) -> None:
        """Record a restore drill of a recovery point (one deleted meanwhile is left alone)."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE recovery_points SET drilled_at = ?, drill_job_id = ?, drill_seconds = ?,"
                " drill_outcome = ?, drill_summary = ? WHERE id = ?",
                (drill.at, drill.job_id, drill.seconds, drill.outcome.value, drill.summary, rp_id),
            )

    async def last_drills(self, vault: str) -> dict[str, RecoveryPointRecord]:
        """Per VM of a vault: its most recently drilled recovery point (VMs never drilled are
        left out)."""
        drilled = await self._recovery_points(
            "vault = ? AND drilled_at IS NOT NULL ORDER BY drilled_at", (vault,)
        )
        return {rp.vm_id: rp for rp in drilled}  # the latest drill of each VM wins

    async def delete_recovery_point(self, rp_id: str) -> None:
        async with self._transaction() as db:
            owners = await self._owners(db, [rp_id])
            await db.execute("DELETE FROM recovery_points WHERE id = ?", (rp_id,))
        self._changed(owners)

    async def recovery_points(self, vm_id: str = "", vault: str = "") -> list[RecoveryPointRecord]:
        """Recovery points, oldest first; of one VM and/or one vault when given."""
        return await self._recovery_points(*_equal(vm_id=vm_id, vault=vault))

    async def recovery_point(self, rp_id: str) -> RecoveryPointRecord:
        found = await self._recovery_points("id = ?", (rp_id,))
        if not found:
            raise NotFound(kind="recovery point", name=rp_id)
        return found[0]

    async def latest_recovery_point(self, vm_id: str) -> RecoveryPointRecord | None:
        found = await self._recovery_points("vm_id = ? ORDER BY created_at DESC LIMIT 1", (vm_id,))
        return found[0] if found else None

    async def latest_vaults(self, vm_ids: Sequence[str]) -> dict[str, str]:
        """The vault of each VM's latest recovery point, for those of `vm_ids` that have one."""
        found: dict[str, str] = {}
        ids = list(dict.fromkeys(vm_ids))
        for batch, marks in _in_batches(ids):
            # SQLite gives the bare column `vault` from the row whose created_at is the max.
            async with self.db.execute(
                "SELECT vm_id, vault, max(created_at) FROM recovery_points"
                f" WHERE vm_id IN ({marks}) GROUP BY vm_id",
                batch,
            ) as cursor:
                found.update({row["vm_id"]: row["vault"] for row in await cursor.fetchall()})
        return found

    async def recovery_point_summary(self, vault: str) -> dict[str, tuple[int, float]]:
        """Per VM of a vault: how many recovery points, and when the newest was taken."""
        async with self.db.execute(
            "SELECT vm_id, count(*) AS points, max(created_at) AS newest FROM recovery_points"
            " WHERE vault = ? GROUP BY vm_id",
            (vault,),
        ) as cursor:
            return {row["vm_id"]: (row["points"], row["newest"]) for row in await cursor.fetchall()}

    async def recovery_point_totals(self, vault: str) -> tuple[int, int]:
        """How many recovery points a vault holds, and the data bytes they would restore."""
        async with self.db.execute(
            "SELECT count(*) AS points, coalesce(sum(data_bytes), 0) AS data_bytes"
            " FROM recovery_points WHERE vault = ?",
            (vault,),
        ) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return int(row["points"]), int(row["data_bytes"])

    async def _recovery_points(
        self, where: str, params: tuple[str, ...]
    ) -> list[RecoveryPointRecord]:
        if "ORDER BY" not in where:
            where += " ORDER BY created_at"
        async with self.db.execute(
            f"SELECT {_columns(_RP_COLUMNS + _RP_DRILL_COLUMNS)} FROM recovery_points"
            f" WHERE {where}",
            params,
        ) as cursor:
            rows = await cursor.fetchall()
        if not rows:
            return []
        ids = [row["id"] for row in rows]
        disks: dict[str, list[RecoveryPointDiskRecord]] = {}
        for batch, marks in _in_batches(ids):
            async with self.db.execute(
                f"SELECT {_columns(_RP_DISK_COLUMNS)} FROM recovery_point_disks"
                f" WHERE recovery_point_id IN ({marks}) ORDER BY name",
                batch,
            ) as cursor:
                async for row in cursor:
                    disks.setdefault(row["recovery_point_id"], []).append(_rp_disk(row))
        return [_recovery_point(row, disks.get(row["id"], ())) for row in rows]

    # --- integrity -------------------------------------------------------------------------

    async def update_vault(
        self,
        vault: str,
        *,
        max_concurrent_backups: int | None = None,
        verify_new: bool | None = None,
        reverify_days: int | None = None,
        soft_delete_days: int | None = None,
        shared_dedup: bool | None = None,
        full_read_days: int | None = None,
    ) -> None:
        """Change a vault's settings in one transaction (None: unchanged)."""

        def flag(value: bool | None) -> int | None:
            return None if value is None else int(value)

        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE vaults SET"
                " max_concurrent_backups = coalesce(?, max_concurrent_backups),"
                " verify_new = coalesce(?, verify_new),"
                " reverify_days = coalesce(?, reverify_days),"
                " soft_delete_days = coalesce(?, soft_delete_days),"
                " full_read_days = coalesce(?, full_read_days),"
                " shared_dedup = coalesce(?, shared_dedup) WHERE name = ?",
                (
                    max_concurrent_backups,
                    flag(verify_new),
                    reverify_days,
                    soft_delete_days,
                    full_read_days,
                    flag(shared_dedup),
                    vault,
                ),
            )
            if cursor.rowcount == 0:
                raise NotFound(kind="vault", name=vault)
        self._changed([(vault, "")])

    async def bad_chunks(self, vault: str) -> list[bytes]:
        """Digests of the vault's chunks known missing or corrupt."""
        async with self.db.execute(
            "SELECT digest FROM bad_chunks WHERE vault = ?", (vault,)
        ) as cursor:
            return [bytes(row["digest"]) for row in await cursor.fetchall()]

    async def add_bad_chunks(
        self, vault: str, found: dict[bytes, str], now: float, found_by: str
    ) -> None:
        """Record chunks found missing or corrupt (one already recorded keeps its record)."""
        async with self._transaction() as db:
            await db.executemany(
                "INSERT OR IGNORE INTO bad_chunks (vault, digest, reason, found_at, found_by)"
                " VALUES (?, ?, ?, ?, ?)",
                [(vault, digest, reason, now, found_by) for digest, reason in found.items()],
            )

    async def remove_bad_chunks(self, vault: str, digests: Sequence[bytes]) -> None:
        async with self._transaction() as db:
            await db.executemany(
                "DELETE FROM bad_chunks WHERE vault = ? AND digest = ?",
                [(vault, digest) for digest in digests],
            )

    async def record_verified(
        self,
        outcomes: Sequence[tuple[str, Sequence[DamageRecord], str]],
        now: float,
        job_id: str,
    ) -> None:
        """What a verify found of each recovery point it read: (id, damaged chunks, detail);
        whole when it has neither. Points deleted meanwhile are left out."""
        async with self._transaction() as db:
            for rp_id, damage, detail in outcomes:
                state = Verification.DAMAGED if damage or detail else Verification.VERIFIED
                await db.execute(
                    "INSERT OR REPLACE INTO verifications"
                    " (recovery_point_id, state, verified_at, changed_at, job_id, detail)"
                    " SELECT id, ?, ?, ?, ?, ? FROM recovery_points WHERE id = ?",
                    (state.value, now, now, job_id, detail, rp_id),
                )
                await db.execute("DELETE FROM damaged_chunks WHERE recovery_point_id = ?", (rp_id,))
                await self._insert_damage(db, rp_id, damage)
            owners = await self._owners(db, [rp_id for rp_id, _, _ in outcomes])
        self._changed(owners)

    async def record_damage(
        self, damage: dict[str, Sequence[DamageRecord]], now: float, job_id: str
    ) -> None:
        """Chunks found bad outside a verify (a failed read) that recovery points need: they
        are damaged from now, whatever a verify said of them before."""
        async with self._transaction() as db:
            for rp_id, chunks in damage.items():
                await db.execute(
                    "INSERT INTO verifications"
                    " (recovery_point_id, state, verified_at, changed_at, job_id)"
                    " SELECT id, ?, NULL, ?, ? FROM recovery_points WHERE id = ?"
                    " ON CONFLICT (recovery_point_id) DO UPDATE SET state = excluded.state,"
                    " changed_at = excluded.changed_at, job_id = excluded.job_id",
                    (Verification.DAMAGED.value, now, job_id, rp_id),
                )
                await self._insert_damage(db, rp_id, chunks)
            owners = await self._owners(db, list(damage))
        self._changed(owners)

    async def record_point_damaged(self, rp_id: str, detail: str, now: float, job_id: str) -> None:
        """A recovery point damaged for a reason that is not a chunk's (`detail`: an index
        that cannot be read, a manifest gone), whatever a verify said of it before."""
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO verifications"
                " (recovery_point_id, state, verified_at, changed_at, job_id, detail)"
                " SELECT id, ?, NULL, ?, ?, ? FROM recovery_points WHERE id = ?"
                " ON CONFLICT (recovery_point_id) DO UPDATE SET state = excluded.state,"
                " changed_at = excluded.changed_at, job_id = excluded.job_id,"
                " detail = excluded.detail",
                (Verification.DAMAGED.value, now, job_id, detail, rp_id),
            )

    @staticmethod
    async def _insert_damage(
        db: aiosqlite.Connection, rp_id: str, damage: Sequence[DamageRecord]
    ) -> None:
        await db.executemany(
            "INSERT OR IGNORE INTO damaged_chunks"
            " (recovery_point_id, digest, disk, chunk, reason)"
            " SELECT id, ?, ?, ?, ? FROM recovery_points WHERE id = ?",
            [(d.digest, d.disk, d.chunk, d.reason, rp_id) for d in damage],
        )

    async def repair_damage(
        self, vault: str, digests: Sequence[bytes], now: float, job_id: str
    ) -> list[str]:
        """Chunks of the vault stored again: the recovery points that needed them no longer
        do, and those left with no damaged chunk are healed (a verify pending). Their ids."""
        async with self._transaction() as db:
            await db.executemany(
                "DELETE FROM damaged_chunks WHERE digest = ? AND recovery_point_id IN"
                " (SELECT id FROM recovery_points WHERE vault = ?)",
                [(digest, vault) for digest in digests],
            )
            async with db.execute(
                "SELECT v.recovery_point_id FROM verifications v"
                " JOIN recovery_points r ON r.id = v.recovery_point_id"
                " WHERE r.vault = ? AND v.state = ? AND v.detail = '' AND NOT EXISTS"
                " (SELECT 1 FROM damaged_chunks d WHERE d.recovery_point_id = v.recovery_point_id)",
                (vault, Verification.DAMAGED.value),
            ) as cursor:
                healed = [row["recovery_point_id"] for row in await cursor.fetchall()]
            await db.executemany(
                "UPDATE verifications SET state = ?, changed_at = ?, job_id = ?"
                " WHERE recovery_point_id = ?",
                [(Verification.HEALED.value, now, job_id, rp_id) for rp_id in healed],
            )
            owners = await self._owners(db, healed)
        self._changed(owners)
        return healed

    async def verifications(
        self, rp_ids: Sequence[str], *, damage_shown: int = 5
    ) -> dict[str, VerificationRecord]:
        """The integrity of each of `rp_ids` that was ever looked at, with its first few
        damaged chunks."""
        found: dict[str, VerificationRecord] = {}
        for batch, marks in _in_batches(rp_ids):
            async with self.db.execute(
                "SELECT v.*, (SELECT count(*) FROM damaged_chunks d"
                "  WHERE d.recovery_point_id = v.recovery_point_id) AS damaged"
                f" FROM verifications v WHERE v.recovery_point_id IN ({marks})",
                batch,
            ) as cursor:
                rows = await cursor.fetchall()
            shown: dict[str, list[DamageRecord]] = {}
            async with self.db.execute(
                "SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY recovery_point_id"
                " ORDER BY disk, chunk) AS n FROM damaged_chunks"
                f" WHERE recovery_point_id IN ({marks})) WHERE n <= ?"
                " ORDER BY recovery_point_id, disk, chunk",
                [*batch, damage_shown],
            ) as cursor:
                async for row in cursor:
                    shown.setdefault(row["recovery_point_id"], []).append(
                        DamageRecord(row["disk"], row["chunk"], bytes(row["digest"]), row["reason"])
                    )
            for row in rows:
                rp_id = row["recovery_point_id"]
                found[rp_id] = VerificationRecord(
                    recovery_point_id=rp_id,
                    state=Verification(row["state"]),
                    verified_at=row["verified_at"],
                    changed_at=row["changed_at"],
                    job_id=row["job_id"],
                    detail=row["detail"],
                    damaged_chunks=row["damaged"],
                    damage=tuple(shown.get(rp_id, ())),
                )
        return found

    async def verification_counts(self, vault: str) -> dict[Verification | None, int]:
        """The vault's recovery points by integrity state (None: never verified)."""
        async with self.db.execute(
            "SELECT v.state AS state, count(*) AS points FROM recovery_points r"
            " LEFT JOIN verifications v ON v.recovery_point_id = r.id"
            " WHERE r.vault = ? GROUP BY v.state",
            (vault,),
        ) as cursor:
            return {
                Verification(row["state"]) if row["state"] else None: row["points"]
                for row in await cursor.fetchall()
            }

    async def last_verified_at(self, vault: str) -> float | None:
        async with self.db.execute(
            "SELECT max(v.verified_at) AS at FROM verifications v"
            " JOIN recovery_points r ON r.id = v.recovery_point_id WHERE r.vault = ?",
            (vault,),
        ) as cursor:
            row = await cursor.fetchone()
        return row["at"] if row is not None else None

    async def points_to_verify(self, vault: str, verified_before: float) -> list[str]:
        """The vault's recovery points never verified, healed since (a verify pending), or
        last verified before `verified_before`; oldest first."""
        async with self.db.execute(
            "SELECT r.id AS id FROM recovery_points r"
            " LEFT JOIN verifications v ON v.recovery_point_id = r.id"
            " WHERE r.vault = ? AND (v.state IS NULL OR v.state = ? OR v.verified_at IS NULL"
            " OR v.verified_at < ?) ORDER BY r.created_at",
            (vault, Verification.HEALED.value, verified_before),
        ) as cursor:
            return [row["id"] for row in await cursor.fetchall()]

    async def healed_points(self, vault: str) -> list[str]:
        """The vault's recovery points whose damage was repaired, awaiting a verify."""
        async with self.db.execute(
            "SELECT r.id AS id FROM recovery_points r"
            " JOIN verifications v ON v.recovery_point_id = r.id"
            " WHERE r.vault = ? AND v.state = ? ORDER BY r.created_at",
            (vault, Verification.HEALED.value),
        ) as cursor:
            return [row["id"] for row in await cursor.fetchall()]

    # --- vault upgrades --------------------------------------------------------------------

    async def upgrade(self, vault: str) -> UpgradeRecord | None:
        """The vault's upgrade in progress, if there is one."""
        found = await self._upgrades("vault = ?", (vault,))
        return found[0] if found else None

    async def upgrades(self) -> list[UpgradeRecord]:
        """Every upgrade in progress."""
        return await self._upgrades("1", ())

    async def _upgrades(self, where: str, params: tuple[str, ...]) -> list[UpgradeRecord]:
        async with self.db.execute(
            "SELECT vault, from_format, to_format, phase, resume, job_id, started_at"
            f" FROM vault_upgrades WHERE {where} ORDER BY vault",
            params,
        ) as cursor:
            return [
                UpgradeRecord(
                    vault=row["vault"],
                    from_format=row["from_format"],
                    to_format=row["to_format"],
                    phase=row["phase"],
                    resume=bool(row["resume"]),
                    job_id=row["job_id"],
                    started_at=row["started_at"],
                )
                for row in await cursor.fetchall()
            ]

    async def save_upgrade(self, upgrade: UpgradeRecord) -> None:
        """Record the vault's upgrade as it stands (a new one, or one a job takes up again)."""
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO vault_upgrades"
                " (vault, from_format, to_format, phase, resume, job_id, started_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (vault) DO UPDATE SET"
                " phase = excluded.phase, resume = excluded.resume, job_id = excluded.job_id",
                (
                    upgrade.vault,
                    upgrade.from_format,
                    upgrade.to_format,
                    upgrade.phase,
                    int(upgrade.resume),
                    upgrade.job_id,
                    upgrade.started_at,
                ),
            )

    async def upgrade_chunk_names(self, vault: str) -> dict[bytes, tuple[bytes, str]]:
        """Old chunk name -> (new name, why it could not be read, or '') found so far."""
        async with self.db.execute(
            "SELECT old_digest, new_digest, lost FROM upgrade_chunks WHERE vault = ?", (vault,)
        ) as cursor:
            return {
                bytes(row["old_digest"]): (bytes(row["new_digest"]), row["lost"])
                for row in await cursor.fetchall()
            }

    async def add_upgrade_chunk_names(
        self, vault: str, names: dict[bytes, tuple[bytes, str]]
    ) -> None:
        if names:
            async with self._transaction() as db:
                await db.executemany(
                    "INSERT OR REPLACE INTO upgrade_chunks (vault, old_digest, new_digest, lost)"
                    " VALUES (?, ?, ?, ?)",
                    [(vault, old, new, lost) for old, (new, lost) in names.items()],
                )

    async def rename_damaged_chunks(self, vault: str, rp_ids: Sequence[str] = ()) -> None:
        """The damaged chunks recorded of the vault's recovery points (of `rp_ids`, when given)
        under their old names now carry their new ones (the upgrade's chunk names)."""
        ids = list(rp_ids)
        points = "SELECT id FROM recovery_points WHERE vault = ?"
        if ids:
            points += f" AND id IN ({','.join('?' * len(ids))})"
        async with self._transaction() as db:
            await db.execute(
                "UPDATE OR REPLACE damaged_chunks SET digest = (SELECT u.new_digest FROM"
                " upgrade_chunks u WHERE u.vault = ? AND u.old_digest = damaged_chunks.digest)"
                f" WHERE recovery_point_id IN ({points}) AND digest IN"
                " (SELECT old_digest FROM upgrade_chunks WHERE vault = ?)",
                [vault, vault, *ids, vault],
            )

    async def end_upgrade(self, vault: str) -> list[bytes]:
        """The vault's upgrade is done: its record and chunk names go, with the bad chunks
        recorded under old names (nothing references those names any more). Those names."""
        async with self._transaction() as db:
            async with db.execute(
                "SELECT digest FROM bad_chunks WHERE vault = ? AND digest IN"
                " (SELECT old_digest FROM upgrade_chunks WHERE vault = ?)",
                (vault, vault),
            ) as cursor:
                old = [bytes(row["digest"]) for row in await cursor.fetchall()]
            await db.executemany(
                "DELETE FROM bad_chunks WHERE vault = ? AND digest = ?",
                [(vault, digest) for digest in old],
            )
            await db.execute("DELETE FROM upgrade_chunks WHERE vault = ?", (vault,))
            await db.execute("DELETE FROM vault_upgrades WHERE vault = ?", (vault,))
        return old

    # --- off-site copies -------------------------------------------------------------------

    async def set_copy_target(self, vault: str, target: str) -> None:
        """Copy the vault's recovery points to `target` from now on ('' stops copying)."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE vaults SET copy_target = ? WHERE name = ?", (target, vault)
            )
            if cursor.rowcount == 0:
                raise NotFound(kind="vault", name=vault)

    async def record_copies(
        self, target: str, rp_ids: Sequence[str], now: float, job_id: str
    ) -> None:
        """Recovery points found complete in `target`'s copy (a point recorded already keeps
        its record; one deleted from the catalog meanwhile is left out)."""
        async with self._transaction() as db:
            await db.executemany(
                "INSERT OR IGNORE INTO copies (recovery_point_id, target, copied_at, job_id)"
                " SELECT id, ?, ?, ? FROM recovery_points WHERE id = ?",
                [(target, now, job_id, rp_id) for rp_id in rp_ids],
            )

    async def forget_copies(self, target: str, rp_ids: Sequence[str]) -> None:
        """Recovery points no longer (or never) complete in `target`'s copy."""
        async with self._transaction() as db:
            await db.executemany(
                "DELETE FROM copies WHERE recovery_point_id = ? AND target = ?",
                [(rp_id, target) for rp_id in rp_ids],
            )

    async def copies(self, rp_ids: Sequence[str]) -> dict[str, list[CopyRecord]]:
        """The copies each of `rp_ids` is complete in."""
        found: dict[str, list[CopyRecord]] = {}
        for batch, marks in _in_batches(rp_ids):
            async with self.db.execute(
                "SELECT recovery_point_id, target, copied_at, job_id FROM copies"
                f" WHERE recovery_point_id IN ({marks}) ORDER BY target",
                batch,
            ) as cursor:
                async for row in cursor:
                    found.setdefault(row["recovery_point_id"], []).append(
                        CopyRecord(
                            row["recovery_point_id"], row["target"], row["copied_at"],
                            row["job_id"],
                        )
                    )  # fmt: skip
        return found

    async def copied_points(self, vault: str, target: str) -> set[str]:
        """The vault's recovery points recorded complete in `target`'s copy."""
        async with self.db.execute(
            "SELECT c.recovery_point_id AS id FROM copies c"
            " JOIN recovery_points r ON r.id = c.recovery_point_id"
            " WHERE r.vault = ? AND c.target = ?",
            (vault, target),
        ) as cursor:
            return {row["id"] for row in await cursor.fetchall()}

    async def copy_lag(self, vault: str, target: str) -> CopyLag:
        """How far `target`'s copy of the vault is behind its recovery points."""
        async with self.db.execute(
            "SELECT count(c.target) AS copied, count(*) - count(c.target) AS not_copied,"
            " min(CASE WHEN c.target IS NULL THEN r.created_at END) AS oldest_missing,"
            " max(CASE WHEN c.target IS NULL THEN r.created_at END) AS newest_missing,"
            " max(CASE WHEN c.target IS NOT NULL THEN r.created_at END) AS newest_copied"
            " FROM recovery_points r LEFT JOIN copies c"
            " ON c.recovery_point_id = r.id AND c.target = ? WHERE r.vault = ?",
            (target, vault),
        ) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return CopyLag(
            copied=int(row["copied"]),
            not_copied=int(row["not_copied"]),
            oldest_not_copied_at=row["oldest_missing"],
            newest_not_copied_at=row["newest_missing"],
            newest_copied_at=row["newest_copied"],
        )

    async def add_copy_bad_chunks(
        self, vault: str, target: str, digests: Sequence[bytes], now: float
    ) -> None:
        """Chunks found missing or corrupt in `target`'s copy of the vault."""
        async with self._transaction() as db:
            await db.executemany(
                "INSERT OR IGNORE INTO copy_bad_chunks (vault, target, digest, found_at)"
                " VALUES (?, ?, ?, ?)",
                [(vault, target, digest, now) for digest in digests],
            )

    async def copy_bad_chunks(self, vault: str, target: str) -> list[bytes]:
        async with self.db.execute(
            "SELECT digest FROM copy_bad_chunks WHERE vault = ? AND target = ? ORDER BY digest",
            (vault, target),
        ) as cursor:
            return [bytes(row["digest"]) for row in await cursor.fetchall()]

    async def remove_copy_bad_chunks(
        self, vault: str, target: str, digests: Sequence[bytes]
    ) -> None:
        async with self._transaction() as db:
            await db.executemany(
                "DELETE FROM copy_bad_chunks WHERE vault = ? AND target = ? AND digest = ?",
                [(vault, target, digest) for digest in digests],
            )

    # --- soft-deleted recovery points ------------------------------------------------------

    async def soft_delete_recovery_point(
        self,
        rp_id: str,
        *,
        deleted_at: float,
        purge_at: float,
        deleted_by: str,
        policy: str | None,
    ) -> DeletedRecoveryPointRecord:
        """Move a live recovery point to the deleted ones, in one transaction; NotFound if it
        is not live. Its verification goes with its row: an undeleted point is unverified."""
        async with self._transaction() as db:
            found = await self._recovery_points("id = ?", (rp_id,))
            if not found:
                raise NotFound(kind="recovery point", name=rp_id)
            record = DeletedRecoveryPointRecord(
                point=found[0],
                deleted_at=deleted_at,
                purge_at=purge_at,
                deleted_by=deleted_by,
                policy=policy,
            )
            await self._insert_deleted(db, record)
            await db.execute("DELETE FROM recovery_points WHERE id = ?", (rp_id,))
        self._changed([(record.point.vault, record.point.vm_id)])
        return record

    async def undelete_recovery_point(self, rp_id: str) -> DeletedRecoveryPointRecord:
        """Move a soft-deleted recovery point back to the live ones; what it was. NotFound if
        it is not soft-deleted."""
        async with self._transaction() as db:
            async with db.execute(
                f"SELECT {_columns(_DELETED_COLUMNS)} FROM deleted_recovery_points WHERE id = ?",
                (rp_id,),
            ) as cursor:
                row = await cursor.fetchone()
            if row is None:
                raise NotFound(kind="deleted recovery point", name=rp_id)
            record = _deleted(row)
            await self._insert_recovery_point(db, record.point)
            await db.execute("DELETE FROM deleted_recovery_points WHERE id = ?", (rp_id,))
        self._changed([(record.point.vault, record.point.vm_id)])
        return record

    async def purge_deleted_recovery_point(self, rp_id: str) -> None:
        """Forget a soft-deleted recovery point (purged from its datastore)."""
        async with self._transaction() as db:
            await db.execute("DELETE FROM deleted_recovery_points WHERE id = ?", (rp_id,))

    async def insert_deleted_recovery_point(self, record: DeletedRecoveryPointRecord) -> None:
        """Record a soft-deleted recovery point as it is (a catalog rebuilt from datastores)."""
        async with self._transaction() as db:
            await self._insert_deleted(db, record)

    @staticmethod
    async def _insert_deleted(db: aiosqlite.Connection, record: DeletedRecoveryPointRecord) -> None:
        await db.execute(
            f"INSERT OR REPLACE INTO deleted_recovery_points ({_columns(_DELETED_COLUMNS)})"
            f" VALUES ({_placeholders(_DELETED_COLUMNS)})",
            _deleted_row(record),
        )

    async def deleted_recovery_points(
        self, vm_id: str = "", vault: str = ""
    ) -> list[DeletedRecoveryPointRecord]:
        """Soft-deleted recovery points, oldest first; of one VM and/or one vault when given."""
        where, params = _equal(vm_id=vm_id, vault=vault)
        return await self._deleted_points(f"{where} ORDER BY created_at", params)

    async def deleted_recovery_point(self, rp_id: str) -> DeletedRecoveryPointRecord:
        found = await self._deleted_points("id = ?", (rp_id,))
        if not found:
            raise NotFound(kind="deleted recovery point", name=rp_id)
        return found[0]

    async def deleted_due(self, vault: str, now: float) -> list[DeletedRecoveryPointRecord]:
        """The vault's soft-deleted recovery points whose purge time has come."""
        return await self._deleted_points(
            "vault = ? AND purge_at <= ? ORDER BY purge_at", (vault, now)
        )

    async def deleted_totals(self, vault: str) -> tuple[int, float | None]:
        """How many soft-deleted recovery points a vault holds, and when the last is purged."""
        async with self.db.execute(
            "SELECT count(*) AS points, max(purge_at) AS last FROM deleted_recovery_points"
            " WHERE vault = ?",
            (vault,),
        ) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return int(row["points"]), row["last"]

    async def _deleted_points(
        self, where: str, params: tuple[Any, ...]
    ) -> list[DeletedRecoveryPointRecord]:
        async with self.db.execute(
            f"SELECT {_columns(_DELETED_COLUMNS)} FROM deleted_recovery_points WHERE {where}",
            params,
        ) as cursor:
            return [_deleted(row) for row in await cursor.fetchall()]

    # --- a catalog rebuilt from datastores (controller/recovery.py) -------------------------

    async def insert_recovered_agent(self, agent: AgentRecord) -> None:
        """Record a VM known only from its datastore, with the times given."""
        async with self._transaction() as db:
            await db.execute(
                f"INSERT OR IGNORE INTO agents ({_columns(_AGENT_COLUMNS)})"
                f" VALUES ({_placeholders(_AGENT_COLUMNS)})",
                {
                    "vm_id": agent.vm_id,
                    "name": agent.name,
                    "service": agent.service,
                    "region": agent.region,
                    "hostname": agent.hostname,
                    "agent_version": agent.agent_version,
                    "first_seen": agent.first_seen,
                    "last_seen": agent.last_seen,
                    "restore_dirs": json.dumps(list(agent.restore_dirs)),
                },
            )
            await db.executemany(
                f"INSERT OR IGNORE INTO disks ({_columns(_DISK_COLUMNS)})"
                f" VALUES ({_placeholders(_DISK_COLUMNS)})",
                [
                    {"vm_id": agent.vm_id, "name": d.name, "path": d.path,
                     "size_bytes": d.size_bytes}
                    for d in agent.disks
                ],
            )  # fmt: skip

    async def insert_recovered_verification(self, record: VerificationRecord) -> None:
        """Record what the last verify found of a recovery point, as its datastore kept it."""
        async with self._transaction() as db:
            await db.execute(
                "INSERT OR REPLACE INTO verifications"
                " (recovery_point_id, state, verified_at, changed_at, job_id, detail)"
                " SELECT id, ?, ?, ?, ?, ? FROM recovery_points WHERE id = ?",
                (
                    record.state.value,
                    record.verified_at,
                    record.changed_at,
                    record.job_id,
                    record.detail,
                    record.recovery_point_id,
                ),
            )

    async def set_vault_settings(self, vault: VaultRecord) -> None:
        """Give an existing vault the settings and counts of `vault` (a rebuilt catalog)."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE vaults SET max_concurrent_backups = ?, stored_bytes = ?,"
                " verify_new = ?, reverify_days = ?, encrypted = ?, soft_delete_days = ?,"
                " shared_dedup = ?, copy_target = ?, full_read_days = ? WHERE name = ?",
                (
                    vault.max_concurrent_backups,
                    vault.stored_bytes,
                    int(vault.verify_new),
                    vault.reverify_days,
                    int(vault.encrypted),
                    vault.soft_delete_days,
                    int(vault.shared_dedup),
                    vault.copy_target,
                    vault.full_read_days,
                    vault.name,
                ),
            )

    # --- identities: certificates, enrolment tokens, the audit log ------------------------

    async def insert_certificates(self, records: Sequence[CertificateRecord]) -> None:
        """Record certificates of the ledger; ones recorded already are left as they are."""
        async with self._transaction() as db:
            await db.executemany(
                f"INSERT OR IGNORE INTO certificates ({_columns(_CERTIFICATE_COLUMNS)})"
                f" VALUES ({_placeholders(_CERTIFICATE_COLUMNS)})",
                [dataclasses.asdict(record) for record in records],
            )

    async def certificates(self, name: str = "") -> list[CertificateRecord]:
        """Every recorded certificate (of `name`), oldest first."""
        where, params = _equal(name=name)
        async with self.db.execute(
            f"SELECT {_columns(_CERTIFICATE_COLUMNS)} FROM certificates WHERE {where}"
            " ORDER BY not_before, serial",
            params,
        ) as cursor:
            return [CertificateRecord(**dict(row)) for row in await cursor.fetchall()]

    async def certificate_used(self, serial: str, at: float) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE certificates SET first_used_at = ? WHERE serial = ?"
                " AND first_used_at IS NULL",
                (at, serial),
            )

    async def revoke_certificates(
        self, serials: Sequence[str], at: float, reason: str, by: str
    ) -> None:
        """Mark certificates revoked (those not revoked already)."""
        async with self._transaction() as db:
            await db.executemany(
                "UPDATE certificates SET revoked_at = ?, revoked_reason = ?, revoked_by = ?"
                " WHERE serial = ? AND revoked_at IS NULL",
                [(at, reason, by, serial) for serial in serials],
            )

    async def insert_enrolment_token(self, token: EnrolmentTokenRecord) -> None:
        async with self._transaction() as db:
            await db.execute(
                f"INSERT INTO enrolment_tokens ({_columns(_TOKEN_COLUMNS)})"
                f" VALUES ({_placeholders(_TOKEN_COLUMNS)})",
                dataclasses.asdict(token),
            )

    async def enrolment_token(self, token_id: str) -> EnrolmentTokenRecord | None:
        async with self.db.execute(
            f"SELECT {_columns(_TOKEN_COLUMNS)} FROM enrolment_tokens WHERE id = ?", (token_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else EnrolmentTokenRecord(**dict(row))

    async def use_enrolment_token(self, token_id: str, at: float, used_by: str) -> bool:
        """Spend a token: True if it was unused and unexpired at `at` (and now is used)."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE enrolment_tokens SET used_at = ?, used_by = ?"
                " WHERE id = ? AND used_at IS NULL AND expires_at > ?",
                (at, used_by, token_id, at),
            )
            return cursor.rowcount == 1

    async def insert_audit(self, record: AuditRecord) -> int:
        """Append an entry to the audit log; its id."""
        columns = [c for c in _AUDIT_COLUMNS if c != "id"]
        async with self._transaction() as db:
            cursor = await db.execute(
                f"INSERT INTO audit ({_columns(columns)}) VALUES ({_placeholders(columns)})",
                {c: getattr(record, c) for c in columns},
            )
            return int(cursor.lastrowid or 0)

    async def finish_audit(self, entry: int, outcome: str, message: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE audit SET outcome = ?, message = ? WHERE id = ?", (outcome, message, entry)
            )

    async def audit(self, where: AuditFilter) -> list[AuditRecord]:
        """Entries of the audit log, newest first."""
        clauses: list[str] = []
        params: list[Any] = []
        if where.started_from is not None:
            clauses.append("at >= ?")
            params.append(where.started_from)
        if where.started_to is not None:
            clauses.append("at < ?")
            params.append(where.started_to)
        if where.who:
            clauses.append("who = ?")
            params.append(where.who)
        if where.method:
            clauses.append("method = ?")
            params.append(where.method)
        sql = f"SELECT {_columns(_AUDIT_COLUMNS)} FROM audit"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(where.limit)
        async with self.db.execute(sql, params) as cursor:
            return [AuditRecord(**dict(row)) for row in await cursor.fetchall()]

    # --- alerts ------------------------------------------------------------------------------

    async def raise_alert(self, alert: AlertRecord) -> AlertRecord:
        """Record a condition that began to hold; the record with its id. Conflict if an
        alert of the same key is firing already."""
        columns = [c for c in _ALERT_COLUMNS if c != "id"]
        values = {c: getattr(alert, c) for c in columns}
        values["details"] = json.dumps(alert.details, sort_keys=True)
        async with self._transaction() as db:
            try:
                cursor = await db.execute(
                    f"INSERT INTO alerts ({_columns(columns)}) VALUES ({_placeholders(columns)})",
                    values,
                )
            except sqlite3.IntegrityError:
                raise Conflict(detail=f"alert {alert.key} is firing already") from None
            return dataclasses.replace(alert, id=int(cursor.lastrowid or 0))

    async def resolve_alert(self, alert_id: int, at: float) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE alerts SET resolved_at = ? WHERE id = ? AND resolved_at IS NULL",
                (at, alert_id),
            )

    async def alerts(
        self, *, include_resolved: bool = False, limit: int = 100
    ) -> list[AlertRecord]:
        """Firing alerts first (newest first), then, if asked for, resolved ones (newest
        resolved first)."""
        sql = f"SELECT {_columns(_ALERT_COLUMNS)} FROM alerts"
        if not include_resolved:
            sql += " WHERE resolved_at IS NULL"
        sql += " ORDER BY resolved_at IS NOT NULL, coalesce(resolved_at, raised_at) DESC, id DESC"
        sql += " LIMIT ?"
        async with self.db.execute(sql, (limit,)) as cursor:
            return [_alert(row) for row in await cursor.fetchall()]
