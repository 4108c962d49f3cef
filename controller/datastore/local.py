"""The local directory backend: each object is one file under a root directory.

A put writes a temporary file beside its target, fsyncs it, renames it over the target and
fsyncs the directory, so a crash leaves either the old object or the whole new one, and a put
that returned survives a power cut. Temporary files are named `.tmp-*`; keys never start with
'.', so listing skips them and garbage collection can remove any left by a crash.

`has` reports an object present only once it is durable, because a manifest will rely on it:
an object another thread renamed but whose directory fsync is still running, or one a previous
controller renamed before dying, gets its directory fsynced by `has` first (the latter once per
directory per process).

Directories are created on first use. A new directory is only durable once its parent is
fsynced, so the first put into each directory (per process) fsyncs the parent as well; the
set of directories known to be durable is kept in memory so later puts skip `mkdir` and that
extra fsync. The datastore shards chunk keys two levels deep, so no directory grows past a
few thousand files even for hundreds of millions of chunks.

Files are created 0600 and directories 0700: they hold the contents of the VMs' disks.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from controller.datastore.backend import KEY_COMPONENT, check_key, check_prefix
from shared.errors import Conflict, DatastoreError, NotFound

_TEMP_PREFIX = ".tmp-"


class LocalDirectoryStore:
    """An ObjectStore in a directory of the controller's file system."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self._root = Path(root)
        self._fsync = fsync
        # Directories whose own entry (and their parents') this process made durable.
        self._durable_dirs: set[Path] = set()
        # Directories whose entries this process has fsynced at least once: every object in
        # them is durable, including those a previous, crashed process renamed into place.
        self._flushed_dirs: set[Path] = set()
        # Objects renamed into place whose directory fsync has not finished (path -> puts in
        # flight): `has` must not call them present before they are durable.
        self._unsynced: dict[Path, int] = {}
        self._unsynced_lock = threading.Lock()
        # Held only while creating a directory (and fsyncing its parent), so that a put never
        # returns before the directory holding its object is durable, even when another thread
        # created that directory a moment earlier.
        self._mkdir_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalDirectoryStore({str(self._root)!r}, fsync={self._fsync})"

    @property
    def location(self) -> str:
        return str(self._root)

    @property
    def root(self) -> Path:
        return self._root

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        directory = path.parent
        try:
            self._ensure_dir(directory)
            temp = directory / f"{_TEMP_PREFIX}{secrets.token_hex(8)}"
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
                    file.flush()
                    if self._fsync:
                        os.fsync(file.fileno())
                self._track_unsynced(path, +1)
                try:
                    os.replace(temp, path)
                    if self._fsync:
                        _fsync_dir(directory)
                        self._flushed_dirs.add(directory)
                finally:
                    self._track_unsynced(path, -1)
            except BaseException:
                # Whatever stopped the put, no temporary file stays behind to be cleaned later.
                temp.unlink(missing_ok=True)
                raise
        except OSError as error:
            raise self._error("write", key, error) from error

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with path.open("rb") as file:
                return file.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(kind="object", name=key) from None
        except OSError as error:
            raise self._error("read", key, error) from error

    def has(self, key: str) -> bool:
        path = self._path(key)
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                return False
            directory = path.parent
            if not self._fsync:
                return True
            if directory not in self._flushed_dirs:
                # The object may come from a process that died between its rename and the
                # directory fsync. "Present" must mean durable (a manifest will rely on it),
                # so flush the directory once; a clean directory fsyncs in tens of µs.
                self._ensure_dir(directory)
                _fsync_dir(directory)
                self._flushed_dirs.add(directory)
            elif path in self._unsynced:
                # Another thread's put renamed it and is still fsyncing the directory.
                _fsync_dir(directory)
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as error:
            raise self._error("check", key, error) from error

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        except OSError as error:
            raise self._error("delete", key, error) from error
        if self._fsync:
            # A deleted manifest must stay deleted after a crash, or its recovery point returns.
            try:
                _fsync_dir(path.parent)
            except OSError as error:
                raise self._error("delete", key, error) from error

    def list(self, prefix: str) -> Iterator[str]:
        check_prefix(prefix)
        # Start from the deepest directory every match lives under.
        head, _, _ = prefix.rpartition("/")
        start = self._root.joinpath(*head.split("/")) if head else self._root
        return self._walk(start, head, prefix)

    def _walk(self, directory: Path, relative: str, prefix: str) -> Iterator[str]:
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except (FileNotFoundError, NotADirectoryError):
            return  # nothing under this prefix, or it vanished while we listed
        except OSError as error:
            raise self._error("list", relative or "/", error) from error
        for entry in entries:
            if KEY_COMPONENT.fullmatch(entry.name) is None:
                continue  # temporary files and anything else that cannot be a key
            key = f"{relative}/{entry.name}" if relative else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                below = key + "/"
                if below.startswith(prefix) or prefix.startswith(below):
                    yield from self._walk(Path(entry.path), key, prefix)
            elif key.startswith(prefix):
                yield key

    def _path(self, key: str) -> Path:
        return self._root.joinpath(*check_key(key).split("/"))

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._durable_dirs:
            return
        with self._mkdir_lock:
            self._make_durable_dir(directory)

    def _make_durable_dir(self, directory: Path) -> None:
        """Create `directory` (and missing parents) and make its entry durable; lock held."""
        if directory in self._durable_dirs:
            return
        if directory == self._root:
            directory.parent.mkdir(parents=True, exist_ok=True)
        else:
            self._make_durable_dir(directory.parent)
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            if not directory.is_dir():
                raise NotADirectoryError(
                    errno.ENOTDIR, "an object holds this name", str(directory)
                ) from None
        # Also when it already existed: a directory made by a process that then crashed may
        # not be durable yet. This runs once per directory per process.
        if self._fsync:
            _fsync_dir(directory.parent)
        self._durable_dirs.add(directory)

    def _track_unsynced(self, path: Path, change: int) -> None:
        with self._unsynced_lock:
            count = self._unsynced.get(path, 0) + change
            if count:
                self._unsynced[path] = count
            else:
                del self._unsynced[path]

    def _error(self, action: str, key: str, error: OSError) -> Exception:
        if isinstance(error, IsADirectoryError | NotADirectoryError | FileExistsError):
            return Conflict(
                detail=f"cannot {action} object {key!r} in {self._root}: a key cannot be both "
                "an object and the prefix of other keys in a local directory store"
            )
        return DatastoreError(
            detail=f"cannot {action} object {key!r} in {self._root}: {error.strerror or error}"
        )


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
