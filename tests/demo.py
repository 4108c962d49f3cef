"""The Coffer demo: the vault workflow from discovery to a verified restore, on the lab.

Run as root: `python -m tests.demo [--workdir DIR] [--keep] [--guest]`; `--guest` runs the
same workflow on a real QEMU guest instead (tests/vm_scenario.py, docs/vm-guest.md).
Everything runs on this machine: the lab (`deploy/lab`) makes three VMs, each in its own network,
mount, UTS and PID namespaces on a private bridge, with an ext4 disk mounted inside the VM only
(its image on a reflink XFS).
A real agent runs inside each VM and dials the controller, which listens (with its private
Mosquitto) on the bridge. Two VMs are in region eu-west, one in us-east.

The operator creates a vault, discovers, registers and protects the VMs, takes the initial
backups while an application inside one VM keeps writing (the agent freezes the file system
only for the instant of a reflink clone), changes files, backs up again, reads the jobs and the
dashboard, restores, and checks the restored disk with `e2fsck` and its files. Then a file
deleted inside a VM comes back on its own: listed and copied out of the recovery point
(`coffer files ls`, `coffer files get`) without restoring the disk. At the end it prints the
web console's address and a one-time sign-in link (`coffer web login`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests import vm_scenario
from tests.bench.image import mounted
from tests.bench.measure import sha256_file
from tests.journal_writer import committed, content
from tests.lab_cluster import REPO, LabCluster

MiB = 1 << 20
VMS = {"web-1": "eu-west", "db-1": "eu-west", "report-1": "us-east"}

# Inside a VM: fill its disk with a mix of files (prose, code, logs, binaries, random data).
FILL = """
import sys
from pathlib import Path
from tests.bench.content import FileGen
from tests.bench.image import Mix, write_files
root, budget, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
files, written = write_files(root / "data", FileGen(seed), Mix().budgets(budget))
print(files, sum(written.values()))
"""


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(cluster: LabCluster, *args: str) -> None:
    """Run the real CLI, its output as the operator sees it."""
    print(f"$ coffer {' '.join(args)}", flush=True)
    result = cluster.coffer(*args, json_out=False, check=True)
    sys.stdout.write(result.stdout)
    sys.stdout.flush()


def console_answers(url: str, ca: Path) -> bool:
    """Whether the console serves a sign-in link's page over TLS from the controller's CA
    (looking does not spend the link)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False  # the link names 127.0.0.1; the certificate, the bridge
    with urllib.request.urlopen(url, context=context, timeout=10) as reply:
        page = reply.read().decode()
    answered = reply.status == 200 and "Sign in to Coffer" in page
    print(f"  the console at {url.split('/login/')[0]} answers: {'yes' if answered else 'NO'}")
    return answered


def mib(value: str | int) -> str:
    return f"{int(value) / MiB:.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", type=Path, help="where to put everything (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="leave the work directory behind")
    parser.add_argument("--disk-mib", type=int, default=256, help="size of each VM's disk")
    parser.add_argument(
        "--guest",
        action="store_true",
        help="the demo on a real QEMU guest instead: tests/vm_scenario.py (docs/vm-guest.md)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the demo builds namespaces and loop devices: run it as root", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="coffer-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.guest:
            figures = vm_scenario.run(workdir)
            print(f"\nDemo complete on a real guest:\n{json.dumps(figures, indent=2)}")
        else:
            run(workdir, args.disk_mib)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"\n(work directory kept: {workdir})")
    return 0


