"""Garbage collection: deleting the chunks no recovery point references, beside running jobs.

Why mark and sweep
------------------
Any number of recovery points share a chunk, and many jobs write at once. A reference count
per chunk would have to change together with every commit and every delete, on stores that
have no transactions; one crash between the two and it is wrong for good. The manifests
already are the truth, so a collection reads them (mark) and deletes what none of them names
(sweep), as Proxmox Backup Server and restic's prune do. The price is listing every chunk and
keeping the referenced digests in memory: a set of 32-byte digests takes about 99 MB per
million chunks (tracemalloc, CPython 3.11: 72 bytes per digest object plus its set slot), and
a million chunks is 1 TiB of distinct data at 1 MiB chunks, 4 TiB at 4 MiB.

Mark: every committed manifest and each index it pins (SHA-256 checked), then every
soft-deleted recovery point's the same way, through the manifest its tombstone holds
(deleted.py): a deleted point keeps its chunks until it is purged. Manifests are listed before
tombstones, and a soft delete writes its tombstone before it removes the manifest (an undelete
the manifest before it removes the tombstone), so a point that moves while the mark runs is
found in one listing or the other, and one looked for by name is found as the one or the
other. Indexes under `indexes/<rp>/` with neither a manifest nor a tombstone belong to a
backup that is running, failed or crashed. If
all of them are older than the cutoff they are leftovers and are deleted; otherwise their
chunks count as referenced, because that backup may be about to commit. Whatever cannot be
read (CorruptData, UnsupportedFormat, an index its manifest names but the store lacks) stops
the collection before it deletes anything: a mark that missed a recovery point would sweep
that recovery point's chunks.

Sweep: a chunk that is not referenced is deleted if no running job holds it (below) and it was
last written before the cutoff. Callers pass `cutoff = start - grace`. The grace period guards
what the guard cannot see: indexes (judged by age alone, so the grace must outlast the longest
backup), writers outside this process, and stores whose listings lag behind their writes. It
must also dwarf the skew between the controller's clock and the store's (S3 stamps objects
with its own clock).

The guard protocol
------------------
Running jobs rely on chunks that no committed manifest may reference yet: a backup's dedup hits
and uploads until its manifest commits, the previous recovery point's chunks an incremental
backup does not send again, a restore's chunks (whose recovery point may be deleted meanwhile).
They declare them in a `ChunkGuard`, shared by every job and collection of one datastore:

1. A job holds digests *before* it asks for evidence that they are stored: before
   `has_chunk`/`missing_chunks`, and, for the chunks of a committed recovery point, before it
   checks that the recovery point's manifest still exists (read the index, hold its digests,
   then read the manifest again; if it is gone, trust nothing).
2. The sweep deletes a chunk only while it holds the guard's lock, and only if nobody holds
   the chunk. So either the hold came first and the chunk stays, or the deletion came first and
   the job's check, which follows its hold, finds the chunk missing (it is sent again) or the
   recovery point gone. No order of events leaves a job trusting a deleted chunk.
3. A release during a collection takes effect when the collection ends. The mark lists the
   manifests once, at its start; a backup that commits after that and then releases its
   digests would leave chunks that are referenced, yet neither marked nor held, and the sweep
   would delete them. Deferred, the release keeps them until the sweep is over, and the next
   collection's mark finds the manifest. `ChunkGuard.sweeping()` therefore spans the whole
   collection, from before the first manifest is listed to after the last deletion.

A hold waits at most for one chunk deletion; holding costs a set entry per digest, and the
digest objects are usually the ones the job keeps anyway.

Durability and stopping
-----------------------
The controller's event loop takes the guard's lock whenever a job holds digests, so nothing
slow happens under it: the sweep unlinks a chunk there without waiting for the file system to
sync (`delete_chunk(durable=False)`) and syncs once per batch of deletes, outside the lock. A
delete a crash undoes only brings garbage back, which the next collection deletes again; and a
job that checks for a chunk after the unlink already finds it missing, synced or not.

A datastore being upgraded from format 1 (upgrade.py) is collected as one: the recovery points
of its format-1 part (given as `legacy`) are marked too, with their uncommitted indexes, and the
sweep goes over `chunks/` once, where both formats' chunks live. Recovery points named in `skip`
are not marked from the format-2 keys: while the upgrade switches, those keys still hold the
format-1 copies it has moved aside (the `legacy` part marks them).

A collection checks for abort before every item it works on (a manifest, an uncommitted
recovery point, a listed chunk), as Proxmox Backup Server's does, so a cancelled job or a
stopping controller does not wait for a sweep of millions of chunks. Stopped during the mark,
it deletes nothing (a partial mark would sweep what it missed); during the sweep, what it
deleted stays deleted (and is synced) and the rest waits for the next collection. Either way
it returns what it did, marked `stopped`, so its freed bytes are still accounted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from controller.datastore.store import Datastore
from shared.digest import ZERO_DIGEST
from shared.errors import Conflict, CorruptData, NotFound, UnsupportedFormat
from shared.manifest import RecoveryPointManifest

Progress = Callable[[str, int, int], None]
"""`progress(phase, done, total)`; see `collect_garbage`."""
ShouldStop = Callable[[], bool]
"""True when the collection must stop; asked before every item."""

_SWEEP_PROGRESS_EVERY = 1024
SYNC_EVERY = 1024
"""Chunk deletes made durable by one sync."""


class ChunkGuard:
    """The digests running jobs rely on, which a collection must not delete (module note).

    Thread-safe; one per datastore, shared by its jobs and its garbage collections.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, set[bytes]] = {}
        self._released: list[set[bytes]] = []  # released during a collection, kept until its end
        self._collections = 0

    def hold(self, owner: str, digests: Iterable[bytes]) -> None:
        """Protect `digests` for `owner` (a job id) until `release(owner)`; adds to earlier holds.

        Call it before asking whether the chunks are stored (rule 1 of the module note).
        """
        batch = set(digests)  # outside the lock: `digests` may be a slow generator
        with self._lock:
            held = self._held.get(owner)
            if held is None:
                self._held[owner] = batch
            else:
                held |= batch

    def release(self, owner: str) -> None:
        """Drop what `owner` holds: now, or when the running collection ends (rule 3)."""
        with self._lock:
            digests = self._held.pop(owner, None)
            if digests and self._collections:
                self._released.append(digests)

    def is_held(self, digest: bytes) -> bool:
        """Whether a job holds `digest`, or released it during the running collection."""
        with self._lock:
            return self._is_held(digest)

    @contextmanager
    def sweeping(self) -> Iterator[Sweep]:
        """Mark a collection as running, for its whole duration (mark and sweep).

        Releases are deferred until every collection running has left this block; the `Sweep`
        deletes chunks under the guard's lock.
        """
        with self._lock:
            self._collections += 1
        sweep = Sweep(self)
        try:
            yield sweep
        finally:
            sweep._open = False
            with self._lock:
                self._collections -= 1
                if self._collections == 0:
                    self._released.clear()

    def _is_held(self, digest: bytes) -> bool:
        # Jobs are few (one set each), so scanning the owners is cheaper than a shared count.
        return any(digest in held for held in self._held.values()) or any(
            digest in released for released in self._released
        )


