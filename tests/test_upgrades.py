"""Vault upgrades as jobs, on the controller's in-process parts (tests.test_protection's).

What needs the job layer's timing, which a real controller cannot be made to show on cue: a
backup that began before the vault was switched commits into the old format and is converted
all the same; what a verify found (whole, or damaged at a chunk) stays true under the new
names, and a chunk the upgrade cannot read is recorded bad under its new name; a prune during
the upgrade deletes a point from both formats.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.datastore import CONFIG_KEY, MasterKey, chunk_key
from controller.datastore.upgrade import lost_digest
from controller.upgrades import UpgradePause, VaultUpgrades
from controller.verification import Verifier
from shared.blob import Compression
from shared.clock import ManualClock
from shared.digest import chunk_digest
from shared.errors import Conflict
from shared.index import DiskIndex
from shared.model import JobStatus, Verification
from shared.rpc import agent_pb2
from tests.test_protection import (
    CHUNK,
    EU,
    MONDAY_NOON,
    Controller,
    back_up,
    command,
    controller,
    until,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Controller]:
    # No master key: the vault is made format 1, as before encryption at rest.
    async with controller(tmp_path, ManualClock(MONDAY_NOON)) as env:
        await env.create_vault(EU, "eu-west")
        await env.enrol("vm-1", "web-1", "shop", "eu-west")
        await env.protected(EU, "vm-1")
        yield env


def upgrades(env: Controller) -> VaultUpgrades:
    env.datastores.master = MasterKey.generate()
    return VaultUpgrades(
        env.catalog, env.datastores, env.jobs, env.jobs.integrity, env.clock, pause=UpgradePause()
    )


async def read_point(env: Controller, rp_id: str) -> bytes:
    store = await env.datastores.reader(EU, rp_id)
    index = store.get_index(rp_id, "root")
    return b"".join(store.read_chunk(d) for d in index.iter_digests())


async def test_a_backup_begun_before_the_switch_is_converted_too(env: Controller) -> None:
    first = await back_up(env, "vm-1")
    assert (await env.datastores.get(EU)).config.format == 1
    # A second backup starts (it holds the format-1 datastore) and is still running when the
    # vault is switched.
    session = env.sessions["vm-1"]
    [job] = await env.protection.backup_now(EU, ["vm-1"], [])
    sent = await command(session)
    running = env.jobs.running_backup("vm-1", job.id)
    upgrade = await upgrades(env).start(EU)
    await until(
        lambda: asyncio.sleep(0, env.datastores.legacy(EU) is not None), "the vault's switch"
    )
    await until(
        lambda: asyncio.sleep(0, "waiting_for" in upgrade.details), "the upgrade to wait for it"
    )
    # The backup ends now, into format 1 (through the layout the switch moved).
    data = b"second".ljust(CHUNK, b"-")
    digest = chunk_digest(data)
    assert running.transaction is not None
    store = running.transaction.datastore
    assert not store.encrypted
    assert store is await env.jobs.datastore(running)
    if await env.jobs.missing_chunks(running, [digest]):
        stored = store.put_chunk(digest, data, Compression.NONE, CHUNK)
        env.jobs.chunk_stored(running, digest, stored, len(data))
    await env.jobs.accept_index(running, DiskIndex("root", CHUNK, CHUNK, digest))
    session.resolve(
        agent_pb2.CommandResult(
            command_id=sent.command_id, job_id=job.id, ok=True, consistency="crash",
            disks=[agent_pb2.DiskBackupResult(disk="root", size_bytes=CHUNK, chunk_count=1)],
        )
    )  # fmt: skip
    second = await env.ended(job.id)
    assert second.status == JobStatus.COMPLETED, second.error_message
    assert await read_point(env, second.recovery_point_id) == data  # from format 1, meanwhile
    done = await env.ended(upgrade.id)
    assert done.status == JobStatus.COMPLETED, done.error_message
    assert done.details["upgrade"]["recovery_points_converted"] == 2
    new = await env.datastores.get(EU)
    assert new.encrypted
    assert env.datastores.legacy(EU) is None
    for rp_id in (first.recovery_point_id, second.recovery_point_id):
        assert await env.datastores.reader(EU, rp_id) is new
    assert await read_point(env, second.recovery_point_id) == data
    assert await read_point(env, first.recovery_point_id) == (first.id.encode().ljust(CHUNK, b"-"))


async def test_verification_and_damage_are_kept_under_the_new_names(env: Controller) -> None:
    whole = await back_up(env, "vm-1")
    damaged = await back_up(env, "vm-1")
    verifier = Verifier(env.catalog, env.datastores, env.jobs, env.jobs.integrity, env.clock)
    store = await env.datastores.get(EU)
    lost = store.get_index(damaged.recovery_point_id, "root").digest_at(0)
    path = Path(store.storage.location) / chunk_key(lost)
    path.unlink()
    verify = await verifier.verify(EU, wait=True)
    assert verify.status == JobStatus.FAILED  # RecoveryPointsDamaged
    before = await env.catalog.verifications([whole.recovery_point_id, damaged.recovery_point_id])
    assert before[damaged.recovery_point_id].state is Verification.DAMAGED
    assert before[whole.recovery_point_id].state is Verification.VERIFIED
    assert await env.catalog.bad_chunks(EU) == [lost]

    job = await upgrades(env).start(EU)
    done = await env.ended(job.id)
    assert done.status == JobStatus.COMPLETED, done.error_message
    assert done.details["upgrade"]["chunks_unreadable"] == 1
    after = await env.catalog.verifications([whole.recovery_point_id, damaged.recovery_point_id])
    assert after[whole.recovery_point_id].state is Verification.VERIFIED
    assert after[whole.recovery_point_id].verified_at == before[whole.recovery_point_id].verified_at
    point = after[damaged.recovery_point_id]
    assert point.state is Verification.DAMAGED
    assert [(d.disk, d.chunk, d.digest) for d in point.damage] == [("root", 0, lost_digest(lost))]
    # The old name is forgotten; the new one is known bad (never answered "already stored").
    assert await env.catalog.bad_chunks(EU) == [lost_digest(lost)]
    assert (await env.datastores.health(EU)).is_bad(lost_digest(lost))
    assert await read_point(env, whole.recovery_point_id) == (whole.id.encode().ljust(CHUNK, b"-"))
    # A verify of the upgraded vault finds the same.
    again = await verifier.verify(EU, wait=True)
    assert again.status == JobStatus.FAILED
    assert again.details["verification"]["recovery_points_damaged"] == 1
    document = json.loads((Path(store.storage.location) / CONFIG_KEY).read_text())
    assert document["format"] == 2


async def test_a_point_deleted_during_the_upgrade_stays_deleted(env: Controller) -> None:
    kept = await back_up(env, "vm-1")
    gone = await back_up(env, "vm-1")
    runs = upgrades(env)
    runs._pause = UpgradePause("switched")
    held = await runs.start(EU)
    await until(lambda: asyncio.sleep(0, env.datastores.legacy(EU) is not None), "the switch")
    area = env.datastores.legacy(EU)
    assert area is not None
    assert area.pending == {kept.recovery_point_id, gone.recovery_point_id}
    # What a prune does (controller.pruning): from both formats, then the catalog row.
    await env.datastores.delete_recovery_point(EU, gone.recovery_point_id)
    await env.catalog.delete_recovery_point(gone.recovery_point_id)
    assert area.pending == {kept.recovery_point_id}
    assert gone.recovery_point_id not in set(area.datastore.list_recovery_point_ids())
    await env.jobs.cancel(held.id)
    cancelled = await env.ended(held.id)
    assert cancelled.status == JobStatus.CANCELLED
    upgrade = await env.catalog.upgrade(EU)
    assert upgrade is not None
    assert not upgrade.resume  # waits to be run again
    runs._pause = UpgradePause()
    done = await env.ended((await runs.start(EU)).id)
    assert done.status == JobStatus.COMPLETED, done.error_message
    assert done.details["upgrade"]["recovery_points_converted"] == 1
    assert set((await env.datastores.get(EU)).list_recovery_point_ids()) == {kept.recovery_point_id}
    assert await env.catalog.upgrade(EU) is None


async def test_soft_deleted_points_hold_the_upgrade_back_until_undeleted(env: Controller) -> None:
    point = await back_up(env, "vm-1")
    # Deleted data kept recoverable (the vault's 14 days): a tombstone of a format-1 manifest.
    deleted = await env.pruner.delete_all(EU, "vm-1", job_id="job-delete")
    assert deleted.recovery_points == [point.recovery_point_id]
    assert deleted.purge_at is not None
    runs = upgrades(env)
    with pytest.raises(Conflict) as refused:
        await runs.start(EU)
    assert "1 soft-deleted recovery points" in refused.value.message
    assert "coffer undelete" in refused.value.message
    assert (await env.datastores.get(EU)).config.format == 1  # nothing was switched
    await env.pruner.soft_delete.undelete(EU, point.recovery_point_id)
    done = await env.ended((await runs.start(EU)).id)
    assert done.status == JobStatus.COMPLETED, done.error_message
    assert await read_point(env, point.recovery_point_id)
