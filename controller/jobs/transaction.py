"""A backup's transaction: what it relies on in the datastore, and its commit.

A running backup (backup.py) opens one transaction when it starts; the agent's data-path calls
(agent_service.py: MissingChunks, UploadChunks, PutIndex, FetchIndex of the base) go to it.

- Known digests: chunks this backup has seen durable in the datastore (found there, or
  uploaded by it). Nothing is known on trust: the previous recovery point's chunks are checked
  for presence (in batches, in the pool) before the agent gets its base index.
- Deduplication answers only for what the VM stored itself (issue 14): the chunks of its
  previous recovery point's indexes the agent fetched (its base), and those it uploaded in
  this backup. Anything else is "missing" to it, whatever the datastore holds, and an index
  may name only known chunks; otherwise an agent could learn whether another VM holds a
  content, and restore that content by naming it without ever having had it. The agent
  uploads such a chunk; the datastore keeps one copy (`put_chunk` stores nothing when it is
  there). That re-upload is the price of isolation (docs/hostile-agent.md measures it). A
  vault whose VMs are one trust domain (`shared_dedup`, off by default) answers for the whole
  datastore, as Coffer did before: an index may then name any chunk a datastore check finds.
- Bad chunks (the vault's `ChunkHealth`, controller.integrity): a chunk known missing or
  corrupt is never answered "already stored". `MissingChunks` reports it missing, an upload
  of it replaces what the datastore holds under its name (`put_chunk(replace=True)`) and
  repairs it, and the base index the agent compares its chunks with has it masked
  (`MASKED_DIGEST`), so the agent reads, hashes and sends it again even if the disk block did
  not change. A base chunk found missing is marked bad, and the base recovery point damaged.
- Chunk holds: every digest the backup relies on is held in the vault's `ChunkGuard` before
  the backup asks the datastore whether it is there (the guard protocol of
  `controller.datastore.gc`), so garbage collection can run beside it: either the hold came
  first and the chunk stays, or the deletion came first and the check finds it missing. The
  holds are released when the job ends (`release`), whatever its outcome.
- Accepted indexes: a disk's index is taken only once every chunk it references is known to
  be durable and none is bad (one marked bad while the backup ran, and not stored again by
  it, fails the backup: its recovery point would be damaged from the start); it is then
  written to the datastore (before the manifest, which pins its SHA-256).
- Commit: `manifest` checks the agent's report against the accepted indexes and the disks the
  backup is for, and builds the recovery point's manifest; `commit` writes it (the datastore's
  commit point: the recovery point exists from here) and then the catalog row. The controller
  never trusts an agent's word: the chunks were re-hashed on upload, and their presence
  checked here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import TypeVar

from controller.catalog import Catalog, RecoveryPointDiskRecord, RecoveryPointRecord
from controller.datastore import ChunkGuard, Datastore
from controller.datastore.health import ChunkHealth
from controller.datastore.verify import MISSING, damage_in
from controller.integrity import Integrity
from shared.blob import Compression
from shared.digest import DIGEST_SIZE, MASKED_DIGEST, ZERO_DIGEST
from shared.errors import (
    ChunkMissing,
    CofferError,
    Conflict,
    CorruptData,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    UnsupportedFormat,
)
from shared.index import DiskIndex
from shared.manifest import ManifestDisk, RecoveryPointManifest
from shared.model import Consistency, weakest

T = TypeVar("T")

PRESENCE_BATCH = 4096
"""Digests checked for presence in one trip to the pool."""
PRESENCE_TRIPS = 4
"""Batches checked at once: a large base must not take every thread of the pool."""


def data_bytes(index: DiskIndex) -> int:
    """Bytes of the disk that hold data: every chunk but the all-zero ones."""
    return sum(index.extent(i)[1] for i in range(len(index)) if index.digest_at(i) != ZERO_DIGEST)


def masked(index: DiskIndex, digests: set[bytes]) -> DiskIndex:
    """`index` with every chunk in `digests` replaced by `MASKED_DIGEST`."""
    if not digests:
        return index
    entries = bytearray(index.digests)
    for position in range(len(index)):
        if index.digest_at(position) in digests:
            entries[position * DIGEST_SIZE : (position + 1) * DIGEST_SIZE] = MASKED_DIGEST
    return DiskIndex(index.disk, index.size_bytes, index.chunk_size, bytes(entries))


def recovery_point_record(
    manifest: RecoveryPointManifest, bytes_stored: int, data_bytes: int
) -> RecoveryPointRecord:
    """The catalog's row for a committed recovery point: what its manifest says."""
    return RecoveryPointRecord(
        id=manifest.id,
        vault=manifest.vault,
        vm_id=manifest.vm_id,
        job_id=manifest.job_id,
        created_at=manifest.created_at.timestamp(),
        consistency=Consistency(manifest.consistency),
        bytes_stored=bytes_stored,
        disks=tuple(
            RecoveryPointDiskRecord(
                d.name,
                d.size_bytes,
                d.chunk_size,
                d.chunk_count,
                Consistency(d.consistency) if d.consistency else None,
            )
            for d in manifest.disks
        ),
        data_bytes=data_bytes,
    )


