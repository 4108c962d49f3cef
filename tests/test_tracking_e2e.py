"""Changed-block tracking end to end: a real controller and agent back up an ext4 image that
lives on a reflink XFS (a loop mount), after writes inside the ext4 in every pattern, reading
only what changed; each restore is byte-identical to the disk as it was backed up; every case
in which the chain cannot be trusted falls back to a full read, with its reason on the job.

One test walks through the patterns and the fallbacks in sequence: each step builds on the
recovery point and kept clone the step before left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bench.image import build_image, mounted
from tests.cluster import Cluster, sha256_file
from tests.loopfs import LoopFs, loop_fs

MiB = 1 << 20
DISK = 256 * MiB
VM = f"cbt-{os.getpid()}"
VAULT = "local"

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(900)]


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[LoopFs]:
    with loop_fs(tmp_path / "scratch-xfs.img", "xfs", 1024 * MiB) as mounted_fs:
        yield mounted_fs


def tracked_files(image: Path) -> list[str]:
    return sorted(p.name for p in image.parent.glob(f".{image.name}.coffer-track*"))


class Steps:
    """Back up, check how each disk was read, restore and compare."""

    def __init__(self, cluster: Cluster, image: Path, other: Path) -> None:
        self.cluster, self.image, self.other = cluster, image, other
        self.restores = 0
        self.log: list[str] = []

    def backup(self, *disks: str) -> dict[str, Any]:
        args = [a for d in disks for a in ("--disk", d)]
        job: dict[str, Any] = self.cluster.coffer("backup-now", VM, *args)
        assert job["status"] == "Completed", job
        return job

    def reads(self, job: dict[str, Any], disk: str = "root") -> dict[str, Any]:
        read: dict[str, Any] = job["details"]["reads"][disk]
        return read

    def tracked(self, step: str) -> dict[str, Any]:
        """A backup that must read only root's changed chunks, restored and compared."""
        job = self.backup("root")
        read = self.reads(job)
        assert read["changed_blocks"], (step, read)
        assert read["full_read_reason"] == ""
        assert int(read["bytes_read"]) <= DISK // 8, (step, read)
        self.log.append(f"{step}: read {int(read['bytes_read']) / MiB:.1f} MiB of {DISK // MiB}")
        self.restored(job)
        return job

    def full(self, reason: str, *disks: str) -> dict[str, Any]:
        """A backup that must read root in full for `reason`, restored and compared."""
        job = self.backup(*(disks or ("root",)))
        read = self.reads(job)
        assert not read["changed_blocks"], read
        assert reason in read["full_read_reason"], read
        self.restored(job)
        return job

    def restored(self, job: dict[str, Any]) -> None:
        self.restores += 1
        target = self.cluster.agents[VM].restore_dir / f"restored-{self.restores}.img"
        self.cluster.restore(VM, job["recovery_point_id"], "root", target)
        assert sha256_file(target) == sha256_file(self.image)
        target.unlink()


def fallocate(*args: str) -> None:
    subprocess.run(["fallocate", *args], check=True, capture_output=True)


