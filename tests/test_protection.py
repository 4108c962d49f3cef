"""The vault workflow in one process: discovery, registration, protection, scheduled and queued
backups, cancel and pruning.

Real parts throughout: a SQLite catalog and local datastores in a temporary directory, the job
manager with its dispatcher, the agent registry with real sessions (connecting one makes its VM
online) and a manual clock. The test plays each agent by reading its session's outbox and
answering with `CommandResult`s. Successful backups (which need the agent's indexes) are left
to the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, time
from pathlib import Path

import pytest

from controller.catalog import (
    Catalog,
    JobFilter,
    JobRecord,
    RecoveryPointDiskRecord,
    RecoveryPointRecord,
)
from controller.datastore import LocalDirectoryStore, ObjectStore
from controller.datastores import Datastores
from controller.jobs import JobManager, RunningBackup
from controller.jobs.backup import RECONNECT_GRACE_SECONDS
from controller.protection import Protection
from controller.pruning import Pruner
from controller.registry import AgentRegistry, AgentSession
from controller.vaults import Vaults
from shared.blob import Compression
from shared.clock import ManualClock
from shared.digest import chunk_digest
from shared.errors import (
    AgentUnreachable,
    AlreadyRegistered,
    AmbiguousVmName,
    Conflict,
    InvalidArgument,
    ItemNotRegistered,
    ItemStateConflict,
    NotFound,
    OperationInProgress,
    PolicyInUse,
    RegionMismatch,
    VaultNotEmpty,
    VmNotFound,
)
from shared.index import DiskIndex
from shared.manifest import ManifestDisk, RecoveryPointManifest
from shared.model import ItemState, JobStatus, Operation, Trigger
from shared.policy import DailyRule, Frequency, Policy, Retention, Schedule
from shared.rpc import agent_pb2, common_pb2
from shared.supervision import Supervisor

pytestmark = pytest.mark.timeout(30)

CHUNK = 4096
HOUR = 3600.0
DAY = 86400.0
WINDOW = 2 * HOUR  # the default policy's window


def ts(*fields: int) -> float:
    return datetime(*fields, tzinfo=UTC).timestamp()  # type: ignore[arg-type, misc]


MONDAY_NOON = ts(2025, 3, 3, 12)
"""The manual clock's start: the default policy's next slot is Tuesday 02:00 UTC."""

EU, US = "eu", "us"
SHOP_WEB, BLOG_WEB, DB = "vm-shop-web", "vm-blog-web", "vm-db"
VMS = {
    # vm id: (name, service, region)
    SHOP_WEB: ("web-1", "shop", "eu-west"),
    BLOG_WEB: ("web-1", "blog", "eu-west"),
    DB: ("db-1", "shop", "us-east"),
}


@dataclass
class Controller:
    """The controller's in-process parts, wired as `controller.server` wires them."""

    clock: ManualClock
    catalog: Catalog
    datastores: Datastores
    registry: AgentRegistry
    jobs: JobManager
    vaults: Vaults
    pruner: Pruner
    protection: Protection
    sessions: dict[str, AgentSession] = field(default_factory=dict)

    async def create_vault(self, name: str, region: str, max_concurrent: int = 0) -> None:
        await self.vaults.create(name, region, max_concurrent)
        self.protection.vault_created(name)

    async def enrol(self, vm_id: str, name: str, service: str, region: str) -> None:
        """What an agent's first hello leaves in the catalog."""
        await self.catalog.upsert_agent(
            vm_id=vm_id,
            name=name,
            service=service,
            region=region,
            hostname=f"{name}.{service}.lab",
            agent_version="test",
            disks=[],
            now=self.clock.now(),
        )

    async def enrol_all(self, vms: dict[str, tuple[str, str, str]] = VMS) -> None:
        for vm_id, (name, service, region) in vms.items():
            await self.enrol(vm_id, name, service, region)

    async def connect(self, vm_id: str) -> AgentSession:
        [session] = await self.connect_together(vm_id)
        return session

    async def connect_together(self, *vm_ids: str) -> list[AgentSession]:
        """Connect the VMs' agents at one moment (no await between them)."""
        sessions = [await self._session(vm_id) for vm_id in vm_ids]
        for session in sessions:
            self.registry.connect(session)
            self.sessions[session.vm_id] = session
        return sessions

    async def _session(self, vm_id: str) -> AgentSession:
        [agent] = [a for a in await self.catalog.agents() if a.vm_id == vm_id]
        hello = agent_pb2.Hello(
            vm_id=vm_id,
            name=agent.name,
            service=agent.service,
            region=agent.region,
            hostname=agent.hostname,
            agent_version="test",
            disks=[agent_pb2.DiskInfo(name="root", path="/dev/vda", size_bytes=CHUNK)],
        )
        return AgentSession(hello=hello, connected_at=self.clock.now())

    def disconnect(self, vm_id: str) -> None:
        self.registry.disconnect(self.sessions.pop(vm_id))

    async def item_policy(self, vm_id: str) -> str | None:
        item = await self.catalog.item(vm_id)
        assert item is not None
        return item.policy

    async def protected(self, vault: str, vm_id: str, policy: str = "DefaultPolicy") -> None:
        """Registered (its agent online for that) and protected; the agent stays online."""
        if vm_id not in self.sessions:
            await self.connect(vm_id)
        [registered] = await self.protection.register(vault, [vm_id])
        assert registered.status == JobStatus.COMPLETED, registered.error_message
        [configured] = await self.protection.protect(vault, [vm_id], policy)
        assert configured.status == JobStatus.COMPLETED, configured.error_message

    async def item_state(self, vm_id: str) -> str | None:
        item = await self.catalog.item(vm_id)
        return None if item is None else item.state

    async def backups(self, vm_id: str = "") -> list[JobRecord]:
        return await self.catalog.jobs(JobFilter(operations=[Operation.BACKUP], vm_id=vm_id))

    async def ended(self, job_id: str) -> JobRecord:
        """The job's record once it has ended."""

        async def done() -> bool:
            return JobStatus((await self.catalog.job(job_id)).status).ended

        await until(done, f"job {job_id} to end")
        return await self.catalog.job(job_id)


@contextlib.asynccontextmanager
async def controller(
    root: Path,
    clock: ManualClock,
    backend: Callable[[Path], ObjectStore] = LocalDirectoryStore,
) -> AsyncIterator[Controller]:
    async with contextlib.AsyncExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(4))
        catalog = await stack.enter_async_context(Catalog(root / "catalog.sqlite"))
        datastores = Datastores(catalog, root / "datastores", backend=backend)
        registry = AgentRegistry(clock)
        jobs = await stack.enter_async_context(
            JobManager(catalog, registry, datastores, None, clock, pool)
        )
        stack.callback(registry.close_all)
        stack.callback(jobs.stopping)  # as controller.server stops
        vaults = Vaults(catalog, datastores, clock, CHUNK)
        pruner = Pruner(catalog, datastores, jobs, clock, gc_grace_seconds=HOUR)
        supervisor = await stack.enter_async_context(Supervisor("controller"))
        protection = await stack.enter_async_context(
            Protection(catalog, registry, jobs, vaults, pruner, clock, supervisor)
        )
        yield Controller(clock, catalog, datastores, registry, jobs, vaults, pruner, protection)


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll `check` until it holds (at most 5 s)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def command(session: AgentSession) -> agent_pb2.ControllerMessage:
    """The next message the controller sends this agent."""
    return await asyncio.wait_for(session.outbox.get(), 5.0)


