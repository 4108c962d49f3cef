"""Backup policies: when a VM is backed up (schedule) and which recovery points are kept (rules).

A `Policy` is a name, a `Schedule` and a `Retention`. It is plain data that checks itself when
built: every invalid policy raises `InvalidPolicy` saying what is wrong and how to fix it. The
rules follow Azure Backup: a daily schedule runs 1 to 24 times a day, a weekly one once on each of
its weekdays; retention has up to four rules (daily, weekly, monthly, yearly), and a rule may
only keep backups the schedule takes (a weekly rule's weekdays must be scheduled days, a rule
on days of the month needs a daily schedule). Which points the rules keep is decided in
`shared.retention`.

Time. A schedule's times are wall-clock times in its IANA time zone; every instant going in
must be aware and every instant coming out is UTC. Nothing here reads the clock.

Daylight saving. A slot's local time is resolved as zoneinfo does with `fold=0`: a time that
does not exist on a spring-forward day (02:30 in Europe/Berlin on the last Sunday of March)
runs once, shifted forward by the gap (03:30 local); a time that occurs twice on a fall-back
day runs once, at its first occurrence. Slots are strictly increasing and never repeat, even
when a shifted time lands on another slot. The window is checked against the wall-clock gap
between slots; on a spring-forward day the real gap can be shorter by the shift.

JSON (`Policy.to_dict`, the `spec` the controller stores and the operator API carries):

    {"name": "DefaultPolicy",
     "schedule": {"frequency": "daily", "times": ["02:00"], "weekdays": [],
                  "timezone": "Europe/Berlin", "window_minutes": 120},
     "retention": {"daily": {"days": 30},
                   "weekly": {"weekdays": ["sunday"], "weeks": 104},
                   "monthly": {"months": 120, "weekday": "sunday", "week": "last",
                               "days_of_month": []},
                   "yearly": {"years": 99, "months": [1], "weekday": "sunday",
                              "week": "first", "days_of_month": []}}}

Absent rules are left out. Unknown keys are refused rather than ignored: a misspelt key in a
retention rule would otherwise keep fewer backups than the operator asked for.

Text (what operators type in the CLI, and `to_text` gives back):

    daily 02:00,14:00 tz=Europe/Berlin [window=90m]
    weekly sun,wed 03:00 tz=UTC
    daily rule    30                   keep every backup 30 days
    weekly rule   sun:104              keep Sunday backups 104 weeks
    monthly rule  last-sun:120         the last Sunday of each month, 120 months
                  day-1,15:12          the 1st and 15th, 12 months ("day-last": the last day)
    yearly rule   jan:first-sun:99     the first Sunday of January, 99 years
"""

from __future__ import annotations

import calendar
import enum
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from shared.errors import InvalidArgument, InvalidPolicy

DEFAULT_WINDOW = timedelta(hours=2)
MIN_WINDOW = timedelta(minutes=5)
MAX_WINDOW = timedelta(hours=24)
MAX_TIMES_PER_DAY = 24
MAX_DAYS = 9999
MAX_WEEKS = 5163
MAX_MONTHS = 1188
MAX_YEARS = 99
LAST_DAY = 0
"""In `days_of_month`: the last day of the month, whatever its length."""

DEFAULT_POLICY_NAME = "DefaultPolicy"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TIME = re.compile(r"([01]?[0-9]|2[0-3]):([0-5][0-9])")
_DURATION = re.compile(r"(?:([0-9]{1,3})h)?(?:([0-9]{1,4})m)?")
_COUNT = re.compile(r"[0-9]{1,6}")
# Zone files that name the host's own zone: a policy must mean the same on every machine.
_HOST_ZONES = frozenset({"localtime", "posixrules"})
_MONTHS = tuple(name.lower() for name in calendar.month_abbr[1:])
_DAY = timedelta(days=1)
# From the day before `t`'s local day, a weekly slot is at most 8 days on; one more day is
# examined because a DST-shifted slot of the next day could come first.
_SEARCH_DAYS = 10

_E = TypeVar("_E", bound=enum.Enum)


class Weekday(enum.IntEnum):
    """A day of the week, numbered as `date.weekday()` does."""

    MONDAY = 0
    TUESDAY = 1
    WEDNESDAY = 2
    THURSDAY = 3
    FRIDAY = 4
    SATURDAY = 5
    SUNDAY = 6

    @classmethod
    def parse(cls, text: str) -> Weekday:
        """The weekday `text` names: "sun", "Sun" or "sunday"."""
        key = text.strip().lower()
        for day in cls:
            if key in (day.key, day.key[:3]):
                return day
        raise InvalidPolicy(
            detail=f"{text!r} is not a weekday: use mon, tue, wed, thu, fri, sat or sun"
        )

    @property
    def key(self) -> str:
        """The JSON name: "sunday"."""
        return self.name.lower()

    @property
    def short(self) -> str:
        """The name in text and descriptions: "Sun"."""
        return self.name[:3].title()


