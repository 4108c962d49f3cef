"""The controller's gRPC services served in-process, over real mutual TLS, for edge tests.

The in-process parts of `tests.test_protection.controller` (catalog, job manager, registry,
protection on a manual clock) behind a real `grpc.aio` server on port 0 with the controller's
interceptors, options and credentials, as `controller.server` wires them; clients use real
certificates from a fresh CA. Faults are injected by wrapping real parts, never by mocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from controller.agent_service import AgentService
from controller.interceptors import CallerIdentity, ErrorMapping
from controller.operator_service import OperatorService
from controller.pki import init_pki, issue_agent
from shared.clock import ManualClock
from shared.rpc import agent_pb2, agent_pb2_grpc, operator_pb2_grpc
from shared.rpc_channel import secure_channel, server_options
from shared.tls import TlsFiles, server_credentials
from tests.test_protection import MONDAY_NOON, Controller, controller


@dataclass
class Served:
    env: Controller
    port: int
    pki: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def agent_tls(self, vm_id: str) -> TlsFiles:
        out = self.pki.parent / f"agent-{vm_id}"
        if not (out / "agent.crt").exists():
            issue_agent(self.pki, vm_id, out)
        return TlsFiles.in_dir(out, "agent")

    @property
    def operator_tls(self) -> TlsFiles:
        return TlsFiles.in_dir(self.pki, "operator")

    def channel(self, tls: TlsFiles) -> grpc.aio.Channel:
        return secure_channel(self.target, tls)


@contextlib.asynccontextmanager
async def served(root: Path) -> AsyncIterator[Served]:
    init_pki(root / "pki")
    async with controller(root / "controller", ManualClock(MONDAY_NOON)) as env:
        server = grpc.aio.server(
            options=server_options(), interceptors=(ErrorMapping(), CallerIdentity())
        )
        agent_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentService(env.catalog, env.registry, env.jobs, env.clock, None, "test"), server
        )
        operator_pb2_grpc.add_OperatorServiceServicer_to_server(
            OperatorService(
                env.catalog, env.registry, env.jobs, None, env.vaults, env.protection, env.pruner
            ),
            server,
        )
        port = server.add_secure_port(
            "127.0.0.1:0", server_credentials(TlsFiles.in_dir(root / "pki", "controller"))
        )
        await server.start()
        try:
            yield Served(env, port, root / "pki")
        finally:
            await server.stop(None)


def hello(vm_id: str) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(
        hello=agent_pb2.Hello(
            vm_id=vm_id,
            name=vm_id,
            service="test",
            region="lab",
            hostname=f"{vm_id}.lab",
            disks=[agent_pb2.DiskInfo(name="root", path="/dev/null", size_bytes=1 << 20)],
        )
    )
