"""`coffer`: the operator CLI. Every command is one or a few calls to the operator API.

Output is a readable table by default and JSON with `--json`. Exit codes: 0 success, 2 bad
usage or argument, 3 the job failed or was cancelled, 4 not found, 5 conflicting state,
6 not allowed, 7 data integrity error, 8 controller or agent unreachable, 1 anything else.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from google.protobuf.timestamp_pb2 import Timestamp
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from controller.cli.client import Connection, call
from controller.cli.output import (
    as_dict,
    console,
    duration,
    errors,
    print_json,
    size,
    table,
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
    show_jobs,
    stop_protection,
    unregister,
)
from controller.cli.vaults import dashboard, vault
from shared.errors import CofferError, InvalidArgument
from shared.model import JobStatus, Operation
from shared.rpc import operator_pb2

JOB_FAILED_EXIT = 3

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--controller",
    envvar="COFFER_CONTROLLER",
    default="127.0.0.1:7443",
    show_default=True,
    help="Controller address (host:port); env COFFER_CONTROLLER.",
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
@click.pass_context
def cli(ctx: click.Context, controller: str, tls_dir: Path, server_name: str | None) -> None:
    """Coffer: back up and restore your VMs into vaults you run yourself."""
    ctx.obj = Connection(controller, tls_dir, server_name)


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
):
    cli.add_command(command)


def _job_row(job: operator_pb2.Job) -> list[str]:
    ended = job.HasField("ended_at")
    error = job.error_code  # the message is in `coffer job show`
    return [
        job.id,
        job.operation,
        job.status,
        job.vault,
        job.item or "-",
        when(job.started_at),
        duration(job.started_at, job.ended_at if ended else None),
        size(job.bytes_read),
        size(job.bytes_stored),
        error,
    ]


JOB_COLUMNS = (
    "Job",
    "Operation",
    "Status",
    "Vault",
    "Item",
    "Started",
    "Duration",
    "Read",
    "Stored",
    "Error",
)


def _show_job(job: operator_pb2.Job) -> None:
    lines = [
        ("Job", job.id),
        ("Operation", job.operation),
        ("Status", job.status),
        ("Vault", job.vault),
        ("Item", job.item or "-"),
        ("VM id", job.vm_id or "-"),
        ("Trigger", job.trigger or "-"),
        ("Started", when(job.started_at)),
        ("Ended", when(job.ended_at, job.HasField("ended_at"))),
        (
            "Duration",
            duration(job.started_at, job.ended_at if job.HasField("ended_at") else None),
        ),
        ("Bytes read", size(job.bytes_read)),
        ("Bytes sent", size(job.bytes_sent)),
        ("Bytes stored", size(job.bytes_stored)),
    ]
    if job.HasField("slot"):
        lines.append(("Schedule slot", when(job.slot)))
    if job.disks:
        lines.append(("Disks", ", ".join(job.disks)))
    if job.recovery_point_id:
        lines.append(("Recovery point", job.recovery_point_id))
    if job.error_code:
        lines.append(("Error", f"{job.error_code}: {job.error_message}"))
    details = json.loads(job.details_json or "{}")
    for key in sorted(details):
        value = details[key]
        if key == "report" and isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        lines.append((key.replace("_", " ").capitalize(), str(value)))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        console.print(f"[bold]{key.ljust(width)}[/bold]  {value}", highlight=False)


def _watch(connection: Connection, job: operator_pb2.Job, as_json: bool) -> operator_pb2.Job:
    """Follow the job until it ends, with a progress bar on a terminal."""
    request = operator_pb2.GetJobRequest(id=job.id)
    if as_json or not console.is_terminal:
        updates: list[operator_pb2.Job] = call(connection, lambda stub: [*stub.WatchJob(request)])
        return updates[-1]
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"{job.operation} {job.vm_id} ({job.id})", total=None)

        def follow(stub: Any) -> operator_pb2.Job:
            last = job
            for last in stub.WatchJob(request):
                progress = last.progress
                if progress.bytes_total:
                    bar.update(
                        task,
                        total=progress.bytes_total,
                        completed=progress.bytes_done,
                        description=f"{last.operation} {last.vm_id}: {progress.phase}",
                    )
            return last

        return call(connection, follow)


def _finish(job: operator_pb2.Job, as_json: bool) -> None:
    if as_json:
        print_json(as_dict(job))
    else:
        _show_job(job)
    if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        sys.exit(JOB_FAILED_EXIT)


@cli.command()
@json_option
@click.pass_obj
def agents(connection: Connection, as_json: bool) -> None:
    """VMs whose agents have enrolled: online or not, and their disks."""
    reply = call(connection, lambda s: s.ListAgents(operator_pb2.ListAgentsRequest()))
    if as_json:
        print_json([as_dict(a) for a in reply.agents])
        return
    table(
        "Agents",
        ("VM", "Service", "Region", "Online", "Last seen", "Disks", "Running job"),
        [
            [
                a.vm_id,
                a.service,
                a.region or "-",
                "yes" if a.online else "no",
                when(a.last_seen),
                ", ".join(f"{d.name} ({size(d.size_bytes)})" for d in a.disks) or "-",
                a.running_job_id or "-",
            ]
            for a in reply.agents
        ],
    )
    for a in reply.agents:
        for warning in a.warnings:
            click.echo(f"WARNING {a.vm_id}: {warning.code}: {warning.message}")


@cli.command(name="backup-now")
@click.argument("vms", nargs=-1, required=True)
@click.option("--vault", "vault_name", default="", help="The vault (default: each VM's own).")
@click.option("--disk", "disks", multiple=True, help="Back up only this disk (repeatable).")
@click.option("--no-wait", is_flag=True, help="Start the jobs and return at once.")
@json_option
@click.pass_obj
def backup_now(
    connection: Connection,
    vms: tuple[str, ...],
    vault_name: str,
    disks: tuple[str, ...],
    no_wait: bool,
    as_json: bool,
) -> None:
    """Back up protected VMS now (one job each); waits for the jobs and shows their progress."""
    request = operator_pb2.BackupNowRequest(vault=vault_name, vms=vms, disks=disks)
    started = list(call(connection, lambda s: s.BackupNow(request)).jobs)
    if not as_json:
        for job in started:
            console.print(
                f"Started backup job [bold]{job.id}[/bold] of {job.item or job.vm_id}",
                highlight=False,
            )
    if no_wait:
        show_jobs(started, as_json)
        return
    if len(started) == 1:
        _finish(_watch(connection, started[0], as_json), as_json)
        return
    show_jobs([_watch(connection, job, as_json) for job in started], as_json)


@cli.command()
@click.argument("vm_id")
@click.option("--rp", "rp_id", required=True, help="Recovery point id (`coffer rp list VM`).")
@click.option("--disk", required=True, help="Disk of the recovery point to restore.")
@click.option("--target", required=True, help="Path to write, on the target VM.")
@click.option("--target-vm", default="", help="VM to restore to (default: VM_ID itself).")
@click.option("--no-wait", is_flag=True, help="Start the job and return at once.")
@json_option
@click.pass_obj
def restore(
    connection: Connection,
    vm_id: str,
    rp_id: str,
    disk: str,
    target: str,
    target_vm: str,
    no_wait: bool,
    as_json: bool,
) -> None:
    """Restore a disk of one of VM_ID's recovery points to a path on a VM."""
    request = operator_pb2.RestoreRequest(
        vm_id=vm_id,
        recovery_point_id=rp_id,
        disk=disk,
        target_path=target,
        target_vm_id=target_vm,
    )
    job = call(connection, lambda s: s.Restore(request))
    if not as_json:
        console.print(f"Started restore job [bold]{job.id}[/bold]", highlight=False)
    _finish(job if no_wait else _watch(connection, job, as_json), as_json)


