"""Supervised tasks and the shared backoff: failures are logged and acted on, never dropped."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shared.backoff import Backoff
from shared.supervision import Policy, Supervisor

pytestmark = pytest.mark.timeout(20)


def test_full_jitter_spans_zero_to_the_ceiling() -> None:
    backoff = Backoff(first=0.5, cap=30.0)
    assert backoff.delay(0, rng=lambda: 0.0) == 0.0
    assert backoff.delay(0, rng=lambda: 1.0) == pytest.approx(0.5)
    assert backoff.delay(3, rng=lambda: 1.0) == pytest.approx(4.0)
    assert backoff.delay(10_000, rng=lambda: 1.0) == pytest.approx(30.0)  # no overflow


def test_equal_jitter_never_retries_at_once() -> None:
    backoff = Backoff(first=1.0, cap=8.0, jitter="equal")
    assert backoff.delay(0, rng=lambda: 0.0) == pytest.approx(0.5)
    assert backoff.delay(5, rng=lambda: 0.0) == pytest.approx(4.0)
    delays = backoff.delays(rng=lambda: 1.0)
    assert [next(delays) for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]


async def test_a_failing_restart_task_is_logged_and_started_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs = 0
    third = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError(f"boom {runs}")
        third.set()
        await asyncio.Event().wait()

    caplog.set_level(logging.ERROR)
    async with Supervisor("test", backoff=Backoff(first=0.01, cap=0.02)) as supervisor:
        supervisor.start("flaky", flaky, policy=Policy.RESTART)
        await asyncio.wait_for(third.wait(), 5)
        assert supervisor.restarts == {"flaky": 2}
        assert not supervisor.failed.is_set()
    failures = [r for r in caplog.records if "task flaky failed" in r.getMessage()]
    assert len(failures) == 2
    assert all(r.exc_info is not None for r in failures)  # with the traceback


async def test_a_failing_fatal_task_stops_its_owner_with_the_error() -> None:
    async def broken() -> None:
        raise ValueError("the flusher cannot write")

    async def healthy() -> None:
        await asyncio.Event().wait()

    async with Supervisor("test") as supervisor:
        other = supervisor.start("healthy", healthy, policy=Policy.RESTART)
        supervisor.start("broken", broken, policy=Policy.FATAL)
        await asyncio.wait_for(supervisor.failed.wait(), 5)
        assert supervisor.failure is not None
        assert supervisor.failure.name == "broken"
        assert isinstance(supervisor.failure.error, ValueError)
    # Leaving the supervisor cancelled and awaited every task.
    assert other.cancelled()


async def test_a_task_that_returns_is_not_restarted() -> None:
    calls = 0

    async def once() -> None:
        nonlocal calls
        calls += 1

    async with Supervisor("test") as supervisor:
        task = supervisor.start("once", once, policy=Policy.RESTART)
        await task
    assert calls == 1
