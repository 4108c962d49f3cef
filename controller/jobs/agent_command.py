"""Agent jobs: a command down the VM's agent session, its result, and a cancel that reaches it.

Backups and restores run in the agent. The controller sends the job's command over the agent's
session, waits for its `CommandResult`, and turns a failed result back into its typed error
(`from_proto`); warnings the agent reports go to the job's details. A session that closes fails
every command waiting on it with `AgentDisconnected` (registry.py), so no job waits for an
agent that is gone.

A cancel is sent down the session too: the job is recorded `Cancelling`, the agent stops it
and answers `JobCancelled`. An agent that has not stopped it after `CANCEL_GRACE_SECONDS` is
not waited for any more: the job ends `Cancelled` all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from controller.jobs.runner import JobRunner, RunningJob
from controller.registry import AgentRegistry, AgentSession
from shared.errors import JobCancelled
from shared.model import JobStatus
from shared.rpc import agent_pb2
from shared.rpc_errors import from_proto

# How long a cancelled job may take to stop on its agent before the controller stops waiting.
CANCEL_GRACE_SECONDS = 30.0


@dataclass(eq=False)
class AgentJob(RunningJob):
    """A job whose work is a command its VM's agent carries out."""

    reply: asyncio.Future[agent_pb2.CommandResult] | None = None
    """The agent's answer to the job's command, while one is awaited."""
    result: agent_pb2.CommandResult | None = None
    """The agent's answer once it came, failed or not (a failed restore names the chunks
    that failed the agent's check)."""


async def run_command(
    running: AgentJob, session: AgentSession, command: agent_pb2.ControllerMessage
) -> agent_pb2.CommandResult:
    """Send the job's command and return the agent's successful result (raise its error)."""
    job = running.record
    if running.cancel_requested:  # cancelled while its command was being prepared
        raise JobCancelled(job_id=job.id)
    running.reply = session.send(command, job.id)
    try:
        result = await running.reply
        running.result = result
    finally:
        running.reply = None
    if not result.ok:
        raise from_proto(result.error)
    if result.warnings:
        job.details["warnings"] = list(result.warnings)
    return result


async def cancel(running: AgentJob, runner: JobRunner, registry: AgentRegistry) -> None:
    """Ask the agent to stop the job; it ends when the agent answers (or the grace is up)."""
    if running.cancel_requested:
        return
    running.cancel_requested = True
    running.record.status = JobStatus.CANCELLING
    await runner.save(running)
    session = registry.session(running.agent_vm)
    if session is not None:
        session.outbox.put_nowait(
            agent_pb2.ControllerMessage(cancel=agent_pb2.CancelCommand(job_id=running.id))
        )
    runner.spawn(_cancel_deadline(running), f"cancel-{running.id}")


async def _cancel_deadline(running: AgentJob) -> None:
    """An agent that does not stop a cancelled job in time is not waited for any more."""
    # Waits for the job's end, not a fixed time: a shutdown waits for this task.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(running.ended.wait(), CANCEL_GRACE_SECONDS)
    if running.reply is not None and not running.reply.done():
        running.reply.set_exception(JobCancelled(job_id=running.id))
