"""The Prometheus endpoint of a real controller, scraped while a real backup runs.

Values move during the backup (bytes stored, a backup in progress), the job is counted by
outcome with its duration when it ends, and the gauges an alert rule needs are there: agents
online, datastore bytes and deduplication, the age of the VM's latest recovery point,
scheduler lag, the process's own figures. The listener takes loopback addresses only.
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.config import ControllerFile
from shared.config import validate
from shared.errors import ConfigInvalid
from tests.cluster import Cluster, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MiB = 1 << 20

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, int]]:
    root = tmp_path_factory.mktemp("metrics")
    disk = root / "disk.img"
    with disk.open("wb") as f:
        for _ in range(384):
            f.write(os.urandom(MiB))
    port = free_port()
    with Cluster(root / "cluster", config=f'[metrics]\nlisten = "127.0.0.1:{port}"\n') as running:
        running.add_agent("vm-m", {"root": disk}, service="svc", region="metrics")
        running.protect("vm-m")
        yield running, port


def test_a_scrape_during_a_backup_sees_it_move(cluster: tuple[Cluster, int]) -> None:
    running, port = cluster
    before = scrape(port)
    assert value(before, "coffer_agents_online") == 1
    assert value(before, "coffer_jobs_total", operation="Backup", outcome="Completed") is None
    (job,) = running.coffer("backup-now", "vm-m", "--no-wait")
    seen_running: list[float] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = scrape(port)
        if value(now, "coffer_jobs_in_progress", operation="Backup") == 1:
            # The agent reports what it read and sent at the end; what the controller stored
            # is counted as it arrives.
            stored = value(now, "coffer_job_bytes_stored_total", operation="Backup")
            seen_running.append(stored or 0.0)
        if value(now, "coffer_jobs_total", operation="Backup", outcome="Completed") == 1:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the backup did not end")
    assert seen_running, "no scrape caught the backup running"
    assert seen_running[-1] > 0, f"bytes stored never moved while it ran: {seen_running}"
    after = scrape(port)
    shown = running.coffer("job", "show", job["id"])
    assert value(after, "coffer_job_bytes_read_total", operation="Backup") == shown["bytes_read"]
    assert (
        value(after, "coffer_job_bytes_stored_total", operation="Backup") == shown["bytes_stored"]
    )
    assert value(after, "coffer_job_duration_seconds_count", operation="Backup") == 1
    assert value(after, "coffer_jobs_in_progress", operation="Backup") is None
    assert (value(after, "coffer_datastore_stored_bytes", vault="metrics") or 0) > 300 * MiB
    assert value(after, "coffer_datastore_dedup_ratio", vault="metrics") == pytest.approx(1, 0.01)
    age = value(
        after, "coffer_recovery_point_age_seconds", vault="metrics", vm_id="vm-m", item="svc/vm-m"
    )
    assert age is not None
    assert 0 <= age < 60
    assert value(after, "coffer_items", vault="metrics", state="Protected") == 1
    assert value(after, "coffer_scheduler_lag_seconds") is not None
    assert (value(after, "process_resident_memory_bytes") or 0) > 10 * MiB
    assert (value(after, "process_open_fds") or 0) > 0
    # A prune follows every backup; it is counted too.
    time.sleep(0.5)
    assert value(scrape(port), "coffer_jobs_total", operation="Prune", outcome="Completed") == 1


def test_the_metrics_listener_takes_loopback_addresses_only(tmp_path: Path) -> None:
    raw = {"state_dir": "s", "pki_dir": "p", "metrics": {"listen": "0.0.0.0:9464"}}
    with pytest.raises(ConfigInvalid, match="not a loopback address"):
        validate(ControllerFile, raw, "controller config")
    for listen in ("127.0.0.1:9464", "[::1]:9464", "localhost:0"):
        validate(ControllerFile, {**raw, "metrics": {"listen": listen}}, "controller config")
