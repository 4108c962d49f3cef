"""`coffer-controller`: run the controller until SIGINT or SIGTERM, or until a FATAL task fails.

A clean stop exits 0; a controller that cannot start (its state directory or port taken, a bad
config) or whose FATAL task failed prints the error and exits with its code (non-zero).
"""

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
        try:
            await controller.wait(stop)
        finally:
            logging.getLogger(__name__).info("shutting down")


def main(argv: list[str] | None = None) -> int:
    return run_daemon("coffer-controller", __doc__, ControllerConfig.load, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
