"""Dispatch against a real controller: reply deadlines, agents that come back, paged listings.

A real `coffer-controller` with its reply deadlines and manual backup window made short
(`[jobs]` in controller.toml), real `coffer-agent` processes, and agents played on the
generated stubs with certificates the CA issued (tests/hostile_agent.py) where the test needs
an agent to misbehave on cue. Issue 13's dispatch points: a command whose agent never answers
held its slot for ever; queued jobs of an agent that blipped failed with `AgentUnreachable`;
`ListAgents` returned the whole fleet in one reply; many-VM calls ran one commit per VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller.cli.client import Connection
from shared.rpc import agent_pb2, common_pb2, operator_pb2, operator_pb2_grpc
from tests.cluster import Cluster
from tests.hostile_agent import HostileAgent, MiB, hello_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ACKNOWLEDGE = 3.0
SILENCE = 6.0  # the real agent then heartbeats every 1.5 s: its jobs must not fail here
WINDOW = 25.0  # generous: a loaded machine must not close the blip test's window


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    config = (
        f"[jobs]\nacknowledge_seconds = {ACKNOWLEDGE}\nsilence_seconds = {SILENCE}\n"
        f"manual_window_seconds = {WINDOW}\n"
    )
    with Cluster(tmp_path_factory.mktemp("dispatch"), config=config) as running:
        yield running


@pytest.fixture(scope="module")
def stub(cluster: Cluster) -> Iterator[operator_pb2_grpc.OperatorServiceStub]:
    """The operator API itself, as another client than the CLI would call it."""
    with Connection(f"127.0.0.1:{cluster.port}", cluster.pki).channel() as channel:
        yield operator_pb2_grpc.OperatorServiceStub(channel)


class Played:
    """A played agent's session that stays online: it sends a heartbeat naming no job every
    second, as a live agent that says nothing of its jobs would."""

    def __init__(self, agent: HostileAgent) -> None:
        self.agent = agent
        self._writing = asyncio.Lock()

    async def send(self, message: agent_pb2.AgentMessage) -> None:
        async with self._writing:  # one write at a time on the stream
            await self.agent.session.write(message)

    async def acknowledge(self, job_id: str) -> None:
        await self.send(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(job_ids=[job_id])))

    async def give_up(self, command: agent_pb2.ControllerMessage) -> None:
        """Report the backup failed (`InternalError`), so the job ends."""
        error = common_pb2.Error(code="InternalError", message="the test says so")
        result = agent_pb2.CommandResult(
            command_id=command.command_id, job_id=command.backup.job_id, ok=False, error=error
        )
        await self.send(agent_pb2.AgentMessage(result=result))

    async def read(self, within: float = 20.0) -> agent_pb2.ControllerMessage:
        async with asyncio.timeout(within):
            message: agent_pb2.ControllerMessage = await self.agent.session.read()
        return message

    async def _beat(self) -> None:
        sequence = 0
        while True:
            sequence += 1
            await self.send(
                agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(sequence=sequence))
            )
            await asyncio.sleep(1.0)


@contextlib.asynccontextmanager
async def played(cluster: Cluster, vm_id: str, region: str) -> AsyncIterator[Played]:
    """VM `vm_id` of `region` in session, its agent played by the test."""
    hello = hello_for(vm_id)
    hello.region = region
    async with HostileAgent(cluster, vm_id, hello) as agent:
        await agent.accepted()
        session = Played(agent)
        beating = asyncio.create_task(session._beat())
        try:
            yield session
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await beating


async def protect(
    stub: operator_pb2_grpc.OperatorServiceStub, region: str, vms: list[str], limit: int = 0
) -> None:
    """A vault for `region` (named so) with `vms` registered and protected, through the API
    (a CLI process per step would make the test slow, not truer)."""

    def steps() -> None:
        stub.CreateVault(
            operator_pb2.CreateVaultRequest(
                name=region, region=region, max_concurrent_backups=limit
            )
        )
        stub.Register(operator_pb2.ItemsRequest(vault=region, vms=vms))
        stub.Protect(operator_pb2.ProtectRequest(vault=region, vms=vms))

    await asyncio.to_thread(steps)


async def coffer(cluster: Cluster, *args: str, check: bool = True) -> Any:
    return await asyncio.to_thread(cluster.coffer, *args, check=check)


async def backup_now(cluster: Cluster, vm_id: str) -> str:
    [job] = await coffer(cluster, "backup-now", vm_id, "--no-wait")
    return str(job["id"])


async def ended(cluster: Cluster, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = await coffer(cluster, "job", "watch", job_id, check=False)
    return job


# --- reply deadlines -------------------------------------------------------------------------


async def test_an_agent_silent_about_a_command_it_took_fails_the_job_and_frees_its_slot(
    cluster: Cluster, stub: operator_pb2_grpc.OperatorServiceStub
) -> None:
    """The vault has one slot; its agent takes the command and then says nothing of it (its
    session lives on): the job fails with AgentSilent after the deadline, the agent is told
    to cancel, and the backup queued behind it gets the slot."""
    async with played(cluster, "mute-1", "mute") as mute, played(cluster, "next-1", "mute") as nxt:
        await protect(stub, "mute", ["mute-1", "next-1"], limit=1)
        first = await backup_now(cluster, "mute-1")
        command = await mute.read()
        assert command.backup.job_id == first
        await mute.acknowledge(first)
        took = time.monotonic()
        second = await backup_now(cluster, "next-1")
        job = await coffer(cluster, "job", "show", second)
        assert job["details"]["phase"] == "Queued", job  # behind the silent one

        failed = await ended(cluster, first)
        assert (failed["status"], failed["error_code"]) == ("Failed", "AgentSilent"), failed
        assert f"has said nothing of job {first} for {SILENCE:g} s" in failed["error_message"]
        assert "its slot was freed" in failed["error_message"]
        assert time.monotonic() - took >= SILENCE - 0.5
        cancel = await mute.read()
        assert cancel.cancel.job_id == first

        # The slot is free: the queued backup is sent at once.
        sent = await nxt.read(within=5)
        assert sent.backup.job_id == second
        await nxt.give_up(sent)
        assert (await ended(cluster, second))["status"] == "Failed"


async def test_a_command_the_agent_never_acknowledges_fails_after_its_deadline(
    cluster: Cluster, stub: operator_pb2_grpc.OperatorServiceStub
) -> None:
    async with played(cluster, "deaf-1", "deaf") as deaf:
        await protect(stub, "deaf", ["deaf-1"])
        job_id = await backup_now(cluster, "deaf-1")
        assert (await deaf.read()).backup.job_id == job_id
        failed = await ended(cluster, job_id)
        assert (failed["status"], failed["error_code"]) == ("Failed", "AgentSilent"), failed
        assert (
            f"did not acknowledge job {job_id} within {ACKNOWLEDGE:g} s"
            in (failed["error_message"])
        )


# --- agents that come back -------------------------------------------------------------------


async def test_a_backup_whose_agent_left_before_taking_it_waits_for_the_next_session(
    cluster: Cluster, stub: operator_pb2_grpc.OperatorServiceStub
) -> None:
    """The agent gets the command and drops before it acknowledges (a blip): the backup goes
    back to its queue, not to failure, and the agent's next session gets it."""
    async with played(cluster, "blip-1", "blip") as blip:
        await protect(stub, "blip", ["blip-1"])
        job_id = await backup_now(cluster, "blip-1")
        assert (await blip.read()).backup.job_id == job_id
    # The session is gone, unacknowledged.
    await asyncio.sleep(0.5)
    waiting = await coffer(cluster, "job", "show", job_id)
    assert (waiting["status"], waiting["details"].get("phase")) == ("InProgress", "Queued")
    async with played(cluster, "blip-1", "blip") as back:
        again = await back.read()
        assert again.backup.job_id == job_id  # the same job, sent again
        await back.give_up(again)
    assert (await ended(cluster, job_id))["error_code"] == "InternalError"  # the test's own


