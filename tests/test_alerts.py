"""Alerts from a real controller: raised once per condition, resolved when it clears, and
delivered to a local HTTP receiver (with a retry), a local SMTP server (aiosmtpd) and MQTT
(retained, on a broker from deploy/mosquitto's example), visible with `coffer alerts`.

The conditions themselves (RPO, damaged recovery points, ...) are judged by a pure function,
tested here on its own with a fixed clock.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller as SmtpServer

from controller.alerts.conditions import (
    AgentView,
    ItemView,
    Kind,
    Limits,
    RestoreView,
    Snapshot,
    evaluate,
    rpo_breach,
)
from controller.broker import acl_text
from shared.model import ItemState, JobStatus
from shared.policy import parse_schedule
from shared.tls import TlsFiles
from tests.cluster import Cluster, free_port
from tests.test_mqtt_hostile import external_broker, retained

MiB = 1 << 20

# --- the conditions, judged alone ------------------------------------------------------------

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC).timestamp()
LIMITS = Limits(agent_offline=600, rpo_grace=3600)


def item(**fields: Any) -> ItemView:
    base: dict[str, Any] = {
        "vm_id": "web-1", "vault": "eu", "state": ItemState.PROTECTED, "name": "shop/web-1",
        "protected_at": NOW - 30 * 86400, "policy": "Gold",
        "schedule": parse_schedule("daily 02:00 tz=Europe/Berlin"),
    }  # fmt: skip
    return ItemView(**{**base, **fields})


def test_a_vm_is_late_once_a_slot_and_its_window_and_grace_passed_without_a_point() -> None:
    # Daily 02:00 Berlin = 01:00 UTC in March; window 1 h (default), grace 1 h: the slot of
    # today is late from 03:00 UTC on. A point from yesterday's slot is then too old.
    yesterday = datetime(2026, 3, 9, 1, 5, tzinfo=UTC).timestamp()
    today = datetime(2026, 3, 10, 1, 5, tzinfo=UTC).timestamp()
    late = rpo_breach(item(newest_recovery_point=yesterday), NOW, 3600)
    assert late is not None
    assert datetime.fromtimestamp(late[0], UTC) == datetime(2026, 3, 10, 1, 0, tzinfo=UTC)
    assert rpo_breach(item(newest_recovery_point=today), NOW, 3600) is None
    # At 02:30 UTC the window and grace of today's slot are still open: not late yet.
    early = datetime(2026, 3, 10, 2, 30, tzinfo=UTC).timestamp()
    assert rpo_breach(item(newest_recovery_point=yesterday), early, 3600) is None
    # Protected after today's slot: nothing was promised yet.
    assert rpo_breach(item(protected_at=today, newest_recovery_point=None), NOW, 3600) is None
    # Never backed up since protection began long ago: late.
    assert rpo_breach(item(newest_recovery_point=None), NOW, 3600) is not None
    # Stopped protection promises nothing.
    stopped = item(state=ItemState.PROTECTION_STOPPED, newest_recovery_point=None)
    assert rpo_breach(stopped, NOW, 3600) is None


def test_a_weekly_policy_is_late_only_after_its_week() -> None:
    weekly = parse_schedule("weekly sun 03:00")
    sunday = datetime(2026, 3, 8, 3, 10, tzinfo=UTC).timestamp()  # last Sunday's point
    assert rpo_breach(item(schedule=weekly, newest_recovery_point=sunday), NOW, 3600) is None
    a_week_before = sunday - 7 * 86400
    assert rpo_breach(item(schedule=weekly, newest_recovery_point=a_week_before), NOW, 0)


def test_one_condition_per_key_and_each_kind_says_what_it_found() -> None:
    snapshot = Snapshot(
        items=(
            item(
                last_backup_status=JobStatus.FAILED,
                error_code="UserErrorDiskReadFailed",
                error_message="cannot read /dev/vda",
                newest_recovery_point=NOW - 3600,
            ),
            item(vm_id="db-1", name="shop/db-1", newest_recovery_point=NOW - 5 * 86400),
        ),
        agents=(
            AgentView("web-1", "shop/web-1", online=False, last_seen=NOW - 601),
            AgentView("db-1", "shop/db-1", online=False, last_seen=NOW - 599),
            AgentView("app-1", "app-1", online=True, last_seen=NOW - 9999),
        ),
        restores=(
            RestoreView("web-1", "eu", "job1", JobStatus.FAILED, "DataCorrupted", "bad", NOW),
            RestoreView("db-1", "eu", "job2", JobStatus.COMPLETED, "", "", NOW),
        ),
        damaged={"eu": 2, "us": 0},
    )
    found = evaluate(snapshot, NOW, LIMITS)
    assert set(found) == {
        "backup-failed/web-1",
        "rpo-breached/db-1",
        "agent-offline/web-1",
        "restore-failed/web-1",
        "recovery-points-damaged/eu",
    }
    assert found["backup-failed/web-1"].kind is Kind.BACKUP_FAILED
    assert "UserErrorDiskReadFailed" in found["backup-failed/web-1"].summary
    assert found["restore-failed/web-1"].details["job_id"] == "job1"
    assert "2 recovery points of vault eu damaged" in found["recovery-points-damaged/eu"].summary
    assert "offline for 10 min" in found["agent-offline/web-1"].summary


# --- delivered by a real controller ----------------------------------------------------------


class Receiver:
    """A local HTTP endpoint recording the JSON it is sent; refuses the first N with 500."""

    def __init__(self, fail_first: int) -> None:
        self.received: list[dict[str, Any]] = []
        self.attempts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.attempts += 1
                if receiver.attempts <= fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                receiver.received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class Mailbox:
    """aiosmtpd's handler: every message delivered."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


