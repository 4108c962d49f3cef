"""Garbage collection of a datastore: what it deletes, what it keeps, that it is safe beside
running backups, that it syncs once per batch, and that it (and pruning) stops when cancelled
or when the controller stops. Real datastores (a temporary directory, and S3 on a real
SeaweedFS); faults and slow disks by wrappers around the real stores."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from controller.datastore import (
    ChunkGuard,
    Datastore,
    FaultyStore,
    GcReport,
    LocalDirectoryStore,
    MasterKey,
    ObjectInfo,
    ObjectStore,
    collect_garbage,
    index_key,
    manifest_key,
    open_object_store,
)
from shared.clock import ManualClock
from shared.digest import ZERO_DIGEST, chunk_digest
from shared.errors import CorruptData, DatastoreError, Unavailable, UnsupportedFormat
from shared.index import DiskIndex
from tests.conftest import TEST_BUCKET
from tests.seaweed import SeaweedFS
from tests.test_datastore import CHUNK, back_up, chunk_of, restore, upload
from tests.test_protection import (
    DAY,
    EU,
    HOUR,
    SHOP_WEB,
    Controller,
    controller,
    store_recovery_point,
    ts,
    until,
)

NO_GRACE = 3600.0
"""Added to now: a cutoff in the future, so every unreferenced chunk is old enough."""


# Each backend, and how finely it stamps write times: GC reads an object's age from them.
BACKENDS = ["local", "s3"]
TICK = {"local": 0.02, "s3": 1.0}  # S3's Last-Modified has whole seconds


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend(backend_name: str, request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if backend_name == "s3":
        server: SeaweedFS = request.getfixturevalue("seaweedfs")
        return open_object_store(server.url(TEST_BUCKET, tmp_path.name), server.settings())
    return LocalDirectoryStore(tmp_path / "store")


@pytest.fixture
def tick(backend_name: str) -> float:
    return TICK[backend_name]


@pytest.fixture(params=["plain", "encrypted"])
def store(request: pytest.FixtureRequest, backend: ObjectStore) -> Datastore:
    """A format-1 datastore, and an encrypted one: sizes, names and ages come through the
    encrypting wrapper there."""
    if request.param == "plain":
        return Datastore.create(backend, CHUNK)
    return Datastore.create(backend, CHUNK, master=MasterKey.generate(), vault="default")


@pytest.fixture
def guard() -> ChunkGuard:
    return ChunkGuard()


def image(*seeds: int) -> bytes:
    """A disk image of whole chunks: chunk_of(seed) each, or a zero chunk for seed 0."""
    return b"".join(chunk_of(seed) if seed else bytes(CHUNK) for seed in seeds)


def digests(store: Datastore, *seeds: int) -> set[bytes]:
    return {store.chunk_hash.digest(chunk_of(seed)) for seed in seeds}


def stored(store: Datastore) -> set[bytes]:
    return set(store.list_chunk_digests())


def gc(store: Datastore, guard: ChunkGuard, *, cutoff: float | None = None) -> GcReport:
    return collect_garbage(
        store, cutoff=time.time() + NO_GRACE if cutoff is None else cutoff, guard=guard
    )


def later_than(store: Datastore, digest: bytes, tick: float) -> None:
    """Wait until a write now is stamped later than `digest`'s chunk (stamps are coarse)."""
    while time.time() <= store.chunk_info(digest).modified + tick:
        time.sleep(0.01)


# --- what a collection deletes ----------------------------------------------------------------


