"""A recovery point's disk read lazily: each read fetches only the chunks it touches.

The disk is its index (`shared.index.DiskIndex`): chunk `i` covers bytes
`[i * chunk_size, (i + 1) * chunk_size)` and is named by its BLAKE3 digest, or by
`ZERO_DIGEST` for a hole. A read of `[offset, offset + length)`:

- serves zero chunks from memory, never asking the source;
- serves chunks held in the `ChunkCache` (bounded by bytes, least recently used evicted);
- joins a fetch already under way for the same chunk instead of starting another, so
  concurrent readers of one chunk cost one download (coalescing);
- fetches the rest from the `ChunkSource`, in batches, a bounded number of calls at once,
  and checks every chunk (`open_chunk`: decompress within its size, BLAKE3 equal to the
  index's digest, length equal to the chunk's extent) in the thread pool before any byte of
  it is returned or cached.

After a few reads in disk order it reads ahead a little (`readahead` chunks past the last
one read), so a file copied out sequentially overlaps download and use.

A chunk that fails its check never yields data: the read raises `DataCorrupted`, naming the
recovery point, the disk, the chunk's number and digest, and the disk records the error
(`errors`) for the job to report; the file system above sees EIO. Counters (`stats`) say how
much was fetched, for the job's record and the benchmark.

Fetches run as tasks of the disk's own task group (the disk is an async context manager):
a reader that gives up does not cancel a download other readers wait for, and closing the
disk ends every fetch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from agent.chunk_cache import ChunkCache
from agent.chunk_source import ChunkSource, FetchedChunk, open_chunk
from shared.digest import ZERO_DIGEST, ChunkHash
from shared.errors import CofferError, CorruptData, DataCorrupted, FileRecoveryFailed
from shared.index import DiskIndex

log = logging.getLogger(__name__)

READAHEAD_CHUNKS = 4  # chunks fetched past a sequential reader (2 MiB at 512 KiB chunks)
SEQUENTIAL_AFTER = 2  # reads in disk order before reading ahead
FETCH_BATCH = 16  # digests per call to the source
FETCH_CALLS = 4  # calls to the source at once, per disk
MAX_ERRORS = 32  # errors a disk keeps for its report; later ones are only logged


@dataclass
class FetchStats:
    """What a lazily read disk cost: the benchmark and the job's record report these."""

    reads: int = 0
    bytes_read: int = 0  # bytes returned to readers
    chunks_fetched: int = 0  # chunks downloaded (each one once, unless evicted and read again)
    bytes_fetched: int = 0  # their stored (compressed) bytes: what crossed the network
    raw_bytes_fetched: int = 0  # their bytes once decompressed
    readahead_chunks: int = 0  # of chunks_fetched, those fetched ahead of a reader
    zero_chunks_read: int = 0  # zero chunks served without a fetch