class Frequency(enum.StrEnum):
    DAILY = "daily"
    WEEKLY = "weekly"


class WeekOfMonth(enum.StrEnum):
    """Which occurrence of a weekday in its month: the first (days 1 to 7) ... the last."""

    FIRST = "first"
    SECOND = "second"
    THIRD = "third"
    FOURTH = "fourth"
    LAST = "last"


def load_timezone(name: str) -> ZoneInfo:
    """The IANA time zone `name` ("Europe/Berlin", "UTC"); InvalidPolicy if there is none."""
    if not isinstance(name, str) or name in _HOST_ZONES:
        raise InvalidPolicy(detail=f"time zone {name!r} is not an IANA zone name")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidPolicy(
            detail=f"time zone {name!r} is unknown: use an IANA name such as "
            "'Europe/Berlin', 'America/New_York' or 'UTC'"
        ) from None


# --- the schedule ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """When backups run: wall-clock `times` in `timezone`, every day or on `weekdays`.

    Built with unsorted times or weekdays, it sorts them. `window` is how long after its slot
    a scheduled backup may still start.
    """

    frequency: Frequency
    times: tuple[time, ...]
    weekdays: tuple[Weekday, ...] = ()
    timezone: str = "UTC"
    window: timedelta = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        frequency = _member(Frequency, self.frequency, "schedule frequency", "daily or weekly")
        times = _times(self.times)
        weekdays = _weekdays(self.weekdays, "schedule")
        if frequency is Frequency.DAILY:
            if not 1 <= len(times) <= MAX_TIMES_PER_DAY:
                raise InvalidPolicy(
                    detail=f"a daily schedule runs 1 to {MAX_TIMES_PER_DAY} times a day, "
                    f"not {len(times)}: give times like 02:00 or 02:00,14:00"
                )
            if weekdays:
                raise InvalidPolicy(
                    detail="a daily schedule runs every day: give no weekdays, or make it "
                    "weekly to run on some days only"
                )
        else:
            if len(times) != 1:
                raise InvalidPolicy(
                    detail="a weekly schedule runs once on each of its days: give exactly "
                    f"one time, not {len(times)} ({_times_text(times) or 'none'})"
                )
            if not weekdays:
                raise InvalidPolicy(
                    detail="a weekly schedule needs at least one weekday, e.g. 'weekly sun 03:00'"
                )
        load_timezone(self.timezone)
        object.__setattr__(self, "frequency", frequency)
        object.__setattr__(self, "times", times)
        object.__setattr__(self, "weekdays", weekdays)
        self._check_window()

    def _check_window(self) -> None:
        window = self.window
        if not isinstance(window, timedelta) or window % timedelta(minutes=1):
            raise InvalidPolicy(
                detail=f"the schedule window must be a whole number of minutes, not {window!r}"
            )
        if not MIN_WINDOW <= window <= MAX_WINDOW:
            raise InvalidPolicy(
                detail=f"the schedule window is {_duration_text(window)}; it must be "
                f"{_duration_text(MIN_WINDOW)} to {_duration_text(MAX_WINDOW)}"
            )
        gap, between = self._shortest_gap()
        if window >= gap:
            raise InvalidPolicy(
                detail=f"the schedule window ({_duration_text(window)}) must be shorter than "
                f"the shortest gap between two runs ({_duration_text(gap)}, {between}), or "
                "a late backup would overlap the next one; shorten the window or space the "
                "runs further apart"
            )

    def _shortest_gap(self) -> tuple[timedelta, str]:
        """The shortest wall-clock gap from one slot to the next, and where it is."""
        if self.frequency is Frequency.DAILY:
            minutes = [t.hour * 60 + t.minute for t in self.times]
            labels = [f"{t:%H:%M}" for t in self.times]
            period = 24 * 60
        else:
            minutes = [day * 24 * 60 for day in self.weekdays]
            labels = [day.short for day in self.weekdays]
            period = 7 * 24 * 60
        gaps = [
            ((minutes[(i + 1) % len(minutes)] - minutes[i]) % period or period, i)
            for i in range(len(minutes))
        ]
        gap, i = min(gaps)
        if len(minutes) == 1:
            return timedelta(minutes=gap), f"from {labels[0]} to {labels[0]}"
        return timedelta(minutes=gap), f"from {labels[i]} to {labels[(i + 1) % len(labels)]}"

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def next_run_after(self, t: datetime) -> datetime:
        """The first slot strictly after the aware instant `t`, in UTC."""
        after = _as_utc(t, "t")
        candidates: list[datetime] = []
        try:
            start = after.astimezone(self.zone).date() - _DAY
            for offset in range(_SEARCH_DAYS):
                # The day after the first day with a candidate is the last that can beat it.
                last_chance = bool(candidates)
                candidates += [s for s in self._slots_on(start + offset * _DAY) if s > after]
                if last_chance:
                    break
        except OverflowError:
            pass
        if not candidates:
            raise InvalidArgument(detail=f"no scheduled run after {t} before the year 10000")
        return min(candidates)

    def last_run_at_or_before(self, t: datetime) -> datetime | None:
        """The last slot at or before the aware instant `t`, in UTC (None before the year 1)."""
        until = _as_utc(t, "t")
        candidates: list[datetime] = []
        try:
            start = until.astimezone(self.zone).date() + _DAY
            for offset in range(_SEARCH_DAYS):
                last_chance = bool(candidates)
                candidates += [s for s in self._slots_on(start - offset * _DAY) if s <= until]
                if last_chance:
                    break
        except OverflowError:
            pass
        return max(candidates, default=None)

    def runs_between(self, start: datetime, end: datetime) -> Iterator[datetime]:
        """The slots after `start` up to and including `end`, in order, in UTC."""
        last = _as_utc(end, "end")
        slot = self.next_run_after(start)
        while slot <= last:
            yield slot
            slot = self.next_run_after(slot)

    def slot_open_at(self, t: datetime) -> datetime | None:
        """The slot whose window is open at `t` (slot <= t < slot + window), or None."""
        slot = self.last_run_at_or_before(t)
        if slot is not None and _as_utc(t, "t") < slot + self.window:
            return slot
        return None

    def _slots_on(self, day: date) -> list[datetime]:
        """The UTC instants of the slots of the local date `day` (not sorted: DST can reorder)."""
        if self.frequency is Frequency.WEEKLY and day.weekday() not in self.weekdays:
            return []
        zone = self.zone
        return [datetime.combine(day, t, tzinfo=zone).astimezone(UTC) for t in self.times]

    def runs_on(self, weekday: Weekday) -> bool:
        return self.frequency is Frequency.DAILY or weekday in self.weekdays

    def describe(self) -> str:
        """One line for people: "daily at 02:00 Europe/Berlin"."""
        if self.frequency is Frequency.DAILY:
            text = f"daily at {', '.join(f'{t:%H:%M}' for t in self.times)} {self.timezone}"
        else:
            days = ", ".join(day.short for day in self.weekdays)
            text = f"weekly on {days} at {self.times[0]:%H:%M} {self.timezone}"
        if self.window != DEFAULT_WINDOW:
            text += f", window {_duration_text(self.window)}"
        return text

    def to_text(self) -> str:
        """The operator text form, which `parse_schedule` reads back."""
        words = [self.frequency.value]
        if self.frequency is Frequency.WEEKLY:
            words.append(",".join(day.short.lower() for day in self.weekdays))
        words += [_times_text(self.times), f"tz={self.timezone}"]
        if self.window != DEFAULT_WINDOW:
            words.append(f"window={_duration_text(self.window)}")
        return " ".join(words)

    def to_dict(self) -> dict[str, Any]:
        return {
            "frequency": self.frequency.value,
            "times": [f"{t:%H:%M}" for t in self.times],
            "weekdays": [day.key for day in self.weekdays],
            "timezone": self.timezone,
            "window_minutes": self.window // timedelta(minutes=1),
        }

    @classmethod
    def from_dict(cls, data: object) -> Schedule:
        d = _object(
            data, "schedule", {"frequency", "times"}, {"weekdays", "timezone", "window_minutes"}
        )
        minutes = _json_int(d.get("window_minutes", DEFAULT_WINDOW // timedelta(minutes=1)))
        try:
            window = timedelta(minutes=minutes)
        except OverflowError:
            raise InvalidPolicy(
                detail=f"schedule window_minutes {minutes} is out of range"
            ) from None
        return cls(
            frequency=_member(Frequency, _json_str(d["frequency"]), "schedule frequency", ""),
            times=tuple(_parse_time(_json_str(t), "schedule time") for t in _json_list(d["times"])),
            weekdays=tuple(Weekday.parse(_json_str(w)) for w in _json_list(d.get("weekdays", []))),
            timezone=_json_str(d.get("timezone", "UTC")),
            window=window,
        )


def parse_schedule(text: str) -> Schedule:
    """The schedule `text` gives: "daily 02:00,14:00 tz=Europe/Berlin" or "weekly sun,wed 03:00
    tz=UTC", optionally with "window=90m" (default 2h). Without tz= the zone is UTC."""
    usage = "write e.g. 'daily 02:00 tz=Europe/Berlin' or 'weekly sun,wed 03:00 tz=UTC'"
    words = text.split()
    if not words or words[0].lower() not in ("daily", "weekly"):
        raise InvalidPolicy(detail=f"schedule {text!r} must start with daily or weekly: {usage}")
    frequency = Frequency(words[0].lower())
    positional = 2 if frequency is Frequency.WEEKLY else 1
    if len(words) < 1 + positional or "=" in "".join(words[1 : 1 + positional]):
        what = "weekdays and a time" if frequency is Frequency.WEEKLY else "times"
        raise InvalidPolicy(detail=f"schedule {text!r} lacks its {what}: {usage}")
    weekdays: tuple[Weekday, ...] = ()
    if frequency is Frequency.WEEKLY:
        weekdays = tuple(Weekday.parse(w) for w in words[1].split(","))
    times = tuple(_parse_time(t, "schedule time") for t in words[positional].split(","))
    options: dict[str, str] = {}
    for word in words[1 + positional :]:
        key, sep, value = word.partition("=")
        if not sep or key not in ("tz", "window") or key in options:
            raise InvalidPolicy(
                detail=f"schedule {text!r}: unexpected {word!r}; after the times give only "
                "tz=<IANA zone> and window=<duration>, once each"
            )
        options[key] = value
    return Schedule(
        frequency=frequency,
        times=times,
        weekdays=weekdays,
        timezone=options.get("tz", "UTC"),
        window=_parse_duration(options["window"]) if "window" in options else DEFAULT_WINDOW,
    )


