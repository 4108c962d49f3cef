"""The vaults' datastores, opened once each and shared by every job of that vault.

With each datastore go the vault's `ChunkGuard` (what running jobs rely on) and its
`ChunkHealth` (which chunks are known bad), loaded from the catalog when the datastore is
opened.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

from controller.catalog import Catalog
from controller.datastore import ChunkGuard, Datastore, LocalDirectoryStore, ObjectStore
from controller.datastore.health import ChunkHealth
from shared.errors import DatastoreError


class Datastores:
    def __init__(
        self,
        catalog: Catalog,
        root: Path,
        *,
        backend: Callable[[Path], ObjectStore] = LocalDirectoryStore,
    ) -> None:
        """`backend` opens a vault's object store in its directory (tests wrap the local one)."""
        self._catalog = catalog
        self._root = root
        self._backend = backend
        self._open: dict[str, Datastore] = {}
        self._guards: dict[str, ChunkGuard] = {}
        self._health: dict[str, ChunkHealth] = {}
        self._lock = asyncio.Lock()

    def path(self, vault: str) -> Path:
        return self._root / vault

    async def get(self, vault: str) -> Datastore:
        """The vault's datastore, created on first use with the vault's chunk size."""
        store = self._open.get(vault)
        if store is not None:
            return store
        async with self._lock:
            if vault not in self._open:
                record = await self._catalog.vault(vault)
                backend = self._backend(self.path(vault))
                opened = await asyncio.to_thread(
                    Datastore.open_or_create, backend, record.chunk_size
                )
                self._health[vault] = ChunkHealth(await self._catalog.bad_chunks(vault))
                self._open[vault] = opened
            return self._open[vault]

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
            self._guards.pop(vault, None)
            self._health.pop(vault, None)
            try:
                await asyncio.to_thread(shutil.rmtree, self.path(vault))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise DatastoreError(
                    detail=f"the vault is deleted, but its datastore {self.path(vault)} could "
                    f"not be removed: {exc}; remove it by hand"
                ) from exc
