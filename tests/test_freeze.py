"""Freezing real loop-mounted ext4 and XFS: writers wait, the watchdog always thaws."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import agent.disk_use
import agent.freeze
from agent.disk_use import disk_devices, loop_devices_of, mounts_on_disk
from agent.freeze import (
    FreezeState,
    MountFreeze,
    freeze_fd,
    mounts,
    open_mount,
    thaw_fd,
)
from tests.loopfs import XFS_MIN, LoopFs, loop_fs, thaw_path

MiB = 1 << 20

pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]

WRITE = (
    "import os, sys\n"
    "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)\n"
    "os.write(fd, b'x' * 4096)\n"
    "os.fsync(fd)\n"
)


@pytest.fixture(params=["ext4", "xfs"])
def fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LoopFs]:
    fstype = request.param
    size = XFS_MIN if fstype == "xfs" else 64 * MiB
    with loop_fs(tmp_path / f"{fstype}.img", fstype, size) as mounted:
        yield mounted


class Writers:
    """Writer processes; a blocked one ends only after a thaw, so thaw before reaping."""

    def __init__(self, fs: LoopFs) -> None:
        self.fs = fs
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str = "w") -> subprocess.Popen[bytes]:
        target = self.fs.mountpoint / name
        process = subprocess.Popen([sys.executable, "-c", WRITE, str(target)])
        self.started.append(process)
        return process

    def close(self) -> None:
        thaw_path(self.fs.mountpoint)
        for process in self.started:
            process.kill()
            process.wait(30)


@pytest.fixture
def writers(fs: LoopFs) -> Iterator[Writers]:
    started = Writers(fs)
    yield started
    started.close()


def finishes_within(process: subprocess.Popen[bytes], seconds: float) -> bool:
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        return False
    assert process.returncode == 0
    return True


def only_mount(fs: LoopFs) -> MountFreeze:
    [mount] = mounts_on_disk(fs.image)
    return MountFreeze(mount)


def test_mounts_on_an_image_and_on_its_loop_device(fs: LoopFs) -> None:
    [by_image] = mounts_on_disk(fs.image)
    assert by_image.mountpoint == fs.mountpoint
    [by_device] = mounts_on_disk(Path(fs.device))
    assert by_device == by_image
    # The file system holding the image itself is not on the disk.
    assert all(m.mountpoint != Path("/") for m in mounts_on_disk(fs.image))


def test_an_image_that_is_not_attached_has_no_mounts(tmp_path: Path) -> None:
    image = tmp_path / "idle.img"
    image.write_bytes(bytes(4096))
    assert disk_devices(image) == set()
    assert mounts_on_disk(image) == []


def test_a_loop_device_whose_path_leads_nowhere_is_found_by_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    device = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        # The file stays, under another name; the name the device was bound by leads nowhere
        # (sysfs says "disk.img (deleted)"), as from another mount namespace.
        moved = tmp_path / "alias.img"
        os.link(image, moved)
        image.unlink()
        found = loop_devices_of(moved)
        assert (os.major(os.stat(device).st_rdev), os.minor(os.stat(device).st_rdev)) in found
        # A loop device the kernel does not answer for (wedged on a dead file system) is given
        # up after the timeout, not waited for: the agent goes on.
        wedged = threading.Event()
        monkeypatch.setattr(agent.disk_use, "_loop_backing", lambda _: wedged.wait() and None)
        monkeypatch.setattr(agent.disk_use, "LOOP_STATUS_TIMEOUT", 0.2)
        started = time.monotonic()
        assert loop_devices_of(moved) == []
        assert time.monotonic() - started < 5
        wedged.set()
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


def test_freeze_blocks_a_writer_until_thaw(fs: LoopFs, writers: Writers) -> None:
    freeze = only_mount(fs)
    try:
        assert freeze.freeze(10) is FreezeState.FROZEN
        writer = writers.start()
        assert not finishes_within(writer, 1.0), "a write went through a frozen file system"
        assert freeze.thaw() is True
        assert finishes_within(writer, 10)
        assert (fs.mountpoint / "w").stat().st_size == 4096
    finally:
        freeze.close()


def test_thaw_of_a_file_system_that_is_not_frozen_is_fine(fs: LoopFs) -> None:
    fd = open_mount(fs.mountpoint)
    try:
        assert thaw_fd(fd) is False  # EINVAL: not frozen
        freeze_fd(fd)
        assert thaw_fd(fd) is True
        assert thaw_fd(fd) is False  # thawing twice is harmless
    finally:
        os.close(fd)


def test_a_freeze_held_by_someone_else_is_neither_ours_nor_thawed(fs: LoopFs) -> None:
    theirs = open_mount(fs.mountpoint)
    freeze_fd(theirs)
    try:
        ours = only_mount(fs)
        assert ours.freeze(10) is FreezeState.FAILED
        assert "someone else" in ours.detail
        ours.close()  # must not thaw their freeze
        assert thaw_fd(theirs) is True
    finally:
        thaw_fd(theirs)
        os.close(theirs)


def test_a_file_system_that_cannot_be_frozen_is_skipped(tmp_path: Path) -> None:
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "coffer-test", str(tmpfs)], check=True)
    try:
        [mount] = [m for m in mounts() if m.mountpoint == tmpfs]
        freeze = MountFreeze(mount)
        assert freeze.freeze(5) is FreezeState.SKIPPED
        assert "does not support freezing" in freeze.detail
        freeze.close()
    finally:
        subprocess.run(["umount", str(tmpfs)], check=True)


def test_a_freeze_that_returns_too_late_is_abandoned_and_undone(
    fs: LoopFs, writers: Writers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow FIFREEZE (a stuck device, say) is given up on; when it returns, it is thawed."""
    real_freeze = agent.freeze.freeze_fd

    def slow_freeze(fd: int) -> None:
        time.sleep(1.0)
        real_freeze(fd)

    monkeypatch.setattr(agent.freeze, "freeze_fd", slow_freeze)
    freeze = only_mount(fs)
    assert freeze.freeze(0.2) is FreezeState.ABANDONED
    assert "did not return within 0.2 s" in freeze.detail
    freeze.close()  # the late freeze's thread owns the descriptor: close leaves it alone
    time.sleep(1.5)  # the freeze has returned, and its thread thawed at once
    assert finishes_within(writers.start(), 5)


