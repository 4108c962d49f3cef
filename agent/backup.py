"""The backup pipeline: a disk's chunks read, hashed, deduplicated and uploaded.

First the disks are snapshotted consistently (`agent.consistency`: pre-script, sync, freeze,
snapshot, thaw, post-script); the chunks are read from the snapshots, which are released at
the end. Per disk, in bounded stages (so memory does not grow with the disk):

1. read and hash, then compress: each chunk to read (every chunk that holds data) is read
   and hashed by reader threads of its own and, unless it is all zero or the same as the
   previous recovery point's chunk at that position, compressed in the shared pool, one
   chunk a core; a window of chunks is in flight, consumed in disk order; holes and zero
   chunks become ZERO_DIGEST without being stored or sent. `_chunks` takes the chunk
   numbers to read as an iterable: a caller that knows which chunks changed passes only
   those, and the digests of the others come from wherever it knows them;
2. dedup: a chunk already seen in this backup is not sent; the rest are asked of the
   controller in batches (`MissingChunks`);
3. upload: the chunks the datastore lacks go to the controller a batch to a message through
   a bounded queue (`UploadChunks`); the controller re-hashes each one;
4. index: when the disk's chunks are all uploaded, its index (ordered digests) is sent
   (`PutIndex`); the controller accepts it only if every chunk it names is durable.

Chunks are named with the vault's keyed BLAKE3: the command carries the vault's chunk-id key
(a secret: never logged; without one, a format-1 datastore's plain BLAKE3). The previous
recovery point's index is compared against only when the controller says it was made with
this same hash and key (its label): digests under another key never match, and a chunk
skipped on a false match would be missing from the new recovery point.

With changed-block tracking (`agent.tracking`), a disk snapshotted as a reflink clone is
compared with the clone kept from the previous backup first: the chunks whose blocks did not
change are not read at all, and take their digests from the previous index; each disk's
result says whether it was tracked or why it was read in full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import cast

import grpc

from agent import tracking
from agent.config import DiskConfig
from agent.consistency import SnapshotSet, consistent_snapshot
from agent.disk import DiskReader
from agent.progress import Progress
from agent.runtime import Runtime
from shared.blob import Compression, compress
from shared.digest import CHUNK_HASH, DIGEST_SIZE, ZERO_DIGEST, ChunkHash
from shared.errors import DiskNotFound, DiskReadFailed, NotFound
from shared.model import Consistency
from shared.rpc import agent_pb2
from shared.rpc_errors import from_rpc_error

log = logging.getLogger(__name__)

READ_AHEAD_BYTES = 4 << 20  # chunk buffers being read, hashed or compressed at once ...
MIN_READ_AHEAD, MAX_READ_AHEAD = 4, 32  # ... in chunks, whatever the chunk size
READERS = 4  # direct reads in flight: the disk (or its virtual device) works on several
COMPRESSORS = max(1, min(os.cpu_count() or 1, 8))  # chunks compressed at once: one a core
MISSING_BATCH = 16  # compressed chunks held while the controller is asked which it lacks
UPLOAD_BATCH_BYTES = 1 << 20  # ... or this many bytes of them; one upload message at most
UPLOAD_QUEUE = 1  # upload messages waiting for the stream (each up to 1 MiB: agent memory)
INDEX_PART = 1 << 16  # digests per PutIndex message


# A chunk ready to send: digest, compression, raw size, payload.
Compressed = tuple[bytes, Compression, int, bytes]


@dataclass
class DiskResult:
    disk: str
    size_bytes: int
    bytes_read: int = 0
    bytes_sent: int = 0
    chunk_count: int = 0
    zero_chunks: int = 0
    consistency: str = Consistency.CRASH
    provider: str = ""
    changed_blocks: bool = False  # only the chunks changed since the kept clone were read
    full_read_reason: str = ""  # why every chunk was read

    def to_proto(self) -> agent_pb2.DiskBackupResult:
        return agent_pb2.DiskBackupResult(
            disk=self.disk,
            size_bytes=self.size_bytes,
            bytes_read=self.bytes_read,
            bytes_sent=self.bytes_sent,
            chunk_count=self.chunk_count,
            zero_chunks=self.zero_chunks,
            consistency=self.consistency,
            snapshot_provider=self.provider,
            changed_blocks=self.changed_blocks,
            full_read_reason=self.full_read_reason,
        )


class BackupRun:
    """One backup command: every requested disk, one after the other."""

    def __init__(self, runtime: Runtime, command: agent_pb2.BackupCommand) -> None:
        self._config = runtime.config
        self._stub = runtime.stub
        self._status = runtime.status
        self._in_pool = runtime.in_pool
        self._command = command
        # InvalidArgument for a key of the wrong size: the command fails, nothing is sent.
        self._hash = ChunkHash(command.chunk_id_key or None)
        self._tracking = tracking.Request(
            recovery_point_id=command.recovery_point_id,
            previous_recovery_point_id=command.previous_recovery_point_id,
            full_read_days=command.full_read_days if command.recovery_point_id else 0,
            controller_reason=command.full_read_reason,
        )
        self._plans: dict[str, tracking.Plan] = {}
        self._previous_indexes: dict[str, asyncio.Future[bytes | None]] = {}
        self.snapshots: SnapshotSet | None = None

    def disks(self) -> list[DiskConfig]:
        names = list(self._command.disks) or [d.name for d in self._config.disks]
        chosen = []
        for name in names:
            disk = self._config.disk(name)
            if disk is None:
                known = ", ".join(d.name for d in self._config.disks)
                raise DiskNotFound(vm_id=self._config.vm_id, disk=name, known=known)
            chosen.append(disk)
        return chosen

    async def run(self) -> list[DiskResult]:
        """Snapshot the disks consistently (`agent.consistency`), then stream the snapshots."""
        disks = self.disks()
        for disk in disks:
            if not disk.path.exists():
                raise DiskReadFailed(disk=disk.name, path=disk.path, detail="it does not exist")
        env = {"COFFER_JOB_ID": self._command.job_id, "COFFER_VM_ID": self._config.vm_id}
        async with (
            self._fetching_previous(disks),
            consistent_snapshot(
                [(disk.name, disk.path) for disk in disks], self._config.consistency, env
            ) as snapshots,
        ):
            self.snapshots = snapshots
            with contextlib.ExitStack() as opened:
                readers = []
                for disk in disks:
                    path = snapshots.read_path(disk.name)
                    try:
                        readers.append(
                            opened.enter_context(
                                DiskReader(path, self._command.chunk_size, self._hash)
                            )
                        )
                    except OSError as exc:
                        raise DiskReadFailed(
                            disk=disk.name, path=path, detail=exc.strerror
                        ) from exc
                total = sum(reader.size for reader in readers)
                progress = Progress(self._status, self._command.job_id, total)
                results = [
                    await self._disk(disk, reader, progress)
                    for disk, reader in zip(disks, readers, strict=True)
                ]
            # Every disk is backed up: their clones are the ones the next backup compares with.
            await self._in_pool(self._keep_clones, disks, snapshots)
        # Leaving the snapshot thawed what a read-while-frozen disk held: the figures are final.
        for result in results:
            taken = snapshots.disks[result.disk]
            result.consistency, result.provider = taken.consistency, taken.provider
        return results

    def _keep_clones(self, disks: list[DiskConfig], snapshots: SnapshotSet) -> None:
        """After success: each reflink clone is kept for the next backup (tracking on), or the
        kept ones are removed (tracking off, or the disk is no longer cloned); blocking. A
        failure here costs the next backup a full read, never this one its recovery point."""
        now = time.time()
        for disk in disks:
            taken, plan = snapshots.disks[disk.name], self._plans.get(disk.name)
            try:
                if self._tracking.full_read_days > 0 and taken.provider == tracking.REFLINK:
                    # The chain's last full read: this one, unless it read only changes.
                    kept_at = now
                    if plan is not None and plan.tracking and plan.kept is not None:
                        kept_at = plan.kept.full_read_at
                    tracking.keep(
                        disk.path,
                        taken.read_path,
                        rp_id=self._tracking.recovery_point_id,
                        chunk_size=self._command.chunk_size,
                        chunk_hash=self._hash.label,
                        full_read_at=kept_at,
                    )
                else:
                    tracking.drop(disk.path)
            except OSError as exc:
                log.warning(
                    "backup %s: the clone of disk %s was not kept for changed-block tracking "
                    "(%s); the next backup reads it in full",
                    self._command.job_id,
                    disk.name,
                    exc,
                )
                with contextlib.suppress(OSError):  # what is left is read in full next time
                    tracking.drop(disk.path)

    async def _plan(self, disk: DiskConfig, size: int, previous: bytes) -> tracking.Plan:
        """Which chunks of the disk to read (agent.tracking)."""
        assert self.snapshots is not None
        taken = self.snapshots.disks[disk.name]
        plan = await self._in_pool(
            partial(
                tracking.plan,
                self._tracking,
                disk.path,
                taken.read_path,
                provider=taken.provider,
                size=size,
                chunk_size=self._command.chunk_size,
                chunk_hash=self._hash.label,
                previous=previous,
                now=time.time(),
            )
        )
        self._plans[disk.name] = plan
        if plan.to_read is not None:
            log.info(
                "backup %s: disk %s: %d of %d chunks changed since the kept clone",
                self._command.job_id,
                disk.name,
                sum(plan.to_read),
                len(plan.to_read),
            )
        if plan.reason:
            log.info(
                "backup %s: disk %s read in full: %s", self._command.job_id, disk.name, plan.reason
            )
        return plan

    @contextlib.asynccontextmanager
    async def _fetching_previous(self, disks: list[DiskConfig]) -> AsyncIterator[None]:
        """The previous recovery point's index of each disk, fetched while the disks are
        snapshotted (neither waits for the other: the fetch is the controller's presence check
        of the base's chunks, the snapshot a clone or a freeze here). Leaving cancels and
        waits for the fetches not awaited, so none outlives the backup."""
        for disk in disks:
            self._previous_indexes[disk.name] = asyncio.ensure_future(self._previous(disk.name))
        try:
            yield
        finally:
            pending = list(self._previous_indexes.values())
            for fetch in pending:
                fetch.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _previous(self, disk: str) -> bytes | None:
        previous = self._command.previous_recovery_point_id
        if not previous:
            return None
        request = agent_pb2.FetchIndexRequest(
            job_id=self._command.job_id, recovery_point_id=previous, disk=disk
        )
        parts: list[bytes] = []
        try:
            async for part in self._stub.FetchIndex(request):
                if part.chunk_size != self._command.chunk_size:
                    return None  # another chunk size: positions do not line up
                if not parts and (part.chunk_hash or CHUNK_HASH) != self._hash.label:
                    log.info(
                        "backup %s: the previous index of disk %s was made with another "
                        "chunk hash; every chunk is compared with the datastore instead",
                        self._command.job_id,
                        disk,
                    )
                    return None
                parts.append(part.digests)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if isinstance(error, NotFound):  # a disk new since the last backup
                return None
            raise error from exc
        return b"".join(parts)

    async def _disk(self, disk: DiskConfig, reader: DiskReader, progress: Progress) -> DiskResult:
        job_id, chunk_size, size = self._command.job_id, self._command.chunk_size, reader.size
        previous = await self._previous_indexes[disk.name] or b""
        plan = await self._plan(disk, size, previous)
        count = -(-size // chunk_size)
        digests = bytearray(count * DIGEST_SIZE)  # zero-filled: holes are ZERO_DIGEST already
        result = DiskResult(disk.name, size, chunk_count=count)
        result.changed_blocks, result.full_read_reason = plan.tracking, plan.reason
        uploads: asyncio.Queue[agent_pb2.ChunkUpload | None] = asyncio.Queue(UPLOAD_QUEUE)

        async def messages() -> AsyncIterator[agent_pb2.ChunkUpload]:
            while (message := await uploads.get()) is not None:
                yield message

        async def upload() -> None:
            try:
                await self._stub.UploadChunks(messages())
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from exc

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(upload(), name=f"upload-{job_id}-{disk.name}")
            seen: set[bytes] = set()
            candidates: list[Compressed] = []
            candidate_bytes = 0
            position = 0  # bytes of the disk dealt with, for progress
            with_data = 0  # chunks that are not all zero
            chunks = self._chunks(disk, reader, previous, plan, reader.data_chunks())
            # aclosing: on failure the generator's cleanup (waiting for reads) runs now.
            async with contextlib.aclosing(chunks):
                async for number, digest, chunk, nbytes in chunks:
                    end = min((number + 1) * chunk_size, size)
                    progress.advance("backup", end - position)
                    position = end
                    # Written also when zero: `digests` may start from what a caller knows
                    # of the chunks it does not read (another chunk there before).
                    digests[number * DIGEST_SIZE : (number + 1) * DIGEST_SIZE] = digest
                    if digest == ZERO_DIGEST:
                        continue
                    with_data += 1
                    result.bytes_read += nbytes
                    if chunk is None or digest in seen:  # as in the previous recovery point
                        continue
                    seen.add(digest)
                    if candidates and candidate_bytes + len(chunk[3]) > UPLOAD_BATCH_BYTES:
                        # One message is at most the batch or one chunk: the size the
                        # controller accepts (shared.rpc_channel.MAX_REQUEST_BYTES).
                        await self._send_missing(candidates, uploads, result)
                        candidates, candidate_bytes = [], 0
                    candidates.append(chunk)
                    candidate_bytes += len(chunk[3])
                    if len(candidates) >= MISSING_BATCH or candidate_bytes >= UPLOAD_BATCH_BYTES:
                        await self._send_missing(candidates, uploads, result)
                        candidates, candidate_bytes = [], 0
            if candidates:
                await self._send_missing(candidates, uploads, result)
            await uploads.put(None)
        result.zero_chunks = count - with_data
        await self._put_index(disk.name, size, bytes(digests))
        progress.advance("backup", size - position)
        return result

    async def _send_missing(
        self,
        candidates: list[Compressed],
        uploads: asyncio.Queue[agent_pb2.ChunkUpload | None],
        result: DiskResult,
    ) -> None:
        """Ask which candidates the datastore lacks, and queue those for upload in one message."""
        request = agent_pb2.MissingChunksRequest(
            job_id=self._command.job_id, digests=[digest for digest, *_ in candidates]
        )
        try:
            reply = await self._stub.MissingChunks(request)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        missing = set(reply.missing)
        message = agent_pb2.ChunkUpload(job_id=self._command.job_id)
        for digest, compression, raw_size, payload in candidates:
            if digest in missing:
                # add() builds the chunk in place: a payload is copied once into the message.
                message.chunks.add(
                    digest=digest,
                    compression=cast(agent_pb2.Compression, compression),  # same values
                    raw_size=raw_size,
                    data=payload,
                )
                result.bytes_sent += len(payload)
        if message.chunks:
            await uploads.put(message)

    async def _chunks(
        self,
        disk: DiskConfig,
        reader: DiskReader,
        previous: bytes,
        plan: tracking.Plan,
        numbers: Iterable[int],
    ) -> AsyncGenerator[tuple[int, bytes, Compressed | None, int], None]:
        """(number, digest, compressed chunk or None, bytes read) of each chunk of `numbers`
        (ascending) that the disk holds, in that order. The chunk is None when it is all zero
        or the same as in `previous`; a chunk the plan does not read has its digest from
        `previous` and 0 bytes read.

        Two stages, so the disk and the cores are busy at once: READERS threads of their own
        read and hash (O_DIRECT reads and BLAKE3 both run without the GIL), each into one of
        a fixed set of chunk buffers; the shared pool compresses, at most as many chunks at
        once as there are cores. A buffer is free again once its chunk is compressed (or
        found unchanged), so memory is the buffers and the compressed chunks not yet taken,
        whatever the disk's size.
        """
        loop = asyncio.get_running_loop()
        depth = max(MIN_READ_AHEAD, min(MAX_READ_AHEAD, READ_AHEAD_BYTES // reader.chunk_size))
        free: asyncio.Queue[mmap.mmap] = asyncio.Queue()
        for _ in range(depth):
            free.put_nowait(reader.buffer())
        cores = asyncio.Semaphore(COMPRESSORS)

        async def one(number: int, buffer: mmap.mmap) -> tuple[int, bytes, Compressed | None, int]:
            try:
                digest, data = await loop.run_in_executor(readers, reader.read_into, number, buffer)
                at = number * DIGEST_SIZE
                if digest == ZERO_DIGEST or previous[at : at + DIGEST_SIZE] == digest:
                    return number, digest, None, len(data)
                # Compressing before the controller says whether it lacks the chunk costs CPU
                # only for a chunk that changed here yet exists elsewhere in the vault.
                async with cores:
                    compression, payload = await self._in_pool(compress, data)
                return number, digest, (digest, compression, len(data), payload), len(data)
            finally:
                free.put_nowait(buffer)

        window: deque[asyncio.Future[tuple[int, bytes, Compressed | None, int]]] = deque()
        readers = ThreadPoolExecutor(READERS, thread_name_prefix="agent-read")
        try:
            for number in numbers:
                if len(window) >= depth:
                    yield await window.popleft()
                if plan.must_read(number):
                    window.append(asyncio.ensure_future(one(number, await free.get())))
                else:
                    # Unchanged since the kept clone: the previous recovery point's digest, in
                    # its place in disk order, without a read or a buffer.
                    unchanged = loop.create_future()
                    at = number * DIGEST_SIZE
                    unchanged.set_result((number, previous[at : at + DIGEST_SIZE], None, 0))
                    window.append(unchanged)
            while window:
                yield await window.popleft()
        except OSError as exc:
            raise DiskReadFailed(disk=disk.name, path=disk.path, detail=exc.strerror) from exc
        finally:
            # Reads still running use the descriptor and the buffers: let them end before the
            # caller closes it (a closed number could be reused by another file meanwhile).
            if window:
                await asyncio.wait(window)
                for task in window:
                    if not task.cancelled():
                        task.exception()  # retrieved: the first failure is what propagates
            readers.shutdown(wait=False)  # its threads are idle: every read has ended

    async def _put_index(self, disk: str, size: int, digests: bytes) -> None:
        job_id, chunk_size = self._command.job_id, self._command.chunk_size
        step = INDEX_PART * DIGEST_SIZE

        async def parts() -> AsyncIterator[agent_pb2.IndexPart]:
            for start in range(0, max(len(digests), 1), step):
                yield agent_pb2.IndexPart(
                    job_id=job_id,
                    disk=disk,
                    size_bytes=size,
                    chunk_size=chunk_size,
                    digests=digests[start : start + step],
                )

        try:
            await self._stub.PutIndex(parts())
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
