"""Chunk health: the chunks of one datastore known to be bad, until they are stored again.

A chunk is bad when a read found it missing or damaged: a verify, a restore's download, the
agent's check of a downloaded chunk (confirmed by the controller's own read), or an incremental
backup's presence check of its base. A chunk's name proves nothing about its bytes, so a bad
chunk is never answered "already stored": a backup that has its content uploads it again
(`Datastore.put_chunk(replace=True)`), which repairs it, and an index that names it is not
committed.

This is the in-memory view the data path asks, one per datastore and thread-safe like the
`ChunkGuard`; the catalog keeps the same set (its `bad_chunks` table), which the controller
loads when it opens the datastore, and `controller.integrity` keeps the two in step and
records what the bad chunks damage.

Marks race with repairs: a verify that read a chunk before a backup stored it again must not
mark the new, good copy bad. Every repair bumps a generation; whoever is about to mark chunks
notes the generation before it reads them (`generation`) and `mark` leaves alone a chunk
repaired since.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable


class ChunkHealth:
    """The digests of one datastore's bad chunks; thread-safe."""

    def __init__(self, bad: Iterable[bytes] = ()) -> None:
        self._lock = threading.Lock()
        self._bad: set[bytes] = set(bad)
        self._generation = 0
        self._repaired: dict[bytes, int] = {}  # digest -> the generation that repaired it

    def __len__(self) -> int:
        with self._lock:
            return len(self._bad)

    @property
    def generation(self) -> int:
        """Note this before reading chunks whose failures you will `mark`."""
        with self._lock:
            return self._generation

    def is_bad(self, digest: bytes) -> bool:
        with self._lock:
            return digest in self._bad

    def bad_among(self, digests: Iterable[bytes]) -> set[bytes]:
        """Those of `digests` that are bad."""
        with self._lock:
            if not self._bad:
                return set()
            return {digest for digest in digests if digest in self._bad}

    def mark(self, digests: Iterable[bytes], since: int) -> set[bytes]:
        """Mark `digests` bad, read at generation `since`; those marked (a chunk repaired
        after `since` is left alone: what was read was the copy it replaced)."""
        with self._lock:
            marked = {digest for digest in digests if self._repaired.get(digest, -1) <= since}
            self._bad |= marked
            return marked

    def repaired(self, digests: Iterable[bytes]) -> set[bytes]:
        """`digests` were stored again (or read whole): no longer bad. Those that were."""
        with self._lock:
            self._generation += 1
            was = set()
            for digest in digests:
                if digest in self._bad:
                    self._bad.discard(digest)
                    self._repaired[digest] = self._generation
                    was.add(digest)
            return was

    def snapshot(self) -> frozenset[bytes]:
        with self._lock:
            return frozenset(self._bad)
