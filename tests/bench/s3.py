"""Benchmark: backup- and restore-shaped throughput of an S3 datastore on a real SeaweedFS,
beside the local directory datastore and beside restic's S3 backend on the same server.

    python -m tests.bench.s3 [--size 2G] [--threads 16] [--workdir /var/tmp] [--no-drop-caches]

Run as root (it drops the page cache before every step, so every store reads from disk).

- Coffer: `--size` of distinct, incompressible 512 KiB chunks, hashed and "compressed" (zstd
  gains nothing, so they go raw) before the clock starts, as an agent would send them. Backup:
  `Datastore.put_chunk` for every chunk from `--threads` executor threads, as the controller's
  upload handler calls it (decompress, BLAKE3 re-hash, `has`, put). Restore:
  `Datastore.get_chunk_blob` for every chunk from as many threads (what a restore streams to
  the agent). On a local directory datastore (fsync on, in `--workdir`) and on
  `open_object_store("s3://...")` (S3Store in a RetryingStore) against SeaweedFS, each once
  unencrypted (format 1) and once encrypted as every new vault is (format 2: AES-256-GCM
  sealing and opening every chunk, keyed BLAKE3 names).
- restic 0.14: the same bytes as one file (written, then the page cache dropped), backed up to
  `s3:http://127.0.0.1:PORT/bench-restic/repo` and restored with `restic restore latest`.
  restic also chunks (content-defined), encrypts and compresses, and reads and writes a file;
  Coffer's figures leave out the agent's reading, hashing and network.

SeaweedFS, the benchmark and restic share the machine's two cores. One table is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from controller.datastore import Datastore, LocalDirectoryStore, MasterKey, open_object_store
from shared.blob import Compression, compress
from shared.digest import chunk_digest
from tests.bench.measure import drop_caches
from tests.seaweed import REGION, SeaweedFS, start_seaweedfs

CHUNK = 512 << 10
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
PASSWORD = "coffer-bench"


@dataclass
class Row:
    store: str
    backup_s: float
    restore_s: float
    size: int

    def line(self) -> str:
        mb = self.size / 1e6
        return (
            f"| {self.store:<42} | {self.backup_s:6.1f} s | {mb / self.backup_s:7.0f} MB/s "
            f"| {self.restore_s:6.1f} s | {mb / self.restore_s:7.0f} MB/s |"
        )


Chunk = tuple[bytes, Compression, bytes]


def make_chunks(size: int) -> list[Chunk]:
    """Distinct incompressible chunks as an agent sends them: (digest, compression, payload)."""
    chunks = []
    for _ in range(size // CHUNK):
        raw = os.urandom(CHUNK)
        compression, payload = compress(raw)
        chunks.append((chunk_digest(raw), compression, payload))
    return chunks


def named_for(store: Datastore, chunks: list[Chunk]) -> list[Chunk]:
    """The chunks as an agent of `store`'s vault names them (keyed BLAKE3 when encrypted);
    the payloads are raw, since zstd gained nothing."""
    if not store.encrypted:
        return chunks
    assert all(compression is Compression.NONE for _, compression, _ in chunks)
    return [(store.chunk_hash.digest(payload), c, payload) for _, c, payload in chunks]


def timed(step: Callable[[], object], drop: bool) -> float:
    if drop:
        drop_caches()
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def coffer(store: Datastore, chunks: list[Chunk], threads: int, drop: bool) -> tuple[float, float]:
    def backup() -> None:
        with ThreadPoolExecutor(threads) as pool:
            written = list(pool.map(lambda c: store.put_chunk(c[0], c[2], c[1], CHUNK), chunks))
        assert all(written), "every chunk was new"

    def restore() -> None:
        with ThreadPoolExecutor(threads) as pool:
            for (digest, _, payload), (_, _, got) in zip(
                chunks, pool.map(lambda c: store.get_chunk_blob(c[0]), chunks), strict=True
            ):
                assert len(got) == len(payload), digest.hex()

    return timed(backup, drop), timed(restore, drop)


def restic(
    server: SeaweedFS, chunks: list[Chunk], workdir: Path, drop: bool
) -> tuple[float, float]:
    server.create_bucket("bench-restic")
    source = workdir / "restic-source" / "data.bin"
    source.parent.mkdir()
    with source.open("wb") as out:
        for _, _, payload in chunks:
            out.write(payload)
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID=server.coffer.access_key_id,
        AWS_SECRET_ACCESS_KEY=server.coffer.secret_access_key,
        AWS_DEFAULT_REGION=REGION,
        RESTIC_PASSWORD=PASSWORD,
        RESTIC_CACHE_DIR=str(workdir / "restic-cache"),
    )
    repo = f"s3:{server.endpoint}/bench-restic/repo"

    def run(*args: str) -> None:
        subprocess.run(["restic", "-r", repo, "--quiet", *args], env=env, check=True)

    run("init")
    backup = timed(lambda: run("backup", str(source)), drop)
    target = workdir / "restic-restore"
    restore = timed(lambda: run("restore", "latest", "--target", str(target)), drop)
    restored = target / source.relative_to("/")
    assert restored.stat().st_size == source.stat().st_size
    return backup, restore


def parse_size(text: str) -> int:
    number, unit = text[:-1], text[-1].upper()
    if unit not in _UNITS:
        number, unit = text, ""
    return int(float(number) * _UNITS[unit])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G", help="bytes of chunks (default 2G)")
    parser.add_argument("--threads", type=int, default=16, help="executor threads (16)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--no-drop-caches", dest="drop", action="store_false")
    parser.add_argument("--skip-restic", action="store_true")
    args = parser.parse_args()
    size = parse_size(args.size) // CHUNK * CHUNK
    chunks = make_chunks(size)
    rows = []
    master = MasterKey.generate()
    with tempfile.TemporaryDirectory(prefix="coffer-bench-s3-", dir=args.workdir) as tmp:
        work = Path(tmp)
        for encrypted in (False, True):
            local = Datastore.create(
                LocalDirectoryStore(work / "local"),
                CHUNK,
                master=master if encrypted else None,
                vault="bench",
            )
            mine = named_for(local, chunks)
            label = "local directory (Coffer" + (", encrypted)" if encrypted else ")")
            rows.append(Row(label, *coffer(local, mine, args.threads, args.drop), size))
            shutil.rmtree(work / "local")
        with start_seaweedfs(work / "seaweedfs") as server:
            server.create_bucket("bench-coffer")
            for encrypted in (False, True):
                where = server.url("bench-coffer", "encrypted" if encrypted else "plain")
                s3 = Datastore.create(
                    open_object_store(where, server.settings()),
                    CHUNK,
                    master=master if encrypted else None,
                    vault="bench",
                )
                label = "SeaweedFS S3 (Coffer, obstore" + (", encrypted)" if encrypted else ")")
                rows.append(
                    Row(label, *coffer(s3, named_for(s3, chunks), args.threads, args.drop), size)
                )
            if not args.skip_restic:
                rows.append(
                    Row(
                        "SeaweedFS S3 (restic 0.14)", *restic(server, chunks, work, args.drop), size
                    )
                )
    cache = "dropped" if args.drop else "kept"
    print(
        f"\n{size / (1 << 30):.2f} GiB of distinct incompressible 512 KiB chunks, "
        f"{args.threads} threads, page cache {cache} before each step\n"
    )
    print("| store | backup | | restore | |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(row.line())


if __name__ == "__main__":
    main()
