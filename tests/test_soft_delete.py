"""Soft delete, the datastore's descriptions of the catalog, and a catalog recovered from them,
in one process with a manual clock.

Real parts as in tests/test_protection.py (SQLite catalog, local datastores, job manager,
protection, pruner); the descriptions are written by a real `Describer`, and `recover` reads
them back into a new catalog in another state directory. The end-to-end versions, with real
processes and an S3 datastore, are tests/test_recovery.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from controller.catalog import Catalog, DamageRecord, JobFilter
from controller.config import ControllerConfig, DatastoreSettings, EncryptionSettings
from controller.datastore import (
    ChunkGuard,
    Datastore,
    LocalDirectoryStore,
    MasterKey,
    collect_garbage,
)
from controller.datastore.store import manifest_key
from controller.descriptions import Describer
from controller.main import main as controller_main
from controller.recovery import recover
from shared.clock import ManualClock
from shared.errors import (
    AlreadyRegistered,
    CatalogExists,
    InvalidArgument,
    ItemStateConflict,
    KeyUnavailable,
    NoDatastores,
    NotFound,
    VaultNotEmpty,
    WrongKey,
)
from shared.model import ItemState, JobStatus, Operation, Trigger, Verification
from shared.policy import DailyRule, Frequency, Policy, Retention, Schedule
from shared.supervision import Supervisor
from tests.test_protection import (
    BLOG_WEB,
    CHUNK,
    DAY,
    EU,
    MONDAY_NOON,
    SHOP_WEB,
    US,
    Controller,
    controller,
    store_recovery_point,
    ts,
)

pytestmark = pytest.mark.timeout(60)

GOLD = Policy(
    "Gold",
    Schedule(Frequency.DAILY, (datetime(2025, 1, 1, 20).time(),)),
    Retention(daily=DailyRule(7)),
)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(MONDAY_NOON)


@pytest.fixture
async def env(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Controller]:
    async with controller(tmp_path, clock) as env:
        await env.create_vault(EU, "eu-west")
        await env.create_vault(US, "us-east")
        yield env


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


async def env_with_gold(env: Controller) -> None:
    await env.enrol_all()
    await env.vaults.create_policy(EU, GOLD)
    await env.protected(EU, SHOP_WEB, "Gold")
    await store_recovery_point(env, EU, SHOP_WEB, "rp-1", ts(2025, 3, 1, 20), ("daily",))
    await store_recovery_point(env, EU, SHOP_WEB, "rp-2", ts(2025, 3, 2, 20), ("daily",))


# --- soft delete --------------------------------------------------------------------------------


async def test_deleted_data_is_kept_listed_and_undeleted_with_the_policy_it_had(
    env: Controller,
) -> None:
    await env_with_gold(env)
    datastore = await env.datastores.get(EU)

    _, delete = await env.protection.stop(EU, [SHOP_WEB], delete_data=True)
    assert (delete.operation, delete.status) == (Operation.DELETE_BACKUP_DATA, "Completed")
    assert delete.details["deleted_recovery_points"] == ["rp-1", "rp-2"]
    assert delete.details["purge_at"] == iso(MONDAY_NOON + 14 * DAY)
    # Not live any more, in the catalog or the datastore; kept as deleted in both.
    assert await env.catalog.recovery_points(SHOP_WEB) == []
    assert list(datastore.list_recovery_point_ids()) == []
    assert sorted(datastore.list_deleted_ids()) == ["rp-1", "rp-2"]
    deleted = await env.catalog.deleted_recovery_points(SHOP_WEB)
    assert [(d.id, d.purge_at, d.policy, d.deleted_by, d.point.kept_by) for d in deleted] == [
        (rp, MONDAY_NOON + 14 * DAY, "Gold", delete.id, ("daily",)) for rp in ("rp-1", "rp-2")
    ]
    assert await env.item_state(SHOP_WEB) == ItemState.REGISTERED

    # One point back, then the rest: the item is stopped with the policy it had.
    one = await env.protection.undelete(EU, SHOP_WEB, "rp-1")
    assert (one.operation, one.status) == (Operation.UNDELETE, JobStatus.COMPLETED)
    assert one.details == {"undeleted_recovery_points": ["rp-1"], "policy": "Gold"}
    item = await env.catalog.item(SHOP_WEB)
    assert item is not None
    assert (item.state, item.policy) == (ItemState.PROTECTION_STOPPED, "Gold")
    [back] = await env.catalog.recovery_points(SHOP_WEB)
    assert (back.id, back.kept_by) == ("rp-1", ("daily",))
    assert datastore.get_manifest("rp-1").id == "rp-1"
    rest = await env.protection.undelete("", "shop/web-1")  # the vault is the one it was in
    assert rest.details["undeleted_recovery_points"] == ["rp-2"]
    assert await env.catalog.deleted_recovery_points() == []
    with pytest.raises(NotFound, match="no deleted recovery points"):
        await env.protection.undelete(EU, SHOP_WEB)
    [resumed] = await env.protection.protect(EU, [SHOP_WEB], "", resume=True)
    assert resumed.details == {"policy": "Gold"}
    assert await env.item_state(SHOP_WEB) == ItemState.PROTECTED

    # Protected again after a deletion: what would come back would be pruned, so refused.
    await env.protection.stop(EU, [SHOP_WEB], delete_data=True)
    await env.protection.protect(EU, [SHOP_WEB], "Gold")
    with pytest.raises(ItemStateConflict, match="stop its protection first"):
        await env.protection.undelete(EU, SHOP_WEB)
    # Registered to another vault: refused; unregistered: registered again, stopped.
    await env.protection.stop(EU, [SHOP_WEB], delete_data=False)
    await env.protection.stop(EU, [SHOP_WEB], delete_data=True)  # nothing live: nothing more
    await env.protection.unregister(EU, [SHOP_WEB])
    await env.create_vault("eu-2", "eu-west")
    await env.protection.register("eu-2", [SHOP_WEB])
    with pytest.raises(AlreadyRegistered):
        await env.protection.undelete(EU, SHOP_WEB)
    await env.protection.unregister("eu-2", [SHOP_WEB])
    again = await env.protection.undelete(EU, SHOP_WEB)
    assert sorted(again.details["undeleted_recovery_points"]) == ["rp-1", "rp-2"]
    item = await env.catalog.item(SHOP_WEB)
    assert item is not None
    assert (item.vault, item.state, item.policy) == (EU, ItemState.PROTECTION_STOPPED, "Gold")


async def test_deleted_data_is_purged_by_the_daily_maintenance_once_its_days_are_over(
    env: Controller, clock: ManualClock
) -> None:
    await env.enrol_all()
    await env.protected(EU, SHOP_WEB)
    vault = await env.vaults.update(EU, 0, soft_delete_days=2)
    assert vault.soft_delete_days == 2
    await store_recovery_point(env, EU, SHOP_WEB, "rp-1", ts(2025, 3, 2, 2))
    await env.protection.stop(EU, [SHOP_WEB], delete_data=True)
    await env.protection.unregister(EU, [SHOP_WEB])
    # Points deleted before keep their purge time when the setting changes.
    await env.vaults.update(EU, 0, soft_delete_days=30)
    datastore = await env.datastores.get(EU)

    async def purges() -> list[Any]:
        return await env.catalog.jobs(JobFilter(operations=[Operation.PURGE_DELETED]))

    clock.advance(DAY)
    await env.pruner.maintain(env.pruner.maintenance_key(EU))
    assert await purges() == []  # nothing due: no job
    with pytest.raises(VaultNotEmpty, match="1 soft-deleted recovery points"):
        await env.vaults.delete(EU, running_jobs=0)

    clock.advance(DAY)
    await env.pruner.maintain(env.pruner.maintenance_key(EU))
    [purge] = await purges()
    assert (purge.status, purge.trigger) == (JobStatus.COMPLETED, Trigger.SCHEDULED)
    assert purge.details["purged_recovery_points"] == ["rp-1"]
    assert await env.catalog.deleted_recovery_points() == []
    assert list(datastore.list_deleted_ids()) == []
    assert datastore.list_indexes() == {}
    for job in await env.catalog.jobs(JobFilter(operations=[Operation.GARBAGE_COLLECTION])):
        await env.ended(job.id)
    # Its chunk is garbage now.
    report = collect_garbage(datastore, cutoff=time.time() + 3600, guard=ChunkGuard())
    assert report.chunks_deleted == 1
    await env.vaults.delete(EU, running_jobs=0)


async def test_with_soft_delete_off_deleted_data_is_gone_at_once(env: Controller) -> None:
    await env.enrol_all()
    await env.protected(EU, SHOP_WEB)
    with pytest.raises(InvalidArgument, match="0 \\(off\\) to 180 days"):
        await env.vaults.update(EU, 0, soft_delete_days=181)
    await env.vaults.update(EU, 0, soft_delete_days=0)
    await store_recovery_point(env, EU, SHOP_WEB, "rp-1", ts(2025, 3, 2, 2))
    _, delete = await env.protection.stop(EU, [SHOP_WEB], delete_data=True)
    assert delete.details == {"deleted_recovery_points": ["rp-1"]}
    datastore = await env.datastores.get(EU)
    assert list(datastore.list_deleted_ids()) == []
    assert not datastore.backend.has(manifest_key("rp-1"))
    assert await env.catalog.deleted_recovery_points() == []


# --- descriptions and recovery -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def described(root: Path, clock: ManualClock) -> AsyncIterator[tuple[Controller, Describer]]:
    async with (
        controller(root, clock) as env,
        Supervisor("test") as supervisor,
        Describer(env.catalog, env.datastores, clock, supervisor, delay=0) as describer,
    ):
        await env.create_vault(EU, "eu-west")
        await env.create_vault(US, "us-east")
        yield env, describer


async def populate(env: Controller) -> None:
    """Two VMs' worth of what a recovery must bring back: settings, policies, labels, a
    verify's verdict, and a VM whose data was deleted (kept for 7 days)."""
    await env_with_gold(env)
    await env.vaults.update(
        EU, 3, verify_new=True, reverify_days=30, soft_delete_days=7, full_read_days=3
    )
    await env.catalog.record_verified(
        [("rp-1", (), ""), ("rp-2", (DamageRecord("root", 0, b"\1" * 32, "missing"),), "")],
        MONDAY_NOON,
        "job-verify",
    )
    await env.protected(EU, BLOG_WEB)
    await store_recovery_point(env, EU, BLOG_WEB, "rp-blog", ts(2025, 3, 2, 2))
    await env.protection.stop(EU, [BLOG_WEB], delete_data=True)


