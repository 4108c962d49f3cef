"""Freezing file systems: which mounted file systems live on a disk, FIFREEZE and FITHAW.

A disk is an image file or a block device. The file systems that live on it are found the way
the kernel knows them, not by name:

- an image file is attached to loop devices: each bound `/sys/block/loopN` names its backing
  file, compared with the image by device and inode (a path can differ between mount
  namespaces, an inode cannot);
- a block device is its own device number; for both, the partitions of the device
  (`/sys/dev/block/M:m/*/partition`) and what is stacked on them (`holders/`, e.g. a
  device-mapper volume) are part of the disk too;
- a mount lives on the disk when its device number (`/proc/self/mountinfo` field 3) is one of
  those, or, for file systems with anonymous device numbers such as btrfs, when its source
  is one of the disk's device nodes.

FIFREEZE blocks new writes, writes back everything cached and makes the file system
consistent on the device; FITHAW lets writers go again. A freeze can take long (it writes back
everything cached): it runs in its own thread and the caller waits at most a timeout. A freeze
that does not return in time is abandoned: when it returns after all, its own thread thaws
the file system at once, and the thaw watchdog (`agent.thaw_watchdog`) is there should this
process die first. FITHAW on a file system that is not frozen fails with EINVAL, which means
"already thawed" here: a thaw is idempotent. FIFREEZE on a file system already frozen by
someone else fails with EBUSY: that freeze is not ours, so it is never thawed by us.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)

# File systems that live on no local device and cannot be frozen from here.
NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "afs", "lustre", "gfs2"}
)

Device = tuple[int, int]  # major, minor


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    device: Device
    root: str  # the directory of the file system mounted here ("/" unless a bind mount)
    mountpoint: Path
    fstype: str
    source: str

    @property
    def network(self) -> bool:
        return self.fstype in NETWORK_FS or self.fstype.startswith("fuse.sshfs")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040...)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10:
            continue
        sep = fields.index("-", 6)
        major, minor = fields[2].split(":")
        mounts.append(
            Mount(
                mount_id=int(fields[0]),
                device=(int(major), int(minor)),
                root=_unescape(fields[3]),
                mountpoint=Path(_unescape(fields[4])),
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
            )
        )
    return mounts


def mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[Mount]:
    """The mounts of this process's mount namespace."""
    return parse_mountinfo(mountinfo.read_text())


# -- the devices of a disk ------------------------------------------------------------------


def _sys_device(device: Device) -> Path:
    return Path(f"/sys/dev/block/{device[0]}:{device[1]}")


def _read_device(dev_file: Path) -> Device:
    major, minor = dev_file.read_text().strip().split(":")
    return int(major), int(minor)


def _with_partitions_and_holders(device: Device) -> set[Device]:
    """The device, its partitions, and what is stacked on any of them, transitively."""
    found: set[Device] = set()
    todo = [device]
    while todo:
        current = todo.pop()
        if current in found:
            continue
        found.add(current)
        sysdir = _sys_device(current)
        try:
            for child in sysdir.iterdir():
                if (child / "partition").exists() and (child / "dev").exists():
                    todo.append(_read_device(child / "dev"))
            holders = sysdir / "holders"
            if holders.is_dir():
                for holder in holders.iterdir():
                    todo.append(_read_device(holder / "dev"))
        except OSError:
            continue  # a device that went away meanwhile
    return found


LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")  # struct loop_info64


def _device_node(device: Device) -> Path | None:
    """The /dev node of a block device (by its sysfs DEVNAME: no udev needed)."""
    try:
        uevent = Path(f"/sys/dev/block/{device[0]}:{device[1]}/uevent").read_text()
    except OSError:
        return None
    for line in uevent.splitlines():
        if line.startswith("DEVNAME="):
            return Path("/dev") / line.removeprefix("DEVNAME=")
    return None


Identity = tuple[int, int, int]
"""(major, minor, inode) of a file."""


def _loop_backing(device: Device) -> Identity | None:
    """(major, minor, inode) of the file behind a bound loop device, from the kernel itself
    (LOOP_GET_STATUS64): right even where the file's path does not resolve (another mount
    namespace, a file renamed since)."""
    node = _device_node(device)
    if node is None:
        return None
    try:
        fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size))
    except OSError:
        return None  # unbound
    finally:
        os.close(fd)
    dev, inode = _LOOP_INFO64.unpack(raw)[:2]
    # The kernel's 32-bit "new" encoding of dev_t (huge_encode_dev).
    return (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00), inode


