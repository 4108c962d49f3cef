"""Retries and a bound on requests in flight, around any ObjectStore (restic's backend/retry,
kopia's retrying storage).

`RetryingStore(inner)` passes every call to `inner` and tries it again, after a backoff, when
it fails with an error whose class says trying again may succeed (`CofferError.retryable`):
for S3 that is `DatastoreUnavailable`, which s3.py raises for throttling (503 SlowDown, 429),
server errors, reset connections and timeouts. It never retries NotFound, a refusal
(DatastoreAccessDenied, DatastoreReadOnly), a missing bucket, a full store, a lease held by
another controller, a caller's mistake, or anything that is not a CofferError (a bug).

Every operation of the interface may be repeated: a put writes the same bytes under the same
name (the datastore's objects are content-addressed or written once), delete of a missing
key is no error, and the rest only read. A listing that fails part way resumes after the last
key it gave (`list(prefix, after)`), so a collection over millions of chunks does not start
over. Taking the writer lease is retried as a whole; lease.py makes a retry after a lost reply
find its own lease.

At most `max_concurrent` requests run at once (a semaphore, held per attempt, not during the
backoff sleeps): the executor may run many jobs' threads, and a store that is throttling needs
fewer requests, not more. After `max_attempts` tries the last error is raised, marked with the
number of attempts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from controller.datastore.backend import ObjectInfo, ObjectStore
from controller.datastore.lease import DEFAULT_LEASE_SECONDS, LeaseHolder, WriterLease
from shared.backoff import Backoff
from shared.clock import Clock
from shared.errors import CofferError, DatastoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_BACKOFF = Backoff(first=0.2, cap=10.0, jitter="full")
"""Five attempts wait up to 0.2 + 0.4 + 0.8 + 1.6 s: a throttling burst or a restarting
server, not an outage, which the job reports."""


class RetryingStore:
    """An ObjectStore that retries `inner`'s retryable errors and bounds its concurrency."""

    def __init__(
        self,
        inner: ObjectStore,
        *,
        max_attempts: int = 5,
        max_concurrent: int = 16,
        backoff: Backoff = DEFAULT_BACKOFF,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_attempts < 1 or max_concurrent < 1:
            raise ValueError("max_attempts and max_concurrent must be at least 1")
        self.inner = inner
        self.max_attempts = max_attempts
        self.max_concurrent = max_concurrent
        self._backoff = backoff
        self._sleep = sleep
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self.retries = 0
        """Attempts repeated so far (for tests and metrics)."""
        self._count = threading.Lock()

    def __repr__(self) -> str:
        return f"RetryingStore({self.inner!r}, max_attempts={self.max_attempts})"

    @property
    def location(self) -> str:
        return self.inner.location

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """`fn()` under this store's policy: retried if it fails retryably, in a slot."""
        attempt = 0
        while True:
            try:
                with self._slots:
                    return fn()
            except CofferError as error:
                attempt += 1
                if not error.retryable or attempt >= self.max_attempts:
                    if attempt > 1 and error.retryable:
                        raise _exhausted(error, attempt) from error
                    raise
                delay = self._backoff.delay(attempt - 1)
                log.info(
                    "%s on %s failed (attempt %d of %d), retrying in %.2f s: %s",
                    what,
                    self.location,
                    attempt,
                    self.max_attempts,
                    delay,
                    error,
                )
                with self._count:
                    self.retries += 1
                self._sleep(delay)

    # --- ObjectStore ---------------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, durable: bool = True) -> None:
        self.call("put", lambda: self.inner.put(key, data, durable=durable))

    def get(self, key: str) -> bytes:
        return self.call("get", lambda: self.inner.get(key))

    def has(self, key: str) -> bool:
        return self.call("has", lambda: self.inner.has(key))

    def stat(self, key: str) -> ObjectInfo:
        return self.call("stat", lambda: self.inner.stat(key))

    def delete(self, key: str, *, durable: bool = True) -> None:
        self.call("delete", lambda: self.inner.delete(key, durable=durable))

    def sync(self) -> None:
        self.call("sync", self.inner.sync)

    def list(self, prefix: str, after: str = "") -> Iterator[str]:
        return self._list(prefix, after)

    def _list(self, prefix: str, after: str) -> Iterator[str]:
        last = after
        attempt = 0
        while True:
            try:
                keys = self.inner.list(prefix, last)
                while True:
                    # One page at a time under a slot: the first key of a page costs a request.
                    with self._slots:
                        key = next(keys, None)
                    if key is None:
                        return
                    last = key
                    attempt = 0  # progress: the attempts count again from here
                    yield key
            except CofferError as error:
                attempt += 1
                if not error.retryable or attempt >= self.max_attempts:
                    if attempt > 1 and error.retryable:
                        raise _exhausted(error, attempt) from error
                    raise
                delay = self._backoff.delay(attempt - 1)
                log.info(
                    "listing %r on %s failed after %r (attempt %d of %d), resuming in %.2f s: %s",
                    prefix,
                    self.location,
                    last,
                    attempt,
                    self.max_attempts,
                    delay,
                    error,
                )
                with self._count:
                    self.retries += 1
                self._sleep(delay)

    def acquire_writer_lease(
        self,
        holder: LeaseHolder,
        *,
        duration: float = DEFAULT_LEASE_SECONDS,
        clock: Clock | None = None,
    ) -> WriterLease:
        return self.call(
            "lease",
            lambda: self.inner.acquire_writer_lease(holder, duration=duration, clock=clock),
        )


def _exhausted(error: CofferError, attempts: int) -> CofferError:
    """`error` again, its message saying how often it was tried."""
    if isinstance(error, DatastoreUnavailable):
        fields = dict(error.fields)
        detail = f"{fields.get('detail', error)} ({attempts} attempts)"
        fields["detail"] = detail
        return DatastoreUnavailable(**fields)
    return type(error)(f"{error.message} ({attempts} attempts)", **error.fields)


__all__ = ["DEFAULT_BACKOFF", "RetryingStore"]
