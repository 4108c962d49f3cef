"""A job's progress, bytes done of the total, reported over MQTT as it moves."""

from __future__ import annotations

import time

from agent.status import StatusPublisher

# Progress is for people watching a bar: a few updates a second. Publishing one per chunk
# cost the controller a tenth of its CPU in MQTT parsing (measured on the benchmark).
PUBLISH_INTERVAL = 0.25


class Progress:
    """Bytes done of a job's total, published a few times a second and when complete."""

    def __init__(self, status: StatusPublisher | None, job_id: str, total: int) -> None:
        self._status = status
        self._job_id = job_id
        self.total = total
        self.done = 0
        self._started = self._published = time.monotonic()

    def advance(self, phase: str, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self._status is None or (
            now - self._published < PUBLISH_INTERVAL and self.done < self.total
        ):
            return
        self._published = now
        rate = self.done / max(now - self._started, 1e-6)
        self._status.publish_progress(self._job_id, phase, self.done, self.total, rate)
