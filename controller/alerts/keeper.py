"""The alert keeper: checks the conditions, raises and resolves alerts, and tells everyone.

A supervised loop (RESTART) checks every `check_seconds`, and at once when a job ends (the job
runner tells it), what holds now (`conditions.evaluate` over a snapshot of the catalog and the
agent registry), and compares it with the alerts firing in the catalog:

- a condition with no firing alert raises one: a catalog row, its state retained on MQTT at
  `coffer/v1/alerts/KIND/SUBJECT` (docs/mqtt.md), a notice to every webhook and the mail
  server (delivery.py) and a log line;
- a firing alert whose condition no longer holds is resolved the same ways.

The catalog row is written first: what was told is always what is recorded. A controller that
restarts publishes its firing alerts again (the broker may have lost them) and raises nothing
twice. An agent is not held responsible for time the controller was down: its offline time
counts from the later of its last heartbeat and this controller's start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from datetime import UTC, datetime
from typing import Any, Final

from controller.alerts.conditions import (
    AgentView,
    Condition,
    ItemView,
    Limits,
    RestoreView,
    Snapshot,
    evaluate,
)
from controller.alerts.delivery import Delivery, Notice
from controller.catalog import AlertRecord, Catalog, JobFilter, JobRecord
from controller.config import AlertSettings
from controller.protection import display_name
from controller.registry import AgentRegistry
from controller.status import StatusMonitor
from shared.clock import Clock
from shared.errors import Conflict
from shared.model import JobStatus, Operation, Verification
from shared.policy import Policy
from shared.status import AlertStatus

log = logging.getLogger(__name__)

FIRING: Final = "firing"
RESOLVED: Final = "resolved"
# How far back the latest restore of each VM is looked for.
RESTORE_LOOKBACK_SECONDS: Final = 7 * 86400.0
# Jobs whose end makes a check worth doing at once.
# (A drill that meets damage marks its recovery point damaged, as a verify does.)
_WAKING = frozenset(
    {Operation.BACKUP, Operation.RESTORE, Operation.VERIFY, Operation.RESTORE_DRILL}
)


def state_of(alert: AlertRecord) -> str:
    return FIRING if alert.firing else RESOLVED


class AlertKeeper:
    def __init__(
        self,
        catalog: Catalog,
        registry: AgentRegistry,
        status: StatusMonitor | None,
        clock: Clock,
        settings: AlertSettings,
        delivery: Delivery | None = None,
    ) -> None:
        self._catalog = catalog
        self._registry = registry
        self._status = status
        self._clock = clock
        self._settings = settings
        self._delivery = delivery
        self._limits = Limits(settings.agent_offline_seconds, settings.rpo_grace_seconds)
        self._started = clock.now()
        self._wake = asyncio.Event()
        self._names: dict[str, str] = {}
        self.firing_by_kind: Counter[str] = Counter()
        self.checks = 0

    def job_ended(self, job: JobRecord) -> None:
        """A job ended (the runner's observer): check now if it can change a condition."""
        if job.operation in _WAKING:
            self._wake.set()

    async def run(self) -> None:
        """Check now, then on every wake and every `check_seconds`, until cancelled."""
        for alert in await self._catalog.alerts():
            self._publish(alert)
        while True:
            self._wake.clear()
            await self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.check_seconds)

    async def check(self) -> None:
        """Raise what holds and is not firing; resolve what fires and no longer holds."""
        now = self._clock.now()
        holding = evaluate(await self.snapshot(now), now, self._limits)
        firing = {alert.key: alert for alert in await self._catalog.alerts(limit=1_000_000)}
        for key, condition in holding.items():
            if key not in firing:
                await self._raise(condition, now)
        for key, alert in firing.items():
            if key not in holding:
                await self._resolve(alert, now)
        self.firing_by_kind = Counter(c.kind.value for c in holding.values())
        self.checks += 1

    async def snapshot(self, now: float) -> Snapshot:
        """What the conditions are judged on, read now."""
        catalog = self._catalog
        agents = {a.vm_id: a for a in await catalog.agents()}
        self._names = {vm_id: display_name(a, vm_id) for vm_id, a in agents.items()}
        schedules = {
            (p.vault, p.name): Policy.from_dict(p.spec).schedule for p in await catalog.policies()
        }
        newest: dict[str, float] = {}
        damaged: dict[str, int] = {}
        for vault in await catalog.vaults():
            for vm_id, (_, latest) in (await catalog.recovery_point_summary(vault.name)).items():
                newest[vm_id] = latest
            counts = await catalog.verification_counts(vault.name)
            damaged[vault.name] = counts.get(Verification.DAMAGED, 0)
        items = tuple(
            ItemView(
                vm_id=item.vm_id,
                vault=item.vault,
                state=item.state,
                name=self._names.get(item.vm_id, item.vm_id),
                last_backup_status=item.last_backup_status,
                error_code=item.error_code,
                error_message=item.error_message,
                last_backup_at=item.last_backup_at,
                protected_at=item.protected_at,
                schedule=schedules.get((item.vault, item.policy)) if item.policy else None,
                policy=item.policy or "",
                newest_recovery_point=newest.get(item.vm_id),
            )
            for item in await catalog.items()
        )
        latest_restores: dict[str, JobRecord] = {}
        restores = await catalog.jobs(
            JobFilter(
                operations=[Operation.RESTORE],
                started_from=now - RESTORE_LOOKBACK_SECONDS,
                limit=100_000,
            )
        )
        for job in sorted(restores, key=lambda j: j.started_at):
            if JobStatus(job.status).ended and job.vm_id:
                latest_restores[job.vm_id] = job
        return Snapshot(
            items=items,
            agents=tuple(
                AgentView(
                    vm_id=a.vm_id,
                    name=self._names[a.vm_id],
                    online=self._registry.online(a.vm_id),
                    last_seen=max(a.last_seen, self._started),
                )
                for a in agents.values()
            ),
            restores=tuple(
                RestoreView(
                    vm_id=job.vm_id,
                    vault=job.vault,
                    job_id=job.id,
                    status=JobStatus(job.status),
                    error_code=job.error_code,
                    error_message=job.error_message,
                    ended_at=job.ended_at,
                )
                for job in latest_restores.values()
            ),
            damaged=damaged,
        )

    async def _raise(self, condition: Condition, now: float) -> None:
        try:
            alert = await self._catalog.raise_alert(
                AlertRecord(
                    key=condition.key,
                    kind=condition.kind.value,
                    severity=condition.severity.value,
                    summary=condition.summary,
                    raised_at=now,
                    vault=condition.vault,
                    vm_id=condition.vm_id,
                    details=dict(condition.details),
                )
            )
        except Conflict:  # raised meanwhile (two checks at once cannot happen; be safe)
            return
        log.warning(
            "alert %s raised (%s): %s", alert.key, alert.severity, alert.summary,
            extra={"alert": self.document(alert)},
        )  # fmt: skip
        self._tell(alert)

    async def _resolve(self, alert: AlertRecord, now: float) -> None:
        await self._catalog.resolve_alert(alert.id, now)
        resolved = AlertRecord(**{**alert.__dict__, "resolved_at": now})
        log.info(
            "alert %s resolved: %s", alert.key, alert.summary,
            extra={"alert": self.document(resolved)},
        )  # fmt: skip
        self._tell(resolved)

    def _tell(self, alert: AlertRecord) -> None:
        self._publish(alert)
        if self._delivery is not None:
            self._delivery.notify(Notice(self.document(alert)))

    def _publish(self, alert: AlertRecord) -> None:
        if self._status is None:
            return
        subject = alert.key.partition("/")[2]
        self._status.publish_alert(
            AlertStatus(
                alert_id=alert.id,
                kind=alert.kind,
                subject=subject,
                state=state_of(alert),
                severity=alert.severity,
                summary=alert.summary,
                vault=alert.vault or None,
                vm_id=alert.vm_id or None,
                raised_at=datetime.fromtimestamp(alert.raised_at, UTC),
                resolved_at=(
                    datetime.fromtimestamp(alert.resolved_at, UTC) if alert.resolved_at else None
                ),
            )
        )

    def item_name(self, vm_id: str) -> str:
        return self._names.get(vm_id, vm_id)

    def document(self, alert: AlertRecord) -> dict[str, Any]:
        """The alert as webhooks receive it (JSON)."""
        return {
            "alert_id": alert.id,
            "key": alert.key,
            "kind": alert.kind,
            "subject": alert.key.partition("/")[2],
            "state": state_of(alert),
            "severity": alert.severity,
            "summary": alert.summary,
            "vault": alert.vault or None,
            "vm_id": alert.vm_id or None,
            "item": self.item_name(alert.vm_id) if alert.vm_id else None,
            "details": alert.details,
            "raised_at": _iso(alert.raised_at),
            "resolved_at": _iso(alert.resolved_at) if alert.resolved_at else None,
        }


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat()
