"""Chunk digests: the BLAKE3 hash of a chunk's uncompressed bytes is its identity.

The same digest names a chunk in an agent's index, on the wire and in the datastore's keys, so
two disks (or two recovery points) holding the same bytes share one stored chunk. A digest is
always computed over the raw bytes, never over a compressed form: compression settings can
change without changing any chunk's identity.

Why BLAKE3 and not SHA-256: every byte backed up is hashed twice (by the agent, and again by
the controller, which never trusts an agent's digest) and every byte restored once more. On
this project's machines BLAKE3 hashes 4.4 GB/s on one core against SHA-256's 0.9 GB/s with
SHA-NI (1 MiB buffers, `python -c` timing in the closing note of the foundation issue); the
benchmark's full backup spent a fifth of its CPU in SHA-256. BLAKE3 is a cryptographic hash
with 128-bit collision resistance, as SHA-256, and kopia offers it for the same purpose. The
datastore records the hash it uses (`datastore.json`), so another can come later.

Keyed names: an encrypted datastore (format 2) names chunks by BLAKE3 in keyed mode, with a
random 256-bit chunk-id key of its vault (`ChunkHash`, hash name "blake3-keyed"), as kopia keys
its content hashes with a per-repository secret. The same bytes in two vaults then have
unrelated names, and a listing of the storage says nothing about content: without the key,
nobody can compute the name of a chunk they can guess. Whoever names chunks holds the key: the
controller (it re-hashes what it receives) and the agents of the vault, which receive it with
each backup and restore command. Keyed BLAKE3 is as fast as plain BLAKE3 (measured 5.6-6 GB/s
for both on 64 KiB-1 MiB buffers here).

`ZERO_DIGEST` (32 zero bytes) is not the hash of anything; it is the index entry for an
all-zero chunk or a hole. Such chunks are never hashed twice, stored or sent: a reader of an
index writes zeros (or leaves a hole) where it meets one.

`MASKED_DIGEST` (32 bytes of 0xff) is not the hash of anything either: the controller puts it
in an incremental's base index, where the agent compares its chunks with the previous recovery
point's, in place of a chunk the datastore lacks or holds damaged. No chunk hashes to it, so the
agent reads, hashes and offers that chunk again as if it had changed (`agent.backup` needs no
rule for it) and the controller, which reports the chunk missing, gets it uploaded again.

`sha256` stays for what is not a chunk: the integrity trailers of indexes and the index
checksums in manifests, small and read rarely.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from blake3 import blake3

from shared.errors import InvalidArgument

CHUNK_HASH = "blake3"
"""The chunk hash's name, as a datastore records it."""

KEYED_CHUNK_HASH = "blake3-keyed"
"""The keyed chunk hash's name, as an encrypted datastore records it."""

CHUNK_ID_KEY_SIZE = 32
"""Bytes in a vault's chunk-id key (BLAKE3's key size)."""

DIGEST_SIZE = 32
"""Bytes in one digest."""

_LABEL_CONTEXT = "Coffer 2025-03 chunk-id key label v1"

ZERO_DIGEST = bytes(DIGEST_SIZE)
"""Index entry of an all-zero chunk or a hole; never stored."""

MASKED_DIGEST = b"\xff" * DIGEST_SIZE
"""Base index entry of a chunk the agent must send again (missing or damaged in the datastore);
never stored, never equal to a chunk's digest."""


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The 32-byte plain BLAKE3 digest naming a chunk of a format-1 datastore."""
    return blake3(data).digest()


@dataclass(frozen=True, repr=False)
class ChunkHash:
    """How a datastore names its chunks: plain BLAKE3, or BLAKE3 keyed by its chunk-id key.

    Hashable and cheap to pass around; its repr never shows the key.
    """

    key: bytes | None = None
    """The vault's chunk-id key (32 bytes), or None for plain BLAKE3 (format-1 datastores)."""

    def __post_init__(self) -> None:
        if self.key is not None and (
            not isinstance(self.key, bytes) or len(self.key) != CHUNK_ID_KEY_SIZE
        ):
            raise InvalidArgument(detail=f"a chunk-id key is {CHUNK_ID_KEY_SIZE} bytes")

    def __repr__(self) -> str:
        return f"ChunkHash({self.name})"

    @property
    def name(self) -> str:
        """The hash's name as `datastore.json` records it."""
        return CHUNK_HASH if self.key is None else KEYED_CHUNK_HASH

    @property
    def label(self) -> str:
        """Which hash and key made a set of digests, safe to show and send: "blake3", or
        "blake3-keyed:" and an 8-byte check value of the key (BLAKE3 key derivation, which
        gives nothing about the key away). Two digests compare only under one label: an
        agent keeps a previous recovery point's index only when it carries its own label."""
        if self.key is None:
            return CHUNK_HASH
        check = blake3(self.key, derive_key_context=_LABEL_CONTEXT).digest(length=8)
        return f"{KEYED_CHUNK_HASH}:{check.hex()}"

    def digest(self, data: bytes | bytearray | memoryview) -> bytes:
        """The 32-byte name of a chunk of raw bytes `data` (the GIL is released while hashing)."""
        if self.key is None:
            return blake3(data).digest()
        return blake3(data, key=self.key).digest()

    def zero_digest(self, length: int) -> bytes:
        """The digest of `length` zero bytes, which readers compare against to find zero chunks
        without a byte comparison (the hash runs without the GIL; a comparison would not)."""
        return _zero_digest(self, length)


PLAIN_CHUNK_HASH = ChunkHash()
"""Plain BLAKE3: the chunk names of a format-1 datastore."""


@functools.lru_cache(maxsize=64)
def _zero_digest(hash: ChunkHash, length: int) -> bytes:
    return hash.digest(bytes(length))


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    """The 32-byte SHA-256 digest of `data`, for metadata checksums."""
    return hashlib.sha256(data).digest()


def check_digest(digest: bytes) -> bytes:
    """`digest` itself if it has the size of a digest; InvalidArgument otherwise."""
    if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
        size = len(digest) if isinstance(digest, bytes | bytearray | memoryview) else "no"
        raise InvalidArgument(
            detail=f"a chunk digest is {DIGEST_SIZE} bytes of BLAKE3, got {size} bytes"
        )
    return digest