def test_deleting_a_recovery_point_frees_exactly_the_chunks_only_it_used(
    store: Datastore, guard: ChunkGuard
) -> None:
    rp1 = {"root": image(1, 2, 3, 0, 4), "data": image(7)}
    rp2 = {"root": image(1, 2, 5, 6), "data": image(7, 8)}
    store.put_manifest(back_up(store, "rp1", rp1))
    store.put_manifest(back_up(store, "rp2", rp2))
    assert stored(store) == digests(store, 1, 2, 3, 4, 5, 6, 7, 8)
    only_rp1 = digests(store, 3, 4)
    freed = sum(store.chunk_info(d).size for d in only_rp1)

    store.delete_recovery_point("rp1")
    calls: list[tuple[str, int, int]] = []
    report = collect_garbage(
        store,
        cutoff=time.time() + NO_GRACE,
        guard=guard,
        progress=lambda phase, done, total: calls.append((phase, done, total)),
    )

    assert stored(store) == digests(store, 1, 2, 5, 6, 7, 8)
    assert report == GcReport(
        recovery_points=1,
        referenced_chunks=6,
        chunks_seen=8,
        chunks_deleted=2,
        bytes_freed=freed,
        kept_in_grace=0,
        kept_held=0,
        orphan_indexes_deleted=0,
        seconds=report.seconds,
    )
    assert calls == [("mark", 1, 1), ("sweep", 0, 0), ("sweep", 8, 8)]
    # The survivor reads back byte for byte, every chunk re-hashed on the way.
    assert restore(store, "rp2", "root") == rp2["root"]
    assert restore(store, "rp2", "data") == rp2["data"]
    # Nothing more to do.
    again = gc(store, guard)
    assert (again.chunks_seen, again.chunks_deleted) == (6, 0)


def test_an_empty_datastore_collects_nothing(store: Datastore, guard: ChunkGuard) -> None:
    report = gc(store, guard)
    assert (report.recovery_points, report.chunks_seen, report.chunks_deleted) == (0, 0, 0)


def test_chunks_younger_than_the_cutoff_wait_for_a_later_collection(
    store: Datastore, guard: ChunkGuard, tick: float
) -> None:
    store.put_manifest(back_up(store, "rp1", {"root": image(1)}))
    first = upload(store, chunk_of(2))  # uploaded by a backup that failed, say
    later_than(store, first, tick)
    second = upload(store, chunk_of(3))
    first_at, second_at = store.chunk_info(first).modified, store.chunk_info(second).modified
    assert first_at < second_at

    # An hour of grace: both are too young.
    report = gc(store, guard, cutoff=time.time() - 3600)
    assert (report.kept_in_grace, report.chunks_deleted) == (2, 0)
    assert stored(store) == digests(store, 1, 2, 3)
    # The cutoff between the two: the older goes.
    report = gc(store, guard, cutoff=(first_at + second_at) / 2)
    assert (report.kept_in_grace, report.chunks_deleted) == (1, 1)
    assert stored(store) == digests(store, 1, 3)
    # Later still: the younger goes too; the referenced chunk never does.
    report = gc(store, guard)
    assert (report.kept_in_grace, report.chunks_deleted) == (0, 1)
    assert stored(store) == digests(store, 1)
    assert restore(store, "rp1", "root") == image(1)


def test_a_held_chunk_survives_until_released(store: Datastore, guard: ChunkGuard) -> None:
    garbage = upload(store, chunk_of(1))
    guard.hold("job-1", [garbage])
    report = gc(store, guard)
    assert (report.kept_held, report.chunks_deleted) == (1, 0)
    assert store.has_chunk(garbage)
    guard.release("job-1")
    report = gc(store, guard)
    assert (report.kept_held, report.chunks_deleted) == (0, 1)
    assert not store.has_chunk(garbage)


