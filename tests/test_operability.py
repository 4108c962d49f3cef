"""Running Coffer as a service: versions, logs, units, completion, rules, errors for scripts.

`--version` on every binary; a job's start and end as one log line each, as text or JSON;
the systemd units in deploy/ (checked by `systemd-analyze verify` where it exists, and for
the directives a backup agent needs); click's shell completion; the example Prometheus rules
(by `promtool` where it exists, else as YAML of the documented shape); and a refused call or
a bad command line under `--json` as JSON on stderr, with the code, message and exit status.
"""

from __future__ import annotations

import configparser
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.catalog import JobRecord
from controller.jobs import journal
from shared.logs import JsonFormatter
from shared.model import JobStatus, Operation
from shared.version import coffer_version
from tests.cluster import BIN

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("binary", ["coffer", "coffer-controller", "coffer-agent"])
def test_every_binary_says_its_version(binary: str) -> None:
    done = subprocess.run([str(BIN / binary), "--version"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{binary} {coffer_version()}"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "coffer"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_errors_under_json_are_json_on_stderr(tmp_path: Path) -> None:
    assert _cli("pki", "init", "--dir", str(tmp_path / "pki")).returncode == 0
    # Nothing listens on port 1: Unavailable, exit 8.
    args = ["--controller", "127.0.0.1:1", "--tls-dir", str(tmp_path / "pki"), "--timeout", "3"]
    refused = _cli(*args, "vault", "list", "--json")
    assert refused.returncode == 8
    assert refused.stdout == ""
    error = json.loads(refused.stderr)["error"]
    assert error["code"] == "ServiceUnavailable"
    assert error["exit_status"] == 8
    assert "127.0.0.1:1" in error["message"]
    # A bad command line too (exit 2), even when --json comes after what was wrong.
    usage = _cli(*args, "job", "list", "--status", "Sleeping", "--json")
    assert usage.returncode == 2
    assert json.loads(usage.stderr)["error"]["code"] == "UsageError"
    # Without --json, a line for people.
    plain = _cli(*args, "vault", "list")
    assert plain.returncode == 8
    assert plain.stderr.startswith("error (ServiceUnavailable):")


def test_shell_completion_comes_from_click() -> None:
    script = _cli(env={"_COFFER_COMPLETE": "bash_source"})
    assert script.returncode == 0
    assert "complete -o nosort -F _coffer_completion coffer" in script.stdout
    words = _cli(env={"_COFFER_COMPLETE": "bash_complete", "COMP_WORDS": "coffer jo",
                      "COMP_CWORD": "1"})  # fmt: skip
    assert "plain,job" in words.stdout.split()


def _job(**fields: Any) -> JobRecord:
    base: dict[str, Any] = {
        "id": "3f2a9c1e5d7b", "operation": Operation.BACKUP, "status": JobStatus.FAILED,
        "vault": "eu", "vm_id": "web-1", "started_at": 1000.0, "ended_at": 1012.5,
        "bytes_read": 4096, "error_code": "UserErrorFsFreezeFailed",
        "error_message": "could not freeze /data", "requested_by": "alice",
    }  # fmt: skip
    return JobRecord(**{**base, **fields})


def test_a_job_leaves_one_line_when_it_starts_and_one_saying_why_it_ended(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="coffer.jobs")
    journal.started(_job(status=JobStatus.IN_PROGRESS, ended_at=None))
    journal.ended(_job())
    started, ended = (r.getMessage() for r in caplog.records)
    assert started == (
        "job 3f2a9c1e5d7b: Backup of VM web-1 in vault eu (manual, requested by alice) started"
    )
    assert "ended Failed after 12.5 s" in ended
    assert ended.endswith("UserErrorFsFreezeFailed: could not freeze /data")
    line = json.loads(JsonFormatter().format(caplog.records[1]))
    assert line["level"] == "WARNING"
    assert line["logger"] == "coffer.jobs"
    assert line["job"]["error_code"] == "UserErrorFsFreezeFailed"
    assert line["job"]["seconds"] == 12.5
    assert line["job"]["requested_by"] == "alice"


def test_the_daemons_log_json_when_asked(tmp_path: Path) -> None:
    bad = tmp_path / "controller.toml"
    bad.write_text('state_dir = "s"\npki_dir = "p"\nlisten = "nowhere"\n')
    done = subprocess.run(
        [str(BIN / "coffer-controller"), "--config", str(bad), "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2  # a bad config: refused before anything starts
    assert "'listen'" in done.stderr


def _unit(name: str) -> configparser.RawConfigParser:
    unit = configparser.RawConfigParser(strict=False, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "systemd" / name)
    return unit


@pytest.mark.parametrize("name", ["coffer-controller.service", "coffer-agent.service"])
def test_the_systemd_units_are_valid(name: str, tmp_path: Path) -> None:
    unit = _unit(name)
    service = unit["Service"]
    assert int(service["LimitNOFILE"]) >= 65536
    assert "--config" in service["ExecStart"]
    assert service["NoNewPrivileges"] == "yes"
    if shutil.which("systemd-analyze") is None:
        return
    # Verified as installed: the ExecStart binary where this venv has it.
    text = (DEPLOY / "systemd" / name).read_text()
    binary = name.removesuffix(".service")
    installed = tmp_path / name
    installed.write_text(text.replace(f"/usr/local/bin/{binary}", str(BIN / binary)))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(installed)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    problems = [line for line in done.stderr.splitlines() if "Unknown" in line or "Invalid" in line]
    assert done.returncode == 0, done.stderr
    assert not problems, done.stderr


def test_the_agents_unit_still_lets_it_freeze_and_recover_files() -> None:
    service = _unit("coffer-agent.service")["Service"]
    assert "CAP_SYS_ADMIN" in service["CapabilityBoundingSet"]  # FIFREEZE, mounts, loop devices
    text = (DEPLOY / "systemd" / "coffer-agent.service").read_text()
    for device in ("DeviceAllow=block-* rw", "DeviceAllow=/dev/fuse rw"):
        assert device in text
    # A private mount namespace would hide `coffer files mount` from the VM's operators.
    for hiding in ("ProtectSystem=", "PrivateTmp=", "ProtectHome=", "PrivateDevices="):
        assert hiding not in text.replace("# ", "#"), hiding


def test_the_example_alert_rules() -> None:
    path = DEPLOY / "prometheus" / "coffer-alerts.yml"
    if shutil.which("promtool"):
        done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True)
        assert done.returncode == 0, done.stderr
    rules = {
        rule["alert"]: rule
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    }
    assert {"CofferRpoBreached", "CofferBackupsFailing", "CofferAgentOffline"} <= set(rules)
    for name, rule in rules.items():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"], name
    # They name metrics the controller exports.
    exported = (ROOT / "controller" / "metrics.py").read_text()
    for metric in (
        "coffer_recovery_point_age_seconds",
        "coffer_jobs_total",
        "coffer_agents_online",
    ):
        assert metric in exported
        assert any(metric in rule["expr"] for rule in rules.values())
