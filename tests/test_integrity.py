"""Integrity, part by part, against a real local datastore and a real SQLite catalog: the verify
core (each chunk read once, per-point outcomes, stopping), the chunk health and its race with
repairs, the backup transaction that never takes a chunk on trust (MissingChunks, the masked
base index, the replace path, the commit check), what the catalog records and the dashboard
counts, and Verify jobs (scheduled after backups and on the maintenance slot, and cancelled).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controller.catalog import Catalog, JobFilter, JobRecord, PolicyRecord, VaultRecord
from controller.datastore import (
    ChunkGuard,
    Datastore,
    Fault,
    FaultyStore,
    LocalDirectoryStore,
    ObjectInfo,
    ObjectStore,
    chunk_key,
)
from controller.datastore.health import ChunkHealth
from controller.datastore.verify import MISSING, find_damage, verify_recovery_points
from controller.datastores import Datastores
from controller.integrity import Integrity
from controller.jobs import JobManager
from controller.jobs.transaction import BackedUpDisk, BackupTransaction
from controller.registry import AgentRegistry
from controller.vaults import Vaults
from controller.verification import Verifier
from shared.blob import Compression
from shared.clock import ManualClock
from shared.digest import MASKED_DIGEST, ZERO_DIGEST, chunk_digest
from shared.errors import ChunkMissing, NotFound
from shared.index import DiskIndex
from shared.manifest import ManifestDisk, RecoveryPointManifest
from shared.model import Consistency, JobStatus, Operation, Trigger, Verification
from shared.policy import default_policy

pytestmark = pytest.mark.timeout(60)

CHUNK = 4096
VAULT = "default"
DEFAULT_POLICY = PolicyRecord(VAULT, "DefaultPolicy", default_policy().to_dict(), 0.0, 0.0)


def raw(seed: int) -> bytes:
    """A chunk's bytes, distinct per seed (never all zero)."""
    return bytes([seed % 251 + 1, seed // 251 + 1]) * (CHUNK // 2)


def digest(seed: int) -> bytes:
    return chunk_digest(raw(seed))


def put(datastore: Datastore, *seeds: int) -> None:
    for seed in seeds:
        datastore.put_chunk(digest(seed), raw(seed), Compression.NONE, CHUNK)


def index_of(*seeds: int, disk: str = "root") -> DiskIndex:
    """A disk of these chunks, in order; seed 0 is an all-zero chunk."""
    return DiskIndex(
        disk,
        len(seeds) * CHUNK,
        CHUNK,
        b"".join(ZERO_DIGEST if s == 0 else digest(s) for s in seeds),
    )


def commit_raw(store: Datastore, rp_id: str, *seeds: int) -> None:
    """A recovery point of `seeds` written straight to a datastore (no catalog)."""
    put(store, *(s for s in seeds if s))
    sha = store.put_index(rp_id, index_of(*seeds))
    store.put_manifest(
        RecoveryPointManifest(
            id=rp_id, vm_id="vm-1", vault=VAULT, job_id="j", created_at=datetime.now(UTC),
            consistency=Consistency.CRASH,
            disks=(ManifestDisk("root", len(seeds) * CHUNK, CHUNK, len(seeds), sha),), vm={},
        )
    )  # fmt: skip


def chunk_file(root: Path, seed: int) -> Path:
    return root.joinpath(*chunk_key(digest(seed)).split("/"))


def flip(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@dataclass
class Setup:
    root: Path
    catalog: Catalog
    datastores: Datastores
    datastore: Datastore
    pool: ThreadPoolExecutor
    clock: ManualClock
    integrity: Integrity

    async def health(self) -> ChunkHealth:
        return await self.datastores.health(VAULT)

    async def commit(self, rp_id: str, *seeds: int, vm_id: str = "vm-1", at: float = 0.0) -> str:
        """A committed recovery point of `seeds` (stored first), in datastore and catalog."""
        put(self.datastore, *(s for s in seeds if s))
        backup = BackupTransaction(
            job_id=f"job-{rp_id}", rp_id=rp_id, datastore=self.datastore, guard=ChunkGuard(),
            catalog=self.catalog, pool=self.pool, vault=VAULT, health=await self.health(),
            integrity=self.integrity, shared_dedup=True,
        )  # fmt: skip
        await backup.accept_index(index_of(*seeds))
        await backup.commit(
            backup.manifest(
                vm_id=vm_id, vault=VAULT, created_at=datetime.fromtimestamp(at or 1.0, UTC),
                consistency=Consistency.CRASH, disks=[BackedUpDisk("root")], expected=["root"],
                vm={},
            )
        )  # fmt: skip
        backup.release()
        return rp_id


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


async def make_setup(
    tmp_path: Path, pool: ThreadPoolExecutor, backend: type[ObjectStore] | None = None
) -> AsyncIterator[Setup]:
    clock = ManualClock(1_000_000.0)
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        await catalog.create_vault(VaultRecord(VAULT, "local", CHUNK, 0.0), DEFAULT_POLICY)
        datastores = Datastores(
            catalog, tmp_path / "datastores", backend=backend or LocalDirectoryStore
        )
        datastore = await datastores.get(VAULT)
        yield Setup(
            tmp_path / "datastores" / VAULT, catalog, datastores, datastore, pool, clock,
            Integrity(catalog, datastores, clock, pool),
        )  # fmt: skip


@pytest.fixture
async def setup(tmp_path: Path, pool: ThreadPoolExecutor) -> AsyncIterator[Setup]:
    async for made in make_setup(tmp_path, pool):
        yield made


# --- the verify core --------------------------------------------------------------------------


def test_a_verify_reads_each_chunk_once_and_says_which_points_are_damaged(tmp_path: Path) -> None:
    faulty = FaultyStore(LocalDirectoryStore(tmp_path / "store"))
    store = Datastore.create(faulty, CHUNK)
    root = tmp_path / "store"
    commit_raw(store, "rp-1", 1, 2, 3, 0, 1)  # chunk 1 twice, and a zero chunk
    commit_raw(store, "rp-2", 1, 2, 4, 5)
    commit_raw(store, "rp-3", 6, 7)
    flip(chunk_file(root, 2))  # rp-1 and rp-2 need it
    chunk_file(root, 5).unlink()  # rp-2 only
    reads = faulty.inject(Fault("get", "chunks/", times=0))  # counts, never fires

    report = verify_recovery_points(store, ["rp-1", "rp-2", "rp-3"])

    # Seven distinct chunks, each read once however many points share it.
    assert reads.seen == 7
    assert report.chunks_checked == 7
    outcomes = {o.rp_id: o for o in report.outcomes}
    assert outcomes["rp-3"].whole
    assert [(d.disk, d.chunk, d.digest) for d in outcomes["rp-1"].damage] == [
        ("root", 1, digest(2))
    ]
    assert {(d.chunk, d.digest) for d in outcomes["rp-2"].damage} == {
        (1, digest(2)),
        (3, digest(5)),
    }
    assert report.bad[digest(5)] == MISSING
    assert "hash" in report.bad[digest(2)]
    assert report.bytes_read == 5 * CHUNK
    assert not report.stopped


def test_a_verify_stops_between_chunks_and_reports_only_what_it_finished(
    tmp_path: Path,
) -> None:
    store = Datastore.create(LocalDirectoryStore(tmp_path / "store"), CHUNK)
    for n in range(5):
        commit_raw(store, f"rp-{n}", *range(10 * n + 1, 10 * n + 11))
    asked = 0

    def should_stop() -> bool:
        nonlocal asked
        asked += 1
        return asked > 25  # in the third point

    report = verify_recovery_points(store, [f"rp-{n}" for n in range(5)], should_stop=should_stop)
    assert report.stopped
    assert [o.rp_id for o in report.outcomes] == ["rp-0", "rp-1"]
    assert all(o.whole for o in report.outcomes)


async def test_damage_is_found_in_every_point_that_references_it(setup: Setup) -> None:
    await setup.commit("rp-1", 1, 2)
    await setup.commit("rp-2", 3, 2, 2)
    await setup.commit("rp-3", 4)
    found = find_damage(setup.datastore, ["rp-1", "rp-2", "rp-3", "gone"], {digest(2): "x"})
    assert {rp: [(d.chunk, d.digest) for d in damage] for rp, damage in found.items()} == {
        "rp-1": [(1, digest(2))],
        "rp-2": [(1, digest(2))],  # its first position only
    }


# --- chunk health ---------------------------------------------------------------------------


def test_a_mark_from_a_read_older_than_a_repair_is_dropped() -> None:
    health = ChunkHealth([digest(1)])
    before = health.generation  # a verify starts reading
    assert health.repaired([digest(1), digest(2)]) == {digest(1)}  # a backup stores it again
    assert health.mark([digest(1), digest(3)], since=before) == {digest(3)}
    assert not health.is_bad(digest(1))
    assert health.mark([digest(1)], since=health.generation) == {digest(1)}
    assert health.bad_among([digest(1), digest(2), digest(3)]) == {digest(1), digest(3)}


def test_put_chunk_replaces_a_damaged_chunk_only_when_asked(tmp_path: Path) -> None:
    store = Datastore.create(LocalDirectoryStore(tmp_path / "store"), CHUNK)
    put(store, 1)
    path = chunk_file(tmp_path / "store", 1)
    flip(path)
    assert store.put_chunk(digest(1), raw(1), Compression.NONE, CHUNK) == 0  # trusts the name
    with pytest.raises(Exception, match="hash"):
        store.read_chunk(digest(1))
    assert store.put_chunk(digest(1), raw(1), Compression.NONE, CHUNK, replace=True) > 0
    assert store.read_chunk(digest(1)) == raw(1)


# --- the backup transaction never takes a chunk on trust ---------------------------------------


def transaction(setup: Setup, health: ChunkHealth, **more: object) -> BackupTransaction:
    # The datastore checks of a vault whose VMs are one trust domain (shared_dedup): what these
    # tests are about. Per-VM deduplication is tests/test_hostile_agent.py's.
    return BackupTransaction(
        job_id="job-b", rp_id="rp-b", datastore=setup.datastore, guard=ChunkGuard(),
        catalog=setup.catalog, pool=setup.pool, vault=VAULT, health=health,
        integrity=setup.integrity, shared_dedup=True, **more,  # type: ignore[arg-type]
    )  # fmt: skip


async def test_missing_chunks_never_answers_a_bad_chunk_as_present(setup: Setup) -> None:
    put(setup.datastore, 1, 2)
    health = await setup.health()
    backup = transaction(setup, health)
    assert await backup.missing_chunks([digest(1), digest(2)]) == []  # known now
    health.mark([digest(1)], since=health.generation)  # found bad meanwhile
    assert await backup.missing_chunks([digest(1), digest(2), digest(3), digest(1)]) == [
        digest(1),
        digest(3),
    ]
    # Uploaded again: it replaces the damaged object, and is good from then on.
    flip(chunk_file(setup.root, 1))
    assert await backup.store_chunk(digest(1), raw(1), Compression.NONE, CHUNK) > 0
    assert setup.datastore.read_chunk(digest(1)) == raw(1)
    assert not health.is_bad(digest(1))
    assert await backup.missing_chunks([digest(1)]) == []


async def test_the_base_index_masks_missing_and_bad_chunks_and_damages_its_point(
    setup: Setup,
) -> None:
    base_id = await setup.commit("rp-a", 1, 2, 0, 3, 2)
    older = await setup.commit("rp-old", 2, 5)
    base = await setup.catalog.recovery_point(base_id)
    health = await setup.health()
    health.mark([digest(3)], since=health.generation)  # e.g. a restore found it corrupt
    chunk_file(setup.root, 2).unlink()  # lost

    backup = transaction(setup, health, previous=base)
    sent = await backup.base_index(base_id, "root")

    assert [sent.digest_at(n) for n in range(5)] == [
        digest(1), MASKED_DIGEST, ZERO_DIGEST, MASKED_DIGEST, MASKED_DIGEST,
    ]  # fmt: skip
    # The agent is asked for them again: none is "already stored".
    assert await backup.missing_chunks([digest(1), digest(2), digest(3)]) == [digest(2), digest(3)]
    assert health.is_bad(digest(2))
    assert await setup.catalog.bad_chunks(VAULT) == [digest(2)]
    marks = await setup.catalog.verifications([base_id, older])
    assert marks[base_id].state == Verification.DAMAGED
    assert [(d.chunk, d.digest) for d in marks[base_id].damage] == [(1, digest(2))]
    # The other points that need it are found once the backup no longer waits (its end).
    await setup.integrity.spread(VAULT, backup.found_missing, by="job-b", exclude={base_id})
    assert (await setup.catalog.verifications([older]))[older].damaged_chunks == 1

    # Uploaded again: the points heal (a verify pending), and the index commits.
    for seed in (2, 3):
        await backup.store_chunk(digest(seed), raw(seed), Compression.NONE, CHUNK)
    await backup.accept_index(index_of(1, 2, 0, 3, 2))
    marks = await setup.catalog.verifications([base_id, older])
    assert {rp: m.state for rp, m in marks.items()} == {
        base_id: Verification.HEALED,
        older: Verification.HEALED,
    }
    assert await setup.catalog.bad_chunks(VAULT) == []


async def test_an_index_naming_a_chunk_found_bad_meanwhile_is_not_committed(
    setup: Setup,
) -> None:
    put(setup.datastore, 1, 2)
    health = await setup.health()
    backup = transaction(setup, health)
    assert await backup.missing_chunks([digest(1), digest(2)]) == []
    health.mark([digest(2)], since=health.generation)  # a verify beside the backup
    with pytest.raises(ChunkMissing, match="damaged in the datastore while this backup ran"):
        await backup.accept_index(index_of(1, 2))
    # An index whose every chunk a check finds present is still refused when one is missing.
    chunk_file(setup.root, 1).unlink()
    with pytest.raises(ChunkMissing):
        await transaction(setup, health).accept_index(index_of(1))


# --- what is recorded: verified, damaged, healed; the dashboard -------------------------------


async def test_a_verify_report_marks_points_and_chunks_and_a_repair_heals_them(
    setup: Setup,
) -> None:
    await setup.commit("rp-1", 1, 2)
    await setup.commit("rp-2", 2, 3)
    await setup.commit("rp-3", 4)
    flip(chunk_file(setup.root, 2))
    health = await setup.health()
    # Only rp-1 is verified; rp-2 needs the same chunk and is found by its index.
    report = verify_recovery_points(setup.datastore, ["rp-1", "rp-3"], health=health)
    await setup.integrity.record_verify(VAULT, report, "job-v")

    marks = await setup.catalog.verifications(["rp-1", "rp-2", "rp-3"])
    assert marks["rp-1"].state == Verification.DAMAGED
    assert marks["rp-1"].verified_at == setup.clock.now()
    assert marks["rp-2"].state == Verification.DAMAGED
    assert marks["rp-2"].verified_at is None  # no verify read it
    assert marks["rp-3"].state == Verification.VERIFIED
    assert health.is_bad(digest(2))
    board = await Vaults(setup.catalog, setup.datastores, setup.clock, CHUNK).dashboard(VAULT, 0)
    assert (board.integrity.verified, board.integrity.damaged, board.integrity.healed) == (1, 2, 0)
    assert (board.integrity.never_verified, board.integrity.bad_chunks) == (0, 1)

    assert sorted(await setup.integrity.repaired(VAULT, [digest(2)], by="job-b")) == [
        "rp-1",
        "rp-2",
    ]
    assert await setup.catalog.healed_points(VAULT) == ["rp-1", "rp-2"]
    board = await Vaults(setup.catalog, setup.datastores, setup.clock, CHUNK).dashboard(VAULT, 0)
    assert (board.integrity.healed, board.integrity.damaged, board.integrity.bad_chunks) == (
        2,
        0,
        0,
    )


async def test_a_chunk_found_whole_again_is_no_longer_bad(setup: Setup) -> None:
    await setup.commit("rp-1", 1)
    health = await setup.health()
    await setup.integrity.found_bad(VAULT, {digest(1): "x"}, since=health.generation, by="r")
    report = verify_recovery_points(setup.datastore, ["rp-1"], health=health)
    assert report.whole_again == {digest(1)}
    await setup.integrity.record_verify(VAULT, report, "job-v")
    assert not health.is_bad(digest(1))
    assert await setup.catalog.bad_chunks(VAULT) == []
    marks = await setup.catalog.verifications(["rp-1"])
    assert marks["rp-1"].state == Verification.VERIFIED


# --- Verify jobs -----------------------------------------------------------------------------


@pytest.fixture
async def jobs(setup: Setup) -> AsyncIterator[JobManager]:
    async with JobManager(
        setup.catalog, AgentRegistry(setup.clock), setup.datastores, None, setup.clock,
        setup.pool, integrity=setup.integrity,
    ) as manager:  # fmt: skip
        yield manager


async def test_a_verify_job_records_each_point_and_fails_with_exit_7_on_damage(
    setup: Setup, jobs: JobManager
) -> None:
    verifier = Verifier(setup.catalog, setup.datastores, jobs, setup.integrity, setup.clock)
    await setup.commit("rp-1", 1, 2)
    await setup.commit("rp-2", 3)
    job = await verifier.verify(VAULT, wait=True)
    assert job.status == JobStatus.COMPLETED, job
    assert job.details["verification"]["recovery_points_verified"] == 2
    assert job.bytes_read == 3 * CHUNK

    chunk_file(setup.root, 3).unlink()
    job = await verifier.verify(VAULT, rp_id="rp-2", wait=True)
    assert (job.status, job.error_code) == (JobStatus.FAILED, "RecoveryPointsDamaged")
    assert "1 of 1 recovery points damaged (rp-2)" in job.error_message
    assert job.recovery_point_id == "rp-2"
    assert job.details["damaged"] == {"rp-2": "1 chunk missing or corrupt"}
    recorded = await setup.catalog.job(job.id)
    assert recorded.error_code == "RecoveryPointsDamaged"
    with pytest.raises(NotFound):
        await verifier.verify(VAULT, rp_id="rp-2", vm_id="vm-other")


async def test_verify_settings_schedule_new_healed_and_old_points(
    setup: Setup, jobs: JobManager
) -> None:
    verifier = Verifier(setup.catalog, setup.datastores, jobs, setup.integrity, setup.clock)
    await setup.commit("rp-old", 1, at=setup.clock.now() - 40 * 86400)
    await setup.commit("rp-new", 2)
    backup = JobRecord(
        "b1", Operation.BACKUP, JobStatus.COMPLETED, VAULT, "vm-1", setup.clock.now(),
        recovery_point_id="rp-new", trigger=Trigger.SCHEDULED,
    )  # fmt: skip

    async def verify_jobs() -> list[JobRecord]:
        for _ in range(200):
            if not any(j.operation is Operation.VERIFY for j in jobs.running_jobs()):
                break
            await asyncio.sleep(0.01)
        return [
            j
            for j in await setup.catalog.jobs(JobFilter(limit=1000))
            if j.operation is Operation.VERIFY
        ]

    await verifier.after_backup(backup)  # the vault asks for nothing: no job
    assert await verify_jobs() == []

    await Vaults(setup.catalog, setup.datastores, setup.clock, CHUNK).update(
        VAULT, 0, verify_new=True, reverify_days=30
    )
    await verifier.after_backup(backup)
    (after,) = await verify_jobs()
    assert (after.status, after.trigger, after.details["after_job"]) == (
        JobStatus.COMPLETED, Trigger.SCHEDULED, "b1",
    )  # fmt: skip
    marks = await setup.catalog.verifications(["rp-old", "rp-new"])
    assert set(marks) == {"rp-new"}

    # The daily maintenance: what was never verified, or not for 30 days.
    await verifier.reverify(VAULT)
    jobs_now = await verify_jobs()
    assert len(jobs_now) == 2
    assert set(await setup.catalog.verifications(["rp-old", "rp-new"])) == {"rp-old", "rp-new"}
    setup.clock.advance(31 * 86400)
    assert await setup.catalog.points_to_verify(VAULT, setup.clock.now() - 30 * 86400) == [
        "rp-old",
        "rp-new",
    ]

    # Healed points are verified after any backup, whatever the settings say.
    await Vaults(setup.catalog, setup.datastores, setup.clock, CHUNK).update(
        VAULT, 0, verify_new=False, reverify_days=0
    )
    health = await setup.health()
    await setup.integrity.found_bad(
        VAULT, {digest(1): MISSING}, since=health.generation, by="x",
        damage={"rp-old": []},
    )  # fmt: skip
    await setup.integrity.spread(VAULT, {digest(1): MISSING}, by="x")
    await setup.integrity.repaired(VAULT, [digest(1)], by="b2")
    assert await setup.catalog.healed_points(VAULT) == ["rp-old"]
    await verifier.after_backup(backup)
    assert len(await verify_jobs()) == 3
    assert (await setup.catalog.verifications(["rp-old"]))["rp-old"].state == (
        Verification.VERIFIED
    )


class SlowChunks:
    """A local store whose chunk reads each take a while: a verify to cancel midway."""

    def __init__(self, root: Path) -> None:
        self.inner = LocalDirectoryStore(root)

    @property
    def location(self) -> str:
        return self.inner.location

    def put(self, key: str, data: bytes, *, durable: bool = True) -> None:
        self.inner.put(key, data, durable=durable)

    def get(self, key: str) -> bytes:
        if key.startswith("chunks/"):
            time.sleep(0.02)
        return self.inner.get(key)

    def has(self, key: str) -> bool:
        return self.inner.has(key)

    def stat(self, key: str) -> ObjectInfo:
        return self.inner.stat(key)

    def delete(self, key: str, *, durable: bool = True) -> None:
        self.inner.delete(key, durable=durable)

    def sync(self) -> None:
        self.inner.sync()

    def list(self, prefix: str) -> Iterator[str]:
        return self.inner.list(prefix)


async def test_a_verify_job_is_cancelled_between_chunks_and_keeps_what_it_found(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    async for setup in make_setup(tmp_path, pool, SlowChunks):  # type: ignore[arg-type]
        async with JobManager(
            setup.catalog, AgentRegistry(setup.clock), setup.datastores, None, setup.clock,
            setup.pool, integrity=setup.integrity,
        ) as jobs:  # fmt: skip
            verifier = Verifier(setup.catalog, setup.datastores, jobs, setup.integrity, setup.clock)
            points = [
                await setup.commit(f"rp-{n}", *range(20 * n + 1, 20 * n + 21)) for n in range(20)
            ]
            job = await verifier.verify(VAULT)
            running = jobs.running(job.id)
            assert running is not None
            while "progress" not in job.details or job.details["progress"]["points_done"] < 2:
                running.changed.clear()
                await asyncio.wait_for(running.changed.wait(), 10)
            asked = time.monotonic()
            await jobs.cancel(job.id)
            await asyncio.wait_for(running.ended.wait(), 10)
            assert time.monotonic() - asked < 2.0  # between two chunks, not after all of them
            recorded = await setup.catalog.job(job.id)
            assert (recorded.status, recorded.error_code) == (JobStatus.CANCELLED, "JobCancelled")
            assert "what it found of the recovery points it had checked" in recorded.error_message
            verified = await setup.catalog.verifications(points)
            assert 2 <= len(verified) < len(points)
            assert {m.state for m in verified.values()} == {Verification.VERIFIED}
            assert recorded.details["verification"]["recovery_points_verified"] == len(verified)