class Sweep:
    """A collection's right to delete chunks that nobody holds (from `ChunkGuard.sweeping`)."""

    def __init__(self, guard: ChunkGuard) -> None:
        self._guard = guard
        self._open = True

    def delete_unless_held(self, digest: bytes, delete: Callable[[bytes], None]) -> bool:
        """Call `delete(digest)` under the guard's lock unless a job holds it; whether it ran."""
        if not self._open:
            raise RuntimeError("this sweep's collection has ended")
        with self._guard._lock:
            if self._guard._is_held(digest):
                return False
            delete(digest)
            return True


@dataclass(frozen=True)
class GcReport:
    """What a collection found and did."""

    recovery_points: int
    """Committed (live) recovery points marked."""
    referenced_chunks: int
    """Distinct chunks they (and the indexes of backups that may still commit) reference."""
    chunks_seen: int
    """Chunks listed in the store."""
    chunks_deleted: int
    bytes_freed: int
    """Stored bytes of the deleted chunks."""
    kept_in_grace: int
    """Unreferenced chunks kept because they were written after the cutoff."""
    kept_held: int
    """Unreferenced chunks older than the cutoff, kept because a running job held them."""
    orphan_indexes_deleted: int
    """Index objects of recovery points never committed, older than the cutoff, deleted."""
    seconds: float
    stopped: bool = False
    """Stopped before it finished (`should_stop`): the counts are what it did until then."""
    deleted_recovery_points: int = 0
    """Soft-deleted recovery points marked: their chunks are kept until they are purged."""


class _Stopped(Exception):
    """`should_stop` said so: unwinds to `collect_garbage`, which reports what was done."""


