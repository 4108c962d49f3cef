"""The download chunk source over real gRPC: chunks come back in order and whole, and what
the server refuses arrives as the same typed error.

The server here answers `DownloadChunks` from a dict, as the controller does from its
datastore; the controller's own answer (which jobs may read which chunks) comes with the
FileRecovery job.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from agent.chunk_source import DownloadChunkSource, FetchedChunk, open_chunk
from shared.blob import Compression, compress
from shared.digest import ChunkHash, chunk_digest
from shared.errors import ChunkMissing, CorruptData
from shared.rpc import agent_pb2, agent_pb2_grpc
from shared.rpc_errors import abort

PLAIN = ChunkHash()  # the chunks here are named by plain BLAKE3, as in a format-1 datastore


def stored(raw: bytes) -> FetchedChunk:
    compression, payload = compress(raw)
    return FetchedChunk(chunk_digest(raw), compression, len(raw), payload)


CHUNKS = {c.digest: c for c in (stored(bytes([n]) * 70_000 + b"x" * n) for n in range(6))}


class Chunks(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self) -> None:
        self.reorder = False
        self.jobs: list[str] = []

    async def DownloadChunks(
        self, request: agent_pb2.DownloadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.ChunkBatch]:
        self.jobs.append(request.job_id)
        digests = list(request.digests)
        if self.reorder:
            digests.reverse()
        for digest in digests:
            chunk = CHUNKS.get(digest)
            if chunk is None:
                await abort(context, ChunkMissing(digest=digest.hex()))
            batch = agent_pb2.ChunkBatch()
            batch.chunks.add(
                digest=digest,
                compression=chunk.compression.value,  # type: ignore[arg-type]
                raw_size=chunk.raw_size,
                data=chunk.payload,
            )
            yield batch


@pytest.fixture
async def served() -> AsyncIterator[tuple[Chunks, agent_pb2_grpc.AgentServiceStub]]:
    servicer = Chunks()
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield servicer, agent_pb2_grpc.AgentServiceStub(channel)
    finally:
        await server.stop(None)


async def test_chunks_come_back_in_order_and_open(
    served: tuple[Chunks, agent_pb2_grpc.AgentServiceStub],
) -> None:
    servicer, stub = served
    source = DownloadChunkSource(stub, "job-1")
    wanted = list(CHUNKS)[::-1]
    fetched = await source.fetch(wanted)
    assert [c.digest for c in fetched] == wanted
    for chunk in fetched:
        raw = open_chunk(chunk.digest, chunk.compression, chunk.raw_size, chunk.payload, PLAIN)
        assert chunk_digest(raw) == chunk.digest
    assert fetched[0].compression is Compression.ZSTD
    assert servicer.jobs == ["job-1"]


async def test_what_the_server_refuses_arrives_typed(
    served: tuple[Chunks, agent_pb2_grpc.AgentServiceStub],
) -> None:
    _, stub = served
    with pytest.raises(ChunkMissing):
        await DownloadChunkSource(stub, "job-1").fetch([next(iter(CHUNKS)), bytes(32)])


async def test_chunks_out_of_order_are_refused(
    served: tuple[Chunks, agent_pb2_grpc.AgentServiceStub],
) -> None:
    servicer, stub = served
    servicer.reorder = True
    with pytest.raises(CorruptData, match="out of order"):
        await DownloadChunkSource(stub, "job-1").fetch(list(CHUNKS)[:3])


def test_a_chunk_whose_bytes_do_not_match_its_digest_is_refused() -> None:
    chunk = next(iter(CHUNKS.values()))
    other = stored(b"other bytes")
    with pytest.raises(CorruptData, match="hash to"):
        open_chunk(chunk.digest, other.compression, other.raw_size, other.payload, PLAIN)
