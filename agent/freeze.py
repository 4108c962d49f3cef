"""Freezing file systems: the mount table, FIFREEZE and FITHAW.

Which mounted file systems live on a disk (its loop devices, partitions and holders, and the
mounts on them) is `agent.disk_use`'s, the one place that knows a disk's devices; this module
reads the mount table (`mounts`) and freezes and thaws one file system at a time.

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
