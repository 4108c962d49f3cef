"""Upgrading a datastore from format 1 to format 2, on real datastores, step by step.

The converter test of the format-1 fixture (written by the old code, tests/fixtures/format1):
upgraded, every recovery point restores byte-identical, and the storage ends an ordinary
format-2 datastore. Every recovery point reads at every step; a switch, a conversion and a
finish cut short are taken up again without reading a chunk twice; an unreadable chunk keeps
only its own points damaged; a prune during a conversion leaves no orphan; garbage collection
keeps both formats' chunks while the upgrade runs and reclaims the old ones after; code older
than the upgrade refuses a datastore mid-upgrade, naming its format; the dry run's plan and rate.
The controller's job (kills included) is tests/test_vault_upgrade.py's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from controller.datastore import (
    CONFIG_KEY,
    ChunkGuard,
    Datastore,
    Fault,
    FaultyStore,
    LocalDirectoryStore,
    MasterKey,
    ObjectStore,
    collect_garbage,
    manifest_key,
)
from controller.datastore.encrypted import ENVELOPE_MAGIC
from controller.datastore.legacy import LEGACY_PREFIX, LegacyLayout
from controller.datastore.store import UPGRADING_HASH, DatastoreConfig
from controller.datastore.upgrade import (
    PROBE_PREFIX,
    PointConverter,
    clean_moved,
    finish,
    lost_digest,
    measure_rate,
    pending_points,
    plan,
    switch,
)
from shared.digest import ZERO_DIGEST
from shared.errors import ChunkMissing, CorruptData, DatastoreError, UnsupportedFormat
from shared.manifest import RecoveryPointManifest
from tests.test_datastore import back_up, chunk_of, restore, upload

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "format1"
POINTS = ("rp1", "rp2")
DISKS = ("root", "data")
REPO = Path(__file__).resolve().parent.parent
MAIN_BEFORE_UPGRADES = "ddf5ebd"
"""The last commit of main without vault upgrades: its code must refuse a datastore mid-upgrade."""


def expected(rp_id: str, disk: str) -> bytes:
    return (FIXTURE / "disks" / f"{rp_id}-{disk}.img").read_bytes()


@dataclass
class Upgrading:
    """A copy of the format-1 fixture and the two datastores an upgrade of it works with."""

    root: Path
    storage: ObjectStore
    master: MasterKey
    old: Datastore
    guard: ChunkGuard = field(default_factory=ChunkGuard)
    new: Datastore | None = None
    known: dict[bytes, tuple[bytes, str]] = field(default_factory=dict)
    recorded: dict[bytes, tuple[bytes, str]] = field(default_factory=dict)

    @property
    def layout(self) -> LegacyLayout:
        assert isinstance(self.old.storage, LegacyLayout)
        return self.old.storage

    def switch(self) -> Datastore:
        def begin(storage: ObjectStore) -> Datastore:
            return Datastore.begin_upgrade(storage, self.old.config, self.master, "legacy")

        self.new = switch(self.layout, begin)
        return self.new

    def converter(self, **kwargs: object) -> PointConverter:
        assert self.new is not None

        def record(entries: object) -> None:
            assert isinstance(entries, dict)
            self.recorded.update(entries)

        return PointConverter(
            self.old,
            self.new,
            guard=self.guard,
            owner="upgrade-job",
            known=self.known,
            record=record,
            **kwargs,  # type: ignore[arg-type]
        )

    def reader(self, rp_id: str) -> Datastore:
        """Where a controller reads `rp_id` from now (controller.datastores's routing)."""
        if self.new is None:
            return self.old
        pending = set(pending_points(self.old, self.new)) if self.layout.moved else set()
        return self.old if rp_id in pending else self.new

    def check_every_point(self) -> None:
        for rp_id in POINTS:
            for disk in DISKS:
                assert restore(self.reader(rp_id), rp_id, disk) == expected(rp_id, disk), (
                    rp_id,
                    disk,
                )


def upgrading(root: Path, storage: ObjectStore | None = None) -> Upgrading:
    shutil.copytree(FIXTURE / "datastore", root)
    storage = storage or LocalDirectoryStore(root)
    found = Datastore.open(storage)
    old = Datastore(LegacyLayout(storage), found.config)
    return Upgrading(root, storage, MasterKey.generate(), old)


def files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()
    }


# --- the converter test of the stored format ---------------------------------------------------


