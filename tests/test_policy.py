"""Backup policies: schedule slots (across DST), validation messages, JSON and text forms."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from shared.errors import CofferError, InvalidArgument, InvalidPolicy
from shared.policy import (
    DailyRule,
    Frequency,
    MonthlyRule,
    Policy,
    Retention,
    Schedule,
    Weekday,
    WeeklyRule,
    WeekOfMonth,
    YearlyRule,
    default_policy,
    parse_daily_rule,
    parse_monthly_rule,
    parse_retention,
    parse_schedule,
    parse_weekly_rule,
    parse_yearly_rule,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)  # type: ignore[arg-type, misc]


def slots(schedule: Schedule, after: datetime, count: int) -> list[datetime]:
    found = []
    for _ in range(count):
        after = schedule.next_run_after(after)
        found.append(after)
    return found


# --- weekdays ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["sun", "Sun", "SUN", "sunday", "Sunday", " sun "])
def test_weekday_parse_accepts_short_and_long_names(text: str) -> None:
    assert Weekday.parse(text) is Weekday.SUNDAY


def test_weekdays_are_numbered_as_python_dates() -> None:
    assert date(2024, 1, 1).weekday() == Weekday.MONDAY  # 2024-01-01 was a Monday
    assert date(2024, 1, 7).weekday() == Weekday.SUNDAY


@pytest.mark.parametrize("text", ["", "su", "sonntag", "7"])
def test_weekday_parse_refuses_other_words(text: str) -> None:
    with pytest.raises(InvalidPolicy, match="is not a weekday: use mon, tue"):
        Weekday.parse(text)


# --- daylight saving time -------------------------------------------------------------------
# Europe/Berlin 2024: 02:00 CET -> 03:00 CEST on Mar 31, 03:00 CEST -> 02:00 CET on Oct 27.
# America/New_York 2024: 02:00 EST -> 03:00 EDT on Mar 10, 02:00 EDT -> 01:00 EST on Nov 3.


def test_berlin_spring_forward_runs_a_missing_time_once_an_hour_later() -> None:
    schedule = parse_schedule("daily 02:30 tz=Europe/Berlin")
    assert slots(schedule, utc(2024, 3, 29), 4) == [
        utc(2024, 3, 29, 1, 30),  # 02:30 CET
        utc(2024, 3, 30, 1, 30),  # 02:30 CET
        utc(2024, 3, 31, 1, 30),  # 02:30 does not exist: 03:30 CEST
        utc(2024, 4, 1, 0, 30),  # 02:30 CEST
    ]
    assert utc(2024, 3, 31, 1, 30).astimezone(BERLIN).time() == time(3, 30)


def test_berlin_fall_back_runs_a_repeated_time_once_at_its_first_occurrence() -> None:
    schedule = parse_schedule("daily 02:30 tz=Europe/Berlin")
    assert slots(schedule, utc(2024, 10, 25), 4) == [
        utc(2024, 10, 25, 0, 30),  # 02:30 CEST
        utc(2024, 10, 26, 0, 30),
        utc(2024, 10, 27, 0, 30),  # the first 02:30 (CEST), not the second at 01:30Z
        utc(2024, 10, 28, 1, 30),  # 02:30 CET
    ]


def test_new_york_spring_forward_and_fall_back() -> None:
    spring = parse_schedule("daily 02:30 tz=America/New_York")
    assert slots(spring, utc(2024, 3, 9), 3) == [
        utc(2024, 3, 9, 7, 30),  # 02:30 EST
        utc(2024, 3, 10, 7, 30),  # 02:30 does not exist: 03:30 EDT
        utc(2024, 3, 11, 6, 30),  # 02:30 EDT
    ]
    fall = parse_schedule("daily 00:30,01:30,02:30 tz=America/New_York window=30m")
    assert slots(fall, utc(2024, 11, 3, 4), 5) == [
        utc(2024, 11, 3, 4, 30),  # 00:30 EDT
        utc(2024, 11, 3, 5, 30),  # 01:30 EDT; 01:30 EST (06:30Z) is not run again
        utc(2024, 11, 3, 7, 30),  # 02:30 EST
        utc(2024, 11, 4, 5, 30),  # 00:30 EST
        utc(2024, 11, 4, 6, 30),
    ]


def test_a_shifted_time_that_lands_on_another_slot_runs_once() -> None:
    # On Mar 31, 02:30 becomes 03:30 CEST: the same instant as the 03:30 slot.
    schedule = parse_schedule("daily 01:30,02:30,03:30 tz=Europe/Berlin window=30m")
    assert slots(schedule, utc(2024, 3, 31), 3) == [
        utc(2024, 3, 31, 0, 30),  # 01:30 CET
        utc(2024, 3, 31, 1, 30),  # 03:30 CEST, for both 02:30 and 03:30
        utc(2024, 3, 31, 23, 30),  # Apr 1, 01:30 CEST
    ]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York"])
def test_a_year_of_slots_has_no_gap_and_no_duplicate(zone: str) -> None:
    schedule = parse_schedule(f"daily 00:30,01:30,02:30,03:30 tz={zone} window=30m")
    tz = ZoneInfo(zone)
    year = list(
        schedule.runs_between(datetime(2024, 1, 1, tzinfo=tz), datetime(2025, 1, 1, tzinfo=tz))
    )
    assert all(a < b for a, b in itertools.pairwise(year))
    # 366 days of 4 runs, less one on the spring-forward day where 02:30 is 03:30.
    assert len(year) == 366 * 4 - 1
    runs_per_day: dict[date, int] = {}
    for slot in year:
        day = slot.astimezone(tz).date()
        runs_per_day[day] = runs_per_day.get(day, 0) + 1
    spring_forward = date(2024, 3, 31) if zone == "Europe/Berlin" else date(2024, 3, 10)
    assert {day: n for day, n in runs_per_day.items() if n != 4} == {spring_forward: 3}
    assert len(runs_per_day) == 366


# --- next and last runs -----------------------------------------------------------------------


def test_next_is_strictly_after_and_last_is_at_or_before() -> None:
    schedule = parse_schedule("daily 02:00,14:00 tz=UTC")
    assert schedule.next_run_after(utc(2024, 5, 1, 2)) == utc(2024, 5, 1, 14)
    assert schedule.next_run_after(utc(2024, 5, 1, 1, 59)) == utc(2024, 5, 1, 2)
    assert schedule.last_run_at_or_before(utc(2024, 5, 1, 14)) == utc(2024, 5, 1, 14)
    assert schedule.last_run_at_or_before(utc(2024, 5, 1, 13, 59)) == utc(2024, 5, 1, 2)
    assert schedule.last_run_at_or_before(utc(2024, 5, 1, 1)) == utc(2024, 4, 30, 14)
    # Any aware time works; the answer is UTC.
    answer = schedule.next_run_after(datetime(2024, 5, 1, 3, tzinfo=BERLIN))  # 01:00Z
    assert answer == utc(2024, 5, 1, 2)
    assert answer.tzinfo is UTC


def test_weekly_schedule_runs_on_its_days_only() -> None:
    schedule = parse_schedule("weekly sun,wed 03:00 tz=UTC")
    # 2024-01-01 was a Monday.
    assert slots(schedule, utc(2024, 1, 1), 4) == [
        utc(2024, 1, 3, 3),
        utc(2024, 1, 7, 3),
        utc(2024, 1, 10, 3),
        utc(2024, 1, 14, 3),
    ]
    assert schedule.last_run_at_or_before(utc(2024, 1, 6, 12)) == utc(2024, 1, 3, 3)


def test_weekly_schedule_looks_a_whole_week_ahead_and_back() -> None:
    schedule = parse_schedule("weekly sun 03:00 tz=Europe/Berlin")
    sunday = utc(2024, 6, 2, 1)  # 03:00 CEST on Sunday, June 2
    assert schedule.next_run_after(sunday) == utc(2024, 6, 9, 1)
    assert schedule.next_run_after(sunday - timedelta(minutes=1)) == sunday
    assert schedule.last_run_at_or_before(sunday - timedelta(minutes=1)) == utc(2024, 5, 26, 1)


def test_next_and_last_across_the_year_boundary() -> None:
    weekly = parse_schedule("weekly sun 03:00 tz=Europe/Berlin")
    assert weekly.next_run_after(utc(2024, 12, 30)) == utc(2025, 1, 5, 2)
    assert weekly.last_run_at_or_before(utc(2025, 1, 4)) == utc(2024, 12, 29, 2)
    late = parse_schedule("daily 23:30 tz=Europe/Berlin")
    assert slots(late, utc(2024, 12, 31, 22), 2) == [
        utc(2024, 12, 31, 22, 30),
        utc(2025, 1, 1, 22, 30),
    ]
    assert late.last_run_at_or_before(utc(2025, 1, 1, 12)) == utc(2024, 12, 31, 22, 30)


def test_next_and_last_around_february_29() -> None:
    daily = parse_schedule("daily 12:00 tz=UTC")
    assert daily.next_run_after(utc(2024, 2, 28, 12)) == utc(2024, 2, 29, 12)
    assert daily.next_run_after(utc(2025, 2, 28, 12)) == utc(2025, 3, 1, 12)
    assert daily.last_run_at_or_before(utc(2024, 3, 1, 11)) == utc(2024, 2, 29, 12)
    thursdays = parse_schedule("weekly thu 12:00 tz=UTC")  # 2024-02-29 was a Thursday
    assert thursdays.next_run_after(utc(2024, 2, 23)) == utc(2024, 2, 29, 12)
    assert thursdays.next_run_after(utc(2024, 2, 29, 12)) == utc(2024, 3, 7, 12)


def test_slot_open_at_is_the_slot_whose_window_has_not_closed() -> None:
    schedule = parse_schedule("daily 02:00 tz=UTC window=90m")
    assert schedule.slot_open_at(utc(2024, 5, 1, 1, 59)) is None
    assert schedule.slot_open_at(utc(2024, 5, 1, 2)) == utc(2024, 5, 1, 2)
    assert schedule.slot_open_at(utc(2024, 5, 1, 3, 29)) == utc(2024, 5, 1, 2)
    assert schedule.slot_open_at(utc(2024, 5, 1, 3, 30)) is None


def test_naive_times_are_refused() -> None:
    schedule = default_policy().schedule
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        schedule.next_run_after(datetime(2024, 5, 1))
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        schedule.last_run_at_or_before(datetime(2024, 5, 1))


@pytest.mark.timeout(30)
def test_computing_slots_is_cheap_for_busy_schedules() -> None:
    every_hour = ",".join(f"{h:02}:00" for h in range(24))
    schedule = parse_schedule(f"daily {every_hour} tz=Europe/Berlin window=30m")
    year = list(
        schedule.runs_between(
            datetime(2023, 12, 31, 23, 59, tzinfo=BERLIN),
            datetime(2024, 12, 31, 23, 59, tzinfo=BERLIN),
        )
    )
    # 24 runs on each of 366 days, except Mar 31 where 02:00 is 03:00 CEST, the 03:00 run.
    # (Oct 27 has 25 hours but 24 runs: the second 02:00 is not run.)
    assert len(year) == 366 * 24 - 1


# --- schedule validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "message"),
    [
        ("4m", r"window is 4m; it must be 5m to 24h"),
        ("25h", r"window is 25h; it must be 5m to 24h"),
        ("24h", r"shorter than the shortest gap between two runs \(24h, from 02:00 to 02:00\)"),
    ],
)
def test_window_must_fit_between_5_minutes_and_the_next_run(window: str, message: str) -> None:
    with pytest.raises(InvalidPolicy, match=message):
        parse_schedule(f"daily 02:00 tz=UTC window={window}")


def test_window_must_be_shorter_than_the_shortest_gap_including_over_midnight() -> None:
    with pytest.raises(InvalidPolicy, match=r"\(1h, from 02:00 to 03:00\)"):
        parse_schedule("daily 02:00,03:00,12:00 tz=UTC")  # default window: 2h
    with pytest.raises(InvalidPolicy, match=r"\(1h30m, from 23:30 to 01:00\)"):
        parse_schedule("daily 01:00,12:00,23:30 tz=UTC")
    assert parse_schedule("daily 01:00,12:00,23:30 tz=UTC window=89m").window == timedelta(
        minutes=89
    )
    # Weekly runs are days apart: a whole day is fine, unless the days are consecutive.
    assert parse_schedule("weekly wed,sun 03:00 tz=UTC window=24h").window == timedelta(hours=24)
    with pytest.raises(InvalidPolicy, match=r"\(24h, from Sat to Sun\)"):
        parse_schedule("weekly wed,sat,sun 03:00 tz=UTC window=24h")


def test_window_must_be_whole_minutes() -> None:
    with pytest.raises(InvalidPolicy, match="whole number of minutes"):
        Schedule(Frequency.DAILY, (time(2),), window=timedelta(minutes=10, seconds=1))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Schedule(Frequency.DAILY, ()), "daily schedule runs 1 to 24 times a day, not 0"),
        (
            lambda: Schedule(
                Frequency.DAILY, tuple(time(h, m) for h in range(13) for m in (0, 30))
            ),
            "not 26",
        ),
        (
            lambda: Schedule(Frequency.WEEKLY, (time(2), time(14)), (Weekday.SUNDAY,)),
            r"exactly one time, not 2 \(02:00,14:00\)",
        ),
        (lambda: Schedule(Frequency.WEEKLY, (time(2),)), "weekly schedule needs at least one"),
        (
            lambda: Schedule(Frequency.DAILY, (time(2),), (Weekday.SUNDAY,)),
            "daily schedule runs every day: give no weekdays",
        ),
        (lambda: Schedule(Frequency.DAILY, (time(2), time(2))), "listed twice"),
        (lambda: Schedule(Frequency.DAILY, (time(2, 0, 30),)), "whole minutes"),
        (lambda: Schedule(Frequency.DAILY, (time(2),), timezone="Mars/Olympus"), "unknown"),
        (lambda: Schedule(Frequency.DAILY, (time(2),), timezone="localtime"), "not an IANA"),
        (lambda: Schedule("hourly", (time(2),)), "frequency 'hourly' is not one of"),  # type: ignore[arg-type]
    ],
)
def test_schedule_validation(build: Any, message: str) -> None:
    with pytest.raises(InvalidPolicy, match=message):
        build()


def test_schedule_sorts_its_times_and_weekdays() -> None:
    schedule = Schedule(Frequency.WEEKLY, (time(3),), (Weekday.SUNDAY, Weekday.MONDAY))
    assert schedule.weekdays == (Weekday.MONDAY, Weekday.SUNDAY)
    assert Schedule(Frequency.DAILY, (time(14), time(2))).times == (time(2), time(14))


# --- retention rules and policy validation ----------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: DailyRule(0), "daily retention keeps backups 1 to 9999 days, not 0"),
        (lambda: DailyRule(10000), "not 10000"),
        (lambda: WeeklyRule((Weekday.SUNDAY,), 5164), "1 to 5163 weeks, not 5164"),
        (lambda: WeeklyRule((), 4), "weekly retention needs at least one weekday"),
        (lambda: MonthlyRule(1189, Weekday.SUNDAY, WeekOfMonth.LAST), "1 to 1188 months"),
        (lambda: YearlyRule(100, (1,), Weekday.SUNDAY, WeekOfMonth.FIRST), "1 to 99 years"),
        (lambda: MonthlyRule(12), "exactly one of the two"),
        (
            lambda: MonthlyRule(12, Weekday.SUNDAY, WeekOfMonth.LAST, (1,)),
            "exactly one of the two",
        ),
        (lambda: MonthlyRule(12, Weekday.SUNDAY), "needs both the week and the weekday"),
        (lambda: MonthlyRule(12, days_of_month=(29,)), "29 is out of range: use 1 to 28"),
        (lambda: MonthlyRule(12, days_of_month=(1, 1)), "listed twice"),
        (lambda: YearlyRule(5, (13,), days_of_month=(1,)), "months 1 to 12"),
        (lambda: YearlyRule(5, (), days_of_month=(1,)), "months 1 to 12"),
        (lambda: Retention(), "at least one rule"),
    ],
)
def test_rule_validation(build: Any, message: str) -> None:
    with pytest.raises(InvalidPolicy, match=message):
        build()


WEEKLY_SUN = parse_schedule("weekly sun 03:00 tz=UTC")
DAILY = parse_schedule("daily 02:00 tz=UTC")


@pytest.mark.parametrize(
    ("schedule", "retention", "message"),
    [
        (
            WEEKLY_SUN,
            Retention(daily=DailyRule(30)),
            r"daily retention needs a daily schedule, but this one runs weekly \(on Sun\); "
            "drop the daily rule or schedule backups daily",
        ),
        (
            WEEKLY_SUN,
            Retention(weekly=WeeklyRule((Weekday.WEDNESDAY, Weekday.SUNDAY), 4)),
            "weekly retention keeps Wed backups, but the schedule runs only on Sun; keep days "
            "the schedule runs on, or add Wed to the schedule",
        ),
        (
            WEEKLY_SUN,
            Retention(monthly=MonthlyRule(12, days_of_month=(1,))),
            r"monthly retention on day 1 of the month needs a daily schedule, but this one runs "
            r"weekly \(on Sun\); keep a weekday instead \(e.g. last-sun\) or schedule backups "
            "daily",
        ),
        (
            WEEKLY_SUN,
            Retention(yearly=YearlyRule(5, (12,), days_of_month=(0,))),
            "yearly retention on last day of the month needs a daily schedule",
        ),
        (
            WEEKLY_SUN,
            Retention(monthly=MonthlyRule(12, Weekday.SATURDAY, WeekOfMonth.LAST)),
            "monthly retention keeps the last Sat of the month, but the schedule runs only on "
            r"Sun; keep a scheduled weekday \(e.g. last-sun\) or add Sat to the schedule",
        ),
        (
            WEEKLY_SUN,
            Retention(yearly=YearlyRule(5, (1,), Weekday.MONDAY, WeekOfMonth.FIRST)),
            "yearly retention keeps the first Mon of the month, but the schedule runs only on Sun",
        ),
    ],
)
def test_rules_must_keep_backups_the_schedule_takes(
    schedule: Schedule, retention: Retention, message: str
) -> None:
    with pytest.raises(InvalidPolicy, match=message) as raised:
        Policy("p", schedule, retention)
    assert raised.value.code == "InvalidPolicy"
    assert raised.value.exit_code == 2
    assert raised.value.grpc_status == "INVALID_ARGUMENT"
    assert str(raised.value).startswith("Invalid backup policy: ")


@pytest.mark.parametrize(
    ("schedule", "retention", "message"),
    [
        (
            DAILY,
            Retention(weekly=WeeklyRule((Weekday.SUNDAY,), 4)),
            r"a daily schedule needs a daily retention rule \(e.g. --daily 30\)",
        ),
        (
            parse_schedule("weekly sun,wed 03:00 tz=UTC"),
            Retention(weekly=WeeklyRule((Weekday.SUNDAY,), 4)),
            r"nothing would keep the Wed backups \(e.g. --weekly wed,sun:12\)",
        ),
        (
            WEEKLY_SUN,
            Retention(monthly=MonthlyRule(12, Weekday.SUNDAY, WeekOfMonth.LAST)),
            "a weekly schedule needs a weekly retention rule for each day it runs",
        ),
    ],
)
def test_every_backup_the_schedule_takes_is_kept_at_first(
    schedule: Schedule, retention: Retention, message: str
) -> None:
    """Otherwise a backup completes and the prune after it deletes it at once."""
    with pytest.raises(InvalidPolicy, match=message):
        Policy("p", schedule, retention)


def test_a_daily_schedule_allows_every_rule() -> None:
    retention = parse_retention(
        daily="7", weekly="mon,fri:4", monthly="day-1,last:12", yearly="jul:second-wed:3"
    )
    assert Policy("p", DAILY, retention).retention == retention


@pytest.mark.parametrize("name", ["a", "Gold-Tier.v2_eu", "9lives", "x" * 64])
def test_valid_policy_names(name: str) -> None:
    assert Policy(name, DAILY, Retention(daily=DailyRule(1))).name == name


@pytest.mark.parametrize("name", ["", "x" * 65, "-gold", ".hidden", "gold tier", "gold/tier", "é"])
def test_invalid_policy_names(name: str) -> None:
    with pytest.raises(InvalidPolicy, match=r"use 1 to 64 letters, digits, '\.', '_' or '-'"):
        Policy(name, DAILY, Retention(daily=DailyRule(1)))


def test_invalid_policy_travels_as_its_code() -> None:
    error = CofferError.from_code("InvalidPolicy", "Invalid backup policy: x")
    assert isinstance(error, InvalidPolicy)
    assert isinstance(error, InvalidArgument)


# --- JSON -------------------------------------------------------------------------------------

GFS = Policy(
    "GFS",
    parse_schedule("daily 02:00 tz=Europe/Berlin"),
    parse_retention(
        daily="30", weekly="sun:104", monthly="last-sun:120", yearly="jan:first-sun:99"
    ),
)


def test_policy_json_is_the_documented_spec() -> None:
    assert GFS.to_dict() == {
        "name": "GFS",
        "schedule": {
            "frequency": "daily",
            "times": ["02:00"],
            "weekdays": [],
            "timezone": "Europe/Berlin",
            "window_minutes": 120,
        },
        "retention": {
            "daily": {"days": 30},
            "weekly": {"weekdays": ["sunday"], "weeks": 104},
            "monthly": {"months": 120, "weekday": "sunday", "week": "last", "days_of_month": []},
            "yearly": {
                "years": 99,
                "months": [1],
                "weekday": "sunday",
                "week": "first",
                "days_of_month": [],
            },
        },
    }


@pytest.mark.parametrize(
    "policy",
    [
        GFS,
        default_policy("America/New_York"),
        Policy(
            "weekly",
            parse_schedule("weekly sun,wed 03:00 tz=Asia/Kolkata window=45m"),
            parse_retention(weekly="wed,sun:12", monthly="first-wed:6"),
        ),
        Policy(
            "days",
            parse_schedule("daily 00:15,12:45 tz=UTC"),
            parse_retention(daily="7", monthly="day-1,15,last:24", yearly="feb,dec:day-last:10"),
        ),
    ],
)
def test_policy_json_round_trip(policy: Policy) -> None:
    assert Policy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


def _gfs_with(path: tuple[str, ...], value: object) -> object:
    spec: Any = GFS.to_dict()
    target = spec
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return spec


_DELETE = object()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([], "policy must be a JSON object, not a list"),
        (None, "policy must be a JSON object, not null"),
        (_gfs_with(("name",), _DELETE), "policy lacks name"),
        (_gfs_with(("colour",), "blue"), "policy has unknown keys colour"),
        (_gfs_with(("name",), 7), "expected a string, got a number 7"),
        (_gfs_with(("schedule",), "daily"), "schedule must be a JSON object, not a string"),
        (_gfs_with(("schedule", "times"), "02:00"), "expected a list, got a string"),
        (_gfs_with(("schedule", "times"), ["25:00"]), "schedule time '25:00' is not HH:MM"),
        (_gfs_with(("schedule", "times"), [200]), "expected a string, got a number"),
        (_gfs_with(("schedule", "frequency"), "hourly"), "frequency 'hourly' is not one of"),
        (_gfs_with(("schedule", "weekdays"), ["sunday"]), "daily schedule runs every day"),
        (_gfs_with(("schedule", "window_minutes"), 10**30), "window_minutes .* out of range"),
        (_gfs_with(("schedule", "window_minutes"), "120"), "expected a whole number"),
        (_gfs_with(("schedule", "timezone"), None), "expected a string, got null"),
        (_gfs_with(("retention",), {}), "at least one rule"),
        (_gfs_with(("retention", "hourly"), {"hours": 1}), "unknown keys hourly"),
        (_gfs_with(("retention", "daily", "days"), "30"), "expected a whole number"),
        (_gfs_with(("retention", "daily", "days"), True), "got a boolean"),
        (_gfs_with(("retention", "daily", "days"), 1.5), "got a number 1.5"),
        (_gfs_with(("retention", "weekly", "weekdays"), ["sun", "sun"]), "listed twice"),
        (_gfs_with(("retention", "weekly", "weekdays"), [6]), "expected a string"),
        (_gfs_with(("retention", "weekly", "weeks"), _DELETE), "weekly retention lacks weeks"),
        (_gfs_with(("retention", "monthly", "week"), "fifth"), "'fifth' is not one of"),
        (_gfs_with(("retention", "monthly", "days_of_month"), [1]), "exactly one of the two"),
        (_gfs_with(("retention", "monthly", "days_of_month"), {}), "expected a list"),
        (_gfs_with(("retention", "yearly", "months"), ["jan"]), "expected a whole number"),
        (_gfs_with(("retention", "yearly", "months"), [1, "x"]), "expected a whole number"),
    ],
)
def test_malformed_json_is_an_invalid_policy(spec: object, message: str) -> None:
    with pytest.raises(InvalidPolicy, match=message):
        Policy.from_dict(spec)


# --- the text form ----------------------------------------------------------------------------


def test_parse_schedule_reads_the_operator_forms() -> None:
    assert parse_schedule("daily 02:00,14:00 tz=Europe/Berlin") == Schedule(
        Frequency.DAILY, (time(2), time(14)), timezone="Europe/Berlin"
    )
    assert parse_schedule("weekly sun,wed 03:00 tz=UTC") == Schedule(
        Frequency.WEEKLY, (time(3),), (Weekday.WEDNESDAY, Weekday.SUNDAY), "UTC"
    )
    assert parse_schedule("DAILY 2:00 window=1h30m") == Schedule(
        Frequency.DAILY, (time(2),), window=timedelta(minutes=90)
    )


def test_parse_retention_reads_the_operator_forms() -> None:
    assert parse_daily_rule("30") == DailyRule(30)
    assert parse_weekly_rule("sun:104") == WeeklyRule((Weekday.SUNDAY,), 104)
    assert parse_monthly_rule("last-sun:120") == MonthlyRule(120, Weekday.SUNDAY, WeekOfMonth.LAST)
    assert parse_monthly_rule("day-1:12") == MonthlyRule(12, days_of_month=(1,))
    assert parse_monthly_rule("day-last:12") == MonthlyRule(12, days_of_month=(0,))
    assert parse_yearly_rule("jan:first-sun:99") == YearlyRule(
        99, (1,), Weekday.SUNDAY, WeekOfMonth.FIRST
    )
    assert parse_yearly_rule("Dec,Feb:day-last:5") == YearlyRule(5, (2, 12), days_of_month=(0,))


@pytest.mark.parametrize(
    "text",
    [
        "daily 02:00 tz=UTC",
        "daily 00:00,06:30,12:00,18:45 tz=Europe/Berlin window=1h30m",
        "weekly mon,wed,sun 23:59 tz=America/New_York",
        "weekly sat 04:00 tz=Australia/Lord_Howe window=24h",
    ],
)
def test_schedule_text_round_trip(text: str) -> None:
    schedule = parse_schedule(text)
    assert schedule.to_text() == text
    assert parse_schedule(schedule.to_text()) == schedule


@pytest.mark.parametrize(
    "options",
    [
        {
            "daily": "30",
            "weekly": "sun:104",
            "monthly": "last-sun:120",
            "yearly": "jan:first-sun:99",
        },
        {"weekly": "mon,sat:4"},
        {"monthly": "day-1,15,last:12"},
        {"yearly": "feb,jul:day-last:3", "daily": "9999"},
        {"monthly": "second-tue:1188", "yearly": "dec:fourth-fri:1"},
    ],
)
def test_retention_text_round_trip(options: dict[str, str]) -> None:
    retention = parse_retention(**options)
    assert retention.to_options() == options
    assert parse_retention(**retention.to_options()) == retention


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "must start with daily or weekly"),
        ("hourly 02:00", "must start with daily or weekly"),
        ("daily", "lacks its times"),
        ("daily tz=UTC", "lacks its times"),
        ("weekly 03:00 tz=UTC", "lacks its weekdays and a time"),
        ("weekly funday 03:00", "'funday' is not a weekday"),
        ("daily 2pm", r"schedule time '2pm' is not HH:MM"),
        ("daily 24:00", r"'24:00' is not HH:MM"),
        ("daily 02:00 tz=UTC tz=UTC", "unexpected 'tz=UTC'"),
        ("daily 02:00 zone=UTC", "unexpected 'zone=UTC'"),
        ("daily 02:00 tz=Nowhere/City", "time zone 'Nowhere/City' is unknown"),
        ("daily 02:00 window=2d", "window '2d' is not a duration"),
        ("daily 02:00 window=", "window '' is not a duration"),
    ],
)
def test_parse_schedule_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidPolicy, match=message):
        parse_schedule(text)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"daily": "thirty"}, "daily retention 'thirty': the count must be a number, e.g. 30"),
        ({"daily": "-1"}, "the count must be a number"),
        ({"weekly": "104"}, "must be <weekdays>:<weeks>, e.g. sun:104"),
        ({"weekly": "sun:"}, "the count must be a number"),
        ({"monthly": "120"}, "must be <day>:<months>"),
        ({"monthly": "fifth-sun:12"}, "'fifth' is not first, second, third, fourth, last or day"),
        ({"monthly": "day-0:12"}, "'0' is not 1 to 28 or 'last'"),
        ({"monthly": "day-29:12"}, "29 is out of range"),
        ({"monthly": "sunday:12"}, "is not understood"),
        ({"yearly": "jan:99"}, "must be <months>:<day>:<years>"),
        ({"yearly": "janvier:first-sun:99"}, "'janvier' is not a month"),
        ({"yearly": "jan:first-sun:100"}, "1 to 99 years, not 100"),
        ({}, "at least one rule"),
    ],
)
def test_parse_retention_errors(options: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidPolicy, match=message):
        parse_retention(**options)


def test_describe_in_one_line_each() -> None:
    assert GFS.describe() == (
        "daily at 02:00 Europe/Berlin",
        "daily 30 d · weekly Sun 104 w · monthly last Sun 120 m · yearly Jan first Sun 99 y",
    )
    weekly = Policy(
        "w",
        parse_schedule("weekly sun,wed 03:00 tz=UTC window=45m"),
        parse_retention(weekly="sun,wed:12", monthly="first-wed:6"),
    )
    assert weekly.describe() == (
        "weekly on Wed, Sun at 03:00 UTC, window 45m",
        "weekly Wed, Sun 12 w · monthly first Wed 6 m",
    )
    days = parse_retention(monthly="day-1,last:12", yearly="jan,jul:day-last:3")
    assert days.describe() == "monthly day 1, last 12 m · yearly Jan, Jul last day 3 y"


def test_default_policy() -> None:
    policy = default_policy()
    assert policy.name == "DefaultPolicy"
    assert policy.describe() == ("daily at 02:00 UTC", "daily 30 d")
    assert policy.schedule.window == timedelta(hours=2)
    assert policy.retention == Retention(daily=DailyRule(30))
    berlin = default_policy("Europe/Berlin")
    assert berlin.schedule.next_run_after(utc(2024, 6, 30, 12)) == utc(2024, 7, 1, 0)  # 02:00 CEST
    with pytest.raises(InvalidPolicy, match="unknown"):
        default_policy("Berlin")
