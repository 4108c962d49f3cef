"""The session gate: how fast the controller starts sessions, measured only while they queue,
and who is told to come back later."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from controller.session_gate import MAX_RETRY_AFTER, MAX_RETURN_WINDOW, MIN_RETURN, SessionGate
from shared.backoff import RETRY_JITTER
from shared.errors import ControllerBusy
from shared.rpc_errors import MAX_RETRY_AFTER as AGENT_MAX_RETRY_AFTER

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Storm:
    """Sessions in the gate, each started when the test says (its work "done")."""

    def __init__(self, gate: SessionGate) -> None:
        self.gate = gate
        self.tasks: list[asyncio.Task[None]] = []
        self.done: list[asyncio.Event] = []
        self.refused: list[ControllerBusy] = []

    async def arrive(self, n: int) -> None:
        for _ in range(n):
            done = asyncio.Event()
            self.done.append(done)
            self.tasks.append(asyncio.create_task(self._session(done)))
        await settle()

    async def _session(self, done: asyncio.Event) -> None:
        try:
            async with self.gate.starting():
                await done.wait()
        except ControllerBusy as busy:
            self.refused.append(busy)

    async def start(self, n: int, every: float, clock: Clock) -> None:
        """Let the next `n` sessions finish starting, one each `every` seconds."""
        pending = [d for d in self.done if not d.is_set()][:n]
        for done in pending:
            clock.now += every
            done.set()
            await settle()

    async def finish(self) -> None:
        for done in self.done:
            done.set()
        await asyncio.gather(*self.tasks)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_the_first_moments_of_a_storm_do_not_read_as_a_slow_controller() -> None:
    """Seen (issue 13, a 2,000-agent restart): the rate was taken over a fixed 5 s window from
    the storm's first second, so 100 sessions started in half a second read as 20 a second,
    1,500 waiting agents as a 75 s wait, and newcomers were sent away for 30-60 s."""
    clock = Clock()
    gate = SessionGate(at_once=64, monotonic=clock)
    storm = Storm(gate)
    await storm.arrive(1500)
    assert storm.refused == []
    await storm.start(100, every=0.005, clock=clock)  # 200 a second, half a second in
    assert gate.rate() == pytest.approx(200, rel=0.01)
    await storm.arrive(500)  # the rest of the fleet: 1,900 ahead of the last, 9.5 s
    assert storm.refused == [], [busy.retry_after for busy in storm.refused]
    await storm.finish()


async def test_a_controller_slow_while_busy_refuses_with_the_time_those_ahead_need() -> None:
    clock = Clock()
    gate = SessionGate(at_once=4, max_wait=20.0, monotonic=clock)
    storm = Storm(gate)
    await storm.arrive(200)
    await storm.start(100, every=0.25, clock=clock)  # 4 a second
    assert gate.rate() == pytest.approx(4.0)
    assert gate.expected_wait() == pytest.approx((200 - 100 + 1) / 4.0)  # 25 s
    await storm.arrive(1)
    (busy,) = storm.refused
    # What those ahead of it need, and up to as much again.
    assert 101 / 4.0 <= busy.retry_after <= 2 * 101 / 4.0
    await storm.arrive(300)  # refused, they add nothing to the wait
    told = [b.retry_after for b in storm.refused]
    assert len(told) == 301
    assert all(101 / 4.0 <= after <= 2 * 101 / 4.0 for after in told)
    # Spread by the controller: refused together, they do not come back together (the agent
    # adds only a tenth: shared/backoff.py). No second of that window gets more than a few
    # times its share (301 over 25 s: 12 a second).
    per_second = Counter(int(after) for after in told)
    assert len(per_second) >= 20, per_second
    assert max(per_second.values()) <= 36, per_second
    await storm.start(20, every=5.0, clock=clock)  # slower still: about one a second
    await storm.arrive(1)
    # Never told to stay away longer than the cap and its spread.
    assert MAX_RETRY_AFTER <= storm.refused[-1].retry_after <= 2 * MAX_RETRY_AFTER
    await storm.finish()


def test_a_fleet_returns_over_the_time_the_gate_needs_to_start_it() -> None:
    gate = SessionGate(return_rate=200.0)
    assert gate.return_window(10_000) == pytest.approx(50.0)
    assert gate.return_window(0) == 0.0
    assert gate.return_window(10_000_000) == MAX_RETURN_WINDOW  # agents honour at most 300 s


def test_agents_are_never_told_more_than_they_honour() -> None:
    """An agent cuts a retry-after to 300 s: a fleet told more would come back together
    at 300 s. A controller slow to start shortens the window instead."""
    gate = SessionGate(return_rate=10.0)
    limit = AGENT_MAX_RETRY_AFTER / (1 + RETRY_JITTER)
    assert gate.return_schedule(2.0, 100) == (MIN_RETURN, 10.0)  # never sooner than 5 s
    start, window = gate.return_schedule(200.0, 100_000)  # 240 s window, 200 s start
    assert start == 200.0
    assert start + window == pytest.approx(limit)
    assert gate.return_schedule(1_000.0, 100) == (pytest.approx(limit), 0.0)


async def test_idle_spells_are_not_counted_as_slowness() -> None:
    """Sessions that start one at a time, minutes apart, say nothing of the rate: a storm
    after a quiet hour is measured afresh, from the assumed rate."""
    clock = Clock()
    gate = SessionGate(at_once=4, assumed_rate=200.0, monotonic=clock)
    storm = Storm(gate)
    for _ in range(100):
        await storm.arrive(1)
        await storm.start(1, every=60.0, clock=clock)
    assert gate.rate() == 200.0
    # A busy spell, then a quiet hour, then a storm: only the busy intervals count.
    await storm.arrive(70)
    await storm.start(70, every=0.01, clock=clock)
    assert gate.rate() == pytest.approx(100.0)
    clock.now += 3600
    await storm.arrive(5)
    await storm.start(5, every=0.01, clock=clock)
    assert gate.rate() == pytest.approx(100.0)
    await storm.finish()