async def test_queued_backups_of_agents_that_dropped_run_when_they_come_back(
    cluster: Cluster, stub: operator_pb2_grpc.OperatorServiceStub, tmp_path: Path
) -> None:
    """Real agents stop; backups asked for meanwhile are queued (not refused), and every one
    completes once the agents are back."""
    vms = [f"back-{n}" for n in range(2)]
    for vm in vms:
        disk = tmp_path / f"{vm}.img"
        disk.write_bytes(os.urandom(MiB))
        await asyncio.to_thread(cluster.add_agent, vm, {"root": disk}, region="back")
    await protect(stub, "back", vms)
    for vm in vms:
        await asyncio.to_thread(cluster.agents[vm].process.stop)
    for vm in vms:
        await asyncio.to_thread(cluster.wait_online, vm, 20, False)
    queued = await coffer(cluster, "backup-now", *vms, "--no-wait")
    assert len(queued) == len(vms)
    for job in queued:
        assert (job["status"], job["details"].get("phase")) == ("InProgress", "Queued"), job
    for vm in vms:
        await asyncio.to_thread(cluster.start_agent, vm)
    done = [await ended(cluster, job["id"]) for job in queued]
    assert [job["status"] for job in done] == ["Completed"] * len(vms), done


async def test_a_backup_whose_agent_never_comes_back_fails_when_its_window_closes(
    cluster: Cluster, stub: operator_pb2_grpc.OperatorServiceStub
) -> None:
    async with played(cluster, "gone-1", "gone"):
        await protect(stub, "gone", ["gone-1"])
    asked = time.monotonic()
    job_id = await backup_now(cluster, "gone-1")
    failed = await ended(cluster, job_id)
    assert (failed["status"], failed["error_code"]) == ("Failed", "BackupWindowMissed"), failed
    assert "did not come back within the window" in failed["error_message"]
    assert time.monotonic() - asked >= WINDOW - 1


