"""The chunk blob: what one stored chunk holds, a small versioned header and the payload.

Layout (little-endian), 16 header bytes then the payload:

    offset size  field
    0      4     magic b"CFBL"
    4      1     format version (1)
    5      1     compression: 1 none, 2 zstd (the values of the proto enum `Compression`)
    6      2     flags, zero in version 1
    8      4     raw size: bytes of the chunk once decompressed
    12     4     encryption key id, zero = not encrypted (reserved; no key is defined yet)
    16     ...   payload: the raw bytes (none) or one zstd frame (zstd)

The payload is kept exactly as the agent compressed it, so a restore streams the stored form
back without recompressing. The header carries no digest or checksum: the chunk's name in the
datastore is the BLAKE3 digest of its raw bytes, and every reader that decompresses re-hashes.

Version rules: a reader refuses a version it does not know (`UnsupportedFormat`); a new
compression algorithm or an encryption key is refused the same way, so an old Coffer never
returns bytes it cannot interpret. Anything else that does not parse is `CorruptData`.

Compression objects of `zstandard` are not thread-safe and are costly to create, so each
thread keeps its own (these functions run in executor threads on both sides).
"""

from __future__ import annotations

import contextlib
import enum
import struct
import threading
from collections.abc import Iterator

import zstandard

from shared.errors import CorruptData, InvalidArgument, UnsupportedFormat

BLOB_MAGIC = b"CFBL"
BLOB_VERSION = 1
DEFAULT_LEVEL = 1
"""zstd level for chunks. Measured on the benchmark's 2 GiB ext4 image (tests/bench): level 1
compresses the data to 513 MiB against level 3's 478 MiB (7% more) but at twice the speed; the
full backup took 6.7 s instead of 14 s with agent and controller on one 2-core machine."""

_HEADER = struct.Struct("<4sBBHII")
HEADER_SIZE = _HEADER.size
_MAX_RAW_SIZE = 0xFFFF_FFFF
_MIN_LEVEL = -(1 << 17)  # zstd's fastest "negative" level


class Compression(enum.IntEnum):
    """How a chunk's payload is encoded; the values are those of the proto enum."""

    NONE = 1
    ZSTD = 2


class _Codecs(threading.local):
    """One thread's zstd decompressor (96 KiB)."""

    def __init__(self) -> None:
        self.decompressor = zstandard.ZstdDecompressor()


