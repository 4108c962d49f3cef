"""Verification: re-reading what recovery points reference, and which of them damage reaches.

A backup's chunks are re-hashed when they arrive, but bytes rot, files are deleted, disks lie:
what was whole when it was written need not be whole now. `verify_recovery_points` reads every
distinct chunk a set of recovery points references back from the store, decompresses it and
hashes it to its name (`Datastore.read_chunk`, with the datastore's own hash), and says per
recovery point whether it is whole, or which chunks it needs are missing or corrupt (as Proxmox
Backup Server's verify jobs do).

- Each chunk is read once, however many of the recovery points share it: the digests read
  whole are kept in a set (about 100 bytes per distinct chunk, as garbage collection's mark),
  those found bad in a dict; a recovery point that references a chunk already found bad is
  damaged too, without reading it again.
- Bounded memory: one index at a time, and a window of chunks being read (`WINDOW`), each
  dropped once hashed. Reads run in a few threads of their own (`THREADS`): decompressing and
  hashing free the GIL, and the I/O overlaps.
- It checks for abort before every chunk it reads and every recovery point it opens, and
  returns what it finished (`stopped`); a recovery point it was in the middle of is left out.
- A recovery point deleted while it was read (pruned) is skipped, not reported damaged: its
  chunks may be garbage collection's by now. One that still has its manifest once its chunks
  are read had them referenced all along (a collection marks from the manifests), so what is
  missing was lost, not collected.
- What it cannot tell from damage stops it: the store's own errors (`DatastoreError`: an
  outage, a permission) are raised, and nothing is reported.

A vault being upgraded (upgrade.py) keeps some recovery points in its format-1 part until they
are converted: `datastore_of` gives, per recovery point, the datastore to read it from. The two
formats' chunk names never coincide, so one set of good and bad digests serves both.

`find_damage` answers the other question, for a chunk found bad elsewhere (a restore): which
recovery points reference it, and where. It reads indexes only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from controller.datastore.health import ChunkHealth
from controller.datastore.store import Datastore, manifest_key
from shared.digest import ZERO_DIGEST
from shared.errors import ChunkMissing, CorruptData, NotFound, UnsupportedFormat
from shared.index import DiskIndex
from shared.manifest import RecoveryPointManifest

THREADS = 4
"""Chunks read, decompressed and hashed at once."""
WINDOW = 32
"""Chunks submitted and not yet checked: what a verify holds in memory at most."""
_PROGRESS_EVERY = 256

MISSING = "missing"
"""The reason given for a chunk that is not in the store."""

ShouldStop = Callable[[], bool]
Progress = Callable[["VerifyProgress"], None]


@dataclass(frozen=True)
class DamagedChunk:
    """A chunk a recovery point needs that is missing or corrupt."""

    disk: str
    chunk: int
    """Its position on the disk (its first, if the disk holds it more than once)."""
    digest: bytes
    reason: str
    """`MISSING`, or what was wrong with its bytes."""


@dataclass(frozen=True)
class PointOutcome:
    """What a verify found of one recovery point."""

    rp_id: str
    damage: tuple[DamagedChunk, ...] = ()
    detail: str = ""
    """Damage that is not a chunk's: its manifest or an index cannot be read."""

    @property
    def whole(self) -> bool:
        return not self.damage and not self.detail


@dataclass(frozen=True)
class VerifyProgress:
    points_done: int
    points: int
    chunks_checked: int
    bytes_read: int


@dataclass(frozen=True)
class VerifyReport:
    outcomes: tuple[PointOutcome, ...]
    """Of every recovery point checked to its end, in the order given."""
    skipped: tuple[str, ...]
    """Recovery points deleted before or while they were read."""
    bad: Mapping[bytes, str]
    """Chunks found missing or corrupt that a reported recovery point needs, and why."""
    whole_again: frozenset[bytes]
    """Chunks marked bad (in the `ChunkHealth` given) that were read whole."""
    generation: int
    """The `ChunkHealth` generation before the first read (for `ChunkHealth.mark`)."""
    chunks_checked: int
    bytes_read: int
    """Raw bytes of the chunks read whole."""
    seconds: float
    stopped: bool = False


class _Stopped(Exception):
    pass


@dataclass
class _State:
    good: set[bytes] = field(default_factory=set)
    bad: dict[bytes, str] = field(default_factory=dict)
    checked: int = 0
    bytes_read: int = 0


