"""The job runner: the one place a job is recorded, run, and its outcome written.

Every job, whatever its kind, goes the same way:

1. `admit`: its record is written `InProgress` and published over MQTT. A job that needs its
   VM to itself (a backup, a restore) is refused with `OperationInProgress` while another such
   job of the VM is running or queued: one job per VM, never queued behind a stuck one.
   `admit_many` admits many jobs at once (an operator's call naming many VMs) in one catalog
   transaction: all of them, or none when one VM is held.
2. `start`: its work runs as a task of the runner, never in the caller's, so a caller that
   goes away (an operator's RPC cancelled) cannot leave it half done and recorded running.
   Whatever the work raises becomes its outcome (`outcome.py`); an unexpected exception is
   logged with its traceback. Work that raises `NotStarted` gave way before anything began
   (a backup whose agent left before it took the command, back in its queue): the job is
   neither ended nor recorded anew, and is started again later. Nothing a job raises reaches
   the runner's task group, so no job takes other jobs or the controller down with it. A job
   that ends without running work (a queued backup that is cancelled or whose window closed)
   is given its outcome by `end`.
3. Its outcome is set on the record at once (from then on `cancel` finds it ended), then
   written, published, and the job's follow-ups run (`RunningJob.after_end`: releasing chunk
   holds, freeing a vault slot, counting stored bytes, updating the item, pruning), each
   guarded so one that fails is logged and the others still run.

Stopping: after `stopping()`, a job that fails is one the stop cut short. Its record is left
`InProgress` with what it did so far (its bytes), and the next start records it as failed
(`interrupted.py`), so that this happens in one place and a scheduled backup runs again.
Leaving the runner cancels maintenance jobs (they stop between items, `cancel.py`) and waits
for every job's task; no new maintenance job is admitted once the stop has begun.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from types import TracebackType
from typing import Any, Self

from controller.audit import requested_by, set_requester
from controller.catalog import Catalog, JobRecord
from controller.jobs import journal
from controller.jobs.deadlines import ReplyDeadlines
from controller.jobs.outcome import Outcome, outcome_of
from controller.status import StatusMonitor
from shared.clock import Clock
from shared.errors import CofferError, OperationInProgress, Unavailable
from shared.model import JobStatus, Operation
from shared.status import JobState

log = logging.getLogger(__name__)

FollowUp = Callable[[], Awaitable[None]]
# Told of every job that ended, once its outcome is written (metrics, alerts): quick and
# synchronous, and one that fails is logged without keeping the others from hearing.
EndObserver = Callable[[JobRecord], None]


class NotStarted(Exception):
    """The job's work gave way before it began; the job waits to be started again."""


def new_job_id() -> str:
    return secrets.token_hex(6)


@dataclass(eq=False)
class RunningJob:
    """A job the runner knows, from `admit` until its outcome is recorded."""

    record: JobRecord
    exclusive: bool = False
    """It needs its VM to itself (one such job per VM)."""
    cancellable: bool = False
    """Its work stops when its task is cancelled (maintenance jobs; agent jobs cancel by
    telling the agent instead)."""
    cancel_requested: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set whenever the record changes (for watchers)."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the outcome is recorded."""
    task: asyncio.Task[None] | None = None
    after_end: list[FollowUp] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def vm_id(self) -> str:
        return self.record.vm_id

    @property
    def agent_vm(self) -> str:
        """The VM whose agent does the job's work and may call its data path: its own VM,
        but a drill's is the vault's drill agent."""
        return self.record.vm_id

    def touch(self) -> None:
        self.changed.set()


