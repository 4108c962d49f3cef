"""`coffer undelete`, and how soft-deleted recovery points read in `coffer rp list --deleted`.

Deleting a VM's backup data in a vault that keeps deleted data (`coffer vault update V
--soft-delete-days N`, 14 by default) soft-deletes its recovery points: they are listed with
`--deleted`, with when each will be purged, and come back with `coffer undelete` until then.
"""

from __future__ import annotations

import click

from controller.cli.client import Connection, call
from controller.cli.jobs import finish
from controller.cli.output import size, table, when
from shared.rpc import operator_pb2

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")

DELETED_COLUMNS = (
    "Recovery point", "VM", "Vault", "Created", "Consistency", "Disks", "Deleted", "Purged at",
    "Deleted by",
)  # fmt: skip


def show_deleted(points: list[operator_pb2.RecoveryPoint]) -> None:
    table(
        "Deleted recovery points (coffer undelete brings them back until they are purged)",
        DELETED_COLUMNS,
        [
            [
                p.id,
                p.vm_id,
                p.vault,
                when(p.created_at),
                p.consistency,
                ", ".join(f"{d.name} ({size(d.size_bytes)})" for d in p.disks),
                when(p.deleted_at),
                when(p.purge_at),
                p.deleted_by_job_id or "-",
            ]
            for p in points
        ],
    )


@click.command()
@click.argument("vm")
@click.option("--rp", "rp_id", default="", help="Only this recovery point (default: all).")
@click.option(
    "--vault",
    "vault_name",
    default="",
    help="The vault (default: the one holding the VM's deleted points).",
)
@json_option
@click.pass_obj
def undelete(connection: Connection, vm: str, rp_id: str, vault_name: str, as_json: bool) -> None:
    """Bring back a VM's deleted recovery points.

    Soft-deleted points (`coffer rp list --deleted`) become restorable again; the VM's item
    returns to ProtectionStopped with the policy it had, to resume when you choose
    (`coffer resume-protection`). A VM whose protection runs again is refused: stop it with
    --retain-data first, or its policy would prune what comes back.
    """
    request = operator_pb2.UndeleteRequest(vault=vault_name, vm=vm, recovery_point_id=rp_id)
    finish(call(connection, lambda s: s.Undelete(request)), as_json)