# --- many VMs: batched calls, paged listings -------------------------------------------------


async def test_many_vms_register_and_protect_in_one_call_and_agents_list_in_pages(
    cluster: Cluster, stub: operator_pb2_grpc.OperatorServiceStub
) -> None:
    vms = [f"fleet-{n:02d}" for n in range(7)]
    async with contextlib.AsyncExitStack() as stack:
        for vm in vms:
            await stack.enter_async_context(played(cluster, vm, "fleet"))
        await coffer(cluster, "vault", "create", "fleet", "--region", "fleet")
        registered = await coffer(cluster, "register", "--vault", "fleet", *vms)
        assert sorted(job["vm_id"] for job in registered) == vms
        assert {job["status"] for job in registered} == {"Completed"}
        protected = await coffer(cluster, "protect", "--vault", "fleet", *vms)
        assert {job["status"] for job in protected} == {"Completed"}
        items = await coffer(cluster, "items", "--vault", "fleet")
        assert [(i["vm_id"], i["state"]) for i in items] == [
            (vm, "Protected (pending initial backup)") for vm in vms
        ]

        # Every enrolled VM exactly once across pages of 3, in one stable order.
        every = [a["vm_id"] for a in await coffer(cluster, "agents", "--all")]
        seen: list[str] = []
        token = ""
        while True:
            reply = stub.ListAgents(operator_pb2.ListAgentsRequest(page_size=3, page_token=token))
            assert len(reply.agents) <= 3
            assert reply.total == len(every)
            seen += [a.vm_id for a in reply.agents]
            if not (token := reply.next_page_token):
                break
        assert seen == every
        assert len(set(seen)) == len(seen)
        assert set(vms) <= set(seen)

        with pytest.raises(grpc.RpcError) as refused:
            stub.ListAgents(operator_pb2.ListAgentsRequest(page_token="not-a-token"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # Items page the same way.
        seen_items: list[str] = []
        token = ""
        while True:
            page = stub.ListItems(
                operator_pb2.ListItemsRequest(vault="fleet", page_size=3, page_token=token)
            )
            seen_items += [i.vm_id for i in page.items]
            if not (token := page.next_page_token):
                break
        assert seen_items == vms
