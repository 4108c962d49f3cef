"""Reading disks: holes are never read, zero chunks are recognised, data chunks are hashed."""

from __future__ import annotations

import os
from pathlib import Path

from blake3 import blake3

from agent.disk import DiskReader, data_chunks
from shared.digest import ZERO_DIGEST

CHUNK = 64 * 1024


def sparse_file(path: Path, size: int, extents: list[tuple[int, bytes]]) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, size)
    for offset, data in extents:
        os.pwrite(fd, data, offset)
    os.fsync(fd)
    return fd


def test_holes_are_skipped_and_data_chunks_found(tmp_path: Path) -> None:
    size = 64 * CHUNK
    fd = sparse_file(
        tmp_path / "disk.img",
        size,
        [
            (0, b"a" * 100),  # chunk 0
            (10 * CHUNK - 10, b"b" * 20),  # straddles chunks 9 and 10
            (40 * CHUNK, b"c" * (3 * CHUNK)),  # chunks 40..42
            (size - 1, b"z"),  # the last chunk
        ],
    )
    try:
        found = list(data_chunks(fd, size, CHUNK))
    finally:
        os.close(fd)
    # File systems allocate in blocks (4 KiB here), never less: these chunks and no others.
    assert found == [0, 9, 10, 40, 41, 42, 63]


def test_a_file_without_holes_is_all_data(tmp_path: Path) -> None:
    path = tmp_path / "dense.img"
    path.write_bytes(os.urandom(5 * CHUNK + 123))
    with DiskReader(path, CHUNK) as disk:
        assert disk.size == 5 * CHUNK + 123
        assert list(disk.data_chunks()) == list(range(6))
        digest, data = disk.read(5)
        assert len(data) == 123  # the last chunk is short
        assert digest == blake3(path.read_bytes()[5 * CHUNK :]).digest()
        first, data = disk.read(0)
        assert data == path.read_bytes()[:CHUNK]
        assert first == blake3(data).digest()


def test_an_empty_sparse_disk_has_no_data_chunks(tmp_path: Path) -> None:
    fd = sparse_file(tmp_path / "empty.img", 1 << 30, [])
    try:
        assert list(data_chunks(fd, 1 << 30, CHUNK)) == []
    finally:
        os.close(fd)


def test_written_zeros_are_a_zero_chunk(tmp_path: Path) -> None:
    os.close(sparse_file(tmp_path / "zeros.img", 4 * CHUNK, [(CHUNK, bytes(CHUNK))]))
    with DiskReader(tmp_path / "zeros.img", CHUNK) as disk:
        assert 1 in list(disk.data_chunks())  # allocated, so it is read...
        assert disk.read(1) == (ZERO_DIGEST, b"")  # ...and found zero


def test_direct_reads_see_what_was_just_written(tmp_path: Path) -> None:
    """O_DIRECT bypasses the page cache; the kernel flushes dirty pages before such a read."""
    path = tmp_path / "busy.img"
    path.write_bytes(bytes(2 * CHUNK))
    with DiskReader(path, CHUNK) as disk:
        assert disk.read(1) == (ZERO_DIGEST, b"")
        with path.open("r+b") as f:  # buffered write, not yet on disk
            f.seek(CHUNK + 5)
            f.write(b"fresh")
        digest, data = disk.read(1)
        assert data[5:10] == b"fresh"
        assert digest == blake3(data).digest()
