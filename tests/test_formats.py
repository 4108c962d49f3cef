"""On-disk formats: blobs, indexes and manifests round-trip and refuse bad input, typed."""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import zstandard

from shared.blob import (
    HEADER_SIZE,
    Compression,
    compress,
    decode_blob,
    decompress,
    encode_blob,
)
from shared.digest import ZERO_DIGEST, check_digest, chunk_digest, sha256
from shared.errors import (
    CorruptData,
    DiskNotFound,
    InvalidArgument,
    UnsupportedFormat,
)
from shared.index import DiskIndex
from shared.manifest import ManifestDisk, RecoveryPointManifest
from shared.model import Consistency

TEXT = b"the quick brown fox jumps over the lazy dog\n" * 2000


# --- digests -------------------------------------------------------------------------------


def test_digests_are_the_standard_hashes_and_zero_digest_is_reserved() -> None:
    # The published test vectors: a datastore written here reads the same anywhere.
    assert chunk_digest(b"abc").hex() == (
        "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    )
    assert sha256(b"abc").hex() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert bytes(32) == ZERO_DIGEST
    assert chunk_digest(bytes(4096)) != ZERO_DIGEST


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33)])
def test_check_digest_refuses_wrong_sizes(bad: bytes) -> None:
    with pytest.raises(InvalidArgument, match="32 bytes"):
        check_digest(bad)


# --- chunk blobs ---------------------------------------------------------------------------


def test_compressible_chunk_is_zstd_and_round_trips() -> None:
    compression, payload = compress(TEXT)
    assert compression is Compression.ZSTD
    assert len(payload) < len(TEXT) // 10
    blob = encode_blob(compression, len(TEXT), payload)
    assert decode_blob(blob) == (Compression.ZSTD, len(TEXT), payload)
    assert decompress(compression, payload, len(TEXT)) == TEXT


def test_incompressible_chunk_is_kept_raw() -> None:
    raw = os.urandom(65536)
    compression, payload = compress(raw)
    assert (compression, payload) == (Compression.NONE, raw)
    blob = encode_blob(compression, len(raw), payload)
    assert len(blob) == HEADER_SIZE + len(raw)
    assert decode_blob(blob) == (Compression.NONE, len(raw), raw)
    assert decompress(Compression.NONE, payload, len(raw)) == raw


def test_compression_values_match_the_wire_enum() -> None:
    from shared.rpc import agent_pb2

    assert int(Compression.NONE) == int(agent_pb2.COMPRESSION_NONE)
    assert int(Compression.ZSTD) == int(agent_pb2.COMPRESSION_ZSTD)


def test_compress_and_decompress_are_safe_across_threads() -> None:
    chunks = [bytes([i]) * 1000 + os.urandom(1000) + TEXT[: 1000 * (i + 1)] for i in range(64)]

    def round_trip(raw: bytes) -> bool:
        compression, payload = compress(raw)
        return decompress(compression, payload, len(raw)) == raw

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(round_trip, chunks * 4))


def _header(
    magic: bytes = b"CFBL",
    version: int = 1,
    compression: int = 1,
    flags: int = 0,
    raw_size: int = 3,
    key_id: int = 0,
) -> bytes:
    return struct.pack("<4sBBHII", magic, version, compression, flags, raw_size, key_id)


