"""`coffer job …`, `backup-now`, `restore`, `prune`, `gc`: jobs, and how they read.

A job is shown as labelled fields, its details included (a garbage collection's report as
its own fields), and only what is true of it: a backup names a recovery point only when it
made one, and the bytes a failed or cancelled backup uploaded are labelled as not kept
(nothing references them; garbage collection reclaims them). `--json` gives the job as the
API has it, its details as an object. A command that waits for jobs exits with the exit code
of the first that failed (`controller.cli.exits`).

Job ids may be shortened to a unique prefix of at least 4 characters; the controller resolves
it (and lists the candidates when it is ambiguous).
"""

from __future__ import annotations

import json
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import click
from google.protobuf.timestamp_pb2 import Timestamp
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from controller.cli import exits
from controller.cli.client import Connection, call, watch
from controller.cli.output import (
    as_dict,
    console,
    duration,
    iso,
    json_option,
    parse_time,
    print_json,
    safe,
    size,
    span,
    table,
    when,
)
from shared.model import JobStatus, Operation, RestoreMode
from shared.rpc import operator_pb2

job_id_argument = click.argument("job_id", metavar="JOB")
MAX_JOB_LIMIT = 10000

# --- how a job reads -------------------------------------------------------------------------

Field = tuple[str, str]


def _kept(job: operator_pb2.Job) -> bool:
    """Whether what a backup stored is kept: only a completed backup's recovery point is."""
    return JobStatus(job.status).succeeded or not JobStatus(job.status).ended


def _stored_cell(job: operator_pb2.Job) -> str:
    if job.operation == Operation.COPY:
        return f"{size(job.bytes_sent)} sent" if job.bytes_sent else "-"
    if job.operation == Operation.GARBAGE_COLLECTION:
        return f"{size(job.bytes_stored)} freed" if job.bytes_stored else "-"
    if job.operation != Operation.BACKUP:
        return "-"
    if not _kept(job) and job.bytes_stored:
        return f"{size(job.bytes_stored)} not kept"
    return size(job.bytes_stored)


def _read_cell(job: operator_pb2.Job) -> str:
    reads = (
        Operation.BACKUP,
        Operation.RESTORE,
        Operation.RESTORE_DRILL,
        Operation.FILE_RECOVERY,
        Operation.COPY,
    )
    return size(job.bytes_read) if job.operation in reads else "-"


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


def job_row(job: operator_pb2.Job) -> list[str]:
    return [
        job.id,
        job.operation,
        job.status,
        job.vault,
        job.item or "-",
        when(job.started_at),
        duration(job.started_at, job.ended_at if job.HasField("ended_at") else None),
        _read_cell(job),
        _stored_cell(job),
        job.error_code,  # the message is in `coffer job show`
    ]


def _bytes(job: operator_pb2.Job) -> list[Field]:
    if job.operation == Operation.BACKUP:
        lines = [("Bytes read", size(job.bytes_read)), ("Bytes sent", size(job.bytes_sent))]
        if _kept(job):
            lines.append(("Bytes stored", size(job.bytes_stored)))
        elif job.bytes_stored:
            lines.append(
                (
                    "Uploaded, not kept",
                    f"{size(job.bytes_stored)} (no recovery point references it; garbage "
                    "collection reclaims it)",
                )
            )
        return lines
    if job.operation in (Operation.RESTORE, Operation.RESTORE_DRILL):
        if not job.HasField("restore"):  # recorded before restores said more
            return [("Bytes written", size(job.bytes_read))]
        restored = job.restore
        lines = []
        if restored.mode == RestoreMode.IN_PLACE:
            lines.append(
                ("Bytes compared", f"{size(restored.bytes_compared)} (read from the disk)")
            )
        lines += [
            ("Bytes fetched", f"{size(restored.bytes_fetched)} (from the datastore, as stored)"),
            ("Bytes written", size(restored.bytes_written)),
        ]
        return lines
    if job.operation == Operation.FILE_RECOVERY:
        return [("Fetched", f"{size(job.bytes_read)} from the datastore")]
    if job.operation == Operation.COPY:
        return [
            ("Read", f"{size(job.bytes_read)} from the datastore"),
            ("Sent", f"{size(job.bytes_sent)} to the copy"),
        ]
    return []  # a garbage collection's space freed is in its report