def details(job: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = job.get("details") or {}
    return found


def run(workdir: Path, disk_mib: int) -> None:
    step("Bringing up the lab: three VMs in their own namespaces, a controller on the bridge")
    # The web console on this machine's loopback, on a free port.
    console = '[web]\nlisten = "127.0.0.1:0"\n'
    with LabCluster(
        workdir, list(VMS), disk_mib=disk_mib, regions=VMS, services=dict.fromkeys(VMS, "shop"),
        config=console,
    ) as cluster:  # fmt: skip
        print(f"  bridge {cluster.host}; controller and Mosquitto on {cluster.address}")
        for seed, vm in enumerate(VMS, start=1):
            root = cluster.agents[vm].mountpoint
            budget = disk_mib * MiB * 2 // 5
            out = cluster.run(vm, [sys.executable, "-c", FILL, str(root), str(budget), str(seed)])
            files, written = out.split()
            print(f"  {vm} ({VMS[vm]}): {files} files, {mib(written)} written inside the VM")
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

        step("An application inside db-1 keeps writing and fsync-ing during the backups")
        db_root = cluster.agents["db-1"].mountpoint
        journal = workdir / "db-1.journal"  # on the host's file system, outside the VM's disk
        cluster.run("db-1", ["mkdir", "-p", str(db_root / "app")])
        journal.touch()
        cluster.spawn("db-1", [sys.executable, "-m", "tests.journal_writer",
                               str(db_root / "app"), str(journal)], tag="writer")  # fmt: skip
        deadline = time.monotonic() + 30
        while len(committed(journal) if journal.exists() else {}) < 20:
            if time.monotonic() > deadline:
                raise SystemExit("the application inside db-1 did not start writing")
            time.sleep(0.1)
        print(f"  {len(committed(journal))} files being appended to, each append fsync-ed")

        step("Initial backup of both VMs at once (backup now)")
        before = journal.read_text().count("\n")
        first = cluster.coffer("backup-now", "--vault", "eu-vault", "web-1", "db-1")
        for job in first:
            found = details(job)
            print(
                f"  {job['item']}: {job['status']}, {found['consistency']['root']}, file "
                f"system frozen {found['frozen_ms']:.0f} ms; read {mib(job['bytes_read'])}, "
                f"stored {mib(job['bytes_stored'])} after deduplication and compression"
            )
        cluster.kill("db-1", "writer")
        show(cluster, "items", "--vault", "eu-vault")

        step("Changing files inside web-1's file system")
        web_root = cluster.agents["web-1"].mountpoint
        cluster.run("web-1", ["sh", "-c", f"mkdir -p {web_root}/uploads && head -c {6 * MiB} "
                              f"/dev/urandom > {web_root}/uploads/photo.bin && for i in "
                              f"$(seq 2000); do echo order $i shipped; done >> "
                              f"{web_root}/app.log && sync"])  # fmt: skip
        print("  wrote a 6 MiB upload and appended to a log")

        step("Backing up web-1 again: only what changed is sent")
        second = cluster.coffer("backup-now", "web-1")
        print(
            f"  web-1: {second['status']} - read {mib(second['bytes_read'])}, "
            f"sent {mib(second['bytes_sent'])}, stored {mib(second['bytes_stored'])}"
        )
        show(cluster, "rp", "list", "--vault", "eu-vault")

        step("Restoring both disks to new image files and checking them")
        ok = True
        db_job = next(job for job in first if job["vm_id"] == "db-1")
        for vm, job in (("web-1", second), ("db-1", db_job)):
            target = cluster.agents[vm].restore_dir / f"{vm}-restored.img"
            restored = cluster.restore(vm, job["recovery_point_id"], target)
            check = subprocess.run(["e2fsck", "-fn", str(target)], capture_output=True)
            clean = restored["status"] == "Completed" and check.returncode == 0
            ok &= clean
            print(f"  {vm}: restore {restored['status']}, e2fsck -fn "
                  f"{'clean' if check.returncode == 0 else 'ERRORS'}")  # fmt: skip
            with mounted(target, readonly=True, options="noload") as root:
                if vm == "web-1":
                    size = (root / "uploads" / "photo.bin").stat().st_size
                    print(f"    the new upload is in the restored file system: {mib(size)}")
                    ok &= size == 6 * MiB
                else:
                    # Every append the application had fsync-ed before the backup was asked for.
                    sizes = committed(journal, before)
                    intact = all(
                        (root / "app" / name).read_bytes()[:size] == content(name, size)
                        for name, size in sizes.items()
                    )
                    ok &= intact
                    print(f"    {len(sizes)} files, {before} appends fsync-ed before the backup "
                          f"was asked for, all there: {'yes' if intact else 'NO'}")  # fmt: skip

        step("A file deleted inside web-1 comes back alone, without restoring the disk")
        rp = second["recovery_point_id"]
        log_in_vm = f"{web_root}/app.log"
        digest = cluster.run("web-1", ["sha256sum", log_in_vm]).split()[0]
        cluster.run("web-1", ["rm", log_in_vm])
        print("  (inside web-1: rm app.log)")
        show(cluster, "files", "ls", "web-1", "--rp", rp, "--disk", "root", "/")
        files_dir = cluster.agents["web-1"].restore_dir / "files"
        show(cluster, "files", "get", "web-1", "--rp", rp, "--disk", "root", "/app.log",
             "--to", str(files_dir))  # fmt: skip
        recovered = files_dir / "app.log"
        same = recovered.exists() and sha256_file(recovered) == digest
        ok &= same
        print(f"  {recovered}: {'the same bytes as before it was deleted' if same else 'DIFFERS'}")

        step("Inside web-1, the agent's own check of what a backup needs")
        print("$ coffer-agent doctor (in web-1)")
        done = cluster.lab.run(
            "web-1",
            [sys.executable, "-m", "agent.main", "doctor", "--config",
             str(cluster.agents["web-1"].config)],
            timeout=60,
            cwd=str(REPO),
        )  # fmt: skip
        sys.stdout.write(done.stdout)

        step("Every operation is a job; the dashboard sums up the vault")
        show(cluster, "job", "list", "--vault", "eu-vault")
        show(cluster, "dashboard", "--vault", "eu-vault")
        show(cluster, "alerts", "--all")

        step("The same vault in a browser: the web console, signed in with a one-time link")
        link = cluster.coffer("web", "login")
        ok &= console_answers(link["url"], cluster.pki / "ca.crt")
        show(cluster, "web", "login", "--expires", "3600")
        print(
            f"  Console: {link['console']} (its certificate is from the controller's CA, "
            f"{cluster.pki / 'ca.crt'}). A link signs in once, within its time; this console "
            "stops with the demo, a controller with [web] in its config keeps serving one."
        )
        if not ok:
            raise SystemExit("a restored disk or file did not match what was backed up")
    print("\nDemo complete.")


if __name__ == "__main__":
    sys.exit(main())
