"""Describing vaults in their datastores: `vault.json` and the VM descriptions, kept in step
with the catalog, so that the storage and the master key are enough to rebuild it.

What the descriptions hold and why is the datastore's business
(controller/datastore/description.py); this is when they are written. The catalog announces
every change to what they hold, as (vault, VM id) once its transaction commits (`Catalog.
on_change`); the `Describer` marks it, and its task (supervised, RESTART) writes what is marked
a moment later, so a burst (a vault-wide prune labels every VM's points) costs one write per
description, not one per change. Each description is built whole from the catalog as it is
when it is written and put in one atomic put, and only when its content differs from what was
last written (an agent's reconnect announces its VM, which rarely changes anything). Writes go
through `Datastores.write_description`, never at once with a vault's removal.

At start every vault's description is compared with the stored one and written if it differs,
and every VM of a vault that has no description yet gets one (a datastore from before
descriptions, or a write lost with a crash). When the controller stops, what is still marked is
written before the catalog closes. A write that fails (the store unreachable) is logged and tried
again with backoff; until it succeeds, that change is what a recovery would miss.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import replace
from types import TracebackType

from controller.catalog import Catalog
from controller.datastore import Datastore
from controller.datastore.description import (
    ItemDescription,
    PointDescription,
    PolicyDescription,
    VaultDescription,
    VmDescription,
)
from controller.datastores import Datastores
from shared.backoff import Backoff
from shared.clock import Clock
from shared.errors import CofferError, CorruptData, NotFound, UnsupportedFormat
from shared.supervision import Policy, Supervisor

log = logging.getLogger(__name__)

TASK = "descriptions"
DELAY = 0.1
"""Seconds a change waits for others before the descriptions are written."""
RETRY = Backoff(first=1.0, cap=60.0, jitter="equal")
_VAULT = ""
"""The VM id that stands for the vault's own description."""


