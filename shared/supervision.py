"""Supervision: the long-lived tasks of a process, and what happens when one of them fails.

A process's background loops (the scheduler, the heartbeat flusher, the backup dispatcher, an
agent's session writer) must never die in silence: a loop that raises and is forgotten stops
scheduling, flushing or dispatching while everything else looks healthy. Every such loop runs
under a `Supervisor` with one of two policies, chosen per task where it is started:

- `RESTART`: the failure is logged with its traceback and the task starts again after a
  backoff (reset once it has run for a while). For loops whose state lives elsewhere (the
  catalog, the plan) and that can pick up where they were.
- `FATAL`: the failure is logged with its traceback and the supervisor's `failed` event is set,
  carrying the error; the process stops with a non-zero exit. For tasks the process cannot
  run without, where limping on would be worse than stopping.

A task that returns normally is done (a loop that ends when asked to). On exit the supervisor
cancels every task and waits for them: no task outlives its owner (STYLE.md: background tasks
are named, owned by a TaskGroup, cancelled and awaited on exit).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

from shared.backoff import Backoff

log = logging.getLogger(__name__)

# A task that ran this long before failing was healthy: its next restart comes quickly.
STABLE_SECONDS = 60.0
RESTART = Backoff(first=0.5, cap=30.0, jitter="equal")


class Policy(enum.Enum):
    RESTART = "restart"
    FATAL = "fatal"


class TaskFailed(Exception):
    """A FATAL task failed; its error is the cause."""

    def __init__(self, name: str, error: BaseException) -> None:
        super().__init__(f"task {name!r} failed: {error!r}")
        self.name = name
        self.error = error


class Supervisor:
    """Named background tasks with a failure policy each; an async context manager."""

    def __init__(self, name: str, *, backoff: Backoff = RESTART) -> None:
        self.name = name
        self._backoff = backoff
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self.failed = asyncio.Event()
        self.failure: TaskFailed | None = None
        self.restarts: dict[str, int] = {}

    async def __aenter__(self) -> Self:
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._group is not None
        for task in self._tasks.values():
            task.cancel()
        try:
            await self._group.__aexit__(exc_type, exc, tb)
        finally:
            self._group = None
            self._tasks.clear()

    def start(
        self,
        name: str,
        work: Callable[[], Awaitable[None]],
        *,
        policy: Policy,
    ) -> asyncio.Task[None]:
        """Run `work()` as the task `name` under `policy`; a name runs once at a time."""
        assert self._group is not None, f"supervisor {self.name} is not running"
        if name in self._tasks and not self._tasks[name].done():
            raise RuntimeError(f"task {name!r} is already running under {self.name}")
        task = self._group.create_task(self._supervise(name, work, policy), name=name)
        self._tasks[name] = task
        return task

    async def stop(self, name: str) -> None:
        """Cancel the task `name` and wait for it to end."""
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _supervise(
        self, name: str, work: Callable[[], Awaitable[None]], policy: Policy
    ) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            started = loop.time()
            try:
                await work()
                return
            except Exception as exc:
                if policy is Policy.FATAL:
                    log.critical("%s: task %s failed; stopping", self.name, name, exc_info=True)
                    if self.failure is None:
                        self.failure = TaskFailed(name, exc)
                    self.failed.set()
                    return
                if loop.time() - started >= STABLE_SECONDS:
                    attempt = 0
                delay = self._backoff.delay(attempt)
                attempt += 1
                self.restarts[name] = self.restarts.get(name, 0) + 1
                log.error(
                    "%s: task %s failed; restarting it in %.1f s",
                    self.name,
                    name,
                    delay,
                    exc_info=True,
                )
                await asyncio.sleep(delay)
