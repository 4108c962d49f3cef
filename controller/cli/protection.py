"""`coffer discover | register | items | protect | policy …`: bringing VMs under protection."""

from __future__ import annotations

import json
import sys

import click

from controller.cli.client import Connection, call, pages
from controller.cli.jobs import show_jobs
from controller.cli.output import as_dict, console, json_option, print_json, safe, size, table, when
from shared.model import ItemState
from shared.policy import Policy, parse_retention, parse_schedule
from shared.rpc import operator_pb2
from shared.rpc.operator_pb2_grpc import OperatorServiceStub

vault_option = click.option("--vault", "vault_name", required=True, help="The vault.")


@click.command()
@vault_option
@json_option
@click.pass_obj
def discover(connection: Connection, vault_name: str, as_json: bool) -> None:
    """Step 1: find VMs to register.

    The VMs of the vault's region that no vault holds yet.
    """
    reply = call(connection, lambda s: s.Discover(operator_pb2.VaultRef(name=vault_name)))
    if as_json:
        print_json(as_dict(reply))
        return
    table(
        f"VMs to register in vault {vault_name} (job {reply.job.id})",
        ("VM", "Service", "Name", "Region", "Disks", "Agent"),
        [
            [
                vm.vm_id,
                vm.service,
                vm.name,
                vm.region,
                ", ".join(f"{d.name} ({size(d.size_bytes)})" for d in vm.disks) or "-",
                "online" if vm.online else "offline",
            ]
            for vm in reply.vms
        ],
    )
    for note in reply.notes:
        console.print(f"Nothing found: {safe(note)}", highlight=False, soft_wrap=True)


@click.command()
@vault_option
@click.argument("vms", nargs=-1, required=True)
@json_option
@click.pass_obj
def register(connection: Connection, vault_name: str, vms: tuple[str, ...], as_json: bool) -> None:
    """Step 2: register VMs with a vault.

    VMS by name, or service/name; one job each.
    """
    request = operator_pb2.ItemsRequest(vault=vault_name, vms=vms)
    show_jobs(list(call(connection, lambda s: s.Register(request)).jobs), as_json)


@click.command()
@vault_option
@click.argument("vms", nargs=-1, required=True)
@json_option
@click.pass_obj
def unregister(
    connection: Connection, vault_name: str, vms: tuple[str, ...], as_json: bool
) -> None:
    """Unregister VMs from a vault.

    Refused while a VM is protected or has recovery points.
    """
    request = operator_pb2.ItemsRequest(vault=vault_name, vms=vms)
    show_jobs(list(call(connection, lambda s: s.Unregister(request)).jobs), as_json)


@click.command()
@vault_option
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([s.value for s in ItemState]),
    help="Only items in this state (repeatable).",
)
@json_option
@click.pass_obj
def items(connection: Connection, vault_name: str, states: tuple[str, ...], as_json: bool) -> None:
    """A vault's items and their state.

    The VMs registered to the vault and where their protection stands.
    """

    def page(stub: OperatorServiceStub, token: str) -> operator_pb2.ListItemsReply:
        request = operator_pb2.ListItemsRequest(vault=vault_name, state=states, page_token=token)
        reply: operator_pb2.ListItemsReply = stub.ListItems(request)
        return reply

    found = [i for reply in call(connection, lambda s: pages(s, page)) for i in reply.items]
    if as_json:
        print_json([as_dict(i) for i in found])
        return
    table(
        f"Items of vault {vault_name}",
        ("VM", "Name", "State", "Policy", "Last backup", "Next backup", "Points", "Agent", "Error"),
        [
            [
                i.vm_id,
                f"{i.service}/{i.name}" if i.service else i.name,
                i.state,
                i.policy or "-",
                f"{when(i.last_backup_at)} {i.last_backup_status}".strip(),
                when(i.next_backup_at, i.HasField("next_backup_at")),
                str(i.recovery_points),
                "online" if i.online else "offline",
                f"{i.error_code}: {i.error_message}" if i.error_code else "",
            ]
            for i in found
        ],
    )


# --- policies ------------------------------------------------------------------------------

schedule_option = click.option(
    "--schedule",
    help='When to back up, e.g. "daily 02:00", "daily 02:00,14:00 tz=Europe/Berlin", '
    '"weekly sun,wed 03:00 tz=UTC window=4h".',
)
retention_options = [
    click.option("--daily", help="Keep every backup N days, e.g. 30."),
    click.option("--weekly", help="Keep a weekday's backup N weeks, e.g. sun:104."),
    click.option("--monthly", help="Keep a day's backup N months, e.g. last-sun:120, day-1:12."),
    click.option("--yearly", help="Keep a day's backup N years, e.g. jan:first-sun:99."),
]


