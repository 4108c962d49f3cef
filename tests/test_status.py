"""Status over MQTT, end to end against a real Mosquitto run by `PrivateBroker`.

Agents' publishers and the controller's monitor talk through the broker exactly as deployed:
TLS with client certificates from a fresh Coffer CA, the ACL of docs/mqtt.md. The schema
tests at the end need no broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import aiomqtt
import pytest

from agent.status import StatusPublisher
from controller.broker import PrivateBroker
from controller.pki import init_pki, issue_agent
from controller.status import StatusMonitor
from shared.errors import InvalidArgument, Unavailable
from shared.model import JobStatus
from shared.status import (
    JOB_STATE_FILTER,
    RECONNECT,
    JobState,
    OfflineReason,
    Outbox,
    OutgoingMessage,
    Presence,
    PresenceState,
    Progress,
    TopicKind,
    TopicRef,
    job_state_topic,
    parse_topic,
    presence_topic,
    progress_topic,
)
from shared.tls import TlsFiles, mqtt_ssl_context

pytestmark = pytest.mark.timeout(60)

TS = datetime(2025, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
T = TypeVar("T")


# --- fixtures ------------------------------------------------------------------------------


class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        init_pki(root / "pki")
        self.controller = TlsFiles.in_dir(root / "pki", "controller")
        self.operator = TlsFiles.in_dir(root / "pki", "operator")

    def agent(self, vm_id: str) -> TlsFiles:
        out = self.root / "agents" / vm_id
        if not (out / "agent.crt").exists():
            issue_agent(self.root / "pki", vm_id, out)
        return TlsFiles.in_dir(out, "agent")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("status-pki"))


@pytest.fixture
async def broker(pki: Pki, tmp_path: Path) -> AsyncIterator[PrivateBroker]:
    async with PrivateBroker(tmp_path / "broker", pki.controller, readers=["admin"]) as b:
        yield b


@pytest.fixture
def jobs() -> dict[str, str]:
    """The running jobs the monitor is told of, job id → VM id (the job layer's answer)."""
    return {}


@pytest.fixture
async def monitor(
    pki: Pki, broker: PrivateBroker, jobs: dict[str, str]
) -> AsyncIterator[StatusMonitor]:
    async with StatusMonitor(pki.controller, job_owner=jobs.get) as m:
        m.set_broker(broker.host, broker.port)
        yield m


def publisher(pki: Pki, vm_id: str) -> StatusPublisher:
    return StatusPublisher(vm_id, pki.agent(vm_id), hostname=f"{vm_id}.lab", agent_version="9.9")


async def eventually(probe: Callable[[], T | None], *, within: float = 10.0) -> T:
    """The first truthy value `probe` returns, polling; fails the test after `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        await asyncio.sleep(0.02)
    pytest.fail(f"condition not met within {within}s")


def presence_is(
    monitor: StatusMonitor, vm_id: str, state: PresenceState, **fields: object
) -> Callable[[], Presence | None]:
    def probe() -> Presence | None:
        p = monitor.presence(vm_id)
        if p is None or p.state is not state:
            return None
        return p if all(getattr(p, k) == v for k, v in fields.items()) else None

    return probe


def raw_client(pki_files: TlsFiles, broker: PrivateBroker) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host, broker.port, tls_context=mqtt_ssl_context(pki_files), timeout=5
    )


# --- agent → broker → controller -----------------------------------------------------------


async def test_presence_and_progress_reach_the_monitor(
    pki: Pki, broker: PrivateBroker, monitor: StatusMonitor, jobs: dict[str, str]
) -> None:
    jobs["job-1"] = "vm-a"
    async with publisher(pki, "vm-a") as pub:
        pub.set_broker(broker.host, broker.port)
        online = await eventually(presence_is(monitor, "vm-a", PresenceState.ONLINE))
        assert (online.hostname, online.agent_version, online.reason) == ("vm-a.lab", "9.9", None)

        waiting = asyncio.ensure_future(monitor.wait_progress("job-1", timeout=10))
        await asyncio.sleep(0)  # the waiter is registered before the value can arrive
        pub.publish_progress("job-1", "transfer", 1024, 4096, 512.0)
        progress = await waiting
        assert progress is not None
        assert (progress.vm_id, progress.phase, progress.bytes_done, progress.bytes_total) == (
            "vm-a",
            "transfer",
            1024,
            4096,
        )
        assert monitor.progress("job-1") == progress
        assert await monitor.wait_progress("job-1", timeout=0.2) is None  # nothing newer came

        monitor.forget_job("job-1")
        assert monitor.progress("job-1") is None

        # An empty host means "no broker": the agent says goodbye and stays away.
        pub.set_broker("", 0)
        gone = await eventually(presence_is(monitor, "vm-a", PresenceState.OFFLINE))
        assert gone.reason is OfflineReason.SHUTDOWN
        pub.set_broker(broker.host, broker.port)
        await eventually(presence_is(monitor, "vm-a", PresenceState.ONLINE))

    # A clean exit publishes presence offline, retained: a late subscriber still sees it.
    await eventually(presence_is(monitor, "vm-a", PresenceState.OFFLINE))
    async with raw_client(pki.operator, broker) as reader:
        await reader.subscribe(presence_topic("vm-a"), qos=1)
        async with asyncio.timeout(5):
            message = await anext(aiter(reader.messages))
    retained = Presence.from_json(bytes(message.payload))
    assert message.retain
    assert (retained.state, retained.reason) == (PresenceState.OFFLINE, OfflineReason.SHUTDOWN)


async def test_job_states_reach_a_read_only_consumer(
    pki: Pki, broker: PrivateBroker, monitor: StatusMonitor
) -> None:
    await eventually(lambda: monitor.connected)
    state = JobState("job-7", "Backup", JobStatus.FAILED, "vm-a", "UserErrorFsFreezeFailed", TS)
    async with raw_client(pki.operator, broker) as reader:
        await reader.subscribe(JOB_STATE_FILTER, qos=1)
        monitor.publish_job_state(state)
        async with asyncio.timeout(5):
            message = await anext(aiter(reader.messages))
    assert message.topic.value == job_state_topic("job-7")
    assert not message.retain
    assert JobState.from_json(bytes(message.payload)) == state


AGENT_SCRIPT = """
import asyncio, sys
from pathlib import Path
from agent.status import StatusPublisher
from shared.tls import TlsFiles

async def main() -> None:
    vm_id, certs, host, port = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    tls = TlsFiles.in_dir(certs, "agent")
    async with StatusPublisher(vm_id, tls, hostname="lab", agent_version="1") as pub:
        pub.set_broker(host, port)
        pub.publish_progress("job-9", "transfer", 1, 2, 3.0)
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_last_will_marks_a_killed_agent_offline(
    pki: Pki, broker: PrivateBroker, monitor: StatusMonitor
) -> None:
    certs = pki.agent("vm-killed").cert.parent
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        AGENT_SCRIPT,
        "vm-killed",
        str(certs),
        broker.host,
        str(broker.port),
        start_new_session=True,
    )
    try:
        await eventually(presence_is(monitor, "vm-killed", PresenceState.ONLINE), within=20)
        os.kill(process.pid, signal.SIGKILL)
        await process.wait()
        offline = await eventually(presence_is(monitor, "vm-killed", PresenceState.OFFLINE))
        assert offline.reason is OfflineReason.CONNECTION_LOST
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()


