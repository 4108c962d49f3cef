"""The key hierarchy of an encrypted datastore: the master key, the vault keys it wraps, export.

    master key (the controller's)       a key file of 32 random bytes (mode 0600), or a passphrase
      │  passphrase only: Argon2id or scrypt, cost and random salt recorded with each wrapped key
      ▼
    key-encryption key (KEK)            never stored; a 64-bit check value of it is, to tell a
      │                                 wrong master key from damage
      │  AES-256-GCM, random nonce; associated data: datastore id, vault, purpose, key id
      ▼
    wrapped keys, in datastore.json     readable without the master key, useless without it
      ├── chunk-id key                  names chunks (keyed BLAKE3, shared/digest.py); one per
      │                                 vault, never changes: renaming every chunk would undo dedup
      └── data keys 1, 2, ...           encrypt objects (encrypted.py); the newest encrypts new
                                        objects, each object names the key that opens it

Why the wrapped keys live inside `datastore.json` rather than in objects of their own: the
datastore is then recoverable from the storage plus the master key alone, by reading one object
that needs no key to parse; re-wrapping under a new master key is one atomic put (a crash leaves
either every key under the old master key or every key under the new one, never a mix); and a
key export is that same document, which can be written back if the storage loses it.

Rotation. `rotate_master_key` re-wraps every key under a new master key: one object written,
seconds, no data touched. `new_data_key` starts a data key for objects written from then on;
older objects stay readable with the key their header names. The chunk-id key is not rotated.

A passphrase becomes a KEK through a memory-hard function. Its name, cost and random salt are
stored beside every key it wraps, so the cost can be raised later (re-wrap under the same
passphrase with new parameters) and a datastore records everything needed to open it except the
secret. The check value (BLAKE3 in key-derivation mode over the KEK, 8 bytes) lets a wrong
master key be refused with `WrongKey` instead of a misleading `CorruptData`; it gives an
attacker holding the storage nothing the AEAD tag would not: a guess still costs one KDF run.

Nothing here does I/O except reading and creating a key file; the datastore (store.py) reads
and writes `datastore.json`.
"""

from __future__ import annotations

import functools
import os
import secrets
import stat
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from blake3 import blake3
from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from shared.digest import CHUNK_ID_KEY_SIZE
from shared.errors import Conflict, CorruptData, InvalidArgument, KeyUnavailable, WrongKey

MASTER_KEY_SIZE = 32
"""Bytes in a master key file, and in every key-encryption key."""
DATA_KEY_SIZE = 32
"""Bytes in a data key (AES-256)."""
WRAP_CIPHER = "aes-256-gcm"
"""How keys are wrapped, as each wrapped key records it."""
MIN_PASSPHRASE = 8
"""Characters a passphrase has at least; the KDF's cost, not its length, is the main defence."""

_NONCE_SIZE = 12
_TAG_SIZE = 16
_SALT_SIZE = 16
_CHECK_CONTEXT = "Coffer 2025-03 master key check value v1"
_MAX_DATA_KEY_ID = 0xFFFF_FFFF  # the envelope header stores key ids in 32 bits

# Bounds on the KDF cost a datastore may ask for: a forged datastore.json must not make the
# controller allocate terabytes or spin for hours before it can even refuse the key.
_ARGON2_MAX_MEMORY_KIB = 4 << 20  # 4 GiB
_ARGON2_MAX_ITERATIONS = 64
_ARGON2_MAX_LANES = 64
_SCRYPT_MAX_N = 1 << 22  # 4 GiB at r=8
_SCRYPT_MAX_R = 32
_SCRYPT_MAX_P = 16


def _check_value(kek: bytes) -> str:
    return blake3(kek, derive_key_context=_CHECK_CONTEXT).digest(length=8).hex()


def _hex(value: Any, what: str, size: int | None = None) -> bytes:
    """Bytes from a hex string of a decoded document; CorruptData otherwise."""
    try:
        data = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        data = None
    if data is None or (size is not None and len(data) != size):
        raise CorruptData(what=what, detail=f"not {size or 'some'} bytes of hex: {value!r}")
    return data


