"""One identity, one agent: a second agent process with a VM's certificate, and the first's return.

Real processes throughout: a controller with its private Mosquitto, two `coffer-agent`
processes with the same certificate and VM id (as on a cloned VM), the CLI and the doctor.
The sequence is the one users met: agent A runs, agent B connects with A's certificate, runs
about 6 s and stops. A must say loudly that it was displaced, the two must not knock each other
off the broker meanwhile, the operator must see a DuplicateAgent warning on the VM, and A must
have the session again within seconds of B stopping.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.cluster import BIN, Cluster, Process

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

T = TypeVar("T")
VM = "clone-1"
# How long B runs beside A, as in the report.
OVERLAP_SECONDS = 6.0
# Mosquitto's line when a client connects with the id of one already connected.
TAKEOVER = re.compile(r"Client \S+ already connected, closing old connection")


def doctor(config: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    result = subprocess.run(
        [str(BIN / "coffer-agent"), "doctor", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, {f["check"]: f for f in json.loads(result.stdout)}


def takeovers(cluster: Cluster) -> int:
    log = cluster.root / "state" / "broker" / "mosquitto.log"
    return len(TAKEOVER.findall(log.read_text(errors="replace")))


def eventually(probe: Callable[[], T], within: float = 10.0) -> T:
    """The first truthy value of `probe`, polled; fails the test after `within` s."""
    deadline = time.monotonic() + within
    while not (value := probe()):
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within} s")
        time.sleep(0.1)
    return value


def agent_listed(cluster: Cluster) -> dict[str, Any]:
    listed: dict[str, Any] = {a["vm_id"]: a for a in cluster.coffer("agents")}[VM]
    return listed


def test_a_displaced_agent_says_so_steps_aside_and_returns_when_the_other_stops(
    tmp_path: Path,
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\1" * (1 << 20))
    with Cluster(tmp_path / "cluster") as cluster:
        a = cluster.add_agent(VM, {"root": disk})
        a.process.wait_for_line("status: connected to broker")
        # B: the same certificate and VM id, its own state (a clone of A's VM).
        b_config = tmp_path / "agent-b.toml"
        b_config.write_text(
            a.config.read_text().replace(
                str(cluster.root / f"state-{VM}"), str(tmp_path / "state-b")
            )
        )
        b = Process("agent B", [str(BIN / "coffer-agent"), "--config", str(b_config)],
                    tmp_path / "agent-b.log")  # fmt: skip
        before = takeovers(cluster)
        b.start()
        try:
            # A hears why its session ended, names who took it, and says it waits.
            displaced = a.process.wait_for_line("DuplicateAgent", timeout=20)
            assert "took over its session" in displaced
            assert f"host {socket.gethostname()!r}" in displaced
            a.process.wait_for_line("waits for its session to end")
            b.wait_for_line("connected to controller")

            # The operator sees it on the VM (once A is back as a standby), and so does the
            # doctor in A's VM.
            [warning] = eventually(lambda: agent_listed(cluster)["warnings"])
            assert warning["code"] == "DuplicateAgent"
            assert "waiting" in warning["message"]
            code, findings = doctor(a.config)
            assert code == 1
            assert findings["one agent per VM"]["verdict"] == "fail"
            assert "DuplicateAgent" in findings["one agent per VM"]["found"]

            time.sleep(OVERLAP_SECONDS)
            # Meanwhile they did not take turns knocking each other off the broker (with one
            # client id, each connect closes the other's: every 200 ms before).
            assert takeovers(cluster) - before <= 3
            assert agent_listed(cluster)["online"]
        finally:
            assert b.stop() == 0

        stopped = time.monotonic()
        cluster.wait_online(VM, timeout=10)
        # `online` never dropped for long: A took the VM's session within seconds.
        a.process.wait_for_line("this agent has the session again", timeout=10)
        assert time.monotonic() - stopped < 10
        assert agent_listed(cluster)["online"]
        # Still worth a warning for a while, now as something that happened.
        [warning] = agent_listed(cluster)["warnings"]
        assert warning["code"] == "DuplicateAgent"
        assert "last at" in warning["message"]
        code, findings = doctor(a.config)
        assert findings["one agent per VM"]["verdict"] == "warn"

        # A is the VM's agent again for real: a backup runs through it.
        job = cluster.backup(VM)
        assert job["status"] == "Completed", job
