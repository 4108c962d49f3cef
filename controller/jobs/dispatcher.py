"""The backup dispatcher: the one long-lived loop that starts queued backups and expires late ones.

It is woken by the events that can change its answer (`kick`: a backup queued, ended or put
back, an agent connected or heard from again after a silence, a vault's limit changed) and by
the nearest deadline; it never walks the items of a vault on a timer. At each wakeup it asks
every vault's queue for a decision (queue.py) and hands the backups to start and to expire
to its two callbacks, which start their tasks and return at once. The loop never awaits a
job, so nothing (a slow catalog write, a cancel arriving meanwhile, a backup queued in
another vault) can change a queue while it looks at it.

`run` is meant for a `Supervisor` with the RESTART policy (the job manager starts it so): if it
ever fails, the failure is logged with its traceback and the loop starts again; its state is
in the queues, which a restart keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Generic

from controller.jobs.queue import VaultQueue, W
from shared.clock import Clock

DEFAULT_LIMIT = 1
"""A vault's concurrent backups until its own limit is known."""


class Dispatcher(Generic[W]):
    def __init__(
        self,
        clock: Clock,
        online: Callable[[str], bool],
        start: Callable[[W], None],
        expire: Callable[[W, bool], None],
    ) -> None:
        self._clock = clock
        self._online = online
        self._start = start
        self._expire = expire
        self._queues: dict[str, VaultQueue[W]] = {}
        self._kick = asyncio.Event()
        self.passes = 0

    def queue(self, vault: str) -> VaultQueue[W]:
        return self._queues.setdefault(vault, VaultQueue(DEFAULT_LIMIT))

    def enqueue(self, vault: str, backup: W, limit: int) -> None:
        queue = self.queue(vault)
        queue.limit = limit
        queue.add(backup)
        self.kick()

    def put_back(self, vault: str, backup: W) -> None:
        """A backup taken from its queue did not begin (its agent left first): it waits again,
        first in its queue."""
        self.queue(vault).put_back(backup)
        self.kick()

    def withdraw(self, vault: str, backup: W) -> bool:
        """Take a queued backup out of its queue; False if it started or expired already."""
        return vault in self._queues and self._queues[vault].withdraw(backup)

    def set_limit(self, vault: str, limit: int) -> None:
        """A vault's concurrent backups changed: queued backups may start now."""
        self.queue(vault).limit = limit
        self.kick()

    def ended(self, vault: str) -> None:
        """A backup the dispatcher started has ended: its slot is free."""
        self.queue(vault).ended()
        self.kick()

    def kick(self) -> None:
        """Wake the loop: something that can start or expire a queued backup changed."""
        self._kick.set()

    def dispatch(self) -> float | None:
        """One pass over every queue: start and expire what is due. Returns the seconds until
        the nearest deadline of what still waits (None: nothing waits)."""
        self.passes += 1
        now = self._clock.now()
        nearest: float | None = None
        for queue in list(self._queues.values()):
            decision = queue.take(now, self._online)
            for expired in decision.expired:
                self._expire(expired.backup, expired.agent_online)
            for backup in decision.start:
                self._start(backup)
            if decision.next_deadline is not None and (
                nearest is None or decision.next_deadline < nearest
            ):
                nearest = decision.next_deadline
        return None if nearest is None else max(nearest - now, 0.0)

    async def run(self) -> None:
        while True:
            self._kick.clear()
            wait = self.dispatch()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), wait)
