"""Snapshot providers on real file systems: reflink clones on XFS, the fallbacks, refusals."""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.snapshot import (
    SNAPSHOT_MARK,
    BtrfsSubvolume,
    LvmSnapshot,
    ReadWhileFrozen,
    ReflinkClone,
    choose,
)
from shared.errors import UserErrorSnapshotProviderUnsupported
from tests.loopfs import XFS_MIN, LoopFs, loop_fs

MiB = 1 << 20
BLOCK = 4096

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000


def extents(path: Path) -> list[tuple[int, int, int]]:
    """(logical offset, length, flags) of the file's extents, from FIEMAP."""
    found: list[tuple[int, int, int]] = []
    start, count = 0, 256
    with path.open("rb") as f:
        while True:
            request = bytearray(
                struct.pack("=QQIIII", start, (1 << 64) - 1 - start, 1, 0, count, 0)
            )
            request += bytes(56 * count)
            fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, request)
            mapped = struct.unpack_from("=I", request, 20)[0]
            for i in range(mapped):
                logical, _, length = struct.unpack_from("=QQQ", request, 32 + 56 * i)
                flags = struct.unpack_from("=I", request, 32 + 56 * i + 40)[0]
                found.append((logical, length, flags))
            if not mapped or found[-1][2] & FIEMAP_EXTENT_LAST:
                return found
            start = found[-1][0] + found[-1][1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[LoopFs]:
    with loop_fs(tmp_path / "scratch-xfs.img", "xfs", XFS_MIN) as mounted:
        yield mounted


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[LoopFs]:
    with loop_fs(tmp_path / "scratch-ext4.img", "ext4", 128 * MiB) as mounted:
        yield mounted


class BlockWriter:
    """Overwrites random blocks of an image with their write's sequence number, logging each
    write in order, until stopped: the image's state after write N can be rebuilt."""

    def __init__(self, path: Path, blocks: int) -> None:
        self.path = path
        self.blocks = blocks
        self.log: list[int] = []  # block written by write number i + 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="block-writer")

    def _run(self) -> None:
        rng = random.Random(1)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            while not self._stop.is_set():
                block = rng.randrange(self.blocks)
                sequence = len(self.log) + 1
                os.pwrite(fd, struct.pack("=Q", sequence) * (BLOCK // 8), block * BLOCK)
                self.log.append(block)
        finally:
            os.close(fd)

    def __enter__(self) -> BlockWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def state_after(self, writes: int, initial: bytes) -> bytes:
        image = bytearray(initial)
        for number, block in enumerate(self.log[:writes], start=1):
            image[block * BLOCK : (block + 1) * BLOCK] = struct.pack("=Q", number) * (BLOCK // 8)
        return bytes(image)


def test_reflink_clone_shares_extents_and_is_the_image_at_one_instant(xfs: LoopFs) -> None:
    image = xfs.mountpoint / "vm.img"
    blocks = 16 * MiB // BLOCK
    initial = os.urandom(blocks * BLOCK)
    image.write_bytes(initial)
    os.sync()
    provider = ReflinkClone("root", image)
    assert provider.probe()
    with BlockWriter(image, blocks) as writer:
        while len(writer.log) < 1000:  # the image is changing
            pass
        snapshot = provider.take()
        at_snapshot = len(writer.log)
        while len(writer.log) < at_snapshot + 1000:  # and keeps changing afterwards
            pass
    try:
        assert snapshot.parent == image.parent
        assert snapshot.name.startswith(f".{image.name}{SNAPSHOT_MARK}")
        clone = snapshot.read_bytes()
        # The clone is the image as it was after exactly one of the writes, all before it in,
        # none after it: a point in time, though the writer never stopped.
        written = {
            b
            for b in writer.log
            if clone[b * BLOCK : (b + 1) * BLOCK] != initial[b * BLOCK : (b + 1) * BLOCK]
        }
        last = max(struct.unpack_from("=Q", clone, b * BLOCK)[0] for b in written)
        # A write is logged just after it returns: when `at_snapshot` was read, one write may
        # have been in the image (and so in the clone) but not yet in the log.
        assert 1000 <= last <= at_snapshot + 1
        assert clone == writer.state_after(last, initial)
        assert image.read_bytes() != clone
    finally:
        provider.release()
    assert not snapshot.exists()
    provider.release()  # twice is fine


def test_a_reflink_clone_shares_every_extent_and_costs_no_space(xfs: LoopFs) -> None:
    image = xfs.mountpoint / "vm.img"
    image.write_bytes(os.urandom(64 * MiB))
    os.sync()
    free_before = os.statvfs(xfs.mountpoint).f_bfree
    provider = ReflinkClone("root", image)
    snapshot = provider.take()
    try:
        os.sync()
        used = (free_before - os.statvfs(xfs.mountpoint).f_bfree) * BLOCK
        assert used < MiB, used  # metadata only, not a 64 MiB copy
        found = extents(snapshot)
        assert sum(length for _, length, _ in found) == 64 * MiB
        assert all(flags & FIEMAP_EXTENT_SHARED for _, _, flags in found)
        assert sha256(snapshot) == sha256(image)
    finally:
        provider.release()


def test_a_clone_left_by_a_dead_agent_is_removed(xfs: LoopFs) -> None:
    image = xfs.mountpoint / "vm.img"
    image.write_bytes(os.urandom(MiB))
    stale = image.parent / f".{image.name}{SNAPSHOT_MARK}999999999-0"
    stale.write_bytes(b"old")
    provider = ReflinkClone("root", image)
    snapshot = provider.take()
    try:
        assert not stale.exists()
        assert sha256(snapshot) == sha256(image)
    finally:
        provider.release()


def test_on_ext4_the_fallback_is_read_while_frozen(ext4: LoopFs) -> None:
    image = ext4.mountpoint / "vm.img"
    image.write_bytes(os.urandom(MiB))
    provider, refused = choose("root", image)
    assert isinstance(provider, ReadWhileFrozen)
    assert provider.atomic is False
    assert "ext4" in refused["reflink"]
    assert "cannot share extents" in refused["reflink"]
    assert "not btrfs" in refused["btrfs-subvolume"]
    assert "device-mapper" in refused["lvm"] or "not implemented" in refused["lvm"]
    assert provider.take() == image  # the disk itself
    provider.release()
    # The probe left nothing behind.
    assert sorted(p.name for p in ext4.mountpoint.iterdir()) == ["lost+found", "vm.img"]


def test_on_xfs_reflink_is_chosen_first(xfs: LoopFs) -> None:
    image = xfs.mountpoint / "vm.img"
    image.write_bytes(b"x" * BLOCK)
    provider, refused = choose("root", image)
    assert isinstance(provider, ReflinkClone)
    assert refused == {}


@pytest.mark.parametrize(
    ("order", "why"),
    [
        (("reflink",), "cannot share extents"),
        (("btrfs-subvolume",), "not btrfs"),
        (("lvm",), "device-mapper"),
        (("zfs",), "no such provider"),
    ],
)
def test_a_provider_the_host_cannot_use_is_a_typed_error(
    ext4: LoopFs, order: tuple[str, ...], why: str
) -> None:
    image = ext4.mountpoint / "vm.img"
    image.write_bytes(b"x" * BLOCK)
    with pytest.raises(UserErrorSnapshotProviderUnsupported) as raised:
        choose("root", image, order)
    assert raised.value.code == "UserErrorSnapshotProviderUnsupported"
    assert why in str(raised.value)
    assert f"Disk 'root' cannot use the {order[0]} snapshot provider" in str(raised.value)


def test_providers_that_cannot_run_refuse_to_take(ext4: LoopFs) -> None:
    image = ext4.mountpoint / "vm.img"
    image.write_bytes(b"x" * BLOCK)
    for cls in (BtrfsSubvolume, LvmSnapshot, ReflinkClone):
        provider = cls("root", image)
        assert not provider.probe()
        with pytest.raises(UserErrorSnapshotProviderUnsupported):
            provider.take()
        provider.release()


def test_a_block_device_cannot_be_cloned(xfs: LoopFs) -> None:
    probe = ReflinkClone("root", Path(xfs.device)).probe()
    assert not probe
    assert "not an image file" in probe.why
