"""`coffer files`: single files of recovery points, end to end through the CLI.

A real controller, datastore and agents (`tests.cluster`), and disk images with known content
(`tests.recovery_images`: an ext4 disk, an XFS disk, and a GPT disk with an ext4 and an XFS
partition) backed up as any VM's disks. Then, as an operator would:

- `ls` of directories with their metadata (names that are not UTF-8 shown escaped, links with
  their targets), of a partitioned disk's `/` (its partitions) and of a partition;
- `get` of files and whole trees (symlinks, hard links, a sparse file, a large file, other
  owners and modes, times to the nanosecond) compared with the manifest taken when the file
  system was written, to the source VM and to another VM of the region (`--target-vm`), with
  a small fraction of the disk fetched for one small file;
- refusals that change nothing: a destination outside `restore_dirs` (exit 6), a path that is
  not there (exit 4), a target VM of another region (exit 5);
- `mount` kept open (the job InProgress, its details saying where and until when) and closed
  by its TTL, one closed by `coffer files unmount`, and mounts ended by a killed agent and by a
  controller restart, with nothing left mounted or attached afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster
from tests.loopfs import run
from tests.recovery_content import LARGE, ODD_NAME, SPARSE, allocated, manifest
from tests.recovery_images import BuiltImage, build_images

MiB = 1 << 20
SOURCE = "files-src"
OTHER = "files-other"  # same region: a --target-vm
FOREIGN = "files-far"  # another region

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuiltImage]:
    return build_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, images: dict[str, BuiltImage]
) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("files")) as running:
        running.add_agent(SOURCE, {kind: image.path for kind, image in images.items()},
                          region="eu")  # fmt: skip
        running.add_agent(OTHER, {}, region="eu")
        running.add_agent(FOREIGN, {}, region="us")
        yield running
        for vm in (SOURCE, OTHER):
            assert leftovers(running, vm) == [], running.agents[vm].process.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def rp(cluster: Cluster) -> str:
    job = cluster.backup(SOURCE)
    assert job["status"] == "Completed", job
    return str(job["recovery_point_id"])


def work_dir(cluster: Cluster, vm: str) -> Path:
    return cluster.root / f"state-{vm}" / "files"


def mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as table:
        return [line.split()[4] for line in table]


def leftovers(cluster: Cluster, vm: str) -> list[str]:
    """File systems mounted, and loop devices attached, for the agent's file recovery."""
    where = str(work_dir(cluster, vm))
    mounted = [m for m in mountpoints() if m.startswith(where) and m != f"{where}/disks"]
    listing = json.loads(run("losetup", "--list", "--json", "--output", "NAME,BACK-FILE") or "{}")
    loops = [
        d["name"] for d in listing.get("loopdevices", []) if where in (d.get("back-file") or "")
    ]
    return mounted + loops