_MODES = {
    RestoreMode.NEW_IMAGE: "to an image",
    RestoreMode.IN_PLACE: "in place (the VM's own disk, only differing chunks fetched)",
    RestoreMode.DRILL: "drill (restored to scratch, checked read-only, deleted)",
}


def _restore_target(job: operator_pb2.Job) -> list[Field]:
    """What a restore or drill restored where."""
    if not job.HasField("restore"):
        return []
    restored = job.restore
    fields: list[Field] = [
        ("Mode", _MODES.get(RestoreMode(restored.mode), restored.mode)),
        ("Source VM", restored.source_vm_id),
        ("Disk", ", ".join(job.disks) or "-"),
    ]
    if restored.mode == RestoreMode.DRILL:
        fields += [
            ("Drill agent", restored.target_vm_id),
            ("Scratch directory", restored.target_path),
        ]
    elif restored.mode == RestoreMode.IN_PLACE:
        fields.append(("Disk path", restored.target_path or "-"))
    else:
        fields += [
            ("Target VM", restored.target_vm_id),
            ("Target path", restored.target_path),
            ("Overwrite", "yes" if restored.overwrite else "no"),
        ]
    return fields


def _recovery_point(job: operator_pb2.Job) -> list[Field]:
    if not job.recovery_point_id:
        return []
    if job.operation == Operation.RESTORE:
        return [("Restored from", f"recovery point {job.recovery_point_id}")]
    if job.operation == Operation.RESTORE_DRILL:
        return [("Drilled", f"recovery point {job.recovery_point_id}")]
    if job.operation == Operation.FILE_RECOVERY:
        return [("Files of", f"recovery point {job.recovery_point_id}")]
    if job.operation == Operation.BACKUP and not JobStatus(job.status).succeeded:
        return []  # only a completed backup made one
    return [("Recovery point", job.recovery_point_id)]


def _seconds(value: Any) -> str:
    return span(float(value))


def _hours(value: Any) -> str:
    seconds = float(value)
    return f"{seconds / 3600:g} h" if seconds >= 3600 and seconds % 3600 == 0 else span(seconds)


def _moment(value: Any) -> str:
    return iso(datetime.fromtimestamp(float(value), UTC))


def _listed(value: Any) -> str:
    return ", ".join(map(str, value)) if value else "none"


# A garbage collection's report (controller.datastore.gc.GcReport), field by field.
_GC_REPORT: dict[str, tuple[str, Callable[[Any], str]]] = {
    "recovery_points": ("Recovery points marked", str),
    "referenced_chunks": ("Chunks referenced", str),
    "chunks_seen": ("Chunks in the datastore", str),
    "chunks_deleted": ("Chunks deleted", str),
    "bytes_freed": ("Space freed", size),
    "kept_in_grace": ("Kept: younger than the grace period", str),
    "kept_held": ("Kept: held by running jobs", str),
    "orphan_indexes_deleted": ("Indexes of unfinished backups deleted", str),
    "seconds": ("Took", _seconds),
}

# A verify's findings (controller.verification), field by field.
_VERIFY_REPORT: dict[str, tuple[str, Callable[[Any], str]]] = {
    "recovery_points_verified": ("Recovery points whole", str),
    "recovery_points_damaged": ("Recovery points damaged", str),
    "recovery_points_deleted_meanwhile": ("Deleted while it ran (skipped)", str),
    "chunks_checked": ("Chunks read", str),
    "chunks_missing_or_corrupt": ("Chunks missing or corrupt", str),
    "seconds": ("Took", _seconds),
}