# --- retention rules -------------------------------------------------------------------------


@dataclass(frozen=True)
class DailyRule:
    """Keep every backup `days` days."""

    days: int

    def __post_init__(self) -> None:
        _check_count("daily", self.days, MAX_DAYS, "days")

    def describe(self) -> str:
        return f"daily {self.days} d"

    def to_text(self) -> str:
        return str(self.days)

    def to_dict(self) -> dict[str, Any]:
        return {"days": self.days}

    @classmethod
    def from_dict(cls, data: object) -> DailyRule:
        d = _object(data, "daily retention", {"days"}, set())
        return cls(days=_json_int(d["days"]))


@dataclass(frozen=True)
class WeeklyRule:
    """Keep the first backup of each of `weekdays` for `weeks` weeks."""

    weekdays: tuple[Weekday, ...]
    weeks: int

    def __post_init__(self) -> None:
        weekdays = _weekdays(self.weekdays, "weekly retention")
        if not weekdays:
            raise InvalidPolicy(detail="weekly retention needs at least one weekday, e.g. sun:104")
        object.__setattr__(self, "weekdays", weekdays)
        _check_count("weekly", self.weeks, MAX_WEEKS, "weeks")

    def describe(self) -> str:
        return f"weekly {', '.join(day.short for day in self.weekdays)} {self.weeks} w"

    def to_text(self) -> str:
        return f"{','.join(day.short.lower() for day in self.weekdays)}:{self.weeks}"

    def to_dict(self) -> dict[str, Any]:
        return {"weekdays": [day.key for day in self.weekdays], "weeks": self.weeks}

    @classmethod
    def from_dict(cls, data: object) -> WeeklyRule:
        d = _object(data, "weekly retention", {"weekdays", "weeks"}, set())
        return cls(
            weekdays=tuple(Weekday.parse(_json_str(w)) for w in _json_list(d["weekdays"])),
            weeks=_json_int(d["weeks"]),
        )


