"""The session gate: how many agent sessions start at once, and who must come back later.

Starting a session costs the controller work of its own (the hello checked and written to the
catalog, the session registered, its acceptance written), beyond the TLS handshake gRPC has
done already. When a fleet connects at once (a controller restart, a network that comes back)
every agent asks at the same moment; started all together they would compete for one event
loop and one catalog writer, each would take seconds, keepalive pings would go unanswered and
sessions already started would be cut: the storm feeds itself (issue 13).

So at most `at_once` sessions are being started at a time; the others wait their turn in the
gate (a waiting session is one HTTP/2 stream and one coroutine: cheap). Waiting is better than
refusing, since a refused agent must dial again: a new TLS handshake, the most expensive part.
But a wait has a limit: when the sessions ahead of a new one would take longer than `max_wait`
to start at the rate the controller has been starting them, the new one is refused at once,
before any of its work is done, with `ControllerBusy` and a retry-after: the time those ahead
of it need, and a random part of it again, so that the refused do not come back together. The
agent waits that long (agent/session.py), by which time the gate has room.

When the controller stops, each session is told to return at its own moment within the time a
restarted controller needs to take the fleet back (`return_window`, at `return_rate`;
controller/agent_service.py), so that it meets its fleet at the pace it can take it, not all
at once.

The rate is measured, not configured, and only while sessions queue: the gate's throughput is
what it manages when it has work waiting, so the time between two sessions' starts counts only
when others were waiting all along, over the last `samples` such intervals. A busier machine
refuses earlier and says to come back later. An idle spell says nothing of the rate, and the
first moments of a storm must not read as a slow controller: measured over a fixed window from
the storm's first second (100 sessions in half a second taken as 100 in five), a restart's
fleet was told it would wait 75 s, and 52 of 2,000 agents came back a minute later. Before
there is a measure, the gate assumes `assumed_rate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Final

from shared.backoff import RETRY_JITTER
from shared.errors import ControllerBusy
from shared.rpc_errors import MAX_RETRY_AFTER as AGENT_MAX_RETRY_AFTER

AT_ONCE: Final = 64
MAX_WAIT: Final = 120.0
"""A session waiting in the gate costs the controller almost nothing (its connection is made,
its TLS handshake done), a refused one costs the whole handshake again when it returns: so the
gate lets a storm's sessions wait long. At 30 s, a 10,000-agent storm refused 2,808 sessions
and took 85.6 s to be in session (their retry-afters were most of it); at 120 s none was
refused and it took 24.3 s (tests/bench/fleet)."""
SAMPLES: Final = 256
"""Intervals between starts the rate is taken from: a second or two of a storm."""
ASSUMED_RATE: Final = 200.0
"""Sessions per second a controller starts before it has measured itself (this machine class
measured 500-1,000: tests/bench/fleet.py)."""
MIN_RETRY_AFTER: Final = 1.0
MAX_RETRY_AFTER: Final = MAX_WAIT
"""Bounds of the wait a refusal names; the retry-after is that wait and up to as much again
(within the 300 s an agent honours). A session is refused only when the wait ahead of it is
longer than `MAX_WAIT`, so it is told at least that."""
RETURN_RATE: Final = 400.0
"""Sessions per second a restarted controller takes its fleet back at: the whole of each
session's cost, TLS handshake included, which the gate (after the handshake) cannot measure.
The 2-core test machine took a storm of 10,000 agents dialling at once in 24 s (410 a second)
with the fleet simulator beside it (tests/bench/fleet). A slower controller's gate holds the
excess in its queue (up to `MAX_WAIT`), a faster one loses a few seconds."""
MIN_RETURN: Final = 5.0
"""The earliest a stopping controller tells an agent to come back: a restart takes seconds."""
MAX_RETURN_WINDOW: Final = 240.0
"""The longest a stopping controller spreads its fleet's return over (agents take at most
300 s: shared/rpc_errors.py)."""


@dataclass
class SessionGate:
    at_once: int = AT_ONCE
    max_wait: float = MAX_WAIT
    samples: int = SAMPLES
    assumed_rate: float = ASSUMED_RATE
    return_rate: float = RETURN_RATE
    monotonic: Callable[[], float] = time.monotonic
    rng: Callable[[], float] = random.random
    _waiting: int = 0
    _starting: int = 0
    _intervals: deque[float] = field(init=False)
    _last_start: float | None = None
    """When the last session started, if others were waiting then (the next interval counts)."""
    _turns: asyncio.Semaphore | None = None
    refused: int = 0

    def __post_init__(self) -> None:
        self._intervals = deque(maxlen=self.samples)

    @property
    def waiting(self) -> int:
        """Sessions in the gate: waiting for their turn or being started."""
        return self._waiting + self._starting

    def rate(self) -> float:
        """Sessions started per second while others queued (or the assumed rate)."""
        busy_seconds = sum(self._intervals)
        if len(self._intervals) < self.at_once or busy_seconds <= 0:
            return self.assumed_rate
        return len(self._intervals) / busy_seconds

    def _started(self) -> None:
        """A session has started: measure the interval since the last, if the gate was busy
        all along (others were waiting at the last start and are now)."""
        now = self.monotonic()
        busy = self._waiting > 0
        if busy and self._last_start is not None:
            self._intervals.append(now - self._last_start)
        self._last_start = now if busy else None

    def expected_wait(self) -> float:
        """How long a session arriving now would wait before its turn ends."""
        return (self.waiting + 1) / self.rate()

    def return_schedule(self, back_in: float, sessions: int) -> tuple[float, float]:
        """From when and over how long `sessions` agents sent away together come back: from
        `back_in` (at least `MIN_RETURN`), over `return_window`, all within what an agent
        honours (shared/rpc_errors.py, less its own tenth: shared/backoff.py); a later start
        (a controller slow to start) shortens the window rather than pushing agents past
        that bound, where they would all be cut back to it and return together."""
        limit = AGENT_MAX_RETRY_AFTER / (1.0 + RETRY_JITTER)
        start = min(max(back_in, MIN_RETURN), limit)
        return start, min(self.return_window(sessions), limit - start)

    def return_window(self, sessions: int) -> float:
        """Seconds a restarted controller needs to take `sessions` sessions back at
        `return_rate` (at most `MAX_RETURN_WINDOW`): the window a fleet sent away together
        returns over. Not the gate's measured rate: a storm's sessions reach the gate in bursts
        as their handshakes finish, so the gate measured 1,350 a second in a storm that
        started 80 a second."""
        return min(sessions / self.return_rate, MAX_RETURN_WINDOW)

    @contextlib.asynccontextmanager
    async def starting(self) -> AsyncIterator[None]:
        """Hold one of the `at_once` turns while a session is started; ControllerBusy (with a
        retry-after) at once when the wait would be longer than `max_wait`."""
        wait = self.expected_wait()
        if wait > self.max_wait:
            self.refused += 1
            wait = min(max(wait, MIN_RETRY_AFTER), MAX_RETRY_AFTER)
            raise ControllerBusy(retry_after=wait * (1.0 + self.rng()))
        if self._turns is None:
            self._turns = asyncio.Semaphore(self.at_once)
        self._waiting += 1
        try:
            await self._turns.acquire()
        finally:
            self._waiting -= 1
        self._starting += 1
        try:
            yield
            self._started()
        finally:
            self._starting -= 1
            self._turns.release()
