"""Soft-deleted recovery points in the datastore, and the descriptions it keeps of its catalog.

Every test runs on a local directory and on S3 (a real SeaweedFS), each plain (format 1) and
encrypted (format 2). A soft-deleted point is not live (the commit-point rule), keeps its
chunks through garbage collection, comes back byte for byte, and goes for good when purged; a
move cut short leaves the point live; a point moved while a collection marks keeps its chunks.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller.datastore import (
    ChunkGuard,
    Datastore,
    LocalDirectoryStore,
    MasterKey,
    ObjectStore,
    collect_garbage,
    open_object_store,
)
from controller.datastore.deleted import Deletion, Tombstone
from controller.datastore.description import (
    ItemDescription,
    PointDescription,
    PolicyDescription,
    VaultDescription,
    VmDescription,
)
from controller.datastore.store import deleted_key, index_key, manifest_key
from shared.errors import CorruptData, NotFound, UnsupportedFormat
from shared.policy import default_policy
from tests.conftest import TEST_BUCKET
from tests.seaweed import SeaweedFS
from tests.test_datastore import CHUNK, back_up, restore
from tests.test_gc import NO_GRACE, digests, gc, image, stored


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "s3":
        server: SeaweedFS = request.getfixturevalue("seaweedfs")
        return open_object_store(server.url(TEST_BUCKET, tmp_path.name), server.settings())
    return LocalDirectoryStore(tmp_path / "store")


@pytest.fixture(params=["plain", "encrypted"])
def store(request: pytest.FixtureRequest, backend: ObjectStore) -> Datastore:
    if request.param == "plain":
        return Datastore.create(backend, CHUNK)
    return Datastore.create(backend, CHUNK, master=MasterKey.generate(), vault="default")


@pytest.fixture
def guard() -> ChunkGuard:
    return ChunkGuard()


DELETED_AT = datetime(2026, 3, 1, 2, 0, 0, 123456, tzinfo=UTC).timestamp() + 1e-7


def deletion(**changes: object) -> Deletion:
    fields: dict[str, object] = {
        "deleted_at": DELETED_AT,
        "purge_at": DELETED_AT + timedelta(days=14).total_seconds(),
        "job_id": "job-delete",
        "policy": "Gold",
        "kept_by": ("daily",),
        "bytes_stored": 123,
        "data_bytes": 456,
    }
    fields.update(changes)
    return Deletion(**fields)  # type: ignore[arg-type]


def test_a_soft_deleted_point_is_not_live_keeps_its_chunks_and_comes_back_whole(
    store: Datastore, guard: ChunkGuard
) -> None:
    rp1 = {"root": image(1, 2, 3, 0)}
    rp2 = {"root": image(1, 4)}
    store.put_manifest(back_up(store, "rp1", rp1))
    store.put_manifest(back_up(store, "rp2", rp2))
    stored_manifest = store.backend.get(manifest_key("rp1"))

    tombstone = store.soft_delete_recovery_point("rp1", deletion())
    assert (tombstone.id, tombstone.deletion) == ("rp1", deletion())
    # Not live: gone from the manifests, unreadable as a recovery point.
    assert list(store.list_recovery_point_ids()) == ["rp2"]
    assert list(store.list_deleted_ids()) == ["rp1"]
    assert not store.is_live("rp1")
    with pytest.raises(NotFound):
        store.get_manifest("rp1")
    with pytest.raises(NotFound):
        restore(store, "rp1", "root")
    # Deleting again changes nothing: the first deletion stands.
    again = store.soft_delete_recovery_point("rp1", deletion(job_id="job-again"))
    assert again.deletion.job_id == "job-delete"
    assert store.get_deleted("rp1").manifest_bytes == stored_manifest

    # A collection with no grace period keeps every chunk the deleted point needs, and its
    # indexes (they are not a failed backup's leftovers).
    report = gc(store, guard)
    assert (report.recovery_points, report.deleted_recovery_points) == (1, 1)
    assert (report.chunks_deleted, report.orphan_indexes_deleted) == (0, 0)
    assert stored(store) == digests(store, 1, 2, 3, 4)

    # Undeleted: live again, its manifest exactly as it was stored, every byte back.
    assert store.undelete_recovery_point("rp1").id == "rp1"
    assert store.backend.get(manifest_key("rp1")) == stored_manifest
    assert list(store.list_deleted_ids()) == []
    assert restore(store, "rp1", "root") == rp1["root"]
    assert store.undelete_recovery_point("rp1").id == "rp1"  # again: nothing to do

    # Deleted and purged: its tombstone and indexes go, and then its chunks with a collection.
    store.soft_delete_recovery_point("rp1", deletion())
    assert store.purge_deleted_recovery_point("rp1") is True
    assert list(store.list_deleted_ids()) == []
    assert "rp1" not in store.list_indexes()
    with pytest.raises(NotFound):
        store.undelete_recovery_point("rp1")
    freed = gc(store, guard)
    assert freed.chunks_deleted == 2
    assert stored(store) == digests(store, 1, 4)
    assert restore(store, "rp2", "root") == rp2["root"]
    assert store.purge_deleted_recovery_point("rp1") is False  # already gone


def test_a_move_cut_short_leaves_the_point_live(store: Datastore, guard: ChunkGuard) -> None:
    """A soft delete that stopped after its tombstone, an undelete that stopped after its
    manifest: both leave a tombstone beside a live manifest. Live wins everywhere."""
    rp = {"root": image(5, 6)}
    manifest = back_up(store, "rp", rp)
    store.put_manifest(manifest)
    stale = Tombstone(store.backend.get(manifest_key("rp")), manifest, deletion())
    store.backend.put(deleted_key("rp"), stale.encode())

    assert list(store.list_recovery_point_ids()) == ["rp"]
    assert store.is_live("rp")
    report = gc(store, guard)
    assert (report.recovery_points, report.deleted_recovery_points, report.chunks_deleted) == (
        1,
        0,
        0,
    )
    # A purge of it removes only the stale tombstone; an undelete does the same.
    assert store.purge_deleted_recovery_point("rp") is False
    assert list(store.list_deleted_ids()) == []
    store.backend.put(deleted_key("rp"), stale.encode())
    store.undelete_recovery_point("rp")
    assert list(store.list_deleted_ids()) == []
    assert restore(store, "rp", "root") == rp["root"]

    # A purge that stopped after its tombstone: the indexes left are a leftover, and a purge
    # run again removes them.
    store.soft_delete_recovery_point("rp", deletion())
    store.backend.delete(deleted_key("rp"))
    assert store.purge_deleted_recovery_point("rp") is False
    assert "rp" not in store.list_indexes()


def test_an_undelete_needs_what_the_point_needs(store: Datastore) -> None:
    rp = {"root": image(7, 8)}
    store.put_manifest(back_up(store, "rp", rp))
    store.soft_delete_recovery_point("rp", deletion())
    store.backend.delete(index_key("rp", "root"))
    with pytest.raises(NotFound):
        store.undelete_recovery_point("rp")
    assert list(store.list_deleted_ids()) == ["rp"]  # still deleted, nothing half done
    assert not store.is_live("rp")


def test_points_moved_while_a_collection_marks_keep_their_chunks(
    store: Datastore, guard: ChunkGuard
) -> None:
    """Every live point is soft-deleted, and a deleted one undeleted, right after the mark read
    its first manifest: each is found through its tombstone or its manifest, and a collection
    with no grace period deletes no chunk any of them needs."""
    images = {f"rp{n}": {"root": image(10 * n + 1, 10 * n + 2)} for n in range(4)}
    for rp_id, disks in images.items():
        store.put_manifest(back_up(store, rp_id, disks))
    store.soft_delete_recovery_point("rp3", deletion())
    moved = False

    def progress(phase: str, done: int, total: int) -> None:
        nonlocal moved
        if phase == "mark" and not moved:
            moved = True
            for rp_id in ("rp0", "rp1", "rp2"):
                store.soft_delete_recovery_point(rp_id, deletion())
            store.undelete_recovery_point("rp3")

    report = collect_garbage(store, cutoff=time.time() + NO_GRACE, guard=guard, progress=progress)
    assert moved
    assert report.chunks_deleted == 0, report
    assert report.recovery_points + report.deleted_recovery_points == 4
    for rp_id in ("rp0", "rp1", "rp2"):
        store.undelete_recovery_point(rp_id)
    for rp_id, disks in images.items():
        assert restore(store, rp_id, "root") == disks["root"]


# --- formats -------------------------------------------------------------------------------------


def test_tombstones_and_descriptions_read_back_and_refuse_what_they_do_not_know(
    store: Datastore,
) -> None:
    store.put_manifest(back_up(store, "rp", {"root": image(9)}))
    tombstone = store.soft_delete_recovery_point("rp", deletion(policy=None, kept_by=()))
    assert Tombstone.decode(tombstone.encode()) == tombstone
    with pytest.raises(CorruptData):
        Tombstone.decode(b"{not json")
    newer = tombstone.encode().replace(b'"format": 1', b'"format": 9')
    with pytest.raises(UnsupportedFormat):
        Tombstone.decode(newer)
    store.backend.put(deleted_key("rp"), b'{"format": 1}')
    with pytest.raises(CorruptData, match="tombstone of deleted recovery point rp"):
        store.get_deleted("rp")

    policy = default_policy("UTC")
    vault = VaultDescription(
        vault="eu-vault",
        region="eu-west",
        created_at=DELETED_AT,
        settings={"max_concurrent_backups": 2, "soft_delete_days": 7, "from_the_future": 1},
        policies=(PolicyDescription(policy.name, policy.to_dict(), DELETED_AT, DELETED_AT),),
        written_at=DELETED_AT,
    )
    store.put_vault_description(vault)
    assert store.get_vault_description() == vault
    vm = VmDescription(
        vm_id="web-1",
        vault="eu-vault",
        vm={"name": "web-1", "service": "shop", "region": "eu-west", "hostname": "web-1.lab"},
        item=ItemDescription("ProtectionStopped", "Gold", DELETED_AT),
        points={
            "rp-a": PointDescription(("daily", "weekly"), 1, 2, "verified", DELETED_AT),
            "rp-b": PointDescription(),
        },
        written_at=DELETED_AT,
    )
    store.put_vm_description(vm)
    [key] = store.list_vm_description_keys()
    assert store.get_vm_description(key) == vm
    # The key does not say which VM it describes.
    assert "web-1" not in key
    store.delete_vm_description("web-1")
    assert list(store.list_vm_description_keys()) == []


def test_vm_description_names_differ_between_encrypted_vaults(tmp_path: Path) -> None:
    root = tmp_path
    one = Datastore.create(
        LocalDirectoryStore(root / "a"), CHUNK, master=MasterKey.generate(), vault="a"
    )
    two = Datastore.create(
        LocalDirectoryStore(root / "b"), CHUNK, master=MasterKey.generate(), vault="b"
    )
    plain = Datastore.create(LocalDirectoryStore(root / "c"), CHUNK)
    keys = {d.vm_description_key("web-1") for d in (one, two, plain)}
    assert len(keys) == 3