# How long the kernel may take to say what backs a loop device. LOOP_GET_STATUS64 waits for
# the device's lock, which a loop device wedged on a dead file system (a FUSE server gone)
# never gives back: such a device is taken as not this disk's, and the agent goes on.
LOOP_STATUS_TIMEOUT = 2.0


def _loop_backing_within(device: Device) -> Identity | None:
    """`_loop_backing` in a daemon thread, given up after `LOOP_STATUS_TIMEOUT` (the thread is
    left to the kernel: an ioctl in D state cannot be interrupted)."""
    answer: list[Identity | None] = []
    worker = threading.Thread(
        target=lambda: answer.append(_loop_backing(device)),
        name=f"loop-status-{device[0]}:{device[1]}",
        daemon=True,
    )
    worker.start()
    worker.join(LOOP_STATUS_TIMEOUT)
    return answer[0] if answer else None


def loop_devices_of(image: Path) -> list[Device]:
    """The loop devices backed by the image file `image`.

    A backing path in sysfs that leads to this very file settles a device without touching
    it. Any other device is asked of the kernel, by identity (its path may lead nowhere from
    here, or to another file, when it was bound in another mount namespace), within
    `LOOP_STATUS_TIMEOUT`.
    """
    info = os.stat(image)
    wanted = (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino)
    found = []
    for sysdir in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (sysdir / "loop" / "backing_file").read_text().rstrip("\n")
        except OSError:
            continue  # an unbound loop device
        device = _read_device(sysdir / "dev")
        try:
            there = os.stat(backing)
            if (os.major(there.st_dev), os.minor(there.st_dev), there.st_ino) == wanted:
                found.append(device)
                continue
        except OSError:
            pass
        if _loop_backing_within(device) == wanted:
            found.append(device)
    return found


