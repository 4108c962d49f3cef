"""Off-site copies through the real controller, agents and CLI, to a real SeaweedFS.

- A vault on the local datastore copies to an S3 copy target (a prefix of the session's
  SeaweedFS): the copy follows each backup as a `Copy` job; the copy of an incremental sends
  only the chunks the incremental added (counted, and their bytes); `coffer rp list` and the
  dashboard show what is copied; the copy's deletes follow the prune; with the vault's own
  datastore gone, `coffer restore --from-copy` gives the disk back byte for byte, and
  `coffer verify --from-copy` checks the copy.
- A copy job is cancelled part way, another is cut by the controller's crash, and the next
  one sends only what had not arrived.
- A second controller given the same copy target cannot write it: the lease names the holder.
- The primary on a SeaweedFS that is stopped: the restore comes from a copy on another
  SeaweedFS (a second endpoint); then the controller restarts with the copy as the vault's
  datastore, and restores from it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.bench.image import build_image, copy_image, mounted
from tests.cluster import CliError, Cluster, sha256_file
from tests.conftest import TEST_BUCKET
from tests.seaweed import SeaweedFS, start_seaweedfs

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(300)]

MiB = 1 << 20
VAULT = "eu"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ext4 image of 64 MiB, a third full."""
    root = tmp_path_factory.mktemp("copies-images")
    return build_image(root / "source.img", 64 * MiB, fill=0.35, seed=11).path


def s3_table(header: str, server: SeaweedFS, prefix: str, extra: str = "") -> str:
    """A table of the controller config for a root on the test server, as `coffer`'s user."""
    return (
        f"{header}\n"
        f'url = "s3://{TEST_BUCKET}/{prefix}"\n'
        f'endpoint = "{server.endpoint}"\n'
        'region = "us-east-1"\n'
        "allow_http = true\n"
        f'access_key_id = "{server.coffer.access_key_id}"\n'
        f'secret_access_key = "{server.coffer.secret_access_key}"\n' + extra
    )


def copy_target(server: SeaweedFS, name: str, prefix: str, *, extra: str = "") -> str:
    """A [[copy_targets]] table on the test server."""
    return s3_table(f'[[copy_targets]]\nname = "{name}"', server, prefix, extra)


def change_files(image: Path, nbytes: int, seed: int) -> None:
    with mounted(image) as root:
        (root / f"changed-{seed}.bin").write_bytes(os.urandom(nbytes))
        os.sync()


