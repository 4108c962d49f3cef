"""Encryption at rest: an ObjectStore wrapper that seals every object it stores (AES-256-GCM).

`EncryptingStore(inner, keyring)` is an ObjectStore over another: `put` encrypts and
authenticates the whole object, `get` checks and decrypts it, and everything else passes
through (deletes, sync, listings with their `after`, and the writer lease, which belongs to the
storage). Retry, fault injection and encryption are all wrappers around a store; the datastore
above sees plain objects and does not change with the storage under it. The keys named in
`plain_keys` (`datastore.json`, which says the format and holds the wrapped keys) are stored as
they are: they must be readable before any key is.

Envelope, version 1 (little-endian), around each object's bytes:

    offset size  field
    0      4     magic b"CFEN"
    4      1     envelope version (1)
    5      1     cipher: 1 = AES-256-GCM
    6      2     reserved, zero
    8      4     data key id (1, 2, ...: which key of the datastore's keyring sealed it)
    12     12    nonce, random
    24     n+16  ciphertext of the object's n bytes, then the 16-byte GCM tag

The associated data is the 24 header bytes followed by the object's key (its name below the
datastore's root, e.g. `chunks/ab/cd/abcd...`). So an object renamed, swapped with another or
copied between datastores fails authentication (`CorruptData`), and so does a header edited to
name another key or version. Names are relative to the datastore's root, so a whole datastore
copied to another directory or bucket prefix (an off-site copy) still reads.

Why random 96-bit nonces are safe here: GCM with random nonces stays within NIST SP 800-38D's
bound (collision chance below 2^-32) for up to 2^32 encryptions under one key. One data key
encrypts each distinct chunk once (a chunk already stored is not written again) plus one index
per disk and one manifest per recovery point: 2^32 chunks of the default 512 KiB are 2 PiB of
distinct data per data key, beyond any vault Coffer is designed for, and `new_data_key` resets
the count. AES-GCM-SIV (nonce-misuse resistant) was measured too: 0.4 GB/s against AES-GCM's
5-8 GB/s on this project's machine (OpenSSL 4.0 via `cryptography` 49, 64 KiB-1 MiB objects),
a tax on every byte backed up for a margin the counts above do not need.

Sizes. `stat` reports the size of the plain object (the stored size minus the constant
`OVERHEAD` of 40 bytes), so an object's size is `len(get(key))` through every store, the one
contract the shared test suite holds them all to. Byte accounting above (a recovery point's
stored bytes, what garbage collection frees) therefore counts plain objects; the storage holds
40 bytes more per object (under 0.01% at 512 KiB chunks).
"""

from __future__ import annotations

import secrets
import struct
import threading
from collections.abc import Collection, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from controller.datastore.backend import ObjectInfo, ObjectStore, check_key
from controller.datastore.keys import Keyring
from controller.datastore.lease import DEFAULT_LEASE_SECONDS, LeaseHolder, WriterLease
from shared.clock import Clock
from shared.errors import CorruptData, KeyUnavailable, UnsupportedFormat

ENVELOPE_MAGIC = b"CFEN"
ENVELOPE_VERSION = 1
CIPHER_AES_256_GCM = 1
CIPHER_NAME = "aes-256-gcm"
"""The object cipher's name, as `datastore.json` records it."""

_HEADER = struct.Struct("<4sBBHI12s")
HEADER_SIZE = _HEADER.size
TAG_SIZE = 16
OVERHEAD = HEADER_SIZE + TAG_SIZE
"""Bytes an encrypted object takes beyond its plain size."""


class _DataKeys:
    """The ciphers of a keyring's data keys and which one seals new objects."""

    def __init__(self, keyring: Keyring) -> None:
        # AESGCM objects hold the expanded key and copy a cipher context per call, so one of
        # each serves every thread.
        self.ciphers = {key_id: AESGCM(key) for key_id, key in keyring.data_keys.items()}
        self.current = keyring.current


def seal(key: str, data: bytes, key_id: int, cipher: AESGCM) -> bytes:
    """The stored form of object `key` holding `data`, sealed with data key `key_id`."""
    header = _HEADER.pack(
        ENVELOPE_MAGIC,
        ENVELOPE_VERSION,
        CIPHER_AES_256_GCM,
        0,
        key_id,
        secrets.token_bytes(12),
    )
    nonce = header[12:HEADER_SIZE]
    return header + cipher.encrypt(nonce, data, header + key.encode("ascii"))


def envelope_key_id(stored: bytes) -> int:
    """The data key id an encrypted object names (its header is not checked: see `unseal`)."""
    return int(_HEADER.unpack_from(stored)[4]) if len(stored) >= HEADER_SIZE else 0


