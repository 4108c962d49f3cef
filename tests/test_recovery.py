"""A controller recovered from its storage alone, and soft delete, with real processes.

The controller, agents and CLI are real processes (tests/cluster.py); the datastores live on a
SeaweedFS S3 server the tests start, or in a directory outside the controller's state
directory, and the master key file is kept apart from it. Three VMs are backed up (one with a
policy of its own, two backups, verified); the third's data is deleted: it is listed as
deleted, cannot be restored, and a garbage collection with no grace period spares its chunks.
Then the controller's whole state directory is deleted, and `coffer-controller recover`
rebuilds it from the storage and the key: the vaults, policies, VMs, recovery points (with
their labels and verification) and the deleted point are as they were, the items stopped
until they are resumed. After resuming, both VMs restore byte-identical and back up again, and
the deleted point is undeleted and restores byte-identical too.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from controller.datastore import MasterKey
from tests.bench.image import build_image, copy_image, mounted
from tests.cluster import BIN, CliError, Cluster, sha256_file
from tests.seaweed import SeaweedFS
from tests.test_encrypted_vaults import s3_config

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(600)]

MiB = 1 << 20
DISK_SIZE = 32 * MiB
VAULT = "eu"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recovery-images")
    built = {
        vm: build_image(root / f"{vm}.img", DISK_SIZE, fill=0.4, seed=seed).path
        for seed, vm in enumerate(("web-1", "db-1"), start=21)
    }
    # A disk of its own random bytes: no chunk it has is shared with the other two.
    old = root / "old-1.img"
    old.write_bytes(random.Random(f"old-{os.getpid()}").randbytes(4 * MiB))
    built["old-1"] = old
    return built


def recover_command(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "coffer-controller"), "recover", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def settled(cluster: Cluster) -> None:
    """Until no job runs (the verifies new points start, the prunes after backups)."""
    deadline = time.monotonic() + 120
    while cluster.coffer("job", "list", "--status", "InProgress"):
        assert time.monotonic() < deadline, "jobs still running"
        time.sleep(0.2)


def seen(cluster: Cluster) -> dict[str, Any]:
    """What an operator sees of the vault: settings, policies, items, VMs, points."""
    vault = cluster.coffer("vault", "show", VAULT)
    return {
        "vault": {
            key: vault[key]
            for key in (
                "name", "region", "chunk_size", "max_concurrent_backups", "verify_new",
                "reverify_days", "datastore", "datastore_format", "encryption",
                "soft_delete_days", "deleted_recovery_points", "recovery_points",
                "registered_items", "shared_dedup", "full_read_days",
            )
            if key in vault
        },
        "policies": [
            (p["name"], p["spec"], sorted(p["vms"]))
            for p in cluster.coffer("policy", "list", "--vault", VAULT)
        ],
        "items": {i["vm_id"]: i["policy"] for i in cluster.coffer("items", "--vault", VAULT)},
        "vms": sorted(
            (a["vm_id"], a["name"], a["service"], a["region"]) for a in cluster.coffer("agents")
        ),
        "points": [
            {
                key: p.get(key)
                for key in (
                    "id", "vm_id", "vault", "created_at", "consistency", "disks", "job_id",
                    "bytes_stored", "kept_by", "data_bytes", "verification", "verified_at",
                )
            }
            for p in cluster.coffer("rp", "list", "--vault", VAULT)
        ],
        "deleted": cluster.coffer("rp", "list", "--deleted", "--vault", VAULT),
    }  # fmt: skip


def states(cluster: Cluster) -> dict[str, str]:
    return {i["vm_id"]: i["state"] for i in cluster.coffer("items", "--vault", VAULT)}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_controller_recovered_from_its_storage_alone_restores_every_vm(
    where: str, images: dict[str, Path], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    kept = tmp_path / "kept-offline"
    kept.mkdir()
    key_file = kept / "master.key"
    MasterKey.create_file(key_file)
    config = "gc_grace_seconds = 0\n"
    if where == "s3":
        server: SeaweedFS = request.getfixturevalue("seaweedfs")
        config += s3_config(server, f"recover-{os.getpid()}-{tmp_path.name}")
    else:
        config += f'[datastore]\nurl = "{tmp_path / "datastores"}"\n'
    config += f'[encryption]\nmaster_key_file = "{key_file}"\n'
    disks = {vm: tmp_path / f"{vm}.img" for vm in images}
    for vm, image in images.items():
        copy_image(image, disks[vm])

    with Cluster(tmp_path / "cluster", config=config) as cluster:
        for vm, service in (("web-1", "shop"), ("db-1", "shop"), ("old-1", "legacy")):
            cluster.add_agent(vm, {"root": disks[vm]}, service=service, region=VAULT)
        cluster.coffer("vault", "create", VAULT, "--region", VAULT)
        cluster.coffer(
            "vault", "update", VAULT, "--soft-delete-days", "7", "--verify-new", "on",
            "--reverify-days", "30", "--shared-dedup", "on",
        )  # fmt: skip
        cluster.coffer("register", "--vault", VAULT, "web-1", "db-1", "old-1")
        cluster.coffer(
            "protect", "--vault", VAULT, "web-1", "--new-policy", "Gold",
            "--schedule", "daily 20:00", "--daily", "7", "--weekly", "sun:4",
        )  # fmt: skip
        cluster.coffer("protect", "--vault", VAULT, "db-1", "old-1")

        for vm in ("web-1", "db-1", "old-1"):
            assert cluster.backup(vm)["status"] == "Completed"
        with mounted(disks["web-1"]) as root:
            (root / "changed.bin").write_bytes(os.urandom(2 * MiB))
            os.sync()
        assert cluster.backup("web-1")["status"] == "Completed"
        sums = {vm: sha256_file(disk) for vm, disk in disks.items()}
        settled(cluster)
        [old_point] = [p["id"] for p in cluster.coffer("rp", "list", "old-1")]

        # Deleting old-1's data keeps it, deleted: listed, not restorable, its chunks kept.
        cluster.coffer("stop-protection", "--vault", VAULT, "old-1", "--delete-data", "--yes")
        [deleted] = cluster.coffer("rp", "list", "--deleted", "old-1")
        assert deleted["id"] == old_point
        purge_in = _seconds(deleted["purge_at"]) - _seconds(deleted["deleted_at"])
        assert purge_in == pytest.approx(7 * 86400, abs=1)
        assert cluster.coffer("rp", "list", "old-1") == []
        target = cluster.agents["old-1"].restore_dir / "old-1.img"
        with pytest.raises(CliError) as refused:
            cluster.restore("old-1", old_point, "root", target)
        said = refused.value.result.stderr
        assert refused.value.result.returncode == 4
        assert "RecoveryPointDeleted" in said
        assert f"`coffer undelete legacy/old-1 --rp {old_point}`" in said
        collected = cluster.coffer("gc", "--vault", VAULT)
        report = collected["details"]["report"]
        assert report["deleted_recovery_points"] == 1
        assert report["recovery_points"] == 3
        before = seen(cluster)
        assert before["vault"]["deleted_recovery_points"] == 1
        assert {p["verification"] for p in before["points"]} == {"verified"}
        assert any(p["kept_by"] for p in before["points"])

        # The machine is lost: the controller stops and its state directory goes. The master
        # key was kept offline; the PKI directory is kept too, or every agent would enrol again.
        cluster.stop_controller()
        shutil.rmtree(cluster.root / "state")

        recovered = recover_command(cluster.root / "controller.toml")
        assert recovered.returncode == 0, recovered.stderr + recovered.stdout
        assert f"vault {VAULT} (region {VAULT}, encrypted)" in recovered.stdout
        assert "recovery points: 4" not in recovered.stdout  # live ones: 3
        assert "recovery points: 3, deleted (recoverable): 1" in recovered.stdout
        again = recover_command(cluster.root / "controller.toml")
        assert again.returncode == 5, again.stderr
        assert "already has a catalog" in again.stderr

        cluster.start_controller()
        for vm in disks:
            cluster.wait_online(vm, timeout=90)
        after = seen(cluster)
        for key in before:  # one key at a time: a readable difference
            assert (key, after[key]) == (key, before[key])
        assert states(cluster) == {
            "web-1": "ProtectionStopped",
            "db-1": "ProtectionStopped",
            "old-1": "Registered",
        }

        # Resumed, each with its own policy; both restore byte-identical and back up again.
        cluster.coffer("resume-protection", "--vault", VAULT, "web-1", "db-1")
        assert states(cluster)["web-1"] == "Protected"
        assert after["items"]["web-1"] == "Gold"
        for vm in ("web-1", "db-1"):
            latest = cluster.coffer("rp", "list", vm)[-1]["id"]
            out = cluster.agents[vm].restore_dir / f"{vm}.img"
            assert cluster.restore(vm, latest, "root", out)["status"] == "Completed"
            assert sha256_file(out) == sums[vm]
        with mounted(disks["db-1"]) as root:
            (root / "after-recovery.bin").write_bytes(os.urandom(1 * MiB))
            os.sync()
        incremental = cluster.backup("db-1")
        assert incremental["status"] == "Completed", incremental
        assert int(incremental["bytes_sent"]) < 8 * MiB  # the previous point's index held

        # The deleted point came through the recovery and comes back whole.
        undeleted = cluster.coffer("undelete", "old-1")
        assert undeleted["status"] == "Completed", undeleted
        assert states(cluster)["old-1"] == "ProtectionStopped"
        assert cluster.restore("old-1", old_point, "root", target)["status"] == "Completed"
        assert sha256_file(target) == sums["old-1"]
        assert cluster.coffer("rp", "list", "--deleted", "--vault", VAULT) == []


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()
