"""A drill's read-only file system checks of a restored image (agent/fscheck.py), on real images.

What a drill reports: each partition of a partitioned disk checked on a loop device of its
own (and none left attached), a partition without a file system unchecked, a partition table
that cannot be read damaged, and a disk without a table checked whole.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from agent.fscheck import CLEAN, DAMAGED, UNCHECKED, check_image
from tests.loopfs import mkfs, run

pytestmark = [pytest.mark.root]

MiB = 1 << 20


def gpt_image(path: Path) -> Path:
    """A 48 MiB GPT disk: partition 1 (16 MiB) ext4, partition 2 (16 MiB) without a file
    system."""
    with path.open("wb") as f:
        f.truncate(48 * MiB)
    script = "label: gpt\nstart=2048, size=32768, type=linux\nsize=32768, type=linux\n"
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True)
    device = run("losetup", "--find", "--show", "--offset", str(2048 * 512), "--sizelimit",
                 str(16 * MiB), str(path)).strip()  # fmt: skip
    try:
        mkfs("ext4", device)
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)
    return path


def attached_to(path: Path) -> list[str]:
    listed = json.loads(run("losetup", "--list", "--json", "--output", "NAME,BACK-FILE") or "{}")
    return [d["name"] for d in listed.get("loopdevices", []) if str(path) in (d["back-file"] or "")]


async def checked(path: Path) -> list[tuple[str, str, str]]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        found = await check_image(fd, os.fstat(fd).st_size)
        return [(c.where, c.fstype, c.verdict) for c in found]
    finally:
        os.close(fd)


async def test_each_partition_of_a_gpt_disk_is_checked_on_its_own_loop_device(
    tmp_path: Path,
) -> None:
    image = gpt_image(tmp_path / "gpt.img")
    assert await checked(image) == [
        ("partition 1", "ext4", CLEAN),
        ("partition 2", "", UNCHECKED),
    ]
    assert attached_to(image) == []


async def test_a_partition_table_that_cannot_be_read_is_damage(tmp_path: Path) -> None:
    image = gpt_image(tmp_path / "gpt.img")
    with image.open("r+b") as f:  # both GPT headers overwritten; the protective MBR stays
        for offset in (512, 48 * MiB - 512):
            f.seek(offset)
            f.write(b"\xff" * 512)
    assert await checked(image) == [("partition table", "", DAMAGED)]


async def test_a_disk_without_a_table_is_checked_whole(tmp_path: Path) -> None:
    image = tmp_path / "ext4.img"
    with image.open("wb") as f:
        f.truncate(16 * MiB)
    mkfs("ext4", image)
    assert await checked(image) == [("whole disk", "ext4", CLEAN)]
