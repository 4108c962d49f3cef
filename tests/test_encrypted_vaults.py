"""Encrypted vaults on a local directory and on S3, through the real controller, agents and CLI.

- The whole flow, once on a local datastore and once on S3 (a SeaweedFS the tests start), both
  encrypted: a full backup, an incremental, a byte-identical restore, a prune that deletes the
  incremental, a garbage collection that frees what only it used, a verify (where verify
  jobs exist: issue 8, built beside this), and restores after them. The
  storage never holds a known file's bytes in the clear (a copy of the local datastore, and
  SeaweedFS's own files), though with the master key the copy reads back whole.
- The same content in two vaults has unrelated chunk names; keys are rotated and exported.
- A wrong or missing master key stops the controller's start with a typed error; a master key
  rotation (the controller stopped) re-wraps every vault; a vault made before encryption keeps
  working unencrypted.
- One controller per datastore: a second is refused naming the holder; one whose S3 lease is
  taken over stops. A vault deleted on S3 leaves nothing under its prefix.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import obstore
import pytest

from controller.cli.main import cli
from controller.datastore import (
    CONFIG_KEY,
    Datastore,
    DatastoreConfig,
    LeaseHolder,
    LocalDirectoryStore,
    MasterKey,
    open_object_store,
    parse_export,
)
from controller.datastore.description import VAULT_DESCRIPTION_KEY, VM_DESCRIPTIONS
from controller.datastore.encrypted import envelope_key_id
from controller.datastore.lease import LeaseRecord
from controller.datastore.s3 import LEASE_KEY
from shared.digest import chunk_digest
from tests.bench.image import build_image, copy_image, mounted
from tests.cluster import BIN, Cluster, sha256_file
from tests.conftest import TEST_BUCKET
from tests.seaweed import SeaweedFS

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(300)]

MiB = 1 << 20
DISK_SIZE = 64 * MiB
SECRET_SIZE = 1 * MiB
KNOWN_TEXT = b"Coffer known plaintext: the quarterly numbers are in the blue folder. " * 64


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """An ext4 image half full, with a file of known random bytes (which zstd cannot shrink,
    so a chunk of it would lie in the clear in a format-1 datastore) and a known text."""
    root = tmp_path_factory.mktemp("images")
    image = build_image(root / "source.img", DISK_SIZE, fill=0.4, seed=7).path
    secret = random.Random(f"secret-{os.getpid()}").randbytes(SECRET_SIZE)
    with mounted(image) as mounted_root:
        (mounted_root / "secret.bin").write_bytes(secret)
        (mounted_root / "notes.txt").write_bytes(KNOWN_TEXT)
        os.sync()
    return image, secret


def windows(secret: bytes) -> list[bytes]:
    """Pieces of the secret to look for in storage: 48 bytes at a few places of every 64 KiB."""
    return [secret[at : at + 48] for at in range(1000, len(secret), 64 << 10)]


def files_holding(root: Path, needles: list[bytes]) -> list[str]:
    """Files under `root` holding any of `needles` (the storage, as one holding it sees it)."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(needle in data for needle in needles):
                found.append(str(path.relative_to(root)))
    return found


def change_files(image: Path, nbytes: int, seed: int) -> None:
    with mounted(image) as root:
        (root / f"changed-{seed}.bin").write_bytes(os.urandom(nbytes))
        os.sync()


def overwrite_file(image: Path, name: str, seed: int) -> None:
    """New random bytes written over a file inside the image, in place (no new blocks)."""
    with mounted(image) as root:
        path = root / name
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, random.Random(seed).randbytes(path.stat().st_size), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.sync()


def s3_config(
    server: SeaweedFS, prefix: str, *, lease_seconds: float | None = None, keys: bool = True
) -> str:
    """The [datastore] table of a controller keeping its datastores on the test server (its
    credentials in the config, or with `keys` False in the environment)."""
    lines = [
        "[datastore]",
        f'url = "s3://{TEST_BUCKET}/{prefix}"',
        f'endpoint = "{server.endpoint}"',
        'region = "us-east-1"',
        "allow_http = true",
    ]
    if keys:
        lines += [
            f'access_key_id = "{server.coffer.access_key_id}"',
            f'secret_access_key = "{server.coffer.secret_access_key}"',
        ]
    if lease_seconds is not None:
        lines.append(f"lease_seconds = {lease_seconds}")
    return "\n".join(lines) + "\n"


