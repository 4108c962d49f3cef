"""`coffer audit`: the controller's audit log of state-changing and refused calls."""

from __future__ import annotations

from datetime import UTC

import click
from google.protobuf.timestamp_pb2 import Timestamp

from controller.cli.client import Connection, call
from controller.cli.output import as_dict, parse_time, print_json, table, when
from shared.rpc import operator_pb2

MAX_ENTRIES = 10000


def _time(value: str | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(parse_time(value).astimezone(UTC))
    return stamp


@click.group()
def audit() -> None:
    """The audit log: who changed what, and every refused call."""


@audit.command(name="list")
@click.option("--from", "started_from", help="At or after (ISO date/time; local unless --utc).")
@click.option("--to", "started_to", help="Before (ISO date/time; local unless --utc).")
@click.option("--who", default="", help="Calls of this operator (or agent, or token) only.")
@click.option("--method", default="", help="Calls of this method only (e.g. BackupNow).")
@click.option(
    "--limit",
    default=100,
    show_default=True,
    type=click.IntRange(1, MAX_ENTRIES),
    help="Show the newest N.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def audit_list(
    connection: Connection,
    started_from: str | None,
    started_to: str | None,
    who: str,
    method: str,
    limit: int,
    as_json: bool,
) -> None:
    """Entries of the audit log, newest first (admin).

    Every call that changes state, with who made it (the name in their certificate), their
    role, the request (secrets left out), and its outcome; and every call refused.
    """
    request = operator_pb2.ListAuditRequest(
        who=who, method=method, limit=limit, to=_time(started_to)
    )
    begun = _time(started_from)
    if begun is not None:
        getattr(request, "from").CopyFrom(begun)
    reply = call(connection, lambda s: s.ListAudit(request))
    if as_json:
        print_json([as_dict(e) for e in reply.entries])
        return
    table(
        "Audit log",
        ("When", "Who", "Kind", "Role", "Method", "Arguments", "Outcome", "From"),
        [
            [
                when(e.at),
                e.who,
                e.kind,
                e.role or "-",
                e.method,
                e.arguments or "-",
                e.outcome if not e.message else f"{e.outcome}: {e.message}",
                e.peer or "-",
            ]
            for e in reply.entries
        ],
    )
