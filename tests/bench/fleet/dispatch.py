"""The fleet's dispatch phase: backups of many VMs through a real controller and real sessions.

`tests/bench/dispatch.py` measures the job layer in-process, without the gRPC edge; this phase
measures issue 13's dispatch targets end to end, with the operator's calls over mutual TLS and
the commands going down the simulated agents' sessions (`--dispatch N` of the fleet
benchmark; the simulator answers every command at once, with a failure of its own,
`FleetSimulatorNoData`: tests/bench/fleet/commands.py):

1. A vault `fleet` in the simulated agents' region, its limit of concurrent backups `N`; the N
   chosen VMs (the first of each worker's agents) registered and protected, each in one call
   (only those not yet: the work directory keeps the controller's state between runs).
2. `backup-now` of the N VMs in one call: seconds until it returns, until every one of those
   agents has its command, and until every job has ended; how they ended.
3. The same with the vault's limit at `QUEUED_LIMIT`, so that almost every backup waits in
   the vault's queue, and half of the N agents hang up at once and dial again within
   `DROP_WITHIN` seconds. A queued backup waits for its agent: every job must end as its
   agent reported it, none failed for the agent's absence.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from shared.rpc import operator_pb2, operator_pb2_grpc
from shared.rpc_channel import channel_options
from shared.tls import TlsFiles, channel_credentials
from tests.bench.fleet.agents import vm_name
from tests.bench.fleet.commands import NO_DATA, SAID

VAULT = "fleet"
REGION = "sim"  # the region every simulated agent declares (tests/bench/fleet/agents.py)
QUEUED_LIMIT = 10
DROP_WITHIN = 5.0
POLL_SECONDS = 0.2
TIMEOUT = 120.0  # every operator call


class Dispatching:
    def __init__(self, fleet: Any, stub: operator_pb2_grpc.OperatorServiceStub) -> None:
        self.fleet = fleet
        self.stub = stub

    def chosen(self, count: int) -> tuple[list[str], int]:
        """`count` VMs, the first of each worker's agents; and how many of each worker's."""
        workers = self.fleet.workers
        each = max(1, count // len(workers))
        vms = [vm_name(w.first + n) for w in workers for n in range(min(each, w.count))]
        return vms, each

    async def vault(self, limit: int) -> None:
        try:
            await self.stub.GetVault(operator_pb2.VaultRef(name=VAULT), timeout=TIMEOUT)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            await self.stub.CreateVault(
                operator_pb2.CreateVaultRequest(
                    name=VAULT, region=REGION, max_concurrent_backups=limit
                ),
                timeout=TIMEOUT,
            )
        await self.limit(limit)

    async def limit(self, limit: int) -> None:
        await self.stub.UpdateVault(
            operator_pb2.UpdateVaultRequest(name=VAULT, max_concurrent_backups=limit),
            timeout=TIMEOUT,
        )

    async def items(self) -> dict[str, str]:
        """The vault's items: VM id to state."""
        states: dict[str, str] = {}
        token = ""
        while True:
            reply = await self.stub.ListItems(
                operator_pb2.ListItemsRequest(vault=VAULT, page_size=1000, page_token=token),
                timeout=TIMEOUT,
            )
            states.update((item.vm_id, item.state) for item in reply.items)
            token = reply.next_page_token
            if not token:
                return states

    async def protect(self, vms: list[str]) -> dict[str, Any]:
        """Register and protect those of `vms` that are not yet, each step in one call."""
        figures: dict[str, Any] = {}
        states = await self.items()
        if unregistered := [vm for vm in vms if vm not in states]:
            register = self.stub.Register(
                operator_pb2.ItemsRequest(vault=VAULT, vms=unregistered), timeout=TIMEOUT
            )
            await _step(figures, "register", len(unregistered), register)
            states = await self.items()
        if registered := [vm for vm in vms if states.get(vm) == "Registered"]:
            protect = self.stub.Protect(
                operator_pb2.ProtectRequest(vault=VAULT, vms=registered), timeout=TIMEOUT
            )
            await _step(figures, "protect", len(registered), protect)
        return figures

    async def backups(self, vms: list[str], within: float, drop: int = 0) -> dict[str, Any]:
        """`backup-now` of `vms`: when it returned, when every agent had its command, when
        every job ended and how; with `drop`, each worker's first `drop` agents hang up at
        once and come back within `DROP_WITHIN` s."""
        answered = self.fleet.total("commands")
        began = time.monotonic()
        reply = await self.stub.BackupNow(
            operator_pb2.BackupNowRequest(vault=VAULT, vms=vms), timeout=TIMEOUT
        )
        returned = time.monotonic() - began
        if drop:
            await self.fleet.send(f"drop {drop} {DROP_WITHIN}")
        commanded = await self.fleet.until(
            lambda: self.fleet.total("commands") - answered >= len(vms), within
        )
        jobs = {job.id for job in reply.jobs}
        ended, outcomes = await self.ended(jobs, within)
        return {
            "backups": len(jobs),
            "returned_s": returned,
            "every_agent_commanded_s": None if commanded is None else returned + commanded,
            "every_job_ended_s": None if ended is None else time.monotonic() - began,
            # How the jobs ended: the simulator's own failure is the only right answer.
            "outcomes": dict(outcomes.most_common()),
            "dropped_agents": drop * len(self.fleet.workers),
        }

    async def ended(self, jobs: set[str], within: float) -> tuple[float | None, Counter[str]]:
        """Seconds until every one of `jobs` ended (None if not `within`), and how they
        ended: the error code, or the status of a job without one."""
        began = time.monotonic()
        since = Timestamp()
        since.FromSeconds(int(time.time()) - 3600)
        while True:
            running = await self._jobs(jobs, ["InProgress", "Cancelling"], since)
            if not running:
                took: float | None = time.monotonic() - began
                break
            if time.monotonic() - began > within:
                took = None
                break
            await asyncio.sleep(POLL_SECONDS)
        outcomes = Counter(_outcome(job) for job in await self._jobs(jobs, [], since))
        return took, outcomes

    async def _jobs(
        self, ids: set[str], status: list[str], since: Timestamp
    ) -> list[operator_pb2.Job]:
        """The vault's backups among `ids` in `status` (every status if empty)."""
        found: list[operator_pb2.Job] = []
        token = ""
        while True:
            reply = await self.stub.ListJobs(
                operator_pb2.ListJobsRequest(
                    vault=VAULT,
                    operation=["Backup"],
                    status=status,
                    started_from=since,
                    limit=10_000,
                    page_token=token,
                ),
                timeout=TIMEOUT,
            )
            found.extend(job for job in reply.jobs if job.id in ids)
            token = reply.next_page_token
            if not token:
                return found


