"""Off-site copies: a datastore's recovery points copied, object for object, to a second store.

A vault's copy is a datastore in its own right, in another bucket, endpoint or directory (the
other region's copy, as Azure's geo-redundant vaults keep one and Proxmox Backup Server's sync
jobs pull one). `copy_datastore` brings it up to date with the vault's datastore (the
source); the controller runs it as a `Copy` job (controller/copies.py).

The same document
-----------------
The copy's `datastore.json` is the source's, byte for byte: the same vault, datastore id, chunk
size and wrapped keys. So chunk names match (both are keyed with the one chunk-id key), the
copy opens with the same master key, and the vault's key export serves both. Objects travel
sealed as they are stored: an envelope binds the object's name below the datastore's root
(encrypted.py), not where that root is, so it authenticates in the copy too. Nothing is
decrypted and sealed again, and no plaintext leaves the controller. Every object is opened
(authenticated under the vault's keys) before it is sent, so damage in the source is never
copied: a recovery point one of whose objects is missing or does not authenticate is not
copied, and the run says which and why.

At the start of a run the copy's document is compared with the source's (`sync_config`):

- none there yet: the source's is written, before any other object;
- the same vault and datastore id, and no data key the source lacks: the source's is written
  if it differs (a key rotation, or keys re-wrapped under a new master key since the last run);
- anything else is another datastore: `CopyTargetConflict`, and nothing is written.

An object sealed with a data key the copy's document does not hold yet (a key rotated while the
run goes) makes the run write the document again before it sends that object: the copy never
holds an object it cannot open. Only encrypted datastores (format 2) are copied: a copy
travels to storage someone else may hold, and a format-1 datastore has no identity to tell
it from another vault's.

What a run does (`plan_copy`, pure)
-----------------------------------
- copy: each recovery point the source holds and the copy does not, oldest first;
- delete: each one the copy holds that is neither in the source nor in `keep` (the catalog's
  points of the vault). That mirrors prunes and deleted data. A point missing from the source
  but still in the catalog (lost or damaged there, or deleted from the storage behind the
  controller's back) stays in the copy: the copy is then where it survives, which is what it
  is for, and a wiped source never wipes its copy.

Write order and resuming
------------------------
Each point is written in a backup's commit order: its chunks, its indexes, its manifest last.
A recovery point exists in the copy exactly when it is complete there. A run cut short
(cancelled, the controller stopped, a store down) leaves chunks and indexes no manifest
names: the next run finds those chunks and does not send them again (idempotent puts of the
same sealed bytes under the same names), or the copy's garbage collection reclaims them once
older than the grace period.

Which chunks are sent: only those the copy lacks. Asking the copy (`has`, a HEAD per chunk) is
exact but costs a request per chunk, so some are known present without asking: every chunk
this run sent or found, and the chunks of the newest earlier point of the same VM already in
the copy (its indexes read from the copy; its manifest there means its chunks are there, by
the write order, and the copy's garbage collection deletes only chunks no manifest names). A
copy of an incremental asks only about the chunks its predecessor does not reference. A copy
that had no `datastore.json` when the run began holds nothing (the document is always its
first object), and is asked about nothing.

Damage in the copy
------------------
Known present means never sent again, so a chunk damaged or lost in the copy would stay so.
A verify of the copy finds such chunks; the next run is given them (`resend`) and sends each
again from the source, replacing what the copy holds (if the source has it whole), before it
copies anything else.

Deleting and garbage collection
-------------------------------
A point is deleted from the copy as from any datastore: manifest first, then its indexes
(`Datastore.delete_recovery_point`); its chunks go with the copy's garbage collection, which
the same run does (with `collect`, and whenever it deleted a point), never beside another run
for the same copy, with the grace period and a `ChunkGuard` of the copy's own (restores that
read from the copy hold their chunks in it).

Reading the source beside its own collection: a point's chunks are held in the source's
`ChunkGuard` (as a restore holds them) before its manifest is checked again; a point pruned
meanwhile is skipped (`vanished`), never half copied.

Threads and stopping: chunks travel through `THREADS` threads of the run, `WINDOW` at most in
flight. `should_stop` is asked before every recovery point and every chunk; a stopped run
returns what it did (`stopped`), with the points it completed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from controller.datastore.backend import ObjectStore
from controller.datastore.encrypted import EncryptingStore, envelope_key_id
from controller.datastore.gc import ChunkGuard, GcReport, collect_garbage
from controller.datastore.keys import MasterKey
from controller.datastore.store import (
    CONFIG_KEY,
    Datastore,
    DatastoreConfig,
    chunk_key,
    index_key,
    manifest_key,
)
from shared.digest import ZERO_DIGEST, sha256
from shared.errors import (
    ChunkMissing,
    Conflict,
    CopyTargetConflict,
    CorruptData,
    KeyUnavailable,
    NotFound,
    RecoveryPointNotCopied,
    UnsupportedFormat,
    WrongKey,
)
from shared.index import DiskIndex
from shared.manifest import RecoveryPointManifest

THREADS = 8
"""Chunks travelling at once: each is a read from one store and a write to another, so the
threads mostly wait on the network."""
WINDOW = 32
"""Chunks submitted and not yet settled: what a run holds in memory at most (16 MiB at the
default 512 KiB chunk size)."""
_PROGRESS_EVERY = 64

ShouldStop = Callable[[], bool]
Progress = Callable[["CopyProgress"], None]


# --- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CopyPlan:
    """What a run is to do, decided from the two listings and the catalog (`plan_copy`)."""

    copy: tuple[str, ...]
    """In the source, not in the copy: oldest first."""
    delete: tuple[str, ...]
    """In the copy, neither in the source nor kept."""
    present: tuple[str, ...]
    """In both."""
    only_in_copy: tuple[str, ...]
    """In the copy and kept, but not in the source: kept in the copy."""
    bases: Mapping[str, str] = field(default_factory=dict)
    """For a point to copy: the newest earlier point of its VM that will be in the copy before
    it (present, or copied earlier in the run), whose chunks are known there."""


def plan_copy(
    source: Iterable[str],
    target: Iterable[str],
    keep: Iterable[str],
    known: Mapping[str, tuple[str, float]],
) -> CopyPlan:
    """The plan of a run (module note). `known`: the catalog's points, id -> (VM id, when it
    was taken), which orders the copies and finds each one's base; points it does not know
    are copied last, without a base."""
    in_source, in_target, kept = set(source), set(target), set(keep)
    late = float("inf")

    def taken(rp_id: str) -> tuple[float, str]:
        return (known[rp_id][1] if rp_id in known else late, rp_id)

    to_copy = sorted(in_source - in_target, key=taken)
    will_be_there = sorted((in_source & in_target) | set(to_copy), key=taken)
    bases: dict[str, str] = {}
    newest: dict[str, str] = {}  # VM -> its newest point so far, in time order
    for rp_id in will_be_there:
        if rp_id not in known:
            continue
        vm_id = known[rp_id][0]
        if rp_id in to_copy and vm_id in newest:
            bases[rp_id] = newest[vm_id]
        newest[vm_id] = rp_id
    return CopyPlan(
        copy=tuple(to_copy),
        delete=tuple(sorted(in_target - in_source - kept)),
        present=tuple(sorted(in_source & in_target, key=taken)),
        only_in_copy=tuple(sorted((in_target - in_source) & kept, key=taken)),
        bases=bases,
    )


# --- what a run tells and returns ---------------------------------------------------------------


@dataclass(frozen=True)
class CopyProgress:
    points_done: int
    points: int
    chunks_sent: int
    bytes_sent: int
    chunks_present: int


@dataclass(frozen=True)
class CopyReport:
    """What a run found and did."""

    copied: tuple[str, ...]
    """Recovery points it copied, each complete in the copy."""
    present: tuple[str, ...]
    """In the copy already (in the source too)."""
    only_in_copy: tuple[str, ...]
    """Kept in the copy though the source lacks them (the catalog still has them)."""
    deleted: tuple[str, ...]
    """Deleted from the copy: gone from the source and the catalog."""
    not_copied: Mapping[str, str]
    """Recovery points it could not copy, and why (damage in the source)."""
    vanished: tuple[str, ...]
    """Deleted from the source before or while they were copied (pruned)."""
    chunks_sent: int
    chunk_bytes_sent: int
    """Stored (sealed) bytes of the chunks sent."""
    chunks_present: int
    """Chunks the points copied needed that the copy had already."""
    chunks_asked: int
    """Of those and the ones sent: how many the copy was asked about (the rest were known)."""
    objects_sent: int
    """Indexes, manifests and datastore.json written."""
    bytes_sent: int
    """Every byte written to the copy."""
    bytes_read: int
    """Every byte read from the source."""
    config_written: bool
    """datastore.json was written (a first run, or keys changed since the last)."""
    seconds: float
    resent: tuple[bytes, ...] = ()
    """Chunks sent again to replace damaged ones in the copy (`resend`)."""
    stopped: bool = False
    planned: bool = True
    """The two stores were listed: `present` and `only_in_copy` are the whole copy."""
    gc: GcReport | None = None
    """The copy's garbage collection, if the run did one."""


