"""Changed blocks: the extent-map comparison (pure), the full-read decision (pure), and FIEMAP
on real reflink clones on a loop-mounted XFS."""

from __future__ import annotations

import dataclasses
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import tracking
from agent.changed_blocks import (
    EXTENT_DELALLOC,
    EXTENT_ENCODED,
    EXTENT_LAST,
    EXTENT_SHARED,
    EXTENT_UNWRITTEN,
    Extent,
    changed_chunks,
    extents,
)
from agent.snapshot import FICLONE
from agent.tracking import DAY, FileIdentity, KeptClone, Request, full_read_reason
from controller.vaults import Vaults
from shared.digest import MASKED_DIGEST
from shared.errors import InvalidArgument
from tests.loopfs import XFS_MIN, LoopFs, loop_fs

KiB, MiB = 1 << 10, 1 << 20
S = EXTENT_SHARED
CHUNK = 64 * KiB
SIZE = 1 * MiB  # 16 chunks


def chunks(flags: bytearray) -> list[int]:
    return [i for i, f in enumerate(flags) if f]


def test_the_same_shared_blocks_are_unchanged() -> None:
    same = [Extent(0, 10 * MiB, SIZE, S | EXTENT_LAST)]
    assert chunks(changed_chunks(same, same, SIZE, CHUNK)) == []


def test_an_overwrite_moved_by_copy_on_write_changes_the_chunks_it_touches() -> None:
    old = [Extent(0, 10 * MiB, SIZE, S)]
    # 4 KiB at 200 KiB went to new blocks: the new file's map is split in three.
    new = [
        Extent(0, 10 * MiB, 200 * KiB, S),
        Extent(200 * KiB, 50 * MiB, 4 * KiB, 0),
        Extent(204 * KiB, 10 * MiB + 204 * KiB, SIZE - 204 * KiB, S),
    ]
    assert chunks(changed_chunks(old, new, SIZE, CHUNK)) == [3]
    # One straddling a chunk boundary touches both.
    new[1] = Extent(190 * KiB, 50 * MiB, 14 * KiB, 0)
    new[0] = Extent(0, 10 * MiB, 190 * KiB, S)
    assert chunks(changed_chunks(old, new, SIZE, CHUNK)) == [2, 3]


def test_holes_punched_filled_or_kept() -> None:
    old = [Extent(0, 10 * MiB, 512 * KiB, S)]  # second half a hole
    punched = [
        Extent(0, 10 * MiB, 128 * KiB, S),
        Extent(256 * KiB, 10 * MiB + 256 * KiB, 256 * KiB, S),
    ]
    assert chunks(changed_chunks(old, punched, SIZE, CHUNK)) == [2, 3]
    filled = [*old, Extent(900 * KiB, 70 * MiB, 8 * KiB, 0)]
    assert chunks(changed_chunks(old, filled, SIZE, CHUNK)) == [14]
    assert chunks(changed_chunks([], [], SIZE, CHUNK)) == []  # a hole in both: zeros in both


def test_same_place_at_another_offset_or_without_the_shared_flag_is_changed() -> None:
    old = [Extent(0, 10 * MiB, 128 * KiB, S)]
    shifted = [Extent(0, 10 * MiB + 4 * KiB, 128 * KiB, S)]
    assert chunks(changed_chunks(old, shifted, SIZE, CHUNK)) == [0, 1]
    unshared = [Extent(0, 10 * MiB, 128 * KiB, 0)]
    assert chunks(changed_chunks(old, unshared, SIZE, CHUNK)) == [0, 1]


@pytest.mark.parametrize("flag", [EXTENT_DELALLOC, EXTENT_ENCODED, EXTENT_UNWRITTEN])
def test_uncomparable_or_differently_written_extents_are_changed(flag: int) -> None:
    old = [Extent(0, 10 * MiB, 64 * KiB, S)]
    new = [Extent(0, 10 * MiB, 64 * KiB, S | flag)]
    assert chunks(changed_chunks(old, new, SIZE, CHUNK)) == [0]


def test_extents_past_the_end_and_a_short_last_chunk() -> None:
    size = SIZE + 10 * KiB  # 17 chunks, the last short
    old = [Extent(0, 10 * MiB, 2 * MiB, S)]  # preallocated past the end
    new = [Extent(0, 10 * MiB, SIZE, S), Extent(SIZE, 90 * MiB, 1 * MiB, 0)]
    assert chunks(changed_chunks(old, new, size, CHUNK)) == [16]


def test_overlapping_extents_are_refused() -> None:
    bad = [Extent(0, 0, 128 * KiB, S), Extent(64 * KiB, 0, 128 * KiB, S)]
    with pytest.raises(ValueError, match="overlap"):
        changed_chunks(bad, bad, SIZE, CHUNK)


# --- the full-read decision ---------------------------------------------------------------

IDENTITY = FileIdentity(inode=7, size=SIZE, mtime_ns=1, ctime_ns=2)
KEPT = KeptClone("rp1", ".vm.img.coffer-tracked-rp1", IDENTITY, CHUNK, "blake3", 1000.0)
REQUEST = Request("rp2", "rp1", full_read_days=7)


def reason(request: Request = REQUEST, kept: KeptClone | None = KEPT, **changes: object) -> str:
    args: dict[str, object] = {
        "kept_now": IDENTITY,
        "provider": "reflink",
        "size": SIZE,
        "kept_size": SIZE,
        "chunk_size": CHUNK,
        "chunk_hash": "blake3",
        "now": 1000.0 + DAY,
    }
    args.update(changes)
    return full_read_reason(request, kept, **args)  # type: ignore[arg-type]


