"""A hostile agent: the agent's protocol spoken by a test, with a properly issued certificate.

What an agent with its own VM's certificate and key can send the controller, built on the
generated stubs and nothing of the real agent: the attacks of issue 14 on what one agent makes
the controller hold (concurrent index and upload streams, huge messages, a huge hello), each a
function that a regression test (tests/test_hostile_agent.py) and the measurement of the
worst case (tests/bench/hostile.py) share.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from blake3 import blake3

from shared.blob import Compression
from shared.errors import ERROR_CODE_METADATA_KEY
from shared.rpc import agent_pb2, agent_pb2_grpc, common_pb2
from shared.rpc_channel import channel_options
from shared.tls import TlsFiles, channel_credentials
from tests.cluster import Cluster

GiB = 1 << 30
MiB = 1 << 20


def agent_tls(cluster: Cluster, vm_id: str) -> TlsFiles:
    """A certificate and key for agent `vm_id`, issued by the cluster's CA (once)."""
    out = cluster.root / f"tls-{vm_id}"
    if not out.exists():
        cluster.coffer(
            "pki", "issue-agent", vm_id, "--dir", str(cluster.pki), "--out", str(out),
            json_out=False,
        )  # fmt: skip
    return TlsFiles(ca=out / "ca.crt", cert=out / "agent.crt", key=out / "agent.key")


def error_code(exc: grpc.aio.AioRpcError) -> str:
    """The Coffer error code a refused call carries ('' if none)."""
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_CODE_METADATA_KEY:
            return str(value)
    return ""


def hello_for(vm_id: str, disks: Sequence[tuple[str, int]] = (("root", MiB),)) -> agent_pb2.Hello:
    """An honest hello of VM `vm_id` with `disks` (name, size)."""
    return agent_pb2.Hello(
        vm_id=vm_id,
        name=vm_id,
        service="test",
        region="lab",
        hostname=f"{vm_id}.lab",
        agent_version="test",
        disks=[
            agent_pb2.DiskInfo(name=name, path=f"/dev/{name}", size_bytes=size)
            for name, size in disks
        ],
    )