# -- the watchdog ---------------------------------------------------------------------------


def start_helper(fs: LoopFs, deadline: float, *extra: str) -> tuple[subprocess.Popen[str], int]:
    helper = subprocess.Popen(
        [sys.executable, "-m", "tests.freeze_helper", str(fs.mountpoint), str(deadline), *extra],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert helper.stdout is not None
    line = helper.stdout.readline().split()
    assert line, "the helper said nothing"
    assert line[0] in ("frozen", "thawed"), line
    return helper, int(line[1])


def reap(process: subprocess.Popen[str], watchdog_pid: int) -> None:
    process.kill()
    process.wait(10)
    # The watchdog ends by itself once its pipe closed; never leave it behind.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(watchdog_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(watchdog_pid, signal.SIGKILL)
    raise AssertionError(f"the thaw watchdog {watchdog_pid} outlived its agent")


def test_watchdog_thaws_when_the_agent_is_killed_while_frozen(fs: LoopFs, writers: Writers) -> None:
    helper, watchdog = start_helper(fs, deadline=60)
    writer = writers.start()
    assert not finishes_within(writer, 0.5)
    killed = time.monotonic()
    helper.send_signal(signal.SIGKILL)
    assert finishes_within(writer, 5), "the file system stayed frozen after the agent died"
    assert time.monotonic() - killed < 5  # long before the 60 s deadline: the pipe closed
    reap(helper, watchdog)


def test_watchdog_thaws_at_the_deadline_when_the_agent_hangs(fs: LoopFs, writers: Writers) -> None:
    deadline = 2.0
    started = time.monotonic()
    helper, watchdog = start_helper(fs, deadline=deadline)
    helper.send_signal(signal.SIGSTOP)  # hung: alive, pipe open, never thaws
    try:
        writer = writers.start()
        assert finishes_within(writer, deadline + 5), "the watchdog did not thaw at its deadline"
        waited = time.monotonic() - started
        assert deadline - 0.5 <= waited <= deadline + 5, waited
    finally:
        helper.send_signal(signal.SIGCONT)
        reap(helper, watchdog)


def test_watchdog_never_thaws_a_freeze_that_is_not_ours(fs: LoopFs, writers: Writers) -> None:
    """The agent thawed and disarmed; then an operator froze the file system himself."""
    helper, watchdog = start_helper(fs, 60, "--thaw-and-disarm")
    theirs = open_mount(fs.mountpoint)
    try:
        freeze_fd(theirs)
        reap(helper, watchdog)
        writer = writers.start()
        assert not finishes_within(writer, 1.0), "the watchdog thawed someone else's freeze"
        assert thaw_fd(theirs) is True
        assert finishes_within(writer, 5)
    finally:
        thaw_fd(theirs)
        os.close(theirs)


def test_watchdog_thaws_on_sigterm(fs: LoopFs, writers: Writers) -> None:
    helper, watchdog = start_helper(fs, deadline=60)
    writer = writers.start()
    os.kill(watchdog, signal.SIGTERM)
    assert finishes_within(writer, 5)
    reap(helper, watchdog)


@pytest.mark.timeout(120)
def test_a_freeze_still_under_way_when_the_backup_ends_is_undone(tmp_path: Path) -> None:
    """The backup is cancelled while FIFREEZE is still writing back: the freeze is abandoned
    to its thread, which thaws the moment the ioctl returns; nothing stays frozen."""
    with loop_fs(tmp_path / "busy.img", "ext4", 256 * MiB) as busy:
        # Dirty data, not synced: FIFREEZE has to write it all back first.
        block = b"\xa5" * MiB
        with (busy.mountpoint / "dirty").open("wb") as f:
            for _ in range(128):
                f.write(block)
        [mount] = mounts_on_disk(busy.image)
        freeze = MountFreeze(mount)
        started = time.monotonic()
        result: list[FreezeState] = []
        thread = threading.Thread(target=lambda: result.append(freeze.freeze(60)))
        thread.start()
        while not freeze.in_flight:
            time.sleep(0.001)
        freeze.close()  # what the cancelled backup's cleanup does
        closed_after = time.monotonic() - started
        thread.join(60)
        assert freeze.state is FreezeState.ABANDONED, (
            f"FIFREEZE returned within {closed_after:.3f} s, before the cleanup: nothing was "
            "under way to abandon (more dirty data needed on this machine)"
        )
        writers = Writers(busy)
        try:
            assert finishes_within(writers.start(), 10), "the file system stayed frozen"
        finally:
            thaw_path(busy.mountpoint)
            writers.close()