# A vault upgrade's (controller.upgrades): what it did, what it would do, where it is.
_UPGRADE_REPORT: dict[str, tuple[str, Callable[[Any], str]]] = {
    "recovery_points_converted": ("Recovery points converted", str),
    "chunks_converted": ("Chunks converted", str),
    "chunks_already_converted": ("Chunks converted before", str),
    "chunks_unreadable": ("Chunks unreadable (their points stay damaged)", str),
    "objects_written": ("Objects written", str),
    "bytes_read": ("Read", size),
    "bytes_written": ("Written", size),
    "seconds": ("Took", _seconds),
    "rate_mb_per_second": ("Rate, MB/s", str),
    "objects_per_second": ("Rate, objects/s", str),
}
_UPGRADE_PLAN: dict[str, tuple[str, Callable[[Any], str]]] = {
    "recovery_points": ("Recovery points", str),
    "disk_indexes": ("Disk indexes", str),
    "chunks": ("Chunks", str),
    "stored_bytes": ("Stored bytes", size),
    "objects": ("Objects to write", str),
    "sampled_chunks": ("Rate measured on (chunks)", str),
    "rate_mb_per_second": ("Measured rate, MB/s", str),
    "objects_per_second": ("Measured rate, objects/s", str),
    "estimated_seconds": ("Estimated time", _seconds),
}
# A copy's totals (controller.copies), field by field.
_COPY_REPORT: dict[str, tuple[str, Callable[[Any], str]]] = {
    "recovery_points_copied": ("Recovery points copied", str),
    "recovery_points_in_copy": ("Recovery points in the copy", str),
    "recovery_points_deleted": ("Deleted from the copy", str),
    "chunks_sent": ("Chunks sent", str),
    "chunk_bytes_sent": ("Chunk bytes sent", size),
    "chunks_already_there": ("Chunks the copy had", str),
    "chunks_asked": ("Chunks asked about", str),
    "indexes_and_manifests_sent": ("Indexes and manifests sent", str),
    "bytes_sent": ("Bytes sent", size),
    "bytes_read": ("Bytes read", size),
    "seconds": ("Took", _seconds),
}

# Reports jobs record as one object each: a title and their fields.
_REPORTS = {
    "report": ("Garbage collection", _GC_REPORT),
    "verification": ("Verification", _VERIFY_REPORT),
    "upgrade": ("Upgrade", _UPGRADE_REPORT),
    "plan": ("Would rewrite", _UPGRADE_PLAN),
    "copy": ("Copy", _COPY_REPORT),
    "copy_gc": ("Garbage collection of the copy", _GC_REPORT),
}


def _reads(value: Any) -> str:
    """How a backup read one disk (controller.jobs.backup: `reads`)."""
    if not isinstance(value, dict):
        return _value(value)
    read = f"{size(value.get('bytes_read', 0))} of {size(value.get('size_bytes', 0))} read"
    if value.get("changed_blocks"):
        return f"changed blocks only, {read}"
    return f"in full ({value.get('full_read_reason') or 'no reason recorded'}), {read}"


# Per-disk details: an object of disk names, each shown on its own line.
_PER_DISK: dict[str, tuple[str, Callable[[Any], str]]] = {
    "reads": ("Disk reads", _reads),
}

