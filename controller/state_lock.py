"""The state directory's owner: one controller process at a time, which says who it is.

Everything under `state_dir` (the catalog, the datastores, the private broker's configuration)
is written by one controller, and the datastores' garbage collection is only safe with one
writer. A controller takes an exclusive `flock` on `state_dir/controller.lock` before it
touches anything else there and holds it for its whole life; the kernel releases it when the
process ends, however it ends, so a crash leaves no stale lock to clean up. The file holds the
holder's PID, so a second controller refuses to start with a message that names it
(`StateDirInUse`). The file itself stays: deleting it on the way out would let a controller
that opened the old file lock it while a third creates a new one.

A flock belongs to the open file, not to its name: should the file be deleted or replaced
while the controller runs, a second controller would lock a new file of the same name and run
beside the first. So the holder looks every few seconds (`watch`) that the name still leads to
the file it locked, and stops (`StateDirLost`) when it does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from shared.errors import PermissionDenied, StateDirInUse, StateDirLost

log = logging.getLogger(__name__)

LOCK_NAME: Final = "controller.lock"
WATCH_SECONDS: Final = 2.0


class StateLock:
    """An exclusive lock on a state directory, held from `__enter__` to `__exit__`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None
        self._file: tuple[int, int] | None = None  # (device, inode) of the file locked

    def __enter__(self) -> Self:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except PermissionError as exc:
            raise PermissionDenied(
                detail=f"cannot open the state directory's lock file {self.path}: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StateDirInUse(path=str(self.path.parent), holder=holder) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        stat = os.fstat(fd)
        self._fd, self._file = fd, (stat.st_dev, stat.st_ino)
        log.debug("state directory %s locked (pid %d)", self.path.parent, os.getpid())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # releases the lock

    def check(self) -> None:
        """StateDirLost unless the lock file's name still leads to the file this lock holds."""
        assert self._file is not None, "the state lock is not held"
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            raise StateDirLost(path=str(self.path.parent), why=f"{self.path} was deleted") from None
        if (stat.st_dev, stat.st_ino) != self._file:
            raise StateDirLost(
                path=str(self.path.parent), why=f"{self.path} was replaced by another file"
            )

    async def watch(self) -> None:
        """Check the lock every WATCH_SECONDS for ever; raise StateDirLost when it is gone."""
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            self.check()


def _holder(fd: int) -> str:
    """Who holds the lock, from the PID its holder wrote (it may not have written it yet)."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = os.pread(fd, 32, 0).decode().strip()
        if text.isdigit():
            return f"pid {text}"
    return "pid not known yet"