async def test_the_datastore_describes_what_only_the_catalog_knows(
    tmp_path: Path, clock: ManualClock
) -> None:
    async with described(tmp_path, clock) as (env, describer):
        await populate(env)
        await describer.flush()
        datastore = await env.datastores.get(EU)
        vault = datastore.get_vault_description()
        assert (vault.vault, vault.region) == (EU, "eu-west")
        assert dict(vault.settings) == {
            "max_concurrent_backups": 3,
            "verify_new": True,
            "reverify_days": 30,
            "soft_delete_days": 7,
            "shared_dedup": False,
            "copy_target": "",
            "full_read_days": 3,
        }
        assert sorted(p.name for p in vault.policies) == ["DefaultPolicy", "Gold"]
        assert next(p for p in vault.policies if p.name == "Gold").spec == GOLD.to_dict()
        shop = datastore.get_vm_description(datastore.vm_description_key(SHOP_WEB))
        assert shop.item is not None
        assert (shop.item.state, shop.item.policy) == (ItemState.PROTECTION_PENDING, "Gold")
        assert (shop.vm["name"], shop.vm["service"]) == ("web-1", "shop")
        assert {rp: (p.kept_by, p.verification) for rp, p in shop.points.items()} == {
            "rp-1": (("daily",), "verified"),
            "rp-2": (("daily",), "damaged"),
        }
        blog = datastore.get_vm_description(datastore.vm_description_key(BLOG_WEB))
        assert blog.item is not None
        assert blog.item.state == "Registered"
        assert blog.points == {}  # its points are in their tombstones

        # Nothing changed: nothing is written again.
        key = datastore.vm_description_key(SHOP_WEB)
        path = tmp_path / "datastores" / EU / key
        written = path.stat().st_mtime_ns
        await env.catalog.upsert_agent(
            vm_id=SHOP_WEB, name="web-1", service="shop", region="eu-west",
            hostname="web-1.shop.lab", agent_version="test", disks=[], now=clock.now(),
        )  # fmt: skip
        await describer.flush()
        assert path.stat().st_mtime_ns == written
        # A VM the vault holds nothing of any more has no description.
        await env.protection.unregister(EU, [BLOG_WEB])
        await describer.flush()
        assert datastore.vm_description_key(BLOG_WEB) not in set(
            datastore.list_vm_description_keys()
        )


