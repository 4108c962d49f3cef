"""The datastore: where a vault keeps its recovery points, and how they stay whole.

This note is the map of the package: key layout, formats, the write order that makes a
recovery point appear atomically, and how garbage collection reclaims chunks.

Backends
--------
A datastore lives in one `ObjectStore` (backend.py): put/get/has/stat/delete/list of whole
objects under '/'-separated keys; put is atomic, durable on return and idempotent; stat gives
an object's size and last write time (S3: HeadObject). `LocalDirectoryStore` (local.py) is the
embedded default; an S3-compatible store implements the same six methods and passes the same
test suite. `FaultyStore` (faulty.py) wraps any of them for fault injection, and
`EncryptingStore` (encrypted.py) for encryption at rest: the datastore of an encrypted vault
reads and writes every object through it, and sees the same plain objects as over a bare store.
Nothing here renames, appends, locks files or walks directories: those do not exist on an
object store, and a design that needs them would not survive the move to one.

Key layout
----------
    datastore.json                     settings: format, chunk size, hash, compression;
                                       format 2 also: encryption, vault, wrapped keys
    chunks/ab/cd/abcd<60 more hex>     one chunk blob per distinct chunk, named by its digest
    indexes/<rp id>/<disk>.didx        one disk index per disk of a recovery point
    manifests/<rp id>.json             one manifest per committed recovery point

Chunks are sharded by the first two bytes of their digest (65 536 directories on a file system),
so even 10^8 chunks leave ~1 500 files per directory. The store is self-describing: from the
manifests (and the indexes they pin) the controller rebuilds its catalog without SQLite.

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
A reader refuses a version it does not know with `UnsupportedFormat`, and anything that does
not parse or authenticate with `CorruptData`; it never guesses. A wrong or missing master key
is `WrongKey` or `KeyUnavailable`.

Atomicity, idempotency, commit point
------------------------------------
Every object is written whole or not at all (temp file, file-system sync, rename, sync; or a
single PUT) and is durable before `put` returns. A backup writes, in this order:

1. its chunks: content-addressed, so writing one twice (two jobs, a retry, two threads at
   once) stores the same bytes under the same name; `put_chunk` checks `has` first and so
   writes each chunk once in the normal case;
2. one index per disk (`put_index`), refused once the recovery point is committed;
3. the manifest (`put_manifest`): **the commit point**. It is written only after every index
   is stored with the SHA-256 the manifest records and every referenced chunk is present.

A recovery point exists exactly when its manifest does. A backup that fails or crashes before
step 3 leaves chunks and indexes nobody references: invisible, and reclaimed by garbage
collection. Deletion runs the other way: manifest first (the recovery point is gone at once),
then its indexes; its chunks wait for garbage collection.

Durability rule: a chunk that `has_chunk` reports present has durable contents, so an agent may
skip sending it and a manifest may reference it. The local store syncs a file's contents
before its rename makes it visible; the rename itself becomes durable with the next sync,
which at the latest is the one of the manifest's own put. A failed sync makes the store refuse
every later write (see `GroupSync` in local.py).

Concurrency
-----------
Every method is synchronous and thread-safe; the controller calls them from executor threads.
There are no locks across processes: each vault's datastore has one controller writing it. A
key rotation stores the new wrapped keys before any object is sealed with a new data key, then
swaps the keyring in one step; objects in flight are sealed with the old or the new key, and
both are in the ring.

Garbage collection (gc.py)
--------------------------
Mark and sweep, beside running jobs (as in Proxmox Backup Server); gc.py's note has the
reasoning.

1. Mark: read every manifest and the indexes it pins; every non-zero digest is referenced.
   Indexes without a manifest are a backup's that has not committed (yet): older than the
   cutoff (the collection's start minus a grace period longer than any backup) they are
   deleted, younger their chunks count as referenced. Anything unreadable stops the collection
   before it deletes a chunk.
2. Sweep: list `chunks/`; delete a chunk that is not referenced, was written before the
   cutoff, and is not held in the vault's `ChunkGuard`.

Running jobs hold the digests they rely on before committing (dedup hits, uploads, the previous
recovery point's chunks, a restore's chunks) in the `ChunkGuard`, *before* they check that the
chunks are stored; a release during a collection is deferred until it ends. That is the one hook
the job path needs; the collection is otherwise read-only towards running jobs. Deleting a
recovery point removes its manifest and indexes only; chunks are garbage collection's alone.
The local store's leftover `.tmp-*` files (a crash during a put) are not objects: listing skips
them, and they are not collected yet.
"""

from controller.datastore.backend import ObjectInfo, ObjectStore, check_key, check_prefix
from controller.datastore.encrypted import EncryptingStore
from controller.datastore.faulty import Fault, FaultyStore
from controller.datastore.gc import ChunkGuard, GcReport, collect_garbage
from controller.datastore.keys import Kdf, Keyring, MasterKey, parse_export
from controller.datastore.local import LocalDirectoryStore
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
    "ChunkGuard",
    "Datastore",
    "DatastoreConfig",
    "EncryptingStore",
    "Fault",
    "FaultyStore",
    "GcReport",
    "Kdf",
    "Keyring",
    "LocalDirectoryStore",
    "MasterKey",
    "ObjectInfo",
    "ObjectStore",
    "check_key",
    "check_prefix",
    "check_recovery_point_id",
    "chunk_key",
    "collect_garbage",
    "index_key",
    "manifest_key",
    "parse_export",
]