async def test_acl_keeps_an_agent_to_its_own_prefix(
    pki: Pki, broker: PrivateBroker, monitor: StatusMonitor, jobs: dict[str, str]
) -> None:
    jobs.update({"job-v": "vm-victim", "job-m": "vm-rogue", "job-marker": "vm-rogue"})
    await eventually(lambda: monitor.connected)
    victim_presence = Presence("vm-victim", PresenceState.ONLINE, "fake", "0", TS)
    victim_progress = Progress("vm-victim", "job-v", "transfer", 1, 2, 3.0, TS)
    # Under its own prefix, but claiming to be the victim: the monitor checks the payload.
    spoofed = Progress("vm-victim", "job-m", "transfer", 1, 2, 3.0, TS)
    marker = Progress("vm-rogue", "job-marker", "transfer", 1, 2, 3.0, TS)
    async with raw_client(pki.agent("vm-rogue"), broker) as rogue:
        # Agents may not read status at all: nothing published below reaches this subscription.
        await rogue.subscribe("coffer/#", qos=1)
        await rogue.publish(victim_presence.topic, victim_presence.to_json(), qos=1, retain=True)
        await rogue.publish(victim_progress.topic, victim_progress.to_json(), qos=1)
        await rogue.publish(progress_topic("vm-rogue", "job-m"), spoofed.to_json(), qos=1)
        await rogue.publish(presence_topic("vm-rogue"), b"{not json", qos=1)
        await rogue.publish(marker.topic, marker.to_json(), qos=1)
        # One publisher's messages arrive in order: once the marker is in, the others were
        # either delivered before it or refused.
        await eventually(lambda: monitor.progress("job-marker"))
        assert monitor.presence("vm-victim") is None
        assert monitor.progress("job-v") is None
        assert monitor.progress("job-m") is None
        assert monitor.presence("vm-rogue") is None  # the malformed one was ignored
        assert monitor.connected  # and did not disturb the monitor
        read = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                read = await anext(aiter(rogue.messages))
        assert read is None, f"an agent read {read.topic}"