async def settle() -> None:
    """Give the dispatcher and the jobs it started time to send what they would send."""
    await asyncio.sleep(0.2)


def failed(message: agent_pb2.ControllerMessage, code: str, text: str) -> agent_pb2.CommandResult:
    """The agent's answer: the command failed with `code`."""
    return agent_pb2.CommandResult(
        command_id=message.command_id,
        job_id=message.backup.job_id,
        ok=False,
        error=common_pb2.Error(code=code, message=text),
    )


async def store_recovery_point(
    env: Controller,
    vault: str,
    vm_id: str,
    rp_id: str,
    created_at: float,
    kept_by: tuple[str, ...] = (),
) -> None:
    """A committed recovery point of one 4 KiB disk: chunk, index, manifest, catalog row."""
    store = await env.datastores.get(vault)
    raw = rp_id.encode().ljust(CHUNK, b".")
    digest = chunk_digest(raw)
    store.put_chunk(digest, raw, Compression.NONE, CHUNK)
    index = DiskIndex("root", CHUNK, CHUNK, digest)
    sha = store.put_index(rp_id, index)
    store.put_manifest(
        RecoveryPointManifest(
            id=rp_id,
            vm_id=vm_id,
            vault=vault,
            job_id=f"job-{rp_id}",
            created_at=datetime.fromtimestamp(created_at, UTC),
            consistency="crash",
            disks=(ManifestDisk.of(index, sha),),
        )
    )
    await env.catalog.insert_recovery_point(
        RecoveryPointRecord(
            id=rp_id,
            vault=vault,
            vm_id=vm_id,
            job_id=f"job-{rp_id}",
            created_at=created_at,
            consistency="crash",
            bytes_stored=CHUNK,
            disks=(RecoveryPointDiskRecord("root", CHUNK, CHUNK, 1),),
            data_bytes=CHUNK,
            kept_by=kept_by,
        )
    )


async def manifest_exists(env: Controller, vault: str, rp_id: str) -> bool:
    store = await env.datastores.get(vault)
    return rp_id in set(store.list_recovery_point_ids())


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(MONDAY_NOON)


@pytest.fixture
async def env(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Controller]:
    async with controller(tmp_path, clock) as env:
        await env.create_vault(EU, "eu-west")
        await env.create_vault(US, "us-east")
        yield env


# --- step 1: discover -------------------------------------------------------------------------


async def test_discovery_offers_the_unregistered_vms_of_the_vault_region(env: Controller) -> None:
    nothing = await env.protection.discover(EU)
    assert (nothing.job.operation, nothing.job.status) == ("Discovery", "Completed")
    assert nothing.vms == []
    assert len(nothing.notes) == 1
    assert "no VM has enrolled yet" in nothing.notes[0]

    await env.enrol_all()
    await env.connect(SHOP_WEB)
    found = await env.protection.discover(EU)
    assert {(d.agent.vm_id, d.online) for d in found.vms} == {(SHOP_WEB, True), (BLOG_WEB, False)}
    assert found.notes == []
    assert found.job.details["discovered"] == [d.agent.vm_id for d in found.vms]
    assert [d.agent.vm_id for d in (await env.protection.discover(US)).vms] == [DB]

    # A region where no VM has enrolled.
    await env.create_vault("ap", "ap-south")
    elsewhere = await env.protection.discover("ap")
    assert elsewhere.vms == []
    assert "no enrolled VM is in region 'ap-south'" in elsewhere.notes[0]
    assert "'eu-west', 'us-east'" in elsewhere.notes[0]

    # A VM registered to one vault is offered by no other vault of its region.
    await env.create_vault("eu-2", "eu-west")
    await env.protection.register(EU, ["shop/web-1"])
    for vault in (EU, "eu-2"):
        assert [d.agent.vm_id for d in (await env.protection.discover(vault)).vms] == [BLOG_WEB]

    await env.connect(BLOG_WEB)
    await env.protection.register("eu-2", ["blog/web-1"])
    taken = await env.protection.discover(EU)
    assert taken.vms == []
    assert "every VM of region 'eu-west' is already registered" in taken.notes[0]


# --- step 2: register -------------------------------------------------------------------------


async def test_register_enforces_names_regions_one_vault_and_an_online_agent(
    env: Controller,
) -> None:
    await env.enrol_all()
    await env.connect(SHOP_WEB)

    with pytest.raises(AmbiguousVmName, match="services blog, shop"):
        await env.protection.register(EU, ["web-1"])
    with pytest.raises(VmNotFound):
        await env.protection.register(EU, ["web-9"])
    with pytest.raises(RegionMismatch, match="'us-east'"):
        await env.protection.register(US, ["shop/web-1"])
    assert await env.catalog.items() == []

    [job] = await env.protection.register(EU, ["shop/web-1"])
    assert (job.operation, job.status, job.vm_id) == ("Register", "Completed", SHOP_WEB)
    assert await env.item_state(SHOP_WEB) == ItemState.REGISTERED

    await env.create_vault("eu-2", "eu-west")
    with pytest.raises(AlreadyRegistered, match="vault 'eu'"):
        await env.protection.register("eu-2", [SHOP_WEB])

    # An offline VM: the Register job fails and leaves nothing registered.
    [offline] = await env.protection.register(EU, ["blog/web-1"])
    assert (offline.status, offline.error_code) == ("Failed", "UserErrorInvalidProtectionState")
    assert "not connected" in offline.error_message
    assert await env.catalog.item(BLOG_WEB) is None

    # Every VM of a call is checked before any is registered.
    await env.connect(BLOG_WEB)
    with pytest.raises(RegionMismatch):
        await env.protection.register(EU, ["blog/web-1", "db-1"])
    assert await env.catalog.item(BLOG_WEB) is None

    # Many VMs per call, one job each; a VM id is a name too.
    await env.create_vault("us-2", "us-east")
    await env.connect(DB)
    jobs = await env.protection.register(EU, [BLOG_WEB])
    jobs += await env.protection.register("us-2", ["db-1"])
    assert [(j.vm_id, j.status) for j in jobs] == [(BLOG_WEB, "Completed"), (DB, "Completed")]
    assert {i.vm_id: i.vault for i in await env.catalog.items()} == {
        SHOP_WEB: EU,
        BLOG_WEB: EU,
        DB: "us-2",
    }


# --- step 3: protect, and managing protection -------------------------------------------------


