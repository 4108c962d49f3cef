"""Reading disks: holes are never read, zero chunks are recognised, data chunks are hashed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from agent.disk import data_chunks, disk_size, is_zero, read_chunk
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
    fd = os.open(path, os.O_RDONLY)
    try:
        size = disk_size(fd)
        assert size == 5 * CHUNK + 123
        assert list(data_chunks(fd, size, CHUNK)) == list(range(6))
        digest, data = read_chunk(fd, 5, CHUNK, size)
        assert len(data) == 123  # the last chunk is short
        assert digest == hashlib.sha256(path.read_bytes()[5 * CHUNK :]).digest()
    finally:
        os.close(fd)


def test_an_empty_sparse_disk_has_no_data_chunks(tmp_path: Path) -> None:
    fd = sparse_file(tmp_path / "empty.img", 1 << 30, [])
    try:
        assert list(data_chunks(fd, 1 << 30, CHUNK)) == []
    finally:
        os.close(fd)


def test_written_zeros_are_a_zero_chunk(tmp_path: Path) -> None:
    fd = sparse_file(tmp_path / "zeros.img", 4 * CHUNK, [(CHUNK, bytes(CHUNK))])
    try:
        assert 1 in list(data_chunks(fd, 4 * CHUNK, CHUNK))  # allocated, so it is read...
        assert read_chunk(fd, 1, CHUNK, 4 * CHUNK) == (ZERO_DIGEST, b"")  # ...and found zero
    finally:
        os.close(fd)


@pytest.mark.parametrize("length", [1, 4096, CHUNK, CHUNK + 1])
def test_is_zero(length: int) -> None:
    assert is_zero(bytes(length))
    assert not is_zero(bytes(length - 1) + b"\1")
