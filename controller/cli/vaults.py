"""`coffer vault …` and `coffer dashboard`: vaults and what they hold."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from controller.cli.client import Connection, call
from controller.cli.jobs import finish, follow
from controller.cli.keys import key
from controller.cli.output import (
    as_dict,
    console,
    json_option,
    print_json,
    safe,
    size,
    span,
    table,
    when,
)
from shared.model import MAX_CONCURRENT_BACKUPS
from shared.rpc import operator_pb2

# What the controller accepts (controller.vaults): at least one backup at a time.
CONCURRENT_BACKUPS = click.IntRange(1, MAX_CONCURRENT_BACKUPS)
# What the controller accepts (controller.vaults): 0 (off) to ten years.
REVERIFY_DAYS = click.IntRange(0, 3650)
# What the controller accepts (controller.soft_delete): 0 (off) to 180 days.
SOFT_DELETE_DAYS = click.IntRange(0, 180)
# What the controller accepts (controller.catalog.MAX_FULL_READ_DAYS): 0 (every backup) to 3650.
FULL_READ_DAYS = click.IntRange(0, 3650)


@click.group()
def vault() -> None:
    """Vaults.

    One per region and purpose, each with its own datastore.
    """


def drill_cell(drill: operator_pb2.DrillRecord) -> str:
    """A recovery point's last drill in a cell: "clean at T (restore 12.3s)"."""
    return f"{drill.outcome} at {when(drill.at)} (restore {span(drill.restore_seconds)})"


def _drills_cell(v: operator_pb2.Vault) -> str:
    if not v.HasField("drill"):
        return "off"
    drill = v.drill
    where = f"on {drill.agent} in {drill.directory}"
    if not drill.schedule:
        return f"on demand, {where}"
    return f"{drill.schedule_text}, {where}; next {when(drill.next_at, drill.HasField('next_at'))}"


def _vault_row(v: operator_pb2.Vault) -> list[str]:
    return [
        v.name,
        v.region,
        str(v.registered_items),
        str(v.protected_items),
        str(v.recovery_points),
        size(v.stored_bytes),
        when(v.created_at),
    ]


def _verify_schedule(v: operator_pb2.Vault) -> str:
    parts = ["new points"] if v.verify_new else []
    if v.reverify_days:
        parts.append(f"every {v.reverify_days} days")
    return ", ".join(parts) or "off"


VAULT_COLUMNS = (
    "Vault",
    "Region",
    "Registered",
    "Protected",
    "Recovery points",
    "Stored",
    "Created",
)


@vault.command(name="create")
@click.argument("name")
@click.option("--region", required=True, help="Region of the VMs it will protect.")
@click.option(
    "--max-concurrent-backups",
    default=4,
    show_default=True,
    type=CONCURRENT_BACKUPS,
    help=f"Backups at once (1 to {MAX_CONCURRENT_BACKUPS:,}).",
)
@click.option("--timezone", default="UTC", show_default=True, help="Of the default policy.")
@json_option
@click.pass_obj
def vault_create(
    connection: Connection,
    name: str,
    region: str,
    max_concurrent_backups: int,
    timezone: str,
    as_json: bool,
) -> None:
    """Create vault NAME in a region, with its default policy (daily, 30 days)."""
    request = operator_pb2.CreateVaultRequest(
        name=name,
        region=region,
        max_concurrent_backups=max_concurrent_backups,
        timezone=timezone,
    )
    created = call(connection, lambda s: s.CreateVault(request))
    if as_json:
        print_json(as_dict(created))
        return
    console.print(
        f"Created vault [bold]{safe(created.name)}[/bold] in region "
        f"{safe(created.region)} with policy DefaultPolicy (daily at 02:00 "
        f"{safe(timezone)}, kept 30 days)",
        highlight=False,
        soft_wrap=True,
    )


@vault.command(name="list")
@json_option
@click.pass_obj
def vault_list(connection: Connection, as_json: bool) -> None:
    """Every vault with its counts."""
    reply = call(connection, lambda s: s.ListVaults(operator_pb2.ListVaultsRequest()))
    if as_json:
        print_json([as_dict(v) for v in reply.vaults])
        return
    table("Vaults", VAULT_COLUMNS, [_vault_row(v) for v in reply.vaults])


@vault.command(name="show")
@click.argument("name")
@json_option
@click.pass_obj
def vault_show(connection: Connection, name: str, as_json: bool) -> None:
    """One vault."""
    found = call(connection, lambda s: s.GetVault(operator_pb2.VaultRef(name=name)))
    if as_json:
        print_json(as_dict(found))
        return
    _show_vault(found)


def _full_read(days: int) -> str:
    if not days:
        return "every backup (changed-block tracking off)"
    return f"at least every {days} days; between, reflink-cloned disks only where changed"