async def test_protection_lifecycle_protect_stop_resume_delete_unregister(
    env: Controller,
) -> None:
    await env.enrol_all()
    await env.connect(SHOP_WEB)
    protection = env.protection

    with pytest.raises(ItemNotRegistered):
        await protection.protect(EU, ["shop/web-1"], "DefaultPolicy")
    await protection.register(EU, ["shop/web-1"])
    with pytest.raises(ItemStateConflict, match="protect it first"):
        await protection.backup_now(EU, ["shop/web-1"], [])
    with pytest.raises(NotFound):
        await protection.protect(EU, ["shop/web-1"], "NoSuchPolicy")

    [job] = await protection.protect(EU, ["shop/web-1"], "DefaultPolicy")
    assert (job.operation, job.status) == ("ConfigureProtection", "Completed")
    item = await env.catalog.item(SHOP_WEB)
    assert item is not None
    assert (item.state, item.policy) == ("Protected (pending initial backup)", "DefaultPolicy")
    assert protection.next_backup(item) == ts(2025, 3, 4, 2)

    with pytest.raises(ItemStateConflict, match="stop its protection first"):
        await protection.unregister(EU, ["shop/web-1"])

    # Stop, retaining the data: no longer planned.
    await store_recovery_point(env, EU, SHOP_WEB, "rp-old", ts(2025, 3, 1, 2))
    [stop] = await protection.stop(EU, ["shop/web-1"], delete_data=False)
    assert (stop.operation, stop.status) == ("StopProtection", "Completed")
    item = await env.catalog.item(SHOP_WEB)
    assert item is not None
    assert (item.state, item.policy) == ("ProtectionStopped", "DefaultPolicy")
    assert protection.plan.next_of(SHOP_WEB) is None
    assert protection.next_backup(item) is None
    assert [rp.id for rp in await env.catalog.recovery_points(SHOP_WEB)] == ["rp-old"]
    with pytest.raises(ItemStateConflict, match="not protected"):
        await protection.stop(EU, ["shop/web-1"], delete_data=False)
    with pytest.raises(ItemStateConflict, match="delete its retained recovery points first"):
        await protection.unregister(EU, ["shop/web-1"])

    # Protect again only by resuming; with its retained point it is protected at once.
    with pytest.raises(ItemStateConflict, match="resume-protection"):
        await protection.protect(EU, ["shop/web-1"], "DefaultPolicy")
    [resumed] = await protection.protect(EU, ["shop/web-1"], "DefaultPolicy", resume=True)
    assert resumed.status == "Completed"
    assert await env.item_state(SHOP_WEB) == ItemState.PROTECTED
    assert protection.plan.next_of(SHOP_WEB) == ts(2025, 3, 4, 2)
    with pytest.raises(ItemStateConflict, match="only VMs whose protection was stopped"):
        await protection.protect(EU, ["shop/web-1"], "DefaultPolicy", resume=True)

    # Stop, deleting the data: back to Registered, its recovery points gone everywhere.
    await store_recovery_point(env, EU, SHOP_WEB, "rp-new", ts(2025, 3, 2, 2))
    stop_jobs = await protection.stop(EU, ["shop/web-1"], delete_data=True)
    assert [(j.operation, j.status) for j in stop_jobs] == [
        ("StopProtection", "Completed"),
        ("DeleteBackupData", "Completed"),
    ]
    assert sorted(stop_jobs[1].details["deleted_recovery_points"]) == ["rp-new", "rp-old"]
    assert await env.item_state(SHOP_WEB) == ItemState.REGISTERED
    assert await env.catalog.recovery_points(SHOP_WEB) == []
    assert not await manifest_exists(env, EU, "rp-old")
    assert not await manifest_exists(env, EU, "rp-new")
    assert protection.plan.next_of(SHOP_WEB) is None

    # Now it can be unregistered, and is offered again.
    [unregistered] = await protection.unregister(EU, ["shop/web-1"])
    assert (unregistered.operation, unregistered.status) == ("Unregister", "Completed")
    assert await env.catalog.item(SHOP_WEB) is None
    assert SHOP_WEB in [d.agent.vm_id for d in (await protection.discover(EU)).vms]


async def test_a_resumed_vm_keeps_its_own_policy_unless_another_is_named(env: Controller) -> None:
    """Resuming without a policy used to move a VM to DefaultPolicy, whose 30 daily points
    would prune what the VM's own weekly rule keeps."""
    await env.enrol_all()
    gold = Policy(
        "Gold",
        Schedule(Frequency.DAILY, (time(20, 0),)),
        Retention(daily=DailyRule(7)),
    )
    await env.vaults.create_policy(EU, gold)
    await env.protected(EU, SHOP_WEB, "Gold")
    protection = env.protection
    await protection.stop(EU, [SHOP_WEB], delete_data=False)
    # Stopped, it keeps the name to resume with; its points are retained, not pruned.
    await store_recovery_point(env, EU, SHOP_WEB, "rp-old", ts(2024, 1, 1, 20))
    await store_recovery_point(env, EU, SHOP_WEB, "rp-new", ts(2025, 3, 1, 20))
    assert await env.pruner.prune_vm(EU, SHOP_WEB) is None
    assert len(await env.catalog.recovery_points(SHOP_WEB)) == 2

    [resumed] = await protection.protect(EU, [SHOP_WEB], "", resume=True)
    assert resumed.details == {"policy": "Gold"}
    item = await env.catalog.item(SHOP_WEB)
    assert item is not None
    assert (item.state, item.policy) == (ItemState.PROTECTED, "Gold")
    assert protection.plan.next_of(SHOP_WEB) == ts(2025, 3, 3, 20)
    # Protecting it again without naming a policy does not move it either.
    with pytest.raises(InvalidArgument, match="already protected by policy 'Gold'"):
        await protection.protect(EU, [SHOP_WEB], "")
    # A VM not yet protected gets DefaultPolicy when none is named.
    await env.connect(BLOG_WEB)
    await protection.register(EU, [BLOG_WEB])
    await protection.protect(EU, [BLOG_WEB], "")
    assert await env.item_policy(BLOG_WEB) == "DefaultPolicy"

    # Named, another policy is taken, and the job says what it replaced.
    await protection.stop(EU, [SHOP_WEB], delete_data=False)
    [moved] = await protection.protect(EU, [SHOP_WEB], "DefaultPolicy", resume=True)
    assert moved.details == {"policy": "DefaultPolicy", "previous_policy": "Gold"}

    # A deleted policy is forgotten by the stopped VMs that kept it: they need one named.
    await protection.protect(EU, [SHOP_WEB], "Gold")
    await protection.stop(EU, [SHOP_WEB], delete_data=False)
    _, forgotten = await env.vaults.delete_policy(EU, "Gold")
    assert forgotten == [SHOP_WEB]
    assert await env.item_policy(SHOP_WEB) is None
    with pytest.raises(InvalidArgument, match="no policy to resume with"):
        await protection.protect(EU, [SHOP_WEB], "", resume=True)
    assert await env.item_state(SHOP_WEB) == ItemState.PROTECTION_STOPPED


async def test_a_retained_stopped_vm_can_have_its_data_deleted_later(env: Controller) -> None:
    await env.enrol_all()
    await env.protected(EU, SHOP_WEB)
    await store_recovery_point(env, EU, SHOP_WEB, "rp-1", ts(2025, 3, 2, 2))
    await env.protection.stop(EU, [SHOP_WEB], delete_data=False)

    jobs = await env.protection.stop(EU, [SHOP_WEB], delete_data=True)
    assert jobs[-1].operation == "DeleteBackupData"
    assert jobs[-1].details["deleted_recovery_points"] == ["rp-1"]
    assert await env.item_state(SHOP_WEB) == ItemState.REGISTERED