def _int(document: Mapping[str, Any], key: str, what: str, low: int, high: int) -> int:
    value = document.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise CorruptData(what=what, detail=f"{key} {value!r} is not within {low}..{high}")
    return value


# --- passphrase to key: the KDF ------------------------------------------------------------


@functools.cache
def _argon2id() -> Any:
    """cryptography's Argon2id class if this installation can run it, else None.

    It exists from cryptography 44 on, and runs only where OpenSSL is 3.2 or later (the wheels
    bundle one; a distribution's build may not). scrypt, in every version, is the fallback.
    """
    try:
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    except ImportError:
        return None
    try:
        Argon2id(salt=bytes(16), length=32, iterations=1, lanes=1, memory_cost=8).derive(b"x")
    except UnsupportedAlgorithm:
        return None
    return Argon2id


@dataclass(frozen=True, repr=False)
class Kdf:
    """A memory-hard function with its cost and salt: how one passphrase becomes one KEK."""

    name: str
    """The function: "argon2id" (the default) or "scrypt"."""
    salt: bytes
    cost: tuple[tuple[str, int], ...]
    """Argon2id: memory_kib, iterations, lanes. scrypt: n, r, p. Sorted by name."""

    @classmethod
    def argon2id(cls, *, memory_kib: int = 256 << 10, iterations: int = 3, lanes: int = 4) -> Kdf:
        """Argon2id with a fresh salt. The default cost (256 MiB, 3 passes, 4 lanes) took
        0.5 s on this project's machine: paid once per datastore opened, and per guess."""
        return cls._checked(
            "argon2id",
            secrets.token_bytes(_SALT_SIZE),
            {"memory_kib": memory_kib, "iterations": iterations, "lanes": lanes},
            InvalidArgument,
        )

    @classmethod
    def default(cls) -> Kdf:
        """Argon2id at its default cost if this installation has it, else scrypt's default."""
        return cls.argon2id() if _argon2id() is not None else cls.scrypt()

    @classmethod
    def scrypt(cls, *, n: int = 1 << 17, r: int = 8, p: int = 1) -> Kdf:
        """scrypt with a fresh salt (128 MiB at the default cost; 0.3 s here)."""
        return cls._checked(
            "scrypt", secrets.token_bytes(_SALT_SIZE), {"n": n, "r": r, "p": p}, InvalidArgument
        )

    @classmethod
    def _checked(
        cls,
        name: str,
        salt: bytes,
        cost: Mapping[str, Any],
        error: type[InvalidArgument] | type[CorruptData],
    ) -> Kdf:
        what = "key derivation parameters"

        def fail(detail: str) -> Exception:
            if error is CorruptData:
                return CorruptData(what=what, detail=detail)
            return InvalidArgument(detail=f"{what}: {detail}")

        def bounded(key: str, low: int, high: int) -> int:
            value = cost.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise fail(f"{name} {key} {value!r} is not within {low}..{high}")
            return value

        if name == "argon2id":
            lanes = bounded("lanes", 1, _ARGON2_MAX_LANES)
            checked = {
                "memory_kib": bounded("memory_kib", 8 * lanes, _ARGON2_MAX_MEMORY_KIB),
                "iterations": bounded("iterations", 1, _ARGON2_MAX_ITERATIONS),
                "lanes": lanes,
            }
        elif name == "scrypt":
            n = bounded("n", 2, _SCRYPT_MAX_N)
            if n & (n - 1):
                raise fail(f"scrypt n {n} is not a power of two")
            r, p = bounded("r", 1, _SCRYPT_MAX_R), bounded("p", 1, _SCRYPT_MAX_P)
            checked = {"n": n, "r": r, "p": p}
        else:
            raise fail(f"unknown key derivation function {name!r} (argon2id, scrypt)")
        if set(cost) != set(checked):
            raise fail(f"{name} takes exactly {', '.join(sorted(checked))}")
        if len(salt) < _SALT_SIZE:
            raise fail(f"salt of {len(salt)} bytes; at least {_SALT_SIZE}")
        return cls(name, salt, tuple(sorted(checked.items())))

    def __repr__(self) -> str:
        return f"Kdf({self.describe()})"

    def describe(self) -> str:
        """For people: the function and its cost."""
        cost = dict(self.cost)
        if self.name == "argon2id":
            return (
                f"Argon2id, {cost['memory_kib'] >> 10} MiB, {cost['iterations']} passes, "
                f"{cost['lanes']} lanes"
            )
        return f"scrypt, N={cost['n']}, r={cost['r']}, p={cost['p']}"

    def derive(self, passphrase: bytes) -> bytes:
        """The KEK: slow and memory-hard on purpose."""
        cost = dict(self.cost)
        if self.name == "argon2id":
            argon2id = _argon2id()
            if argon2id is None:
                raise KeyUnavailable(
                    what="a passphrase master key",
                    detail="the keys are wrapped under an Argon2id-derived key, and this "
                    "controller's `cryptography` has no Argon2id (it needs 44 or later, built "
                    "with OpenSSL 3.2 or later)",
                )
            kek: bytes = argon2id(
                salt=self.salt,
                length=MASTER_KEY_SIZE,
                iterations=cost["iterations"],
                lanes=cost["lanes"],
                memory_cost=cost["memory_kib"],
            ).derive(passphrase)
            return kek
        return Scrypt(
            salt=self.salt, length=MASTER_KEY_SIZE, n=cost["n"], r=cost["r"], p=cost["p"]
        ).derive(passphrase)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "salt": self.salt.hex(), **dict(self.cost)}

    @classmethod
    def from_json(cls, document: Any) -> Kdf:
        what = "key derivation parameters"
        if not isinstance(document, dict):
            raise CorruptData(what=what, detail="not a JSON object")
        cost = {k: v for k, v in document.items() if k not in ("name", "salt")}
        salt = _hex(document.get("salt"), what)
        return cls._checked(str(document.get("name")), salt, cost, CorruptData)


