"""The operator CLI's connection to the controller: mutual TLS, deadlines, typed errors.

Every unary call carries a deadline (`--timeout`, 30 s by default), set in one place: a client
interceptor on the channel. A watch may rightly last hours, so it has no overall deadline;
instead the controller sends the job at least every half second, and a stream silent for
`--timeout` seconds is given up. Either way a controller that accepts connections but never
answers (stuck, overloaded, or not a Coffer controller at all) ends in `Unavailable` naming
its address (exit 8), never in a wait without end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import grpc

from shared.errors import ERROR_CODE_METADATA_KEY, CofferError, InvalidArgument, Unavailable
from shared.rpc import operator_pb2, operator_pb2_grpc
from shared.rpc_channel import channel_options
from shared.rpc_errors import from_rpc_error
from shared.tls import TlsFiles, channel_credentials

R = TypeVar("R")
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Connection:
    address: str
    tls_dir: Path
    server_name: str | None = None
    # Seconds a unary call may take, and a watch may stay silent.
    timeout: float = DEFAULT_TIMEOUT

    def tls(self) -> TlsFiles:
        files = TlsFiles(
            ca=self.tls_dir / "ca.crt",
            cert=self.tls_dir / "operator.crt",
            key=self.tls_dir / "operator.key",
        )
        for path in (files.ca, files.cert, files.key):
            if not path.exists():
                raise InvalidArgument(
                    detail=f"{path} does not exist: --tls-dir (or COFFER_TLS_DIR) must name a "
                    "directory with ca.crt, operator.crt and operator.key "
                    "(`coffer pki init` or `coffer pki issue-operator` makes them)"
                )
        return files

    def channel(self) -> grpc.Channel:
        channel = grpc.secure_channel(
            self.address, channel_credentials(self.tls()), options=channel_options(self.server_name)
        )
        return grpc.intercept_channel(channel, _Deadline(self.timeout))


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _CallDetails(_Details, grpc.ClientCallDetails):  # type: ignore[misc]
    """grpc.ClientCallDetails is abstract; this is the usual concrete form of it."""


class _Deadline(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Give every unary call the connection's deadline unless it has one of its own."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], details: Any, request: Any
    ) -> Any:
        if details.timeout is None:
            details = _CallDetails(
                details.method,
                self._seconds,
                details.metadata,
                details.credentials,
                details.wait_for_ready,
                details.compression,
            )
        return continuation(details, request)


def _typed(connection: Connection, error: grpc.RpcError, *, silent: bool = False) -> CofferError:
    """The CofferError a call failed with; a transport failure names the controller."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    if any(key == ERROR_CODE_METADATA_KEY for key, _ in trailing or ()):
        return from_rpc_error(error)  # the controller's own, typed error
    status = error.code() if hasattr(error, "code") else None
    if silent or status == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(
            f"the controller at {connection.address} did not answer within "
            f"{connection.timeout:g} s: it is stuck or overloaded, or something else listens "
            "there (`--timeout SECONDS` waits longer)"
        )
    if status == grpc.StatusCode.UNAVAILABLE:
        details = error.details() if hasattr(error, "details") else None
        return Unavailable(f"the controller at {connection.address} is unreachable: {details}")
    return from_rpc_error(error)


def call(connection: Connection, method: Callable[[operator_pb2_grpc.OperatorServiceStub], R]) -> R:
    """Run one call on a fresh channel; a failure comes back as its typed CofferError."""
    with connection.channel() as channel:
        try:
            return method(operator_pb2_grpc.OperatorServiceStub(channel))
        except grpc.RpcError as exc:
            raise _typed(connection, exc) from exc


class Paged(Protocol):
    """A reply of a paged listing (controller/paging.py)."""

    @property
    def next_page_token(self) -> str: ...


P = TypeVar("P", bound=Paged)


def pages(
    stub: operator_pb2_grpc.OperatorServiceStub,
    fetch: Callable[[operator_pb2_grpc.OperatorServiceStub, str], P],
    *,
    every: bool = True,
) -> list[P]:
    """The replies of a paged listing, `fetch` given each page's token in turn: every page, or
    (`every` False) the first. Inside `call`, so one channel serves them all."""
    replies = [fetch(stub, "")]
    while every and replies[-1].next_page_token:
        replies.append(fetch(stub, replies[-1].next_page_token))
    return replies


class _Silence:
    """Cancels a stream that has sent nothing for `seconds`; `expired` says it did."""

    def __init__(self, stream: Any, seconds: float) -> None:
        self._stream = stream
        self._seconds = seconds
        self._heard = time.monotonic()
        self._done = threading.Event()
        self.expired = False
        self._thread = threading.Thread(target=self._watch, name="watch-silence", daemon=True)
        self._thread.start()

    def heard(self) -> None:
        self._heard = time.monotonic()

    def _watch(self) -> None:
        while True:
            left = self._heard + self._seconds - time.monotonic()
            if left <= 0:
                self.expired = True
                self._stream.cancel()
                return
            if self._done.wait(left):
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def watch(connection: Connection, job_id: str) -> Iterator[operator_pb2.Job]:
    """The job now and as it changes, until it ends (a prefix of its id will do)."""
    with connection.channel() as channel:
        stub = operator_pb2_grpc.OperatorServiceStub(channel)
        stream = stub.WatchJob(operator_pb2.GetJobRequest(id=job_id))
        silence = _Silence(stream, connection.timeout)
        try:
            for job in stream:
                silence.heard()
                yield job
        except grpc.RpcError as exc:
            raise _typed(connection, exc, silent=silence.expired) from exc
        finally:
            silence.stop()
