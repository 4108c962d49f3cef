"""Every way back of a whole disk, end to end: in place, over a target, to another VM, drills.

Real controller, real agents, real Mosquitto, loop-mounted ext4 and XFS images. What an
operator would check: a disk rolled back in place is byte-identical to the recovery point and
only what differed was fetched; nothing is written over a disk that is mounted, attached or
open, over a target that exists without `--overwrite`, over a configured disk, or to a VM of
another region; a drill restores, checks and deletes, and says which file system is damaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.datastore import CONFIG_KEY, DatastoreConfig, LocalDirectoryStore
from tests.bench.image import build_image, edit_files, loop_devices_for, mounted
from tests.cluster import Cluster, sha256_file
from tests.loopfs import XFS_MIN, mkfs, run
from tests.recovery_images import build_gpt

MiB = 1 << 20
EXT4_SIZE = 96 * MiB

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(600)]


def build_xfs(path: Path, seed: int) -> Path:
    """A sparse XFS image with some files in it."""
    with path.open("wb") as f:
        f.truncate(XFS_MIN)
    mkfs("xfs", path)
    rng = random.Random(seed)
    with mounted(path) as root:
        (root / "data").mkdir()
        for n in range(8):
            (root / "data" / f"file-{n}.bin").write_bytes(rng.randbytes(512 * 1024))
        (root / "notes.txt").write_text("xfs notes\n" * 1000)
        os.sync()
    return path


def build_damaged_ext4(path: Path) -> Path:
    """An ext4 image whose file system is damaged: a file's inode cleared under its entry."""
    build_image(path, 64 * MiB, fill=0.3, seed=21)
    with mounted(path) as root:
        (root / "victim.txt").write_text("soon unreachable\n" * 100)
        os.sync()
    run("debugfs", "-w", "-R", "clri /victim.txt", str(path))
    check = subprocess.run(["e2fsck", "-fn", str(path)], capture_output=True, text=True)
    assert check.returncode == 4, check.stdout  # damaged, as e2fsck sees it
    return path


def e2fsck_clean(path: Path) -> bool:
    return subprocess.run(["e2fsck", "-fn", str(path)], capture_output=True).returncode == 0


@contextlib.contextmanager
def attached(image: Path) -> Iterator[str]:
    """A loop device attached to `image` (not mounted)."""
    device = run("losetup", "--find", "--show", str(image)).strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


