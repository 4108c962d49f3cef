"""Prometheus metrics: what the controller does, for graphs and alert rules.

Served by `[metrics] listen` (a plain HTTP listener on a loopback address, off by default;
docs/decisions.md says why) at `/metrics`, from the official `prometheus_client` library with
a registry of our own. Names (all `coffer_`):

- `coffer_jobs_total{operation,outcome}`: jobs that ended (outcome: the job's status);
- `coffer_job_duration_seconds{operation}`: how long they took (histogram);
- `coffer_job_bytes_read_total`, `..._sent_total`, `..._stored_total` `{operation}`: bytes of
  ended jobs plus the running ones' so far, so a scrape during a backup sees them move (stored
  as chunks arrive; read and sent as the agent reports them, at the end of a backup);
- `coffer_jobs_in_progress{operation}`;
- `coffer_agents_online`, `coffer_agents_enrolled`;
- `coffer_datastore_stored_bytes{vault}`, `coffer_datastore_protected_bytes{vault}`,
  `coffer_datastore_dedup_ratio{vault}`, `coffer_recovery_points{vault}`;
- `coffer_recovery_point_age_seconds{vault,vm_id,item}`: the age of each protected VM's latest
  recovery point (what an RPO rule compares with its policy);
- `coffer_items{vault,state}`;
- `coffer_scheduler_lag_seconds`: how late the scheduler started its latest slot;
- `coffer_alerts_firing{kind}`;
- `coffer_build_info{version}`;
- the process's own figures (`process_*`: CPU, memory, open descriptors, start time) and the
  interpreter's (`python_*`).

Counters of ended jobs start at zero with the process (Prometheus's `rate` and `increase`
handle the reset). Catalog figures are read once per scrape (`refresh`), before the
synchronous collection runs; a scrape costs a few small queries per vault.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from controller.alerts import AlertKeeper
from controller.catalog import Catalog, JobRecord
from controller.jobs import JobManager
from controller.protection import Protection, display_name
from controller.registry import AgentRegistry
from shared.address import parse_address
from shared.clock import Clock
from shared.errors import Unavailable
from shared.model import ItemState
from shared.version import coffer_version

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
# From a quick prune to a day-long first backup of a large disk.
DURATION_BUCKETS: Final = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 7200, 21600, 86400)


@dataclass
class _Figures:
    """What the catalog said at the last refresh."""

    stored: dict[str, int] = field(default_factory=dict)
    protected: dict[str, int] = field(default_factory=dict)
    points: dict[str, int] = field(default_factory=dict)
    ages: list[tuple[str, str, str, float]] = field(default_factory=list)
    items: dict[tuple[str, str], int] = field(default_factory=dict)
    enrolled: int = 0


class Metrics:
    """The controller's metrics registry and what fills it."""

    def __init__(
        self,
        catalog: Catalog,
        registry: AgentRegistry,
        jobs: JobManager,
        protection: Protection,
        clock: Clock,
        alerts: AlertKeeper | None = None,
    ) -> None:
        self._catalog = catalog
        self._agents = registry
        self._jobs = jobs
        self._protection = protection
        self._clock = clock
        self._alerts = alerts
        self._figures = _Figures()
        # Bytes of jobs that ended, by operation: read, sent, stored.
        self._ended_bytes: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._jobs_total = Counter(
            "coffer_jobs",
            "Jobs that ended, by operation and outcome (the job's status).",
            ("operation", "outcome"),
            registry=self.registry,
        )
        self._durations = Histogram(
            "coffer_job_duration_seconds",
            "How long jobs took, start to end.",
            ("operation",),
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Live(self))

    def job_ended(self, job: JobRecord) -> None:
        """Count a job that ended (the job runner's observer)."""
        operation = str(job.operation)
        self._jobs_total.labels(operation, str(job.status)).inc()
        if job.ended_at is not None:
            self._durations.labels(operation).observe(max(job.ended_at - job.started_at, 0.0))
        done = self._ended_bytes[operation]
        done[0] += job.bytes_read
        done[1] += job.bytes_sent
        done[2] += job.bytes_stored

    async def refresh(self) -> None:
        """Read what the catalog knows (before each scrape)."""
        catalog = self._catalog
        figures = _Figures()
        agents = {a.vm_id: a for a in await catalog.agents()}
        figures.enrolled = len(agents)
        now = self._clock.now()
        items = await catalog.items()
        for item in items:
            key = (item.vault, str(item.state))
            figures.items[key] = figures.items.get(key, 0) + 1
        for vault in await catalog.vaults():
            points, protected = await catalog.recovery_point_totals(vault.name)
            figures.stored[vault.name] = vault.stored_bytes
            figures.protected[vault.name] = protected
            figures.points[vault.name] = points
            newest = await catalog.recovery_point_summary(vault.name)
            for item in items:
                if item.vault != vault.name or not ItemState(item.state).protected:
                    continue
                if item.vm_id in newest:
                    age = max(now - newest[item.vm_id][1], 0.0)
                    name = display_name(agents.get(item.vm_id), item.vm_id)
                    figures.ages.append((vault.name, item.vm_id, name, age))
        self._figures = figures

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live(Collector):
    """What is read at scrape time: running jobs, agents, the catalog's last refresh."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        running = m._jobs.running_jobs()
        totals: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for operation, counts in m._ended_bytes.items():
            totals[operation] = list(counts)
        in_progress: defaultdict[str, int] = defaultdict(int)
        for job in running:
            operation = str(job.operation)
            in_progress[operation] += 1
            live = totals[operation]
            live[0] += job.bytes_read
            live[1] += job.bytes_sent
            live[2] += job.bytes_stored
        for n, what in enumerate(("read", "sent", "stored")):
            counter = CounterMetricFamily(
                f"coffer_job_bytes_{what}",
                f"Bytes jobs {what}: those that ended and the running ones' so far.",
                labels=("operation",),
            )
            for operation, counts in sorted(totals.items()):
                counter.add_metric((operation,), counts[n])
            yield counter
        family = GaugeMetricFamily(
            "coffer_jobs_in_progress", "Jobs running or queued now.", labels=("operation",)
        )
        for operation, count in sorted(in_progress.items()):
            family.add_metric((operation,), count)
        yield family
        yield GaugeMetricFamily(
            "coffer_agents_online",
            "VMs whose agent has a session with the controller now.",
            value=m._agents.online_count(),
        )
        figures = m._figures
        yield GaugeMetricFamily(
            "coffer_agents_enrolled", "VMs whose agent has enrolled.", value=figures.enrolled
        )
        per_vault = (
            ("coffer_datastore_stored_bytes", "Chunk bytes in the vault's datastore "
             "(compressed, deduplicated).", figures.stored),
            ("coffer_datastore_protected_bytes", "Data bytes the vault's recovery points "
             "would restore.", figures.protected),
            ("coffer_recovery_points", "Recovery points in the vault.", figures.points),
        )  # fmt: skip
        for name, text, values in per_vault:
            family = GaugeMetricFamily(name, text, labels=("vault",))
            for vault, value in sorted(values.items()):
                family.add_metric((vault,), value)
            yield family
        family = GaugeMetricFamily(
            "coffer_datastore_dedup_ratio",
            "Protected bytes per stored byte (0 while nothing is stored).",
            labels=("vault",),
        )
        for vault, stored in sorted(figures.stored.items()):
            family.add_metric((vault,), figures.protected.get(vault, 0) / stored if stored else 0)
        yield family
        family = GaugeMetricFamily(
            "coffer_recovery_point_age_seconds",
            "Age of each protected VM's latest recovery point.",
            labels=("vault", "vm_id", "item"),
        )
        for vault, vm_id, item, age in figures.ages:
            family.add_metric((vault, vm_id, item), age)
        yield family
        family = GaugeMetricFamily(
            "coffer_items", "Registered items by protection state.", labels=("vault", "state")
        )
        for (vault, state), count in sorted(figures.items.items()):
            family.add_metric((vault, state), count)
        yield family
        yield GaugeMetricFamily(
            "coffer_scheduler_lag_seconds",
            "How late the scheduler started its latest slot.",
            value=m._protection.scheduler.lag,
        )
        family = GaugeMetricFamily(
            "coffer_alerts_firing", "Alerts firing, by kind.", labels=("kind",)
        )
        if m._alerts is not None:
            for kind, count in sorted(m._alerts.firing_by_kind.items()):
                family.add_metric((kind,), count)
        yield family
        info = GaugeMetricFamily(
            "coffer_build_info", "The running controller's version.", labels=("version",)
        )
        info.add_metric((coffer_version(),), 1)
        yield info


class MetricsEndpoint:
    """`GET /metrics` on a plain HTTP listener; an async context manager."""

    def __init__(self, metrics: Metrics, listen: str) -> None:
        self._metrics = metrics
        self._listen = listen
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _scrape(self, request: web.Request) -> web.Response:
        await self._metrics.refresh()
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def __aenter__(self) -> MetricsEndpoint:
        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        address = parse_address(self._listen, allow_port_zero=True)
        site = web.TCPSite(runner, address.host, address.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise Unavailable(
                f"cannot listen on {self._listen} for metrics: {exc.strerror or exc} "
                "(`listen` in [metrics] of the controller config)"
            ) from exc
        self._runner = runner
        sockets = getattr(site._server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else address.port
        log.info("metrics on http://%s:%d/metrics", address.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
