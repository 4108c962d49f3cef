"""End to end on the lab: agents inside namespace VMs, the controller on the lab's bridge.

What an operator would check of flush-and-snapshot, with the real controller, Mosquitto,
agents and CLI (`tests.lab_cluster`):

- three VMs under write load backed up at once: every job completes `file-system`
  consistent from a reflink snapshot frozen well under a second; every disk restored to a new
  image passes `e2fsck -fn` and holds every file the writer had committed before the backup;
- pre-scripts: one that passes makes the recovery point `application` consistent; one that
  fails gives a `file-system` consistent point and a warning with `continue_on_failure`, and
  a failed job (`PreScriptFailed`) and no recovery point without it;
- an agent killed with SIGKILL while the VM's file system is frozen (read-while-frozen): the
  file system is thawed at once, the job fails with `AgentDisconnected`, the next backup
  succeeds;
- a VM cut off the network during its upload: the job fails with `AgentDisconnected` once the
  keepalive gives up (within 25 s), no partial recovery point is left, and the agent comes back
  by itself when the link returns;
- a recovery point mounted with `coffer files mount` is seen inside its VM's mount namespace
  and not on the host; an agent killed with it open fails the job, and what it left is swept
  when it starts again; `coffer files unmount` ends a mount.

The freeze times are printed per backup (`pytest -s`), with a summary at the end.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.bench.image import mounted
from tests.journal_writer import committed, content
from tests.lab_cluster import VAULT, LabCluster

MiB = 1 << 20
DISK_MIB = 256
WRITERS = ("vm1", "vm2", "vm3")
SCRIPTED = "vm2"  # restarted with pre-/post-scripts
BULK = "vm4"  # a disk read while frozen, with enough data to take a couple of seconds
CUT = "vm3"  # cut off during its upload
FREEZE_THRESHOLD = 0.3  # s: a write+fsync blocked this long: the file system is frozen
THAW_DEADLINE = 20.0
BASE = {"thaw_deadline": THAW_DEADLINE, "freeze_timeout": 5}

pytestmark = [pytest.mark.integration, pytest.mark.root]


@dataclass(frozen=True)
class Figure:
    what: str
    vm: str
    provider: str
    frozen_ms: float
    job_s: float


@pytest.fixture(scope="module")
def figures() -> Iterator[list[Figure]]:
    found: list[Figure] = []
    yield found
    print("\nfile systems frozen per backup (job details frozen_ms):")
    for f in found:
        print(f"  {f.what:<34} {f.vm}  {f.provider:<18} {f.frozen_ms:7.1f} ms  job {f.job_s:.2f} s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabCluster]:
    with LabCluster(tmp_path_factory.mktemp("lab-e2e"), ["vm1", "vm2", "vm3", BULK],
                    disk_mib=DISK_MIB) as running:  # fmt: skip
        yield running


# -- helpers ----------------------------------------------------------------------------------


def details(job: dict[str, Any]) -> dict[str, Any]:
    parsed: dict[str, Any] = job["details"]
    return parsed


def job_seconds(job: dict[str, Any]) -> float:
    started = datetime.fromisoformat(job["started_at"])
    return (datetime.fromisoformat(job["ended_at"]) - started).total_seconds()


def record(figures: list[Figure], what: str, job: dict[str, Any]) -> Figure:
    found = details(job)
    (consistency,) = found["consistency"].values()  # e.g. "file-system (reflink)"
    provider = consistency.split("(")[1].rstrip(")")
    figure = Figure(what, job["vm_id"], provider, float(found["frozen_ms"]), job_seconds(job))
    figures.append(figure)
    print(f"{what}: {figure.vm} frozen {figure.frozen_ms:.1f} ms ({provider}), "
          f"job {figure.job_s:.2f} s")  # fmt: skip
    return figure


def point(cluster: LabCluster, vm: str, rp_id: str) -> dict[str, Any]:
    return next(p for p in cluster.recovery_points(vm) if p["id"] == rp_id)


def fill(cluster: LabCluster, vm: str, name: str, mib: int) -> None:
    """Write `mib` MiB of random data to a new file on the VM's disk, from inside the VM."""
    target = cluster.agents[vm].mountpoint / name
    cluster.run(vm, ["dd", "if=/dev/urandom", f"of={target}", "bs=1M", f"count={mib}",
                     "conv=fsync", "status=none"])  # fmt: skip