# --- the master key ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WrappedKey:
    """One key encrypted under a master key, with what it takes to unwrap it (no secret)."""

    kek: Kdf | None
    """How the KEK came from a passphrase; None when the master key was a key file."""
    kek_check: str
    """Check value of the KEK (16 hex digits): tells a wrong master key from damage."""
    nonce: bytes
    ciphertext: bytes
    """The key and the 16-byte GCM tag."""
    created_at: str
    """When the key (not this wrapping) was made, ISO 8601 UTC."""

    @property
    def source(self) -> str:
        return "key-file" if self.kek is None else "passphrase"

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "cipher": WRAP_CIPHER,
            "created_at": self.created_at,
            "kek": {"source": self.source},
            "kek_check": self.kek_check,
            "nonce": self.nonce.hex(),
            "wrapped": self.ciphertext.hex(),
        }
        if self.kek is not None:
            document["kek"]["kdf"] = self.kek.to_json()
        return document

    @classmethod
    def from_json(cls, document: Any, what: str) -> WrappedKey:
        if not isinstance(document, dict):
            raise CorruptData(what=what, detail="not a JSON object")
        if document.get("cipher") != WRAP_CIPHER:
            raise CorruptData(what=what, detail=f"unknown cipher {document.get('cipher')!r}")
        kek = document.get("kek")
        if not isinstance(kek, dict) or kek.get("source") not in ("key-file", "passphrase"):
            raise CorruptData(what=what, detail=f"kek {kek!r} names no key file or passphrase")
        kdf = Kdf.from_json(kek.get("kdf")) if kek["source"] == "passphrase" else None
        check = document.get("kek_check")
        _hex(check, f"{what}, kek_check", 8)
        created = document.get("created_at")
        if not isinstance(created, str):
            raise CorruptData(what=what, detail=f"created_at {created!r}")
        return cls(
            kdf,
            str(check),
            _hex(document.get("nonce"), what, _NONCE_SIZE),
            _hex(document.get("wrapped"), what),
            created,
        )


