"""End to end: real controller, real agents, real Mosquitto, real ext4 disk images.

Two VMs are backed up, changed inside their file systems, backed up again and restored; the
restored disks must be byte-identical to the source. A controller restart between backups
must lose nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bench.image import build_image, mounted
from tests.cluster import Cluster, free_port, sha256_file

MiB = 1 << 20
DISK_SIZE = 96 * MiB

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(300)]


def change_files(image: Path, nbytes: int, seed: int) -> None:
    """Write `nbytes` of new random data into a file inside the image's ext4 file system."""
    with mounted(image) as root:
        (root / f"changed-{seed}.bin").write_bytes(os.urandom(nbytes))
        os.sync()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    return {
        vm: build_image(root / f"{vm}.img", DISK_SIZE, fill=0.5, seed=seed).path
        for seed, vm in enumerate(("web-1", "db-1"), start=1)
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, images: dict[str, Path]) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster")) as running:
        running.add_agent("web-1", {"root": images["web-1"]}, service="shop", region="eu")
        running.add_agent("db-1", {"root": images["db-1"]}, service="shop", region="eu")
        yield running


def test_agents_report_their_disks(cluster: Cluster) -> None:
    agents = {a["vm_id"]: a for a in cluster.coffer("agents")}
    assert agents["web-1"]["online"]
    assert agents["db-1"]["online"]
    assert agents["web-1"]["service"] == "shop"
    assert agents["web-1"]["region"] == "eu"
    assert [(d["name"], int(d["size_bytes"])) for d in agents["web-1"]["disks"]] == [
        ("root", DISK_SIZE)
    ]


def test_full_backup_incremental_and_restore(cluster: Cluster, images: dict[str, Path]) -> None:
    image = images["web-1"]
    full = cluster.backup("web-1")
    assert full["status"] == "Completed", full
    assert full["recovery_point_id"]
    # Holes are never read: the full backup reads about what the file system holds.
    assert int(full["bytes_read"]) < DISK_SIZE * 0.8
    assert int(full["bytes_stored"]) > 0

    changed = 4 * MiB
    change_files(image, changed, seed=1)
    source = sha256_file(image)
    incremental = cluster.backup("web-1")
    assert incremental["status"] == "Completed", incremental
    sent = int(incremental["bytes_sent"])
    # Random data does not compress: what changed is sent, plus the metadata and journal blocks
    # ext4 wrote, rounded up to whole chunks. Nowhere near the disk.
    assert changed <= sent <= changed + 6 * MiB, sent

    points = cluster.coffer("rp", "list", "web-1")
    assert [p["id"] for p in points][-2:] == [
        full["recovery_point_id"],
        incremental["recovery_point_id"],
    ]
    target = cluster.agents["web-1"].restore_dir / "web-1-root.img"
    restored = cluster.restore("web-1", incremental["recovery_point_id"], "root", target)
    assert restored["status"] == "Completed", restored
    assert sha256_file(target) == source
    # Zero regions stay holes: the restored image is sparse.
    assert os.stat(target).st_blocks * 512 < DISK_SIZE


def test_two_agents_back_up_side_by_side(cluster: Cluster, images: dict[str, Path]) -> None:
    for vm in ("web-1", "db-1"):
        cluster.protect(vm)
    jobs = {vm: cluster.coffer("backup-now", vm, "--no-wait")[0] for vm in ("web-1", "db-1")}
    finished = {vm: cluster.coffer("job", "watch", job["id"]) for vm, job in jobs.items()}
    assert {vm: job["status"] for vm, job in finished.items()} == {
        "web-1": "Completed",
        "db-1": "Completed",
    }
    target = cluster.agents["db-1"].restore_dir / "db-1.img"
    cluster.restore("db-1", finished["db-1"]["recovery_point_id"], "root", target)
    assert sha256_file(target) == sha256_file(images["db-1"])


def test_job_list_filters(cluster: Cluster) -> None:
    cluster.backup("db-1")
    backups = cluster.coffer("job", "list", "--operation", "Backup", "--vm", "db-1")
    assert backups
    assert {j["operation"] for j in backups} == {"Backup"}
    assert {j["vm_id"] for j in backups} == {"db-1"}
    assert cluster.coffer("job", "list", "--status", "Cancelled") == []
    shown = cluster.coffer("job", "show", backups[0]["id"])
    assert shown["id"] == backups[0]["id"]
    assert shown["status"] == "Completed"


