"""The proof on a real VM: a QEMU guest backed up live, restored, and booted from its restore.

`run(workdir)` is the whole scenario of issue 15, shared by tests/test_vm_guest.py and the demo's
`--guest`. It builds the guest image unless cached (deploy/vm), brings up a lab (tests/lab_cluster)
with one namespace VM, `restorer`, whose agent is the operator's restore target and writes to the
host's file system; the controller listens on the lab's bridge. Then:

1. boot a guest on the bridge with its agent's config and a one-time enrolment token written
   into its root disk (as provisioning would); at first boot the guest enrols
   (coffer-enrol.service: its key is made inside it, the controller signs its certificate),
   then its agent dials the controller; `coffer-agent doctor` passes inside it;
2. discover, register and protect it; while its application writes and fsyncs numbered records
   to both disks (`deploy/vm/journal_app.py`), back up both disks (the agent freezes `/` and
   `/data`, reads them while frozen: no snapshot provider exists for a virtio disk, and thaws);
   change files; take an incremental;
3. delete a file in the guest and get it back from the first recovery point (`coffer files get`:
   the guest's own agent serves the point over FUSE and mounts it read-only);
4. restore both disks of the first recovery point to image files through `restorer`, stop the
   guest, `e2fsck -fn` both images, check every journal record visible before the backup was
   asked for is in them (read with debugfs, nothing mounted), boot a new guest from them and
   see its agent come back online as the same VM.

Every phase is timed; `run` returns the seconds per phase and the figures of the jobs.
A failed check raises `ScenarioFailed`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from deploy.vm import Guest, GuestSpec, VmError, build
from deploy.vm.guest import accelerator
from deploy.vm.journal_app import check
from tests.lab_cluster import REGION, VAULT, LabCluster

GUEST = "guest-1"
RESTORER = "restorer"
CONFIG = "/etc/coffer-agent/agent.toml"
ENROL_ENV = "/etc/coffer-agent/enrol.env"  # read by the image's coffer-enrol.service
RESTORE_DIR = "/var/lib/coffer-agent/restore"
# The application's journals: on the root disk and on the data disk (as debugfs sees each).
JOURNALS = {"root": "/var/lib/coffer-journal/journal", "data": "/data/journal"}
IN_FS = {"root": "/var/lib/coffer-journal/journal", "data": "/journal"}
PROBE = "/etc/coffer-probe.txt"
# A read-while-frozen backup of the whole root disk: 1.5-4 minutes here, as the two cores are
# shared; the freeze lasts all of it, so the watchdog's deadline must be longer.
THAW_DEADLINE = 900
JOB_SECONDS = 1200  # a backup job's longest wait
MiB = 1 << 20


class ScenarioFailed(AssertionError):
    """What the guest, a job or a restored disk showed differs from what was expected."""


def expect(ok: bool, what: str) -> None:
    if not ok:
        raise ScenarioFailed(what)


class Phases:
    """Times each phase and says how long it took."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.say(f"== {name}")
        started = time.monotonic()
        yield
        self.seconds[name] = round(time.monotonic() - started, 1)
        self.say(f"   {name}: {self.seconds[name]} s")


def agent_config(cluster: LabCluster) -> str:
    def toml(value: Any) -> str:
        return json.dumps(value)

    return "\n".join([
        f"vm_id = {toml(GUEST)}",
        f"name = {toml(GUEST)}",
        'service = "guests"',
        f"region = {toml(REGION)}",
        f"controller = {toml(cluster.address)}",
        'tls_dir = "/etc/coffer-agent/tls"',
        'state_dir = "/var/lib/coffer-agent"',
        f"restore_dirs = {toml([RESTORE_DIR])}",
        "[[disks]]", 'name = "root"', 'path = "/dev/vda"',
        "[[disks]]", 'name = "data"', 'path = "/dev/vdb"',
        "[consistency]", "freeze_timeout = 10", f"thaw_deadline = {THAW_DEADLINE}",
    ]) + "\n"  # fmt: skip


def sessions(cluster: LabCluster, vm: str) -> dict[str, Any]:
    listed: dict[str, dict[str, Any]] = {a["vm_id"]: a for a in cluster.coffer("agents")}
    return listed.get(vm, {})