async def test_a_vault_is_deleted_only_when_it_holds_no_vm_and_no_recovery_point(
    env: Controller,
) -> None:
    await env.enrol_all()
    await env.connect(SHOP_WEB)
    await env.protection.register(EU, ["shop/web-1"])
    with pytest.raises(VaultNotEmpty, match="1 registered VMs"):
        await env.vaults.delete(EU, running_jobs=0)

    await env.protection.unregister(EU, ["shop/web-1"])
    await env.vaults.delete(EU, running_jobs=0)
    env.protection.vault_deleted(EU)
    assert [v.name for v in await env.catalog.vaults()] == [US]
    assert not env.datastores.path(EU).exists()
    with pytest.raises(NotFound):
        await env.protection.discover(EU)

    # Recovery points outlive their VM's registration (e.g. a restored catalog): refused too.
    await store_recovery_point(env, US, DB, "rp-orphan", ts(2025, 3, 2, 2))
    with pytest.raises(VaultNotEmpty, match="1 recovery points"):
        await env.vaults.delete(US, running_jobs=0)


async def test_policies_in_use_are_kept_and_an_edit_replans_their_vms(env: Controller) -> None:
    await env.enrol_all()
    evening = Policy(
        "Evening", Schedule(Frequency.DAILY, (time(20, 0),)), Retention(daily=DailyRule(7))
    )
    await env.vaults.create_policy(EU, evening)
    await env.protected(EU, SHOP_WEB, "Evening")
    await env.protected(EU, BLOG_WEB)
    plan = env.protection.plan
    assert plan.next_of(SHOP_WEB) == ts(2025, 3, 3, 20)
    assert plan.next_of(BLOG_WEB) == ts(2025, 3, 4, 2)

    with pytest.raises(PolicyInUse, match=SHOP_WEB):
        await env.vaults.delete_policy(EU, "Evening")
    with pytest.raises(PolicyInUse, match=BLOG_WEB):
        await env.vaults.delete_policy(EU, "DefaultPolicy")
    # An existing policy's retention is not changed by protecting with it.
    with pytest.raises(Conflict, match="already has a policy named 'Evening'"):
        await env.protection.protect(EU, [BLOG_WEB], "", new_policy=evening)

    later = Policy(
        "Evening", Schedule(Frequency.DAILY, (time(22, 15),)), Retention(daily=DailyRule(7))
    )
    await env.vaults.update_policy(EU, later)
    assert plan.next_of(SHOP_WEB) == ts(2025, 3, 3, 22, 15)
    assert plan.next_of(BLOG_WEB) == ts(2025, 3, 4, 2)

    # Changing a VM's policy moves it to the other schedule.
    [change] = await env.protection.protect(EU, [BLOG_WEB], "Evening")
    assert change.details == {"policy": "Evening", "previous_policy": "DefaultPolicy"}
    assert plan.next_of(BLOG_WEB) == ts(2025, 3, 3, 22, 15)

    for vm in (SHOP_WEB, BLOG_WEB):
        await env.protection.stop(EU, [vm], delete_data=False)
    await env.vaults.delete_policy(EU, "Evening")
    assert [p.name for p in await env.catalog.policies(EU)] == ["DefaultPolicy"]


# --- scheduled backups --------------------------------------------------------------------------


async def test_a_restarted_controller_runs_missed_backups_once(
    tmp_path: Path, clock: ManualClock
) -> None:
    async with controller(tmp_path, clock) as env:
        await env.create_vault(EU, "eu-west")
        await env.enrol_all()
        await env.protected(EU, SHOP_WEB)

    # Down from Monday noon to Thursday 10:00: the 02:00 slots of Tue, Wed, Thu passed.
    clock.set(ts(2025, 3, 6, 10))
    async with controller(tmp_path, clock) as env:

        async def one_backup() -> bool:
            return len(await env.backups()) > 0

        await until(one_backup, "the missed backup")
        await settle()
        [job] = await env.backups()
        assert (job.vm_id, job.status, job.trigger) == (
            SHOP_WEB,
            "InProgress",
            "scheduled",
        )
        assert job.slot == ts(2025, 3, 6, 2)
        item = await env.catalog.item(SHOP_WEB)
        assert item is not None
        assert item.last_slot == ts(2025, 3, 6, 2)
        assert env.protection.plan.next_of(SHOP_WEB) == ts(2025, 3, 7, 2)
        # The agent is not connected yet: the backup waits a full window from now, no longer.
        running = env.jobs.running(job.id)
        assert isinstance(running, RunningBackup)
        assert running.deadline == clock.now() + WINDOW

        # Its agent comes back: the queued backup starts.
        session = await env.connect(SHOP_WEB)
        message = await command(session)
        assert message.backup.job_id == job.id
        session.resolve(failed(message, "UserErrorDiskReadFailed", "disk gone"))
        assert (await env.ended(job.id)).status == "Failed"


async def test_an_offline_vms_scheduled_backup_fails_when_its_window_closes(
    env: Controller, clock: ManualClock
) -> None:
    await env.enrol_all()
    await env.protected(EU, SHOP_WEB)
    env.disconnect(SHOP_WEB)
    slot = ts(2025, 3, 4, 2)

    clock.set(slot)
    env.protection.scheduler.changed()

    async def queued() -> bool:
        return len(await env.backups(SHOP_WEB)) == 1

    await until(queued, "the scheduled backup")
    [job] = await env.backups(SHOP_WEB)
    assert (job.status, job.trigger, job.details["phase"]) == (
        "InProgress",
        "scheduled",
        "Queued",
    )

    clock.set(slot + WINDOW - 60)
    env.jobs.kick()
    await settle()
    assert (await env.catalog.job(job.id)).status == "InProgress"

    clock.set(slot + WINDOW)
    env.jobs.kick()
    ended = await env.ended(job.id)
    assert (ended.status, ended.error_code) == ("Failed", "BackupWindowMissed")
    assert "its agent was not connected" in ended.error_message
    assert "2025-03-04 02:00 UTC" in ended.error_message

    item = await env.catalog.item(SHOP_WEB)
    assert item is not None
    assert (item.state, item.error_code, item.last_backup_status) == (
        "ProtectionError",
        "BackupWindowMissed",
        "Failed",
    )
    assert "its agent was not connected" in item.error_message
    # Still protected: tomorrow's slot is planned.
    assert env.protection.next_backup(item) == slot + DAY


async def test_a_new_schedule_starts_from_the_change_not_from_the_last_backup(
    env: Controller, clock: ManualClock
) -> None:
    # Both VMs ran (and failed) Tuesday 02:00. At 23:00 one moves to a 20:00 policy and the
    # other's policy is edited to 21:00: neither slot "was missed", so nothing runs at once.
    await env.enrol_all()
    evening = Policy(
        "Evening", Schedule(Frequency.DAILY, (time(20, 0),)), Retention(daily=DailyRule(7))
    )
    await env.vaults.create_policy(EU, evening)
    await env.protected(EU, SHOP_WEB)
    await env.protected(EU, BLOG_WEB)
    clock.set(ts(2025, 3, 4, 2))
    env.protection.scheduler.changed()
    for vm in (SHOP_WEB, BLOG_WEB):
        sent = await command(env.sessions[vm])
        env.sessions[vm].resolve(failed(sent, "UserErrorDiskReadFailed", "disk gone"))
        await env.ended(sent.backup.job_id)

    clock.set(ts(2025, 3, 4, 23))
    await env.protection.protect(EU, [SHOP_WEB], "Evening")
    await env.vaults.update_policy(
        EU,
        Policy(
            "DefaultPolicy", Schedule(Frequency.DAILY, (time(21, 0),)), Retention(DailyRule(30))
        ),
    )
    await settle()
    assert len(await env.backups()) == 2
    assert env.protection.plan.next_of(SHOP_WEB) == ts(2025, 3, 5, 20)
    assert env.protection.plan.next_of(BLOG_WEB) == ts(2025, 3, 5, 21)
    # A policy change leaves the last backup's failure on show.
    item = await env.catalog.item(SHOP_WEB)
    assert item is not None
    assert (item.state, item.policy, item.error_code) == (
        "ProtectionError",
        "Evening",
        "UserErrorDiskReadFailed",
    )

    clock.set(ts(2025, 3, 5, 20))
    env.protection.scheduler.changed()
    sent = await command(env.sessions[SHOP_WEB])
    [latest, *_] = await env.backups(SHOP_WEB)
    assert (latest.id, latest.slot) == (sent.backup.job_id, ts(2025, 3, 5, 20))


