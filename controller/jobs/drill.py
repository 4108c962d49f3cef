"""Restore drills as jobs: a recovery point restored on a drill agent, checked, recorded.

One `RestoreDrill` job per VM drilled. It restores each disk of the recovery point in turn to
scratch space on the vault's drill agent (a `RestoreCommand` in DRILL mode: the agent checks
every file system on it read-only and deletes it, `agent.drill`), then records the drill on
the recovery point: when, how long the restores took, what the checks found. The job ends:

- `Completed`: every file system checked clean;
- `CompletedWithWarnings`: none damaged, but some could not be checked (a file system no
  checker knows, a disk or partition with no file system);
- `Failed` with `RestoreDrillFailed`: a file system is damaged; the message carries each
  damaged one's checker output tail (the details have every check);
- `Failed` with the restore's own error when it could not be restored. An error of the
  data-integrity class (a chunk missing or corrupt) is about the recovery point and recorded
  on it as a failed drill; any other (the drill agent offline, its directory missing, a
  cancel) says nothing about the recovery point and is recorded on the job only.

A chunk that cannot be read back fails the drill as it fails a restore (`DataCorrupted`,
exit 7): the chunk is marked bad and the recovery points that need it damaged
(`controller.integrity`), and the drill is recorded failed on the recovery point.

The drill agent reads chunks as a restore's target agent does: only those of the disk being
drilled, only while the job runs (`RestoreSession`; a drill's `agent_vm` is the drill agent,
not the VM drilled). Drills on one drill agent run one at a time (each holds a scratch image
until it is checked); the others wait `InProgress` in phase `Waiting for the drill agent`. A
drill does not have its VM to itself: backups of the VM go on beside it, and the recovery
point it reads is not pruned meanwhile (the job manager's `in_use`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial

from controller.catalog import (
    Catalog,
    DrillRecord,
    JobRecord,
    RecoveryPointRecord,
    RestoreTarget,
)
from controller.datastores import Datastores
from controller.integrity import Integrity
from controller.jobs.agent_command import run_command
from controller.jobs.restore import RestoreSession, RunningRestore, record_damage, record_result
from controller.jobs.runner import JobRunner
from controller.registry import AgentRegistry
from shared.clock import Clock
from shared.errors import CofferError, DataCorrupted, DrillFailed, JobCancelled
from shared.model import DrillOutcome, Operation, RestoreMode, Trigger
from shared.rpc import agent_pb2

WAITING = "Waiting for the drill agent"
WAIT_POLL_SECONDS = 0.5  # how soon a drill waiting for its agent sees that it was cancelled
DATA_INTEGRITY_EXIT = 7  # the exit code of the errors that mean the data could not be read back
CLEAN, DAMAGED = "clean", "damaged"


@dataclass(eq=False)
class RunningDrill(RunningRestore):
    drill_agent: str = ""
    point: RecoveryPointRecord | None = None

    @property
    def agent_vm(self) -> str:
        return self.drill_agent

    @property
    def recovery_point(self) -> RecoveryPointRecord | None:
        # Read from the start, waiting included: a prune leaves it alone meanwhile.
        return self.point


def scratch_path(directory: str, job_id: str, disk: str) -> str:
    """Where a drill restores one disk: a new name under the drill directory."""
    return f"{directory.rstrip('/')}/coffer-drill-{job_id}-{disk}.img"


def describe(disk: str, check: agent_pb2.FileSystemCheck) -> str:
    """One check for people: "root: ext4 (whole disk) clean"."""
    what = f"{check.fstype} ({check.where})" if check.fstype else check.where
    if check.verdict == CLEAN:
        return f"{disk}: {what} clean"
    if check.verdict == DAMAGED and check.command:
        return f"{disk}: {what} damaged ({check.command} exit {check.exit_code})"
    if check.verdict == DAMAGED:  # found unreadable without a checker (a partition table)
        return f"{disk}: {what} damaged: {check.output_tail}"
    return f"{disk}: {what} unchecked: {check.output_tail}"


def judge(
    checks: Sequence[tuple[str, agent_pb2.FileSystemCheck]],
) -> tuple[DrillOutcome, str]:
    """What a drill's checks (disk, check) add up to, and a summary; pure."""
    summary = "; ".join(describe(disk, check) for disk, check in checks) or "no disks"
    verdicts = {check.verdict for _, check in checks}
    if DAMAGED in verdicts:
        return DrillOutcome.DAMAGED, summary
    if verdicts - {CLEAN} or not checks:
        return DrillOutcome.UNCHECKED, summary
    return DrillOutcome.CLEAN, summary


def findings(checks: Sequence[tuple[str, agent_pb2.FileSystemCheck]]) -> str:
    """The damaged file systems, each with its checker's last lines."""
    parts = []
    for disk, check in checks:
        if check.verdict == DAMAGED:
            parts.append(f"{describe(disk, check)}:\n{check.output_tail}")
    return "damaged file systems: " + "\n".join(parts)