def test_full_read_reasons() -> None:
    assert reason() == ""
    assert "off" in reason(dataclasses.replace(REQUEST, full_read_days=0))
    assert reason(dataclasses.replace(REQUEST, controller_reason="damaged")) == "damaged"
    assert "read-while-frozen" in reason(provider="read-while-frozen")
    assert "no previous" in reason(dataclasses.replace(REQUEST, previous_recovery_point_id=""))
    assert "no clone was kept" in reason(kept=None)
    assert "builds on rp0" in reason(dataclasses.replace(REQUEST, previous_recovery_point_id="rp0"))
    assert "missing" in reason(kept_now=None)
    assert "modified" in reason(kept_now=dataclasses.replace(IDENTITY, mtime_ns=5))
    assert "resized" in reason(size=2 * SIZE)
    assert "chunk size" in reason(chunk_size=2 * CHUNK)
    assert "key" in reason(chunk_hash="blake3-keyed:00")
    assert "periodic" in reason(now=1000.0 + 7 * DAY)
    assert "periodic" in reason(now=10.0)  # a clock gone backwards


# --- FIEMAP on real clones -----------------------------------------------------------------


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[LoopFs]:
    with loop_fs(tmp_path / "scratch-xfs.img", "xfs", XFS_MIN) as mounted:
        yield mounted


def clone(source: Path, target: Path) -> None:
    with source.open("rb") as src, target.open("wb") as dst:
        fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())


def changed(old: Path, new: Path, size: int) -> list[int]:
    with old.open("rb") as a, new.open("rb") as b:
        return chunks(
            changed_chunks(extents(a.fileno(), size), extents(b.fileno(), size), size, CHUNK)
        )


@pytest.mark.root
def test_fiemap_of_reflink_clones_finds_exactly_what_was_written(xfs: LoopFs) -> None:
    image = xfs.mountpoint / "vm.img"
    size = 8 * MiB
    with image.open("wb") as f:
        f.write(os.urandom(size // 2))  # the second half a hole
        f.truncate(size)
    kept = xfs.mountpoint / "kept"
    clone(image, kept)
    assert changed(kept, image, size) == []  # shared, not yet synced extents included
    fd = os.open(image, os.O_WRONLY)
    try:
        os.pwrite(fd, b"x" * 4096, 5 * CHUNK + 100)  # an overwrite, unaligned
        os.pwrite(fd, b"y" * 8192, 100 * CHUNK)  # into the hole
        os.posix_fallocate(fd, 120 * CHUNK, CHUNK)  # unwritten blocks
    finally:
        os.close(fd)
    new = xfs.mountpoint / "new"
    clone(image, new)
    # Fallocated blocks read as zeros: XFS's clone leaves them a hole, as the kept clone had.
    assert changed(kept, new, size) == [5, 100]
    with image.open("rb") as a, new.open("rb") as b:
        assert any(e.flags & EXTENT_UNWRITTEN for e in extents(a.fileno(), size))
        assert not any(e.flags & EXTENT_UNWRITTEN for e in extents(b.fileno(), size))
    assert changed(new, new, size) == []
    # A copy has the same bytes but none of the blocks: everything with data is changed.
    copy = xfs.mountpoint / "copy"
    copy.write_bytes(new.read_bytes())
    assert set(changed(new, copy, size)) >= set(range(64))


def test_the_vault_setting_is_checked_before_anything_changes() -> None:
    Vaults.check_update(0, full_read_days=0)
    Vaults.check_update(0, full_read_days=3650)
    with pytest.raises(InvalidArgument, match="0 \\(every backup\\) to 3650 days"):
        Vaults.check_update(0, full_read_days=3651)


@pytest.mark.root
def test_a_kept_clone_plans_the_next_read_and_masked_chunks_are_read(xfs: LoopFs) -> None:
    image = xfs.mountpoint / "vm.img"
    size = 2 * MiB  # 32 chunks
    image.write_bytes(os.urandom(size))
    first = xfs.mountpoint / ".snapshot-1"
    clone(image, first)
    tracking.keep(image, first, rp_id="rp1", chunk_size=CHUNK, chunk_hash="blake3", full_read_at=0)
    assert not first.exists()
    assert (xfs.mountpoint / ".vm.img.coffer-tracked-rp1").exists()
    with image.open("r+b") as f:
        f.seek(10 * CHUNK)
        f.write(b"z" * 100)
    second = xfs.mountpoint / ".snapshot-2"
    clone(image, second)
    previous = bytearray(b"\1" * 32 * 32)
    previous[3 * 32 : 4 * 32] = MASKED_DIGEST  # missing or damaged in the datastore

    def plan(previous: bytes) -> tracking.Plan:
        request = Request("rp2", "rp1", full_read_days=7)
        return tracking.plan(
            request, image, second, provider="reflink", size=size, chunk_size=CHUNK,
            chunk_hash="blake3", previous=previous, now=DAY,
        )  # fmt: skip

    planned = plan(bytes(previous))
    assert planned.reason == ""
    assert [n for n in range(32) if planned.must_read(n)] == [3, 10]
    assert "index" in plan(bytes(previous[:-32])).reason  # not one digest a chunk
    tracking.keep(image, second, rp_id="rp2", chunk_size=CHUNK, chunk_hash="blake3", full_read_at=0)
    assert sorted(p.name for p in xfs.mountpoint.glob(".vm.img.coffer-track*")) == [
        ".vm.img.coffer-tracked-rp2",
        ".vm.img.coffer-tracking.json",
    ]
    tracking.drop(image)
    assert list(xfs.mountpoint.glob(".vm.img.coffer-track*")) == []