async def test_broker_outage_never_blocks_and_status_resumes(pki: Pki, tmp_path: Path) -> None:
    broker_dir = tmp_path / "outage-broker"
    monitor = StatusMonitor(pki.controller, job_owner={"job-o": "vm-o"}.get)
    pub = StatusPublisher("vm-o", pki.agent("vm-o"), hostname="o", agent_version="1", max_pending=8)
    async with monitor, pub:
        async with PrivateBroker(broker_dir, pki.controller) as first:
            host, port = first.host, first.port
            monitor.set_broker(host, port)
            pub.set_broker(host, port)
            await eventually(presence_is(monitor, "vm-o", PresenceState.ONLINE))
        # The broker is gone.
        await eventually(lambda: not pub.connected and not monitor.connected)

        started = time.monotonic()
        for done in range(1, 2001):
            pub.publish_progress("job-o", "transfer", done, 2000, 10.0)
        for n in range(20):  # more jobs than the outbox holds: the oldest are dropped
            pub.publish_progress(f"job-x{n}", "transfer", 1, 2, 1.0)
        pub.publish_progress("job-o", "transfer", 2000, 2000, 10.0)  # the latest, newest topic
        assert time.monotonic() - started < 1.0  # 2021 calls, none waited for MQTT
        assert pub.pending == 8

        # Let both clients fail a few reconnects while the broker is away.
        await asyncio.sleep(1.5)
        # Progress is not retained: only subscribers connected when it is published get it.
        # So the agent is held back until the controller has subscribed again (its own
        # jittered backoff can be shorter than the controller's reconnect on a loaded machine);
        # what it kept in its outbox meanwhile is what it sends then.
        monitor.set_broker("", 0)
        pub.set_broker("", 0)
        async with PrivateBroker(broker_dir, pki.controller, port=port) as second:
            assert second.port == port
            monitor.set_broker(host, port)
            # Subscribed again (presence and progress are one subscription): another agent's
            # presence reaches the controller.
            async with publisher(pki, "vm-probe") as probe:
                probe.set_broker(host, port)
                await eventually(presence_is(monitor, "vm-probe", PresenceState.ONLINE))
            assert pub.pending == 8
            pub.set_broker(host, port)
            progress = await eventually(lambda: monitor.progress("job-o"), within=15)
            assert progress.bytes_done == 2000
            await eventually(presence_is(monitor, "vm-o", PresenceState.ONLINE))
            await eventually(lambda: pub.pending == 0)


async def test_private_broker_restarts_a_killed_mosquitto(
    pki: Pki, broker: PrivateBroker, monitor: StatusMonitor, jobs: dict[str, str]
) -> None:
    jobs["job-r"] = "vm-r"
    async with publisher(pki, "vm-r") as pub:
        pub.set_broker(broker.host, broker.port)
        before = await eventually(presence_is(monitor, "vm-r", PresenceState.ONLINE))
        old_pid = broker.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        await eventually(lambda: broker.restarts == 1 and broker.pid not in (None, old_pid))

        def announced_again() -> Presence | None:
            p = monitor.presence("vm-r")
            return p if p is not None and p.ts > before.ts else None

        # Both clients come back by themselves; the agent announces itself again.
        after = await eventually(announced_again, within=15)
        assert after.state is PresenceState.ONLINE
        pub.publish_progress("job-r", "snapshot", 0, 10, 0.0)
        await eventually(lambda: monitor.progress("job-r"))


