"""Benchmark: a garbage collection's sweep, and how long a job waits to hold digests meanwhile.

Run by hand, never as a test: `python tests/bench/bench_gc.py [--dir /var/tmp] [--chunks 2000]`.

Stores `--chunks` unreferenced 4 KiB chunks in a local datastore, then collects them while a
writer keeps dirtying the same file system (a backup running beside the collection) and
another thread holds a digest in the chunk guard every 5 ms, as the controller's event loop
does for its backups. Prints the collection's time and the longest and 99th-percentile waits
for the guard: what a sync under the guard's lock would add to the event loop.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from controller.datastore import ChunkGuard, Datastore, LocalDirectoryStore, collect_garbage
from shared.blob import compress
from shared.digest import chunk_digest

CHUNK = 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--chunks", type=int, default=2000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        store = Datastore.create(LocalDirectoryStore(root / "store"), CHUNK)
        for seed in range(args.chunks):
            raw = (f"chunk {seed} ".encode() * CHUNK)[:CHUNK]
            compression, payload = compress(raw)
            store.put_chunk(chunk_digest(raw), payload, compression, CHUNK)
        guard = ChunkGuard()
        done = threading.Event()
        waits: list[float] = []

        def writer() -> None:
            with (root / "busy").open("wb") as file:
                while not done.is_set():
                    file.write(os.urandom(1 << 20))

        def holder() -> None:
            while not done.is_set():
                started = time.monotonic()
                guard.hold("job", [bytes(32)])
                waits.append(time.monotonic() - started)
                time.sleep(0.005)

        threads = [threading.Thread(target=writer), threading.Thread(target=holder)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        report = collect_garbage(store, cutoff=time.time() + 3600, guard=guard)
        took = time.monotonic() - started
        done.set()
        for thread in threads:
            thread.join()
        waits.sort()
        print(
            f"{report.chunks_deleted} chunks collected in {took:.2f} s; waits to hold: "
            f"max {waits[-1] * 1000:.1f} ms, p99 {waits[int(len(waits) * 0.99)] * 1000:.1f} ms"
        )
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