@contextlib.contextmanager
def held_open(path: Path) -> Iterator[int]:
    """Another process holding `path` open; its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'rb'); "
         "print('ready', flush=True); time.sleep(120)", str(path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    return {
        "app-1": build_image(root / "app-1.img", EXT4_SIZE, fill=0.5, seed=3).path,
        "xfs-1": build_xfs(root / "xfs-1.img", seed=4),
        "spare-1": build_image(root / "spare-1.img", 32 * MiB, fill=0.2, seed=5).path,
        "far-1": build_image(root / "far-1.img", 32 * MiB, fill=0.2, seed=6).path,
        "bad-1": build_damaged_ext4(root / "bad-1.img"),
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, images: dict[str, Path]) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster")) as running:
        for vm in ("app-1", "xfs-1", "spare-1", "bad-1"):
            running.add_agent(vm, {"root": images[vm]}, region="eu")
        running.add_agent("far-1", {"root": images["far-1"]}, region="us")
        yield running


def backed_up(cluster: Cluster, vm: str) -> dict[str, Any]:
    job = cluster.backup(vm)
    assert job["status"] == "Completed", job
    return job


def in_place(cluster: Cluster, vm: str, rp: str, *extra: str, check: bool = False) -> Any:
    return cluster.coffer(
        "restore", vm, "--rp", rp, "--disk", "root", "--in-place", "--yes", *extra, check=check
    )


# --- in place ------------------------------------------------------------------------------


@pytest.mark.parametrize("vm", ["app-1", "xfs-1"])
def test_rollback_in_place_is_refused_while_in_use_and_then_fetches_only_what_differs(
    cluster: Cluster, images: dict[str, Path], vm: str
) -> None:
    image = images[vm]
    want = sha256_file(image)
    rp = backed_up(cluster, vm)["recovery_point_id"]
    edit_files(image, 0.05, seed=7)  # the VM changes files after the backup
    changed = sha256_file(image)
    assert changed != want

    # Mounted (through a loop device), attached without a mount, open in another process:
    # refused each time, the disk untouched (mounted read-only, so that mounting changes
    # nothing either).
    with mounted(image, readonly=True):
        job = in_place(cluster, vm, rp)
    assert (job["status"], job["error_code"]) == ("Failed", "UserErrorDiskInUse"), job
    assert "is mounted at" in job["error_message"]
    with attached(image) as device:
        job = in_place(cluster, vm, rp)
        assert job["error_code"] == "UserErrorDiskInUse"
        assert f"attached to loop device {device}" in job["error_message"]
    with held_open(image) as pid:
        done = cluster.coffer(
            "restore", vm, "--rp", rp, "--disk", "root", "--in-place", "--yes", "--json",
            json_out=False, check=False,
        )  # fmt: skip
    assert done.returncode == 5  # conflicting state: stop what uses it and try again
    job = json.loads(done.stdout)
    assert job["error_code"] == "UserErrorDiskInUse"
    assert f"open in process {pid}" in job["error_message"]
    assert sha256_file(image) == changed

    # Unused now: rolled back, byte for byte, fetching only the chunks that differ.
    job = in_place(cluster, vm, rp, check=True)
    assert job["status"] == "Completed", job
    assert sha256_file(image) == want
    restored = job["restore"]
    assert restored["mode"] == "in-place"
    assert restored["target_path"] == str(image)
    size = image.stat().st_size
    assert restored["bytes_compared"] > 0
    assert 0 < restored["bytes_fetched"] < size * 0.15, restored
    assert restored["bytes_written"] < size * 0.3, restored
    if vm == "app-1":
        assert e2fsck_clean(image)

    # A second rollback finds nothing to do.
    again = in_place(cluster, vm, rp, check=True)
    assert again["restore"]["bytes_fetched"] == 0
    assert again["restore"]["bytes_written"] == 0
    assert sha256_file(image) == want


def chunk_digests(image: Path, chunk_size: int) -> list[bytes | None]:
    """Each chunk's SHA-256 (None for a chunk of zeros), to see which chunks two states of a
    disk differ in, whatever the vault names chunks by."""
    digests: list[bytes | None] = []
    with image.open("rb") as f:
        while chunk := f.read(chunk_size):
            zero = chunk.count(0) == len(chunk)
            digests.append(None if zero else hashlib.sha256(chunk).digest())
    return digests


def test_a_rollback_on_an_encrypted_vault_fetches_and_writes_only_the_chunks_that_differ(
    cluster: Cluster, tmp_path: Path
) -> None:
    """An encrypted vault names chunks by a keyed hash: the agent must hash the disk's chunks
    with the vault's key to compare them with the index, or every chunk would differ. What it
    writes is exactly the chunks that differ, and it fetches each of them once."""
    image = build_image(tmp_path / "enc-1.img", 64 * MiB, fill=0.5, seed=13).path
    cluster.add_agent("enc-1", {"root": image}, region="eu")
    try:
        rp = backed_up(cluster, "enc-1")["recovery_point_id"]
        vault = cluster.coffer("vault", "show", "eu")
        assert (vault["datastore_format"], vault["encryption"]) == (2, "aes-256-gcm")
        chunk_size = vault["chunk_size"]
        want = sha256_file(image)
        before = chunk_digests(image, chunk_size)
        edit_files(image, 0.05, seed=14)
        after = chunk_digests(image, chunk_size)
        differ = [n for n, (b, a) in enumerate(zip(before, after, strict=True)) if b != a]
        data = [n for n in differ if before[n] is not None]  # to fetch; the rest become holes
        # About a quarter of the chunks: 31 or 32 of 128, as ext4 places one block one way or
        # the other. Well short of the whole disk either way.
        assert 0 < len(data) < len(before) // 2

        job = in_place(cluster, "enc-1", rp, check=True)
        assert sha256_file(image) == want
        restored = job["restore"]
        # An image: the differing data chunks are written whole, zeros become holes.
        assert restored["bytes_written"] == len(data) * chunk_size, (len(data), restored)
        distinct = {before[n] for n in data}
        # Each distinct chunk once, as stored (compressed or not), with a little framing.
        assert 0 < restored["bytes_fetched"] <= len(distinct) * (chunk_size + 256), restored
        assert restored["bytes_fetched"] < image.stat().st_size * 0.15  # 7% here
    finally:
        cluster.agents["enc-1"].process.stop()


def test_a_block_device_is_rolled_back_in_place_and_refused_while_mounted(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A VM whose disk is a block device (a loop device here): the same rollback, through the
    device, with the kernel's exclusive claim."""
    backing = build_image(tmp_path / "device.img", 48 * MiB, fill=0.3, seed=12).path
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with attached(backing) as device:
        cluster.add_agent("dev-1", {"root": Path(device)}, region="eu")
        try:
            want = sha256_file(backing)
            rp = backed_up(cluster, "dev-1")["recovery_point_id"]
            run("mount", device, str(mountpoint))
            try:
                (mountpoint / "new.bin").write_bytes(os.urandom(3 * MiB))
                (mountpoint / "lost+found").rmdir()
                os.sync()
                job = in_place(cluster, "dev-1", rp)
                assert job["error_code"] == "UserErrorDiskInUse", job
                assert "is mounted at" in job["error_message"]
            finally:
                run("umount", str(mountpoint))
            assert sha256_file(backing) != want
            job = in_place(cluster, "dev-1", rp, check=True)
            assert job["restore"]["target_path"] == device
            assert job["restore"]["bytes_fetched"] < 48 * MiB * 0.2
            assert sha256_file(backing) == want
        finally:
            cluster.agents["dev-1"].process.stop()


