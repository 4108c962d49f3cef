"""The dispatch benchmark: many-VM operator calls and a fleet's backups, on the real job layer.

    python -m tests.bench.dispatch [--vms 5000] [--backups 1000] [--limit 1000]
                                   [--workdir /tmp] [--keep] [--json]

Issue 13 measured `register` and `protect` of 5,000 VMs at 18.6 s and 32.6 s (one VM and one
commit at a time). This measures the controller's parts that do that work, wired as
`controller.server` wires them (a real SQLite catalog in WAL mode on disk, real datastores,
the job manager with its runner and dispatcher, the protection manager with its scheduler, the
describer writing the VM descriptions as the catalog changes), in this order:

1. `--vms` agents enrol: each VM's hello is recorded (`Catalog.upsert_agent`, what an agent's
   session does) and its session is registered as connected (`AgentRegistry.connect`). The
   sessions are the controller's own `AgentSession` objects, whose outbox the bench reads: the
   agents' side is not what is measured here.
2. A vault (`--limit` concurrent backups) is created; `register` of every VM in one call, then
   `protect` of every VM in one call (`Protection.register` / `protect`, what the operator
   service calls): the time each call takes to return with every job ended.
3. `backup-now` of `--backups` VMs in one call: the time it takes to return (every backup
   recorded and queued), then the time until every one of those agents has its command (the
   dispatcher starts them up to the vault's limit). Each agent then acknowledges its command
   and reports a failure, so the jobs end.

The gRPC edge (TLS, marshalling the reply) is not in these figures: with a fleet simulator
(issue 13's connection side, tests/bench/fleet*) a run against a real `coffer-controller`
process takes its agents from `agents_hook` below; until then it is left out. Run by hand,
never as a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from controller.catalog import Catalog
from controller.datastores import Datastores
from controller.descriptions import Describer
from controller.jobs import JobManager
from controller.protection import Protection
from controller.pruning import Pruner
from controller.registry import AgentRegistry, AgentSession
from controller.vaults import Vaults
from shared.clock import SystemClock
from shared.model import JobStatus
from shared.rpc import agent_pb2, common_pb2
from shared.supervision import Supervisor

REGION = "bench"
CHUNK = 1 << 20
GC_GRACE = 3600.0


async def agents_hook(count: int) -> list[str]:
    """The VM ids of `count` agents in session. Here: sessions the bench makes itself (see
    `enrol`); a fleet simulator replaces this to measure a real controller process."""
    return [f"vm-{n:05d}" for n in range(count)]


@contextlib.asynccontextmanager
async def controller(root: Path, limit: int) -> AsyncIterator[dict[str, Any]]:
    """The controller's parts as `controller.server` wires them, under `root`."""
    clock = SystemClock()
    async with contextlib.AsyncExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(4))
        catalog = await stack.enter_async_context(Catalog(root / "catalog.sqlite"))
        datastores = Datastores(catalog, root / "datastores", clock=clock)
        supervisor = await stack.enter_async_context(Supervisor("controller"))
        await stack.enter_async_context(Describer(catalog, datastores, clock, supervisor))
        registry = AgentRegistry(clock)
        jobs = await stack.enter_async_context(
            JobManager(catalog, registry, datastores, None, clock, pool, supervisor=supervisor)
        )
        stack.callback(registry.close_all)
        stack.callback(jobs.stopping)
        vaults = Vaults(catalog, datastores, clock, CHUNK)
        pruner = Pruner(catalog, datastores, jobs, clock, GC_GRACE)
        protection = await stack.enter_async_context(
            Protection(catalog, registry, jobs, vaults, pruner, clock, supervisor)
        )
        await vaults.create(REGION, REGION, limit)
        protection.vault_created(REGION)
        yield {
            "catalog": catalog,
            "registry": registry,
            "jobs": jobs,
            "protection": protection,
            "clock": clock,
        }


