"""`coffer vault upgrade` through the real controller, agents and CLI, killed along the way.

A vault whose datastore is format 1 (as Coffer wrote before encryption at rest) holds recovery
points of two VMs, verified and labelled by retention. Its upgrade is stopped at several points
(the controller's test hook `COFFER_TEST_UPGRADE_PAUSE` holds it there) and the real controller
process is killed there with SIGKILL, then started again; the upgrade goes on by itself. While
it is held, every recovery point restores byte-identical, a backup goes to the new format (read
in full: its base is not converted yet), a garbage collection, a prune and a delete of a VM's
data run. At the end every recovery point is in format 2 with its consistency, retention labels
and verification state, restores byte-identical, and the format-1 chunks are gone. A dry run
says what an upgrade would rewrite; a controller refuses a vault of a newer format, naming it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from controller.datastore import CONFIG_KEY, DatastoreConfig, LocalDirectoryStore
from controller.datastore.encrypted import ENVELOPE_MAGIC
from controller.upgrades import PAUSE_ENV
from tests.cluster import Cluster

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(900)]

MiB = 1 << 20
CHUNK = 64 << 10
VAULT = "legacy"


DISK = 8 * MiB


def make_disk(path: Path, seed: int) -> None:
    """8 MiB (128 chunks): text, random bytes, zeros."""
    rng = random.Random(seed)
    text = b"".join(f"line {n} of vm {seed}\n".encode() for n in range(120000))[: 2 * MiB + 300]
    path.write_bytes(text + rng.randbytes(4 * MiB) + bytes(2 * MiB - 300))


def change(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("r+b") as disk:
        for _ in range(6):
            disk.seek(rng.randrange(0, DISK - 70000))
            disk.write(rng.randbytes(70000))


def plain_format_1(cluster: Cluster, vault: str) -> None:
    """Make `vault`'s datastore format 1 before the controller creates it, as a vault made
    before encryption at rest has."""
    LocalDirectoryStore(cluster.datastore(vault)).put(
        CONFIG_KEY, DatastoreConfig.plain(cluster.chunk_size).encode()
    )


def kill(cluster: Cluster) -> None:
    """SIGKILL the real controller process: no shutdown of any kind."""
    assert cluster.controller.alive()
    cluster.controller.stop(signal.SIGKILL)


def held_at(cluster: Cluster, point: str) -> None:
    """Start the controller with the upgrade to stop at `point`, and wait until it is there."""
    cluster.start_controller({PAUSE_ENV: point})
    cluster.controller.wait_for_line(f"vault upgrade paused at {point}", timeout=120)


def restore_all(cluster: Cluster, images: dict[str, bytes], tag: str) -> None:
    """Every recovery point restores byte-identical (the agents dial again after a restart)."""
    for agent in cluster.agents.values():
        if agent.process.alive():
            cluster.wait_online(agent.vm_id, timeout=60)
    for rp_id, image in images.items():
        vm = next(p["vm_id"] for p in points(cluster) if p["id"] == rp_id)
        target = cluster.agents[vm].restore_dir / f"{tag}-{rp_id}.img"
        job = cluster.restore(vm, rp_id, "root", target)
        assert job["status"] == "Completed", job
        assert target.read_bytes() == image, (tag, rp_id)
        target.unlink()


def points(cluster: Cluster) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = cluster.coffer("rp", "list", "--vault", VAULT)
    return listed


def upgrade_jobs(cluster: Cluster) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = cluster.coffer(
        "job", "list", "--vault", VAULT, "--operation", "VaultUpgrade"
    )
    return [job for job in jobs if not job["details"].get("dry_run")]


def wait_for_job(cluster: Cluster, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = cluster.coffer("job", "show", job_id)
        if job["status"] not in ("InProgress", "Cancelling"):
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not end")


def test_an_upgrade_killed_at_every_step_goes_on_and_keeps_every_recovery_point(
    tmp_path: Path,
) -> None:
    disks = {vm: tmp_path / f"{vm}.img" for vm in ("old-1", "old-2")}
    for n, path in enumerate(disks.values()):
        make_disk(path, n)
    images: dict[str, bytes] = {}
    with Cluster(
        tmp_path / "cluster", chunk_size=CHUNK, config="gc_grace_seconds = 0\n"
    ) as cluster:
        plain_format_1(cluster, VAULT)
        for vm, path in disks.items():
            cluster.add_agent(vm, {"root": path}, region="west")
            cluster.protect(vm, vault=VAULT)
        # One recovery point of old-2, then three of old-1: the upgrade converts the newest
        # first, so old-2's is not being converted when its data is deleted (below).
        other = cluster.backup("old-2")
        images[other["recovery_point_id"]] = disks["old-2"].read_bytes()
        for round_ in range(3):
            job = cluster.backup("old-1")
            assert job["status"] == "Completed", job
            images[job["recovery_point_id"]] = disks["old-1"].read_bytes()
            change(disks["old-1"], round_)
        assert cluster.coffer("vault", "show", VAULT)["datastore_format"] == 1
        verify = cluster.coffer("verify", "--vault", VAULT)
        assert verify["status"] == "Completed", verify
        before = {p["id"]: p for p in points(cluster)}
        assert {p["verification"] for p in before.values()} == {"verified"}
        plain_chunks = {p for p in (cluster.datastore(VAULT) / "chunks").rglob("*") if p.is_file()}

        # The dry run: what would be rewritten, roughly how long it would take; nothing changes.
        dry = cluster.coffer("vault", "upgrade", VAULT, "--dry-run")
        assert dry["status"] == "Completed", dry
        plan = dry["details"]["plan"]
        assert plan["recovery_points"] == 4
        assert plan["chunks"] == len(plain_chunks)
        assert plan["stored_bytes"] == sum(p.stat().st_size for p in plain_chunks)
        assert plan["rate_mb_per_second"] > 0
        assert plan["estimated_seconds"] >= 0
        said = cluster.coffer("vault", "upgrade", VAULT, "--dry-run", json_out=False)
        assert "the upgrade would rewrite 4 recovery points" in said.stdout
        assert cluster.coffer("vault", "show", VAULT)["datastore_format"] == 1

        # 1. Held just after the switch: the format-1 objects moved aside, nothing converted.
        cluster.stop_controller()
        cluster.start_controller({PAUSE_ENV: "switched"})
        started = cluster.coffer("vault", "upgrade", VAULT, "--no-wait")
        assert started["operation"] == "VaultUpgrade"
        cluster.controller.wait_for_line("vault upgrade paused at switched", timeout=60)
        shown = cluster.coffer("vault", "show", VAULT)
        assert (shown["datastore_format"], shown["upgrading_from_format"]) == (2, 1)
        assert shown["points_in_old_format"] == 4
        restore_all(cluster, images, "switched")
        # A backup now goes to format 2, read in full: its base is not converted yet.
        change(disks["old-1"], 10)
        during = cluster.backup("old-1")
        assert during["status"] == "Completed", during
        assert "is not converted to the vault's new format yet" in during["details"]["base"]
        images[during["recovery_point_id"]] = disks["old-1"].read_bytes()
        kill(cluster)

        # 2. Killed, started again: the upgrade goes on by itself; held after 10 objects.
        held_at(cluster, "objects:10")
        resumed = [j for j in upgrade_jobs(cluster) if j["status"] == "InProgress"]
        assert len(resumed) == 1
        assert resumed[0]["details"]["resumed_from"] == started["id"]
        interrupted = cluster.coffer("job", "show", started["id"])
        assert (interrupted["status"], interrupted["error_code"]) == (
            "Failed",
            "ControllerRestarted",
        )
        restore_all(cluster, images, "objects-10")
        # Garbage collection, a prune and a VM's data deleted, beside the held upgrade.
        gc = cluster.coffer("gc", "--vault", VAULT)
        assert gc["status"] == "Completed", gc
        assert gc["details"]["report"]["chunks_deleted"] == 0
        assert cluster.coffer("prune", "--vault", VAULT)["status"] == "Completed"
        # Deleted data cannot be kept recoverable in format 1: refused (nothing changes) while
        # the VM's points are not converted, deleted at once without soft delete.
        jobs = cluster.coffer("stop-protection", "--vault", VAULT, "--delete-data", "--yes",
                              "old-2", check=False)  # fmt: skip
        [kept] = [job for job in jobs if job["operation"] == "DeleteBackupData"]
        assert (kept["status"], kept["error_code"]) == ("Failed", "Conflict"), jobs
        assert "still in format 1" in kept["error_message"], kept
        assert other["recovery_point_id"] in {
            p["id"] for p in cluster.coffer("rp", "list", "old-2")
        }
        cluster.coffer("vault", "update", VAULT, "--soft-delete-days", "0")
        deleted = cluster.coffer("stop-protection", "--vault", VAULT, "--delete-data", "--yes",
                                 "old-2")  # fmt: skip
        assert all(j["status"] == "Completed" for j in deleted), deleted
        images.pop(other["recovery_point_id"])
        restore_all(cluster, images, "objects-10-after-gc")
        kill(cluster)

        # 3. Held further along (chunks converted beside the held one count as converted
        # before: not written again), then killed again.
        held_at(cluster, "objects:20")
        restore_all(cluster, images, "objects-20")
        kill(cluster)

        # 4. Every point converted, the format-1 part still there; killed.
        held_at(cluster, "finishing")
        assert cluster.coffer("vault", "show", VAULT)["points_in_old_format"] == 0
        restore_all(cluster, images, "finishing")
        kill(cluster)

        # 5. The datastore plain format 2, the catalog not yet told; killed.
        held_at(cluster, "finished")
        document = json.loads((cluster.datastore(VAULT) / CONFIG_KEY).read_text())
        assert (document["format"], document["hash"]) == (2, "blake3-keyed")
        kill(cluster)

        # 6. Started without a hold: the upgrade ends, then a garbage collection.
        cluster.start_controller()
        last = upgrade_jobs(cluster)[0]  # the newest: the one this start took up
        assert last["details"]["resumed_from"]
        done = wait_for_job(cluster, last["id"])
        assert done["status"] == "Completed", done
        shown = cluster.coffer("vault", "show", VAULT)
        assert (shown["datastore_format"], shown["encryption"]) == (2, "aes-256-gcm")
        assert shown["upgrading_from_format"] == 0
        collections = cluster.coffer(
            "job", "list", "--vault", VAULT, "--operation", "GarbageCollection"
        )
        wait_for_job(cluster, collections[0]["id"])
        # Every recovery point kept, with its consistency, retention labels and verification.
        after = {p["id"]: p for p in points(cluster)}
        assert set(after) == set(images)
        for rp_id, point in after.items():
            if rp_id in before:
                for key in ("created_at", "consistency", "kept_by", "verification",
                            "verified_at", "disks", "job_id"):  # fmt: skip
                    assert point[key] == before[rp_id][key], (rp_id, key)
        restore_all(cluster, images, "upgraded")
        # The storage: format-1 chunks reclaimed, everything sealed but datastore.json.
        stored = [p for p in cluster.datastore(VAULT).rglob("*") if p.is_file()]
        assert not plain_chunks & set(stored)
        for path in stored:
            if path.name != CONFIG_KEY and not path.name.startswith("."):
                assert path.read_bytes().startswith(ENVELOPE_MAGIC), path
        assert not (cluster.datastore(VAULT) / "format1").exists() or not any(
            p.is_file() for p in (cluster.datastore(VAULT) / "format1").rglob("*")
        )
        # A verify of the upgraded vault finds every point whole; a backup is incremental.
        assert cluster.coffer("verify", "--vault", VAULT)["status"] == "Completed"
        change(disks["old-1"], 20)
        incremental = cluster.backup("old-1")
        assert "base" not in incremental["details"]
        assert incremental["bytes_sent"] < DISK // 4  # the changed chunks only
        # Nothing more to upgrade: refused, exit 5.
        again = cluster.coffer("vault", "upgrade", VAULT, check=False, json_out=False)
        assert again.returncode == 5, again.stderr
        assert "nothing to upgrade" in again.stderr


def test_a_cancelled_upgrade_waits_to_be_run_again_and_a_newer_format_is_refused(
    tmp_path: Path,
) -> None:
    disk = tmp_path / "disk.img"
    make_disk(disk, 7)
    with Cluster(tmp_path / "cluster", chunk_size=CHUNK) as cluster:
        plain_format_1(cluster, VAULT)
        cluster.add_agent("old-1", {"root": disk}, region="west")
        cluster.protect("old-1", vault=VAULT)
        backup = cluster.backup("old-1")
        image = disk.read_bytes()
        cluster.stop_controller()
        held_at_objects = "objects:3"
        cluster.start_controller({PAUSE_ENV: held_at_objects})
        started = cluster.coffer("vault", "upgrade", VAULT, "--no-wait")
        cluster.controller.wait_for_line(f"vault upgrade paused at {held_at_objects}", timeout=60)
        cancelled = cluster.coffer("job", "cancel", started["id"])
        assert cancelled["status"] == "Cancelled", cancelled
        assert "stay readable in the old format" in cancelled["error_message"]
        # Not taken up at the next start: it waits for the operator.
        cluster.stop_controller()
        cluster.start_controller()
        assert not [j for j in upgrade_jobs(cluster) if j["status"] == "InProgress"]
        assert cluster.coffer("vault", "show", VAULT)["points_in_old_format"] == 1
        restore_all(cluster, {backup["recovery_point_id"]: image}, "cancelled")
        done = cluster.coffer("vault", "upgrade", VAULT)
        assert done["status"] == "Completed", done
        assert done["details"]["upgrade"]["recovery_points_converted"] == 1
        restore_all(cluster, {backup["recovery_point_id"]: image}, "upgraded")

        # A vault written by a newer Coffer: the controller refuses to start, naming the format.
        cluster.stop_controller()
        newer = cluster.datastore(VAULT) / CONFIG_KEY
        document = json.loads(newer.read_text())
        document["format"] = 3
        newer.write_text(json.dumps(document))
        refused = cluster.controller
        refused.log.write_text("")
        refused.start(env=dict(os.environ))
        assert refused.popen is not None
        assert refused.popen.wait(60) == 7
        assert "datastore has format version 3; this Coffer reads up to version 2" in (
            refused.log.read_text()
        )