def recovery_config(tmp_path: Path, datastores: Path, **encryption: Path) -> ControllerConfig:
    return ControllerConfig(
        listen="127.0.0.1:0",
        state_dir=tmp_path / "recovered",
        pki_dir=tmp_path / "pki",
        datastore=DatastoreSettings(str(datastores)),
        encryption=EncryptionSettings(**encryption),
    )


async def snapshot(catalog: Catalog) -> dict[str, Any]:
    """What an operator sees of a catalog, beyond jobs and counters."""
    vaults = await catalog.vaults()
    points = await catalog.recovery_points()
    verifications = await catalog.verifications([rp.id for rp in points])
    items = await catalog.items()
    agents = {a.vm_id: a for a in await catalog.agents()}
    return {
        "vaults": [
            (v.name, v.region, v.chunk_size, v.max_concurrent_backups, v.verify_new,
             v.reverify_days, v.soft_delete_days, v.encrypted, v.full_read_days)
            for v in vaults
        ],
        "policies": [(p.vault, p.name, p.spec) for p in await catalog.policies()],
        "items": [(i.vm_id, i.vault, i.policy) for i in items],
        "vms": sorted(
            (a.vm_id, a.name, a.service, a.region, a.hostname)
            for a in agents.values()
            if a.vm_id in {i.vm_id for i in items}
        ),
        "points": [
            (rp.id, rp.vault, rp.vm_id, rp.job_id, rp.created_at, rp.consistency,
             rp.bytes_stored, rp.data_bytes, rp.kept_by, rp.disks)
            for rp in points
        ],
        "verified": {rp_id: (v.state, v.verified_at) for rp_id, v in verifications.items()},
        "deleted": [
            (d.id, d.point.vm_id, d.point.kept_by, d.deleted_at, d.purge_at, d.policy,
             d.deleted_by)
            for d in await catalog.deleted_recovery_points()
        ],
    }  # fmt: skip