@pytest.mark.parametrize(
    ("blob", "error", "message"),
    [
        (b"", CorruptData, "shorter than"),
        (_header()[:10], CorruptData, "shorter than"),
        (_header(magic=b"NOPE") + b"abc", CorruptData, "magic"),
        (_header(version=0) + b"abc", CorruptData, "version 0"),
        (_header(version=2) + b"abc", UnsupportedFormat, "version 2"),
        (_header(flags=1) + b"abc", CorruptData, "flags"),
        (_header(key_id=7) + b"abc", UnsupportedFormat, "encrypted"),
        (_header(compression=9) + b"abc", UnsupportedFormat, "compression 9"),
        (_header(compression=1) + b"ab", CorruptData, "2 bytes"),
    ],
    ids=[
        "empty",
        "short-header",
        "magic",
        "version-0",
        "newer-version",
        "flags",
        "encrypted",
        "unknown-compression",
        "raw-length",
    ],
)
def test_decode_blob_refuses(blob: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        decode_blob(blob)


def test_encode_blob_refuses_bad_arguments() -> None:
    with pytest.raises(InvalidArgument, match="32 bits"):
        encode_blob(Compression.ZSTD, 1 << 32, b"x")
    with pytest.raises(InvalidArgument, match="raw size"):
        encode_blob(Compression.NONE, 5, b"abc")
    with pytest.raises(InvalidArgument, match="compression"):
        encode_blob(3, 3, b"abc")  # type: ignore[arg-type]


def test_decompress_refuses_damaged_or_lying_payloads() -> None:
    _, payload = compress(TEXT)
    with pytest.raises(CorruptData, match="not a zstd frame"):
        decompress(Compression.ZSTD, b"garbage", len(TEXT))
    with pytest.raises(CorruptData, match="zstd"):
        decompress(Compression.ZSTD, payload[:-4], len(TEXT))
    with pytest.raises(CorruptData, match="declares"):
        decompress(Compression.ZSTD, payload, len(TEXT) - 1)
    with pytest.raises(CorruptData, match="unused data"):
        decompress(Compression.ZSTD, payload + b"trailing", len(TEXT))
    with pytest.raises(CorruptData, match="expected 5"):
        decompress(Compression.NONE, b"abc", 5)


def test_decompress_bounds_frames_without_a_content_size() -> None:
    streaming = zstandard.ZstdCompressor().compressobj()
    payload = streaming.compress(TEXT) + streaming.flush()
    assert zstandard.frame_content_size(payload) == -1
    assert decompress(Compression.ZSTD, payload, len(TEXT)) == TEXT
    # A sender claiming a small chunk cannot make the reader inflate a big one.
    with pytest.raises(CorruptData):
        decompress(Compression.ZSTD, payload, 1000)


def test_compress_refuses_out_of_range_level() -> None:
    with pytest.raises(InvalidArgument, match="level"):
        compress(b"x", level=99)


# --- disk indexes --------------------------------------------------------------------------

D1, D2 = chunk_digest(b"one"), chunk_digest(b"two")


def _index(size: int = 10_000, chunk_size: int = 4096) -> DiskIndex:
    return DiskIndex("root", size, chunk_size, D1 + ZERO_DIGEST + D2)


def test_index_round_trips_and_describes_its_chunks() -> None:
    index = _index()
    decoded = DiskIndex.decode(index.encode())
    assert decoded == index
    assert len(decoded) == decoded.chunk_count == 3
    assert decoded.digest_at(0) == D1
    assert decoded.digest_at(1) == ZERO_DIGEST
    assert list(decoded.iter_digests()) == [D1, ZERO_DIGEST, D2]
    assert decoded.referenced() == {D1, D2}
    assert decoded.extent(2) == (8192, 10_000 - 8192)
    with pytest.raises(IndexError):
        decoded.digest_at(3)


def test_index_of_an_empty_disk_round_trips() -> None:
    index = DiskIndex("empty", 0, 4096, b"")
    assert DiskIndex.decode(index.encode()) == index
    assert len(index) == 0


def test_index_refers_to_repeated_chunks_once() -> None:
    index = DiskIndex("data", 4 * 4096, 4096, D1 * 3 + ZERO_DIGEST)
    assert index.referenced() == {D1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"digests": D1 * 2}, "needs 3 digests"),
        ({"digests": D1 * 3 + b"x"}, "needs 3 digests"),
        ({"disk": ""}, "disk name"),
        ({"disk": "../etc"}, "disk name"),
        ({"disk": "a/b"}, "disk name"),
        ({"chunk_size": 0}, "chunk size"),
        ({"size_bytes": -1}, "negative"),
    ],
)
def test_index_refuses_inconsistent_fields(kwargs: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {
        "disk": "root",
        "size_bytes": 10_000,
        "chunk_size": 4096,
        "digests": D1 * 3,
    }
    fields.update(kwargs)
    with pytest.raises(InvalidArgument, match=message):
        DiskIndex(**fields)


@pytest.mark.parametrize("cut", [0, 10, 40, -1, -32, -33])
def test_truncated_index_is_corrupt(cut: int) -> None:
    data = _index().encode()
    with pytest.raises(CorruptData):
        DiskIndex.decode(data[:cut])


def test_index_with_any_flipped_byte_is_corrupt() -> None:
    data = _index().encode()
    for position in range(4, len(data)):  # the magic is checked on its own
        damaged = bytearray(data)
        damaged[position] ^= 0x40
        with pytest.raises((CorruptData, UnsupportedFormat)):
            DiskIndex.decode(bytes(damaged))


def _resealed(body: bytes) -> bytes:
    """An index whose checksum is right for a body a buggy writer produced."""
    return body + sha256(body)


def test_index_from_a_newer_version_is_unsupported() -> None:
    data = bytearray(_index().encode()[:-32])
    data[4] = 2
    with pytest.raises(UnsupportedFormat, match="version 2"):
        DiskIndex.decode(_resealed(bytes(data)))


def test_index_with_bad_magic_is_corrupt() -> None:
    data = _index().encode()
    with pytest.raises(CorruptData, match="magic"):
        DiskIndex.decode(b"XXXX" + data[4:])


def test_index_whose_header_disagrees_with_its_length_is_corrupt() -> None:
    body = bytearray(_index().encode()[:-32])
    struct.pack_into("<Q", body, 20, 4)  # chunk count 4 instead of 3
    with pytest.raises(CorruptData, match="header describes"):
        DiskIndex.decode(_resealed(bytes(body)))


def test_index_with_a_size_its_digests_do_not_cover_is_corrupt() -> None:
    body = bytearray(_index().encode()[:-32])
    struct.pack_into("<Q", body, 12, 50_000)  # disk size that needs 13 chunks
    with pytest.raises(CorruptData, match="needs 13 digests"):
        DiskIndex.decode(_resealed(bytes(body)))


def test_index_with_a_non_utf8_name_is_corrupt() -> None:
    body = bytearray(_index().encode()[:-32])
    body[30] = 0xFF
    with pytest.raises(CorruptData, match="UTF-8"):
        DiskIndex.decode(_resealed(bytes(body)))


# --- manifests -----------------------------------------------------------------------------


def _manifest(**changes: Any) -> RecoveryPointManifest:
    index = _index()
    fields: dict[str, Any] = {
        "id": "rp-1",
        "vm_id": "vm-42",
        "vault": "eu-west",
        "job_id": "job-7",
        "created_at": datetime(2025, 1, 31, 2, 0, tzinfo=UTC),
        "consistency": "file-system",
        "disks": (
            ManifestDisk.of(index, sha256(index.encode()).hex()),
            ManifestDisk("data", 0, 4096, 0, "ab" * 32),
        ),
        "vm": {"name": "web-1", "service": "shop", "region": "eu-west", "hostname": "web-1.lab"},
    }
    fields.update(changes)
    return RecoveryPointManifest(**fields)


def test_manifest_round_trips() -> None:
    manifest = _manifest()
    data = manifest.encode()
    decoded = RecoveryPointManifest.decode(data)
    assert decoded == manifest
    assert decoded.encode() == data
    assert json.loads(data)["format"] == 1
    assert decoded.disk("root").chunk_count == 3
    assert decoded.vm["service"] == "shop"


def test_manifest_time_is_kept_as_an_instant_in_utc() -> None:
    local = datetime(2025, 1, 31, 3, 0, tzinfo=timezone(timedelta(hours=1)))
    manifest = _manifest(created_at=local)
    decoded = RecoveryPointManifest.decode(manifest.encode())
    assert decoded.created_at == local
    assert decoded.created_at.utcoffset() == timedelta(0)
    assert json.loads(manifest.encode())["created_at"] == "2025-01-31T02:00:00+00:00"


def test_manifest_accepts_the_domain_consistency_enum() -> None:
    manifest = _manifest(consistency=Consistency.APPLICATION)
    assert RecoveryPointManifest.decode(manifest.encode()).consistency == "application"


def test_manifest_is_immutable() -> None:
    manifest = _manifest()
    with pytest.raises(TypeError):
        manifest.vm["name"] = "other"  # type: ignore[index]
    assert hash(manifest) == hash(_manifest())


def test_manifest_names_a_missing_disk() -> None:
    with pytest.raises(DiskNotFound, match="root, data"):
        _manifest().disk("swap")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"created_at": datetime(2025, 1, 31)}, "timezone-aware"),
        ({"consistency": "perfect"}, "consistency"),
        ({"disks": ()}, "at least one disk"),
        ({"id": ""}, "id"),
        ({"vm": {"name": 3}}, "strings"),
    ],
)
def test_manifest_refuses_invalid_fields(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _manifest(**changes)


def test_manifest_refuses_repeated_disks() -> None:
    disk = ManifestDisk("root", 0, 4096, 0, "ab" * 32)
    with pytest.raises(InvalidArgument, match="repeat"):
        _manifest(disks=(disk, disk))


def test_manifest_disk_refuses_wrong_chunk_count_and_hash() -> None:
    with pytest.raises(InvalidArgument, match="cannot cover"):
        ManifestDisk("root", 10_000, 4096, 2, "ab" * 32)
    with pytest.raises(InvalidArgument, match="hex"):
        ManifestDisk("root", 10_000, 4096, 3, "AB" * 32)


def _document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(_manifest().encode())
    return document


def _edited(path: tuple[str | int, ...], value: Any) -> bytes:
    document = _document()
    target: Any = document
    for step in path[:-1]:
        target = target[step]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(document).encode()


_DELETE = object()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"{not json", "not UTF-8 JSON"),
        (b"[1, 2]", "not a JSON object"),
        (_edited(("format",), _DELETE), "'format' is missing"),
        (_edited(("format",), "1"), "'format' should be int"),
        (_edited(("format",), 0), "format 0"),
        (_edited(("vm_id",), _DELETE), "'vm_id' is missing"),
        (_edited(("created_at",), "yesterday"), "ISO 8601"),
        (_edited(("created_at",), "2025-01-31T02:00:00"), "timezone-aware"),
        (_edited(("consistency",), "perfect"), "consistency"),
        (_edited(("disks",), []), "at least one disk"),
        (_edited(("disks", 0), "root"), "not a JSON object"),
        (_edited(("disks", 0, "size_bytes"), "big"), "'size_bytes' should be int"),
        (_edited(("disks", 0, "size_bytes"), True), "'size_bytes' should be int"),
        (_edited(("disks", 0, "chunk_count"), 99), "cannot cover"),
        (_edited(("disks", 0, "index_sha256"), "00"), "hex"),
        (_edited(("disks", 1, "name"), "root"), "repeat"),
        (_edited(("disks", 0, "name"), "../../etc"), "disk name"),
        (_edited(("vm",), {"name": 1}), "strings"),
    ],
)
def test_malformed_manifest_is_corrupt(data: bytes, message: str) -> None:
    with pytest.raises(CorruptData, match=message):
        RecoveryPointManifest.decode(data)


def test_manifest_from_a_newer_format_is_unsupported() -> None:
    with pytest.raises(UnsupportedFormat, match="format version 2"):
        RecoveryPointManifest.decode(_edited(("format",), 2))


def test_manifest_ignores_fields_added_without_a_format_change() -> None:
    decoded = RecoveryPointManifest.decode(_edited(("retention_hint",), "keep"))
    assert decoded == _manifest()