class Describer:
    """Writes the vaults' and VMs' descriptions as the catalog changes; an async context
    manager (its task runs under `supervisor` from enter to exit)."""

    def __init__(
        self,
        catalog: Catalog,
        datastores: Datastores,
        clock: Clock,
        supervisor: Supervisor,
        *,
        delay: float = DELAY,
    ) -> None:
        self._catalog = catalog
        self._datastores = datastores
        self._clock = clock
        self._supervisor = supervisor
        self._delay = delay
        self._dirty: dict[str, set[str]] = {}
        self._wake = asyncio.Event()
        # One flush at a time: two would race to put one description, the older last.
        self._flushing = asyncio.Lock()
        # What was last written (or found stored) per (vault, VM id): its content's digest,
        # the time it was written left out.
        self._written: dict[tuple[str, str], bytes] = {}

    async def __aenter__(self) -> Describer:
        self._catalog.on_change.append(self.changed)
        await self._refresh()
        self._supervisor.start(TASK, self._run, policy=Policy.RESTART)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._supervisor.stop(TASK)
        self._catalog.on_change.remove(self.changed)
        try:
            await self.flush()
        except CofferError as error:
            log.warning(
                "the descriptions of vaults %s could not be written before the stop: %s; "
                "they are written at the next start",
                ", ".join(sorted(self._dirty)),
                error,
            )

    def changed(self, vault: str, vm_id: str) -> None:
        """What the descriptions of `vault` hold of `vm_id` ("" for the vault's) changed."""
        self._dirty.setdefault(vault, set()).add(vm_id)
        self._wake.set()

    async def rewrite(self, vault: str) -> None:
        """Write every description of `vault` again, now: after an upgrade changed its
        datastore's format (controller/upgrades.py), whose VM descriptions are named and sealed
        otherwise. The old ones are deleted first (a recovery meanwhile finds fewer, never one
        it cannot read)."""

        def clear(datastore: Datastore) -> None:
            for key in list(datastore.list_vm_description_keys()):
                datastore.backend.delete(key)

        await self._datastores.write_description(vault, clear)
        self._written = {k: v for k, v in self._written.items() if k[0] != vault}
        vms = {item.vm_id for item in await self._catalog.items(vault)}
        vms |= set(await self._catalog.recovery_point_summary(vault))
        self.changed(vault, _VAULT)
        for vm_id in vms:
            self.changed(vault, vm_id)
        await self.flush()

    @property
    def pending(self) -> int:
        """Descriptions marked and not yet written."""
        return sum(len(vms) for vms in self._dirty.values())

    async def _refresh(self) -> None:
        """Mark what the datastores may lack: every vault's description (written only if it
        differs from the stored one), and every VM without a description."""
        for vault in await self._catalog.vaults():
            try:
                datastore = await self._datastores.get(vault.name)
                stored = await asyncio.to_thread(_stored_state, datastore)
            except CofferError as error:
                log.warning("vault %s: its descriptions could not be read: %s", vault.name, error)
                stored = None
            vms = {item.vm_id for item in await self._catalog.items(vault.name)}
            vms |= set(await self._catalog.recovery_point_summary(vault.name))
            self.changed(vault.name, _VAULT)
            if stored is None:
                for vm_id in vms:
                    self.changed(vault.name, vm_id)
                continue
            content, keys = stored
            if content is not None:
                self._written[(vault.name, _VAULT)] = content
            for vm_id in vms:
                if datastore.vm_description_key(vm_id) not in keys:
                    self.changed(vault.name, vm_id)

    async def _run(self) -> None:
        attempt = 0
        while True:
            await self._wake.wait()
            await asyncio.sleep(self._delay)
            self._wake.clear()
            try:
                deferred = await self.flush()
            except CofferError as error:
                delay = RETRY.delay(attempt)
                attempt += 1
                log.warning(
                    "vault descriptions could not be written (%s); trying again in %.0f s",
                    error,
                    delay,
                )
                await asyncio.sleep(delay)
                self._wake.set()
                continue
            attempt = 0
            if deferred:
                # A vault whose datastore is being created: look again shortly.
                await asyncio.sleep(RETRY.first)
                self._wake.set()

    async def flush(self) -> int:
        """Write everything marked; how many descriptions wait for their datastore to open.
        What a failure leaves unwritten stays marked."""
        async with self._flushing:
            return await self._flush()

    async def _flush(self) -> int:
        deferred: dict[str, set[str]] = {}
        try:
            while self._dirty:
                vault, vms = self._dirty.popitem()
                pending = sorted(vms)
                try:
                    while pending:
                        if not await self._write(vault, pending[0]):
                            deferred.setdefault(vault, set()).add(pending[0])
                        pending.pop(0)
                except BaseException:
                    self._dirty.setdefault(vault, set()).update(pending)
                    raise
        finally:
            for vault, vms in deferred.items():
                self._dirty.setdefault(vault, set()).update(vms)
        return sum(len(vms) for vms in deferred.values())

    async def _write(self, vault: str, vm_id: str) -> bool:
        """Write one description if it changed; False if the vault's datastore is not open
        yet (a vault being created). A vault deleted meanwhile has nothing to write."""
        try:
            record = await self._catalog.vault(vault)
        except NotFound:
            self._written = {k: v for k, v in self._written.items() if k[0] != vault}
            return True
        now = self._clock.now()
        description: VaultDescription | VmDescription | None
        if vm_id == _VAULT:
            policies = await self._catalog.policies(vault)
            description = VaultDescription(
                vault=vault,
                region=record.region,
                created_at=record.created_at,
                settings={
                    "max_concurrent_backups": record.max_concurrent_backups,
                    "verify_new": record.verify_new,
                    "reverify_days": record.reverify_days,
                    "soft_delete_days": record.soft_delete_days,
                    "shared_dedup": record.shared_dedup,
                    "full_read_days": record.full_read_days,
                    "copy_target": record.copy_target,
                },
                policies=tuple(
                    PolicyDescription(p.name, p.spec, p.created_at, p.updated_at) for p in policies
                ),
                written_at=now,
            )
        else:
            description = await self._vm_description(vault, vm_id, now)
        content = None if description is None else _content(description)
        if self._written.get((vault, vm_id)) == content:
            return True
        write = _writer(description, vm_id)
        if not await self._datastores.write_description(vault, write):
            return False
        if content is None:
            self._written.pop((vault, vm_id), None)
        else:
            self._written[(vault, vm_id)] = content
        return True

    async def _vm_description(self, vault: str, vm_id: str, now: float) -> VmDescription | None:
        """The VM's description as the catalog has it; None when the vault holds nothing of
        it any more (neither registered nor with live points)."""
        item = await self._catalog.item(vm_id)
        if item is not None and item.vault != vault:
            item = None
        points = await self._catalog.recovery_points(vm_id=vm_id, vault=vault)
        if item is None and not points:
            return None
        agent = await self._catalog.agent(vm_id)
        facts = (
            {
                "name": agent.name,
                "service": agent.service,
                "region": agent.region,
                "hostname": agent.hostname,
            }
            if agent is not None
            else {}
        )
        verifications = await self._catalog.verifications([rp.id for rp in points])
        described: dict[str, PointDescription] = {}
        for rp in points:
            verification = verifications.get(rp.id)
            described[rp.id] = PointDescription(
                kept_by=rp.kept_by,
                bytes_stored=rp.bytes_stored,
                data_bytes=rp.data_bytes,
                verification=verification.state.value if verification else "",
                verified_at=verification.verified_at if verification is not None else None,
            )
        return VmDescription(
            vm_id=vm_id,
            vault=vault,
            vm=facts,
            item=None
            if item is None
            else ItemDescription(item.state.value, item.policy, item.registered_at),
            points=described,
            written_at=now,
        )


def _content(description: VaultDescription | VmDescription) -> bytes:
    """A digest of what `description` says, whenever it was written."""
    return hashlib.sha256(replace(description, written_at=0.0).encode()).digest()


def _writer(
    description: VaultDescription | VmDescription | None, vm_id: str
) -> Callable[[Datastore], None]:
    def write(datastore: Datastore) -> None:
        if isinstance(description, VaultDescription):
            datastore.put_vault_description(description)
        elif description is None:
            datastore.delete_vm_description(vm_id)
        else:
            datastore.put_vm_description(description)

    return write


def _stored_state(datastore: Datastore) -> tuple[bytes | None, set[str]]:
    """Blocking: the content digest of the stored vault description (None if there is none or
    it cannot be read: it is written again), and the keys of the stored VM descriptions."""
    try:
        content: bytes | None = _content(datastore.get_vault_description())
    except (NotFound, CorruptData, UnsupportedFormat):
        content = None
    return content, set(datastore.list_vm_description_keys())


__all__ = ["Describer"]