class _Compressors:
    """zstd compressors shared by every thread, each used by one thread at a time.

    Not one per thread like the decompressors: a compressor holds 1.3 MiB of tables at level
    1, and an agent's pool has a dozen threads of which only one a core compresses at once;
    there are as many compressors as were ever in use at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[int, list[zstandard.ZstdCompressor]] = {}

    @contextlib.contextmanager
    def borrowed(self, level: int) -> Iterator[zstandard.ZstdCompressor]:
        with self._lock:
            free = self._free.setdefault(level, [])
            found = free.pop() if free else None
        if found is None:
            # The frame records the content size so a reader can refuse a lying header
            # before it allocates anything.
            found = zstandard.ZstdCompressor(level=level, write_content_size=True)
        try:
            yield found
        finally:
            with self._lock:
                free.append(found)


_codecs = _Codecs()
_compressors = _Compressors()


def encode_blob(compression: Compression, raw_size: int, payload: bytes | memoryview) -> bytes:
    """The stored form of a chunk: header then `payload` (already in `compression`)."""
    if not isinstance(compression, Compression):
        raise InvalidArgument(detail=f"unknown chunk compression {compression!r}")
    if not 0 <= raw_size <= _MAX_RAW_SIZE:
        raise InvalidArgument(detail=f"chunk raw size {raw_size} does not fit in 32 bits")
    if compression is Compression.NONE and len(payload) != raw_size:
        raise InvalidArgument(
            detail=f"uncompressed chunk has {len(payload)} bytes but raw size {raw_size}"
        )
    header = _HEADER.pack(BLOB_MAGIC, BLOB_VERSION, compression, 0, raw_size, 0)
    return b"".join((header, payload))


def decode_blob(data: bytes) -> tuple[Compression, int, bytes]:
    """(compression, raw size, payload) of a stored chunk; the payload is not decompressed."""
    if len(data) < HEADER_SIZE:
        raise CorruptData(
            what="chunk blob",
            detail=f"{len(data)} bytes, shorter than its {HEADER_SIZE}-byte header",
        )
    magic, version, compression, flags, raw_size, key_id = _HEADER.unpack_from(data)
    if magic != BLOB_MAGIC:
        raise CorruptData(what="chunk blob", detail=f"bad magic {magic!r}, not a Coffer chunk")
    if version > BLOB_VERSION:
        raise UnsupportedFormat(what="chunk blob", version=version, supported=BLOB_VERSION)
    if version < 1:
        raise CorruptData(what="chunk blob", detail=f"format version {version} does not exist")
    if flags != 0:
        raise CorruptData(what="chunk blob", detail=f"flags {flags:#06x} set; version 1 has none")
    if key_id != 0:
        raise UnsupportedFormat(
            f"Chunk blob is encrypted with key id {key_id}; this Coffer cannot decrypt chunks. "
            "Upgrade Coffer to read it.",
            what="chunk blob",
        )
    try:
        kind = Compression(compression)
    except ValueError:
        raise UnsupportedFormat(
            f"Chunk blob uses compression {compression}, which this Coffer does not know. "
            "Upgrade Coffer to read it.",
            what="chunk blob",
        ) from None
    payload = data[HEADER_SIZE:]
    if kind is Compression.NONE and len(payload) != raw_size:
        raise CorruptData(
            what="chunk blob",
            detail=f"uncompressed payload has {len(payload)} bytes, header says {raw_size}",
        )
    return kind, raw_size, payload


def compress(raw: bytes | memoryview, level: int = DEFAULT_LEVEL) -> tuple[Compression, bytes]:
    """`raw` zstd-compressed, or `raw` itself under NONE when zstd would not make it smaller.

    Incompressible chunks (already compressed or encrypted data) are then stored and sent as
    they are, and their readers skip a useless decompression.
    """
    if not _MIN_LEVEL <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise InvalidArgument(detail=f"zstd level {level} is out of range")
    with _compressors.borrowed(level) as compressor:
        packed = compressor.compress(raw)
    if len(packed) < len(raw):
        return Compression.ZSTD, packed
    return Compression.NONE, bytes(raw)


def decompress(compression: Compression, payload: bytes | memoryview, raw_size: int) -> bytes:
    """The raw bytes of a chunk payload, which must decompress to exactly `raw_size` bytes."""
    if compression is Compression.NONE:
        if len(payload) != raw_size:
            raise CorruptData(
                what="chunk payload",
                detail=f"uncompressed payload has {len(payload)} bytes, expected {raw_size}",
            )
        return bytes(payload)
    if compression is not Compression.ZSTD:
        raise InvalidArgument(detail=f"unknown chunk compression {compression!r}")
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as error:
        raise CorruptData(what="chunk payload", detail=f"not a zstd frame: {error}") from None
    # Checked before decompressing: a frame that declares more than the chunk's size would
    # otherwise make the decompressor allocate whatever the sender wrote in it.
    if declared not in (-1, raw_size):
        raise CorruptData(
            what="chunk payload",
            detail=f"zstd frame declares {declared} bytes, expected {raw_size}",
        )
    if declared == -1 and raw_size == 0:
        # max_output_size=0 would mean "no limit"; an empty chunk has a known, empty frame.
        raise CorruptData(what="chunk payload", detail="zstd frame of an empty chunk lacks a size")
    try:
        raw = _codecs.decompressor.decompress(
            payload, max_output_size=raw_size, allow_extra_data=False
        )
    except zstandard.ZstdError as error:
        raise CorruptData(what="chunk payload", detail=f"zstd: {error}") from None
    if len(raw) != raw_size:
        raise CorruptData(
            what="chunk payload",
            detail=f"decompressed to {len(raw)} bytes, expected {raw_size}",
        )
    return raw
