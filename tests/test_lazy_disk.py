"""A lazily read disk: right bytes at any offset, only touched chunks fetched, zero chunks
never fetched, one download per chunk however many readers, a bounded cache, read-ahead for
sequential readers, and a damaged chunk an error (never wrong bytes)."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from agent.chunk_cache import ChunkCache
from agent.lazy_disk import READAHEAD_CHUNKS, LazyDisk
from shared.digest import ZERO_DIGEST, ChunkHash
from shared.errors import ChunkMissing, DataCorrupted
from tests.chunked import MemorySource, chunk_image

PLAIN = ChunkHash()  # the chunks here are named by plain BLAKE3, as in a format-1 datastore

CHUNK = 64 << 10
COUNT = 40


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    """A disk of 40 chunks and a short tail: data, repeats, zeros written, and holes."""
    rng = random.Random(7)
    size = COUNT * CHUNK + 1234
    data = bytearray(size)
    for number in range(COUNT):
        if number % 5 == 4:
            continue  # zeros (a hole in the image)
        data[number * CHUNK : (number + 1) * CHUNK] = rng.randbytes(CHUNK)
    data[3 * CHUNK : 4 * CHUNK] = data[0:CHUNK]  # a repeated chunk
    data[-1234:] = rng.randbytes(1234)
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(size)
        for number in range(COUNT):
            if number % 5 != 4:
                f.seek(number * CHUNK)
                f.write(data[number * CHUNK : (number + 1) * CHUNK])
        f.seek(size - 1234)
        f.write(data[-1234:])
    return path, bytes(data)


def open_disk(
    path: Path, cache_bytes: int = 64 << 20, readahead: int = 0
) -> tuple[LazyDisk, MemorySource]:
    index, stored = chunk_image(path, chunk_size=CHUNK)
    source = MemorySource(stored)
    disk = LazyDisk(
        index,
        source,
        recovery_point="rp-1",
        chunk_hash=PLAIN,
        cache=ChunkCache(cache_bytes),
        readahead=readahead,
    )
    return disk, source


async def test_reads_return_the_disk_bytes_and_fetch_only_what_they_touch(
    image: tuple[Path, bytes],
) -> None:
    path, data = image
    disk, source = open_disk(path)
    async with disk:
        assert await disk.read(10, 100) == data[10:110]
        assert source.asked == [disk.index.digest_at(0)]
        # Across a chunk boundary, and past the end of the disk (a short read).
        assert await disk.read(CHUNK - 5, 10) == data[CHUNK - 5 : CHUNK + 5]
        assert await disk.read(len(data) - 100, 1000) == data[-100:]
        assert await disk.read(len(data), 10) == b""
        rng = random.Random(1)
        for _ in range(200):
            offset = rng.randrange(len(data))
            length = rng.randrange(1, 3 * CHUNK)
            assert await disk.read(offset, length) == data[offset : offset + length]
    # Each stored chunk was fetched once: the repeat shares chunk 0's digest.
    assert len(source.asked) == len(set(source.asked)) == len(disk.index.referenced())
    assert disk.stats.chunks_fetched == len(source.asked)
    assert disk.stats.bytes_fetched == source.bytes_served
    assert disk.errors == []


async def test_zero_chunks_are_never_fetched(image: tuple[Path, bytes]) -> None:
    path, _data = image
    disk, source = open_disk(path)
    assert disk.index.digest_at(4) == ZERO_DIGEST
    async with disk:
        assert await disk.read(4 * CHUNK, CHUNK) == bytes(CHUNK)
    assert source.calls == 0
    assert disk.stats.zero_chunks_read == 1


async def test_concurrent_readers_of_a_chunk_share_one_download(
    image: tuple[Path, bytes],
) -> None:
    path, data = image
    disk, source = open_disk(path)
    source.gate = asyncio.Event()
    async with disk:
        readers = [asyncio.create_task(disk.read(2 * CHUNK + i * 100, 50)) for i in range(20)]
        await asyncio.sleep(0.05)
        source.gate.set()
        results = await asyncio.gather(*readers)
    assert results == [data[2 * CHUNK + i * 100 : 2 * CHUNK + i * 100 + 50] for i in range(20)]
    assert source.asked == [disk.index.digest_at(2)]


async def test_a_reader_that_gives_up_leaves_the_download_to_the_others(
    image: tuple[Path, bytes],
) -> None:
    path, data = image
    disk, source = open_disk(path)
    source.gate = asyncio.Event()
    async with disk:
        quitter = asyncio.create_task(disk.read(CHUNK, 10))
        stayer = asyncio.create_task(disk.read(CHUNK + 10, 10))
        await asyncio.sleep(0.05)
        quitter.cancel()
        source.gate.set()
        assert await stayer == data[CHUNK + 10 : CHUNK + 20]
    assert len(source.asked) == 1


async def test_the_cache_stays_within_its_budget(image: tuple[Path, bytes]) -> None:
    path, data = image
    disk, source = open_disk(path, cache_bytes=3 * CHUNK)
    async with disk:
        for number in (0, 1, 2, 5, 6):
            await disk.read(number * CHUNK, 1)
            assert disk.cache.used_bytes <= 3 * CHUNK
        assert len(disk.cache) == 3
        # Chunk 6 is cached; chunk 0 was evicted and is fetched again.
        await disk.read(6 * CHUNK, 1)
        assert len(source.asked) == 5
        assert await disk.read(0, 10) == data[:10]
        assert len(source.asked) == 6


async def test_sequential_reads_read_ahead_and_random_ones_do_not(
    image: tuple[Path, bytes],
) -> None:
    path, data = image
    disk, source = open_disk(path, readahead=READAHEAD_CHUNKS)
    async with disk:
        step = CHUNK // 4
        for offset in range(0, 3 * CHUNK, step):
            assert await disk.read(offset, step) == data[offset : offset + step]
        await asyncio.sleep(0.05)  # let the read-ahead land
        assert disk.stats.readahead_chunks > 0
        # The chunks ahead are there before anyone reads them.
        ahead = [
            n for n in range(3, 3 + READAHEAD_CHUNKS) if disk.index.digest_at(n) != ZERO_DIGEST
        ]
        assert all(disk.index.digest_at(n) in disk.cache for n in ahead)

    disk, source = open_disk(path, readahead=READAHEAD_CHUNKS)
    async with disk:
        for number in (30, 2, 17, 8, 36, 21):
            await disk.read(number * CHUNK, 10)
        await asyncio.sleep(0.05)
    assert disk.stats.readahead_chunks == 0
    assert len(source.asked) == 6


async def test_a_damaged_chunk_is_an_error_naming_it_never_wrong_bytes(
    image: tuple[Path, bytes],
) -> None:
    path, data = image
    disk, source = open_disk(path)
    damaged = disk.index.digest_at(7)
    source.corrupt(damaged)
    async with disk:
        with pytest.raises(DataCorrupted) as raised:
            await disk.read(7 * CHUNK + 100, 10)
        assert raised.value.exit_code == 7
        assert raised.value.fields["chunk"] == 7
        assert raised.value.fields["digest"] == damaged.hex()
        assert raised.value.fields["disk"] == "disk0"
        assert raised.value.fields["recovery_point"] == "rp-1"
        assert "rp-1" in str(raised.value)
        assert damaged.hex() in str(raised.value)
        # A read spanning it fails too; the chunks around it still read.
        with pytest.raises(DataCorrupted):
            await disk.read(6 * CHUNK, 3 * CHUNK)
        assert await disk.read(8 * CHUNK, 10) == data[8 * CHUNK : 8 * CHUNK + 10]
        assert damaged not in disk.cache
        # Well-formed bytes under the wrong name are refused the same way.
        other = disk.index.digest_at(8)
        source.replace_raw(disk.index.digest_at(11), data[8 * CHUNK : 9 * CHUNK])
        with pytest.raises(DataCorrupted):
            await disk.read(11 * CHUNK, 10)
        assert other in disk.cache
    assert [type(e) for e in disk.errors] == [DataCorrupted, DataCorrupted]
    with pytest.raises(DataCorrupted):
        disk.check()


async def test_a_chunk_missing_from_the_datastore_is_a_typed_error(
    image: tuple[Path, bytes],
) -> None:
    path, _ = image
    disk, source = open_disk(path)
    del source.chunks[disk.index.digest_at(1)]
    async with disk:
        with pytest.raises(ChunkMissing):
            await disk.read(CHUNK, 10)
    assert isinstance(disk.errors[0], ChunkMissing)


async def test_a_closed_disk_refuses_reads_and_ends_its_downloads(
    image: tuple[Path, bytes],
) -> None:
    path, _ = image
    disk, source = open_disk(path)
    source.gate = asyncio.Event()
    async with disk:
        reader = asyncio.create_task(disk.read(0, 10))
        await asyncio.sleep(0.05)
    with pytest.raises(Exception, match="closed") as raised:
        await reader
    assert raised.value.__class__.__name__ == "FileRecoveryFailed"
    with pytest.raises(Exception, match="closed"):
        await disk.read(0, 10)


def test_a_disk_of_zero_bytes(tmp_path: Path) -> None:
    (tmp_path / "empty.img").write_bytes(b"")

    async def read() -> bytes:
        disk, _ = open_disk(tmp_path / "empty.img")
        async with disk:
            return await disk.read(0, 100)

    assert asyncio.run(read()) == b""
    assert os.path.getsize(tmp_path / "empty.img") == 0
