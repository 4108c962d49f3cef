"""Fault injection for object stores: a wrapper that fails or damages chosen operations.

Tests wrap any real backend in a `FaultyStore` and arm faults on it (kopia's faulty storage):
fail the Nth put, fail every put under a prefix, report a put as failed after it was written
(a lost reply), or store damaged bytes (a torn write on a store without atomic puts, bit rot).
The wrapped store stays real, so a test checks what a user would see afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from controller.datastore.backend import ObjectInfo, ObjectStore
from shared.errors import DatastoreError

Operation = Literal["put", "get", "has", "stat", "delete", "list", "sync"]


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

    def clear(self) -> None:
        """Disarm every fault."""
        with self._lock:
            self._faults.clear()

    # --- ObjectStore -------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        fault = self._take("put", key)
        if fault is None:
            self.inner.put(key, data)
            return
        if fault.damage is not None:
            self.inner.put(key, fault.damage(data))
            return
        if fault.after_write:
            self.inner.put(key, data)
        raise DatastoreError(detail=f"injected fault: put {key!r}")

    def get(self, key: str) -> bytes:
        if self._take("get", key) is not None:
            raise DatastoreError(detail=f"injected fault: get {key!r}")
        return self.inner.get(key)

    def has(self, key: str) -> bool:
        if self._take("has", key) is not None:
            raise DatastoreError(detail=f"injected fault: has {key!r}")
        return self.inner.has(key)

    def stat(self, key: str) -> ObjectInfo:
        if self._take("stat", key) is not None:
            raise DatastoreError(detail=f"injected fault: stat {key!r}")
        return self.inner.stat(key)

    def delete(self, key: str, *, durable: bool = True) -> None:
        if self._take("delete", key) is not None:
            raise DatastoreError(detail=f"injected fault: delete {key!r}")
        self.inner.delete(key, durable=durable)

    def sync(self) -> None:
        if self._take("sync", "") is not None:
            raise DatastoreError(detail="injected fault: sync")
        self.inner.sync()

    def list(self, prefix: str) -> Iterator[str]:
        if self._take("list", prefix) is not None:
            raise DatastoreError(detail=f"injected fault: list {prefix!r}")
        return self.inner.list(prefix)

    def _take(self, op: Operation, key: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault._triggers(op, key):
                    return fault
        return None
