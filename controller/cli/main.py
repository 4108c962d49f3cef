"""`coffer`: the operator CLI. Every command is one or a few calls to the operator API.

Output is a readable table by default and JSON with `--json` (`controller.cli.output`); times
are ISO 8601 with their offset, local or `--utc`. Every call has a deadline (`--timeout`,
`controller.cli.client`). Exit codes follow the class of the failure, for refused calls and
failed jobs alike (`controller.cli.exits`, the table in README.md).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

from controller.cli import exits
from controller.cli.alerts import alerts
from controller.cli.audit import audit
from controller.cli.client import DEFAULT_TIMEOUT, Connection, call, pages
from controller.cli.deleted import show_deleted, undelete
from controller.cli.enrol import enrol
from controller.cli.files import files
from controller.cli.integrity import verification_cell, verify
from controller.cli.jobs import backup_now, copy, drill, gc, job, prune, restore
from controller.cli.output import (
    as_dict,
    json_option,
    json_requested,
    plain,
    print_error,
    print_json,
    size,
    table,
    use_utc,
    when,
)
from controller.cli.pki import pki
from controller.cli.protection import (
    discover,
    items,
    policy,
    protect,
    register,
    resume_protection,
    stop_protection,
    unregister,
)
from controller.cli.vaults import dashboard, drill_cell, vault
from controller.cli.web import web
from shared.daemon import leave
from shared.errors import CofferError
from shared.rpc import operator_pb2
from shared.rpc.operator_pb2_grpc import OperatorServiceStub
from shared.version import coffer_version


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=exits.help_text(),
)
@click.option(
    "--controller",
    envvar="COFFER_CONTROLLER",
    default="127.0.0.1:7445",
    show_default=True,
    help="Controller address (host:port): its operator listener (`operator_listen`, where "
    "agents cannot crowd operators out), or its `listen`; env COFFER_CONTROLLER.",
)
@click.option(
    "--tls-dir",
    envvar="COFFER_TLS_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/etc/coffer/pki"),
    show_default=True,
    help="Directory with ca.crt, operator.crt, operator.key; env COFFER_TLS_DIR.",
)
@click.option("--server-name", envvar="COFFER_SERVER_NAME", help="TLS name of the controller.")
@click.option(
    "--timeout",
    envvar="COFFER_TIMEOUT",
    type=click.FloatRange(min=0, min_open=True, max=86400),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for the controller's answer (a watch: for its next update); "
    "env COFFER_TIMEOUT.",
)
@click.option(
    "--utc",
    is_flag=True,
    envvar="COFFER_UTC",
    help="Show and read times in UTC instead of the local time zone; env COFFER_UTC.",
)
@click.version_option(coffer_version(), prog_name="coffer", message="%(prog)s %(version)s")
@click.pass_context
def cli(
    ctx: click.Context,
    controller: str,
    tls_dir: Path,
    server_name: str | None,
    timeout: float,
    utc: bool,
) -> None:
    """Coffer: back up and restore your VMs into vaults you run yourself.

    Tables by default, JSON with --json. Times are ISO 8601 with their UTC offset. A job id
    may be shortened to a unique prefix of 4 or more characters.
    """
    use_utc(utc)
    ctx.obj = Connection(controller, tls_dir, server_name, timeout)


cli.add_command(pki)
for command in (
    vault,
    dashboard,
    discover,
    register,
    unregister,
    items,
    policy,
    protect,
    stop_protection,
    resume_protection,
    backup_now,
    restore,
    drill,
    files,
    job,
    prune,
    gc,
    verify,
    copy,
    undelete,
    enrol,
    audit,
    web,
    alerts,
):
    cli.add_command(command)


# What `coffer agents` shows without --all: more than a screen, and a table of 500 rows took
# rich half a second to lay out (issue 13: `coffer agents` must answer within a second).
FIRST_PAGE_ROWS = 100


@cli.command()
@click.option(
    "--all",
    "every",
    is_flag=True,
    help="Every enrolled VM, page after page (without: the first page, and how many more).",
)
@json_option
@click.pass_obj
def agents(connection: Connection, every: bool, as_json: bool) -> None:
    """Enrolled VMs and their agents.

    Every VM whose agent has enrolled: online or not, and its disks. A large fleet is shown a
    page at a time: the first 100, with `--all` every VM; `--json` always gives every VM.
    """
    every = every or as_json

    def page(stub: OperatorServiceStub, token: str) -> operator_pb2.ListAgentsReply:
        reply: operator_pb2.ListAgentsReply = stub.ListAgents(
            operator_pb2.ListAgentsRequest(
                page_token=token, page_size=0 if every else FIRST_PAGE_ROWS
            )
        )
        return reply

    replies = call(connection, lambda s: pages(s, page, every=every))
    found = [a for reply in replies for a in reply.agents]
    if as_json:
        print_json([as_dict(a) for a in found])
        return
    table(
        "Agents",
        ("VM", "Name", "Region", "Online", "Last seen", "Disks", "Running job"),
        [
            [
                a.vm_id,
                f"{a.service}/{a.name}" if a.service else a.name,
                a.region or "-",
                "yes" if a.online else "no",
                when(a.last_seen),
                ", ".join(f"{d.name} ({size(d.size_bytes)})" for d in a.disks) or "-",
                a.running_job_id or "-",
            ]
            for a in found
        ],
    )
    for a in found:
        for warning in a.warnings:
            click.echo(f"WARNING {a.vm_id}: {plain(warning.code)}: {plain(warning.message)}")
    if replies[-1].next_page_token:
        click.echo(
            f"{len(found)} of {replies[-1].total} enrolled VMs shown; "
            "`coffer agents --all` shows every one (`--json` for scripts)."
        )


RP_COLUMNS = (
    "Recovery point", "VM", "Created", "Consistency", "Disks", "Stored", "Kept by", "Integrity",
    "Copy", "Last drill", "Job",
)  # fmt: skip


def copy_cell(point: operator_pb2.RecoveryPoint) -> str:
    """Whether a point is in its vault's off-site copy: copied when, pending, or no copy."""
    if not point.copy_target:
        return "-"
    if point.HasField("copied_at"):
        return f"copied {when(point.copied_at)}"
    return "pending"


