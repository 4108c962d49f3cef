"""The job layer's parts, each on its own: the vault queue's decisions (with a fake clock), how
an end maps to an outcome, the runner that records every job, the supervised dispatcher, the
backup transaction and the restore session against a real local datastore, and what a stop
leaves for the next start. Real SQLite catalogs and datastores in temporary directories."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controller.catalog import Catalog, JobRecord, PolicyRecord, VaultRecord
from controller.datastore import ChunkGuard, Datastore, LocalDirectoryStore
from controller.datastores import Datastores
from controller.jobs import DISPATCHER_TASK, JobManager
from controller.jobs.dispatcher import Dispatcher
from controller.jobs.outcome import Outcome, outcome_of
from controller.jobs.queue import Decision, Expired, VaultQueue
from controller.jobs.restore import RestoreSession
from controller.jobs.runner import JobRunner, RunningJob
from controller.jobs.transaction import BackedUpDisk, BackupTransaction
from controller.registry import AgentRegistry
from shared.backoff import Backoff
from shared.blob import Compression
from shared.clock import ManualClock
from shared.digest import ZERO_DIGEST, chunk_digest
from shared.errors import (
    ChunkMissing,
    Conflict,
    InvalidArgument,
    JobCancelled,
    NotFound,
    OperationInProgress,
    PermissionDenied,
    UserErrorFsFreezeFailed,
)
from shared.index import DiskIndex
from shared.manifest import ManifestDisk, RecoveryPointManifest
from shared.model import Consistency, JobStatus, Operation
from shared.policy import default_policy
from shared.supervision import Policy, Supervisor

pytestmark = pytest.mark.timeout(30)

CHUNK = 4096

DEFAULT_POLICY = PolicyRecord("default", "DefaultPolicy", default_policy().to_dict(), 0.0, 0.0)


# --- the vault queue: pure decisions -----------------------------------------------------------


@dataclass(eq=False)
class Queued:
    vm_id: str
    deadline: float


def online(*vms: str) -> set[str]:
    return set(vms)


def test_the_queue_starts_in_order_up_to_the_limit_and_skips_offline_vms() -> None:
    queue: VaultQueue[Queued] = VaultQueue(limit=2)
    a, b, c, d = (Queued(vm, 100.0) for vm in "abcd")
    for backup in (a, b, c, d):
        queue.add(backup)

    first = queue.take(10.0, online("b", "c", "d").__contains__)
    # a's agent is offline: it does not hold up the ones behind it, and keeps its place.
    assert first == Decision(start=(b, c), expired=(), next_deadline=100.0)
    assert (queue.running, queue.waiting) == (2, (a, d))
    # No free slot: nothing starts, however many agents are online.
    assert queue.take(11.0, online("a", "b", "c", "d").__contains__).start == ()

    queue.ended()
    assert queue.take(12.0, online("a", "d").__contains__).start == (a,)
    queue.limit = 4  # raised: what waited starts at the next decision
    assert queue.take(13.0, online("d").__contains__) == Decision(start=(d,))
    assert (queue.running, len(queue)) == (3, 0)


def test_the_queue_expires_what_waited_past_its_window_and_says_why() -> None:
    queue: VaultQueue[Queued] = VaultQueue(limit=1)
    busy, offline, later = Queued("busy", 50.0), Queued("gone", 60.0), Queued("late", 90.0)
    queue.running = 1  # the vault's one slot is taken
    for backup in (busy, offline, later):
        queue.add(backup)

    assert queue.take(49.0, online("busy", "late").__contains__) == Decision(next_deadline=50.0)
    decision = queue.take(60.0, online("busy", "late").__contains__)
    # A closed window wins over everything: online with no slot, and offline, both expire.
    assert decision == Decision(
        start=(), expired=(Expired(busy, True), Expired(offline, False)), next_deadline=90.0
    )
    assert queue.waiting == (later,)
    queue.ended()
    assert queue.take(90.0, online("late").__contains__).expired == (Expired(later, True),)
    assert queue.take(91.0, online().__contains__) == Decision()


def test_a_queued_backup_is_withdrawn_or_taken_never_both() -> None:
    queue: VaultQueue[Queued] = VaultQueue(limit=1)
    taken, withdrawn = Queued("a", 100.0), Queued("b", 100.0)
    queue.add(taken)
    queue.add(withdrawn)
    assert queue.withdraw(withdrawn)
    assert not queue.withdraw(withdrawn)
    assert queue.take(1.0, online("a", "b").__contains__).start == (taken,)
    assert not queue.withdraw(taken)  # started: a cancel must go to the agent now


# --- outcomes --------------------------------------------------------------------------------


def record(operation: Operation = Operation.BACKUP, **details: object) -> JobRecord:
    return JobRecord(
        "job-1", operation, JobStatus.IN_PROGRESS, "v", "vm", 0.0, details=dict(details)
    )


def test_every_way_a_job_ends_has_one_outcome() -> None:
    freeze = UserErrorFsFreezeFailed(mount="/", detail="busy")
    assert outcome_of(record(), None, cancel_requested=False) == Outcome(JobStatus.COMPLETED)
    assert outcome_of(record(warnings=["slow"]), None, cancel_requested=False).status == (
        JobStatus.COMPLETED_WITH_WARNINGS
    )
    assert outcome_of(record(), freeze, cancel_requested=False) == Outcome(
        JobStatus.FAILED, freeze.code, freeze.message
    )
    # After a cancel, however the work stopped, it was the cancel.
    for error in (JobCancelled(job_id="job-1"), freeze, asyncio.CancelledError()):
        ended = outcome_of(record(), error, cancel_requested=True)
        assert (ended.status, ended.error_code) == (JobStatus.CANCELLED, "JobCancelled")
        assert "no recovery point was created" in ended.error_message
    collect = outcome_of(
        record(Operation.GARBAGE_COLLECTION), asyncio.CancelledError(), cancel_requested=True
    )
    assert "left for the next collection" in collect.error_message
    # Cancelled with nobody asking: the controller is stopping.
    stopped = outcome_of(record(), asyncio.CancelledError(), cancel_requested=False)
    assert (stopped.status, stopped.error_code) == (JobStatus.FAILED, "ControllerRestarted")
    bug = outcome_of(record(), KeyError("slot"), cancel_requested=False)
    assert (bug.status, bug.error_code) == (JobStatus.FAILED, "InternalError")
    assert "KeyError('slot')" in bug.error_message
    # A bug after a cancel is still a bug.
    assert outcome_of(record(), KeyError("x"), cancel_requested=True).status == JobStatus.FAILED


# --- the runner: one place that records every job ------------------------------------------------


@pytest.fixture
async def catalog(tmp_path: Path) -> AsyncIterator[Catalog]:
    async with Catalog(tmp_path / "catalog.sqlite") as opened:
        await opened.create_vault(VaultRecord("default", "local", CHUNK, 0.0), DEFAULT_POLICY)
        yield opened


async def test_the_runner_records_each_end_and_no_job_takes_another_down(
    catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock(1_000.0)
    follow_ups: list[str] = []

    async def fails() -> None:
        raise UserErrorFsFreezeFailed(mount="/data", detail="EBUSY")

    async def bug() -> None:
        raise RuntimeError("a bug")

    async def works() -> None:
        clock.advance(5)

    async def broken_follow_up() -> None:
        raise RuntimeError("follow-up bug")

    async def noted() -> None:
        follow_ups.append("ran")

    async with JobRunner(catalog, None, clock) as runner:
        jobs = {}
        for name, work in (("fails", fails), ("bug", bug), ("works", works)):
            job = runner.new_record(Operation.DISCOVERY, "default", "")
            running = RunningJob(job, after_end=[broken_follow_up, noted])
            await runner.admit(running)
            assert (await catalog.job(job.id)).status == JobStatus.IN_PROGRESS
            runner.start(running, work)
            jobs[name] = running
        for running in jobs.values():
            await asyncio.wait_for(running.ended.wait(), 5)
            assert runner.get(running.id) is None

    failed, internal, done = [await catalog.job(jobs[n].id) for n in ("fails", "bug", "works")]
    assert (failed.status, failed.error_code) == (JobStatus.FAILED, "UserErrorFsFreezeFailed")
    assert (internal.status, internal.error_code) == (JobStatus.FAILED, "InternalError")
    assert (done.status, done.ended_at) == (JobStatus.COMPLETED, 1_005.0)
    # The unexpected ones are logged with their traceback; the typed failure is not a bug.
    logged = [r for r in caplog.records if r.exc_info]
    assert sorted(str(r.exc_info[1]) for r in logged if r.exc_info) == [
        "a bug",
        "follow-up bug",
        "follow-up bug",
        "follow-up bug",
    ]
    assert follow_ups == ["ran"] * 3  # one follow-up failing does not stop the next


async def test_one_job_per_vm_and_a_stop_leaves_cut_jobs_for_the_next_start(
    catalog: Catalog,
) -> None:
    clock = ManualClock(1_000.0)
    release = asyncio.Event()

    async def waits() -> None:
        await release.wait()
        raise JobCancelled(job_id="x")  # e.g. the agent went away as the controller stopped

    async with JobRunner(catalog, None, clock) as runner:
        first = RunningJob(runner.new_record(Operation.RESTORE, "default", "vm-1"), exclusive=True)
        await runner.admit(first)
        second = RunningJob(runner.new_record(Operation.BACKUP, "default", "vm-1"), exclusive=True)
        with pytest.raises(OperationInProgress, match=first.id):
            await runner.admit(second)
        with pytest.raises(NotFound):  # refused before it was recorded
            await catalog.job(second.id)
        # A job that does not need the VM alone (registration, prune) runs beside it.
        beside = RunningJob(runner.new_record(Operation.PRUNE, "default", "vm-1"))
        await runner.admit(beside)
        assert runner.of_vm("vm-1") == first.id
        runner.start(first, waits)
        runner.start(beside, release.wait)
        runner.stopping()
        release.set()

    cut = await catalog.job(first.id)
    assert (cut.status, cut.ended_at) == (JobStatus.IN_PROGRESS, None)  # the next start says
    assert (await catalog.job(beside.id)).status == JobStatus.COMPLETED


# --- the dispatcher, supervised ---------------------------------------------------------------


async def test_a_failing_dispatcher_is_restarted_and_then_dispatches(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started: list[Queued] = []
    calls = 0

    def flaky_online(vm_id: str) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("registry hiccup")
        return True

    dispatcher: Dispatcher[Queued] = Dispatcher(
        ManualClock(0.0), flaky_online, started.append, lambda backup, online: None
    )
    backup = Queued("vm-1", 100.0)
    dispatcher.enqueue("v", backup, limit=1)
    async with Supervisor("test", backoff=Backoff(first=0.01, cap=0.01)) as supervisor:
        supervisor.start("dispatcher", dispatcher.run, policy=Policy.RESTART)
        for _ in range(200):
            if started:
                break
            await asyncio.sleep(0.01)
    assert started == [backup]
    assert any("registry hiccup" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert supervisor.restarts == {"dispatcher": 1}


# --- the backup transaction, against a real local datastore ------------------------------------


def raw(seed: int) -> bytes:
    return bytes([seed]) * CHUNK


@dataclass
class Store:
    datastore: Datastore
    guard: ChunkGuard = field(default_factory=ChunkGuard)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(Datastore.create(LocalDirectoryStore(tmp_path / "store"), CHUNK))


@pytest.fixture
def pool() -> AsyncIterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as executor:
        yield executor


def transaction(
    store: Store, catalog: Catalog, pool: ThreadPoolExecutor, **more: object
) -> BackupTransaction:
    # The datastore checks of a vault whose VMs are one trust domain, unless a test says
    # otherwise (`shared_dedup=False`: per VM, the default of a vault).
    more.setdefault("shared_dedup", True)
    return BackupTransaction(
        job_id="job-1",
        rp_id="rp-1",
        datastore=store.datastore,
        guard=store.guard,
        catalog=catalog,
        pool=pool,
        **more,  # type: ignore[arg-type]
    )


async def test_a_backup_transaction_commits_manifest_then_catalog_row(
    store: Store, catalog: Catalog, pool: ThreadPoolExecutor
) -> None:
    stored: list[int] = []
    backup = transaction(store, catalog, pool, on_stored=stored.append)
    old, new = chunk_digest(raw(1)), chunk_digest(raw(2))
    store.datastore.put_chunk(old, raw(1), Compression.NONE, CHUNK)  # from an earlier backup

    assert await backup.missing_chunks([old, new]) == [new]
    # Held before the datastore was asked: a collection running now leaves both alone.
    assert store.guard.is_held(old)
    assert store.guard.is_held(new)
    assert await backup.store_chunk(new, raw(2), Compression.NONE, CHUNK) > 0
    assert stored
    assert backup.bytes_stored == stored[0]

    index = DiskIndex("root", 3 * CHUNK, CHUNK, old + ZERO_DIGEST + new)
    await backup.accept_index(index)
    manifest = backup.manifest(
        vm_id="vm-1",
        vault="default",
        created_at=datetime.fromtimestamp(1_000, UTC),
        consistency=Consistency.APPLICATION,
        disks=[BackedUpDisk("root", Consistency.FILE_SYSTEM, "reflink")],
        expected=["root"],
        vm={"name": "web-1"},
    )
    assert manifest.consistency == Consistency.FILE_SYSTEM  # never above its weakest disk
    assert list(store.datastore.list_recovery_point_ids()) == []  # nothing visible yet

    row = await backup.commit(manifest)

    assert list(store.datastore.list_recovery_point_ids()) == ["rp-1"]
    assert await catalog.recovery_point("rp-1") == row
    assert (row.consistency, row.data_bytes, row.bytes_stored) == (
        Consistency.FILE_SYSTEM,
        2 * CHUNK,  # the zero chunk holds no data
        backup.bytes_stored,
    )
    assert row.disks[0].consistency == Consistency.FILE_SYSTEM
    backup.release()
    assert not store.guard.is_held(new)


async def test_a_backup_transaction_trusts_no_index_it_cannot_back(
    store: Store, catalog: Catalog, pool: ThreadPoolExecutor
) -> None:
    backup = transaction(store, catalog, pool)
    never_sent = chunk_digest(raw(9))
    with pytest.raises(ChunkMissing, match=never_sent.hex()):
        await backup.accept_index(DiskIndex("root", CHUNK, CHUNK, never_sent))
    assert store.guard.is_held(never_sent)  # held before it was looked for
    with pytest.raises(InvalidArgument, match="chunk size"):
        await backup.accept_index(DiskIndex("root", 2 * CHUNK, 2 * CHUNK, never_sent))

    # A chunk another job stored is found when the index arrives: the agent need not send it.
    store.datastore.put_chunk(never_sent, raw(9), Compression.NONE, CHUNK)
    await backup.accept_index(DiskIndex("root", CHUNK, CHUNK, never_sent))

    def manifest(disks: list[str], expected: list[str]) -> RecoveryPointManifest:
        return backup.manifest(
            vm_id="vm-1", vault="default", created_at=datetime.now(UTC),
            consistency=Consistency.CRASH, disks=[BackedUpDisk(d) for d in disks],
            expected=expected, vm={},
        )  # fmt: skip

    with pytest.raises(Conflict, match="'data' without its index"):
        manifest(["root", "data"], ["root", "data"])
    with pytest.raises(Conflict, match="not the"):
        manifest(["root"], ["root", "data"])
    assert manifest(["root"], ["root"]).disks[0].name == "root"


async def test_a_backup_transaction_of_one_vm_answers_only_for_what_it_stored(
    store: Store, catalog: Catalog, pool: ThreadPoolExecutor
) -> None:
    """Per VM (a vault's default): another VM's chunk is "missing" and may not be named by
    an index until this backup uploads it (issue 14)."""
    others = chunk_digest(raw(7))
    store.datastore.put_chunk(others, raw(7), Compression.NONE, CHUNK)
    backup = transaction(store, catalog, pool, shared_dedup=False)
    assert await backup.missing_chunks([others]) == [others]
    with pytest.raises(ChunkMissing, match="did not upload in this backup"):
        await backup.accept_index(DiskIndex("root", CHUNK, CHUNK, others))
    await backup.store_chunk(others, raw(7), Compression.NONE, CHUNK)
    assert await backup.missing_chunks([others]) == []
    await backup.accept_index(DiskIndex("root", CHUNK, CHUNK, others))


async def test_an_incremental_reads_only_its_base_and_relies_on_its_chunks(
    store: Store, catalog: Catalog, pool: ThreadPoolExecutor
) -> None:
    base_chunk = chunk_digest(raw(1))
    store.datastore.put_chunk(base_chunk, raw(1), Compression.NONE, CHUNK)
    first = transaction(store, catalog, pool)
    await first.accept_index(DiskIndex("root", CHUNK, CHUNK, base_chunk))
    base = await first.commit(
        first.manifest(
            vm_id="vm-1", vault="default", created_at=datetime.now(UTC),
            consistency=Consistency.CRASH, disks=[BackedUpDisk("root")], expected=["root"],
            vm={},
        )
    )  # fmt: skip
    first.release()

    second = BackupTransaction(
        job_id="job-2", rp_id="rp-2", datastore=store.datastore, guard=store.guard,
        catalog=catalog, pool=pool, previous=base, shared_dedup=True,
    )  # fmt: skip
    with pytest.raises(PermissionDenied, match="not the base"):
        await second.base_index("rp-other", "root")
    with pytest.raises(NotFound):
        await second.base_index(base.id, "data")
    index = await second.base_index(base.id, "root")
    assert index.referenced() == {base_chunk}
    # The base's chunks are known and held: the agent's unchanged chunks need no question.
    assert store.guard.is_held(base_chunk)
    assert await second.missing_chunks([base_chunk]) == []


# --- the restore session ---------------------------------------------------------------------


async def test_a_restore_session_reads_one_disk_and_only_its_chunks(
    store: Store, catalog: Catalog, pool: ThreadPoolExecutor
) -> None:
    chunk = chunk_digest(raw(3))
    store.datastore.put_chunk(chunk, raw(3), Compression.NONE, CHUNK)
    backup = transaction(store, catalog, pool)
    await backup.accept_index(DiskIndex("root", CHUNK, CHUNK, chunk))
    rp = await backup.commit(
        backup.manifest(
            vm_id="vm-1", vault="default", created_at=datetime.now(UTC),
            consistency=Consistency.CRASH, disks=[BackedUpDisk("root")], expected=["root"],
            vm={},
        )
    )  # fmt: skip
    backup.release()

    session = await RestoreSession.open("job-r", rp, "root", store.datastore, store.guard, pool)
    assert store.guard.is_held(chunk)
    assert session.index_for(rp.id, "root").referenced() == {chunk}
    with pytest.raises(PermissionDenied):
        session.index_for(rp.id, "data")
    session.check_allowed([chunk])
    with pytest.raises(PermissionDenied, match="not part of the restored disk"):
        session.check_allowed([chunk_digest(raw(4))])
    assert (await session.read_chunk(chunk))[1] == CHUNK
    session.release()
    assert not store.guard.is_held(chunk)

    # Deleted (pruned) before the restore could hold its chunks: refused, nothing held.
    store.datastore.delete_recovery_point(rp.id)
    with pytest.raises(NotFound):
        await RestoreSession.open("job-s", rp, "root", store.datastore, store.guard, pool)
    assert not store.guard.is_held(chunk)


# --- what a stop leaves for the next start -----------------------------------------------------


async def test_a_backup_committed_just_before_a_stop_is_recorded_and_others_fail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock(1_000.0)
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        await catalog.create_vault(VaultRecord("default", "local", CHUNK, 0.0), DEFAULT_POLICY)
        datastores = Datastores(catalog, tmp_path / "datastores")
        store = await datastores.get("default")
        # A backup whose manifest reached the datastore, the controller stopping before the
        # catalog row; and one that had not committed.
        data = b"x" * CHUNK
        store.put_chunk(chunk_digest(data), data, 1, CHUNK)
        index = DiskIndex("root", CHUNK, CHUNK, chunk_digest(data))
        sha = store.put_index("rp-done", index)
        store.put_manifest(
            RecoveryPointManifest(
                id="rp-done",
                vm_id="vm-1",
                vault="default",
                job_id="job-done",
                created_at=datetime.fromtimestamp(990, UTC),
                consistency="crash",
                disks=(ManifestDisk.of(index, sha),),
            )
        )
        for job_id, rp_id in (("job-done", "rp-done"), ("job-lost", "rp-never")):
            await catalog.insert_job(
                JobRecord(
                    id=job_id, operation=Operation.BACKUP, status=JobStatus.IN_PROGRESS,
                    vault="default", vm_id="vm-1", started_at=980.0, bytes_stored=7,
                    pending_recovery_point_id=rp_id,
                )
            )  # fmt: skip

        with ThreadPoolExecutor(2) as pool, caplog.at_level(logging.WARNING):
            async with JobManager(catalog, AgentRegistry(), datastores, None, clock, pool) as jobs:
                assert [job.id for job in jobs.interrupted] == ["job-lost"]

        done, lost = await catalog.job("job-done"), await catalog.job("job-lost")
        assert (done.status, done.recovery_point_id) == ("Completed", "rp-done")
        assert (lost.status, lost.error_code) == ("Failed", "ControllerRestarted")
        assert lost.recovery_point_id == ""  # never committed: it names none
        assert [rp.id for rp in await catalog.recovery_points("vm-1")] == ["rp-done"]
        assert (await catalog.vault("default")).stored_bytes == 14  # both uploaded their bytes


async def test_a_job_cancelled_before_its_work_began_is_still_recorded(catalog: Catalog) -> None:
    ran = False

    async def work() -> None:
        nonlocal ran
        ran = True

    async with JobRunner(catalog, None, ManualClock(1_000.0)) as runner:
        running = RunningJob(runner.new_record(Operation.PRUNE, "default", ""), cancellable=True)
        await runner.admit(running)
        runner.start(running, work)
        running.cancel_requested = True
        assert running.task is not None
        running.task.cancel()  # before the task's first step
        await asyncio.wait_for(running.ended.wait(), 5)
    assert not ran
    ended = await catalog.job(running.id)
    assert (ended.status, ended.error_code) == (JobStatus.CANCELLED, "JobCancelled")


async def test_the_dispatcher_runs_under_the_controllers_supervisor_when_given_one(
    tmp_path: Path, catalog: Catalog
) -> None:
    datastores = Datastores(catalog, tmp_path / "datastores")
    with ThreadPoolExecutor(1) as pool:
        async with Supervisor("controller") as supervisor:
            jobs = JobManager(
                catalog, AgentRegistry(), datastores, None, ManualClock(0.0), pool,
                supervisor=supervisor,
            )  # fmt: skip
            async with jobs:
                task = supervisor._tasks[DISPATCHER_TASK]
                assert not task.done()
            assert task.done()  # the job manager stops it on its way out
            assert not supervisor.failed.is_set()