async def test_a_manual_backup_of_a_vm_whose_agent_is_long_gone_is_refused_at_once(
    env: Controller,
) -> None:
    await env.enrol_all()
    await env.protected(EU, SHOP_WEB)
    env.disconnect(SHOP_WEB)
    env.clock.advance(RECONNECT_GRACE_SECONDS + 1)
    with pytest.raises(AgentUnreachable):
        await env.protection.backup_now(EU, ["shop/web-1"], [])
    assert await env.backups() == []


async def test_a_manual_backup_of_a_vm_whose_agent_just_left_waits_for_it(
    env: Controller,
) -> None:
    await env.enrol_all()
    await env.protected(EU, SHOP_WEB)
    env.disconnect(SHOP_WEB)
    [queued] = await env.protection.backup_now(EU, ["shop/web-1"], [])
    assert (queued.status, queued.details["phase"]) == (JobStatus.IN_PROGRESS, "Queued")
    session = await env.connect(SHOP_WEB)
    sent = await asyncio.wait_for(session.outbox.get(), 10)
    assert sent.backup.job_id == queued.id


# --- the queue: concurrency limit and cancel --------------------------------------------------


async def test_the_vault_limit_queues_backups_and_cancel_ends_a_queued_one_unsent(
    tmp_path: Path, clock: ManualClock
) -> None:
    three = {
        "vm-a": ("app-a", "shop", "eu-west"),
        "vm-b": ("app-b", "shop", "eu-west"),
        "vm-c": ("app-c", "shop", "eu-west"),
    }
    async with controller(tmp_path, clock) as env:
        await env.create_vault(EU, "eu-west", max_concurrent=1)
        await env.enrol_all(three)
        for vm in three:
            await env.protected(EU, vm)
        a, b, c = (env.sessions[vm] for vm in three)

        [job_a] = await env.protection.backup_now(EU, ["vm-a"], [])
        [job_b] = await env.protection.backup_now(EU, ["vm-b"], [])
        [job_c] = await env.protection.backup_now(EU, ["shop/app-c"], [])
        sent_a = await command(a)
        assert sent_a.backup.job_id == job_a.id
        await settle()
        assert b.outbox.empty()
        assert c.outbox.empty()
        for job in (job_b, job_c):
            record = await env.catalog.job(job.id)
            assert (record.status, record.details["phase"]) == ("InProgress", "Queued")

        # A VM never has two backups at once.
        with pytest.raises(OperationInProgress):
            await env.protection.backup_now(EU, ["vm-a"], [])
        with pytest.raises(ItemStateConflict, match="running job"):
            await env.protection.stop(EU, ["vm-b"], delete_data=False)

        cancelled = await env.jobs.cancel(job_b.id)
        assert cancelled.status == "Cancelled"
        record = await env.catalog.job(job_b.id)
        assert (record.status, record.error_code) == ("Cancelled", "JobCancelled")
        with pytest.raises(Conflict, match="already ended"):
            await env.jobs.cancel(job_b.id)

        # The running backup fails: its slot goes to the next in the queue.
        a.resolve(failed(sent_a, "UserErrorDiskReadFailed", "could not read disk 'root'"))
        ended = await env.ended(job_a.id)
        assert (ended.status, ended.error_code) == ("Failed", "UserErrorDiskReadFailed")
        assert (await command(c)).backup.job_id == job_c.id
        await settle()
        assert b.outbox.empty()

        item_a, item_b = await env.catalog.item("vm-a"), await env.catalog.item("vm-b")
        assert item_a is not None
        assert item_b is not None
        assert (item_a.state, item_a.error_code) == ("ProtectionError", "UserErrorDiskReadFailed")
        assert item_a.error_message == "could not read disk 'root'"
        assert (item_b.state, item_b.last_backup_status) == (
            "Protected (pending initial backup)",
            "Cancelled",
        )

        board = await env.vaults.dashboard(EU, env.jobs.running_count(EU))
        assert (board.protected_items, board.jobs_failed, board.jobs_cancelled) == (3, 1, 1)
        assert board.jobs_in_progress == 1  # vm-c's backup
        assert board.items_by_state == {
            "ProtectionError": 1,
            "Protected (pending initial backup)": 2,
        }


@pytest.mark.timeout(15)  # no waiting out the cancel grace period on the way out either
async def test_cancelling_a_running_backup_sends_cancel_and_leaves_no_recovery_point(
    env: Controller,
) -> None:
    await env.enrol_all()
    await env.protected(EU, SHOP_WEB)
    session = env.sessions[SHOP_WEB]
    [job] = await env.protection.backup_now(EU, ["shop/web-1"], [])
    sent = await command(session)
    assert sent.backup.job_id == job.id

    cancelling = await env.jobs.cancel(job.id)
    assert cancelling.status == "Cancelling"
    assert (await env.catalog.job(job.id)).status == "Cancelling"
    cancel = await command(session)
    assert cancel.WhichOneof("kind") == "cancel"
    assert cancel.cancel.job_id == job.id
    assert (await env.jobs.cancel(job.id)).status == "Cancelling"  # asking twice is harmless

    session.resolve(failed(sent, "JobCancelled", f"Job {job.id} was cancelled"))
    ended = await env.ended(job.id)
    assert (ended.status, ended.error_code) == ("Cancelled", "JobCancelled")
    # "No recovery point was created", and none is shown: the id it would have had is kept
    # apart, for a restart to look for.
    assert ended.recovery_point_id == ""
    assert "recovery_point_id" not in ended.details
    assert ended.pending_recovery_point_id
    assert await env.catalog.recovery_points(SHOP_WEB) == []
    store = await env.datastores.get(EU)
    assert list(store.list_recovery_point_ids()) == []
    assert await env.item_state(SHOP_WEB) == ItemState.PROTECTION_PENDING


async def test_a_backup_cancelled_as_it_leaves_the_queue_never_reaches_the_agent(
    env: Controller,
) -> None:
    await env.enrol_all()
    await env.protected(EU, SHOP_WEB)
    session = env.sessions[SHOP_WEB]
    [job] = await env.protection.backup_now(EU, [SHOP_WEB], [])
    # The dispatcher has taken it from the queue; its command is not sent yet.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while not (isinstance(running := env.jobs.running(job.id), RunningBackup) and running.started):
        assert loop.time() < deadline, "the backup never left the queue"
        await asyncio.sleep(0)
    assert session.outbox.empty()

    assert (await env.jobs.cancel(job.id)).status == "Cancelling"
    ended = await env.ended(job.id)
    assert (ended.status, ended.error_code) == ("Cancelled", "JobCancelled")
    sent = []
    while not session.outbox.empty():
        sent.append(session.outbox.get_nowait().WhichOneof("kind"))
    assert "backup" not in sent