# --- beside running backups ---------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_backup_committing_during_the_sweep_keeps_its_chunks(
    store: Datastore, guard: ChunkGuard
) -> None:
    store.put_manifest(back_up(store, "rp1", {"root": image(1)}))
    reused = upload(store, chunk_of(2))  # old and unreferenced: what the sweep deletes
    other = upload(store, chunk_of(3))  # the same, but nobody reuses it
    marked, go = threading.Event(), threading.Event()

    def pause_after_mark(phase: str, done: int, total: int) -> None:
        if phase == "sweep" and done == 0:
            marked.set()
            assert go.wait(10)

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            collect_garbage,
            store,
            cutoff=time.time() + NO_GRACE,
            guard=guard,
            progress=pause_after_mark,
        )
        assert marked.wait(10)
        # The mark has read every manifest. A backup now finds `reused` stored (holding it
        # first), commits a recovery point referencing it, and ends.
        guard.hold("job-2", [reused])
        assert store.missing_chunks([reused]) == []
        store.put_manifest(back_up(store, "rp2", {"root": image(2)}, upload_chunks=False))
        guard.release("job-2")
        go.set()
        report = running.result(timeout=10)

    assert (report.recovery_points, report.kept_held, report.chunks_deleted) == (1, 1, 1)
    assert store.has_chunk(reused)
    assert not store.has_chunk(other)
    assert restore(store, "rp2", "root") == image(2)
    # The next collection sees the manifest: the chunk is referenced, no longer held.
    assert not guard.is_held(reused)
    report = gc(store, guard)
    assert (report.recovery_points, report.referenced_chunks) == (2, 2)
    assert (report.kept_held, report.chunks_deleted) == (0, 0)
    assert restore(store, "rp2", "root") == image(2)


def test_a_release_during_a_collection_takes_effect_when_it_ends() -> None:
    guard = ChunkGuard()
    a, b = chunk_digest(b"a"), chunk_digest(b"b")
    guard.hold("job-1", [a])
    guard.hold("job-1", [b])  # holds add up
    guard.hold("job-2", [a])
    guard.release("job-1")
    assert guard.is_held(a)  # job-2 still holds it
    assert not guard.is_held(b)  # no collection runs: released at once

    guard.hold("job-3", [b])
    with guard.sweeping(), guard.sweeping():  # two collections at once
        guard.release("job-2")
        guard.release("job-3")
        guard.release("job-4")  # never held anything: fine
        assert guard.is_held(a)
        assert guard.is_held(b)
    assert not guard.is_held(a)
    assert not guard.is_held(b)


def test_a_sweep_handle_cannot_delete_after_its_collection(guard: ChunkGuard) -> None:
    deleted: list[bytes] = []
    digest = chunk_digest(b"x")
    with guard.sweeping() as sweep:
        guard.hold("job-1", [digest])
        assert not sweep.delete_unless_held(digest, deleted.append)
        guard.release("job-1")
        assert not sweep.delete_unless_held(digest, deleted.append)  # released mid-collection
    assert deleted == []
    with pytest.raises(RuntimeError, match="ended"):
        sweep.delete_unless_held(digest, deleted.append)


@pytest.mark.timeout(60)
def test_backups_following_the_guard_protocol_never_lose_a_chunk_to_gc(
    store: Datastore, guard: ChunkGuard, tick: float
) -> None:
    """Backups dedup against old, unreferenced chunks while collections run back to back: every
    recovery point that committed must restore whole."""
    grace = 2.0 + tick  # longer than any backup here; it protects their indexes, not chunks
    pool_seeds = list(range(1, 41))
    for seed in pool_seeds:
        upload(store, chunk_of(seed))  # left by failed backups: garbage, unless reused
    time.sleep(grace + 0.1)  # old enough to be swept
    done = threading.Event()
    collections: list[GcReport] = []

    def collect() -> None:
        while not done.is_set():
            collections.append(gc(store, guard, cutoff=time.time() - grace))

    def backup(n: int) -> tuple[str, bytes]:
        rng = random.Random(n)
        disk = image(*rng.sample(pool_seeds, 6), 1000 + n)
        rp_id, owner = f"rp{n}", f"job-{n}"
        raws = [disk[i : i + CHUNK] for i in range(0, len(disk), CHUNK)]
        wanted = [store.chunk_hash.digest(raw) for raw in raws]
        try:
            guard.hold(owner, wanted)  # before asking what is stored
            missing = set(store.missing_chunks(wanted))
            for raw, digest in zip(raws, wanted, strict=True):
                if digest in missing:
                    upload(store, raw)
            store.put_manifest(back_up(store, rp_id, {"root": disk}, upload_chunks=False))
        finally:
            guard.release(owner)
        return rp_id, disk

    with ThreadPoolExecutor(4) as pool:
        collector = pool.submit(collect)
        try:
            results = list(pool.map(backup, range(40)))
        finally:
            done.set()
        collector.result(timeout=30)

    assert len(collections) > 1, "collections did not run beside the backups"
    assert sum(report.chunks_deleted for report in collections) > 0, "nothing was ever swept"
    for rp_id, disk in results:
        assert restore(store, rp_id, "root") == disk
    # Once nothing runs, every chunk no recovery point uses goes.
    gc(store, guard)
    used = set().union(*(store.get_index(rp_id, "root").referenced() for rp_id, _ in results))
    assert stored(store) == used


