"""The disk index: the ordered chunk digests that make up one disk of a recovery point.

Chunk `i` covers bytes `[i * chunk_size, min((i + 1) * chunk_size, size_bytes))` of the disk;
its entry is the BLAKE3 digest of those bytes, or `ZERO_DIGEST` when they are all zero (a hole). An
agent keeps the previous recovery point's index to send only changed chunks; a restore walks it.

Encoded form (little-endian), version 1:

    offset size      field
    0      4         magic b"CFIX"
    4      1         format version (1)
    5      3         reserved, zero
    8      4         chunk size
    12     8         disk size in bytes
    20     8         chunk count (= ceil(size / chunk size), checked)
    28     2         length n of the disk name
    30     n         disk name, UTF-8
    30+n   32*count  digests, in disk order
    end-32 32        SHA-256 of every byte before it

The trailer makes a torn or bit-rotten index fail loudly (`CorruptData`) instead of restoring
the wrong chunks; its SHA-256 hex is also what a manifest records for the index. The version is
read before the trailer is checked, so a newer layout is reported as `UnsupportedFormat`.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from shared.digest import DIGEST_SIZE, ZERO_DIGEST, sha256
from shared.errors import CorruptData, InvalidArgument, UnsupportedFormat

INDEX_MAGIC = b"CFIX"
INDEX_VERSION = 1

_HEADER = struct.Struct("<4sB3sIQQH")
_MAX_CHUNK_SIZE = 0xFFFF_FFFF
_DISK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_disk_name(name: str) -> str:
    """`name` if it can name a disk; InvalidArgument otherwise.

    Disk names become part of datastore keys and file names, so they are restricted to
    letters, digits, `.`, `_` and `-`, start with a letter or digit, and have at most 64
    characters.
    """
    if not isinstance(name, str) or _DISK_NAME.fullmatch(name) is None:
        raise InvalidArgument(
            detail=f"disk name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def chunk_count(size_bytes: int, chunk_size: int) -> int:
    """How many chunks of `chunk_size` cover `size_bytes` (the last one may be short)."""
    return -(-size_bytes // chunk_size)


@dataclass(frozen=True)
class DiskIndex:
    """One disk of a recovery point: its size, chunk size and chunk digests in disk order."""

    disk: str
    size_bytes: int
    chunk_size: int
    digests: bytes

    def __post_init__(self) -> None:
        check_disk_name(self.disk)
        if not 0 < self.chunk_size <= _MAX_CHUNK_SIZE:
            raise InvalidArgument(detail=f"chunk size {self.chunk_size} is out of range")
        if self.size_bytes < 0:
            raise InvalidArgument(detail=f"disk size {self.size_bytes} is negative")
        if not isinstance(self.digests, bytes):
            object.__setattr__(self, "digests", bytes(self.digests))
        expected = chunk_count(self.size_bytes, self.chunk_size)
        if len(self.digests) != expected * DIGEST_SIZE:
            raise InvalidArgument(
                detail=f"disk {self.disk!r} of {self.size_bytes} bytes in chunks of "
                f"{self.chunk_size} needs {expected} digests, got "
                f"{len(self.digests) / DIGEST_SIZE:g}"
            )

    def __len__(self) -> int:
        return len(self.digests) // DIGEST_SIZE

    @property
    def chunk_count(self) -> int:
        """Number of chunks (entries) of the disk."""
        return len(self)

    def digest_at(self, i: int) -> bytes:
        """The digest of chunk `i` (ZERO_DIGEST for an all-zero chunk)."""
        if not 0 <= i < len(self):
            raise IndexError(f"chunk {i} is outside disk {self.disk!r} ({len(self)} chunks)")
        return self.digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]

    def extent(self, i: int) -> tuple[int, int]:
        """(offset, length) on the disk of chunk `i`; the last chunk may be short."""
        if not 0 <= i < len(self):
            raise IndexError(f"chunk {i} is outside disk {self.disk!r} ({len(self)} chunks)")
        offset = i * self.chunk_size
        return offset, min(self.chunk_size, self.size_bytes - offset)

    def iter_digests(self) -> Iterator[bytes]:
        """Every chunk's digest, in disk order."""
        view = self.digests
        for start in range(0, len(view), DIGEST_SIZE):
            yield view[start : start + DIGEST_SIZE]

    def referenced(self) -> set[bytes]:
        """The distinct digests of stored chunks this disk needs (zero chunks excluded)."""
        found = set(self.iter_digests())
        found.discard(ZERO_DIGEST)
        return found

    def encode(self) -> bytes:
        """The binary form described in the module docstring."""
        name = self.disk.encode("utf-8")
        header = _HEADER.pack(
            INDEX_MAGIC,
            INDEX_VERSION,
            bytes(3),
            self.chunk_size,
            self.size_bytes,
            len(self),
            len(name),
        )
        body = b"".join((header, name, self.digests))
        return body + sha256(body)

    @classmethod
    def decode(cls, data: bytes) -> DiskIndex:
        """The index encoded in `data`; CorruptData or UnsupportedFormat when it is not one."""
        if len(data) < _HEADER.size + DIGEST_SIZE:
            raise CorruptData(what="disk index", detail=f"only {len(data)} bytes")
        magic, version, reserved, chunk_size, size_bytes, count, name_len = _HEADER.unpack_from(
            data
        )
        if magic != INDEX_MAGIC:
            raise CorruptData(what="disk index", detail=f"bad magic {magic!r}, not a disk index")
        if version > INDEX_VERSION:
            raise UnsupportedFormat(what="disk index", version=version, supported=INDEX_VERSION)
        if version < 1:
            raise CorruptData(what="disk index", detail=f"format version {version} does not exist")
        body, trailer = data[:-DIGEST_SIZE], data[-DIGEST_SIZE:]
        if sha256(body) != trailer:
            raise CorruptData(what="disk index", detail="checksum mismatch (torn or altered)")
        # From here on the bytes are what the writer wrote; a mismatch is a writer bug.
        if reserved != bytes(3):
            raise CorruptData(what="disk index", detail="reserved header bytes are not zero")
        expected_len = _HEADER.size + name_len + count * DIGEST_SIZE + DIGEST_SIZE
        if len(data) != expected_len:
            raise CorruptData(
                what="disk index",
                detail=f"{len(data)} bytes, but its header describes {expected_len}",
            )
        name_end = _HEADER.size + name_len
        try:
            disk = data[_HEADER.size : name_end].decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptData(what="disk index", detail="disk name is not UTF-8") from None
        try:
            return cls(disk, size_bytes, chunk_size, data[name_end:-DIGEST_SIZE])
        except InvalidArgument as error:
            raise CorruptData(what="disk index", detail=error.fields.get("detail")) from None