async def test_an_agent_lost_mid_backup_fails_the_job_and_shows_on_the_item(
    env: Controller,
) -> None:
    await env.enrol_all()
    await env.protected(EU, SHOP_WEB)
    [job] = await env.protection.backup_now(EU, [SHOP_WEB], [])
    await command(env.sessions[SHOP_WEB])
    env.jobs.heard_from(SHOP_WEB, [job.id])  # its heartbeat names the job: it took it
    env.disconnect(SHOP_WEB)
    ended = await env.ended(job.id)
    assert (ended.status, ended.error_code) == ("Failed", "AgentDisconnected")
    item = await env.catalog.item(SHOP_WEB)
    assert item is not None
    assert (item.state, item.error_code) == ("ProtectionError", "AgentDisconnected")


async def ending(env: Controller, job_id: str) -> None:
    """Return as soon as the job's outcome is decided, while its record may still be written
    (polled on every event-loop turn, so the moment is not missed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while not JobStatus((await env.jobs.job(job_id)).status).ended:
        assert loop.time() < deadline, f"timed out waiting for job {job_id} to end"
        await asyncio.sleep(0)


async def test_cancel_of_a_queued_backup_whose_window_just_closed_says_it_ended(
    env: Controller, clock: ManualClock
) -> None:
    await env.enrol_all()
    await env.protected(EU, SHOP_WEB)
    env.disconnect(SHOP_WEB)
    clock.set(ts(2025, 3, 4, 2))
    env.protection.scheduler.changed()

    async def queued() -> bool:
        return len(await env.backups(SHOP_WEB)) == 1

    await until(queued, "the scheduled backup")
    [job] = await env.backups(SHOP_WEB)
    clock.set(ts(2025, 3, 4, 4))
    env.jobs.kick()
    await ending(env, job.id)
    with pytest.raises(Conflict, match="already ended"):
        await env.jobs.cancel(job.id)
    assert (await env.ended(job.id)).error_code == "BackupWindowMissed"


async def test_cancel_of_a_backup_that_just_failed_leaves_its_outcome(env: Controller) -> None:
    await env.enrol_all()
    await env.protected(EU, SHOP_WEB)
    session = env.sessions[SHOP_WEB]
    [job] = await env.protection.backup_now(EU, [SHOP_WEB], [])
    sent = await command(session)
    session.resolve(failed(sent, "UserErrorDiskReadFailed", "disk gone"))
    await ending(env, job.id)
    with pytest.raises(Conflict, match="already ended"):
        await env.jobs.cancel(job.id)
    await settle()
    ended = await env.ended(job.id)
    assert (ended.status, ended.error_code) == ("Failed", "UserErrorDiskReadFailed")
    assert session.outbox.empty()  # no cancel for a job the agent has finished


async def test_the_dispatcher_survives_a_backup_queued_in_another_vault_meanwhile(
    env: Controller, clock: ManualClock
) -> None:
    # While the dispatcher records one vault's expired backup, a backup is queued in a vault
    # that had no queue yet (here by a backup-ended listener, as an operator's backup-now
    # could): the dispatcher must carry on and start it.
    await env.enrol_all()
    await env.protected(EU, SHOP_WEB)
    env.disconnect(SHOP_WEB)
    midday = Policy(
        "Midday", Schedule(Frequency.DAILY, (time(11, 0),)), Retention(daily=DailyRule(7))
    )
    await env.vaults.create_policy(US, midday)
    await env.protected(US, DB, "Midday")  # not due in the night the test plays
    item_ended = env.jobs.on_backup_ended
    assert item_ended is not None

    async def then_back_up_db(job: JobRecord) -> None:
        await item_ended(job)
        if job.vm_id == SHOP_WEB:
            await env.protection.backup_now(US, [DB], [])

    env.jobs.on_backup_ended = then_back_up_db
    clock.set(ts(2025, 3, 4, 2))
    env.protection.scheduler.changed()

    async def queued() -> bool:
        return len(await env.backups(SHOP_WEB)) == 1

    await until(queued, "the scheduled backup")
    clock.set(ts(2025, 3, 4, 4))
    env.jobs.kick()
    message = await command(env.sessions[DB])
    [db_backup] = await env.backups(DB)
    assert message.backup.job_id == db_backup.id


async def test_a_cancel_while_the_dispatcher_acts_neither_fails_nor_stalls_it(
    env: Controller, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: the dispatcher used to walk a copy of a vault's queue and await each
    expired backup's end; a cancel meanwhile removed a backup it had yet to reach, so it failed
    ("the backup dispatcher failed; retrying") and left the backups behind waiting 5 s."""
    vms = {
        "vm-late": ("late", "shop", "eu-west"),
        "vm-cancelled": ("cancelled", "shop", "eu-west"),
        "vm-next": ("next", "shop", "eu-west"),
    }
    await env.enrol_all(vms)
    now = clock.now()
    # All three agents are offline: scheduled backups wait for them. The first one's window
    # closes long before the others'.
    late = await env.jobs.backup(EU, "vm-late", trigger=Trigger.SCHEDULED, deadline=now + 60)
    cancelled = await env.jobs.backup(
        EU, "vm-cancelled", trigger=Trigger.SCHEDULED, deadline=now + WINDOW
    )
    following = await env.jobs.backup(
        EU, "vm-next", trigger=Trigger.SCHEDULED, deadline=now + WINDOW
    )
    item_ended = env.jobs.on_backup_ended
    assert item_ended is not None

    async def cancel_the_next_one(job: JobRecord) -> None:
        await item_ended(job)
        if job.id == late.id:  # as an operator's `coffer job cancel` could, at this moment
            await env.jobs.cancel(cancelled.id)

    env.jobs.on_backup_ended = cancel_the_next_one
    caplog.set_level(logging.INFO)
    await settle()  # the dispatcher has seen all three waiting, and sleeps until a change
    # One wakeup finds the first backup expired and the other two startable.
    clock.advance(120)
    session, following_session = await env.connect_together("vm-cancelled", "vm-next")

    sent = await asyncio.wait_for(following_session.outbox.get(), 2.0)  # not 5 s later
    assert sent.backup.job_id == following.id
    expired = await env.ended(late.id)
    assert (expired.status, expired.error_code) == ("Failed", "BackupWindowMissed")
    # The cancelled backup may have had its command sent first; it ends Cancelled either way.
    while not session.outbox.empty():
        message = session.outbox.get_nowait()
        if message.WhichOneof("kind") == "backup":
            session.resolve(failed(message, "JobCancelled", "cancelled"))
    ended = await env.ended(cancelled.id)
    assert (ended.status, ended.error_code) == ("Cancelled", "JobCancelled")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    following_session.resolve(failed(sent, "UserErrorDiskReadFailed", "disk gone"))
    assert (await env.ended(following.id)).status == "Failed"


# --- retention --------------------------------------------------------------------------------