def test_tracking_reads_only_what_changed_and_falls_back_when_the_chain_is_in_doubt(
    xfs: LoopFs, tmp_path: Path
) -> None:
    image = build_image(xfs.mountpoint / "vm.img", DISK, fill=0.5, seed=7).path
    # A second disk off the reflink file system: its snapshot cannot be a clone.
    other = tmp_path / "data.img"
    with other.open("wb") as f:
        f.write(os.urandom(4 * MiB))
        f.truncate(16 * MiB)
    with Cluster(tmp_path / "cluster") as cluster:
        cluster.add_agent(VM, {"root": image, "data": other})
        cluster.protect(VM)
        steps = Steps(cluster, image, other)

        first = steps.full("no previous recovery point", "root", "data")
        data = steps.reads(first, "data")
        assert "not a reflink clone" in data["full_read_reason"], data
        shown = cluster.coffer("job", "show", first["id"], json_out=False).stdout
        assert "Disk reads" in shown
        assert "in full (there is no previous recovery point" in shown
        assert len(tracked_files(image)) == 2  # the kept clone and its state

        # Writes inside the mounted ext4, one pattern a backup.
        def inside(change: Any) -> None:
            with mounted(image) as root:
                change(root)
                os.sync()

        with mounted(image) as root:
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.stat().st_size > MiB)
            names = [p.relative_to(root) for p in files[:4]]
        assert len(names) == 4, "the image has too few large files"

        def overwrite(root: Path) -> None:
            with (root / names[0]).open("r+b") as f:
                f.seek(300 * 1024)
                f.write(os.urandom(64 * 1024))

        inside(overwrite)
        steps.tracked("in-place overwrite")

        inside(lambda root: (root / names[1]).open("ab").write(os.urandom(3 * MiB)))
        steps.tracked("append")

        inside(lambda root: os.truncate(root / names[1], (root / names[1]).stat().st_size // 2))
        steps.tracked("truncate")

        inside(lambda root: fallocate("-p", "-o", "0", "-l", str(MiB), str(root / names[2])))
        steps.tracked("punch hole")

        inside(lambda root: fallocate("-l", str(8 * MiB), str(root / "allocated.bin")))
        steps.tracked("fallocate")

        def small_files(root: Path) -> None:
            (root / "small").mkdir()
            for n in range(400):
                (root / "small" / f"{n}.txt").write_bytes(os.urandom(512 + n * 13))

        inside(small_files)
        steps.tracked("many small files")

        def deletes(root: Path) -> None:
            shutil.rmtree(root / "small")
            (root / names[3]).unlink()
            # The freed blocks are discarded: the loop device punches holes in the image.
            subprocess.run(["fstrim", str(root)], check=True, capture_output=True)

        inside(deletes)
        steps.tracked("deletes and fstrim")

        # An agent restart loses nothing: the kept clone is in the file system.
        cluster.agents[VM].process.stop()
        cluster.start_agent(VM)
        inside(overwrite)
        steps.tracked("after an agent restart")

        # --- every way the chain can be in doubt reads in full, and says why ---------------
        state = image.parent / f".{image.name}.coffer-tracking.json"
        kept = image.parent / json.loads(state.read_text())["clone"]
        os.utime(kept)
        steps.full("was modified")
        steps.tracked("after a full read")

        kept = image.parent / json.loads(state.read_text())["clone"]
        kept.unlink()
        steps.full("is missing")

        # The previous recovery point is not the one the clone was kept for: a backup of
        # the other disk alone came between.
        steps.backup("data")
        steps.full("builds on")

        saved = json.loads(state.read_text())
        saved["full_read_at"] -= 8 * 86400
        state.write_text(json.dumps(saved))
        steps.full("periodic full read")

        # Damage found in the previous point by a verify.
        with image.open("rb") as disk:
            disk.seek(0)
            chunk_hash = cluster.open_datastore(VAULT).chunk_hash
            hexed = chunk_hash.digest(disk.read(cluster.chunk_size)).hex()
        (cluster.datastore(VAULT) / "chunks" / hexed[:2] / hexed[2:4] / hexed).unlink()
        verify = cluster.coffer("verify", "--vault", VAULT, "--vm", VM, check=False)
        assert verify["status"] == "Failed", verify
        steps.full("was found damaged")
        steps.tracked("after the damage was repaired")

        # Tracking off: every backup reads in full, and the kept clone goes.
        cluster.coffer("vault", "update", VAULT, "--full-read-days", "0")
        steps.full("tracking is off")
        assert tracked_files(image) == []
        cluster.coffer("vault", "update", VAULT, "--full-read-days", "7")
        assert cluster.coffer("vault", "show", VAULT)["full_read_days"] == 7
        steps.full("no clone was kept")
        steps.tracked("tracking on again")

        # The disk resized (the agent declares the new size when it reconnects).
        cluster.agents[VM].process.stop()
        os.truncate(image, DISK + 64 * MiB)
        cluster.start_agent(VM)
        steps.full("resized")
        print("\n".join(steps.log))
