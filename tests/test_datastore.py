"""The datastore and its backends: one suite run over every ObjectStore, plus fault injection.

Every test runs on every storage backend; those of the ObjectStore contract also run through
the encrypting wrapper, and those of the datastore on a plain (format 1) and an encrypted
(format 2) datastore: the whole API behaves the same whatever is under it.
"""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controller.datastore import (
    CONFIG_KEY,
    Datastore,
    EncryptingStore,
    Fault,
    FaultyStore,
    Keyring,
    LeaseHolder,
    LocalDirectoryStore,
    MasterKey,
    ObjectInfo,
    ObjectStore,
    WriterLease,
    chunk_key,
    index_key,
    manifest_key,
    open_object_store,
)
from shared.blob import Compression, compress, encode_blob
from shared.digest import ZERO_DIGEST
from shared.errors import (
    ChunkDigestMismatch,
    ChunkMissing,
    Conflict,
    CorruptData,
    DatastoreError,
    DatastoreFull,
    DatastoreReadOnly,
    DiskNotFound,
    InvalidArgument,
    NotFound,
    UnsupportedFormat,
    WriterLeaseHeld,
)
from shared.index import DiskIndex
from shared.manifest import ManifestDisk, RecoveryPointManifest
from tests.conftest import TEST_BUCKET
from tests.seaweed import SeaweedFS

CHUNK = 4096


# Every backend the datastore supports. Each entry makes a client on the test's storage; called
# twice in one test, it must give two clients of the same storage (a restarted controller).
def _s3(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """What the controller opens for an s3:// URL: S3 on a real SeaweedFS, with retries."""
    server: SeaweedFS = request.getfixturevalue("seaweedfs")
    return open_object_store(server.url(TEST_BUCKET, tmp_path.name), server.settings())


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], ObjectStore]] = {
    "local": lambda request, tmp_path: LocalDirectoryStore(tmp_path / "store", fsync=True),
    # The fault-injection wrapper, unarmed, must be indistinguishable from what it wraps.
    "faulty-local": lambda request, tmp_path: FaultyStore(
        LocalDirectoryStore(tmp_path / "store", fsync=True)
    ),
    "s3": _s3,
}

MakeBackend = Callable[[], ObjectStore]


@dataclass
class Sealing:
    """Plain or encrypted: how a test's objects and datastores are stored."""

    master: MasterKey | None
    keyring: Keyring
    """The keys of a bare EncryptingStore (one without a datastore around it)."""

    def wrap(self, storage: ObjectStore) -> ObjectStore:
        if self.master is None:
            return storage
        return EncryptingStore(storage, self.keyring)

    def create(self, storage: ObjectStore, chunk_size: int = CHUNK) -> Datastore:
        return Datastore.create(storage, chunk_size, master=self.master, vault="default")

    def open(self, storage: ObjectStore) -> Datastore:
        return Datastore.open(storage, master=self.master)


@pytest.fixture(params=sorted(BACKENDS))
def make_storage(request: pytest.FixtureRequest, tmp_path: Path) -> MakeBackend:
    """Clients of the test's storage, one per call (a restarted controller)."""
    factory = BACKENDS[request.param]
    return lambda: factory(request, tmp_path)


@pytest.fixture(params=["plain", "encrypted"])
def sealing(request: pytest.FixtureRequest) -> Sealing:
    master = MasterKey.generate() if request.param == "encrypted" else None
    return Sealing(master, Keyring.generate("default", datetime.now(UTC)))


@pytest.fixture
def make_backend(make_storage: MakeBackend, sealing: Sealing) -> MakeBackend:
    """The ObjectStore under test: the storage, or the encrypting wrapper over it."""
    return lambda: sealing.wrap(make_storage())


@pytest.fixture
def backend(make_backend: MakeBackend) -> ObjectStore:
    return make_backend()


@pytest.fixture
def storage(make_storage: MakeBackend) -> ObjectStore:
    """The storage itself, as someone holding it sees it."""
    return make_storage()


@pytest.fixture
def faulty(storage: ObjectStore) -> FaultyStore:
    return FaultyStore(storage)


@pytest.fixture
def store(sealing: Sealing, storage: ObjectStore) -> Datastore:
    return sealing.create(storage)


# --- helpers: what a backup does ------------------------------------------------------------


def chunk_of(seed: int, size: int = CHUNK) -> bytes:
    """Distinct, compressible chunk contents."""
    return (f"chunk {seed} ".encode() * size)[:size]


def upload(store: Datastore, raw: bytes) -> bytes:
    digest = store.chunk_hash.digest(raw)
    compression, payload = compress(raw)
    store.put_chunk(digest, payload, compression, len(raw))
    return digest


def back_up(
    store: Datastore, rp_id: str, disks: dict[str, bytes], *, upload_chunks: bool = True
) -> RecoveryPointManifest:
    """Store every disk's chunks and index as an agent and the controller would; no commit."""
    entries = []
    for name, image in disks.items():
        digests = bytearray()
        for offset in range(0, len(image), store.chunk_size):
            raw = image[offset : offset + store.chunk_size]
            if raw.count(0) == len(raw):
                digests += ZERO_DIGEST
            elif upload_chunks:
                digests += upload(store, raw)
            else:
                digests += store.chunk_hash.digest(raw)
        index = DiskIndex(name, len(image), store.chunk_size, bytes(digests))
        entries.append(ManifestDisk.of(index, store.put_index(rp_id, index)))
    return RecoveryPointManifest(
        id=rp_id,
        vm_id="vm-1",
        vault="default",
        job_id=f"job-{rp_id}",
        created_at=datetime(2025, 3, 1, 2, 0, tzinfo=UTC),
        consistency="file-system",
        disks=tuple(entries),
        vm={"name": "web-1", "service": "shop", "region": "lab", "hostname": "web-1"},
    )