async def test_prune_deletes_what_retention_no_longer_keeps_and_spares_points_in_use(
    tmp_path: Path,
) -> None:
    clock = ManualClock(ts(2025, 3, 6, 3))
    async with controller(tmp_path, clock) as env:
        await env.create_vault(EU, "eu-west")
        short = Policy(
            "Short", Schedule(Frequency.DAILY, (time(2, 0),)), Retention(daily=DailyRule(3))
        )
        await env.vaults.create_policy(EU, short)
        await env.enrol_all()
        await env.protected(EU, SHOP_WEB, "Short")
        for day in range(1, 7):
            # Labelled as an earlier prune left them.
            await store_recovery_point(
                env, EU, SHOP_WEB, f"rp-{day}", ts(2025, 3, day, 2), kept_by=("daily",)
            )

        # A restore reads the oldest point: it is left for a later prune.
        restore = await env.jobs.restore(SHOP_WEB, "rp-1", "root", "/restore/root.img", "")
        sent = await command(env.sessions[SHOP_WEB])
        assert sent.restore.recovery_point_id == "rp-1"

        job = await env.pruner.prune_vm(EU, SHOP_WEB, after_job="job-x")
        assert job is not None
        assert (job.operation, job.status) == ("Prune", "Completed")
        assert sorted(job.details["deleted_recovery_points"]) == ["rp-2", "rp-3"]
        assert job.details["after_job"] == "job-x"
        points = {rp.id: rp.kept_by for rp in await env.catalog.recovery_points(SHOP_WEB)}
        assert points == {
            "rp-1": (),  # no rule keeps it any more; only the restore does
            "rp-4": ("daily",),
            "rp-5": ("daily",),
            "rp-6": ("daily",),
        }
        for rp_id, exists in (("rp-1", True), ("rp-2", False), ("rp-3", False), ("rp-4", True)):
            assert await manifest_exists(env, EU, rp_id) == exists
        with pytest.raises(NotFound):
            await env.catalog.recovery_point("rp-2")

        # The restore ends; the next prune takes the point it held.
        env.sessions[SHOP_WEB].resolve(
            agent_pb2.CommandResult(
                command_id=sent.command_id, job_id=restore.id, ok=True, bytes_written=CHUNK
            )
        )
        assert (await env.ended(restore.id)).status == "Completed"
        again = await env.pruner.prune_vm(EU, SHOP_WEB)
        assert again is not None
        assert again.details["deleted_recovery_points"] == ["rp-1"]
        # Nothing left to delete: the prune is recorded all the same, and says so.
        idle = await env.pruner.prune_vm(EU, SHOP_WEB)
        assert idle is not None
        assert (idle.status, idle.details["deleted_recovery_points"]) == ("Completed", [])
        assert len(await env.catalog.jobs(JobFilter(operations=[Operation.PRUNE]))) == 3

        # Retained data of a stopped VM is never pruned, however old it gets.
        await env.protection.stop(EU, [SHOP_WEB], delete_data=False)
        clock.set(ts(2025, 6, 1))
        assert await env.pruner.prune_vm(EU, SHOP_WEB) is None
        assert [rp.id for rp in await env.catalog.recovery_points(SHOP_WEB)] == [
            "rp-4",
            "rp-5",
            "rp-6",
        ]


async def back_up(env: Controller, vm_id: str) -> JobRecord:
    """A backup that succeeds: the test plays the agent's side of the data path (one chunk,
    its index) against the real datastore, then reports success."""
    session = env.sessions[vm_id]
    [job] = await env.protection.backup_now(EU, [vm_id], [])
    sent = await command(session)
    running = env.jobs.running_backup(vm_id, job.id)
    data = job.id.encode().ljust(CHUNK, b"-")
    digest = chunk_digest(data)
    if await env.jobs.missing_chunks(running, [digest]):
        store = await env.jobs.datastore(running)
        stored = store.put_chunk(digest, data, Compression.NONE, CHUNK)
        env.jobs.chunk_stored(running, digest, stored, len(data))
    await env.jobs.accept_index(running, DiskIndex("root", CHUNK, CHUNK, digest))
    session.resolve(
        agent_pb2.CommandResult(
            command_id=sent.command_id,
            job_id=job.id,
            ok=True,
            consistency="file-system",
            frozen_ms=12.0,
            disks=[
                agent_pb2.DiskBackupResult(
                    disk="root", size_bytes=CHUNK, bytes_read=CHUNK, bytes_sent=CHUNK,
                    chunk_count=1, consistency="file-system", snapshot_provider="reflink",
                )
            ],
        )
    )  # fmt: skip
    return await env.ended(job.id)


async def test_a_prune_job_follows_every_successful_backup_even_when_it_deletes_nothing(
    env: Controller, clock: ManualClock
) -> None:
    """Regression: the README says a Prune job follows each backup, yet after seven backups
    none had run: the prune after a backup was recorded only when it deleted something."""
    await env.enrol_all()
    await env.protected(EU, SHOP_WEB)  # daily, kept 30 days: seven backups delete nothing
    backups = []
    for _ in range(7):
        backup = await back_up(env, SHOP_WEB)
        assert backup.status == "Completed", backup.error_message
        # Named only now that it is committed.
        assert backup.recovery_point_id == backup.pending_recovery_point_id
        backups.append(backup)

        async def pruned(after: str = backup.id) -> bool:
            jobs = await env.catalog.jobs(JobFilter(operations=[Operation.PRUNE]))
            return any(j.details.get("after_job") == after and j.status.ended for j in jobs)

        await until(pruned, f"the prune after backup {backup.id}")
        clock.advance(HOUR)

    prunes = await env.catalog.jobs(JobFilter(operations=[Operation.PRUNE], vm_id=SHOP_WEB))
    assert sorted(p.details["after_job"] for p in prunes) == sorted(b.id for b in backups)
    for prune in prunes:
        assert (prune.status, prune.trigger) == ("Completed", Trigger.MANUAL)
        assert prune.details["deleted_recovery_points"] == []
        assert prune.details["policy"] == "DefaultPolicy"
    points = await env.catalog.recovery_points(SHOP_WEB)
    assert [rp.id for rp in points] == [b.recovery_point_id for b in backups]
    assert {rp.kept_by for rp in points} == {("daily",)}
    assert {rp.consistency for rp in points} == {"file-system"}
    # A failed backup is not followed by a prune.
    [job] = await env.protection.backup_now(EU, [SHOP_WEB], [])
    sent = await command(env.sessions[SHOP_WEB])
    env.sessions[SHOP_WEB].resolve(failed(sent, "UserErrorDiskReadFailed", "disk gone"))
    await env.ended(job.id)
    await settle()
    assert len(await env.catalog.jobs(JobFilter(operations=[Operation.PRUNE]))) == 7


async def test_a_vms_newest_point_survives_when_every_rule_has_let_it_go(
    tmp_path: Path,
) -> None:
    """Backups failing for longer than the retention: the last copy is still there."""
    clock = ManualClock(ts(2025, 3, 2, 3))
    async with controller(tmp_path, clock) as env:
        await env.create_vault(EU, "eu-west")
        await env.enrol_all()
        await env.protected(EU, SHOP_WEB)  # daily, 30 days
        for day in (1, 2):
            await store_recovery_point(env, EU, SHOP_WEB, f"rp-{day}", ts(2025, 3, day, 2))
        clock.set(ts(2025, 4, 15))  # 44 days later, no backup since
        job = await env.pruner.prune_vault(EU)
        assert job.details["deleted_recovery_points"] == ["rp-1"]
        [last] = await env.catalog.recovery_points(SHOP_WEB)
        assert (last.id, last.kept_by) == ("rp-2", ("latest",))
        assert await manifest_exists(env, EU, "rp-2")


