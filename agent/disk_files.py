"""Lazily read disks served as read-only files through FUSE, for loop devices to attach.

One directory, mounted with FUSE at a path the agent owns, holds one file per published
disk; a read of the file is a read of the `LazyDisk` (fetched, checked and cached chunk by
chunk). The kernel's loop driver attaches such a file like any image, so file systems on a
recovery point mount without the disk ever being restored.

The binding is pyfuse3 (libfuse 3's low-level API, in asyncio mode): its handlers are
coroutines on the agent's own event loop, so a read awaits chunk downloads directly, and
many reads are served at once (one pyfuse3 worker task per request in flight). pyfuse3
holds one FUSE session per process, so an agent has one `DiskFiles` and publishes every
open recovery point's disks in it (docs/decisions.md says why this binding).

Nothing may read these files, or anything mounted from them, on the event loop that serves
them: it would wait for itself. File systems are read from threads or child processes.

Every request is answered: an error in a read becomes EIO for the reader (the disk records
a typed error for the job), never an unanswered request that would hang the kernel reader.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import pyfuse3
import pyfuse3.asyncio

from agent.lazy_disk import LazyDisk
from shared.errors import CofferError, Conflict, FileRecoveryFailed, InvalidArgument

log = logging.getLogger(__name__)

# Names of published files: they become file names and loop device backing paths.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_STOP_TIMEOUT = 10.0  # seconds for the FUSE loop to end once asked
_ATTR_TIMEOUT = 60.0  # a published file's size never changes while it is published

_active: DiskFiles | None = None  # pyfuse3 holds one session per process


@dataclass(frozen=True)
class _File:
    inode: int
    name: bytes
    disk: LazyDisk
    published_ns: int


class DiskFiles:
    """The FUSE mount serving published disks as files; an async context manager."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self._files: dict[int, _File] = {}
        self._names: dict[bytes, int] = {}
        self._handles: dict[int, LazyDisk] = {}
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._next_handle = 1
        self._main: asyncio.Task[None] | None = None
        self._started_ns = time.time_ns()

    async def __aenter__(self) -> Self:
        global _active
        if _active is not None:
            raise Conflict(
                detail=f"disk files are already served at {_active.mountpoint} in this process"
            )
        self.mountpoint.mkdir(mode=0o700, parents=True, exist_ok=True)
        pyfuse3.asyncio.enable()
        options = {"ro", "fsname=coffer-disks", "subtype=coffer", "default_permissions"}
        try:
            pyfuse3.init(_Operations(self), str(self.mountpoint), options)
        except RuntimeError as exc:
            raise FileRecoveryFailed(
                f"Could not mount FUSE at {self.mountpoint} to serve recovery points: {exc}. "
                "Check that /dev/fuse exists and the agent runs as root."
            ) from exc
        _active = self
        self._main = asyncio.create_task(pyfuse3.main(), name=f"fuse {self.mountpoint}")
        self._main.add_done_callback(self._ended)
        return self

    def _ended(self, main: asyncio.Task[None]) -> None:
        # Readers of the disk files would wait for answers that never come: say so loudly.
        if self._main is main and not main.cancelled() and main.exception() is not None:
            log.error("the FUSE loop at %s failed: %r", self.mountpoint, main.exception())

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        global _active
        main, self._main = self._main, None
        if main is None:
            return
        try:
            pyfuse3.terminate()
            # Handlers still running (a read waiting for a download) end before the loop
            # does; a loop that does not end in time is cancelled.
            done, _ = await asyncio.wait([main], timeout=_STOP_TIMEOUT)
            if not done:
                log.warning("the FUSE loop at %s did not stop; cancelling it", self.mountpoint)
                main.cancel()
                await asyncio.wait([main])
            if not main.cancelled() and (error := main.exception()) is not None:
                log.error("the FUSE loop at %s failed: %r", self.mountpoint, error)
        finally:
            # Unmounts lazily: a loop device still attached keeps its file open, and reads
            # then fail with ENOTCONN instead of hanging.
            pyfuse3.close(unmount=True)
            _active = None
            self._files.clear()
            self._names.clear()
            self._handles.clear()

    def publish(self, name: str, disk: LazyDisk) -> Path:
        """Serve `disk` as the file `name`; its path."""
        if _NAME.fullmatch(name) is None:
            raise InvalidArgument(detail=f"disk file name {name!r} is not a plain name")
        key = name.encode()
        if key in self._names:
            raise Conflict(detail=f"a disk is already published as {name!r}")
        inode = self._next_inode
        self._next_inode += 1
        self._files[inode] = _File(inode, key, disk, time.time_ns())
        self._names[key] = inode
        return self.mountpoint / name

    def withdraw(self, name: str) -> None:
        """Stop serving the file `name`; descriptors open on it keep reading until closed."""
        inode = self._names.pop(name.encode(), None)
        if inode is not None:
            del self._files[inode]

    # --- what the FUSE operations see ----------------------------------------------------

    def attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.entry_timeout = 0  # withdrawn names disappear at once
        attr.attr_timeout = _ATTR_TIMEOUT
        attr.st_uid = attr.st_gid = 0
        attr.st_blksize = 1 << 17
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o500
            attr.st_nlink = 2
            attr.st_size = 0
            stamp = self._started_ns
        else:
            file = self._files.get(inode)
            if file is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            attr.st_mode = stat.S_IFREG | 0o400
            attr.st_nlink = 1
            attr.st_size = file.disk.size
            attr.st_blocks = -(-file.disk.size // 512)
            stamp = file.published_ns
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = stamp
        return attr

    def lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        inode = self._names.get(name) if parent == pyfuse3.ROOT_INODE else None
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attributes(inode)

    def entries(self, after: int) -> list[tuple[int, bytes]]:
        return sorted((inode, f.name) for inode, f in self._files.items() if inode > after)

    def open(self, inode: int, flags: int) -> int:
        file = self._files.get(inode)
        if file is None:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == pyfuse3.ROOT_INODE else errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        handle = self._next_handle
        self._next_handle += 1
        self._handles[handle] = file.disk
        return handle

    async def read(self, handle: int, offset: int, size: int) -> bytes:
        disk = self._handles.get(handle)
        if disk is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            return await disk.read(offset, size)
        except CofferError:  # recorded by the disk, with its cause, for the job's report
            raise pyfuse3.FUSEError(errno.EIO) from None
        # The kernel waits for an answer to every request: a bug must still give one.
        except Exception:
            log.exception("reading %s at %d", disk.name, offset)
            raise pyfuse3.FUSEError(errno.EIO) from None

    def release(self, handle: int) -> None:
        self._handles.pop(handle, None)


class _Operations(pyfuse3.Operations):
    """The FUSE requests, answered by `DiskFiles` (a read-only directory of files)."""

    def __init__(self, files: DiskFiles) -> None:
        super().__init__()
        self._files = files

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._files.attributes(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._files.lookup(parent_inode, name)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return 0

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for inode, name in self._files.entries(start_id):
            try:
                attr = self._files.attributes(inode)
            except pyfuse3.FUSEError:
                continue  # withdrawn meanwhile
            if not pyfuse3.readdir_reply(token, name, attr, inode):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        # keep_cache: a published file's bytes never change, the kernel may keep its pages.
        return pyfuse3.FileInfo(fh=self._files.open(inode, flags), keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._files.read(fh, off, size)

    async def release(self, fh: int) -> None:
        self._files.release(fh)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data
