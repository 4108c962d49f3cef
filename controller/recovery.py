"""Recovering the controller from the storage alone: a catalog rebuilt from the datastores.

The datastores are the truth and the catalog a cache (DESIGN.md). When the controller's machine
is lost, `coffer-controller recover --config F` on a new one, given the same `[datastore] url`
(and credentials) and the master key, writes a new catalog from what the datastores hold:

1. It takes the state directory's lock and the datastores' writer lease, as a controller would
   (StateDirInUse, or WriterLeaseHeld naming a controller still running on the storage).
2. A state directory that already has a catalog is refused (CatalogExists), unless `--force`,
   which moves the old catalog aside (`catalog.sqlite.replaced-<time>`), never deletes it.
3. It finds the vaults' datastores: every name under the url with a `datastore.json`
   (NoDatastoresFound when there is none), and opens each with the master key. A wrong or
   missing key (WrongKey, KeyUnavailable) or a `datastore.json` that does not read stops the
   recovery before anything is written.
4. It reads each datastore, never writing to it (the lease object aside): `vault.json` and the
   VM descriptions (controller/datastore/description.py), every manifest, every tombstone
   (soft-deleted points), the indexes of points no description gives the size of, and the
   size of every chunk (the vault's stored bytes: one HEAD per chunk on S3).
5. `plan` (pure) turns what was read into the catalog's rows, and they are written into a new
   SQLite file, renamed into place only once complete: a recovery cut short leaves no catalog.

What comes back: vaults with their region, settings (concurrent backups, verify schedule, soft
delete days) and policies; the VMs, with the facts their agents last gave (an agent that
connects again refreshes them, and its disks); each VM's item, as `ProtectionStopped` with the
policy it had (until an operator resumes it: nothing is backed up or pruned by surprise), or
`Registered` if it had neither points nor a policy; every live recovery point with its
consistency, disks, sizes, retention labels (as of the last prune) and the last verify's
verdict; every soft-deleted point as deleted, with its purge time.
What does not: the job history, the list of chunks known bad (a verify finds them again; a
point last found damaged says so and asks for one), and anything changed in the last moments
before the loss that the descriptions had not caught up with (controller/descriptions.py).

Damage is reported, not fatal: a manifest, tombstone or description that cannot be read
(CorruptData, UnsupportedFormat, sealed with a data key the datastore no longer holds) is named
in the report and left out, so that one damaged object does not keep every other recovery
point out of reach. The catalog is written with the rest, and the command then exits 7.
Its points stay in the datastore untouched; garbage collection still reads them (and stops,
as it does for any unreadable manifest).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controller.catalog import (
    DEFAULT_FULL_READ_DAYS,
    DEFAULT_SOFT_DELETE_DAYS,
    MAX_FULL_READ_DAYS,
    AgentRecord,
    Catalog,
    DeletedRecoveryPointRecord,
    DiskRecord,
    ItemRecord,
    PolicyRecord,
    RecoveryPointRecord,
    VaultRecord,
    VerificationRecord,
)
from controller.config import (
    COPY_TARGET_NAME,
    PASSPHRASE_VARIABLE,
    ControllerConfig,
    EncryptionSettings,
)
from controller.datastore import (
    Datastore,
    DatastoreConfig,
    LeaseHolder,
    MasterKey,
    open_object_store,
)
from controller.datastore.deleted import Tombstone
from controller.datastore.description import VaultDescription, VmDescription
from controller.datastore.location import datastore_names
from controller.datastores import vault_location
from controller.jobs.transaction import data_bytes, recovery_point_record
from controller.master_key import load_master_key
from controller.soft_delete import MAX_SOFT_DELETE_DAYS
from controller.state_lock import StateLock
from controller.vaults import DEFAULT_MAX_CONCURRENT_BACKUPS, MAX_REVERIFY_DAYS
from shared.errors import (
    CatalogExists,
    CofferError,
    CorruptData,
    KeyUnavailable,
    NoDatastores,
    NotFound,
    UnsupportedFormat,
)
from shared.manifest import RecoveryPointManifest
from shared.model import MAX_CONCURRENT_BACKUPS, ItemState, JobStatus, Verification
from shared.policy import DEFAULT_POLICY_NAME, Policy, default_policy

log = logging.getLogger(__name__)

UNKNOWN_REGION = "unknown"
CHUNK_STAT_THREADS = 16
DAMAGED_BEFORE = (
    "found damaged before the catalog was rebuilt from the datastore; verify again to see "
    "which chunks"
)
_READ_ERRORS = (CorruptData, UnsupportedFormat, KeyUnavailable)
"""What an object that cannot be read raises: reported and left out (module note)."""


@dataclass(frozen=True)
class Problem:
    """An object a recovery could not read, and left out."""

    vault: str
    what: str
    error: str


@dataclass
class VaultScan:
    """What one vault's datastore holds, as read (blocking: `scan`)."""

    vault: str
    config: DatastoreConfig
    description: VaultDescription | None = None
    manifests: list[RecoveryPointManifest] = field(default_factory=list)
    tombstones: list[Tombstone] = field(default_factory=list)
    vms: dict[str, VmDescription] = field(default_factory=dict)
    data_bytes: dict[str, int] = field(default_factory=dict)
    """Data bytes of points no VM description gives them for, read from their indexes."""
    stored_bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problem(self, what: str, error: CofferError) -> None:
        self.problems.append(Problem(self.vault, what, str(error)))


