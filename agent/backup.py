"""The backup pipeline: a disk's chunks read, hashed, deduplicated and uploaded.

Per disk, in bounded stages (so memory does not grow with the disk):

1. read + hash: chunks that hold data are read and hashed in the thread pool, a window of
   them in flight, consumed in disk order; holes and all-zero chunks become ZERO_DIGEST;
2. dedup: a chunk whose digest equals the previous recovery point's at the same position, or
   one already seen in this backup, is not sent; the rest are asked of the controller in
   batches (`MissingChunks`);
3. compress + upload: missing chunks are compressed in the pool and streamed to the
   controller through a bounded queue (`UploadChunks`), which re-hashes each one;
4. index: when the disk's chunks are all uploaded, its index (ordered digests) is sent
   (`PutIndex`); the controller accepts it only if every chunk it names is durable.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar, cast

import grpc

from agent.config import AgentConfig, DiskConfig
from agent.disk import data_chunks, disk_size, read_chunk
from agent.progress import Progress
from agent.status import StatusPublisher
from shared.blob import Compression, compress
from shared.digest import DIGEST_SIZE, ZERO_DIGEST
from shared.errors import DiskNotFound, DiskReadFailed, NotFound
from shared.rpc import agent_pb2, agent_pb2_grpc
from shared.rpc_errors import from_rpc_error

log = logging.getLogger(__name__)
T = TypeVar("T")

READ_WINDOW = 4  # chunks being read and hashed in the pool at once
READ_AHEAD = 16  # hashed chunks waiting for deduplication
MISSING_BATCH = 16  # chunks held while the controller is asked which it lacks
UPLOAD_QUEUE = 8  # chunks being compressed or waiting for the upload stream
INDEX_PART = 1 << 16  # digests per PutIndex message


Compressing = tuple[bytes, int, "asyncio.Future[tuple[Compression, bytes]]"]


@dataclass
class DiskResult:
    disk: str
    size_bytes: int
    bytes_read: int = 0
    bytes_sent: int = 0
    chunk_count: int = 0
    zero_chunks: int = 0

    def to_proto(self) -> agent_pb2.DiskBackupResult:
        return agent_pb2.DiskBackupResult(
            disk=self.disk,
            size_bytes=self.size_bytes,
            bytes_read=self.bytes_read,
            bytes_sent=self.bytes_sent,
            chunk_count=self.chunk_count,
            zero_chunks=self.zero_chunks,
        )


class BackupRun:
    """One backup command: every requested disk, one after the other."""

    def __init__(
        self,
        config: AgentConfig,
        stub: agent_pb2_grpc.AgentServiceStub,
        pool: Executor,
        status: StatusPublisher | None,
        command: agent_pb2.BackupCommand,
    ) -> None:
        self._config = config
        self._stub = stub
        self._pool = pool
        self._status = status
        self._command = command

    def _in_pool(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

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
        disks = self.disks()
        fds: dict[str, int] = {}
        try:
            for disk in disks:
                try:
                    fds[disk.name] = os.open(disk.path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    raise DiskReadFailed(
                        disk=disk.name, path=disk.path, detail=exc.strerror
                    ) from exc
            sizes = {name: disk_size(fd) for name, fd in fds.items()}
            progress = Progress(self._status, self._command.job_id, sum(sizes.values()))
            return [
                await self._disk(disk, fds[disk.name], sizes[disk.name], progress) for disk in disks
            ]
        finally:
            for fd in fds.values():
                os.close(fd)

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
                parts.append(part.digests)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if isinstance(error, NotFound):  # a disk new since the last backup
                return None
            raise error from exc
        return b"".join(parts)

    async def _disk(self, disk: DiskConfig, fd: int, size: int, progress: Progress) -> DiskResult:
        job_id, chunk_size = self._command.job_id, self._command.chunk_size
        previous = await self._previous(disk.name)
        count = -(-size // chunk_size)
        digests = bytearray(count * DIGEST_SIZE)  # zero-filled: holes are ZERO_DIGEST already
        result = DiskResult(disk.name, size, chunk_count=count)
        seen: set[bytes] = set()
        # Stage queues. Reads run ahead of deduplication (which waits on the controller),
        # compression runs ahead of the upload stream; each queue is bounded.
        hashed: asyncio.Queue[tuple[int, bytes, bytes] | None] = asyncio.Queue(READ_AHEAD)
        compressed: asyncio.Queue[Compressing | None] = asyncio.Queue(UPLOAD_QUEUE)

        async def read() -> None:
            async for item in self._read(disk, fd, size):
                await hashed.put(item)
            await hashed.put(None)

        async def uploads() -> AsyncIterator[agent_pb2.ChunkUpload]:
            while (item := await compressed.get()) is not None:
                digest, raw_size, future = item
                compression, payload = await future
                result.bytes_sent += len(payload)
                yield agent_pb2.ChunkUpload(
                    job_id=job_id,
                    digest=digest,
                    compression=cast(agent_pb2.Compression, compression),  # same values
                    raw_size=raw_size,
                    data=payload,
                )

        async def upload() -> None:
            try:
                await self._stub.UploadChunks(uploads())
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from exc

        async def send(batch: list[tuple[bytes, bytes]]) -> None:
            """Ask which of the batch the datastore lacks; compress and queue those."""
            wanted = list(dict.fromkeys(digest for digest, _ in batch))
            try:
                reply = await self._stub.MissingChunks(
                    agent_pb2.MissingChunksRequest(job_id=job_id, digests=wanted)
                )
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from exc
            missing = set(reply.missing)
            for digest, data in batch:
                if digest in missing and digest not in seen:
                    await compressed.put((digest, len(data), self._in_pool(compress, data)))
                seen.add(digest)

        position = 0  # bytes of the disk dealt with, for progress

        def reach(offset: int) -> None:
            nonlocal position
            progress.advance("backup", offset - position)
            position = offset

        with_data = 0
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(read(), name=f"read-{job_id}-{disk.name}")
            tasks.create_task(upload(), name=f"upload-{job_id}-{disk.name}")
            batch: list[tuple[bytes, bytes]] = []
            while (item := await hashed.get()) is not None:
                number, digest, data = item
                reach(min((number + 1) * chunk_size, size))
                if digest == ZERO_DIGEST:
                    continue
                with_data += 1
                result.bytes_read += len(data)
                at = number * DIGEST_SIZE
                digests[at : at + DIGEST_SIZE] = digest
                if digest in seen or (previous and previous[at : at + DIGEST_SIZE] == digest):
                    seen.add(digest)
                    continue
                batch.append((digest, data))
                if len(batch) >= MISSING_BATCH:
                    await send(batch)
                    batch = []
            if batch:
                await send(batch)
            await compressed.put(None)
        result.zero_chunks = count - with_data
        await self._put_index(disk.name, size, bytes(digests))
        reach(size)
        return result

    async def _read(
        self, disk: DiskConfig, fd: int, size: int
    ) -> AsyncIterator[tuple[int, bytes, bytes]]:
        """(chunk number, digest, bytes) of every chunk holding data, in order."""
        chunk_size = self._command.chunk_size
        window: deque[tuple[int, asyncio.Future[tuple[bytes, bytes]]]] = deque()
        try:
            for number in data_chunks(fd, size, chunk_size):
                window.append((number, self._in_pool(read_chunk, fd, number, chunk_size, size)))
                if len(window) >= READ_WINDOW:
                    number, future = window.popleft()
                    yield (number, *await future)
            while window:
                number, future = window.popleft()
                yield (number, *await future)
        except OSError as exc:
            raise DiskReadFailed(disk=disk.name, path=disk.path, detail=exc.strerror) from exc
        finally:
            # Reads still running in the pool use the descriptor: let them end before the
            # caller closes it (a closed number could be reused by another file meanwhile).
            if window:
                await asyncio.wait([future for _, future in window])

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
