"""End to end: the vault workflow as an operator walks it, with real agents in two regions.

Three VMs: `shop/web-1` and `blog/web-1` (one name in two services) in region eu-west, and
`shop/db-1` in us-east. Two vaults, one per region. The walk: create the vaults, discover (what
is and is not offered, and why), register, protect with the default policy and with a new one,
back up now, read jobs and the dashboard, stop protection retaining and deleting data, and
every restriction on the way refused with its own error. Then cancelling a queued and a
running backup, and restoring from the vault.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bench.image import build_image
from tests.cluster import Cluster, sha256_file

MiB = 1 << 20

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(300)]


HOLD_SCRIPT = """#!/bin/sh
# A backup of blog/web-1 waits here while the gate is closed (the test says so with {held}).
[ -e {gate} ] && exit 0
touch {held}
while [ ! -e {gate} ]; do sleep 0.05; done
rm -f {held}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("workflow")
    shop = build_image(root / "shop-web-1.img", 64 * MiB, fill=0.4, seed=21).path
    blog = build_image(root / "blog-web-1.img", 64 * MiB, fill=0.4, seed=22).path
    db = build_image(root / "db-1.img", 64 * MiB, fill=0.4, seed=23).path
    # A disk of incompressible data: its upload lasts long enough to be stopped in the middle
    # (test_cancel_a_queued_and_a_running_backup).
    bulk = root / "bulk.img"
    with bulk.open("wb") as f:
        # 1280 MiB: at 640 MiB a backup (about 3.5 s here) could end before the three CLI
        # calls that need it running did.
        for _ in range(1280):
            f.write(os.urandom(MiB))
    # blog/web-1's backups pass a gate in their pre-script, open unless a test closes it.
    gate = root / "gate"
    gate.touch()
    script = root / "hold.sh"
    script.write_text(HOLD_SCRIPT.format(gate=gate, held=root / "held"))
    script.chmod(0o700)
    with Cluster(root / "cluster") as running:
        running.add_agent("shop-web-1", {"root": shop}, name="web-1", service="shop",
                          region="eu-west")  # fmt: skip
        blog_agent = running.add_agent("blog-web-1", {"root": blog, "bulk": bulk}, name="web-1",
                                       service="blog", region="eu-west", start=False)  # fmt: skip
        with blog_agent.config.open("a") as config:
            config.write(f'[consistency.pre_script]\npath = "{script}"\ntimeout = 120\n')
        running.start_agent("blog-web-1")
        running.add_agent("db-1", {"root": db}, service="shop", region="us-east")
        yield running


def refused(cluster: Cluster, *args: str, code: int, says: tuple[str, ...]) -> None:
    """Run a command that must be refused with exit `code` and an error saying `says`."""
    result = cluster.coffer(*args, json_out=False, check=False)
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    for words in says:
        assert words in result.stderr


def items(cluster: Cluster, vault: str) -> dict[str, dict[str, Any]]:
    return {i["vm_id"]: i for i in cluster.coffer("items", "--vault", vault)}


def states(cluster: Cluster, vault: str) -> dict[str, str]:
    return {vm: i["state"] for vm, i in items(cluster, vault).items()}