# The details jobs record, by key: a label and how the value reads. `None` hides a key: a
# backup's pending recovery point id is not a recovery point until the backup completes.
_DETAILS: dict[str, tuple[str, Callable[[Any], str]] | None] = {
    "trigger": ("Trigger", str),
    "slot": ("Scheduled for", _moment),
    "phase": ("Phase", str),
    "disks": ("Disks", _listed),
    "frozen_ms": ("File systems frozen", lambda v: f"{float(v):g} ms"),
    "warnings": ("Warnings", lambda v: "; ".join(map(str, v)) if v else "none"),
    "discovered": ("VMs discovered", _listed),
    "policy": ("Policy", str),
    "previous_policy": ("Previous policy", str),
    "deleted_recovery_points": ("Recovery points deleted", _listed),
    "after_job": ("After backup", str),
    "grace_seconds": ("Grace period", _hours),
    "source_vm": ("Source VM", str),
    "disk": ("Disk", str),
    "target_path": ("Target path", str),
    "checks": ("File system checks", lambda v: "; ".join(map(str, v)) if v else "none"),
    "recovery_points": ("Recovery points to verify", str),
    "damaged": ("Damaged", str),
    # A FileRecovery job's (controller.jobs.file_recovery).
    "action": ("Action", str),
    "path": ("Path", str),
    "after": ("After", str),
    "paths": ("Paths", _listed),
    "destination": ("Destination", str),
    "ttl_seconds": ("TTL", _hours),
    "expires_at": ("Expires", _moment),
    "mounts": ("Mounted at", str),
    "skipped_partitions": ("Not mounted", str),
    "entries": ("Entries listed", str),
    "copied": ("Copied", str),
    "skipped_files": ("Skipped files", _listed),
    "chunks_fetched": ("Chunks fetched", str),
    "bytes_fetched": ("Fetched, stored bytes", size),
    "raw_bytes_fetched": ("Fetched, uncompressed", size),
    "ended_by": ("Ended by", str),
    # Off-site copies (controller.copies), and jobs that read a copy.
    "copy_target": ("Copy target", str),
    "copy_location": ("Copy at", str),
    "from_copy": ("Read from the copy", str),
    "passes": ("Passes", str),
    "copied_recovery_points": ("Recovery points copied", str),
    "deleted_from_copy": ("Deleted from the copy", str),
    "damaged_chunks_sent_again": ("Damaged chunks sent again", str),
    "recovery_point_id": None,
    # A VaultUpgrade job's (controller.upgrades).
    "from_format": ("From datastore format", str),
    "to_format": ("To datastore format", str),
    "dry_run": ("Dry run", lambda v: "yes: nothing was changed" if v else "no"),
    "resumed_from": ("Takes up job", str),
    "waiting_for": ("Waiting for", str),
}


def _value(value: Any) -> str:
    if isinstance(value, list):
        return _listed(value)
    if value is None:
        return "-"
    return str(value)


def _label(key: str) -> str:
    return key.replace("_", " ").capitalize()


def _ordered(data: dict[str, Any], known: Iterable[str]) -> list[tuple[str, Any]]:
    """The known keys in their order, then the others as they come."""
    order = {key: n for n, key in enumerate(known)}
    return sorted(data.items(), key=lambda item: order.get(item[0], len(order)))


def detail_fields(details: dict[str, Any]) -> list[Field]:
    """A job's details as labelled fields; nested objects as indented fields of their own."""
    fields: list[Field] = []
    for key, value in _ordered(details, [*_DETAILS, *_PER_DISK, *_REPORTS]):
        if key in _REPORTS and isinstance(value, dict):
            title, labels = _REPORTS[key]
            fields.append((title, ""))
            for name, item in _ordered(value, labels):
                label, show = labels.get(name, (_label(name), _value))
                fields.append((f"  {label}", show(item)))
            continue
        if key in _PER_DISK and isinstance(value, dict):
            label, show = _PER_DISK[key]
            fields.append((label, ""))
            fields += [(f"  {disk}", show(item)) for disk, item in value.items()]
            continue
        if key in _DETAILS and _DETAILS[key] is None:
            continue
        known = _DETAILS.get(key)
        if isinstance(value, dict):
            fields.append((known[0] if known else _label(key), ""))
            fields += [(f"  {name}", _value(item)) for name, item in value.items()]
            continue
        label, show = known if known else (_label(key), _value)
        fields.append((label, show(value)))
    return fields