def test_the_format_1_fixture_is_upgraded_and_restores_byte_identical(tmp_path: Path) -> None:
    up = upgrading(tmp_path / "store")
    before = files(up.root)
    up.check_every_point()
    new = up.switch()
    assert clean_moved(new) == 6  # two manifests, four indexes
    converter = up.converter()
    for rp_id in ("rp2", "rp1"):  # newest first, as the controller converts
        result = converter.convert(rp_id)
        assert result.committed, result
        assert not result.lost
    assert finish(new) == 6  # what was moved aside goes
    reopened = Datastore.open(LocalDirectoryStore(up.root), master=up.master)
    assert reopened.config.format == 2
    assert reopened.config.upgrading_from is None
    document = json.loads((up.root / CONFIG_KEY).read_bytes())
    assert (document["format"], document["hash"]) == (2, "blake3-keyed")
    assert "upgrade" not in document
    for rp_id in POINTS:
        manifest = reopened.get_manifest(rp_id)
        old = RecoveryPointManifest.decode(before[f"manifests/{rp_id}.json"])
        # Identity, time, consistency, VM and geometry are kept; only the indexes' SHA-256s
        # changed, as the indexes did (new names).
        assert manifest.consistency == "file-system"
        assert manifest == replace(
            old,
            disks=tuple(
                replace(o, index_sha256=n.index_sha256)
                for o, n in zip(old.disks, manifest.disks, strict=True)
            ),
        )
        assert all(
            o.index_sha256 != n.index_sha256 for o, n in zip(old.disks, manifest.disks, strict=True)
        )
        for disk in DISKS:
            assert restore(reopened, rp_id, disk) == expected(rp_id, disk)
    # The storage is an ordinary format-2 datastore: everything but datastore.json sealed;
    # besides, the format-1 chunks, which garbage collection reclaims (below).
    plain_chunks = {key for key in before if key.startswith("chunks/")}
    for name, data in files(up.root).items():
        if name == CONFIG_KEY or name in plain_chunks:
            continue
        assert data.startswith(ENVELOPE_MAGIC), name
    assert not any(name.startswith(LEGACY_PREFIX) for name in files(up.root))
    report = collect_garbage(reopened, cutoff=float("inf"), guard=ChunkGuard())
    assert report.chunks_deleted == len(plain_chunks)
    assert not plain_chunks & set(files(up.root))
    for rp_id in POINTS:
        for disk in DISKS:
            assert restore(reopened, rp_id, disk) == expected(rp_id, disk)


def test_every_recovery_point_reads_at_every_step(tmp_path: Path) -> None:
    up = upgrading(tmp_path / "store")
    up.check_every_point()
    new = up.switch()
    up.check_every_point()  # moved aside, old keys not cleaned
    clean_moved(new)
    up.check_every_point()
    converter = up.converter()
    assert converter.convert("rp2").committed
    assert up.reader("rp1") is up.old
    assert up.reader("rp2") is new
    up.check_every_point()  # one in each format
    assert converter.convert("rp1").committed
    up.check_every_point()
    finish(new)
    up.check_every_point()


# --- stopped at any point, taken up again ---------------------------------------------------------


def test_a_switch_cut_short_leaves_format_1_and_starts_over(tmp_path: Path) -> None:
    faulty = FaultyStore(LocalDirectoryStore(tmp_path / "store"))
    up = upgrading(tmp_path / "store", faulty)
    faulty.fail_put(3, prefix=LEGACY_PREFIX)
    with pytest.raises(DatastoreError, match="injected fault"):
        up.switch()
    # Nothing changed for its readers: still format 1, not moved, every point where it was.
    assert not up.layout.moved
    assert json.loads((up.root / CONFIG_KEY).read_bytes())["format"] == 1
    up.check_every_point()
    # A recovery point deleted in between (a prune) is not brought back by the stale copy.
    up.old.delete_recovery_point("rp1")
    new = up.switch()
    assert pending_points(up.old, new) == ["rp2"]
    clean_moved(new)
    assert up.converter().convert("rp2").committed
    finish(new)
    for disk in DISKS:
        assert restore(new, "rp2", disk) == expected("rp2", disk)


