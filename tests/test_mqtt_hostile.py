"""A hostile agent on MQTT: what it publishes on its own topics, with its own certificate.

Issue 14's audit, replayed against a real Mosquitto (the controller's private broker, or one
started from the production example in deploy/mosquitto/) and, where the operator's view is
what matters, a real `coffer-controller` process and the real `coffer` CLI. The hostile agent
is a plain MQTT client holding a properly issued agent certificate: all the broker lets it do
is publish on its own topics, so everything here is about what it publishes there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import pytest

from controller.broker import LIMITS, PrivateBroker, acl_text, config_text
from controller.pki import issue_operator
from controller.status import DropReason, StatusMonitor
from shared.model import JobStatus
from shared.status import (
    MAX_PAYLOAD_BYTES,
    JobState,
    OfflineReason,
    Presence,
    PresenceState,
    Progress,
    presence_topic,
    progress_topic,
)
from shared.tls import TlsFiles, mqtt_ssl_context
from tests.cluster import Cluster, free_port
from tests.test_status import Pki, eventually, presence_is, publisher, raw_client

pytestmark = pytest.mark.timeout(120)

TS = datetime(2025, 3, 1, 12, 30, 15, tzinfo=UTC)
# About 4 KB of JSON, 2,000 levels deep: under the size bound, far over Python's recursion.
DEEP = b'{"v":1,"x":' + b"[" * 2000 + b"]" * 2000 + b"}"
DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("hostile-pki"))


@pytest.fixture
async def broker(pki: Pki, tmp_path: Path) -> AsyncIterator[PrivateBroker]:
    async with PrivateBroker(tmp_path / "broker", pki.controller, readers=["admin"]) as b:
        yield b


@pytest.fixture
def jobs() -> dict[str, str]:
    return {}


async def subscribed(monitor: StatusMonitor, pki: Pki, broker: PrivateBroker) -> None:
    """Return once `monitor` has subscribed (`connected` is true a moment before that)."""
    monitor.set_broker(broker.host, broker.port)
    probe = Presence("vm-probe", PresenceState.ONLINE, f"probe-{time.monotonic()}", "1", TS)
    async with raw_client(pki.agent("vm-probe"), broker) as client:
        while monitor.presence("vm-probe") != probe:
            await client.publish(probe.topic, probe.to_json(), qos=1)
            await asyncio.sleep(0.05)


@pytest.fixture
async def monitor(
    pki: Pki, broker: PrivateBroker, jobs: dict[str, str]
) -> AsyncIterator[StatusMonitor]:
    async with StatusMonitor(pki.controller, job_owner=jobs.get) as m:
        await subscribed(m, pki, broker)
        yield m


@contextlib.asynccontextmanager
async def watch_connection(monitor: StatusMonitor) -> AsyncIterator[list[float]]:
    """Times at which the monitor was seen disconnected (sampled every 5 ms) while inside."""
    down: list[float] = []

    async def sample() -> None:
        while True:
            if not monitor.connected:
                down.append(time.monotonic())
            await asyncio.sleep(0.005)

    task = asyncio.ensure_future(sample())
    try:
        yield down
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def restarts_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "failed; restarting" in r.getMessage()]


async def retained(reader: TlsFiles, host: str, port: int, topic_filter: str) -> dict[str, bytes]:
    """The retained messages a new subscriber to `topic_filter` is sent, by topic."""
    found: dict[str, bytes] = {}
    async with aiomqtt.Client(host, port, tls_context=mqtt_ssl_context(reader), timeout=5) as c:
        await c.subscribe(topic_filter, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                async for message in c.messages:
                    if message.retain:
                        found[message.topic.value] = bytes(message.payload)
    return found


def rss_mib(pid: int | None) -> float:
    assert pid is not None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# --- one message must not stop the monitor ---------------------------------------------------


async def test_deeply_nested_json_is_dropped_and_the_monitor_keeps_its_session(
    pki: Pki, broker: PrivateBroker, monitor: StatusMonitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with (
        raw_client(pki.agent("vm-rogue"), broker) as rogue,
        watch_connection(monitor) as down,
    ):
        await rogue.publish(progress_topic("vm-rogue", "job-p"), DEEP, qos=1)
        await rogue.publish(presence_topic("vm-rogue"), DEEP, qos=1)
        # One publisher's messages arrive in order: once this is in, both were handled.
        fine = Presence("vm-rogue", PresenceState.ONLINE, "rogue", "1", TS)
        await rogue.publish(fine.topic, fine.to_json(), qos=1)
        await eventually(presence_is(monitor, "vm-rogue", PresenceState.ONLINE))
    assert down == [], "the monitor lost its broker session over one message"
    assert restarts_logged(caplog) == []
    assert monitor.dropped[DropReason.MALFORMED] == 2
    dropped = [r.getMessage() for r in caplog.records if r.name == "controller.status"]
    assert any("nests 2001 levels deep" in m for m in dropped), dropped


class FlakyMonitor(StatusMonitor):
    """A monitor whose first two connections hit a bug in its own code."""

    bugs = 2

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        if self.bugs:
            self.bugs -= 1
            raise RuntimeError("injected: a bug in the monitor's connection loop")
        await super()._on_connect(client)


async def test_a_monitor_whose_loop_fails_is_restarted_and_reconnects(
    pki: Pki, broker: PrivateBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="shared.supervision")
    async with FlakyMonitor(pki.controller) as monitor, publisher(pki, "vm-back") as agent:
        monitor.set_broker(broker.host, broker.port)
        agent.set_broker(broker.host, broker.port)
        await eventually(presence_is(monitor, "vm-back", PresenceState.ONLINE), within=20)
    assert monitor.bugs == 0
    assert len(restarts_logged(caplog)) == 2


async def test_a_flood_of_bad_messages_is_logged_at_a_bounded_rate(
    pki: Pki, broker: PrivateBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="controller.status")
    now = [0.0]
    async with StatusMonitor(pki.controller, clock=lambda: now[0]) as monitor:
        await subscribed(monitor, pki, broker)
        async with raw_client(pki.agent("vm-noisy"), broker) as rogue:
            for round_ in range(2):
                for n in range(250):
                    await rogue.publish(progress_topic("vm-noisy", f"job-{n}"), b"{no", qos=0)
                fine = Presence("vm-noisy", PresenceState.ONLINE, f"noisy-{round_}", "1", TS)
                await rogue.publish(fine.topic, fine.to_json(), qos=1)
                await eventually(presence_is(monitor, "vm-noisy", PresenceState.ONLINE,
                                             hostname=f"noisy-{round_}"))  # fmt: skip
                now[0] += 10.0  # the log's interval passes
            await rogue.publish(progress_topic("vm-noisy", "job-last"), b"{no", qos=1)
            await eventually(lambda: monitor.dropped[DropReason.MALFORMED] == 501)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines  # one per interval: 501 drops, 3 lines
    assert lines[1].endswith("; and 249 malformed since the last report")
    assert lines[2].endswith("; and 249 malformed since the last report")


# --- an agent's progress is about its own running jobs only ----------------------------------


async def test_progress_is_kept_only_for_the_agents_own_running_jobs(
    pki: Pki, broker: PrivateBroker, monitor: StatusMonitor, jobs: dict[str, str]
) -> None:
    jobs.update({"job-of-a": "vm-a", "job-of-b": "vm-b"})
    async with raw_client(pki.agent("vm-b"), broker) as b:
        for job_id in ("job-of-a", "job-unknown", "job-of-b"):
            forged = Progress("vm-b", job_id, "forged", 666, 1000, 1.0, TS)
            await b.publish(forged.topic, forged.to_json(), qos=1)
        await eventually(lambda: monitor.progress("job-of-b"))
    assert monitor.progress("job-of-a") is None
    assert monitor.progress("job-unknown") is None
    assert monitor.dropped[DropReason.NOT_ITS_JOB] == 2


def private_broker_port(cluster: Cluster) -> int:
    conf = (cluster.root / "state" / "broker" / "mosquitto.conf").read_text()
    match = re.search(r"^listener (\d+) ", conf, re.MULTILINE)
    assert match is not None
    return int(match.group(1))


PRE_SCRIPT = """#!/bin/sh
# Holds the backup in its pre-script until the test lets it go.
for _ in $(seq 600); do [ -e {release} ] && exit 0; sleep 0.1; done
exit 1
"""


@pytest.mark.integration
async def test_an_agent_naming_another_vms_job_does_not_change_what_job_show_displays(
    tmp_path: Path,
) -> None:
    release = tmp_path / "release"
    script = tmp_path / "pre.sh"
    script.write_text(PRE_SCRIPT.format(release=release))
    script.chmod(0o755)
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(1 << 20))
    with Cluster(tmp_path / "cluster") as cluster:
        agent = cluster.add_agent("vm-a", {"root": disk}, start=False)
        with agent.config.open("a") as config:
            config.write(
                f'[consistency]\nfreeze = false\n[consistency.pre_script]\npath = "{script}"\n'
            )
        cluster.start_agent("vm-a")
        cluster.coffer("pki", "issue-agent", "vm-b", "--dir", str(cluster.pki),
                       "--out", str(tmp_path / "tls-b"), json_out=False)  # fmt: skip
        cluster.protect("vm-a")
        [job] = cluster.coffer("backup-now", "vm-a", "--no-wait")
        try:
            forged = Progress("vm-b", job["id"], "forged", 666, 1000, 1.0, TS)
            tls_b = TlsFiles.in_dir(tmp_path / "tls-b", "agent")
            port = private_broker_port(cluster)
            async with aiomqtt.Client(
                "127.0.0.1", port, tls_context=mqtt_ssl_context(tls_b), timeout=5
            ) as b:
                await b.publish(forged.topic, forged.to_json(), qos=1)
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    shown = await asyncio.to_thread(cluster.coffer, "job", "show", job["id"])
                    assert shown["status"] == "InProgress"
                    assert (shown.get("progress") or {}).get("phase") != "forged", shown
                    await asyncio.sleep(0.2)
            log = cluster.controller.log.read_text()
            assert f"job {job['id']!r} is not a running job of VM 'vm-b'" in log
        finally:
            release.touch()
        ended = cluster.coffer("job", "watch", job["id"])
        assert ended["status"] == "Completed", ended


# --- operators are not agents, nor the controller ---------------------------------------------


async def test_an_operator_certificate_reads_nothing_and_publishes_as_nobody(
    pki: Pki, broker: PrivateBroker, monitor: StatusMonitor, jobs: dict[str, str]
) -> None:
    """An operator certificate that is no listed reader gets nothing on the broker."""
    issue_operator(pki.root / "pki", "alice", pki.root / "alice")
    alice = TlsFiles.in_dir(pki.root / "alice", "operator")
    jobs["job-1"] = "vm-x"
    forged_state = JobState("job-1", "Backup", JobStatus.FAILED, "vm-x", "Forged", TS)
    forged_presence = Presence("vm-x", PresenceState.OFFLINE, "x", "1", TS, OfflineReason.SHUTDOWN)
    forged_progress = Progress("vm-x", "job-1", "forged", 1, 2, 3.0, TS)
    async with (
        raw_client(pki.operator, broker) as reader,  # `admin`, a listed reader
        raw_client(alice, broker) as operator,
    ):
        await reader.subscribe("coffer/v1/jobs/+/state", qos=1)
        await operator.subscribe("coffer/#", qos=1)
        await operator.publish(forged_presence.topic, forged_presence.to_json(), qos=1, retain=True)
        await operator.publish(forged_progress.topic, forged_progress.to_json(), qos=1)
        await operator.publish(forged_state.topic, forged_state.to_json(), qos=1)
        async with publisher(pki, "vm-x") as agent:
            agent.set_broker(broker.host, broker.port)
            await eventually(presence_is(monitor, "vm-x", PresenceState.ONLINE))
            for client in (operator, reader):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        message = await anext(aiter(client.messages))
                        pytest.fail(f"{message.topic} reached a client that may not see it")
    assert monitor.progress("job-1") is None
    # What stands on the broker is the agent's own goodbye, not the operator's forgery.
    kept = await retained(pki.operator, broker.host, broker.port, presence_topic("vm-x"))
    assert Presence.from_json(kept[presence_topic("vm-x")]).hostname == "vm-x.lab"


async def test_a_reader_named_like_a_vm_cannot_publish_as_that_vm(pki: Pki, tmp_path: Path) -> None:
    """The broker sees names, not roles: a reader whose name is also a VM id is denied that
    VM's topics (so is the VM's agent, which is the safe way to fail; docs/mqtt.md)."""
    issue_operator(pki.root / "pki", "vm-shared", pki.root / "vm-shared-operator")
    reader = TlsFiles.in_dir(pki.root / "vm-shared-operator", "operator")
    async with (
        PrivateBroker(tmp_path / "b", pki.controller, readers=["vm-shared"]) as broker,
        StatusMonitor(pki.controller) as monitor,
    ):
        await subscribed(monitor, pki, broker)
        forged = Presence("vm-shared", PresenceState.ONLINE, "forged", "1", TS)
        marker = Presence("vm-other", PresenceState.ONLINE, "other", "1", TS)
        async with (
            raw_client(reader, broker) as impostor,
            raw_client(pki.agent("vm-other"), broker) as other,
        ):
            await impostor.publish(forged.topic, forged.to_json(), qos=1, retain=True)
            await other.publish(marker.topic, marker.to_json(), qos=1)
            await eventually(presence_is(monitor, "vm-other", PresenceState.ONLINE))
        assert monitor.presence("vm-shared") is None


# --- retained poison, and what the broker keeps ----------------------------------------------


def production_broker_config(root: Path, pki_dir: Path, port: int, readers: list[str]) -> Path:
    """deploy/mosquitto's example, pointed at a test PKI and port (and logging to a file)."""
    acl = (DEPLOY / "acl").read_text()
    for name in readers:
        acl += f"\nuser {name}\ntopic read coffer/v1/agents/+/presence\n"
        acl += "topic read coffer/v1/agents/+/jobs/+/progress\ntopic read coffer/v1/jobs/+/state\n"
    (root / "coffer.acl").write_text(acl)
    conf = (DEPLOY / "mosquitto.conf").read_text()
    for old, new in {
        "/etc/mosquitto/coffer.acl": str(root / "coffer.acl"),
        "/etc/mosquitto/coffer/ca.crt": str(pki_dir / "ca.crt"),
        "/etc/mosquitto/coffer/broker.crt": str(pki_dir / "controller.crt"),
        "/etc/mosquitto/coffer/broker.key": str(pki_dir / "controller.key"),
        "listener 8883": f"listener {port} 127.0.0.1",
        "log_dest syslog": "log_dest stderr",
    }.items():
        assert old in conf, old
        conf = conf.replace(old, new)
    # The example expects its files readable by user mosquitto; the test's are root's.
    conf += "\nuser root\n"
    (root / "mosquitto.conf").write_text(conf)
    return root / "mosquitto.conf"