def show_job(job: operator_pb2.Job) -> None:
    ended = job.HasField("ended_at")
    fields: list[Field] = [
        ("Job", job.id),
        ("Operation", job.operation),
        ("Status", job.status),
        ("Vault", job.vault),
        ("Item", job.item or "-"),
        ("VM id", job.vm_id or "-"),
        ("Requested by", job.requested_by or "-"),
        ("Started", when(job.started_at)),
        ("Ended", when(job.ended_at, ended)),
        ("Duration", duration(job.started_at, job.ended_at if ended else None)),
        *_restore_target(job),
        *_bytes(job),
        *_recovery_point(job),
    ]
    if job.error_code:
        fields.append(("Error", f"{job.error_code}: {job.error_message}"))
    fields += detail_fields(json.loads(job.details_json or "{}"))
    width = max(len(label) for label, _ in fields)
    for label, value in fields:
        line = f"[bold]{escape(label.ljust(width))}[/bold]  {safe(value)}"
        console.print(line.rstrip(), highlight=False, soft_wrap=True)


def show_jobs(jobs: list[operator_pb2.Job], as_json: bool) -> None:
    """The jobs a step started; exits with the first failed one's exit code."""
    if as_json:
        print_json([as_dict(j) for j in jobs])
    else:
        table(
            "Jobs",
            ("Job", "Operation", "Item", "Status", "Error"),
            [
                [
                    j.id,
                    j.operation,
                    j.item or j.vm_id or "-",
                    j.status,
                    f"{j.error_code}: {j.error_message}" if j.error_code else "",
                ]
                for j in jobs
            ],
        )
    _exit_for(jobs)


def finish(job: operator_pb2.Job, as_json: bool) -> None:
    """Show a job that ended (or was left running); exits with its error's exit code."""
    if as_json:
        print_json(as_dict(job))
    else:
        show_job(job)
    _exit_for([job])


def _exit_for(jobs: list[operator_pb2.Job]) -> None:
    code = exits.of_jobs(jobs)
    if code != exits.SUCCESS:
        sys.exit(code)


def follow(connection: Connection, job_id: str, as_json: bool) -> operator_pb2.Job:
    """Follow a job until it ends, with a progress bar on a terminal; the job as it ended."""
    updates = watch(connection, job_id)
    if as_json or not console.is_terminal:
        return _last(updates)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"job {job_id}", total=None)
        last: operator_pb2.Job | None = None
        for last in updates:
            progress = last.progress
            described = f"{last.operation} {last.item or last.vm_id} ({last.id})"
            if progress.bytes_total:
                bar.update(
                    task,
                    total=progress.bytes_total,
                    completed=progress.bytes_done,
                    description=f"{described}: {progress.phase}",
                )
            else:
                bar.update(task, description=described)
    assert last is not None, "a watch sends the job at least once"
    return last


def _last(updates: Iterator[operator_pb2.Job]) -> operator_pb2.Job:
    (last,) = deque(updates, maxlen=1)  # a watch sends the job at least once
    return last


# --- commands --------------------------------------------------------------------------------


@click.command(name="backup-now")
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
    """Back up protected VMs now.

    One job each; waits for the jobs and shows their progress.
    """
    request = operator_pb2.BackupNowRequest(vault=vault_name, vms=vms, disks=disks)
    started = list(call(connection, lambda s: s.BackupNow(request)).jobs)
    if not as_json:
        for job in started:
            console.print(
                f"Started backup job [bold]{job.id}[/bold] of {safe(job.item or job.vm_id)}",
                highlight=False,
                soft_wrap=True,
            )
    if no_wait:
        show_jobs(started, as_json)
        return
    if len(started) == 1:
        finish(follow(connection, started[0].id, as_json), as_json)
        return
    show_jobs([follow(connection, job.id, as_json) for job in started], as_json)