def test_a_conversion_cut_short_resumes_without_reading_a_chunk_twice(tmp_path: Path) -> None:
    counting = FaultyStore(LocalDirectoryStore(tmp_path / "store"))
    reads = counting.inject(Fault("get", "chunks/", times=0))  # counts, never fires
    up = upgrading(tmp_path / "store", counting)
    new = up.switch()
    clean_moved(new)
    asked = iter(range(100))
    # Stopped at the first chunk of rp1's second disk, its first disk converted.
    stopped = up.converter().convert("rp1", should_stop=lambda: next(asked) >= 3)
    assert stopped.stopped
    assert not stopped.committed
    assert len(up.recorded) == 3  # what was durable was recorded before it returned
    first = reads.seen
    assert up.reader("rp1") is up.old  # still read from format 1
    up.check_every_point()
    # A restarted controller: the recorded names, a new converter.
    up.known = dict(up.recorded)
    converter = up.converter()
    before = reads.seen
    for rp_id in ("rp1", "rp2"):
        assert converter.convert(rp_id).committed
    distinct = {
        d
        for rp_id in POINTS
        for index in up.old.get_indexes(up.old.get_manifest(rp_id))
        for d in index.iter_digests()
        if d != ZERO_DIGEST
    }
    # Every distinct chunk was read once, whichever run read it.
    assert first + (reads.seen - before) == len(distinct)
    finish(new)
    up.check_every_point()


def test_finishing_cut_short_finishes_when_run_again(tmp_path: Path) -> None:
    faulty = FaultyStore(LocalDirectoryStore(tmp_path / "store"))
    up = upgrading(tmp_path / "store", faulty)
    new = up.switch()
    clean_moved(new)
    converter = up.converter()
    for rp_id in POINTS:
        converter.convert(rp_id)
    faulty.inject(Fault("delete", LEGACY_PREFIX, skip=2))
    with pytest.raises(DatastoreError):
        finish(new)
    assert json.loads((up.root / CONFIG_KEY).read_bytes())["hash"] == UPGRADING_HASH
    up.check_every_point()
    finish(new)
    assert json.loads((up.root / CONFIG_KEY).read_bytes())["hash"] == "blake3-keyed"
    up.check_every_point()


# --- damage, prunes, garbage collection -----------------------------------------------------------


def test_an_unreadable_chunk_keeps_only_its_points_damaged(tmp_path: Path) -> None:
    up = upgrading(tmp_path / "store")
    rp2 = up.old.get_indexes(up.old.get_manifest("rp2"))
    rp1 = up.old.get_indexes(up.old.get_manifest("rp1"))
    only_rp2 = next(iter(next(rp2).referenced() - next(rp1).referenced()))
    (up.root / "chunks" / only_rp2.hex()[:2] / only_rp2.hex()[2:4] / only_rp2.hex()).unlink()
    new = up.switch()
    clean_moved(new)
    converter = up.converter()
    damaged = converter.convert("rp2")
    assert damaged.committed
    assert damaged.lost == {only_rp2: "missing"}
    assert damaged.lost_at == {only_rp2: ("root", 1)}
    assert converter.convert("rp1").committed
    finish(new)
    # rp1 whole; rp2 whole but for that chunk, which now has a name no content has.
    for disk in DISKS:
        assert restore(new, "rp1", disk) == expected("rp1", disk)
    assert restore(new, "rp2", "data") == expected("rp2", "data")
    assert new.get_index("rp2", "root").digest_at(1) == lost_digest(only_rp2)
    with pytest.raises(ChunkMissing):
        restore(new, "rp2", "root")


def test_a_prune_during_a_conversion_leaves_no_orphan(tmp_path: Path) -> None:
    up = upgrading(tmp_path / "store")
    new = up.switch()
    clean_moved(new)
    written = []

    def prune_meanwhile(should_stop: object) -> None:
        written.append(1)
        if len(written) == 1:  # after the first object: as controller.datastores deletes
            up.old.delete_recovery_point("rp1")
            new.delete_recovery_point("rp1")

    result = up.converter(on_object=prune_meanwhile).convert("rp1")
    assert result.gone
    assert not result.committed
    assert not new.backend.has(manifest_key("rp1"))
    assert "rp1" not in set(new.list_recovery_point_ids())


def test_garbage_collection_mid_upgrade_keeps_both_formats(tmp_path: Path) -> None:
    up = upgrading(tmp_path / "store")
    new = up.switch()
    clean_moved(new)
    assert up.converter().convert("rp2").committed
    # A new backup in format 2 beside them, and garbage: one format-1 chunk nobody needs.
    new.put_manifest(back_up(new, "rp3", {"root": chunk_of(7) + chunk_of(8)}))
    upload(up.old, chunk_of(99))
    report = collect_garbage(
        new, cutoff=float("inf"), guard=ChunkGuard(), legacy=up.old, skip=frozenset({"rp1"})
    )
    assert report.chunks_deleted == 1
    assert report.recovery_points == 4  # rp2 and rp3 in format 2; rp1 and rp2 in format 1
    up.check_every_point()
    assert restore(new, "rp3", "root") == chunk_of(7) + chunk_of(8)