async def test_recover_rebuilds_the_catalog_from_the_datastores_alone(
    tmp_path: Path, clock: ManualClock
) -> None:
    async with described(tmp_path / "old", clock) as (env, _):
        await populate(env)
        before = await snapshot(env.catalog)
        old_items = {i.vm_id: i for i in await env.catalog.items()}
    config = recovery_config(tmp_path, tmp_path / "old" / "datastores")

    done = await recover(config)

    assert (done.problems, done.replaced) == ([], None)
    assert [(v.name, v.recovery_points, v.deleted_recovery_points) for v in done.vaults] == [
        (EU, 2, 1),
        (US, 0, 0),
    ]
    async with Catalog(config.catalog_path) as catalog:
        after = await snapshot(catalog)
        items = {i.vm_id: i for i in await catalog.items()}
        [eu, _] = await catalog.vaults()
    # Everything an operator sees comes back; a point found damaged asks for a verify.
    before["verified"]["rp-2"] = (Verification.DAMAGED, MONDAY_NOON)
    assert after == before
    # Items stop until an operator resumes them, each with its policy.
    assert old_items[SHOP_WEB].state.protected
    assert {vm: (i.state, i.policy) for vm, i in items.items()} == {
        SHOP_WEB: (ItemState.PROTECTION_STOPPED, "Gold"),
        BLOG_WEB: (ItemState.REGISTERED, None),
    }
    # Stored bytes are counted from the chunks themselves.
    datastore = Datastore.open(LocalDirectoryStore(tmp_path / "old" / "datastores" / EU))
    assert eu.stored_bytes == sum(
        datastore.chunk_info(d).size for d in datastore.list_chunk_digests()
    )
    assert eu.stored_bytes > 0


