"""The object store interface every datastore backend implements, and the key rules.

Six operations on whole objects named by keys, and a `sync` for deletes made in a batch, small
enough that a local directory and an S3-compatible bucket implement it the same way (restic's
`Backend`, PBS's chunk store). No
rename, no directories, no appends, no partial reads: whatever the datastore needs beyond that
is built above, so every backend passes the same test suite. Retry, metrics and fault
injection wrap an `ObjectStore`; they are not branches inside one. A seventh method takes the
datastore's writer lease (lease.py), which each backend holds with what it guarantees; wrappers
pass it through.

Keys are '/'-separated ASCII components of letters, digits, '.', '_' and '-'. A component may
not start with '.', which keeps '..' out, and leaves names beginning with '.' to a backend's
own use (the local store's temporary files). A key has at most 1024 characters (S3's limit).
A key cannot also be a prefix directory of another key ("a" and "a/b"), which a file system
could not hold; the datastore's layout never needs it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from shared.errors import InvalidArgument

if TYPE_CHECKING:
    from controller.datastore.lease import LeaseHolder, WriterLease
    from shared.clock import Clock

MAX_KEY_LENGTH = 1024
_COMPONENT = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"
_KEY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
KEY_COMPONENT = re.compile(_COMPONENT)
"""One '/'-free part of a key."""


def check_key(key: str) -> str:
    """`key` if it is a valid object key; InvalidArgument otherwise."""
    if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or _KEY.fullmatch(key) is None:
        raise InvalidArgument(
            detail=f"object key {key!r} must be '/'-separated names of letters, digits, '.', "
            f"'_' or '-', none empty or starting with '.', at most {MAX_KEY_LENGTH} characters"
        )
    return key


def check_prefix(prefix: str) -> str:
    """`prefix` if some valid key could start with it ('' and 'a/' included)."""
    if prefix == "":
        return prefix
    check_key(prefix.removesuffix("/") if isinstance(prefix, str) else prefix)
    return prefix


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object without reading it."""

    size: int
    """Bytes in the object."""
    modified: float
    """When the object was last written, in POSIX seconds (the store's clock and resolution:
    nanoseconds for a local file system, whole seconds for S3's LastModified)."""


class ObjectStore(Protocol):
    """Whole objects under keys; every method is synchronous and safe to call from any thread."""

    @property
    def location(self) -> str:
        """Where the objects live, for messages (a directory, a bucket URL)."""
        ...

    def put(self, key: str, data: bytes, *, durable: bool = True) -> None:
        """Store `data` under `key`, replacing what was there.

        Atomic: readers see the old object or the whole new one, never a part, and a failed
        put leaves no part visible. Durable when it returns, unless `durable` is False: then
        the object may become visible only later (never before its contents are durable) and
        is visible and durable once the next `sync` returns; a crash before that may lose it.
        A backup stores its chunks that way and syncs once before it accepts an index naming
        them (`controller.jobs.transaction`). Idempotent: putting the same bytes again is
        harmless, also concurrently.
        """
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes; shared.errors.NotFound if there is none."""
        ...

    def has(self, key: str) -> bool:
        """Whether an object exists under `key`."""
        ...

    def stat(self, key: str) -> ObjectInfo:
        """The object's size and last write time; shared.errors.NotFound, as `get`, if none.

        A put, also of the same bytes, sets the time to when it happened: garbage collection
        reads it as the object's age. S3 maps this to HeadObject (Content-Length,
        LastModified).
        """
        ...

    def delete(self, key: str, *, durable: bool = True) -> None:
        """Remove the object; deleting a missing key is not an error.

        Durable when it returns, unless `durable` is False: then a crash may bring the object
        back until the next `sync`. Garbage collection deletes chunks that way, one after the
        other, and syncs once per batch (a chunk that comes back is only garbage again).
        """
        ...

    def sync(self) -> None:
        """Make every put and delete made so far durable (a store whose writes always are:
        nothing)."""
        ...

    def list(self, prefix: str, after: str = "") -> Iterator[str]:
        """Keys starting with `prefix`, in the store's listing order; with `after` (a key this
        listing gave), only those that follow it in that order (S3's start-after).

        The order is the store's own and stable (byte order for a local directory and AWS;
        SeaweedFS lists a directory's keys where the directory's name sorts): callers must not
        assume one, but `after` lets a listing that failed part way resume after the last key
        it gave, which the retrying wrapper does. Slow on big stores: only catalog rebuild,
        garbage collection and cleanup of a deleted recovery point call it, never the backup
        or restore data path.
        """
        ...

    def acquire_writer_lease(
        self, holder: LeaseHolder, *, duration: float = ..., clock: Clock | None = None
    ) -> WriterLease:
        """Take the datastore's writer lease for `holder` (lease.py); WriterLeaseHeld, naming
        the holder and its expiry, if another has it. `duration` and `clock` apply to leases
        that expire (S3); a local directory's lock lasts while the process lives."""
        ...
