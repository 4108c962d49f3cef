"""A bounded cache of verified chunks, by digest, least recently used evicted first.

Only chunks that passed `open_chunk` enter, so a hit needs no second check; keyed by digest,
one cache can serve every recovery point an agent has open (equal digests are equal bytes).
The budget counts the chunks' raw bytes: the memory a file recovery may hold stays fixed
whatever the disk's size. Used from the event loop only (no locking).
"""

from __future__ import annotations

from collections import OrderedDict

from shared.errors import InvalidArgument


class ChunkCache:
    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise InvalidArgument(detail=f"chunk cache budget {budget_bytes} is negative")
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self._chunks: OrderedDict[bytes, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._chunks)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._chunks

    def get(self, digest: bytes) -> bytes | None:
        raw = self._chunks.get(digest)
        if raw is None:
            self.misses += 1
            return None
        self.hits += 1
        self._chunks.move_to_end(digest)
        return raw

    def put(self, digest: bytes, raw: bytes) -> None:
        """Keep `raw` (verified) under `digest`, evicting the least recently used to fit; a
        chunk larger than the whole budget is not kept."""
        if digest in self._chunks:
            self._chunks.move_to_end(digest)
            return
        if len(raw) > self.budget_bytes:
            return
        self._chunks[digest] = raw
        self.used_bytes += len(raw)
        while self.used_bytes > self.budget_bytes:
            _, evicted = self._chunks.popitem(last=False)
            self.used_bytes -= len(evicted)