@dataclass(frozen=True)
class MonthlyRule:
    """Keep the first backup of one day of each month for `months` months.

    The day is week-based (`week` and `weekday`: the last Sunday) or day-based
    (`days_of_month`: 1 to 28, or `LAST_DAY` for the month's last day), never both.
    """

    months: int
    weekday: Weekday | None = None
    week: WeekOfMonth | None = None
    days_of_month: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_count("monthly", self.months, MAX_MONTHS, "months")
        _check_day_choice(self, "monthly")

    def selects(self, day: date) -> bool:
        """Whether `day` is the day of its month this rule keeps."""
        return _selects(self, day)

    def describe(self) -> str:
        return f"monthly {_day_choice_words(self)} {self.months} m"

    def to_text(self) -> str:
        return f"{_day_choice_text(self)}:{self.months}"

    def to_dict(self) -> dict[str, Any]:
        return {"months": self.months, **_day_choice_dict(self)}

    @classmethod
    def from_dict(cls, data: object) -> MonthlyRule:
        d = _object(data, "monthly retention", {"months"}, _DAY_CHOICE_KEYS)
        weekday, week, days = _day_choice_from_dict(d)
        return cls(_json_int(d["months"]), weekday, week, days)


@dataclass(frozen=True)
class YearlyRule:
    """Keep the first backup of one day of each of `months` (1 to 12) for `years` years.

    The day is chosen as in `MonthlyRule`: the first Sunday, or day 1, or the last day.
    """

    years: int
    months: tuple[int, ...]
    weekday: Weekday | None = None
    week: WeekOfMonth | None = None
    days_of_month: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_count("yearly", self.years, MAX_YEARS, "years")
        months = _unique_sorted(self.months, "yearly retention month")
        if not months or any(
            not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= 12 for m in months
        ):
            raise InvalidPolicy(
                detail=f"yearly retention needs months 1 to 12 (jan … dec), not {list(months)}"
            )
        object.__setattr__(self, "months", months)
        _check_day_choice(self, "yearly")

    def selects(self, day: date) -> bool:
        """Whether `day` is the day of one of the rule's months that this rule keeps."""
        return day.month in self.months and _selects(self, day)

    def describe(self) -> str:
        months = ", ".join(calendar.month_abbr[m] for m in self.months)
        return f"yearly {months} {_day_choice_words(self)} {self.years} y"

    def to_text(self) -> str:
        months = ",".join(_MONTHS[m - 1] for m in self.months)
        return f"{months}:{_day_choice_text(self)}:{self.years}"

    def to_dict(self) -> dict[str, Any]:
        return {"years": self.years, "months": list(self.months), **_day_choice_dict(self)}

    @classmethod
    def from_dict(cls, data: object) -> YearlyRule:
        d = _object(data, "yearly retention", {"years", "months"}, _DAY_CHOICE_KEYS)
        weekday, week, days = _day_choice_from_dict(d)
        months = tuple(_json_int(m) for m in _json_list(d["months"]))
        return cls(_json_int(d["years"]), months, weekday, week, days)