def _confirm_in_place(vm_id: str, disk: str, rp_id: str, yes: bool) -> None:
    """An in-place restore overwrites a disk: asked on a terminal, `--yes` in scripts."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(
            "an in-place restore writes over the VM's disk: confirm it with --yes "
            "(there is no terminal to ask on)"
        )
    click.confirm(
        f"Roll disk {disk!r} of VM {vm_id!r} back to recovery point {rp_id}? Everything "
        "written to the disk since is lost",
        abort=True,
    )


@click.command()
@click.argument("vm_id")
@click.option("--rp", "rp_id", required=True, help="Recovery point id (`coffer rp list VM`).")
@click.option("--disk", required=True, help="Disk of the recovery point to restore.")
@click.option("--target", default="", help="Path of a new image to write, on the target VM.")
@click.option("--target-vm", default="", help="VM to restore to (default: VM_ID itself).")
@click.option(
    "--from-copy",
    is_flag=True,
    help="Read the vault's off-site copy instead of its datastore (which may be unreachable).",
)
@click.option(
    "--in-place",
    is_flag=True,
    help="Roll VM_ID's own disk back (nothing on it may be mounted or open); "
    "only the chunks that differ are fetched.",
)
@click.option("--overwrite", is_flag=True, help="Replace the target if it exists.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before an in-place restore.")
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
    from_copy: bool,
    in_place: bool,
    overwrite: bool,
    yes: bool,
    no_wait: bool,
    as_json: bool,
) -> None:
    """Restore a disk of a recovery point.

    To a new image: `--target PATH` (under the target VM's restore_dirs; `--overwrite` to
    replace one that exists; `--target-vm` for another VM of the vault's region). In place:
    `--in-place` rolls VM_ID's own disk back, after asking (`--yes` in scripts). With
    --from-copy, from the vault's off-site copy (the point must be complete there: `coffer rp
    list`).
    """
    if in_place and (target or target_vm or overwrite):
        raise click.UsageError("--in-place writes VM_ID's own disk: give no --target, "
                               "--target-vm or --overwrite with it")  # fmt: skip
    if not in_place and not target:
        raise click.UsageError("give --target PATH (a new image) or --in-place")
    if in_place:
        _confirm_in_place(vm_id, disk, rp_id, yes)
    request = operator_pb2.RestoreRequest(
        vm_id=vm_id,
        recovery_point_id=rp_id,
        disk=disk,
        target_path=target,
        target_vm_id=target_vm,
        from_copy=from_copy,
        in_place=in_place,
        overwrite=overwrite,
    )
    job = call(connection, lambda s: s.Restore(request))
    if not as_json:
        console.print(f"Started restore job [bold]{job.id}[/bold]", highlight=False, soft_wrap=True)
    finish(job if no_wait else follow(connection, job.id, as_json), as_json)


@click.command()
@click.option("--vault", "vault_name", required=True)
@click.option("--vm", "vms", multiple=True, help="Drill this VM only (repeatable).")
@click.option("--no-wait", is_flag=True, help="Start the jobs and return at once.")
@json_option
@click.pass_obj
def drill(
    connection: Connection, vault_name: str, vms: tuple[str, ...], no_wait: bool, as_json: bool
) -> None:
    """Run a restore drill now.

    One RestoreDrill job per VM: its latest recovery point restored on the vault's drill
    agent, every file system checked read-only, the scratch image deleted, and the drill
    recorded on the recovery point (`coffer rp list`).
    """
    request = operator_pb2.DrillRequest(vault=vault_name, vms=vms)
    started = list(call(connection, lambda s: s.Drill(request)).jobs)
    if not as_json:
        for found in started:
            console.print(
                f"Started drill job [bold]{found.id}[/bold] of {found.item or found.vm_id}",
                highlight=False,
                soft_wrap=True,
            )
    if no_wait or not started:
        show_jobs(started, as_json)
        return
    if len(started) == 1:
        finish(follow(connection, started[0].id, as_json), as_json)
        return
    show_jobs([follow(connection, found.id, as_json) for found in started], as_json)


@click.group()
def job() -> None:
    """Jobs: list, show, watch, cancel.

    Every operation is a job. A job id may be shortened to a unique prefix of 4 or more
    characters.
    """


def _time(value: str | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(parse_time(value).astimezone(UTC))
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
@click.option(
    "--from", "started_from", help="Started at or after (ISO date/time; local unless --utc)."
)
@click.option("--to", "started_to", help="Started before (ISO date/time; local unless --utc).")
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(1, MAX_JOB_LIMIT),
    help="Show the newest N.",
)
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
    """Jobs, newest first.

    Filtered by status, operation, vault, VM and start time.
    """
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
    table("Jobs", JOB_COLUMNS, [job_row(j) for j in reply.jobs])


@job.command(name="show")
@job_id_argument
@json_option
@click.pass_obj
def job_show(connection: Connection, job_id: str, as_json: bool) -> None:
    """One job in full.

    JOB is its id, or a unique prefix of it (4 or more characters).
    """
    found = call(connection, lambda s: s.GetJob(operator_pb2.GetJobRequest(id=job_id)))
    if as_json:
        print_json(as_dict(found))
    else:
        show_job(found)


@job.command(name="watch")
@job_id_argument
@json_option
@click.pass_obj
def job_watch(connection: Connection, job_id: str, as_json: bool) -> None:
    """Follow a job until it ends.

    Exits with its error's exit code if it fails.
    """
    finish(follow(connection, job_id, as_json), as_json)


@job.command(name="cancel")
@job_id_argument
@click.option("--no-wait", is_flag=True, help="Return once the cancel is asked for.")
@json_option
@click.pass_obj
def job_cancel(connection: Connection, job_id: str, no_wait: bool, as_json: bool) -> None:
    """Cancel a queued or running backup or restore, or a prune, collection, verify or copy.

    A cancelled backup leaves no recovery point; a cancelled copy resumes where it stopped.
    """
    found = call(connection, lambda s: s.CancelJob(operator_pb2.GetJobRequest(id=job_id)))
    if not no_wait:
        found = follow(connection, found.id, as_json)
    if as_json:
        print_json(as_dict(found))
    else:
        show_job(found)


@click.command()
@click.option("--vault", "vault_name", required=True)
@click.option("--no-wait", is_flag=True, help="Start the job and return at once.")
@json_option
@click.pass_obj
def prune(connection: Connection, vault_name: str, no_wait: bool, as_json: bool) -> None:
    """Apply the vault's retention now.

    Deletes the recovery points no rule of their VM's policy keeps.
    """
    found = call(connection, lambda s: s.Prune(operator_pb2.VaultRef(name=vault_name)))
    finish(found if no_wait else follow(connection, found.id, as_json), as_json)


@click.command()
@click.option("--vault", "vault_name", required=True)
@click.option("--no-wait", is_flag=True, help="Start the job and return at once.")
@json_option
@click.pass_obj
def gc(connection: Connection, vault_name: str, no_wait: bool, as_json: bool) -> None:
    """Reclaim unreferenced space now.

    Deletes the chunks no recovery point references (safe beside running backups).
    """
    found = call(connection, lambda s: s.CollectGarbage(operator_pb2.VaultRef(name=vault_name)))
    finish(found if no_wait else follow(connection, found.id, as_json), as_json)


@click.command()
@click.option("--vault", "vault_name", required=True)
@click.option("--no-wait", is_flag=True, help="Start the job and return at once.")
@json_option
@click.pass_obj
def copy(connection: Connection, vault_name: str, no_wait: bool, as_json: bool) -> None:
    """Copy the vault's recovery points to its off-site copy now.

    Sends the points the copy lacks (only the chunks it lacks) and deletes there the points
    pruned here. Copies also run after every backup and daily; a copy already running makes
    one more pass instead, and that job is followed.
    """
    found = call(connection, lambda s: s.Copy(operator_pb2.VaultRef(name=vault_name)))
    if not as_json:
        console.print(f"Copy job [bold]{found.id}[/bold]", highlight=False, soft_wrap=True)
    finish(found if no_wait else follow(connection, found.id, as_json), as_json)
