"""A hostile agent's worst case: how much memory one agent can make the controller hold.

    python -m tests.bench.hostile [--json] [--keep DIR]

All real: a fresh Coffer installation (`tests.cluster.Cluster`: PKI, a `coffer-controller`
process with its private Mosquitto), and agents played by this process on the generated stubs
with certificates the CA issued (`tests.hostile_agent`), each during its own backup job, as an
agent that turned hostile would be. The attacks of issue 14, one after the other, with the
controller's peak resident set (`VmHWM`, reset with `clear_refs` before each) measured around
each:

- *indexes*: 6 concurrent `PutIndex` streams, each an all-zero index of a claimed 256 GiB disk
  (16 MiB of digests at 512 KiB chunks; gzip makes them almost free on the wire);
- *uploads*: 24 concurrent `UploadChunks` streams, each one message of 30 MiB;
- *hello*: a session whose hello holds an 8 MiB hostname and 20,000 disks (about 30 MB);
- *declared*: the worst the limits leave: 6 agents, each declaring one 2 TiB disk in its hello
  (within the hello's limits), send at once the full all-zero index of it (128 MiB of digests
  each at 512 KiB chunks; the index budget admits two at a time).

Printed: the controller's resident set at rest, then for each attack its peak, and how each
call ended (accepted or refused, with the error code). docs/hostile-agent.md records the figures
before and after the limits of issue 14. Run by hand, never as a timed test;
tests/test_hostile_agent.py asserts the limits themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from shared.rpc import agent_pb2
from tests.bench.measure import proc_hwm_bytes, proc_rss_bytes, reset_hwm
from tests.cluster import Cluster
from tests.hostile_agent import (
    GiB,
    HostileAgent,
    MiB,
    concurrent_indexes,
    concurrent_uploads,
    error_code,
    hello_for,
    huge_hello,
)


def _outcomes(results: Sequence[object]) -> str:
    counts: Counter[str] = Counter()
    for result in results:
        if isinstance(result, grpc.aio.AioRpcError):
            counts[f"refused {error_code(result) or result.code().name}"] += 1
        elif isinstance(result, BaseException):
            counts[f"failed {type(result).__name__}"] += 1
        else:
            counts["accepted"] += 1
    return ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))


async def _measured(pid: int, attack: Callable[[], Awaitable[Sequence[object]]]) -> tuple[int, str]:
    """Peak RSS of `pid` while `attack` runs (sampled, and VmHWM), and how its calls ended."""
    reset_hwm(pid)
    results = await attack()
    return proc_hwm_bytes(pid), _outcomes(results)


async def _warm(cluster: Cluster) -> int:
    """The controller's resident set at rest, once a backup job has warmed its code paths."""
    async with HostileAgent(cluster, "warm-1") as warm:
        command = await warm.backup_command()
        await warm.give_up(command)
        await asyncio.to_thread(cluster.coffer, "job", "watch", command.backup.job_id, check=False)
    await asyncio.sleep(1)
    return proc_rss_bytes(cluster.controller.pid)


async def _indexes(cluster: Cluster) -> dict[str, Any]:
    pid = cluster.controller.pid
    async with HostileAgent(cluster, "index-1") as agent:
        command = await agent.backup_command()
        peak, outcome = await _measured(
            pid, lambda: concurrent_indexes(agent, command, 6, 256 * GiB)
        )
        await agent.result(command, [agent_disk("root")])
        job = await asyncio.to_thread(
            cluster.coffer, "job", "watch", command.backup.job_id, check=False
        )
        points = await asyncio.to_thread(cluster.coffer, "rp", "list", "index-1")
    return {
        "peak_bytes": peak,
        "calls": outcome,
        "job": f"{job['status']} {job.get('error_code', '')}".strip(),
        "recovery_points": [sum(d["size_bytes"] for d in p.get("disks", [])) for p in points],
    }


async def _uploads(cluster: Cluster) -> dict[str, Any]:
    async with HostileAgent(cluster, "upload-1") as agent:
        command = await agent.backup_command()
        peak, outcome = await _measured(
            cluster.controller.pid, lambda: concurrent_uploads(agent, command, 24, 30 * MiB)
        )
        await agent.give_up(command)
    return {"peak_bytes": peak, "calls": outcome}


async def _hello(cluster: Cluster) -> dict[str, Any]:
    async def attack() -> Sequence[object]:
        async with HostileAgent(cluster, "hello-1", huge_hello("hello-1")) as agent:
            try:
                return [await agent.accepted()]
            except grpc.aio.AioRpcError as error:
                return [error]

    peak, outcome = await _measured(cluster.controller.pid, attack)
    listed = {a["vm_id"]: a for a in await asyncio.to_thread(cluster.coffer, "agents")}
    stored = listed.get("hello-1")
    return {
        "peak_bytes": peak,
        "calls": outcome,
        "stored": (
            f"hostname of {len(stored['hostname'])} characters, {len(stored['disks'])} disks"
            if stored
            else "nothing"
        ),
    }


DECLARED_AGENTS = 6
DECLARED_DISK = 2 << 40


async def _declared(cluster: Cluster) -> dict[str, Any]:
    async def one(n: int) -> object:
        vm_id = f"big-{n}"
        async with HostileAgent(
            cluster, vm_id, hello_for(vm_id, [("root", DECLARED_DISK)])
        ) as agent:
            command = await agent.backup_command()
            try:
                (result,) = await concurrent_indexes(agent, command, 1, DECLARED_DISK)
            finally:
                await agent.give_up(command)
            return result

    async def attack() -> Sequence[object]:
        return await asyncio.gather(*(one(n) for n in range(DECLARED_AGENTS)))

    peak, outcome = await _measured(cluster.controller.pid, attack)
    return {"peak_bytes": peak, "calls": outcome}


ATTACKS = {"indexes": _indexes, "uploads": _uploads, "hello": _hello, "declared": _declared}


async def run(root: Path) -> dict[str, Any]:
    """Each attack against a controller of its own (memory a process took stays its)."""
    report: dict[str, Any] = {}
    for name, attack in ATTACKS.items():
        with Cluster(root / name) as cluster:
            at_rest = await _warm(cluster)
            report[name] = {"at_rest_bytes": at_rest, **await attack(cluster)}
    return report


def agent_disk(name: str) -> agent_pb2.DiskBackupResult:
    return agent_pb2.DiskBackupResult(disk=name, consistency="crash")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", type=Path, help="run in DIR and leave it behind")
    parser.add_argument("--only", choices=sorted(ATTACKS), action="append")
    args = parser.parse_args()
    for name in set(ATTACKS) - set(args.only or ATTACKS):
        del ATTACKS[name]
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(run(args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="coffer-hostile-") as tmp:
            report = asyncio.run(run(Path(tmp)))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for name in ATTACKS:
        step = report[name]
        extra = {k: v for k, v in step.items() if k not in ("at_rest_bytes", "peak_bytes", "calls")}
        print(
            f"{name:8} at rest {_mb(step['at_rest_bytes']):>7}, peak {_mb(step['peak_bytes']):>9}"
            f"  calls: {step['calls']}  {extra or ''}"
        )


if __name__ == "__main__":
    main()