async def test_private_broker_reports_a_broker_that_cannot_start(pki: Pki, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: mosquitto cannot bind it
        port = taken.getsockname()[1]
        with pytest.raises(Unavailable, match="exited with status"):
            async with PrivateBroker(tmp_path / "b", pki.controller, port=port):
                pass


# --- schema (no broker) --------------------------------------------------------------------


def samples() -> Iterator[Presence | Progress | JobState]:
    yield Presence("vm-1", PresenceState.ONLINE, "host-1", "1.2.3", TS)
    yield Presence("vm-1", PresenceState.OFFLINE, "host-1", "1.2.3", TS, OfflineReason.SHUTDOWN)
    yield Progress("vm-1", "job-1", "transfer", 10, 100, 2.5, TS)
    yield Progress("vm-1", "0b7c1f2e-9a", "freeze", 0, 0, 0.0, TS)
    yield JobState("job-1", "Backup", JobStatus.IN_PROGRESS, "vm-1", None, TS)
    yield JobState("job-2", "Discovery", JobStatus.FAILED, None, "ServiceUnavailable", TS)


@pytest.mark.parametrize("status", list(samples()), ids=repr)
def test_payloads_round_trip(status: Presence | Progress | JobState) -> None:
    payload = status.to_json()
    assert type(status).from_json(payload) == status
    document = json.loads(payload)
    assert next(iter(document)) == "v"
    assert document["v"] == 1
    assert document["ts"] == "2025-03-01T12:30:15.123456Z"


def test_topics_round_trip() -> None:
    assert presence_topic("vm-1") == "coffer/v1/agents/vm-1/presence"
    assert progress_topic("vm-1", "j") == "coffer/v1/agents/vm-1/jobs/j/progress"
    assert job_state_topic("j") == "coffer/v1/jobs/j/state"
    assert parse_topic(presence_topic("vm-1")) == TopicRef(TopicKind.PRESENCE, "vm-1")
    assert parse_topic(progress_topic("vm-1", "j")) == TopicRef(TopicKind.PROGRESS, "vm-1", "j")
    assert parse_topic(job_state_topic("j")) == TopicRef(TopicKind.JOB_STATE, job_id="j")


@pytest.mark.parametrize(
    "topic",
    [
        "coffer/v2/agents/vm-1/presence",
        "coffer/v1/agents/vm-1/presence/extra",
        "coffer/v1/agents/+/presence",
        "coffer/v1/agents/VM 1/presence",
        "coffer/v1/agents/coffer-controller/presence",
        "coffer/v1/agents/vm-1/jobs//progress",
        "coffer/v1/jobs/#/state",
        "other/thing",
    ],
)
def test_foreign_topics_are_refused(topic: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_topic(topic)


def test_ids_that_cannot_be_one_topic_level_are_refused() -> None:
    for bad in ("a/b", "+", "#", "", "x" * 200):
        with pytest.raises(InvalidArgument):
            progress_topic("vm-1", bad)
    with pytest.raises(InvalidArgument):
        presence_topic("vm/1")


_DELETE = object()


def samples_progress() -> Progress:
    return Progress("vm-1", "job-1", "transfer", 10, 100, 2.5, TS)


def _progress_doc(**changes: object) -> bytes:
    document: dict[str, object] = json.loads(samples_progress().to_json())
    for key, value in changes.items():
        if value is _DELETE:
            del document[key]
        else:
            document[key] = value
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b"\xff\xfe\x00",
        b'{"v": 1}',
        _progress_doc(v=2),
        _progress_doc(v=True),
        _progress_doc(v=_DELETE),
        _progress_doc(bytes_done=-1),
        _progress_doc(bytes_done=1.5),
        _progress_doc(bytes_done=True),
        _progress_doc(rate_bytes_per_second="fast"),
        _progress_doc(rate_bytes_per_second=float("nan")),
        _progress_doc(phase=""),
        _progress_doc(job_id="a/b"),
        _progress_doc(vm_id="coffer-controller"),
        _progress_doc(ts="yesterday"),
        _progress_doc(ts="2025-03-01T12:30:15"),  # no offset: not UTC
        _progress_doc(ts=_DELETE),
        b'{"v": 1, "pad": "' + b"x" * 20000 + b'"}',
        b'{"v": 1, "pad": ' + b"[" * 2000 + b"]" * 2000 + b"}",  # within the size bound
        _progress_doc(bytes_done=1 << 63),
        _progress_doc(rate_bytes_per_second=10**400),
        _progress_doc(phase="\x1b]0;owned\x07"),  # a terminal escape sequence
        _progress_doc(phase="\ud800"),  # a lone surrogate: cannot be encoded again
        _progress_doc(ts="0001-01-01T00:00:00+01:00"),  # before year 1 in UTC
    ],
)
def test_malformed_progress_is_refused(payload: bytes) -> None:
    with pytest.raises(InvalidArgument):
        Progress.from_json(payload)