def wait_online(cluster: LabCluster, guest: Guest, *, online: bool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sessions(cluster, GUEST).get("online", False) != online:
        if online and not guest.running():
            raise ScenarioFailed(f"the guest ended:\n{guest.console_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise ScenarioFailed(f"{GUEST} not {'online' if online else 'offline'} after "
                                 f"{timeout} s:\n{guest.console_text()[-3000:]}")  # fmt: skip
        time.sleep(2)


def backup(cluster: LabCluster, guest: Guest) -> dict[str, Any]:
    """Back the guest up and wait for the job; polled every few seconds, since each `coffer`
    call takes CPU the emulated guest is short of."""
    job_id = cluster.start_backup(GUEST)
    deadline = time.monotonic() + JOB_SECONDS
    while (job := cluster.job(job_id))["status"] in ("InProgress", "Cancelling"):
        if time.monotonic() > deadline:
            raise ScenarioFailed(f"backup {job_id} still {job['status']} after {JOB_SECONDS} s")
        if not guest.running():
            raise ScenarioFailed(f"the guest ended:\n{guest.console_text()[-3000:]}")
        time.sleep(3)
    return job


def last_record(guest: Guest, path: str) -> int:
    """The number of the last complete record of a journal in the running guest."""
    lines = guest.exec(["/usr/bin/tail", "-n", "2", path]).stdout.splitlines()
    return max((int(line.split()[0]) for line in lines if len(line.split()) == 2), default=0)


def fs_read(image: Path, path: str) -> str:
    """A file of the ext4 file system in `image`, read with debugfs (nothing is mounted)."""
    done = subprocess.run(["debugfs", "-R", f'cat "{path}"', str(image)],
                          capture_output=True, check=False)  # fmt: skip
    return done.stdout.decode(errors="replace")


def run(workdir: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The scenario; the seconds of each phase and the jobs' figures."""
    phases = Phases(say)
    accel = accelerator(os.environ.get("COFFER_VM_ACCEL", "tcg"))
    with phases("guest image (built unless cached)"):
        image = build()
    figures: dict[str, Any] = {"accel": accel}
    with phases("lab: controller on the bridge, the restorer's agent"):
        cluster = LabCluster(workdir / "cluster", [RESTORER], disk_mib=64, scratch_mib=512,
                             enrol=True)  # fmt: skip
        cluster.__enter__()
    guests: list[Guest] = []
    try:
        network = cluster.lab.network
        address = f"{network[200]}/{network.prefixlen}"
        # Enrolment, as for any VM: a one-time token for this VM, which pins the controller's
        # CA; the guest makes its key and gets its certificate at first boot.
        made = cluster.coffer("enrol", "create", "--vm", GUEST, "--expires", "1h")
        enrol_env = (
            f"COFFER_ENROL_TOKEN={made['token']}\nCOFFER_ENROL_ADDRESS={made['enrol_address']}\n"
        )
        files: dict[str, bytes | Path] = {
            CONFIG: agent_config(cluster).encode(),
            ENROL_ENV: enrol_env.encode(),
        }
        guest = Guest(GuestSpec(GUEST, workdir / "guest", cluster.lab.bridge, address, accel))
        guests.append(guest)

        with phases("boot the guest until its agent is online"):
            guest.prepare(image, files=files)
            guest.start(image)
            figures["qga_answers_s"] = round(guest.wait_agent(240), 1)
            wait_online(cluster, guest, online=True, timeout=240)
        with phases("coffer-agent doctor inside the guest"):
            doctor = guest.exec(["/usr/local/bin/coffer-agent", "doctor", "--config", CONFIG],
                                timeout=240, check=False)  # fmt: skip
        say(doctor.stdout.rstrip())
        expect(doctor.returncode == 0, f"doctor failed in the guest: {doctor.stdout}"
                                       f"{doctor.stderr}")  # fmt: skip

        with phases("discover, register, protect"):
            cluster.coffer("vault", "create", VAULT, "--region", REGION)
            found = cluster.coffer("discover", "--vault", VAULT)
            expect(GUEST in {vm["vm_id"] for vm in found.get("vms", [])},
                   f"discovery did not offer {GUEST}: {found}")  # fmt: skip
            cluster.coffer("register", "--vault", VAULT, GUEST)
            cluster.coffer("protect", "--vault", VAULT, "--policy", "DefaultPolicy", GUEST)

        probe = f"written before the first backup {os.urandom(8).hex()}\n"
        guest.exec(["/bin/sh", "-c", f"printf '%s' '{probe}' > {PROBE} && sync"])
        before = {disk: last_record(guest, path) for disk, path in JOURNALS.items()}
        expect(min(before.values()) > 0, "the application in the guest writes nothing")
        with phases("full backup of both disks while the application writes"):
            first = backup(cluster, guest)
        expect(first.get("status") == "Completed", f"backup: {first}\n{cluster.logs()}")
        details = first["details"]
        figures["full"] = {"frozen_ms": details["frozen_ms"],
                           "consistency": details["consistency"],
                           "read_mib": round(int(first["bytes_read"]) / MiB, 1),
                           "sent_mib": round(int(first["bytes_sent"]) / MiB, 1)}  # fmt: skip
        say(f"   frozen {details['frozen_ms']:.0f} ms; {figures['full']}")
        after = {disk: last_record(guest, path) for disk, path in JOURNALS.items()}
        expect(min(after.values()) > max(before.values()), "the application stopped writing")

        with phases("change files, incremental backup"):
            guest.exec(["/bin/sh", "-c", "head -c 8388608 /dev/urandom > /var/tmp/new.bin && "
                        "echo changed > /data/changed.txt && sync"])  # fmt: skip
            second = backup(cluster, guest)
        expect(second.get("status") == "Completed", f"incremental: {second}")
        figures["incremental"] = {
            "frozen_ms": second["details"]["frozen_ms"],
            "read_mib": round(int(second["bytes_read"]) / MiB, 1),
            "sent_mib": round(int(second["bytes_sent"]) / MiB, 1),
        }
        say(f"   {figures['incremental']}")
        expect(second["bytes_sent"] < first["bytes_sent"], "the incremental sent everything")
        rp = first["recovery_point_id"]

        with phases("file-level recovery into the running guest"):
            guest.exec(["/bin/rm", PROBE])
            got = cluster.coffer("files", "get", GUEST, "--rp", rp, "--disk", "root", PROBE,
                                 "--to", f"{RESTORE_DIR}/files", check=False)  # fmt: skip
            recovered = guest.exec(["/bin/cat", f"{RESTORE_DIR}/files/coffer-probe.txt"],
                                   check=False)  # fmt: skip
        expect(recovered.stdout == probe, f"file recovery: {got}\n{recovered}")

        restored = {disk: cluster.agents[RESTORER].restore_dir / f"{GUEST}-{disk}.img"
                    for disk in ("root", "data")}  # fmt: skip
        with phases("restore both disks to images through the restorer's agent"):
            for disk, target in restored.items():
                job = cluster.coffer("restore", GUEST, "--rp", rp, "--disk", disk, "--target",
                                     str(target), "--target-vm", RESTORER, check=False)  # fmt: skip
                expect(job.get("status") == "Completed", f"restore of {disk}: {job}")
        with phases("stop the original guest"):
            # Shut down through qemu-guest-agent; past 20 s (an emulated shutdown on a loaded
            # machine takes a minute) QEMU is ended: the restore comes from the recovery point.
            guest.stop(timeout=20)
            wait_online(cluster, guest, online=False, timeout=60)
        with phases("e2fsck -fn both restored disks, journal records"):
            for disk, target in restored.items():
                fsck = subprocess.run(["e2fsck", "-fn", str(target)], capture_output=True,
                                      text=True, check=False)  # fmt: skip
                expect(fsck.returncode == 0, f"e2fsck -fn {disk}: {fsck.stdout}")
                records = check(fs_read(target, IN_FS[disk]))
                say(f"   {disk}: clean; {records} records, {before[disk]} committed before "
                    "the backup was asked for")  # fmt: skip
                expect(records >= before[disk], f"{disk}: records lost")
        figures["records_before_backup"] = before

        again = Guest(GuestSpec(GUEST, workdir / "restored", cluster.lab.bridge, address, accel))
        guests.append(again)
        with phases("boot a new guest from the restored disks until its agent is online"):
            again.prepare(image, root=restored["root"], data=restored["data"])
            again.start(image)
            wait_online(cluster, again, online=True, timeout=240)
        agent = sessions(cluster, GUEST)
        expect(agent.get("name") == GUEST, f"a different VM came back: {agent}")
    finally:
        for g in guests:
            with contextlib.suppress(VmError, OSError):  # the lab's close still runs
                g.kill()
        cluster.close()
    figures["phases"] = phases.seconds
    figures["total_s"] = round(sum(phases.seconds.values()), 1)
    return figures
