"""Upgrading a datastore from format 1 to format 2, in place, one recovery point at a time.

A format-1 datastore (plain objects, chunks named by plain BLAKE3) becomes a format-2 one
(every object sealed with AES-256-GCM, chunks named by the vault's keyed BLAKE3) in the same
storage, under the same name, while backups, restores, prunes and garbage collection go on. Its
recovery points keep their ids; each is rewritten: every chunk is read, checked, named again
with the vault's key and stored sealed, each disk index is written anew with the new names (so
its SHA-256 changes), and the manifest, which pins those SHA-256s, is written last. Until a
recovery point's new manifest is stored it is read from format 1; from then on from format 2.
Neither copy is ever incomplete when it is read, so no recovery point is ever unreadable.

Layout while it runs
--------------------
    datastore.json          format 2 (keys, vault) and "upgrade": {"from": the format-1 settings,
                            "prefix": "format1/"}; "hash": "blake3-keyed+blake3", which code
                            older than the upgrade does not know and so refuses
    chunks/                 both: plain format-1 chunks and sealed, keyed format-2 chunks (a
                            plain and a keyed name of real content never coincide)
    indexes/, manifests/    format 2: recovery points converted, and new backups
    format1/indexes/, format1/manifests/
                            format 1: every recovery point as it was when the upgrade began
                            (and those an older backup committed after), until the upgrade ends

So the finished datastore is an ordinary format-2 datastore: nothing of the upgrade stays in
its layout, and code that reads format 2 reads it.

Steps, each safe to stop at any point and run again
---------------------------------------------------
1. Switch (`switch`): under the `LegacyLayout`'s write lock, every format-1 index and manifest
   is copied under `format1/` (whatever a crashed switch left there is cleared first), the
   keys are made and `datastore.json` is rewritten (the one step that turns the datastore into
   one being upgraded), and the layout is flipped. Stopped before `datastore.json` is
   rewritten, the datastore is format 1 as before and the switch starts over.
2. Clean (`clean_moved`): the plain objects left under `indexes/` and `manifests/` (copied in
   step 1) are deleted, so those keys hold only sealed format-2 objects. Recognised by their
   bytes (not sealed: no envelope), which makes it safe to run again at any time.
3. Convert (`PointConverter`), newest recovery point first (so that incremental backups have a
   format-2 base soon): chunks read from format 1, checked against their plain name, named
   with the key, held in the vault's `ChunkGuard` (gc.py), stored sealed unless present;
   indexes; manifest. A chunk converted for one recovery point is not read again for another:
   the old-to-new names are recorded (the caller keeps them in the catalog, every 1,024 chunks
   and before each manifest), and a recorded chunk is only checked for presence. A chunk that
   cannot be read (missing, or bytes that do not hash to its name) cannot be renamed: it gets
   a name no content has (`lost_digest`), its recovery points stay damaged at that chunk as
   they were, and the others convert. A recovery point deleted meanwhile (pruned) is left
   alone, and one the conversion committed while a prune deleted it is deleted again.
4. Finish (`finish`): once no recovery point is left in format 1, `format1/` is deleted and
   `datastore.json` rewritten as plain format 2. The format-1 chunks stay until garbage
   collection finds nothing references them (and no running job holds them).

`plan` counts what a conversion will rewrite, and `measure_rate` times the conversion on a
sample: read, decompress, check, rename, seal and write to scratch objects that it deletes.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace

from blake3 import blake3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from controller.datastore.backend import ObjectStore
from controller.datastore.encrypted import ENVELOPE_MAGIC, seal
from controller.datastore.gc import ChunkGuard
from controller.datastore.legacy import LEGACY_PREFIX, METADATA_PREFIXES, LegacyLayout
from controller.datastore.store import Datastore, manifest_key
from controller.datastore.verify import MISSING
from shared.blob import decompress, encode_blob
from shared.digest import ZERO_DIGEST, ChunkHash
from shared.errors import ChunkMissing, CorruptData, NotFound, UnsupportedFormat
from shared.index import DiskIndex

THREADS = 4
"""Chunks converted at once (decompressing, hashing and encrypting free the GIL; the store's
puts overlap, and a local store shares its syncs among them)."""
WINDOW = 32
"""Chunks submitted and not yet done: what a conversion holds in memory at most."""
RECORD_EVERY = 1024
"""New old-to-new names handed to `record` at once."""
SAMPLE_CHUNKS = 64
SAMPLE_BYTES = 32 << 20
"""A rate is measured on at most this many chunks, and about this many raw bytes."""
PROBE_PREFIX = "upgrade-probe/"
"""Where `measure_rate` writes its scratch objects (and deletes them)."""

_LOST_CONTEXT = "Coffer 2025 upgrade: a chunk that could not be read"

ShouldStop = Callable[[], bool]
Renamed = tuple[bytes, str]
"""A format-1 chunk's format-2 name, and why it could not be read ('' when it was converted)."""
Record = Callable[[Mapping[bytes, Renamed]], None]
"""Called with new old-name -> `Renamed` entries, once what they name is durable."""


