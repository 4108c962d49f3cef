"""Disk images for file recovery tests: an ext4 disk, an XFS disk, and a GPT disk with both.

Each file system holds `tests.recovery_content`'s tree plus a file `which` naming it (the
kind, or the partition), and the builder keeps each file system's manifest, taken as it was
written, to compare what comes back with. Images are sparse: what they cost is the data.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.loopfs import XFS_MIN, mkfs, run, umount
from tests.recovery_content import manifest, populate

MiB = 1 << 20
EXT4_SIZE = 512 * MiB
GPT_P1_SIZE = 256 * MiB
# The "which" file of every file system is written with this time.
WHICH_NS = 1_600_000_000 * 10**9

Manifest = dict[str, tuple[object, ...]]


@dataclass(frozen=True)
class BuiltImage:
    path: Path
    manifests: dict[str, Manifest]  # per file system: "disk" without a table, else "p1", "p2"


def _empty(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)


def fill(device_args: list[str], fstype: str, mnt: Path, marker: str) -> Manifest:
    """mkfs on a loop device of (part of) an image, fill it, and take its manifest."""
    device = run("losetup", "--find", "--show", *device_args).strip()
    try:
        mkfs(fstype, device)
        mnt.mkdir(exist_ok=True)
        run("mount", "-o", "noatime", device, str(mnt))
        try:
            populate(mnt)
            (mnt / "which").write_text(marker)
            os.utime(mnt / "which", ns=(WHICH_NS, WHICH_NS))
            manifest(mnt)  # settles the links' atimes (see manifest)
            return manifest(mnt)
        finally:
            umount(mnt)
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


def build_images(base: Path) -> dict[str, BuiltImage]:
    """`ext4`, `xfs` (one file system each) and `gpt` (p1 ext4, p2 XFS) under `base`."""
    built: dict[str, BuiltImage] = {}
    for fstype, size in (("ext4", EXT4_SIZE), ("xfs", XFS_MIN)):
        path = base / f"{fstype}.img"
        _empty(path, size)
        built[fstype] = BuiltImage(path, {"disk": fill([str(path)], fstype, base / "mnt", fstype)})
    built["gpt"] = build_gpt(base)
    return built


def build_gpt(base: Path) -> BuiltImage:
    """`base`/gpt.img: a GPT disk with two partitions, p1 ext4 and p2 XFS."""
    path = base / "gpt.img"
    _empty(path, 64 * MiB + GPT_P1_SIZE + XFS_MIN + 8 * MiB)
    script = f"label: gpt\nstart=2048, size={GPT_P1_SIZE // 512}, type=linux\ntype=linux\n"
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True)
    table = json.loads(run("sfdisk", "--json", str(path)))["partitiontable"]["partitions"]
    found = {}
    for number, (part, fstype) in enumerate(zip(table, ("ext4", "xfs"), strict=True), 1):
        span = ["--offset", str(part["start"] * 512), "--sizelimit", str(part["size"] * 512)]
        found[f"p{number}"] = fill([*span, str(path)], fstype, base / "mnt", f"p{number}")
    return BuiltImage(path, found)
