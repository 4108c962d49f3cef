"""The datastore: where a vault keeps its recovery points, and how they stay whole.

This note is the map of the package: key layout, formats, the write order that makes a
recovery point appear atomically, and how garbage collection reclaims chunks.

Backends
--------
A datastore lives in one `ObjectStore` (backend.py): put/get/has/stat/delete/list of whole
objects under '/'-separated keys, and sync; put is atomic, durable on return and idempotent;
delete is durable on return unless asked for a batch, which one sync makes durable; stat gives
an object's size and last write time (S3: HeadObject); list gives the keys under a prefix in the
store's own stable order and resumes after any key it gave (S3's start-after). One more method
takes the writer lease (below). `open_object_store(url, settings)` (location.py) turns a
configured location into the stack of them:

- a directory: `LocalDirectoryStore` (local.py), the embedded default;
- `s3://bucket/prefix`: `S3Store` (s3.py, on obstore) inside a `RetryingStore` (retry.py),
  after a HeadBucket that names a missing bucket or refused credentials at once.

`FaultyStore` (faulty.py) wraps any of them for fault injection, and `EncryptingStore`
(encrypted.py) for encryption at rest: the datastore of an encrypted vault reads and writes
every object through it, and sees the same plain objects as over a bare store. Every backend
passes the same suite (tests/test_datastore.py, tests/test_gc.py), S3 against a real SeaweedFS
the tests start, and each also encrypted. Nothing here renames, appends or walks directories:
those do not exist on an object store, and a design that needs them would not survive the move
to one. Names starting with '.' are a backend's own (temporary files, the lease) and never
keys, so listing skips them.

Errors a backend raises are typed (shared/errors.py): NotFound for a missing object;
DatastoreAccessDenied (credentials refused), DatastoreBucketMissing, DatastoreReadOnly (a
read-only file system, or S3 refusing writes while it allows reads), DatastoreFull (ENOSPC) —
none retried, each saying what to fix; DatastoreUnavailable for throttling (503 SlowDown, 429),
server errors, reset connections and timeouts, which is retryable.

Retries (retry.py)
------------------
`RetryingStore` retries what an error's class marks retryable, with shared/backoff.py's full
jitter (0.2 s doubling to 10 s, 5 attempts by default), and never a refusal, a missing object
or a bug; every interface operation may be repeated (puts rewrite the same bytes under the
same name), and a listing broken part way resumes after its last key. It also bounds the
requests in flight (16 by default): more executor threads than that wait for a slot, and a
store that throttles gets fewer requests, not more. A local directory is not wrapped: its
errors are not transient, and a failed sync is final (local.py).

Key layout
----------
    datastore.json                     settings: format, chunk size, hash, compression;
                                       format 2 also: encryption, vault, wrapped keys
    chunks/ab/cd/abcd<60 more hex>     one chunk blob per distinct chunk, named by its digest
    indexes/<rp id>/<disk>.didx        one disk index per disk of a recovery point
    manifests/<rp id>.json             one manifest per committed (live) recovery point
    deleted/<rp id>.json               the tombstone of a soft-deleted recovery point
    vault.json                         the vault's region, settings and policies
    vms/<32 hex>.json                  one description per VM: item, policy, labels, verdicts

Chunks are sharded by the first two bytes of their digest (65 536 directories on a file system),
so even 10^8 chunks leave ~1 500 files per directory. The store is self-describing: from the
manifests (and the indexes they pin), the tombstones and the descriptions, the controller
rebuilds its catalog without SQLite (controller/recovery.py, docs/recovery.md).

Descriptions (description.py) hold what only the catalog decides: written whole, one atomic
put each, by the controller shortly after its catalog changes (controller/descriptions.py),
and read only by a recovery. A VM description is named by the datastore's chunk hash of the VM
id (keyed in format 2), so a listing does not name VMs. They are never part of a recovery
point: a recovery point exists, and garbage collection marks, by manifests and tombstones
alone.

Formats and versions
--------------------
Two datastore formats, told apart by `datastore.json`, which is always stored in the clear:

- format 1 (plain): every object as below, chunks named by plain BLAKE3. Written before
  encryption at rest existed, and still for a datastore created without a master key; read and
  written unchanged by this code (tests/fixtures/format1 is one written by the old code).
- format 2 (encrypted, docs/encryption.md): every other object sealed whole with AES-256-GCM
  under a data key of the vault (envelope "CFEN": version, cipher, data key id, nonce; the
  object's key in the associated data, so a moved or swapped object fails authentication), and
  chunks named by BLAKE3 keyed with the vault's chunk-id key, so the same content in two vaults
  has unrelated names. Inside its envelope each object has the layout below, unchanged. The
  keys are wrapped by the controller's master key and kept in `datastore.json` (keys.py), so
  the storage plus the master key are enough to read the datastore.

- `datastore.json`: JSON {"format", "chunk_size", "hash": "blake3", "compression": "zstd"};
  format 2 has "hash": "blake3-keyed" and adds "encryption": "aes-256-gcm", "vault" and "keys"
  (datastore id, wrapped chunk-id key, wrapped data keys, the current one). Every writer reads
  it first; a datastore is never reopened with other settings, because chunk boundaries (and
  so dedup) depend on the chunk size and names on the hash. It is rewritten only by a key
  rotation, in one atomic put.
- chunk blob (shared/blob.py, version 1): 16-byte header (magic "CFBL", version, compression,
  raw size, a reserved key id that stays zero: the envelope carries it) + the payload exactly
  as the agent sent it: zstd frame, or raw bytes when zstd did not help. The name is the
  datastore's chunk hash of the raw bytes; the controller re-hashes every chunk it receives
  before storing it, and readers that decompress re-hash too.
- disk index (shared/index.py, version 1): binary, magic "CFIX", geometry, disk name, 32-byte
  digests in disk order (32 zero bytes for an all-zero chunk, which is never stored), SHA-256
  trailer.
- manifest (shared/manifest.py, format 1): JSON; identity, origin, consistency, and each
  disk's geometry and the SHA-256 of its index, which pins the exact index.
- tombstone (deleted.py, format 1): JSON; the manifest's bytes exactly as they were stored,
  when the point was deleted and will be purged, and what the catalog knew of it.
- vault and VM descriptions (description.py, format 1): JSON, times in POSIX seconds.
A reader refuses a version it does not know with `UnsupportedFormat`, and anything that does
not parse or authenticate with `CorruptData`; it never guesses. A wrong or missing master key
is `WrongKey` or `KeyUnavailable`.

Atomicity, idempotency, commit point
------------------------------------
Every object is written whole or not at all (temp file, file-system sync, rename, sync; or a
single PUT, never multipart) and is durable before `put` returns (on S3, as durable as the
service acknowledges: AWS stores it redundantly; SeaweedFS syncs volume writes only when
told). A backup writes, in this order:

1. its chunks: content-addressed, so writing one twice (two jobs, a retry, two threads at
   once) stores the same bytes under the same name; `put_chunk` checks `has` first and so
   writes each chunk once in the normal case, unless told to replace a chunk known bad
   (below);
2. one index per disk (`put_index`), refused once the recovery point is committed;
3. the manifest (`put_manifest`): **the commit point**. It is written only after every index
   is stored with the SHA-256 the manifest records and every referenced chunk is present.

A recovery point exists exactly when its manifest does. A backup that fails or crashes before
step 3 leaves chunks and indexes nobody references: invisible, and reclaimed by garbage
collection. Deletion runs the other way: manifest first (the recovery point is gone at once),
then its indexes; its chunks wait for garbage collection.

Soft delete (deleted.py) keeps the rule: the manifest moves into a tombstone, written before
the manifest is removed (an undelete writes the manifest back, checked as a commit, before it
removes the tombstone), so a point is live exactly when its live manifest exists, and a point
that was committed always has its manifest, its tombstone or both until it is purged (the
tombstone, then its indexes). A tombstone beside a live manifest is a move cut short: live
wins. Indexes of a tombstoned point are not a failed backup's leftovers
(`delete_uncommitted_indexes` refuses them).

Durability rule: a chunk that `has_chunk` reports present has durable contents, so an agent may
skip sending it and a manifest may reference it. The local store syncs a file's contents
before its rename makes it visible; the rename itself becomes durable with the next sync,
which at the latest is the one of the manifest's own put. A failed sync makes the store refuse
every later write (see `GroupSync` in local.py).

Concurrency and the one writer
------------------------------
Every method is synchronous and thread-safe; the controller calls them from executor threads
(obstore releases the GIL for the whole request). One controller writes a datastore at a time,
enforced by the store itself with a writer lease (lease.py), because garbage collection's
guard and the catalog live in one process:

- local directory: an exclusive `flock` on `.writer-lease`, held for the life of the process
  (the kernel drops it when the process dies, SIGKILL included);
- S3: `.writer-lease.json` under the prefix, created with If-None-Match: * and renewed (every
  third of its 60 s) or released with If-Match on its ETag; an expired or released lease is
  taken over by the same compare-and-swap, so of two racing controllers exactly one wins.
  This needs a store with conditional writes (AWS S3 since 2024, SeaweedFS, MinIO, Ceph RGW);
  expiry compares two controllers' clocks, which must agree to well within the duration.

A second controller is refused with WriterLeaseHeld naming the holder (id, host, PID,
address) and when its lease expires. A holder whose renewal finds another holder, or that
cannot renew before its lease expires, gets WriterLeaseLost and must stop writing
(`writer_lease()` cancels the block it guards). The encrypting wrapper passes the lease
through: it is the storage's, not an object of the datastore. The controller takes one lease
on the root its vaults' datastores live under, which covers all of them
(controller/datastores.py).

A key rotation stores the new wrapped keys before any object is sealed with a new data key,
then swaps the keyring in one step; objects in flight are sealed with the old or the new key,
and both are in the ring.

Garbage collection (gc.py)
--------------------------
Mark and sweep, beside running jobs (as in Proxmox Backup Server); gc.py's note has the
reasoning.

1. Mark: read every manifest and the indexes it pins, then every tombstone's manifest and its
   indexes (listed after the manifests: a point moved meanwhile is found in one or the
   other); every non-zero digest is referenced, so a soft-deleted point keeps its chunks
   until it is purged. Indexes with neither manifest nor tombstone are a backup's that has
   not committed (yet): older than the
   cutoff (the collection's start minus a grace period longer than any backup) they are
   deleted, younger their chunks count as referenced. Anything unreadable stops the collection
   before it deletes a chunk.
2. Sweep: list `chunks/`; delete a chunk that is not referenced, was written before the
   cutoff, and is not held in the vault's `ChunkGuard`. Deletes are not synced one by one:
   one sync per batch, outside the guard's lock (which the controller's event loop takes to
   hold digests). A collection checks for abort on every item, so a cancel stops it at once.

Running jobs hold the digests they rely on before committing (dedup hits, uploads, the previous
recovery point's chunks, a restore's chunks) in the `ChunkGuard`, *before* they check that the
chunks are stored; a release during a collection is deferred until it ends. That is the one hook
the job path needs; the collection is otherwise read-only towards running jobs. Deleting a
recovery point removes its manifest and indexes only; chunks are garbage collection's alone.
The local store's leftover `.tmp-*` files (a crash during a put) are not objects: listing skips
them, and they are not collected yet.

Verification and bad chunks (verify.py, health.py)
--------------------------------------------------
A chunk's name proves nothing about its bytes once they are stored. `verify_recovery_points`
reads back every distinct chunk a set of recovery points references, once, and says which
points are whole and which chunks each is missing; `find_damage` says which points reference a
chunk found bad elsewhere. `ChunkHealth` is the set of a datastore's chunks known bad: never
answered "already stored", replaced by the next upload of their content
(`put_chunk(replace=True)`). The controller keeps it in step with its catalog
(controller.integrity); `docs/integrity.md` has the whole picture.
"""