@dataclass(frozen=True)
class VaultCopy:
    """A vault's copy opened to be read: a restore, file recovery or verify from the copy."""

    target: str
    """The copy target's name (the controller config's `[[copy_targets]]`)."""
    location: str
    datastore: Datastore
    guard: ChunkGuard
    """Held by what reads the copy, spared by the copy's garbage collection."""


# --- datastore.json ---------------------------------------------------------------------------


def _sealing(source: Datastore) -> EncryptingStore:
    backend = source.backend
    if not source.encrypted or not isinstance(backend, EncryptingStore):
        raise Conflict(
            detail=f"the datastore at {source.storage.location} is not encrypted (format "
            f"{source.config.format}): off-site copies are made of encrypted vaults only, "
            "since a copy goes where others may read it. Upgrade the vault first"
        )
    return backend


def _identity(config: DatastoreConfig) -> str:
    keys = config.keys
    return (
        f"the encrypted datastore {keys.datastore_id} of vault {config.vault!r}"
        if keys is not None
        else "a datastore that is not encrypted"
    )


def _is_copy_of(source: DatastoreConfig, found: DatastoreConfig) -> bool:
    """Whether `found` is the document of `source`'s copy: the same settings, vault and
    datastore id. Its keys may lag behind the source's (the next run writes the source's)."""
    return (
        found == source
        and source.keys is not None
        and found.keys is not None
        and found.keys.datastore_id == source.keys.datastore_id
    )