def _show_vault(found: operator_pb2.Vault) -> None:
    """A vault's counts as a table, then its settings one per line (a table of them all is
    too wide for a terminal)."""
    table(f"Vault {found.name}", VAULT_COLUMNS, [_vault_row(found)])
    if found.datastore_format == 2:
        kept = f"encrypted ({found.encryption}, data key {found.current_data_key})"
    else:
        kept = "not encrypted (format 1)"
    dedup = (
        "across all its VMs (one trust domain)"
        if found.shared_dedup
        else "per VM (each against what it stored itself)"
    )
    if found.copy_target:
        where = f" at {found.copy_location}" if found.copy_location else " (not configured)"
        copy = f"to {found.copy_target}{where}"
    else:
        copy = "none"
    settings = [
        ("Concurrent backups", str(found.max_concurrent_backups)),
        ("Verify", _verify_schedule(found)),
        ("Soft delete", f"{found.soft_delete_days} days" if found.soft_delete_days else "off"),
        ("Restore drills", _drills_cell(found)),
        ("Datastore", f"{found.datastore}, {kept}"),
        ("Copy", copy),
        ("Deduplication", dedup),
        ("Full read", _full_read(found.full_read_days)),
    ]
    if found.deleted_recovery_points:
        settings.append(
            (
                "Deleted recovery points",
                f"{found.deleted_recovery_points}, recoverable until purged "
                f"(`coffer rp list --deleted --vault {found.name}`)",
            )
        )
    for label, value in settings:
        console.print(f"{label}: {safe(value)}", highlight=False, soft_wrap=True)
    if found.upgrading_from_format:
        console.print(
            f"Upgrade from format {found.upgrading_from_format} under way: "
            f"{_points(found.points_in_old_format)} still in format "
            f"{found.upgrading_from_format} (`coffer vault upgrade {safe(found.name)}` takes it "
            "up if it was stopped)",
            highlight=False,
            soft_wrap=True,
        )


def _points(count: int) -> str:
    return "1 recovery point" if count == 1 else f"{count} recovery points"


@vault.command(name="upgrade")
@click.argument("name")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Say what would be rewritten and roughly how long it takes; change nothing.",
)
@click.option("--no-wait", is_flag=True, help="Start the job and return at once.")
@json_option
@click.pass_obj
def vault_upgrade(
    connection: Connection, name: str, dry_run: bool, no_wait: bool, as_json: bool
) -> None:
    """Convert vault NAME's datastore to the current format.

    Format 1 (plain, before encryption at rest) becomes format 2: every chunk, index and
    manifest encrypted, chunk names keyed. Every recovery point is kept, with its consistency,
    retention labels and verification state, and stays readable throughout; backups, restores,
    prunes and garbage collection go on meanwhile. A VaultUpgrade job: it can be cancelled, and
    it goes on by itself after a controller restart; run it again to take up one cancelled or
    failed.
    """
    request = operator_pb2.UpgradeVaultRequest(vault=name, dry_run=dry_run)
    started = call(connection, lambda s: s.UpgradeVault(request))
    if not as_json:
        what = "dry run of the upgrade" if dry_run else "upgrade"
        console.print(
            f"Started {what} of vault {safe(name)}: job [bold]{started.id}[/bold]",
            highlight=False,
            soft_wrap=True,
        )
    job = started if no_wait else follow(connection, started.id, as_json)
    if dry_run and not as_json and job.status == "Completed":
        _say_plan(name, json.loads(job.details_json or "{}").get("plan", {}))
    finish(job, as_json)


def _say_plan(name: str, plan: dict[str, Any]) -> None:
    """A dry run's plan, in words."""
    if not plan.get("recovery_points"):
        console.print(f"Vault {safe(name)}: nothing to convert.", highlight=False)
        return
    console.print(
        f"Vault {safe(name)}: the upgrade would rewrite {_points(plan['recovery_points'])} "
        f"({plan['disk_indexes']} disk indexes) and {plan['chunks']} chunks "
        f"({size(plan['stored_bytes'])} stored), {plan['objects']} objects in all. At the rate "
        f"measured on {plan['sampled_chunks']} of its chunks ({plan['rate_mb_per_second']} MB/s, "
        f"{plan['objects_per_second']} objects/s: read, checked, renamed, encrypted and "
        f"written), that takes about {span(float(plan['estimated_seconds']))}.",
        highlight=False,
        soft_wrap=True,
    )


