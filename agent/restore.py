"""Restore: a recovery point's disk written to a target path inside the VM, verified.

The target must lie under one of the agent's configured `restore_dirs`, reached without
following links (`agent.restore_dirs`): the controller cannot make an agent write anywhere
else. An image file is written to a temporary file beside the target, made sparse where the
disk is zero, fsynced, and renamed over the target only when every chunk has been verified: a
failed restore leaves the old target untouched. A block device target is written in place
(zeros included, as a device keeps its old contents).

A target that exists is replaced only when the command says `overwrite`, and never when it is
one of the agent's configured disks (that is a rollback, `agent.rollback`) or when anything
uses it: mounted, attached to a loop device, held open by another process (`agent.disk_use`).
`RestoreRun` is also the base of the other ways back: a rollback in place chooses which chunks
to fetch and how zeros are written (`_plan`, `_zeros`), a drill restores to scratch space and
then checks and deletes what it wrote (`open_restored`, `remove_restored`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import stat
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import grpc

from agent.chunk_source import open_chunk
from agent.disk import disk_size
from agent.disk_use import FIX, check_unused, same_file
from agent.progress import Progress
from agent.restore_dirs import allowed_target, open_parent
from agent.runtime import Runtime
from shared.blob import Compression
from shared.digest import CHUNK_HASH, DIGEST_SIZE, ZERO_DIGEST, ChunkHash
from shared.errors import (
    CorruptData,
    DataCorrupted,
    DiskInUse,
    RestoreTargetExists,
    RestoreTargetFailed,
    RestoreTargetIsDisk,
)
from shared.rpc import agent_pb2
from shared.rpc_errors import from_rpc_error

log = logging.getLogger(__name__)

DOWNLOAD_BATCH = 4096  # digests per DownloadChunks call
DOWNLOAD_STREAMS = 2  # DownloadChunks calls at once (each holds messages of 1 MiB in flight)
FLUSH_EVERY = 64 << 20  # bytes written between starts of writeback
WRITE_WINDOW = 4  # chunks verified and written at once per stream (each holds a chunk)


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
        # What the run did, for its result.
        self.bytes_compared = 0  # of the disk, read to compare (a rollback's)
        self.bytes_fetched = 0  # chunks downloaded, as stored (compressed)
        self.bytes_written = 0
        self.created = False  # the target is the image this run wrote

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
        if existing is not None:
            await self._in_pool(self._may_replace, existing)
        if existing is not None and stat.S_ISBLK(existing.st_mode):
            # A device is written in place. O_EXCL: Linux refuses (EBUSY) a device that is
            # mounted or otherwise in use, rather than overwrite a live file system.
            try:
                fd = os.open(name, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC, dir_fd=parent)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                raise DiskInUse(
                    what="Restore target",
                    path=self._command.target_path,
                    why="the kernel reports it busy (mounted or claimed)",
                    fix=FIX,
                ) from exc
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
            self.created = True
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial, dir_fd=parent)
            raise
        os.fsync(parent)
        return written

    def _may_replace(self, existing: os.stat_result) -> None:
        """Refuse to write over an existing target unless the command says `overwrite`, and
        always when it is a configured disk of this VM or something uses it; blocking."""
        target = self._command.target_path
        if not self._command.overwrite:
            raise RestoreTargetExists(
                path=target,
                fix="Give --overwrite to replace it, or choose a path that does not exist.",
            )
        for disk in self._config.disks:
            try:
                is_disk = same_file(existing, os.stat(disk.path))
            except OSError:
                continue  # not attached now: it cannot be this target
            if is_disk:
                raise RestoreTargetIsDisk(path=target, disk=disk.name, vm_id=self._config.vm_id)
        if stat.S_ISREG(existing.st_mode) or stat.S_ISBLK(existing.st_mode):
            check_unused(Path(target), "Restore target", existing)

    def _target(self) -> tuple[int, str]:
        """A descriptor of the target's directory (reached as the restore reached it) and
        the target's name in it."""
        root, parts = allowed_target(self._config.restore_dirs, self._command.target_path)
        return open_parent(root, parts), parts[-1]

    def open_restored(self) -> int:
        """A read-only descriptor of the image this run wrote (not following a link)."""
        parent, name = self._target()
        try:
            return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        finally:
            os.close(parent)

    def remove_restored(self) -> None:
        """Delete the image this run wrote (if it wrote one); blocking."""
        if not self.created:
            return
        parent, name = self._target()
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=parent)
            os.fsync(parent)
        finally:
            os.close(parent)
        self.created = False

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

    async def _plan(
        self, fd: int, digests: bytes, size: int
    ) -> tuple[dict[bytes, list[int]], list[int]]:
        """Where each chunk to fetch goes (a chunk repeated on the disk is downloaded once),
        and the chunks that are to read as zeros: here, every chunk of the index."""
        places: dict[bytes, list[int]] = defaultdict(list)
        zero_chunks: list[int] = []
        for number in range(len(digests) // DIGEST_SIZE):
            digest = digests[number * DIGEST_SIZE : (number + 1) * DIGEST_SIZE]
            if digest == ZERO_DIGEST:
                zero_chunks.append(number)
            else:
                places[digest].append(number)
        return places, zero_chunks

    async def _zeros(self, fd: int, zero_chunks: list[int], size: int, is_device: bool) -> int:
        """Make the zero chunks read as zeros; the bytes written. A new image is sparse
        already; a device keeps what it held, so zeros must be written."""
        if not is_device:
            return 0
        chunk_size = self._command.chunk_size
        written = 0
        for number in zero_chunks:
            offset = number * chunk_size
            length = min(chunk_size, size - offset)
            written += await self._in_pool(os.pwrite, fd, bytes(length), offset)
        return written

    async def _write(self, fd: int, digests: bytes, size: int, is_device: bool) -> int:
        chunk_size = self._command.chunk_size
        places, zero_chunks = await self._plan(fd, digests, size)
        progress = Progress(self._status, self._command.job_id, size)
        unflushed = 0
        flush_lock = threading.Lock()

        def store(digest: bytes, compression: Compression, raw_size: int, payload: bytes) -> int:
            """Verify one chunk and write it everywhere it goes; blocking."""
            try:
                raw = open_chunk(digest, compression, raw_size, payload, self._hash)
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
        written += await self._zeros(fd, zero_chunks, size, is_device)
        progress.advance("restore", size - progress.done)
        self.bytes_written = written
        return written

    async def _download(
        self,
        batch: list[bytes],
        store: Callable[[bytes, Compression, int, bytes], int],
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
                # What the datastore sent: chunks as stored (compressed), and their digests.
                self.bytes_fetched += message.ByteSize()
                for chunk in message.chunks:
                    # The fields are taken out here (each read of a bytes field copies it):
                    # a chunk message handed to the pool would keep its whole download
                    # message alive until written.
                    digest = chunk.digest
                    if received >= len(batch) or digest != batch[received]:
                        raise CorruptData(what="the download stream", detail="a chunk out of order")
                    received += 1
                    compression = Compression(chunk.compression)
                    pending.add(
                        self._in_pool(store, digest, compression, chunk.raw_size, chunk.data)
                    )
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