def test_the_whole_flow_from_discovery_to_stopped_protection(cluster: Cluster) -> None:
    # --- vaults -------------------------------------------------------------------------------
    cluster.coffer("vault", "create", "eu-vault", "--region", "eu-west")
    cluster.coffer("vault", "create", "us-vault", "--region", "us-east")
    assert {v["name"]: v["region"] for v in cluster.coffer("vault", "list")} == {
        "eu-vault": "eu-west",
        "us-vault": "us-east",
    }
    refused(
        cluster,
        "vault",
        "create",
        "eu-vault",
        "--region",
        "eu-west",
        code=5,
        says=("already exists",),
    )
    # Every vault starts with the default policy: once daily, 30 days.
    (default,) = cluster.coffer("policy", "list", "--vault", "eu-vault")
    assert default["name"] == "DefaultPolicy"
    assert "daily" in default["schedule_text"]
    assert "02:00" in default["schedule_text"]
    assert default["spec"]["retention"] == {"daily": {"days": 30}}

    # --- step 1: discover ---------------------------------------------------------------------
    found = cluster.coffer("discover", "--vault", "eu-vault")
    assert found["job"]["operation"] == "Discovery"
    assert found["job"]["status"] == "Completed"
    offered = {(vm["service"], vm["name"], vm["region"], vm["online"]) for vm in found["vms"]}
    assert offered == {("shop", "web-1", "eu-west", True), ("blog", "web-1", "eu-west", True)}
    assert [vm["vm_id"] for vm in cluster.coffer("discover", "--vault", "us-vault")["vms"]] == [
        "db-1"
    ]
    assert {d["name"] for vm in found["vms"] for d in vm["disks"]} == {"root", "bulk"}

    # --- step 2: register ---------------------------------------------------------------------
    refused(
        cluster,
        "register",
        "--vault",
        "eu-vault",
        "web-1",
        code=2,
        says=("AmbiguousVmName", "blog, shop"),
    )
    refused(
        cluster,
        "register",
        "--vault",
        "eu-vault",
        "db-1",
        code=5,
        says=("UserErrorRegionMismatch", "us-east"),
    )
    refused(cluster, "register", "--vault", "eu-vault", "nobody", code=4, says=("VmNotFound",))
    jobs = cluster.coffer("register", "--vault", "eu-vault", "shop/web-1", "blog/web-1")
    assert [(j["operation"], j["status"], j["item"]) for j in jobs] == [
        ("Register", "Completed", "shop/web-1"),
        ("Register", "Completed", "blog/web-1"),
    ]
    assert states(cluster, "eu-vault") == {"shop-web-1": "Registered", "blog-web-1": "Registered"}
    # Registered VMs are not offered again, by this vault or any other; and it says why.
    again = cluster.coffer("discover", "--vault", "eu-vault")
    assert again["vms"] == []
    assert "already registered" in again["notes"][0]
    refused(
        cluster,
        "register",
        "--vault",
        "us-vault",
        "shop/web-1",
        code=5,
        says=("UserErrorVmAlreadyRegistered",),
    )
    cluster.coffer("register", "--vault", "us-vault", "db-1")
    assert "us-east" in cluster.coffer("discover", "--vault", "us-vault")["notes"][0]

    # --- step 3: protect ----------------------------------------------------------------------
    refused(
        cluster, "policy", "create", "--vault", "eu-vault", "Bad",
        "--schedule", "weekly sun 03:00", "--weekly", "mon:4",
        code=2, says=("InvalidPolicy", "Mon"),
    )  # fmt: skip
    protect = cluster.coffer(
        "protect", "--vault", "eu-vault", "blog/web-1", "--new-policy", "Gold",
        "--schedule", "daily 01:00,13:00 tz=Europe/Berlin", "--daily", "7",
        "--weekly", "sun:4", "--monthly", "last-sun:12", "--yearly", "jan:first-sun:5",
    )  # fmt: skip
    assert [(j["operation"], j["status"]) for j in protect] == [
        ("ConfigureProtection", "Completed")
    ]
    cluster.coffer("protect", "--vault", "eu-vault", "--policy", "DefaultPolicy", "shop/web-1")
    # Choosing an existing policy does not let the caller change its retention.
    refused(
        cluster, "protect", "--vault", "us-vault", "--policy", "DefaultPolicy", "--daily", "3",
        "db-1",
        code=2, says=("coffer policy edit",),
    )  # fmt: skip
    refused(
        cluster,
        "protect",
        "--vault",
        "us-vault",
        "shop/web-1",
        code=4,
        says=("UserErrorVmNotRegistered",),
    )
    cluster.coffer("protect", "--vault", "us-vault", "db-1")
    listed = items(cluster, "eu-vault")
    assert {vm: (i["state"], i["policy"]) for vm, i in listed.items()} == {
        "shop-web-1": ("Protected (pending initial backup)", "DefaultPolicy"),
        "blog-web-1": ("Protected (pending initial backup)", "Gold"),
    }
    assert all(i["next_backup_at"] for i in listed.values())
    gold = cluster.coffer("policy", "show", "--vault", "eu-vault", "Gold")
    assert gold["vms"] == ["blog-web-1"]
    assert "Europe/Berlin" in gold["schedule_text"]
    refused(
        cluster, "policy", "delete", "--vault", "eu-vault", "Gold", code=5, says=("PolicyInUse",)
    )
    refused(
        cluster,
        "unregister",
        "--vault",
        "eu-vault",
        "blog/web-1",
        code=5,
        says=("stop its protection first",),
    )

    # --- initial backup: backup now -----------------------------------------------------------
    backups = cluster.coffer("backup-now", "--vault", "eu-vault", "shop/web-1", "blog/web-1")
    assert [(j["item"], j["status"]) for j in backups] == [
        ("shop/web-1", "Completed"),
        ("blog/web-1", "Completed"),
    ]
    db_backup = cluster.coffer("backup-now", "db-1")
    assert db_backup["status"] == "Completed", db_backup
    assert states(cluster, "eu-vault") == {"shop-web-1": "Protected", "blog-web-1": "Protected"}
    assert states(cluster, "us-vault") == {"db-1": "Protected"}
    points = cluster.coffer("rp", "list", "--vault", "eu-vault")
    assert {p["vm_id"] for p in points} == {"shop-web-1", "blog-web-1"}
    # The rules keeping each point are recorded; a backup taken now is at least a daily one.
    assert all("daily" in p["kept_by"] for p in points)
    refused(cluster, "rp", "list", "web-1", code=2, says=("service/name",))

    # --- jobs -----------------------------------------------------------------------------------
    registered = cluster.coffer("job", "list", "--operation", "Register", "--vault", "eu-vault")
    assert {j["item"] for j in registered} == {"shop/web-1", "blog/web-1"}
    assert {j["vault"] for j in cluster.coffer("job", "list", "--vault", "us-vault")} == {
        "us-vault"
    }
    operations = {j["operation"] for j in cluster.coffer("job", "list", "--vault", "eu-vault")}
    assert {"Discovery", "Register", "ConfigureProtection", "Backup"} <= operations
    assert cluster.coffer("job", "list", "--status", "Failed", "--vault", "eu-vault") == []
    assert cluster.coffer("job", "list", "--from", "2999-01-01") == []
    assert cluster.coffer("job", "list", "--to", "2000-01-01") == []
    completed = cluster.coffer(
        "job", "list", "--status", "Completed", "--operation", "Backup", "--vault", "eu-vault"
    )
    assert len(completed) == 2
    # A Prune job follows each backup, as the README says, though it had nothing to delete.
    prunes = cluster.coffer("job", "list", "--operation", "Prune", "--vault", "eu-vault")
    assert sorted(p["details"]["after_job"] for p in prunes) == sorted(j["id"] for j in backups)
    assert [(p["status"], p["details"]["deleted_recovery_points"]) for p in prunes] == [
        ("Completed", [])
    ] * 2

    # --- dashboard ------------------------------------------------------------------------------
    board = cluster.coffer("dashboard", "--vault", "eu-vault")
    assert board["protected_items"] == 2
    assert board["recovery_points"] == 2
    assert board["jobs_failed_24h"] == 0
    assert board["jobs_in_progress"] == 0
    # Discovery x2, Register x2, ConfigureProtection x2, Backup x2 and the Prune that follows
    # each backup (refused calls make no job).
    assert board["jobs_completed_24h"] == 10
    assert board["stored_bytes"] > 0
    assert board["dedup_ratio"] > 1.0  # zstd-compressed text and binaries: more data than bytes

    # --- manage: stop (retain), resume, stop (delete), unregister -------------------------------
    refused(cluster, "vault", "delete", "eu-vault", code=5, says=("VaultNotEmpty",))
    stop = cluster.coffer("stop-protection", "--vault", "eu-vault", "shop/web-1", "--retain-data")
    assert [(j["operation"], j["status"]) for j in stop] == [("StopProtection", "Completed")]
    shop = items(cluster, "eu-vault")["shop-web-1"]
    # A stopped VM keeps its policy's name (to resume with), but is not backed up or pruned.
    assert (shop["state"], shop["policy"], shop["recovery_points"]) == (
        "ProtectionStopped",
        "DefaultPolicy",
        1,
    )
    assert not shop["next_backup_at"]
    refused(
        cluster,
        "backup-now",
        "shop/web-1",
        code=5,
        says=("resume its protection", "coffer resume-protection --vault eu-vault shop/web-1"),
    )
    refused(
        cluster, "protect", "--vault", "eu-vault", "shop/web-1", code=5, says=("resume-protection",)
    )
    cluster.coffer("resume-protection", "--vault", "eu-vault", "shop/web-1", "--policy", "Gold")
    assert items(cluster, "eu-vault")["shop-web-1"]["state"] == "Protected"
    # Resuming without naming a policy brings the VM's own back: moving it to DefaultPolicy
    # would prune what Gold's weekly, monthly and yearly rules keep.
    cluster.coffer("stop-protection", "--vault", "eu-vault", "shop/web-1", "--retain-data")
    assert items(cluster, "eu-vault")["shop-web-1"]["policy"] == "Gold"
    (resumed,) = cluster.coffer("resume-protection", "--vault", "eu-vault", "shop/web-1")
    assert resumed["details"] == {"policy": "Gold"}
    shop = items(cluster, "eu-vault")["shop-web-1"]
    assert (shop["state"], shop["policy"]) == ("Protected", "Gold")
    # Nor does protecting a protected VM without naming a policy move it anywhere.
    refused(
        cluster,
        "protect",
        "--vault",
        "eu-vault",
        "shop/web-1",
        code=2,
        says=("already protected by policy 'Gold'", "--policy"),
    )
    assert items(cluster, "eu-vault")["shop-web-1"]["policy"] == "Gold"

    # Deleting backup data is asked for explicitly, and only one of the two may be chosen.
    refused(cluster, "stop-protection", "--vault", "eu-vault", "blog/web-1", "--delete-data",
            code=2, says=("--yes",))  # fmt: skip
    refused(cluster, "stop-protection", "--vault", "eu-vault", "blog/web-1", "--delete-data",
            "--retain-data", "--yes", code=2, says=("choose one",))  # fmt: skip
    assert items(cluster, "eu-vault")["blog-web-1"]["state"] == "Protected"
    stopped = cluster.coffer(
        "stop-protection", "--vault", "eu-vault", "blog/web-1", "--delete-data", "--yes"
    )
    assert [(j["operation"], j["status"]) for j in stopped] == [
        ("StopProtection", "Completed"),
        ("DeleteBackupData", "Completed"),
    ]
    assert cluster.coffer("rp", "list", "blog-web-1") == []
    assert items(cluster, "eu-vault")["blog-web-1"]["state"] == "Registered"
    cluster.coffer("unregister", "--vault", "eu-vault", "blog/web-1")
    assert "blog-web-1" not in items(cluster, "eu-vault")
    # Unregistered, it is offered again.
    assert [vm["vm_id"] for vm in cluster.coffer("discover", "--vault", "eu-vault")["vms"]] == [
        "blog-web-1"
    ]
    # A policy no protected VM uses can go; a stopped VM that kept it forgets it, and then
    # resumes only with a policy named.
    cluster.coffer("stop-protection", "--vault", "eu-vault", "shop/web-1", "--retain-data")
    deleted = cluster.coffer("policy", "delete", "--vault", "eu-vault", "Gold")
    assert deleted["vms"] == ["shop-web-1"]
    assert [p["name"] for p in cluster.coffer("policy", "list", "--vault", "eu-vault")] == [
        "DefaultPolicy"
    ]
    assert items(cluster, "eu-vault")["shop-web-1"]["policy"] == ""
    refused(
        cluster,
        "resume-protection",
        "--vault",
        "eu-vault",
        "shop/web-1",
        code=2,
        says=("no policy to resume with", "--policy"),
    )


