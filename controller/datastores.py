"""The vaults' datastores: where they live, opened once each, shared by every job of a vault.

All datastores live under one root, `[datastore] url` in the controller config: a directory
(by default `state_dir/datastores`) or `s3://bucket/prefix`. Each vault's datastore is the
vault's name below it (`<root>/<vault>`), self-describing (its `datastore.json` says its format,
chunk size and, encrypted, its wrapped keys), so a datastore can be found and read again from
the root alone.

One writer lease covers the whole root (lease.py): the controller takes it when it starts,
before it opens or creates any datastore, and holds it for its life (server.py). One lease
rather than one per vault: a vault made while the controller runs is covered at once, an S3
store gets one renewal every twenty seconds however many vaults it holds, and a second
controller given the same root is refused before it touches anything. Two controllers must
not share a root; two roots must not nest.

The master key (controller/master_key.py) encrypts every new datastore (format 2). A vault
whose datastore was made without encryption stays format 1 and is read and written as such; the
catalog records which vaults are encrypted, and such a vault is never opened as a plain one
(a `datastore.json` replaced by a format-1 one is refused: docs/encryption.md, "Downgrade").

`open_all` opens every vault's datastore when the controller starts, so a wrong or missing
master key, a missing datastore, refused credentials or a missing bucket stop the start with a
typed error instead of failing the first backup hours later.

With each datastore go the vault's `ChunkGuard` (what running jobs rely on) and its
`ChunkHealth` (which chunks are known bad), loaded from the catalog when the datastore is
opened.

A format-1 datastore is read and written through a `LegacyLayout` (datastore/legacy.py), so that
an upgrade can move its indexes and manifests aside without anyone who holds it noticing. While
a vault's datastore is upgraded to format 2 (controller/upgrades.py), `get` gives its format-2
datastore (where new backups go) and `legacy` its format-1 part with the recovery points still
read from there; whoever reads a recovery point asks `reader` (or `router`) which one holds it,
and a recovery point is deleted from both (`delete_recovery_point`).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from controller.catalog import Catalog, VaultRecord
from controller.datastore import (
    CONFIG_KEY,
    ChunkGuard,
    Datastore,
    MasterKey,
    ObjectStore,
    S3Settings,
    open_object_store,
)
from controller.datastore.health import ChunkHealth
from controller.datastore.legacy import LegacyLayout
from controller.datastore.upgrade import pending_points
from shared.clock import Clock
from shared.errors import CorruptData, DatastoreError, DatastoreMissing

log = logging.getLogger(__name__)


@dataclass
class LegacyArea:
    """The format-1 part of a vault's datastore while it is upgraded to format 2."""

    datastore: Datastore
    """Format 1, through a `LegacyLayout` whose indexes and manifests are moved aside."""
    pending: set[str] = field(default_factory=set)
    """The recovery points read from it: not converted yet. Only shrinks (the upgrade removes
    a point once its format-2 manifest is stored, a prune once it is deleted)."""

    @property
    def layout(self) -> LegacyLayout:
        storage = self.datastore.storage
        assert isinstance(storage, LegacyLayout)
        return storage


def vault_location(root: str, vault: str) -> str:
    """Where a vault's datastore lives under `root` (a directory or an s3:// URL)."""
    return f"{root.rstrip('/')}/{vault}"