@vault.command(name="update")
@click.argument("name")
@click.option(
    "--max-concurrent-backups",
    type=CONCURRENT_BACKUPS,
    default=None,
    help=f"Backups at once (1 to {MAX_CONCURRENT_BACKUPS:,}).",
)
@click.option(
    "--verify-new",
    type=click.Choice(["on", "off"]),
    default=None,
    help="Verify every new recovery point after its backup.",
)
@click.option(
    "--reverify-days",
    type=REVERIFY_DAYS,
    default=None,
    help="Daily, verify the points not verified for N days (0: off).",
)
@click.option(
    "--shared-dedup",
    type=click.Choice(["on", "off"]),
    default=None,
    help="on: the vault's VMs are one trust domain, each backup deduplicates against "
    "everything the vault holds; off (the default): only against what its own VM stored.",
)
@click.option(
    "--copy-to",
    default=None,
    metavar="TARGET",
    help="Copy its recovery points to this copy target of the controller config.",
)
@click.option("--no-copy", is_flag=True, help="Stop copying (the copy is left as it is).")
@click.option(
    "--soft-delete-days",
    type=SOFT_DELETE_DAYS,
    default=None,
    help="Keep deleted backup data recoverable N days (0: delete at once; at most 180).",
)
@click.option(
    "--full-read-days",
    type=FULL_READ_DAYS,
    default=None,
    help="Read every disk in full at least every N days (7 by default); between, a disk "
    "snapshotted as a reflink clone is read only where it changed. 0: every backup reads in "
    "full and no clone is kept.",
)
@click.option(
    "--drill-schedule",
    default="",
    help='When restore drills run, e.g. "weekly sun 04:00 tz=UTC" (a backup schedule\'s '
    'syntax); "off": only on demand (`coffer drill`).',
)
@click.option(
    "--drill-agent",
    default="",
    help="VM whose agent restores and checks drills (an enrolled VM of the vault's region).",
)
@click.option(
    "--drill-dir",
    default="",
    help="Scratch directory on the drill agent, under its restore_dirs (it must exist).",
)
@click.option("--no-drills", is_flag=True, help="Forget the vault's drill settings.")
@json_option
@click.pass_obj
def vault_update(
    connection: Connection,
    name: str,
    max_concurrent_backups: int | None,
    verify_new: str | None,
    reverify_days: int | None,
    shared_dedup: str | None,
    copy_to: str | None,
    no_copy: bool,
    soft_delete_days: int | None,
    full_read_days: int | None,
    drill_schedule: str,
    drill_agent: str,
    drill_dir: str,
    no_drills: bool,
    as_json: bool,
) -> None:
    """Change a vault's settings.

    Queued backups start at once if the limit rose. Verify settings schedule Verify jobs:
    of each new recovery point after its backup, and daily (with the vault's maintenance, at
    03:30 UTC) of the points never verified or not verified for N days. --copy-to starts
    copying the vault's recovery points to an off-site copy target (`[[copy_targets]]` in the
    controller config): at once, then after every backup and daily. Soft delete keeps the
    backup data `coffer stop-protection --delete-data` deletes for N days (14 by default):
    `coffer rp list --deleted` shows it, `coffer undelete` brings it back; points deleted
    before keep the purge time they were given. Restore drills: each
    scheduled drill restores the latest recovery point of every protected VM to the drill
    directory on the drill agent, checks its file systems read-only (e2fsck -fn,
    xfs_repair -n), deletes it, and records the outcome on the recovery point.

    With --shared-dedup on, a VM's backup learns whether the vault holds a content any VM
    stored (and sends less): turn it on only for VMs that trust each other.
    """
    if copy_to is not None and no_copy:
        raise click.UsageError("--copy-to or --no-copy, not both")
    if copy_to == "":
        raise click.UsageError("--copy-to needs a target's name (--no-copy stops copying)")
    drill = None
    if drill_schedule or drill_agent or drill_dir:
        drill = operator_pb2.DrillSettings(
            schedule=drill_schedule, agent=drill_agent, directory=drill_dir
        )
    verify = verify_new is not None or reverify_days is not None
    if (
        max_concurrent_backups is None
        and not verify
        and soft_delete_days is None
        and drill is None
        and not no_drills
        and copy_to is None
        and not no_copy
        and shared_dedup is None
        and full_read_days is None
    ):
        raise click.UsageError(
            "nothing to change: give --max-concurrent-backups, --verify-new, --reverify-days, "
            "--soft-delete-days, --shared-dedup, --full-read-days, --copy-to, --no-copy or "
            "drill settings "
            "(--drill-schedule, --drill-agent, --drill-dir, --no-drills)"
        )
    request = operator_pb2.UpdateVaultRequest(
        name=name,
        max_concurrent_backups=max_concurrent_backups or 0,
        drill=drill,
        clear_drill=no_drills,
    )
    if verify_new is not None:
        request.verify_new = verify_new == "on"
    if reverify_days is not None:
        request.reverify_days = reverify_days
    if shared_dedup is not None:
        request.shared_dedup = shared_dedup == "on"
    if copy_to is not None or no_copy:
        request.copy_to = copy_to or ""
    if soft_delete_days is not None:
        request.soft_delete_days = soft_delete_days
    if full_read_days is not None:
        request.full_read_days = full_read_days
    updated = call(connection, lambda s: s.UpdateVault(request))
    if as_json:
        print_json(as_dict(updated))
    else:
        _show_vault(updated)