@cli.group()
def job() -> None:
    """Follow every operation as a job."""


def _time(value: str | None) -> Timestamp | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidArgument(detail=f"{value!r} is not an ISO date or time") from exc
    if parsed.tzinfo is None:
        parsed = parsed.astimezone()  # a local time, as the operator reads it
    stamp = Timestamp()
    stamp.FromDatetime(parsed.astimezone(UTC))
    return stamp


@job.command(name="list")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice([s.value for s in JobStatus]),
    help="Repeatable.",
)
@click.option(
    "--operation",
    "operations",
    multiple=True,
    type=click.Choice([o.value for o in Operation]),
    help="Repeatable.",
)
@click.option("--vm", "vm_id", default="", help="Jobs of this VM (id) only.")
@click.option("--vault", "vault_name", default="", help="Jobs of this vault only.")
@click.option("--from", "started_from", help="Started at or after (ISO date/time).")
@click.option("--to", "started_to", help="Started before (ISO date/time).")
@click.option("--limit", default=50, show_default=True)
@json_option
@click.pass_obj
def job_list(
    connection: Connection,
    statuses: tuple[str, ...],
    operations: tuple[str, ...],
    vm_id: str,
    vault_name: str,
    started_from: str | None,
    started_to: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Jobs, newest first, filtered by status, operation, vault, VM and start time."""
    request = operator_pb2.ListJobsRequest(
        status=statuses,
        operation=operations,
        vm_id=vm_id,
        vault=vault_name,
        started_from=_time(started_from),
        started_to=_time(started_to),
        limit=limit,
    )
    reply = call(connection, lambda s: s.ListJobs(request))
    if as_json:
        print_json([as_dict(j) for j in reply.jobs])
        return
    table("Jobs", JOB_COLUMNS, [_job_row(j) for j in reply.jobs])


@job.command(name="show")
@click.argument("job_id")
@json_option
@click.pass_obj
def job_show(connection: Connection, job_id: str, as_json: bool) -> None:
    """One job in full."""
    found = call(connection, lambda s: s.GetJob(operator_pb2.GetJobRequest(id=job_id)))
    if as_json:
        print_json(as_dict(found))
    else:
        _show_job(found)


@job.command(name="watch")
@click.argument("job_id")
@json_option
@click.pass_obj
def job_watch(connection: Connection, job_id: str, as_json: bool) -> None:
    """Follow a job until it ends."""
    found = call(connection, lambda s: s.GetJob(operator_pb2.GetJobRequest(id=job_id)))
    _finish(_watch(connection, found, as_json), as_json)


@job.command(name="cancel")
@click.argument("job_id")
@click.option("--no-wait", is_flag=True, help="Return once the cancel is asked for.")
@json_option
@click.pass_obj
def job_cancel(connection: Connection, job_id: str, no_wait: bool, as_json: bool) -> None:
    """Cancel a queued or running backup or restore (it leaves no recovery point), or a
    running prune or garbage collection (it stops between items)."""
    found = call(connection, lambda s: s.CancelJob(operator_pb2.GetJobRequest(id=job_id)))
    if not no_wait:
        found = _watch(connection, found, as_json)
    if as_json:
        print_json(as_dict(found))
    else:
        _show_job(found)


@cli.command()
@click.option("--vault", "vault_name", required=True)
@click.option("--no-wait", is_flag=True, help="Start the job and return at once.")
@json_option
@click.pass_obj
def prune(connection: Connection, vault_name: str, no_wait: bool, as_json: bool) -> None:
    """Apply the vault's retention now: delete the recovery points no rule keeps."""
    found = call(connection, lambda s: s.Prune(operator_pb2.VaultRef(name=vault_name)))
    _finish(found if no_wait else _watch(connection, found, as_json), as_json)


@cli.command()
@click.option("--vault", "vault_name", required=True)
@click.option("--no-wait", is_flag=True, help="Start the job and return at once.")
@json_option
@click.pass_obj
def gc(connection: Connection, vault_name: str, no_wait: bool, as_json: bool) -> None:
    """Reclaim the space of chunks no recovery point references (runs beside backups)."""
    found = call(connection, lambda s: s.CollectGarbage(operator_pb2.VaultRef(name=vault_name)))
    _finish(found if no_wait else _watch(connection, found, as_json), as_json)


@cli.group()
def rp() -> None:
    """Recovery points."""


@rp.command(name="list")
@click.argument("vm_id", required=False, default="")
@click.option("--vault", "vault_name", default="", help="Of this vault only.")
@json_option
@click.pass_obj
def rp_list(connection: Connection, vm_id: str, vault_name: str, as_json: bool) -> None:
    """Recovery points of VM_ID (or of every VM), oldest first."""
    request = operator_pb2.ListRecoveryPointsRequest(vm_id=vm_id, vault=vault_name)
    reply = call(connection, lambda s: s.ListRecoveryPoints(request))
    if as_json:
        print_json([as_dict(p) for p in reply.recovery_points])
        return
    table(
        "Recovery points",
        ("Recovery point", "VM", "Created", "Consistency", "Disks", "Stored", "Kept by", "Job"),
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
                p.job_id,
            ]
            for p in reply.recovery_points
        ],
    )


def main() -> None:
    try:
        cli(prog_name="coffer")
    except CofferError as exc:
        errors.print(f"[bold red]error[/bold red] ({exc.code}): {exc}", highlight=False)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