def _outcome(job: operator_pb2.Job) -> str:
    """How a job ended: the simulated agent's own failure (`NO_DATA`), or the controller's
    error code (or the status of a job without one)."""
    if SAID in job.error_message:
        return NO_DATA
    return job.error_code or job.status


async def _step(
    figures: dict[str, Any], step: str, vms: int, call: Awaitable[operator_pb2.JobsReply]
) -> None:
    """Time one many-VM call (`{step}_s`, `{step}_vms`); every one of its jobs must complete."""
    began = time.monotonic()
    reply = await call
    figures[f"{step}_s"] = time.monotonic() - began
    figures[f"{step}_vms"] = vms
    _all_completed(step, reply)


def _all_completed(step: str, reply: operator_pb2.JobsReply) -> None:
    failed = [job for job in reply.jobs if job.status != "Completed"]
    if failed:
        raise RuntimeError(
            f"{step}: {len(failed)} of {len(reply.jobs)} jobs did not complete, the first: "
            f"{failed[0].vm_id} {failed[0].status} {failed[0].error_code} "
            f"{failed[0].error_message}"
        )


async def dispatch(fleet: Any, target: str, tls: TlsFiles, count: int) -> dict[str, Any]:
    """The dispatch phase (the module's note) against the controller at `target`."""
    async with grpc.aio.secure_channel(
        target, channel_credentials(tls), options=channel_options()
    ) as channel:
        run = Dispatching(fleet, operator_pb2_grpc.OperatorServiceStub(channel))
        vms, each = run.chosen(count)
        await run.vault(len(vms))
        figures: dict[str, Any] = {"vms": len(vms), **await run.protect(vms)}
        figures["backup_now"] = await run.backups(vms, TIMEOUT)
        await run.limit(QUEUED_LIMIT)
        figures["queued_limit"] = QUEUED_LIMIT
        figures["dropped_while_queued"] = await run.backups(vms, TIMEOUT, drop=each // 2)
        figures["jobs_failed_for_absence"] = sum(
            n for how, n in figures["dropped_while_queued"]["outcomes"].items() if how != NO_DATA
        )
    return figures
