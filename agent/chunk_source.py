"""Where a reader of a recovery point gets chunks: the source interface, and the check every
fetched chunk passes before a byte of it is used.

A source answers a list of digests with the stored form of each chunk (compression, raw size,
payload), in the order asked. The agent's real source is the controller's `DownloadChunks`
stream (`DownloadChunkSource`); tests serve chunks from memory. Whatever the source, a chunk
is trusted only after `open_chunk` has decompressed it within its declared size and its
BLAKE3 digest matched the one asked for: a datastore, a network or a controller that returns
other bytes makes the read fail, never return wrong data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from shared.blob import Compression, decompress
from shared.digest import ChunkHash
from shared.errors import CorruptData
from shared.rpc import agent_pb2, agent_pb2_grpc
from shared.rpc_errors import from_rpc_error


@dataclass(frozen=True)
class FetchedChunk:
    """One chunk as stored: not yet decompressed nor checked."""

    digest: bytes
    compression: Compression
    raw_size: int
    payload: bytes


class ChunkSource(Protocol):
    """Fetches stored chunks by digest."""

    async def fetch(self, digests: Sequence[bytes]) -> list[FetchedChunk]:
        """The chunks named by `digests`, in that order; a typed CofferError when it cannot
        (e.g. ChunkMissing from the datastore, Unavailable from the network)."""
        ...


def open_chunk(
    digest: bytes, compression: Compression, raw_size: int, payload: bytes, chunk_hash: ChunkHash
) -> bytes:
    """The raw bytes of a fetched chunk, checked against `digest` with the hash its datastore
    names chunks by (`chunk_hash`: keyed with the vault's chunk-id key when encrypted);
    CorruptData otherwise.

    Blocking (decompression and hashing): run it in a thread pool.
    """
    raw = decompress(compression, payload, raw_size)
    actual = chunk_hash.digest(raw)
    if actual != digest:
        raise CorruptData(what=f"chunk {digest.hex()}", detail=f"its bytes hash to {actual.hex()}")
    return raw


class DownloadChunkSource:
    """Chunks from the controller's `DownloadChunks` stream, for the job `job_id`.

    The controller answers only for chunks of the recovery point that job reads; each call
    is one stream, checked to come back complete and in order.
    """

    def __init__(
        self, stub: agent_pb2_grpc.AgentServiceStub, job_id: str, timeout: float = 300.0
    ) -> None:
        self._stub = stub
        self._job_id = job_id
        self._timeout = timeout

    async def fetch(self, digests: Sequence[bytes]) -> list[FetchedChunk]:
        request = agent_pb2.DownloadRequest(job_id=self._job_id, digests=list(digests))
        found: list[FetchedChunk] = []
        try:
            async for message in self._stub.DownloadChunks(request, timeout=self._timeout):
                for chunk in message.chunks:
                    digest = chunk.digest  # each read of a bytes field copies it: read once
                    if len(found) >= len(digests) or digest != digests[len(found)]:
                        raise CorruptData(what="the download stream", detail="a chunk out of order")
                    found.append(
                        FetchedChunk(
                            digest, Compression(chunk.compression), chunk.raw_size, chunk.data
                        )
                    )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        except ValueError as exc:  # an unknown compression value
            raise CorruptData(what="the download stream", detail=str(exc)) from exc
        if len(found) != len(digests):
            raise CorruptData(what="the download stream", detail="chunks are missing")
        return found
