"""Off-site copies at the datastore level: `copy_datastore` between real stores.

A source datastore in a directory, its copy in another directory or on S3 (a SeaweedFS the tests
start): what a run sends (only what the copy lacks), the order it writes in, resuming a run cut
short, mirrored deletes and the copy's garbage collection, damage in the source, key rotations,
a copy target holding another datastore, and the copy read back with the same master key.
The controller's side (jobs, schedule, CLI) is tests/test_copies.py.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from controller.datastore import (
    CONFIG_KEY,
    ChunkGuard,
    Datastore,
    FaultyStore,
    LocalDirectoryStore,
    MasterKey,
    ObjectStore,
    chunk_key,
    manifest_key,
    open_object_store,
)
from controller.datastore.copy import (
    CopyReport,
    check_copied,
    copy_datastore,
    open_copy,
    plan_copy,
)
from controller.datastore.encrypted import envelope_key_id
from shared.errors import (
    Conflict,
    CopyTargetConflict,
    DatastoreError,
    RecoveryPointNotCopied,
)
from tests.conftest import TEST_BUCKET
from tests.seaweed import SeaweedFS
from tests.test_datastore import CHUNK, back_up, chunk_of, restore

VAULT = "default"


@pytest.fixture
def master() -> MasterKey:
    return MasterKey.generate()


@pytest.fixture
def source(tmp_path: Path, master: MasterKey) -> Datastore:
    return Datastore.create(LocalDirectoryStore(tmp_path / "source"), CHUNK, master=master,
                            vault=VAULT)  # fmt: skip


@pytest.fixture(params=["local", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """Where the copy goes: another directory, or a prefix of a SeaweedFS bucket."""
    if request.param == "local":
        return LocalDirectoryStore(tmp_path / "copy")
    server: SeaweedFS = request.getfixturevalue("seaweedfs")
    return open_object_store(server.url(TEST_BUCKET, f"{tmp_path.name}-copy"), server.settings())


def commit(store: Datastore, rp_id: str, disks: dict[str, bytes], vm_id: str = "vm-1") -> None:
    manifest = replace(back_up(store, rp_id, disks), vm_id=vm_id)
    store.put_manifest(manifest)


def run(
    source: Datastore,
    target: ObjectStore,
    master: MasterKey,
    *,
    keep: tuple[str, ...] = (),
    known: dict[str, tuple[str, float]] | None = None,
    **options: Any,
) -> CopyReport:
    """A run as the controller makes one: the catalog knows every point the source holds."""
    points = sorted(source.list_recovery_point_ids())
    if known is None:
        known = {rp_id: ("vm-1", float(n)) for n, rp_id in enumerate(points)}
    return copy_datastore(
        source,
        target,
        master,
        keep=keep or tuple(points),
        known=known,
        source_guard=ChunkGuard(),
        owner="job-1",
        **options,
    )


def chunk_keys(store: ObjectStore) -> set[str]:
    return set(store.list("chunks/"))


def image(*seeds: int) -> bytes:
    return b"".join(chunk_of(seed) for seed in seeds)


# --- the plan ---------------------------------------------------------------------------------


def test_the_plan_copies_oldest_first_mirrors_deletes_and_keeps_what_the_catalog_has() -> None:
    known = {
        "a1": ("vm-a", 1.0),
        "a2": ("vm-a", 2.0),
        "a3": ("vm-a", 3.0),
        "b1": ("vm-b", 1.5),
        "b2": ("vm-b", 2.5),
        "gone": ("vm-a", 0.5),
    }
    plan = plan_copy(
        source=["a3", "a1", "a2", "b2", "b1", "x"],
        target=["a1", "old", "gone", "b1"],
        keep=["a1", "a2", "a3", "b1", "b2", "gone"],
        known=known,
    )
    assert plan.copy == ("a2", "b2", "a3", "x")  # by time; unknown ones last
    assert plan.present == ("a1", "b1")
    assert plan.delete == ("old",)  # neither in the source nor the catalog
    assert plan.only_in_copy == ("gone",)  # the source lost it, the catalog did not: kept
    # Each point's base: the newest earlier point of its VM in the copy before it.
    assert plan.bases == {"a2": "a1", "a3": "a2", "b2": "b1"}


# --- a run ------------------------------------------------------------------------------------


def test_a_copy_is_the_same_datastore_and_reads_back_with_the_same_master_key(
    source: Datastore, target: ObjectStore, master: MasterKey
) -> None:
    disk = image(1, 2, 3) + bytes(CHUNK) + image(1, 4)
    commit(source, "rp-1", {"root": disk, "data": image(5, 6)})
    report = run(source, target, master)
    assert report.copied == ("rp-1",)
    assert report.chunks_sent == 6  # 1-6, each once; the zero chunk is never stored
    assert report.config_written
    assert not report.stopped
    # The same document: same vault, keys, datastore id; chunk names match the source's.
    assert target.get(CONFIG_KEY) == source.storage.get(CONFIG_KEY)
    assert chunk_keys(target) == chunk_keys(source.storage)
    # Objects travel sealed as they are stored: byte for byte the source's.
    for key in chunk_keys(source.storage) | {manifest_key("rp-1")}:
        assert target.get(key) == source.storage.get(key)
    copy = open_copy(source, target, master)
    assert restore(copy, "rp-1", "root") == disk
    assert restore(Datastore.open(target, master=master), "rp-1", "data") == image(5, 6)
    check_copied(copy, VAULT, "rp-1")
    with pytest.raises(RecoveryPointNotCopied, match="not been copied yet"):
        check_copied(copy, VAULT, "rp-2")


def test_a_second_run_sends_only_the_chunks_the_copy_lacks(
    source: Datastore, target: ObjectStore, master: MasterKey
) -> None:
    commit(source, "rp-1", {"root": image(*range(1, 21))})
    first = run(source, target, master)
    assert first.chunks_sent == 20
    # An incremental: two chunks changed, one chunk appended.
    commit(source, "rp-2", {"root": image(1, 2, 100, *range(4, 20), 101, 102)})
    before = chunk_keys(target)
    second = run(source, target, master)
    assert second.copied == ("rp-2",)
    assert second.present == ("rp-1",)
    new = chunk_keys(source.storage) - before
    assert len(new) == second.chunks_sent == 3
    assert second.chunk_bytes_sent == sum(len(source.storage.get(key)) for key in new)
    # What rp-1 references was known from its index in the copy, not asked about one by one.
    assert second.chunks_asked == 3
    assert not second.config_written
    # A run with nothing to do sends nothing.
    third = run(source, target, master)
    assert (third.copied, third.chunks_sent, third.bytes_sent) == ((), 0, 0)


def test_a_run_cut_short_resumes_without_sending_again_what_arrived(
    source: Datastore, tmp_path: Path, master: MasterKey
) -> None:
    commit(source, "rp-1", {"root": image(*range(1, 41))})
    faulty = FaultyStore(LocalDirectoryStore(tmp_path / "copy"))
    # The copy's store fails after 15 chunks have arrived (a connection lost for good).
    faulty.fail_puts("chunks/").skip = 15
    with pytest.raises(DatastoreError):
        run(source, faulty, master)
    arrived = chunk_keys(faulty)
    assert len(arrived) == 15
    assert not faulty.has(manifest_key("rp-1"))  # not in the copy until it is whole
    faulty.clear()
    resumed = run(source, faulty, master)
    assert resumed.copied == ("rp-1",)
    assert resumed.chunks_sent == 25
    assert resumed.chunks_present == 15
    assert chunk_keys(faulty) == chunk_keys(source.storage)


def test_a_stopped_run_returns_what_it_did_and_the_next_finishes(
    source: Datastore, target: ObjectStore, master: MasterKey
) -> None:
    for n in range(3):
        commit(source, f"rp-{n}", {"root": image(*range(10 * n + 1, 10 * n + 11))})
    asked = 0

    def stop_after_two_points() -> bool:
        nonlocal asked
        asked += 1
        return len(set(target.list("manifests/"))) >= 2

    stopped = run(source, target, master, should_stop=stop_after_two_points)
    assert stopped.stopped
    assert stopped.copied == ("rp-0", "rp-1")
    finished = run(source, target, master)
    assert finished.copied == ("rp-2",)
    assert finished.chunks_sent == 10


def test_deletes_are_mirrored_and_the_copy_collects_their_chunks(
    source: Datastore, target: ObjectStore, master: MasterKey
) -> None:
    commit(source, "rp-1", {"root": image(1, 2, 3)})
    commit(source, "rp-2", {"root": image(1, 2, 4)})
    commit(source, "rp-3", {"root": image(1, 5, 6)})
    run(source, target, master)
    # rp-1 pruned (the source and the catalog); rp-3 lost from the source only.
    source.delete_recovery_point("rp-1")
    source.delete_recovery_point("rp-3")
    report = run(source, target, master, keep=("rp-2", "rp-3"), cutoff=float("inf"))
    assert report.deleted == ("rp-1",)
    assert report.only_in_copy == ("rp-3",)
    assert report.gc is not None
    assert report.gc.chunks_deleted == 1
    copy = open_copy(source, target, master)
    assert sorted(copy.list_recovery_point_ids()) == ["rp-2", "rp-3"]
    assert restore(copy, "rp-3", "root") == image(1, 5, 6)  # the copy is where it survives


def test_a_young_chunk_of_an_unfinished_copy_survives_the_copys_collection(
    source: Datastore, target: ObjectStore, master: MasterKey
) -> None:
    commit(source, "rp-1", {"root": image(1, 2)})
    run(source, target, master)
    stray = chunk_key(source.chunk_hash.digest(chunk_of(9)))
    target.put(stray, source.storage.get(chunk_key(source.chunk_hash.digest(chunk_of(1)))))
    report = run(source, target, master, collect=True, cutoff=0.0)
    assert report.gc is not None
    assert report.gc.kept_in_grace == 1
    assert target.has(stray)


def test_damage_in_the_source_is_not_copied(
    source: Datastore, target: ObjectStore, master: MasterKey
) -> None:
    commit(source, "rp-1", {"root": image(1, 2)})
    commit(source, "rp-2", {"root": image(3, 4)})
    bad = chunk_key(source.chunk_hash.digest(chunk_of(3)))
    stored = bytearray(source.storage.get(bad))
    stored[-1] ^= 1
    source.storage.put(bad, bytes(stored))
    report = run(source, target, master)
    assert report.copied == ("rp-1",)
    assert "does not authenticate" in report.not_copied["rp-2"]
    assert not target.has(bad)
    assert not target.has(manifest_key("rp-2"))


def test_a_key_rotated_in_the_source_reaches_the_copy_before_what_it_seals(
    source: Datastore, target: ObjectStore, master: MasterKey
) -> None:
    commit(source, "rp-1", {"root": image(1)})
    run(source, target, master)
    assert source.new_data_key() == 2
    commit(source, "rp-2", {"root": image(2)})
    report = run(source, target, master)
    assert report.config_written
    assert report.copied == ("rp-2",)
    assert envelope_key_id(target.get(manifest_key("rp-2"))) == 2
    assert restore(open_copy(source, target, master), "rp-2", "root") == image(2)
    # Re-wrapped under a new master key: the copy follows, and opens with the new key only.
    new_master = MasterKey.generate()
    source.rotate_master_key(new_master)
    assert run(source, target, new_master).config_written
    assert restore(Datastore.open(target, master=new_master), "rp-1", "root") == image(1)


def test_a_target_holding_another_datastore_is_refused_and_left_alone(
    source: Datastore, tmp_path: Path, master: MasterKey
) -> None:
    commit(source, "rp-1", {"root": image(1)})
    other = Datastore.create(LocalDirectoryStore(tmp_path / "other"), CHUNK, master=master,
                             vault=VAULT)  # fmt: skip
    before = other.storage.get(CONFIG_KEY)
    with pytest.raises(CopyTargetConflict, match="holds the encrypted datastore"):
        run(source, other.storage, master)
    assert other.storage.get(CONFIG_KEY) == before
    assert not chunk_keys(other.storage)
    with pytest.raises(CopyTargetConflict):
        open_copy(source, other.storage, master)


def test_a_plain_datastore_is_not_copied(tmp_path: Path, master: MasterKey) -> None:
    plain = Datastore.create(LocalDirectoryStore(tmp_path / "plain"), CHUNK)
    commit(plain, "rp-1", {"root": image(1)})
    target = LocalDirectoryStore(tmp_path / "copy")
    with pytest.raises(Conflict, match="not encrypted"):
        run(plain, target, master)
    assert not target.has(CONFIG_KEY)


def test_the_copy_reads_while_the_source_is_gone(
    source: Datastore, target: ObjectStore, master: MasterKey, tmp_path: Path
) -> None:
    disk = os.urandom(5 * CHUNK)
    commit(source, "rp-1", {"root": disk})
    run(source, target, master)
    os.rename(tmp_path / "source", tmp_path / "source-gone")
    copy = open_copy(source, target, master)  # only what the source holds in memory
    assert restore(copy, "rp-1", "root") == disk


def test_chunks_found_damaged_in_the_copy_are_sent_again_first(
    source: Datastore, target: ObjectStore, master: MasterKey
) -> None:
    commit(source, "rp-1", {"root": image(1, 2, 3)})
    commit(source, "rp-2", {"root": image(1, 2, 4)})
    run(source, target, master)
    lost, rotten = (source.chunk_hash.digest(chunk_of(n)) for n in (1, 2))
    target.delete(chunk_key(lost))
    target.put(chunk_key(rotten), b"not what was sealed")
    # A run knows rp-1's chunks are there (rp-2's base): without being told, it sends nothing.
    assert run(source, target, master).chunks_sent == 0
    report = run(source, target, master, resend=[lost, rotten])
    assert sorted(report.resent) == sorted([lost, rotten])
    assert report.chunks_sent == 2
    copy = open_copy(source, target, master)
    assert restore(copy, "rp-1", "root") == image(1, 2, 3)
    assert restore(copy, "rp-2", "root") == image(1, 2, 4)
