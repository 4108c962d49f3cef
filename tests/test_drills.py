"""Restore drills and restores to another VM, in the controller: settings, schedule, who reads.

The controller's parts in one process on a manual clock (`tests.test_protection.controller`)
behind the real gRPC edge (`tests.served`), with real certificates: the test plays the agents,
answering their commands and calling the data path as each of them. What is checked: drill
settings are refused outside the vault's region or the agent's restore_dirs; a drill runs at
its slot on the drill agent and is recorded on the recovery point; a damaged file system
fails the drill with the checker's words; and only the agent doing a restore (the target VM's,
the drill agent) reads the restored disk's chunks, the source VM's agent none.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from controller.catalog import JobRecord
from controller.drills import Drills
from shared.digest import chunk_digest
from shared.errors import InvalidArgument, PathNotAllowed, RestoreRegionMismatch
from shared.model import DrillOutcome, JobStatus, Operation, RestoreMode, Trigger
from shared.rpc import agent_pb2, agent_pb2_grpc
from tests.served import Served, served
from tests.test_protection import (
    CHUNK,
    DB,
    MONDAY_NOON,
    SHOP_WEB,
    VMS,
    Controller,
    command,
    store_recovery_point,
    ts,
)

pytestmark = pytest.mark.timeout(60)

EU = "eu"
DRILLER = "vm-drill"
RESTORE_DIR = "/srv/coffer/restore"
TUESDAY_4AM = ts(2025, 3, 4, 4)


@dataclass
class Env:
    served: Served
    drills: Drills

    @property
    def env(self) -> Controller:
        return self.served.env

    async def ended(self, job: JobRecord) -> JobRecord:
        return await self.served.env.ended(job.id)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[Env]:
    async with served(tmp_path) as running:
        env = running.env
        drills = Drills(env.catalog, env.jobs, env.protection, env.clock)
        await drills.plan_all()
        await env.create_vault(EU, "eu-west")
        await env.enrol_all(VMS)
        await env.catalog.upsert_agent(
            vm_id=DRILLER, name="drill-1", service="ops", region="eu-west", hostname="d.lab",
            agent_version="test", disks=[], now=env.clock.now(), restore_dirs=[RESTORE_DIR],
        )  # fmt: skip
        await env.connect(DRILLER)
        await env.protected(EU, SHOP_WEB)
        yield Env(running, drills)


def rp_chunk(rp_id: str) -> bytes:
    """The digest of the one chunk `store_recovery_point` gives a recovery point."""
    return chunk_digest(rp_id.encode().ljust(CHUNK, b"."))


async def rpc_error(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    code: grpc.StatusCode = refused.value.code()
    return code


async def read_index(world: Env, as_vm: str, job_id: str, rp_id: str) -> bytes:
    async with world.served.channel(world.served.agent_tls(as_vm)) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        request = agent_pb2.FetchIndexRequest(job_id=job_id, recovery_point_id=rp_id, disk="root")
        return b"".join([part.digests async for part in stub.FetchIndex(request)])


async def download(world: Env, as_vm: str, job_id: str, digest: bytes) -> int:
    async with world.served.channel(world.served.agent_tls(as_vm)) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        request = agent_pb2.DownloadRequest(job_id=job_id, digests=[digest])
        return sum([len(batch.chunks) async for batch in stub.DownloadChunks(request)])


def drilled(
    message: agent_pb2.ControllerMessage, verdict: str, tail: str = ""
) -> agent_pb2.CommandResult:
    """The drill agent's answer: restored in 1.5 s, its ext4 checked with `verdict`."""
    return agent_pb2.CommandResult(
        command_id=message.command_id,
        job_id=message.restore.job_id,
        ok=True,
        bytes_written=CHUNK,
        restore=agent_pb2.RestoreResult(
            bytes_fetched=100,
            bytes_written=CHUNK,
            seconds=1.5,
            target_path=message.restore.target_path,
            checks=[
                agent_pb2.FileSystemCheck(
                    where="whole disk", fstype="ext4", command="e2fsck -fn",
                    exit_code=0 if verdict == "clean" else 4, verdict=verdict, output_tail=tail,
                )
            ],
        ),
    )  # fmt: skip


