"""Whether anything uses a disk: mounts, loop devices, exclusive claims, open descriptors.

A restore writes over a disk (rolled back in place) or over an existing image (`--overwrite`)
only when nothing uses it. The kernel's own records are asked, never names alone:

- loop devices: every bound `/sys/block/loopN` names its backing file in `loop/backing_file`,
  read from sysfs and never with LOOP_GET_STATUS (an ioctl on a wedged loop device can block
  for good). One whose file is the image (the same device and inode) attaches it, mounted or
  not, in whatever mount namespace set it up: an image with a loop device is in use;
- the mount table (`/proc/self/mountinfo`): a mount whose device is the disk, one of its
  partitions or what is stacked on them, or one of the image's loop devices (and theirs);
- exclusive claims: a block device opened with O_EXCL is refused (EBUSY) while the kernel has
  it mounted or claimed in any mount namespace; the writer keeps such a descriptor for as long
  as it writes, so nothing can mount the device meanwhile;
- open descriptors of other processes (`/proc/PID/fd`), within bounds (`MAX_DESCRIPTORS`,
  `SCAN_SECONDS`): a descriptor whose link names the image (its base name) is confirmed by
  `/proc/PID/fdinfo` (inode and mount), one that names a device node by the device number.
  A scan that cannot finish within its bounds refuses: a disk not known to be unused is used.

Matching an image's loop devices by base name first, then by device and inode, keeps the check
from calling stat() on every backing file of the machine (one on a stuck FUSE file system would
hang it); a hard link of the image under another name attached to a loop device is missed,
and said so here.
"""

from __future__ import annotations

import errno
import os
import stat
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


def _device_of(path: Path) -> Device:
    major, minor = path.read_text().strip().split(":")
    return int(major), int(minor)


def _devname(device: Device) -> str:
    try:
        uevent = Path(f"/sys/dev/block/{device[0]}:{device[1]}/uevent").read_text()
    except OSError:
        return f"{device[0]}:{device[1]}"
    for line in uevent.splitlines():
        if line.startswith("DEVNAME="):
            return "/dev/" + line.removeprefix("DEVNAME=")
    return f"{device[0]}:{device[1]}"


def loop_devices_of(image: Path, info: os.stat_result) -> list[Device]:
    """The bound loop devices whose backing file is the image (`info` is its stat)."""
    found = []
    for sysdir in sorted(SYS_BLOCK.glob("loop*")):
        try:
            backing = (sysdir / "loop" / "backing_file").read_text().rstrip("\n")
        except OSError:
            continue  # not bound
        backing = backing.removesuffix(_DELETED)
        # The base name first: the path may read differently from another mount namespace,
        # but a name that differs cannot be this image (short of a hard link), and a stat of
        # every backing file could hang on one that lives on a stuck file system.
        if Path(backing).name != image.name:
            continue
        try:
            backing_info = os.stat(backing)
        except OSError:
            continue  # deleted, or not reachable from this namespace
        if (backing_info.st_dev, backing_info.st_ino) == (info.st_dev, info.st_ino):
            found.append(_device_of(sysdir / "dev"))
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
                    todo.append(_device_of(child / "dev"))
            holders = sysdir / "holders"
            if holders.is_dir():
                todo += [_device_of(holder / "dev") for holder in holders.iterdir()]
        except OSError:
            continue  # gone meanwhile
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


def mounted_from(devices: set[Device], table: list[Mount]) -> list[Mount]:
    """The mounts of `table` whose file system lives on one of `devices`."""
    found = []
    for mount in table:
        # btrfs and a few others report an anonymous device number: go by the source then.
        if mount.device in devices or _source_device(mount.source) in devices:
            found.append(mount)
    return found


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
    if stat.S_ISBLK(info.st_mode):
        roots = [(os.major(info.st_rdev), os.minor(info.st_rdev))]
        loops: list[Device] = []
    elif stat.S_ISREG(info.st_mode):
        loops = loop_devices_of(path, info)
        roots = loops
    else:
        return  # nothing can mount or attach anything else
    devices: set[Device] = set()
    for root in roots:
        devices |= stacked(root)
    on_it = mounted_from(devices, mounts())
    if on_it:
        places = ", ".join(f"{m.mountpoint} ({m.fstype})" for m in on_it[:5])
        raise DiskInUse(what=what, path=str(path), why=f"it is mounted at {places}", fix=FIX)
    if loops:
        names = ", ".join(_devname(device) for device in loops)
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