def wait_for(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("alerts")
    disk = root / "disk.img"
    disk.write_bytes(os.urandom(8 * MiB))
    mailbox = Mailbox()
    smtp = SmtpServer(mailbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    mqtt_port = free_port()
    config = f"""
[alerts]
check_seconds = 1
agent_offline_seconds = 2

[[alerts.webhooks]]
url = "http://127.0.0.1:{{port}}/hook"
timeout = 5
max_attempts = 4

[alerts.email]
host = "127.0.0.1"
port = {smtp.port}
sender = "coffer@example.test"
to = ["ops@example.test"]
"""
    try:
        with Receiver(fail_first=1) as receiver:
            config = config.replace("{port}", str(receiver.port))
            mqtt = f"127.0.0.1:{mqtt_port}"
            # The broker of deploy/mosquitto's example, with `admin` as a status reader.
            with (
                Cluster(root / "cluster", config=config, mqtt=mqtt) as c,
                external_broker(root / "broker", c.pki, mqtt_port, ["admin"]),
            ):
                c.add_agent("vm-a", {"root": disk}, service="svc", region="alerts")
                c.protect("vm-a")
                c.controller.wait_for_line("status: connected to broker")
                yield {
                    "cluster": c,
                    "receiver": receiver,
                    "mailbox": mailbox,
                    "disk": disk,
                    "mqtt": mqtt_port,
                }
    finally:
        smtp.stop()


def mqtt_alerts(setup: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = asyncio.run(
        retained(
            TlsFiles.in_dir(setup["cluster"].pki, "operator"),
            "127.0.0.1",
            setup["mqtt"],
            "coffer/v1/alerts/+/+",
        )
    )
    return {topic: json.loads(payload) for topic, payload in found.items()}


def notices(setup: dict[str, Any], key: str, state: str) -> list[dict[str, Any]]:
    return [n for n in setup["receiver"].received if n["key"] == key and n["state"] == state]


def mails(setup: dict[str, Any], words: str) -> list[Any]:
    return [m for m in setup["mailbox"].messages if words in m["Subject"]]


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_failed_backup_raises_one_alert_everywhere_and_a_good_one_resolves_it(
    setup: dict[str, Any],
) -> None:
    cluster: Cluster = setup["cluster"]
    disk: Path = setup["disk"]
    assert cluster.backup("vm-a")["status"] == "Completed"
    hidden = disk.with_suffix(".away")
    shutil.move(disk, hidden)
    try:
        failed = cluster.coffer("backup-now", "vm-a", check=False, json_out=False)
        assert failed.returncode != 0
    finally:
        shutil.move(hidden, disk)
    key = "backup-failed/vm-a"
    firing = wait_for(lambda: [a for a in cluster.coffer("alerts") if a["key"] == key], "the alert")
    assert len(firing) == 1
    alert = firing[0]
    assert (alert["state"], alert["severity"], alert["item"]) == ("firing", "critical", "svc/vm-a")
    assert alert["details"]["error_code"]  # nested, not JSON text
    # The webhook refused the first attempt (HTTP 500): it was tried again and delivered.
    (notice,) = wait_for(lambda: notices(setup, key, "firing"), "the webhook")
    assert notice["summary"] == alert["summary"]
    assert notice["vm_id"] == "vm-a"
    assert setup["receiver"].attempts >= 2
    (mail,) = wait_for(lambda: mails(setup, "FIRING critical: backup-failed vm-a"), "the mail")
    assert mail["To"] == "ops@example.test"
    assert "svc/vm-a" in mail.get_payload()
    topic = "coffer/v1/alerts/backup-failed/vm-a"
    assert mqtt_alerts(setup)[topic]["state"] == "firing"

    # Checked every second: still one alert, one notice.
    time.sleep(2.5)
    assert len(notices(setup, key, "firing")) == 1

    assert cluster.backup("vm-a")["status"] == "Completed"
    wait_for(lambda: not [a for a in cluster.coffer("alerts") if a["key"] == key], "resolution")
    resolved = [a for a in cluster.coffer("alerts", "--all") if a["key"] == key]
    assert resolved[0]["state"] == "resolved"
    assert resolved[0]["resolved_at"]
    wait_for(lambda: notices(setup, key, "resolved"), "the resolved notice")
    wait_for(lambda: mails(setup, "RESOLVED critical: backup-failed vm-a"), "the resolved mail")
    assert mqtt_alerts(setup)[topic]["state"] == "resolved"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_an_agent_offline_too_long_raises_an_alert_until_it_is_back(
    setup: dict[str, Any],
) -> None:
    cluster: Cluster = setup["cluster"]
    key = "agent-offline/vm-a"
    cluster.agents["vm-a"].process.stop()
    try:
        alert = wait_for(
            lambda: [a for a in cluster.coffer("alerts") if a["key"] == key], "the alert"
        )[0]
        assert alert["severity"] == "warning"
        assert "offline" in alert["summary"]
        wait_for(lambda: notices(setup, key, "firing"), "the webhook")
    finally:
        cluster.start_agent("vm-a")
    wait_for(lambda: notices(setup, key, "resolved"), "the resolved notice")
    assert not [a for a in cluster.coffer("alerts") if a["key"] == key]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_failed_restore_raises_an_alert_and_a_restore_that_works_resolves_it(
    setup: dict[str, Any],
) -> None:
    cluster: Cluster = setup["cluster"]
    key = "restore-failed/vm-a"
    rp = cluster.coffer("rp", "list", "vm-a")[-1]["id"]
    # Outside the agent's restore_dirs: the agent refuses it, and the job fails.
    failed = cluster.coffer(
        "restore", "vm-a", "--rp", rp, "--disk", "root", "--target", "/etc/coffer-alert.img",
        check=False,
    )  # fmt: skip
    assert failed["error_code"] == "UserErrorRestorePathNotAllowed", failed
    wait_for(lambda: [a for a in cluster.coffer("alerts") if a["key"] == key], "the alert")
    fresh = cluster.agents["vm-a"].restore_dir / f"fresh-{time.time_ns()}.img"
    assert cluster.restore("vm-a", rp, "root", fresh)["status"] == "Completed"
    wait_for(lambda: not [a for a in cluster.coffer("alerts") if a["key"] == key], "resolution")


def test_an_agent_may_not_publish_alerts() -> None:
    """The broker's ACL gives alert topics to the controller (write) and readers (read)
    only; agents' patterns name their own two topics."""
    acl = acl_text(["dashboard"])
    agent_rules = [line for line in acl.splitlines() if line.startswith("pattern")]
    assert agent_rules
    assert not any("alerts" in line for line in agent_rules)
    assert "topic read coffer/v1/alerts/+/+" in acl