@contextlib.contextmanager
def external_broker(root: Path, pki_dir: Path, port: int, readers: list[str]) -> Iterator[None]:
    """A standalone Mosquitto from the production example, stopped by its PID on exit."""
    root.mkdir(parents=True, exist_ok=True)
    conf = production_broker_config(root, pki_dir, port, readers)
    log = root / "mosquitto.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=out, stderr=out, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 10
        while f"Opening ipv4 listen socket on port {port}" not in log.read_text(errors="replace"):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(10)


@pytest.mark.integration
async def test_a_retained_poison_on_an_external_broker_does_not_stop_the_controller(
    tmp_path: Path,
) -> None:
    port = free_port()
    with Cluster(tmp_path / "cluster", mqtt=f"127.0.0.1:{port}") as cluster:
        cluster.coffer("pki", "issue-agent", "vm-poison", "--dir", str(cluster.pki),
                       "--out", str(tmp_path / "tls-p"), json_out=False)  # fmt: skip
        poisoner = TlsFiles.in_dir(tmp_path / "tls-p", "agent")
        operator = TlsFiles.in_dir(cluster.pki, "operator")
        cluster.stop_controller()
        # An external broker, from the production example, on the port the controller knows.
        with external_broker(tmp_path / "external", cluster.pki, port, ["admin"]):
            async with aiomqtt.Client(
                "127.0.0.1", port, tls_context=mqtt_ssl_context(poisoner), timeout=5
            ) as agent:
                for topic in (progress_topic("vm-poison", "job-x"), presence_topic("vm-poison")):
                    await agent.publish(topic, DEEP, qos=1, retain=True)
            before = await retained(operator, "127.0.0.1", port, "coffer/v1/agents/vm-poison/#")
            assert set(before) == {
                presence_topic("vm-poison"),
                progress_topic("vm-poison", "job-x"),
            }
            for _ in range(3):  # "at every controller start"
                cluster.start_controller()
                cluster.controller.wait_for_line("status: connected to broker")
                await asyncio.sleep(1.5)
                text = cluster.controller.log.read_text()
                assert "failed; restarting" not in text, text[-3000:]
                assert "status broker" not in text, text[-3000:]  # never "lost"
                assert "(malformed)" in text
                cluster.stop_controller()
            # The retained progress was cleared (progress is never retained); the presence is
            # the agent's own, which the controller leaves alone.
            after = await retained(operator, "127.0.0.1", port, "coffer/v1/agents/vm-poison/#")
            assert set(after) == {presence_topic("vm-poison")}
        cluster.start_controller()  # for a clean exit of the cluster