def copy_after(cluster: Cluster, backup: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    """The Copy job a backup started once it ended (and its prune), followed to its end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job in cluster.coffer("job", "list", "--operation", "Copy", "--vault", VAULT):
            if job["details"].get("after_job") == backup["id"]:
                ended: dict[str, Any] = cluster.coffer("job", "watch", job["id"], check=False)
                return ended
        time.sleep(0.2)
    raise TimeoutError(f"no copy job followed backup {backup['id']}")


def chunk_files(datastore: Path) -> dict[str, int]:
    """A local datastore's chunks: name -> stored size."""
    return {p.name: p.stat().st_size for p in (datastore / "chunks").rglob("*") if p.is_file()}


def s3_chunks(server: SeaweedFS, prefix: str) -> dict[str, int]:
    """A copy's chunks on the server: name -> stored size."""
    store = server.store(TEST_BUCKET, prefix)
    return {key.rsplit("/", 1)[-1]: store.stat(key).size for key in store.list("chunks/")}


def points(cluster: Cluster, vm: str) -> dict[str, dict[str, Any]]:
    return {rp["id"]: rp for rp in cluster.coffer("rp", "list", vm)}


# --- the flow ------------------------------------------------------------------------------------


def test_copies_follow_backups_send_only_new_chunks_mirror_prunes_and_restore_without_the_primary(
    source: Path, tmp_path: Path, seaweedfs: SeaweedFS
) -> None:
    image = tmp_path / "web-1.img"
    copy_image(source, image)
    prefix = f"copies-{os.getpid()}-{tmp_path.name}"
    config = "gc_grace_seconds = 0\n" + copy_target(seaweedfs, "offsite", prefix)
    with Cluster(tmp_path / "cluster", config=config) as cluster:
        cluster.add_agent("web-1", {"root": image}, service="shop", region="eu")
        cluster.coffer("vault", "create", VAULT, "--region", "eu")
        cluster.coffer("register", "--vault", VAULT, "web-1")
        # Weekly on another weekday, nothing daily: only the newest point is kept (as the
        # VM's latest), so the second backup's prune deletes the first.
        other = (datetime.now(UTC) + timedelta(days=3)).strftime("%a").lower()
        cluster.coffer("policy", "create", "--vault", VAULT, "Short", "--schedule",
                       f"weekly {other} 02:00", "--weekly", f"{other}:1")  # fmt: skip
        cluster.coffer("protect", "--vault", VAULT, "--policy", "Short", "web-1")
        unknown = cluster.coffer("vault", "update", VAULT, "--copy-to", "nowhere", check=False,
                                 json_out=False)  # fmt: skip
        assert unknown.returncode == 2
        assert "no copy target is named 'nowhere'" in unknown.stderr
        assert "configured: offsite" in unknown.stderr
        assert cluster.coffer("vault", "show", VAULT).get("copy_target", "") == ""
        updated = cluster.coffer("vault", "update", VAULT, "--copy-to", "offsite")
        assert updated["copy_target"] == "offsite"
        assert updated["copy_location"] == f"s3://{TEST_BUCKET}/{prefix}/{VAULT}"
        primary = cluster.datastore(VAULT)
        copy_prefix = f"{prefix}/{VAULT}"

        # The first backup: the copy job that follows it sends every chunk.
        full = cluster.backup("web-1")
        assert full["status"] == "Completed", full
        first = copy_after(cluster, full)
        assert first["status"] == "Completed", first
        assert first["details"]["copy"]["recovery_points_copied"] == 1
        assert s3_chunks(seaweedfs, copy_prefix) == chunk_files(primary)
        listed = points(cluster, "web-1")[full["recovery_point_id"]]
        assert listed["copy_target"] == "offsite", listed
        assert listed["copied_at"], listed
        board = cluster.coffer("dashboard", "--vault", VAULT)
        assert (board["recovery_points_copied"], board["recovery_points_not_copied"]) == (1, 0)
        assert board.get("copy_lag_seconds", 0) == 0
        assert board["last_copy_job"]["id"] == first["id"]
        # The same, as people read it.
        shown = cluster.coffer("dashboard", "--vault", VAULT, json_out=False).stdout
        assert "Off-site copy to offsite" in shown
        assert "copied" in cluster.coffer("rp", "list", "web-1", json_out=False).stdout
        described = cluster.coffer("job", "show", first["id"], json_out=False).stdout
        assert "Chunks sent" in described
        assert "Copy target" in described
        assert "offsite" in cluster.coffer("vault", "show", VAULT, json_out=False).stdout

        # An incremental: its copy sends exactly the chunks it added, and their bytes.
        before = chunk_files(primary)
        change_files(image, 3 * MiB, seed=1)
        changed = sha256_file(image)
        incremental = cluster.backup("web-1")
        assert incremental["status"] == "Completed", incremental
        added = {name: size for name, size in chunk_files(primary).items() if name not in before}
        assert len(added) >= 6  # 3 MiB of random data in 512 KiB chunks
        second = copy_after(cluster, incremental)
        assert second["status"] == "Completed", second
        report = second["details"]["copy"]
        assert report["recovery_points_copied"] == 1
        assert report["chunks_sent"] == len(added)
        assert report["chunk_bytes_sent"] == sum(added.values())
        # The rest is the index and manifest: a few KiB, never the disk again.
        assert int(second["bytes_sent"]) - report["chunk_bytes_sent"] < 64 << 10
        # The prune that ran after the backup deleted the full backup's point; the copy
        # deleted it there too, and collected what only it used.
        assert list(points(cluster, "web-1")) == [incremental["recovery_point_id"]]
        assert second["details"]["deleted_from_copy"] == full["recovery_point_id"]
        freed = second["details"]["copy_gc"]["chunks_deleted"]
        assert freed >= 1
        # Collected here too, the vault's datastore and its copy hold the same chunks again.
        collected = cluster.coffer("gc", "--vault", VAULT)
        assert collected["details"]["report"]["chunks_deleted"] == freed
        assert s3_chunks(seaweedfs, copy_prefix) == chunk_files(primary)

        # The vault's datastore is gone (its disk lost): the restore reads the copy.
        gone = primary.with_name(f"{VAULT}-lost")
        primary.rename(gone)
        try:
            target = cluster.agents["web-1"].restore_dir / "from-copy.img"
            with pytest.raises(CliError):  # the datastore itself cannot give it back now
                cluster.restore("web-1", incremental["recovery_point_id"], "root", target)
            restored = cluster.coffer(
                "restore", "web-1", "--rp", incremental["recovery_point_id"], "--disk", "root",
                "--target", str(target), "--from-copy",
            )  # fmt: skip
            assert restored["status"] == "Completed", restored
            assert restored["details"]["from_copy"] == "offsite"
            assert sha256_file(target) == changed
            # The copy verified, from the copy alone.
            verified = cluster.coffer("verify", "--vault", VAULT, "--from-copy")
            assert verified["status"] == "Completed", verified
            assert verified["details"]["verification"]["recovery_points_verified"] == 1
            # A file of it, from the copy too.
            listing = cluster.coffer("files", "ls", "web-1", "--rp",
                                     incremental["recovery_point_id"], "--disk", "root",
                                     "--from-copy", "/")  # fmt: skip
            assert "changed-1.bin" in {e["name"] for e in listing["entries"]}, listing
        finally:
            gone.rename(primary)

        # Damage in the copy: a verify of the copy finds it, and the next copy mends it.
        in_copy = seaweedfs.store(TEST_BUCKET, copy_prefix)
        in_copy.put(sorted(in_copy.list("chunks/"))[0], b"not what was sealed")
        damaged = cluster.coffer("verify", "--vault", VAULT, "--from-copy", check=False)
        assert damaged["status"] == "Failed", damaged
        assert damaged["error_code"] == "RecoveryPointsDamaged"
        mended = cluster.coffer("copy", "--vault", VAULT)
        assert mended["details"]["damaged_chunks_sent_again"] == 1, mended
        assert cluster.coffer("verify", "--vault", VAULT, "--from-copy")["status"] == "Completed"
        # Damage in the copy is the copy's: the vault's own points are not marked.
        assert (
            points(cluster, "web-1")[incremental["recovery_point_id"]].get("verification", "") == ""
        )

        # Nothing new: a copy by hand sends nothing.
        again = cluster.coffer("copy", "--vault", VAULT)
        assert again["status"] == "Completed", again
        assert again["details"]["copy"]["chunks_sent"] == 0
        assert int(again["bytes_sent"]) == 0

        # Deleted data (soft delete) stays in the copy until it is purged: a copy run after
        # the delete neither deletes the point there nor collects its chunks.
        kept = incremental["recovery_point_id"]
        cluster.coffer("stop-protection", "--vault", VAULT, "web-1", "--delete-data", "--yes")
        assert [p["id"] for p in cluster.coffer("rp", "list", "--deleted", "web-1")] == [kept]
        after_delete = cluster.coffer("copy", "--vault", VAULT)
        assert after_delete["status"] == "Completed", after_delete
        assert "deleted_from_copy" not in after_delete["details"], after_delete
        assert any(key.startswith(f"manifests/{kept}") for key in in_copy.list("manifests/"))
        assert s3_chunks(seaweedfs, copy_prefix) == chunk_files(primary)


def until_copies_writable(cluster: Cluster) -> None:
    """Until the controller holds the copy target's lease (the dashboard says nothing of it)."""
    deadline = time.monotonic() + 60
    while cluster.coffer("dashboard", "--vault", VAULT).get("copy_unavailable"):
        assert time.monotonic() < deadline, "the copy target's lease was not taken"
        time.sleep(0.5)


def wait_for_progress(cluster: Cluster, job_id: str, chunks: int) -> None:
    """Until a running Copy job has sent `chunks` chunks."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = cluster.coffer("job", "show", job_id)
        assert job["status"] == "InProgress", job  # it ended before it could be cut
        if job["details"].get("progress", {}).get("chunks_sent", 0) >= chunks:
            return
        time.sleep(0.1)
    raise TimeoutError(f"copy job {job_id} did not send {chunks} chunks")


def test_a_copy_cut_short_resumes_without_sending_again_what_arrived(
    tmp_path: Path, seaweedfs: SeaweedFS
) -> None:
    image = tmp_path / "big.img"
    # Incompressible, and large enough that the copy is still running when the CLI, polling
    # its progress, has seen 64 chunks arrive and cancels it (a copy to the loopback SeaweedFS
    # runs at 100 MB/s or more on a quiet machine).
    with image.open("wb") as out:
        for _ in range(768):
            out.write(os.urandom(MiB))
    prefix = f"cancel-{os.getpid()}-{tmp_path.name}"
    # One request at a time to the copy, so there is time to cut it; a short lease, so a
    # controller started after a crash takes it over soon.
    config = copy_target(
        seaweedfs, "offsite", prefix, extra="max_concurrent_requests = 1\nlease_seconds = 3\n"
    )
    copy_prefix = f"{prefix}/{VAULT}"
    with Cluster(tmp_path / "cluster", config=config) as cluster:
        cluster.add_agent("big", {"root": image}, region="eu")
        cluster.protect("big", vault=VAULT)
        backup = cluster.backup("big")
        assert backup["status"] == "Completed", backup
        total = chunk_files(cluster.datastore(VAULT))
        assert len(total) == 1536

        # Cut by a cancel: given a copy target, the vault is copied at once; that job is
        # cancelled once some chunks have arrived, and says how many.
        cluster.coffer("vault", "update", VAULT, "--copy-to", "offsite")
        # The target's lease is taken in the background: a copy before it fails at once.
        until_copies_writable(cluster)
        started = cluster.coffer("copy", "--vault", VAULT, "--no-wait")  # the one running
        wait_for_progress(cluster, started["id"], 64)
        cancelled = cluster.coffer("job", "cancel", started["id"], check=False)
        assert cancelled["status"] == "Cancelled", cancelled
        first = cancelled["details"]["copy"]
        assert 64 <= first["chunks_sent"] < len(total)
        assert first["recovery_points_copied"] == 0
        assert len(s3_chunks(seaweedfs, copy_prefix)) == first["chunks_sent"]

        # Cut by a crash: the controller is killed part way through the next copy.
        started = cluster.coffer("copy", "--vault", VAULT, "--no-wait")
        wait_for_progress(cluster, started["id"], 32)
        cluster.controller.stop(signal.SIGKILL)
        arrived = len(s3_chunks(seaweedfs, copy_prefix))
        assert first["chunks_sent"] + 32 <= arrived < len(total)
        cluster.start_controller()
        assert cluster.coffer("job", "show", started["id"])["error_code"] == "ControllerRestarted"

        # Resumed: each chunk that arrived is not sent again.
        until_copies_writable(cluster)  # the crashed controller's lease expires first
        resumed = cluster.coffer("copy", "--vault", VAULT)
        assert resumed["status"] == "Completed", resumed
        report = resumed["details"]["copy"]
        assert report["chunks_sent"] == len(total) - arrived
        assert report["chunks_already_there"] == arrived
        assert s3_chunks(seaweedfs, copy_prefix) == total
        assert points(cluster, "big")[backup["recovery_point_id"]]["copied_at"]


def test_a_second_controller_cannot_write_a_copy_target_another_holds(
    tmp_path: Path, seaweedfs: SeaweedFS, source: Path
) -> None:
    prefix = f"lease-{os.getpid()}-{tmp_path.name}"
    config = copy_target(seaweedfs, "offsite", prefix)
    image = tmp_path / "vm.img"
    copy_image(source, image)
    with (
        Cluster(tmp_path / "one", config=config) as one,
        Cluster(tmp_path / "two", config=config) as two,
    ):
        one.coffer("vault", "create", "eu-one", "--region", "eu")
        one.coffer("vault", "update", "eu-one", "--copy-to", "offsite")
        two.add_agent("vm", {"root": image}, region="eu")
        two.protect("vm", vault=VAULT)
        two.coffer("vault", "update", VAULT, "--copy-to", "offsite")
        backup = two.backup("vm")
        assert backup["status"] == "Completed", backup
        refused = copy_after(two, backup)
        assert refused["status"] == "Failed"
        assert refused["error_code"] == "DatastoreLeaseHeld"
        assert f"127.0.0.1:{one.port}" in refused["error_message"]  # the holder, named
        board = two.coffer("dashboard", "--vault", VAULT)
        assert "in use by another controller" in board["copy_unavailable"]
        assert board["recovery_points_not_copied"] == 1
        assert board["copy_lag_seconds"] > 0
        # The first controller stops: the second takes the lease over and copies.
        one.stop_controller()
        deadline = time.monotonic() + 60
        while two.coffer("dashboard", "--vault", VAULT).get("copy_unavailable"):
            assert time.monotonic() < deadline, "the lease was not taken over"
            time.sleep(0.5)
        copied = two.coffer("copy", "--vault", VAULT)
        assert copied["status"] == "Completed", copied
        assert two.coffer("dashboard", "--vault", VAULT)["recovery_points_not_copied"] == 0


@pytest.fixture
def second_endpoint(tmp_path: Path) -> Iterator[SeaweedFS]:
    """Another SeaweedFS: the other region's object store."""
    with start_seaweedfs(tmp_path / "seaweedfs-2") as server:
        server.create_bucket(TEST_BUCKET)
        yield server


def test_with_the_primary_object_store_stopped_a_restore_reads_the_copy_on_another(
    tmp_path: Path, source: Path, second_endpoint: SeaweedFS
) -> None:
    image = tmp_path / "vm.img"
    copy_image(source, image)
    with start_seaweedfs(tmp_path / "seaweedfs-1") as primary:
        primary.create_bucket(TEST_BUCKET)
        # The controller outlives its lease's renewals failing for the test's span.
        datastore = s3_table("[datastore]", primary, "primary", "lease_seconds = 600\n")
        config = datastore + copy_target(second_endpoint, "other-region", "copies")
        with Cluster(tmp_path / "cluster", config=config) as cluster:
            cluster.add_agent("vm", {"root": image}, region="eu")
            cluster.protect("vm", vault=VAULT)
            cluster.coffer("vault", "update", VAULT, "--copy-to", "other-region")
            backup = cluster.backup("vm")
            assert backup["status"] == "Completed", backup
            assert copy_after(cluster, backup)["status"] == "Completed"
            original = sha256_file(image)

            primary.stop()  # the primary region's object store is down
            target = cluster.agents["vm"].restore_dir / "vm.img"
            restored = cluster.coffer(
                "restore", "vm", "--rp", backup["recovery_point_id"], "--disk", "root",
                "--target", str(target), "--from-copy",
            )  # fmt: skip
            assert restored["status"] == "Completed", restored
            assert sha256_file(target) == original

            # The primary is gone for good: the copy becomes the vault's datastore, and the
            # controller starts on it with its catalog and master key (docs/copies.md).
            cluster.controller.stop()
            promoted = s3_table("[datastore]", second_endpoint, "copies")
            toml = cluster.root / "controller.toml"
            toml.write_text(toml.read_text().replace(config, promoted))
            cluster.start_controller()
            cluster.wait_online("vm", timeout=60)  # the agent dials the new controller again
            target.unlink()
            again = cluster.restore("vm", backup["recovery_point_id"], "root", target)
            assert again["status"] == "Completed", again
            assert sha256_file(target) == original