@dataclass(frozen=True)
class AcceptedIndex:
    """What the manifest needs of an index written to the datastore: not its digests, which
    would stay in memory until the job ends (issue 14: a memory budget for indexes)."""

    size_bytes: int
    chunk_size: int
    chunk_count: int
    sha256: str
    data_bytes: int


@dataclass(frozen=True)
class BackedUpDisk:
    """What the agent reports of one disk it backed up."""

    name: str
    consistency: Consistency = Consistency.CRASH
    snapshot: str = ""
    """The snapshot provider it was read from ('' when it was read live)."""


@dataclass
class BackupTransaction:
    """One backup's chunks, holds and indexes until its recovery point is committed."""

    job_id: str
    rp_id: str
    datastore: Datastore
    guard: ChunkGuard
    catalog: Catalog
    pool: Executor
    previous: RecoveryPointRecord | None = None
    """The recovery point this backup builds on (an incremental's base), if any."""
    on_stored: Callable[[int], None] = lambda stored: None
    """Called with the bytes each uploaded chunk added to the datastore."""
    known: set[bytes] = field(default_factory=set)
    indexes: dict[str, AcceptedIndex] = field(default_factory=dict)
    bytes_stored: int = 0
    vault: str = ""
    health: ChunkHealth = field(default_factory=ChunkHealth)
    """The vault's bad chunks (controller.datastore.health)."""
    integrity: Integrity | None = None
    """Where found and repaired bad chunks are recorded (None: only in `health`)."""
    found_missing: dict[bytes, str] = field(default_factory=dict)
    """Chunks of the base found missing (the backup's end looks for the other recovery points
    that need them)."""
    repaired: set[bytes] = field(default_factory=set)
    """Bad chunks this backup stored again."""
    shared_dedup: bool = False
    """The vault's VMs are one trust domain: deduplication answers for the whole datastore."""
    base_unreadable: dict[str, str] = field(default_factory=dict)
    """Disks whose index in the base could not be read (damaged, gone), and why: the agent
    reads them in full instead."""

    @property
    def chunk_size(self) -> int:
        return self.datastore.chunk_size

    def _in_pool(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _hold(self, digests: Iterable[bytes]) -> None:
        self.guard.hold(self.job_id, digests)

    async def base_index(self, rp_id: str, disk: str) -> DiskIndex:
        """A disk's index in the recovery point this backup builds on (sent to the agent)."""
        if self.previous is None or self.previous.id != rp_id:
            raise PermissionDenied(
                detail=f"recovery point {rp_id} is not the base of backup {self.job_id}"
            )
        if disk not in {d.name for d in self.previous.disks}:
            raise NotFound(kind="disk in the previous recovery point", name=disk)
        if disk in self.base_unreadable:
            raise NotFound(kind="readable index in the previous recovery point", name=disk)
        try:
            index = await self._in_pool(self.datastore.get_index, rp_id, disk)
        except (CorruptData, UnsupportedFormat, NotFound) as error:
            # A damaged base must not fail every later backup of the VM until it is repaired:
            # this one reads the disk in full (the agent takes NotFound as "no base").
            await self._base_unreadable(rp_id, disk, error)
            raise NotFound(
                kind="readable index in the previous recovery point", name=disk
            ) from None
        # The base recovery point is not pruned while this backup runs (the job manager's
        # `in_use`), so its manifest keeps its chunks; held as well, for a prune that came
        # first. Held before they are looked for (the guard protocol): a chunk deleted before
        # the hold is found missing here.
        referenced = index.referenced()
        self._hold(referenced)
        since = self.health.generation
        absent = await self._absent(referenced)
        if absent:
            # Gone with its recovery point (pruned and collected before the hold)? Then the
            # base is gone too, and the agent backs the disk up in full.
            await self._in_pool(self.datastore.get_manifest, rp_id)
            await self._base_damaged(rp_id, index, absent, since)
        mask = absent | self.health.bad_among(referenced)
        self.known.update(referenced - mask)
        return await self._in_pool(masked, index, mask)

    async def _base_unreadable(self, rp_id: str, disk: str, error: CofferError) -> None:
        """The base's index of `disk` cannot be read: recorded, and the base damaged."""
        why = error.message
        self.base_unreadable[disk] = why
        if self.integrity is not None:
            await self.integrity.unreadable(
                self.vault,
                rp_id,
                f"the index of disk {disk!r} cannot be read: {why}",
                by=self.job_id,
            )

    async def _base_damaged(
        self, rp_id: str, index: DiskIndex, absent: set[bytes], since: int
    ) -> None:
        """Chunks the base recovery point needs are missing: they are bad, and it damaged."""
        found = dict.fromkeys(absent, MISSING)
        self.found_missing.update(found)
        if self.integrity is None:
            self.health.mark(absent, since)
            return
        damage = await self._in_pool(damage_in, index, found)
        await self.integrity.found_bad(
            self.vault, found, since=since, by=self.job_id, damage={rp_id: damage}
        )

    async def _absent(self, digests: set[bytes]) -> set[bytes]:
        """Those of `digests` the datastore lacks, asked in batches in the pool."""
        ordered = list(digests)
        batches = [
            ordered[start : start + PRESENCE_BATCH]
            for start in range(0, len(ordered), PRESENCE_BATCH)
        ]
        trips = asyncio.Semaphore(PRESENCE_TRIPS)

        async def check(batch: list[bytes]) -> list[bytes]:
            async with trips:
                return await self._in_pool(self.datastore.missing_chunks, batch)

        found = await asyncio.gather(*(check(batch) for batch in batches))
        return {digest for missing in found for digest in missing}

    async def missing_chunks(self, digests: Sequence[bytes]) -> list[bytes]:
        """Which of `digests` the agent must upload: those the datastore lacks, and those it
        holds damaged (a bad chunk is never answered "already stored")."""
        unknown = [d for d in digests if d not in self.known or self.health.is_bad(d)]
        if not self.shared_dedup:
            # What this VM has not stored is missing to it (the module note): the datastore
            # is not asked, and its answer is not given.
            return list(dict.fromkeys(unknown))
        # Held before asking: garbage collection either deleted a chunk already (it is then
        # reported missing and uploaded again) or will leave it alone.
        self._hold(unknown)
        absent = set(await self._in_pool(self.datastore.missing_chunks, unknown))
        absent |= self.health.bad_among(unknown)
        self.known.update(set(unknown) - absent)
        return [d for d in dict.fromkeys(unknown) if d in absent]

    async def store_chunk(
        self, digest: bytes, data: bytes, compression: Compression, raw_size: int
    ) -> int:
        """Verify and store one uploaded chunk; the bytes it added to the datastore.

        A chunk known bad replaces what the datastore holds under its name, and is good
        again from then on (its damaged recovery points heal).

        The chunk may become visible in the datastore only later, in a batch (one sync per
        batch instead of one per few chunks, `ObjectStore.put`); `commit_chunks`, at the end
        of the upload stream and again in `accept_index`, makes every one of them visible and
        durable before an index naming it is taken. A repair is durable at once, as the
        catalog records it."""
        replace = self.health.is_bad(digest)
        stored = await self._in_pool(
            partial(self.datastore.put_chunk, replace=replace, durable=replace),
            digest,
            data,
            compression,
            raw_size,
        )
        self.chunk_stored(digest, stored)
        if replace:
            self.repaired.add(digest)
            if self.integrity is not None:
                await self.integrity.repaired(self.vault, (digest,), by=self.job_id)
            else:
                self.health.repaired((digest,))
        return stored

    async def commit_chunks(self) -> None:
        """Make every chunk stored so far visible and durable (`store_chunk` leaves them
        pending in batches): at the end of each upload stream, and before an index is taken."""
        await self._in_pool(self.datastore.sync)

    def chunk_stored(self, digest: bytes, stored: int) -> None:
        """An uploaded chunk is in the datastore (`stored` bytes were new); durable once
        `accept_index` has synced."""
        self._hold((digest,))
        self.known.add(digest)
        self.bytes_stored += stored
        self.on_stored(stored)

    async def accept_index(self, index: DiskIndex) -> None:
        """Take a disk's index once every chunk it references is known to be durable."""
        if index.chunk_size != self.chunk_size:
            raise InvalidArgument(
                detail=f"index chunk size {index.chunk_size} is not the job's {self.chunk_size}"
            )
        referenced = index.referenced()
        unknown = referenced - self.known
        if unknown and not self.shared_dedup:
            raise ChunkMissing(
                f"the index of disk {index.disk!r} names {len(unknown)} chunk(s) this VM did not "
                f"upload in this backup nor has in its previous recovery point (e.g. "
                f"{min(unknown).hex()}); a VM's index may name only those. The recovery point "
                "was not committed.",
                digest=min(unknown).hex(),
            )
        self._hold(unknown)
        absent = await self._absent(unknown)
        if absent:
            raise ChunkMissing(digest=min(absent).hex())
        # Marked bad while this backup ran (a verify beside it), and not stored again by it.
        bad = self.health.bad_among(referenced)
        if bad:
            raise ChunkMissing(
                f"{len(bad)} chunk(s) the index of disk {index.disk!r} names (e.g. "
                f"{min(bad).hex()}) were found damaged in the datastore while this backup ran; "
                "the recovery point was not committed. The next backup stores them again.",
                digest=min(bad).hex(),
            )
        self.known.update(unknown)
        # Every chunk the index names is now either known stored by this backup (maybe still
        # pending in a batch) or seen visible in the datastore (stored by a backup beside this
        # one, or long ago). This sync commits whatever is pending and makes it all durable:
        # chunks are stored without waiting for that (`store_chunk`), so this is the point
        # where "every chunk the index names is durable" becomes true.
        await self.commit_chunks()
        sha = await self._in_pool(self.datastore.put_index, self.rp_id, index)
        size = await self._in_pool(data_bytes, index)
        self.indexes[index.disk] = AcceptedIndex(
            index.size_bytes, index.chunk_size, len(index), sha, size
        )

    def manifest(
        self,
        *,
        vm_id: str,
        vault: str,
        created_at: datetime,
        consistency: Consistency,
        disks: Sequence[BackedUpDisk],
        expected: Iterable[str],
        vm: dict[str, str],
    ) -> RecoveryPointManifest:
        """The manifest of the recovery point the agent reports, once it is checked: every
        disk it reports has an accepted index, and they are the disks the backup is for."""
        entries: list[ManifestDisk] = []
        for disk in disks:
            accepted = self.indexes.get(disk.name)
            if accepted is None:
                raise Conflict(detail=f"the agent reported disk {disk.name!r} without its index")
            entries.append(
                ManifestDisk(
                    name=disk.name,
                    size_bytes=accepted.size_bytes,
                    chunk_size=accepted.chunk_size,
                    chunk_count=accepted.chunk_count,
                    index_sha256=accepted.sha256,
                    consistency=disk.consistency,
                    snapshot=disk.snapshot,
                )
            )
        wanted = set(expected)
        if {d.name for d in disks} != wanted:
            raise Conflict(
                detail=f"the agent backed up disks {sorted(d.name for d in disks)}, "
                f"not the {sorted(wanted)} this backup was for"
            )
        return RecoveryPointManifest(
            id=self.rp_id,
            vm_id=vm_id,
            vault=vault,
            job_id=self.job_id,
            created_at=created_at,
            # Never more than its weakest disk, whatever the agent says overall.
            consistency=weakest([consistency, *(d.consistency for d in disks)]),
            disks=tuple(entries),
            vm=vm,
        )

    async def commit(self, manifest: RecoveryPointManifest) -> RecoveryPointRecord:
        """Write the manifest (the commit point), then the catalog row."""
        # accept_index already made sure every chunk the indexes name is durable.
        await self._in_pool(partial(self.datastore.put_manifest, manifest, verify_chunks=False))
        record = recovery_point_record(
            manifest, self.bytes_stored, sum(i.data_bytes for i in self.indexes.values())
        )
        await self.catalog.insert_recovery_point(record)
        return record

    def release(self) -> None:
        """Drop the backup's chunk holds (deferred while a collection runs; gc.py)."""
        self.guard.release(self.job_id)
