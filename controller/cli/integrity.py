"""`coffer verify`, and how a recovery point's integrity reads in `coffer rp list`.

A Verify job re-reads every chunk the chosen recovery points reference and records each point
verified or damaged; the command waits for it (with its progress) and exits 7 when it found
damage, as with any failed job (`controller.cli.exits`).
"""

from __future__ import annotations

import click

from controller.cli.client import Connection, call
from controller.cli.jobs import finish, follow
from controller.cli.output import console, when
from shared.model import Verification
from shared.rpc import operator_pb2

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def verification_cell(point: operator_pb2.RecoveryPoint) -> str:
    """A recovery point's integrity in a few words: never verified, verified at T, damaged
    (how many chunks), healed (a verify pending)."""
    state = point.verification
    if not state:
        return "never verified"
    if state == Verification.VERIFIED:
        return f"verified {when(point.verified_at)}"
    if state == Verification.HEALED:
        return "healed, verify pending"
    parts = []
    if point.damaged_chunks:
        noun = "chunk" if point.damaged_chunks == 1 else "chunks"
        parts.append(f"{point.damaged_chunks} {noun} missing or corrupt")
    if point.verification_detail:
        parts.append(point.verification_detail)
    return "damaged: " + ("; ".join(parts) or "see `coffer rp list --json`")


@click.command()
@click.option("--vault", "vault_name", required=True, help="The vault whose points to verify.")
@click.option("--vm", default="", help="Only this VM's recovery points (name or service/name).")
@click.option("--rp", "rp_id", default="", help="Only this recovery point.")
@click.option(
    "--from-copy",
    is_flag=True,
    help="Verify the vault's off-site copy (the points complete there) instead.",
)
@click.option("--no-wait", is_flag=True, help="Start the job and return at once.")
@json_option
@click.pass_obj
def verify(
    connection: Connection,
    vault_name: str,
    vm: str,
    rp_id: str,
    from_copy: bool,
    no_wait: bool,
    as_json: bool,
) -> None:
    """Check that recovery points can be restored.

    Re-reads every chunk the recovery points reference (each once) and checks it decompresses
    and hashes to its name; records each point verified or damaged (`coffer rp list`). Exits 7
    when it finds damage; the next backup of a VM that still has the data stores the damaged
    chunks again. With --from-copy it reads the vault's off-site copy: what it finds is in the
    job only, and the next copy sends the damaged chunks again.
    """
    request = operator_pb2.VerifyRequest(
        vault=vault_name, vm=vm, recovery_point_id=rp_id, from_copy=from_copy
    )
    job = call(connection, lambda s: s.Verify(request))
    if not as_json:
        console.print(f"Started verify job [bold]{job.id}[/bold]", highlight=False, soft_wrap=True)
    finish(job if no_wait else follow(connection, job.id, as_json), as_json)