from controller.datastore.backend import ObjectInfo, ObjectStore, check_key, check_prefix
from controller.datastore.encrypted import EncryptingStore
from controller.datastore.faulty import Fault, FaultyStore
from controller.datastore.gc import ChunkGuard, GcReport, collect_garbage
from controller.datastore.keys import Kdf, Keyring, MasterKey, parse_export
from controller.datastore.lease import (
    DEFAULT_LEASE_SECONDS,
    LeaseHolder,
    WriterLease,
    keep_writer_lease,
    writer_lease,
)
from controller.datastore.local import LocalDirectoryStore
from controller.datastore.location import open_object_store
from controller.datastore.retry import RetryingStore
from controller.datastore.s3 import S3Settings, S3Store
from controller.datastore.store import (
    CONFIG_KEY,
    Datastore,
    DatastoreConfig,
    check_recovery_point_id,
    chunk_key,
    index_key,
    manifest_key,
)

__all__ = [
    "CONFIG_KEY",
    "DEFAULT_LEASE_SECONDS",
    "ChunkGuard",
    "Datastore",
    "DatastoreConfig",
    "EncryptingStore",
    "Fault",
    "FaultyStore",
    "GcReport",
    "Kdf",
    "Keyring",
    "LeaseHolder",
    "LocalDirectoryStore",
    "MasterKey",
    "ObjectInfo",
    "ObjectStore",
    "RetryingStore",
    "S3Settings",
    "S3Store",
    "WriterLease",
    "check_key",
    "check_prefix",
    "check_recovery_point_id",
    "chunk_key",
    "collect_garbage",
    "index_key",
    "keep_writer_lease",
    "manifest_key",
    "open_object_store",
    "parse_export",
    "writer_lease",
]
