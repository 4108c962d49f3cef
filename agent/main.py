"""`coffer-agent`: the in-guest backup extension; runs until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

from agent.config import AgentConfig
from agent.session import Agent
from shared.daemon import run_daemon


async def serve(config: AgentConfig) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await Agent(config).run()


def main(argv: list[str] | None = None) -> int:
    return run_daemon("coffer-agent", __doc__, AgentConfig.load, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