def _may_replace(source: DatastoreConfig, found: DatastoreConfig) -> bool:
    """Whether a run may write `source`'s document over `found`: a copy of it that holds no
    data key `source` lacks (a copy is never newer than its source)."""
    assert source.keys is not None
    return (
        _is_copy_of(source, found)
        and found.keys is not None
        and set(found.keys.data) <= set(source.keys.data)
    )


@dataclass(frozen=True)
class ConfigSync:
    """What `sync_config` found and did."""

    written: bool
    created: bool
    """The copy had no document: it holds nothing (the document is its first object)."""
    keys: frozenset[int]
    """The data key ids the copy's document holds now."""
    bytes_read: int


def sync_config(source: Datastore, target: ObjectStore) -> ConfigSync:
    """Make the copy's `datastore.json` the source's (module note). CopyTargetConflict, with
    nothing written, if `target` holds another datastore. Blocking."""
    _sealing(source)
    document = source.storage.get(CONFIG_KEY)
    wanted = DatastoreConfig.decode(document)
    assert wanted.keys is not None
    keys = frozenset(wanted.keys.data)
    try:
        existing = target.get(CONFIG_KEY)
    except NotFound:
        target.put(CONFIG_KEY, document)
        return ConfigSync(True, True, keys, len(document))
    if existing == document:
        return ConfigSync(False, False, keys, len(document))
    try:
        found = DatastoreConfig.decode(existing)
    except (CorruptData, UnsupportedFormat) as error:
        raise CopyTargetConflict(
            location=target.location,
            found=f"a datastore.json that cannot be read ({error.message})",
            vault=wanted.vault,
            wanted=_identity(wanted),
        ) from None
    if not _may_replace(wanted, found):
        raise CopyTargetConflict(
            location=target.location,
            found=_identity(found),
            vault=wanted.vault,
            wanted=_identity(wanted),
        )
    target.put(CONFIG_KEY, document)
    return ConfigSync(True, False, keys, len(document))


