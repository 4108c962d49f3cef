"""Vaults and their policies: create, list, edit and delete them, and read a vault's dashboard.

A vault lives in one region and owns a datastore, its policies, the VMs registered to it and
their recovery points. It is created with a default policy (daily at 02:00, 30 days), and
deleted only when nothing is registered to it and it holds no recovery point, live or
soft-deleted (controller/soft_delete.py: deleted data is kept `soft_delete_days`, and a vault
deleted meanwhile would take it along). Policies are
stored as their JSON form (`shared.policy.Policy.to_dict`) and validated on every write.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from controller.catalog import MAX_FULL_READ_DAYS, Catalog, PolicyRecord, VaultRecord
from controller.datastores import Datastores
from controller.soft_delete import MAX_SOFT_DELETE_DAYS
from shared.clock import Clock
from shared.errors import InvalidArgument, KeyUnavailable, PolicyInUse, VaultNotEmpty
from shared.model import MAX_CONCURRENT_BACKUPS, ItemState, JobStatus, Verification
from shared.policy import Policy, default_policy

log = logging.getLogger(__name__)

_VAULT_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
DEFAULT_MAX_CONCURRENT_BACKUPS = 4
MAX_REVERIFY_DAYS = 3650
DAY = 86400.0


@dataclass(frozen=True)
class IntegritySummary:
    """A vault's recovery points by what the last verify (or a failed read since) found."""

    verified: int = 0
    damaged: int = 0
    healed: int = 0
    """Their damaged chunks were stored again; a verify is pending."""
    never_verified: int = 0
    bad_chunks: int = 0
    """Chunks known missing or corrupt, not yet stored again."""
    last_verified_at: float | None = None


@dataclass(frozen=True)
class Dashboard:
    vault: str
    protected_items: int
    items_by_state: dict[str, int]
    jobs_completed: int
    jobs_with_warnings: int
    jobs_failed: int
    jobs_cancelled: int
    jobs_in_progress: int
    stored_bytes: int
    protected_bytes: int
    recovery_points: int
    integrity: IntegritySummary = field(default_factory=IntegritySummary)

    @property
    def dedup_ratio(self) -> float:
        return self.protected_bytes / self.stored_bytes if self.stored_bytes else 0.0


@dataclass(frozen=True)
class VaultStorage:
    """Where a vault's datastore lives and how it is kept."""

    location: str
    format: int
    """1: plain objects; 2: encrypted (docs/encryption.md)."""
    encryption: str
    current_data_key: int
    """The data key new objects are encrypted with; 0 when not encrypted."""
    upgrading_from: int = 0
    """While an upgrade is under way: the format it converts from (0: none)."""
    points_in_old_format: int = 0
    """While an upgrade is under way: the recovery points still read from that format."""


@dataclass(frozen=True)
class VaultKeys:
    """A vault's keys after a rotation (their ids and how they are wrapped, never a key)."""

    vault: str
    keys_rewrapped: int
    current_data_key: int
    data_keys: tuple[int, ...]
    master_key: str
    """Which master key wraps them, in words."""


def _check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_CONCURRENT_BACKUPS:
        raise InvalidArgument(
            detail=f"max concurrent backups {limit} must be 1 to {MAX_CONCURRENT_BACKUPS}"
        )
    return limit


