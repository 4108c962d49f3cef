"""How the CLI shows things: readable tables by default, JSON for scripts.

Times are ISO 8601 with their UTC offset, in tables (to the second) and JSON (to the
microsecond) alike: in the local time zone, or in UTC with `coffer --utc` (`use_utc`). In JSON
every field a message has is present (an unset time or message is null), 64-bit numbers stay
numbers, and a `*_json` field of the API (a job's details, a policy's spec) is given as the
object it holds, under its name without the suffix.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, tzinfo
from typing import Any

import click
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from shared.errors import InvalidArgument
from shared.printable import shown

# Piped output keeps whole rows on one line (wrapped columns are unreadable in a log);
# scripts should use --json anyway.
console = Console(width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


_TIMESTAMP = Timestamp.DESCRIPTOR.full_name
_JSON_SUFFIX = "_json"


class _Zone:
    """The zone times are shown in: the local one, or UTC (`coffer --utc`)."""

    zone: tzinfo | None = None


def use_utc(utc: bool) -> None:
    _Zone.zone = UTC if utc else None


def iso(moment: datetime, *, precise: bool = False) -> str:
    """`moment` in ISO 8601 with its offset, in the zone times are shown in: to the second
    for people, to the microsecond (always all six digits, so they sort as text) for JSON."""
    timespec = "microseconds" if precise else "seconds"
    return moment.astimezone(_Zone.zone).isoformat(timespec=timespec)


def parse_time(value: str) -> datetime:
    """An ISO 8601 date or time as typed; without an offset, in the zone times are shown in."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidArgument(detail=f"{value!r} is not an ISO 8601 date or time") from exc
    try:
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=_Zone.zone) if _Zone.zone else parsed.astimezone()
        # Every time goes on the wire in UTC: one that is not a time there (0001-01-01 in a
        # zone east of UTC is before year 1) is refused here, not as a traceback later.
        parsed.astimezone(UTC)
    except (OverflowError, ValueError) as exc:
        raise InvalidArgument(
            detail=f"{value!r} is out of the range of times Coffer records ({exc})"
        ) from exc
    return parsed


def as_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data: every field present, names as in the proto.

    Unlike protobuf's JSON mapping, 64-bit integers stay numbers (byte counts read as numbers
    in scripts; Python and jq hold them exactly), times carry the offset of the zone shown
    (null when unset), and `*_json` strings become the objects they hold.
    """
    data = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _convert(message, data)


def _convert(message: Message, data: dict[str, Any]) -> dict[str, Any]:
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        repeated = field.is_repeated
        if field.type in _INT64 and field.name in data:
            data[field.name] = [int(v) for v in value] if repeated else int(value)
        elif field.message_type is not None and field.message_type.full_name == _TIMESTAMP:
            if repeated:
                data[field.name] = [_json_time(v, True) for v in value]
            else:
                data[field.name] = _json_time(value, message.HasField(field.name))
        elif field.name.endswith(_JSON_SUFFIX) and field.type == FieldDescriptor.TYPE_STRING:
            data.pop(field.name, None)
            data[field.name.removesuffix(_JSON_SUFFIX)] = json.loads(value) if value else None
        elif (
            field.message_type is not None
            and not field.message_type.GetOptions().map_entry
            and not repeated
            and field.name not in data
        ):
            data[field.name] = None  # an unset message (a job's restore, a vault's drill)
        elif (
            field.message_type is not None
            and not field.message_type.GetOptions().map_entry
            and field.name in data
        ):
            if repeated:
                pairs = zip(value, data[field.name], strict=True)
                data[field.name] = [_convert(v, d) for v, d in pairs]
            else:
                data[field.name] = _convert(value, data[field.name])
    return data


def plain(text: str) -> str:
    """Text the CLI did not write (names a VM's agent gave, messages of agents and of the
    controller) as it may reach a terminal: every character that is not printable, an escape
    sequence's ESC first, shown as `\\xNN`, line by line so a message of several lines keeps
    them. Printable text is left as it is, so text already made safe (shared.printable's
    `shown`) is not escaped twice. Issue 14: a name holding escape sequences reached the
    operator's terminal raw (window title, clear screen)."""
    return "\n".join(
        line if line.isprintable() else "".join(map(_printable_char, line))
        for line in text.split("\n")
    )


def _printable_char(char: str) -> str:
    return char if char.isprintable() else shown(char)


def safe(text: str) -> str:
    """`plain(text)` inside rich markup: its brackets print as themselves (a VM named `[/]`
    stopped `coffer items` with a markup error)."""
    return escape(plain(text))


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


class _Json:
    """Whether the command line asked for JSON (then errors are JSON too)."""

    requested = False


def _json_requested(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        _Json.requested = True
    return value


json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    callback=_json_requested,
    help="Print JSON for scripts (errors: JSON on stderr).",
)


def json_requested() -> bool:
    return _Json.requested


def print_error(code: str, message: str, exit_status: int, *, as_json: bool) -> None:
    """An error as the CLI reports it: a line for people, or JSON on stderr with the stable
    code, the message and the exit status, for scripts."""
    if as_json:
        document = {"error": {"code": code, "message": message, "exit_status": exit_status}}
        print(json.dumps(document, sort_keys=True), file=sys.stderr)
        return
    errors.print(
        f"[bold red]error[/bold red] ({safe(code)}): {safe(message)}",
        highlight=False,
        soft_wrap=True,
    )


def size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _json_time(stamp: Timestamp, present: bool) -> str | None:
    if not present or (stamp.seconds == 0 and stamp.nanos == 0):
        return None
    return iso(stamp.ToDatetime(tzinfo=UTC), precise=True)


def when(stamp: Timestamp, present: bool = True) -> str:
    """A time for people and scripts alike: ISO 8601 with its offset; "-" when unset."""
    if not present or (stamp.seconds == 0 and stamp.nanos == 0):
        return "-"
    return iso(stamp.ToDatetime(tzinfo=UTC))


def duration(start: Timestamp, end: Timestamp | None) -> str:
    began = start.ToDatetime(tzinfo=UTC)
    ended = end.ToDatetime(tzinfo=UTC) if end is not None else datetime.now(UTC)
    return span(max((ended - began).total_seconds(), 0.0))


def span(seconds: float) -> str:
    """A length of time: 4.2s, 3m07s, 2h05m00s."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    if not rows:
        console.print(Text(f"{plain(title)}: none", style="dim"))
        return
    grid = Table(title=Text(plain(title)), title_justify="left", header_style="bold")
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*(Text(plain(cell)) for cell in row))  # cells are data, never markup
    console.print(grid)