def coffer(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a person runs it: its table output and exit code."""
    result: subprocess.CompletedProcess[str] = cluster.coffer(*args, json_out=False, check=False)
    return result


def files(cluster: Cluster, action: str, rp: str, disk: str, *args: str) -> Any:
    return cluster.coffer("files", action, SOURCE, "--rp", rp, "--disk", disk, *args)


def expected(
    image: BuiltImage, fs: str, names: list[str] | None = None
) -> dict[str, tuple[object, ...]]:
    """What a copy of `names` (default: every top-level entry) of file system `fs` holds: its
    manifest as written, without what a copy does not create (the FIFO) or was not asked."""
    found = image.manifests[fs]
    return {
        path: record
        for path, record in found.items()
        if path.split("/")[0] != "lost+found"
        and record[0] != 0o010000
        and (names is None or path.split("/")[0] in names)
    }


def copied(root: Path) -> dict[str, tuple[object, ...]]:
    return {path: record for path, record in manifest(root).items() if record[0] != 0o010000}


# --- ls ------------------------------------------------------------------------------------


def test_ls_lists_names_types_sizes_times_modes_and_owners(
    cluster: Cluster, rp: str, images: dict[str, BuiltImage]
) -> None:
    listing = files(cluster, "ls", rp, "ext4", "/home/alice")
    assert listing["job"]["status"] == "Completed"
    assert listing["job"]["operation"] == "FileRecovery"
    by_name = {e["name"]: e for e in listing["entries"]}
    assert list(by_name) == ["bin", "notes.txt", "shared"]
    source = images["ext4"].manifests["disk"]
    for name, entry in by_name.items():
        _kind, mode, uid, gid, mtime_ns, _, size, *_ = source[f"home/alice/{name}"]
        assert entry["mode"] == mode, name
        assert (entry["uid"], entry["gid"]) == (uid, gid), name
        assert entry["mtime_ns"] == mtime_ns, name
        if entry["type"] == "file":
            assert entry["size_bytes"] == size, name
    assert by_name["bin"]["type"] == "dir"
    assert by_name["shared"]["mode_text"] == "-rwxrws---"
    links = {e["name"]: e for e in files(cluster, "ls", rp, "ext4", "/links")["entries"]}
    assert links["abs"]["link_target"] == "/etc/passwd"
    assert links["rel"]["type"] == "symlink"
    # A name that is not UTF-8, as people see it and as programs get it.
    tree = files(cluster, "ls", rp, "ext4", "/tree")["entries"]
    odd = next(e for e in tree if e["name"].startswith("caf"))
    assert odd["name"] == "caf\\xe9 menu.txt"
    assert odd["name_base64"] == "Y2Fm6SBtZW51LnR4dA=="
    shown = coffer(cluster, "files", "ls", SOURCE, "--rp", rp, "--disk", "ext4", "/tree")
    assert shown.returncode == 0, shown.stderr
    assert "caf\\xe9 menu.txt" in shown.stdout
    assert "-rw-r--r--" in shown.stdout
    job = cluster.coffer("job", "show", listing["job"]["id"])
    assert job["details"]["path"] == "/home/alice"
    assert job["details"]["entries"] == 3


def test_ls_pages_through_a_big_directory(cluster: Cluster, rp: str) -> None:
    first = files(cluster, "ls", rp, "xfs", "/tree/many", "--limit", "12")
    names = [e["name"] for e in first["entries"]]
    assert names == [f"file{i:02d}.txt" for i in range(12)]
    assert first["next_after"] == "file11.txt"
    rest = files(cluster, "ls", rp, "xfs", "/tree/many", "--after", "file11.txt")
    assert [e["name"] for e in rest["entries"]] == [f"file{i:02d}.txt" for i in range(12, 30)]
    assert rest["next_after"] is None
    table = coffer(cluster, "files", "ls", SOURCE, "--rp", rp, "--disk", "xfs", "/tree/many",
                   "--limit", "5")  # fmt: skip
    assert "--after file04.txt" in table.stdout


def test_ls_of_a_partitioned_disk_lists_its_partitions_then_their_files(
    cluster: Cluster, rp: str
) -> None:
    parts = files(cluster, "ls", rp, "gpt", "/")["entries"]
    assert [(p["name"], p["type"], p["fs_type"]) for p in parts] == [
        ("p1", "partition", "ext4"),
        ("p2", "partition", "xfs"),
    ]
    assert parts[0]["size_bytes"] == 256 * MiB
    for name in ("p1", "p2"):
        inside = {e["name"] for e in files(cluster, "ls", rp, "gpt", f"/{name}")["entries"]}
        assert {"etc", "home", "links", "tree", "which", "large.bin", "sparse.bin"} <= inside
    table = coffer(cluster, "files", "ls", SOURCE, "--rp", rp, "--disk", "gpt", "/")
    assert "Partitions of recovery point" in table.stdout
    assert "xfs" in table.stdout


# --- get -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ext4", "xfs"])
def test_get_copies_files_and_trees_with_their_metadata(
    cluster: Cluster, rp: str, images: dict[str, BuiltImage], kind: str
) -> None:
    image = images[kind]
    # Every top-level entry, the FIFO too (reported, not created).
    top = sorted({path.split("/")[0] for path in expected(image, "disk")} | {"fifo"})
    destination = cluster.agents[SOURCE].restore_dir / f"all-{kind}"
    job = files(cluster, "get", rp, kind, *(f"/{name}" for name in top), "--to",
                str(destination))  # fmt: skip
    assert job["status"] == "Completed", job
    # Contents, modes, owners, times, symlinks, hard links of everything but the FIFO.
    assert copied(destination) == expected(image, "disk")
    assert not (destination / "fifo").exists()
    assert allocated(destination / "sparse.bin") < MiB
    assert os.path.getsize(destination / "sparse.bin") == SPARSE
    assert os.path.getsize(destination / "large.bin") == LARGE
    assert (destination / "tree" / ODD_NAME).read_bytes() == b"soup of the day\n"
    details = job["details"]
    assert details["copied"]["hard_links"] == 1
    assert details["copied"]["skipped"] == 1
    assert details["skipped_files"] == ["fifo"]
    assert details["copied"]["files"] >= 38
    # The job fetched what it read (less what the agent's chunk cache held), not the disk.
    assert 0 < int(job["bytes_read"]) < os.path.getsize(image.path) / 4
    assert details["bytes_fetched"] == int(job["bytes_read"])


def test_get_shows_progress_and_a_summary(cluster: Cluster, rp: str) -> None:
    destination = cluster.agents[SOURCE].restore_dir / "summary"
    shown = coffer(cluster, "files", "get", SOURCE, "--rp", rp, "--disk", "ext4", "/etc",
                   "/links", "/fifo", "--to", str(destination))  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "Copied 2 files, 2 directories and 4 symbolic links" in shown.stdout, shown.stdout
    assert "into " + str(destination) in shown.stdout
    assert "Skipped 1 special file" in shown.stdout
    assert "Fetched " in shown.stdout
    assert "from the datastore" in shown.stdout
    assert (destination / "etc" / "hosts").read_text().startswith("127.0.0.1")


def test_one_small_file_costs_a_small_fraction_of_the_disk(
    cluster: Cluster, rp: str, images: dict[str, BuiltImage]
) -> None:
    # A fresh agent: nothing of the disk in its chunk cache.
    cluster.agents[SOURCE].process.stop()
    cluster.start_agent(SOURCE)
    destination = cluster.agents[SOURCE].restore_dir / "small"
    job = files(cluster, "get", rp, "ext4", "/small.txt", "--to", str(destination))
    assert job["status"] == "Completed", job
    assert (destination / "small.txt").read_bytes().startswith(b"MARKER-OF-THE-SMALL-FILE")
    disk = os.path.getsize(images["ext4"].path)
    raw = job["details"]["raw_bytes_fetched"]
    print(
        f"one small file: {job['details']['chunks_fetched']} chunks, {raw / MiB:.1f} MiB raw, "
        f"{int(job['bytes_read']) / MiB:.2f} MiB stored of a {disk / MiB:.0f} MiB disk"
    )
    assert job["details"]["chunks_fetched"] > 0
    assert raw < 0.05 * disk


def test_get_from_a_partition_to_another_vm(
    cluster: Cluster, rp: str, images: dict[str, BuiltImage]
) -> None:
    destination = cluster.agents[OTHER].restore_dir / "from-p2"
    job = files(cluster, "get", rp, "gpt", "/p2/home", "/p2/which", "/p1/tree",
                "--to", str(destination), "--target-vm", OTHER)  # fmt: skip
    assert job["status"] == "Completed", job
    assert job["vm_id"] == OTHER
    assert job["details"]["source_vm"] == SOURCE
    home = {p: r for p, r in copied(destination).items() if p.split("/")[0] in ("home", "which")}
    assert home == expected(images["gpt"], "p2", ["home", "which"])
    tree = {p: r for p, r in copied(destination).items() if p.split("/")[0] == "tree"}
    assert tree == expected(images["gpt"], "p1", ["tree"])
    assert (destination / "which").read_text() == "p2"  # last: reading it moves its atime
    assert not any(cluster.agents[SOURCE].restore_dir.glob("from-p2*"))


def test_a_whole_partition_is_copied_under_its_name(
    cluster: Cluster, rp: str, images: dict[str, BuiltImage]
) -> None:
    destination = cluster.agents[SOURCE].restore_dir / "whole"
    job = files(cluster, "get", rp, "gpt", "/p1", "--to", str(destination))
    assert job["status"] == "Completed", job
    assert copied(destination / "p1") == expected(images["gpt"], "p1") | {
        "lost+found": copied(destination / "p1")["lost+found"]
    }


# --- refusals ------------------------------------------------------------------------------


def test_refusals_exit_with_their_codes_and_change_nothing(cluster: Cluster, rp: str) -> None:
    restore_dir = cluster.agents[SOURCE].restore_dir
    before = sorted(p.name for p in restore_dir.iterdir())
    outside = coffer(cluster, "files", "get", SOURCE, "--rp", rp, "--disk", "ext4",
                     "/etc/hosts", "--to", "/etc/coffer-files-test")  # fmt: skip
    assert outside.returncode == 6, (outside.stdout, outside.stderr)
    assert "UserErrorRestorePathNotAllowed" in outside.stderr + outside.stdout
    assert not Path("/etc/coffer-files-test").exists()
    # Refused before anything was opened or fetched.
    refused = cluster.coffer("job", "list", "--vm", SOURCE, "--operation", "FileRecovery")[0]
    assert refused["error_code"] == "UserErrorRestorePathNotAllowed"
    assert int(refused["bytes_read"]) == 0

    missing = coffer(cluster, "files", "get", SOURCE, "--rp", rp, "--disk", "ext4",
                     "/etc/no-such-file", "--to", str(restore_dir / "missing"))  # fmt: skip
    assert missing.returncode == 4, (missing.stdout, missing.stderr)
    assert "NotFound" in missing.stderr + missing.stdout
    listed = coffer(cluster, "files", "ls", SOURCE, "--rp", rp, "--disk", "ext4", "/nowhere")
    assert listed.returncode == 4, (listed.stdout, listed.stderr)
    assert "'/nowhere' was not found" in listed.stderr

    far = coffer(cluster, "files", "get", SOURCE, "--rp", rp, "--disk", "ext4", "/etc",
                 "--to", "/tmp/x", "--target-vm", FOREIGN)  # fmt: skip
    assert far.returncode == 5, (far.stdout, far.stderr)
    assert "UserErrorRegionMismatch" in far.stderr
    assert "region 'us'" in far.stderr
    far_mount = coffer(cluster, "files", "mount", SOURCE, "--rp", rp, "--disk", "ext4",
                       "--target-vm", FOREIGN)  # fmt: skip
    assert far_mount.returncode == 5, far_mount.stderr

    no_disk = coffer(cluster, "files", "ls", SOURCE, "--rp", rp, "--disk", "nope", "/")
    assert no_disk.returncode == 4, no_disk.stderr
    bad_ttl = coffer(cluster, "files", "mount", SOURCE, "--rp", rp, "--disk", "ext4",
                     "--ttl", "8d")  # fmt: skip
    assert bad_ttl.returncode == 2, bad_ttl.stderr
    assert sorted(p.name for p in restore_dir.iterdir()) == before

    # A name already at the destination: refused before anything is written (and nothing of
    # the other sources is left).
    taken = restore_dir / "taken"
    (taken / "etc").mkdir(parents=True)
    exists = coffer(cluster, "files", "get", SOURCE, "--rp", rp, "--disk", "ext4", "/home",
                    "/etc", "--to", str(taken))  # fmt: skip
    assert exists.returncode == 5, (exists.stdout, exists.stderr)
    assert "UserErrorRestoreTargetExists" in exists.stdout
    assert sorted(p.name for p in taken.iterdir()) == ["etc"]
    assert list((taken / "etc").iterdir()) == []
    assert leftovers(cluster, SOURCE) == []
    assert leftovers(cluster, FOREIGN) == []


# --- mount ---------------------------------------------------------------------------------


def wait_ended(cluster: Cluster, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = cluster.coffer("job", "show", job_id)
        if job["status"] not in ("InProgress", "Cancelling"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def test_a_mount_stays_open_and_ends_at_its_ttl(
    cluster: Cluster, rp: str, images: dict[str, BuiltImage]
) -> None:
    started = time.monotonic()
    job = files(cluster, "mount", rp, "gpt", "--ttl", "4s")
    assert job["status"] == "InProgress", job
    details = job["details"]
    assert set(details["mounts"]) == {"p1", "p2"}
    p2 = Path(details["mounts"]["p2"].removesuffix(" (xfs)"))
    assert p2.is_relative_to(work_dir(cluster, SOURCE) / "mounts")
    assert details["expires_at"] > time.time()
    assert details["ttl_seconds"] == 4
    # Open: its files read as they were written, read-only.
    assert (p2 / "which").read_text() == "p2"
    assert manifest(p2 / "home") == {
        path.removeprefix("home/"): record
        for path, record in images["gpt"].manifests["p2"].items()
        if path.startswith("home/")
    }
    with pytest.raises(OSError, match="Read-only file system"):
        (p2 / "new-file").write_text("no")
    shown = cluster.coffer("job", "show", job["id"])
    assert shown["status"] == "InProgress"
    assert "mounts" in shown["details"]
    table = coffer(cluster, "job", "show", job["id"])
    assert "Mounted at" in table.stdout
    assert "Expires" in table.stdout
    ended = wait_ended(cluster, job["id"])
    took = time.monotonic() - started
    assert ended["status"] == "Completed", ended
    assert ended["details"]["ended_by"] == "its TTL"
    assert 4 <= took < 20
    assert not p2.exists()
    assert leftovers(cluster, SOURCE) == []


def test_a_mount_ends_with_coffer_files_unmount(cluster: Cluster, rp: str) -> None:
    shown = coffer(cluster, "files", "mount", SOURCE, "--rp", rp, "--disk", "xfs", "--ttl", "1h")
    assert shown.returncode == 0, shown.stderr
    assert "coffer files unmount" in shown.stdout
    job_id = shown.stdout.split("coffer files unmount ")[1].split()[0]
    mounted = cluster.coffer("job", "show", job_id)
    where = Path(mounted["details"]["mounts"]["disk"].removesuffix(" (xfs)"))
    assert (where / "which").read_text() == "xfs"
    assert str(where) in shown.stdout
    ended = cluster.coffer("files", "unmount", job_id[:6])
    assert ended["status"] == "Completed", ended
    assert ended["details"]["ended_by"] == "coffer files unmount"
    assert not where.exists()
    assert leftovers(cluster, SOURCE) == []
    again = coffer(cluster, "files", "unmount", job_id)
    assert again.returncode == 5, again.stderr


def test_an_agent_or_controller_restart_ends_a_mount_cleanly(cluster: Cluster, rp: str) -> None:
    agent = cluster.agents[SOURCE]
    # Stopped (SIGTERM): the agent unmounts before it exits.
    job = files(cluster, "mount", rp, "ext4", "--ttl", "1h")
    assert job["status"] == "InProgress", job
    agent.process.stop()
    assert leftovers(cluster, SOURCE) == []
    ended = wait_ended(cluster, job["id"])
    assert ended["error_code"] == "AgentDisconnected", ended
    cluster.start_agent(SOURCE)

    # Killed (SIGKILL): it leaves its mounts, and sweeps them when it starts again.
    job = files(cluster, "mount", rp, "ext4", "--ttl", "1h")
    assert job["status"] == "InProgress", job
    agent.process.stop(signal.SIGKILL)
    ended = wait_ended(cluster, job["id"])
    assert ended["error_code"] == "AgentDisconnected", ended
    assert leftovers(cluster, SOURCE) != []  # what a killed agent leaves...
    cluster.start_agent(SOURCE)
    assert leftovers(cluster, SOURCE) == []  # ...is swept when it starts again

    job = files(cluster, "mount", rp, "ext4", "--ttl", "1h")
    assert job["status"] == "InProgress", job
    cluster.stop_controller()
    deadline = time.monotonic() + 30
    while leftovers(cluster, SOURCE) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(cluster, SOURCE) == []  # the agent's session ended: it unmounted
    cluster.start_controller()
    cluster.wait_online(SOURCE)
    ended = cluster.coffer("job", "show", job["id"])
    assert ended["status"] == "Failed"
    assert ended["error_code"] == "ControllerRestarted"
    assert "closed what it had opened" in ended["error_message"]
