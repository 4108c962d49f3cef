"""Benchmark: off-site copy throughput, a vault's datastore copied to a real SeaweedFS.

    python -m tests.bench.copy [--size 2G] [--workdir /var/tmp] [--no-drop-caches]

Run as root (it drops the page cache before every step, so the source is read from disk).

An encrypted local directory datastore (fsync on, in `--workdir`) holds one recovery point of
`--size` of distinct, incompressible 512 KiB chunks (one disk), then an incremental point that
changes 5% of them. `copy_datastore` (controller/datastore/copy.py, what a `Copy` job runs:
each object read, authenticated, sent sealed as stored, `THREADS` chunks at once) copies it:

- to `s3://.../copy` on a SeaweedFS started on loopback (S3Store in a RetryingStore, as the
  controller opens a copy target): the full point, then the incremental one (only its new
  chunks travel, asked about only where its predecessor does not reference them);
- to another local directory, for comparison.

SeaweedFS and the benchmark share the machine's two cores. One table is printed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from controller.datastore import (
    ChunkGuard,
    Datastore,
    LocalDirectoryStore,
    MasterKey,
    ObjectStore,
    open_object_store,
)
from controller.datastore.copy import THREADS, CopyReport, copy_datastore
from shared.blob import Compression
from shared.digest import ZERO_DIGEST
from shared.index import DiskIndex
from shared.manifest import ManifestDisk, RecoveryPointManifest
from tests.bench.measure import drop_caches
from tests.bench.s3 import parse_size
from tests.seaweed import start_seaweedfs

CHUNK = 512 << 10
CHANGED = 0.05


@dataclass
class Row:
    target: str
    step: str
    seconds: float
    report: CopyReport

    def line(self) -> str:
        mb = self.report.bytes_sent / 1e6
        return (
            f"| {self.target:<28} | {self.step:<22} | {self.report.chunks_sent:6d} "
            f"| {mb:8.1f} MB | {self.seconds:6.1f} s | {mb / self.seconds:7.0f} MB/s |"
        )


def back_up(store: Datastore, rp_id: str, digests: list[bytes], size: int) -> None:
    """Commit a one-disk recovery point of `digests` (each chunk stored already)."""
    index = DiskIndex("root", size, CHUNK, b"".join(digests))
    entry = ManifestDisk.of(index, store.put_index(rp_id, index))
    store.put_manifest(
        RecoveryPointManifest(
            id=rp_id,
            vm_id="bench",
            vault="bench",
            job_id=f"job-{rp_id}",
            created_at=datetime.now(UTC),
            consistency="crash",
            disks=(entry,),
        ),
        verify_chunks=False,
    )


def store_chunks(store: Datastore, count: int) -> list[bytes]:
    """`count` new incompressible chunks stored raw, as an agent's would be; their names."""
    digests = []
    for _ in range(count):
        raw = os.urandom(CHUNK)
        digest = store.chunk_hash.digest(raw)
        assert digest != ZERO_DIGEST
        store.put_chunk(digest, raw, Compression.NONE, CHUNK)
        digests.append(digest)
    return digests


def timed(step: Callable[[], CopyReport], drop: bool) -> tuple[float, CopyReport]:
    if drop:
        drop_caches()
    start = time.perf_counter()
    report = step()
    return time.perf_counter() - start, report


def copy_to(
    source: Datastore, target: ObjectStore, master: MasterKey, known: dict[str, tuple[str, float]]
) -> CopyReport:
    return copy_datastore(
        source, target, master, keep=known, known=known, source_guard=ChunkGuard(), owner="bench"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G", help="bytes of chunks (default 2G)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--no-drop-caches", dest="drop", action="store_false")
    args = parser.parse_args()
    count = parse_size(args.size) // CHUNK
    size = count * CHUNK
    master = MasterKey.generate()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="coffer-bench-copy-", dir=args.workdir) as tmp:
        work = Path(tmp)
        source = Datastore.create(
            LocalDirectoryStore(work / "source"), CHUNK, master=master, vault="bench"
        )
        full = store_chunks(source, count)
        back_up(source, "rp-full", full, size)
        changed = max(1, int(count * CHANGED))
        incremental = store_chunks(source, changed) + full[changed:]
        known = {"rp-full": ("bench", 1.0)}
        with start_seaweedfs(work / "seaweedfs") as server:
            server.create_bucket("bench-copy")
            s3 = open_object_store(server.url("bench-copy", "copy"), server.settings())
            targets: list[tuple[str, ObjectStore]] = [
                ("SeaweedFS S3", s3),
                ("local directory", LocalDirectoryStore(work / "copy")),
            ]
            for name, target in targets:
                seconds, report = timed(lambda t=target: copy_to(source, t, master, known),
                                        args.drop)  # fmt: skip
                rows.append(Row(name, "full point", seconds, report))
            back_up(source, "rp-incremental", incremental, size)
            known["rp-incremental"] = ("bench", 2.0)
            for name, target in targets:
                seconds, report = timed(lambda t=target: copy_to(source, t, master, known),
                                        args.drop)  # fmt: skip
                rows.append(Row(name, f"incremental ({CHANGED:.0%} new)", seconds, report))
    cache = "dropped" if args.drop else "kept"
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"\nAn encrypted local datastore of {size / (1 << 30):.2f} GiB of distinct incompressible "
        f"512 KiB chunks copied by copy_datastore ({THREADS} threads), page cache {cache} "
        f"before each step; load average at the end {load} on {os.cpu_count()} CPUs\n"
    )
    print("| copy to | step | chunks sent | sent | took | throughput |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(row.line())


if __name__ == "__main__":
    main()