class MasterKey:
    """The controller's master key: the 32 bytes of a key file, or a passphrase.

    It wraps and unwraps datastore keys and never leaves the controller. A passphrase master key
    derives one KEK per salt it meets (cached: opening many datastores costs one KDF run each
    distinct salt) and wraps new keys under one fresh salt of its own.
    """

    def __init__(
        self, *, secret: bytes | None = None, passphrase: str | None = None, kdf: Kdf | None = None
    ) -> None:
        """Use `from_file`, `from_passphrase` or `generate`."""
        if (secret is None) == (passphrase is None):
            raise InvalidArgument(detail="a master key is a key file or a passphrase, not both")
        if secret is not None and len(secret) != MASTER_KEY_SIZE:
            raise InvalidArgument(detail=f"a master key is {MASTER_KEY_SIZE} bytes")
        self._secret = secret
        self._passphrase = None if passphrase is None else passphrase.encode("utf-8")
        self._kdf = kdf if kdf is not None or passphrase is None else Kdf.default()
        self._derive = functools.lru_cache(maxsize=16)(self._derive_uncached)

    def __repr__(self) -> str:
        return f"MasterKey({self.describe()})"

    # --- making one --------------------------------------------------------------------------

    @classmethod
    def generate(cls) -> MasterKey:
        """A new random master key held in memory (write it with `create_file`)."""
        return cls(secret=secrets.token_bytes(MASTER_KEY_SIZE))

    @classmethod
    def create_file(cls, path: Path) -> MasterKey:
        """Write a new random master key to `path` (mode 0600, which must not exist yet)."""
        secret = secrets.token_bytes(MASTER_KEY_SIZE)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise Conflict(
                detail=f"{path} exists; a master key file is never overwritten (the keys of "
                "every datastore it wraps would be lost with it)"
            ) from None
        except OSError as error:
            raise KeyUnavailable(what=f"key file {path}", detail=str(error)) from error
        with os.fdopen(fd, "wb") as file:
            file.write(secret)
            file.flush()
            os.fsync(file.fileno())
        return cls(secret=secret)

    @classmethod
    def from_file(cls, path: Path) -> MasterKey:
        """The master key in `path`: exactly 32 bytes, a regular file owned by this user or
        root and readable by nobody else (as ssh checks a private key). KeyUnavailable if not."""
        what = f"master key file {path}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            raise KeyUnavailable(
                what=what,
                detail=f"{error.strerror or error}; a new one is made with "
                f"`(umask 077 && head -c 32 /dev/urandom > {path})`",
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise KeyUnavailable(what=what, detail="not a regular file")
            if info.st_uid not in (os.geteuid(), 0):
                raise KeyUnavailable(
                    what=what, detail=f"owned by uid {info.st_uid}, not by this user or root"
                )
            if info.st_mode & 0o077:
                raise KeyUnavailable(
                    what=what,
                    detail=f"mode {stat.S_IMODE(info.st_mode):04o} lets group or others read it; "
                    f"`chmod 600 {path}`, and consider the key compromised if others could",
                )
            secret = os.read(fd, MASTER_KEY_SIZE + 1)
        finally:
            os.close(fd)
        if len(secret) != MASTER_KEY_SIZE:
            raise KeyUnavailable(
                what=what,
                detail=f"{len(secret)}{'+' if len(secret) > MASTER_KEY_SIZE else ''} bytes; a "
                f"master key file holds exactly {MASTER_KEY_SIZE} random bytes",
            )
        return cls(secret=secret)

    @classmethod
    def from_passphrase(cls, passphrase: str, kdf: Kdf | None = None) -> MasterKey:
        """A master key from a passphrase; new keys are wrapped with `kdf` (`Kdf.default()`, a
        fresh salt, if None). Keys wrapped earlier record their own parameters."""
        if not isinstance(passphrase, str) or len(passphrase) < MIN_PASSPHRASE:
            raise InvalidArgument(
                detail=f"a master passphrase has at least {MIN_PASSPHRASE} characters"
            )
        return cls(passphrase=passphrase, kdf=kdf)

    # --- using it ----------------------------------------------------------------------------

    @property
    def source(self) -> str:
        return "key-file" if self._secret is not None else "passphrase"

    def describe(self) -> str:
        """For people: the kind of key and, for a key file, its check value (never the key)."""
        if self._secret is not None:
            return f"key file, check value {_check_value(self._secret)}"
        assert self._kdf is not None
        return f"passphrase ({self._kdf.describe()})"

    def _derive_uncached(self, kdf: Kdf) -> bytes:
        assert self._passphrase is not None
        return kdf.derive(self._passphrase)

    def _kek(self, kdf: Kdf | None) -> bytes:
        if kdf is None:
            assert self._secret is not None
            return self._secret
        return self._derive(kdf)

    def wrap(self, key: bytes, aad: bytes, created_at: str) -> WrappedKey:
        """`key` encrypted under this master key, bound to `aad` (which datastore and key)."""
        kdf = None if self._secret is not None else self._kdf
        kek = self._kek(kdf)
        nonce = secrets.token_bytes(_NONCE_SIZE)
        return WrappedKey(
            kdf, _check_value(kek), nonce, AESGCM(kek).encrypt(nonce, key, aad), created_at
        )

    def unwrap(self, wrapped: WrappedKey, aad: bytes, what: str) -> bytes:
        """The key `wrapped` holds. WrongKey if this is not the master key that wrapped it,
        CorruptData if it is but the wrapped key does not authenticate (damaged, or moved
        from another datastore, vault or key slot: `aad` differs)."""
        if wrapped.source != self.source:
            raise WrongKey(
                what=what,
                detail=f"it is wrapped under a {wrapped.source.replace('-', ' ')}, "
                f"and a {self.source.replace('-', ' ')} was given",
            )
        kek = self._kek(wrapped.kek)
        if _check_value(kek) != wrapped.kek_check:
            if wrapped.kek is None:
                detail = (
                    f"it needs the key file with check value {wrapped.kek_check}; the one "
                    f"given has {_check_value(kek)}"
                )
            else:
                detail = "it needs another passphrase than the one given"
            raise WrongKey(what=what, detail=detail)
        try:
            return AESGCM(kek).decrypt(wrapped.nonce, wrapped.ciphertext, aad)
        except InvalidTag:
            raise CorruptData(
                what=what,
                detail="the wrapped key does not authenticate under the right master key: it "
                "was damaged, or copied from another datastore, vault or key slot",
            ) from None