# --- indexes of backups that never committed ---------------------------------------------------


def test_old_orphan_indexes_are_deleted_and_young_ones_keep_their_chunks(
    store: Datastore, guard: ChunkGuard, tick: float
) -> None:
    store.put_manifest(back_up(store, "rp1", {"root": image(1, 2)}))
    back_up(store, "failed", {"root": image(1, 10), "data": image(11)})  # crashed long ago
    young_chunks = [upload(store, chunk_of(20)), upload(store, chunk_of(21))]
    later_than(store, young_chunks[-1], tick)
    cutoff = time.time()
    time.sleep(tick + 0.05)  # what is written now is stamped after the cutoff
    # A backup still running: its chunks are old (deduplicated), its index just written.
    young = DiskIndex("root", 2 * CHUNK, CHUNK, b"".join(young_chunks))
    store.put_index("running", young)
    assert store.index_info("failed", "data").modified < cutoff
    assert store.index_info("running", "root").modified > cutoff

    report = gc(store, guard, cutoff=cutoff)

    assert report.orphan_indexes_deleted == 2
    assert set(store.list_indexes()) == {"rp1", "running"}
    assert stored(store) == digests(store, 1, 2, 20, 21)
    assert (report.referenced_chunks, report.chunks_deleted, report.kept_in_grace) == (4, 2, 0)
    # The running backup commits after all, and its recovery point is whole.
    store.put_manifest(back_up(store, "running", {"root": image(20, 21)}, upload_chunks=False))
    assert restore(store, "running", "root") == image(20, 21)


def test_an_orphan_that_commits_during_the_mark_is_kept(
    store: Datastore, guard: ChunkGuard
) -> None:
    store.put_manifest(back_up(store, "rp1", {"root": image(1)}))
    slow = back_up(store, "slow", {"root": image(2, 3)})  # it outlived the grace period

    def commit_once_the_manifests_are_listed(phase: str, done: int, total: int) -> None:
        if (phase, done, total) == ("mark", 1, 1):
            store.put_manifest(slow)

    report = collect_garbage(
        store,
        cutoff=time.time() + NO_GRACE,
        guard=guard,
        progress=commit_once_the_manifests_are_listed,
    )
    assert (report.recovery_points, report.orphan_indexes_deleted) == (2, 0)
    assert (report.referenced_chunks, report.chunks_deleted) == (3, 0)
    assert restore(store, "slow", "root") == image(2, 3)


# --- what stops a collection ----------------------------------------------------------------


def damage_index(store: Datastore) -> None:
    store.backend.put(index_key("rp2", "root"), b"CFIX torn")


def replace_index(store: Datastore) -> None:
    forged = DiskIndex("root", CHUNK, CHUNK, store.chunk_hash.digest(chunk_of(1)))
    store.backend.put(index_key("rp2", "root"), forged.encode())


def lose_index(store: Datastore) -> None:
    store.backend.delete(index_key("rp2", "root"))


def damage_manifest(store: Datastore) -> None:
    store.backend.put(manifest_key("rp2"), b'{"format": 1')


