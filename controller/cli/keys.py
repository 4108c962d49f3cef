"""`coffer vault key …`: a vault's encryption keys, re-wrapped, renewed and exported.

The keys themselves never leave the controller: a rotation re-wraps them there (and can start a
new data key), and an export prints them wrapped by the master key, with the recovery steps an
operator stores offline beside (never with) the master key (docs/encryption.md).
"""

from __future__ import annotations

import click

from controller.cli.client import Connection, call
from controller.cli.output import as_dict, console, json_option, print_json, safe
from shared.rpc import operator_pb2


@click.group()
def key() -> None:
    """A vault's encryption keys.

    Re-wrap them, start a new data key, export them for safekeeping.
    """


@key.command(name="rotate")
@click.argument("vault")
@click.option(
    "--new-data-key",
    is_flag=True,
    help="Also start a new data key: what is written from now on is encrypted with it.",
)
@json_option
@click.pass_obj
def key_rotate(connection: Connection, vault: str, new_data_key: bool, as_json: bool) -> None:
    """Re-wrap VAULT's keys under the controller's master key.

    Takes seconds: no backup data is read or rewritten, and every recovery point stays
    readable. Export the keys again afterwards (`coffer vault key export`).
    """
    request = operator_pb2.RotateVaultKeyRequest(vault=vault, new_data_key=new_data_key)
    keys = call(connection, lambda s: s.RotateVaultKey(request))
    if as_json:
        print_json(as_dict(keys))
        return
    console.print(
        f"Re-wrapped {keys.keys_rewrapped} keys of vault [bold]{safe(keys.vault)}[/bold] "
        f"under the master key ({safe(keys.master_key)}). Data keys: "
        f"{', '.join(map(str, keys.data_keys))}; new data is encrypted with key "
        f"{keys.current_data_key}.\nExport the keys again and keep the export offline: "
        f"coffer vault key export {safe(keys.vault)}",
        highlight=False,
        soft_wrap=True,
    )


@key.command(name="export")
@click.argument("vault")
@json_option
@click.pass_obj
def key_export(connection: Connection, vault: str, as_json: bool) -> None:
    """Print VAULT's wrapped keys and how to recover with them.

    Keep the text offline, apart from the master key and from the backups. It holds no key in
    the clear: it is useless without the master key.
    """
    exported = call(connection, lambda s: s.ExportVaultKeys(operator_pb2.VaultRef(name=vault)))
    if as_json:
        print_json(as_dict(exported))
        return
    # Printed as is: markup or wrapping would change the block an operator writes back.
    click.echo(exported.text, nl=False)