# --- a datastore's keys -----------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Keyring:
    """A datastore's keys in the clear: held in the controller's memory, never stored so."""

    datastore_id: str
    """Random id of the datastore, bound into every wrapping (a key moved between datastores
    of one vault name does not unwrap)."""
    vault: str
    chunk_id_key: bytes
    data_keys: Mapping[int, bytes]
    current: int
    """The data key that encrypts objects written now."""
    created: Mapping[str, str] = field(default_factory=dict)
    """When each key was made ("chunk-id", "1", "2", ...), ISO 8601 UTC."""

    def __post_init__(self) -> None:
        if len(self.chunk_id_key) != CHUNK_ID_KEY_SIZE:
            raise InvalidArgument(detail=f"a chunk-id key is {CHUNK_ID_KEY_SIZE} bytes")
        if self.current not in self.data_keys:
            raise InvalidArgument(detail=f"current data key {self.current} is not in the ring")
        for key_id, key in self.data_keys.items():
            if not 1 <= key_id <= _MAX_DATA_KEY_ID or len(key) != DATA_KEY_SIZE:
                raise InvalidArgument(detail=f"data key {key_id} is malformed")

    def __repr__(self) -> str:
        return (
            f"Keyring(vault={self.vault!r}, data keys {sorted(self.data_keys)}, "
            f"current {self.current})"
        )

    @classmethod
    def generate(cls, vault: str, now: datetime) -> Keyring:
        """Fresh random keys for a new datastore of `vault`: a chunk-id key and data key 1."""
        stamp = _stamp(now)
        return cls(
            datastore_id=secrets.token_hex(16),
            vault=vault,
            chunk_id_key=secrets.token_bytes(CHUNK_ID_KEY_SIZE),
            data_keys={1: secrets.token_bytes(DATA_KEY_SIZE)},
            current=1,
            created={"chunk-id": stamp, "1": stamp},
        )

    def with_new_data_key(self, now: datetime) -> Keyring:
        """This ring and one more data key, which becomes current."""
        key_id = max(self.data_keys) + 1
        if key_id > _MAX_DATA_KEY_ID:
            raise Conflict(detail="this datastore has used every data key id")
        return replace(
            self,
            data_keys={**self.data_keys, key_id: secrets.token_bytes(DATA_KEY_SIZE)},
            current=key_id,
            created={**self.created, str(key_id): _stamp(now)},
        )