def scan(datastore: Datastore, vault: str) -> VaultScan:
    """Blocking: everything a recovery needs from one vault's datastore; writes nothing."""
    found = VaultScan(vault, datastore.config)
    try:
        found.description = datastore.get_vault_description()
    except NotFound:
        found.notes.append(
            "no vault.json (written before descriptions existed): its region comes from its "
            "recovery points, its settings are the defaults and its only policy DefaultPolicy"
        )
    except _READ_ERRORS as error:
        found.problem("vault.json", error)
    for key in list(datastore.list_vm_description_keys()):
        try:
            described = datastore.get_vm_description(key)
        except _READ_ERRORS as error:
            found.problem(key, error)
            continue
        except NotFound:
            continue
        if described.vault != vault:
            found.problem(key, CorruptData(what=key, detail=f"it is vault {described.vault!r}'s"))
            continue
        found.vms[described.vm_id] = described
    live: set[str] = set()
    for rp_id in list(datastore.list_recovery_point_ids()):
        try:
            manifest = datastore.get_manifest(rp_id)
        except NotFound:
            continue
        except _READ_ERRORS as error:
            found.problem(f"manifests/{rp_id}.json", error)
            live.add(rp_id)  # live all the same: its tombstone (if any) is stale
            continue
        live.add(rp_id)
        found.manifests.append(manifest)
        owner = found.vms.get(manifest.vm_id)
        if owner is None or rp_id not in owner.points:
            try:
                found.data_bytes[rp_id] = sum(
                    data_bytes(index) for index in datastore.get_indexes(manifest)
                )
            except (NotFound, *_READ_ERRORS) as error:
                found.problem(f"the indexes of recovery point {rp_id}", error)
    for rp_id in list(datastore.list_deleted_ids()):
        if rp_id in live:
            continue  # a move cut short: live wins (controller/datastore/deleted.py)
        try:
            found.tombstones.append(datastore.get_deleted(rp_id))
        except NotFound:
            continue
        except _READ_ERRORS as error:
            found.problem(f"deleted/{rp_id}.json", error)
    found.stored_bytes = _stored_bytes(datastore)
    return found


def _stored_bytes(datastore: Datastore) -> int:
    def size(digest: bytes) -> int:
        try:
            return datastore.chunk_info(digest).size
        except NotFound:
            return 0

    with ThreadPoolExecutor(CHUNK_STAT_THREADS, thread_name_prefix="recover") as pool:
        return sum(pool.map(size, datastore.list_chunk_digests()))


# --- the plan: rows of the catalog, from what was read (pure) ----------------------------------