async def test_drill_settings_are_checked_before_anything_changes(world: Env) -> None:
    drills = world.drills
    with pytest.raises(RestoreRegionMismatch):
        await drills.configure(EU, agent=DB, directory=RESTORE_DIR)
    with pytest.raises(PathNotAllowed):
        await drills.configure(EU, agent=DRILLER, directory="/etc")
    with pytest.raises(PathNotAllowed):
        await drills.configure(EU, agent=DRILLER, directory=f"{RESTORE_DIR}/../../etc")
    with pytest.raises(InvalidArgument, match="drill schedule"):
        await drills.configure(EU, agent=DRILLER, directory=RESTORE_DIR, schedule="sometimes")
    with pytest.raises(InvalidArgument, match="drill agent and a directory"):
        await drills.configure(EU, schedule="weekly sun 04:00")
    assert (await world.env.catalog.vault(EU)).drill is None
    assert drills.next_at(EU) is None


async def test_a_scheduled_drill_runs_on_the_drill_agent_and_is_recorded(world: Env) -> None:
    env = world.env
    await store_recovery_point(env, EU, SHOP_WEB, "rp-old", MONDAY_NOON - 7200)
    await store_recovery_point(env, EU, SHOP_WEB, "rp-new", MONDAY_NOON - 3600)
    vault = await world.drills.configure(
        EU, agent="drill-1", directory=f"{RESTORE_DIR}/drills", schedule="weekly tue 04:00"
    )
    assert vault.drill is not None
    assert vault.drill.agent == DRILLER  # a name resolves to the VM id
    assert world.drills.next_at(EU) == TUESDAY_4AM

    env.clock.set(TUESDAY_4AM + 60)
    env.protection.scheduler.changed()
    sent = await command(env.sessions[DRILLER])
    restore = sent.restore
    assert restore.mode == agent_pb2.RESTORE_MODE_DRILL
    assert (restore.recovery_point_id, restore.disk) == ("rp-new", "root")  # the latest
    assert restore.target_path.startswith(f"{RESTORE_DIR}/drills/coffer-drill-")
    [job] = [j for j in env.jobs.running_jobs() if j.operation is Operation.RESTORE_DRILL]
    assert (job.vm_id, job.trigger) == (SHOP_WEB, Trigger.SCHEDULED)
    assert job.restore is not None
    assert (job.restore.target_vm_id, job.restore.mode) == (DRILLER, RestoreMode.DRILL)

    # The drill agent reads the drilled disk, and only it; the VM drilled reads nothing.
    assert await read_index(world, DRILLER, job.id, "rp-new") == rp_chunk("rp-new")
    assert await download(world, DRILLER, job.id, rp_chunk("rp-new")) == 1
    refused = download(world, DRILLER, job.id, rp_chunk("rp-old"))
    assert await rpc_error(refused) == grpc.StatusCode.PERMISSION_DENIED
    refused = read_index(world, SHOP_WEB, job.id, "rp-new")
    assert await rpc_error(refused) == grpc.StatusCode.PERMISSION_DENIED

    env.sessions[DRILLER].resolve(drilled(sent, "clean"))
    ended = await world.ended(job)
    assert ended.status is JobStatus.COMPLETED, ended.error_message
    assert (ended.bytes_written, ended.bytes_fetched) == (CHUNK, 100)
    rp = await env.catalog.recovery_point("rp-new")
    assert rp.drill is not None
    assert (rp.drill.outcome, rp.drill.seconds, rp.drill.job_id) == (
        DrillOutcome.CLEAN,
        1.5,
        job.id,
    )
    assert rp.drill.summary == "root: ext4 (whole disk) clean"
    assert (await env.catalog.recovery_point("rp-old")).drill is None
    assert (await env.catalog.vault(EU)).drill.last_slot == TUESDAY_4AM  # type: ignore[union-attr]
    assert world.drills.next_at(EU) == TUESDAY_4AM + 7 * 86400


async def test_a_damaged_file_system_fails_the_drill_with_the_checkers_words(
    world: Env,
) -> None:
    env = world.env
    await store_recovery_point(env, EU, SHOP_WEB, "rp-1", MONDAY_NOON - 3600)
    await world.drills.configure(EU, agent=DRILLER, directory=RESTORE_DIR)
    [job] = await world.drills.run(EU)
    sent = await command(env.sessions[DRILLER])
    tail = "Entry 'victim.txt' in / (2) has deleted/unused inode 12.  Clear? no"
    env.sessions[DRILLER].resolve(drilled(sent, "damaged", tail))
    ended = await world.ended(job)
    assert (ended.status, ended.error_code) == (JobStatus.FAILED, "RestoreDrillFailed")
    assert "root: ext4 (whole disk) damaged (e2fsck -fn exit 4)" in ended.error_message
    assert tail in ended.error_message
    rp = await env.catalog.recovery_point("rp-1")
    assert rp.drill is not None
    assert rp.drill.outcome is DrillOutcome.DAMAGED


