"""Backoff: how long to wait before trying again, the one helper every retry loop uses.

Exponential with jitter, so that many clients that failed at the same moment (a fleet of agents
after a controller restart, a broker coming back) do not come back in the same instant:

- `full` jitter: uniform in [0, ceiling]. Spreads a storm the widest; the default for
  reconnecting agents (AWS's "Exponential Backoff And Jitter" measured it best for contention).
- `equal` jitter: uniform in [ceiling/2, ceiling]. Never retries at once; for a single client
  restarting a child process or rejoining a broker, where a zero wait would only spin.

where ceiling = min(cap, first * 2**attempt). The exponent is bounded, so a loop that retries
for days never overflows a float.

A server that refuses because it is busy, or ends a session because it stops, may say when to
come back (a retry-after). The server spreads the clients it sends away: it knows how many it
refused or ended and how fast it can take them back, so each is told its own moment (the
controller: controller/session_gate.py, controller/agent_service.py). `after_refusal` waits that
long, and up to a tenth of it again (`RETRY_JITTER`), only so that clients told the same moment
do not dial in the same millisecond. (Until issue 13's restart pacing the client spread alone,
over [R, 2R]: a fleet told to come back after the controller's restart then returned over a
window as long as the restart, however many agents it held.)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

_MAX_EXPONENT = 32
RETRY_JITTER = 0.1
"""The part of a retry-after a client adds at random: the server has spread its clients."""


@dataclass(frozen=True)
class Backoff:
    """A retry schedule: `delay(attempt)` for attempt 0, 1, 2, ... (0 is the first retry)."""

    first: float
    cap: float
    jitter: Literal["full", "equal"] = "full"

    def ceiling(self, attempt: int) -> float:
        return min(self.cap, self.first * 2.0 ** min(max(attempt, 0), _MAX_EXPONENT))

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        ceiling = self.ceiling(attempt)
        if self.jitter == "equal":
            return ceiling / 2 + rng() * ceiling / 2
        return rng() * ceiling

    def delays(self, rng: Callable[[], float] = random.random) -> Iterator[float]:
        """The delays of attempts 0, 1, 2, ... for ever."""
        attempt = 0
        while True:
            yield self.delay(attempt, rng)
            attempt = min(attempt + 1, _MAX_EXPONENT)


def after_refusal(
    delay: float, retry_after: float | None, rng: Callable[[], float] = random.random
) -> float:
    """The wait before the next attempt: the backoff's `delay`, or when the server said to
    come back after `retry_after` seconds, that: uniform in [retry_after, retry_after *
    (1 + RETRY_JITTER)] (never shorter than `delay`)."""
    if retry_after is None:
        return delay
    return max(delay, retry_after * (1.0 + RETRY_JITTER * rng()))
