"""Loop-mounted file systems for tests (as root): made, mounted, and always taken down.

Taking down thaws first: an unmount of a frozen file system would wait for a thaw forever.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.freeze import thaw_fd

MiB = 1 << 20
# mkfs.xfs refuses file systems under 300 MiB; the image is sparse, so this costs little.
XFS_MIN = 320 * MiB


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def mkfs(fstype: str, target: str | Path) -> None:
    if fstype == "xfs":
        run("mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(target))
    elif fstype == "ext4":
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(target))
    else:
        raise ValueError(fstype)


def thaw_path(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            thaw_fd(fd)
        finally:
            os.close(fd)


def umount(path: Path) -> None:
    thaw_path(path)
    for attempt in range(40):
        done = subprocess.run(["umount", str(path)], capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return
        if attempt == 39:
            raise RuntimeError(f"umount {path}: {done.stderr.strip()}")
        time.sleep(0.25)


@dataclass(frozen=True)
class LoopFs:
    image: Path
    device: str  # /dev/loopN
    mountpoint: Path


@contextlib.contextmanager
def loop_fs(
    image: Path, fstype: str, size: int, mountpoint: Path | None = None
) -> Iterator[LoopFs]:
    """A new sparse `image` of `size` bytes holding `fstype`, loop-mounted; torn down on exit."""
    with image.open("wb") as f:
        f.truncate(size)
    mkfs(fstype, image)
    mountpoint = mountpoint or image.with_suffix(".mnt")
    mountpoint.mkdir(exist_ok=True)
    device = run("losetup", "--find", "--show", str(image)).strip()
    try:
        run("mount", device, str(mountpoint))
        try:
            yield LoopFs(image, device, mountpoint)
        finally:
            umount(mountpoint)
    finally:
        subprocess.run(["losetup", "--detach", device], capture_output=True, check=False)