def newer_manifest(store: Datastore) -> None:
    document = json.loads(store.backend.get(manifest_key("rp2")))
    document["format"] = 99
    store.backend.put(manifest_key("rp2"), json.dumps(document).encode())


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (damage_index, CorruptData),
        (replace_index, CorruptData),
        (lose_index, CorruptData),
        (damage_manifest, CorruptData),
        (newer_manifest, UnsupportedFormat),
    ],
)
def test_an_unreadable_recovery_point_stops_gc_before_it_deletes_anything(
    store: Datastore,
    guard: ChunkGuard,
    damage: Callable[[Datastore], None],
    error: type[Exception],
) -> None:
    store.put_manifest(back_up(store, "rp1", {"root": image(1, 2)}))
    store.put_manifest(back_up(store, "rp2", {"root": image(1, 3, 4)}))
    store.put_manifest(back_up(store, "rp3", {"root": image(5)}))
    back_up(store, "failed", {"root": image(6)})
    store.delete_recovery_point("rp3")
    damage(store)
    chunks, indexes = stored(store), store.list_indexes()

    with pytest.raises(error, match=r"rp2.*stopped before deleting any chunk"):
        gc(store, guard)

    assert stored(store) == chunks  # not even the garbage of rp3 and "failed"
    assert store.list_indexes() == indexes
    assert restore(store, "rp1", "root") == image(1, 2)
    # The operator gives up on the damaged recovery point; collection works again.
    store.delete_recovery_point("rp2")
    report = gc(store, guard)
    assert report.orphan_indexes_deleted == 1
    assert stored(store) == digests(store, 1, 2)


# --- store failures -------------------------------------------------------------------------


def test_failed_deletes_surface_typed_and_a_rerun_finishes(backend: ObjectStore) -> None:
    faulty = FaultyStore(backend)
    store = Datastore.create(faulty, CHUNK)
    guard = ChunkGuard()
    store.put_manifest(back_up(store, "rp1", {"root": image(1, 2)}))
    store.put_manifest(back_up(store, "rp2", {"root": image(1, 3, 4, 5, 6)}))
    store.delete_recovery_point("rp2")
    fault = faulty.fail_deletes("chunks/", skip=1, times=1)

    with pytest.raises(DatastoreError, match="injected fault: delete 'chunks/"):
        gc(store, guard)

    assert fault.fired == 1
    # One deleted, the failed one and two left.
    assert len(stored(store) - digests(store, 1, 2)) == 3
    assert restore(store, "rp1", "root") == image(1, 2)
    # The failed collection ended: releases take effect again at once.
    guard.hold("job-1", [ZERO_DIGEST])
    guard.release("job-1")
    assert not guard.is_held(ZERO_DIGEST)
    report = gc(store, guard)
    assert report.chunks_deleted == 3
    assert stored(store) == digests(store, 1, 2)
    assert restore(store, "rp1", "root") == image(1, 2)


class VanishingStore(FaultyStore):
    """A store where another collection deletes each chunk between the listing and the stat."""

    def stat(self, key: str) -> ObjectInfo:
        if key.startswith("chunks/"):
            self.inner.delete(key)
        return super().stat(key)


def test_chunks_deleted_by_someone_else_meanwhile_are_not_errors(backend: ObjectStore) -> None:
    store = Datastore.create(VanishingStore(backend), CHUNK)
    store.put_manifest(back_up(store, "rp1", {"root": image(1)}))
    upload(store, chunk_of(2))
    report = gc(store, ChunkGuard())
    assert (report.chunks_seen, report.chunks_deleted, report.bytes_freed) == (2, 0, 0)
    assert stored(store) == digests(store, 1)
    assert restore(store, "rp1", "root") == image(1)


# --- durability without a sync per chunk ---------------------------------------------------------


class CountingStore(LocalDirectoryStore):
    """The real local store, counting the file-system syncs it runs, and those it runs while
    the chunk guard's lock is held (which the controller's event loop takes to hold digests)."""

    def __init__(self, root: Path, guard: ChunkGuard) -> None:
        super().__init__(root)
        self.guard = guard
        self.syncs = 0
        self.syncs_under_the_guard = 0

    def _syncfs(self) -> None:
        self.syncs += 1
        if self.guard._lock.locked():  # only the collection takes it in this test
            self.syncs_under_the_guard += 1
        super()._syncfs()


