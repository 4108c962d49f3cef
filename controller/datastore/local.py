"""The local directory backend: each object is one file under a root directory.

Durability is a group commit around `syncfs(2)`. A put writes a temporary file beside its
target (no fsync of its own), waits for a file-system sync that started after the write, then
renames the file into place and waits for one more sync before it returns. A put with
`durable=False` (a backup's chunks) returns once its temporary file is written: such puts are
renamed into place in batches of BATCH_BYTES, each after one sync, and `sync` commits what is
pending and syncs once more (the names). So:

- an object that can be seen has durable contents (its data was synced before the rename): a
  crash never leaves a visible object with missing or partial bytes;
- a put that returned survives a power cut (its directory entry was synced too);
- puts running at once share their syncs: sixteen chunk uploads in flight cost a few syncs,
  not sixteen file fsyncs and sixteen directory fsyncs (measured in tests/bench: the per-file
  fsyncs capped 256 KiB chunks at a third of the disk's speed).

A delete waits for a sync too (a deleted manifest must stay deleted), unless the caller asks
for a batch (`durable=False`) and calls `sync` once at its end: garbage collection deletes
thousands of chunks, and a sync per chunk made it as slow as the disk's flushes, while it
held the chunk guard's lock.

Temporary files are named `.tmp-*`; keys never start with '.', so listing skips them; the
controller deletes any a crash left (`reclaim_temporary`) when it starts, once it holds the
writer lease. `.writer-lease` is the writer lease: an
exclusive `flock` held for the life of the controller process (lease.py). Files are created
0600 and directories 0700: they hold the contents of the VMs' disks. The datastore shards
chunk keys two levels deep, so no directory grows past a few thousand files even for hundreds
of millions of chunks.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import secrets
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from controller.datastore.backend import KEY_COMPONENT, ObjectInfo, check_key, check_prefix
from controller.datastore.lease import (
    DEFAULT_LEASE_SECONDS,
    LeaseHolder,
    LeaseRecord,
    held_error,
)
from shared.clock import Clock
from shared.errors import (
    Conflict,
    CorruptData,
    DatastoreError,
    DatastoreFull,
    DatastoreReadOnly,
    NotFound,
    WriterLeaseLost,
)

_TEMP_PREFIX = ".tmp-"
BATCH_BYTES = 64 << 20
"""Bytes of puts without `durable` renamed into place after one sync. A backup's chunks go
that way: one sync per 64 MiB instead of one per few chunks, without holding their bytes in
memory (they wait in the page cache, as temporary files)."""
LEASE_FILE = ".writer-lease"
_libc = ctypes.CDLL(None, use_errno=True)


class GroupSync:
    """Syncs shared by the threads that need one: `wait` returns after a sync that began
    after it was called. The first waiter runs the sync; those arriving meanwhile wait for
    the next one, which one of them runs for all.

    A failed sync is final. Linux reports a writeback error to one syncfs and then forgets
    it, and any sync may have written any waiter's pages, so after one failure no later sync
    can vouch for data written before it. Every wait from then on raises (PostgreSQL treats a
    failed fsync the same way): the datastore refuses writes until the controller restarts
    and an operator has looked at the disk.
    """

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._cond = threading.Condition()
        self._done = 0  # syncs completed
        self._running = False
        self._failed: OSError | None = None

    def wait(self) -> None:
        with self._cond:
            # A sync already running may have begun before our write: we need the next one.
            target = self._done + (2 if self._running else 1)
            while self._done < target and self._failed is None:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._cond.release()
                try:
                    self._sync()
                except OSError as exc:
                    self._failed = exc
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._done += 1
                    self._cond.notify_all()
            if self._failed is not None:
                raise OSError(
                    self._failed.errno,
                    f"an earlier sync of the datastore failed ({self._failed.strerror}); "
                    "writes are refused until the controller restarts",
                )


class LocalDirectoryStore:
    """An ObjectStore in a directory of the controller's file system."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self._root = Path(root)
        self._fsync = fsync
        self._made_dirs: set[Path] = set()  # directories known to exist: mkdir skipped
        self._sync = GroupSync(self._syncfs)
        # Puts without `durable` written but not yet visible, and their bytes (`_later`).
        self._pending: list[tuple[Path, Path]] = []
        self._pending_bytes = 0
        self._pending_lock = threading.Lock()
        self._commit_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalDirectoryStore({str(self._root)!r}, fsync={self._fsync})"

    @property
    def location(self) -> str:
        return str(self._root)

    @property
    def root(self) -> Path:
        return self._root

    def _syncfs(self) -> None:
        fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _libc.syncfs(fd) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code), str(self._root))
        finally:
            os.close(fd)

    def _durable(self) -> None:
        if self._fsync:
            self._sync.wait()

    def put(self, key: str, data: bytes, *, durable: bool = True) -> None:
        path = self._path(key)
        directory = path.parent
        try:
            self._ensure_dir(directory)
            temp = directory / f"{_TEMP_PREFIX}{secrets.token_hex(8)}"
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
                if not durable:
                    self._later(temp, path, len(data))
                    return
                self._durable()  # the contents, before the name makes them visible
                os.replace(temp, path)
            except BaseException:
                # Whatever stopped the put, no temporary file stays behind to be cleaned later.
                temp.unlink(missing_ok=True)
                raise
            self._durable()  # the name
        except OSError as error:
            raise self._error("write", key, error) from error

    def _later(self, temp: Path, path: Path, size: int) -> None:
        """A put without `durable`: its file is written; it is renamed into place with the
        others of its batch once a sync has made their contents durable (`_commit`), by the
        put that fills the batch or by the next `sync`."""
        with self._pending_lock:
            self._pending.append((temp, path))
            self._pending_bytes += size
            full = self._pending_bytes >= BATCH_BYTES
        if full:
            self._commit()

    def _commit(self) -> None:
        """Rename the pending puts into place after one sync of their contents (which also
        makes the names of the previous batch durable). One commit at a time: a `sync` that
        waits for this lock knows every put before it is visible once it has it."""
        with self._commit_lock:
            with self._pending_lock:
                batch, self._pending, self._pending_bytes = self._pending, [], 0
            if not batch:
                return
            try:
                self._durable()  # the contents, before the names make them visible
                for temp, path in batch:
                    os.replace(temp, path)
            except BaseException:
                for temp, _ in batch:
                    temp.unlink(missing_ok=True)
                raise

    def reclaim_temporary(self) -> int:
        """Delete the temporary files puts that never finished left (a crash, a kill -9
        between the write and the rename); how many. Called by the writer-lease holder
        before it writes: no put of its own is in flight, and no other writer may be."""
        reclaimed = 0
        for directory, _, names in os.walk(self._root):
            for name in names:
                if name.startswith(_TEMP_PREFIX):
                    try:
                        os.unlink(os.path.join(directory, name))
                    except FileNotFoundError:
                        continue
                    except OSError as error:
                        raise self._error("delete", name, error) from error
                    reclaimed += 1
        return reclaimed

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
        # What can be seen has durable contents (see the module note). Its name may not be
        # durable yet; whoever relies on it commits with a put, whose sync covers it.
        try:
            return stat.S_ISREG(os.stat(self._path(key)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as error:
            raise self._error("check", key, error) from error

    def stat(self, key: str) -> ObjectInfo:
        try:
            status = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(kind="object", name=key) from None
        except OSError as error:
            raise self._error("stat", key, error) from error
        if not stat.S_ISREG(status.st_mode):
            raise NotFound(kind="object", name=key)  # a directory: the prefix of other keys
        # A put renames a new file into place, so st_mtime is the time of the latest put.
        return ObjectInfo(size=status.st_size, modified=status.st_mtime)

    def delete(self, key: str, *, durable: bool = True) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        except OSError as error:
            raise self._error("delete", key, error) from error
        # A deleted manifest must stay deleted after a crash, or its recovery point returns.
        if durable:
            self.sync()

    def sync(self) -> None:
        try:
            self._commit()
            self._durable()
        except OSError as error:
            raise DatastoreError(
                detail=f"cannot sync {self._root}: {error.strerror or error}"
            ) from error

    def list(self, prefix: str, after: str = "") -> Iterator[str]:
        check_prefix(prefix)
        # Start from the deepest directory every match lives under.
        head, _, _ = prefix.rpartition("/")
        start = self._root.joinpath(*head.split("/")) if head else self._root
        return self._walk(start, head, prefix, after)

    def _walk(self, directory: Path, relative: str, prefix: str, after: str) -> Iterator[str]:
        try:
            with os.scandir(directory) as scan:
                entries = []
                for entry in scan:
                    if KEY_COMPONENT.fullmatch(entry.name) is None:
                        continue  # temporary files and anything else that cannot be a key
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        continue
                    entries.append((entry.name + "/" if is_dir else entry.name, entry))
        except (FileNotFoundError, NotADirectoryError):
            return  # nothing under this prefix, or it vanished while we listed
        except OSError as error:
            raise self._error("list", relative or "/", error) from error
        # A directory sorts as its name plus '/', the way the keys under it begin: siblings in
        # this order give every key in ascending order, as S3 lists them.
        entries.sort(key=lambda pair: pair[0])
        for name, entry in entries:
            key = f"{relative}/{name}" if relative else name
            if name.endswith("/"):
                below, key = key, key[:-1]
                if (below.startswith(prefix) or prefix.startswith(below)) and (
                    after < below or after.startswith(below)
                ):
                    yield from self._walk(Path(entry.path), key, prefix, after)
            elif key.startswith(prefix) and key > after:
                yield key

    def children_with(self, name: str) -> tuple[str, ...]:
        """The directories directly under the root holding an object `name`, sorted (the
        datastores under a root of datastores)."""
        try:
            with os.scandir(self._root) as scan:
                found = [
                    entry.name
                    for entry in scan
                    if KEY_COMPONENT.fullmatch(entry.name)
                    and entry.is_dir(follow_symlinks=False)
                    and (Path(entry.path) / name).is_file()
                ]
        except FileNotFoundError:
            return ()
        except OSError as error:
            raise self._error("list", "/", error) from error
        return tuple(sorted(found))

    def _path(self, key: str) -> Path:
        return self._root.joinpath(*check_key(key).split("/"))

    def _ensure_dir(self, directory: Path) -> None:
        """Create `directory` and its parents; their entries become durable with the put."""
        if directory in self._made_dirs:
            return
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except FileExistsError:
            raise NotADirectoryError(
                errno.ENOTDIR, "an object holds this name", str(directory)
            ) from None
        self._made_dirs.add(directory)

    def _error(self, action: str, key: str, error: OSError) -> Exception:
        if isinstance(error, IsADirectoryError | NotADirectoryError | FileExistsError):
            return Conflict(
                detail=f"cannot {action} object {key!r} in {self._root}: a key cannot be both "
                "an object and the prefix of other keys in a local directory store"
            )
        detail = f"cannot {action} object {key!r}: {error.strerror or error}"
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return DatastoreFull(location=str(self._root), detail=detail)
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return DatastoreReadOnly(location=str(self._root), detail=detail)
        return DatastoreError(
            detail=f"cannot {action} object {key!r} in {self._root}: {error.strerror or error}"
        )

    # --- the writer lease --------------------------------------------------------------------

    def acquire_writer_lease(
        self,
        holder: LeaseHolder,
        *,
        duration: float = DEFAULT_LEASE_SECONDS,
        clock: Clock | None = None,
    ) -> LocalWriterLease:
        """An exclusive flock on `.writer-lease`, held until released or the process ends."""
        path = self._root / LEASE_FILE
        try:
            self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise self._error("lock", LEASE_FILE, error) from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                record = _read_lease(fd, str(path))
            finally:
                os.close(fd)
            raise held_error(str(self._root), record) from None
        except OSError as error:
            os.close(fd)
            raise self._error("lock", LEASE_FILE, error) from error
        lease = LocalWriterLease(str(self._root), holder, fd)
        try:
            lease._write(LeaseRecord(holder, expires_at=None))
        except BaseException:
            lease.release()
            raise
        return lease


def _read_lease(fd: int, what: str) -> LeaseRecord:
    """The record in a lock file someone else holds; a placeholder if it has none yet (they
    locked it and have not written it, or crashed in between)."""
    data = os.pread(fd, 64 << 10, 0)
    try:
        return LeaseRecord.decode(data, what)
    except CorruptData:
        return LeaseRecord(LeaseHolder("unknown", "unknown host", 0, "unknown address"), None)


class LocalWriterLease:
    """A held flock on a local datastore's `.writer-lease`; nothing to renew while we live."""

    duration: float | None = None
    expires_at: float | None = None

    def __init__(self, location: str, holder: LeaseHolder, fd: int) -> None:
        self.location = location
        self.holder = holder
        self._fd: int | None = fd
        self._lock = threading.Lock()

    def _write(self, record: LeaseRecord) -> None:
        assert self._fd is not None
        data = record.encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def renew(self) -> None:
        with self._lock:
            if self._fd is None:
                raise WriterLeaseLost(location=self.location, detail="it was released")

    def release(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
            try:
                # Whoever looks next sees who held it last and that it was let go.
                data = LeaseRecord(self.holder, expires_at=None, released=True).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
            except OSError:
                pass  # the lock goes with the descriptor either way; the record is a courtesy
            finally:
                os.close(fd)
