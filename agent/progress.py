"""A job's progress, bytes done of the total, reported over MQTT as it moves."""

from __future__ import annotations

import time

from agent.status import StatusPublisher


class Progress:
    """Bytes done of a job's total; each advance is published (the publisher coalesces)."""

    def __init__(self, status: StatusPublisher | None, job_id: str, total: int) -> None:
        self._status = status
        self._job_id = job_id
        self.total = total
        self.done = 0
        self._started = time.monotonic()

    def advance(self, phase: str, nbytes: int) -> None:
        self.done += nbytes
        if self._status is not None:
            elapsed = max(time.monotonic() - self._started, 1e-6)
            self._status.publish_progress(
                self._job_id, phase, self.done, self.total, self.done / elapsed
            )
