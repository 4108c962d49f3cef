"""Retention: which recovery points a policy's rules keep, over years of daily backups."""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from shared.errors import InvalidArgument, InvalidPolicy
from shared.policy import Policy, Retention, parse_retention, parse_schedule
from shared.retention import retained

BERLIN = ZoneInfo("Europe/Berlin")


def utc(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)  # type: ignore[arg-type, misc]


def days(first: date, last: date) -> list[date]:
    """Every date from `first` to `last`, both included."""
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def daily_points(first: date, last: date, at: time, zone: ZoneInfo) -> dict[str, datetime]:
    """One point a day at the local time `at`, named by its date."""
    return {f"rp-{d}": datetime.combine(d, at, tzinfo=zone) for d in days(first, last)}


# --- three years of a GFS policy --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_three_years_of_daily_backups_keep_exactly_the_gfs_set() -> None:
    policy = Policy(
        "GFS",
        parse_schedule("daily 02:00 tz=Europe/Berlin"),
        parse_retention(
            daily="30", weekly="sun:104", monthly="last-sun:120", yearly="jan:first-sun:99"
        ),
    )
    zone = policy.schedule.timezone
    slots = list(
        policy.schedule.runs_between(
            datetime(2024, 1, 1, tzinfo=BERLIN), datetime(2026, 12, 31, 23, 59, tzinfo=BERLIN)
        )
    )
    assert len(slots) == 366 + 365 + 365  # one backup a day, the leap day included

    # The controller's loop: take the slot's backup, prune, keep only what survived.
    surviving: dict[str, datetime] = {}
    every_point: dict[str, datetime] = {}
    kept: dict[str, frozenset[str]] = {}
    for slot in slots:
        rp_id = f"rp-{slot.astimezone(BERLIN).date()}"
        surviving[rp_id] = every_point[rp_id] = slot
        kept = retained(surviving.items(), policy.retention, zone, now=slot)
        assert "daily" in kept[rp_id], "the backup just taken must be kept"
        surviving = {rp: at for rp, at in surviving.items() if rp in kept}

    # What an operator expects on 2026-12-31, worked out with the calendar alone.
    expected: dict[str, set[str]] = {}

    def expect(day: date, rule: str) -> None:
        expected.setdefault(f"rp-{day}", set()).add(rule)

    for day in days(date(2026, 12, 2), date(2026, 12, 31)):  # the last 30 days
        expect(day, "daily")
    # 104 weeks back from Thursday 2026-12-31 is Thursday 2025-01-02: the Sundays after it.
    sundays = [d for d in days(date(2025, 1, 3), date(2026, 12, 31)) if d.weekday() == 6]
    assert (sundays[0], sundays[-1], len(sundays)) == (date(2025, 1, 5), date(2026, 12, 27), 104)
    for day in sundays:
        expect(day, "weekly")
    last_sundays = []
    for year in (2024, 2025, 2026):
        for month in range(1, 13):
            last_day = date(year, month, calendar.monthrange(year, month)[1])
            last_sundays.append(last_day - timedelta(days=(last_day.weekday() - 6) % 7))
    assert len(last_sundays) == 36
    # Spot checks: a leap February, and both DST days (each the last Sunday of its month).
    assert {date(2024, 2, 25), date(2024, 3, 31), date(2024, 10, 27)} <= set(last_sundays)
    for day in last_sundays:
        expect(day, "monthly")
    for day in (date(2024, 1, 7), date(2025, 1, 5), date(2026, 1, 4)):  # first Sundays of Jan
        expect(day, "yearly")

    assert {rp: set(rules) for rp, rules in kept.items()} == expected
    assert kept["rp-2025-01-05"] == {"weekly", "yearly"}
    assert kept["rp-2026-12-27"] == {"daily", "weekly", "monthly"}
    assert kept["rp-2024-03-31"] == {"monthly"}
    # 173 labels on 143 points: 4 of the last 30 days are Sundays, 24 last Sundays and 2
    # first Sundays of January fall in the last 104 weeks, and 2026-12-27 is all three.
    assert sum(len(rules) for rules in kept.values()) == 30 + 104 + 36 + 3
    assert len(kept) == 173 - 4 - 24 - 2 - 1 + 1
    # Pruning daily or once at the end comes to the same.
    assert retained(every_point.items(), policy.retention, zone, now=slots[-1]) == kept


# --- calendar edges ---------------------------------------------------------------------------


def test_monthly_last_day_is_feb_29_in_a_leap_year_and_feb_28_otherwise() -> None:
    points = daily_points(date(2024, 1, 1), date(2025, 12, 31), time(2), BERLIN)
    kept = retained(
        points.items(), parse_retention(monthly="day-last:24"), "Europe/Berlin", utc(2026, 1, 1)
    )
    month_ends_2024 = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    month_ends_2025 = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    expected = [f"rp-2024-{m:02}-{d}" for m, d in enumerate(month_ends_2024, start=1)]
    expected += [f"rp-2025-{m:02}-{d}" for m, d in enumerate(month_ends_2025, start=1)]
    assert sorted(kept) == expected
    assert set(kept.values()) == {frozenset({"monthly"})}


def test_a_month_after_january_31_is_the_end_of_february() -> None:
    retention = parse_retention(monthly="day-last:1")
    for point, end in [
        (utc(2024, 1, 31, 2), utc(2024, 2, 29, 2)),
        (utc(2025, 1, 31, 2), utc(2025, 2, 28, 2)),
    ]:
        before = retained([("rp", point)], retention, "UTC", end - timedelta(seconds=1))
        assert before == {"rp": frozenset({"monthly"})}
        assert retained([("rp", point)], retention, "UTC", end) == {}


