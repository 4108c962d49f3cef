"""The vaults' datastores, opened once each and shared by every job of that vault."""

from __future__ import annotations

import asyncio
from pathlib import Path

from controller.catalog import Catalog
from controller.datastore import Datastore, LocalDirectoryStore


class Datastores:
    def __init__(self, catalog: Catalog, root: Path) -> None:
        self._catalog = catalog
        self._root = root
        self._open: dict[str, Datastore] = {}
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
                backend = LocalDirectoryStore(self.path(vault))
                self._open[vault] = await asyncio.to_thread(
                    Datastore.open_or_create, backend, record.chunk_size
                )
            return self._open[vault]
