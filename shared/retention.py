"""Retention: which recovery points a policy's rules keep, and by which rules.

`retained` takes recovery points (id, when taken), the rules, the policy's time zone and the
current time, and returns the points to keep with the names of the rules keeping each. A point
it leaves out has expired and is deleted. It is a pure function of its arguments: pruning now
and pruning again later over what survived gives the same result as pruning once, which is
what lets the controller prune after every backup.

All calendar arithmetic is local, in the policy's time zone: a point belongs to the local date
it was taken on, and "N days/weeks/months/years later" is the same local wall-clock time on
that later date (a time the zone skips is shifted forward by the gap, a time it repeats means
its first occurrence, as in schedules). A rule keeps a point while `now` is before that end.

- daily (N days): every point, until N calendar days after it was taken.
- weekly (weekdays, N weeks): the first point of a local day that is one of the weekdays,
  N weeks. Later points of that day count only as daily points.
- monthly (N months): the first point of the local day the rule names in each month — the
  last Sunday, or a day of the month where 0 is the month's last day (Feb 28 or 29, Apr 30) —
  for N calendar months. Month arithmetic clamps to the month's end: Jan 31 plus one month is
  Feb 28 (or 29).
- yearly (months, N years): likewise on the rule's months, for N years; Feb 29 plus one year
  is Feb 28.

A rule whose day has no point (the backup failed, or none was scheduled) keeps nothing for
that week, month or year; it does not fall back to a neighbouring day, so what the rules keep
never depends on which other points happen to exist.

Points taken after `now` (clock skew between machines, or a clock set back) are kept: by the
rules they match, which all keep them since their end lies after `now`, or — when no rule
matches, e.g. a Monday point under weekly-Sunday-only retention — labelled "daily". Deleting
the newest backup because a clock disagrees would be the worst possible outcome.

Cost: one sort and one pass, O(n log n) for n points.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from shared.errors import InvalidArgument
from shared.policy import Retention, days_in_month, load_timezone

RULE_NAMES = ("daily", "weekly", "monthly", "yearly")
"""The labels `retained` gives, in the order operators read them."""

_NEVER = datetime.max.replace(tzinfo=UTC)


def retained(
    points: Iterable[tuple[str, datetime]],
    retention: Retention,
    timezone: str,
    now: datetime,
) -> dict[str, frozenset[str]]:
    """For each recovery point `retention` keeps at `now`, the names of the rules keeping it.

    `points` are (recovery point id, aware datetime taken); `timezone` is the policy's.
    """
    zone = load_timezone(timezone)
    now_utc = _as_utc(now, "now")
    taken: list[tuple[datetime, str]] = []
    ids: set[str] = set()
    for rp_id, at in points:
        if rp_id in ids:
            raise InvalidArgument(detail=f"recovery point {rp_id!r} is listed twice")
        ids.add(rp_id)
        taken.append((_as_utc(at, f"the time of recovery point {rp_id!r}"), rp_id))
    # By instant, then id: "the first point of a day" is the same whatever the input order.
    taken.sort()

    kept: dict[str, frozenset[str]] = {}
    days_seen: set[date] = set()
    for at, rp_id in taken:
        local = at.astimezone(zone)
        day = local.date()
        # A set, not "the previous point's day": where a zone falls back across midnight,
        # local dates do not grow monotonically with the instant.
        first_of_day = day not in days_seen
        days_seen.add(day)
        rules = [
            rule for rule, end in _claims(retention, local, zone, first_of_day) if now_utc < end
        ]
        if not rules and at > now_utc:
            rules.append("daily")
        if rules:
            kept[rp_id] = frozenset(rules)
    return kept


def _claims(
    retention: Retention, local: datetime, zone: ZoneInfo, first_of_day: bool
) -> Iterator[tuple[str, datetime]]:
    """The rules that claim the point taken at `local`, each with when its claim ends."""
    if retention.daily is not None:
        yield "daily", _later(local, zone, days=retention.daily.days)
    if not first_of_day:
        return
    day = local.date()
    weekly, monthly, yearly = retention.weekly, retention.monthly, retention.yearly
    if weekly is not None and day.weekday() in weekly.weekdays:
        yield "weekly", _later(local, zone, days=7 * weekly.weeks)
    if monthly is not None and monthly.selects(day):
        yield "monthly", _later(local, zone, months=monthly.months)
    if yearly is not None and yearly.selects(day):
        yield "yearly", _later(local, zone, months=12 * yearly.years)


def _later(local: datetime, zone: ZoneInfo, *, days: int = 0, months: int = 0) -> datetime:
    """The instant of `local`'s wall-clock time `days` days and `months` months later (UTC).

    The day of the month is clamped to the target month's length. An end past the year 9999
    is never reached.
    """
    wall = local.replace(tzinfo=None, fold=0)
    year, month = divmod(wall.month - 1 + months, 12)
    year += wall.year
    if year > datetime.max.year:
        return _NEVER
    wall = wall.replace(
        year=year, month=month + 1, day=min(wall.day, days_in_month(year, month + 1))
    )
    try:
        return (wall + timedelta(days=days)).replace(tzinfo=zone).astimezone(UTC)
    except OverflowError:
        return _NEVER


def _as_utc(t: datetime, what: str) -> datetime:
    if not isinstance(t, datetime) or t.utcoffset() is None:
        raise InvalidArgument(detail=f"{what} must be a timezone-aware datetime, not {t!r}")
    return t.astimezone(UTC)
