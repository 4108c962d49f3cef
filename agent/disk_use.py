"""A disk's devices, and whether anything uses it: loop devices, mounts, claims, descriptors.

A disk is an image file or a block device. The one place that says which block devices are
(part of) a disk, which mounted file systems live on it, and whether anything holds it: the
freeze before a backup (`agent.consistency`, `agent.doctor`) and the refusals before a restore
writes over a disk (rolled back in place) or an existing image (`--overwrite`) ask here. The
kernel's own records are asked, never names alone:

- loop devices of an image: every bound `/sys/block/loopN` names its backing file
  (`loop/backing_file`). A path there that leads to this very image (the same device and
  inode) settles the device from sysfs. Any other device is asked of the kernel by identity
  (LOOP_GET_STATUS64: right where the path does not resolve, from another mount namespace, or
  names a hard link), in a thread of its own given up after `LOOP_STATUS_TIMEOUT`: the ioctl
  waits for the device's lock, which a loop device wedged on a dead file system never gives
  back, and such a device is taken as not this disk's. A backing path is stat()ed only when
  its base name is the image's, so that a stat of an unrelated file on a stuck file system
  cannot hang the check either;
- a block device is its own device number; for both, the partitions of the device and what
  is stacked on them (`holders/`, e.g. a device-mapper volume) are part of the disk too;
- the mount table (`/proc/self/mountinfo`): a mount lives on the disk when its device number
  is one of those, or, for file systems with anonymous device numbers such as btrfs, when its
  source is one of the disk's device nodes;
- exclusive claims: a block device opened with O_EXCL is refused (EBUSY) while the kernel has
  it mounted or claimed in any mount namespace; a restore keeps such a descriptor for as long
  as it writes, so nothing can mount the device meanwhile (`claim`), and a backup learns that
  a disk with nothing mounted here is mounted elsewhere (`in_use_unseen`);
- open descriptors of other processes (`/proc/PID/fd`), within bounds (`MAX_DESCRIPTORS`,
  `SCAN_SECONDS`): a descriptor whose link names the image (its base name) is confirmed by
  `/proc/PID/fdinfo` (inode and mount), one that names a device node by the device number.
  A scan that cannot finish within its bounds refuses: a disk not known to be unused is used.

An image with a loop device is in use for a restore, mounted or not, in whatever mount
namespace set it up.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from agent.freeze import Device, Mount, mounts
from shared.errors import DiskInUse

SYS_BLOCK = Path("/sys/block")
PROC = Path("/proc")
# Bounds of the scan of other processes' descriptors: beyond them the disk counts as in use.
MAX_DESCRIPTORS = 1_000_000
SCAN_SECONDS = 10.0
_DELETED = " (deleted)"
FIX = (
    "Unmount its file systems and detach its loop devices (`umount`, `losetup -d`), or stop "
    "what holds it open, then try again"
)
# How long the kernel may take to say what backs a loop device (see the module note).
LOOP_STATUS_TIMEOUT = 2.0
LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")  # struct loop_info64

Identity = tuple[int, int, int]
"""(major, minor, inode) of a file."""


# -- the devices of a disk ------------------------------------------------------------------


def _read_device(dev_file: Path) -> Device:
    major, minor = dev_file.read_text().strip().split(":")
    return int(major), int(minor)


def device_node(device: Device) -> Path | None:
    """The /dev node of a block device (by its sysfs DEVNAME: no udev needed)."""
    try:
        uevent = Path(f"/sys/dev/block/{device[0]}:{device[1]}/uevent").read_text()
    except OSError:
        return None
    for line in uevent.splitlines():
        if line.startswith("DEVNAME="):
            return Path("/dev") / line.removeprefix("DEVNAME=")
    return None


def _identity(info: os.stat_result) -> Identity:
    return os.major(info.st_dev), os.minor(info.st_dev), info.st_ino


def _loop_backing(device: Device) -> Identity | None:
    """(major, minor, inode) of the file behind a bound loop device, from the kernel itself
    (LOOP_GET_STATUS64): right even where the file's path does not resolve (another mount
    namespace, a file renamed since)."""
    node = device_node(device)
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


def loop_devices_of(image: Path, info: os.stat_result | None = None) -> list[Device]:
    """The bound loop devices whose backing file is the image file `image` (`info`: its
    stat, if taken already); the rule is the module note's."""
    wanted = _identity(info if info is not None else os.stat(image))
    found = []
    for sysdir in sorted(SYS_BLOCK.glob("loop*")):
        try:
            backing = (sysdir / "loop" / "backing_file").read_text().rstrip("\n")
            device = _read_device(sysdir / "dev")
        except OSError:
            continue  # an unbound loop device
        backing = backing.removesuffix(_DELETED)
        if Path(backing).name == image.name:
            try:
                if _identity(os.stat(backing)) == wanted:
                    found.append(device)
                    continue
            except OSError:
                pass  # deleted, or not reachable from this mount namespace
        if _loop_backing_within(device) == wanted:
            found.append(device)
    return found


