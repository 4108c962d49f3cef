"""The controller's master key: where it comes from, its first making, and its replacement.

Every encrypted vault's keys are wrapped by one master key of the controller
(controller/datastore/keys.py; docs/encryption.md has the hierarchy). It comes from, in order:

1. `[encryption] master_key_file`: 32 random bytes, mode 0600;
2. `[encryption] passphrase_file`: a passphrase (its first line), turned into a key by a
   memory-hard function whose cost and salt each wrapped key records;
3. the environment variable COFFER_MASTER_PASSPHRASE, when the config names neither file;
4. otherwise `state_dir/master.key`, made on the first start that finds none. So every new
   vault is encrypted without any setting, and the controller says loudly, at every start
   until it is acknowledged by configuring a key, that this file must be kept offline: without
   it no backup in an encrypted vault can be read. A configured key that is missing or
   unreadable is an error (KeyUnavailable): only the default is ever made.

A master key is never sent anywhere or logged; only its kind and, for a key file, a check value
(`MasterKey.describe`) are shown.

Replacing it (`coffer-controller rotate-master-key`) re-wraps every encrypted vault's keys
under a new master key, one `datastore.json` at a time (each put atomic; nothing else is
read or written), while the controller is stopped: the command takes the state directory's
lock and the datastores' writer lease as a controller would. A vault already re-wrapped (a
rotation cut short and run again) opens with the new key and is left as it is. Afterwards the
config must name the new key; a controller started with the old one refuses to start with
WrongKey, naming the key each vault needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from controller.catalog import Catalog
from controller.config import PASSPHRASE_VARIABLE, ControllerConfig
from controller.datastore import (
    CONFIG_KEY,
    Datastore,
    DatastoreConfig,
    LeaseHolder,
    MasterKey,
    open_object_store,
)
from controller.datastores import Datastores
from controller.state_lock import StateLock
from shared.errors import CofferError, InvalidArgument, KeyUnavailable, NotFound, WrongKey

log = logging.getLogger(__name__)

MAX_PASSPHRASE_FILE = 4096


def load_master_key(
    config: ControllerConfig, environ: Mapping[str, str] | None = None
) -> MasterKey:
    """The controller's master key (see the module note); blocking. The default key file is
    made if it does not exist yet."""
    settings = config.encryption
    env = os.environ if environ is None else environ
    if settings.master_key_file is not None:
        return MasterKey.from_file(settings.master_key_file)
    if settings.passphrase_file is not None:
        return passphrase_key(read_passphrase(settings.passphrase_file), settings.passphrase_file)
    if env.get(PASSPHRASE_VARIABLE):
        return passphrase_key(env[PASSPHRASE_VARIABLE], f"${PASSPHRASE_VARIABLE}")
    path = config.default_master_key_file
    if path.exists() or path.is_symlink():
        key = MasterKey.from_file(path)
        _remind(path, key, made=False)
        return key
    key = MasterKey.create_file(path)
    _remind(path, key, made=True)
    return key


def _remind(path: Path, key: MasterKey, *, made: bool) -> None:
    what = "made a new master key" if made else "uses the master key it made"
    log.warning(
        "\n*** The controller %s at %s (%s). ***\n"
        "*** Every new vault is encrypted under it: WITHOUT THIS FILE NO BACKUP CAN BE READ. ***\n"
        "Keep a copy offline, apart from the backups: `base64 %s` prints it for paper\n"
        "(`base64 -d > master.key` and `chmod 600 master.key` bring it back). Keep each\n"
        "vault's key export too: `coffer vault key export VAULT`, again after every rotation.\n"
        "Name the key in the config (`[encryption] master_key_file`) to silence this warning.",
        what,
        path,
        key.describe(),
        path,
    )


def read_passphrase(path: Path) -> str:
    """The passphrase in `path`: its first line, from a regular file owned by this user or
    root that nobody else may read (as a key file). KeyUnavailable otherwise."""
    what = f"passphrase file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise KeyUnavailable(what=what, detail=error.strerror or str(error)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyUnavailable(what=what, detail="not a regular file")
        if info.st_uid not in (os.geteuid(), 0):
            raise KeyUnavailable(what=what, detail=f"owned by uid {info.st_uid}")
        if info.st_mode & 0o077:
            raise KeyUnavailable(
                what=what,
                detail=f"mode {stat.S_IMODE(info.st_mode):04o} lets group or others read it; "
                f"`chmod 600 {path}`, and consider the passphrase compromised if others could",
            )
        data = os.read(fd, MAX_PASSPHRASE_FILE + 1)
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyUnavailable(what=what, detail="it is not UTF-8 text") from None
    if len(data) > MAX_PASSPHRASE_FILE:
        raise KeyUnavailable(what=what, detail=f"longer than {MAX_PASSPHRASE_FILE} bytes")
    return text.splitlines()[0] if text.strip() else ""


def passphrase_key(passphrase: str, source: str | Path) -> MasterKey:
    """A master key from a passphrase; KeyUnavailable naming `source` if it is too short."""
    try:
        return MasterKey.from_passphrase(passphrase)
    except InvalidArgument as error:
        raise KeyUnavailable(
            what=f"the master passphrase in {source}", detail=error.fields.get("detail", "")
        ) from None


# --- replacing it -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rotated:
    """What a master key rotation did to one vault."""

    vault: str
    outcome: str
    """"re-wrapped", "already re-wrapped" or "not encrypted (format 1)"."""
    keys: int = 0


async def rotate_master_key(
    config: ControllerConfig, new_key: Callable[[], MasterKey]
) -> list[Rotated]:
    """Re-wrap every encrypted vault's keys under the key `new_key()` reads or makes (see the
    module note). The controller must be stopped: StateDirInUse, or WriterLeaseHeld for another
    controller on the root; nothing is made or changed then."""
    settings = config.datastores
    with StateLock(config.state_dir):
        old = await asyncio.to_thread(load_master_key, config)
        new = await asyncio.to_thread(new_key)
        async with Catalog(config.catalog_path) as catalog:
            datastores = Datastores(catalog, settings.url, s3=settings.s3, master=old)
            root = await asyncio.to_thread(open_object_store, settings.url, settings.s3)
            holder = LeaseHolder.this_process("rotate-master-key")
            lease = await asyncio.to_thread(
                root.acquire_writer_lease, holder, duration=settings.lease_seconds
            )
            try:
                return [
                    await asyncio.to_thread(_rotate_one, datastores, vault.name, old, new)
                    for vault in await catalog.vaults()
                ]
            finally:
                with contextlib.suppress(CofferError):
                    await asyncio.to_thread(lease.release)


def _rotate_one(datastores: Datastores, vault: str, old: MasterKey, new: MasterKey) -> Rotated:
    storage = datastores.storage(vault)
    try:
        config = DatastoreConfig.decode(storage.get(CONFIG_KEY))
    except NotFound:
        return Rotated(vault, "no datastore yet")
    if not config.encrypted:
        return Rotated(vault, "not encrypted (format 1)")
    try:
        datastore = Datastore.open(storage, master=old, require_encryption=True)
    except WrongKey:
        # Cut short before and run again: this one is under the new key already.
        Datastore.open(storage, master=new, require_encryption=True)
        return Rotated(vault, "already re-wrapped")
    keys = datastore.rotate_master_key(new)
    log.info("vault %s: %d keys re-wrapped under the new master key", vault, keys)
    return Rotated(vault, "re-wrapped", keys)


__all__ = ["Rotated", "load_master_key", "passphrase_key", "read_passphrase", "rotate_master_key"]