def test_malformed_presence_and_job_state_are_refused() -> None:
    online = json.loads(Presence("vm-1", PresenceState.ONLINE, "h", "1", TS).to_json())
    presence_changes: list[dict[str, object]] = [
        {"state": "sleeping"},
        {"state": None},
        {"reason": "shutdown"},  # an online agent has no offline reason
        {"vm_id": "vm-2", "hostname": ""},
    ]
    for change in presence_changes:
        with pytest.raises(InvalidArgument):
            Presence.from_json(json.dumps({**online, **change}).encode())
    state = json.loads(JobState("j", "Backup", JobStatus.COMPLETED, None, None, TS).to_json())
    state_changes: list[dict[str, object]] = [
        {"status": "Done"},
        {"operation": ""},
        {"vm_id": 7},
        {"error_code": ""},
    ]
    for change in state_changes:
        with pytest.raises(InvalidArgument):
            JobState.from_json(json.dumps({**state, **change}).encode())


def test_unknown_fields_are_ignored() -> None:
    assert Progress.from_json(_progress_doc(extra={"future": True})) == samples_progress()


def test_outbox_keeps_the_latest_per_topic_and_stays_bounded() -> None:
    outbox = Outbox(max_topics=2)

    def message(topic: str, payload: bytes) -> OutgoingMessage:
        return OutgoingMessage(topic, payload, 0, False)

    outbox.put(message("a", b"1"))
    outbox.put(message("b", b"1"))
    outbox.put(message("a", b"2"))  # replaces a/1, and a is now the newest topic
    outbox.put(message("c", b"1"))  # drops b, the oldest
    assert [(m.topic, m.payload) for m in outbox.take_all()] == [("a", b"2"), ("c", b"1")]
    assert outbox.dropped == 1
    assert len(outbox) == 0

    outbox.put(message("a", b"3"))
    outbox.requeue([message("a", b"2"), message("d", b"1")])  # a/3 is newer than a/2
    assert [(m.topic, m.payload) for m in outbox.take_all()] == [("d", b"1"), ("a", b"3")]


def test_reconnect_delay_grows_with_jitter_up_to_the_cap() -> None:
    assert RECONNECT.delay(0, rng=lambda: 0.0) == pytest.approx(0.125)
    assert RECONNECT.delay(0, rng=lambda: 1.0) == pytest.approx(0.25)
    assert RECONNECT.delay(3, rng=lambda: 1.0) == pytest.approx(2.0)
    assert RECONNECT.delay(50, rng=lambda: 1.0) == pytest.approx(4.0)
    assert RECONNECT.delay(50, rng=lambda: 0.0) == pytest.approx(2.0)


async def test_publisher_without_a_broker_never_blocks(pki: Pki) -> None:
    async with publisher(pki, "vm-idle") as pub:
        pub.publish_progress("job-1", "transfer", 1, 2, 3.0)
        pub.publish_progress("job-1", "transfer", -5, 2, float("nan"))  # logged, dropped
        assert pub.pending == 1
        assert not pub.connected


async def test_publisher_accepts_progress_from_other_threads(pki: Pki) -> None:
    async with publisher(pki, "vm-threads") as pub:
        await asyncio.to_thread(pub.publish_progress, "job-t", "transfer", 1, 2, 3.0)
        assert pub.pending == 1