def lost_digest(old: bytes) -> bytes:
    """The format-2 name of format-1 chunk `old` when its bytes could not be read: derived from
    `old` alone, so every recovery point that needs it gets the same name, and no content hashes
    to it under the vault's key (that would take a preimage), so it is never stored."""
    return blake3(old, derive_key_context=_LOST_CONTEXT).digest()


class Stopped(Exception):
    """`should_stop` said so."""


# --- 1. the switch ------------------------------------------------------------------------------


def switch(layout: LegacyLayout, begin: Callable[[ObjectStore], Datastore]) -> Datastore:
    """Step 1 (module note): copy the format-1 indexes and manifests under `format1/`, then
    `begin(storage)` (which rewrites `datastore.json` and returns the format-2 datastore),
    then keep the format-1 ones there; the format-2 datastore. Blocking."""
    made: list[Datastore] = []

    def prepare(storage: ObjectStore) -> None:
        stale = list(storage.list(LEGACY_PREFIX))
        for key in stale:  # a crashed switch's copy: never read, since datastore.json is old
            storage.delete(key, durable=False)
        if stale:
            storage.sync()
        for prefix in METADATA_PREFIXES:
            for key in list(storage.list(prefix)):
                try:
                    storage.put(LEGACY_PREFIX + key, storage.get(key))
                except NotFound:
                    continue  # deleted since it was listed
        made.append(begin(storage))

    layout.move(prepare)
    if not made:
        raise CorruptData(
            what=f"datastore at {layout.location}",
            detail="its format-1 objects were moved already, but it is not being upgraded",
        )
    return made[0]


# --- 2. cleaning the keys format 2 takes over -----------------------------------------------------


def clean_moved(new: Datastore, should_stop: ShouldStop | None = None) -> int:
    """Step 2: delete the plain (format-1) objects left under `indexes/` and `manifests/`, which
    the switch copied under `format1/`; how many. Blocking; safe to repeat at any time."""
    asked = should_stop or (lambda: False)
    storage = new.storage
    deleted = 0
    for prefix in METADATA_PREFIXES:
        for key in list(storage.list(prefix)):
            if asked():
                raise Stopped
            try:
                data = storage.get(key)
            except NotFound:
                continue
            if not data.startswith(ENVELOPE_MAGIC):
                storage.delete(key)
                deleted += 1
    return deleted


def pending_points(legacy: Datastore, new: Datastore) -> list[str]:
    """The recovery points of format 1 that format 2 does not hold yet (no manifest there that
    opens): those still read from format 1. Blocking: lists format 1, one read per point."""
    pending = []
    for rp_id in legacy.list_recovery_point_ids():
        try:
            new.get_manifest(rp_id)
        except (NotFound, CorruptData, UnsupportedFormat):
            pending.append(rp_id)
    return pending


# --- 3. converting a recovery point --------------------------------------------------------------


@dataclass
class PointConversion:
    """What converting one recovery point did."""

    rp_id: str
    committed: bool = False
    """Its format-2 manifest is stored: it is read from format 2 from now on."""
    gone: bool = False
    """It was deleted (pruned) before or while it was converted."""
    unconvertible: str = ""
    """Why it cannot be converted (its manifest or an index cannot be read); it stays."""
    stopped: bool = False
    lost: dict[bytes, str] = field(default_factory=dict)
    """Format-1 chunks it needs that could not be read (old name -> why)."""
    lost_at: dict[bytes, tuple[str, int]] = field(default_factory=dict)
    """Where each lost chunk first sits: (disk, position)."""
    renamed: dict[bytes, bytes] = field(default_factory=dict)
    """Old name -> new name of every chunk it references (lost ones to `lost_digest`)."""
    chunks_written: int = 0
    chunks_present: int = 0
    """Converted before (by this upgrade, or by a backup that stored the same content)."""
    objects_written: int = 0
    bytes_read: int = 0
    """Stored bytes of the format-1 chunks read."""
    bytes_written: int = 0