def verify_recovery_points(
    datastore: Datastore,
    rp_ids: Iterable[str],
    *,
    health: ChunkHealth | None = None,
    should_stop: ShouldStop | None = None,
    progress: Progress | None = None,
    datastore_of: Callable[[str], Datastore] | None = None,
) -> VerifyReport:
    """Read back every distinct chunk the recovery points `rp_ids` reference; see the module
    note (and for `datastore_of`, which defaults to `datastore` for every point). Blocking: run
    it in an executor."""
    started = time.monotonic()
    points = list(rp_ids)
    asked = should_stop or (lambda: False)
    report = progress or (lambda _: None)
    generation = health.generation if health is not None else 0
    state = _State()
    outcomes: list[PointOutcome] = []
    skipped: list[str] = []
    stopped = False

    def check() -> None:
        if asked():
            raise _Stopped

    def tell() -> None:
        report(VerifyProgress(len(outcomes) + len(skipped), len(points), state.checked,
                              state.bytes_read))  # fmt: skip

    with ThreadPoolExecutor(THREADS, thread_name_prefix="verify") as readers:
        try:
            for rp_id in points:
                check()
                source = datastore_of(rp_id) if datastore_of is not None else datastore
                outcome = _verify_point(source, rp_id, readers, state, check, tell)
                if outcome is None:
                    skipped.append(rp_id)
                else:
                    outcomes.append(outcome)
                tell()
        except _Stopped:
            stopped = True
    needed = {d.digest for outcome in outcomes for d in outcome.damage}
    marked = health.snapshot() if health is not None else frozenset()
    return VerifyReport(
        outcomes=tuple(outcomes),
        skipped=tuple(skipped),
        bad={digest: reason for digest, reason in state.bad.items() if digest in needed},
        whole_again=frozenset(digest for digest in marked if digest in state.good),
        generation=generation,
        chunks_checked=state.checked,
        bytes_read=state.bytes_read,
        seconds=time.monotonic() - started,
        stopped=stopped,
    )


def _verify_point(
    datastore: Datastore,
    rp_id: str,
    readers: ThreadPoolExecutor,
    state: _State,
    check: Callable[[], None],
    tell: Callable[[], None],
) -> PointOutcome | None:
    """One recovery point's outcome; None if it is deleted (before or while it was read)."""
    try:
        manifest = datastore.get_manifest(rp_id)
    except NotFound:
        return None
    except (CorruptData, UnsupportedFormat) as error:
        return PointOutcome(rp_id, detail=error.message)
    damage: list[DamagedChunk] = []
    detail = ""
    for index in _indexes(datastore, manifest):
        if isinstance(index, str):
            detail = index
            continue
        _read_chunks(datastore, index, readers, state, check, tell)
        damage += damage_in(index, state.bad)
    if not datastore.backend.has(manifest_key(rp_id)):
        return None  # pruned meanwhile: what is missing may have been collected
    return PointOutcome(rp_id, tuple(damage), detail)


def _indexes(datastore: Datastore, manifest: RecoveryPointManifest) -> Iterator[DiskIndex | str]:
    """Each disk's index as the manifest records it, or why it cannot be read."""
    for entry in manifest.disks:
        try:
            yield datastore.get_index(manifest.id, entry.name)
        except NotFound:
            yield f"the index of disk {entry.name!r} is missing"
        except (CorruptData, UnsupportedFormat) as error:
            yield error.message


def _read_chunks(
    datastore: Datastore,
    index: DiskIndex,
    readers: ThreadPoolExecutor,
    state: _State,
    check: Callable[[], None],
    tell: Callable[[], None],
) -> None:
    """Read every chunk of `index` not read yet, a window at a time; results into `state`."""
    window: deque[tuple[bytes, Future[int]]] = deque()
    pending: set[bytes] = set()

    def settle(at_most: int) -> None:
        while len(window) > at_most:
            digest, future = window.popleft()
            pending.discard(digest)
            try:
                size = future.result()
            except ChunkMissing:
                state.bad[digest] = MISSING
            except CorruptData as error:
                state.bad[digest] = str(error.fields.get("detail") or error.message)
            else:
                state.good.add(digest)
                state.bytes_read += size
            state.checked += 1
            if state.checked % _PROGRESS_EVERY == 0:
                tell()

    try:
        for digest in index.iter_digests():
            if (
                digest == ZERO_DIGEST
                or digest in state.good
                or digest in state.bad
                or digest in pending
            ):
                continue
            check()
            pending.add(digest)
            window.append((digest, readers.submit(_read, datastore, digest)))
            settle(WINDOW - 1)
        settle(0)
    finally:
        for _, future in window:
            future.cancel()


def _read(datastore: Datastore, digest: bytes) -> int:
    return len(datastore.read_chunk(digest))


def damage_in(index: DiskIndex, bad: Mapping[bytes, str]) -> list[DamagedChunk]:
    """The chunks of `index` found bad, each once, at its first position."""
    if not bad:
        return []
    found: list[DamagedChunk] = []
    seen: set[bytes] = set()
    for position, digest in enumerate(index.iter_digests()):
        if digest in bad and digest not in seen:
            seen.add(digest)
            found.append(DamagedChunk(index.disk, position, digest, bad[digest]))
    return found


def find_damage(
    datastore: Datastore,
    rp_ids: Iterable[str],
    bad: Mapping[bytes, str],
    *,
    should_stop: ShouldStop | None = None,
) -> dict[str, list[DamagedChunk]]:
    """Which of the recovery points `rp_ids` reference the chunks `bad`, and where. Reads
    indexes only, one at a time; a recovery point that cannot be read is left out (a verify
    reports it)."""
    asked = should_stop or (lambda: False)
    found: dict[str, list[DamagedChunk]] = {}
    for rp_id in rp_ids:
        if asked():
            break
        try:
            manifest = datastore.get_manifest(rp_id)
            damage = [
                chunk
                for index in datastore.get_indexes(manifest)
                for chunk in damage_in(index, bad)
            ]
        except (NotFound, CorruptData, UnsupportedFormat):
            continue
        if damage:
            found[rp_id] = damage
    return found


__all__ = [
    "MISSING",
    "DamagedChunk",
    "PointOutcome",
    "VerifyProgress",
    "VerifyReport",
    "damage_in",
    "find_damage",
    "verify_recovery_points",
]
