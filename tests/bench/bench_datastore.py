"""Benchmark: how fast the datastore stores chunks with a durable put (fsync) per chunk.

Run by hand, never as a test:
`python tests/bench/bench_datastore.py [--dir /tmp] [--mib 512] [--repeat 3] [--compressible]`.

For each chunk size it stores `--mib` MiB of distinct chunks through `Datastore.put_chunk`
(verification included: decompress, SHA-256, then the blob written with temp + fsync + rename
+ directory fsync) from 1 and from 4 executor threads, then the same without fsync to show what
durability costs, and times `has_chunk` over the stored chunks (the commit check does one per
distinct chunk). Chunks are incompressible unless `--compressible`, the worst case for the disk.
The agent's side (hashing, compression) is done before the clock starts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from controller.datastore import Datastore, LocalDirectoryStore
from shared.blob import Compression, compress
from shared.digest import chunk_digest


def chunks(size: int, count: int, compressible: bool) -> list[tuple[bytes, Compression, bytes]]:
    """(digest, compression, payload) of `count` distinct chunks, as an agent would send them."""
    base = os.urandom(size)
    if compressible:
        # About 3:1 with zstd: a third random, the rest repetitive.
        third = size // 3
        base = base[:third] + (b"coffer " * size)[: size - third]
    out = []
    for i in range(count):
        raw = i.to_bytes(8, "little") + base[8:]
        compression, payload = compress(raw)
        out.append((chunk_digest(raw), compression, payload))
    return out


def run(
    root: Path, size: int, total: int, threads: int, fsync: bool, compressible: bool
) -> tuple[float, float, float]:
    """(chunks/s, raw MB/s, has_chunk calls/s) for one configuration."""
    shutil.rmtree(root, ignore_errors=True)
    os.sync()  # start every run with no dirty pages of the previous one
    store = Datastore.create(LocalDirectoryStore(root, fsync=fsync), size)
    work = chunks(size, total // size, compressible)
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        written = list(
            pool.map(lambda c: store.put_chunk(c[0], c[2], c[1], size), work, chunksize=4)
        )
    elapsed = time.perf_counter() - start
    assert all(written), "every chunk was new"
    start = time.perf_counter()
    assert store.missing_chunks(d for d, _, _ in work) == []
    has_rate = len(work) / (time.perf_counter() - start)
    return len(work) / elapsed, len(work) * size / elapsed / 1e6, has_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp", help="where to create the scratch datastore")
    parser.add_argument("--mib", type=int, default=512, help="MiB stored per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration")
    parser.add_argument("--compressible", action="store_true")
    args = parser.parse_args()
    # Shared virtual disks vary a lot from run to run: report the median and the range.
    with tempfile.TemporaryDirectory(prefix="coffer-bench-", dir=args.dir) as scratch:
        root = Path(scratch) / "store"
        print(
            f"{'chunk':>7} {'threads':>7} {'fsync':>5} {'chunks/s':>9} {'MB/s':>7} "
            f"{'MB/s range':>11} {'has/s':>9}"
        )
        for size in (256 << 10, 1 << 20, 4 << 20):
            for threads, fsync in ((1, True), (4, True), (1, False), (4, False)):
                runs = sorted(
                    run(root, size, args.mib << 20, threads, fsync, args.compressible)
                    for _ in range(args.repeat)
                )
                rate, mbps, _ = runs[len(runs) // 2]
                has_rate = statistics.median(r[2] for r in runs)
                print(
                    f"{size >> 10:>5}Ki {threads:>7} {'on' if fsync else 'off':>5} "
                    f"{rate:>9.0f} {mbps:>7.0f} {runs[0][1]:>5.0f}-{runs[-1][1]:<5.0f} "
                    f"{has_rate:>9.0f}"
                )


if __name__ == "__main__":
    main()
