"""Snapshot providers: a point-in-time image of a disk to read the backup from.

One small interface (`probe`, `take`, `release`), one implementation per way a host can
snapshot a disk, chosen per disk, most capable first (`choose`):

- `reflink`: a clone (FICLONE) of an image file into a file beside it, sharing every extent
  with the image: instant and atomic whatever the size, on XFS (reflink=1), btrfs and other
  file systems that share extents. The clone is read afterwards; writes to the image go to
  new extents and leave it alone.
- `btrfs-subvolume`: a read-only snapshot of the btrfs subvolume holding the image, with the
  `btrfs` tool (btrfs-progs). Not exercised on the project's machines, which lack the tool:
  there it refuses.
- `lvm`: refused: it needs device-mapper, which these machines do not have, and it is not
  implemented until it can be tested.
- `read-while-frozen`: no copy at all. The disk itself is read while its file systems stay
  frozen; the freeze then lasts as long as the read, bounded by the thaw watchdog's deadline.
  The last resort, for any disk that can be read.

`atomic` says whether the snapshot is a copy made at once: the freeze may then end as soon as
`take()` returns. Blocking calls: run them in a thread.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import itertools
import os
import shutil
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from agent.freeze import mounts
from shared.errors import ExtensionSnapshotFailed, UserErrorSnapshotProviderUnsupported

FICLONE = 0x40049409  # _IOW(0x94, 9, int)

SNAPSHOT_MARK = ".coffer-snapshot-"  # in the names of the files a provider leaves beside a disk


@dataclass(frozen=True)
class Probe:
    """Whether a provider can snapshot a disk, and why not."""

    ok: bool
    why: str = ""

    def __bool__(self) -> bool:
        return self.ok


class SnapshotProvider(abc.ABC):
    """How one disk is snapshotted. `take` once, read the path it returns, `release`."""

    name: ClassVar[str]
    atomic: ClassVar[bool]  # a point-in-time copy: the freeze may end once take() returns

    def __init__(self, disk: str, path: Path) -> None:
        self.disk = disk  # the disk's name, for messages
        self.path = path  # the image file or block device

    @abc.abstractmethod
    def probe(self) -> Probe:
        """Whether this provider can snapshot the disk on this host (cheap, changes nothing
        lasting)."""

    @abc.abstractmethod
    def take(self) -> Path:
        """Snapshot the disk; the path to read the snapshot from."""

    @abc.abstractmethod
    def release(self) -> None:
        """Remove the snapshot; idempotent."""

    def _unsupported(self, why: str) -> UserErrorSnapshotProviderUnsupported:
        return UserErrorSnapshotProviderUnsupported(disk=self.disk, provider=self.name, why=why)

    def _failed(self, cause: str, fix: str) -> ExtensionSnapshotFailed:
        return ExtensionSnapshotFailed(disk=self.disk, provider=self.name, cause=cause, fix=fix)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fstype_of(path: Path) -> str:
    """The type of the file system `path` is on, from this namespace's mount table."""
    device = os.stat(path).st_dev
    found = "unknown"
    # The last mount of that device whose mount point is above the path wins (overmounts).
    resolved = path.resolve()
    for mount in mounts():
        if os.makedev(*mount.device) == device and resolved.is_relative_to(mount.mountpoint):
            found = mount.fstype
    return found


class ReflinkClone(SnapshotProvider):
    """A FICLONE clone of an image file, beside it on the same file system."""

    name = "reflink"
    atomic = True
    _counter = itertools.count()

    def __init__(self, disk: str, path: Path) -> None:
        super().__init__(disk, path)
        self.snapshot: Path | None = None

    def probe(self) -> Probe:
        try:
            info = os.stat(self.path)
        except OSError as exc:
            return Probe(False, f"{self.path}: {exc.strerror}")
        if not stat.S_ISREG(info.st_mode):
            return Probe(False, f"{self.path} is not an image file (only files can be cloned)")
        # Asking the file system is the only sure test: clone a one-block file beside the disk.
        directory = self.path.parent
        source = directory / f"{SNAPSHOT_MARK}probe-{os.getpid()}"
        clone = directory / f"{SNAPSHOT_MARK}probe-{os.getpid()}.clone"
        try:
            with source.open("w+b") as src_file:
                src_file.write(b"\0" * 4096)
                src_file.flush()
                with clone.open("wb") as dst_file:
                    fcntl.ioctl(dst_file.fileno(), FICLONE, src_file.fileno())
        except OSError as exc:
            fstype = _fstype_of(directory)
            return Probe(
                False,
                f"{directory} is on {fstype}, which cannot share extents "
                f"(FICLONE: {exc.strerror}); XFS made with reflink=1 and btrfs can",
            )
        finally:
            for leftover in (clone, source):
                leftover.unlink(missing_ok=True)
        return Probe(True)

    def _remove_stale(self) -> None:
        """Clones left by an agent that died before releasing them."""
        prefix = f".{self.path.name}{SNAPSHOT_MARK}"
        for leftover in self.path.parent.glob(f"{prefix}*"):
            pid = leftover.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                leftover.unlink(missing_ok=True)

    def take(self) -> Path:
        if self.snapshot is not None:
            return self.snapshot
        self._remove_stale()
        name = f".{self.path.name}{SNAPSHOT_MARK}{os.getpid()}-{next(self._counter)}"
        snapshot = self.path.parent / name
        try:
            src = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                dst = os.open(snapshot, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.ioctl(dst, FICLONE, src)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
        except OSError as exc:
            snapshot.unlink(missing_ok=True)
            if exc.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL):
                raise self._unsupported(f"FICLONE: {exc.strerror}") from exc
            raise self._failed(
                f"cloning {self.path} into {snapshot}: {exc.strerror}",
                "Check the free space and health of the file system holding the image.",
            ) from exc
        self.snapshot = snapshot
        return snapshot

    def release(self) -> None:
        if self.snapshot is not None:
            self.snapshot.unlink(missing_ok=True)
            self.snapshot = None


