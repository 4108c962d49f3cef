"""A restore drill in the agent: a recovery point's disk restored to scratch, checked, deleted.

The drill agent (the one the vault names) restores the disk as a new image to the path the
controller chose under the vault's drill directory (which must lie in this agent's
`restore_dirs`, and must not exist), times the restore, checks every file system on it
read-only (`agent.fscheck`), and deletes the image, whatever happened: a drill leaves nothing
behind, cancelled or failed. The controller judges the checks and records them on the
recovery point.
"""

from __future__ import annotations

import os
import time

from agent.fscheck import FsCheck, check_image
from agent.restore import RestoreRun


class Drill:
    """One disk's drill."""

    def __init__(self, restore: RestoreRun) -> None:
        self.restore = restore
        self.seconds = 0.0
        self.checks: list[FsCheck] = []

    async def run(self, size: int) -> int:
        """Restore, check, delete; the bytes the restore wrote."""
        restore = self.restore
        started = time.monotonic()
        try:
            written = await restore.run()
            self.seconds = time.monotonic() - started
            fd = restore.open_restored()
            try:
                self.checks = await check_image(fd, size)
            finally:
                os.close(fd)
        finally:
            restore.remove_restored()
        return written
