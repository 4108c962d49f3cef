"""Typed errors across gRPC: a CofferError becomes a status with its code, and back.

The server aborts with the error's gRPC status, its message as details, and its stable code in
the trailing metadata key `coffer-error-code`; the client turns an `grpc.RpcError` back into
the same `CofferError` subclass (kopia's server/client error mapping, in gRPC terms).
"""

from __future__ import annotations

from typing import NoReturn

import grpc

from shared.errors import ERROR_CODE_METADATA_KEY, CofferError, Unauthenticated, Unavailable
from shared.rpc import common_pb2


async def abort(context: grpc.aio.ServicerContext, error: CofferError) -> NoReturn:
    """End the RPC with `error`, typed for the client."""
    context.set_trailing_metadata(((ERROR_CODE_METADATA_KEY, error.code),))
    await context.abort(grpc.StatusCode[error.grpc_status], error.message)
    raise AssertionError("unreachable: context.abort raises")


def from_rpc_error(error: grpc.RpcError) -> CofferError:
    """The CofferError an RPC failed with; transport failures become typed errors too."""
    code: str | None = None
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_CODE_METADATA_KEY:
            code = value if isinstance(value, str) else value.decode()
    details = error.details() if hasattr(error, "details") else None
    status = error.code() if hasattr(error, "code") else None
    if code is not None:
        return CofferError.from_code(code, details or code)
    if status == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"the controller is unreachable: {details}")
    if status == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(detail=details or "the server refused the client certificate")
    if status == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"the call timed out: {details}")
    return CofferError(f"{status.name if status else 'RPC'} error: {details}")


def to_proto(error: CofferError) -> common_pb2.Error:
    return common_pb2.Error(code=error.code, message=error.message, retryable=error.retryable)


def from_proto(error: common_pb2.Error) -> CofferError:
    return CofferError.from_code(error.code, error.message)