class BtrfsSubvolume(SnapshotProvider):
    """A read-only snapshot of the btrfs subvolume (mounted at its mount point) holding the
    image file, made and deleted with the `btrfs` tool."""

    name = "btrfs-subvolume"
    atomic = True

    def __init__(self, disk: str, path: Path) -> None:
        super().__init__(disk, path)
        self.snapshot_dir: Path | None = None
        self._root: Path | None = None  # the subvolume snapshotted

    def _subvolume(self) -> Path | None:
        """The mount point of the btrfs subvolume the image is in, if the image is directly in
        a mounted subvolume (a nested subvolume has its own device number)."""
        resolved = self.path.resolve()
        device = os.stat(resolved).st_dev
        best: Path | None = None
        for mount in mounts():
            if mount.fstype != "btrfs" or not resolved.is_relative_to(mount.mountpoint):
                continue
            with contextlib.suppress(OSError):
                if os.stat(mount.mountpoint).st_dev == device and (
                    best is None or len(mount.mountpoint.parts) > len(best.parts)
                ):
                    best = mount.mountpoint
        return best

    def probe(self) -> Probe:
        try:
            info = os.stat(self.path)
        except OSError as exc:
            return Probe(False, f"{self.path}: {exc.strerror}")
        if not stat.S_ISREG(info.st_mode):
            return Probe(False, f"{self.path} is not an image file on btrfs")
        if _fstype_of(self.path) != "btrfs":
            return Probe(False, f"{self.path} is on {_fstype_of(self.path)}, not btrfs")
        if shutil.which("btrfs") is None:
            return Probe(False, "the btrfs tool is not installed (Debian package btrfs-progs)")
        if self._subvolume() is None:
            return Probe(False, f"{self.path} is not directly in a mounted btrfs subvolume")
        return Probe(True)

    def take(self) -> Path:
        if self.snapshot_dir is not None and self._root is not None:
            return self.snapshot_dir / self.path.resolve().relative_to(self._root)
        probe = self.probe()
        if not probe:
            raise self._unsupported(probe.why)
        root = self._subvolume()
        assert root is not None
        self._root = root
        target = root / f"{SNAPSHOT_MARK}{os.getpid()}"
        done = subprocess.run(
            ["btrfs", "subvolume", "snapshot", "-r", str(root), str(target)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise self._failed(
                f"btrfs subvolume snapshot: {done.stderr.strip()}",
                "Check the free space of the btrfs file system.",
            )
        self.snapshot_dir = target
        return target / self.path.resolve().relative_to(root)

    def release(self) -> None:
        if self.snapshot_dir is None:
            return
        subprocess.run(
            ["btrfs", "subvolume", "delete", str(self.snapshot_dir)],
            capture_output=True,
            check=False,
        )
        self.snapshot_dir = None


class LvmSnapshot(SnapshotProvider):
    """Refused: LVM snapshots need device-mapper, and are not implemented until testable."""

    name = "lvm"
    atomic = True

    def probe(self) -> Probe:
        if not Path("/dev/mapper/control").exists():
            return Probe(False, "this host has no device-mapper (/dev/mapper/control)")
        return Probe(False, "LVM snapshots are not implemented by this agent yet")

    def take(self) -> Path:
        raise self._unsupported(self.probe().why)

    def release(self) -> None:
        pass


class ReadWhileFrozen(SnapshotProvider):
    """The disk itself, read while its file systems stay frozen."""

    name = "read-while-frozen"
    atomic = False

    def probe(self) -> Probe:
        if not os.access(self.path, os.R_OK):
            return Probe(False, f"{self.path} cannot be read")
        return Probe(True)

    def take(self) -> Path:
        return self.path

    def release(self) -> None:
        pass


PROVIDERS: dict[str, type[SnapshotProvider]] = {
    p.name: p for p in (ReflinkClone, BtrfsSubvolume, LvmSnapshot, ReadWhileFrozen)
}
DEFAULT_ORDER: tuple[str, ...] = tuple(PROVIDERS)  # most capable first


def choose(
    disk: str, path: Path, order: Sequence[str] = DEFAULT_ORDER
) -> tuple[SnapshotProvider, dict[str, str]]:
    """The first provider in `order` that can snapshot the disk, and why each one before it
    could not. A single provider in `order` is a requirement: refused with its reason."""
    refused: dict[str, str] = {}
    for name in order:
        cls = PROVIDERS.get(name)
        if cls is None:
            known = ", ".join(PROVIDERS)
            raise UserErrorSnapshotProviderUnsupported(
                disk=disk, provider=name, why=f"there is no such provider (known: {known})"
            )
        provider = cls(disk, path)
        probe = provider.probe()
        if probe:
            return provider, refused
        refused[name] = probe.why
    why = "; ".join(f"{name}: {why}" for name, why in refused.items())
    provider_names = "/".join(order)
    raise UserErrorSnapshotProviderUnsupported(disk=disk, provider=provider_names, why=why)