def restore(store: Datastore, rp_id: str, disk: str) -> bytes:
    index = store.get_index(rp_id, disk)
    parts = []
    for i, digest in enumerate(index.iter_digests()):
        _, length = index.extent(i)
        parts.append(bytes(length) if digest == ZERO_DIGEST else store.read_chunk(digest))
    return b"".join(parts)


ROOT_IMAGE = chunk_of(1) + bytes(CHUNK) + chunk_of(2) + chunk_of(1) + chunk_of(3)[:1000]
DATA_IMAGE = os.urandom(3 * CHUNK)


# --- the ObjectStore contract, for every backend -------------------------------------------


def test_put_get_has_delete(backend: ObjectStore) -> None:
    assert not backend.has("a/b")
    backend.put("a/b", b"hello")
    assert backend.has("a/b")
    assert backend.get("a/b") == b"hello"
    backend.put("a/b", b"replaced")
    assert backend.get("a/b") == b"replaced"
    backend.delete("a/b")
    assert not backend.has("a/b")
    backend.delete("a/b")  # deleting twice is fine


def test_empty_and_large_objects_round_trip(backend: ObjectStore) -> None:
    big = os.urandom(5 << 20)
    backend.put("empty", b"")
    backend.put("big", big)
    assert backend.get("empty") == b""
    assert backend.get("big") == big


def test_get_of_a_missing_key_is_not_found(backend: ObjectStore) -> None:
    with pytest.raises(NotFound, match="'nothing/here' was not found"):
        backend.get("nothing/here")


def test_stat_gives_size_and_last_write_time(backend: ObjectStore) -> None:
    before = time.time()
    backend.put("a/b", b"hello")
    first = backend.stat("a/b")
    assert isinstance(first, ObjectInfo)
    assert first.size == 5
    # POSIX seconds (not ms, not a naive local time); the slack allows a remote store's clock.
    assert before - 60 < first.modified < time.time() + 60
    assert backend.stat("a/b") == first  # reading changes nothing
    # An overwrite, even with the same length, moves the time forward (once the store's clock
    # ticks: S3 stamps whole seconds).
    deadline = time.monotonic() + 5
    while True:
        time.sleep(0.02)
        backend.put("a/b", b"HELLO")
        second = backend.stat("a/b")
        if second.modified > first.modified or time.monotonic() > deadline:
            break
    assert second.modified > first.modified
    backend.put("a/b", b"a longer object")
    assert backend.stat("a/b").size == 15
    backend.put("empty", b"")
    assert backend.stat("empty").size == 0


def test_stat_of_a_missing_object_is_not_found(backend: ObjectStore) -> None:
    backend.put("a/b", b"x")
    for key in ("nothing/here", "a/c", "a"):  # "a" is only the prefix of another key
        with pytest.raises(NotFound, match=f"{key!r} was not found"):
            backend.stat(key)
    backend.delete("a/b")
    with pytest.raises(NotFound):
        backend.stat("a/b")


def test_objects_survive_a_new_client(make_backend: MakeBackend) -> None:
    make_backend().put("x/y", b"kept")
    assert make_backend().get("x/y") == b"kept"


def test_list_returns_exactly_the_keys_under_a_prefix(backend: ObjectStore) -> None:
    keys = ["chunks/ab/cd/abcd", "chunks/ab/ce/abce", "chunks/ac/00/ac00", "manifests/r.json"]
    for key in keys:
        backend.put(key, b"x")
    assert sorted(backend.list("")) == keys
    assert sorted(backend.list("chunks/")) == keys[:3]
    assert sorted(backend.list("chunks/ab/")) == keys[:2]
    assert sorted(backend.list("chunks/a")) == keys[:3]
    assert sorted(backend.list("chunks/ab/cd/abcd")) == keys[:1]
    assert list(backend.list("indexes/")) == []


BAD_KEYS = ["", "/a", "a/", "a//b", "..", "../a", "a/../b", ".hidden", "a/.tmp-1", "a b", "ä"]


@pytest.mark.parametrize("key", [*BAD_KEYS, "a\\b", "x" * 1025], ids=repr)
def test_invalid_keys_are_refused_and_change_nothing(backend: ObjectStore, key: str) -> None:
    for call in (
        lambda: backend.put(key, b"x"),
        lambda: backend.get(key),
        lambda: backend.has(key),
        lambda: backend.stat(key),
        lambda: backend.delete(key),
    ):
        with pytest.raises(InvalidArgument, match="object key"):
            call()
    assert list(backend.list("")) == []


@pytest.mark.parametrize("prefix", ["/", "../", "a//", ".tmp", "a/../"])
def test_invalid_prefixes_are_refused(backend: ObjectStore, prefix: str) -> None:
    with pytest.raises(InvalidArgument):
        list(backend.list(prefix))


def test_concurrent_puts_of_one_key_leave_one_whole_object(backend: ObjectStore) -> None:
    data = os.urandom(256 << 10)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: backend.put("same/key", data), range(32)))
    assert backend.get("same/key") == data
    assert list(backend.list("")) == ["same/key"]


def test_concurrent_puts_of_many_keys_all_land(backend: ObjectStore) -> None:
    keys = [f"k/{i % 7}/{i}" for i in range(200)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: backend.put(key, key.encode()), keys))
    assert sorted(backend.list("k/")) == sorted(keys)
    assert all(backend.get(key) == key.encode() for key in keys)


def test_a_listing_continues_after_any_key_it_gave(backend: ObjectStore) -> None:
    # '-' < '/' < '.' < '0': byte order and a directory walk order these differently; a store
    # may use either, but `after` must continue its own order.
    keys = ["a-c", "a.json", "a/b", "a/c/d", "a0", "b/x"]
    for key in reversed(keys):
        backend.put(key, b"x")
    full = list(backend.list(""))
    assert sorted(full) == keys
    assert list(backend.list("")) == full  # stable
    for prefix in ("", "a", "a/"):
        listed = list(backend.list(prefix))
        assert listed == [key for key in full if key.startswith(prefix)]
        for i, key in enumerate(listed):
            assert list(backend.list(prefix, after=key)) == listed[i + 1 :]