def with_retention(f: click.decorators.FC) -> click.decorators.FC:
    for option in reversed(retention_options):
        f = option(f)
    return f


def build_policy(
    name: str,
    schedule: str | None,
    daily: str | None,
    weekly: str | None,
    monthly: str | None,
    yearly: str | None,
) -> Policy:
    return Policy(
        name=name,
        schedule=parse_schedule("daily 02:00" if schedule is None else schedule),
        retention=parse_retention(daily=daily, weekly=weekly, monthly=monthly, yearly=yearly),
    )


@click.group()
def policy() -> None:
    """Backup policies.

    A schedule and retention rules, shared by many VMs.
    """


def _policy_rows(policies: list[operator_pb2.Policy]) -> list[list[str]]:
    return [[p.name, p.schedule_text, p.retention_text, ", ".join(p.vms) or "-"] for p in policies]


POLICY_COLUMNS = ("Policy", "Schedule", "Retention", "VMs")


def _show_policy(title: str, found: operator_pb2.Policy, as_json: bool) -> None:
    if as_json:
        print_json(as_dict(found))
    else:
        table(title, POLICY_COLUMNS, _policy_rows([found]))


@policy.command(name="create")
@vault_option
@click.argument("name")
@schedule_option
@with_retention
@json_option
@click.pass_obj
def policy_create(
    connection: Connection,
    vault_name: str,
    name: str,
    schedule: str | None,
    daily: str | None,
    weekly: str | None,
    monthly: str | None,
    yearly: str | None,
    as_json: bool,
) -> None:
    """Create policy NAME in the vault (default schedule: daily 02:00 UTC)."""
    new = build_policy(name, schedule, daily, weekly, monthly, yearly)
    request = operator_pb2.PolicyRequest(vault=vault_name, spec_json=json.dumps(new.to_dict()))
    _show_policy("Created policy", call(connection, lambda s: s.CreatePolicy(request)), as_json)


@policy.command(name="edit")
@vault_option
@click.argument("name")
@schedule_option
@with_retention
@click.option(
    "--drop",
    "drop",
    multiple=True,
    type=click.Choice(["daily", "weekly", "monthly", "yearly"]),
    help="Remove a retention rule (repeatable).",
)
@json_option
@click.pass_obj
def policy_edit(
    connection: Connection,
    vault_name: str,
    name: str,
    schedule: str | None,
    daily: str | None,
    weekly: str | None,
    monthly: str | None,
    yearly: str | None,
    drop: tuple[str, ...],
    as_json: bool,
) -> None:
    """Change policy NAME; the change applies to every VM it protects."""
    ref = operator_pb2.PolicyRef(vault=vault_name, name=name)
    current = Policy.from_dict(json.loads(call(connection, lambda s: s.GetPolicy(ref)).spec_json))
    options = current.retention.to_options()
    given = {"daily": daily, "weekly": weekly, "monthly": monthly, "yearly": yearly}
    options.update({rule: value for rule, value in given.items() if value is not None})
    for rule in drop:
        options.pop(rule, None)
    edited = build_policy(
        name,
        current.schedule.to_text() if schedule is None else schedule,
        options.get("daily"),
        options.get("weekly"),
        options.get("monthly"),
        options.get("yearly"),
    )
    request = operator_pb2.PolicyRequest(vault=vault_name, spec_json=json.dumps(edited.to_dict()))
    _show_policy("Updated policy", call(connection, lambda s: s.UpdatePolicy(request)), as_json)


@policy.command(name="list")
@vault_option
@json_option
@click.pass_obj
def policy_list(connection: Connection, vault_name: str, as_json: bool) -> None:
    """The vault's policies."""
    reply = call(connection, lambda s: s.ListPolicies(operator_pb2.VaultRef(name=vault_name)))
    if as_json:
        print_json([as_dict(p) for p in reply.policies])
    else:
        table(f"Policies of vault {vault_name}", POLICY_COLUMNS, _policy_rows(list(reply.policies)))


@policy.command(name="show")
@vault_option
@click.argument("name")
@json_option
@click.pass_obj
def policy_show(connection: Connection, vault_name: str, name: str, as_json: bool) -> None:
    """One policy, with the VMs it protects."""
    ref = operator_pb2.PolicyRef(vault=vault_name, name=name)
    found = call(connection, lambda s: s.GetPolicy(ref))
    if as_json:
        print_json(as_dict(found))
    else:
        table(f"Policy {name}", POLICY_COLUMNS, _policy_rows([found]))


