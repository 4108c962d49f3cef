"""`coffer pki`: the CA and its certificates.

`init`, `issue-agent` and `issue-operator` work on files on the CA host (where the CA key
lives), not over gRPC: they work without a running controller, and record what they issue in
the CA's ledger. `list` and `revoke` ask the controller (admin role): revoking takes effect in
the controller at once, which is where it must.

Errors are `shared.errors.CofferError`s and propagate: the `coffer` entry point maps them to
their message and exit code.
"""

from __future__ import annotations

from pathlib import Path

import click

from controller import pki as issuing
from controller.cli.client import Connection, call
from controller.cli.output import as_dict, print_json, table, when
from shared.rpc import operator_pb2
from shared.tls import CONTROLLER_NAME, OperatorRole

_DIR = click.Path(file_okay=False, dir_okay=True, writable=True, path_type=Path)
force_option = click.option(
    "--force",
    is_flag=True,
    help="Replace a bundle already in --out (whoever uses it loses its key).",
)


@click.group(name="pki")
def pki() -> None:
    """The CA: create it, issue certificates.

    Create the controller CA and issue certificates for agents and operators.
    """


@pki.command(name="init")
@click.option("--dir", "pki_dir", type=_DIR, required=True, help="Directory for the new CA.")
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="HOST",
    help="Another DNS name or IP address agents and operators reach the controller at "
    "(repeatable; localhost and 127.0.0.1 are always included).",
)
def init(pki_dir: Path, hosts: tuple[str, ...]) -> None:
    """Create a new CA with the controller's and operator admin's certificates.

    Refuses to touch a directory that already holds a CA.
    """
    issuing.init_pki(pki_dir, hosts=hosts)
    names = ", ".join(dict.fromkeys([*issuing.DEFAULT_CONTROLLER_HOSTS, *hosts]))
    click.echo(f"Created a new Coffer CA in {pki_dir}:")
    click.echo(
        "  ca.crt                          the CA certificate; every agent and operator needs it"
    )
    click.echo(
        "  ca.key                          the CA key; keep it secret, only this host needs it"
    )
    click.echo(
        f"  controller.crt, controller.key  the controller ({CONTROLLER_NAME}), valid for {names}"
    )
    click.echo(f"  operator.crt, operator.key      operator {issuing.ADMIN_OPERATOR!r}, role admin")
    click.echo(f"  {issuing.LEDGER}/                         every certificate issued (the ledger)")


@pki.command(name="issue-agent")
@click.argument("vm_id")
@click.option("--dir", "pki_dir", type=_DIR, required=True, help="Directory of the CA.")
@click.option(
    "--out", "out_dir", type=_DIR, required=True, help="Directory to write the bundle to."
)
@force_option
def issue_agent(vm_id: str, pki_dir: Path, out_dir: Path, force: bool) -> None:
    """Issue the certificate of the agent of VM VM_ID.

    Refuses to replace a bundle already in --out (a running agent's key) without --force.
    """
    issuing.issue_agent(pki_dir, vm_id, out_dir, force=force)
    click.echo(
        f"Wrote the certificate of the agent of VM {vm_id!r} to {out_dir}: "
        "ca.crt, agent.crt and agent.key (keep agent.key secret). Copy them into the VM. "
        "(A VM that can reach the controller can enrol instead: `coffer enrol create`.)"
    )


@pki.command(name="issue-operator")
@click.argument("name")
@click.option("--dir", "pki_dir", type=_DIR, required=True, help="Directory of the CA.")
@click.option(
    "--out", "out_dir", type=_DIR, required=True, help="Directory to write the bundle to."
)
@click.option(
    "--role",
    type=click.Choice([r.value for r in OperatorRole]),
    default=OperatorRole.READER.value,
    show_default=True,
    help="reader: lists, dashboard, jobs; operator: also backups, restores, cancel; "
    "admin: also vaults, policies, protection, deletes, PKI, enrolment, audit.",
)
@force_option
def issue_operator(name: str, pki_dir: Path, out_dir: Path, role: str, force: bool) -> None:
    """Issue the certificate of operator NAME, with a role.

    Refuses the controller's name, names starting with coffer-, and names of agents (a name
    is one identity, on MQTT too), and to replace a bundle already in --out (an operator's
    key) without --force. A newer certificate of NAME, once used, revokes the older ones.
    """
    issuing.issue_operator(pki_dir, name, out_dir, role=OperatorRole(role), force=force)
    click.echo(
        f"Wrote the certificate of operator {name!r} (role {role}) to {out_dir}: "
        "ca.crt, operator.crt and operator.key (keep operator.key secret)."
    )


def _certificates(reply: operator_pb2.ListCertificatesReply, as_json: bool, title: str) -> None:
    if as_json:
        print_json([as_dict(c) for c in reply.certificates])
        return
    table(
        title,
        ("Serial", "Kind", "Name", "Role", "Status", "Valid to", "Issued by", "First used",
         "Revoked"),
        [
            [
                c.serial,
                c.kind,
                c.name,
                c.role or "-",
                c.status,
                when(c.not_after),
                c.issued_by,
                when(c.first_used_at),
                f"{when(c.revoked_at)} by {c.revoked_by}" if c.revoked_by else "-",
            ]
            for c in reply.certificates
        ],
    )  # fmt: skip


_json = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@pki.command(name="list")
@click.argument("name", required=False, default="")
@_json
@click.pass_obj
def list_certificates(connection: Connection, name: str, as_json: bool) -> None:
    """Certificates the CA issued (of NAME), and whether each is valid (admin).

    Asks the controller, which reads the CA's ledger.
    """
    request = operator_pb2.ListCertificatesRequest(name=name)
    _certificates(call(connection, lambda s: s.ListCertificates(request)), as_json, "Certificates")


@pki.command(name="revoke")
@click.argument("name")
@_json
@click.pass_obj
def revoke(connection: Connection, name: str, as_json: bool) -> None:
    """Revoke every certificate of agent or operator NAME, at once (admin).

    The controller refuses them from now on and ends their calls in flight (an agent's
    session closes); the broker refuses them once it has read the new CRL (the private broker
    does at once). A VM revoked can enrol again with a new token.
    """
    request = operator_pb2.RevokeCertificatesRequest(name=name)
    reply = call(connection, lambda s: s.RevokeCertificates(request))
    if not as_json and not reply.certificates:
        click.echo(f"Every certificate of {name!r} was revoked already.")
        return
    _certificates(reply, as_json, f"Revoked certificates of {name}")
