"""`coffer-controller`: run the controller until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from controller.config import ControllerConfig
from controller.server import Controller
from shared.daemon import run_daemon


async def serve(config: ControllerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with Controller(config).running() as controller:
        # One line a supervisor or test can wait for.
        print(f"coffer-controller ready on port {controller.port}", flush=True)
        await stop.wait()
        logging.getLogger(__name__).info("shutting down")


def main(argv: list[str] | None = None) -> int:
    return run_daemon("coffer-controller", __doc__, ControllerConfig.load, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