@policy.command(name="delete")
@vault_option
@click.argument("name")
@json_option
@click.pass_obj
def policy_delete(connection: Connection, vault_name: str, name: str, as_json: bool) -> None:
    """Delete a policy no protected VM uses.

    VMs whose protection was stopped with it forget it: resuming them needs --policy.
    """
    ref = operator_pb2.PolicyRef(vault=vault_name, name=name)
    deleted = call(connection, lambda s: s.DeletePolicy(ref))
    if as_json:
        print_json(as_dict(deleted))
        return
    console.print(f"Deleted policy [bold]{safe(name)}[/bold]", highlight=False, soft_wrap=True)
    if deleted.vms:
        console.print(
            f"VMs whose protection was stopped with it: {safe(', '.join(deleted.vms))}; "
            "resuming them needs --policy",
            highlight=False,
            soft_wrap=True,
        )


# --- protect, stop, resume -----------------------------------------------------------------


@click.command()
@vault_option
@click.argument("vms", nargs=-1, required=True)
@click.option(
    "--policy",
    "policy_name",
    default="",
    help="An existing policy of the vault (default for VMs not yet protected: DefaultPolicy).",
)
@click.option("--new-policy", default="", help="Or create this policy (with the options below).")
@schedule_option
@with_retention
@json_option
@click.pass_obj
def protect(
    connection: Connection,
    vault_name: str,
    vms: tuple[str, ...],
    policy_name: str,
    new_policy: str,
    schedule: str | None,
    daily: str | None,
    weekly: str | None,
    monthly: str | None,
    yearly: str | None,
    as_json: bool,
) -> None:
    """Step 3: protect VMs with a policy.

    Or move protected VMs to another policy (named with --policy); one job each.
    """
    inline = any(v is not None for v in (schedule, daily, weekly, monthly, yearly))
    spec = ""
    if new_policy:
        spec = json.dumps(
            build_policy(new_policy, schedule, daily, weekly, monthly, yearly).to_dict()
        )
    elif inline:
        raise click.UsageError(
            "schedule and retention options define a new policy: name it with --new-policy "
            "(an existing policy's rules are changed with `coffer policy edit`)"
        )
    request = operator_pb2.ProtectRequest(
        vault=vault_name, vms=vms, policy=policy_name, new_policy_json=spec
    )
    show_jobs(list(call(connection, lambda s: s.Protect(request)).jobs), as_json)


@click.command(name="stop-protection")
@vault_option
@click.argument("vms", nargs=-1, required=True)
@click.option("--retain-data", is_flag=True, help="Keep the recovery points.")
@click.option("--delete-data", is_flag=True, help="Delete the recovery points.")
@click.option("--yes", is_flag=True, help="Do not ask before deleting recovery points.")
@json_option
@click.pass_obj
def stop_protection(
    connection: Connection,
    vault_name: str,
    vms: tuple[str, ...],
    retain_data: bool,
    delete_data: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Stop protecting VMs.

    No more backups; keep (--retain-data) or delete (--delete-data) their recovery points.
    Deleted data stays recoverable for the vault's soft-delete days (`coffer rp list
    --deleted`, `coffer undelete`), unless the vault's soft delete is off.
    """
    if retain_data == delete_data:
        raise click.UsageError("choose one of --retain-data and --delete-data")
    if delete_data and not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("deleting recovery points asks first: add --yes to confirm")
        click.confirm(
            f"Delete every recovery point of {', '.join(vms)} in vault {vault_name}? "
            "They cannot be restored afterwards unless the vault keeps deleted data "
            "(soft delete) and they are undeleted before they are purged",
            abort=True,
        )
    mode = "delete" if delete_data else "retain"
    request = operator_pb2.StopProtectionRequest(
        vault=vault_name, vms=vms, delete_data=mode == "delete"
    )
    show_jobs(list(call(connection, lambda s: s.StopProtection(request)).jobs), as_json)


@click.command(name="resume-protection")
@vault_option
@click.argument("vms", nargs=-1, required=True)
@click.option(
    "--policy",
    "policy_name",
    default="",
    help="Protect them with this policy instead of the one each had.",
)
@json_option
@click.pass_obj
def resume_protection(
    connection: Connection,
    vault_name: str,
    vms: tuple[str, ...],
    policy_name: str,
    as_json: bool,
) -> None:
    """Protect stopped VMs again.

    After stop-protection --retain-data: each VM with the policy it had, or --policy.
    """
    request = operator_pb2.ProtectRequest(vault=vault_name, vms=vms, policy=policy_name)
    show_jobs(list(call(connection, lambda s: s.ResumeProtection(request)).jobs), as_json)