def test_a_yearly_point_of_feb_29_is_kept_until_feb_28_next_year() -> None:
    retention = parse_retention(yearly="feb:day-last:1")
    points = daily_points(date(2024, 2, 26), date(2025, 2, 28), time(2), BERLIN)
    # 02:00 CET on 2025-02-28 is 01:00Z.
    just_before = retained(points.items(), retention, "Europe/Berlin", utc(2025, 2, 28, 0, 59))
    assert just_before == {
        "rp-2024-02-29": frozenset({"yearly"}),
        "rp-2025-02-28": frozenset({"yearly"}),
    }
    at_the_end = retained(points.items(), retention, "Europe/Berlin", utc(2025, 2, 28, 1))
    assert at_the_end == {"rp-2025-02-28": frozenset({"yearly"})}


def test_a_daily_rule_counts_calendar_days_not_24_hours() -> None:
    # Noon CET on 2024-03-30; one day later is noon CEST on 2024-03-31, only 23 hours on.
    point = [("rp", utc(2024, 3, 30, 11))]
    retention = parse_retention(daily="1")
    assert retained(point, retention, "Europe/Berlin", utc(2024, 3, 31, 9, 59)) == {
        "rp": frozenset({"daily"})
    }
    assert retained(point, retention, "Europe/Berlin", utc(2024, 3, 31, 10)) == {}


def test_changing_the_policy_time_zone_moves_points_to_other_days() -> None:
    # Every day at 22:30Z: in UTC that is the same day, in Berlin (UTC+2 in summer) 00:30 the
    # next day. The point of the last day of May is another one in each zone.
    points = {
        f"rp-{d}": datetime.combine(d, time(22, 30), tzinfo=UTC)
        for d in days(date(2024, 5, 25), date(2024, 6, 5))
    }
    retention = parse_retention(monthly="day-last:12")
    now = utc(2024, 6, 6)
    assert retained(points.items(), retention, "UTC", now) == {
        "rp-2024-05-31": frozenset({"monthly"})
    }
    assert retained(points.items(), retention, "Europe/Berlin", now) == {
        "rp-2024-05-30": frozenset({"monthly"})  # 2024-05-31 00:30 CEST
    }


def test_only_the_first_point_of_a_day_counts_for_weekly_and_longer_rules() -> None:
    points = [
        ("rp-evening", utc(2024, 1, 7, 18)),  # Sunday, listed first on purpose
        ("rp-morning", utc(2024, 1, 7, 2)),
        ("rp-monday", utc(2024, 1, 8, 2)),
    ]
    retention = parse_retention(daily="3", weekly="sun:4")
    assert retained(points, retention, "UTC", utc(2024, 1, 9)) == {
        "rp-evening": frozenset({"daily"}),
        "rp-morning": frozenset({"daily", "weekly"}),
        "rp-monday": frozenset({"daily"}),
    }
    assert retained(points, retention, "UTC", utc(2024, 1, 20)) == {
        "rp-morning": frozenset({"weekly"})
    }
    assert retained(points, retention, "UTC", utc(2024, 2, 4, 2)) == {}


# --- edge cases -------------------------------------------------------------------------------


def test_no_points_keep_nothing() -> None:
    assert retained([], parse_retention(daily="30"), "UTC", utc(2024, 1, 1)) == {}


def test_points_from_the_future_are_kept() -> None:
    retention = parse_retention(weekly="sun:1")
    points = [
        ("rp-past-monday", utc(2023, 12, 25, 2)),
        ("rp-sunday", utc(2024, 1, 7, 2)),
        ("rp-monday", utc(2024, 1, 8, 2)),
    ]
    # The clock says Jan 1, yet two points are later: kept, by the rules they match or,
    # matching none, as daily.
    assert retained(points, retention, "UTC", utc(2024, 1, 1)) == {
        "rp-sunday": frozenset({"weekly"}),
        "rp-monday": frozenset({"daily"}),
    }


def test_input_order_does_not_matter() -> None:
    points = list(daily_points(date(2024, 1, 1), date(2024, 3, 31), time(2), BERLIN).items())
    retention = parse_retention(daily="7", weekly="sun:4", monthly="first-mon:2")
    now = utc(2024, 4, 1)
    assert retained(points, retention, "UTC", now) == retained(points[::-1], retention, "UTC", now)


def test_bad_input_is_refused() -> None:
    retention = parse_retention(daily="1")
    with pytest.raises(InvalidArgument, match="'rp' is listed twice"):
        retained(
            [("rp", utc(2024, 1, 1)), ("rp", utc(2024, 1, 2))], retention, "UTC", utc(2024, 1, 3)
        )
    with pytest.raises(InvalidArgument, match="recovery point 'rp' must be a timezone-aware"):
        retained([("rp", datetime(2024, 1, 1))], retention, "UTC", utc(2024, 1, 3))
    with pytest.raises(InvalidArgument, match="now must be a timezone-aware"):
        retained([], retention, "UTC", datetime(2024, 1, 3))
    with pytest.raises(InvalidPolicy, match="unknown"):
        retained([], retention, "Berlin", utc(2024, 1, 3))


@pytest.mark.timeout(30)
def test_thousands_of_points_are_pruned_at_once() -> None:
    start = utc(2024, 1, 1)
    points = [(f"rp-{n}", start + timedelta(hours=n)) for n in range(20_000)]
    now = points[-1][1]
    retention = Retention(daily=parse_retention(daily="7").daily)
    kept = retained(points, retention, "UTC", now)
    # Hourly points, the last at `now`: the last 7 * 24 of them are within 7 days.
    assert sorted(kept, key=lambda rp: int(rp[3:])) == [
        f"rp-{n}" for n in range(20_000 - 168, 20_000)
    ]
