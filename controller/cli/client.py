"""The operator CLI's connection to the controller: mutual TLS with the operator's certificate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from shared.errors import InvalidArgument
from shared.rpc import operator_pb2_grpc
from shared.rpc_channel import channel_options
from shared.rpc_errors import from_rpc_error
from shared.tls import TlsFiles, channel_credentials

R = TypeVar("R")


@dataclass(frozen=True)
class Connection:
    address: str
    tls_dir: Path
    server_name: str | None = None

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
        return grpc.secure_channel(
            self.address, channel_credentials(self.tls()), options=channel_options(self.server_name)
        )


def call(connection: Connection, method: Callable[[operator_pb2_grpc.OperatorServiceStub], R]) -> R:
    """Run one call on a fresh channel; a failure comes back as its typed CofferError."""
    with connection.channel() as channel:
        try:
            return method(operator_pb2_grpc.OperatorServiceStub(channel))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
