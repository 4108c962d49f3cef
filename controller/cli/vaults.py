"""`coffer vault …` and `coffer dashboard`: vaults and what they hold."""

from __future__ import annotations

import time

import click
from rich.markup import escape

from controller.cli.client import Connection, call
from controller.cli.keys import key
from controller.cli.output import as_dict, console, print_json, size, table, when
from shared.rpc import operator_pb2

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
# What the controller accepts (controller.vaults): at least one backup at a time, at most 64.
CONCURRENT_BACKUPS = click.IntRange(1, 64)
# What the controller accepts (controller.vaults): 0 (off) to ten years.
REVERIFY_DAYS = click.IntRange(0, 3650)


@click.group()
def vault() -> None:
    """Vaults.

    One per region and purpose, each with its own datastore.
    """


def _vault_row(v: operator_pb2.Vault) -> list[str]:
    return [
        v.name,
        v.region,
        str(v.registered_items),
        str(v.protected_items),
        str(v.recovery_points),
        size(v.stored_bytes),
        str(v.max_concurrent_backups),
        _verify_schedule(v),
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
    "Concurrent backups",
    "Verify",
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
    help="Backups at once (1 to 64).",
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
        f"Created vault [bold]{escape(created.name)}[/bold] in region "
        f"{escape(created.region)} with policy DefaultPolicy (daily at 02:00 "
        f"{escape(timezone)}, kept 30 days)",
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
    table(f"Vault {name}", VAULT_COLUMNS, [_vault_row(found)])
    if found.datastore_format == 2:
        kept = f"encrypted ({found.encryption}, data key {found.current_data_key})"
    else:
        kept = "not encrypted (format 1)"
    console.print(f"Datastore: {escape(found.datastore)}, {kept}", highlight=False, soft_wrap=True)
    dedup = (
        "across all its VMs (one trust domain)"
        if found.shared_dedup
        else "per VM (each against what it stored itself)"
    )
    console.print(f"Deduplication: {dedup}", highlight=False, soft_wrap=True)


@vault.command(name="update")
@click.argument("name")
@click.option(
    "--max-concurrent-backups",
    type=CONCURRENT_BACKUPS,
    default=None,
    help="Backups at once (1 to 64).",
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
@json_option
@click.pass_obj
def vault_update(
    connection: Connection,
    name: str,
    max_concurrent_backups: int | None,
    verify_new: str | None,
    reverify_days: int | None,
    shared_dedup: str | None,
    as_json: bool,
) -> None:
    """Change a vault's settings.

    Queued backups start at once if the limit rose. Verify settings schedule Verify jobs:
    of each new recovery point after its backup, and daily (with the vault's maintenance, at
    03:30 UTC) of the points never verified or not verified for N days.

    With --shared-dedup on, a VM's backup learns whether the vault holds a content any VM
    stored (and sends less): turn it on only for VMs that trust each other.
    """
    if (
        max_concurrent_backups is None
        and verify_new is None
        and reverify_days is None
        and shared_dedup is None
    ):
        raise click.UsageError(
            "nothing to change: give --max-concurrent-backups, --verify-new, --reverify-days "
            "or --shared-dedup"
        )
    request = operator_pb2.UpdateVaultRequest(
        name=name, max_concurrent_backups=max_concurrent_backups or 0
    )
    if verify_new is not None:
        request.verify_new = verify_new == "on"
    if reverify_days is not None:
        request.reverify_days = reverify_days
    if shared_dedup is not None:
        request.shared_dedup = shared_dedup == "on"
    updated = call(connection, lambda s: s.UpdateVault(request))
    if as_json:
        print_json(as_dict(updated))
    else:
        table(f"Vault {name}", VAULT_COLUMNS, [_vault_row(updated)])


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
            f"Deleted vault [bold]{escape(deleted.name)}[/bold]", highlight=False, soft_wrap=True
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
    table(
        "Items by state",
        ("State", "Items"),
        [[state, str(n)] for state, n in sorted(board.items_by_state.items())],
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

    Protected items, the last 24 h of jobs, storage and deduplication, and integrity: how
    many recovery points a verify found whole, damaged, healed since, or never verified.
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