def test_restore_outside_restore_dirs_is_refused(cluster: Cluster) -> None:
    rp = cluster.coffer("rp", "list", "web-1")[-1]["id"]
    result = cluster.coffer(
        "restore", "web-1", "--rp", rp, "--disk", "root", "--target", "/etc/coffer-evil.img",
        check=False,
    )  # fmt: skip
    assert result is not None
    assert result["status"] == "Failed"
    assert result["error_code"] == "UserErrorRestorePathNotAllowed"
    assert not Path("/etc/coffer-evil.img").exists()


def test_restore_does_not_follow_links_planted_in_a_restore_dir(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A user of the VM links a name in the restore directory elsewhere: nothing lands there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    restore_dir = cluster.agents["web-1"].restore_dir
    (restore_dir / "linked-dir").symlink_to(outside)
    rp = cluster.coffer("rp", "list", "web-1")[-1]["id"]
    for target in (restore_dir / "linked-dir" / "x.img", restore_dir / "x" / ".." / "y.img"):
        job = cluster.coffer(
            "restore", "web-1", "--rp", rp, "--disk", "root", "--target", str(target),
            check=False,
        )  # fmt: skip
        assert job["status"] == "Failed"
        assert job["error_code"] in (
            "UserErrorRestoreTargetFailed",
            "UserErrorRestorePathNotAllowed",
        )
    assert list(outside.iterdir()) == []
    assert not any(p.name.startswith(".") for p in restore_dir.iterdir())  # no partial file left


def test_a_disk_attached_after_the_agent_started_is_backed_up(
    cluster: Cluster, tmp_path: Path
) -> None:
    late = tmp_path / "late.img"
    cluster.add_agent("late-1", {"root": late})  # the disk is not there yet
    build_image(late, 64 * MiB, fill=0.3, seed=11)
    job = cluster.backup("late-1")
    assert job["status"] == "Completed", job
    target = cluster.agents["late-1"].restore_dir / "late.img"
    cluster.restore("late-1", job["recovery_point_id"], "root", target)
    assert sha256_file(target) == sha256_file(late)


def test_unknown_vm_and_disk_are_clear_errors(cluster: Cluster) -> None:
    missing = cluster.coffer("backup-now", "no-such-vm", json_out=False, check=False)
    assert missing.returncode == 4
    assert "VmNotFound" in missing.stderr
    cluster.protect("web-1")
    disk = cluster.coffer("backup-now", "web-1", "--disk", "data", json_out=False, check=False)
    assert disk.returncode == 4
    assert "has no disk named 'data'" in disk.stderr


def test_controller_restart_keeps_everything(tmp_path: Path) -> None:
    image = build_image(tmp_path / "app.img", 64 * MiB, fill=0.5, seed=7).path
    with Cluster(tmp_path / "cluster") as cluster:
        cluster.add_agent("app-1", {"root": image})
        first = cluster.backup("app-1")
        assert first["status"] == "Completed"

        cluster.stop_controller()
        change_files(image, 2 * MiB, seed=2)
        cluster.start_controller()
        # The agent reconnects by itself, with backoff.
        cluster.wait_online("app-1", timeout=60)

        assert [p["id"] for p in cluster.coffer("rp", "list", "app-1")] == [
            first["recovery_point_id"]
        ]
        assert cluster.coffer("job", "show", first["id"])["status"] == "Completed"
        second = cluster.backup("app-1")
        assert second["status"] == "Completed"
        # Still incremental against the recovery point taken before the restart.
        assert int(second["bytes_sent"]) < 8 * MiB
        target = cluster.agents["app-1"].restore_dir / "app.img"
        cluster.restore("app-1", second["recovery_point_id"], "root", target)
        assert sha256_file(target) == sha256_file(image)


def test_backups_complete_without_a_broker(tmp_path: Path) -> None:
    """MQTT carries status only: with the broker unreachable, backups still run."""
    image = build_image(tmp_path / "nobroker.img", 64 * MiB, fill=0.3, seed=9).path
    closed_port = f"127.0.0.1:{free_port()}"  # nothing listens there
    with Cluster(tmp_path / "cluster", mqtt=closed_port) as cluster:
        cluster.add_agent("lonely-1", {"root": image})
        job = cluster.backup("lonely-1")
        assert job["status"] == "Completed"
        assert cluster.coffer("rp", "list", "lonely-1")[0]["id"] == job["recovery_point_id"]