@pytest.mark.timeout(60)
def test_a_collection_syncs_once_per_batch_of_deletes_never_under_the_guard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: each deleted chunk waited for its own syncfs, under the guard's lock."""
    guard = ChunkGuard()
    backend = CountingStore(tmp_path / "store", guard)
    store = Datastore.create(backend, CHUNK)
    store.put_manifest(back_up(store, "rp1", {"root": image(1)}))
    for seed in range(2, 302):
        upload(store, chunk_of(seed))  # 300 chunks of failed backups: garbage
    monkeypatch.setattr("controller.datastore.gc.SYNC_EVERY", 128)
    backend.syncs = 0

    report = gc(store, guard)

    assert report.chunks_deleted == 300
    assert stored(store) == digests(store, 1)
    assert backend.syncs == 3  # after 128, after 256, and the last 44 at the end
    assert backend.syncs_under_the_guard == 0
    assert restore(store, "rp1", "root") == image(1)


def test_a_collection_asked_to_stop_reports_what_it_did_and_leaves_the_rest(
    tmp_path: Path,
) -> None:
    guard = ChunkGuard()
    backend = CountingStore(tmp_path / "store", guard)
    store = Datastore.create(backend, CHUNK)
    store.put_manifest(back_up(store, "rp1", {"root": image(1)}))
    for seed in range(2, 42):
        upload(store, chunk_of(seed))
    asked = 0

    def stop_after_ten_chunks() -> bool:
        nonlocal asked
        asked += 1
        return asked > 1 + 10  # once for the manifest, then once per chunk listed

    backend.syncs = 0
    report = collect_garbage(
        store, cutoff=time.time() + NO_GRACE, guard=guard, should_stop=stop_after_ten_chunks
    )

    assert report.stopped
    assert report.chunks_seen == 10
    assert len(stored(store)) == 41 - report.chunks_deleted  # the rest is still there
    assert report.chunks_deleted >= 9  # of the ten it saw, one may be the referenced chunk
    assert backend.syncs == 1  # its deletes are durable all the same
    # The collection is over: a release takes effect at once again.
    guard.hold("job-1", [ZERO_DIGEST])
    guard.release("job-1")
    assert not guard.is_held(ZERO_DIGEST)
    # Asked to stop while it marks, it deletes nothing at all.
    early = collect_garbage(
        store, cutoff=time.time() + NO_GRACE, guard=guard, should_stop=lambda: True
    )
    assert (early.stopped, early.recovery_points, early.chunks_deleted) == (True, 0, 0)
    assert restore(store, "rp1", "root") == image(1)
    assert gc(store, guard).chunks_deleted == 41 - 1 - report.chunks_deleted


# --- collections and prunes as jobs: cancel and stop --------------------------------------------


