"""Rolling a disk back in place: only the chunks that differ from the recovery point are fetched.

Quick rollback, as Veeam calls it. The VM's configured disk (an image file or a block device)
is written back to a recovery point:

1. nothing may use the disk (`agent.disk_use`): nothing mounted on it, no loop device attached
   to the image, no other process holding it open; a block device is then opened with O_EXCL
   and held so while it is written, so that nothing can mount it meanwhile;
2. an image file is cut or grown to the recovery point's size; a device must be at least that
   large (what lies past the recovery point's end is left alone);
3. every chunk of the disk is read and hashed with the vault's chunk hash (keyed with the
   command's chunk-id key on an encrypted vault), as a backup reads it (holes are zero without
   a read), and compared with the recovery point's index;
4. only the chunks that differ are fetched (each distinct chunk once, verified as any restore's)
   and written where they differ; where the recovery point has zeros and the disk has not, an
   image gets a hole punched (not counted as bytes written) and a device gets zeros written;
5. the disk is fsynced.

An interrupted rollback leaves the disk partly rolled back (it is refused no more than it was):
running it again fetches only what still differs.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import stat
from collections import defaultdict, deque
from pathlib import Path

from agent.disk import DiskReader, disk_size
from agent.disk_use import check_unused, claim
from agent.progress import Progress
from agent.restore import RestoreRun
from shared.digest import DIGEST_SIZE, ZERO_DIGEST
from shared.errors import CorruptData, DiskNotFound, RestoreTargetFailed

READ_WINDOW = 16  # chunks read and hashed in the pool at once

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range of a file (it reads as zeros after); OSError as the kernel says."""
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _runs(numbers: list[int]) -> list[tuple[int, int]]:
    """Consecutive chunk numbers as (first, count) runs."""
    runs: list[tuple[int, int]] = []
    for number in numbers:
        if runs and runs[-1][0] + runs[-1][1] == number:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((number, 1))
    return runs


class Rollback(RestoreRun):
    """One in-place restore: the configured disk named in the command, rolled back."""

    disk_path: Path | None = None

    async def run(self) -> int:
        """Roll the disk back; the number of bytes written."""
        command = self._command
        disk = self._config.disk(command.disk)
        if disk is None:
            known = ", ".join(d.name for d in self._config.disks) or "none"
            raise DiskNotFound(vm_id=self._config.vm_id, disk=command.disk, known=known)
        path = self.disk_path = disk.path
        digests = await self._index()
        size = command.size_bytes
        if len(digests) != -(-size // command.chunk_size) * DIGEST_SIZE:
            raise CorruptData(what="the recovery point's index", detail="wrong number of chunks")
        what = f"Disk {disk.name!r} at"
        try:
            info = os.stat(path)
            is_device = stat.S_ISBLK(info.st_mode)
            if not is_device and not stat.S_ISREG(info.st_mode):
                raise RestoreTargetFailed(
                    path=str(path), detail="it is neither an image file nor a block device"
                )
            # Mounts and other holders first (their answer names what holds it), then a
            # device's exclusive claim, held to the end.
            await self._in_pool(check_unused, path, what, info)
            if is_device:
                fd = claim(path, os.O_RDWR, what)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise RestoreTargetFailed(path=str(path), detail=exc.strerror) from exc
        try:
            if is_device:
                if disk_size(fd) < size:
                    raise RestoreTargetFailed(
                        path=str(path),
                        detail=f"the device holds {disk_size(fd)} bytes, the disk {size}",
                    )
            elif os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            written = await self._write(fd, digests, size, is_device)
            await self._in_pool(os.fsync, fd)
        except OSError as exc:
            raise RestoreTargetFailed(path=str(path), detail=exc.strerror) from exc
        finally:
            os.close(fd)
        return written

    async def _plan(
        self, fd: int, digests: bytes, size: int
    ) -> tuple[dict[bytes, list[int]], list[int]]:
        """Compare the disk with the index: the chunks to fetch (where each goes) and the
        chunks to zero, only where the disk differs."""
        assert self.disk_path is not None
        chunk_size = self._command.chunk_size
        count = len(digests) // DIGEST_SIZE
        places: dict[bytes, list[int]] = defaultdict(list)
        zero_chunks: list[int] = []
        progress = Progress(self._status, self._command.job_id, size)

        def wanted(number: int) -> bytes:
            return digests[number * DIGEST_SIZE : (number + 1) * DIGEST_SIZE]

        def differs(number: int, current: bytes) -> None:
            target = wanted(number)
            if current == target:
                return
            if target == ZERO_DIGEST:
                zero_chunks.append(number)
            else:
                places[target].append(number)

        def settled(number: int, current: bytes, nbytes: int) -> None:
            self.bytes_compared += nbytes
            differs(number, current)
            progress.advance("compare", min((number + 1) * chunk_size, size) - progress.done)

        # The disk's chunks are named as the index names them: with the vault's chunk hash
        # (keyed on an encrypted vault), or every chunk would differ.
        with DiskReader(self.disk_path, chunk_size, self._hash) as reader:

            def read(number: int) -> tuple[int, bytes, int]:
                current, data = reader.read(number)
                return number, current, len(data)

            window: deque[asyncio.Future[tuple[int, bytes, int]]] = deque()
            following = 0  # the next chunk not yet dealt with
            try:
                for number in reader.data_chunks():
                    if number >= count:
                        break
                    # Chunks wholly in a hole read as zeros, without a read.
                    for hole in range(following, number):
                        differs(hole, ZERO_DIGEST)
                    following = number + 1
                    window.append(self._in_pool(read, number))
                    if len(window) >= READ_WINDOW:
                        settled(*await window.popleft())
                while window:
                    settled(*await window.popleft())
            finally:
                if window:  # reads still running use the descriptor: let them end
                    await asyncio.wait(window)
            for hole in range(following, count):
                differs(hole, ZERO_DIGEST)
        progress.advance("compare", size - progress.done)
        return places, sorted(zero_chunks)

    async def _zeros(self, fd: int, zero_chunks: list[int], size: int, is_device: bool) -> int:
        """Where the recovery point has zeros: a device gets zeros written, an image a hole
        (zeros written where the file system cannot punch one). Bytes written: holes punched
        are not writes and are not counted."""
        if is_device:
            return await super()._zeros(fd, zero_chunks, size, is_device)
        chunk_size = self._command.chunk_size
        written = 0
        for first, run in _runs(zero_chunks):
            offset = first * chunk_size
            length = min(run * chunk_size, size - offset)
            try:
                await self._in_pool(punch_hole, fd, offset, length)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                for start in range(offset, offset + length, chunk_size):
                    block = bytes(min(chunk_size, offset + length - start))
                    written += await self._in_pool(os.pwrite, fd, block, start)
        return written
