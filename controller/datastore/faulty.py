"""Fault injection for object stores: a wrapper that fails or damages chosen operations.

Tests wrap any real backend in a `FaultyStore` and arm faults on it (kopia's faulty storage):
fail the Nth put, fail every put under a prefix, report a put as failed after it was written
(a lost reply), store damaged bytes (a torn write on a store without atomic puts, bit rot), or
raise a chosen error (throttling, a reset connection, a refusal) to test what retries it.
The wrapped store stays real, so a test checks what a user would see afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from controller.datastore.backend import ObjectInfo, ObjectStore
from controller.datastore.lease import DEFAULT_LEASE_SECONDS, LeaseHolder, WriterLease
from shared.clock import Clock
from shared.errors import DatastoreError

Operation = Literal["put", "get", "has", "stat", "delete", "list", "sync", "lease"]


@dataclass
class Fault:
    """One armed fault: which calls it matches, when it fires, and what it does."""

    op: Operation
    prefix: str = ""
    skip: int = 0
    """Matching calls let through before the fault first fires."""
    times: int | None = 1
    """How many times it fires; None: every matching call after `skip`."""
    after_write: bool = False
    """put only: write the object, then fail anyway (the outcome is unknown to the caller)."""
    damage: Callable[[bytes], bytes] | None = None
    """put only: store `damage(data)` instead of `data` and report success."""
    error: Callable[[str], Exception] | None = None
    """What to raise, made from the key; None: DatastoreError("injected fault: ...")."""
    after_keys: int = 0
    """list only: give this many keys before failing (a listing broken part way)."""
    seen: int = 0
    fired: int = 0

    def _triggers(self, op: Operation, key: str) -> bool:
        if op != self.op or not key.startswith(self.prefix):
            return False
        self.seen += 1
        if self.seen <= self.skip or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True


class FaultyStore:
    """An ObjectStore that passes calls to `inner` unless an armed fault takes them."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self._faults: list[Fault] = []
        self._lock = threading.Lock()

    @property
    def location(self) -> str:
        return f"faulty:{self.inner.location}"

    # --- arming ------------------------------------------------------------------------------

    def inject(self, fault: Fault) -> Fault:
        """Arm `fault`; the returned object counts how often it fired."""
        with self._lock:
            self._faults.append(fault)
        return fault

    def fail_put(self, nth: int = 1, *, prefix: str = "", after_write: bool = False) -> Fault:
        """Fail the `nth` put (1-based) of a key under `prefix`, once."""
        return self.inject(Fault("put", prefix, skip=nth - 1, after_write=after_write))

    def fail_puts(self, prefix: str = "") -> Fault:
        """Fail every put of a key under `prefix`."""
        return self.inject(Fault("put", prefix, times=None))

    def truncate_puts(self, prefix: str, keep: int) -> Fault:
        """Store only the first `keep` bytes of every put under `prefix`, reporting success."""
        return self.inject(Fault("put", prefix, times=None, damage=lambda data: data[:keep]))

    def corrupt_puts(self, prefix: str, offset: int = -1) -> Fault:
        """Flip one bit of the byte at `offset` of every put under `prefix`, reporting success."""

        def flip(data: bytes) -> bytes:
            damaged = bytearray(data)
            damaged[offset] ^= 0x01
            return bytes(damaged)

        return self.inject(Fault("put", prefix, times=None, damage=flip))

    def fail_gets(self, prefix: str = "") -> Fault:
        """Fail every get of a key under `prefix`."""
        return self.inject(Fault("get", prefix, times=None))

    def fail_deletes(self, prefix: str = "", *, skip: int = 0, times: int | None = None) -> Fault:
        """Fail deletes of keys under `prefix`: `times` of them (None: all) after `skip`."""
        return self.inject(Fault("delete", prefix, skip=skip, times=times))

    def raise_on(
        self,
        op: Operation,
        error: Callable[[str], Exception],
        *,
        prefix: str = "",
        times: int | None = 1,
        after_keys: int = 0,
    ) -> Fault:
        """Raise `error(key)` from the next `times` calls of `op` under `prefix` (None: all)."""
        return self.inject(Fault(op, prefix, times=times, error=error, after_keys=after_keys))

    def clear(self) -> None:
        """Disarm every fault."""
        with self._lock:
            self._faults.clear()

    # --- ObjectStore -------------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, durable: bool = True) -> None:
        fault = self._take("put", key)
        if fault is None:
            self.inner.put(key, data, durable=durable)
            return
        if fault.damage is not None:
            self.inner.put(key, fault.damage(data), durable=durable)
            return
        if fault.after_write:
            self.inner.put(key, data, durable=durable)
        raise _error(fault, "put", key)

    def get(self, key: str) -> bytes:
        if (fault := self._take("get", key)) is not None:
            raise _error(fault, "get", key)
        return self.inner.get(key)

    def has(self, key: str) -> bool:
        if (fault := self._take("has", key)) is not None:
            raise _error(fault, "has", key)
        return self.inner.has(key)

    def stat(self, key: str) -> ObjectInfo:
        if (fault := self._take("stat", key)) is not None:
            raise _error(fault, "stat", key)
        return self.inner.stat(key)

    def delete(self, key: str, *, durable: bool = True) -> None:
        if (fault := self._take("delete", key)) is not None:
            raise _error(fault, "delete", key)
        self.inner.delete(key, durable=durable)

    def sync(self) -> None:
        if (fault := self._take("sync", "")) is not None:
            raise _error(fault, "sync", "")
        self.inner.sync()

    def list(self, prefix: str, after: str = "") -> Iterator[str]:
        fault = self._take("list", prefix)
        if fault is None:
            return self.inner.list(prefix, after)
        if fault.after_keys == 0:
            raise _error(fault, "list", prefix)
        return self._broken_list(fault, prefix, after)

    def _broken_list(self, fault: Fault, prefix: str, after: str) -> Iterator[str]:
        for given, key in enumerate(self.inner.list(prefix, after)):
            if given == fault.after_keys:
                raise _error(fault, "list", prefix)
            yield key

    def acquire_writer_lease(
        self,
        holder: LeaseHolder,
        *,
        duration: float = DEFAULT_LEASE_SECONDS,
        clock: Clock | None = None,
    ) -> WriterLease:
        if (fault := self._take("lease", "")) is not None:
            raise _error(fault, "lease", "")
        return self.inner.acquire_writer_lease(holder, duration=duration, clock=clock)

    def _take(self, op: Operation, key: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault._triggers(op, key):
                    return fault
        return None


def _error(fault: Fault, op: Operation, key: str) -> Exception:
    if fault.error is not None:
        return fault.error(key)
    return DatastoreError(detail=f"injected fault: {op} {key!r}")
