"""`coffer-controller`: run the controller until SIGINT or SIGTERM, or until a FATAL task fails.

A clean stop exits 0; a controller that cannot start (its state directory, port or datastores
taken, a bad config, a wrong master key) or whose FATAL task failed prints the error and exits
with its code (non-zero).

`coffer-controller rotate-master-key --config F --new-key-file K` (or `--new-passphrase-file
P`), with the controller stopped, re-wraps every encrypted vault's keys under a new master key
(controller/master_key.py); then name the new key in the config.

`coffer-controller recover --config F [--force]`, with the controller stopped, rebuilds its
catalog from the datastores under the config's `[datastore] url` and the master key
(controller/recovery.py): exit 0 when every object was read, 7 when some could not be (each is
named; the catalog holds the rest), or the exit code of the error that stopped it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from controller.config import ControllerConfig, EncryptionSettings
from controller.datastore import MasterKey
from controller.master_key import passphrase_key, read_passphrase, rotate_master_key
from controller.recovery import Recovered, recover
from controller.server import Controller
from shared.daemon import leave, run_daemon
from shared.errors import CofferError, CorruptData, InvalidArgument, find_coffer_error

ROTATE = "rotate-master-key"
RECOVER = "recover"


async def serve(config: ControllerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with Controller(config).running() as controller:
        # One line a supervisor or test can wait for.
        print(f"coffer-controller ready on port {controller.port}", flush=True)
        try:
            await controller.wait(stop)
        finally:
            logging.getLogger(__name__).info("shutting down")
    # Stopped: sessions ended, jobs recorded, the broker stopped, the catalog flushed. What is
    # left is freeing the fleet's sessions object by object, seconds at 10,000 agents.
    logging.getLogger(__name__).info("stopped")
    leave(0)


def rotate(argv: list[str]) -> int:
    """`coffer-controller rotate-master-key`: the exit code."""
    parser = argparse.ArgumentParser(
        prog=f"coffer-controller {ROTATE}",
        description="Re-wrap every encrypted vault's keys under a new master key, with the "
        "controller stopped. No backup data is read or rewritten. Afterwards, name the new key "
        "in the controller config ([encryption]) and export each vault's keys again.",
    )
    parser.add_argument("--config", type=Path, required=True, help="the controller's config")
    new = parser.add_mutually_exclusive_group(required=True)
    new.add_argument(
        "--new-key-file",
        type=Path,
        help="the new master key file (32 random bytes, mode 0600); made if it does not exist",
    )
    new.add_argument(
        "--new-passphrase-file", type=Path, help="a file holding the new master passphrase"
    )
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    made: list[MasterKey] = []

    def new_key() -> MasterKey:
        """The new master key: read, or made (only once the controller is known stopped)."""
        if args.new_passphrase_file is not None:
            key = passphrase_key(
                read_passphrase(args.new_passphrase_file), args.new_passphrase_file
            )
        elif args.new_key_file.exists() or args.new_key_file.is_symlink():
            key = MasterKey.from_file(args.new_key_file)
        else:
            key = MasterKey.create_file(args.new_key_file)
            print(f"made a new master key file {args.new_key_file} ({key.describe()})")
        made.append(key)
        return key

    try:
        config = ControllerConfig.load(args.config)
        if args.new_key_file is not None:
            path = args.new_key_file.absolute()
            default = config.encryption == EncryptionSettings()
            if path == config.encryption.master_key_file or (
                default and path == config.default_master_key_file
            ):
                raise InvalidArgument(detail=f"{path} is the master key already in use")
        done = asyncio.run(rotate_master_key(config, new_key))
    except (CofferError, BaseExceptionGroup) as exc:
        error = find_coffer_error(exc)
        if error is None:
            raise
        print(f"coffer-controller {ROTATE}: {error}", file=sys.stderr)
        return error.exit_code
    for vault in done:
        print(
            f"vault {vault.vault}: {vault.outcome}"
            + (f" ({vault.keys} keys)" if vault.keys else "")
        )
    if args.new_key_file is not None:
        where = f'master_key_file = "{args.new_key_file.absolute()}"'
    else:
        where = f'passphrase_file = "{args.new_passphrase_file.absolute()}"'
    print(
        f"Every encrypted vault is now under the new master key ({made[0].describe()}).\n"
        f"Before starting the controller, set in its config:\n  [encryption]\n  {where}\n"
        "Keep the new key offline, and export each vault's keys again "
        "(`coffer vault key export VAULT`): exports made before are wrapped under the old key."
    )
    return 0


def recover_command(argv: list[str]) -> int:
    """`coffer-controller recover`: the exit code."""
    parser = argparse.ArgumentParser(
        prog=f"coffer-controller {RECOVER}",
        description="Rebuild the controller's catalog from its datastores and the master key, "
        "with the controller stopped: vaults, policies, VMs, recovery points (and the deleted "
        "ones), items as ProtectionStopped until you resume them. Nothing in the datastores is "
        "changed. See docs/recovery.md.",
    )
    parser.add_argument("--config", type=Path, required=True, help="the controller's config")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a catalog the state directory already has (it is moved aside, not deleted)",
    )
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = ControllerConfig.load(args.config)
        done = asyncio.run(recover(config, force=args.force))
    except (CofferError, BaseExceptionGroup) as exc:
        error = find_coffer_error(exc)
        if error is None:
            raise
        print(f"coffer-controller {RECOVER}: {error}", file=sys.stderr)
        return error.exit_code
    _report(done)
    return CorruptData.exit_code if done.problems else 0


def _report(done: Recovered) -> None:
    if done.replaced is not None:
        print(f"the catalog it replaced was moved to {done.replaced}")
    for vault in done.vaults:
        kept = "encrypted" if vault.encrypted else "not encrypted (format 1)"
        states: dict[str, int] = {}
        for state in vault.items.values():
            states[state] = states.get(state, 0) + 1
        items = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "none"
        print(
            f"vault {vault.name} (region {vault.region}, {kept}) at {vault.location}:\n"
            f"  policies: {', '.join(vault.policies)}\n"
            f"  items: {items}\n"
            f"  recovery points: {vault.recovery_points}, deleted (recoverable): "
            f"{vault.deleted_recovery_points}, stored bytes: {vault.stored_bytes}"
        )
    for note in done.notes:
        print(f"note: {note}")
    for problem in done.problems:
        print(f"NOT RECOVERED: vault {problem.vault}: {problem.what}: {problem.error}")
    print(f"catalog written to {done.catalog}.")
    if done.problems:
        print(
            f"{len(done.problems)} objects could not be read and were left out (above); they "
            "are still in the datastores, untouched."
        )
    print(
        "Start the controller, check `coffer vault list` and `coffer rp list`, then resume "
        "protection (`coffer resume-protection --vault VAULT VM...`): items stay "
        "ProtectionStopped until then."
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == ROTATE:
        return rotate(args[1:])
    if args and args[0] == RECOVER:
        return recover_command(args[1:])
    return run_daemon("coffer-controller", __doc__, ControllerConfig.load, serve, args)


if __name__ == "__main__":
    sys.exit(main())