def test_the_local_store_lists_in_byte_order(tmp_path: Path) -> None:
    backend = LocalDirectoryStore(tmp_path / "s")
    keys = ["a-c", "a.json", "a/b", "a/c/d", "a0", "b/x"]
    for key in reversed(keys):
        backend.put(key, b"x")
    assert list(backend.list("")) == keys
    assert list(backend.list("a/", after="a-c")) == ["a/b", "a/c/d"]


def test_a_listing_of_many_keys_pages_through_all_of_them(backend: ObjectStore) -> None:
    keys = [f"chunks/{i % 3:02x}/{i:05d}" for i in range(2100)]  # S3 pages hold 1000
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: backend.put(key, b""), keys))
    listed = list(backend.list("chunks/"))
    assert sorted(listed) == sorted(keys)
    after = listed[1500]
    assert list(backend.list("chunks/", after=after)) == listed[1501:]


# --- one writer per datastore: the writer lease, for every backend ---------------------------

HOLDER_A = LeaseHolder("a" * 32, "host-a", 1111, "10.0.0.1:7443")
HOLDER_B = LeaseHolder("b" * 32, "host-b", 2222, "10.0.0.2:7443")


def test_a_second_writer_is_refused_naming_the_holder(make_backend: MakeBackend) -> None:
    first = make_backend().acquire_writer_lease(HOLDER_A)
    with pytest.raises(
        WriterLeaseHeld,
        match=r"in use by another controller: controller aaaaaaaaaaaa on host host-a "
        r"\(PID 1111, 10\.0\.0\.1:7443\) holds its writer lease until",
    ) as refused:
        make_backend().acquire_writer_lease(HOLDER_B)
    assert refused.value.code == "DatastoreLeaseHeld"
    first.renew()
    with pytest.raises(WriterLeaseHeld):
        make_backend().acquire_writer_lease(HOLDER_B)  # renewing kept it
    first.release()
    first.release()  # twice is harmless
    second = make_backend().acquire_writer_lease(HOLDER_B)  # released: taken at once
    with pytest.raises(WriterLeaseHeld, match="host-b"):
        make_backend().acquire_writer_lease(HOLDER_A)
    second.release()
    assert list(make_backend().list("")) == []  # the lease is no object of the datastore


def test_the_lease_is_taken_by_exactly_one_of_many_racing_writers(
    make_backend: MakeBackend,
) -> None:
    holders = [LeaseHolder(f"{i:032x}", f"host-{i}", i, f"127.0.0.1:{i}") for i in range(8)]
    start = threading.Barrier(len(holders))

    def take(holder: LeaseHolder) -> WriterLease | None:
        store = make_backend()
        start.wait()
        try:
            return store.acquire_writer_lease(holder)
        except WriterLeaseHeld:
            return None

    with ThreadPoolExecutor(len(holders)) as pool:
        leases = [lease for lease in pool.map(take, holders) if lease is not None]
    assert len(leases) == 1
    leases[0].release()


# --- the local directory store in particular -----------------------------------------------


def test_local_store_files_are_private_and_temp_files_are_not_objects(tmp_path: Path) -> None:
    backend = LocalDirectoryStore(tmp_path / "s")
    backend.put("chunks/ab/cd/abcd", b"secret disk bytes")
    path = tmp_path / "s" / "chunks" / "ab" / "cd" / "abcd"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # What a crash in the middle of a put leaves behind is not an object.
    (path.parent / ".tmp-0123456789abcdef").write_bytes(b"half")
    assert list(backend.list("")) == ["chunks/ab/cd/abcd"]


def test_local_store_failed_put_leaves_no_temp_file(tmp_path: Path) -> None:
    backend = LocalDirectoryStore(tmp_path / "s")
    backend.put("a/b", b"x")
    with pytest.raises(Conflict, match="both an object and the prefix"):
        backend.put("a", b"y")  # "a" is a directory on disk
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["a"]
    assert [p.name for p in (tmp_path / "s" / "a").iterdir()] == ["b"]


