"""Disk images chunked as a backup does, and an in-memory chunk source that counts requests.

`chunk_image` reads an image with the agent's own `DiskReader` (holes skipped, zero chunks
found) and compresses each chunk with the agent's `compress`, so the index and the stored
chunks are what a backup of that image would have put in a datastore. `MemorySource`
serves them as the controller's download stream would, and records every digest asked for;
`corrupt` damages a stored chunk the way a bad disk or a tampered datastore would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.chunk_source import FetchedChunk
from agent.disk import DiskReader
from shared.blob import Compression, compress
from shared.digest import DIGEST_SIZE
from shared.errors import ChunkMissing
from shared.index import DiskIndex

CHUNK_SIZE = 512 << 10


def chunk_image(
    path: Path, disk: str = "disk0", chunk_size: int = CHUNK_SIZE
) -> tuple[DiskIndex, dict[bytes, FetchedChunk]]:
    with DiskReader(path, chunk_size) as reader:
        count = -(-reader.size // chunk_size)
        digests = bytearray(count * DIGEST_SIZE)  # zero-filled: holes are ZERO_DIGEST
        stored: dict[bytes, FetchedChunk] = {}
        for number in reader.data_chunks():
            digest, data = reader.read(number)
            digests[number * DIGEST_SIZE : (number + 1) * DIGEST_SIZE] = digest
            if digest != bytes(DIGEST_SIZE) and digest not in stored:
                compression, payload = compress(data)
                stored[digest] = FetchedChunk(digest, compression, len(data), payload)
        return DiskIndex(disk, reader.size, chunk_size, bytes(digests)), stored


@dataclass
class MemorySource:
    """A ChunkSource over a dict; counts calls, chunks and stored bytes served."""

    chunks: dict[bytes, FetchedChunk]
    asked: list[bytes] = field(default_factory=list)
    calls: int = 0
    bytes_served: int = 0
    gate: asyncio.Event | None = None  # when set, fetches wait for it
    called: asyncio.Event = field(default_factory=asyncio.Event)  # set by the first fetch

    async def fetch(self, digests: Sequence[bytes]) -> list[FetchedChunk]:
        self.calls += 1
        self.called.set()
        self.asked.extend(digests)
        if self.gate is not None:
            await self.gate.wait()
        found = []
        for digest in digests:
            chunk = self.chunks.get(digest)
            if chunk is None:
                raise ChunkMissing(digest=digest.hex())
            self.bytes_served += len(chunk.payload)
            found.append(chunk)
        return found

    def corrupt(self, digest: bytes) -> None:
        """Flip a byte of the stored chunk (still a valid frame or not, the digest fails)."""
        chunk = self.chunks[digest]
        payload = bytearray(chunk.payload)
        payload[len(payload) // 2] ^= 0xFF
        self.chunks[digest] = FetchedChunk(
            digest, chunk.compression, chunk.raw_size, bytes(payload)
        )

    def replace_raw(self, digest: bytes, raw: bytes) -> None:
        """Store other (well-formed, uncompressed) bytes under `digest`."""
        self.chunks[digest] = FetchedChunk(digest, Compression.NONE, len(raw), raw)
