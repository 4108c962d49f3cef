"""Whether anything uses a disk (agent/disk_use.py), on real loop devices, mounts and processes.

The restore's refusals and the backup's freeze ask the same question of the kernel; the cases
here are the ones names alone would get wrong.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agent.disk_use import check_unused, disk_devices, loop_devices_of
from shared.errors import DiskInUse

pytestmark = [pytest.mark.root]


def test_an_image_attached_under_another_name_is_in_use(tmp_path: Path) -> None:
    """A hard link of the image attached to a loop device: sysfs names the link, not the
    image, so the kernel is asked who backs the device (by device and inode)."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    check_unused(image, "Disk")  # nothing uses it yet
    alias = tmp_path / "alias.img"
    os.link(image, alias)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(alias)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        rdev = os.stat(device).st_rdev
        assert loop_devices_of(image) == [(os.major(rdev), os.minor(rdev))]
        assert (os.major(rdev), os.minor(rdev)) in disk_devices(image)
        with pytest.raises(DiskInUse, match=f"attached to loop device {device}"):
            check_unused(image, "Disk")
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)
    check_unused(image, "Disk")