def run_controller(config: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`coffer-controller` expected to refuse to start: its exit code and what it printed."""
    return subprocess.run(
        [str(BIN / "coffer-controller"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def config_with(cluster: Cluster, name: str, extra: str) -> Path:
    """A copy of the cluster's controller config with `extra` appended."""
    path = cluster.root / name
    path.write_text((cluster.root / "controller.toml").read_text() + extra)
    return path


def _description(datastore: Path, path: Path) -> bool:
    """Whether `path` is one of the datastore's descriptions of its catalog (not data)."""
    key = path.relative_to(datastore).as_posix()
    return key == VAULT_DESCRIPTION_KEY or key.startswith(VM_DESCRIPTIONS)


def rp_ids(cluster: Cluster, vm_id: str) -> list[str]:
    return [rp["id"] for rp in cluster.coffer("rp", "list", vm_id)]


# --- the whole flow, local and S3 --------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_backup_incremental_restore_prune_and_collect_on_an_encrypted_datastore(
    where: str, source: tuple[Path, bytes], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    image = tmp_path / "web-1.img"
    copy_image(source[0], image)
    secret = windows(source[1])
    assert image.read_bytes().count(secret[0]) == 1  # the disk holds it, in the clear
    config = "gc_grace_seconds = 0\n"  # chunks are collected as soon as nothing references them
    server: SeaweedFS | None = None
    if where == "s3":
        server = request.getfixturevalue("seaweedfs")
        config += s3_config(server, f"flow-{os.getpid()}-{tmp_path.name}")
    with Cluster(tmp_path / "cluster", config=config) as cluster:
        cluster.add_agent("web-1", {"root": image}, service="shop", region="eu")
        original = sha256_file(image)
        full = cluster.backup("web-1")
        assert full["status"] == "Completed", full
        vault = cluster.coffer("vault", "show", "eu")
        assert (vault["datastore_format"], vault["encryption"]) == (2, "aes-256-gcm")
        if server is not None:
            assert vault["datastore"].startswith(f"s3://{TEST_BUCKET}/flow-")

        change_files(image, 4 * MiB, seed=1)
        changed = sha256_file(image)
        incremental = cluster.backup("web-1")
        assert incremental["status"] == "Completed", incremental
        # Incremental under the vault's key: the previous index compared, only changes sent.
        assert 4 * MiB <= int(incremental["bytes_sent"]) <= 10 * MiB, incremental

        target = cluster.agents["web-1"].restore_dir / "web-1.img"
        restored = cluster.restore("web-1", incremental["recovery_point_id"], "root", target)
        assert restored["status"] == "Completed", restored
        assert sha256_file(target) == changed

        # The changed file overwritten in place (the same blocks, new data): a third backup
        # no longer holds what the incremental added.
        overwrite_file(image, "changed-1.bin", seed=3)
        latest = cluster.backup("web-1")
        assert latest["status"] == "Completed", latest
        last = sha256_file(image)

        # Weekly backups, kept one week: the first point of the full backup's weekday is kept,
        # and the newest always is. The prune deletes the incremental; the collection frees
        # what only it used.
        taken = datetime.fromisoformat(cluster.coffer("rp", "list", "web-1")[0]["created_at"])
        weekday = taken.astimezone(UTC).strftime("%a").lower()
        cluster.coffer("policy", "edit", "--vault", "eu", "DefaultPolicy",
                       "--schedule", f"weekly {weekday} 02:00",
                       "--weekly", f"{weekday}:1", "--drop", "daily")  # fmt: skip
        pruned = cluster.coffer("prune", "--vault", "eu")
        assert pruned["status"] == "Completed", pruned
        assert pruned["details"]["deleted_recovery_points"] == [incremental["recovery_point_id"]]
        assert rp_ids(cluster, "web-1") == [
            full["recovery_point_id"],
            latest["recovery_point_id"],
        ]
        collected = cluster.coffer("gc", "--vault", "eu")
        assert collected["status"] == "Completed", collected
        report = collected["details"]["report"]
        assert report["chunks_deleted"] >= 8  # the 4 MiB of new data, at least
        assert report["bytes_freed"] >= 4 * MiB

        if "verify" in cli.commands:  # verify jobs (issue 8), once both are merged
            verified = cluster.coffer("verify", "--vault", "eu")
            assert verified["status"] == "Completed", verified

        for rp, expected in ((full, original), (latest, last)):
            target.unlink()
            again = cluster.restore("web-1", rp["recovery_point_id"], "root", target)
            assert again["status"] == "Completed", again
            assert sha256_file(target) == expected

        # What the storage holds shows nothing of the disks.
        if server is None:
            copied = tmp_path / "copied-datastore"
            shutil.copytree(cluster.datastore("eu"), copied)
            assert files_holding(copied, [*secret, KNOWN_TEXT[:64]]) == []
            # With the master key, the copy elsewhere is the whole datastore.
            store = Datastore.open(
                LocalDirectoryStore(copied), master=MasterKey.from_file(cluster.master_key_file)
            )
            assert sorted(store.list_recovery_point_ids()) == sorted(rp_ids(cluster, "web-1"))
            disk = store.get_index(full["recovery_point_id"], "root")
            assert store.read_chunk(disk.digest_at(0)) == source[0].read_bytes()[: disk.chunk_size]
        else:
            assert files_holding(server.root / "data", [*secret, KNOWN_TEXT[:64]]) == []


# --- keys: two vaults, rotation, export --------------------------------------------------------


@pytest.fixture(scope="module")
def twins(
    tmp_path_factory: pytest.TempPathFactory, source: tuple[Path, bytes]
) -> Iterator[Cluster]:
    """Two VMs with the same disk, each in its own vault, backed up once."""
    root = tmp_path_factory.mktemp("twins")
    with Cluster(root / "cluster") as cluster:
        for vm, vault in (("twin-a", "vault-a"), ("twin-b", "vault-b")):
            image = root / f"{vm}.img"
            copy_image(source[0], image)
            cluster.add_agent(vm, {"root": image}, region="eu")
            cluster.protect(vm, vault=vault)
            assert cluster.backup(vm)["status"] == "Completed"
        yield cluster


def chunk_names(datastore: Path) -> set[str]:
    return {path.name for path in (datastore / "chunks").rglob("*") if path.is_file()}


def test_the_same_content_in_two_vaults_has_unrelated_chunk_names(twins: Cluster) -> None:
    a, b = chunk_names(twins.datastore("vault-a")), chunk_names(twins.datastore("vault-b"))
    assert len(a) == len(b) > 20  # the disk's ~26 MiB of data
    assert a.isdisjoint(b)
    # Neither is the plain BLAKE3 of the content: a guess of the content names nothing.
    some = twins.open_datastore("vault-a")
    raw = some.read_chunk(bytes.fromhex(sorted(a)[0]))
    assert chunk_digest(raw).hex() not in a | b


def test_keys_are_exported_rotated_and_a_new_data_key_takes_over(twins: Cluster) -> None:
    vault = twins.datastore("vault-a")
    exported = twins.coffer("vault", "key", "export", "vault-a", json_out=False).stdout
    assert "Vault:         vault-a" in exported
    assert "Data keys:     1 (objects written now use key 1)" in exported
    assert "the master key is NOT in it" in exported
    assert parse_export(exported) == (vault / CONFIG_KEY).read_bytes()
    assert MasterKey.from_file(twins.master_key_file).describe().split()[-1] in exported

    before = {p: p.stat().st_mtime_ns for p in vault.rglob("*") if p.is_file()}
    rotated = twins.coffer("vault", "key", "rotate", "vault-a")
    assert (rotated["keys_rewrapped"], rotated["current_data_key"], rotated["data_keys"]) == (
        2,
        1,
        [1],
    )
    after = {p: p.stat().st_mtime_ns for p in vault.rglob("*") if p.is_file()}
    # Seconds, no data: only datastore.json was written (of the data objects: the vault's
    # descriptions are rewritten whenever the catalog changes, at any time).
    changed = [p for p in before if before[p] != after.get(p)]
    assert [p.name for p in changed if not _description(vault, p)] == [CONFIG_KEY]
    assert parse_export(exported) != (vault / CONFIG_KEY).read_bytes()  # wrapped anew

    renewed = twins.coffer("vault", "key", "rotate", "vault-a", "--new-data-key")
    assert (renewed["current_data_key"], renewed["data_keys"]) == (2, [1, 2])
    assert twins.coffer("vault", "show", "vault-a")["current_data_key"] == 2
    shown = twins.coffer("vault", "show", "vault-a", json_out=False).stdout
    assert "encrypted (aes-256-gcm, data key 2)" in shown

    # New objects are sealed with data key 2; the old ones still read with key 1.
    image = twins.agents["twin-a"].disks["root"]
    first = rp_ids(twins, "twin-a")[0]
    original = sha256_file(image)
    change_files(image, 2 * MiB, seed=2)
    second = twins.backup("twin-a")
    assert second["status"] == "Completed", second
    manifest = vault / "manifests" / f"{second['recovery_point_id']}.json"
    assert envelope_key_id(manifest.read_bytes()) == 2
    assert envelope_key_id((vault / "manifests" / f"{first}.json").read_bytes()) == 1
    target = twins.agents["twin-a"].restore_dir / "first.img"
    assert twins.restore("twin-a", first, "root", target)["status"] == "Completed"
    assert sha256_file(target) == original
    assert (
        "Data keys:     1, 2 (objects written now use key 2)"
        in twins.coffer("vault", "key", "export", "vault-a", json_out=False).stdout
    )


# --- the master key ----------------------------------------------------------------------------


def test_a_wrong_or_missing_master_key_stops_the_start_and_a_rotation_rewraps_every_vault(
    tmp_path: Path,
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 * MiB))
    legacy_disk = tmp_path / "legacy.img"
    legacy_disk.write_bytes(os.urandom(2 * MiB))
    with Cluster(tmp_path / "cluster") as cluster:
        # No key configured: the first start made one, said so loudly, and keeps it private.
        key_file = cluster.master_key_file
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert "WITHOUT THIS FILE NO BACKUP CAN BE READ" in cluster.controller.log.read_text()
        cluster.add_agent("app-1", {"root": disk}, region="north")
        backup = cluster.backup("app-1")
        assert backup["status"] == "Completed", backup

        # A vault whose datastore was made before encryption existed (format 1) keeps working.
        legacy = cluster.root / "state" / "datastores" / "legacy"
        LocalDirectoryStore(legacy).put(
            CONFIG_KEY, DatastoreConfig.plain(cluster.chunk_size).encode()
        )
        cluster.add_agent("old-1", {"root": legacy_disk}, region="west")
        cluster.protect("old-1", vault="legacy")
        old_backup = cluster.backup("old-1")
        assert old_backup["status"] == "Completed", old_backup
        assert cluster.coffer("vault", "show", "legacy")["datastore_format"] == 1
        refused = cluster.coffer("vault", "key", "rotate", "legacy", check=False, json_out=False)
        assert refused.returncode == 5
        assert "is not encrypted (format 1)" in refused.stderr
        # A master key rotation waits for the controller to stop.
        busy = subprocess.run(
            [str(BIN / "coffer-controller"), "rotate-master-key", "--config",
             str(cluster.root / "controller.toml"), "--new-key-file", str(tmp_path / "busy.key")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert busy.returncode == 5, busy.stderr
        assert "in use by another coffer-controller" in busy.stderr
        assert not (tmp_path / "busy.key").exists()  # nothing made while it runs
        cluster.stop_controller()

        right = key_file.read_bytes()
        key_file.write_bytes(os.urandom(32))
        wrong = run_controller(cluster.root / "controller.toml")
        assert wrong.returncode == 6, wrong.stderr
        check = MasterKey(secret=right).describe().split()[-1]
        assert "is not encrypted under the master key given" in wrong.stderr
        assert f"it needs the key file with check value {check}" in wrong.stderr

        missing = run_controller(
            config_with(cluster, "missing-key.toml", '[encryption]\nmaster_key_file = "nope.key"\n')
        )
        assert missing.returncode == 6, missing.stderr
        assert "nope.key" in missing.stderr
        assert "No such file" in missing.stderr

        key_file.write_bytes(right)

        # A new master key, the controller stopped: every encrypted vault re-wrapped.
        new_key = tmp_path / "master-2.key"
        rotate = [str(BIN / "coffer-controller"), "rotate-master-key",
                  "--config", str(cluster.root / "controller.toml"),
                  "--new-key-file", str(new_key)]  # fmt: skip
        done = subprocess.run(rotate, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "vault north: re-wrapped (2 keys)" in done.stdout
        assert "vault legacy: not encrypted (format 1)" in done.stdout
        assert f'master_key_file = "{new_key}"' in done.stdout
        assert new_key.stat().st_mode & 0o777 == 0o600
        again = subprocess.run(rotate, capture_output=True, text=True, timeout=60)
        assert "vault north: already re-wrapped" in again.stdout, again.stderr

        stale = run_controller(cluster.root / "controller.toml")
        assert stale.returncode == 6, stale.stderr
        cluster.config = f'[encryption]\nmaster_key_file = "{new_key}"\n'
        (cluster.root / "controller.toml").write_text(
            (cluster.root / "controller.toml").read_text() + cluster.config
        )
        cluster.start_controller()
        for vm, rp in (("app-1", backup), ("old-1", old_backup)):
            cluster.wait_online(vm, timeout=60)  # the agent dials again after its backoff
            target = cluster.agents[vm].restore_dir / "back.img"
            job = cluster.restore(vm, rp["recovery_point_id"], "root", target)
            assert job["status"] == "Completed", job
            assert target.read_bytes() == (disk if vm == "app-1" else legacy_disk).read_bytes()


def test_a_datastore_missing_where_the_catalog_knows_data_stops_the_start(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(1 * MiB))
    with Cluster(tmp_path / "cluster") as cluster:
        cluster.add_agent("app-1", {"root": disk}, region="north")
        assert cluster.backup("app-1")["status"] == "Completed"
        cluster.stop_controller()
        moved = run_controller(
            config_with(cluster, "moved.toml", f'[datastore]\nurl = "{tmp_path / "elsewhere"}"\n')
        )
        assert moved.returncode == 4, moved.stderr
        assert "is not at" in moved.stderr
        assert "Was `[datastore] url`" in moved.stderr
        cluster.start_controller()


# --- one controller per datastore --------------------------------------------------------------


def test_a_second_controller_on_the_same_local_datastores_is_refused(tmp_path: Path) -> None:
    with Cluster(tmp_path / "first") as first:
        shared = first.root / "state" / "datastores"
        second = Cluster(tmp_path / "second", config=f'[datastore]\nurl = "{shared}"\n')
        with pytest.raises(RuntimeError) as refused:
            second.__enter__()  # starts its controller, which refuses
        said = second.controller.log.read_text()
        assert "is in use by another controller" in said, said
        assert f"(PID {first.controller.pid}, 127.0.0.1:{first.port})" in said
        assert first.controller.alive()
        assert "exited" in str(refused.value)


def _lease_of(server: SeaweedFS, prefix: str) -> dict[str, Any]:
    store = server.store(TEST_BUCKET, prefix)
    return dict(json.loads(bytes(obstore.get(store._store, LEASE_KEY).bytes())))


def test_s3_one_controller_per_datastore_a_lost_lease_stops_it_and_a_deleted_vault_leaves_nothing(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"lease-{os.getpid()}-{tmp_path.name}"
    config = s3_config(seaweedfs, prefix, lease_seconds=3)
    with Cluster(tmp_path / "first", config=config) as first:
        holder = _lease_of(seaweedfs, prefix)["holder"]
        assert (holder["pid"], holder["address"]) == (
            first.controller.pid,
            f"127.0.0.1:{first.port}",
        )

        # A vault deleted on S3 leaves nothing under its prefix.
        first.coffer("vault", "create", "scratch", "--region", "nowhere")
        vault_store = open_object_store(
            f"s3://{TEST_BUCKET}/{prefix}/scratch", seaweedfs.settings()
        )
        vault_store.put("chunks/ab/cd/abcd-left-by-a-failed-backup", b"garbage")
        # The vault's description is written a moment after it is created.
        deadline = time.monotonic() + 10
        while not vault_store.has(VAULT_DESCRIPTION_KEY) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(vault_store.list("")) == [
            "chunks/ab/cd/abcd-left-by-a-failed-backup",
            CONFIG_KEY,
            VAULT_DESCRIPTION_KEY,
        ]
        first.coffer("vault", "delete", "scratch")
        assert list(vault_store.list("")) == []

        # A second controller on the same datastores is refused, naming the first. (It finds
        # its credentials in the environment, as AWS's tools do.)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.coffer.access_key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.coffer.secret_access_key)
        second = Cluster(tmp_path / "second", config=s3_config(seaweedfs, prefix, keys=False))
        with pytest.raises(RuntimeError):
            second.__enter__()  # starts its controller, which refuses
        said = second.controller.log.read_text()
        assert "is in use by another controller" in said, said
        assert f"(PID {first.controller.pid}, 127.0.0.1:{first.port})" in said

        # Another takes the lease over (it had expired, say): the first stops writing, at once.
        thief = LeaseHolder("f" * 32, "other-host", 4242, "10.9.9.9:7443")
        record = LeaseRecord(thief, expires_at=time.time() + 3600)
        obstore.put(seaweedfs.store(TEST_BUCKET, prefix)._store, LEASE_KEY, record.encode())
        assert first.controller.popen is not None
        assert first.controller.popen.wait(timeout=30) == 1
        log = first.controller.log.read_text()
        assert "lost its writer lease" in log
        assert "other-host" in log
        assert _lease_of(seaweedfs, prefix)["holder"]["host"] == "other-host"  # left to it
