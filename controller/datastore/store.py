"""The datastore: one vault's chunks, disk indexes and manifests, kept in an ObjectStore.

The layout, formats and commit rules are described in the package docstring
(`controller.datastore`). This class names the keys, checks every input, and keeps the order
of writes that makes a recovery point appear only once it is complete. One instance serves
every executor thread of the controller; its only mutable state is the keyring of an encrypted
datastore, which a key rotation replaces in one step.

An encrypted datastore (format 2) reads and writes every object through an `EncryptingStore`
(encrypted.py) over the storage, names chunks with its vault's keyed BLAKE3, and keeps its
wrapped keys in `datastore.json` (keys.py). A format-1 datastore reads and writes as it always
has: plain objects, plain BLAKE3 names.

A format-1 datastore being upgraded to format 2 (upgrade.py) has a format-2 `datastore.json`
that also describes what is left of format 1 (`DatastoreConfig.upgrading_from`): this class
opens its format-2 part; the format-1 part is a second `Datastore` over a `LegacyLayout`
(legacy.py), which the controller builds beside it (controller/datastores.py).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from controller.datastore.backend import ObjectInfo, ObjectStore
from controller.datastore.deleted import Deletion, Tombstone
from controller.datastore.description import (
    VAULT_DESCRIPTION_KEY,
    VM_DESCRIPTIONS,
    VaultDescription,
    VmDescription,
)
from controller.datastore.encrypted import CIPHER_NAME, EncryptingStore
from controller.datastore.keys import Keyring, MasterKey, WrappedKeyring, export_text
from controller.datastore.legacy import LEGACY_PREFIX
from shared.blob import Compression, decode_blob, decompress, encode_blob
from shared.clock import Clock, SystemClock
from shared.digest import (
    CHUNK_HASH,
    KEYED_CHUNK_HASH,
    PLAIN_CHUNK_HASH,
    ZERO_DIGEST,
    ChunkHash,
    check_digest,
    sha256,
)
from shared.errors import (
    ChunkDigestMismatch,
    ChunkMissing,
    Conflict,
    CorruptData,
    InvalidArgument,
    KeyUnavailable,
    NotFound,
    UnsupportedFormat,
)
from shared.index import DiskIndex, check_disk_name
from shared.manifest import RecoveryPointManifest

CONFIG_KEY = "datastore.json"
PLAIN_FORMAT = 1
"""Plain objects, chunks named by plain BLAKE3: what Coffer wrote before encryption at rest."""
ENCRYPTED_FORMAT = 2
"""Every object but datastore.json encrypted, chunks named by keyed BLAKE3, wrapped keys."""
CONFIG_FORMAT = ENCRYPTED_FORMAT
"""The newest datastore format this code reads and writes."""
UPGRADING_HASH = f"{KEYED_CHUNK_HASH}+{CHUNK_HASH}"
"""The `hash` a datastore being upgraded from format 1 records: its chunks have either name.
No code older than the upgrade knows it, so such code refuses the datastore (UnsupportedFormat)
instead of taking the format-1 chunks for garbage."""
NO_ENCRYPTION = "none"
CHUNKS = "chunks/"
INDEXES = "indexes/"
MANIFESTS = "manifests/"
DELETED = "deleted/"
"""Tombstones of soft-deleted recovery points (deleted.py)."""
INDEX_SUFFIX = ".didx"
MANIFEST_SUFFIX = ".json"

MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 16 << 20

_RP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_CHUNK_KEY = re.compile(r"chunks/([0-9a-f]{2})/([0-9a-f]{2})/(\1\2[0-9a-f]{60})")
_INDEX_KEY = re.compile(r"indexes/([^/]+)/([^/]+)\.didx")
_VM_DESCRIPTION_KEY = re.compile(r"vms/[0-9a-f]{32}\.json")
# Domain separation: a VM description's name is never the name of a chunk.
_VM_DESCRIPTION_CONTEXT = b"coffer vm description\0"


def check_recovery_point_id(rp_id: str) -> str:
    """`rp_id` if it can name a recovery point in keys; InvalidArgument otherwise."""
    if not isinstance(rp_id, str) or _RP_ID.fullmatch(rp_id) is None:
        raise InvalidArgument(
            detail=f"recovery point id {rp_id!r} must be 1-128 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return rp_id


def chunk_key(digest: bytes) -> str:
    """`chunks/ab/cd/abcd…`: two levels of 256 directories spread chunks evenly."""
    hex_digest = check_digest(digest).hex()
    return f"{CHUNKS}{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest}"


def index_key(rp_id: str, disk: str) -> str:
    return f"{INDEXES}{check_recovery_point_id(rp_id)}/{check_disk_name(disk)}{INDEX_SUFFIX}"


def manifest_key(rp_id: str) -> str:
    return f"{MANIFESTS}{check_recovery_point_id(rp_id)}{MANIFEST_SUFFIX}"


def deleted_key(rp_id: str) -> str:
    """`deleted/<rp id>.json`: the tombstone of a soft-deleted recovery point."""
    return f"{DELETED}{check_recovery_point_id(rp_id)}{MANIFEST_SUFFIX}"


_FORMATS = {
    # format: (hash, encryption); compression is zstd in both.
    PLAIN_FORMAT: (CHUNK_HASH, NO_ENCRYPTION),
    ENCRYPTED_FORMAT: (KEYED_CHUNK_HASH, CIPHER_NAME),
}
_VAULT = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


@dataclass(frozen=True)
class DatastoreConfig:
    """The settings every writer of a datastore must agree on (`datastore.json`).

    Format 1: {"format", "chunk_size", "hash": "blake3", "compression": "zstd"}.
    Format 2 adds "encryption": "aes-256-gcm", the "vault" it belongs to, and its "keys"
    (keys.py: the datastore id, the wrapped chunk-id key, the wrapped data keys and which one is
    current), with "hash": "blake3-keyed". While a format-1 datastore is upgraded it is format
    2 with "hash": "blake3-keyed+blake3" and "upgrade": {"from": its format-1 settings,
    "prefix": "format1/"} (`upgrading_from`). Two configs are equal when their settings are;
    the keys are not settings (they change on rotation).
    """

    chunk_size: int
    hash: str = CHUNK_HASH
    compression: str = "zstd"
    encryption: str = NO_ENCRYPTION
    vault: str = ""
    """The vault of an encrypted datastore (bound into its wrapped keys); "" in format 1."""
    keys: WrappedKeyring | None = field(default=None, compare=False, repr=False)
    upgrading_from: DatastoreConfig | None = None
    """While an upgrade runs: the settings of the format it converts from, whose indexes and
    manifests are under `LEGACY_PREFIX` and whose chunks share `chunks/` (upgrade.py)."""

    def __post_init__(self) -> None:
        size = self.chunk_size
        if (
            not isinstance(size, int)
            or not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE
            or size & (size - 1)
        ):
            raise InvalidArgument(
                detail=f"chunk size {size} must be a power of two from 4 KiB to 16 MiB"
            )
        if (self.hash, self.encryption) not in _FORMATS.values() or self.compression != "zstd":
            raise InvalidArgument(
                detail=f"no datastore format has hash {self.hash!r}, compression "
                f"{self.compression!r} and encryption {self.encryption!r}"
            )
        if self.encrypted and _VAULT.fullmatch(self.vault) is None:
            raise InvalidArgument(
                detail=f"an encrypted datastore needs a vault name, not {self.vault!r}"
            )
        old = self.upgrading_from
        if old is not None and (
            not self.encrypted
            or old.encrypted
            or old.upgrading_from is not None
            or old.chunk_size != self.chunk_size
        ):
            raise InvalidArgument(
                detail="only a format-1 datastore of the same chunk size is upgraded to format 2"
            )

    @classmethod
    def plain(cls, chunk_size: int) -> DatastoreConfig:
        """Format 1: what Coffer wrote before encryption at rest."""
        return cls(chunk_size)

    @classmethod
    def encrypted_for(cls, chunk_size: int, vault: str) -> DatastoreConfig:
        """Format 2 settings for `vault` (its keys are added when they are made)."""
        return cls(chunk_size, KEYED_CHUNK_HASH, "zstd", CIPHER_NAME, vault)

    @property
    def encrypted(self) -> bool:
        return self.encryption != NO_ENCRYPTION

    @property
    def format(self) -> int:
        return ENCRYPTED_FORMAT if self.encrypted else PLAIN_FORMAT

    def upgraded(self, keys: WrappedKeyring, vault: str) -> DatastoreConfig:
        """The settings of this format-1 datastore while it is upgraded to format 2."""
        return DatastoreConfig(
            self.chunk_size, KEYED_CHUNK_HASH, "zstd", CIPHER_NAME, vault, keys, self
        )

    def _document(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "format": self.format,
            "chunk_size": self.chunk_size,
            "hash": self.hash,
            "compression": self.compression,
        }
        if self.encrypted:
            if self.keys is None:
                raise InvalidArgument(detail="an encrypted datastore's settings need its keys")
            document.update(encryption=self.encryption, vault=self.vault, keys=self.keys.to_json())
        if self.upgrading_from is not None:
            document["hash"] = UPGRADING_HASH
            document["upgrade"] = {
                "from": self.upgrading_from._document(),
                "prefix": LEGACY_PREFIX,
            }
        return document

    def encode(self) -> bytes:
        return (json.dumps(self._document(), sort_keys=True, indent=2) + "\n").encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> DatastoreConfig:
        what = f"datastore configuration ({CONFIG_KEY})"
        try:
            document: Any = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CorruptData(what=what, detail=f"not UTF-8 JSON: {error}") from None
        if not isinstance(document, dict):
            raise CorruptData(what=what, detail="not a JSON object")
        version = document.get("format")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CorruptData(what=what, detail=f"bad format {version!r}")
        if version > CONFIG_FORMAT:
            raise UnsupportedFormat(what="datastore", version=version, supported=CONFIG_FORMAT)
        hash_name: Any = document.get("hash")
        compression: Any = document.get("compression")
        encryption: Any = document.get("encryption", NO_ENCRYPTION)
        upgrading_from = None
        if version == ENCRYPTED_FORMAT and hash_name == UPGRADING_HASH:
            upgrading_from = cls._upgrade_of(document.get("upgrade"), what)
            hash_name = KEYED_CHUNK_HASH
        if (hash_name, encryption) != _FORMATS[version] or compression != "zstd":
            known_hash, known_encryption = _FORMATS[version]
            raise UnsupportedFormat(
                f"Datastore of format {version} uses hash {hash_name!r}, compression "
                f"{compression!r} and encryption {encryption!r}; this Coffer knows only "
                f"{known_hash}, zstd and {known_encryption} in format {version}. Upgrade "
                "Coffer to read it.",
                what="datastore",
            )
        chunk_size = document.get("chunk_size")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
            raise CorruptData(what=what, detail=f"bad chunk size {chunk_size!r}")
        keys = None
        vault: Any = ""
        if version == ENCRYPTED_FORMAT:
            vault = document.get("vault")
            if not isinstance(vault, str):
                raise CorruptData(what=what, detail=f"bad vault {vault!r}")
            keys = WrappedKeyring.from_json(document.get("keys"), what)
        try:
            return cls(chunk_size, hash_name, compression, encryption, vault, keys, upgrading_from)
        except InvalidArgument as error:
            raise CorruptData(what=what, detail=error.fields.get("detail")) from None

    @classmethod
    def _upgrade_of(cls, upgrade: Any, what: str) -> DatastoreConfig:
        """The format an upgrade converts from, as `datastore.json` records it."""
        if not isinstance(upgrade, dict) or upgrade.get("prefix") != LEGACY_PREFIX:
            raise CorruptData(
                what=what, detail=f"an upgrade in progress is described as {upgrade!r}"
            )
        previous = upgrade.get("from")
        if not isinstance(previous, dict) or previous.get("format") != PLAIN_FORMAT:
            raise CorruptData(what=what, detail=f"an upgrade from {previous!r}")
        return cls.decode(json.dumps(previous).encode("utf-8"))


def _naming(error: UnsupportedFormat, what: str) -> UnsupportedFormat:
    """`error` naming the object it is about (which recovery point, which disk)."""
    fields = error.fields
    if "version" in fields and "supported" in fields:
        return UnsupportedFormat(
            what=what, version=fields["version"], supported=fields["supported"]
        )
    return error


class Datastore:
    """One vault's recovery points: content-addressed chunks, per-disk indexes, manifests."""

    def __init__(
        self,
        storage: ObjectStore,
        config: DatastoreConfig,
        keyring: Keyring | None = None,
        master: MasterKey | None = None,
        clock: Clock | None = None,
    ) -> None:
        """Use `create`, `open` or `open_or_create`; this trusts `config` and `keyring` as given."""
        if config.encrypted != (keyring is not None):
            raise InvalidArgument(detail="an encrypted datastore is opened with its keyring")
        self.storage = storage
        """The storage itself: objects as stored (encrypted, in format 2)."""
        self.config = config
        self._master = master
        self._clock = clock or SystemClock()
        self._rotation = threading.Lock()
        self._keyring = keyring
        self._sealed: EncryptingStore | None = None
        self.backend: ObjectStore = storage
        """Where the datastore reads and writes its objects, in the clear."""
        self.chunk_hash: ChunkHash = PLAIN_CHUNK_HASH
        """How chunks are named: the agent hashes with the same (it gets the key, if keyed)."""
        if keyring is not None:
            self._sealed = EncryptingStore(storage, keyring, plain_keys=(CONFIG_KEY,))
            self.backend = self._sealed
            self.chunk_hash = ChunkHash(keyring.chunk_id_key)

    def __repr__(self) -> str:
        return (
            f"Datastore({self.storage.location!r}, format {self.config.format}, "
            f"chunk_size={self.chunk_size})"
        )

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    @property
    def encrypted(self) -> bool:
        return self.config.encrypted

    # --- opening -----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        storage: ObjectStore,
        chunk_size: int,
        *,
        master: MasterKey | None = None,
        vault: str = "",
        clock: Clock | None = None,
    ) -> Datastore:
        """A new datastore in `storage`, or the one already there if its settings are these.

        With a master key the datastore is encrypted (format 2) and belongs to `vault`: its
        keys are made here, wrapped by `master` and stored in `datastore.json` before any other
        object. Without one it is a format-1 datastore. A datastore with other settings is
        never overwritten: Conflict.
        """
        if master is None:
            wanted = DatastoreConfig.plain(chunk_size)
        else:
            wanted = DatastoreConfig.encrypted_for(chunk_size, vault)
        if storage.has(CONFIG_KEY):
            return cls._matching(storage, wanted, master, clock)
        if master is not None:
            now = datetime.fromtimestamp((clock or SystemClock()).now(), UTC)
            keyring = Keyring.generate(vault, now)
            wanted = replace(wanted, keys=WrappedKeyring.wrap(keyring, master))
        storage.put(CONFIG_KEY, wanted.encode())
        # Two creators may race; the object store keeps one of the two configs. Reading it back
        # tells the loser, which must not then write chunks of the wrong size (or keys).
        return cls._matching(storage, wanted, master, clock)

    @classmethod
    def open_or_create(
        cls,
        storage: ObjectStore,
        chunk_size: int,
        *,
        master: MasterKey | None = None,
        vault: str = "",
        clock: Clock | None = None,
    ) -> Datastore:
        """Same as `create`, named for callers that usually find the datastore there."""
        return cls.create(storage, chunk_size, master=master, vault=vault, clock=clock)

    @classmethod
    def open(
        cls,
        storage: ObjectStore,
        *,
        master: MasterKey | None = None,
        require_encryption: bool = False,
        clock: Clock | None = None,
    ) -> Datastore:
        """The datastore in `storage`; NotFound if none was created there.

        An encrypted datastore needs the master key that wraps its keys: KeyUnavailable
        without one, WrongKey with another. A caller that knows the datastore was encrypted
        (its catalog says so) passes `require_encryption`: a format-1 `datastore.json` is then
        refused, so that whoever can write the storage cannot make the controller write plain
        objects by replacing it.
        """
        config = cls._read_config(storage)
        if require_encryption and not config.encrypted:
            raise CorruptData(
                what=f"datastore at {storage.location}",
                detail="its datastore.json says it is not encrypted (format 1), but it was "
                "created encrypted: datastore.json was replaced; restore it from the key export",
            )
        return cls(storage, config, cls._unwrap(storage, config, master), master, clock)

    @classmethod
    def _unwrap(
        cls, storage: ObjectStore, config: DatastoreConfig, master: MasterKey | None
    ) -> Keyring | None:
        if config.keys is None:
            return None
        if master is None:
            raise KeyUnavailable(
                what=f"datastore of vault {config.vault!r} at {storage.location}",
                detail="it is encrypted and no master key is configured; give the controller "
                f"the one that wraps its keys ({config.keys.describe_master()})",
            )
        return config.keys.unwrap(master, config.vault, storage.location)

    @classmethod
    def _read_config(cls, storage: ObjectStore) -> DatastoreConfig:
        try:
            data = storage.get(CONFIG_KEY)
        except NotFound:
            raise NotFound(kind="datastore", name=storage.location) from None
        return DatastoreConfig.decode(data)

    @classmethod
    def _matching(
        cls,
        storage: ObjectStore,
        wanted: DatastoreConfig,
        master: MasterKey | None,
        clock: Clock | None,
    ) -> Datastore:
        found = cls._read_config(storage)
        if found != wanted:
            encryption = f"encryption {found.encryption}" + (
                f" for vault {found.vault!r}" if found.encrypted else ""
            )
            raise Conflict(
                detail=f"the datastore at {storage.location} already exists with chunk size "
                f"{found.chunk_size}, hash {found.hash}, compression {found.compression} and "
                f"{encryption}; it cannot be used with chunk size {wanted.chunk_size}, "
                f"encryption {wanted.encryption}"
                + (f" for vault {wanted.vault!r}" if wanted.encrypted else "")
            )
        return cls(storage, found, cls._unwrap(storage, found, master), master, clock)

    # --- an upgrade from format 1 (upgrade.py) ------------------------------------------------

    @classmethod
    def begin_upgrade(
        cls,
        storage: ObjectStore,
        old: DatastoreConfig,
        master: MasterKey,
        vault: str,
        clock: Clock | None = None,
    ) -> Datastore:
        """Make the keys of the format-2 datastore that format-1 datastore `old` in `storage`
        becomes, store them in its `datastore.json` (which then says an upgrade runs), and
        return that format-2 datastore. Conflict, with nothing written, unless `datastore.json`
        is `old` now: it is rewritten once, by the one upgrade that found it so."""
        if cls._read_config(storage) != old or old.encrypted:
            raise Conflict(
                detail=f"the datastore at {storage.location} is not the format-1 datastore the "
                "upgrade was to convert (its datastore.json changed)"
            )
        now = datetime.fromtimestamp((clock or SystemClock()).now(), UTC)
        keyring = Keyring.generate(vault, now)
        config = old.upgraded(WrappedKeyring.wrap(keyring, master), vault)
        storage.put(CONFIG_KEY, config.encode())
        return cls.open(storage, master=master, require_encryption=True, clock=clock)

    def finish_upgrade(self) -> None:
        """The upgrade is done: `datastore.json` says format 2 and nothing more (the same keys).
        Conflict, with nothing written, if it changed since this datastore was opened."""
        stored = DatastoreConfig.decode(self.storage.get(CONFIG_KEY))
        if stored != self.config:
            raise Conflict(
                detail=f"datastore.json at {self.storage.location} changed since the datastore "
                "was opened; reopen it before finishing the upgrade"
            )
        if self.config.upgrading_from is None:
            return
        config = replace(stored, upgrading_from=None)
        self.storage.put(CONFIG_KEY, config.encode())
        self.config = config

    # --- keys of an encrypted datastore -------------------------------------------------------

    @property
    def current_data_key(self) -> int:
        """The data key that encrypts objects written now; Conflict if not encrypted."""
        return self._encrypted_keyring().current

    @property
    def data_keys(self) -> tuple[int, ...]:
        """The ids of every data key the datastore holds; Conflict if not encrypted."""
        return tuple(sorted(self._encrypted_keyring().data_keys))

    def rotate_master_key(self, new_master: MasterKey) -> int:
        """Re-wrap every key of this datastore under `new_master`; how many keys were re-wrapped.

        One object is written (`datastore.json`, atomically): no chunk, index or manifest is
        read or rewritten, so it takes as long as one KDF run at most. The keys stay the same,
        so every object stays readable. The new `datastore.json` is read back and unwrapped
        with `new_master` before this returns; if that fails the previous one is put back.
        """
        with self._rotation:
            keyring = self._encrypted_keyring()
            self._store_keys(keyring, new_master)
            self._master = new_master
            return 1 + len(keyring.data_keys)

    def new_data_key(self) -> int:
        """Start a new data key; its id. Objects written from now on are encrypted with it;
        older ones stay readable with the key their header names. Chunks are named as before
        (the chunk-id key does not change), so deduplication goes on across the rotation."""
        with self._rotation:
            keyring = self._encrypted_keyring()
            if self._master is None:
                raise KeyUnavailable(
                    what=f"datastore at {self.storage.location}",
                    detail="it was opened without its master key",
                )
            now = datetime.fromtimestamp(self._clock.now(), UTC)
            rotated = keyring.with_new_data_key(now)
            # Stored before any object is sealed with it: an object must never name a key
            # that the datastore does not hold.
            self._store_keys(rotated, self._master)
            assert self._sealed is not None
            self._sealed.use(rotated)
            self._keyring = rotated
            return rotated.current

    def export_keys(self) -> str:
        """The key export: `datastore.json` (wrapped keys only) and how to recover with it."""
        self._encrypted_keyring()
        document = self.storage.get(CONFIG_KEY)
        config = DatastoreConfig.decode(document)
        assert config.keys is not None
        return export_text(
            document,
            config.keys,
            config.vault,
            self.storage.location,
            datetime.fromtimestamp(self._clock.now(), UTC),
        )

    def _encrypted_keyring(self) -> Keyring:
        if self._keyring is None:
            raise Conflict(
                detail=f"the datastore at {self.storage.location} is not encrypted (format "
                f"{self.config.format}); it has no keys to rotate or export until it is upgraded"
            )
        return self._keyring

    def _store_keys(self, keyring: Keyring, master: MasterKey) -> None:
        """Write `keyring` wrapped by `master` as `datastore.json`, and check it reads back."""
        previous = self.storage.get(CONFIG_KEY)
        stored = DatastoreConfig.decode(previous)
        opened = self.config.keys
        # One writer per datastore: what is stored is what this instance opened. Anything
        # else (a restored export, another process) is not overwritten blindly.
        if (
            stored != self.config
            or stored.keys is None
            or opened is None
            or stored.keys.to_json() != opened.to_json()
        ):
            raise Conflict(
                detail=f"datastore.json at {self.storage.location} changed since the datastore "
                "was opened; reopen it before rotating keys"
            )
        config = replace(self.config, keys=WrappedKeyring.wrap(keyring, master))
        self.storage.put(CONFIG_KEY, config.encode())
        try:
            check = DatastoreConfig.decode(self.storage.get(CONFIG_KEY))
            if check.keys is None:
                raise CorruptData(what=CONFIG_KEY, detail="the keys did not read back")
            reread = check.keys.unwrap(master, check.vault, self.storage.location)
            if (reread.chunk_id_key, dict(reread.data_keys), reread.current) != (
                keyring.chunk_id_key,
                dict(keyring.data_keys),
                keyring.current,
            ):
                raise CorruptData(what=CONFIG_KEY, detail="the keys read back differ")
        except BaseException:
            self.storage.put(CONFIG_KEY, previous)
            raise
        self.config = config

    # --- chunks ------------------------------------------------------------------------------

    def has_chunk(self, digest: bytes) -> bool:
        """Whether the chunk is durable here; the zero digest is always "present"."""
        if check_digest(digest) == ZERO_DIGEST:
            return True
        return self.backend.has(chunk_key(digest))

    def missing_chunks(self, digests: Iterable[bytes]) -> list[bytes]:
        """Those of `digests` not stored here, each once, in the order first given."""
        missing: list[bytes] = []
        seen: set[bytes] = set()
        for digest in digests:
            if digest in seen:
                continue
            seen.add(digest)
            if not self.has_chunk(digest):
                missing.append(digest)
        return missing

    def put_chunk(
        self,
        digest: bytes,
        payload: bytes,
        compression: Compression | int,
        raw_size: int,
        *,
        replace: bool = False,
        durable: bool = True,
    ) -> int:
        """Verify and store a chunk as received; the bytes written (0 if it was already here).

        The payload is decompressed and hashed first: a chunk whose raw bytes do not hash to
        `digest` raises ChunkDigestMismatch, one that does not decompress to `raw_size` bytes
        raises CorruptData, and nothing is stored in either case. This holds also when the
        digest is already stored, so a sender's error is reported the same way every time.

        With `replace`, the chunk is written even if an object exists under its name: that
        object is known to be damaged (a verify or a failed read found it so), and a chunk's
        name proves nothing about its bytes. The put is atomic, so a reader sees the damaged
        object or the good one, never a mix.

        Without `durable`, the chunk may become visible only at the next `sync`, and a crash
        before it may lose it (`ObjectStore.put`): a backup's chunks, synced together before
        its index is accepted.
        """
        check_digest(digest)
        if digest == ZERO_DIGEST:
            raise InvalidArgument(
                detail="the zero digest stands for an all-zero chunk, which is never stored"
            )
        if not 0 < raw_size <= self.chunk_size:
            raise InvalidArgument(
                detail=f"chunk raw size {raw_size} is not within 1..{self.chunk_size} bytes"
            )
        try:
            kind = Compression(compression)
        except ValueError:
            raise InvalidArgument(detail=f"unknown chunk compression {compression!r}") from None
        raw = decompress(kind, payload, raw_size)
        actual = self.chunk_hash.digest(raw)
        if actual != digest:
            raise ChunkDigestMismatch(actual=actual.hex(), claimed=digest.hex())
        key = chunk_key(digest)
        if not replace and self.backend.has(key):
            return 0
        blob = encode_blob(kind, raw_size, payload)
        self.backend.put(key, blob, durable=durable)
        return len(blob)

    def put_chunk_blob(
        self,
        digest: bytes,
        compression: Compression,
        raw_size: int,
        payload: bytes,
        *,
        replace: bool = False,
    ) -> int:
        """Store a chunk the controller itself has just read, decompressed and named with this
        datastore's `chunk_hash` (an upgrade converting it from another format): `payload` as
        it is, under `digest`, without decompressing or hashing it again. The bytes written (0
        if it was already here; with `replace`, a chunk known bad, it is written anyway). Never
        for what an agent sends: that is `put_chunk`'s."""
        if check_digest(digest) == ZERO_DIGEST:
            raise InvalidArgument(
                detail="the zero digest stands for an all-zero chunk, which is never stored"
            )
        if not 0 < raw_size <= self.chunk_size:
            raise InvalidArgument(
                detail=f"chunk raw size {raw_size} is not within 1..{self.chunk_size} bytes"
            )
        key = chunk_key(digest)
        if not replace and self.backend.has(key):
            return 0
        blob = encode_blob(compression, raw_size, payload)
        self.backend.put(key, blob)
        return len(blob)

    def get_chunk_blob(self, digest: bytes) -> tuple[Compression, int, bytes]:
        """(compression, raw size, payload) as stored, to send on without recompressing.

        Not re-hashed here: whoever decompresses it (the agent, `read_chunk`) verifies it.
        """
        key = chunk_key(digest)
        if digest == ZERO_DIGEST:
            raise InvalidArgument(
                detail="the zero digest stands for an all-zero chunk, which is never stored"
            )
        try:
            data = self.backend.get(key)
        except NotFound:
            raise ChunkMissing(digest=digest.hex()) from None
        except CorruptData as error:  # it does not decrypt
            raise CorruptData(
                what=f"chunk {digest.hex()}", detail=error.fields.get("detail")
            ) from None
        try:
            compression, raw_size, payload = decode_blob(data)
        except CorruptData as error:
            raise CorruptData(
                what=f"chunk {digest.hex()}", detail=error.fields.get("detail")
            ) from None
        if raw_size > self.chunk_size:
            raise CorruptData(
                what=f"chunk {digest.hex()}",
                detail=f"raw size {raw_size} exceeds the chunk size {self.chunk_size}",
            )
        return compression, raw_size, payload

    def read_chunk(self, digest: bytes) -> bytes:
        """The chunk's raw bytes, verified against its digest."""
        compression, raw_size, payload = self.get_chunk_blob(digest)
        try:
            raw = decompress(compression, payload, raw_size)
        except CorruptData as error:
            raise CorruptData(
                what=f"chunk {digest.hex()}", detail=error.fields.get("detail")
            ) from None
        actual = self.chunk_hash.digest(raw)
        if actual != digest:
            raise CorruptData(
                what=f"chunk {digest.hex()}", detail=f"its bytes hash to {actual.hex()}"
            )
        return raw

    def list_chunk_digests(self) -> Iterator[bytes]:
        """The digest of every chunk stored, in no particular order (lists the store).

        Keys under `chunks/` that `put_chunk` cannot have written (another name, a shard that
        does not match the digest, the zero digest) are skipped: nothing here names them, so
        garbage collection leaves them alone.
        """
        for key in self.backend.list(CHUNKS):
            match = _CHUNK_KEY.fullmatch(key)
            if match is None:
                continue
            digest = bytes.fromhex(match[3])
            if digest != ZERO_DIGEST:
                yield digest

    def chunk_info(self, digest: bytes) -> ObjectInfo:
        """Size and last write time of a stored chunk; NotFound if it is not stored."""
        key = self._stored_chunk_key(digest)
        try:
            return self.backend.stat(key)
        except NotFound:
            raise NotFound(kind="chunk", name=digest.hex()) from None

    def delete_chunk(self, digest: bytes, *, durable: bool = True) -> None:
        """Remove a chunk, whoever references it; deleting a missing chunk is not an error.

        Only garbage collection calls this, under its `ChunkGuard` (gc.py), with `durable`
        False: it syncs once per batch (`sync`), outside the guard's lock.
        """
        self.backend.delete(self._stored_chunk_key(digest), durable=durable)

    def sync(self) -> None:
        """Make the puts and deletes made so far durable (see `ObjectStore.sync`)."""
        self.backend.sync()

    def _stored_chunk_key(self, digest: bytes) -> str:
        if check_digest(digest) == ZERO_DIGEST:
            raise InvalidArgument(
                detail="the zero digest stands for an all-zero chunk, which is never stored"
            )
        return chunk_key(digest)

    # --- indexes -----------------------------------------------------------------------------

    def put_index(self, rp_id: str, index: DiskIndex) -> str:
        """Store the index of one disk of a recovery point not yet committed; its SHA-256 hex.

        The caller makes sure the chunks it references are stored first; `put_manifest`
        checks again before the recovery point becomes visible.
        """
        key = index_key(rp_id, index.disk)
        if index.chunk_size != self.chunk_size:
            raise InvalidArgument(
                detail=f"index of disk {index.disk!r} has chunk size {index.chunk_size}, "
                f"the datastore {self.chunk_size}"
            )
        if self.backend.has(manifest_key(rp_id)):
            raise Conflict(detail=f"recovery point {rp_id} is committed; its indexes cannot change")
        data = index.encode()
        self.backend.put(key, data)
        return sha256(data).hex()

    def get_index(self, rp_id: str, disk: str, *, verify: bool = True) -> DiskIndex:
        """The index of `disk` in recovery point `rp_id`.

        With `verify` (the default) the recovery point must be committed, and the index must be
        the one its manifest records (same SHA-256). `verify=False` reads an index alone, as
        the commit itself does.
        """
        if verify:
            entry = self.get_manifest(rp_id).disk(disk)
            return self._recorded_index(rp_id, entry.name, entry.index_sha256)
        return self._decode_index(rp_id, disk, self._get_index_bytes(rp_id, disk))

    def get_indexes(self, manifest: RecoveryPointManifest) -> Iterator[DiskIndex]:
        """Each disk's index as `manifest` records it (same SHA-256), in the manifest's order.

        As `get_index`, without reading the manifest again for every disk. NotFound for an
        index that is not stored: the recovery point was deleted since `manifest` was read,
        or it is damaged.
        """
        for entry in manifest.disks:
            yield self._recorded_index(manifest.id, entry.name, entry.index_sha256)

    def _recorded_index(self, rp_id: str, disk: str, index_sha256: str) -> DiskIndex:
        data = self._get_index_bytes(rp_id, disk)
        if sha256(data).hex() != index_sha256:
            raise CorruptData(
                what=f"index of disk {disk!r} of recovery point {rp_id}",
                detail="it is not the index its manifest records (SHA-256 differs)",
            )
        return self._decode_index(rp_id, disk, data)

    def list_indexes(self) -> dict[str, list[str]]:
        """Every recovery point id with indexes stored, committed or not, and their disks.

        Lists the store. Keys under `indexes/` that do not name a recovery point's disk index
        are skipped. Those of a recovery point without a manifest belong to a backup that is
        running, failed or crashed: garbage collection tells them apart by age.
        """
        found: dict[str, list[str]] = {}
        for key in self.backend.list(INDEXES):
            match = _INDEX_KEY.fullmatch(key)
            if match is None:
                continue
            rp_id, disk = match[1], match[2]
            try:
                index_key(rp_id, disk)
            except InvalidArgument:
                continue  # not a name a recovery point or disk can have
            found.setdefault(rp_id, []).append(disk)
        return found

    def index_info(self, rp_id: str, disk: str) -> ObjectInfo:
        """Size and last write time of a stored index; NotFound if there is none."""
        try:
            return self.backend.stat(index_key(rp_id, disk))
        except NotFound:
            raise NotFound(kind="disk index", name=f"{rp_id}/{disk}") from None

    def delete_uncommitted_indexes(self, rp_id: str, disks: Iterable[str]) -> int:
        """Remove indexes a backup stored for a recovery point it never committed; how many.

        Conflict, with nothing deleted, if the recovery point is committed: its indexes go
        only with `delete_recovery_point`, or with its purge if it is soft-deleted. The check
        and the deletes are not one atomic step, so the caller makes sure no backup can still
        commit it (garbage collection deletes only indexes older than its grace period, which
        outlasts any backup).
        """
        if self.backend.has(manifest_key(rp_id)):
            raise Conflict(
                detail=f"recovery point {rp_id} is committed; its indexes are not leftovers"
            )
        # Checked after the manifest: a soft delete writes its tombstone before it removes
        # the manifest, so a point being deleted meanwhile is caught by one check or the other.
        if self.backend.has(deleted_key(rp_id)):
            raise Conflict(
                detail=f"recovery point {rp_id} is soft-deleted; its indexes wait for its purge"
            )
        keys = [index_key(rp_id, disk) for disk in disks]
        for key in keys:
            self.backend.delete(key)
        return len(keys)

    def _get_index_bytes(self, rp_id: str, disk: str) -> bytes:
        try:
            return self.backend.get(index_key(rp_id, disk))
        except NotFound:
            raise NotFound(kind="disk index", name=f"{rp_id}/{disk}") from None
        except CorruptData as error:  # it does not decrypt
            raise CorruptData(
                what=f"index of disk {disk!r} of recovery point {rp_id}",
                detail=error.fields.get("detail"),
            ) from None

    def _decode_index(self, rp_id: str, disk: str, data: bytes) -> DiskIndex:
        what = f"index of disk {disk!r} of recovery point {rp_id}"
        try:
            index = DiskIndex.decode(data)
        except CorruptData as error:
            raise CorruptData(what=what, detail=error.fields.get("detail")) from None
        except UnsupportedFormat as error:
            raise _naming(error, what) from None
        if index.disk != disk:
            raise CorruptData(what=what, detail=f"it describes disk {index.disk!r}")
        return index

    # --- manifests (the commit point) --------------------------------------------------------

    def put_manifest(self, manifest: RecoveryPointManifest, *, verify_chunks: bool = True) -> None:
        """Commit a recovery point: from now on it exists, and `list_manifests` shows it.

        Refused, with nothing written, unless every disk's index is stored with the SHA-256
        and geometry the manifest records, and (with `verify_chunks`) every chunk the indexes
        reference is stored. A caller that already knows each referenced chunk is durable may
        skip that check, which costs one `has` per distinct chunk. Committing the same
        manifest twice is harmless; committing a different one under a used id is a Conflict.
        """
        self._put_manifest_bytes(manifest, manifest.encode(), verify_chunks=verify_chunks)

    def _put_manifest_bytes(
        self, manifest: RecoveryPointManifest, encoded: bytes, *, verify_chunks: bool
    ) -> None:
        """`put_manifest` of `manifest`, stored as `encoded` (its bytes as first written)."""
        key = manifest_key(manifest.id)
        referenced: set[bytes] = set()
        for entry in manifest.disks:
            try:
                data = self._get_index_bytes(manifest.id, entry.name)
            except CorruptData as error:  # damaged beyond decrypting: not the recorded one
                raise Conflict(
                    detail=f"the stored index of disk {entry.name!r} is not the one manifest "
                    f"{manifest.id} records ({error.fields.get('detail')}); the recovery "
                    "point was not committed"
                ) from None
            if sha256(data).hex() != entry.index_sha256:
                raise Conflict(
                    detail=f"the stored index of disk {entry.name!r} is not the one manifest "
                    f"{manifest.id} records; the recovery point was not committed"
                )
            index = self._decode_index(manifest.id, entry.name, data)
            if (index.size_bytes, index.chunk_size, len(index)) != (
                entry.size_bytes,
                entry.chunk_size,
                entry.chunk_count,
            ):
                raise InvalidArgument(
                    detail=f"manifest {manifest.id} gives disk {entry.name!r} a geometry its "
                    "index does not have"
                )
            if verify_chunks:
                referenced |= index.referenced()
        missing = [digest for digest in referenced if not self.backend.has(chunk_key(digest))]
        if missing:
            raise ChunkMissing(
                f"{len(missing)} chunk(s) referenced by recovery point {manifest.id} are not in "
                f"the datastore (e.g. {missing[0].hex()}); the recovery point was not committed.",
                digest=missing[0].hex(),
            )
        try:
            existing = self.backend.get(key)
        except NotFound:
            self.backend.put(key, encoded)
            return
        if existing != encoded:
            raise Conflict(detail=f"recovery point {manifest.id} is already committed, differently")

    def get_manifest(self, rp_id: str) -> RecoveryPointManifest:
        """The manifest of a committed recovery point; NotFound if there is none."""
        try:
            data = self.backend.get(manifest_key(rp_id))
        except NotFound:
            raise NotFound(kind="recovery point", name=rp_id) from None
        except CorruptData as error:  # it does not decrypt
            raise CorruptData(
                what=f"manifest of recovery point {rp_id}", detail=error.fields.get("detail")
            ) from None
        return self._decode_manifest(rp_id, data)

    def _decode_manifest(self, rp_id: str, data: bytes) -> RecoveryPointManifest:
        what = f"manifest of recovery point {rp_id}"
        try:
            manifest = RecoveryPointManifest.decode(data)
        except CorruptData as error:
            raise CorruptData(what=what, detail=error.fields.get("detail")) from None
        except UnsupportedFormat as error:
            raise _naming(error, what) from None
        if manifest.id != rp_id:
            raise CorruptData(what=what, detail=f"it describes recovery point {manifest.id!r}")
        return manifest

    def list_recovery_point_ids(self) -> Iterator[str]:
        """Ids of every committed recovery point, in no particular order (lists the store)."""
        for key in self.backend.list(MANIFESTS):
            name = key.removeprefix(MANIFESTS)
            if "/" in name or not name.endswith(MANIFEST_SUFFIX):
                continue
            rp_id = name.removesuffix(MANIFEST_SUFFIX)
            if _RP_ID.fullmatch(rp_id):
                yield rp_id

    def list_manifests(self) -> Iterator[RecoveryPointManifest]:
        """Every committed recovery point's manifest, to rebuild the catalog (lists the store).

        A manifest that cannot be read raises (CorruptData, UnsupportedFormat); a caller that
        wants to skip such a recovery point iterates `list_recovery_point_ids` and calls
        `get_manifest` itself.
        """
        for rp_id in self.list_recovery_point_ids():
            try:
                yield self.get_manifest(rp_id)
            except NotFound:
                continue  # deleted since it was listed

    def delete_recovery_point(self, rp_id: str) -> None:
        """Remove a recovery point: its manifest first (it is gone from then on), then its indexes.

        The manifest is the commit point, so the recovery point disappears in one step; a
        failure after it leaves indexes without a manifest, which a retry or garbage collection
        removes. Its chunks stay until garbage collection finds nothing references them.
        Deleting a recovery point that does not exist (or half does) is not an error.
        """
        self.backend.delete(manifest_key(rp_id))
        self._delete_indexes(rp_id)

    def _delete_indexes(self, rp_id: str) -> None:
        # Listed in full before deleting: a paged listing (S3) need not survive deletes.
        for key in list(self.backend.list(f"{INDEXES}{check_recovery_point_id(rp_id)}/")):
            self.backend.delete(key)

    # --- soft-deleted recovery points (deleted.py) ---------------------------------------------

    def soft_delete_recovery_point(self, rp_id: str, deletion: Deletion) -> Tombstone:
        """Delete a recovery point recoverably: its manifest moves into a tombstone.

        The tombstone is written first, then the manifest deleted: the point stops being live
        in one step, and its indexes and chunks stay (garbage collection marks them through
        the tombstone). Idempotent: a point already soft-deleted gives its tombstone (as first
        written); NotFound if the point is neither live nor soft-deleted.
        """
        try:
            data = self.backend.get(manifest_key(rp_id))
        except NotFound:
            return self.get_deleted(rp_id)
        except CorruptData as error:  # it does not decrypt
            raise CorruptData(
                what=f"manifest of recovery point {rp_id}", detail=error.fields.get("detail")
            ) from None
        tombstone = Tombstone(data, self._decode_manifest(rp_id, data), deletion)
        self.backend.put(deleted_key(rp_id), tombstone.encode())
        self.backend.delete(manifest_key(rp_id))
        return tombstone

    def undelete_recovery_point(self, rp_id: str) -> RecoveryPointManifest:
        """Make a soft-deleted recovery point live again; its manifest.

        The manifest goes back exactly as it was stored, checked as a commit is (its indexes
        with the SHA-256 it records, every chunk they reference present: ChunkMissing or
        Conflict otherwise, and the point stays deleted); then the tombstone is deleted.
        Idempotent: a live point (undeleted before, or never deleted) is left as it is, a stale
        tombstone beside it removed. NotFound if the point is neither.
        """
        try:
            tombstone = self.get_deleted(rp_id)
        except NotFound:
            return self.get_manifest(rp_id)
        self._put_manifest_bytes(tombstone.manifest, tombstone.manifest_bytes, verify_chunks=True)
        self.backend.delete(deleted_key(rp_id))
        return tombstone.manifest

    def purge_deleted_recovery_point(self, rp_id: str) -> bool:
        """Remove a soft-deleted recovery point for good: its tombstone, then its indexes (its
        chunks are garbage collection's). True if it was purged; False if it is live (only a
        stale tombstone is removed) or already gone. The caller makes sure no undelete of the
        same point runs meanwhile."""
        if self.backend.has(manifest_key(rp_id)):
            self.backend.delete(deleted_key(rp_id))
            return False
        if not self.backend.has(deleted_key(rp_id)):
            self._delete_indexes(rp_id)  # a purge cut short after its tombstone went
            return False
        self.backend.delete(deleted_key(rp_id))
        self._delete_indexes(rp_id)
        return True

    def get_deleted(self, rp_id: str) -> Tombstone:
        """The tombstone of a soft-deleted recovery point; NotFound if it has none."""
        what = f"tombstone of deleted recovery point {rp_id}"
        try:
            data = self.backend.get(deleted_key(rp_id))
        except NotFound:
            raise NotFound(kind="deleted recovery point", name=rp_id) from None
        except CorruptData as error:  # it does not decrypt
            raise CorruptData(what=what, detail=error.fields.get("detail")) from None
        try:
            tombstone = Tombstone.decode(data)
        except CorruptData as error:
            raise CorruptData(what=what, detail=error.fields.get("detail")) from None
        except UnsupportedFormat as error:
            raise _naming(error, what) from None
        if tombstone.id != rp_id:
            raise CorruptData(what=what, detail=f"it holds recovery point {tombstone.id!r}")
        return tombstone

    def list_deleted_ids(self) -> Iterator[str]:
        """Ids of every recovery point with a tombstone, in no particular order (lists the
        store). A tombstone beside a live manifest (a move cut short) is listed too."""
        for key in self.backend.list(DELETED):
            name = key.removeprefix(DELETED)
            if "/" in name or not name.endswith(MANIFEST_SUFFIX):
                continue
            rp_id = name.removesuffix(MANIFEST_SUFFIX)
            if _RP_ID.fullmatch(rp_id):
                yield rp_id

    def is_live(self, rp_id: str) -> bool:
        """Whether the recovery point's live manifest exists (the commit-point rule)."""
        return self.backend.has(manifest_key(rp_id))

    # --- what only the catalog knew (description.py) -------------------------------------------

    def put_vault_description(self, description: VaultDescription) -> None:
        """Write `vault.json` whole (one atomic put)."""
        self.backend.put(VAULT_DESCRIPTION_KEY, description.encode())

    def get_vault_description(self) -> VaultDescription:
        """`vault.json`; NotFound if the datastore has none (written before descriptions)."""
        what = f"vault description ({VAULT_DESCRIPTION_KEY})"
        try:
            data = self.backend.get(VAULT_DESCRIPTION_KEY)
        except NotFound:
            raise NotFound(kind="vault description", name=self.storage.location) from None
        except CorruptData as error:
            raise CorruptData(what=what, detail=error.fields.get("detail")) from None
        return VaultDescription.decode(data)

    def vm_description_key(self, vm_id: str) -> str:
        """Where a VM's description lives: a name that does not say which VM (module note)."""
        digest = self.chunk_hash.digest(_VM_DESCRIPTION_CONTEXT + vm_id.encode("utf-8"))
        return f"{VM_DESCRIPTIONS}{digest.hex()[:32]}{MANIFEST_SUFFIX}"

    def put_vm_description(self, description: VmDescription) -> None:
        self.backend.put(self.vm_description_key(description.vm_id), description.encode())

    def delete_vm_description(self, vm_id: str) -> None:
        self.backend.delete(self.vm_description_key(vm_id))

    def list_vm_description_keys(self) -> Iterator[str]:
        """The keys of every VM description (lists the store)."""
        for key in self.backend.list(VM_DESCRIPTIONS):
            if _VM_DESCRIPTION_KEY.fullmatch(key):
                yield key

    def get_vm_description(self, key: str) -> VmDescription:
        """The VM description stored under `key` (from `list_vm_description_keys`)."""
        what = f"VM description {key}"
        try:
            data = self.backend.get(key)
        except CorruptData as error:
            raise CorruptData(what=what, detail=error.fields.get("detail")) from None
        description = VmDescription.decode(data, what)
        if self.vm_description_key(description.vm_id) != key:
            raise CorruptData(what=what, detail=f"it describes VM {description.vm_id!r}")
        return description


__all__ = [
    "CONFIG_KEY",
    "DELETED",
    "Datastore",
    "DatastoreConfig",
    "check_recovery_point_id",
    "chunk_key",
    "deleted_key",
    "index_key",
    "manifest_key",
]
