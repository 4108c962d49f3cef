"""`coffer enrol`: one-time tokens with which a VM's agent gets its certificate.

The agent makes its own key and certificate request in the VM and sends it with the token to
the controller's enrolment listener (`coffer-agent enrol`); its key never leaves the VM.
"""

from __future__ import annotations

import re

import click

from controller.cli.client import Connection, call
from controller.cli.output import as_dict, print_json, when
from shared.rpc import operator_pb2

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+)([smhd])")


def parse_duration(text: str) -> int:
    """`90s`, `30m`, `1h`, `7d` (or a number of seconds) as seconds."""
    if text.isdigit():
        return int(text)
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 30m, 1h or 7d")
    return int(match[1]) * _UNITS[match[2]]


@click.group()
def enrol() -> None:
    """Enrol VMs: one-time tokens for their agents."""


@enrol.command(name="create")
@click.option("--vm", "vm_id", required=True, help="The VM id the token enrols (its agent's).")
@click.option(
    "--expires",
    default="1h",
    show_default=True,
    help="How long the token may be used: 90s, 30m, 1h, 7d (at most 30 days).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def create(connection: Connection, vm_id: str, expires: str, as_json: bool) -> None:
    """A token that enrols the agent of one VM, once (admin).

    Keep it secret until it is used: whoever holds it can enrol that VM. It carries the CA's
    fingerprint, so the agent trusts the controller it enrols with only if it is ours.
    """
    request = operator_pb2.CreateEnrolmentTokenRequest(
        vm_id=vm_id, expires_seconds=parse_duration(expires)
    )
    token = call(connection, lambda s: s.CreateEnrolmentToken(request))
    if as_json:
        print_json(as_dict(token))
        return
    click.echo(f"Enrolment token for VM {token.vm_id!r}, valid until {when(token.expires_at)}:")
    click.echo("")
    click.echo(f"  {token.token}")
    click.echo("")
    click.echo("In the VM, as root, with the agent's config (vm_id must be the same VM):")
    click.echo(
        f"  coffer-agent enrol --controller {token.enrol_address} --token TOKEN "
        "--config /etc/coffer-agent/agent.toml"
    )
    click.echo(f"CA fingerprint (SHA-256): {token.ca_fingerprint}")
