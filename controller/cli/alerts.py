"""`coffer alerts`: what is failing or at risk now, and what was (controller/alerts)."""

from __future__ import annotations

import click

from controller.cli.client import Connection, call
from controller.cli.output import as_dict, json_option, print_json, table, when
from shared.rpc import operator_pb2

MAX_ALERTS = 10000


@click.command()
@click.option("--all", "include_resolved", is_flag=True, help="Resolved alerts too.")
@click.option(
    "--limit",
    default=100,
    show_default=True,
    type=click.IntRange(1, MAX_ALERTS),
    help="Show at most N.",
)
@json_option
@click.pass_obj
def alerts(connection: Connection, include_resolved: bool, limit: int, as_json: bool) -> None:
    """Alerts: firing ones (newest first), and with --all resolved ones after them.

    Raised when a backup or restore fails, a VM has no recovery point as recent as its policy
    promises, an agent stays offline, or recovery points are found damaged; resolved when the
    condition clears. The same alerts go to MQTT, webhooks and e-mail ([alerts] in the
    controller's config).
    """
    request = operator_pb2.ListAlertsRequest(include_resolved=include_resolved, limit=limit)
    reply = call(connection, lambda s: s.ListAlerts(request))
    if as_json:
        print_json([as_dict(a) for a in reply.alerts])
        return
    table(
        "Alerts",
        ("State", "Severity", "Alert", "Vault", "Item", "Summary", "Raised", "Resolved"),
        [
            [
                a.state,
                a.severity,
                a.kind,
                a.vault or "-",
                a.item or "-",
                a.summary,
                when(a.raised_at),
                when(a.resolved_at, a.HasField("resolved_at")),
            ]
            for a in reply.alerts
        ],
    )