def days_in_month(year: int, month: int) -> int:
    return calendar.monthrange(year, month)[1]


def _selects(rule: MonthlyRule | YearlyRule, day: date) -> bool:
    last = days_in_month(day.year, day.month)
    if rule.week is not None:
        if day.weekday() != rule.weekday:
            return False
        if rule.week is WeekOfMonth.LAST:
            return day.day + 7 > last
        return (day.day - 1) // 7 == list(WeekOfMonth).index(rule.week)
    return day.day in rule.days_of_month or (day.day == last and LAST_DAY in rule.days_of_month)


@dataclass(frozen=True)
class Retention:
    """How long backups are kept: up to one rule of each kind, at least one."""

    daily: DailyRule | None = None
    weekly: WeeklyRule | None = None
    monthly: MonthlyRule | None = None
    yearly: YearlyRule | None = None

    def __post_init__(self) -> None:
        if not any((self.daily, self.weekly, self.monthly, self.yearly)):
            raise InvalidPolicy(
                detail="retention needs at least one rule (daily, weekly, monthly or yearly), "
                "e.g. keep every backup 30 days"
            )

    def describe(self) -> str:
        """One line for people: "daily 30 d · weekly Sun 104 w"."""
        rules = (self.daily, self.weekly, self.monthly, self.yearly)
        return " · ".join(rule.describe() for rule in rules if rule is not None)

    def to_options(self) -> dict[str, str]:
        """The rules as operator text, by kind; `parse_retention(**options)` reads them back."""
        rules = {
            "daily": self.daily,
            "weekly": self.weekly,
            "monthly": self.monthly,
            "yearly": self.yearly,
        }
        return {kind: rule.to_text() for kind, rule in rules.items() if rule is not None}

    def to_dict(self) -> dict[str, Any]:
        rules = {
            "daily": self.daily,
            "weekly": self.weekly,
            "monthly": self.monthly,
            "yearly": self.yearly,
        }
        return {kind: rule.to_dict() for kind, rule in rules.items() if rule is not None}

    @classmethod
    def from_dict(cls, data: object) -> Retention:
        d = _object(data, "retention", set(), {"daily", "weekly", "monthly", "yearly"})
        return cls(
            daily=None if d.get("daily") is None else DailyRule.from_dict(d["daily"]),
            weekly=None if d.get("weekly") is None else WeeklyRule.from_dict(d["weekly"]),
            monthly=None if d.get("monthly") is None else MonthlyRule.from_dict(d["monthly"]),
            yearly=None if d.get("yearly") is None else YearlyRule.from_dict(d["yearly"]),
        )


def parse_daily_rule(text: str) -> DailyRule:
    """ "30": keep every backup 30 days."""
    return DailyRule(_parse_count(text, "daily retention", "30"))


def parse_weekly_rule(text: str) -> WeeklyRule:
    """ "sun:104" or "sun,wed:104": keep those days' backups 104 weeks."""
    days, sep, count = text.partition(":")
    if not sep:
        raise InvalidPolicy(
            detail=f"weekly retention {text!r} must be <weekdays>:<weeks>, e.g. sun:104"
        )
    weekdays = tuple(Weekday.parse(day) for day in days.split(","))
    return WeeklyRule(weekdays, _parse_count(count, "weekly retention", "sun:104"))


