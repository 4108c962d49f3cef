"""State that must fail safe (issue 14): a damaged base index, leftovers of a crash, a full disk
under the catalog, and who may read the controller's state.

Real controller processes and a real agent. Each case is what an operator would find:
- a corrupted index of the latest recovery point: the next backup reads that disk in full and
  completes (it failed every later backup until repaired), and the damaged point says so;
- temporary chunk files a crash left in the datastore are deleted when the controller starts;
- a full file system under the catalog gives the typed `CatalogFull` (exit 1), not an internal
  error, and the controller works again once there is room;
- the state directory is 0700, the catalog and the broker's log 0600;
- a recovery point whose manifest was deleted is marked damaged when the controller starts.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("failsafe")
    disk = root / "disk.img"
    disk.write_bytes(os.urandom(3 * MiB))
    with Cluster(root / "cluster") as running:
        running.add_agent("safe-1", {"root": disk}, region="lab")
        yield running


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_controllers_state_is_private(cluster: Cluster) -> None:
    state = cluster.root / "state"
    assert _mode(state) == 0o700
    assert _mode(state / "catalog.sqlite") == 0o600
    logs = list(state.rglob("mosquitto.log"))
    assert logs, sorted(p.name for p in state.rglob("*"))[:40]
    for log in logs:
        assert _mode(log) == 0o600, log
        assert _mode(log.parent) == 0o700


def test_a_corrupted_base_index_falls_back_to_a_full_read(cluster: Cluster) -> None:
    first = cluster.backup("safe-1")
    assert first["status"] == "Completed", first
    rp = first["recovery_point_id"]
    indexes = [p for p in cluster.datastore("lab").rglob("*") if p.is_file() and rp in str(p)]
    index = next(p for p in indexes if "index" in str(p))
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index.write_bytes(bytes(data))

    second = cluster.coffer("backup-now", "safe-1")
    assert second["status"] == "Completed", second
    assert "root" in second["details"].get("full_read", {}), second["details"]
    points = {p["id"]: p for p in cluster.coffer("rp", "list", "safe-1")}
    assert points[rp]["verification"] == "damaged", points[rp]
    assert second["recovery_point_id"] in points
    # And the one after reads incrementally from the new, sound point again.
    third = cluster.coffer("backup-now", "safe-1")
    assert third["status"] == "Completed", third
    assert "full_read" not in third["details"]


def test_temporary_files_a_crash_left_are_reclaimed_at_start(cluster: Cluster) -> None:
    if not cluster.datastore("lab").exists():
        cluster.backup("safe-1")
    chunks = cluster.datastore("lab") / "chunks"
    shard = next(p for p in chunks.rglob("*") if p.is_dir())
    leftovers = [shard / ".tmp-0123456789abcdef", cluster.datastore("lab") / ".tmp-feedfacecafe"]
    cluster.stop_controller()
    for leftover in leftovers:
        leftover.write_bytes(os.urandom(4096))
    cluster.start_controller()
    assert not [p for p in leftovers if p.exists()]
    cluster.wait_online("safe-1", timeout=60)


@pytest.fixture
def small_state(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB file system of its own for a controller's state directory."""
    mount = tmp_path / "cluster" / "state"
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_under_the_catalog_is_a_typed_error(small_state: Path) -> None:
    with Cluster(small_state.parent) as full:
        full.coffer("vault", "create", "before", "--region", "lab")
        filler = small_state / "filler"
        with filler.open("wb") as f:
            try:
                while True:
                    f.write(b"\0" * (256 << 10))
                    f.flush()
            except OSError:
                pass
        try:
            refused = full.coffer(
                "vault", "create", "during", "--region", "lab", json_out=False, check=False
            )
            assert refused.returncode == 1, (refused.stdout, refused.stderr)
            assert "CatalogFull" in refused.stderr
            assert "Traceback" not in refused.stderr
        finally:
            filler.unlink()
        full.coffer("vault", "create", "after", "--region", "lab")
        names = {v["name"] for v in full.coffer("vault", "list")}
        assert names >= {"before", "after"}
        assert "during" not in names


def test_a_point_whose_manifest_was_deleted_is_marked_damaged(cluster: Cluster) -> None:
    """A deleted manifest left its recovery point listed as sound."""
    job = cluster.backup("safe-1")
    assert job["status"] == "Completed", job
    rp = job["recovery_point_id"]
    manifests = [p for p in (cluster.datastore("lab") / "manifests").rglob("*") if rp in p.name]
    assert len(manifests) == 1, manifests
    cluster.stop_controller()
    manifests[0].unlink()
    cluster.start_controller()
    points = {p["id"]: p for p in cluster.coffer("rp", "list", "safe-1")}
    assert points[rp]["verification"] == "damaged", points[rp]
    assert "manifest is gone" in points[rp]["verification_detail"]
    cluster.wait_online("safe-1", timeout=60)