def test_rollback_in_place_asks_first(cluster: Cluster) -> None:
    rp = cluster.coffer("rp", "list", "app-1")[-1]["id"]
    before = len(cluster.coffer("job", "list", "--vm", "app-1", "--limit", "1000"))
    # No terminal to ask on and no --yes: refused before anything starts.
    refused = cluster.coffer(
        "restore", "app-1", "--rp", rp, "--disk", "root", "--in-place", json_out=False,
        check=False,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    mixed = cluster.coffer(
        "restore", "app-1", "--rp", rp, "--disk", "root", "--in-place", "--yes", "--target",
        "/tmp/x.img", json_out=False, check=False,
    )  # fmt: skip
    assert mixed.returncode == 2
    assert len(cluster.coffer("job", "list", "--vm", "app-1", "--limit", "1000")) == before


# --- over a target ---------------------------------------------------------------------------


def test_an_existing_target_is_replaced_only_with_overwrite_and_never_when_in_use(
    cluster: Cluster, images: dict[str, Path]
) -> None:
    rp = backed_up(cluster, "spare-1")["recovery_point_id"]
    want = sha256_file(images["spare-1"])
    restore_dir = cluster.agents["spare-1"].restore_dir
    target = restore_dir / "existing.img"
    target.write_bytes(b"precious" * 1000)

    def restore(*extra: str) -> Any:
        return cluster.coffer(
            "restore", "spare-1", "--rp", rp, "--disk", "root", "--target", str(target), *extra,
            check=False,
        )  # fmt: skip

    job = restore()
    assert (job["status"], job["error_code"]) == ("Failed", "UserErrorRestoreTargetExists")
    assert target.read_bytes() == b"precious" * 1000
    # Attached to a loop device, mounted, or open: refused even with --overwrite.
    build_image(target, 16 * MiB, fill=0.1, seed=8)
    kept = sha256_file(target)
    with attached(target):
        assert restore("--overwrite")["error_code"] == "UserErrorDiskInUse"
    with mounted(target, readonly=True):
        assert restore("--overwrite")["error_code"] == "UserErrorDiskInUse"
    with held_open(target):
        assert restore("--overwrite")["error_code"] == "UserErrorDiskInUse"
    assert sha256_file(target) == kept
    assert not any(p.name.startswith(".") for p in restore_dir.iterdir())  # no partial file

    job = restore("--overwrite")
    assert job["status"] == "Completed", job
    assert sha256_file(target) == want
    assert job["restore"]["overwrite"] is True
    shown = cluster.coffer("job", "show", job["id"], json_out=False).stdout
    assert "Overwrite" in shown
    assert "yes" in shown
    assert "Bytes fetched" in shown
    assert "Bytes written" in shown


def test_a_mounted_device_target_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    rp = cluster.coffer("rp", "list", "spare-1")[-1]["id"]
    backing = build_image(tmp_path / "device.img", 40 * MiB, fill=0.1, seed=9).path
    node = cluster.agents["spare-1"].restore_dir / "device0"
    with mounted(backing):
        [device] = loop_devices_for(backing)
        rdev = os.stat(device).st_rdev
        os.mknod(node, stat.S_IFBLK | 0o600, rdev)
        try:
            job = cluster.coffer(
                "restore", "spare-1", "--rp", rp, "--disk", "root", "--target", str(node),
                "--overwrite", check=False,
            )  # fmt: skip
        finally:
            node.unlink()
    assert (job["status"], job["error_code"]) == ("Failed", "UserErrorDiskInUse"), job
    assert "is mounted at" in job["error_message"]


def test_a_configured_disk_is_never_a_restore_target(cluster: Cluster) -> None:
    # A VM whose disk lies in its own restore directory (add_agent makes restore-<vm>).
    disk = cluster.root / "restore-own-1" / "own-disk.img"
    disk.parent.mkdir()
    build_image(disk, 16 * MiB, fill=0.1, seed=10)
    cluster.add_agent("own-1", {"root": disk}, region="eu")
    rp = backed_up(cluster, "own-1")["recovery_point_id"]
    before = sha256_file(disk)
    argv = ("restore", "own-1", "--rp", rp, "--disk", "root", "--target", str(disk), "--overwrite")
    job = cluster.coffer(*argv, check=False)
    assert (job["status"], job["error_code"]) == ("Failed", "UserErrorRestoreTargetIsDisk")
    assert "--in-place" in job["error_message"]
    assert sha256_file(disk) == before
    assert cluster.coffer(*argv, json_out=False, check=False).returncode == 6


# --- to another VM ---------------------------------------------------------------------------


def test_restore_to_another_vm_of_the_region_and_not_of_another(
    cluster: Cluster, images: dict[str, Path]
) -> None:
    job = backed_up(cluster, "app-1")
    want = sha256_file(images["app-1"])
    target = cluster.agents["spare-1"].restore_dir / "from-app-1.img"
    restored = cluster.coffer(
        "restore", "app-1", "--rp", job["recovery_point_id"], "--disk", "root", "--target",
        str(target), "--target-vm", "spare-1",
    )  # fmt: skip
    assert restored["status"] == "Completed", restored
    assert sha256_file(target) == want
    assert restored["vm_id"] == "spare-1"
    info = restored["restore"]
    assert (info["source_vm_id"], info["target_vm_id"], info["mode"]) == (
        "app-1",
        "spare-1",
        "new-image",
    )
    assert info["bytes_fetched"] > 0
    assert info["bytes_written"] > 0
    shown = cluster.coffer("job", "show", restored["id"], json_out=False).stdout
    for text in ("Source VM", "app-1", "Target VM", "spare-1", str(target)):
        assert text in shown

    elsewhere = cluster.coffer(
        "restore", "app-1", "--rp", job["recovery_point_id"], "--disk", "root", "--target",
        "/tmp/x.img", "--target-vm", "far-1", json_out=False, check=False,
    )  # fmt: skip
    assert elsewhere.returncode == 5
    assert "UserErrorRestoreRegionMismatch" in elsewhere.stderr
    assert "'us'" in elsewhere.stderr
    assert "'eu'" in elsewhere.stderr
    assert cluster.coffer("job", "list", "--vm", "far-1") == []


# --- drills ----------------------------------------------------------------------------------


def drilling(cluster: Cluster) -> Path:
    """The eu vault drills on spare-1, in its restore directory's `drills`; that directory."""
    drills = cluster.agents["spare-1"].restore_dir / "drills"
    drills.mkdir(exist_ok=True)
    backed_up(cluster, "app-1")  # the vault exists
    cluster.coffer("vault", "update", "eu", "--drill-agent", "spare-1", "--drill-dir", str(drills))
    return drills


def test_drill_settings_are_checked(cluster: Cluster) -> None:
    backed_up(cluster, "app-1")
    drills = cluster.agents["spare-1"].restore_dir / "drills"
    drills.mkdir(exist_ok=True)

    def update(*args: str) -> subprocess.CompletedProcess[str]:
        result: subprocess.CompletedProcess[str] = cluster.coffer(
            "vault", "update", "eu", *args, json_out=False, check=False
        )
        return result

    far = update("--drill-agent", "far-1", "--drill-dir", "/tmp")
    assert (far.returncode, "UserErrorRestoreRegionMismatch" in far.stderr) == (5, True)
    outside = update("--drill-agent", "spare-1", "--drill-dir", "/etc")
    assert (outside.returncode, "UserErrorRestorePathNotAllowed" in outside.stderr) == (6, True)
    bad = update("--drill-agent", "spare-1", "--drill-dir", str(drills), "--drill-schedule", "x")
    assert bad.returncode == 2
    assert cluster.coffer("vault", "show", "eu")["drill"] is None  # nothing changed

    vault = cluster.coffer(
        "vault", "update", "eu", "--drill-agent", "spare-1", "--drill-dir", str(drills),
        "--drill-schedule", "weekly sun 04:00",
    )  # fmt: skip
    assert vault["drill"]["schedule"] == "weekly sun 04:00 tz=UTC"
    assert vault["drill"]["agent"] == "spare-1"
    assert vault["drill"]["next_at"] is not None
    shown = cluster.coffer("vault", "show", "eu", json_out=False).stdout
    assert "Restore drills: weekly on Sun at 04:00 UTC, on spare-1" in shown


def test_a_drill_passes_on_ext4_and_xfs_and_leaves_nothing_behind(cluster: Cluster) -> None:
    drills = drilling(cluster)
    points = {vm: backed_up(cluster, vm)["recovery_point_id"] for vm in ("app-1", "xfs-1")}
    jobs = cluster.coffer("drill", "--vault", "eu", "--vm", "app-1", "--vm", "xfs-1")
    assert {j["vm_id"]: j["status"] for j in jobs} == {"app-1": "Completed", "xfs-1": "Completed"}
    for found in jobs:
        assert found["operation"] == "RestoreDrill"
        assert found["recovery_point_id"] == points[found["vm_id"]]
        assert found["restore"]["target_vm_id"] == "spare-1"
        assert found["restore"]["bytes_written"] > 0
    assert list(drills.iterdir()) == []  # the scratch images are gone
    for vm, fstype in (("app-1", "ext4"), ("xfs-1", "xfs")):
        rp = next(p for p in cluster.coffer("rp", "list", vm) if p["id"] == points[vm])
        drill = rp["last_drill"]
        assert drill["outcome"] == "clean", drill
        assert f"root: {fstype} (whole disk) clean" in drill["summary"]
        assert drill["restore_seconds"] > 0
    listed = cluster.coffer("rp", "list", "app-1", json_out=False).stdout
    assert "clean at" in listed
    board = cluster.coffer("dashboard", "--vault", "eu")
    drilled = {d["vm_id"]: d for d in board["drills"]}
    assert drilled["app-1"]["drill"]["outcome"] == "clean"
    assert drilled["app-1"]["recovery_point_id"] == points["app-1"]
    shown = cluster.coffer("dashboard", "--vault", "eu", json_out=False).stdout
    assert "Restore drills" in shown


def test_a_drill_of_a_damaged_file_system_fails_with_the_checkers_words(
    cluster: Cluster,
) -> None:
    drills = drilling(cluster)
    rp = backed_up(cluster, "bad-1")["recovery_point_id"]
    done = cluster.coffer(
        "drill", "--vault", "eu", "--vm", "bad-1", "--json", json_out=False, check=False
    )
    assert done.returncode == 3  # the job failed
    job = json.loads(done.stdout)  # one job: shown as one
    assert (job["status"], job["error_code"]) == ("Failed", "RestoreDrillFailed"), job
    assert "root: ext4 (whole disk) damaged (e2fsck -fn exit 4)" in job["error_message"]
    assert "deleted/unused inode" in job["error_message"]  # e2fsck's own words
    shown = cluster.coffer("job", "show", job["id"], json_out=False).stdout
    assert "deleted/unused inode" in shown
    assert list(drills.iterdir()) == []
    point = next(p for p in cluster.coffer("rp", "list", "bad-1") if p["id"] == rp)
    assert point["last_drill"]["outcome"] == "damaged"
    assert point["last_drill"]["job_id"] == job["id"]
    board = {d["vm_id"]: d for d in cluster.coffer("dashboard", "--vault", "eu")["drills"]}
    assert board["bad-1"]["drill"]["outcome"] == "damaged"


def test_a_drill_checks_each_partition_of_a_gpt_disk(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A GPT disk with an ext4 and an XFS partition: each is checked on a read-only loop
    device of its own, mapped by offset and size; none is left attached."""
    gpt = build_gpt(tmp_path_factory.mktemp("gpt")).path
    cluster.add_agent("gpt-1", {"root": gpt}, region="eu")
    try:
        drills = drilling(cluster)
        rp = backed_up(cluster, "gpt-1")["recovery_point_id"]
        job = cluster.coffer("drill", "--vault", "eu", "--vm", "gpt-1")  # one job: shown as one
        assert job["status"] == "Completed", job
        assert job["details"]["checks"] == [
            "root: ext4 (partition 1) clean",
            "root: xfs (partition 2) clean",
        ]
        point = next(p for p in cluster.coffer("rp", "list", "gpt-1") if p["id"] == rp)
        assert point["last_drill"]["outcome"] == "clean", point["last_drill"]
        assert list(drills.iterdir()) == []
        attached = json.loads(run("losetup", "--list", "--json", "--output", "NAME,BACK-FILE"))
        assert not [
            d for d in attached.get("loopdevices", []) if str(drills) in (d["back-file"] or "")
        ]
    finally:
        cluster.agents["gpt-1"].process.stop()


# --- damaged chunks ----------------------------------------------------------------------------


def chunk_file(cluster: Cluster, vault: str, data: bytes) -> Path:
    """The datastore file of the chunk holding `data`, named by the vault's chunk hash."""
    hexed = cluster.open_datastore(vault).chunk_hash.digest(data).hex()
    return cluster.datastore(vault) / "chunks" / hexed[:2] / hexed[2:4] / hexed


def test_a_drill_or_rollback_that_meets_a_damaged_chunk_fails_with_exit_7_and_marks_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    """As a restore to an image does (tests/test_integrity_e2e.py): the job fails with
    DataCorrupted naming the recovery point, disk, chunk and digest, the chunk is marked bad
    and the recovery point damaged. The vault is a format-1 one (plain, as made before
    encryption), where a flipped byte of a stored chunk reaches the agent: the drill agent's
    check finds it and the controller reads it again before marking it. The rollback meets a
    chunk file that was deleted (the controller cannot read it)."""
    chunk_size = cluster.chunk_size
    image = tmp_path / "dmg-1.img"
    image.write_bytes(os.urandom(16 * chunk_size))  # random: each chunk is stored raw
    blocks = [image.read_bytes()[n * chunk_size : (n + 1) * chunk_size] for n in range(16)]
    cluster.add_agent("dmg-1", {"root": image}, region="dmg")
    try:
        LocalDirectoryStore(cluster.datastore("dmg-vault")).put(
            CONFIG_KEY, DatastoreConfig.plain(chunk_size).encode()
        )
        cluster.coffer("vault", "create", "dmg-vault", "--region", "dmg")
        assert cluster.coffer("vault", "show", "dmg-vault")["datastore_format"] == 1
        cluster.protect("dmg-1", "dmg-vault")
        rp = backed_up(cluster, "dmg-1")["recovery_point_id"]
        drills = cluster.agents["dmg-1"].restore_dir / "drills"
        drills.mkdir()
        cluster.coffer(
            "vault", "update", "dmg-vault", "--drill-agent", "dmg-1", "--drill-dir", str(drills)
        )

        flipped = chunk_file(cluster, "dmg-vault", blocks[5])
        blob = bytearray(flipped.read_bytes())
        blob[1000] ^= 0xFF  # in the payload of a chunk stored raw
        flipped.write_bytes(bytes(blob))
        done = cluster.coffer("drill", "--vault", "dmg-vault", "--json", json_out=False,
                              check=False)  # fmt: skip
        assert done.returncode == 7, (done.stdout, done.stderr)
        job = json.loads(done.stdout)
        assert (job["status"], job["error_code"]) == ("Failed", "DataCorrupted"), job
        for words in (rp, "'root'", "chunk 5 ", flipped.name):
            assert words in job["error_message"], job["error_message"]
        assert list(drills.iterdir()) == []  # no scratch image left
        point = next(p for p in cluster.coffer("rp", "list", "dmg-1") if p["id"] == rp)
        assert point["last_drill"]["outcome"] == "failed"
        assert point["verification"] == "damaged"
        assert [(int(d["chunk"]), d["digest"]) for d in point["damage"]] == [(5, flipped.name)]

        # The disk changed in block 2 only: the rollback fetches that chunk, which is gone.
        with image.open("r+b") as disk:
            disk.seek(2 * chunk_size)
            disk.write(os.urandom(chunk_size))
        deleted = chunk_file(cluster, "dmg-vault", blocks[2])
        deleted.unlink()
        done = cluster.coffer(
            "restore", "dmg-1", "--rp", rp, "--disk", "root", "--in-place", "--yes", "--json",
            json_out=False, check=False,
        )  # fmt: skip
        assert done.returncode == 7, (done.stdout, done.stderr)
        job = json.loads(done.stdout)
        assert job["error_code"] == "DataCorrupted", job
        for words in (rp, "'root'", "chunk 2 ", deleted.name, "missing", "coffer verify"):
            assert words in job["error_message"], job["error_message"]
        point = next(p for p in cluster.coffer("rp", "list", "dmg-1") if p["id"] == rp)
        assert point["damaged_chunks"] == 2
        board = cluster.coffer("dashboard", "--vault", "dmg-vault")
        assert (board["recovery_points_damaged"], board["bad_chunks"]) == (1, 2)
    finally:
        cluster.agents["dmg-1"].process.stop()
