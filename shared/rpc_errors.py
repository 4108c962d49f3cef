"""Typed errors across gRPC: a CofferError becomes a status with its code, and back.

The server aborts with the error's gRPC status, its message as details, and its stable code in
the trailing metadata key `coffer-error-code`; the client turns an `grpc.RpcError` back into
the same `CofferError` subclass (kopia's server/client error mapping, in gRPC terms). A refusal
that says when to try again (`ControllerBusy`) carries that too, in `coffer-retry-after`.
"""

from __future__ import annotations

from typing import NoReturn

import grpc

from shared.errors import (
    ERROR_CODE_METADATA_KEY,
    RETRY_AFTER_METADATA_KEY,
    CofferError,
    Unauthenticated,
    Unavailable,
)
from shared.rpc import common_pb2


async def abort(context: grpc.aio.ServicerContext, error: CofferError) -> NoReturn:
    """End the RPC with `error`, typed for the client."""
    context.set_trailing_metadata(_trailing(error))
    await context.abort(grpc.StatusCode[error.grpc_status], error.message)
    raise AssertionError("unreachable: context.abort raises")


def end_with(context: grpc.aio.ServicerContext, error: CofferError) -> None:
    """Have the RPC end with `error`, typed for the client, once its handler returns.

    What `abort` sends, without its exception through every interceptor and a batch of its
    own: for a controller ending 10,000 sessions at once, `abort` was 0.5 ms of the event
    loop's time each (issue 13)."""
    context.set_trailing_metadata(_trailing(error))
    context.set_code(grpc.StatusCode[error.grpc_status])
    context.set_details(error.message)


def _trailing(error: CofferError) -> tuple[tuple[str, str], ...]:
    trailing: tuple[tuple[str, str], ...] = ((ERROR_CODE_METADATA_KEY, error.code),)
    if error.retry_after is not None:
        trailing += ((RETRY_AFTER_METADATA_KEY, f"{error.retry_after:.3f}"),)
    return trailing


def from_rpc_error(error: grpc.RpcError) -> CofferError:
    """The CofferError an RPC failed with; transport failures become typed errors too."""
    code: str | None = None
    retry_after: float | None = None
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        text = value if isinstance(value, str) else value.decode(errors="replace")
        if key == ERROR_CODE_METADATA_KEY:
            code = text
        elif key == RETRY_AFTER_METADATA_KEY:
            retry_after = _seconds(text)
    details = error.details() if hasattr(error, "details") else None
    status = error.code() if hasattr(error, "code") else None
    if code is not None:
        typed = CofferError.from_code(code, details or code)
        typed.retry_after = retry_after
        return typed
    if status == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"the controller is unreachable: {details}")
    if status == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(detail=details or "the server refused the client certificate")
    if status == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"the call timed out: {details}")
    return CofferError(f"{status.name if status else 'RPC'} error: {details}")


# A retry-after from the wire is taken between these bounds: a server's mistake (or a hostile
# one) must neither make a client spin nor park it for hours.
MIN_RETRY_AFTER = 0.1
MAX_RETRY_AFTER = 300.0


def _seconds(text: str) -> float | None:
    try:
        seconds = float(text)
    except ValueError:
        return None
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, MIN_RETRY_AFTER), MAX_RETRY_AFTER)


def to_proto(error: CofferError) -> common_pb2.Error:
    return common_pb2.Error(code=error.code, message=error.message, retryable=error.retryable)


def from_proto(error: common_pb2.Error) -> CofferError:
    return CofferError.from_code(error.code, error.message)