class DrillJobs:
    """Starts RestoreDrill jobs and runs them, one at a time per drill agent."""

    def __init__(
        self,
        catalog: Catalog,
        registry: AgentRegistry,
        datastores: Datastores,
        runner: JobRunner,
        clock: Clock,
        pool: Executor,
        integrity: Integrity | None = None,
    ) -> None:
        self._catalog = catalog
        self._registry = registry
        self._datastores = datastores
        self._runner = runner
        self._clock = clock
        self._pool = pool
        self._integrity = integrity
        self._agents: dict[str, asyncio.Lock] = {}

    async def start(
        self, rp: RecoveryPointRecord, agent: str, directory: str, trigger: Trigger
    ) -> JobRecord:
        job = self._runner.new_record(
            Operation.RESTORE_DRILL,
            rp.vault,
            rp.vm_id,
            recovery_point_id=rp.id,
            disks=tuple(d.name for d in rp.disks),
            trigger=trigger,
            restore=RestoreTarget(
                source_vm_id=rp.vm_id,
                target_vm_id=agent,
                target_path=directory,
                mode=RestoreMode.DRILL,
            ),
            details={"phase": WAITING},
        )
        running = RunningDrill(job, drill_agent=agent, point=rp)
        await self._runner.admit(running)
        self._runner.start(running, partial(self._run, running, rp, directory))
        return job

    async def _run(self, running: RunningDrill, rp: RecoveryPointRecord, directory: str) -> None:
        job = running.record
        async with self._turn(running):
            job.details.pop("phase", None)
            await self._runner.save(running)
            checks: list[tuple[str, agent_pb2.FileSystemCheck]] = []
            seconds = 0.0
            try:
                for disk in rp.disks:
                    result = await self._drill_disk(running, rp, disk.name, directory)
                    record_result(job, result)
                    seconds += result.restore.seconds
                    checks += [(disk.name, check) for check in result.restore.checks]
            except CofferError as exc:
                if exc.exit_code == DATA_INTEGRITY_EXIT and not running.cancel_requested:
                    await self._record(
                        running, rp, seconds, DrillOutcome.FAILED, f"{exc.code}: {exc.message}"
                    )
                raise
        outcome, summary = judge(checks)
        job.details["checks"] = [describe(disk, check) for disk, check in checks]
        await self._record(running, rp, seconds, outcome, summary)
        if outcome is DrillOutcome.DAMAGED:
            raise DrillFailed(recovery_point=rp.id, vm=rp.vm_id, findings=findings(checks))
        if outcome is DrillOutcome.UNCHECKED:
            job.details["warnings"] = [
                f"not every file system could be checked: {summary}",
            ]

    @contextlib.asynccontextmanager
    async def _turn(self, running: RunningDrill) -> AsyncIterator[None]:
        """The drill agent to this job alone; a cancel while it waits ends the wait."""
        lock = self._agents.setdefault(running.drill_agent, asyncio.Lock())
        while True:
            if running.cancel_requested:
                raise JobCancelled(job_id=running.id)
            try:
                await asyncio.wait_for(lock.acquire(), WAIT_POLL_SECONDS)
            except TimeoutError:
                continue
            break
        try:
            yield
        finally:
            lock.release()

    async def _drill_disk(
        self, running: RunningDrill, rp: RecoveryPointRecord, disk: str, directory: str
    ) -> agent_pb2.CommandResult:
        job = running.record
        rp_disk = next(d for d in rp.disks if d.name == disk)
        agent = self._registry.get(running.drill_agent)
        session = await RestoreSession.open(
            job.id,
            rp,
            disk,
            # Of a vault being upgraded, the format its point is in now (controller.datastores).
            await self._datastores.reader(rp.vault, rp.id),
            self._datastores.guard(rp.vault),
            self._pool,
        )
        running.session = session
        running.since = (await self._datastores.health(rp.vault)).generation
        running.found_bad = {}
        command = agent_pb2.ControllerMessage(
            restore=agent_pb2.RestoreCommand(
                job_id=job.id,
                recovery_point_id=rp.id,
                disk=disk,
                target_path=scratch_path(directory, job.id, disk),
                size_bytes=rp_disk.size_bytes,
                chunk_size=rp_disk.chunk_size,
                mode=agent_pb2.RESTORE_MODE_DRILL,
                # The agent verifies chunks as the datastore names them (never logged).
                chunk_id_key=session.datastore.chunk_hash.key or b"",
            )
        )
        try:
            return await run_command(running, agent, command, self._runner.deadlines)
        except DataCorrupted:
            # As a restore's: the chunks found bad are marked, the points that need them
            # damaged, while the session still knows the disk's index.
            await record_damage(running, self._integrity, self._pool)
            raise
        finally:
            running.session = None
            session.release()

    async def _record(
        self,
        running: RunningDrill,
        rp: RecoveryPointRecord,
        seconds: float,
        outcome: DrillOutcome,
        summary: str,
    ) -> None:
        await self._catalog.record_drill(
            rp.id,
            DrillRecord(
                at=self._clock.now(),
                job_id=running.id,
                seconds=round(seconds, 3),
                outcome=outcome,
                summary=summary,
            ),
        )