@dataclass(frozen=True)
class _Done:
    old: bytes
    new: bytes
    written: int
    read: int
    lost: str = ""


class PointConverter:
    """Converts recovery points from `legacy` (format 1) to `new` (format 2); see the module
    note, step 3. One per upgrade run; `known` is every old-to-new name recorded so far and
    grows as it converts. Blocking: run `convert` in an executor."""

    def __init__(
        self,
        legacy: Datastore,
        new: Datastore,
        *,
        guard: ChunkGuard,
        owner: str,
        known: dict[bytes, Renamed],
        is_bad: Callable[[bytes], bool] = lambda digest: False,
        record: Record = lambda entries: None,
        on_object: Callable[[ShouldStop], None] = lambda should_stop: None,
        progress: Callable[[int, int], None] = lambda chunks, read: None,
        threads: int = THREADS,
    ) -> None:
        """`record` is called with new names once they are durable; `on_object` after each
        object written (with the conversion's `should_stop`), `progress(chunks, bytes read)` as
        chunks are done; all three from the thread that runs `convert`."""
        self.legacy = legacy
        self.new = new
        self.guard = guard
        self.owner = owner
        self.known = known
        self._is_bad = is_bad
        self._record = record
        self._on_object = on_object
        self._progress = progress
        self._should_stop: ShouldStop = lambda: False
        self._threads = threads
        self._unrecorded: dict[bytes, Renamed] = {}

    def convert(self, rp_id: str, should_stop: ShouldStop | None = None) -> PointConversion:
        """Convert recovery point `rp_id` (module note, step 3); what was done. `should_stop`
        is asked before every chunk; once it says so, the conversion returns (`stopped`) with
        what it made durable recorded, and the recovery point stays in format 1."""
        self._should_stop = should_stop or (lambda: False)
        result = PointConversion(rp_id)
        try:
            manifest = self.legacy.get_manifest(rp_id)
            indexes = list(self.legacy.get_indexes(manifest))
        except NotFound:
            if self.legacy.backend.has(manifest_key(rp_id)):
                result.unconvertible = "its manifest names a disk index that is missing"
            else:
                result.gone = True
            return result
        except (CorruptData, UnsupportedFormat) as error:
            result.unconvertible = error.message
            return result
        try:
            with ThreadPoolExecutor(self._threads, thread_name_prefix="upgrade") as pool:
                shas = {
                    index.disk: self._convert_index(rp_id, index, pool, result) for index in indexes
                }
            # Every new name it uses is recorded before the manifest makes them count.
            self._flush()
            if self._should_stop():
                raise Stopped
            converted = replace(
                manifest,
                disks=tuple(replace(d, index_sha256=shas[d.name]) for d in manifest.disks),
            )
            self.new.put_manifest(converted, verify_chunks=False)
            self._wrote(result)
        except Stopped:
            result.stopped = True
            return result
        finally:
            self._flush()  # what is durable is recorded, whatever stopped the conversion
        result.committed = True
        # A prune may have deleted it while it was converted: then this manifest must go too.
        # A prune deletes format 1 first, so either this sees it gone, or the prune, which
        # deletes format 2 after, deletes this manifest itself.
        if not self.legacy.backend.has(manifest_key(rp_id)):
            self.new.delete_recovery_point(rp_id)
            result.committed, result.gone = False, True
        return result

    def _wrote(self, result: PointConversion) -> None:
        result.objects_written += 1
        self._on_object(self._should_stop)

    def _convert_index(
        self, rp_id: str, index: DiskIndex, pool: ThreadPoolExecutor, result: PointConversion
    ) -> str:
        """Convert the chunks of one disk's index and store its format-2 index; its SHA-256."""
        renamed = result.renamed
        distinct = [d for d in dict.fromkeys(index.iter_digests()) if d != ZERO_DIGEST]
        # Chunks converted before: held, then checked for (a collection since the recording
        # may have deleted one that no format-2 recovery point references yet). One that could
        # not be read then is tried again.
        earlier = {
            d: self.known[d][0]
            for d in distinct
            if d in self.known and d not in renamed and not self.known[d][1]
        }
        self.guard.hold(self.owner, earlier.values())
        gone = set(self.new.missing_chunks(earlier.values()))
        for old, new in earlier.items():
            if new not in gone:
                renamed[old] = new
                result.chunks_present += 1
        todo = [d for d in distinct if d not in renamed]
        window: deque[Future[_Done]] = deque()

        def settle(at_most: int) -> None:
            while len(window) > at_most:
                done = window.popleft().result()
                renamed[done.old] = done.new
                self.known[done.old] = self._unrecorded[done.old] = (done.new, done.lost)
                result.bytes_read += done.read
                if done.lost:
                    result.lost[done.old] = done.lost
                elif done.written:
                    result.chunks_written += 1
                    result.bytes_written += done.written
                    self._wrote(result)
                else:
                    result.chunks_present += 1
                self._progress(1, done.read)
                if len(self._unrecorded) >= RECORD_EVERY:
                    self._flush()

        try:
            for old in todo:
                if self._should_stop():
                    raise Stopped
                window.append(pool.submit(self._convert_chunk, old))
                settle(WINDOW - 1)
            settle(0)
        finally:
            for future in window:
                future.cancel()
            wait(window)  # those already running finish: what they stored is durable
            for future in window:
                if not future.cancelled() and future.exception() is None:
                    done = future.result()
                    self.known[done.old] = self._unrecorded[done.old] = (done.new, done.lost)
        for position, old in enumerate(index.iter_digests()):
            if old in result.lost and old not in result.lost_at:
                result.lost_at[old] = (index.disk, position)
        digests = b"".join(
            old if old == ZERO_DIGEST else renamed[old] for old in index.iter_digests()
        )
        converted = DiskIndex(index.disk, index.size_bytes, index.chunk_size, digests)
        sha = self.new.put_index(rp_id, converted)
        self._wrote(result)
        return sha

    def _convert_chunk(self, old: bytes) -> _Done:
        """Read format-1 chunk `old`, check it, name it with the key and store it sealed."""
        try:
            compression, raw_size, payload = self.legacy.get_chunk_blob(old)
            raw = decompress(compression, payload, raw_size)
        except ChunkMissing:
            return _Done(old, lost_digest(old), 0, 0, MISSING)
        except CorruptData as error:
            return _Done(old, lost_digest(old), 0, 0, _why(error))
        read = len(payload)
        actual = self.legacy.chunk_hash.digest(raw)
        if actual != old:
            return _Done(old, lost_digest(old), 0, read, f"its bytes hash to {actual.hex()}")
        new = self.new.chunk_hash.digest(raw)
        # Held before it is looked for (gc.py's guard protocol).
        self.guard.hold(self.owner, (new,))
        written = self.new.put_chunk_blob(
            new, compression, raw_size, payload, replace=self._is_bad(new)
        )
        return _Done(old, new, written, read)

    def _flush(self) -> None:
        if self._unrecorded:
            entries, self._unrecorded = self._unrecorded, {}
            self._record(entries)


