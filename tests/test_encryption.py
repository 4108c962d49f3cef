"""Encryption at rest: keys, the encrypted datastore format, and what the storage gives away.

Real datastores in a temporary directory. The shared suites (test_datastore.py, test_gc.py) run
every datastore operation on an encrypted datastore too; these tests check what is particular
to encryption: wrong keys, moved objects, rotation, export, keyed names, a look at the raw
storage, and that a format-1 datastore written before encryption existed still reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from dataclasses import replace
from pathlib import Path

import pytest

from controller.datastore import (
    CONFIG_KEY,
    Datastore,
    Kdf,
    LocalDirectoryStore,
    MasterKey,
    ObjectStore,
    chunk_key,
    index_key,
    manifest_key,
    parse_export,
)
from controller.datastore.encrypted import OVERHEAD, envelope_key_id
from shared.blob import compress
from shared.digest import PLAIN_CHUNK_HASH, ZERO_DIGEST, ChunkHash, chunk_digest
from shared.errors import (
    CofferError,
    Conflict,
    CorruptData,
    InvalidArgument,
    KeyUnavailable,
    NotFound,
    UnsupportedFormat,
    WrongKey,
)
from tests.test_datastore import CHUNK, back_up, chunk_of, restore, upload

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "format1"
CHEAP_ARGON2 = {"memory_kib": 1024, "iterations": 1, "lanes": 1}
"""A KDF cost tests can afford; the cost is recorded, so opening needs no configuration."""


@pytest.fixture
def master() -> MasterKey:
    return MasterKey.generate()


@pytest.fixture
def storage(tmp_path: Path) -> LocalDirectoryStore:
    return LocalDirectoryStore(tmp_path / "store")


@pytest.fixture
def store(storage: ObjectStore, master: MasterKey) -> Datastore:
    return Datastore.create(storage, CHUNK, master=master, vault="eu-west")


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under `root`: its modification time and the SHA-256 of its bytes."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            found[str(path.relative_to(root))] = (
                path.stat().st_mtime_ns,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
    return found


# --- keyed chunk names ------------------------------------------------------------------------


def test_keyed_chunk_hash_is_standard_keyed_blake3_and_hides_its_key() -> None:
    # BLAKE3's published test vector for keyed mode (empty input).
    keyed = ChunkHash(b"whats the Elvish word for friend")
    assert keyed.digest(b"").hex() == (
        "92b2b75604ed3c761f9d6f62392c8a9227ad0ea3f09573e783f1498a4ed60d26"
    )
    assert keyed.name == "blake3-keyed"
    assert "Elvish" not in repr(keyed)
    assert PLAIN_CHUNK_HASH.digest(b"abc") == chunk_digest(b"abc")
    assert PLAIN_CHUNK_HASH.name == "blake3"
    assert keyed.zero_digest(4096) == keyed.digest(bytes(4096)) != ZERO_DIGEST
    with pytest.raises(InvalidArgument, match="32 bytes"):
        ChunkHash(b"short")


def test_the_same_content_in_two_vaults_has_unrelated_names(
    tmp_path: Path, master: MasterKey
) -> None:
    stores = [
        Datastore.create(LocalDirectoryStore(tmp_path / vault), CHUNK, master=master, vault=vault)
        for vault in ("eu-west", "us-east")
    ]
    raw = chunk_of(7)
    names = [upload(store, raw) for store in stores]
    assert names[0] != names[1]
    assert chunk_digest(raw) not in names  # nor the plain digest anyone can compute
    # Each vault can only confirm its own content.
    assert stores[0].missing_chunks([names[1]]) == [names[1]]
    assert [store.read_chunk(name) for store, name in zip(stores, names, strict=True)] == [raw, raw]


def test_a_chunk_named_with_the_plain_hash_is_refused(store: Datastore) -> None:
    raw = chunk_of(1)
    compression, payload = compress(raw)
    with pytest.raises(CofferError, match="not to the digest") as refused:
        store.put_chunk(chunk_digest(raw), payload, compression, len(raw))
    assert refused.value.code == "ChunkDigestMismatch"


# --- what the storage gives away -------------------------------------------------------------


def test_the_raw_storage_shows_no_plaintext_and_no_plain_digests(
    tmp_path: Path, store: Datastore
) -> None:
    secret = b"Quarterly payroll of ACME Corp: Alice 120000, Bob 95000.\n"
    text = (secret * (CHUNK // len(secret) + 1))[:CHUNK]  # compresses: stored as zstd
    noise = os.urandom(CHUNK)  # does not: stored raw inside the envelope
    image = text + noise + bytes(CHUNK) + text[:1000]
    manifest = back_up(store, "rp1", {"root": image})
    manifest = replace(manifest, vm={"name": "payroll-db-7"})
    store.put_manifest(manifest)
    assert restore(store, "rp1", "root") == image

    plain_digests = {chunk_digest(raw) for raw in (text, noise, text[:1000])}
    needles = [secret[:24], b"payroll-db-7", text[:64], noise[:64]]
    needles += [compress(text)[1][:64]]  # the compressed form, as an unencrypted blob holds it
    needles += list(plain_digests) + [d.hex().encode() for d in plain_digests]
    root = tmp_path / "store"
    files = [path for path in root.rglob("*") if path.is_file()]
    assert len(files) == 6  # datastore.json, 3 chunks, 1 index, 1 manifest
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"{needle[:16]!r}... readable in {path}"
        for digest in plain_digests:
            assert digest.hex() not in str(path.relative_to(root))
    # Only datastore.json is readable, and it holds no key in the clear.
    document = (root / CONFIG_KEY).read_bytes()
    assert json.loads(document)["encryption"] == "aes-256-gcm"
    assert store.chunk_hash.key is not None
    assert store.chunk_hash.key.hex().encode() not in document


def test_stat_gives_the_plain_size_and_the_storage_holds_the_envelope(
    store: Datastore, storage: ObjectStore
) -> None:
    raw = os.urandom(CHUNK)
    digest = upload(store, raw)
    key = chunk_key(digest)
    assert store.chunk_info(digest).size == len(store.backend.get(key))
    assert storage.stat(key).size == store.chunk_info(digest).size + OVERHEAD
    assert storage.get(key)[:4] == b"CFEN"


# --- wrong keys and moved objects --------------------------------------------------------------


def test_a_wrong_master_key_is_refused_typed(storage: ObjectStore, store: Datastore) -> None:
    store.put_manifest(back_up(store, "rp1", {"root": chunk_of(1)}))
    with pytest.raises(WrongKey, match="needs the key file with check value") as refused:
        Datastore.open(storage, master=MasterKey.generate())
    assert (refused.value.code, refused.value.exit_code) == ("WrongKey", 6)
    with pytest.raises(WrongKey, match="wrapped under a key file, and a passphrase was given"):
        Datastore.open(storage, master=MasterKey.from_passphrase("not the key file"))
    with pytest.raises(KeyUnavailable, match="no master key is configured") as missing:
        Datastore.open(storage)
    assert missing.value.exit_code == 6
    assert "key file with check value" in missing.value.message  # which key it needs
    # Creating it again with another key is refused the same way, and changes nothing.
    before = storage.get(CONFIG_KEY)
    with pytest.raises(WrongKey):
        Datastore.create(storage, CHUNK, master=MasterKey.generate(), vault="eu-west")
    assert storage.get(CONFIG_KEY) == before


def test_objects_moved_swapped_or_forged_fail_authentication(
    storage: ObjectStore, store: Datastore
) -> None:
    store.put_manifest(back_up(store, "rp1", {"root": chunk_of(1) + chunk_of(2)}))
    store.put_manifest(back_up(store, "rp2", {"root": chunk_of(3)}))
    one, two = store.chunk_hash.digest(chunk_of(1)), store.chunk_hash.digest(chunk_of(2))

    # A chunk's object under another chunk's name.
    storage.put(chunk_key(two), storage.get(chunk_key(one)))
    with pytest.raises(CorruptData, match=f"chunk {two.hex()}.*does not authenticate"):
        store.read_chunk(two)
    # Two manifests swapped.
    first, second = storage.get(manifest_key("rp1")), storage.get(manifest_key("rp2"))
    storage.put(manifest_key("rp1"), second)
    storage.put(manifest_key("rp2"), first)
    with pytest.raises(CorruptData, match=r"manifest of recovery point rp1.*another name"):
        store.get_manifest("rp1")
    # An index moved to another recovery point.
    storage.put(index_key("rp2", "root"), storage.get(index_key("rp1", "root")))
    with pytest.raises(CorruptData, match="index of disk 'root' of recovery point rp2"):
        store.get_index("rp2", "root", verify=False)
    # A plain object put where an encrypted one belongs.
    storage.put(manifest_key("rp3"), json.dumps({"format": 1, "id": "rp3" * 20}).encode())
    with pytest.raises(CorruptData, match="not an encrypted Coffer object"):
        store.get_manifest("rp3")
    # A header edited to name another data key, or a newer envelope.
    sealed = bytearray(storage.get(chunk_key(one)))
    sealed[8] = 9
    storage.put(chunk_key(one), bytes(sealed))
    with pytest.raises(KeyUnavailable, match="data key 9, which the datastore's keyring"):
        store.read_chunk(one)
    sealed[8], sealed[4] = 1, 2
    storage.put(chunk_key(one), bytes(sealed))
    with pytest.raises(UnsupportedFormat, match="version 2"):
        store.read_chunk(one)


def test_an_object_from_another_datastore_of_the_same_vault_fails(
    tmp_path: Path, master: MasterKey
) -> None:
    """Same vault name, same master key, same object name: the data keys differ."""
    old, new = (
        Datastore.create(LocalDirectoryStore(tmp_path / n), CHUNK, master=master, vault="v")
        for n in ("old", "new")
    )
    raw = chunk_of(5)
    upload(old, raw)
    digest = old.chunk_hash.digest(raw)
    new.storage.put(chunk_key(digest), old.storage.get(chunk_key(digest)))
    with pytest.raises(CorruptData, match="does not authenticate"):
        new.read_chunk(digest)


def test_a_wrapped_key_moved_to_another_slot_fails(
    storage: ObjectStore, store: Datastore, master: MasterKey
) -> None:
    """The wrapping binds datastore id, vault, purpose and key id (its associated data)."""
    document = json.loads(storage.get(CONFIG_KEY))
    document["keys"]["chunk_id"] = document["keys"]["data"]["1"]
    storage.put(CONFIG_KEY, json.dumps(document).encode())
    with pytest.raises(CorruptData, match=r"key chunk-id .* does not authenticate"):
        Datastore.open(storage, master=master)
    document = json.loads(json.dumps(document).replace('"eu-west"', '"us-east"'))
    storage.put(CONFIG_KEY, json.dumps(document).encode())
    with pytest.raises(CorruptData, match="does not authenticate"):
        Datastore.open(storage, master=master)


def test_a_forged_kdf_cost_is_refused_before_it_runs(storage: ObjectStore) -> None:
    passphrase = MasterKey.from_passphrase("correct horse", Kdf.argon2id(**CHEAP_ARGON2))
    Datastore.create(storage, CHUNK, master=passphrase, vault="eu-west")
    document = json.loads(storage.get(CONFIG_KEY))
    document["keys"]["chunk_id"]["kek"]["kdf"]["memory_kib"] = 1 << 40
    storage.put(CONFIG_KEY, json.dumps(document).encode())
    started = time.monotonic()
    with pytest.raises(CorruptData, match="memory_kib 1099511627776 is not within"):
        Datastore.open(storage, master=passphrase)
    assert time.monotonic() - started < 1


def test_a_plain_datastore_json_cannot_downgrade_an_encrypted_datastore(
    storage: ObjectStore, store: Datastore, master: MasterKey
) -> None:
    store.put_manifest(back_up(store, "rp1", {"root": chunk_of(1)}))
    storage.put(
        CONFIG_KEY, b'{"chunk_size": 4096, "compression": "zstd", "format": 1, "hash": "blake3"}'
    )
    with pytest.raises(CorruptData, match=r"not encrypted .* datastore.json was replaced"):
        Datastore.open(storage, master=master, require_encryption=True)


# --- master keys --------------------------------------------------------------------------------


def test_master_key_files_are_created_private_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    created = MasterKey.create_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 32
    assert MasterKey.from_file(path).describe() == created.describe()
    assert created.describe().startswith("key file, check value ")
    with pytest.raises(Conflict, match="never overwritten"):
        MasterKey.create_file(path)
    path.chmod(0o640)
    with pytest.raises(KeyUnavailable, match="mode 0640 lets group or others read it"):
        MasterKey.from_file(path)
    path.chmod(0o600)
    path.write_bytes(os.urandom(31))
    with pytest.raises(KeyUnavailable, match="31 bytes; a master key file holds exactly 32"):
        MasterKey.from_file(path)
    path.write_bytes(os.urandom(64))
    with pytest.raises(KeyUnavailable, match="33\\+ bytes"):
        MasterKey.from_file(path)
    with pytest.raises(KeyUnavailable, match="No such file"):
        MasterKey.from_file(tmp_path / "absent.key")
    with pytest.raises(KeyUnavailable, match="not a regular file"):
        MasterKey.from_file(tmp_path)


def test_a_passphrase_opens_its_datastore_and_a_wrong_one_is_refused(
    storage: ObjectStore,
) -> None:
    kdf = Kdf.argon2id(**CHEAP_ARGON2)
    store = Datastore.create(
        storage, CHUNK, master=MasterKey.from_passphrase("correct horse", kdf), vault="eu-west"
    )
    store.put_manifest(back_up(store, "rp1", {"root": chunk_of(1)}))
    # The salt and cost are recorded: a controller given only the passphrase opens it.
    recorded = json.loads(storage.get(CONFIG_KEY))["keys"]["chunk_id"]["kek"]
    assert recorded["source"] == "passphrase"
    assert recorded["kdf"] == {"name": "argon2id", "salt": kdf.salt.hex(), **CHEAP_ARGON2}
    reopened = Datastore.open(storage, master=MasterKey.from_passphrase("correct horse"))
    assert restore(reopened, "rp1", "root") == chunk_of(1)
    with pytest.raises(WrongKey, match="needs another passphrase"):
        Datastore.open(storage, master=MasterKey.from_passphrase("battery staple"))
    with pytest.raises(WrongKey, match="wrapped under a passphrase, and a key file was given"):
        Datastore.open(storage, master=MasterKey.generate())
    with pytest.raises(InvalidArgument, match="at least 8 characters"):
        MasterKey.from_passphrase("short")


def test_the_default_kdf_is_argon2id_and_scrypt_records_work_too(storage: ObjectStore) -> None:
    default = MasterKey.from_passphrase("correct horse")
    assert default.describe() == "passphrase (Argon2id, 256 MiB, 3 passes, 4 lanes)"
    scrypt = MasterKey.from_passphrase("correct horse", Kdf.scrypt(n=1 << 10))
    store = Datastore.create(storage, CHUNK, master=scrypt, vault="eu-west")
    upload(store, chunk_of(1))
    reopened = Datastore.open(storage, master=MasterKey.from_passphrase("correct horse"))
    assert reopened.read_chunk(store.chunk_hash.digest(chunk_of(1))) == chunk_of(1)
    assert "scrypt, N=1024, r=8, p=1" in reopened.export_keys()


# --- rotation and export ----------------------------------------------------------------------


def test_rotating_the_master_key_rewrites_only_datastore_json(
    tmp_path: Path, storage: ObjectStore, store: Datastore, master: MasterKey
) -> None:
    old = master
    store.put_manifest(back_up(store, "rp1", {"root": chunk_of(1) + chunk_of(2)}))
    new_data_key = store.new_data_key()
    store.put_manifest(back_up(store, "rp2", {"root": chunk_of(3)}))
    before = snapshot(tmp_path / "store")
    time.sleep(0.01)  # a rewrite would show in the modification times

    new = MasterKey.generate()
    started = time.monotonic()
    assert store.rotate_master_key(new) == 3  # the chunk-id key and data keys 1 and 2
    assert time.monotonic() - started < 5

    after = snapshot(tmp_path / "store")
    rewritten = {name for name in before if after[name] != before[name]}
    created = {  # when each key was made survives its re-wrapping
        slot: wrapped["created_at"]
        for slot, wrapped in json.loads(storage.get(CONFIG_KEY))["keys"]["data"].items()
    }
    assert created.keys() == {"1", "2"}
    assert all(stamp.endswith("+00:00") for stamp in created.values())
    assert rewritten == {CONFIG_KEY}
    assert set(after) == set(before)
    with pytest.raises(WrongKey):
        Datastore.open(storage, master=old)
    reopened = Datastore.open(storage, master=new)
    assert reopened.current_data_key == new_data_key
    assert restore(reopened, "rp1", "root") == chunk_of(1) + chunk_of(2)
    assert restore(reopened, "rp2", "root") == chunk_of(3)
    # Rotating again onto a passphrase works the same way.
    passphrase = MasterKey.from_passphrase("correct horse", Kdf.argon2id(**CHEAP_ARGON2))
    reopened.rotate_master_key(passphrase)
    assert restore(Datastore.open(storage, master=passphrase), "rp2", "root") == chunk_of(3)


def test_a_new_data_key_encrypts_new_objects_and_old_ones_stay_readable(
    storage: ObjectStore, store: Datastore, master: MasterKey
) -> None:
    store.put_manifest(back_up(store, "rp1", {"root": chunk_of(1) + chunk_of(2)}))
    assert store.current_data_key == 1
    assert store.new_data_key() == 2
    assert store.current_data_key == 2
    store.put_manifest(back_up(store, "rp2", {"root": chunk_of(1) + chunk_of(3)}))

    def key_id(key: str) -> int:
        return envelope_key_id(storage.get(key))

    digest = store.chunk_hash.digest
    assert key_id(chunk_key(digest(chunk_of(1)))) == 1  # deduplicated: not written again
    assert key_id(chunk_key(digest(chunk_of(2)))) == 1
    assert key_id(chunk_key(digest(chunk_of(3)))) == 2
    assert (key_id(manifest_key("rp1")), key_id(manifest_key("rp2"))) == (1, 2)
    assert (key_id(index_key("rp1", "root")), key_id(index_key("rp2", "root"))) == (1, 2)
    # A controller started afresh reads both, and writes with key 2.
    reopened = Datastore.open(storage, master=master)
    assert reopened.current_data_key == 2
    assert restore(reopened, "rp1", "root") == chunk_of(1) + chunk_of(2)
    assert restore(reopened, "rp2", "root") == chunk_of(1) + chunk_of(3)


def test_the_export_restores_a_lost_datastore_json(
    storage: ObjectStore, store: Datastore, master: MasterKey
) -> None:
    store.put_manifest(back_up(store, "rp1", {"root": chunk_of(1)}))
    export = store.export_keys()
    assert "Vault:         eu-west" in export
    assert "the master key is NOT in it" in export
    assert master.describe().removeprefix("key file, ") in export
    assert store.chunk_hash.key is not None
    assert store.chunk_hash.key.hex() not in export
    storage.delete(CONFIG_KEY)
    with pytest.raises(NotFound, match="datastore"):
        Datastore.open(storage, master=master)
    storage.put(CONFIG_KEY, parse_export(export))
    assert restore(Datastore.open(storage, master=master), "rp1", "root") == chunk_of(1)


def test_an_export_older_than_a_data_key_cannot_open_what_the_key_wrote(
    storage: ObjectStore, store: Datastore, master: MasterKey
) -> None:
    stale = store.export_keys()
    store.new_data_key()
    store.put_manifest(back_up(store, "rp1", {"root": chunk_of(1)}))
    storage.put(CONFIG_KEY, parse_export(stale))
    with pytest.raises(KeyUnavailable, match="data key 2, which the datastore's keyring"):
        Datastore.open(storage, master=master).get_manifest("rp1")


def test_rotation_refuses_a_datastore_json_changed_behind_its_back(
    storage: ObjectStore, store: Datastore, master: MasterKey
) -> None:
    other = Datastore.open(storage, master=master)
    other.new_data_key()
    with pytest.raises(Conflict, match="changed since the datastore was opened"):
        store.new_data_key()
    assert Datastore.open(storage, master=master).current_data_key == 2


def test_a_plain_datastore_has_no_keys_to_rotate(storage: ObjectStore) -> None:
    plain = Datastore.create(storage, CHUNK)
    for call in (
        plain.new_data_key,
        plain.export_keys,
        lambda: plain.rotate_master_key(MasterKey.generate()),
    ):
        with pytest.raises(Conflict, match="not encrypted"):
            call()


def test_create_refuses_a_plain_datastore_for_an_encrypted_vault_and_back(
    storage: ObjectStore, master: MasterKey
) -> None:
    Datastore.create(storage, CHUNK)
    with pytest.raises(Conflict, match=r"encryption none.*encryption aes-256-gcm"):
        Datastore.create(storage, CHUNK, master=master, vault="eu-west")
    other = LocalDirectoryStore(Path(storage.location).parent / "other")
    Datastore.create(other, CHUNK, master=master, vault="eu-west")
    with pytest.raises(Conflict, match="for vault 'eu-west'"):
        Datastore.create(other, CHUNK, master=master, vault="us-east")
    with pytest.raises(Conflict, match="it cannot be used with chunk size 4096, encryption none"):
        Datastore.create(other, CHUNK)


# --- format 1, as written before encryption -----------------------------------------------------


@pytest.mark.parametrize("with_master", [False, True])
def test_a_format_1_datastore_reads_and_restores_byte_identical(
    tmp_path: Path, with_master: bool
) -> None:
    shutil.copytree(FIXTURE / "datastore", tmp_path / "store")
    before = snapshot(tmp_path / "store")
    master = MasterKey.generate() if with_master else None
    store = Datastore.open(LocalDirectoryStore(tmp_path / "store"), master=master)
    assert (store.config.format, store.encrypted, store.chunk_hash) == (1, False, PLAIN_CHUNK_HASH)
    assert sorted(store.list_recovery_point_ids()) == ["rp1", "rp2"]
    for rp_id in ("rp1", "rp2"):
        manifest = store.get_manifest(rp_id)
        assert (manifest.vault, manifest.consistency) == ("legacy", "file-system")
        for disk in ("root", "data"):
            expected = (FIXTURE / "disks" / f"{rp_id}-{disk}.img").read_bytes()
            assert restore(store, rp_id, disk) == expected
    assert snapshot(tmp_path / "store") == before  # reading wrote nothing
    # It is refused where an encrypted datastore is expected, naming the format.
    with pytest.raises(CorruptData, match=r"not encrypted \(format 1\)"):
        Datastore.open(LocalDirectoryStore(tmp_path / "store"), require_encryption=True)


def test_a_format_1_datastore_takes_new_backups_in_format_1(tmp_path: Path) -> None:
    """Until it is upgraded (issue 16), an old datastore goes on as it is: plain names."""
    shutil.copytree(FIXTURE / "datastore", tmp_path / "store")
    store = Datastore.open_or_create(LocalDirectoryStore(tmp_path / "store"), CHUNK)
    store.put_manifest(back_up(store, "rp3", {"root": chunk_of(9)}))
    assert store.has_chunk(chunk_digest(chunk_of(9)))
    assert restore(store, "rp3", "root") == chunk_of(9)
    assert json.loads((tmp_path / "store" / CONFIG_KEY).read_bytes())["format"] == 1
