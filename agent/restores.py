"""Restore commands: which way back a `RestoreCommand` asks for, and what it reports.

- a new image (`agent.restore`): under the agent's `restore_dirs`, never over an existing
  target without `overwrite`, never over a configured disk or anything in use;
- in place (`agent.rollback`): the configured disk named in the command, only the chunks that
  differ fetched;
- a drill (`agent.drill`): a new image in scratch space, checked read-only, deleted.

Each reports what it compared, fetched and wrote, how long it took and, for a drill, what the
file system checks found (`RestoreResult`).
"""

from __future__ import annotations

import time

from agent.drill import Drill
from agent.restore import RestoreRun
from agent.rollback import Rollback
from agent.runtime import Runtime
from shared.rpc import agent_pb2


async def restore(runtime: Runtime, command: agent_pb2.RestoreCommand) -> agent_pb2.RestoreResult:
    """Carry out a restore command; what it did."""
    started = time.monotonic()
    checks = []
    run: RestoreRun
    if command.mode == agent_pb2.RESTORE_MODE_IN_PLACE:
        rollback = run = Rollback(runtime, command)
        await rollback.run()
        seconds = time.monotonic() - started
        target = str(rollback.disk_path)
    elif command.mode == agent_pb2.RESTORE_MODE_DRILL:
        # A drill never replaces anything: its scratch image is new.
        plain = agent_pb2.RestoreCommand()
        plain.CopyFrom(command)
        plain.overwrite = False
        run = RestoreRun(runtime, plain)
        drill = Drill(run)
        await drill.run(command.size_bytes)
        seconds, checks, target = drill.seconds, drill.checks, command.target_path
    else:
        run = RestoreRun(runtime, command)
        await run.run()
        seconds, target = time.monotonic() - started, command.target_path
    return agent_pb2.RestoreResult(
        bytes_compared=run.bytes_compared,
        bytes_fetched=run.bytes_fetched,
        bytes_written=run.bytes_written,
        seconds=seconds,
        target_path=target,
        checks=[check.to_proto() for check in checks],
    )
