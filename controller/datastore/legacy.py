"""The format-1 part of a datastore being upgraded: its indexes and manifests moved aside.

An upgrade (upgrade.py) converts a format-1 datastore to format 2 in place, in the same
storage, while backups, restores, prunes and garbage collection go on. Both formats name a
recovery point's objects the same way (`indexes/<rp>/<disk>.didx`, `manifests/<rp>.json`), so
the two cannot share those keys: when the upgrade begins, every format-1 index and manifest is
copied under `LEGACY_PREFIX` and from then on read and written there, while the datastore's own
keys hold format 2. Chunks need no move: a plain and a keyed BLAKE3 name of real content never
coincide, so both formats' chunks live under `chunks/`.

`LegacyLayout` is the ObjectStore wrapper that does this for the format-1 datastore: with
`moved` false it passes every key through (a format-1 datastore as it always was); `move`
switches it, in one step, to keeping indexes and manifests under `LEGACY_PREFIX`. Every
format-1 datastore the controller opens is read and written through one (`Datastores`), so
whoever holds it (a backup that started before the upgrade, a verify, a collection) follows the
move without knowing of it: a write it makes afterwards lands where the upgrade will find it,
and what it reads was copied there before the switch. The switch holds the wrapper's write lock
while the copy is made, `datastore.json` is rewritten and the flag is set, so no index or
manifest is written in between to a place the copy has already passed. Reads take no lock: the
objects under the old keys stay where they are until the upgrade deletes them after the switch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from controller.datastore.backend import ObjectInfo, ObjectStore
from controller.datastore.lease import DEFAULT_LEASE_SECONDS, LeaseHolder, WriterLease
from shared.clock import Clock

LEGACY_PREFIX = "format1/"
"""Where a datastore being upgraded keeps its format-1 indexes and manifests."""
METADATA_PREFIXES = ("indexes/", "manifests/")
"""The keys that move: a recovery point's objects. Chunks and `datastore.json` do not."""


def is_metadata(key: str) -> bool:
    return key.startswith(METADATA_PREFIXES)


class LegacyLayout:
    """A format-1 datastore's store: its indexes and manifests under `LEGACY_PREFIX` once
    `moved`; thread-safe."""

    def __init__(self, inner: ObjectStore, *, moved: bool = False) -> None:
        self.inner = inner
        self._moved = moved
        self._writes = threading.Lock()

    def __repr__(self) -> str:
        return f"LegacyLayout({self.inner!r}, moved={self._moved})"

    @property
    def moved(self) -> bool:
        return self._moved

    @property
    def location(self) -> str:
        return self.inner.location

    def move(self, prepare: Callable[[ObjectStore], None]) -> None:
        """Run `prepare(inner)` (copy the metadata, rewrite `datastore.json`) while no index or
        manifest can be written through this store, then keep them under `LEGACY_PREFIX`."""
        with self._writes:
            if self._moved:
                return
            prepare(self.inner)
            self._moved = True

    def _key(self, key: str) -> str:
        return LEGACY_PREFIX + key if self._moved and is_metadata(key) else key

    # --- ObjectStore -------------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, durable: bool = True) -> None:
        if not is_metadata(key):
            self.inner.put(key, data, durable=durable)
            return
        with self._writes:
            self.inner.put(self._key(key), data, durable=durable)

    def get(self, key: str) -> bytes:
        return self.inner.get(self._key(key))

    def has(self, key: str) -> bool:
        return self.inner.has(self._key(key))

    def stat(self, key: str) -> ObjectInfo:
        return self.inner.stat(self._key(key))

    def delete(self, key: str, *, durable: bool = True) -> None:
        if not is_metadata(key):
            self.inner.delete(key, durable=durable)
            return
        with self._writes:
            self.inner.delete(self._key(key), durable=durable)

    def sync(self) -> None:
        self.inner.sync()

    def list(self, prefix: str, after: str = "") -> Iterator[str]:
        if not (self._moved and is_metadata(prefix)):
            return self.inner.list(prefix, after)
        return self._moved_list(prefix, after)

    def _moved_list(self, prefix: str, after: str) -> Iterator[str]:
        start = LEGACY_PREFIX + after if after else ""
        for key in self.inner.list(LEGACY_PREFIX + prefix, start):
            yield key.removeprefix(LEGACY_PREFIX)

    def acquire_writer_lease(
        self,
        holder: LeaseHolder,
        *,
        duration: float = DEFAULT_LEASE_SECONDS,
        clock: Clock | None = None,
    ) -> WriterLease:
        return self.inner.acquire_writer_lease(holder, duration=duration, clock=clock)


__all__ = ["LEGACY_PREFIX", "METADATA_PREFIXES", "LegacyLayout", "is_metadata"]