def test_a_chunk_a_running_job_holds_is_kept_after_the_upgrade(tmp_path: Path) -> None:
    up = upgrading(tmp_path / "store")
    held = next(up.old.get_indexes(up.old.get_manifest("rp1"))).referenced()
    guard = ChunkGuard()
    guard.hold("restore-job", held)  # a restore of rp1 that began before it was converted
    new = up.switch()
    clean_moved(new)
    converter = up.converter()
    for rp_id in POINTS:
        converter.convert(rp_id)
    finish(new)
    report = collect_garbage(new, cutoff=float("inf"), guard=guard)
    assert report.kept_held == len(held - {ZERO_DIGEST})
    for digest in held - {ZERO_DIGEST}:
        assert up.old.read_chunk(digest)


# --- versions ---------------------------------------------------------------------------------


def test_datastore_json_mid_upgrade_round_trips_and_names_both_hashes(tmp_path: Path) -> None:
    up = upgrading(tmp_path / "store")
    new = up.switch()
    document = json.loads((up.root / CONFIG_KEY).read_bytes())
    assert document["format"] == 2
    assert document["hash"] == UPGRADING_HASH
    assert document["upgrade"] == {
        "from": {"format": 1, "chunk_size": 4096, "hash": "blake3", "compression": "zstd"},
        "prefix": LEGACY_PREFIX,
    }
    decoded = DatastoreConfig.decode((up.root / CONFIG_KEY).read_bytes())
    assert decoded == new.config
    assert decoded.upgrading_from == up.old.config
    # A key rotation mid-upgrade keeps the upgrade recorded.
    new.rotate_master_key(MasterKey.generate())
    assert json.loads((up.root / CONFIG_KEY).read_bytes())["upgrade"] == document["upgrade"]
    # An upgrade described wrongly is damage, not a guess.
    document["upgrade"]["prefix"] = "elsewhere/"
    with pytest.raises(CorruptData, match="upgrade in progress"):
        DatastoreConfig.decode(json.dumps(document).encode())


def test_code_older_than_upgrades_refuses_a_datastore_mid_upgrade(tmp_path: Path) -> None:
    """The store.py of main before vault upgrades, run on a datastore mid-upgrade: refused,
    naming its format, rather than taken for format 2 (whose garbage collection would delete
    the format-1 chunks)."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{MAIN_BEFORE_UPGRADES}:controller/datastore/store.py"],
        capture_output=True,
        text=True,
    )
    if source.returncode != 0:
        pytest.skip(f"no git history here: {source.stderr.strip()}")
    old_code = types.ModuleType("store_before_upgrades")
    sys.modules[old_code.__name__] = old_code
    try:
        exec(compile(source.stdout, "store_before_upgrades.py", "exec"), old_code.__dict__)
        up = upgrading(tmp_path / "store")
        up.switch()
        with pytest.raises(UnsupportedFormat) as refused:
            old_code.DatastoreConfig.decode((up.root / CONFIG_KEY).read_bytes())
        assert "format 2 uses hash 'blake3-keyed+blake3'" in refused.value.message
        assert "Upgrade Coffer to read it" in refused.value.message
    finally:
        del sys.modules[old_code.__name__]


def test_a_datastore_of_a_newer_format_is_refused_naming_it(tmp_path: Path) -> None:
    storage = LocalDirectoryStore(tmp_path / "store")
    storage.put(CONFIG_KEY, json.dumps({"format": 3, "chunk_size": 4096}).encode())
    with pytest.raises(UnsupportedFormat, match="datastore has format version 3; this Coffer"):
        Datastore.open(storage)


# --- the dry run ------------------------------------------------------------------------------


def test_the_plan_counts_what_will_be_rewritten_and_the_rate_is_measured(tmp_path: Path) -> None:
    up = upgrading(tmp_path / "store")
    before = files(up.root)
    work, chunks = plan(up.old, POINTS, {})
    chunk_files = [name for name in before if name.startswith("chunks/")]
    assert (work.recovery_points, work.indexes, work.chunks) == (2, 4, len(chunk_files))
    assert work.stored_bytes == sum(len(before[name]) for name in chunk_files)
    assert work.objects == len(chunk_files) + 4 + 2
    rate = measure_rate(up.old, up.storage, chunks)
    assert rate.chunks == len(chunk_files)
    assert rate.stored_bytes > 0
    assert rate.seconds > 0
    assert rate.estimate(work) > 0
    # Nothing of the datastore changed, and the scratch objects are gone.
    assert files(up.root) == before
    assert not list(up.storage.list(PROBE_PREFIX))
    # What a run converted already is not counted again.
    converted, _ = plan(up.old, POINTS, {d: (d, "") for d in chunks[:3]})
    assert converted.chunks == len(chunk_files) - 3