def parse_monthly_rule(text: str) -> MonthlyRule:
    """ "last-sun:120", "day-1:12", "day-last:12" or "day-1,15:12"."""
    usage = "<day>:<months>, e.g. last-sun:120, day-1:12 or day-last:12"
    choice, sep, count = text.rpartition(":")
    if not sep:
        raise InvalidPolicy(detail=f"monthly retention {text!r} must be {usage}")
    weekday, week, days = _parse_day_choice(choice, "monthly retention", usage)
    return MonthlyRule(
        _parse_count(count, "monthly retention", "last-sun:120"), weekday, week, days
    )


def parse_yearly_rule(text: str) -> YearlyRule:
    """ "jan:first-sun:99", "jan,jul:day-1:10" or "feb:day-last:5"."""
    usage = "<months>:<day>:<years>, e.g. jan:first-sun:99 or dec:day-last:10"
    parts = text.split(":")
    if len(parts) != 3:
        raise InvalidPolicy(detail=f"yearly retention {text!r} must be {usage}")
    months = tuple(_parse_month(m) for m in parts[0].split(","))
    weekday, week, days = _parse_day_choice(parts[1], "yearly retention", usage)
    years = _parse_count(parts[2], "yearly retention", "jan:first-sun:99")
    return YearlyRule(years, months, weekday, week, days)


def parse_retention(
    *,
    daily: str | None = None,
    weekly: str | None = None,
    monthly: str | None = None,
    yearly: str | None = None,
) -> Retention:
    """The retention the operator options give (see the module docstring for their form)."""
    return Retention(
        daily=None if daily is None else parse_daily_rule(daily),
        weekly=None if weekly is None else parse_weekly_rule(weekly),
        monthly=None if monthly is None else parse_monthly_rule(monthly),
        yearly=None if yearly is None else parse_yearly_rule(yearly),
    )


