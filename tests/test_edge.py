"""The controller's gRPC edge: one place decides who may call a service and how errors leave.

A real gRPC server with the controller's interceptors, real certificates (`tests.served`).
The refusals the wire has always given stay the same (tests/test_agent_api.py checks more of
them against a real controller process); a handler's bug leaves as a typed InternalError with
its traceback in the controller's log, not as gRPC's bare UNKNOWN.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from shared.errors import ERROR_CODE_METADATA_KEY
from shared.rpc import agent_pb2, agent_pb2_grpc, operator_pb2, operator_pb2_grpc
from tests.served import Served, served

pytestmark = pytest.mark.timeout(60)

VM = "edge-1"


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[Served]:
    async with served(tmp_path) as running:
        yield running


def error_code(exc: grpc.aio.AioRpcError) -> str:
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_CODE_METADATA_KEY:
            return str(value)
    return ""


async def test_an_operator_certificate_cannot_use_the_agent_service(edge: Served) -> None:
    async with edge.channel(edge.operator_tls) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await agent_pb2_grpc.AgentServiceStub(channel).Check(agent_pb2.CheckRequest())
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == "Permission denied: operator 'admin' is not an agent"
    assert error_code(refused.value) == "PermissionDenied"


async def test_an_agent_certificate_cannot_use_the_operator_service(edge: Served) -> None:
    async with edge.channel(edge.agent_tls(VM)) as channel:
        stub = operator_pb2_grpc.OperatorServiceStub(channel)
        for call in (
            stub.ListAgents(operator_pb2.ListAgentsRequest()),
            # A streaming reply is checked the same way.
            stub.WatchJob(operator_pb2.GetJobRequest(id="x")).read(),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "agent/edge-1 may not use the operator API" in (refused.value.details() or "")


async def test_a_typed_error_keeps_its_status_and_code(edge: Served) -> None:
    async with edge.channel(edge.operator_tls) as channel:
        stub = operator_pb2_grpc.OperatorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetVault(operator_pb2.VaultRef(name="nope"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_code(missing.value) == "NotFound"


async def test_a_bug_in_a_handler_is_an_internal_error_logged_with_its_traceback(
    edge: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(vm_id: str) -> None:
        raise ZeroDivisionError("injected: the catalog lost its mind")

    monkeypatch.setattr(edge.env.catalog, "item", broken)
    caplog.set_level(logging.ERROR, logger="controller.interceptors")
    async with edge.channel(edge.agent_tls(VM)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await agent_pb2_grpc.AgentServiceStub(channel).Check(agent_pb2.CheckRequest())
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert error_code(failed.value) == "InternalError"
    assert "ZeroDivisionError" in (failed.value.details() or "")
    [logged] = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert "/coffer.v1.AgentService/Check" in logged.getMessage()
    assert logged.exc_info is not None
    assert isinstance(logged.exc_info[1], ZeroDivisionError)