class LazyDisk:
    """One disk of a recovery point, readable at any offset; an async context manager."""

    def __init__(
        self,
        index: DiskIndex,
        source: ChunkSource,
        *,
        recovery_point: str,
        chunk_hash: ChunkHash,
        cache: ChunkCache,
        pool: Executor | None = None,
        readahead: int = READAHEAD_CHUNKS,
    ) -> None:
        self.index = index
        self.recovery_point = recovery_point
        self.chunk_hash = chunk_hash
        self.cache = cache
        self.stats = FetchStats()
        self.errors: list[CofferError] = []
        self._source = source
        self._pool = pool
        self._readahead = readahead
        self._zeros = bytes(index.chunk_size)
        self._inflight: dict[bytes, asyncio.Future[bytes]] = {}
        self._calls = asyncio.Semaphore(FETCH_CALLS)
        self._tasks: asyncio.TaskGroup | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        self._last_chunk = -2
        self._streak = 0

    @property
    def size(self) -> int:
        return self.index.size_bytes

    @property
    def name(self) -> str:
        return self.index.disk

    async def __aenter__(self) -> Self:
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closed = True
        tasks, self._tasks = self._tasks, None
        if tasks is None:
            return
        # Downloads nobody needs any more: stop them (their readers get an error, see _fetch).
        for task in list(self._running):
            task.cancel()
        # The body's own exception goes on as it is, not wrapped in a group: fetches never
        # raise (their errors go to their readers), so the group has nothing to add.
        await tasks.__aexit__(None, None, None)

    def abort(self) -> None:
        """Fail every read from now on, and those waiting for chunks now.

        For a reader that must not wait: a process killed while the kernel reads this disk
        for it (a mount being cancelled) ends only once those reads are answered."""
        self._closed = True
        for task in list(self._running):
            task.cancel()

    def check(self) -> None:
        """Raise the first error a read met (DataCorrupted for a damaged chunk), if any."""
        if self.errors:
            raise self.errors[0]

    async def read(self, offset: int, length: int) -> bytes:
        """Bytes `[offset, offset + length)` of the disk, fewer at its end; checked."""
        if self._closed or self._tasks is None:
            raise FileRecoveryFailed(
                what="the disk",
                recovery_point=self.recovery_point,
                disk=self.name,
                detail="it is closed",
            )
        end = min(offset + length, self.size)
        if offset < 0 or length < 0:
            raise ValueError(f"read of {length} bytes at {offset}")
        if offset >= end:
            return b""
        chunk_size = self.index.chunk_size
        first, last = offset // chunk_size, (end - 1) // chunk_size
        try:
            chunks = await self._chunks(range(first, last + 1))
        except CofferError as exc:
            self._record(exc)
            raise
        self.stats.reads += 1
        self.stats.bytes_read += end - offset
        self._follow(first, last)
        if first == last:
            start = offset - first * chunk_size
            return chunks[first][start : start + end - offset]
        parts = []
        for number in range(first, last + 1):
            base = number * chunk_size
            parts.append(chunks[number][max(offset - base, 0) : min(end - base, chunk_size)])
        return b"".join(parts)

    def _record(self, error: CofferError) -> None:
        if any(
            type(known) is type(error) and known.message == error.message for known in self.errors
        ):
            return
        log.warning("recovery point %s disk %s: %s", self.recovery_point, self.name, error)
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(error)

    def _follow(self, first: int, last: int) -> None:
        """Note a read of chunks first..last; read ahead once reads follow disk order."""
        if first in (self._last_chunk, self._last_chunk + 1):
            self._streak += 1
        else:
            self._streak = 0
        self._last_chunk = last
        if self._readahead <= 0 or self._streak < SEQUENTIAL_AFTER:
            return
        ahead = []
        for number in range(last + 1, min(last + 1 + self._readahead, self.index.chunk_count)):
            digest = self.index.digest_at(number)
            if digest != ZERO_DIGEST and digest not in self._inflight and digest not in self.cache:
                ahead.append((digest, number))
        self._start(ahead, readahead=True)

    async def _chunks(self, numbers: Iterable[int]) -> dict[int, bytes]:
        """The raw bytes of each chunk in `numbers`: zeros, cached, joined or fetched."""
        found: dict[int, bytes] = {}
        waiting: list[tuple[int, asyncio.Future[bytes]]] = []
        wanted: list[tuple[bytes, int]] = []
        for number in numbers:
            digest = self.index.digest_at(number)
            if digest == ZERO_DIGEST:
                found[number] = self._zeros[: self.index.extent(number)[1]]
                self.stats.zero_chunks_read += 1
            elif (raw := self.cache.get(digest)) is not None:
                found[number] = raw
            elif (future := self._inflight.get(digest)) is not None:
                waiting.append((number, future))
            else:
                wanted.append((digest, number))
        waiting.extend(self._start(wanted, readahead=False))
        for number, future in waiting:
            # shield: a reader that gives up must not cancel a download others wait for.
            found[number] = await asyncio.shield(future)
        return found

    def _start(
        self, wanted: list[tuple[bytes, int]], readahead: bool
    ) -> list[tuple[int, asyncio.Future[bytes]]]:
        """Start fetching `wanted` (digest, chunk number) in batches; their futures."""
        loop = asyncio.get_running_loop()
        futures = []
        batch: list[tuple[bytes, int]] = []
        for digest, number in wanted:
            if digest in self._inflight:  # the same chunk twice in one read
                futures.append((number, self._inflight[digest]))
                continue
            future: asyncio.Future[bytes] = loop.create_future()
            # A read ahead that nobody reads, or a reader gone: no "never retrieved" noise.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._inflight[digest] = future
            futures.append((number, future))
            batch.append((digest, number))
            if len(batch) == FETCH_BATCH:
                self._spawn(batch, readahead)
                batch = []
        if batch:
            self._spawn(batch, readahead)
        return futures

    def _spawn(self, batch: list[tuple[bytes, int]], readahead: bool) -> None:
        assert self._tasks is not None
        task = self._tasks.create_task(
            self._fetch(batch, readahead), name=f"fetch-{self.recovery_point}-{self.name}"
        )
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _fetch(self, batch: list[tuple[bytes, int]], readahead: bool) -> None:
        """Fetch and check `batch`, resolving each chunk's future with its bytes or error.

        Nothing is raised out of here (it would end the disk's task group): every error is
        handed to the readers waiting for the chunks it concerns."""
        loop = asyncio.get_running_loop()
        try:
            async with self._calls:
                fetched = await self._source.fetch([digest for digest, _ in batch])
            if len(fetched) != len(batch):
                raise CorruptData(
                    what="the chunk source",
                    detail=f"{len(fetched)} chunks returned for {len(batch)} asked",
                )
            checks = [
                loop.run_in_executor(self._pool, self._open, chunk, digest, number)
                for chunk, (digest, number) in zip(fetched, batch, strict=True)
            ]
            for chunk, (digest, _), check in zip(fetched, batch, checks, strict=True):
                self.stats.chunks_fetched += 1
                self.stats.bytes_fetched += len(chunk.payload)
                self.stats.readahead_chunks += readahead
                future = self._inflight.get(digest)
                try:
                    raw = await check
                except DataCorrupted as exc:
                    if future is not None and not future.done():
                        future.set_exception(exc)
                    continue
                self.stats.raw_bytes_fetched += len(raw)
                self.cache.put(digest, raw)
                if future is not None and not future.done():
                    future.set_result(raw)
        except asyncio.CancelledError:
            raise
        # Handed to every reader of these chunks, none is dropped; a bug is logged as well.
        except Exception as exc:
            if not isinstance(exc, CofferError):
                log.exception("fetching chunks of %s disk %s", self.recovery_point, self.name)
            for digest, _ in batch:
                future = self._inflight.get(digest)
                if future is not None and not future.done():
                    future.set_exception(exc)
        finally:
            for digest, _ in batch:
                future = self._inflight.pop(digest, None)
                if future is not None and not future.done():
                    future.set_exception(
                        FileRecoveryFailed(
                            what="the disk",
                            recovery_point=self.recovery_point,
                            disk=self.name,
                            detail="it was closed while being read",
                        )
                    )

    def _open(self, chunk: FetchedChunk, digest: bytes, number: int) -> bytes:
        """Check one fetched chunk (blocking, in the pool); DataCorrupted when it is bad."""
        try:
            if chunk.digest != digest:
                raise CorruptData(what=f"chunk {digest.hex()}", detail="another chunk came back")
            raw = open_chunk(
                digest, chunk.compression, chunk.raw_size, chunk.payload, self.chunk_hash
            )
            expected = self.index.extent(number)[1]
            if len(raw) != expected:
                raise CorruptData(
                    what=f"chunk {digest.hex()}",
                    detail=f"{len(raw)} bytes where the disk has {expected}",
                )
        except CorruptData as exc:
            raise DataCorrupted(
                recovery_point=self.recovery_point,
                disk=self.name,
                chunk=number,
                digest=digest.hex(),
                detail=exc.fields.get("detail", exc.message),
            ) from exc
        return raw
