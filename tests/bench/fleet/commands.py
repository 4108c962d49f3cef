"""What a simulated agent does with a command: the hook dispatch benchmarks replace.

A real agent runs a backup (snapshots, chunks, uploads) and sends one `CommandResult`. The
simulator sends the result at once, without data, so that the controller's dispatch (how
fast commands reach agents, slots, deadlines, queues) is measured and nothing else. A hook is
any `async (message) -> CommandResult | None`; None sends no result at all (an agent that
accepted a command and went silent).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeAlias

from shared.rpc import agent_pb2, common_pb2

CommandHook: TypeAlias = Callable[
    [agent_pb2.ControllerMessage], Awaitable[agent_pb2.CommandResult | None]
]

# The failure a simulated agent reports: a code no Coffer error has (the controller records
# such a code as `InternalError` with the agent's message), and a message that names the
# simulator (`SAID`), so a simulated job can never be mistaken for a real failure.
NO_DATA = "FleetSimulatorNoData"
SAID = "the fleet simulator's agent ran no"


def answer(outcome: str = "fail", delay: float = 0.0) -> CommandHook:
    """A hook that answers every command after `delay` seconds: `fail` with
    `FleetSimulatorNoData`, `done` with ok and nothing backed up, `silent` never."""

    async def hook(message: agent_pb2.ControllerMessage) -> agent_pb2.CommandResult | None:
        kind = message.WhichOneof("kind") or "command"
        if delay:
            await asyncio.sleep(delay)
        if outcome == "silent":
            return None
        result = agent_pb2.CommandResult(
            command_id=message.command_id, job_id=getattr(message, kind).job_id
        )
        if outcome == "done":
            result.ok = True
        else:
            result.error.CopyFrom(
                common_pb2.Error(
                    code=NO_DATA,
                    message=f"{SAID} {kind}: it answers without data",
                )
            )
        return result

    return hook