def test_restore_from_the_vault_and_space_comes_back(cluster: Cluster) -> None:
    agent = cluster.agents["db-1"]
    rp = cluster.coffer("rp", "list", "db-1")[-1]
    target = agent.restore_dir / "db-1.img"
    restored = cluster.restore("db-1", rp["id"], "root", target)
    assert restored["status"] == "Completed"
    assert sha256_file(target) == sha256_file(agent.disks["root"])


def test_cancel_a_queued_and_a_running_backup(cluster: Cluster) -> None:
    """A vault running one backup at a time queues the next; a queued backup cancels at once,
    a running one stops mid-upload. Neither leaves a recovery point; later backups complete.

    Deterministic on a loaded machine: the running backup is held in its pre-script (a gate
    the test closes) while the queued one is dealt with, and its agent is stopped (SIGSTOP) a
    little way into the upload while the cancel is sent, so the cancel lands mid-upload
    however fast or slow the machine is."""
    # Both eu-west VMs move to a vault with a single backup slot.
    cluster.coffer("stop-protection", "--vault", "eu-vault", "shop/web-1", "--delete-data", "--yes")
    cluster.coffer("unregister", "--vault", "eu-vault", "shop/web-1")
    cluster.coffer("vault", "create", "lab-vault", "--region", "eu-west",
                   "--max-concurrent-backups", "1")  # fmt: skip
    cluster.coffer("register", "--vault", "lab-vault", "shop/web-1", "blog/web-1")
    cluster.coffer("protect", "--vault", "lab-vault", "shop/web-1", "blog/web-1")
    before = {p["id"] for p in cluster.coffer("rp", "list")}
    gate = cluster.root.parent / "gate"
    held = cluster.root.parent / "held"
    agent = cluster.agents["blog-web-1"].process

    gate.unlink()
    try:
        # blog/web-1 holds the slot, running (in its pre-script) until the gate opens.
        slow = cluster.coffer("backup-now", "blog/web-1", "--no-wait")[0]
        _wait(held.exists)
        assert _phase(cluster, slow["id"]) != "Queued"
        queued = cluster.coffer("backup-now", "shop/web-1", "--no-wait")[0]
        assert _phase(cluster, queued["id"]) == "Queued"
        refused(cluster, "backup-now", "shop/web-1", code=5, says=("OperationInProgress",))
        cancelled = cluster.coffer("job", "cancel", queued["id"])
        assert (cancelled["status"], cancelled["error_code"]) == ("Cancelled", "JobCancelled")
        assert int(cancelled["bytes_read"]) == 0  # it never started

        # Let it go, and stop its agent once it has read 96 MiB of its 704: mid-upload.
        start = _chars_read(agent.pid)
        gate.touch()
        _wait(lambda: _chars_read(agent.pid) - start >= 96 * MiB, poll=0.002)
        os.kill(agent.pid, signal.SIGSTOP)
        try:
            answers: list[Any] = []
            cancel = threading.Thread(
                target=lambda: answers.append(cluster.coffer("job", "cancel", slow["id"]))
            )
            cancel.start()
            # The cancel is down the agent's session before the agent runs again.
            _wait(lambda: cluster.coffer("job", "show", slow["id"])["status"] == "Cancelling")
        finally:
            os.kill(agent.pid, signal.SIGCONT)
        cancel.join(120)
    finally:
        gate.touch()
    [stopped] = answers
    assert (stopped["status"], stopped["error_code"]) == ("Cancelled", "JobCancelled")
    assert stopped["recovery_point_id"] == ""
    # Stopped in the middle: some of its data uploaded, not all.
    assert 0 < int(stopped["bytes_stored"]) < 640 * MiB, stopped
    # Shown as it is: no recovery point, and what it uploaded labelled as not kept.
    shown = cluster.coffer("job", "show", slow["id"], json_out=False).stdout
    assert "no recovery point was created" in shown
    assert "Recovery point" not in shown
    assert "Bytes stored" not in shown
    assert "Uploaded, not kept" in shown
    refused(cluster, "job", "cancel", slow["id"], code=5, says=("already ended",))

    # The queue drains one backup at a time, and both complete.
    done = cluster.coffer("backup-now", "shop/web-1", "blog/web-1")
    assert [j["status"] for j in done] == ["Completed", "Completed"]
    _, second = sorted(done, key=lambda j: j["started_at"])
    assert second["details"].get("phase") is None
    new = {p["id"] for p in cluster.coffer("rp", "list")} - before
    assert new == {j["recovery_point_id"] for j in done}
    board = cluster.coffer("dashboard", "--vault", "lab-vault")
    # Register x2, ConfigureProtection x2, Backup x2, and a Prune after each backup.
    assert (board["jobs_cancelled_24h"], board["jobs_completed_24h"]) == (2, 8)


def _chars_read(pid: int) -> int:
    """Bytes process `pid` has read so far, by any means (/proc/PID/io `rchar`)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no rchar in /proc/{pid}/io")


def _phase(cluster: Cluster, job_id: str) -> str:
    job = cluster.coffer("job", "show", job_id)
    return str(job["details"].get("phase", "")) + (
        "" if job["status"] == "InProgress" else job["status"]
    )


def _wait(condition: Any, timeout: float = 30.0, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(poll)