def _stamp(now: datetime) -> str:
    return now.astimezone(UTC).isoformat(timespec="seconds")


def _aad(datastore_id: str, vault: str, slot: str) -> bytes:
    return f"coffer-key-wrap/1/{datastore_id}/{vault}/{slot}".encode()


@dataclass(frozen=True)
class WrappedKeyring:
    """A datastore's keys as `datastore.json` stores them: each wrapped by the master key."""

    datastore_id: str
    chunk_id: WrappedKey
    data: Mapping[int, WrappedKey]
    current: int

    @classmethod
    def wrap(cls, keyring: Keyring, master: MasterKey) -> WrappedKeyring:
        def seal(slot: str, key: bytes, created: str) -> WrappedKey:
            return master.wrap(key, _aad(keyring.datastore_id, keyring.vault, slot), created)

        made = keyring.created
        return cls(
            keyring.datastore_id,
            seal("chunk-id", keyring.chunk_id_key, made.get("chunk-id", "")),
            {
                key_id: seal(f"data/{key_id}", key, made.get(str(key_id), ""))
                for key_id, key in keyring.data_keys.items()
            },
            keyring.current,
        )

    def unwrap(self, master: MasterKey, vault: str, location: str) -> Keyring:
        """Every key in the clear. WrongKey for a master key that did not wrap them."""

        def open_(slot: str, wrapped: WrappedKey, size: int) -> bytes:
            what = f"key {slot} of the datastore of vault {vault!r} at {location}"
            key = master.unwrap(wrapped, _aad(self.datastore_id, vault, slot), what)
            if len(key) != size:
                raise CorruptData(what=what, detail=f"{len(key)} bytes, not {size}")
            return key

        created = {"chunk-id": self.chunk_id.created_at}
        created.update({str(key_id): w.created_at for key_id, w in self.data.items()})
        return Keyring(
            datastore_id=self.datastore_id,
            vault=vault,
            chunk_id_key=open_("chunk-id", self.chunk_id, CHUNK_ID_KEY_SIZE),
            data_keys={
                key_id: open_(f"data/{key_id}", wrapped, DATA_KEY_SIZE)
                for key_id, wrapped in sorted(self.data.items())
            },
            current=self.current,
            created=created,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "datastore_id": self.datastore_id,
            "chunk_id": self.chunk_id.to_json(),
            "data": {str(key_id): w.to_json() for key_id, w in sorted(self.data.items())},
            "current_data_key": self.current,
        }

    @classmethod
    def from_json(cls, document: Any, what: str) -> WrappedKeyring:
        if not isinstance(document, dict):
            raise CorruptData(what=what, detail="keys: not a JSON object")
        datastore_id = document.get("datastore_id")
        if not isinstance(datastore_id, str) or len(_hex(datastore_id, what)) != 16:
            raise CorruptData(what=what, detail=f"datastore_id {datastore_id!r}")
        data = document.get("data")
        if not isinstance(data, dict) or not data:
            raise CorruptData(what=what, detail="keys: no data keys")
        wrapped: dict[int, WrappedKey] = {}
        for name, entry in data.items():
            if not (name.isascii() and name.isdigit()) or not 1 <= int(name) <= _MAX_DATA_KEY_ID:
                raise CorruptData(what=what, detail=f"data key id {name!r}")
            wrapped[int(name)] = WrappedKey.from_json(entry, f"{what}, data key {name}")
        current = _int(document, "current_data_key", what, 1, _MAX_DATA_KEY_ID)
        if current not in wrapped:
            raise CorruptData(what=what, detail=f"current data key {current} is not in the ring")
        return cls(
            datastore_id,
            WrappedKey.from_json(document.get("chunk_id"), f"{what}, chunk-id key"),
            wrapped,
            current,
        )

    def describe_master(self) -> str:
        """For people: which master key opens these keys."""
        wrapped = self.chunk_id
        if wrapped.kek is None:
            return f"key file with check value {wrapped.kek_check}"
        return f"passphrase, {wrapped.kek.describe()}, salt {wrapped.kek.salt.hex()}"


