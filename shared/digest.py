"""Chunk digests: the SHA-256 of a chunk's uncompressed bytes is its identity.

The same digest names a chunk in an agent's index, on the wire and in the datastore's keys, so
two disks (or two recovery points) holding the same bytes share one stored chunk. A digest is
always computed over the raw bytes, never over a compressed form: compression settings can
change without changing any chunk's identity.

`ZERO_DIGEST` (32 zero bytes) is not the hash of anything; it is the index entry for an
all-zero chunk or a hole. Such chunks are never hashed twice, stored or sent: a reader of an
index writes zeros (or leaves a hole) where it meets one.
"""

from __future__ import annotations

import hashlib

from shared.errors import InvalidArgument

DIGEST_SIZE = 32
"""Bytes in one digest (SHA-256)."""

ZERO_DIGEST = bytes(DIGEST_SIZE)
"""Index entry of an all-zero chunk or a hole; never stored."""


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    """The 32-byte SHA-256 digest of `data` (hashlib releases the GIL on large inputs)."""
    return hashlib.sha256(data).digest()


def check_digest(digest: bytes) -> bytes:
    """`digest` itself if it has the size of a digest; InvalidArgument otherwise."""
    if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
        size = len(digest) if isinstance(digest, bytes | bytearray | memoryview) else "no"
        raise InvalidArgument(
            detail=f"a chunk digest is {DIGEST_SIZE} bytes of SHA-256, got {size} bytes"
        )
    return digest