def collect_garbage(
    datastore: Datastore,
    *,
    cutoff: float,
    guard: ChunkGuard,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    legacy: Datastore | None = None,
    skip: Collection[str] = (),
) -> GcReport:
    """Delete the chunks (and leftover indexes) nothing needs, written before `cutoff`.

    `cutoff` is POSIX seconds: the collection's start minus the grace period. Blocking; run it
    in an executor. `progress(phase, done, total)` is called with ("mark", recovery points
    done, committed recovery points listed), ("orphans", done, uncommitted recovery points
    with indexes), then ("sweep", chunks seen, 0) once when the mark is complete and before
    the first chunk is listed, every 1024 chunks, and at the end with `total` = chunks seen.
    `should_stop()` is asked before every manifest, uncommitted recovery point and chunk; once
    it says True the collection returns what it did so far (`stopped`), its deletes synced.

    `legacy`, `skip`: a datastore being upgraded (module note): its format-1 part, and the
    recovery points not to mark from the format-2 keys.

    Raises CorruptData or UnsupportedFormat, having deleted no chunk, when a manifest or index
    cannot be read; the store's errors (DatastoreError) as they come, after which running it
    again finishes the work. Chunks that someone else deletes meanwhile are not errors.
    """
    started = time.monotonic()
    report = progress if progress is not None else _no_progress
    asked = should_stop if should_stop is not None else _never

    def check() -> None:
        if asked():
            raise _Stopped

    mark, swept, orphans_deleted, stopped = _Mark(), _Swept(), 0, False
    with guard.sweeping() as sweep:
        try:
            try:
                _mark(datastore, cutoff, report, check, mark, skip)
                orphans_deleted = _delete_leftover_indexes(datastore, mark)
                if legacy is not None:
                    old = _Mark()
                    _mark(legacy, cutoff, report, check, old)
                    orphans_deleted += _delete_leftover_indexes(legacy, old)
                    mark.referenced |= old.referenced
                    mark.recovery_points += old.recovery_points
            except (CorruptData, UnsupportedFormat) as error:
                raise type(error)(
                    f"{error.message.rstrip('.')}. Garbage collection of "
                    f"{datastore.backend.location} stopped before deleting any chunk: it "
                    "cannot tell which chunks that recovery point needs.",
                    **error.fields,
                ) from error
            _sweep(datastore, mark.referenced, cutoff, sweep, report, check, swept)
        except _Stopped:
            stopped = True
    return GcReport(
        recovery_points=mark.recovery_points,
        referenced_chunks=len(mark.referenced),
        chunks_seen=swept.seen,
        chunks_deleted=swept.deleted,
        bytes_freed=swept.freed,
        kept_in_grace=swept.in_grace,
        kept_held=swept.held,
        orphan_indexes_deleted=orphans_deleted,
        seconds=time.monotonic() - started,
        stopped=stopped,
        deleted_recovery_points=mark.deleted_points,
    )


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


def _never() -> bool:
    return False


@dataclass
class _Mark:
    referenced: set[bytes] = field(default_factory=set)
    recovery_points: int = 0
    deleted_points: int = 0
    leftovers: dict[str, list[str]] = field(default_factory=dict)
    """Uncommitted recovery point id -> disks whose indexes are all older than the cutoff."""


def _mark(
    datastore: Datastore,
    cutoff: float,
    progress: Progress,
    check: Callable[[], None],
    mark: _Mark,
    skip: Collection[str] = (),
) -> None:
    committed = [rp_id for rp_id in datastore.list_recovery_point_ids() if rp_id not in skip]
    marked: set[str] = set()
    for done, rp_id in enumerate(committed, 1):
        check()
        if _mark_committed(datastore, rp_id, mark):
            marked.add(rp_id)
        progress("mark", done, len(committed))
    # Listed after the manifests (module note): a point soft-deleted since is found here.
    for rp_id in list(datastore.list_deleted_ids()):
        check()
        if rp_id not in marked and _mark_committed(datastore, rp_id, mark):
            marked.add(rp_id)
    # Listed after the manifests: a backup committing in between shows up as uncommitted here,
    # and is caught by the manifest check below (and protected by its holds in any case).
    listed = set(committed) | set(skip) | marked
    uncommitted = sorted(
        (rp_id, disks) for rp_id, disks in datastore.list_indexes().items() if rp_id not in listed
    )
    for done, (rp_id, disks) in enumerate(uncommitted, 1):
        check()
        if not _mark_committed(datastore, rp_id, mark):
            _mark_uncommitted(datastore, rp_id, disks, cutoff, mark)
        progress("orphans", done, len(uncommitted))
    mark.referenced.discard(ZERO_DIGEST)  # an all-zero chunk: never stored, never listed