@vault.command(name="delete")
@click.argument("name")
@json_option
@click.pass_obj
def vault_delete(connection: Connection, name: str, as_json: bool) -> None:
    """Delete an empty vault.

    With no registered VM and no recovery point; its datastore goes with it.
    """
    deleted = call(connection, lambda s: s.DeleteVault(operator_pb2.VaultRef(name=name)))
    if as_json:
        print_json(as_dict(deleted))
    else:
        console.print(
            f"Deleted vault [bold]{safe(deleted.name)}[/bold]", highlight=False, soft_wrap=True
        )


vault.add_command(key)


def _show_dashboard(board: operator_pb2.DashboardReply) -> None:
    table(
        f"Vault {board.vault}",
        ("Protected items", "Recovery points", "Stored", "Protected data", "Dedup ratio"),
        [
            [
                str(board.protected_items),
                str(board.recovery_points),
                size(board.stored_bytes),
                size(board.protected_bytes),
                f"{board.dedup_ratio:.2f}x" if board.stored_bytes else "-",
            ]
        ],
    )
    table(
        "Jobs (last 24 hours)",
        ("Completed", "With warnings", "Failed", "Cancelled", "In progress"),
        [
            [
                str(board.jobs_completed_24h),
                str(board.jobs_with_warnings_24h),
                str(board.jobs_failed_24h),
                str(board.jobs_cancelled_24h),
                str(board.jobs_in_progress),
            ]
        ],
    )
    table(
        "Integrity (recovery points)",
        ("Verified", "Damaged", "Healed, verify pending", "Never verified", "Bad chunks",
         "Last verified"),
        [
            [
                str(board.recovery_points_verified),
                str(board.recovery_points_damaged),
                str(board.recovery_points_healed),
                str(board.recovery_points_never_verified),
                str(board.bad_chunks),
                when(board.last_verified_at, board.HasField("last_verified_at")),
            ]
        ],
    )  # fmt: skip
    if board.copy_target:
        _show_copy(board)
    table(
        "Items by state",
        ("State", "Items"),
        [[state, str(n)] for state, n in sorted(board.items_by_state.items())],
    )
    table(
        "Restore drills (the last of each protected VM)",
        ("VM", "Recovery point", "Drilled", "Outcome", "Restore took", "Summary"),
        [
            [
                d.item or d.vm_id,
                d.recovery_point_id or "-",
                when(d.drill.at) if d.HasField("drill") else "never",
                d.drill.outcome if d.HasField("drill") else "-",
                span(d.drill.restore_seconds) if d.HasField("drill") else "-",
                d.drill.summary if d.HasField("drill") else "-",
            ]
            for d in board.drills
        ],
    )


def _show_copy(board: operator_pb2.DashboardReply) -> None:
    last = board.last_copy_job
    table(
        f"Off-site copy to {board.copy_target}",
        ("Copied", "Not copied", "Copy lag", "Oldest not copied", "Newest copied", "Last copy"),
        [
            [
                str(board.recovery_points_copied),
                str(board.recovery_points_not_copied),
                span(board.copy_lag_seconds) if board.recovery_points_not_copied else "none",
                when(board.oldest_not_copied_at, board.HasField("oldest_not_copied_at")),
                when(board.newest_copied_at, board.HasField("newest_copied_at")),
                f"{last.status} {when(last.started_at)} ({last.id})"
                if board.HasField("last_copy_job")
                else "never",
            ]
        ],
    )
    if board.copy_unavailable:
        console.print(
            f"Copies cannot be written now: {safe(board.copy_unavailable)}",
            highlight=False,
            soft_wrap=True,
        )


@click.command()
@click.option("--vault", "vault_name", required=True)
@click.option(
    "--watch",
    "interval",
    type=click.FloatRange(min=1),
    default=None,
    help="Refresh every N seconds (1 or more).",
)
@json_option
@click.pass_obj
def dashboard(
    connection: Connection, vault_name: str, interval: float | None, as_json: bool
) -> None:
    """A vault at a glance.

    Protected items, the last 24 h of jobs, storage and deduplication, integrity: how many
    recovery points a verify found whole, damaged, healed since, or never verified; and the
    off-site copy: how many points are copied, and the copy lag (how long the oldest point not
    copied yet has existed only here).
    """
    request = operator_pb2.VaultRef(name=vault_name)
    while True:
        board = call(connection, lambda s: s.Dashboard(request))
        if as_json:
            print_json(as_dict(board))
        else:
            if interval:
                console.clear()
            _show_dashboard(board)
        if not interval:
            return
        time.sleep(interval)