class HostileAgent:
    """One VM's agent as a test plays it: a session opened with `hello` (default: honest)."""

    def __init__(
        self,
        cluster: Cluster,
        vm_id: str,
        hello: agent_pb2.Hello | None = None,
        *,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.cluster = cluster
        self.vm_id = vm_id
        self.hello = hello if hello is not None else hello_for(vm_id)
        self.tls = agent_tls(cluster, vm_id)
        self.options = list(options)

    async def __aenter__(self) -> HostileAgent:
        # A hostile agent sends what it likes: no limit of its own on what it sends.
        ours = [o for o in channel_options() if o[0] != "grpc.max_send_message_length"]
        self.channel = grpc.aio.secure_channel(
            f"127.0.0.1:{self.cluster.port}",
            channel_credentials(self.tls),
            options=[*ours, ("grpc.max_send_message_length", 256 * MiB), *self.options],
        )
        self.stub = agent_pb2_grpc.AgentServiceStub(self.channel)
        self.session = self.stub.Session()
        await self.session.write(agent_pb2.AgentMessage(hello=self.hello))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.session.cancel()
        await self.channel.close()

    async def accepted(self) -> agent_pb2.SessionAccepted:
        first = await self.session.read()
        assert first.HasField("accepted"), first
        return first.accepted

    async def backup_command(self, vault: str = "") -> agent_pb2.ControllerMessage:
        """The backup command the controller sends once the VM is protected (in `vault`, by
        default its region's) and an operator asks for a backup now."""
        await self.accepted()
        await asyncio.to_thread(self.cluster.protect, self.vm_id, vault)
        await asyncio.to_thread(self.cluster.coffer, "backup-now", self.vm_id, "--no-wait")
        command = await asyncio.wait_for(self.session.read(), 20)
        assert command.HasField("backup"), command
        return command

    async def result(
        self,
        command: agent_pb2.ControllerMessage,
        disks: Sequence[agent_pb2.DiskBackupResult] = (),
        *,
        ok: bool = True,
        error: str = "",
    ) -> None:
        """The command's result, as the agent reports it."""
        await self.session.write(
            agent_pb2.AgentMessage(
                result=agent_pb2.CommandResult(
                    command_id=command.command_id,
                    job_id=command.backup.job_id,
                    ok=ok,
                    error=common_pb2.Error(code=error, message="the test says so")
                    if error
                    else None,
                    disks=list(disks),
                    consistency="crash",
                )
            )
        )

    async def give_up(self, command: agent_pb2.ControllerMessage) -> None:
        """Report the backup failed, so the job ends."""
        await self.result(command, ok=False, error="InternalError")

    async def upload(
        self, job_id: str, data: Sequence[bytes], key: bytes
    ) -> agent_pb2.UploadSummary:
        """Upload `data` as chunks of backup `job_id`, named with the vault's `key`."""

        async def messages() -> AsyncIterator[agent_pb2.ChunkUpload]:
            yield agent_pb2.ChunkUpload(job_id=job_id, chunks=[chunk(d, key) for d in data])

        summary: agent_pb2.UploadSummary = await self.stub.UploadChunks(messages())
        return summary

    async def put_index(
        self,
        job_id: str,
        disk: str,
        size_bytes: int,
        chunk_size: int,
        digests: bytes,
        *,
        compression: grpc.Compression | None = None,
        part_bytes: int = 16 * MiB,
    ) -> agent_pb2.PutIndexReply:
        async def parts() -> AsyncIterator[agent_pb2.IndexPart]:
            for start in range(0, max(len(digests), 1), part_bytes):
                yield agent_pb2.IndexPart(
                    job_id=job_id,
                    disk=disk,
                    size_bytes=size_bytes,
                    chunk_size=chunk_size,
                    digests=digests[start : start + part_bytes],
                )

        reply: agent_pb2.PutIndexReply = await self.stub.PutIndex(parts(), compression=compression)
        return reply


def chunk(data: bytes, key: bytes) -> agent_pb2.Chunk:
    """`data` as an uncompressed chunk named with the vault's chunk-id `key`."""
    return agent_pb2.Chunk(
        digest=blake3(data, key=key).digest() if key else blake3(data).digest(),
        compression=Compression.NONE,
        raw_size=len(data),
        data=data,
    )


def zero_index(size_bytes: int, chunk_size: int) -> bytes:
    """The digests of an all-zero disk of `size_bytes`: every chunk the zero digest."""
    return bytes(-(-size_bytes // chunk_size) * 32)


# --- the attacks of issue 14 ---------------------------------------------------------------


async def concurrent_indexes(
    agent: HostileAgent, command: agent_pb2.ControllerMessage, streams: int, disk_bytes: int
) -> list[BaseException | agent_pb2.PutIndexReply]:
    """`streams` PutIndex streams at once, each an all-zero index of a `disk_bytes` disk
    (gzip makes them almost free on the wire); what each ended with."""
    backup = command.backup
    digests = zero_index(disk_bytes, backup.chunk_size)
    calls = [
        agent.put_index(
            backup.job_id,
            "root",
            disk_bytes,
            backup.chunk_size,
            digests,
            compression=grpc.Compression.Gzip,
        )
        for _ in range(streams)
    ]
    return await asyncio.gather(*calls, return_exceptions=True)


async def concurrent_uploads(
    agent: HostileAgent, command: agent_pb2.ControllerMessage, streams: int, message_bytes: int
) -> list[BaseException | agent_pb2.UploadSummary]:
    """`streams` UploadChunks streams at once, each one message of `message_bytes` (chunks of
    random data, each of the job's chunk size); what each ended with."""
    backup = command.backup
    size = backup.chunk_size

    async def one() -> agent_pb2.UploadSummary:
        data = [os.urandom(size) for _ in range(max(1, message_bytes // size))]
        return await agent.upload(backup.job_id, data, backup.chunk_id_key)

    return await asyncio.gather(*(one() for _ in range(streams)), return_exceptions=True)


def huge_hello(vm_id: str, hostname_bytes: int = 8 * MiB, disks: int = 20_000) -> agent_pb2.Hello:
    """A hello of about 30 MB: a hostname of `hostname_bytes`, `disks` disks with long paths."""
    hello = hello_for(vm_id, [])
    hello.hostname = "h" * hostname_bytes
    hello.disks.extend(
        agent_pb2.DiskInfo(name=f"d{i}", path="/" + "p" * 1000, size_bytes=GiB)
        for i in range(disks)
    )
    return hello
