"""`coffer-controller`: run the controller until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from controller.config import ControllerConfig
from controller.server import Controller
from shared.errors import CofferError


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
    parser = argparse.ArgumentParser(prog="coffer-controller", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="controller TOML file")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(ControllerConfig.load(args.config)))
    except CofferError as exc:
        print(f"coffer-controller: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
