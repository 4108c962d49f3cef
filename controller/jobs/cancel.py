"""Cancelling a job's work: it stops between items, never inside one.

A maintenance job (prune, garbage collection) is cancelled as an asyncio task, by `coffer job
cancel` or by the controller's stop. A task stops at its next await, which may be in the middle
of an item: one recovery point's deletion (its manifest and indexes, then its catalog row), or
a collection running in a thread that the cancel would leave running unseen. So:

- `finishing(work)` lets one item complete before the cancel takes effect;
- `abortable(pool, work)` runs blocking work in a thread and gives it a `check_abort` to call
  before every item (as Proxmox Backup Server's tasks do); a cancel makes the next check raise
  and waits for the thread to stop, so that when the job is recorded `Cancelled` its work has
  really stopped.

Either way the caller sees the cancel (`CancelledError`) once the work has stopped.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")
CheckAbort = Callable[[], None]


class Aborted(Exception):
    """Raised by `check_abort` in an `abortable` thread: its job was cancelled."""


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
        if not inner.cancelled():
            inner.exception()  # retrieved: the cancel is what the caller is told
        raise asyncio.CancelledError
    return inner.result()


async def abortable(pool: Executor, work: Callable[[CheckAbort], T]) -> T:
    """Run `work(check_abort)` in `pool`; a cancel makes `check_abort` raise `Aborted` in the
    thread and waits for `work` to stop before it goes through."""
    stop = threading.Event()

    def check_abort() -> None:
        if stop.is_set():
            raise Aborted

    future = asyncio.get_running_loop().run_in_executor(pool, work, check_abort)
    return await finishing(future, on_cancel=stop.set)