async def enrol(parts: dict[str, Any], vm_ids: list[str]) -> dict[str, AgentSession]:
    """What each agent's hello leaves: its record in the catalog, its session connected."""
    catalog: Catalog = parts["catalog"]
    registry: AgentRegistry = parts["registry"]
    now = parts["clock"].now()
    sessions: dict[str, AgentSession] = {}
    for vm_id in vm_ids:
        hello = agent_pb2.Hello(
            vm_id=vm_id,
            name=vm_id,
            service="bench",
            region=REGION,
            hostname=f"{vm_id}.bench",
            agent_version="bench",
            disks=[agent_pb2.DiskInfo(name="root", path="/dev/vda", size_bytes=CHUNK)],
        )
        await catalog.upsert_agent(
            vm_id=vm_id,
            name=vm_id,
            service="bench",
            region=REGION,
            hostname=hello.hostname,
            agent_version="bench",
            disks=[],
            now=now,
        )
        session = AgentSession(hello=hello, connected_at=now)
        registry.connect(session)
        sessions[vm_id] = session
    return sessions


async def run(args: argparse.Namespace, root: Path) -> dict[str, float | int]:
    figures: dict[str, float | int] = {"vms": args.vms, "backups": args.backups}
    async with controller(root, args.limit) as parts:
        protection: Protection = parts["protection"]
        jobs: JobManager = parts["jobs"]
        vm_ids = await agents_hook(args.vms)
        began = time.perf_counter()
        sessions = await enrol(parts, vm_ids)
        figures["enrol_s"] = time.perf_counter() - began

        began = time.perf_counter()
        registered = await protection.register(REGION, vm_ids)
        figures["register_s"] = time.perf_counter() - began
        assert {job.status for job in registered} == {JobStatus.COMPLETED}, "register failed"

        began = time.perf_counter()
        protected = await protection.protect(REGION, vm_ids, "")
        figures["protect_s"] = time.perf_counter() - began
        assert {job.status for job in protected} == {JobStatus.COMPLETED}, "protect failed"

        chosen = vm_ids[: args.backups]
        began = time.perf_counter()
        queued = await protection.backup_now(REGION, chosen, [])
        figures["backup_now_s"] = time.perf_counter() - began
        assert len(queued) == len(chosen)

        async def command(vm_id: str) -> agent_pb2.ControllerMessage:
            return await sessions[vm_id].outbox.get()

        sent = await asyncio.gather(*(command(vm_id) for vm_id in chosen[: args.limit]))
        figures["commands_sent_s"] = time.perf_counter() - began
        figures["commands_sent"] = len(sent)

        # The agents take their commands and report a failure: the jobs end.
        for vm_id, message in zip(chosen, sent, strict=False):
            jobs.heard_from(vm_id, [message.backup.job_id])
            sessions[vm_id].resolve(
                agent_pb2.CommandResult(
                    command_id=message.command_id,
                    job_id=message.backup.job_id,
                    ok=False,
                    error=common_pb2.Error(code="InternalError", message="the bench's agent"),
                )
            )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=5000)
    parser.add_argument("--backups", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=1000, help="the vault's concurrent backups")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true", help="keep the catalog and datastore")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="coffer-bench-dispatch-", dir=args.workdir))
    try:
        figures = asyncio.run(run(args, root))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"enrol {args.vms} agents (hello records):  {figures['enrol_s']:.2f} s")
    print(f"register {args.vms} VMs, one call:         {figures['register_s']:.2f} s  (target 5)")
    print(f"protect {args.vms} VMs, one call:          {figures['protect_s']:.2f} s  (target 5)")
    print(
        f"backup-now {args.backups} VMs returns:         {figures['backup_now_s']:.2f} s  "
        "(target 1)"
    )
    print(
        f"every one of {figures['commands_sent']} agents has its command: "
        f"{figures['commands_sent_s']:.2f} s  (target 5, vault limit {args.limit})"
    )


if __name__ == "__main__":
    main()