def open_copy(source: Datastore, target: ObjectStore, master: MasterKey | None) -> Datastore:
    """The copy of `source` in `target`, opened to be read (a restore from the copy) or for a
    run's deletes and garbage collection. Needs nothing of the source's storage: only what
    `source` holds in memory, so it works while the source is unreachable.

    NotFound if there is no datastore in `target`; CopyTargetConflict if it is another one;
    WrongKey or KeyUnavailable as `Datastore.open`. Blocking."""
    copy = Datastore.open(target, master=master, require_encryption=True)
    if not _is_copy_of(source.config, copy.config):
        raise CopyTargetConflict(
            location=target.location,
            found=_identity(copy.config),
            vault=source.config.vault,
            wanted=_identity(source.config),
        )
    return copy


def check_copied(copy: Datastore, vault: str, rp_id: str) -> None:
    """RecoveryPointNotCopied unless recovery point `rp_id` is complete in `copy`."""
    if not copy.backend.has(manifest_key(rp_id)):
        raise RecoveryPointNotCopied(
            rp_id=rp_id,
            vault=vault,
            location=copy.storage.location,
            detail="it has not been copied yet (`coffer rp list` shows which points are; "
            f"`coffer copy --vault {vault}` copies now)",
        )


# --- a run ------------------------------------------------------------------------------------


class _Stopped(Exception):
    """`should_stop` said so: unwinds to `copy_datastore`, which reports what was done."""


class _NotCopied(Exception):
    """A recovery point that cannot be copied whole: damage in the source."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _Vanished(Exception):
    """The recovery point was deleted from the source (pruned) before or while it was copied."""


@dataclass
class _Counts:
    chunks_sent: int = 0
    chunk_bytes_sent: int = 0
    chunks_present: int = 0
    chunks_asked: int = 0
    objects_sent: int = 0
    bytes_sent: int = 0
    bytes_read: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        """Count, from any of the run's threads."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