def lines(path: Path) -> list[str]:
    """The complete lines of a file another process appends to."""
    text = path.read_text()
    return text[: text.rfind("\n") + 1].splitlines()


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)
    return found


@contextlib.contextmanager
def shaped(cluster: LabCluster, vm: str, rate: str) -> Iterator[None]:
    """The VM's outgoing traffic limited to `rate` (e.g. "48mbit"), from inside the VM."""
    cluster.run(vm, ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate,
                     "burst", "64kb", "latency", "500ms"])  # fmt: skip
    try:
        yield
    finally:
        cluster.lab.run(vm, ["tc", "qdisc", "del", "dev", "eth0", "root"])


def online(cluster: LabCluster, vm: str) -> bool:
    return bool({a["vm_id"]: a["online"] for a in cluster.coffer("agents")}[vm])


def wait_for_end(cluster: LabCluster, job_id: str, timeout: float) -> dict[str, Any] | None:
    """The job once it has ended, or None if it has not within `timeout` s."""
    try:
        return cluster.wait_job(job_id, timeout)
    except TimeoutError:
        return None


def wchan(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return ""


# A write+fsync in a loop on the VM's disk, logging (on the host's file system) when each
# one starts and ends: a start without an end for long means the file system is frozen.
PROBE = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
with open(sys.argv[2], "a", buffering=1) as log:
    n = 0
    while True:
        log.write(f"start {time.time():.6f}\\n")
        os.pwrite(fd, b"p" * 4096, (n % 256) * 4096)
        os.fsync(fd)
        log.write(f"done {time.time():.6f}\\n")
        n += 1
        time.sleep(0.01)
"""


# -- 1. three VMs under write load, backed up at once ------------------------------------------


@pytest.mark.timeout(240)
def test_three_vms_under_write_load_back_up_at_once_and_restore_clean(
    cluster: LabCluster, figures: list[Figure]
) -> None:
    journals = {vm: cluster.root / f"journal-{vm}" for vm in WRITERS}
    cluster.protect(*WRITERS)
    try:
        for vm, journal in journals.items():
            directory = cluster.agents[vm].mountpoint / "data"
            cluster.run(vm, ["mkdir", "-p", str(directory)])
            journal.touch()
            cluster.spawn(vm, [sys.executable, "-m", "tests.journal_writer", str(directory),
                               str(journal)], tag="writer")  # fmt: skip
        for vm, journal in journals.items():
            wait_for(lambda j=journal: len(lines(j)) >= 200, 30, f"the writer of {vm} is stuck")
        # Committed (fsync returned, then journaled) before the jobs were even started, so
        # certainly before the freeze.
        before = {vm: len(lines(journal)) for vm, journal in journals.items()}
        jobs = cluster.backup(*WRITERS)
        after = {vm: len(lines(journal)) for vm, journal in journals.items()}
    finally:
        for vm in WRITERS:
            cluster.kill(vm, "writer")
    assert [job["status"] for job in jobs] == ["Completed"] * 3, cluster.logs()
    # At once: every job had started before the first one ended.
    assert max(j["started_at"] for j in jobs) < min(j["ended_at"] for j in jobs)
    for vm, job in zip(WRITERS, jobs, strict=True):
        assert after[vm] > before[vm], f"the writer of {vm} did not write through the backup"
        assert details(job)["consistency"] == {"root": "file-system (reflink)"}
        figure = record(figures, "under write load, 3 at once", job)
        assert 0 < figure.frozen_ms < 1000
        rp = point(cluster, vm, job["recovery_point_id"])
        assert rp["consistency"] == "file-system"
        assert [(d["name"], d["consistency"]) for d in rp["disks"]] == [("root", "file-system")]
    assert {i["vm_id"]: i["state"] for i in cluster.coffer("items", "--vault", VAULT)
            if i["vm_id"] in WRITERS} == dict.fromkeys(WRITERS, "Protected")  # fmt: skip

    for vm, job in zip(WRITERS, jobs, strict=True):
        target = cluster.agents[vm].restore_dir / f"{vm}-root.img"
        restored = cluster.restore(vm, job["recovery_point_id"], target)
        assert restored["status"] == "Completed", restored
        assert target.stat().st_size == DISK_MIB * MiB
        fsck = subprocess.run(["e2fsck", "-fn", str(target)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        expected = committed(journals[vm], before[vm])
        assert len(expected) == 20  # every file of the writer
        with mounted(target, readonly=True, options="noload") as root:
            for name, size in expected.items():
                data = (root / "data" / name).read_bytes()
                assert len(data) >= size, (vm, name, len(data), size)
                assert data[:size] == content(name, size), (vm, name)


# -- 2. pre- and post-scripts -------------------------------------------------------------------


def script(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o700)  # owned by root and writable by no one else, or the agent refuses it
    return path


@pytest.mark.timeout(180)
def test_pre_script_passing_failing_and_continuing(
    cluster: LabCluster, figures: list[Figure]
) -> None:
    vm = SCRIPTED
    cluster.protect(vm)
    scripts = cluster.root / "scripts"
    marker = cluster.root / "script-runs"
    # The agent runs the scripts inside the VM: they see its hostname.
    log_run = f'echo "$(hostname) $COFFER_PHASE $COFFER_JOB_ID" >> {marker}\n'
    passing = script(scripts, "pre-ok.sh", log_run)
    post = script(scripts, "post.sh", log_run)
    failing = script(scripts, "pre-fail.sh", log_run + 'echo "database would not quiesce" >&2\n'
                     "exit 1\n")  # fmt: skip
    post_table = {"path": str(post), "timeout": 10}

    def runs(job: dict[str, Any]) -> list[str]:
        return [line.split()[1] for line in marker.read_text().splitlines()
                if line.split()[0] == vm and line.split()[2] == job["id"]]  # fmt: skip

    try:
        # A pre-script that succeeds: application consistent.
        cluster.configure(vm, consistency={**BASE, "pre_script": {"path": str(passing),
                          "timeout": 10}, "post_script": post_table})  # fmt: skip
        (job,) = cluster.backup(vm)
        assert job["status"] == "Completed", job
        assert details(job)["consistency"] == {"root": "application (reflink)"}
        rp = point(cluster, vm, job["recovery_point_id"])
        assert rp["consistency"] == "application"
        assert [d["consistency"] for d in rp["disks"]] == ["application"]
        assert runs(job) == ["pre", "post"]
        record(figures, "pre-script passed", job)

        # It fails, and the backup goes on: file-system consistent, with a warning.
        failing_table = {"path": str(failing), "timeout": 10, "retries": 1, "retry_delay": 0.1}
        cluster.configure(vm, consistency={**BASE, "post_script": post_table, "pre_script":
                          {**failing_table, "continue_on_failure": True}})  # fmt: skip
        (job,) = cluster.backup(vm)
        assert job["status"] == "CompletedWithWarnings", job
        assert job["error_code"] == ""
        rp = point(cluster, vm, job["recovery_point_id"])
        assert rp["consistency"] == "file-system"
        assert [d["consistency"] for d in rp["disks"]] == ["file-system"]
        (warning,) = details(job)["warnings"]
        assert warning.startswith("PreScriptFailed: ")
        for says in (str(failing), "2 attempt(s)", "exited with status 1", "would not quiesce"):
            assert says in warning, warning
        assert runs(job) == ["pre", "pre", "post"]  # one retry; the post-script still ran
        record(figures, "pre-script failed, continued", job)

        # It fails, and the backup stops: no recovery point.
        points = [p["id"] for p in cluster.recovery_points(vm)]
        manifests = cluster.manifests()
        cluster.configure(vm, consistency={**BASE, "post_script": post_table, "pre_script":
                          {**failing_table, "continue_on_failure": False}})  # fmt: skip
        (job,) = cluster.backup(vm)
        assert (job["status"], job["error_code"]) == ("Failed", "PreScriptFailed"), job
        for says in (str(failing), "exited with status 1", "would not quiesce",
                     "continue_on_failure"):  # fmt: skip
            assert says in job["error_message"], job["error_message"]
        assert job["recovery_point_id"] == ""
        assert [p["id"] for p in cluster.recovery_points(vm)] == points
        assert cluster.manifests() == manifests
        assert runs(job) == ["pre", "pre", "post"]  # what the pre-script quiesced is resumed
    finally:
        cluster.configure(vm, consistency=BASE)


# -- 3. SIGKILL while frozen --------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_agent_killed_while_frozen_thaws_and_the_next_backup_succeeds(
    cluster: LabCluster, figures: list[Figure]
) -> None:
    vm = BULK
    mountpoint = cluster.agents[vm].mountpoint
    cluster.configure(vm, consistency=BASE, snapshot=["read-while-frozen"])
    cluster.protect(vm)
    fill(cluster, vm, "bulk", 200)  # read (and sent) while frozen: a couple of seconds
    probe_log = cluster.root / f"probe-{vm}.log"
    probe_log.touch()
    probe = cluster.python(vm, PROBE, str(mountpoint / "probe"), str(probe_log), tag="probe")
    # The upload (at 200 Mbit/s) keeps the read, and so the freeze, going for seconds.
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(cluster.kill, vm, "probe")
        cleanup.enter_context(shaped(cluster, vm, "200mbit"))
        wait_for(lambda: "done" in probe_log.read_text(), 10, "the probe does not write")
        job_id = cluster.start_backup(vm)

        def frozen() -> float | None:
            last = (lines(probe_log) or [""])[-1]
            if last.startswith("start "):
                started = float(last.split()[1])
                # Blocked on the file system's freeze, not just slow: the kernel says where.
                if time.time() - started > FREEZE_THRESHOLD and (
                    wchan(probe) == "percpu_rwsem_wait"
                ):
                    return started
            return None

        blocked_since = wait_for(frozen, 30, f"{vm}'s file system never froze")
        killed_at = time.time()
        cluster.kill_agent(vm)

        def thawed() -> float | None:
            done = [float(line.split()[1]) for line in lines(probe_log)
                    if line.startswith("done ")]  # fmt: skip
            return done[-1] if done and done[-1] > blocked_since else None

        thawed_at = wait_for(thawed, THAW_DEADLINE + 5, "the file system stayed frozen")
        print(f"SIGKILL while frozen: the blocked write went through {thawed_at - killed_at:.3f} s "
              f"after the kill ({thawed_at - blocked_since:.2f} s blocked in all)")  # fmt: skip
        assert thawed_at - killed_at < 5, "not thawed well within the deadline"
        started = time.monotonic()
        done = cluster.lab.run(vm, ["sh", "-c", f"echo after > {mountpoint}/after-kill && sync"],
                               timeout=THAW_DEADLINE)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - started < 5

    # The controller's side: the killed agent's session ends, and its job with it.
    job = wait_for_end(cluster, job_id, 10)
    noticed = job is not None and not online(cluster, vm)
    assert noticed, "the controller did not notice the killed agent: job still running"
    cluster.start_agent(vm)
    job = cluster.wait_job(job_id, timeout=30)  # a new session of the VM ends a stale one
    assert (job["status"], job["error_code"]) == ("Failed", "AgentDisconnected"), job
    assert vm in job["error_message"], job["error_message"]
    assert job["recovery_point_id"] == ""
    assert cluster.recovery_points(vm) == []

    (job,) = cluster.backup(vm)
    assert job["status"] == "Completed", job
    assert details(job)["consistency"] == {"root": "file-system (read-while-frozen)"}
    assert point(cluster, vm, job["recovery_point_id"])["consistency"] == "file-system"
    figure = record(figures, "read-while-frozen, 200 MiB of data", job)
    assert figure.frozen_ms < THAW_DEADLINE * 1000


# -- 4. the link cut during the upload ----------------------------------------------------------


@pytest.mark.timeout(180)
def test_link_cut_during_upload_fails_the_job_and_the_agent_comes_back(
    cluster: LabCluster, figures: list[Figure]
) -> None:
    vm = CUT
    cluster.protect(vm)
    points = [p["id"] for p in cluster.recovery_points(vm)]
    manifests = cluster.manifests()
    fill(cluster, vm, "new-data", 96)
    sessions = cluster.sessions(vm)
    # At 48 Mbit/s the upload of the new data takes about 16 s: the cut lands in the middle.
    with shaped(cluster, vm, "48mbit"):
        job_id = cluster.start_backup(vm)

        def uploading() -> dict[str, Any] | None:
            job = cluster.job(job_id)
            return job if int(job["bytes_stored"]) > 0 else None

        stored = int(wait_for(uploading, 30, "the upload never started")["bytes_stored"])
        cut_at = time.monotonic()
        cluster.lab.cut(vm)
        try:
            # The controller hears nothing more from the VM: its keepalive gives up within 25 s
            # (15 s of silence, then 10 s for the ping's answer; shared/rpc_channel.py). gRPC's
            # bandwidth probes used to ping during the upload and notice sooner; the streams'
            # fixed window (issue 11) turned them off.
            ended = wait_for_end(cluster, job_id, 35)
            failed_after = time.monotonic() - cut_at
            noticed = ended is not None and not online(cluster, vm)
        finally:
            cluster.lab.restore(vm)
    assert noticed, "the controller did not notice the cut link: job still running"
    restored_at = time.monotonic()
    # The agent reconnects by itself: a new session, and online again.
    wait_for(lambda: cluster.sessions(vm) > sessions, 45, f"the agent of {vm} did not reconnect")
    cluster.wait_online(vm)
    print(f"the agent of {vm} was online again {time.monotonic() - restored_at:.1f} s after "
          "the link came back")  # fmt: skip
    job = cluster.wait_job(job_id, timeout=30)
    print(f"link cut during upload: job {job['status']} ({job['error_code']}) "
          + (f"{failed_after:.1f} s after the cut" if noticed else "once the agent reconnected")
          + f", {stored / MiB:.0f} MiB stored before it")  # fmt: skip
    assert (job["status"], job["error_code"]) == ("Failed", "AgentDisconnected"), job
    assert job["recovery_point_id"] == ""
    assert [p["id"] for p in cluster.recovery_points(vm)] == points
    assert cluster.manifests() == manifests

    (job,) = cluster.backup(vm)
    assert job["status"] == "Completed", job
    assert [p["id"] for p in cluster.recovery_points(vm)] == [*points, job["recovery_point_id"]]
    record(figures, "after the cut", job)


# -- 5. a recovery point mounted inside its VM -------------------------------------------------


def mounted_in(cluster: LabCluster, vm: str | None) -> list[str]:
    """Mount points in `vm`'s mount namespace (None: the host's)."""
    if vm is None:
        text = Path("/proc/self/mountinfo").read_text()
    else:
        text = cluster.run(vm, ["cat", "/proc/self/mountinfo"])
    return [line.split()[4] for line in text.splitlines()]


@pytest.mark.timeout(180)
def test_a_recovery_point_is_mounted_inside_its_vm_and_a_restarted_agent_sweeps_it(
    cluster: LabCluster,
) -> None:
    vm = "vm1"
    cluster.protect(vm)
    cluster.run(vm, ["sh", "-c", f"echo recovered > {cluster.agents[vm].mountpoint}/note.txt"])
    (job,) = cluster.backup(vm)
    assert job["status"] == "Completed", job
    rp = job["recovery_point_id"]
    mount = cluster.coffer("files", "mount", vm, "--rp", rp, "--disk", "root", "--ttl", "1h")
    assert mount["status"] == "InProgress", mount
    where = details(mount)["mounts"]["disk"].removesuffix(" (ext4)")
    # Inside the VM's own mount namespace, where the operator browses it; not on the host.
    assert where in mounted_in(cluster, vm)
    assert where not in mounted_in(cluster, None)
    assert cluster.run(vm, ["cat", f"{where}/note.txt"]) == "recovered\n"
    work = str(cluster.agents[vm].state / "files")

    # The agent dies with the mount open: the job ends, and what it left in the VM (mounts,
    # the FUSE mount, loop devices) is swept when the agent starts again.
    cluster.kill_agent(vm)
    ended = cluster.wait_job(mount["id"], timeout=30)
    assert (ended["status"], ended["error_code"]) == ("Failed", "AgentDisconnected"), ended
    assert where in mounted_in(cluster, vm)
    cluster.start_agent(vm)
    assert [m for m in mounted_in(cluster, vm) if m.startswith(work)] == []
    loops = json.loads(subprocess.run(["losetup", "--list", "--json"], capture_output=True,
                                      text=True, check=True).stdout or "{}")  # fmt: skip
    assert [d for d in loops.get("loopdevices", []) if work in (d.get("back-file") or "")] == []

    # And once more, ended by the operator.
    mount = cluster.coffer("files", "mount", vm, "--rp", rp, "--disk", "root", "--ttl", "1h")
    assert mount["status"] == "InProgress", mount
    ended = cluster.coffer("files", "unmount", mount["id"])
    assert ended["status"] == "Completed", ended
    # (The agent's FUSE mount of disk files, `files/disks`, stays while it runs.)
    assert [m for m in mounted_in(cluster, vm) if m.startswith(f"{work}/mounts")] == []
