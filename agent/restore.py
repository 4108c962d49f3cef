"""Restore: a recovery point's disk written to a target path inside the VM, verified.

The target must lie under one of the agent's configured `restore_dirs` (after resolving
symbolic links and `..`): the controller cannot make an agent write anywhere else. An image
file is written to a temporary file beside the target, made sparse where the disk is zero,
fsynced, and renamed over the target only when every chunk has been verified: a failed restore
leaves the old target untouched. A block device target is written in place (zeros included,
as a device keeps its old contents).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import grpc

from agent.config import AgentConfig
from agent.progress import Progress
from agent.runtime import Runtime
from shared.blob import Compression, decompress
from shared.digest import DIGEST_SIZE, ZERO_DIGEST, chunk_digest
from shared.errors import (
    ChunkDigestMismatch,
    CorruptData,
    PathNotAllowed,
    RestoreTargetFailed,
)
from shared.rpc import agent_pb2
from shared.rpc_errors import from_rpc_error

log = logging.getLogger(__name__)

DOWNLOAD_BATCH = 4096  # digests per DownloadChunks call
DOWNLOAD_STREAMS = 4  # DownloadChunks calls at once
FLUSH_EVERY = 64 << 20  # bytes written between starts of writeback
WRITE_WINDOW = 8  # chunks verified and written at once


def allowed_target(config: AgentConfig, target: str) -> Path:
    """`target` resolved, if it lies under a restore directory; PathNotAllowed otherwise."""
    path = Path(target)
    allowed = ", ".join(str(d) for d in config.restore_dirs) or "none configured"
    if not path.is_absolute():
        raise PathNotAllowed(path=target, allowed=allowed)
    resolved = path.resolve()
    for directory in config.restore_dirs:
        if resolved.is_relative_to(directory.resolve()) and resolved != directory.resolve():
            return resolved
    raise PathNotAllowed(path=target, allowed=allowed)


class RestoreRun:
    def __init__(self, runtime: Runtime, command: agent_pb2.RestoreCommand) -> None:
        self._config = runtime.config
        self._stub = runtime.stub
        self._status = runtime.status
        self._in_pool = runtime.in_pool
        self._command = command

    async def run(self) -> int:
        """Restore the disk; the number of bytes written."""
        target = allowed_target(self._config, self._command.target_path)
        digests = await self._index()
        size = self._command.size_bytes
        if len(digests) != -(-size // self._command.chunk_size) * DIGEST_SIZE:
            raise CorruptData(what="the recovery point's index", detail="wrong number of chunks")
        is_device = target.exists() and stat.S_ISBLK(target.stat().st_mode)
        partial = target if is_device else target.with_name(f".{target.name}.coffer-partial")
        try:
            fd = os.open(
                partial,
                os.O_WRONLY | os.O_CLOEXEC | (0 if is_device else os.O_CREAT | os.O_TRUNC),
                0o600,
            )
        except OSError as exc:
            raise RestoreTargetFailed(path=str(target), detail=exc.strerror) from exc
        try:
            if not is_device:
                os.ftruncate(fd, size)  # a sparse file: zero chunks cost nothing
            written = await self._write(fd, digests, size, is_device)
            await self._in_pool(os.fsync, fd)
        except OSError as exc:
            os.close(fd)
            if not is_device:
                partial.unlink(missing_ok=True)
            raise RestoreTargetFailed(path=str(target), detail=exc.strerror) from exc
        except BaseException:
            os.close(fd)
            if not is_device:
                partial.unlink(missing_ok=True)
            raise
        os.close(fd)
        if not is_device:
            os.replace(partial, target)
            directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        return written

    async def _index(self) -> bytes:
        request = agent_pb2.FetchIndexRequest(
            job_id=self._command.job_id,
            recovery_point_id=self._command.recovery_point_id,
            disk=self._command.disk,
        )
        try:
            return b"".join([part.digests async for part in self._stub.FetchIndex(request)])
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    async def _write(self, fd: int, digests: bytes, size: int, is_device: bool) -> int:
        chunk_size = self._command.chunk_size
        # Where each chunk goes: a chunk repeated on the disk is downloaded once.
        places: dict[bytes, list[int]] = defaultdict(list)
        zero_chunks: list[int] = []
        for number in range(len(digests) // DIGEST_SIZE):
            digest = digests[number * DIGEST_SIZE : (number + 1) * DIGEST_SIZE]
            if digest == ZERO_DIGEST:
                zero_chunks.append(number)
            else:
                places[digest].append(number)
        progress = Progress(self._status, self._command.job_id, size)
        unflushed = 0
        flush_lock = threading.Lock()

        def store(chunk: agent_pb2.Chunk) -> int:
            """Verify one chunk and write it everywhere it goes; blocking."""
            digest = chunk.digest  # each read of a bytes field copies it: read once
            raw = decompress(Compression(chunk.compression), chunk.data, chunk.raw_size)
            actual = chunk_digest(raw)
            if actual != digest:
                raise ChunkDigestMismatch(actual=actual.hex(), claimed=digest.hex())
            for number in places[digest]:
                offset = number * chunk_size
                if len(raw) != min(chunk_size, size - offset):
                    raise CorruptData(what=f"chunk {digest.hex()}", detail="wrong size")
                os.pwrite(fd, raw, offset)
            nbytes = len(raw) * len(places[digest])
            nonlocal unflushed
            with flush_lock:
                unflushed += nbytes
                start_flush = unflushed >= FLUSH_EVERY
                if start_flush:
                    unflushed = 0
            if start_flush:
                # Start writing back what is written so far (Linux: fadvise DONTNEED starts
                # asynchronous writeback and frees clean pages), so the final fsync does not
                # wait for the whole disk, and a restore does not flood the page cache.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            return nbytes

        wanted = list(places)
        written = 0
        for start in range(0, len(wanted), DOWNLOAD_BATCH * DOWNLOAD_STREAMS):
            batch = wanted[start : start + DOWNLOAD_BATCH * DOWNLOAD_STREAMS]
            # A few streams at once: one controller stream alternates between reading a chunk
            # file and sending it; several keep the disk, the network and this pool busy.
            async with asyncio.TaskGroup() as streams:
                parts = [
                    streams.create_task(self._download(batch[n::DOWNLOAD_STREAMS], store, progress))
                    for n in range(DOWNLOAD_STREAMS)
                ]
            written += sum(part.result() for part in parts)
        if is_device:
            # A device keeps what it held: zero chunks must be written, not skipped.
            for number in zero_chunks:
                offset = number * chunk_size
                length = min(chunk_size, size - offset)
                written += await self._in_pool(os.pwrite, fd, bytes(length), offset)
        progress.advance("restore", size - progress.done)
        return written

    async def _download(
        self,
        batch: list[bytes],
        store: Callable[[agent_pb2.Chunk], int],
        progress: Progress,
    ) -> int:
        """Download `batch`, each chunk verified and written in the pool; bytes written."""
        request = agent_pb2.DownloadRequest(job_id=self._command.job_id, digests=batch)
        pending: set[asyncio.Future[int]] = set()
        written = received = 0

        async def settle(at_most: int) -> None:
            nonlocal pending, written
            while len(pending) > at_most:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    nbytes = future.result()
                    written += nbytes
                    progress.advance("restore", nbytes)

        try:
            async for message in self._stub.DownloadChunks(request):
                for chunk in message.chunks:
                    if received >= len(batch) or chunk.digest != batch[received]:
                        raise CorruptData(what="the download stream", detail="a chunk out of order")
                    received += 1
                    pending.add(self._in_pool(store, chunk))
                    await settle(WRITE_WINDOW - 1)
            await settle(0)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            # Writes still running in the pool use the descriptor: let them end first.
            if pending:
                await asyncio.wait(pending)
        if received != len(batch):
            raise CorruptData(what="the download stream", detail="chunks are missing")
        return written
