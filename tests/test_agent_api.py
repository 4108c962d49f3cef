"""The agent API against a hostile agent: a real controller, and a test playing the agent.

The controller must trust nothing an agent says beyond what its certificate proves: not the VM
it claims, not a job of another VM, not a digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from blake3 import blake3

from shared.blob import Compression
from shared.digest import chunk_digest
from shared.errors import ERROR_CODE_METADATA_KEY
from shared.rpc import agent_pb2, agent_pb2_grpc, common_pb2
from shared.rpc_channel import channel_options
from shared.tls import TlsFiles, channel_credentials
from tests.cluster import Cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("api")) as running:
        yield running


def agent_tls(cluster: Cluster, vm_id: str) -> TlsFiles:
    out = cluster.root / f"tls-{vm_id}"
    if not out.exists():
        cluster.coffer(
            "pki", "issue-agent", vm_id, "--dir", str(cluster.pki), "--out", str(out),
            json_out=False,
        )  # fmt: skip
    return TlsFiles(ca=out / "ca.crt", cert=out / "agent.crt", key=out / "agent.key")


def error_code(exc: grpc.aio.AioRpcError) -> str:
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_CODE_METADATA_KEY:
            return str(value)
    return ""


class FakeAgent:
    """The agent's side of the protocol, spoken by the test."""

    def __init__(self, cluster: Cluster, cert_vm: str, vm_id: str | None = None) -> None:
        self.cluster = cluster
        self.vm_id = vm_id or cert_vm
        self.tls = agent_tls(cluster, cert_vm)

    async def __aenter__(self) -> FakeAgent:
        self.channel = grpc.aio.secure_channel(
            f"127.0.0.1:{self.cluster.port}",
            channel_credentials(self.tls),
            options=channel_options(),
        )
        self.stub = agent_pb2_grpc.AgentServiceStub(self.channel)
        self.session = self.stub.Session()
        hello = agent_pb2.Hello(
            vm_id=self.vm_id,
            name=self.vm_id,
            service="test",
            region="lab",
            disks=[agent_pb2.DiskInfo(name="root", path="/dev/null", size_bytes=1 << 20)],
        )
        await self.session.write(agent_pb2.AgentMessage(hello=hello))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.session.cancel()
        await self.channel.close()

    async def accepted(self) -> agent_pb2.SessionAccepted:
        first = await self.session.read()
        assert first.HasField("accepted")
        return first.accepted


async def test_agent_claiming_another_vm_is_refused(cluster: Cluster) -> None:
    async with FakeAgent(cluster, cert_vm="honest-1", vm_id="victim-1") as agent:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await agent.session.read()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "certificate is for VM 'honest-1'" in (refused.value.details() or "")
    listed = {a["vm_id"] for a in await asyncio.to_thread(cluster.coffer, "agents")}
    assert "victim-1" not in listed


def test_real_agent_with_a_certificate_for_another_vm_refuses_to_start(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The controller refuses such an agent (above); the agent says so before it even dials."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\1" * (1 << 20))
    agent = cluster.add_agent("impostor-1", {"root": disk}, cert_vm="someone-else", start=False)
    agent.process.start()
    assert agent.process.popen is not None
    assert agent.process.popen.wait(timeout=30) == 2
    log = agent.process.log.read_text()
    assert "certificate of agent/someone-else, but this agent is VM 'impostor-1'" in log
    assert "impostor-1" not in {a["vm_id"] for a in cluster.coffer("agents")}


async def test_agent_certificate_cannot_use_the_operator_api(cluster: Cluster) -> None:
    from shared.rpc import operator_pb2, operator_pb2_grpc

    tls = agent_tls(cluster, "curious-1")
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{cluster.port}", channel_credentials(tls), options=channel_options()
    ) as channel:
        stub = operator_pb2_grpc.OperatorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListAgents(operator_pb2.ListAgentsRequest())
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def _backup_command(
    cluster: Cluster, agent: FakeAgent, vault: str = ""
) -> agent_pb2.ControllerMessage:
    """The backup command the controller sends `agent`, protected in `vault` (by default one
    named for its region) and asked to back up now."""
    await agent.accepted()
    await asyncio.to_thread(cluster.protect, agent.vm_id, vault)
    started = await asyncio.to_thread(cluster.coffer, "backup-now", agent.vm_id, "--no-wait")
    job = started[0]
    command = await asyncio.wait_for(agent.session.read(), 10)
    assert command.backup.job_id == job["id"]
    return command


async def _uploads(*chunks: agent_pb2.ChunkUpload) -> AsyncIterator[agent_pb2.ChunkUpload]:
    for chunk in chunks:
        yield chunk


