"""Agent jobs: a command down the VM's agent session, its result, and a cancel that reaches it.

Backups and restores run in the agent. The controller sends the job's command over the agent's
session, waits for its `CommandResult`, and turns a failed result back into its typed error
(`from_proto`); warnings the agent reports go to the job's details. A session that closes fails
every command waiting on it with `AgentDisconnected` (registry.py), so no job waits for an
agent that is gone.

Reply deadlines. A command's job hears from its agent while the agent works on it: every
heartbeat names the jobs the agent carries out, and each data-path call, progress message and
file-recovery status of the job counts too (`AgentJob.heard`). A command the agent has not
acknowledged within `acknowledge_seconds` (deadlines.py) of being sent, or a job it has said
nothing of for `silence_seconds` since, fails with `AgentSilent`: its slot is
freed, the agent is told to cancel it (should it still be there), and a late result is
ignored. Progress keeps extending the deadline, so a long backup is never cut short while its
agent works; only silence ends it.

A cancel is sent down the session too: the job is recorded `Cancelling`, the agent stops it
and answers `JobCancelled`. An agent that has not stopped it after `CANCEL_GRACE_SECONDS` is
not waited for any more: the job ends `Cancelled` all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from dataclasses import dataclass

from controller.jobs.deadlines import ReplyDeadlines
from controller.jobs.runner import JobRunner, RunningJob
from controller.registry import AgentRegistry, AgentSession
from shared.errors import AgentSilent, InvalidArgument, JobCancelled
from shared.model import JobStatus
from shared.rpc import agent_pb2
from shared.rpc_errors import from_proto

# How long a cancelled job may take to stop on its agent before the controller stops waiting.
CANCEL_GRACE_SECONDS = 30.0

MAX_RECORDED = (1 << 63) - 1
"""The largest count the catalog records (SQLite's INTEGER is signed 64-bit)."""
MAX_FROZEN_MS = 86_400_000.0  # a day: far beyond any thaw deadline
MAX_WARNINGS = 64
MAX_RESULT_TEXT = 4096  # characters of an error message or a warning
MAX_RESULT_DISKS = 64
MAX_DAMAGED_REPORTED = 1 << 16
_ERROR_CODE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")


def check_result(result: agent_pb2.CommandResult) -> None:
    """Every value of an agent's result within what can be recorded and shown; InvalidArgument
    naming the first that is not. Checked before anything of it is used: a count past 2^63
    once committed a recovery point and then failed to record its job, which stayed
    InProgress (issue 14)."""

    def bad(detail: str) -> InvalidArgument:
        return InvalidArgument(detail=f"the agent's result: {detail}")

    def count(value: int, what: str) -> None:
        if not 0 <= value <= MAX_RECORDED:
            raise bad(f"{what} {value} is out of range (0 to 2^63-1)")

    def text(value: str, what: str) -> None:
        if len(value) > MAX_RESULT_TEXT:
            raise bad(f"{what} has {len(value)} characters; at most {MAX_RESULT_TEXT}")

    if result.HasField("error"):
        if result.error.code and _ERROR_CODE.fullmatch(result.error.code) is None:
            raise bad(f"error code {result.error.code[:80]!r} is not a code")
        text(result.error.message, "the error message")
    if len(result.warnings) > MAX_WARNINGS:
        raise bad(f"{len(result.warnings)} warnings; at most {MAX_WARNINGS}")
    for warning in result.warnings:
        text(warning, "a warning")
    count(result.bytes_written, "bytes written")
    if not (math.isfinite(result.frozen_ms) and 0 <= result.frozen_ms <= MAX_FROZEN_MS):
        raise bad(f"frozen time {result.frozen_ms} ms is out of range")
    if len(result.disks) > MAX_RESULT_DISKS:
        raise bad(f"{len(result.disks)} disks; at most {MAX_RESULT_DISKS}")
    for disk in result.disks:
        count(disk.size_bytes, f"disk {disk.disk[:64]!r}: size")
        count(disk.bytes_read, f"disk {disk.disk[:64]!r}: bytes read")
        count(disk.bytes_sent, f"disk {disk.disk[:64]!r}: bytes sent")
        for value, what in (
            (disk.consistency, "consistency"),
            (disk.snapshot_provider, "provider"),
        ):
            if len(value) > 64 or not value.isprintable():
                raise bad(f"disk {disk.disk[:64]!r}: {what} {value[:64]!r} is not a name")
    if len(result.damaged_chunks) > MAX_DAMAGED_REPORTED:
        raise bad(f"{len(result.damaged_chunks)} damaged chunks; at most {MAX_DAMAGED_REPORTED}")


@dataclass(eq=False)
class AgentJob(RunningJob):
    """A job whose work is a command its VM's agent carries out."""

    reply: asyncio.Future[agent_pb2.CommandResult] | None = None
    """The agent's answer to the job's command, while one is awaited."""
    result: agent_pb2.CommandResult | None = None
    """The agent's answer once it came, failed or not (a failed restore names the chunks
    that failed the agent's check)."""
    sent_at: float = 0.0
    """When its command was sent (monotonic seconds; 0: not yet)."""
    heard_at: float = 0.0
    """When its agent last said anything of it (monotonic seconds; 0: nothing yet)."""

    @property
    def acknowledged(self) -> bool:
        """The agent has said something of the job since its command was sent."""
        return self.heard_at >= self.sent_at > 0.0

    def heard(self) -> None:
        """The agent said something of this job: its reply deadline starts again."""
        self.heard_at = time.monotonic()


async def run_command(
    running: AgentJob,
    session: AgentSession,
    command: agent_pb2.ControllerMessage,
    deadlines: ReplyDeadlines,
) -> agent_pb2.CommandResult:
    """Send the job's command and return the agent's successful result (raise its error);
    `AgentSilent` once the agent is silent about it past `deadlines`."""
    job = running.record
    if running.cancel_requested:  # cancelled while its command was being prepared
        raise JobCancelled(job_id=job.id)
    running.reply = session.send(command, job.id)
    running.sent_at = time.monotonic()
    try:
        try:
            result = await _reply(running, running.reply, deadlines)
        except AgentSilent:
            # Whatever the agent still does of it is not waited for: it is told to stop, and
            # its result, should one come, is ignored.
            session.forget(command.command_id)
            session.tell(agent_pb2.ControllerMessage(cancel=agent_pb2.CancelCommand(job_id=job.id)))
            raise
        check_result(result)
        running.result = result
    finally:
        running.reply = None
    if not result.ok:
        raise from_proto(result.error)
    if result.warnings:
        job.details["warnings"] = list(result.warnings)
    return result


async def _reply(
    running: AgentJob,
    reply: asyncio.Future[agent_pb2.CommandResult],
    deadlines: ReplyDeadlines,
) -> agent_pb2.CommandResult:
    """The agent's result, waited for while the agent keeps saying something of the job."""
    while True:
        if running.acknowledged:
            since, limit = running.heard_at, deadlines.silence_seconds
        else:
            since, limit = running.sent_at, deadlines.acknowledge_seconds
        left = since + limit - time.monotonic()
        if left <= 0:
            raise AgentSilent(vm_id=running.agent_vm, silence=_silence(running, limit))
        # Woken only when the deadline may have passed: words of the agent just move it.
        try:
            done, _ = await asyncio.wait({reply}, timeout=left)
        except asyncio.CancelledError:
            reply.cancel()  # as awaiting it would have: nobody waits for it any more
            raise
        if done:
            return reply.result()


def _silence(running: AgentJob, limit: float) -> str:
    if running.acknowledged:
        return f"has said nothing of job {running.id} for {limit:g} s"
    return f"did not acknowledge job {running.id} within {limit:g} s of being sent it"


async def cancel(running: AgentJob, runner: JobRunner, registry: AgentRegistry) -> None:
    """Ask the agent to stop the job; it ends when the agent answers (or the grace is up)."""
    if running.cancel_requested:
        return
    running.cancel_requested = True
    running.record.status = JobStatus.CANCELLING
    await runner.save(running)
    session = registry.session(running.agent_vm)
    if session is not None:
        session.tell(agent_pb2.ControllerMessage(cancel=agent_pb2.CancelCommand(job_id=running.id)))
    runner.spawn(_cancel_deadline(running), f"cancel-{running.id}")


async def _cancel_deadline(running: AgentJob) -> None:
    """An agent that does not stop a cancelled job in time is not waited for any more."""
    # Waits for the job's end, not a fixed time: a shutdown waits for this task.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(running.ended.wait(), CANCEL_GRACE_SECONDS)
    if running.reply is not None and not running.reply.done():
        running.reply.set_exception(JobCancelled(job_id=running.id))