async def flood(client: aiomqtt.Client, topics: list[str], payload: bytes) -> int:
    """Publish `payload` retained on every topic, as fast as it goes; how many went out."""
    sent = 0
    with contextlib.suppress(aiomqtt.MqttError):
        for topic in topics:
            await client.publish(topic, payload, qos=0, retain=True)
            sent += 1
        await client.publish(topics[0], b"", qos=1, retain=True)  # waits until all are in
    return sent


async def test_an_agent_cannot_make_the_broker_keep_its_messages(
    pki: Pki, broker: PrivateBroker, monitor: StatusMonitor
) -> None:
    before = rss_mib(broker.pid)
    # The audit's attack: 6,000 retained 16 KB messages on made-up subtopics of its prefix.
    junk = [f"coffer/v1/agents/vm-hog/junk/{n}" for n in range(6000)]
    async with raw_client(pki.agent("vm-hog"), broker) as hog:
        await flood(hog, junk, os.urandom(8000).hex().encode())
    # Within the size limit: made-up subtopics (refused) and its own progress topics, which
    # it may publish on but never retained (the controller clears them).
    payload = os.urandom((MAX_PAYLOAD_BYTES - 200) // 2).hex().encode()
    progress = [progress_topic("vm-hog", f"job-{n}") for n in range(3000)]
    async with raw_client(pki.agent("vm-hog"), broker) as hog:
        assert await flood(hog, junk[:3000], payload) == 3000
        assert await flood(hog, progress, payload) == 3000
    deadline = time.monotonic() + 20
    while kept := await retained(pki.operator, broker.host, broker.port, "coffer/#"):
        assert time.monotonic() < deadline, f"{len(kept)} retained, e.g. {sorted(kept)[:3]}"
    grown = rss_mib(broker.pid) - before
    assert grown < 16, f"Mosquitto grew by {grown:.1f} MiB"
    assert monitor.dropped[DropReason.RETAINED] >= 2999


# --- the controller's subscription keeps up ---------------------------------------------------


async def test_the_monitor_gets_every_retained_presence_of_a_large_fleet(
    pki: Pki, broker: PrivateBroker
) -> None:
    """A controller (re)starting beside a running fleet is sent every retained presence at once:
    more than Mosquitto's default queue (1,000 messages) held, so it dropped the rest."""
    fleet = 2500
    async with aiomqtt.Client(
        broker.host, broker.port, tls_context=mqtt_ssl_context(pki.controller), timeout=30
    ) as seeder:
        for n in range(fleet):
            presence = Presence(f"fleet-{n:05d}", PresenceState.ONLINE, "h", "1", TS)
            await seeder.publish(presence.topic, presence.to_json(), qos=1, retain=True)
    async with StatusMonitor(pki.controller) as monitor:
        monitor.set_broker(broker.host, broker.port)
        await eventually(lambda: len(monitor.presences()) >= fleet, within=30)
    log = broker.log_path.read_text(errors="replace")
    assert "Outgoing messages are being dropped" not in log


def test_the_production_example_and_the_private_broker_agree(tmp_path: Path) -> None:
    """deploy/mosquitto is what an operator installs; it must not drift from what we test."""

    def rules(text: str) -> set[str]:
        return {
            " ".join(line.split())
            for line in text.splitlines()
            if line.split()[:1] in (["user"], ["topic"], ["pattern"])
        }

    assert rules((DEPLOY / "acl").read_text()) == rules(acl_text())
    settings = {
        line.split()[0]: line.split()[1:]
        for line in (DEPLOY / "mosquitto.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    private = config_text(
        host="127.0.0.1",
        port=1,
        tls=TlsFiles.in_dir(tmp_path, "x"),
        acl_path=tmp_path / "acl",
        user="root",
    )
    for line in private.splitlines():
        key, *value = line.split() or [""]
        if key.startswith("max_") or key in (
            "memory_limit",
            "persistent_client_expiration",
            "persistence",
            "allow_anonymous",
            "require_certificate",
            "use_identity_as_username",
            "use_username_as_clientid",
        ):
            assert settings.get(key) == value, key
    assert int(settings["max_packet_size"][0]) == LIMITS.max_packet_size
