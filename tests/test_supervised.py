"""No background task dies in silence: the controller's long-lived tasks are supervised.

Each failure is injected into a real part (by wrapping it, never by mocking it) and the test
checks what an operator would: the failure is in the log with its traceback, and the task is
running again (RESTART: the scheduler, the MQTT loops), the one session it belongs to ends
(the session writer), or the controller stops with a non-zero exit (FATAL).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import grpc
import pytest

from agent.status import StatusPublisher
from controller.broker import PrivateBroker
from controller.pki import init_pki, issue_agent
from controller.scheduler import Due
from controller.state_lock import LOCK_NAME, WATCH_SECONDS
from controller.status import StatusMonitor
from shared.clock import ManualClock
from shared.errors import ERROR_CODE_METADATA_KEY
from shared.rpc import agent_pb2, agent_pb2_grpc
from shared.status import PresenceState
from shared.tls import TlsFiles
from tests.cluster import Cluster
from tests.served import hello, served
from tests.test_protection import EU, MONDAY_NOON, SHOP_WEB, controller, until

pytestmark = pytest.mark.timeout(60)


def failures_of(caplog: pytest.LogCaptureFixture, task: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if f"task {task} failed" in r.getMessage()]


async def test_a_scheduler_that_raises_is_logged_with_its_traceback_and_schedules_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock(MONDAY_NOON)
    async with controller(tmp_path, clock) as env:
        await env.create_vault(EU, "eu-west")
        await env.enrol_all()
        await env.protected(EU, SHOP_WEB)
        plan = env.protection.plan
        due = plan.due
        calls = 0

        def due_failing_once(now: float) -> list[Due]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("injected: the plan cannot be read")
            return due(now)

        monkeypatch.setattr(plan, "due", due_failing_once)
        caplog.set_level(logging.ERROR, logger="shared.supervision")
        # The default policy's next slot: the loop wakes for it, and fails.
        clock.set(datetime(2025, 3, 4, 2, tzinfo=UTC).timestamp())
        env.protection.scheduler.changed()

        async def scheduled() -> bool:
            return bool(await env.backups(SHOP_WEB))

        await until(scheduled, "the scheduled backup after the scheduler's restart")
        [failure] = failures_of(caplog, "scheduler")
        assert "restarting it" in failure.getMessage()
        assert failure.exc_info is not None
        assert str(failure.exc_info[1]) == "injected: the plan cannot be read"
        [job] = await env.backups(SHOP_WEB)
        assert job.operation == "Backup"


class BrokenOutbox(asyncio.Queue[agent_pb2.ControllerMessage]):
    """An outbox that fails when the session's writer takes from it: a writer bug."""

    def empty(self) -> bool:
        return False  # the writer takes from it at once

    def get_nowait(self) -> agent_pb2.ControllerMessage:
        raise RuntimeError("injected: the session writer cannot take a command")


async def test_a_session_whose_writer_fails_ends_and_the_agent_can_connect_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with served(tmp_path) as edge:
        registry = edge.env.registry
        # The next session to connect gets the broken outbox, before its writer starts.
        break_next: list[bool] = [True]

        def sabotage(vm_id: str) -> None:
            session = registry.session(vm_id)
            if break_next and session is not None:
                break_next.clear()
                session.outbox = BrokenOutbox()

        registry.on_connect.append(sabotage)
        caplog.set_level(logging.ERROR, logger="controller.interceptors")
        vm = "writer-1"
        async with edge.channel(edge.agent_tls(vm)) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            call = stub.Session()
            await call.write(hello(vm))
            assert (await call.read()).HasField("accepted")
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(call.read(), 10)
            assert ended.value.code() == grpc.StatusCode.INTERNAL
            codes = dict(ended.value.trailing_metadata() or ())
            assert codes.get(ERROR_CODE_METADATA_KEY) == "InternalError"
            assert not registry.online(vm)
            [logged] = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
            assert "injected: the session writer" in repr(logged.exc_info)

            # The agent's next session works.
            again = stub.Session()
            await again.write(hello(vm))
            assert (await again.read()).HasField("accepted")
            assert registry.online(vm)
            again.cancel()


class FlakyPublisher(StatusPublisher):
    """A publisher whose first connection hits a bug in its own code."""

    broken = True

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        if self.broken:
            self.broken = False
            raise RuntimeError("injected: a bug in the connection loop")
        await super()._on_connect(client)


async def test_an_mqtt_loop_that_hits_a_bug_is_logged_and_runs_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    init_pki(tmp_path / "pki")
    issue_agent(tmp_path / "pki", "flaky-1", tmp_path / "agent")
    controller_tls = TlsFiles.in_dir(tmp_path / "pki", "controller")
    caplog.set_level(logging.ERROR, logger="shared.supervision")
    async with (
        PrivateBroker(tmp_path / "broker", controller_tls) as broker,
        StatusMonitor(controller_tls) as monitor,
        FlakyPublisher(
            "flaky-1",
            TlsFiles.in_dir(tmp_path / "agent", "agent"),
            hostname="flaky-1.lab",
            agent_version="9.9",
        ) as publisher,
    ):
        monitor.set_broker(broker.host, broker.port)
        publisher.set_broker(broker.host, broker.port)
        presence = await monitor.wait_presence("flaky-1", timeout=10)
        while presence is not None and presence.state is not PresenceState.ONLINE:
            presence = await monitor.wait_presence("flaky-1", timeout=10)
        assert presence is not None
        [failure] = failures_of(caplog, "coffer-status-publisher:flaky-1")
        assert failure.exc_info is not None
        traceback = logging.Formatter().formatException(failure.exc_info)
        assert "RuntimeError: injected: a bug in the connection loop" in traceback


def wait_exit(cluster: Cluster, within: float) -> int:
    popen = cluster.controller.popen
    assert popen is not None
    deadline = time.monotonic() + within
    while (code := popen.poll()) is None:
        assert time.monotonic() < deadline, "the controller did not stop"
        time.sleep(0.1)
    return code


@pytest.mark.integration
def test_a_fatal_task_failing_stops_the_controller_with_a_non_zero_exit(tmp_path: Path) -> None:
    """The state-lock watch is FATAL: without its lock a second controller could start."""
    with Cluster(tmp_path) as cluster:
        (cluster.root / "state" / LOCK_NAME).unlink()
        code = wait_exit(cluster, within=WATCH_SECONDS + 15)
        log = cluster.controller.log.read_text()
        assert code != 0, log[-3000:]
        assert "controller: task state-lock failed; stopping" in log
        assert "Traceback" in log
        assert "coffer-controller: The controller's lock on its state directory" in log
        assert "controller.lock was deleted" in log