class EncryptingStore:
    """An ObjectStore that encrypts every object into `inner`, except `plain_keys`."""

    def __init__(
        self, inner: ObjectStore, keyring: Keyring, *, plain_keys: Collection[str] = ()
    ) -> None:
        self.inner = inner
        self._plain = frozenset(plain_keys)
        self._keys = _DataKeys(keyring)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EncryptingStore({self.inner!r}, data key {self._keys.current})"

    @property
    def location(self) -> str:
        return self.inner.location

    @property
    def current_key_id(self) -> int:
        """The data key that seals objects written now."""
        return self._keys.current

    def use(self, keyring: Keyring) -> None:
        """Seal from now on with `keyring`'s current data key; read with any of its keys.

        The caller stores the wrapped keyring first: no object may be sealed with a key the
        datastore does not hold yet.
        """
        keys = _DataKeys(keyring)
        with self._lock:
            self._keys = keys  # one reference swap: a put sees the old ring or the new one

    # --- ObjectStore -------------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, durable: bool = True) -> None:
        check_key(key)
        if key in self._plain:
            self.inner.put(key, data, durable=durable)
            return
        keys = self._keys
        sealed = seal(key, data, keys.current, keys.ciphers[keys.current])
        self.inner.put(key, sealed, durable=durable)

    def get(self, key: str) -> bytes:
        stored = self.inner.get(key)
        if key in self._plain:
            return stored
        return self._unseal(key, stored)

    def has(self, key: str) -> bool:
        return self.inner.has(key)

    def stat(self, key: str) -> ObjectInfo:
        info = self.inner.stat(key)
        if key in self._plain:
            return info
        # An object too short to be an envelope is damaged; `get` says so. Its size here is 0
        # rather than an error, so garbage collection can still sweep it.
        return ObjectInfo(size=max(0, info.size - OVERHEAD), modified=info.modified)

    def delete(self, key: str, *, durable: bool = True) -> None:
        self.inner.delete(key, durable=durable)

    def sync(self) -> None:
        self.inner.sync()

    def list(self, prefix: str, after: str = "") -> Iterator[str]:
        return self.inner.list(prefix, after)

    def acquire_writer_lease(
        self,
        holder: LeaseHolder,
        *,
        duration: float = DEFAULT_LEASE_SECONDS,
        clock: Clock | None = None,
    ) -> WriterLease:
        # The lease is the storage's (a lock file, an object the backend names), not an object
        # of the datastore: nothing of it is sealed.
        return self.inner.acquire_writer_lease(holder, duration=duration, clock=clock)

    # --- opening an envelope -----------------------------------------------------------------

    def open_stored(self, key: str, stored: bytes) -> bytes:
        """The plain bytes of object `key` as the storage holds it (`stored`), authenticated
        with this store's keys: what `get` returns, for bytes read elsewhere (an off-site copy
        checks each object it sends on this way, and sends it sealed as it is)."""
        if key in self._plain:
            return stored
        return self._unseal(key, stored)

    def _unseal(self, key: str, stored: bytes) -> bytes:
        what = f"object {key!r}"
        if len(stored) < OVERHEAD:
            raise CorruptData(
                what=what,
                detail=f"{len(stored)} bytes, shorter than an encrypted object's {OVERHEAD}",
            )
        magic, version, cipher, reserved, key_id, nonce = _HEADER.unpack_from(stored)
        if magic != ENVELOPE_MAGIC:
            raise CorruptData(
                what=what, detail=f"bad magic {magic!r}: not an encrypted Coffer object"
            )
        if version > ENVELOPE_VERSION:
            raise UnsupportedFormat(
                what="encrypted object", version=version, supported=ENVELOPE_VERSION
            )
        if version < 1 or cipher != CIPHER_AES_256_GCM or reserved != 0:
            raise CorruptData(
                what=what,
                detail=f"envelope version {version}, cipher {cipher}, reserved {reserved:#x}",
            )
        keys = self._keys
        aead = keys.ciphers.get(key_id)
        if aead is None:
            raise KeyUnavailable(
                what=what,
                detail=f"it is sealed with data key {key_id}, which the datastore's keyring "
                f"does not hold (it has {', '.join(map(str, sorted(keys.ciphers)))}): "
                "datastore.json was replaced by an older copy, or the object is damaged",
            )
        header = stored[:HEADER_SIZE]
        try:
            return aead.decrypt(nonce, stored[HEADER_SIZE:], header + key.encode("ascii"))
        except InvalidTag:
            raise CorruptData(
                what=what,
                detail=f"it does not authenticate under data key {key_id}: damaged, or moved "
                "here from another name or datastore",
            ) from None


__all__ = ["CIPHER_NAME", "OVERHEAD", "EncryptingStore", "envelope_key_id", "seal"]
