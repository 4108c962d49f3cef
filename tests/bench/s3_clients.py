"""Benchmark: which S3 client library the S3 datastore should use, against a real SeaweedFS.

    python -m tests.bench.s3_clients [--objects 512] [--small 2000] [--threads 16] [--repeat 2]

Starts its own SeaweedFS (tests/seaweed.py) in a temporary directory and, for each client,
puts, gets, checks (HEAD) and lists `--objects` objects of 512 KiB (the chunk size) and
`--small` objects of 4 KiB (indexes, manifests, small chunks), `--threads` at a time: from a
thread pool as the controller's executor calls the datastore, or as many concurrent tasks on
one event loop for the async APIs. Wall time and the client process's CPU time (user+system,
all its threads; SeaweedFS runs in another process) are reported per phase. The controller
shares two cores with the agents' streams, hashing and decompression, so CPU per request
matters as much as throughput.

Clients: obstore (Rust object_store bindings; sync and async), boto3 (sync), aiobotocore
(async). Each gets its own bucket; every client's retries are off so a request is one request.
Run by hand, never as a test (needs the `bench` extra: boto3, aiobotocore).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.seaweed import REGION, SeaweedFS, start_seaweedfs

CHUNK = 512 << 10
SMALL = 4 << 10


@dataclass
class Phase:
    client: str
    phase: str
    count: int
    size: int
    wall: float
    cpu: float

    def row(self) -> str:
        per_second = self.count / self.wall
        mb = self.count * self.size / self.wall / 1e6 if self.size else 0.0
        cpu_ms = self.cpu / self.count * 1e3
        rate = f"{mb:8.1f} MB/s" if self.size >= CHUNK else f"{per_second:8.0f} op/s"
        return (
            f"| {self.client:<20} | {self.phase:<10} | {self.count:6d} | {self.wall:7.2f} s |"
            f" {rate} | {cpu_ms:7.3f} ms |"
        )


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(client: str, phase: str, count: int, size: int, run: Callable[[], object]) -> Phase:
    cpu, wall = cpu_seconds(), time.perf_counter()
    run()
    return Phase(client, phase, count, size, time.perf_counter() - wall, cpu_seconds() - cpu)


# --- the clients: each a set of sync or async callables on one bucket -------------------------


class SyncClient:
    name: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def head(self, key: str) -> int: ...
    def list(self, prefix: str) -> list[str]: ...


class AsyncClient:
    name: str

    async def put(self, key: str, data: bytes) -> None: ...
    async def get(self, key: str) -> bytes: ...
    async def head(self, key: str) -> int: ...
    async def list(self, prefix: str) -> list[str]: ...


def obstore_store(server: SeaweedFS, bucket: str, threads: int) -> Any:
    from obstore.store import S3Store

    return S3Store(
        bucket,
        endpoint=server.endpoint,
        region=REGION,
        access_key_id=server.coffer.access_key_id,
        secret_access_key=server.coffer.secret_access_key,
        client_options={"allow_http": True, "pool_max_idle_per_host": str(threads)},
        retry_config={"max_retries": 0},
    )


class ObstoreSync(SyncClient):
    name = "obstore (threads)"

    def __init__(self, server: SeaweedFS, bucket: str, threads: int) -> None:
        import obstore

        self._obs = obstore
        self._store = obstore_store(server, bucket, threads)

    def put(self, key: str, data: bytes) -> None:
        self._obs.put(self._store, key, data, use_multipart=False)

    def get(self, key: str) -> bytes:
        return bytes(self._obs.get(self._store, key).bytes())

    def head(self, key: str) -> int:
        return int(self._obs.head(self._store, key)["size"])

    def list(self, prefix: str) -> list[str]:
        return [o["path"] for batch in self._obs.list(self._store, prefix) for o in batch]


class ObstoreAsync(AsyncClient):
    name = "obstore (async)"

    def __init__(self, server: SeaweedFS, bucket: str, threads: int) -> None:
        import obstore

        self._obs = obstore
        self._store = obstore_store(server, bucket, threads)

    async def put(self, key: str, data: bytes) -> None:
        await self._obs.put_async(self._store, key, data, use_multipart=False)

    async def get(self, key: str) -> bytes:
        result = await self._obs.get_async(self._store, key)
        return bytes(await result.bytes_async())

    async def head(self, key: str) -> int:
        return int((await self._obs.head_async(self._store, key))["size"])

    async def list(self, prefix: str) -> list[str]:
        return [o["path"] async for batch in self._obs.list(self._store, prefix) for o in batch]


def botocore_config(threads: int) -> Any:
    from botocore.config import Config

    return Config(
        max_pool_connections=threads,
        retries={"total_max_attempts": 1},
        s3={"addressing_style": "path"},
        # Checksums beyond Content-MD5/SigV4 cost a CRC per request; off, as obstore sends none.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


class Boto3Sync(SyncClient):
    name = "boto3 (threads)"

    def __init__(self, server: SeaweedFS, bucket: str, threads: int) -> None:
        import boto3

        self._bucket = bucket
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=server.endpoint,
            region_name=REGION,
            aws_access_key_id=server.coffer.access_key_id,
            aws_secret_access_key=server.coffer.secret_access_key,
            config=botocore_config(threads),
        )

    def put(self, key: str, data: bytes) -> None:
        self._client.put_object(Bucket=self._bucket, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        return bytes(self._client.get_object(Bucket=self._bucket, Key=key)["Body"].read())

    def head(self, key: str) -> int:
        return int(self._client.head_object(Bucket=self._bucket, Key=key)["ContentLength"])

    def list(self, prefix: str) -> list[str]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket, Prefix=prefix
        )
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


class AiobotocoreAsync(AsyncClient):
    name = "aiobotocore (async)"

    def __init__(self, server: SeaweedFS, bucket: str, threads: int) -> None:
        self._server, self._bucket, self._threads = server, bucket, threads
        self._client: Any = None
        self._context: Any = None

    async def open(self) -> None:
        from aiobotocore.session import get_session

        self._context = get_session().create_client(
            "s3",
            endpoint_url=self._server.endpoint,
            region_name=REGION,
            aws_access_key_id=self._server.coffer.access_key_id,
            aws_secret_access_key=self._server.coffer.secret_access_key,
            config=botocore_config(self._threads),
        )
        self._client = await self._context.__aenter__()

    async def close(self) -> None:
        await self._context.__aexit__(None, None, None)

    async def put(self, key: str, data: bytes) -> None:
        await self._client.put_object(Bucket=self._bucket, Key=key, Body=data)

    async def get(self, key: str) -> bytes:
        response = await self._client.get_object(Bucket=self._bucket, Key=key)
        async with response["Body"] as body:
            return bytes(await body.read())

    async def head(self, key: str) -> int:
        response = await self._client.head_object(Bucket=self._bucket, Key=key)
        return int(response["ContentLength"])

    async def list(self, prefix: str) -> list[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        keys = []
        async for page in paginator.paginate(Bucket=self._bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys


# --- the workload -------------------------------------------------------------------------------


def objects(prefix: str, count: int, size: int) -> list[tuple[str, bytes]]:
    base = os.urandom(size)
    return [
        (f"{prefix}/{i % 256:02x}/{i:08d}", i.to_bytes(8, "little") + base[8:])
        for i in range(count)
    ]


def run_sync(
    client: SyncClient,
    work: list[tuple[str, bytes]],
    size: int,
    label: str,
    threads: int,
    prefix: str,
) -> list[Phase]:
    keys = [key for key, _ in work]
    with ThreadPoolExecutor(threads) as pool:

        def each(fn: Callable[[Any], object], items: Iterable[Any]) -> Callable[[], None]:
            return lambda: list(pool.map(fn, items))

        phases = [
            timed(
                client.name,
                f"put {label}",
                len(work),
                size,
                each(lambda item: client.put(*item), work),
            ),
            timed(client.name, f"get {label}", len(work), size, each(client.get, keys)),
            timed(client.name, f"head {label}", len(work), 0, each(client.head, keys)),
        ]
    listed: list[str] = []
    phases.append(
        timed(
            client.name,
            f"list {label}",
            len(work),
            0,
            lambda: listed.extend(client.list(prefix + label + "/")),
        )
    )
    assert len(listed) == len(work), (client.name, len(listed))
    return phases


async def run_async(
    client: AsyncClient,
    work: list[tuple[str, bytes]],
    size: int,
    label: str,
    threads: int,
    prefix: str,
) -> list[Phase]:
    keys = [key for key, _ in work]
    limit = asyncio.Semaphore(threads)

    async def bounded(call: Awaitable[object]) -> object:
        async with limit:
            return await call

    async def timed_async(
        phase: str, count: int, nbytes: int, calls: Callable[[], list[Awaitable[object]]]
    ) -> Phase:
        cpu, wall = cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(bounded(call) for call in calls()))
        return Phase(
            client.name, phase, count, nbytes, time.perf_counter() - wall, cpu_seconds() - cpu
        )

    phases = [
        await timed_async(
            f"put {label}", len(work), size, lambda: [client.put(k, d) for k, d in work]
        ),
        await timed_async(f"get {label}", len(work), size, lambda: [client.get(k) for k in keys]),
        await timed_async(f"head {label}", len(work), 0, lambda: [client.head(k) for k in keys]),
    ]
    cpu, wall = cpu_seconds(), time.perf_counter()
    listed = await client.list(prefix + label + "/")
    phases.append(
        Phase(
            client.name,
            f"list {label}",
            len(work),
            0,
            time.perf_counter() - wall,
            cpu_seconds() - cpu,
        )
    )
    assert len(listed) == len(work), (client.name, len(listed))
    return phases


BUCKET = "bench"


def bench_client(kind: str, server: SeaweedFS, args: argparse.Namespace, run: int) -> list[Phase]:
    bucket = BUCKET
    big = objects(f"{kind}-{run}-chunks", args.objects, CHUNK)
    small = objects(f"{kind}-{run}-small", args.small, SMALL)
    if kind in ("obstore-sync", "boto3"):
        client: SyncClient = (ObstoreSync if kind == "obstore-sync" else Boto3Sync)(
            server, bucket, args.threads
        )
        return run_sync(client, big, CHUNK, "chunks", args.threads, f"{kind}-{run}-") + run_sync(
            client, small, SMALL, "small", args.threads, f"{kind}-{run}-"
        )

    async def main() -> list[Phase]:
        client: AsyncClient
        if kind == "obstore-async":
            client = ObstoreAsync(server, bucket, args.threads)
            return await run_async(
                client, big, CHUNK, "chunks", args.threads, f"{kind}-{run}-"
            ) + await run_async(client, small, SMALL, "small", args.threads, f"{kind}-{run}-")
        aio = AiobotocoreAsync(server, bucket, args.threads)
        await aio.open()
        try:
            return await run_async(
                aio, big, CHUNK, "chunks", args.threads, f"{kind}-{run}-"
            ) + await run_async(aio, small, SMALL, "small", args.threads, f"{kind}-{run}-")
        finally:
            await aio.close()

    return asyncio.run(main())


CLIENTS = ["obstore-sync", "obstore-async", "boto3", "aiobotocore"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=512, help="512 KiB objects per run")
    parser.add_argument("--small", type=int, default=2000, help="4 KiB objects per run")
    parser.add_argument("--threads", type=int, default=16, help="requests in flight")
    parser.add_argument("--repeat", type=int, default=2, help="runs per client (best kept)")
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    kinds = args.clients.split(",")
    best: dict[tuple[str, str], Phase] = {}
    with (
        tempfile.TemporaryDirectory(prefix="coffer-s3-bench-", dir=args.workdir) as tmp,
        start_seaweedfs(Path(tmp) / "seaweedfs") as server,
    ):
        server.create_bucket(BUCKET)
        # SeaweedFS grows a bucket's volumes on its first writes: not part of any client's time.
        warm_up = ObstoreSync(server, BUCKET, args.threads)
        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(lambda item: warm_up.put(*item), objects("warm-up", 256, CHUNK)))
        for run in range(args.repeat):
            for kind in kinds:  # interleaved, so drift in the server's state hits all alike
                for phase in bench_client(kind, server, args, run):
                    key = (phase.client, phase.phase)
                    if key not in best or phase.wall < best[key].wall:
                        best[key] = phase
    print(
        f"\n{args.threads} requests in flight, best of {args.repeat}; CPU is the client's, "
        "per request\n"
    )
    print("| client | phase | objects | wall | rate | CPU/request |")
    print("|---|---|---|---|---|---|")
    order = [
        "put chunks",
        "get chunks",
        "head chunks",
        "list chunks",
        "put small",
        "get small",
        "head small",
        "list small",
    ]
    for phase_name in order:
        for phase in best.values():
            if phase.phase == phase_name:
                print(phase.row())


if __name__ == "__main__":
    main()
