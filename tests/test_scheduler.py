"""The scheduler: the pure `Plan` (due entries, missed slots, replanning, DST) and the thin loop
around it on a manual clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, time

import pytest

from controller.scheduler import Due, Plan, Scheduler
from shared.clock import ManualClock
from shared.policy import Frequency, Schedule, Weekday, parse_schedule

pytestmark = pytest.mark.timeout(30)

HOUR = 3600.0
DAY = 86400.0
WINDOW = 2 * HOUR  # the default schedule window
NIGHTLY = Schedule(Frequency.DAILY, (time(2, 0),))  # 02:00 UTC, 2 h window


def ts(*fields: int) -> float:
    return datetime(*fields, tzinfo=UTC).timestamp()  # type: ignore[arg-type, misc]


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M")


MONDAY_NOON = ts(2025, 3, 3, 12)


# --- the pure plan --------------------------------------------------------------------------


def test_an_empty_plan_never_wakes_and_has_nothing_due() -> None:
    plan = Plan()
    assert plan.next_wakeup() is None
    assert plan.due(MONDAY_NOON) == []
    assert len(plan) == 0


def test_next_wakeup_is_the_earliest_slot_and_nothing_is_due_before_it() -> None:
    plan = Plan()
    plan.set("vm-nightly", NIGHTLY, MONDAY_NOON)
    plan.set("vm-evening", parse_schedule("daily 20:30 tz=UTC"), MONDAY_NOON)
    plan.set("vm-weekly", parse_schedule("weekly sun 03:00 tz=UTC"), MONDAY_NOON)

    assert plan.next_wakeup() == ts(2025, 3, 3, 20, 30)
    assert plan.next_of("vm-nightly") == ts(2025, 3, 4, 2)
    assert plan.next_of("vm-weekly") == ts(2025, 3, 9, 3)
    assert plan.next_of("unknown") is None
    assert plan.due(ts(2025, 3, 3, 20, 29, 59)) == []


def test_a_slot_is_due_once_with_its_window_then_the_next_slot_is_planned() -> None:
    plan = Plan()
    plan.set("vm-1", NIGHTLY, MONDAY_NOON)
    slot = ts(2025, 3, 4, 2)

    assert plan.due(slot) == [Due("vm-1", slot, slot + WINDOW, missed=0)]
    assert plan.due(slot) == []
    assert plan.due(slot + HOUR) == []
    assert plan.next_wakeup() == slot + DAY
    assert plan.next_of("vm-1") == slot + DAY


def test_a_loop_a_little_late_keeps_the_slot_and_its_deadline() -> None:
    plan = Plan()
    plan.set("vm-1", NIGHTLY, MONDAY_NOON)
    slot = ts(2025, 3, 4, 2)
    assert plan.due(slot + 30) == [Due("vm-1", slot, slot + WINDOW, missed=0)]


def test_three_days_down_gives_one_run_for_the_latest_slot_with_a_full_window() -> None:
    plan = Plan()
    plan.set("vm-1", NIGHTLY, MONDAY_NOON)
    back = ts(2025, 3, 6, 10)  # the 02:00 slots of Tue, Wed and Thu passed while down

    assert plan.due(back) == [Due("vm-1", ts(2025, 3, 6, 2), back + WINDOW, missed=2)]
    assert plan.due(back) == []
    assert plan.next_wakeup() == ts(2025, 3, 7, 2)


def test_one_slot_missed_past_its_window_still_runs_once_with_a_window_from_now() -> None:
    # Down from before Tuesday's slot until after its window: nothing earlier was missed,
    # but the run must still get a window that is open, not one that closed hours ago.
    plan = Plan()
    plan.set("vm-1", NIGHTLY, MONDAY_NOON)
    back = ts(2025, 3, 4, 9)

    [due] = plan.due(back)
    assert (due.slot, due.missed) == (ts(2025, 3, 4, 2), 0)
    assert due.deadline == back + WINDOW
    assert plan.next_wakeup() == ts(2025, 3, 5, 2)


def test_a_year_down_collapses_into_one_run() -> None:
    plan = Plan()
    plan.set("vm-1", NIGHTLY, MONDAY_NOON)
    back = ts(2026, 3, 3, 12)
    [due] = plan.due(back)
    assert due.slot == ts(2026, 3, 3, 2)
    assert due.missed > 300  # only logged; the run is one
    assert plan.due(back) == []


def test_removing_an_entry_unplans_it_and_its_old_heap_entry_is_skipped() -> None:
    plan = Plan()
    plan.set("vm-1", NIGHTLY, MONDAY_NOON)
    plan.set("vm-2", parse_schedule("daily 04:00 tz=UTC"), MONDAY_NOON)
    plan.remove("vm-1")
    plan.remove("never-planned")  # harmless

    assert len(plan) == 1
    assert plan.next_of("vm-1") is None
    assert plan.next_wakeup() == ts(2025, 3, 4, 4)
    assert [d.key for d in plan.due(ts(2025, 3, 4, 5))] == ["vm-2"]


def test_setting_an_entry_again_replans_it_and_only_the_new_slot_fires() -> None:
    # A policy edit: 02:00 becomes 05:00; the stale 02:00 entry stays in the heap.
    plan = Plan()
    plan.set("vm-1", NIGHTLY, MONDAY_NOON)
    plan.set("vm-1", parse_schedule("daily 05:00 tz=UTC"), MONDAY_NOON)

    assert len(plan) == 1
    assert plan.next_wakeup() == ts(2025, 3, 4, 5)
    assert plan.due(ts(2025, 3, 4, 2)) == []
    assert plan.due(ts(2025, 3, 4, 5)) == [
        Due("vm-1", ts(2025, 3, 4, 5), ts(2025, 3, 4, 5) + WINDOW, 0)
    ]
    assert plan.next_wakeup() == ts(2025, 3, 5, 5)


def test_removed_then_set_again_fires_once_per_slot() -> None:
    plan = Plan()
    plan.set("vm-1", NIGHTLY, MONDAY_NOON)
    plan.remove("vm-1")
    plan.set("vm-1", NIGHTLY, MONDAY_NOON)
    assert [d.key for d in plan.due(ts(2025, 3, 4, 2))] == ["vm-1"]


def test_many_entries_due_at_once_each_run_once() -> None:
    plan = Plan()
    keys = [f"vm-{n:04d}" for n in range(1000)]
    for key in keys:
        plan.set(key, NIGHTLY, MONDAY_NOON)
    plan.set("vm-later", parse_schedule("daily 03:00 tz=UTC"), MONDAY_NOON)

    due = plan.due(ts(2025, 3, 4, 2, 0, 1))
    assert sorted(d.key for d in due) == keys
    assert {d.slot for d in due} == {ts(2025, 3, 4, 2)}
    assert plan.next_wakeup() == ts(2025, 3, 4, 3)
    assert plan.due(ts(2025, 3, 4, 2, 30)) == []


def test_a_weekly_schedule_collapses_missed_weeks() -> None:
    plan = Plan()
    plan.set("vm-1", Schedule(Frequency.WEEKLY, (time(3, 0),), (Weekday.SUNDAY,)), MONDAY_NOON)
    back = ts(2025, 3, 25, 8)  # Sundays 9, 16 and 23 passed
    [due] = plan.due(back)
    assert (due.slot, due.missed) == (ts(2025, 3, 23, 3), 2)
    assert plan.next_wakeup() == ts(2025, 3, 30, 3)


def test_dst_days_in_berlin_run_each_slot_once_at_the_shifted_time() -> None:
    plan = Plan()
    plan.set("vm-1", parse_schedule("daily 02:30 tz=Europe/Berlin"), ts(2025, 3, 28, 12))
    fired: list[str] = []
    now = ts(2025, 3, 28, 12)
    for _ in range(4):
        wakeup = plan.next_wakeup()
        assert wakeup is not None
        now = wakeup
        fired += [iso(d.slot) for d in plan.due(now)]
    assert fired == [
        "2025-03-29 01:30",  # 02:30 CET
        "2025-03-30 01:30",  # 02:30 does not exist: 03:30 CEST
        "2025-03-31 00:30",  # 02:30 CEST
        "2025-04-01 00:30",
    ]

    plan.set("vm-1", parse_schedule("daily 02:30 tz=Europe/Berlin"), ts(2025, 10, 25, 12))
    fired = []
    for _ in range(2):
        wakeup = plan.next_wakeup()
        assert wakeup is not None
        fired += [iso(d.slot) for d in plan.due(wakeup)]
        # Nothing fires again in the repeated hour.
        assert plan.due(wakeup + HOUR) == []
    assert fired == [
        "2025-10-26 00:30",  # 02:30 CEST, its first occurrence; not again at 02:30 CET
        "2025-10-27 01:30",  # 02:30 CET
    ]


def test_a_controller_down_over_the_dst_change_runs_the_latest_slot_once() -> None:
    plan = Plan()
    plan.set("vm-1", parse_schedule("daily 02:30 tz=Europe/Berlin"), ts(2025, 3, 29, 12))
    back = ts(2025, 3, 31, 12)
    [due] = plan.due(back)
    assert (iso(due.slot), due.missed) == ("2025-03-31 00:30", 1)


# --- the loop ---------------------------------------------------------------------------------


async def settle() -> None:
    """Let the loop run what it can now (a few event-loop turns)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_the_loop_starts_due_entries_once_and_sleeps_between_slots() -> None:
    clock = ManualClock(MONDAY_NOON)
    plan = Plan()
    for key in ("vm-1", "vm-2", "vm-3"):
        plan.set(key, NIGHTLY, MONDAY_NOON)
    plan.set("vm-4", parse_schedule("daily 14:00 tz=UTC"), ts(2025, 3, 3, 14))
    started: list[Due] = []

    async def start(due: Due) -> None:
        started.append(due)

    scheduler = Scheduler(plan, clock, start)
    task = asyncio.create_task(scheduler.run())
    try:
        await settle()
        assert (scheduler.wakeups, started) == (1, [])

        # Real time passes, the manual clock does not: the loop stays asleep.
        await asyncio.sleep(0.2)
        assert scheduler.wakeups == 1

        clock.set(ts(2025, 3, 4, 2))
        scheduler.changed()
        await settle()
        assert scheduler.wakeups == 2
        assert sorted(d.key for d in started) == ["vm-1", "vm-2", "vm-3"]

        await asyncio.sleep(0.2)
        assert scheduler.wakeups == 2

        # Between slots, a change wakes it once and nothing starts.
        clock.set(ts(2025, 3, 4, 10))
        scheduler.changed()
        await settle()
        assert (scheduler.wakeups, len(started)) == (3, 3)

        clock.set(ts(2025, 3, 4, 14))
        scheduler.changed()
        await settle()
        assert [d.key for d in started[3:]] == ["vm-4"]
        assert scheduler.wakeups == 4
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_one_entry_failing_to_start_does_not_stop_the_others() -> None:
    clock = ManualClock(MONDAY_NOON)
    plan = Plan()
    for key in ("vm-bad", "vm-good"):
        plan.set(key, NIGHTLY, MONDAY_NOON)
    started: list[str] = []

    async def start(due: Due) -> None:
        if due.key == "vm-bad":
            raise RuntimeError("its catalog row is unreadable")
        started.append(due.key)

    scheduler = Scheduler(plan, clock, start)
    task = asyncio.create_task(scheduler.run())
    try:
        await settle()
        clock.set(ts(2025, 3, 4, 2))
        scheduler.changed()
        await settle()
        assert started == ["vm-good"]
        # Both are planned on: tomorrow's slot comes for each.
        clock.set(ts(2025, 3, 5, 2))
        scheduler.changed()
        await settle()
        assert started == ["vm-good", "vm-good"]
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