def _why(error: CorruptData) -> str:
    return str(error.fields.get("detail") or error.message)


# --- what a conversion will do, and how fast ---------------------------------------------------


@dataclass(frozen=True)
class UpgradePlan:
    """What converting a set of recovery points rewrites."""

    recovery_points: int
    indexes: int
    chunks: int
    """Distinct format-1 chunks not converted yet."""
    stored_bytes: int
    """Their stored (compressed) size, as the store reports it."""
    unreadable: tuple[str, ...] = ()
    """Recovery points whose manifest or an index cannot be read (they cannot be converted)."""

    @property
    def objects(self) -> int:
        """Objects written: a chunk each, an index per disk, a manifest per recovery point."""
        return self.chunks + self.indexes + self.recovery_points


def plan(
    legacy: Datastore,
    points: Iterable[str],
    known: Mapping[bytes, Renamed],
    *,
    sizes: bool = True,
    should_stop: ShouldStop | None = None,
) -> tuple[UpgradePlan, list[bytes]]:
    """What converting `points` rewrites (chunks in `known` are converted already), and the
    chunks it reads, in the order first met. With `sizes`, each chunk's stored size is asked of
    the store (one stat per chunk). Blocking; reads every index once."""
    asked = should_stop or (lambda: False)
    chunks: dict[bytes, None] = {}
    counted = indexes = 0
    unreadable: list[str] = []
    for rp_id in points:
        if asked():
            raise Stopped
        try:
            manifest = legacy.get_manifest(rp_id)
            for index in legacy.get_indexes(manifest):
                indexes += 1
                for digest in index.iter_digests():
                    if digest != ZERO_DIGEST and digest not in known:
                        chunks[digest] = None
        except NotFound:
            continue  # deleted since it was listed
        except (CorruptData, UnsupportedFormat):
            unreadable.append(rp_id)
            continue
        counted += 1
    stored = 0
    if sizes:
        for digest in chunks:
            if asked():
                raise Stopped
            try:
                stored += legacy.chunk_info(digest).size
            except NotFound:
                continue
    result = UpgradePlan(counted, indexes, len(chunks), stored, tuple(unreadable))
    return result, list(chunks)


