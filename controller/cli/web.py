"""`coffer web login`: a one-time link that signs a browser in to the web console."""

from __future__ import annotations

import click

from controller.cli.client import Connection, call
from controller.cli.output import as_dict, console, json_option, print_json, when
from shared.rpc import operator_pb2

MAX_LINK_SECONDS = 3600


@click.group()
def web() -> None:
    """The web console (served by the controller when its config has [web])."""


@web.command()
@click.option(
    "--expires",
    "expires_seconds",
    type=click.IntRange(1, MAX_LINK_SECONDS),
    help="Seconds the link can be used (default: the controller's, 5 minutes).",
)
@json_option
@click.pass_obj
def login(connection: Connection, expires_seconds: int | None, as_json: bool) -> None:
    """Print a one-time sign-in link to the web console.

    The link signs a browser in as you, with your certificate's role: whatever you do there
    is checked and audited as your CLI calls are. It works once and for a few minutes; keep
    it to yourself until then.
    """
    request = operator_pb2.CreateWebLoginRequest(expires_seconds=expires_seconds or 0)
    link = call(connection, lambda s: s.CreateWebLogin(request))
    if as_json:
        print_json(as_dict(link))
        return
    console.print(f"Web console: {link.console}", highlight=False, soft_wrap=True)
    console.print(
        f"Sign in as {link.operator} ({link.role}) once, until {when(link.expires_at)}:",
        highlight=False,
        soft_wrap=True,
    )
    # The link alone on its line, unwrapped, for copying.
    click.echo(link.url)