def stacked(device: Device) -> set[Device]:
    """The device, its partitions, and what is stacked on them (holders), transitively."""
    found: set[Device] = set()
    todo = [device]
    while todo:
        current = todo.pop()
        if current in found:
            continue
        found.add(current)
        sysdir = Path(f"/sys/dev/block/{current[0]}:{current[1]}")
        try:
            for child in sysdir.iterdir():
                if (child / "partition").exists() and (child / "dev").exists():
                    todo.append(_read_device(child / "dev"))
            holders = sysdir / "holders"
            if holders.is_dir():
                todo += [_read_device(holder / "dev") for holder in holders.iterdir()]
        except OSError:
            continue  # gone meanwhile
    return found


def _roots(disk: Path, info: os.stat_result) -> tuple[list[Device], list[Device]]:
    """The devices that are the disk itself (the device, or the image's loop devices), and
    of those the loop devices."""
    if stat.S_ISBLK(info.st_mode):
        return [(os.major(info.st_rdev), os.minor(info.st_rdev))], []
    if stat.S_ISREG(info.st_mode):
        loops = loop_devices_of(disk, info)
        return loops, loops
    return [], []  # nothing can mount or attach anything else


def disk_devices(disk: Path, info: os.stat_result | None = None) -> set[Device]:
    """Every block device whose contents are (part of) the disk: the image's loop devices or
    the device itself, their partitions, and what is stacked on them."""
    roots, _ = _roots(disk, info if info is not None else os.stat(disk))
    found: set[Device] = set()
    for root in roots:
        found |= stacked(root)
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


def _on(devices: set[Device], mount: Mount) -> Device | None:
    """The device of `devices` a mount's file system lives on, if any."""
    if mount.device in devices:
        return mount.device
    # btrfs and a few others report an anonymous device number: go by the source then.
    source = _source_device(mount.source)
    return source if source in devices else None


def mounted_from(devices: set[Device], table: list[Mount]) -> list[Mount]:
    """The mounts of `table` whose file system lives on one of `devices`."""
    return [mount for mount in table if _on(devices, mount) is not None]


def mounts_on_disk(disk: Path, within: list[Mount] | None = None) -> list[Mount]:
    """The mounted file systems that live on `disk`, one mount per file system (the one closest
    to the root of the namespace), parents before the file systems mounted below them."""
    devices = disk_devices(disk)
    if not devices:
        return []
    chosen: dict[Device, Mount] = {}
    for mount in within if within is not None else mounts():
        device = _on(devices, mount)
        if device is None:
            continue
        best = chosen.get(device)
        if best is None or len(mount.mountpoint.parts) < len(best.mountpoint.parts):
            chosen[device] = mount
    return sorted(chosen.values(), key=lambda m: (len(m.mountpoint.parts), str(m.mountpoint)))


# -- who uses it ----------------------------------------------------------------------------