async def test_a_slot_that_comes_while_the_vms_last_job_runs_is_a_failed_backup(
    env: Controller,
) -> None:
    await env.enrol_all()
    await env.protected(EU, SHOP_WEB)
    [manual] = await env.protection.backup_now(EU, [SHOP_WEB], [])
    await command(env.sessions[SHOP_WEB])  # started, and the agent keeps it running
    env.clock.set(ts(2025, 3, 4, 2))  # Tuesday 02:00: the daily slot
    env.protection.scheduler.changed()

    async def skipped() -> bool:
        return any(j.status == "Failed" for j in await env.backups(SHOP_WEB))

    await until(skipped, "the skipped slot's job")
    [failed_job] = [j for j in await env.backups(SHOP_WEB) if j.status == "Failed"]
    assert failed_job.error_code == "OperationInProgress"
    assert manual.id in failed_job.error_message
    assert "did not run" in failed_job.error_message
    item = await env.catalog.item(SHOP_WEB)
    assert item is not None
    assert (item.state, item.error_code) == ("ProtectionError", "OperationInProgress")


async def test_a_scheduled_backup_a_restart_cut_short_runs_again(
    tmp_path: Path, clock: ManualClock
) -> None:
    async with controller(tmp_path, clock) as env:
        await env.create_vault(EU, "eu-west")
        await env.enrol_all()
        await env.protected(EU, SHOP_WEB)
        clock.set(ts(2025, 3, 4, 2))  # the slot comes; the agent is offline
        env.disconnect(SHOP_WEB)
        env.protection.scheduler.changed()

        async def queued() -> bool:
            return len(await env.backups(SHOP_WEB)) == 1

        await until(queued, "the scheduled backup")
        [first] = await env.backups(SHOP_WEB)

    clock.set(ts(2025, 3, 4, 2, 30))  # back within the window
    async with controller(tmp_path, clock) as env:
        interrupted = await env.catalog.job(first.id)
        assert (interrupted.status, interrupted.error_code) == ("Failed", "ControllerRestarted")
        jobs = await env.backups(SHOP_WEB)
        [again] = [j for j in jobs if j.id != first.id]
        assert (again.status, again.trigger) == ("InProgress", "scheduled")
        assert again.slot == ts(2025, 3, 4, 2)
        session = await env.connect(SHOP_WEB)
        assert (await command(session)).backup.job_id == again.id


async def test_raising_a_vaults_limit_starts_queued_backups_at_once(
    tmp_path: Path, clock: ManualClock
) -> None:
    two = {"vm-a": ("app-a", "shop", "eu-west"), "vm-b": ("app-b", "shop", "eu-west")}
    async with controller(tmp_path, clock) as env:
        await env.create_vault(EU, "eu-west", max_concurrent=1)
        await env.enrol_all(two)
        for vm in two:
            await env.protected(EU, vm)
        [job_a] = await env.protection.backup_now(EU, ["vm-a"], [])
        [job_b] = await env.protection.backup_now(EU, ["vm-b"], [])
        assert (await command(env.sessions["vm-a"])).backup.job_id == job_a.id
        await settle()
        assert env.sessions["vm-b"].outbox.empty()  # queued behind vm-a

        vault = await env.vaults.update(EU, 2)
        assert vault.max_concurrent_backups == 2
        env.jobs.set_limit(EU, vault.max_concurrent_backups)
        assert (await command(env.sessions["vm-b"])).backup.job_id == job_b.id
        with pytest.raises(InvalidArgument, match="1 to 10000"):
            await env.vaults.update(EU, 10_001)
        assert (await env.vaults.update(EU, 10_000)).max_concurrent_backups == 10_000


async def test_a_backup_the_stop_cuts_short_is_failed_at_the_next_start_with_its_bytes(
    tmp_path: Path, clock: ManualClock
) -> None:
    """What it uploaded stays in the datastore until collected: the vault counts it."""
    async with controller(tmp_path, clock) as env:
        await env.create_vault(EU, "eu-west")
        await env.enrol_all()
        await env.protected(EU, SHOP_WEB)
        [job] = await env.protection.backup_now(EU, [SHOP_WEB], [])
        await command(env.sessions[SHOP_WEB])
        running = env.jobs.running_backup(SHOP_WEB, job.id)
        env.jobs.chunk_stored(running, chunk_digest(b"x" * CHUNK), 1234, 1234)

    async with controller(tmp_path, clock) as env:
        record = await env.catalog.job(job.id)
        assert (record.status, record.error_code, record.bytes_stored) == (
            "Failed",
            "ControllerRestarted",
            1234,
        )
        assert (await env.catalog.vault(EU)).stored_bytes == 1234
        item = await env.catalog.item(SHOP_WEB)
        assert item is not None
        assert (item.state, item.error_code) == ("ProtectionError", "ControllerRestarted")


async def test_many_vms_register_protect_and_back_up_together_one_job_each(
    env: Controller,
) -> None:
    """One call for many VMs writes their jobs and items together; an offline VM fails its
    own Register job while the others register, and backup-now queues every backup or none."""
    fleet = {f"vm-{n}": (f"app-{n}", "fleet", "eu-west") for n in range(40)}
    await env.enrol_all(fleet)
    online = sorted(fleet)[:-1]
    await env.connect_together(*online)
    offline = sorted(fleet)[-1]

    registered = await env.protection.register(EU, sorted(fleet))
    outcome = {job.vm_id: (job.status, job.error_code) for job in registered}
    assert outcome == {
        **{vm: ("Completed", "") for vm in online},
        offline: ("Failed", "UserErrorInvalidProtectionState"),
    }
    assert len({job.id for job in registered}) == len(fleet)
    assert await env.catalog.item(offline) is None

    protected = await env.protection.protect(EU, online, "")
    assert {job.status for job in protected} == {JobStatus.COMPLETED}
    states = {i.vm_id: i.state for i in await env.catalog.items(EU)}
    assert states == dict.fromkeys(online, ItemState.PROTECTION_PENDING)
    assert env.protection.next_backup((await env.catalog.items_of(online[:1]))[online[0]])

    # One VM busy: the whole call is refused, and no backup is queued for the others.
    [first] = await env.protection.backup_now(EU, online[:1], [])
    with pytest.raises(OperationInProgress):
        await env.protection.backup_now(EU, online, [])
    assert [job.id for job in await env.backups()] == [first.id]


async def test_a_session_whose_heartbeats_stopped_gets_no_backup_until_it_is_heard_again(
    env: Controller,
) -> None:
    """A connection that died without a word looks open until keepalive notices: the
    dispatcher holds the backup back, and the agent's next heartbeat sends it at once."""
    await env.enrol_all()
    await env.protected(EU, SHOP_WEB)
    session = env.sessions[SHOP_WEB]
    session.silent_after = 0.2
    env.registry.heard(session)
    await asyncio.sleep(0.3)
    assert not env.registry.online(SHOP_WEB)
    [job] = await env.protection.backup_now(EU, [SHOP_WEB], [])
    await settle()
    assert session.outbox.empty()
    env.registry.heard(session)
    assert (await command(session)).backup.job_id == job.id
