"""What one agent may make the controller hold: calls at once, sessions per second, index memory.

An agent proves who it is with its certificate and from then on may be hostile (a compromised
VM keeps its agent's key). Everything it sends is checked for what it names (its own VM, job,
chunks); this module bounds how much it can make the controller hold while it does, so that
one VM cannot take the controller's memory from the others (issue 14: six concurrent index
streams took its peak resident set from 65 MB to 2.47 GB, 24 concurrent 30 MiB upload messages
to 875 MB). docs/hostile-agent.md states the worst case these bounds leave, measured.

- Messages: at most `shared.rpc_channel.MAX_REQUEST_BYTES` each (one chunk and a little), at
  most `MAX_STREAMS_PER_CONNECTION` calls per connection.
- Calls at once, per VM and method (`CALLS`): checked by the `AgentAdmission` interceptor
  before the handler reads a message of a streamed request, so a call over the limit is
  refused (`AgentLimitExceeded`) before its data is taken in. The limits leave room for what a
  real agent does (one backup's upload and index streams, a restore's and a few file
  recoveries' downloads) and for a session that is being replaced by the next one.
- Sessions: each writes the VM's hello into the catalog; an agent may open `SESSION_BURST`
  at once and then one per `SESSION_INTERVAL` seconds (a real agent reconnects with a backoff
  of seconds).
- Per job (controller.jobs): one upload stream and one index stream at a time, an index only
  for a disk the hello declared and no larger than it declared.
- Index memory (`IndexBudget`): the indexes being received and checked, of every agent
  together, hold at most `INDEX_BUDGET_BYTES` of digests; a stream waits for its share before
  it reads any part, and must send it within a deadline, so an agent that stalls holds it
  only that long. An index larger than the whole budget is taken alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import grpc

from controller.interceptors import Context, caller_vm, guarded
from shared.errors import AgentLimitExceeded

AGENT_SERVICE: Final = "coffer.v1.AgentService"

CALLS: Final = {
    "Session": 3,
    "Check": 2,
    "Renew": 1,
    "FetchIndex": 4,
    "MissingChunks": 2,
    "UploadChunks": 2,
    "PutIndex": 2,
    "DownloadChunks": 16,
}
"""Calls one VM's agent may have open at once, per method (a method not here: 2)."""
DEFAULT_CALLS: Final = 2

SESSION_BURST: Final = 10
SESSION_INTERVAL: Final = 1.0

INDEX_BUDGET_BYTES: Final = 256 << 20
"""Digests of indexes being received, of all agents together: 8M chunks, 4 TiB of disk at
512 KiB chunks. The controller holds about four times this at its peak (the parts, the index,
the set of chunks it names, its encoded form; docs/hostile-agent.md)."""
INDEX_SECONDS: Final = 120.0
INDEX_BYTES_PER_SECOND: Final = 1 << 20
"""An index stream, once admitted, must be sent within INDEX_SECONDS plus one second per
INDEX_BYTES_PER_SECOND of it (a real agent sends it at once: it is in its memory)."""


def index_deadline(nbytes: int) -> float:
    """Seconds an index stream of `nbytes` of digests may take once admitted."""
    return INDEX_SECONDS + nbytes / INDEX_BYTES_PER_SECOND


@dataclass
class _TokenBucket:
    capacity: float
    interval: float
    tokens: float = 0.0
    at: float = 0.0

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.at) / self.interval)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class AgentCalls:
    """Open calls per (VM, method), and the session rate per VM."""

    monotonic: Callable[[], float] = time.monotonic
    _open: dict[tuple[str, str], int] = field(default_factory=dict)
    _sessions: dict[str, _TokenBucket] = field(default_factory=dict)

    @contextlib.contextmanager
    def admitted(self, vm_id: str, method: str) -> Any:
        """Hold one of `vm_id`'s calls of `method` while the block runs; AgentLimitExceeded
        when it has as many open as it may, or opens sessions too fast."""
        limit = CALLS.get(method, DEFAULT_CALLS)
        key = (vm_id, method)
        if self._open.get(key, 0) >= limit:
            raise AgentLimitExceeded(
                vm_id=vm_id, detail=f"{limit} {method} call(s) at once at most"
            )
        if method == "Session":
            now = self.monotonic()
            bucket = self._sessions.setdefault(
                vm_id, _TokenBucket(SESSION_BURST, SESSION_INTERVAL, SESSION_BURST, now)
            )
            if not bucket.take(now):
                raise AgentLimitExceeded(
                    vm_id=vm_id,
                    detail=f"sessions opened faster than one per {SESSION_INTERVAL:g} s",
                )
        self._open[key] = self._open.get(key, 0) + 1
        try:
            yield
        finally:
            left = self._open[key] - 1
            if left:
                self._open[key] = left
            else:
                del self._open[key]

    def open_calls(self, vm_id: str) -> dict[str, int]:
        """How many calls of each method `vm_id` has open (for tests and logs)."""
        return {method: n for (vm, method), n in self._open.items() if vm == vm_id}


class AgentAdmission(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Refuses an agent's call over its limit (`CALLS`, the session rate) before its handler
    runs. Inside `CallerIdentity`, which has said who calls."""

    def __init__(self, calls: AgentCalls | None = None) -> None:
        self.calls = calls or AgentCalls()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        if handler is None or service != AGENT_SERVICE:
            return handler

        @contextlib.asynccontextmanager
        async def admitted(context: Context, request: Any) -> AsyncIterator[None]:
            with self.calls.admitted(caller_vm(), method):
                yield

        return guarded(handler, admitted)


class IndexBudget:
    """Bytes of index digests the controller holds for agents at once (`INDEX_BUDGET_BYTES`).

    `reserve(n)` waits, first come first served, until `n` (at most the whole budget) is free;
    it is given back when the block ends.
    """

    def __init__(self, total: int = INDEX_BUDGET_BYTES) -> None:
        self.total = total
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[None]:
        share = min(max(nbytes, 0), self.total)
        if self._waiting or self.used + share > self.total:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (share, turn)
            self._waiting.append(entry)
            try:
                await turn
            except BaseException:
                if entry in self._waiting:
                    self._waiting.remove(entry)
                    self._release(0)  # those behind it may fit now
                elif turn.done() and not turn.cancelled():
                    self._release(share)  # granted as it was cancelled: give it back
                raise
        else:
            self.used += share
        try:
            yield
        finally:
            self._release(share)

    def _release(self, share: int) -> None:
        self.used -= share
        while self._waiting and self.used + self._waiting[0][0] <= self.total:
            share, turn = self._waiting.popleft()
            if turn.done():
                continue
            self.used += share
            turn.set_result(None)