@dataclass
class CatalogPlan:
    vaults: list[VaultRecord] = field(default_factory=list)
    policies: list[PolicyRecord] = field(default_factory=list)
    agents: dict[str, AgentRecord] = field(default_factory=dict)
    items: dict[str, ItemRecord] = field(default_factory=dict)
    points: list[RecoveryPointRecord] = field(default_factory=list)
    verifications: list[VerificationRecord] = field(default_factory=list)
    deleted: list[DeletedRecoveryPointRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _seconds(when: datetime) -> float:
    return when.timestamp()


def plan(scans: Iterable[VaultScan], now: float) -> CatalogPlan:
    """The catalog's rows for what the datastores hold (module note); `now` stands in for
    times nothing recorded."""
    result = CatalogPlan()
    # (has a described item, newest point): the vault a VM is an item of, if several claim it.
    claims: dict[str, tuple[tuple[bool, float], ItemRecord]] = {}
    facts: dict[str, tuple[float, AgentRecord]] = {}
    for found in scans:
        _plan_vault(found, now, result, claims, facts)
    result.items = {vm_id: item for vm_id, (_, item) in sorted(claims.items())}
    result.agents = {vm_id: agent for vm_id, (_, agent) in sorted(facts.items())}
    return result


def _plan_vault(
    found: VaultScan,
    now: float,
    result: CatalogPlan,
    claims: dict[str, tuple[tuple[bool, float], ItemRecord]],
    facts: dict[str, tuple[float, AgentRecord]],
) -> None:
    vault = found.vault
    description = found.description
    manifests = sorted(found.manifests, key=lambda m: m.created_at)
    region = description.region if description else _region(manifests, found.tombstones)
    if region == UNKNOWN_REGION:
        result.notes.append(
            f"vault {vault}: its region is unknown (no vault.json, no recovery point): it is "
            f"recovered in region {UNKNOWN_REGION!r}"
        )
    created = (
        description.created_at
        if description
        else min((_seconds(m.created_at) for m in manifests), default=now)
    )
    settings = _settings(description.settings if description else {})
    result.vaults.append(
        VaultRecord(
            name=vault,
            region=region,
            chunk_size=found.config.chunk_size,
            created_at=created,
            max_concurrent_backups=settings["max_concurrent_backups"],
            stored_bytes=found.stored_bytes,
            verify_new=settings["verify_new"],
            reverify_days=settings["reverify_days"],
            encrypted=found.config.encrypted,
            soft_delete_days=settings["soft_delete_days"],
            shared_dedup=settings["shared_dedup"],
            copy_target=settings["copy_target"],
            full_read_days=settings["full_read_days"],
        )
    )
    policies = _policies(vault, description, created, result)
    result.policies += policies
    names = {p.name for p in policies}

    by_vm: dict[str, list[RecoveryPointManifest]] = {}
    for manifest in manifests:
        by_vm.setdefault(manifest.vm_id, []).append(manifest)
        described = found.vms.get(manifest.vm_id)
        point = described.points.get(manifest.id) if described else None
        record = replace(
            recovery_point_record(
                manifest,
                point.bytes_stored if point else 0,
                point.data_bytes if point else found.data_bytes.get(manifest.id, 0),
            ),
            vault=vault,
            kept_by=point.kept_by if point else (),
        )
        result.points.append(record)
        if point is not None and point.verification in Verification.__members__.values():
            state = Verification(point.verification)
            verified_at = point.verified_at
            result.verifications.append(
                VerificationRecord(
                    recovery_point_id=manifest.id,
                    state=state,
                    verified_at=verified_at,
                    changed_at=verified_at or now,
                    job_id="",
                    detail=DAMAGED_BEFORE if state is Verification.DAMAGED else "",
                )
            )
    for tombstone in sorted(found.tombstones, key=lambda t: t.manifest.created_at):
        deletion = tombstone.deletion
        point_record = replace(
            recovery_point_record(tombstone.manifest, deletion.bytes_stored, deletion.data_bytes),
            vault=vault,
            kept_by=deletion.kept_by,
        )
        result.deleted.append(
            DeletedRecoveryPointRecord(
                point=point_record,
                deleted_at=deletion.deleted_at,
                purge_at=deletion.purge_at,
                deleted_by=deletion.job_id,
                policy=deletion.policy,
            )
        )

    # The VMs: every one a manifest, a tombstone or a description names.
    seen: dict[str, list[RecoveryPointManifest]] = {vm_id: list(ms) for vm_id, ms in by_vm.items()}
    for tombstone in found.tombstones:
        seen.setdefault(tombstone.manifest.vm_id, []).append(tombstone.manifest)
    for vm_id in found.vms:
        seen.setdefault(vm_id, [])
    for vm_id, known in seen.items():
        newest = max(known, key=lambda m: m.created_at, default=None)
        described = found.vms.get(vm_id)
        when = _seconds(newest.created_at) if newest else now
        agent = _agent(vm_id, region, described, newest, by_vm.get(vm_id, []), when)
        if vm_id not in facts or facts[vm_id][0] <= when:
            facts[vm_id] = (when, agent)
        item = _item(vault, vm_id, described, by_vm.get(vm_id, []), names)
        if item is None:
            continue
        rank = (described is not None and described.item is not None, when)
        if vm_id not in claims or claims[vm_id][0] < rank:
            if vm_id in claims:
                result.notes.append(
                    f"VM {vm_id} is in vaults {claims[vm_id][1].vault} and {vault}: it is "
                    f"registered to {vault} (the one that described it last)"
                )
            claims[vm_id] = (rank, item)


def _region(manifests: list[RecoveryPointManifest], tombstones: list[Tombstone]) -> str:
    """The region most of the vault's recovery points were taken in (a vault holds VMs of its
    own region only)."""
    regions = Counter(
        m.vm.get("region", "") for m in [*manifests, *(t.manifest for t in tombstones)]
    )
    regions.pop("", None)
    return regions.most_common(1)[0][0] if regions else UNKNOWN_REGION


def _settings(stored: Mapping[str, Any]) -> dict[str, Any]:
    """The vault's settings from its description: each known one if it is valid, else its
    default (a newer controller's unknown settings are ignored)."""

    def number(name: str, low: int, high: int, default: int) -> int:
        value = stored.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        return default

    verify_new = stored.get("verify_new")
    shared_dedup = stored.get("shared_dedup")
    copy_target = stored.get("copy_target")
    return {
        "max_concurrent_backups": number(
            "max_concurrent_backups", 1, MAX_CONCURRENT_BACKUPS, DEFAULT_MAX_CONCURRENT_BACKUPS
        ),
        "verify_new": verify_new if isinstance(verify_new, bool) else False,
        "reverify_days": number("reverify_days", 0, MAX_REVERIFY_DAYS, 0),
        "soft_delete_days": number(
            "soft_delete_days", 0, MAX_SOFT_DELETE_DAYS, DEFAULT_SOFT_DELETE_DAYS
        ),
        "full_read_days": number("full_read_days", 0, MAX_FULL_READ_DAYS, DEFAULT_FULL_READ_DAYS),
        # Off unless it was on: one trust domain is a choice, never a default.
        "shared_dedup": shared_dedup is True,
        # A name of the controller config's [[copy_targets]]; one the config lacks fails the
        # vault's copy jobs with that reason (controller.copies), it is not dropped here.
        "copy_target": copy_target
        if isinstance(copy_target, str) and COPY_TARGET_NAME.fullmatch(copy_target)
        else "",
    }


def _policies(
    vault: str, description: VaultDescription | None, created: float, result: CatalogPlan
) -> list[PolicyRecord]:
    policies: list[PolicyRecord] = []
    for stored in description.policies if description else ():
        try:
            policy = Policy.from_dict(dict(stored.spec))
        except CofferError as error:
            result.notes.append(f"vault {vault}: policy {stored.name!r} left out: {error}")
            continue
        policies.append(
            PolicyRecord(
                vault,
                policy.name,
                policy.to_dict(),
                stored.created_at,
                stored.updated_at,
            )
        )
    if not policies:
        policy = default_policy("UTC")
        policies.append(PolicyRecord(vault, policy.name, policy.to_dict(), created, created))
    return policies


def _agent(
    vm_id: str,
    region: str,
    described: VmDescription | None,
    newest: RecoveryPointManifest | None,
    live: list[RecoveryPointManifest],
    when: float,
) -> AgentRecord:
    """The VM as its agent last described it: from its description, else its newest
    recovery point's manifest. Its disks are its newest live point's (no path: the agent
    gives them when it connects)."""
    vm: Mapping[str, str] = (
        described.vm if described and described.vm else (newest.vm if newest else {})
    )
    latest = max(live, key=lambda m: m.created_at, default=None)
    disks = tuple(DiskRecord(d.name, "", d.size_bytes) for d in latest.disks) if latest else ()
    first = min((_seconds(m.created_at) for m in live), default=when)
    return AgentRecord(
        vm_id=vm_id,
        name=vm.get("name") or vm_id,
        service=vm.get("service", ""),
        region=vm.get("region") or region,
        hostname=vm.get("hostname", ""),
        agent_version="",
        first_seen=first,
        last_seen=when,
        disks=disks,
    )


def _item(
    vault: str,
    vm_id: str,
    described: VmDescription | None,
    live: list[RecoveryPointManifest],
    policies: set[str],
) -> ItemRecord | None:
    """The VM's item in the vault: ProtectionStopped, with its policy, if it had live points
    or a policy; Registered if it was registered with neither; None if it was not
    registered and has no live point here (only deleted ones)."""
    item = described.item if described else None
    if item is None and not live:
        return None
    policy = item.policy if item is not None and item.policy in policies else None
    registered_at = (
        item.registered_at if item is not None else min(_seconds(m.created_at) for m in live)
    )
    newest = max((_seconds(m.created_at) for m in live), default=None)
    stopped = bool(live) or policy is not None
    return ItemRecord(
        vm_id=vm_id,
        vault=vault,
        state=ItemState.PROTECTION_STOPPED if stopped else ItemState.REGISTERED,
        policy=policy,
        registered_at=registered_at,
        last_backup_at=newest,
        last_backup_status=JobStatus.COMPLETED if newest is not None else None,
    )


# --- the command ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RecoveredVault:
    name: str
    region: str
    location: str
    encrypted: bool
    policies: list[str]
    items: dict[str, str]
    """VM id -> its item's state."""
    recovery_points: int
    deleted_recovery_points: int
    stored_bytes: int


@dataclass(frozen=True)
class Recovered:
    """What a recovery rebuilt, and what it could not read."""

    catalog: Path
    vaults: list[RecoveredVault]
    problems: list[Problem]
    notes: list[str]
    replaced: Path | None
    """Where the catalog it replaced was moved (--force), if there was one."""


async def recover(config: ControllerConfig, *, force: bool = False) -> Recovered:
    """Rebuild the catalog of `config`'s controller from its datastores (module note)."""
    settings = config.datastores
    config.state_dir.mkdir(parents=True, exist_ok=True)
    with StateLock(config.state_dir):
        catalog_path = config.catalog_path
        if catalog_path.exists() and not force:
            raise CatalogExists(path=str(config.state_dir), catalog=str(catalog_path))
        master = await asyncio.to_thread(_master_key, config)
        root = await asyncio.to_thread(open_object_store, settings.url, settings.s3)
        holder = LeaseHolder.this_process("recover")
        lease = await asyncio.to_thread(
            root.acquire_writer_lease, holder, duration=settings.lease_seconds
        )
        try:
            names = await asyncio.to_thread(datastore_names, settings.url, settings.s3)
            if not names:
                raise NoDatastores(location=settings.url)
            # Every datastore opened (its key checked) before anything is read or written.
            opened = [
                (name, await asyncio.to_thread(_open, settings.url, settings.s3, name, master))
                for name in names
            ]
            scans = [await asyncio.to_thread(scan, datastore, name) for name, datastore in opened]
        finally:
            with contextlib.suppress(CofferError):
                await asyncio.to_thread(lease.release)
        rows = plan(scans, time.time())
        replaced = _move_aside(catalog_path) if catalog_path.exists() else None
        await _write(catalog_path, rows)
    problems = [p for found in scans for p in found.problems]
    notes = [f"vault {found.vault}: {note}" for found in scans for note in found.notes]
    return Recovered(
        catalog=catalog_path,
        vaults=[_summary(found, rows, settings.url) for found in scans],
        problems=problems,
        notes=notes + rows.notes,
        replaced=replaced,
    )


def _master_key(config: ControllerConfig) -> MasterKey | None:
    """The master key as the controller would read it, except that none is ever made: a new
    key could open nothing. None when none is configured, in the environment or in the state
    directory (a datastore that is encrypted then says which key it needs)."""
    if (
        config.encryption != EncryptionSettings()
        or os.environ.get(PASSPHRASE_VARIABLE)
        or config.default_master_key_file.exists()
    ):
        return load_master_key(config)
    return None


def _open(url: str, s3: Any, name: str, master: MasterKey | None) -> Datastore:
    datastore = Datastore.open(open_object_store(vault_location(url, name), s3), master=master)
    if datastore.encrypted and datastore.config.vault != name:
        raise CorruptData(
            what=f"datastore at {datastore.storage.location}",
            detail=f"it belongs to vault {datastore.config.vault!r}, not {name!r}: move it to "
            f"{vault_location(url, datastore.config.vault)}",
        )
    return datastore


def _move_aside(path: Path) -> Path:
    """Move a catalog (and its WAL files) aside; where it went."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.replaced-{stamp}")
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            companion.rename(aside.with_name(aside.name + suffix))
    path.rename(aside)
    return aside


async def _write(path: Path, rows: CatalogPlan) -> None:
    """Write `rows` into a new catalog at `path`, renamed into place once complete."""
    partial = path.with_name(path.name + ".recovering")
    for leftover in (partial, *(partial.with_name(partial.name + s) for s in ("-wal", "-shm"))):
        leftover.unlink(missing_ok=True)
    async with Catalog(partial) as catalog:
        for vault in rows.vaults:
            policies = [p for p in rows.policies if p.vault == vault.name]
            first, *others = sorted(policies, key=lambda p: p.name != DEFAULT_POLICY_NAME)
            await catalog.create_vault(vault, first)
            for policy in others:
                await catalog.create_policy(policy)
            await catalog.set_vault_settings(vault)
        for agent in rows.agents.values():
            await catalog.insert_recovered_agent(agent)
        for item in rows.items.values():
            await catalog.insert_item(item)
        for point in rows.points:
            await catalog.insert_recovery_point(point)
        for verification in rows.verifications:
            await catalog.insert_recovered_verification(verification)
        for deleted in rows.deleted:
            await catalog.insert_deleted_recovery_point(deleted)
    partial.rename(path)


def _summary(found: VaultScan, rows: CatalogPlan, url: str) -> RecoveredVault:
    vault = next(v for v in rows.vaults if v.name == found.vault)
    return RecoveredVault(
        name=vault.name,
        region=vault.region,
        location=vault_location(url, vault.name),
        encrypted=vault.encrypted,
        policies=sorted(p.name for p in rows.policies if p.vault == vault.name),
        items={i.vm_id: i.state.value for i in rows.items.values() if i.vault == vault.name},
        recovery_points=sum(1 for p in rows.points if p.vault == vault.name),
        deleted_recovery_points=sum(1 for d in rows.deleted if d.point.vault == vault.name),
        stored_bytes=vault.stored_bytes,
    )


__all__ = [
    "CatalogPlan",
    "Problem",
    "Recovered",
    "RecoveredVault",
    "VaultScan",
    "plan",
    "recover",
    "scan",
]
