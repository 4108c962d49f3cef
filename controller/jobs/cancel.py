"""Cancelling a job's work: it stops between items, never inside one.

A maintenance job (prune, garbage collection) is cancelled as an asyncio task, by `coffer job
cancel` or by the controller's stop. A task stops at its next await, which may be in the middle
of an item: one recovery point's deletion (its manifest and indexes, then its catalog row), or
a collection running in a thread that the cancel would leave running unseen. So:

- `finishing(work)` lets one item complete before the cancel takes effect;
- `abortable(pool, work)` runs blocking work in a thread and gives it a `should_stop` to ask
  before every item (as Proxmox Backup Server's tasks check for abort); a cancel makes it say
  yes and waits for the thread to return what it did, which the cancel carries (`Stopped`),
  so a cancelled job can still record its partial work (a collection's freed bytes).

Either way the caller sees the cancel (`CancelledError`) only once the work has stopped.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")
ShouldStop = Callable[[], bool]


class Stopped(asyncio.CancelledError, Generic[T]):
    """The cancel of an `abortable` call, once its work has stopped: `result` is what the work
    returned (what it did until it was asked to stop)."""

    def __init__(self, result: T) -> None:
        super().__init__()
        self.result = result


async def finishing(work: Awaitable[T], *, on_cancel: Callable[[], None] | None = None) -> T:
    """Await `work` to its end even if the caller is cancelled meanwhile, then let the cancel
    through. `on_cancel` is called at the first cancel (to ask the work to stop early)."""
    inner = asyncio.ensure_future(work)
    cancelled = False
    while not inner.done():
        try:
            await asyncio.wait([inner])  # unlike awaiting it, never cancels `inner`
        except asyncio.CancelledError:
            if not cancelled and on_cancel is not None:
                on_cancel()
            cancelled = True
    if cancelled:
        if not inner.cancelled() and inner.exception() is None:
            raise Stopped(inner.result())
        raise asyncio.CancelledError  # what the work raised while stopping is not the news
    return inner.result()


async def abortable(pool: Executor, work: Callable[[ShouldStop], T]) -> T:
    """Run `work(should_stop)` in `pool`; a cancel makes `should_stop()` true and, once `work`
    has returned, goes through as `Stopped` carrying its result."""
    stop = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(pool, work, stop.is_set)
    return await finishing(future, on_cancel=stop.set)