def test_local_store_puts_without_durable_become_visible_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backup's chunk puts (issue 11): renamed into place a batch at a time after one sync,
    and all of them by `sync`; never visible before their contents were synced."""
    import controller.datastore.local as local

    syncs: list[int] = []
    backend = LocalDirectoryStore(tmp_path / "s")
    real_sync = backend._syncfs

    def counted() -> None:
        syncs.append(1)
        real_sync()

    monkeypatch.setattr(backend._sync, "_sync", counted)
    monkeypatch.setattr(local, "BATCH_BYTES", 3000)
    for n in range(2):
        backend.put(f"chunks/{n}", bytes([n]) * 1000, durable=False)
    assert not backend.has("chunks/0")  # written, not yet committed: not an object
    assert list(backend.list("")) == []
    assert syncs == []
    backend.put("chunks/2", b"\x02" * 1000, durable=False)  # fills the batch: one sync
    assert syncs == [1]
    assert [backend.get(f"chunks/{n}") for n in range(3)] == [bytes([n]) * 1000 for n in range(3)]
    backend.put("chunks/3", b"\x03", durable=False)
    assert not backend.has("chunks/3")
    backend.sync()  # commits what is pending (one sync), then syncs the names (another)
    assert backend.get("chunks/3") == b"\x03"
    assert len(syncs) == 3
    leftovers = [p.name for p in (tmp_path / "s" / "chunks").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_local_store_pending_puts_lost_in_a_crash_are_reclaimed(tmp_path: Path) -> None:
    backend = LocalDirectoryStore(tmp_path / "s")
    backend.put("chunks/a", b"pending", durable=False)
    # The controller dies here: a new one finds only a temporary file, and removes it.
    again = LocalDirectoryStore(tmp_path / "s")
    assert not again.has("chunks/a")
    assert again.reclaim_temporary() == 1
    assert list(again.list("")) == []


def test_local_store_without_fsync_still_stores(tmp_path: Path) -> None:
    backend = LocalDirectoryStore(tmp_path / "s", fsync=False)
    backend.put("a/b", b"x")
    assert backend.get("a/b") == b"x"


def test_local_store_write_error_is_typed_and_leaves_nothing(tmp_path: Path) -> None:
    backend = LocalDirectoryStore(tmp_path / "s")
    backend.put("a/b", b"x")
    # A real I/O error in the middle of a write: the file size limit makes write() fail EFBIG.
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, previous_limit[1]))
    try:
        with pytest.raises(DatastoreError, match="cannot write object 'a/c'"):
            backend.put("a/c", os.urandom(2 << 20))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert not backend.has("a/c")
    assert sorted(p.name for p in (tmp_path / "s" / "a").iterdir()) == ["b"]


@pytest.fixture
def small_file_system(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs, mounted for the test (root) and unmounted by it."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "coffer-test", str(mountpoint)],
        check=True,
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def test_a_full_local_store_says_so_and_keeps_no_partial_object(small_file_system: Path) -> None:
    backend = LocalDirectoryStore(small_file_system / "store")
    backend.put("a/b", b"x")
    with pytest.raises(DatastoreFull, match="is full: cannot write object 'a/c'") as full:
        backend.put("a/c", os.urandom(2 << 20))
    assert full.value.code == "DatastoreFull"
    assert not full.value.retryable
    assert list(backend.list("")) == ["a/b"]
    assert sorted(p.name for p in (small_file_system / "store" / "a").iterdir()) == ["b"]
    backend.put("a/c", b"small enough")  # space is back: writes work again


def test_a_read_only_local_store_refuses_writes_and_serves_reads(
    small_file_system: Path,
) -> None:
    backend = LocalDirectoryStore(small_file_system / "store")
    backend.put("a/b", b"kept")
    subprocess.run(["mount", "-o", "remount,ro", str(small_file_system)], check=True)
    with pytest.raises(DatastoreReadOnly, match="is read-only: cannot write object 'a/c'"):
        LocalDirectoryStore(small_file_system / "store").put("a/c", b"x")
    with pytest.raises(DatastoreReadOnly, match="cannot delete object 'a/b'"):
        backend.delete("a/b")
    assert backend.get("a/b") == b"kept"


_HOLD_LEASE = """
import sys, time
from pathlib import Path
from controller.datastore import LeaseHolder, LocalDirectoryStore
store = LocalDirectoryStore(Path(sys.argv[1]))
store.acquire_writer_lease(LeaseHolder("c" * 32, "host-c", 3333, "127.0.0.1:7443"))
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_a_local_lease_ends_with_its_process(tmp_path: Path) -> None:
    """The local lease is a flock: a controller that dies (even by SIGKILL) lets go of it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LEASE, str(tmp_path / "store")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WriterLeaseHeld, match=r"host-c \(PID 3333.*until its process exits"):
            LocalDirectoryStore(tmp_path / "store").acquire_writer_lease(HOLDER_A)
    finally:
        holder.kill()
        holder.wait(10)
    lease = LocalDirectoryStore(tmp_path / "store").acquire_writer_lease(HOLDER_A)
    lease.renew()
    lease.release()


# --- the datastore: creating and opening -----------------------------------------------------


def test_create_then_open_gives_the_same_settings(
    make_storage: MakeBackend, sealing: Sealing
) -> None:
    created = sealing.create(make_storage(), 1 << 20)
    opened = sealing.open(make_storage())
    assert opened.chunk_size == created.chunk_size == 1 << 20
    assert opened.config.hash == ("blake3-keyed" if sealing.master else "blake3")
    assert opened.config.compression == "zstd"
    assert opened.encrypted == (sealing.master is not None)
    assert sealing.create(make_storage(), 1 << 20).config == created.config
    assert opened.chunk_hash == created.chunk_hash


def test_create_refuses_to_change_the_chunk_size(storage: ObjectStore, sealing: Sealing) -> None:
    sealing.create(storage, 1 << 20)
    with pytest.raises(Conflict, match="already exists with chunk size 1048576"):
        Datastore.open_or_create(storage, 4 << 20, master=sealing.master, vault="default")
    assert sealing.open(storage).chunk_size == 1 << 20


def test_open_of_an_empty_store_is_not_found(storage: ObjectStore) -> None:
    with pytest.raises(NotFound, match="datastore"):
        Datastore.open(storage)


@pytest.mark.parametrize("size", [0, 1000, 3 << 20, 32 << 20])
def test_create_refuses_unusable_chunk_sizes(
    storage: ObjectStore, sealing: Sealing, size: int
) -> None:
    with pytest.raises(InvalidArgument, match="power of two"):
        sealing.create(storage, size)
    assert not storage.has(CONFIG_KEY)


def test_open_refuses_a_newer_or_foreign_datastore(storage: ObjectStore) -> None:
    storage.put(CONFIG_KEY, b'{"format": 3, "chunk_size": 4096}')
    with pytest.raises(UnsupportedFormat, match="version 3"):
        Datastore.open(storage)
    storage.put(CONFIG_KEY, b'{"format": 1, "chunk_size": 4096, "hash": "blake3"}')
    with pytest.raises(UnsupportedFormat, match="blake3"):
        Datastore.open(storage)
    storage.put(
        CONFIG_KEY, b'{"format": 1, "chunk_size": 4096, "hash": "sha256", "compression": "zstd"}'
    )
    with pytest.raises(UnsupportedFormat, match="hash 'sha256'"):
        Datastore.open(storage)
    storage.put(CONFIG_KEY, b"\x00garbage")
    with pytest.raises(CorruptData, match="datastore configuration"):
        Datastore.open(storage)


# --- chunks --------------------------------------------------------------------------------


def test_put_chunk_stores_once_and_reads_back(store: Datastore) -> None:
    raw = chunk_of(7)
    digest = store.chunk_hash.digest(raw)
    compression, payload = compress(raw)
    assert compression is Compression.ZSTD
    assert not store.has_chunk(digest)
    written = store.put_chunk(digest, payload, compression, len(raw))
    assert written == len(encode_blob(compression, len(raw), payload))
    assert store.has_chunk(digest)
    assert store.read_chunk(digest) == raw
    # Stored as sent, so a restore can forward it without recompressing.
    assert store.get_chunk_blob(digest) == (Compression.ZSTD, len(raw), payload)
    assert store.put_chunk(digest, payload, compression, len(raw)) == 0


def test_uncompressed_and_short_chunks_are_stored(store: Datastore) -> None:
    raw = os.urandom(1000)  # the short last chunk of a disk, incompressible
    digest = store.chunk_hash.digest(raw)
    assert store.put_chunk(digest, raw, 1, len(raw)) > 0  # the proto's COMPRESSION_NONE
    assert store.get_chunk_blob(digest) == (Compression.NONE, 1000, raw)
    assert store.read_chunk(digest) == raw


def test_digest_mismatch_stores_nothing(store: Datastore, storage: ObjectStore) -> None:
    raw = chunk_of(1)
    compression, payload = compress(raw)
    claimed = store.chunk_hash.digest(b"something else")
    with pytest.raises(ChunkDigestMismatch, match=f"not to the digest {claimed.hex()}"):
        store.put_chunk(claimed, payload, compression, len(raw))
    assert not store.has_chunk(claimed)
    assert list(storage.list("chunks/")) == []


def test_bad_chunk_is_refused_even_when_its_digest_is_stored(store: Datastore) -> None:
    digest = upload(store, chunk_of(1))
    with pytest.raises(ChunkDigestMismatch):
        store.put_chunk(digest, chunk_of(2), Compression.NONE, CHUNK)
    assert store.read_chunk(digest) == chunk_of(1)


@pytest.mark.parametrize(
    ("raw_size", "error", "message"),
    [
        (CHUNK - 1, CorruptData, "expected 4095"),
        (0, InvalidArgument, "raw size 0"),
        (CHUNK + 1, InvalidArgument, "raw size 4097"),
    ],
)
def test_wrong_raw_size_stores_nothing(
    store: Datastore, storage: ObjectStore, raw_size: int, error: type[Exception], message: str
) -> None:
    raw = chunk_of(1)
    compression, payload = compress(raw)
    with pytest.raises(error, match=message):
        store.put_chunk(store.chunk_hash.digest(raw), payload, compression, raw_size)
    assert list(storage.list("chunks/")) == []


def test_undecompressable_payload_stores_nothing(store: Datastore, storage: ObjectStore) -> None:
    raw = chunk_of(1)
    with pytest.raises(CorruptData, match="zstd"):
        store.put_chunk(
            store.chunk_hash.digest(raw), b"not zstd at all", Compression.ZSTD, len(raw)
        )
    with pytest.raises(InvalidArgument, match="compression"):
        store.put_chunk(store.chunk_hash.digest(raw), raw, 0, len(raw))
    assert list(storage.list("chunks/")) == []


def test_zero_digest_is_present_and_never_stored(store: Datastore) -> None:
    assert store.has_chunk(ZERO_DIGEST)
    with pytest.raises(InvalidArgument, match="never stored"):
        store.put_chunk(ZERO_DIGEST, bytes(CHUNK), Compression.NONE, CHUNK)
    with pytest.raises(InvalidArgument, match="never stored"):
        store.read_chunk(ZERO_DIGEST)


def test_malformed_digest_is_refused(store: Datastore) -> None:
    with pytest.raises(InvalidArgument, match="32 bytes"):
        store.has_chunk(b"short")
    with pytest.raises(InvalidArgument, match="32 bytes"):
        store.put_chunk(b"short", b"x", Compression.NONE, 1)


def test_missing_chunks_lists_each_absent_digest_once_in_order(store: Datastore) -> None:
    present = upload(store, chunk_of(1))
    absent_a, absent_b = store.chunk_hash.digest(b"a"), store.chunk_hash.digest(b"b")
    asked = [absent_b, present, ZERO_DIGEST, absent_a, absent_b]
    assert store.missing_chunks(asked) == [absent_b, absent_a]


def test_missing_chunk_is_reported_typed(store: Datastore) -> None:
    digest = store.chunk_hash.digest(b"never stored")
    with pytest.raises(ChunkMissing, match=digest.hex()):
        store.get_chunk_blob(digest)
    with pytest.raises(ChunkMissing):
        store.read_chunk(digest)


def test_chunks_are_sharded_two_levels_deep(store: Datastore, storage: ObjectStore) -> None:
    digest = upload(store, chunk_of(5))
    hex_digest = digest.hex()
    assert list(storage.list("chunks/")) == [
        f"chunks/{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest}"
    ]
    assert chunk_key(digest) == f"chunks/{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest}"


def test_concurrent_puts_of_the_same_chunk_are_safe(store: Datastore, storage: ObjectStore) -> None:
    raw = chunk_of(9)
    digest = store.chunk_hash.digest(raw)
    compression, payload = compress(raw)
    start = threading.Barrier(8)

    def put(_: int) -> int:
        start.wait()
        return store.put_chunk(digest, payload, compression, len(raw))

    with ThreadPoolExecutor(8) as pool:
        written = list(pool.map(put, range(8)))
    assert any(written)
    assert store.read_chunk(digest) == raw
    assert list(storage.list("chunks/")) == [chunk_key(digest)]


def test_concurrent_puts_of_different_chunks_all_land(store: Datastore) -> None:
    chunks = [chunk_of(i) for i in range(100)]
    with ThreadPoolExecutor(8) as pool:
        digests = list(pool.map(lambda raw: upload(store, raw), chunks))
    assert store.missing_chunks(digests) == []
    assert [store.read_chunk(d) for d in digests] == chunks


# --- recovery points -----------------------------------------------------------------------


def test_backup_commit_restore_round_trip(
    store: Datastore, make_storage: MakeBackend, sealing: Sealing
) -> None:
    manifest = back_up(store, "rp1", {"root": ROOT_IMAGE, "data": DATA_IMAGE})
    store.put_manifest(manifest)
    assert store.get_manifest("rp1") == manifest
    assert list(store.list_manifests()) == [manifest]
    # A restarted controller finds everything from the store alone.
    reopened = sealing.open(make_storage())
    assert list(reopened.list_manifests()) == [manifest]
    assert restore(reopened, "rp1", "root") == ROOT_IMAGE
    assert restore(reopened, "rp1", "data") == DATA_IMAGE


def test_zero_chunks_and_repeats_are_not_stored(store: Datastore, storage: ObjectStore) -> None:
    store.put_manifest(back_up(store, "rp1", {"root": ROOT_IMAGE}))
    # ROOT_IMAGE: chunk 1, zeros, chunk 2, chunk 1 again, a short chunk 3.
    assert len(list(storage.list("chunks/"))) == 3
    assert store.get_index("rp1", "root").digest_at(1) == ZERO_DIGEST


def test_second_backup_shares_unchanged_chunks(store: Datastore, storage: ObjectStore) -> None:
    store.put_manifest(back_up(store, "rp1", {"root": ROOT_IMAGE}))
    before = set(storage.list("chunks/"))
    changed = ROOT_IMAGE[:CHUNK] + chunk_of(42) + ROOT_IMAGE[2 * CHUNK :]
    needed = store.missing_chunks(
        store.chunk_hash.digest(changed[i : i + CHUNK]) for i in range(0, len(changed), CHUNK)
    )
    assert needed == [store.chunk_hash.digest(chunk_of(42))]
    store.put_manifest(back_up(store, "rp2", {"root": changed}))
    assert set(storage.list("chunks/")) - before == {
        chunk_key(store.chunk_hash.digest(chunk_of(42)))
    }
    assert restore(store, "rp2", "root") == changed
    assert restore(store, "rp1", "root") == ROOT_IMAGE


def test_recovery_point_is_invisible_until_its_manifest_is_written(store: Datastore) -> None:
    manifest = back_up(store, "rp1", {"root": ROOT_IMAGE})
    assert list(store.list_manifests()) == []
    with pytest.raises(NotFound, match="recovery point 'rp1'"):
        store.get_manifest("rp1")
    with pytest.raises(NotFound, match="recovery point 'rp1'"):
        store.get_index("rp1", "root")  # verified reads need a committed recovery point
    assert store.get_index("rp1", "root", verify=False).size_bytes == len(ROOT_IMAGE)
    store.put_manifest(manifest)
    assert [m.id for m in store.list_manifests()] == ["rp1"]


def test_commit_refuses_a_missing_chunk(store: Datastore) -> None:
    manifest = back_up(store, "rp1", {"root": ROOT_IMAGE}, upload_chunks=False)
    with pytest.raises(ChunkMissing, match="3 chunk"):
        store.put_manifest(manifest)
    assert list(store.list_manifests()) == []


def test_commit_can_skip_the_chunk_check_for_a_caller_that_tracked_it(store: Datastore) -> None:
    manifest = back_up(store, "rp1", {"root": ROOT_IMAGE})
    store.put_manifest(manifest, verify_chunks=False)
    assert store.get_manifest("rp1") == manifest


def test_commit_refuses_a_missing_index(store: Datastore) -> None:
    manifest = back_up(store, "rp1", {"root": ROOT_IMAGE})
    other = replace(manifest, id="rp2")  # no index was stored under rp2
    with pytest.raises(NotFound, match="disk index 'rp2/root'"):
        store.put_manifest(other)
    assert list(store.list_recovery_point_ids()) == []


def test_commit_refuses_an_index_the_manifest_does_not_record(store: Datastore) -> None:
    manifest = back_up(store, "rp1", {"root": ROOT_IMAGE})
    back_up(store, "rp1", {"root": ROOT_IMAGE[: 2 * CHUNK]})  # index rewritten before commit
    with pytest.raises(Conflict, match="not the one manifest rp1 records"):
        store.put_manifest(manifest)
    assert list(store.list_manifests()) == []


def test_commit_is_idempotent_but_not_rewritable(store: Datastore) -> None:
    manifest = back_up(store, "rp1", {"root": ROOT_IMAGE})
    store.put_manifest(manifest)
    store.put_manifest(manifest)
    relabelled = replace(manifest, consistency="crash")
    with pytest.raises(Conflict, match="already committed"):
        store.put_manifest(relabelled)
    assert store.get_manifest("rp1").consistency == "file-system"
    with pytest.raises(Conflict, match="indexes cannot change"):
        store.put_index("rp1", store.get_index("rp1", "root"))


def test_index_must_use_the_datastore_chunk_size(store: Datastore) -> None:
    index = DiskIndex("root", 8192, 8192, store.chunk_hash.digest(b"x"))
    with pytest.raises(InvalidArgument, match="chunk size 8192"):
        store.put_index("rp1", index)


@pytest.mark.parametrize("rp_id", ["", "../x", "a/b", ".x", "a.json", "x" * 129])
def test_recovery_point_ids_are_checked(store: Datastore, rp_id: str) -> None:
    with pytest.raises(InvalidArgument, match="recovery point id"):
        store.get_manifest(rp_id)
    with pytest.raises(InvalidArgument, match="recovery point id"):
        store.put_index(rp_id, DiskIndex("root", 0, CHUNK, b""))


def test_get_index_of_an_unknown_disk_names_the_known_ones(store: Datastore) -> None:
    store.put_manifest(back_up(store, "rp1", {"root": ROOT_IMAGE, "data": DATA_IMAGE}))
    with pytest.raises(DiskNotFound, match="no disk named 'swap'; its disks are: root, data"):
        store.get_index("rp1", "swap")


def test_index_replaced_after_commit_is_detected(store: Datastore) -> None:
    store.put_manifest(back_up(store, "rp1", {"root": ROOT_IMAGE}))
    forged = DiskIndex("root", CHUNK, CHUNK, store.chunk_hash.digest(chunk_of(1)))
    store.backend.put(index_key("rp1", "root"), forged.encode())
    with pytest.raises(CorruptData, match="not the index its manifest records"):
        store.get_index("rp1", "root")


def test_delete_recovery_point_removes_it_and_keeps_chunks(
    store: Datastore, storage: ObjectStore
) -> None:
    store.put_manifest(back_up(store, "rp1", {"root": ROOT_IMAGE, "data": DATA_IMAGE}))
    store.put_manifest(back_up(store, "rp2", {"root": ROOT_IMAGE}))
    chunks = set(storage.list("chunks/"))
    store.delete_recovery_point("rp1")
    assert [m.id for m in store.list_manifests()] == ["rp2"]
    with pytest.raises(NotFound):
        store.get_manifest("rp1")
    assert list(storage.list("indexes/rp1/")) == []
    assert set(storage.list("chunks/")) == chunks  # garbage collection's job
    assert restore(store, "rp2", "root") == ROOT_IMAGE
    store.delete_recovery_point("rp1")  # again: nothing left to do, no error


def test_delete_recovery_point_removes_the_manifest_first(
    faulty: FaultyStore, sealing: Sealing
) -> None:
    store = sealing.create(faulty)
    store.put_manifest(back_up(store, "rp1", {"root": ROOT_IMAGE, "data": DATA_IMAGE}))
    chunks = set(faulty.list("chunks/"))
    fault = faulty.fail_deletes("indexes/", skip=1, times=1)
    with pytest.raises(DatastoreError, match="injected fault"):
        store.delete_recovery_point("rp1")
    assert fault.fired == 1
    # The commit point went first: the recovery point is gone although an index is left.
    assert list(store.list_recovery_point_ids()) == []
    with pytest.raises(NotFound, match="recovery point 'rp1'"):
        store.get_index("rp1", "data")
    assert list(faulty.list("indexes/rp1/")) != []
    store.delete_recovery_point("rp1")  # the retry finishes
    assert list(faulty.list("indexes/")) == []
    assert set(faulty.list("chunks/")) == chunks


def test_get_indexes_reads_each_disk_as_the_manifest_records_it(store: Datastore) -> None:
    manifest = back_up(store, "rp1", {"root": ROOT_IMAGE, "data": DATA_IMAGE})
    store.put_manifest(manifest)
    indexes = list(store.get_indexes(manifest))
    assert [i.disk for i in indexes] == ["root", "data"]
    assert indexes == [store.get_index("rp1", "root"), store.get_index("rp1", "data")]
    forged = DiskIndex("data", CHUNK, CHUNK, store.chunk_hash.digest(chunk_of(1)))
    store.backend.put(index_key("rp1", "data"), forged.encode())
    with pytest.raises(CorruptData, match="index of disk 'data' of recovery point rp1"):
        list(store.get_indexes(manifest))


def test_chunks_are_listed_by_digest_and_foreign_keys_are_skipped(
    store: Datastore, storage: ObjectStore
) -> None:
    digests = {upload(store, chunk_of(i)) for i in range(5)}
    hex_digest = next(iter(digests)).hex()
    foreign = [
        "chunks/README",
        f"chunks/{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest}.old",
        f"chunks/00/00/{hex_digest}",  # in the wrong shard
        f"chunks/{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest.upper()}",
        f"chunks/00/00/{ZERO_DIGEST.hex()}",  # the zero chunk is never stored
        f"chunks/{hex_digest[:2]}/{hex_digest[2:4]}/x/{hex_digest}",
    ]
    for key in foreign:
        storage.put(key, b"not a chunk")
    assert sorted(store.list_chunk_digests()) == sorted(digests)


def test_chunk_info_and_delete_chunk(store: Datastore) -> None:
    raw = chunk_of(1)
    digest = upload(store, raw)
    info = store.chunk_info(digest)
    assert info.size == len(store.backend.get(chunk_key(digest)))
    store.delete_chunk(digest)
    assert not store.has_chunk(digest)
    with pytest.raises(NotFound, match=f"chunk '{digest.hex()}' was not found"):
        store.chunk_info(digest)
    store.delete_chunk(digest)  # already gone: fine
    for call in (store.chunk_info, store.delete_chunk):
        with pytest.raises(InvalidArgument, match="never stored"):
            call(ZERO_DIGEST)


def test_indexes_are_listed_by_recovery_point_committed_or_not(
    store: Datastore, storage: ObjectStore
) -> None:
    store.put_manifest(back_up(store, "rp1", {"root": ROOT_IMAGE, "data": DATA_IMAGE}))
    back_up(store, "rp2", {"root": ROOT_IMAGE})  # never committed
    storage.put("indexes/rp3/notes.txt", b"foreign")
    storage.put("indexes/stray.didx", b"foreign")
    storage.put("indexes/-bad/root.didx", b"foreign")
    listed = {rp: sorted(disks) for rp, disks in store.list_indexes().items()}
    assert listed == {"rp1": ["data", "root"], "rp2": ["root"]}
    info = store.index_info("rp2", "root")
    assert info.size == len(store.get_index("rp2", "root", verify=False).encode())
    with pytest.raises(NotFound, match="disk index 'rp2/data'"):
        store.index_info("rp2", "data")


def test_only_uncommitted_indexes_can_be_deleted_alone(store: Datastore) -> None:
    store.put_manifest(back_up(store, "rp1", {"root": ROOT_IMAGE}))
    back_up(store, "rp2", {"root": ROOT_IMAGE, "data": DATA_IMAGE})
    with pytest.raises(Conflict, match="rp1 is committed"):
        store.delete_uncommitted_indexes("rp1", ["root"])
    assert restore(store, "rp1", "root") == ROOT_IMAGE
    assert store.delete_uncommitted_indexes("rp2", ["root", "data"]) == 2
    assert set(store.list_indexes()) == {"rp1"}


def test_catalog_rebuild_reports_a_damaged_manifest(store: Datastore, storage: ObjectStore) -> None:
    store.put_manifest(back_up(store, "rp1", {"root": ROOT_IMAGE}))
    store.put_manifest(back_up(store, "rp2", {"root": ROOT_IMAGE}))
    storage.put(manifest_key("rp2"), b'{"format": 1')
    assert sorted(store.list_recovery_point_ids()) == ["rp1", "rp2"]
    with pytest.raises(CorruptData, match="manifest of recovery point rp2"):
        list(store.list_manifests())
    assert store.get_manifest("rp1").id == "rp1"


def test_manifest_under_the_wrong_name_is_corrupt(store: Datastore) -> None:
    manifest = back_up(store, "rp1", {"root": ROOT_IMAGE})
    store.backend.put(manifest_key("rp9"), manifest.encode())
    with pytest.raises(CorruptData, match="describes recovery point 'rp1'"):
        store.get_manifest("rp9")


# --- fault injection -----------------------------------------------------------------------


def test_failed_chunk_put_leaves_nothing_and_a_retry_stores_it(
    faulty: FaultyStore, sealing: Sealing
) -> None:
    store = sealing.create(faulty)
    fault = faulty.fail_put(prefix="chunks/")
    raw = chunk_of(1)
    with pytest.raises(DatastoreError, match="injected fault"):
        upload(store, raw)
    assert fault.fired == 1
    assert not store.has_chunk(store.chunk_hash.digest(raw))
    assert list(faulty.list("chunks/")) == []
    upload(store, raw)
    assert store.read_chunk(store.chunk_hash.digest(raw)) == raw


def test_chunk_written_but_reported_failed_is_stored_once_on_retry(
    faulty: FaultyStore, sealing: Sealing
) -> None:
    store = sealing.create(faulty)
    faulty.fail_put(prefix="chunks/", after_write=True)  # the reply was lost
    raw = chunk_of(1)
    digest = store.chunk_hash.digest(raw)
    compression, payload = compress(raw)
    with pytest.raises(DatastoreError):
        store.put_chunk(digest, payload, compression, len(raw))
    assert store.put_chunk(digest, payload, compression, len(raw)) == 0
    assert store.read_chunk(digest) == raw


def test_backup_with_a_failed_chunk_cannot_commit(faulty: FaultyStore, sealing: Sealing) -> None:
    store = sealing.create(faulty)
    faulty.fail_put(2, prefix="chunks/")
    with pytest.raises(DatastoreError):
        back_up(store, "rp1", {"root": ROOT_IMAGE})
    # The agent gives up on this disk; a buggy controller commits anyway.
    faulty.clear()
    manifest = back_up(store, "rp1", {"root": ROOT_IMAGE}, upload_chunks=False)
    with pytest.raises(ChunkMissing):
        store.put_manifest(manifest)
    assert list(store.list_manifests()) == []


def test_failed_manifest_put_leaves_no_recovery_point(
    faulty: FaultyStore, sealing: Sealing
) -> None:
    store = sealing.create(faulty)
    manifest = back_up(store, "rp1", {"root": ROOT_IMAGE})
    faulty.fail_put(prefix="manifests/")
    with pytest.raises(DatastoreError):
        store.put_manifest(manifest)
    assert list(store.list_manifests()) == []
    assert list(faulty.list("manifests/")) == []
    store.put_manifest(manifest)  # the retry commits
    assert restore(store, "rp1", "root") == ROOT_IMAGE


def test_torn_index_write_prevents_the_commit(faulty: FaultyStore, sealing: Sealing) -> None:
    store = sealing.create(faulty)
    faulty.truncate_puts("indexes/", keep=50)
    manifest = back_up(store, "rp1", {"root": ROOT_IMAGE})
    with pytest.raises(Conflict, match="not the one manifest rp1 records"):
        store.put_manifest(manifest)
    assert list(store.list_manifests()) == []
    with pytest.raises(CorruptData, match="index of disk 'root'"):
        store.get_index("rp1", "root", verify=False)


def test_rotten_chunk_is_detected_on_read(faulty: FaultyStore, sealing: Sealing) -> None:
    store = sealing.create(faulty)
    faulty.corrupt_puts("chunks/")
    raw = os.urandom(CHUNK)  # stored uncompressed: only the digest check can notice
    digest = upload(store, raw)
    with pytest.raises(CorruptData, match=f"chunk {digest.hex()}"):
        store.read_chunk(digest)


def test_truncated_chunk_is_detected_on_read(faulty: FaultyStore, sealing: Sealing) -> None:
    store = sealing.create(faulty)
    faulty.truncate_puts("chunks/", keep=30)
    digest = upload(store, chunk_of(3))
    with pytest.raises(CorruptData, match=f"chunk {digest.hex()}"):
        store.read_chunk(digest)


def test_failed_delete_keeps_the_recovery_point_whole(
    faulty: FaultyStore, sealing: Sealing
) -> None:
    store = sealing.create(faulty)
    store.put_manifest(back_up(store, "rp1", {"root": ROOT_IMAGE}))
    faulty.inject(Fault("delete", "manifests/"))
    with pytest.raises(DatastoreError):
        store.delete_recovery_point("rp1")
    assert restore(store, "rp1", "root") == ROOT_IMAGE


def test_stat_faults_are_injected_like_the_others(faulty: FaultyStore) -> None:
    faulty.put("chunks/a", b"x")
    fault = faulty.inject(Fault("stat", "chunks/"))
    with pytest.raises(DatastoreError, match="injected fault: stat 'chunks/a'"):
        faulty.stat("chunks/a")
    assert faulty.stat("chunks/a").size == 1  # it fired once
    assert fault.fired == 1


def test_after_a_failed_sync_the_local_store_refuses_every_write() -> None:
    """Linux reports a writeback error once: no later sync can vouch for earlier data."""
    from controller.datastore.local import GroupSync

    calls = []

    def sync() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")

    group = GroupSync(sync)
    group.wait()  # fine
    with pytest.raises(OSError, match="earlier sync of the datastore failed"):
        group.wait()
    with pytest.raises(OSError, match="refused until the controller restarts"):
        group.wait()  # and stays refused, without syncing again
    assert len(calls) == 2
