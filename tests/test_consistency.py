"""A consistent snapshot of an ext4 disk image under a writer that never stops.

The shape of the lab: the image lives on a scratch file system (XFS with reflink, or ext4 for
the fallback) and holds an ext4 file system that is loop-mounted and written to all along.
The snapshot must pass `e2fsck -fn` and hold every write the writer had committed before it.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.consistency import ConsistencyPolicy, consistent_snapshot
from agent.scripts import Script
from shared.errors import ExtensionSnapshotFailed, PreScriptFailed
from shared.model import Consistency, weakest
from tests.bench.image import mounted
from tests.journal_writer import committed, content
from tests.loopfs import XFS_MIN, LoopFs, loop_fs, mkfs

MiB = 1 << 20

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


@dataclass
class Vm:
    scratch: LoopFs  # holds the image
    disk: LoopFs  # the ext4 file system in the image, mounted
    journal: Path
    writer: subprocess.Popen[bytes]

    @property
    def disks(self) -> list[tuple[str, Path]]:
        return [("root", self.disk.image)]

    def journaled(self) -> int:
        return len(self.journal.read_text().splitlines())

    def wait_for_writes(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        start = self.journaled()
        while self.journaled() < start + count:
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.02)


def _vm(tmp_path: Path, scratch_type: str) -> Iterator[Vm]:
    size = XFS_MIN if scratch_type == "xfs" else 256 * MiB
    with (
        loop_fs(tmp_path / "scratch.img", scratch_type, size) as scratch,
        loop_fs(scratch.mountpoint / "vm.img", "ext4", 64 * MiB, tmp_path / "vm") as disk,
    ):
        journal = tmp_path / "journal"
        journal.touch()
        writer = subprocess.Popen(
            [sys.executable, "-m", "tests.journal_writer", str(disk.mountpoint), str(journal)]
        )
        try:
            vm = Vm(scratch, disk, journal, writer)
            vm.wait_for_writes(50)
            yield vm
        finally:
            writer.kill()
            writer.wait(30)


@pytest.fixture
def xfs_vm(tmp_path: Path) -> Iterator[Vm]:
    yield from _vm(tmp_path, "xfs")


@pytest.fixture
def ext4_vm(tmp_path: Path) -> Iterator[Vm]:
    yield from _vm(tmp_path, "ext4")


def check_image(image: Path, journal: Path, journaled_before: int) -> None:
    """e2fsck is clean, and every write journaled before the snapshot is in the image."""
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    expected = committed(journal, journaled_before)
    assert expected
    with mounted(image, readonly=True, options="noload") as root:
        for name, size in expected.items():
            data = (root / name).read_bytes()
            assert len(data) >= size, (name, len(data), size)
            assert data[:size] == content(name, size), name


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o700)
    return path


async def test_reflink_snapshot_under_writes_is_consistent_and_frozen_briefly(
    xfs_vm: Vm, tmp_path: Path
) -> None:
    before = xfs_vm.journaled()
    async with consistent_snapshot(xfs_vm.disks, ConsistencyPolicy()) as snapshots:
        disk = snapshots.disks["root"]
        assert disk.provider == "reflink"
        assert disk.read_path != xfs_vm.disk.image
        assert disk.consistency is Consistency.FILE_SYSTEM
        assert [m.mountpoint for m in disk.mounts] == [xfs_vm.disk.mountpoint]
        assert snapshots.consistency is Consistency.FILE_SYSTEM
        assert snapshots.warnings == []
        # Thawed already, while the snapshot is still to be read: the writer goes on.
        xfs_vm.wait_for_writes(20, timeout=5)
        copy = tmp_path / "read.img"
        copy.write_bytes(disk.read_path.read_bytes())
    print(f"reflink: frozen {snapshots.frozen_ms:.1f} ms")
    assert 0 < snapshots.frozen_ms < 1000
    assert not disk.read_path.exists()  # released
    check_image(copy, xfs_vm.journal, before)


async def test_read_while_frozen_holds_the_freeze_while_reading(
    ext4_vm: Vm, tmp_path: Path
) -> None:
    before = ext4_vm.journaled()
    async with consistent_snapshot(ext4_vm.disks, ConsistencyPolicy()) as snapshots:
        disk = snapshots.disks["root"]
        assert disk.provider == "read-while-frozen"
        assert "cannot share extents" in disk.refused["reflink"]
        assert disk.read_path == ext4_vm.disk.image
        frozen_at = ext4_vm.journaled()
        started = time.monotonic()
        copy = tmp_path / "read.img"
        copy.write_bytes(disk.read_path.read_bytes())
        await asyncio.sleep(0.5)
        read_s = time.monotonic() - started
        assert ext4_vm.journaled() <= frozen_at + 1, "the writer wrote while frozen"
    assert disk.consistency is Consistency.FILE_SYSTEM
    print(f"read-while-frozen: frozen {snapshots.frozen_ms:.1f} ms for a {read_s:.2f} s read")
    assert snapshots.frozen_ms >= read_s * 1000
    ext4_vm.wait_for_writes(20, timeout=5)  # thawed
    check_image(copy, ext4_vm.journal, before)


async def test_scripts_make_it_application_consistent(xfs_vm: Vm, tmp_path: Path) -> None:
    log = tmp_path / "log"
    pre = script(tmp_path, "pre.sh", f'echo "pre $COFFER_DISKS" >> {log}\n')
    post = script(tmp_path, "post.sh", f'echo "post" >> {log}\n')
    policy = ConsistencyPolicy(pre_script=Script(pre), post_script=Script(post))
    async with consistent_snapshot(xfs_vm.disks, policy) as snapshots:
        # With a reflink snapshot the application resumes before the reading starts.
        assert log.read_text() == "pre root\npost\n"
        assert snapshots.consistency is Consistency.APPLICATION
        assert snapshots.pre_script_ok is True
        assert snapshots.post_script_ok is True


async def test_a_failing_pre_script_with_continue_gives_file_system_consistency(
    xfs_vm: Vm, tmp_path: Path
) -> None:
    pre = script(tmp_path, "pre.sh", "echo 'database is down' >&2; exit 1\n")
    policy = ConsistencyPolicy(pre_script=Script(pre, continue_on_failure=True))
    async with consistent_snapshot(xfs_vm.disks, policy) as snapshots:
        assert snapshots.consistency is Consistency.FILE_SYSTEM
        [warning] = snapshots.warnings
        assert warning.startswith("PreScriptFailed:")
        assert "database is down" in warning


async def test_a_failing_pre_script_fails_without_freezing_and_runs_the_post_script(
    xfs_vm: Vm, tmp_path: Path
) -> None:
    done = tmp_path / "post-ran"
    pre = script(tmp_path, "pre.sh", "exit 2\n")
    post = script(tmp_path, "post.sh", f"touch {done}\n")
    policy = ConsistencyPolicy(pre_script=Script(pre), post_script=Script(post))
    with pytest.raises(PreScriptFailed, match="exited with status 2"):
        async with consistent_snapshot(xfs_vm.disks, policy):
            raise AssertionError("no snapshot after a failed pre-script")
    assert done.exists()
    xfs_vm.wait_for_writes(20, timeout=5)  # nothing left frozen
    assert [p.name for p in xfs_vm.scratch.mountpoint.iterdir()] == ["vm.img"]  # no clone left


async def test_a_read_while_frozen_past_the_deadline_fails_and_is_thawed(ext4_vm: Vm) -> None:
    policy = ConsistencyPolicy(freeze_timeout=0.5, thaw_deadline=1.0)

    async def read_too_long() -> None:
        async with consistent_snapshot(ext4_vm.disks, policy):
            await asyncio.sleep(1.0)
            ext4_vm.wait_for_writes(5, timeout=5)  # the watchdog thawed it meanwhile

    with pytest.raises(ExtensionSnapshotFailed, match="longer than the thaw deadline of 1 s"):
        await read_too_long()


async def test_a_disk_with_no_mounted_file_system_needs_no_freeze(tmp_path: Path) -> None:
    image = tmp_path / "idle.img"
    image.write_bytes(hashlib.sha256(b"x").digest() * 1024)
    async with consistent_snapshot([("data", image)], ConsistencyPolicy()) as snapshots:
        assert snapshots.disks["data"].mounts == []
        assert snapshots.consistency is Consistency.FILE_SYSTEM
    assert snapshots.frozen_ms == 0


async def test_without_freeze_it_is_crash_consistent(xfs_vm: Vm) -> None:
    policy = ConsistencyPolicy(freeze=False)
    async with consistent_snapshot(xfs_vm.disks, policy) as snapshots:
        assert snapshots.consistency is Consistency.CRASH


def test_weakest() -> None:
    assert weakest([Consistency.APPLICATION, Consistency.FILE_SYSTEM]) is Consistency.FILE_SYSTEM
    assert weakest([Consistency.APPLICATION]) is Consistency.APPLICATION
    assert weakest([]) is Consistency.CRASH


async def test_when_both_scripts_fail_the_pre_scripts_failure_is_the_one_reported(
    xfs_vm: Vm, tmp_path: Path
) -> None:
    """The post-script's failure must not hide why nothing was taken."""
    pre = script(tmp_path, "pre.sh", "echo 'database is down' >&2; exit 1\n")
    post = script(tmp_path, "post.sh", "echo 'cannot resume' >&2; exit 1\n")
    policy = ConsistencyPolicy(pre_script=Script(pre), post_script=Script(post))
    with pytest.raises(PreScriptFailed, match="database is down"):
        async with consistent_snapshot(xfs_vm.disks, policy):
            pass


@pytest.fixture
def mounted_elsewhere(tmp_path: Path) -> Iterator[Path]:
    """An ext4 image mounted in another mount namespace only (a sleeping process holds it)."""
    image = tmp_path / "elsewhere.img"
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    mkfs("ext4", image)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    other = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount {loop} {mountpoint} && echo ready && exec sleep 60"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert other.stdout is not None
        assert other.stdout.readline().strip() == "ready"
        yield image
    finally:
        other.kill()
        other.wait(10)
        subprocess.run(["losetup", "-d", loop], check=False)


async def test_a_disk_mounted_in_another_mount_namespace_is_only_crash_consistent(
    mounted_elsewhere: Path,
) -> None:
    """The agent cannot see (so cannot freeze) a file system another namespace mounted: the
    recovery point must not claim it was frozen."""
    disks = [("root", mounted_elsewhere)]
    async with consistent_snapshot(disks, ConsistencyPolicy()) as snapshots:
        assert snapshots.disks["root"].consistency is Consistency.CRASH
        assert snapshots.consistency is Consistency.CRASH
        [warning] = snapshots.warnings
        assert "another mount namespace" in warning