class JobRunner:
    """Records, runs and ends jobs; an async context manager owning their tasks."""

    def __init__(
        self,
        catalog: Catalog,
        status: StatusMonitor | None,
        clock: Clock,
        deadlines: ReplyDeadlines | None = None,
    ) -> None:
        self._catalog = catalog
        # How long the agents may stay silent about the commands of the jobs run here.
        self.deadlines = deadlines or ReplyDeadlines()
        self._status = status
        self._clock = clock
        self._running: dict[str, RunningJob] = {}
        self._by_vm: dict[str, str] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self._stopping = False
        self.on_end: list[EndObserver] = []

    async def __aenter__(self) -> Self:
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tasks is not None
        self.stopping()
        for running in list(self._running.values()):
            if running.cancellable and running.task is not None:
                running.task.cancel()
        # Agent jobs end by themselves: the agents' sessions are closed by now, so their
        # commands have failed with AgentDisconnected.
        await self._tasks.__aexit__(exc_type, exc, tb)
        self._tasks = None

    def stopping(self) -> None:
        """The controller is stopping: failures from here on are the stop's, not the jobs'."""
        self._stopping = True

    def left_for_next_start(self, job: JobRecord) -> bool:
        """A job the stop cut short: the next start records its failure (and its bytes)."""
        return self._stopping and job.status == JobStatus.FAILED

    # --- a job's life ------------------------------------------------------------------------

    def new_record(self, operation: Operation, vault: str, vm_id: str, **typed: Any) -> JobRecord:
        """A new job's record, `InProgress` from now; `typed` sets its other fields. It is
        requested by whoever asks now (`controller.audit.requested_by`) unless `typed` says."""
        typed.setdefault("requested_by", requested_by())
        return JobRecord(
            id=new_job_id(),
            operation=operation,
            status=JobStatus.IN_PROGRESS,
            vault=vault,
            vm_id=vm_id,
            started_at=self._clock.now(),
            **typed,
        )

    async def admit(self, running: RunningJob) -> None:
        """Record the job as started (and hold its VM if it needs it alone)."""
        job = running.record
        if running.cancellable and self._stopping:
            raise Unavailable(
                detail=f"the controller is stopping; the {job.operation} job did not start"
            )
        if running.exclusive:
            holder = self._by_vm.get(job.vm_id)
            if holder is not None:
                raise OperationInProgress(vm_id=job.vm_id, job_id=holder)
            self._by_vm[job.vm_id] = job.id
        self._running[job.id] = running
        try:
            await self._catalog.insert_job(job)
        except BaseException:
            self._forget(running)
            raise
        self.publish(job)
        journal.started(job)

    async def admit_many(self, jobs: Sequence[RunningJob]) -> None:
        """`admit` for many jobs in one catalog transaction: every one, or none (a VM that
        is held refuses the lot before anything is written)."""
        if self._stopping and any(running.cancellable for running in jobs):
            raise Unavailable(detail="the controller is stopping; the jobs did not start")
        held: dict[str, str] = {}
        for running in jobs:
            if not running.exclusive:
                continue
            vm_id = running.vm_id
            holder = self._by_vm.get(vm_id) or held.get(vm_id)
            if holder is not None:
                raise OperationInProgress(vm_id=vm_id, job_id=holder)
            held[vm_id] = running.id
        self._by_vm.update(held)
        for running in jobs:
            self._running[running.id] = running
        try:
            await self._catalog.insert_jobs([running.record for running in jobs])
        except BaseException:
            for running in jobs:
                self._forget(running)
            raise
        for running in jobs:
            self.publish(running.record)
            journal.started(running.record)

    def start(self, running: RunningJob, work: Callable[[], Awaitable[None]]) -> None:
        """Run `work` as the job's task; its outcome is recorded when it ends."""
        # The job's work asks in the name of whoever asked for the job: jobs it starts (a
        # prune after a backup) are theirs too, whichever task started this one.
        running.task = self.spawn(
            self._run(running, work), f"job-{running.id}", requester=running.record.requested_by
        )
        running.task.add_done_callback(lambda task: self._never_ran(running, task))

    def _never_ran(self, running: RunningJob, task: asyncio.Task[None]) -> None:
        # A task cancelled before its first step runs none of its code: its end is recorded
        # here instead. (`_run` catches a cancel that comes later.)
        if not task.cancelled() or running.ended.is_set():
            return
        outcome = outcome_of(
            running.record, asyncio.CancelledError(), cancel_requested=running.cancel_requested
        )
        try:
            self.end_soon(running, outcome)
        except RuntimeError:  # the task group has finished: the next start records it
            log.info("job %s was stopped before it began", running.id)

    async def _run(self, running: RunningJob, work: Callable[[], Awaitable[None]]) -> None:
        error: BaseException | None = None
        try:
            await work()
        except NotStarted:
            running.task = None
            return
        except asyncio.CancelledError as exc:
            # By `cancel` (a maintenance job) or by the stop: recorded as any other end.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            error = exc
        except CofferError as exc:
            error = exc
        except Exception as exc:
            log.exception("job %s failed unexpectedly", running.id)
            error = exc
        await self.end(
            running, outcome_of(running.record, error, cancel_requested=running.cancel_requested)
        )

    async def end(self, running: RunningJob, outcome: Outcome) -> None:
        """Give the job its outcome now, then record it and run its follow-ups."""
        self._settle(running, outcome)
        await self._record_end(running)

    def end_soon(self, running: RunningJob, outcome: Outcome) -> None:
        """`end` from code that must not wait: the outcome is set now, recorded in a task."""
        self._settle(running, outcome)
        self.spawn(
            self._record_end(running), f"end-{running.id}", requester=running.record.requested_by
        )

    def _settle(self, running: RunningJob, outcome: Outcome) -> None:
        job = running.record
        job.status, job.error_code, job.error_message = (
            outcome.status,
            outcome.error_code,
            outcome.error_message,
        )
        job.ended_at = self._clock.now()

    def _as_recorded(self, job: JobRecord) -> JobRecord:
        """What the catalog keeps of an ended job: a job the stop cut short stays InProgress."""
        if not self.left_for_next_start(job):
            return job
        log.info("job %s interrupted by the controller's stop", job.id)
        return dataclasses.replace(
            job, status=JobStatus.IN_PROGRESS, ended_at=None, error_code="", error_message=""
        )

    async def _record_end(self, running: RunningJob) -> None:
        job = running.record
        try:
            await self._catalog.update_job(self._as_recorded(job))
        except Exception:
            log.exception("job %s: its outcome could not be recorded", job.id)
        finally:
            self._ended(running)
        await self._after_end(running)

    def start_together(
        self,
        jobs: Sequence[RunningJob],
        work: Callable[[], Awaitable[dict[str, CofferError]]],
    ) -> None:
        """Run `work` for every one of `jobs` (admitted with `admit_many`) as one task: it
        returns the error of each job that failed, by job id; what it raises is every job's
        outcome. The outcomes are written in one transaction."""
        if not jobs:
            return
        first = jobs[0]

        async def together() -> None:
            errors: dict[str, CofferError] = {}
            failure: BaseException | None = None
            try:
                errors = await work()
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                failure = exc
            except CofferError as exc:
                failure = exc
            except Exception as exc:
                log.exception("jobs %s… failed unexpectedly", first.id)
                failure = exc
            for running in jobs:
                error = failure if failure is not None else errors.get(running.id)
                self._settle(
                    running,
                    outcome_of(running.record, error, cancel_requested=running.cancel_requested),
                )
            try:
                await self._catalog.update_jobs(
                    [self._as_recorded(running.record) for running in jobs]
                )
            except Exception:
                log.exception("jobs %s…: their outcomes could not be recorded", first.id)
            finally:
                for running in jobs:
                    self._ended(running)
            for running in jobs:
                await self._after_end(running)

        task = self.spawn(together(), f"jobs-{first.id}", requester=first.record.requested_by)
        for running in jobs:
            running.task = task
            task.add_done_callback(partial(self._never_ran, running))

    def _ended(self, running: RunningJob) -> None:
        self._forget(running)
        self.publish(running.record)
        running.ended.set()
        running.touch()

    async def _after_end(self, running: RunningJob) -> None:
        job = running.record
        if not self.left_for_next_start(job):
            journal.ended(job)
            for observer in self.on_end:
                try:
                    observer(job)
                except Exception:
                    log.exception("job %s: an observer of its end failed", job.id)
        for follow_up in running.after_end:
            try:
                await follow_up()
            except Exception:
                # The job's own record is written; what follows it must not stop the others.
                log.exception("job %s: a follow-up after its end failed", job.id)

    async def save(self, running: RunningJob) -> None:
        """Write the job's record as it is now (it is still running) and tell watchers."""
        await self._catalog.update_job(running.record)
        self.publish(running.record)
        running.touch()

    # --- tasks -------------------------------------------------------------------------------

    def spawn(
        self, work: Coroutine[Any, Any, None], name: str, *, requester: str | None = None
    ) -> asyncio.Task[None]:
        """Run `work` in the runner's task group; whatever it raises is logged, never let
        through: an exception reaching the group would cancel every job and the controller.
        With `requester`, the work asks in that name."""
        assert self._tasks is not None, "the job runner is not running"
        context = contextvars.copy_context()
        if requester is not None:
            context.run(set_requester, requester)

        async def supervised() -> None:
            try:
                await work
            except Exception:
                log.exception("task %s failed", name)

        task = self._tasks.create_task(supervised(), name=name, context=context)
        # A task cancelled before its first step never awaits `work`: close it quietly.
        task.add_done_callback(lambda _: work.close())
        return task

    # --- who runs ----------------------------------------------------------------------------

    def get(self, job_id: str) -> RunningJob | None:
        return self._running.get(job_id)

    def of_vm(self, vm_id: str) -> str:
        """The id of the job that has the VM to itself now ('' if none)."""
        return self._by_vm.get(vm_id, "")

    def __iter__(self) -> Iterator[RunningJob]:
        return iter(list(self._running.values()))

    def _forget(self, running: RunningJob) -> None:
        self._running.pop(running.id, None)
        if self._by_vm.get(running.vm_id) == running.id:
            del self._by_vm[running.vm_id]
        if self._status is not None:
            self._status.forget_job(running.id)

    def publish(self, job: JobRecord) -> None:
        if self._status is not None:
            self._status.publish_job_state(
                JobState(
                    job_id=job.id,
                    operation=job.operation,
                    status=job.status,
                    vm_id=job.vm_id or None,
                    error_code=job.error_code or None,
                    ts=datetime.fromtimestamp(self._clock.now(), UTC),
                )
            )
