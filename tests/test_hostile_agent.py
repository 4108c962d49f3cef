"""A hostile agent against a real controller: what one agent can make it hold, learn or record.

A real `coffer-controller` process and agents played on the generated stubs with certificates
the CA issued (tests/hostile_agent.py), each during its own backup job, as an agent that turned
hostile would be. Issue 14's "Seen" points: memory one agent could take (index and upload
streams, huge messages, a huge hello), content of other VMs it could confirm and restore, values
that broke the record, and text that reached an operator's terminal raw. docs/hostile-agent.md
has the measured worst case (tests/bench/hostile.py).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from shared.rpc import agent_pb2, common_pb2
from tests.cluster import CliError, Cluster
from tests.hostile_agent import (
    GiB,
    HostileAgent,
    MiB,
    chunk,
    error_code,
    hello_for,
    huge_hello,
    zero_index,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("hostile")) as running:
        yield running


async def _watch(cluster: Cluster, job_id: str) -> dict[str, object]:
    job: dict[str, object] = await asyncio.to_thread(
        cluster.coffer, "job", "watch", job_id, check=False
    )
    return job


async def _points(cluster: Cluster, vm_id: str) -> list[dict[str, object]]:
    points: list[dict[str, object]] = await asyncio.to_thread(cluster.coffer, "rp", "list", vm_id)
    return points


def _listed(cluster: Cluster) -> set[str]:
    return {a["vm_id"] for a in cluster.coffer("agents")}


class Holding:
    """A client stream that sends `first` and then waits until released: a stream the
    controller sees open, as long as the test wants."""

    def __init__(self, first: object) -> None:
        self.first = first
        self.release = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[object]:
        yield self.first
        await self.release.wait()


# --- memory: streams, messages, the hello --------------------------------------------------


async def test_a_job_has_one_index_stream_at_a_time(cluster: Cluster) -> None:
    """Six concurrent index streams of one job took the controller's memory (issue 14): the
    second is refused, and the job fails, so the agent holds nothing more through it."""
    async with HostileAgent(cluster, "streams-1") as agent:
        backup = (await agent.backup_command()).backup
        header = agent_pb2.IndexPart(
            job_id=backup.job_id, disk="root", size_bytes=MiB, chunk_size=backup.chunk_size
        )
        holding = Holding(header)
        first = asyncio.ensure_future(agent.stub.PutIndex(holding.__aiter__()))
        await asyncio.sleep(1.0)  # the controller has taken the first stream's header
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await agent.put_index(
                backup.job_id, "root", MiB, backup.chunk_size, zero_index(MiB, backup.chunk_size)
            )
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_code(refused.value) == "AgentLimitExceeded"
        assert "one index stream at a time" in (refused.value.details() or "")
        holding.release.set()
        with pytest.raises(grpc.aio.AioRpcError):
            await first  # the job has ended: its first stream is refused too
        job = await _watch(cluster, backup.job_id)
    assert (job["status"], job["error_code"]) == ("Failed", "AgentLimitExceeded")
    assert await _points(cluster, "streams-1") == []


async def test_a_job_has_one_upload_stream_at_a_time(cluster: Cluster) -> None:
    async with HostileAgent(cluster, "streams-2") as agent:
        backup = (await agent.backup_command()).backup
        data = os.urandom(4096)
        holding = Holding(
            agent_pb2.ChunkUpload(job_id=backup.job_id, chunks=[chunk(data, backup.chunk_id_key)])
        )
        first = asyncio.ensure_future(agent.stub.UploadChunks(holding.__aiter__()))
        await asyncio.sleep(1.0)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await agent.upload(backup.job_id, [os.urandom(4096)], backup.chunk_id_key)
        assert error_code(refused.value) == "AgentLimitExceeded"
        holding.release.set()
        await asyncio.gather(first, return_exceptions=True)
        job = await _watch(cluster, backup.job_id)
    assert (job["status"], job["error_code"]) == ("Failed", "AgentLimitExceeded")


async def test_an_agent_has_a_few_calls_of_each_kind_open_at_most(cluster: Cluster) -> None:
    """Calls over an agent's limit are refused before the controller reads their messages
    (24 concurrent 30 MiB upload streams took its memory to 1 GB)."""
    async with HostileAgent(cluster, "calls-1") as agent:
        await agent.accepted()
        never = asyncio.Event()

        async def nothing() -> AsyncIterator[agent_pb2.ChunkUpload]:
            await never.wait()
            yield agent_pb2.ChunkUpload()

        calls = [asyncio.ensure_future(agent.stub.UploadChunks(nothing())) for _ in range(5)]
        done, pending = await asyncio.wait(calls, timeout=10)
        refused = [call.exception() for call in done]
        assert len(refused) == 3
        assert len(pending) == 2
        for error in refused:
            assert isinstance(error, grpc.aio.AioRpcError)
            assert error_code(error) == "AgentLimitExceeded"
        for call in pending:
            call.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def test_messages_are_no_larger_than_the_protocol_needs(cluster: Cluster) -> None:
    """A message is at most one chunk (16 MiB) and a little: 30 MiB ones were taken whole,
    gzip or not."""
    async with HostileAgent(cluster, "big-1") as agent:
        command = await agent.backup_command()
        backup = command.backup
        zeros = chunk(bytes(backup.chunk_size), backup.chunk_id_key)
        message = agent_pb2.ChunkUpload(
            job_id=backup.job_id, chunks=[zeros] * (30 * MiB // backup.chunk_size)
        )

        async def one() -> AsyncIterator[agent_pb2.ChunkUpload]:
            yield message

        for compression in (None, grpc.Compression.Gzip):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await agent.stub.UploadChunks(one(), compression=compression)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in (refused.value.details() or "")
        await agent.give_up(command)


async def test_an_index_larger_than_the_declared_disk_is_refused(cluster: Cluster) -> None:
    """An all-zero index for a claimed 256 GiB disk was committed as a 256 GiB recovery point
    of a VM that declared a 1 MiB disk."""
    async with HostileAgent(cluster, "liar-1") as agent:
        command = await agent.backup_command()
        backup = command.backup
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await agent.put_index(
                backup.job_id, "root", 256 * GiB, backup.chunk_size,
                zero_index(256 * GiB, backup.chunk_size), compression=grpc.Compression.Gzip,
            )  # fmt: skip
        assert error_code(refused.value) == "InvalidArgument"
        assert "declared the disk 1048576 bytes large" in (refused.value.details() or "")
        await agent.result(command, [agent_pb2.DiskBackupResult(disk="root")])
        job = await _watch(cluster, backup.job_id)
    assert job["status"] == "Failed"
    assert await _points(cluster, "liar-1") == []


async def test_an_index_of_a_disk_the_hello_never_named_is_refused(cluster: Cluster) -> None:
    async with HostileAgent(cluster, "ghost-1") as agent:
        command = await agent.backup_command()
        backup = command.backup
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await agent.put_index(
                backup.job_id, "ghost", MiB, backup.chunk_size, zero_index(MiB, backup.chunk_size)
            )
        assert error_code(refused.value) == "InvalidArgument"
        assert "not for a disk 'ghost'" in (refused.value.details() or "")
        await agent.give_up(command)
        await _watch(cluster, backup.job_id)
    store = cluster.datastore("lab")
    assert not list(store.glob("indexes/*/ghost.didx"))


async def test_a_huge_hello_is_refused_and_nothing_of_it_stored(cluster: Cluster) -> None:
    """A 30 MB hello (an 8 MiB host name, 20,000 disks) was accepted and stored."""
    async with HostileAgent(cluster, "huge-1", huge_hello("huge-1")) as agent:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await agent.accepted()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "huge-1" not in await asyncio.to_thread(_listed, cluster)


def _bad_hellos() -> list[tuple[str, agent_pb2.Hello, str]]:
    cases = []

    def case(vm_id: str, why: str, **changes: object) -> None:
        hello = hello_for(vm_id)
        for key, value in changes.items():
            setattr(hello, key, value)
        cases.append((vm_id, hello, why))

    case("hello-name-1", "not printable", name="web\x1b]0;owned\x07\x1b[2J")
    case("hello-name-2", "at most 64", name="n" * 65)
    case("hello-host-1", "host name", hostname="h" * 300)
    case("hello-service-1", "service", service="shop floor")
    case("hello-region-1", "region", region="eu/west")
    case("hello-version-1", "agent version", agent_version="1.0\n")
    many = hello_for("hello-disks-1", [(f"d{i}", MiB) for i in range(65)])
    cases.append(("hello-disks-1", many, "at most 64"))
    big = hello_for("hello-size-1", [("root", 1 << 50)])
    cases.append(("hello-size-1", big, "larger than Coffer backs up"))
    path = hello_for("hello-path-1")
    path.disks[0].path = "/dev/" + "p" * 5000
    cases.append(("hello-path-1", path, "at most 4096"))
    return cases


@pytest.mark.parametrize(("vm_id", "hello", "why"), _bad_hellos(), ids=lambda v: str(v)[:20])
async def test_every_field_of_the_hello_is_checked(
    cluster: Cluster, vm_id: str, hello: agent_pb2.Hello, why: str
) -> None:
    async with HostileAgent(cluster, vm_id, hello) as agent:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await agent.accepted()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert why in (refused.value.details() or "")
    assert vm_id not in await asyncio.to_thread(_listed, cluster)


async def test_sessions_opened_too_fast_are_refused(cluster: Cluster) -> None:
    """Each session writes the hello into the catalog: an agent reconnecting in a loop is
    held to the rate a real one never reaches."""
    codes = []
    for _ in range(15):
        try:
            # A refused session may end before the hello is written: either raises.
            async with HostileAgent(cluster, "loop-1") as agent:
                await agent.accepted()
                codes.append("accepted")
        except grpc.aio.AioRpcError as error:
            codes.append(error_code(error))
    assert "AgentLimitExceeded" in codes
    assert codes[0] == "accepted"


# --- content of other VMs -----------------------------------------------------------------


async def test_dedup_answers_only_for_what_the_vm_stored_itself(cluster: Cluster) -> None:
    """MissingChunks answered for the whole vault, and an index naming another VM's chunks
    was committed and restorable by a VM that never had the data."""
    data = os.urandom(64 << 10)
    async with (
        HostileAgent(cluster, "keeper-2") as keeper,
        HostileAgent(cluster, "prober-2") as prober,
    ):
        kept_command = await keeper.backup_command("shared-by-two")
        kept = kept_command.backup
        probe_command = await prober.backup_command("shared-by-two")
        probe = probe_command.backup
        assert kept.chunk_id_key == probe.chunk_id_key  # one vault: one naming of content
        name = chunk(data, kept.chunk_id_key).digest
        await keeper.upload(kept.job_id, [data], kept.chunk_id_key)
        assert cluster.open_datastore("shared-by-two").has_chunk(name)

        asked = await prober.stub.MissingChunks(
            agent_pb2.MissingChunksRequest(job_id=probe.job_id, digests=[name])
        )
        assert list(asked.missing) == [name]  # not confirmed: the prober never stored it
        own = await keeper.stub.MissingChunks(
            agent_pb2.MissingChunksRequest(job_id=kept.job_id, digests=[name])
        )
        assert list(own.missing) == []

        size = probe.chunk_size
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await prober.put_index(probe.job_id, "root", size, size, name)
        assert error_code(refused.value) == "ChunkMissing"
        assert "did not upload in this backup" in (refused.value.details() or "")

        # Once it sends the content it is its own; the datastore keeps the one copy.
        summary = await prober.upload(probe.job_id, [data], probe.chunk_id_key)
        assert (summary.chunks_received, summary.chunks_stored, summary.bytes_stored) == (1, 0, 0)
        reply = await prober.put_index(probe.job_id, "root", size, size, name)
        assert reply.chunk_count == 1
        await keeper.give_up(kept_command)
        await prober.give_up(probe_command)
        await _watch(cluster, kept.job_id)
        await _watch(cluster, probe.job_id)


async def test_a_vault_made_one_trust_domain_dedups_across_its_vms(cluster: Cluster) -> None:
    data = os.urandom(64 << 10)
    async with (
        HostileAgent(cluster, "keeper-3") as keeper,
        HostileAgent(cluster, "prober-3") as prober,
    ):
        kept_command = await keeper.backup_command("one-domain")
        kept = kept_command.backup
        await keeper.upload(kept.job_id, [data], kept.chunk_id_key)
        await keeper.give_up(kept_command)
        await _watch(cluster, kept.job_id)
        updated = await asyncio.to_thread(
            cluster.coffer, "vault", "update", "one-domain", "--shared-dedup", "on"
        )
        assert updated["shared_dedup"] is True
        probe_command = await prober.backup_command("one-domain")
        probe = probe_command.backup
        name = chunk(data, probe.chunk_id_key).digest
        asked = await prober.stub.MissingChunks(
            agent_pb2.MissingChunksRequest(job_id=probe.job_id, digests=[name])
        )
        assert list(asked.missing) == []
        await prober.give_up(probe_command)
        await _watch(cluster, probe.job_id)


async def test_the_vms_own_previous_point_counts_as_stored(cluster: Cluster) -> None:
    """Isolation costs nothing within one VM: its next backup is told what its previous
    recovery point holds (once it fetched that point's index, as a real agent does)."""
    data = os.urandom(64 << 10)
    async with HostileAgent(cluster, "again-1") as agent:
        command = await agent.backup_command()
        backup = command.backup
        name = chunk(data, backup.chunk_id_key).digest
        await agent.upload(backup.job_id, [data], backup.chunk_id_key)
        size = backup.chunk_size
        hello_disk = agent.hello.disks[0].size_bytes
        digests = name + zero_index(hello_disk - size, size)
        await agent.put_index(backup.job_id, "root", hello_disk, size, digests)
        await agent.result(command, [agent_pb2.DiskBackupResult(disk="root", consistency="crash")])
        assert (await _watch(cluster, backup.job_id))["status"] == "Completed"

        await asyncio.to_thread(cluster.coffer, "backup-now", "again-1", "--no-wait")
        second = await asyncio.wait_for(agent.session.read(), 20)
        base = [
            part.digests
            async for part in agent.stub.FetchIndex(
                agent_pb2.FetchIndexRequest(
                    job_id=second.backup.job_id,
                    recovery_point_id=second.backup.previous_recovery_point_id,
                    disk="root",
                )
            )
        ]
        assert b"".join(base)[:32] == name
        asked = await agent.stub.MissingChunks(
            agent_pb2.MissingChunksRequest(job_id=second.backup.job_id, digests=[name])
        )
        assert list(asked.missing) == []
        await agent.give_up(second)
        await _watch(cluster, second.backup.job_id)


# --- values that break the record ---------------------------------------------------------


async def test_a_count_out_of_range_fails_the_job_and_commits_nothing(cluster: Cluster) -> None:
    """bytes_read = 2^63 committed the recovery point and left the job InProgress for good."""
    data = os.urandom(64 << 10)
    async with HostileAgent(cluster, "counts-1") as agent:
        command = await agent.backup_command()
        backup = command.backup
        await agent.upload(backup.job_id, [data], backup.chunk_id_key)
        size = agent.hello.disks[0].size_bytes
        digests = chunk(data, backup.chunk_id_key).digest + zero_index(
            size - backup.chunk_size, backup.chunk_size
        )
        await agent.put_index(backup.job_id, "root", size, backup.chunk_size, digests)
        await agent.result(
            command,
            [agent_pb2.DiskBackupResult(disk="root", bytes_read=1 << 63, consistency="crash")],
        )
        job = await _watch(cluster, backup.job_id)
    assert (job["status"], job["error_code"]) == ("Failed", "InvalidArgument")
    assert "out of range" in str(job["error_message"])
    assert await _points(cluster, "counts-1") == []
    with pytest.raises(CliError) as ended:
        await asyncio.to_thread(cluster.coffer, "job", "cancel", backup.job_id)
    assert "has already ended (Failed)" in ended.value.result.stderr


# --- what reaches an operator's terminal ----------------------------------------------------


async def test_names_and_messages_of_agents_reach_the_terminal_escaped(cluster: Cluster) -> None:
    """A display name `[/]` stopped `coffer items` and `coffer job list` with a traceback; an
    agent's message holding escape sequences reached the terminal raw."""
    hello = hello_for("marked-1")
    hello.name = "[/]"
    async with HostileAgent(cluster, "marked-1", hello) as agent:
        command = await agent.backup_command("lab")
        await agent.session.write(
            agent_pb2.AgentMessage(
                result=agent_pb2.CommandResult(
                    command_id=command.command_id,
                    job_id=command.backup.job_id,
                    ok=False,
                    error=common_pb2.Error(
                        code="InternalError", message="\x1b]0;owned\x07\x1b[2Jgone [bold]"
                    ),
                )
            )
        )
        await _watch(cluster, command.backup.job_id)
    for args in (
        ("items", "--vault", "lab"),
        ("job", "list", "--vm", "marked-1"),
        ("job", "show", command.backup.job_id),
        ("agents",),
    ):
        shown = await asyncio.to_thread(cluster.coffer, *args, json_out=False, check=False)
        assert shown.returncode == 0, (args, shown.stderr)
        assert "\x1b" not in shown.stdout
        assert "\x07" not in shown.stdout
        assert "Traceback" not in shown.stderr
    listed = await asyncio.to_thread(cluster.coffer, "items", "--vault", "lab", json_out=False)
    assert "[/]" in listed.stdout
    shown = await asyncio.to_thread(
        cluster.coffer, "job", "show", command.backup.job_id, json_out=False
    )
    assert "\\x1b]0;owned\\x07\\x1b[2Jgone [bold]" in shown.stdout


async def test_a_hello_again_mid_session_is_checked_like_the_first(cluster: Cluster) -> None:
    """An agent declares its disks again before a backup (one attached or grown since it
    connected): the new sizes bound its indexes, and a hello for another VM ends the session."""
    async with HostileAgent(cluster, "regrow-1", hello_for("regrow-1", [("root", 0)])) as agent:
        command = await agent.backup_command()
        backup = command.backup
        await agent.session.write(
            agent_pb2.AgentMessage(hello=hello_for("regrow-1", [("root", MiB)]))
        )
        await asyncio.sleep(0.5)
        reply = await agent.put_index(
            backup.job_id, "root", MiB, backup.chunk_size, zero_index(MiB, backup.chunk_size)
        )
        assert reply.chunk_count == -(-MiB // backup.chunk_size)
        await agent.give_up(command)
        await _watch(cluster, backup.job_id)
        await asyncio.sleep(1.1)  # one hello again per second is taken
        await agent.session.write(agent_pb2.AgentMessage(hello=hello_for("other-vm-1")))
        code = await asyncio.wait_for(agent.session.code(), 10)
        assert code == grpc.StatusCode.PERMISSION_DENIED