class SlowDeletes(LocalDirectoryStore):
    """The real local store on a slow disk: every delete takes a while; chunk deletes counted."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.chunks_deleted = 0

    def delete(self, key: str, *, durable: bool = True) -> None:
        time.sleep(0.02)
        super().delete(key, durable=durable)
        if key.startswith("chunks/"):
            self.chunks_deleted += 1


@dataclass
class SlowStores:
    opened: list[SlowDeletes] = field(default_factory=list)

    def __call__(self, root: Path) -> ObjectStore:
        backend = SlowDeletes(root)
        self.opened.append(backend)
        return backend

    @property
    def chunks_deleted(self) -> int:
        return sum(backend.chunks_deleted for backend in self.opened)


async def garbage(env: Controller, count: int) -> Datastore:
    """`count` chunks no recovery point references, counted in the vault's stored bytes, and
    old enough to collect."""
    store = await env.datastores.get(EU)
    for seed in range(1, count + 1):
        upload(store, chunk_of(seed))
    total = sum(store.chunk_info(d).size for d in store.list_chunk_digests())
    await env.catalog.add_stored_bytes(EU, total)
    env.clock.set(time.time() + 2 * HOUR)  # the grace period (an hour) has passed
    return store


async def until_true(check: Callable[[], bool], what: str) -> None:
    async def holds() -> bool:
        return check()

    await until(holds, what)


@pytest.mark.timeout(60)
async def test_a_running_collection_is_cancelled_promptly_and_a_later_one_finishes(
    tmp_path: Path,
) -> None:
    slow = SlowStores()
    async with controller(tmp_path, ManualClock(time.time()), slow) as env:
        await env.create_vault(EU, "eu-west")
        store = await garbage(env, 200)  # 4 s of deletes at least
        before = (await env.catalog.vault(EU)).stored_bytes

        job = await env.pruner.collect(EU)
        await until_true(lambda: slow.chunks_deleted >= 5, "the sweep to delete")
        assert (await env.jobs.cancel(job.id)).status == "Cancelling"
        asked = time.monotonic()
        ended = await env.ended(job.id)

        assert time.monotonic() - asked < 1.0
        assert (ended.status, ended.error_code) == ("Cancelled", "JobCancelled")
        assert "the others are left for the next collection" in ended.error_message
        left = stored(store)
        report = ended.details["report"]
        assert report["stopped"]
        assert 0 < len(left) == 200 - report["chunks_deleted"]
        # What it freed is accounted, however it ended.
        assert ended.bytes_stored == report["bytes_freed"] > 0
        assert (await env.catalog.vault(EU)).stored_bytes == before - report["bytes_freed"]

        again = await env.pruner.collect(EU, wait=True)
        assert again.status == "Completed"
        assert stored(store) == set()
        assert (await env.catalog.vault(EU)).stored_bytes == 0


@pytest.mark.timeout(60)
async def test_the_controllers_stop_ends_a_collection_promptly_and_the_next_start_records_it(
    tmp_path: Path,
) -> None:
    slow = SlowStores()
    clock = ManualClock(time.time())
    async with controller(tmp_path, clock, slow) as env:
        await env.create_vault(EU, "eu-west")
        store = await garbage(env, 200)
        job = await env.pruner.collect(EU)
        await until_true(lambda: slow.chunks_deleted >= 5, "the sweep to delete")
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 2.0
    left = stored(store)
    assert 0 < len(left) < 200

    async with controller(tmp_path, clock) as env:
        record = await env.catalog.job(job.id)
        assert (record.status, record.error_code) == ("Failed", "ControllerRestarted")
        assert record.details["report"]["chunks_deleted"] == 200 - len(left)
        # No new maintenance job starts once a stop has begun.
        env.jobs.stopping()
        with pytest.raises(Unavailable, match="stopping"):
            await env.pruner.collect(EU)


@pytest.mark.timeout(60)
async def test_a_cancelled_prune_stops_between_recovery_points(tmp_path: Path) -> None:
    slow = SlowStores()
    clock = ManualClock(ts(2025, 6, 1))
    async with controller(tmp_path, clock, slow) as env:
        await env.create_vault(EU, "eu-west")
        await env.enrol_all()
        await env.protected(EU, SHOP_WEB)
        # Sixty old points, far past the 30 days of the default policy, and a recent one.
        for day in range(60):
            created = ts(2025, 1, 1) + day * DAY
            await store_recovery_point(env, EU, SHOP_WEB, f"rp-{day:02}", created)
        await store_recovery_point(env, EU, SHOP_WEB, "rp-new", ts(2025, 5, 31))

        job = await env.pruner.prune_vault(EU, wait=False)

        async def some_deleted() -> bool:
            return len(await env.catalog.recovery_points(SHOP_WEB)) <= 58

        await until(some_deleted, "the prune to delete")
        assert (await env.jobs.cancel(job.id)).status == "Cancelling"
        ended = await env.ended(job.id)
        assert (ended.status, ended.error_code) == ("Cancelled", "JobCancelled")
        deleted = ended.details["deleted_recovery_points"]
        left = await env.catalog.recovery_points(SHOP_WEB)
        assert 0 < len(deleted) < 60
        assert len(left) == 61 - len(deleted)
        # Each point went whole or not at all: its row and its manifest agree.
        manifests = set((await env.datastores.get(EU)).list_recovery_point_ids())
        assert manifests == {rp.id for rp in left}