async def test_chunk_not_matching_its_digest_is_refused_and_nothing_stored(
    cluster: Cluster,
) -> None:
    async with FakeAgent(cluster, "rogue-1") as agent:
        command = await _backup_command(cluster, agent)
        job_id = command.backup.job_id
        data = b"the real bytes" * 1000
        claimed = hashlib.sha256(b"something else entirely").digest()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await agent.stub.UploadChunks(
                _uploads(
                    agent_pb2.ChunkUpload(
                        job_id=job_id,
                        chunks=[
                            agent_pb2.Chunk(
                                digest=claimed,
                                compression=Compression.NONE,
                                raw_size=len(data),
                                data=data,
                            )
                        ],
                    )
                )
            )
        assert refused.value.code() == grpc.StatusCode.DATA_LOSS
        assert error_code(refused.value) == "ChunkDigestMismatch"
        store = cluster.open_datastore("lab")
        assert not store.has_chunk(claimed)
        assert not store.has_chunk(store.chunk_hash.digest(data))
        assert not store.has_chunk(chunk_digest(data))

        # An index naming a chunk that was never stored is refused as well.
        chunk_size = command.backup.chunk_size
        index = agent_pb2.IndexPart(
            job_id=job_id,
            disk="root",
            size_bytes=chunk_size,
            chunk_size=chunk_size,
            digests=claimed,
        )

        async def parts() -> AsyncIterator[agent_pb2.IndexPart]:
            yield index

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await agent.stub.PutIndex(parts())
        assert error_code(missing.value) == "ChunkMissing"

        # The agent gives up: the job fails with its reason, and no recovery point appears.
        await agent.session.write(
            agent_pb2.AgentMessage(
                result=agent_pb2.CommandResult(
                    command_id=command.command_id,
                    job_id=job_id,
                    ok=False,
                    error=common_pb2.Error(
                        code="ChunkDigestMismatch", message="refused by the controller"
                    ),
                )
            )
        )
        job = await asyncio.to_thread(cluster.coffer, "job", "watch", job_id, check=False)
    assert job["status"] == "Failed"
    assert job["error_code"] == "ChunkDigestMismatch"
    assert await asyncio.to_thread(cluster.coffer, "rp", "list", "rogue-1") == []


async def test_agent_cannot_touch_another_vms_job(cluster: Cluster) -> None:
    async with FakeAgent(cluster, "owner-1") as owner, FakeAgent(cluster, "thief-1") as thief:
        command = await _backup_command(cluster, owner)
        await thief.accepted()
        request = agent_pb2.MissingChunksRequest(
            job_id=command.backup.job_id, digests=[bytes(range(32))]
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await thief.stub.MissingChunks(request)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The owner itself may ask.
        reply = await owner.stub.MissingChunks(request)
        assert list(reply.missing) == [bytes(range(32))]


async def _give_up(agent: FakeAgent, command: agent_pb2.ControllerMessage) -> None:
    """The agent reports its backup failed, so the job ends."""
    await agent.session.write(
        agent_pb2.AgentMessage(
            result=agent_pb2.CommandResult(
                command_id=command.command_id,
                job_id=command.backup.job_id,
                ok=False,
                error=common_pb2.Error(code="InternalError", message="the test stops here"),
            )
        )
    )


async def test_missing_chunks_confirms_only_content_of_the_callers_own_vault(
    cluster: Cluster,
) -> None:
    """Chunk names are keyed per vault, and each vault answers for itself: a VM of another
    vault cannot learn whether this vault holds a content, under any name it can compute."""
    data = os.urandom(64 << 10)
    async with FakeAgent(cluster, "keeper-1") as keeper, FakeAgent(cluster, "prober-1") as prober:
        kept = await _backup_command(cluster, keeper, vault="lab")
        probe = await _backup_command(cluster, prober, vault="lab-other")
        own_key, other_key = kept.backup.chunk_id_key, probe.backup.chunk_id_key
        assert len(own_key) == len(other_key) == 32
        assert own_key != other_key
        name = blake3(data, key=own_key).digest()
        await keeper.stub.UploadChunks(
            _uploads(
                agent_pb2.ChunkUpload(
                    job_id=kept.backup.job_id,
                    chunks=[
                        agent_pb2.Chunk(
                            digest=name,
                            compression=Compression.NONE,
                            raw_size=len(data),
                            data=data,
                        )
                    ],
                )
            )
        )
        assert cluster.open_datastore("lab").has_chunk(name)
        names = [name, blake3(data, key=other_key).digest(), chunk_digest(data)]
        asked = await prober.stub.MissingChunks(
            agent_pb2.MissingChunksRequest(job_id=probe.backup.job_id, digests=names)
        )
        assert list(asked.missing) == names  # none of them: the prober's vault holds none
        own = await keeper.stub.MissingChunks(
            agent_pb2.MissingChunksRequest(job_id=kept.backup.job_id, digests=names)
        )
        assert list(own.missing) == names[1:]
        await _give_up(keeper, kept)
        await _give_up(prober, probe)
