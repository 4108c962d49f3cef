"""The scheduler: when each protected VM's next backup (and each vault's maintenance) is due.

`Plan` is pure: it holds each entry's schedule and the last slot it ran, and answers two
questions for a time it is given: which entries are due now (`due`) and when the next one will
be (`next_wakeup`). Entries sit in a heap keyed by their next slot, so between slots nothing
runs: the loop sleeps until the heap's head, and work per wakeup is proportional to the entries
due then, not to the number of protected VMs.

Missed slots collapse: an entry whose last slot is days old (the controller was down) is due
once, for its most recent slot, and plans its next slot after now. `Scheduler` is the thin loop
around a `Plan`: it sleeps until the next slot or until the plan changes, and hands each due
entry to a callback that records and starts the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from shared.clock import Clock
from shared.policy import Schedule

log = logging.getLogger(__name__)

# The loop re-checks its clock at least this often, so a wall clock stepped backwards or
# forwards (NTP, suspend) cannot keep it asleep past a slot for long.
MAX_SLEEP_SECONDS = 600.0


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@dataclass(frozen=True)
class Due:
    """An entry whose slot has come: run it, and give up if it cannot start by `deadline`."""

    key: str
    slot: float
    deadline: float
    missed: int  # earlier slots that passed without a run (the controller was down)


@dataclass(order=True)
class _Entry:
    when: float
    key: str = field(compare=False)
    version: int = field(compare=False)


@dataclass
class _Planned:
    schedule: Schedule
    last_slot: float
    version: int


class Plan:
    """Pure: schedules and last slots in, due entries and the next wakeup out."""

    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._planned: dict[str, _Planned] = {}
        self._versions = 0

    def __len__(self) -> int:
        return len(self._planned)

    def set(self, key: str, schedule: Schedule, last_slot: float) -> None:
        """Plan `key` on `schedule`; it has run (or was set up) at `last_slot`."""
        self._versions += 1
        planned = _Planned(schedule, last_slot, self._versions)
        self._planned[key] = planned
        nxt = schedule.next_run_after(_at(last_slot)).timestamp()
        heapq.heappush(self._heap, _Entry(nxt, key, planned.version))

    def remove(self, key: str) -> None:
        # The heap entry stays and is skipped when it surfaces (its version is stale).
        self._planned.pop(key, None)

    def next_of(self, key: str) -> float | None:
        """When `key` is next due (None if it is not planned)."""
        planned = self._planned.get(key)
        if planned is None:
            return None
        return planned.schedule.next_run_after(_at(planned.last_slot)).timestamp()

    def next_wakeup(self) -> float | None:
        """When the earliest entry is due; None when nothing is planned."""
        self._drop_stale()
        return self._heap[0].when if self._heap else None

    def due(self, now: float) -> list[Due]:
        """Entries due at `now`, each once (missed slots collapse), planned on past `now`."""
        ready: list[Due] = []
        while True:
            self._drop_stale()
            if not self._heap or self._heap[0].when > now:
                return ready
            entry = heapq.heappop(self._heap)
            planned = self._planned[entry.key]
            schedule = planned.schedule
            latest = schedule.last_run_at_or_before(_at(now))
            slot = latest.timestamp() if latest is not None else entry.when
            missed = 0
            probe = entry.when
            while probe < slot:
                missed += 1
                probe = schedule.next_run_after(_at(probe)).timestamp()
                if missed > 1000:  # a very long outage: the count is only for the log
                    break
            window = schedule.window.total_seconds()
            # A slot missed while the controller was down (earlier slots passed, or this one's
            # window closed before it was looked at) gets a full window from now.
            deadline = slot + window
            if missed or now >= deadline:
                deadline = max(deadline, now + window)
            ready.append(Due(entry.key, slot, deadline, missed))
            planned.last_slot = slot
            nxt = schedule.next_run_after(_at(max(slot, now))).timestamp()
            heapq.heappush(self._heap, _Entry(nxt, entry.key, planned.version))

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap:
            head = heap[0]
            planned = self._planned.get(head.key)
            if planned is not None and planned.version == head.version:
                return
            heapq.heappop(heap)


class Scheduler:
    """The loop around a `Plan`: sleeps until a slot (or a change), then starts what is due."""

    def __init__(self, plan: Plan, clock: Clock, start: Callable[[Due], Awaitable[None]]) -> None:
        self.plan = plan
        self._clock = clock
        self._start = start
        self._changed = asyncio.Event()
        self.wakeups = 0
        # How late the latest slot was started, in seconds (a metric: a loop that falls behind,
        # a blocked event loop, a clock stepped forward).
        self.lag = 0.0

    def changed(self) -> None:
        """The plan changed (or a test moved the clock): look again."""
        self._changed.set()

    async def run(self) -> None:
        while True:
            self._changed.clear()
            self.wakeups += 1
            now = self._clock.now()
            for due in self.plan.due(now):
                if not due.missed:  # a slot missed while the controller was down is not lag
                    self.lag = max(now - due.slot, 0.0)
                try:
                    await self._start(due)
                except Exception:
                    # One VM's trouble must not stop every other VM's schedule.
                    log.exception("scheduled run of %s at %s failed to start", due.key, due.slot)
            wakeup = self.plan.next_wakeup()
            sleep = MAX_SLEEP_SECONDS
            if wakeup is not None:
                sleep = min(max(wakeup - self._clock.now(), 0.0), MAX_SLEEP_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), sleep)
