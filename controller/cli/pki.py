"""`coffer pki`: create the controller CA and issue agent and operator certificates.

These commands work on files on the controller host (where the CA key lives), not over gRPC.
Errors are `shared.errors.CofferError`s and propagate: the `coffer` entry point maps them to
their message and exit code.
"""

from __future__ import annotations

from pathlib import Path

import click

from controller import pki as issuing
from shared.tls import CONTROLLER_NAME

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
    click.echo(f"  operator.crt, operator.key      operator {issuing.ADMIN_OPERATOR!r}")


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
        "ca.crt, agent.crt and agent.key (keep agent.key secret). Copy them into the VM."
    )


@pki.command(name="issue-operator")
@click.argument("name")
@click.option("--dir", "pki_dir", type=_DIR, required=True, help="Directory of the CA.")
@click.option(
    "--out", "out_dir", type=_DIR, required=True, help="Directory to write the bundle to."
)
@force_option
def issue_operator(name: str, pki_dir: Path, out_dir: Path, force: bool) -> None:
    """Issue the certificate of operator NAME.

    Refuses to replace a bundle already in --out (an operator's key) without --force.
    """
    issuing.issue_operator(pki_dir, name, out_dir, force=force)
    click.echo(
        f"Wrote the certificate of operator {name!r} to {out_dir}: "
        "ca.crt, operator.crt and operator.key (keep operator.key secret)."
    )
