"""`coffer-agent doctor` against a real controller, broker and disk: what it finds and says."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bench.image import build_image, mounted
from tests.cluster import BIN, Cluster

MiB = 1 << 20

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("doctor")
    image = build_image(root / "vm.img", 64 * MiB, fill=0.3, seed=5).path
    with Cluster(root / "cluster") as running:
        running.add_agent("doc-1", {"root": image}, service="shop", region="eu")
        yield running


def doctor(cluster: Cluster, vm: str) -> tuple[int, dict[str, list[dict[str, Any]]]]:
    result = subprocess.run(
        [str(BIN / "coffer-agent"), "doctor", "--config", str(cluster.agents[vm].config),
         "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    findings: dict[str, list[dict[str, Any]]] = {}
    for finding in json.loads(result.stdout):
        findings.setdefault(finding["check"], []).append(finding)
    return result.returncode, findings


def verdicts(findings: dict[str, list[dict[str, Any]]], check: str) -> list[str]:
    return [f["verdict"] for f in findings[check]]


def test_a_healthy_vm_not_yet_protected(cluster: Cluster) -> None:
    code, findings = doctor(cluster, "doc-1")
    assert code == 0, findings
    for check in (
        "config", "identity", "controller", "clock", "broker", "privileges", "thaw watchdog",
        "disk root", "state directory",
    ):  # fmt: skip
        assert verdicts(findings, check) == ["ok"], findings[check]
    # Nothing mounted from the image here: nothing to freeze.
    assert "nothing to flush or freeze" in findings["disk root: freeze"][0]["found"]
    # The image sits on ext4 (no reflink): the last resort, and how to do better.
    snapshot = findings["disk root: snapshot"][0]
    assert snapshot["verdict"] == "warn"
    assert snapshot["found"].startswith("read-while-frozen")
    assert "reflink" in snapshot["fix"]
    protection = findings["protection"][0]
    assert protection["verdict"] == "warn"
    assert "not registered" in protection["found"]
    assert "coffer register" in protection["fix"]


def test_a_mounted_file_system_can_be_frozen_and_protection_is_reported(
    cluster: Cluster,
) -> None:
    cluster.protect("doc-1")
    with mounted(cluster.agents["doc-1"].disks["root"]) as root:
        code, findings = doctor(cluster, "doc-1")
    assert code == 0
    (freeze,) = findings["disk root: freeze"]
    assert freeze["verdict"] == "ok"
    assert f"{root} (ext4) can be frozen" == freeze["found"]
    protection = findings["protection"][0]
    assert protection["verdict"] == "ok"
    assert "Protected (pending initial backup)" in protection["found"]
    assert "DefaultPolicy" in protection["found"]


def test_an_unreachable_controller_fails_with_what_to_fix(cluster: Cluster, tmp_path: Path) -> None:
    cluster.stop_controller()
    try:
        code, findings = doctor(cluster, "doc-1")
    finally:
        cluster.start_controller()
    assert code == 1
    controller = findings["controller"][0]
    assert controller["verdict"] == "fail"
    assert "UNAVAILABLE" in controller["found"]
    assert "coffer-controller runs" in controller["fix"]
    # The checks that need no controller still ran.
    assert verdicts(findings, "disk root") == ["ok"]