class _Run:
    """One run's state: the stores, what it knows of the copy, its counts."""

    def __init__(
        self,
        source: Datastore,
        target: ObjectStore,
        master: MasterKey | None,
        source_guard: ChunkGuard,
        owner: str,
        check: Callable[[], None],
        tell: Callable[[], None],
    ) -> None:
        self.source = source
        self.sealing = _sealing(source)
        self.target = target
        self.master = master
        self.source_guard = source_guard
        self.owner = owner
        self.check = check
        self.tell = tell
        self.counts = _Counts()
        self.in_copy: set[str] = set()
        """Recovery points complete in the copy (found there, or copied by this run)."""
        self.known_present: set[bytes] = set()
        self.empty = False
        """The copy held nothing when the run began: no chunk is asked about."""
        self.config_written = False
        self._keys: frozenset[int] = frozenset()
        self._lock = threading.Lock()
        self._copy: Datastore | None = None

    # --- datastore.json and the copy opened ---------------------------------------------------

    def sync_config(self) -> None:
        with self._lock:  # one writer of the document at a time
            sync = sync_config(self.source, self.target)
            self._keys = sync.keys
            self.counts.add(bytes_read=sync.bytes_read)
            if sync.created:
                self.empty = True
            if sync.written:
                self.config_written = True
                self.counts.add(objects_sent=1, bytes_sent=sync.bytes_read)
                self._copy = None  # its keyring changed: opened again when next needed

    def copy(self) -> Datastore:
        """The copy opened with its current document (for base indexes, deletes and GC)."""
        if self._copy is None:
            self._copy = open_copy(self.source, self.target, self.master)
        return self._copy

    # --- objects ------------------------------------------------------------------------------

    def read_checked(self, key: str) -> tuple[bytes, bytes]:
        """(stored, plain) of a source object, authenticated; NotFound if it is missing."""
        stored = self.source.storage.get(key)
        self.counts.add(bytes_read=len(stored))
        return stored, self.sealing.open_stored(key, stored)

    def send(self, key: str, stored: bytes) -> None:
        """Write a sealed object to the copy, its data key's document first if need be."""
        if envelope_key_id(stored) not in self._keys:
            self.sync_config()  # a key rotated since the run began
        self.target.put(key, stored)

    # --- chunks -------------------------------------------------------------------------------

    def transfer(self, digest: bytes, replace: bool = False) -> int:
        """Send one chunk unless the copy has it (`replace`: whatever the copy has); the bytes
        sent (0: it was there)."""
        key = chunk_key(digest)
        if not replace and not self.empty and self.target.has(key):
            return 0
        try:
            stored, _ = self.read_checked(key)
        except NotFound:
            raise ChunkMissing(digest=digest.hex()) from None
        self.send(key, stored)
        return len(stored)

    def transfer_all(self, digests: Iterable[bytes], pool: ThreadPoolExecutor) -> None:
        """Every chunk of `digests` the copy lacks sent, a window at a time."""
        window: deque[tuple[bytes, Future[int]]] = deque()
        pending: set[bytes] = set()
        counts = self.counts

        asked = 0 if self.empty else 1

        def settled(digest: bytes, sent: int) -> None:
            pending.discard(digest)
            self.known_present.add(digest)
            if sent:
                counts.add(chunks_asked=asked, chunks_sent=1, chunk_bytes_sent=sent,
                           bytes_sent=sent)  # fmt: skip
            else:
                counts.add(chunks_asked=asked, chunks_present=1)

        def settle(at_most: int) -> None:
            while len(window) > at_most:
                digest, future = window.popleft()
                settled(digest, future.result())
                if (counts.chunks_sent + counts.chunks_present) % _PROGRESS_EVERY == 0:
                    self.tell()

        def drain() -> None:
            """Stopped: what has not started does not; what was on its way is counted."""
            for _, future in window:
                future.cancel()
            while window:
                digest, future = window.popleft()
                if not future.cancelled() and future.exception() is None:
                    settled(digest, future.result())

        try:
            for digest in digests:
                if digest in self.known_present:
                    counts.add(chunks_present=1)
                    continue
                if digest in pending:
                    continue  # a disk repeats it; it is on its way
                self.check()
                pending.add(digest)
                window.append((digest, pool.submit(self.transfer, digest)))
                settle(WINDOW - 1)
            settle(0)
        except (ChunkMissing, CorruptData, KeyUnavailable, UnsupportedFormat) as error:
            raise _NotCopied(_why(error)) from None
        finally:
            drain()

    def resend(self, digests: Iterable[bytes]) -> list[bytes]:
        """Send `digests` again over what the copy holds; those the source has whole."""
        resent = []
        for digest in digests:
            self.check()
            try:
                sent = self.transfer(digest, replace=True)
            except (ChunkMissing, CorruptData, KeyUnavailable, UnsupportedFormat):
                continue  # the source cannot mend it: the copy's points that need it stay so
            self.counts.add(chunks_sent=1, chunk_bytes_sent=sent, bytes_sent=sent)
            self.known_present.add(digest)
            resent.append(digest)
        return resent

    # --- recovery points ----------------------------------------------------------------------

    def seed(self, base: str) -> None:
        """The chunks of `base`, a point complete in the copy, are known present there."""
        if base not in self.in_copy:
            return
        copy = self.copy()
        try:
            manifest = copy.get_manifest(base)
            for index in copy.get_indexes(manifest):
                self.known_present |= index.referenced()
        except (NotFound, CorruptData, UnsupportedFormat, KeyUnavailable, WrongKey):
            return  # asked about one by one instead

    def copy_point(self, rp_id: str, base: str, pool: ThreadPoolExecutor) -> None:
        """Copy one recovery point whole: chunks, indexes, manifest (the commit point) last.
        _Vanished if the source no longer has it; _NotCopied if it is damaged there."""
        try:
            manifest = self.source.get_manifest(rp_id)
        except NotFound:
            raise _Vanished from None
        except (CorruptData, UnsupportedFormat, KeyUnavailable) as error:
            raise _NotCopied(_why(error)) from None
        indexes = [self._index(manifest, entry.name, entry.index_sha256)
                   for entry in manifest.disks]  # fmt: skip
        referenced: set[bytes] = set()
        for _, index in indexes:
            referenced |= index.referenced()
        # Held before the manifest is checked again: a collection of the source that came
        # first is seen here, any that comes later leaves these chunks alone.
        self.source_guard.hold(self.owner, referenced)
        if not self.source.backend.has(manifest_key(rp_id)):
            raise _Vanished
        if base:
            self.seed(base)
        self.transfer_all((d for _, index in indexes for d in index.iter_digests()
                           if d != ZERO_DIGEST), pool)  # fmt: skip
        for stored, index in indexes:
            self.send(index_key(rp_id, index.disk), stored)
            self.counts.add(objects_sent=1, bytes_sent=len(stored))
        try:
            stored, _ = self.read_checked(manifest_key(rp_id))
        except NotFound:
            raise _Vanished from None  # pruned while its chunks travelled
        except (CorruptData, UnsupportedFormat, KeyUnavailable) as error:
            raise _NotCopied(_why(error)) from None
        self.send(manifest_key(rp_id), stored)
        self.counts.add(objects_sent=1, bytes_sent=len(stored))
        self.in_copy.add(rp_id)

    def _index(
        self, manifest: RecoveryPointManifest, disk: str, index_sha256: str
    ) -> tuple[bytes, DiskIndex]:
        """(stored, decoded) index of a disk, the one the manifest records."""
        key = index_key(manifest.id, disk)
        try:
            stored, plain = self.read_checked(key)
        except NotFound:
            if not self.source.backend.has(manifest_key(manifest.id)):
                raise _Vanished from None
            raise _NotCopied(f"the index of disk {disk!r} is missing") from None
        except (CorruptData, UnsupportedFormat, KeyUnavailable) as error:
            raise _NotCopied(_why(error)) from None
        if sha256(plain).hex() != index_sha256:
            raise _NotCopied(f"the index of disk {disk!r} is not the one its manifest records")
        try:
            index = DiskIndex.decode(plain)
        except (CorruptData, UnsupportedFormat) as error:
            raise _NotCopied(_why(error)) from None
        return stored, index


