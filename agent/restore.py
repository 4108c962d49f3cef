"""Restore: a recovery point's disk written to a target path inside the VM, verified.

The target must lie under one of the agent's configured `restore_dirs`, reached without
following links (`agent.restore_dirs`): the controller cannot make an agent write anywhere
else. An image file is written to a temporary file beside the target, made sparse where the
disk is zero, fsynced, and renamed over the target only when every chunk has been verified: a
failed restore leaves the old target untouched. A block device target is written in place
(zeros included, as a device keeps its old contents).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import stat
import threading
from collections import defaultdict
from collections.abc import Callable

import grpc

from agent.chunk_source import open_chunk
from agent.disk import disk_size
from agent.progress import Progress
from agent.restore_dirs import allowed_target, open_parent
from agent.runtime import Runtime
from shared.blob import Compression
from shared.digest import CHUNK_HASH, DIGEST_SIZE, ZERO_DIGEST, ChunkHash
from shared.errors import (
    CorruptData,
    DataCorrupted,
    RestoreTargetFailed,
)
from shared.rpc import agent_pb2
from shared.rpc_errors import from_rpc_error

log = logging.getLogger(__name__)

DOWNLOAD_BATCH = 4096  # digests per DownloadChunks call
DOWNLOAD_STREAMS = 4  # DownloadChunks calls at once
FLUSH_EVERY = 64 << 20  # bytes written between starts of writeback
WRITE_WINDOW = 8  # chunks verified and written at once


class RestoreRun:
    def __init__(self, runtime: Runtime, command: agent_pb2.RestoreCommand) -> None:
        self._config = runtime.config
        self._stub = runtime.stub
        self._status = runtime.status
        self._in_pool = runtime.in_pool
        self._command = command
        # Chunks are verified with the vault's chunk hash: keyed by the key the command carries
        # (a secret, never logged), plain BLAKE3 for a format-1 datastore.
        self._hash = ChunkHash(command.chunk_id_key or None)

    async def run(self) -> int:
        """Restore the disk; the number of bytes written."""
        root, parts = allowed_target(self._config.restore_dirs, self._command.target_path)
        target = self._command.target_path
        digests = await self._index()
        size = self._command.size_bytes
        if len(digests) != -(-size // self._command.chunk_size) * DIGEST_SIZE:
            raise CorruptData(what="the recovery point's index", detail="wrong number of chunks")
        try:
            parent = open_parent(root, parts)
        except OSError as exc:
            raise RestoreTargetFailed(path=target, detail=exc.strerror) from exc
        try:
            return await self._restore_in(parent, parts[-1], digests, size)
        except OSError as exc:
            raise RestoreTargetFailed(path=target, detail=exc.strerror) from exc
        finally:
            os.close(parent)

    async def _restore_in(self, parent: int, name: str, digests: bytes, size: int) -> int:
        try:
            existing = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and stat.S_ISBLK(existing.st_mode):
            # A device is written in place. O_EXCL: Linux refuses (EBUSY) a device that is
            # mounted or otherwise in use, rather than overwrite a live file system.
            fd = os.open(name, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC, dir_fd=parent)
            try:
                if disk_size(fd) < size:
                    raise RestoreTargetFailed(
                        path=self._command.target_path,
                        detail=f"the device holds {disk_size(fd)} bytes, the disk {size}",
                    )
                written = await self._write(fd, digests, size, is_device=True)
                await self._in_pool(os.fsync, fd)
                return written
            finally:
                os.close(fd)
        # An image file: written beside the target under a name nobody can have planted
        # (O_EXCL, O_NOFOLLOW), renamed over the target only once complete and durable.
        partial = f".{name}.coffer-{secrets.token_hex(6)}"
        fd = os.open(
            partial,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=parent,
        )
        try:
            try:
                os.ftruncate(fd, size)  # a sparse file: zero chunks cost nothing
                written = await self._write(fd, digests, size, is_device=False)
                await self._in_pool(os.fsync, fd)
            finally:
                os.close(fd)
            os.replace(partial, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial, dir_fd=parent)
            raise
        os.fsync(parent)
        return written

    async def _index(self) -> bytes:
        request = agent_pb2.FetchIndexRequest(
            job_id=self._command.job_id,
            recovery_point_id=self._command.recovery_point_id,
            disk=self._command.disk,
        )
        try:
            parts = [part async for part in self._stub.FetchIndex(request)]
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        if parts and (parts[0].chunk_hash or CHUNK_HASH) != self._hash.label:
            raise CorruptData(
                what="the recovery point's index",
                detail="its digests were made with another chunk hash than the restore's key",
            )
        return b"".join(part.digests for part in parts)

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
            try:
                raw = open_chunk(
                    digest, Compression(chunk.compression), chunk.raw_size, chunk.data, self._hash
                )
            except CorruptData as exc:
                # Damage in the datastore, not a refused upload: named so the operator can
                # find it, and reported to the controller (which checks it itself).
                raise DataCorrupted(
                    recovery_point=self._command.recovery_point_id,
                    disk=self._command.disk,
                    chunk=places[digest][0],
                    digest=digest.hex(),
                    detail=exc.fields.get("detail", exc.message),
                ) from exc
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