class Datastores:
    def __init__(
        self,
        catalog: Catalog,
        root: Path | str,
        *,
        s3: S3Settings | None = None,
        master: MasterKey | None = None,
        clock: Clock | None = None,
        backend: Callable[[Path], ObjectStore] | None = None,
    ) -> None:
        """Datastores under `root`, a directory or s3://bucket/prefix (with `s3` to reach it).

        New datastores are encrypted with keys `master` wraps; without one they are format 1.
        `backend` opens a vault's store in its directory instead of the local directory store
        (tests wrap the local one)."""
        self._catalog = catalog
        self.root = str(root)
        self._s3 = s3
        self.master = master
        self._clock = clock
        self._backend = backend
        self._open: dict[str, Datastore] = {}
        self._legacy: dict[str, LegacyArea] = {}
        self._guards: dict[str, ChunkGuard] = {}
        self._health: dict[str, ChunkHealth] = {}
        self._lock = asyncio.Lock()

    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")

    def location(self, vault: str) -> str:
        """Where the vault's datastore lives (a directory, or an s3:// URL)."""
        return vault_location(self.root, vault)

    def path(self, vault: str) -> Path:
        """The vault's datastore directory (a local root only)."""
        assert not self.is_s3, "an S3 datastore has no directory"
        return Path(self.location(vault))

    def storage(self, vault: str) -> ObjectStore:
        """The store holding the vault's datastore, as stored (encrypted objects); blocking."""
        if self._backend is not None and not self.is_s3:
            return self._backend(self.path(vault))
        return open_object_store(self.location(vault), self._s3)

    async def open_all(self) -> None:
        """Open every vault's datastore now (see the module note); the first error raised."""
        for record in await self._catalog.vaults():
            await self._get(record.name)

    async def get(self, vault: str) -> Datastore:
        """The vault's datastore, created on first use with the vault's chunk size."""
        store = self._open.get(vault)
        if store is not None:
            return store
        return await self._get(vault)

    async def _get(self, vault: str) -> Datastore:
        async with self._lock:
            if vault not in self._open:
                record = await self._catalog.vault(vault)
                points, _ = await self._catalog.recovery_point_totals(vault)
                # The catalog knows of data there: a missing datastore is one looked for in the
                # wrong place (a root changed in the config), not a new vault's.
                known = record.encrypted or points > 0
                datastore, legacy = await asyncio.to_thread(self._open_or_create, record, known)
                if datastore.encrypted and not record.encrypted:
                    await self._catalog.set_vault_encrypted(vault)
                self._health[vault] = ChunkHealth(await self._catalog.bad_chunks(vault))
                if legacy is not None:
                    self._legacy[vault] = legacy
                self._open[vault] = datastore
            return self._open[vault]

    def _open_or_create(
        self, record: VaultRecord, known: bool
    ) -> tuple[Datastore, LegacyArea | None]:
        """Blocking: the vault's datastore, opened if it is there, else made (unless `known`:
        the catalog knows of data in it, so it must be there); and its format-1 part, if it is
        being upgraded."""
        storage = self.storage(record.name)
        if storage.has(CONFIG_KEY):
            datastore = Datastore.open(
                storage,
                master=self.master,
                require_encryption=record.encrypted,
                clock=self._clock,
            )
            if datastore.encrypted and datastore.config.vault != record.name:
                raise CorruptData(
                    what=f"datastore at {storage.location}",
                    detail=f"it belongs to vault {datastore.config.vault!r}, not "
                    f"{record.name!r}: a datastore is never shared between vaults",
                )
            return self._with_layout(datastore), self._legacy_of(datastore)
        if known:
            raise DatastoreMissing(vault=record.name, location=storage.location)
        datastore = Datastore.create(
            storage, record.chunk_size, master=self.master, vault=record.name, clock=self._clock
        )
        log.info(
            "vault %s: datastore created at %s (%s)",
            record.name,
            storage.location,
            "encrypted" if datastore.encrypted else "not encrypted: no master key",
        )
        return self._with_layout(datastore), None

    def _with_layout(self, datastore: Datastore) -> Datastore:
        """A format-1 datastore goes through a `LegacyLayout` (module note)."""
        if datastore.encrypted:
            return datastore
        return Datastore(LegacyLayout(datastore.storage), datastore.config, clock=self._clock)

    def _legacy_of(self, datastore: Datastore) -> LegacyArea | None:
        """Blocking: the format-1 part of a datastore being upgraded, with the recovery points
        still read from it."""
        old = datastore.config.upgrading_from
        if old is None:
            return None
        legacy = Datastore(LegacyLayout(datastore.storage, moved=True), old, clock=self._clock)
        return LegacyArea(legacy, set(pending_points(legacy, datastore)))

    # --- a vault being upgraded (controller/upgrades.py) -------------------------------------

    def legacy(self, vault: str) -> LegacyArea | None:
        """The format-1 part of the vault's datastore while it is upgraded (open it first)."""
        return self._legacy.get(vault)

    def router(self, vault: str) -> Callable[[str], Datastore]:
        """Which datastore holds a recovery point of the (open) vault: its format-1 part while
        the point is not converted, else the vault's datastore. Safe to call from any thread."""
        current = self._open[vault]
        area = self._legacy.get(vault)
        if area is None:
            return lambda rp_id: current
        return lambda rp_id: area.datastore if rp_id in area.pending else current

    async def reader(self, vault: str, rp_id: str) -> Datastore:
        """The datastore to read recovery point `rp_id` of `vault` from."""
        await self.get(vault)
        return self.router(vault)(rp_id)

    def in_old_format(self, vault: str, rp_id: str) -> bool:
        """Whether recovery point `rp_id` is still read from the format-1 part of `vault`."""
        area = self._legacy.get(vault)
        return area is not None and rp_id in area.pending

    def partition(self, vault: str, rp_ids: Iterable[str]) -> list[tuple[Datastore, list[str]]]:
        """`rp_ids` of the (open) vault by the datastore that holds them."""
        route = self.router(vault)
        parts: dict[int, tuple[Datastore, list[str]]] = {}
        for rp_id in rp_ids:
            datastore = route(rp_id)
            parts.setdefault(id(datastore), (datastore, []))[1].append(rp_id)
        return list(parts.values())

    async def delete_recovery_point(self, vault: str, rp_id: str) -> None:
        """Delete a recovery point of `vault` from wherever it is: while the vault is upgraded,
        its format-1 part first, then the vault's datastore. An upgrade converting the point
        meanwhile looks at format 1 after storing its format-2 manifest: either it finds the
        point gone and deletes that manifest, or this deletes it after."""
        datastore = await self.get(vault)
        area = self._legacy.get(vault)
        if area is not None:
            await asyncio.to_thread(area.datastore.delete_recovery_point, rp_id)
            area.pending.discard(rp_id)  # here, in the event loop: readers only test it
        await asyncio.to_thread(datastore.delete_recovery_point, rp_id)

    def begin_upgrade(self, vault: str, new: Datastore, pending: Iterable[str]) -> LegacyArea:
        """The vault's format-1 datastore has been switched (datastore/upgrade.py): from now on
        its format-2 datastore `new` is the vault's, and the points `pending` are read from the
        format-1 part."""
        old = self._open[vault]
        area = LegacyArea(old, set(pending))
        self._legacy[vault] = area
        self._open[vault] = new
        return area

    def committed(self, vault: str, rp_id: str, datastore: Datastore) -> None:
        """A backup committed recovery point `rp_id` into `datastore`: if that is the format-1
        part of the vault (the backup began before the vault was switched), the point is read
        from there until it is converted."""
        area = self._legacy.get(vault)
        if area is not None and datastore is area.datastore:
            area.pending.add(rp_id)

    def end_upgrade(self, vault: str) -> None:
        """The vault's upgrade is done: no format-1 part any more."""
        self._legacy.pop(vault, None)

    async def write_description(self, vault: str, write: Callable[[Datastore], None]) -> bool:
        """Run `write(datastore)` in a thread on the vault's open datastore; False, having done
        nothing, if it is not open (not yet created, or destroyed). Never at once with a
        `destroy`: a description written after the datastore's removal would be left behind
        (controller/descriptions.py)."""
        async with self._lock:
            datastore = self._open.get(vault)
            if datastore is None:
                return False
            await asyncio.to_thread(write, datastore)
            return True

    def guard(self, vault: str) -> ChunkGuard:
        """The digests running jobs of the vault rely on; garbage collection spares them."""
        return self._guards.setdefault(vault, ChunkGuard())

    async def health(self, vault: str) -> ChunkHealth:
        """The vault's chunks known to be bad (the datastore opened first if need be)."""
        await self.get(vault)
        return self._health[vault]

    async def destroy(self, vault: str) -> None:
        """Remove an emptied vault's datastore (it holds no recovery point any more)."""
        async with self._lock:
            self._open.pop(vault, None)
            self._legacy.pop(vault, None)
            self._guards.pop(vault, None)
            self._health.pop(vault, None)
            try:
                if self.is_s3:
                    # The storage itself, whatever layout a datastore reads it through.
                    await asyncio.to_thread(_erase, self.storage(vault))
                else:
                    await asyncio.to_thread(shutil.rmtree, self.path(vault))
            except FileNotFoundError:
                pass
            except (OSError, DatastoreError) as exc:
                raise DatastoreError(
                    detail=f"the vault is deleted, but its datastore {self.location(vault)} "
                    f"could not be removed: {exc}; remove it by hand"
                ) from exc


def _erase(storage: ObjectStore) -> None:
    """Delete every object of a datastore on an object store: `datastore.json` last, so a
    removal cut short still looks like a datastore and can be found and finished."""
    for key in storage.list(""):
        if key != CONFIG_KEY:
            storage.delete(key, durable=False)
    storage.sync()
    storage.delete(CONFIG_KEY)


__all__ = ["Datastores", "LegacyArea", "vault_location"]