@cli.group()
def rp() -> None:
    """Recovery points."""


@rp.command(name="list")
@click.argument("vm_id", required=False, default="")
@click.option("--vault", "vault_name", default="", help="Of this vault only.")
@click.option(
    "--deleted",
    is_flag=True,
    help="The soft-deleted points instead, with when each is purged (`coffer undelete`).",
)
@json_option
@click.pass_obj
def rp_list(
    connection: Connection, vm_id: str, vault_name: str, deleted: bool, as_json: bool
) -> None:
    """Recovery points of VM_ID (or of every VM), oldest first.

    With what the last verify found of each (`coffer verify`): verified when, damaged (how
    many chunks are missing or corrupt), healed (stored again, a verify pending), or never
    verified; and whether it is in its vault's off-site copy (copied when, or pending). With
    --deleted, the soft-deleted points, which `coffer undelete` brings back until they are
    purged.
    """
    request = operator_pb2.ListRecoveryPointsRequest(vm_id=vm_id, vault=vault_name, deleted=deleted)
    reply = call(connection, lambda s: s.ListRecoveryPoints(request))
    if as_json:
        print_json([as_dict(p) for p in reply.recovery_points])
        return
    if deleted:
        show_deleted(list(reply.recovery_points))
        return
    table(
        "Recovery points",
        RP_COLUMNS,
        [
            [
                p.id,
                p.vm_id,
                when(p.created_at),
                p.consistency,
                ", ".join(
                    f"{d.name} ({size(d.size_bytes)}"
                    + (f", {d.consistency})" if d.consistency else ")")
                    for d in p.disks
                ),
                size(p.bytes_stored),
                ", ".join(p.kept_by) or "-",
                verification_cell(p),
                copy_cell(p),
                drill_cell(p.last_drill) if p.HasField("last_drill") else "-",
                p.job_id,
            ]
            for p in reply.recovery_points
        ],
    )


def main() -> NoReturn:
    """Run the CLI. A refused call or a bad command line is one line on stderr and its exit
    code; with --json that line is JSON: {"error": {"code", "message", "exit_status"}}."""
    try:
        code = cli.main(prog_name="coffer", standalone_mode=False)
    except CofferError as exc:
        print_error(exc.code, str(exc), exc.exit_code, as_json=_json_errors())
        leave(exc.exit_code)
    except click.ClickException as exc:  # a usage error: exit 2
        if not _json_errors():
            exc.show()
        else:
            print_error(USAGE_ERROR, exc.format_message(), exc.exit_code, as_json=True)
        leave(exc.exit_code)
    except click.Abort:
        print_error("Aborted", "aborted", 1, as_json=_json_errors())
        leave(1)
    except SystemExit as exc:  # a command's own exit status (that of the jobs it ran)
        if exc.code is None or isinstance(exc.code, int):
            leave(exc.code or 0)
        raise
    leave(code if isinstance(code, int) else 0)


# What a command line that click refused is called in a JSON error (not an API error code).
USAGE_ERROR = "UsageError"


def _json_errors() -> bool:
    # The option's callback may not have run when parsing failed before it: look at the line.
    return json_requested() or "--json" in sys.argv[1:]


if __name__ == "__main__":
    main()