def in_use_unseen(disk: Path, within: list[Mount] | None = None) -> bool:
    """Whether some device of `disk` is held (mounted or claimed) although no file system of
    it is mounted in this mount namespace: mounted in another one, then, where this agent
    cannot freeze it."""
    if mounts_on_disk(disk, within):
        return False
    for device in disk_devices(disk):
        node = _device_node(device)
        if node is None:
            continue
        try:
            fd = os.open(node, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return True
            continue
        os.close(fd)
    return False


def disk_devices(disk: Path) -> set[Device]:
    """Every block device whose contents are (part of) the disk: the image's loop devices or
    the device itself, their partitions, and what is stacked on them."""
    info = os.stat(disk)
    if stat.S_ISBLK(info.st_mode):
        roots = [(os.major(info.st_rdev), os.minor(info.st_rdev))]
    elif stat.S_ISREG(info.st_mode):
        roots = loop_devices_of(disk)
    else:
        return set()
    found: set[Device] = set()
    for root in roots:
        found |= _with_partitions_and_holders(root)
    return found


def _source_device(source: str) -> Device | None:
    if not source.startswith("/dev/"):
        return None
    try:
        info = os.stat(source)
    except OSError:
        return None
    if not stat.S_ISBLK(info.st_mode):
        return None
    return os.major(info.st_rdev), os.minor(info.st_rdev)


def mounts_on_disk(disk: Path, within: list[Mount] | None = None) -> list[Mount]:
    """The mounted file systems that live on `disk`, one mount per file system (the one closest
    to the root of the namespace), parents before the file systems mounted below them."""
    devices = disk_devices(disk)
    if not devices:
        return []
    chosen: dict[Device, Mount] = {}
    for mount in within if within is not None else mounts():
        device = mount.device
        if device not in devices:
            # btrfs and a few others report an anonymous device number: go by the source.
            source = _source_device(mount.source)
            if source is None or source not in devices:
                continue
            device = source
        best = chosen.get(device)
        if best is None or len(mount.mountpoint.parts) < len(best.mountpoint.parts):
            chosen[device] = mount
    return sorted(chosen.values(), key=lambda m: (len(m.mountpoint.parts), str(m.mountpoint)))


# -- freeze and thaw ------------------------------------------------------------------------


def open_mount(mountpoint: Path) -> int:
    """A descriptor on the file system at `mountpoint`, for FIFREEZE and FITHAW."""
    return os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def freeze_fd(fd: int) -> None:
    """FIFREEZE; OSError as the kernel says (EOPNOTSUPP: cannot freeze, EBUSY: frozen already)."""
    fcntl.ioctl(fd, FIFREEZE, 0)


def thaw_fd(fd: int) -> bool:
    """FITHAW; True if it thawed, False if the file system was not frozen (EINVAL)."""
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    return True


class FreezeState(enum.StrEnum):
    OPEN = "open"  # not frozen yet
    FROZEN = "frozen"
    THAWED = "thawed"
    SKIPPED = "skipped"  # this kind of file system cannot be frozen
    FAILED = "failed"  # the freeze failed
    ABANDONED = "abandoned"  # the freeze did not return in time


class MountFreeze:
    """One file system's freeze: freeze with a timeout, thaw idempotently; blocking calls.

    The descriptor is opened at construction (before anything is frozen) and closed by
    `close()`, or by the freezing thread of an abandoned freeze once it is done with it.
    """

    def __init__(self, mount: Mount) -> None:
        self.mount = mount
        self.state = FreezeState.OPEN
        self.detail = ""  # why it was skipped, failed or abandoned
        self.frozen_at: float | None = None  # time.monotonic() when FIFREEZE returned
        self.thawed_ok: bool | None = None  # our FITHAW thawed it (False: someone else had)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._in_flight = False  # a FIFREEZE has been issued and has not returned
        if mount.network:
            self.state = FreezeState.SKIPPED
            self.detail = f"{mount.fstype} is a network file system: it cannot be frozen here"
            return
        fd = open_mount(mount.mountpoint)
        # The path may show another file system than the mount table's entry (something
        # mounted over it since): freezing that one would freeze the wrong file system and
        # rate this disk consistent. The descriptor must be on the very device.
        found = os.fstat(fd).st_dev
        if (os.major(found), os.minor(found)) != mount.device:
            os.close(fd)
            self.state = FreezeState.FAILED
            self.detail = (
                f"{mount.mountpoint} now shows device {os.major(found)}:{os.minor(found)}, not "
                f"{mount.device[0]}:{mount.device[1]} (something is mounted over it)"
            )
            return
        self._fd = fd

    def freeze(self, timeout: float) -> FreezeState:
        """Freeze, waiting at most `timeout` seconds; the state reached."""
        if self.state is not FreezeState.OPEN:
            return self.state
        done = threading.Event()
        fd = self._fd
        assert fd is not None

        def work() -> None:
            try:
                freeze_fd(fd)
            except OSError as exc:
                with self._lock:
                    self._in_flight = False
                    if self.state is FreezeState.ABANDONED:
                        os.close(fd)  # the descriptor is this thread's now
                        done.set()
                        return
                    if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
                        self.state = FreezeState.SKIPPED
                        self.detail = f"{self.mount.fstype} does not support freezing"
                    elif exc.errno == errno.EBUSY:
                        self.state = FreezeState.FAILED
                        self.detail = "it is frozen already, by someone else"
                    else:
                        self.state = FreezeState.FAILED
                        self.detail = f"FIFREEZE: {exc.strerror}"
                done.set()
                return
            with self._lock:
                self._in_flight = False
                if self.state is FreezeState.ABANDONED:
                    # Too late: the caller has given up on this freeze. Undo it now.
                    try:
                        thaw_fd(fd)
                    finally:
                        os.close(fd)
                        done.set()
                    return
                self.state = FreezeState.FROZEN
                self.frozen_at = time.monotonic()
            done.set()

        thread = threading.Thread(target=work, name=f"freeze {self.mount.mountpoint}", daemon=True)
        self._in_flight = True
        thread.start()
        if not done.wait(timeout):
            with self._lock:
                if self.state is FreezeState.OPEN:
                    self.state = FreezeState.ABANDONED
                    self.detail = f"FIFREEZE did not return within {timeout:g} s"
                    # The thread owns the descriptor now and closes it when the ioctl returns.
                    self._fd = None
                    return self.state
        return self.state

    def thaw(self) -> bool:
        """Thaw if frozen by us; True if this call thawed it (False: it was not frozen, so
        someone else thawed it meanwhile: the watchdog at its deadline, or an administrator)."""
        with self._lock:
            if self.state is not FreezeState.FROZEN or self._fd is None:
                return False
            thawed = thaw_fd(self._fd)
            self.state = FreezeState.THAWED
            self.thawed_ok = thawed
            return thawed

    @property
    def in_flight(self) -> bool:
        """A FIFREEZE was issued and has not returned (nor been abandoned)."""
        return self._in_flight and self.state is FreezeState.OPEN

    def close(self) -> None:
        """Thaw if frozen, and close the descriptor. A FIFREEZE still in flight (the caller
        was cancelled) is abandoned instead: its thread owns the descriptor, and thaws as soon
        as the ioctl returns."""
        try:
            self.thaw()
        finally:
            with self._lock:
                if self._in_flight and self.state is FreezeState.OPEN:
                    self.state = FreezeState.ABANDONED
                    self.detail = "the backup ended while FIFREEZE was still running"
                    self._fd = None  # the freezing thread closes it
                else:
                    self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
