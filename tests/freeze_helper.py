"""A stand-in agent for the watchdog tests: arm the watchdog, freeze a mount, then hang.

`python -m tests.freeze_helper MOUNTPOINT DEADLINE [--thaw-and-disarm]` prints `frozen PID`
(the watchdog's PID) once the file system is frozen, then sleeps until killed. With
`--thaw-and-disarm` it thaws and disarms first, and prints `thawed` instead.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from agent.freeze import FreezeState, Mount, MountFreeze
from agent.thaw_watchdog import ThawWatchdog


async def main(mountpoint: Path, deadline: float, thaw: bool) -> None:
    dev = os.stat(mountpoint).st_dev
    mount = Mount(0, (os.major(dev), os.minor(dev)), "/", mountpoint, "unknown", "")
    async with ThawWatchdog(deadline) as watchdog:
        freeze = MountFreeze(mount)
        await watchdog.arm(mountpoint, mount.device)
        assert freeze.freeze(5.0) is FreezeState.FROZEN, freeze.detail
        if thaw:
            freeze.thaw()
            await watchdog.disarm(mountpoint)
            print("thawed", watchdog.pid, flush=True)
        else:
            print("frozen", watchdog.pid, flush=True)
        await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), float(sys.argv[2]), "--thaw-and-disarm" in sys.argv))