async def test_drills_of_one_drill_agent_run_one_at_a_time(world: Env) -> None:
    env = world.env
    await env.connect("vm-blog-web")
    await env.protected(EU, "vm-blog-web")
    await store_recovery_point(env, EU, SHOP_WEB, "rp-a", MONDAY_NOON - 3600)
    await store_recovery_point(env, EU, "vm-blog-web", "rp-b", MONDAY_NOON - 3600)
    await world.drills.configure(EU, agent=DRILLER, directory=RESTORE_DIR)
    jobs = await world.drills.run(EU)
    assert len(jobs) == 2
    first = await command(env.sessions[DRILLER])
    await asyncio.sleep(0.3)
    assert env.sessions[DRILLER].outbox.empty()  # the second waits for the first
    waiting = next(j for j in jobs if j.id != first.restore.job_id)
    assert waiting.details.get("phase") == "Waiting for the drill agent"
    env.sessions[DRILLER].resolve(drilled(first, "clean"))
    second = await command(env.sessions[DRILLER])
    assert second.restore.job_id == waiting.id
    env.sessions[DRILLER].resolve(drilled(second, "clean"))
    for job in jobs:
        assert (await world.ended(job)).status is JobStatus.COMPLETED


async def test_a_waiting_drill_is_cancelled_at_once(world: Env) -> None:
    env = world.env
    await env.connect("vm-blog-web")
    await env.protected(EU, "vm-blog-web")
    await store_recovery_point(env, EU, SHOP_WEB, "rp-a", MONDAY_NOON - 3600)
    await store_recovery_point(env, EU, "vm-blog-web", "rp-b", MONDAY_NOON - 3600)
    await world.drills.configure(EU, agent=DRILLER, directory=RESTORE_DIR)
    jobs = await world.drills.run(EU)
    first = await command(env.sessions[DRILLER])
    waiting = next(j for j in jobs if j.id != first.restore.job_id)
    await env.jobs.cancel(waiting.id)
    ended = await world.ended(waiting)
    assert ended.status is JobStatus.CANCELLED
    env.sessions[DRILLER].resolve(drilled(first, "clean"))


async def test_a_restore_to_another_vm_is_read_by_that_vms_agent_only(world: Env) -> None:
    env = world.env
    await store_recovery_point(env, EU, SHOP_WEB, "rp-1", MONDAY_NOON - 3600)
    with pytest.raises(RestoreRegionMismatch):
        await env.jobs.restore(SHOP_WEB, "rp-1", "root", "/r/x.img", DB)
    job = await env.jobs.restore(SHOP_WEB, "rp-1", "root", f"{RESTORE_DIR}/x.img", DRILLER)
    sent = await command(env.sessions[DRILLER])
    assert sent.restore.mode == agent_pb2.RESTORE_MODE_NEW_IMAGE
    assert job.vm_id == DRILLER
    assert job.restore is not None
    assert (job.restore.source_vm_id, job.restore.target_path) == (SHOP_WEB, f"{RESTORE_DIR}/x.img")
    assert await read_index(world, DRILLER, job.id, "rp-1") == rp_chunk("rp-1")
    # The source VM's agent takes no part: it cannot read the job's disk.
    for call in (
        read_index(world, SHOP_WEB, job.id, "rp-1"),
        download(world, SHOP_WEB, job.id, rp_chunk("rp-1")),
    ):
        assert await rpc_error(call) == grpc.StatusCode.PERMISSION_DENIED
    env.sessions[DRILLER].resolve(
        agent_pb2.CommandResult(
            command_id=sent.command_id, job_id=job.id, ok=True, bytes_written=CHUNK,
            restore=agent_pb2.RestoreResult(bytes_fetched=99, bytes_written=CHUNK),
        )
    )  # fmt: skip
    ended = await world.ended(job)
    assert ended.status is JobStatus.COMPLETED
    assert (ended.bytes_fetched, ended.bytes_written, ended.bytes_read) == (99, CHUNK, 99)