def _claimed(node: Path) -> bool:
    """Whether the kernel refuses an exclusive open of the device `node` (EBUSY): mounted or
    claimed, in any mount namespace."""
    try:
        fd = os.open(node, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno == errno.EBUSY
    os.close(fd)
    return False


def in_use_unseen(disk: Path, within: list[Mount] | None = None) -> bool:
    """Whether some device of `disk` is held (mounted or claimed) although no file system of
    it is mounted in this mount namespace: mounted in another one, then, where this agent
    cannot freeze it."""
    if mounts_on_disk(disk, within):
        return False
    for device in disk_devices(disk):
        node = device_node(device)
        if node is not None and _claimed(node):
            return True
    return False


def claim(path: Path, flags: int, what: str) -> int:
    """`path` (a block device) opened with O_EXCL: the kernel's word that nothing has it
    mounted or claimed, in any mount namespace; DiskInUse if something has."""
    try:
        return os.open(path, flags | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        raise DiskInUse(
            what=what,
            path=str(path),
            why="the kernel reports it busy (mounted or claimed, perhaps in another mount "
            "namespace)",
            fix=FIX,
        ) from exc


class _Mounts:
    """Mount id → device, from this namespace's table and, for others, the process's own."""

    def __init__(self) -> None:
        self._devices: dict[int, Device] = {m.mount_id: m.device for m in mounts()}

    def device(self, mount_id: int, pid: str) -> Device | None:
        if mount_id not in self._devices:
            try:
                for mount in mounts(PROC / pid / "mountinfo"):
                    self._devices.setdefault(mount.mount_id, mount.device)
            except OSError:
                return None
        return self._devices.get(mount_id)


def _fdinfo(pid: str, fd: str) -> tuple[int, int] | None:
    """(inode, mount id) of a descriptor, from the kernel's fdinfo."""
    try:
        text = (PROC / pid / "fdinfo" / fd).read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    try:
        return int(fields["ino"]), int(fields["mnt_id"])
    except (KeyError, ValueError):
        return None


def _processes() -> Iterator[str]:
    own = str(os.getpid())
    for entry in os.scandir(PROC):
        if entry.name.isdigit() and entry.name != own:
            yield entry.name


def _comm(pid: str) -> str:
    try:
        return (PROC / pid / "comm").read_text().strip()
    except OSError:
        return "?"


def holders(path: Path, info: os.stat_result, devices: set[Device], what: str) -> list[str]:
    """Other processes holding the image file or one of `devices` open: "pid (name)" each.

    Raises DiskInUse when the scan cannot finish within its bounds."""
    is_file = stat.S_ISREG(info.st_mode)
    mount_ids = _Mounts()
    found: list[str] = []
    seen = 0
    deadline = time.monotonic() + SCAN_SECONDS
    for pid in _processes():
        try:
            fds = os.listdir(PROC / pid / "fd")
        except OSError:
            continue  # gone, or a kernel thread
        for fd in fds:
            seen += 1
            if seen > MAX_DESCRIPTORS or time.monotonic() > deadline:
                raise DiskInUse(
                    what=what,
                    path=str(path),
                    why=f"it could not be checked for open descriptors ({seen} looked at in "
                    f"{SCAN_SECONDS:g} s)",
                    fix="Try again when the machine is less busy",
                )
            try:
                link = os.readlink(PROC / pid / "fd" / fd).removesuffix(_DELETED)
            except OSError:
                continue
            if link.startswith("/dev/"):
                try:
                    opened = os.stat(PROC / pid / "fd" / fd)  # a device node: stat cannot hang
                except OSError:
                    continue
                if (
                    stat.S_ISBLK(opened.st_mode)
                    and (
                        os.major(opened.st_rdev),
                        os.minor(opened.st_rdev),
                    )
                    in devices
                ):
                    found.append(f"{pid} ({_comm(pid)})")
                    break
            elif is_file and Path(link).name == path.name:
                ids = _fdinfo(pid, fd)
                if ids is None:
                    continue
                inode, mount_id = ids
                if inode == info.st_ino and mount_ids.device(mount_id, pid) == (
                    os.major(info.st_dev),
                    os.minor(info.st_dev),
                ):
                    found.append(f"{pid} ({_comm(pid)})")
                    break
    return found


def check_unused(path: Path, what: str, info: os.stat_result | None = None) -> None:
    """DiskInUse unless nothing uses the image file or block device at `path` (`info`: its
    stat, if taken already): no mount of it (or of its loop devices), no loop device attached
    to the image, no other process holding it open. A block device's exclusive claim is the
    caller's (`claim`)."""
    if info is None:
        info = os.stat(path)
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)):
        return  # nothing can mount or attach anything else
    roots, loops = _roots(path, info)
    devices: set[Device] = set()
    for root in roots:
        devices |= stacked(root)
    on_it = mounted_from(devices, mounts())
    if on_it:
        places = ", ".join(f"{m.mountpoint} ({m.fstype})" for m in on_it[:5])
        raise DiskInUse(what=what, path=str(path), why=f"it is mounted at {places}", fix=FIX)
    if loops:
        names = ", ".join(
            str(device_node(device) or f"{device[0]}:{device[1]}") for device in loops
        )
        raise DiskInUse(
            what=what, path=str(path), why=f"it is attached to loop device {names}", fix=FIX
        )
    opened = holders(path, info, devices, what)
    if opened:
        raise DiskInUse(
            what=what,
            path=str(path),
            why=f"it is open in process {', '.join(opened[:5])}",
            fix=FIX,
        )


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two stats are of one disk: one block device, or one file."""
    if stat.S_ISBLK(a.st_mode) and stat.S_ISBLK(b.st_mode):
        return a.st_rdev == b.st_rdev
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
