"""The Coffer demo: the vault workflow from discovery to a verified restore.

Run as root (it loop-mounts the disk images): `python -m tests.demo [--workdir DIR] [--keep]`.
Everything runs on this machine, on loopback: the controller with its private Mosquitto, three
agents (two in region eu-west, one in us-east), each with a disk image holding a real ext4
file system. The operator creates a vault, discovers, registers and protects the VMs, takes
the initial backups, changes files, backs up again, reads the jobs and the dashboard, and
restores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.image import build_image, mounted
from tests.cluster import Cluster, sha256_file

MiB = 1 << 20


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(cluster: Cluster, *args: str) -> None:
    """Run the real CLI, its output as the operator sees it."""
    print(f"$ coffer {' '.join(args)}", flush=True)
    result = cluster.coffer(*args, json_out=False, check=True)
    sys.stdout.write(result.stdout)
    sys.stdout.flush()


def mib(value: str | int) -> str:
    return f"{int(value) / MiB:.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", type=Path, help="where to put everything (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="leave the work directory behind")
    parser.add_argument("--disk-mib", type=int, default=256, help="size of each VM's disk")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the demo loop-mounts disk images: run it as root", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="coffer-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        run(workdir, args.disk_mib * MiB)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"\n(work directory kept: {workdir})")
    return 0


def run(workdir: Path, disk_size: int) -> None:
    step(f"Building three VM disks ({mib(disk_size)} each, ext4, about 60% full of files)")
    vms = {"web-1": "eu-west", "db-1": "eu-west", "report-1": "us-east"}
    images: dict[str, Path] = {}
    for seed, vm in enumerate(vms, start=1):
        info = build_image(workdir / f"{vm}.img", disk_size, fill=0.6, seed=seed)
        images[vm] = info.path
        print(f"  {vm}: {info.files} files, {mib(info.used_bytes)} used in the file system")

    step("Starting the controller (with its private Mosquitto) and a certificate authority")
    with Cluster(workdir / "coffer") as cluster:
        print(f"  controller on 127.0.0.1:{cluster.port}; CA and certificates in {cluster.pki}")
        step("Starting one agent per VM: they dial out to the controller over mutual TLS")
        for vm, image in images.items():
            cluster.add_agent(vm, {"root": image}, service="shop", region=vms[vm])
        show(cluster, "agents")

        step("Creating a vault for region eu-west (it starts with a default policy)")
        show(cluster, "vault", "create", "eu-vault", "--region", "eu-west")
        show(cluster, "policy", "list", "--vault", "eu-vault")

        step("Step 1, discover: the VMs of eu-west that no vault protects yet")
        show(cluster, "discover", "--vault", "eu-vault")

        step("Step 2, register them with the vault")
        show(cluster, "register", "--vault", "eu-vault", "web-1", "db-1")

        step("Step 3, protect: web-1 with the default policy, db-1 with a new GFS policy")
        show(cluster, "protect", "--vault", "eu-vault", "--policy", "DefaultPolicy", "web-1")
        show(
            cluster, "protect", "--vault", "eu-vault", "db-1", "--new-policy", "Gold",
            "--schedule", "daily 01:00,13:00 tz=Europe/Berlin", "--daily", "30",
            "--weekly", "sun:104", "--monthly", "last-sun:120", "--yearly", "jan:first-sun:99",
        )  # fmt: skip
        show(cluster, "items", "--vault", "eu-vault")

        step("Initial backup of both VMs (backup now)")
        started = time.monotonic()
        first = cluster.coffer("backup-now", "--vault", "eu-vault", "web-1", "db-1")
        for job in first:
            print(
                f"  {job['item']}: {job['status']} - read {mib(job['bytes_read'])} of a "
                f"{mib(disk_size)} disk (holes are skipped), stored {mib(job['bytes_stored'])} "
                "after deduplication and compression"
            )
        print(f"  both in {time.monotonic() - started:.1f}s")
        show(cluster, "items", "--vault", "eu-vault")

        step("Changing files inside web-1's file system")
        with mounted(images["web-1"]) as root:
            (root / "uploads").mkdir(exist_ok=True)
            (root / "uploads" / "photo.bin").write_bytes(os.urandom(6 * MiB))
            with (root / "app.log").open("a") as log:
                log.write("order 4711 shipped\n" * 20000)
            os.sync()
        print("  wrote a 6 MiB upload and appended to a log")

        step("Backing up web-1 again: only what changed is sent")
        second = cluster.coffer("backup-now", "web-1")
        print(
            f"  web-1: {second['status']} - read {mib(second['bytes_read'])}, "
            f"sent {mib(second['bytes_sent'])}, stored {mib(second['bytes_stored'])}"
        )
        show(cluster, "rp", "list", "--vault", "eu-vault")

        step("Restoring web-1's latest recovery point to a new image file")
        target = cluster.agents["web-1"].restore_dir / "web-1-restored.img"
        restored = cluster.restore("web-1", second["recovery_point_id"], "root", target)
        print(f"  restore job {restored['id']}: {restored['status']}")
        same = sha256_file(target) == sha256_file(images["web-1"])
        print(f"  sha256 of the restored disk equals the source disk: {'yes' if same else 'NO'}")
        check = subprocess.run(["e2fsck", "-fn", str(target)], capture_output=True, text=True)
        print(
            f"  e2fsck -fn on the restored disk: {'clean' if check.returncode == 0 else 'ERRORS'}"
        )
        with mounted(target, readonly=True, options="noload") as root:
            size = (root / "uploads" / "photo.bin").stat().st_size
        print(f"  the new upload is in the restored file system: {mib(size)}")

        step("Every operation is a job; the dashboard sums up the vault")
        show(cluster, "job", "list", "--vault", "eu-vault")
        show(cluster, "job", "list", "--vault", "eu-vault", "--operation", "Backup")
        show(cluster, "dashboard", "--vault", "eu-vault")
        if not same or check.returncode != 0:
            raise SystemExit("the restore did not match the source")
    print("\nDemo complete.")


if __name__ == "__main__":
    sys.exit(main())