class Vaults:
    def __init__(
        self,
        catalog: Catalog,
        datastores: Datastores,
        clock: Clock,
        chunk_size: int,
    ) -> None:
        self._catalog = catalog
        self._datastores = datastores
        self._clock = clock
        self._chunk_size = chunk_size
        # Called with (vault, policy name) after a policy's schedule may have changed.
        self.on_policy_changed: Callable[[str, str], Awaitable[None]] | None = None

    async def create(
        self, name: str, region: str, max_concurrent_backups: int = 0, timezone: str = "UTC"
    ) -> VaultRecord:
        if _VAULT_NAME.fullmatch(name) is None:
            raise InvalidArgument(
                detail=f"vault name {name!r} must be 1-63 lowercase letters, digits or '-'"
            )
        if _REGION.fullmatch(region) is None:
            raise InvalidArgument(
                detail=f"region {region!r} must be 1-63 lowercase letters, digits or '-' "
                "(the region the VMs' agents report, e.g. eu-west)"
            )
        limit = _check_limit(max_concurrent_backups or DEFAULT_MAX_CONCURRENT_BACKUPS)
        now = self._clock.now()
        policy = default_policy(timezone or "UTC")
        vault = await self._catalog.create_vault(
            VaultRecord(name, region, self._chunk_size, now, limit),
            PolicyRecord(name, policy.name, policy.to_dict(), now, now),
        )
        try:
            await self._datastores.get(name)  # the datastore exists from the start
        except BaseException:
            # A vault without its datastore would stop the next start (every vault's is
            # opened then): no vault, rather. Whatever of its datastore was written, a vault
            # made again under the name finds and opens.
            await self._catalog.delete_vault(name)
            raise
        return vault

    @staticmethod
    def check_update(
        max_concurrent_backups: int,
        *,
        reverify_days: int | None = None,
        soft_delete_days: int | None = None,
        full_read_days: int | None = None,
    ) -> None:
        """InvalidArgument unless `update` would take these values (0 or None: unchanged);
        a caller changing other settings too checks first, so a refusal changes nothing."""
        if max_concurrent_backups:
            _check_limit(max_concurrent_backups)
        if reverify_days is not None and not 0 <= reverify_days <= MAX_REVERIFY_DAYS:
            raise InvalidArgument(
                detail=f"re-verify after {reverify_days} days: give 0 (off) to "
                f"{MAX_REVERIFY_DAYS} days"
            )
        if soft_delete_days is not None and not 0 <= soft_delete_days <= MAX_SOFT_DELETE_DAYS:
            raise InvalidArgument(
                detail=f"keep deleted data {soft_delete_days} days: give 0 (off) to "
                f"{MAX_SOFT_DELETE_DAYS} days"
            )
        if full_read_days is not None and not 0 <= full_read_days <= MAX_FULL_READ_DAYS:
            raise InvalidArgument(
                detail=f"a full read every {full_read_days} days: give 0 (every backup) to "
                f"{MAX_FULL_READ_DAYS} days"
            )

    async def update(
        self,
        name: str,
        max_concurrent_backups: int,
        *,
        verify_new: bool | None = None,
        reverify_days: int | None = None,
        soft_delete_days: int | None = None,
        shared_dedup: bool | None = None,
        full_read_days: int | None = None,
    ) -> VaultRecord:
        """Change a vault's settings: 0 or None leaves one unchanged (for the days settings,
        None only). Every value is checked before any is written, and all are written in one
        transaction. Points soft-deleted before keep the purge time they were given."""
        self.check_update(
            max_concurrent_backups,
            reverify_days=reverify_days,
            soft_delete_days=soft_delete_days,
            full_read_days=full_read_days,
        )
        await self._catalog.update_vault(
            name,
            max_concurrent_backups=max_concurrent_backups or None,
            verify_new=verify_new,
            reverify_days=reverify_days,
            soft_delete_days=soft_delete_days,
            shared_dedup=shared_dedup,
            full_read_days=full_read_days,
        )
        return await self._catalog.vault(name)

    async def delete(self, name: str, running_jobs: int) -> VaultRecord:
        """Delete an empty vault; `running_jobs` is how many of its jobs run now."""
        vault = await self._catalog.vault(name)
        if running_jobs:
            raise VaultNotEmpty(
                vault=name,
                what=f"{running_jobs} running jobs",
                fix=f"wait for them (`coffer job list --vault {name} --status InProgress`)",
            )
        items = await self._catalog.items(name)
        if items:
            raise VaultNotEmpty(
                vault=name,
                what=f"{len(items)} registered VMs ({', '.join(i.vm_id for i in items[:5])})",
                fix="stop their protection with --delete-data and unregister them first",
            )
        points, _ = await self._catalog.recovery_point_totals(name)
        if points:
            raise VaultNotEmpty(
                vault=name,
                what=f"{points} recovery points",
                fix="delete them first (`coffer stop-protection --delete-data`)",
            )
        deleted, last_purge = await self._catalog.deleted_totals(name)
        if deleted:
            until = datetime.fromtimestamp(last_purge or 0.0, UTC).strftime("%Y-%m-%d %H:%M UTC")
            raise VaultNotEmpty(
                vault=name,
                what=f"{deleted} soft-deleted recovery points",
                fix=f"they stay recoverable until they are purged, the last at {until} "
                "(`coffer rp list --deleted`); the vault can be deleted after that",
            )
        await self._catalog.delete_vault(name)
        await self._datastores.destroy(name)
        return vault

    # --- the datastore and its keys ---------------------------------------------------------

    async def storage(self, name: str) -> VaultStorage:
        datastore = await self._datastores.get(name)
        legacy = self._datastores.legacy(name)
        old = datastore.config.upgrading_from
        upgrade = await self._catalog.upgrade(name)
        return VaultStorage(
            location=self._datastores.location(name),
            format=datastore.config.format,
            encryption=datastore.config.encryption,
            current_data_key=datastore.current_data_key if datastore.encrypted else 0,
            upgrading_from=old.format
            if old is not None
            else (upgrade.from_format if upgrade is not None else 0),
            points_in_old_format=len(legacy.pending) if legacy is not None else 0,
        )

    async def rotate_key(self, name: str, new_data_key: bool) -> VaultKeys:
        """Re-wrap the vault's keys under the controller's master key (one `datastore.json`
        written, no data); with `new_data_key`, also start a data key for objects written from
        now on. Conflict for a vault that is not encrypted (format 1)."""
        datastore = await self._datastores.get(name)
        master = self._datastores.master
        if master is None:
            raise KeyUnavailable(what=f"vault {name!r}", detail="the controller has no master key")

        def rotate() -> int:
            if new_data_key:
                datastore.new_data_key()  # stores every key wrapped anew, the new one with them
                return len(datastore.data_keys) + 1
            return datastore.rotate_master_key(master)

        rewrapped = await asyncio.to_thread(rotate)
        log.info(
            "vault %s: %d keys re-wrapped under the master key (%s)%s",
            name,
            rewrapped,
            master.describe(),
            f"; new data key {datastore.current_data_key}" if new_data_key else "",
        )
        return VaultKeys(
            vault=name,
            keys_rewrapped=rewrapped,
            current_data_key=datastore.current_data_key,
            data_keys=datastore.data_keys,
            master_key=master.describe(),
        )

    async def export_keys(self, name: str) -> str:
        """The vault's key export: its wrapped keys and the recovery instructions (no secret)."""
        datastore = await self._datastores.get(name)
        return await asyncio.to_thread(datastore.export_keys)

    # --- policies ---------------------------------------------------------------------------

    async def create_policy(self, vault: str, policy: Policy) -> PolicyRecord:
        await self._catalog.vault(vault)
        now = self._clock.now()
        record = PolicyRecord(vault, policy.name, policy.to_dict(), now, now)
        await self._catalog.create_policy(record)
        return record

    async def update_policy(self, vault: str, policy: Policy) -> PolicyRecord:
        await self._catalog.update_policy(vault, policy.name, policy.to_dict(), self._clock.now())
        if self.on_policy_changed is not None:
            await self.on_policy_changed(vault, policy.name)
        return await self._catalog.policy(vault, policy.name)

    async def delete_policy(self, vault: str, name: str) -> tuple[PolicyRecord, list[str]]:
        """Delete a policy no protected VM uses; returns it and the VMs whose protection was
        stopped with it (they forget it: resuming them then needs a policy named)."""
        await self._catalog.vault(vault)
        record = await self._catalog.policy(vault, name)
        users = [
            i for i in await self._catalog.items(vault, policy=name) if ItemState(i.state).protected
        ]
        if users:
            raise PolicyInUse(
                policy=name,
                vault=vault,
                count=len(users),
                vms=", ".join(i.vm_id for i in users[:5]),
            )
        return record, await self._catalog.delete_policy(vault, name)

    async def policy(self, vault: str, name: str) -> Policy:
        return Policy.from_dict((await self._catalog.policy(vault, name)).spec)

    # --- dashboard --------------------------------------------------------------------------

    async def dashboard(self, name: str, running_jobs: int) -> Dashboard:
        vault = await self._catalog.vault(name)
        by_state: dict[str, int] = {}
        for item in await self._catalog.items(name):
            by_state[item.state] = by_state.get(item.state, 0) + 1
        counts = await self._catalog.job_counts(name, self._clock.now() - DAY)
        points, protected_bytes = await self._catalog.recovery_point_totals(name)
        states = await self._catalog.verification_counts(name)
        integrity = IntegritySummary(
            verified=states.get(Verification.VERIFIED, 0),
            damaged=states.get(Verification.DAMAGED, 0),
            healed=states.get(Verification.HEALED, 0),
            never_verified=states.get(None, 0),
            bad_chunks=len(await self._datastores.health(name)),
            last_verified_at=await self._catalog.last_verified_at(name),
        )
        return Dashboard(
            vault=name,
            protected_items=sum(n for s, n in by_state.items() if ItemState(s).protected),
            items_by_state=by_state,
            jobs_completed=counts.get(JobStatus.COMPLETED, 0)
            + counts.get(JobStatus.COMPLETED_WITH_WARNINGS, 0),
            jobs_with_warnings=counts.get(JobStatus.COMPLETED_WITH_WARNINGS, 0),
            jobs_failed=counts.get(JobStatus.FAILED, 0),
            jobs_cancelled=counts.get(JobStatus.CANCELLED, 0),
            jobs_in_progress=running_jobs,
            stored_bytes=vault.stored_bytes,
            protected_bytes=protected_bytes,
            recovery_points=points,
            integrity=integrity,
        )