@dataclass(frozen=True)
class Rate:
    """A conversion timed on a sample of chunks."""

    chunks: int
    stored_bytes: int
    seconds: float

    @property
    def bytes_per_second(self) -> float:
        return self.stored_bytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def objects_per_second(self) -> float:
        return self.chunks / self.seconds if self.seconds > 0 else 0.0

    def estimate(self, work: UpgradePlan) -> float:
        """Seconds `work` takes at this rate (by bytes, or by objects if the sample was empty
        of bytes)."""
        if self.bytes_per_second and work.stored_bytes:
            return work.stored_bytes / self.bytes_per_second
        if self.objects_per_second:
            return work.objects / self.objects_per_second
        return 0.0


def measure_rate(
    legacy: Datastore, storage: ObjectStore, digests: Sequence[bytes], threads: int = THREADS
) -> Rate:
    """Time the conversion of a sample of `digests` (at most `SAMPLE_CHUNKS` chunks or
    `SAMPLE_BYTES`): read, decompress, check the plain name, name with a key, seal and write, as
    the upgrade does, `threads` at once, to scratch objects under `PROBE_PREFIX` in `storage`,
    which are deleted after. Nothing of the datastore changes. Blocking.

    The sample is spread evenly over `digests`: the first chunks of a disk are mostly its file
    system's metadata, which compress far better than the rest, and a rate in stored bytes per
    second measured on them alone came out four times too slow."""
    cipher = AESGCM(os.urandom(32))
    keyed = ChunkHash(os.urandom(32))
    scratch = f"{PROBE_PREFIX}{os.urandom(8).hex()}/"
    written: list[str] = []
    lock = threading.Lock()
    wanted = max(4, min(SAMPLE_CHUNKS, SAMPLE_BYTES // legacy.chunk_size))
    sample = list(digests[:: max(1, len(digests) // wanted)][:wanted])

    def one(old: bytes) -> int:
        try:
            compression, raw_size, payload = legacy.get_chunk_blob(old)
            raw = decompress(compression, payload, raw_size)
        except (ChunkMissing, CorruptData):
            return 0
        legacy.chunk_hash.digest(raw)
        name = f"{scratch}{keyed.digest(raw).hex()}"
        blob = encode_blob(compression, raw_size, payload)
        storage.put(name, seal(name, blob, 1, cipher))
        with lock:
            written.append(name)
        return len(payload)

    started = time.monotonic()
    done = read = 0
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="upgrade-probe") as pool:
            for size in pool.map(one, sample):
                done += 1
                read += size
        seconds = time.monotonic() - started
    finally:
        for name in written:
            storage.delete(name, durable=False)
        if written:
            storage.sync()
    return Rate(done, read, seconds)


# --- 4. finishing ---------------------------------------------------------------------------------


def finish(new: Datastore, should_stop: ShouldStop | None = None) -> int:
    """Step 4: delete what is left under `format1/` and make `datastore.json` plain format 2;
    how many objects were deleted. Call it only once no recovery point is read from format 1.
    Blocking; safe to repeat."""
    asked = should_stop or (lambda: False)
    storage = new.storage
    deleted = 0
    # Manifests first: a recovery point without its manifest is not one, whatever is left.
    for prefix in (f"{LEGACY_PREFIX}manifests/", LEGACY_PREFIX):
        for key in list(storage.list(prefix)):
            if asked():
                raise Stopped
            storage.delete(key, durable=False)
            deleted += 1
    storage.sync()
    new.finish_upgrade()
    return deleted


__all__ = [
    "PROBE_PREFIX",
    "PointConversion",
    "PointConverter",
    "Rate",
    "Stopped",
    "UpgradePlan",
    "clean_moved",
    "finish",
    "lost_digest",
    "measure_rate",
    "pending_points",
    "plan",
    "switch",
]