def _why(error: Exception) -> str:
    if isinstance(error, ChunkMissing):
        return f"chunk {error.fields.get('digest', '?')} is missing in the source"
    message = getattr(error, "message", str(error))
    return f"{message} (in the source)"


def copy_datastore(
    source: Datastore,
    target: ObjectStore,
    master: MasterKey | None,
    *,
    keep: Iterable[str],
    known: Mapping[str, tuple[str, float]],
    source_guard: ChunkGuard,
    owner: str,
    collect: bool = False,
    cutoff: float = 0.0,
    target_guard: ChunkGuard | None = None,
    resend: Iterable[bytes] = (),
    should_stop: ShouldStop | None = None,
    progress: Progress | None = None,
) -> CopyReport:
    """Bring the copy in `target` up to date with `source` (the module note says how).

    `keep` and `known` are the catalog's points of the vault (`plan_copy`); `source_guard` is
    the source's `ChunkGuard`, in which the run holds what it reads as `owner` (the caller
    releases it); with `collect` (and whenever it deleted a point) the run ends with a garbage
    collection of the copy, of chunks written before `cutoff` and not held in `target_guard`.
    `resend`: chunks found damaged in the copy, sent again first.
    Blocking. The stores' errors (DatastoreError) are raised as they come, after which a run
    again finishes the work; damage in the source is reported per recovery point.
    """
    started = time.monotonic()
    asked = should_stop or (lambda: False)
    report = progress or (lambda _: None)
    copied: list[str] = []
    not_copied: dict[str, str] = {}
    vanished: list[str] = []
    deleted: list[str] = []
    points = 0

    def check() -> None:
        if asked():
            raise _Stopped

    def tell() -> None:
        counts = run.counts
        done = len(copied) + len(not_copied) + len(vanished)
        report(CopyProgress(done, points, counts.chunks_sent, counts.bytes_sent,
                            counts.chunks_present))  # fmt: skip

    run = _Run(source, target, master, source_guard, owner, check, tell)
    plan = CopyPlan((), (), (), ())
    planned = stopped = False
    gc: GcReport | None = None
    resent: list[bytes] = []
    try:
        run.sync_config()
        plan = plan_copy(
            source.list_recovery_point_ids(),
            run.copy().list_recovery_point_ids(),
            keep,
            known,
        )
        points, planned = len(plan.copy), True
        run.in_copy |= set(plan.present) | set(plan.only_in_copy)
        resent = run.resend(resend)
        with ThreadPoolExecutor(THREADS, thread_name_prefix="copy") as pool:
            for rp_id in plan.copy:
                check()
                try:
                    run.copy_point(rp_id, plan.bases.get(rp_id, ""), pool)
                except _Vanished:
                    vanished.append(rp_id)
                except _NotCopied as damage:
                    not_copied[rp_id] = damage.why
                else:
                    copied.append(rp_id)
                tell()
        for rp_id in plan.delete:
            check()
            run.copy().delete_recovery_point(rp_id)
            deleted.append(rp_id)
        if collect or deleted:
            check()
            gc = collect_garbage(
                run.copy(),
                cutoff=cutoff,
                guard=target_guard if target_guard is not None else ChunkGuard(),
                should_stop=asked,
            )
            stopped = gc.stopped
    except _Stopped:
        stopped = True
    counts = run.counts
    return CopyReport(
        copied=tuple(copied),
        present=plan.present,
        only_in_copy=plan.only_in_copy,
        deleted=tuple(deleted),
        not_copied=not_copied,
        vanished=tuple(vanished),
        chunks_sent=counts.chunks_sent,
        chunk_bytes_sent=counts.chunk_bytes_sent,
        chunks_present=counts.chunks_present,
        chunks_asked=counts.chunks_asked,
        objects_sent=counts.objects_sent,
        bytes_sent=counts.bytes_sent,
        bytes_read=counts.bytes_read,
        config_written=run.config_written,
        resent=tuple(resent),
        seconds=time.monotonic() - started,
        stopped=stopped,
        planned=planned,
        gc=gc,
    )


__all__ = [
    "THREADS",
    "ConfigSync",
    "CopyPlan",
    "CopyProgress",
    "CopyReport",
    "VaultCopy",
    "check_copied",
    "copy_datastore",
    "open_copy",
    "plan_copy",
    "sync_config",
]