# --- export -----------------------------------------------------------------------------------

_BEGIN = "-----BEGIN COFFER DATASTORE.JSON-----"
_END = "-----END COFFER DATASTORE.JSON-----"


def export_text(
    document: bytes, keys: WrappedKeyring, vault: str, location: str, now: datetime
) -> str:
    """The key export of a datastore: its `datastore.json` (wrapped keys, no secret) and the
    recovery instructions, as text an operator stores offline."""
    data_keys = ", ".join(str(key_id) for key_id in sorted(keys.data))
    instructions = textwrap.dedent(
        f"""\
        Coffer datastore key export
        ===========================
        Vault:         {vault}
        Datastore:     {location}
        Datastore id:  {keys.datastore_id}
        Exported:      {_stamp(now)}
        Data keys:     {data_keys} (objects written now use key {keys.current})
        Master key:    {keys.describe_master()}

        This export holds the datastore's keys wrapped by the master key. It is useless
        without the master key, and the master key is NOT in it. To read this datastore
        after losing the controller, keep offline, apart from each other and from the
        storage:
          1. the master key: the key file (32 bytes; `base64 KEYFILE` prints it for paper,
             `base64 -d > KEYFILE` with `chmod 600 KEYFILE` brings it back) or the passphrase;
          2. this export, made again after every key rotation (a new data key is not in
             older exports; objects encrypted with it cannot be read through one).

        To recover: give a controller the master key and the storage; datastore.json on the
        storage holds these same wrapped keys. If datastore.json is lost or damaged, write
        the lines between BEGIN and END below, exactly, to `datastore.json` at the
        datastore's root (its directory, or its bucket prefix). A wrong master key is
        refused with the error WrongKey, naming the check value of the key it needs.
        """
    )
    return f"{instructions}\n{_BEGIN}\n{document.decode('utf-8').rstrip()}\n{_END}\n"


def parse_export(text: str) -> bytes:
    """The `datastore.json` an export holds, to write back to the storage."""
    try:
        block = text.split(_BEGIN + "\n", 1)[1].split("\n" + _END, 1)[0]
    except IndexError:
        raise InvalidArgument(detail="not a Coffer key export (no BEGIN/END block)") from None
    return (block + "\n").encode("utf-8")


__all__ = [
    "DATA_KEY_SIZE",
    "MASTER_KEY_SIZE",
    "Kdf",
    "Keyring",
    "MasterKey",
    "WrappedKey",
    "WrappedKeyring",
    "export_text",
    "parse_export",
]
