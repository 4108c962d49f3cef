"""The writer lease: one controller writes a datastore at a time, enforced by the store itself.

Two controllers writing one datastore would each run garbage collection blind to the other's
running backups (the `ChunkGuard` lives in one process), and each would believe its catalog.
So a controller takes the datastore's writer lease before it writes, and a second one is
refused with `WriterLeaseHeld` naming the holder (id, host, PID, address) and when the lease
expires. Each backend holds the lease with what it guarantees:

- local directory: an exclusive `flock` on `.writer-lease` in the datastore directory, held
  by an open file for the life of the process. The kernel drops it when the process dies, so
  it never expires and needs no renewal; the file also records the holder for the refusal.
- S3: an object `.writer-lease.json` under the prefix, created with a conditional put
  (If-None-Match: *) and renewed or released with a compare-and-swap on its ETag (If-Match).
  It records an absolute expiry; an expired or released lease can be taken over, again by a
  compare-and-swap, so of two controllers racing for it exactly one wins. The holder renews it
  every third of its duration (`keep_writer_lease`) and stops writing once it can no longer
  prove it holds it: a renewal that finds another holder, or no renewal before the expiry.

Expiry compares the holder's clock (which wrote it) with the taker's: clocks must agree to well
within the lease's duration (60 s by default), as NTP keeps them. A holder that is paused for
longer than its lease (a stopped VM) finds out at its next renewal and stops; what it wrote in
between is harmless to the datastore's format (puts are whole objects) but may race the new
holder's garbage collection, which is why the duration is long and the renewal early.

Names starting with '.' are a backend's own (backend.py): the lease is not an object of the
datastore, and listing never shows it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from shared.clock import Clock, SystemClock
from shared.errors import CofferError, CorruptData, WriterLeaseHeld, WriterLeaseLost

if TYPE_CHECKING:
    from controller.datastore.backend import ObjectStore

log = logging.getLogger(__name__)

LEASE_FORMAT = 1
DEFAULT_LEASE_SECONDS = 60.0
"""How long an S3 lease lasts without renewal: a dead controller's datastore waits this long."""


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds (or wants) a datastore's writer lease: named in the refusal of another."""

    id: str
    """Unique per controller process start: tells this holder from a restarted one."""
    host: str
    pid: int
    address: str
    """The controller's listen address, so an operator can find it."""

    @classmethod
    def this_process(cls, address: str) -> LeaseHolder:
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(), address)

    def __str__(self) -> str:
        return f"controller {self.id[:12]}"


@dataclass(frozen=True)
class LeaseRecord:
    """What a lease object or file says: its holder, and until when (None: while it lives)."""

    holder: LeaseHolder
    expires_at: float | None
    released: bool = False

    def is_free(self, now: float) -> bool:
        """Whether another holder may take it: released, or expired by `now`."""
        return self.released or (self.expires_at is not None and self.expires_at <= now)

    def encode(self) -> bytes:
        document = {
            "format": LEASE_FORMAT,
            "holder": {
                "id": self.holder.id,
                "host": self.holder.host,
                "pid": self.holder.pid,
                "address": self.holder.address,
            },
            "expires_at": self.expires_at,
            "expires": describe_expiry(self.expires_at),
            "released": self.released,
        }
        return (json.dumps(document, indent=2) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes, what: str) -> LeaseRecord:
        try:
            document: Any = json.loads(data.decode("utf-8"))
            holder = document["holder"]
            expires_at = document["expires_at"]
            record = cls(
                LeaseHolder(
                    str(holder["id"]),
                    str(holder["host"]),
                    int(holder["pid"]),
                    str(holder["address"]),
                ),
                None if expires_at is None else float(expires_at),
                bool(document["released"]),
            )
        except (UnicodeDecodeError, ValueError, TypeError, KeyError) as error:
            raise CorruptData(what=what, detail=f"not a writer lease: {error!r}") from None
        if document.get("format") != LEASE_FORMAT:
            raise CorruptData(what=what, detail=f"unknown lease format {document.get('format')!r}")
        return record


def describe_expiry(expires_at: float | None) -> str:
    if expires_at is None:
        return "its process exits"
    return datetime.fromtimestamp(expires_at, UTC).isoformat(timespec="seconds")


def held_error(location: str, record: LeaseRecord) -> WriterLeaseHeld:
    """The refusal a second taker gets, naming who holds the lease and until when."""
    return WriterLeaseHeld(
        location=location,
        holder=str(record.holder),
        host=record.holder.host,
        pid=record.holder.pid,
        address=record.holder.address,
        expires=describe_expiry(record.expires_at),
    )


class WriterLease(Protocol):
    """A writer lease this process holds on one datastore."""

    @property
    def location(self) -> str:
        """The datastore it is on, for messages."""
        ...

    @property
    def holder(self) -> LeaseHolder: ...

    @property
    def expires_at(self) -> float | None:
        """When it expires unless renewed (POSIX seconds); None: it lasts while we live."""
        ...

    @property
    def duration(self) -> float | None:
        """How long a renewal extends it; None for leases that never expire."""
        ...

    def renew(self) -> None:
        """Extend the lease; WriterLeaseLost if another holder has it now. Blocking."""
        ...

    def release(self) -> None:
        """Give the lease up so another controller can take it at once. Blocking; nothing
        happens if another holder has it by now."""
        ...


async def keep_writer_lease(
    lease: WriterLease,
    *,
    clock: Clock | None = None,
    sleep: Callable[[float], Any] = asyncio.sleep,
) -> None:
    """Renew `lease` every third of its duration until cancelled; returns at once if it never
    expires. Raises WriterLeaseLost when another holder has it, or when no renewal succeeded
    before it expired (the store unreachable meanwhile): from then on this process must not
    write. Transient failures of a renewal are logged and retried at the next tick."""
    if lease.duration is None:
        return
    clock = clock or SystemClock()
    interval = lease.duration / 3
    while True:
        await sleep(interval)
        try:
            await asyncio.to_thread(lease.renew)
        except WriterLeaseLost:
            raise
        except CofferError as error:
            if not error.retryable:
                raise
            expires_at = lease.expires_at
            if expires_at is not None and clock.now() >= expires_at:
                raise WriterLeaseLost(
                    location=lease.location,
                    detail=f"it expired at {describe_expiry(expires_at)} while no renewal "
                    f"succeeded (last error: {error})",
                ) from error
            log.warning("could not renew the writer lease, retrying: %s", error)


@asynccontextmanager
async def writer_lease(
    store: ObjectStore,
    holder: LeaseHolder,
    *,
    duration: float = DEFAULT_LEASE_SECONDS,
    clock: Clock | None = None,
) -> AsyncIterator[WriterLease]:
    """Hold `store`'s writer lease for the block: taken on entry (WriterLeaseHeld if another
    controller has it), renewed in the background, released on exit. If it is lost the block
    is cancelled and WriterLeaseLost raised out of it (in an ExceptionGroup)."""
    lease = await asyncio.to_thread(
        store.acquire_writer_lease, holder, duration=duration, clock=clock
    )
    try:
        async with asyncio.TaskGroup() as group:
            keeper = group.create_task(
                keep_writer_lease(lease, clock=clock), name="writer-lease-renewal"
            )
            try:
                yield lease
            finally:
                keeper.cancel()
    finally:
        await asyncio.to_thread(lease.release)


__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "LeaseHolder",
    "LeaseRecord",
    "WriterLease",
    "describe_expiry",
    "held_error",
    "keep_writer_lease",
    "writer_lease",
]