_LOOKS = 3


def _find(datastore: Datastore, rp_id: str) -> tuple[RecoveryPointManifest, bool] | None:
    """The manifest of recovery point `rp_id`, live or in its tombstone, and whether it is
    soft-deleted; None if it has neither. A point moved meanwhile (soft delete, undelete)
    always has one of the two, since each move writes the new object before it removes the
    old one: looking at both in turn, a few times, finds it."""
    for _ in range(_LOOKS):
        try:
            return datastore.get_manifest(rp_id), False
        except NotFound:
            pass
        try:
            return datastore.get_deleted(rp_id).manifest, True
        except NotFound:
            pass
        if not datastore.is_live(rp_id):
            return None  # neither: never committed, or gone for good
    return None


def _mark_committed(datastore: Datastore, rp_id: str, mark: _Mark) -> bool:
    """Mark the chunks of recovery point `rp_id`, live or soft-deleted; False if it has
    neither a manifest nor a tombstone."""
    found = _find(datastore, rp_id)
    if found is None:
        return False  # deleted since it was listed, or never committed
    manifest, deleted = found
    try:
        for index in datastore.get_indexes(manifest):
            # update() over the digests, not index.referenced(): no second set per index.
            mark.referenced.update(index.iter_digests())
    except NotFound as error:
        if _find(datastore, rp_id) is None:
            return False  # deleted (or purged) meanwhile: its chunks are the sweep's now
        raise CorruptData(
            what=f"{'deleted ' if deleted else ''}recovery point {rp_id}",
            detail=f"its manifest names an index the datastore does not have ({error})",
        ) from None
    if deleted:
        mark.deleted_points += 1
    else:
        mark.recovery_points += 1
    return True


def _mark_uncommitted(
    datastore: Datastore, rp_id: str, disks: list[str], cutoff: float, mark: _Mark
) -> None:
    ages = []
    present = []
    for disk in disks:
        try:
            ages.append(datastore.index_info(rp_id, disk).modified)
        except NotFound:
            continue  # deleted since it was listed
        present.append(disk)
    if not present:
        return
    if max(ages) < cutoff:
        mark.leftovers[rp_id] = present  # deleted once the mark is complete
        return
    # A backup that may still commit: its chunks are live.
    for disk in present:
        try:
            index = datastore.get_index(rp_id, disk, verify=False)
        except NotFound:
            continue
        mark.referenced.update(index.iter_digests())


def _delete_leftover_indexes(datastore: Datastore, mark: _Mark) -> int:
    deleted = 0
    for rp_id, disks in mark.leftovers.items():
        try:
            deleted += datastore.delete_uncommitted_indexes(rp_id, disks)
        except Conflict:
            # Committed after all, by a backup that outlived the grace period. Nothing of it is
            # deleted; its chunks are marked now, before the sweep.
            _mark_committed(datastore, rp_id, mark)
    return deleted


@dataclass
class _Swept:
    seen: int = 0
    deleted: int = 0
    freed: int = 0
    in_grace: int = 0
    held: int = 0


def _sweep(
    datastore: Datastore,
    referenced: set[bytes],
    cutoff: float,
    sweep: Sweep,
    progress: Progress,
    check: Callable[[], None],
    swept: _Swept,
) -> None:
    unsynced = 0

    def delete(digest: bytes) -> None:
        datastore.delete_chunk(digest, durable=False)  # under the guard's lock: no sync here

    progress("sweep", 0, 0)
    try:
        for digest in datastore.list_chunk_digests():
            check()
            swept.seen += 1
            if swept.seen % _SWEEP_PROGRESS_EVERY == 0:
                progress("sweep", swept.seen, 0)
            if digest in referenced:
                continue
            try:
                info = datastore.chunk_info(digest)
            except NotFound:
                continue  # deleted by someone else since it was listed
            if info.modified >= cutoff:
                swept.in_grace += 1
            elif sweep.delete_unless_held(digest, delete):
                swept.deleted += 1
                swept.freed += info.size
                unsynced += 1
                if unsynced >= SYNC_EVERY:
                    datastore.sync()  # outside the guard's lock
                    unsynced = 0
            else:
                swept.held += 1
    finally:
        if unsynced:
            datastore.sync()
    progress("sweep", swept.seen, swept.seen)


__all__ = [
    "SYNC_EVERY",
    "ChunkGuard",
    "GcReport",
    "Progress",
    "ShouldStop",
    "Sweep",
    "collect_garbage",
]