async def test_recover_refuses_an_existing_catalog_and_reports_what_it_cannot_read(
    tmp_path: Path, clock: ManualClock, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = recovery_config(tmp_path, tmp_path / "nothing-here")
    with pytest.raises(NoDatastores, match="nothing-here"):
        await recover(empty)

    async with described(tmp_path / "old", clock) as (env, _):
        await populate(env)
    datastores = tmp_path / "old" / "datastores"
    config = recovery_config(tmp_path, datastores)
    await recover(config)
    with pytest.raises(CatalogExists, match="--force"):
        await recover(config)
    # A damaged manifest: reported, left out, the rest recovered; the old catalog set aside.
    (datastores / EU / "manifests" / "rp-2.json").write_bytes(b"{damaged")
    done = await recover(config, force=True)
    assert done.replaced is not None
    assert done.replaced.exists()
    assert [(p.vault, p.what) for p in done.problems] == [(EU, "manifests/rp-2.json")]
    async with Catalog(config.catalog_path) as catalog:
        assert [rp.id for rp in await catalog.recovery_points()] == ["rp-1"]
    # As a command: the report names it and the exit code says data is damaged.
    toml = tmp_path / "controller.toml"
    toml.write_text(
        f'state_dir = "{tmp_path / "again"}"\npki_dir = "pki"\n[datastore]\nurl = "{datastores}"\n'
    )
    command = ["recover", "--config", str(toml)]
    assert await asyncio.to_thread(controller_main, command) == 7
    said = capsys.readouterr().out
    assert f"NOT RECOVERED: vault {EU}: manifests/rp-2.json: Corrupt data" in said
    assert "items: 1 ProtectionStopped, 1 Registered" in said
    assert await asyncio.to_thread(controller_main, command) == CatalogExists.exit_code
    assert "already has a catalog" in capsys.readouterr().err


async def test_recover_needs_the_master_key(tmp_path: Path) -> None:
    datastores = tmp_path / "datastores"
    right = MasterKey.create_file(tmp_path / "right.key")
    Datastore.create(LocalDirectoryStore(datastores / "enc"), CHUNK, master=right, vault="enc")
    wrong = tmp_path / "wrong.key"
    MasterKey.create_file(wrong)
    with pytest.raises(WrongKey):
        await recover(recovery_config(tmp_path, datastores, master_key_file=wrong))
    with pytest.raises(KeyUnavailable):
        await recover(recovery_config(tmp_path, datastores))
    assert not (tmp_path / "recovered" / "catalog.sqlite").exists()
    # No key is made where none was configured: a new key could open nothing.
    assert not (tmp_path / "recovered" / "master.key").exists()
    done = await recover(
        recovery_config(tmp_path, datastores, master_key_file=tmp_path / "right.key")
    )
    assert [(v.name, v.encrypted) for v in done.vaults] == [("enc", True)]