# --- the policy ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """A named schedule with its retention; applying it to a VM protects the VM."""

    name: str
    schedule: Schedule
    retention: Retention

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise InvalidPolicy unless the name is valid and the rules fit the schedule."""
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise InvalidPolicy(
                detail=f"policy name {self.name!r} is invalid: use 1 to 64 letters, digits, "
                "'.', '_' or '-', starting with a letter or digit"
            )
        schedule, retention = self.schedule, self.retention
        if schedule.frequency is Frequency.WEEKLY:
            days = ", ".join(day.short for day in schedule.weekdays)
            if retention.daily is not None:
                raise InvalidPolicy(
                    detail=f"daily retention needs a daily schedule, but this one runs weekly "
                    f"(on {days}); drop the daily rule or schedule backups daily"
                )
            for kind, rule in (("monthly", retention.monthly), ("yearly", retention.yearly)):
                if rule is not None and rule.week is None:
                    raise InvalidPolicy(
                        detail=f"{kind} retention on {_day_choice_words(rule)} of the month "
                        f"needs a daily schedule, but this one runs weekly (on {days}); keep "
                        f"a weekday instead (e.g. last-{schedule.weekdays[0].short.lower()}) "
                        "or schedule backups daily"
                    )
        if retention.weekly is not None:
            missing = [day for day in retention.weekly.weekdays if not schedule.runs_on(day)]
            if missing:
                days = ", ".join(day.short for day in missing)
                scheduled = ", ".join(day.short for day in schedule.weekdays)
                raise InvalidPolicy(
                    detail=f"weekly retention keeps {days} backups, but the schedule runs only "
                    f"on {scheduled}; keep days the schedule runs on, or add {days} to the "
                    "schedule"
                )
        for kind, rule in (("monthly", retention.monthly), ("yearly", retention.yearly)):
            if rule is not None and rule.weekday is not None and not schedule.runs_on(rule.weekday):
                day = rule.weekday.short
                scheduled = ", ".join(d.short for d in schedule.weekdays)
                raise InvalidPolicy(
                    detail=f"{kind} retention keeps the {_day_choice_words(rule)} of the "
                    f"month, but the schedule runs only on {scheduled}; keep a scheduled "
                    f"weekday (e.g. {rule.week}-{schedule.weekdays[0].short.lower()}) or "
                    f"add {day} to the schedule"
                )

        # Every backup the schedule takes is kept by some rule at first: otherwise a backup
        # would complete and be pruned at once (Azure Backup has the same two rules).
        if schedule.frequency is Frequency.DAILY and retention.daily is None:
            raise InvalidPolicy(
                detail="a daily schedule needs a daily retention rule (e.g. --daily 30): "
                "without one, the backups of the days no other rule keeps would be deleted "
                "as soon as they are taken"
            )
        if schedule.frequency is Frequency.WEEKLY:
            kept = set(retention.weekly.weekdays) if retention.weekly else set()
            left = [day for day in schedule.weekdays if day not in kept]
            if left:
                days = ", ".join(day.short for day in left)
                raise InvalidPolicy(
                    detail=f"a weekly schedule needs a weekly retention rule for each day it "
                    f"runs; nothing would keep the {days} backups (e.g. --weekly "
                    f"{','.join(day.short.lower() for day in schedule.weekdays)}:12)"
                )

    def describe(self) -> tuple[str, str]:
        """The schedule and the retention, each in one line for people."""
        return self.schedule.describe(), self.retention.describe()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "schedule": self.schedule.to_dict(),
            "retention": self.retention.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: object) -> Policy:
        """The policy a `to_dict` (parsed JSON) gives; InvalidPolicy for anything malformed."""
        d = _object(data, "policy", {"name", "schedule", "retention"}, set())
        return cls(
            name=_json_str(d["name"]),
            schedule=Schedule.from_dict(d["schedule"]),
            retention=Retention.from_dict(d["retention"]),
        )


def default_policy(timezone: str = "UTC") -> Policy:
    """What a new vault starts with: a backup daily at 02:00, each kept 30 days."""
    return Policy(
        name=DEFAULT_POLICY_NAME,
        schedule=Schedule(Frequency.DAILY, (time(2, 0),), timezone=timezone),
        retention=Retention(daily=DailyRule(30)),
    )


# --- the day of the month a monthly or yearly rule keeps -------------------------------------

_DAY_CHOICE_KEYS = {"weekday", "week", "days_of_month"}


def _check_day_choice(rule: MonthlyRule | YearlyRule, kind: str) -> None:
    usage = "e.g. last-sun (week-based) or day-1 / day-last (day-based)"
    week_based = rule.week is not None or rule.weekday is not None
    if week_based == bool(rule.days_of_month):
        raise InvalidPolicy(
            detail=f"{kind} retention keeps either a weekday of a week of the month or days "
            f"of the month, exactly one of the two: {usage}"
        )
    if week_based:
        if rule.week is None or rule.weekday is None:
            raise InvalidPolicy(
                detail=f"{kind} retention needs both the week and the weekday: {usage}"
            )
        object.__setattr__(rule, "weekday", _member(Weekday, rule.weekday, "weekday", ""))
        week = _member(WeekOfMonth, rule.week, "week of the month", "")
        object.__setattr__(rule, "week", week)
        object.__setattr__(rule, "days_of_month", ())
        return
    days = _unique_sorted(rule.days_of_month, f"{kind} retention day of the month")
    for day in days:
        if not isinstance(day, int) or isinstance(day, bool) or not 0 <= day <= 28:
            raise InvalidPolicy(
                detail=f"{kind} retention day of the month {day!r} is out of range: use 1 to 28 "
                "(every month has them) or 'last' for the month's last day"
            )
    # The last day sorts last, as it falls last in the month.
    object.__setattr__(rule, "days_of_month", tuple(sorted(days, key=lambda d: d or 32)))


def _day_choice_words(rule: MonthlyRule | YearlyRule) -> str:
    if rule.week is not None and rule.weekday is not None:
        return f"{rule.week.value} {rule.weekday.short}"
    if rule.days_of_month == (LAST_DAY,):
        return "last day"
    return "day " + ", ".join(str(d) if d else "last" for d in rule.days_of_month)


def _day_choice_text(rule: MonthlyRule | YearlyRule) -> str:
    if rule.week is not None and rule.weekday is not None:
        return f"{rule.week.value}-{rule.weekday.short.lower()}"
    return "day-" + ",".join(str(d) if d else "last" for d in rule.days_of_month)


def _day_choice_dict(rule: MonthlyRule | YearlyRule) -> dict[str, Any]:
    return {
        "weekday": None if rule.weekday is None else rule.weekday.key,
        "week": None if rule.week is None else rule.week.value,
        "days_of_month": list(rule.days_of_month),
    }


def _day_choice_from_dict(
    d: Mapping[str, object],
) -> tuple[Weekday | None, WeekOfMonth | None, tuple[int, ...]]:
    weekday = d.get("weekday")
    week = d.get("week")
    return (
        None if weekday is None else Weekday.parse(_json_str(weekday)),
        None if week is None else _member(WeekOfMonth, _json_str(week), "week of the month", ""),
        tuple(_json_int(day) for day in _json_list(d.get("days_of_month", []))),
    )


def _parse_day_choice(
    text: str, kind: str, usage: str
) -> tuple[Weekday | None, WeekOfMonth | None, tuple[int, ...]]:
    first, sep, rest = text.lower().partition("-")
    if not sep:
        raise InvalidPolicy(detail=f"{kind} day {text!r} is not understood: write {usage}")
    if first == "day":
        days = []
        for word in rest.split(","):
            if word == "last":
                days.append(LAST_DAY)
            elif _COUNT.fullmatch(word) and int(word) != LAST_DAY:
                days.append(int(word))
            else:
                raise InvalidPolicy(
                    detail=f"{kind} day {word!r} is not 1 to 28 or 'last': write {usage}"
                )
        return None, None, tuple(days)
    if first not in {week.value for week in WeekOfMonth}:
        raise InvalidPolicy(
            detail=f"{kind} day {text!r}: {first!r} is not first, second, third, fourth, last "
            f"or day: write {usage}"
        )
    return Weekday.parse(rest), WeekOfMonth(first), ()


def _parse_month(text: str) -> int:
    key = text.strip().lower()
    for number, name in enumerate(calendar.month_name[1:], start=1):
        if key in (name.lower(), name.lower()[:3]):
            return number
    raise InvalidPolicy(detail=f"{text!r} is not a month: use jan, feb, … dec")


# --- checks and conversions ------------------------------------------------------------------


def _check_count(kind: str, value: object, maximum: int, unit: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise InvalidPolicy(
            detail=f"{kind} retention keeps backups 1 to {maximum} {unit}, not {value!r}"
        )


def _member(kind: type[_E], value: object, what: str, choices: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        allowed = choices or ", ".join(str(m.value) for m in kind)
        raise InvalidPolicy(detail=f"{what} {value!r} is not one of: {allowed}") from None


def _unique_sorted(values: object, what: str) -> tuple[Any, ...]:
    if not isinstance(values, tuple | list):
        raise InvalidPolicy(detail=f"{what}s must be a list, not {values!r}")
    seen: set[object] = set()
    for value in values:
        if value in seen:
            raise InvalidPolicy(detail=f"{what} {value!r} is listed twice; list each once")
        seen.add(value)
    try:
        return tuple(sorted(values))
    except TypeError:
        raise InvalidPolicy(detail=f"{what}s {values!r} are not all of one kind") from None


def _weekdays(values: object, what: str) -> tuple[Weekday, ...]:
    days = _unique_sorted(values, f"{what} weekday")
    return tuple(
        _member(Weekday, day, f"{what} weekday", "0 (Monday) to 6 (Sunday)") for day in days
    )


def _times(values: object) -> tuple[time, ...]:
    times = _unique_sorted(values, "schedule time")
    for t in times:
        if not isinstance(t, time) or t.tzinfo is not None or t.second or t.microsecond:
            raise InvalidPolicy(
                detail=f"schedule time {t!r} must be a local wall-clock time in whole minutes, "
                "like 02:00"
            )
    return tuple(t.replace(fold=0) for t in times)


def _times_text(times: tuple[time, ...]) -> str:
    return ",".join(f"{t:%H:%M}" for t in times)


def _parse_time(text: str, what: str) -> time:
    match = _TIME.fullmatch(text)
    if match is None:
        raise InvalidPolicy(detail=f"{what} {text!r} is not HH:MM (00:00 to 23:59)")
    return time(int(match[1]), int(match[2]))


def _duration_text(duration: timedelta) -> str:
    hours, minutes = divmod(duration // timedelta(minutes=1), 60)
    if not minutes:
        return f"{hours}h"
    return f"{hours}h{minutes}m" if hours else f"{minutes}m"


def _parse_duration(text: str) -> timedelta:
    match = _DURATION.fullmatch(text)
    if match is None or not text:
        raise InvalidPolicy(detail=f"window {text!r} is not a duration like 90m, 2h or 1h30m")
    return timedelta(hours=int(match[1] or 0), minutes=int(match[2] or 0))


def _parse_count(text: str, kind: str, example: str) -> int:
    if not _COUNT.fullmatch(text):
        raise InvalidPolicy(detail=f"{kind} {text!r}: the count must be a number, e.g. {example}")
    return int(text)


def _as_utc(t: datetime, what: str) -> datetime:
    if not isinstance(t, datetime) or t.utcoffset() is None:
        raise InvalidArgument(detail=f"{what} must be a timezone-aware datetime, not {t!r}")
    return t.astimezone(UTC)


def _object(data: object, what: str, required: set[str], optional: set[str]) -> dict[str, object]:
    if not isinstance(data, dict):
        raise InvalidPolicy(detail=f"{what} must be a JSON object, not {_json_kind(data)}")
    missing = sorted(required - data.keys())
    if missing:
        raise InvalidPolicy(detail=f"{what} lacks {', '.join(missing)}")
    unknown = sorted(str(key) for key in data.keys() - required - optional)
    if unknown:
        allowed = ", ".join(sorted(required | optional))
        raise InvalidPolicy(
            detail=f"{what} has unknown keys {', '.join(unknown)} (known: {allowed})"
        )
    return data


def _json_str(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidPolicy(detail=f"expected a string, got {_json_kind(value)} {value!r}")
    return value


def _json_int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidPolicy(detail=f"expected a whole number, got {_json_kind(value)} {value!r}")
    return value


def _json_list(value: object) -> list[object]:
    if not isinstance(value, list):
        raise InvalidPolicy(detail=f"expected a list, got {_json_kind(value)} {value!r}")
    return value


def _json_kind(value: object) -> str:
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    kinds |= {list: "a list", dict: "an object", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)
