"""Which alert conditions hold: a pure function of what the catalog and the registry say now.

`evaluate(snapshot, now, limits)` returns every condition that holds, keyed by one stable key
per condition (`kind/subject`), so the keeper (keeper.py) raises an alert for a key that
appears and resolves it when the key goes away: one alert per condition, never one per check.

- `backup-failed/VM`: the item's last backup failed (its record says so until a later backup
  completes). Critical.
- `restore-failed/VM`: the latest restore of the VM's recovery points failed or was
  cancelled by the controller's stop (within the look-back the keeper reads); cleared by a
  later restore of that VM that completes. Warning.
- `rpo-breached/VM`: a protected VM has no recovery point since its policy's last scheduled
  slot whose window (plus the configured grace) has closed: the recovery point objective the
  policy promises is broken. Measured from the slot, in the policy's time zone, so a weekly
  policy is late after a missed week and a daily one after a missed day. A VM is not late for
  slots before it was protected. Critical.
- `agent-offline/VM`: an enrolled VM's agent has not been connected for `agent_offline`
  seconds. Warning.
- `recovery-points-damaged/VAULT`: recovery points of the vault are known damaged (a verify,
  or a read since, found chunks missing or corrupt). Critical.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared.model import ItemState, JobStatus
from shared.policy import Schedule


class Kind(enum.StrEnum):
    BACKUP_FAILED = "backup-failed"
    RESTORE_FAILED = "restore-failed"
    RPO_BREACHED = "rpo-breached"
    AGENT_OFFLINE = "agent-offline"
    RECOVERY_POINTS_DAMAGED = "recovery-points-damaged"


class Severity(enum.StrEnum):
    CRITICAL = "critical"
    WARNING = "warning"


@dataclass(frozen=True)
class Condition:
    """One condition that holds now."""

    kind: Kind
    subject: str
    """The VM id, or the vault's name for a vault's condition."""
    severity: Severity
    summary: str
    vault: str = ""
    vm_id: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.subject}"


@dataclass(frozen=True)
class ItemView:
    """What the conditions need of one registered item."""

    vm_id: str
    vault: str
    state: ItemState
    name: str
    last_backup_status: JobStatus | None = None
    error_code: str = ""
    error_message: str = ""
    last_backup_at: float | None = None
    protected_at: float | None = None
    schedule: Schedule | None = None
    policy: str = ""
    newest_recovery_point: float | None = None


@dataclass(frozen=True)
class AgentView:
    vm_id: str
    name: str
    online: bool
    last_seen: float


@dataclass(frozen=True)
class RestoreView:
    """The latest restore of a VM's recovery points."""

    vm_id: str
    vault: str
    job_id: str
    status: JobStatus
    error_code: str
    error_message: str
    ended_at: float | None


@dataclass(frozen=True)
class Snapshot:
    items: tuple[ItemView, ...] = ()
    agents: tuple[AgentView, ...] = ()
    restores: tuple[RestoreView, ...] = ()
    damaged: Mapping[str, int] = field(default_factory=dict)
    """Damaged recovery points per vault."""


@dataclass(frozen=True)
class Limits:
    agent_offline: float
    """Seconds an agent may be away before it is an alert."""
    rpo_grace: float
    """Seconds past a slot's window before a missing recovery point is an alert."""


def evaluate(snapshot: Snapshot, now: float, limits: Limits) -> dict[str, Condition]:
    """Every condition that holds at `now`, by key."""
    found: list[Condition] = []
    for item in snapshot.items:
        found += _item_conditions(item, now, limits)
    for restore in snapshot.restores:
        if restore.status is JobStatus.FAILED:
            found.append(
                Condition(
                    Kind.RESTORE_FAILED,
                    restore.vm_id,
                    Severity.WARNING,
                    f"the latest restore of {restore.vm_id} failed: {restore.error_code}: "
                    f"{restore.error_message}",
                    vault=restore.vault,
                    vm_id=restore.vm_id,
                    details={
                        "job_id": restore.job_id,
                        "error_code": restore.error_code,
                        "error_message": restore.error_message,
                    },
                )
            )
    for agent in snapshot.agents:
        away = now - agent.last_seen
        if not agent.online and away >= limits.agent_offline:
            found.append(
                Condition(
                    Kind.AGENT_OFFLINE,
                    agent.vm_id,
                    Severity.WARNING,
                    f"the agent of {agent.name} has been offline for {_span(away)} (last seen "
                    f"{_iso(agent.last_seen)})",
                    vm_id=agent.vm_id,
                    details={"last_seen": _iso(agent.last_seen), "offline_seconds": round(away)},
                )
            )
    for vault, count in snapshot.damaged.items():
        if count > 0:
            found.append(
                Condition(
                    Kind.RECOVERY_POINTS_DAMAGED,
                    vault,
                    Severity.CRITICAL,
                    f"{count} recovery point{'s' if count != 1 else ''} of vault {vault} "
                    "damaged (`coffer rp list --vault` names them)",
                    vault=vault,
                    details={"damaged_recovery_points": count},
                )
            )
    return {condition.key: condition for condition in found}


def _item_conditions(item: ItemView, now: float, limits: Limits) -> list[Condition]:
    found: list[Condition] = []
    if item.last_backup_status is JobStatus.FAILED and item.state.protected:
        found.append(
            Condition(
                Kind.BACKUP_FAILED,
                item.vm_id,
                Severity.CRITICAL,
                f"the last backup of {item.name} failed: {item.error_code}: {item.error_message}",
                vault=item.vault,
                vm_id=item.vm_id,
                details={
                    "error_code": item.error_code,
                    "error_message": item.error_message,
                    "at": _iso(item.last_backup_at) if item.last_backup_at else None,
                },
            )
        )
    late = rpo_breach(item, now, limits.rpo_grace)
    if late is not None:
        slot, deadline = late
        newest = item.newest_recovery_point
        since = f"newest {_iso(newest)}" if newest is not None else "none yet"
        found.append(
            Condition(
                Kind.RPO_BREACHED,
                item.vm_id,
                Severity.CRITICAL,
                f"{item.name} has no recovery point since its {_iso(slot, item.schedule)} "
                f"backup (policy {item.policy}; {since})",
                vault=item.vault,
                vm_id=item.vm_id,
                details={
                    "policy": item.policy,
                    "slot": _iso(slot),
                    "deadline": _iso(deadline),
                    "newest_recovery_point": _iso(newest) if newest is not None else None,
                },
            )
        )
    return found


def rpo_breach(item: ItemView, now: float, grace: float) -> tuple[float, float] | None:
    """The slot a protected item missed and when its window (and grace) closed, if it has
    no recovery point since a slot whose deadline has passed."""
    schedule = item.schedule
    if schedule is None or not item.state.protected or item.protected_at is None:
        return None
    allowance = schedule.window.total_seconds() + grace
    slot_time = schedule.last_run_at_or_before(datetime.fromtimestamp(now - allowance, UTC))
    if slot_time is None:
        return None
    slot = slot_time.timestamp()
    if slot < item.protected_at:
        return None  # it was not protected yet then
    newest = item.newest_recovery_point
    if newest is not None and newest >= slot:
        return None
    return slot, slot + allowance


def _iso(moment: float | None, schedule: Schedule | None = None) -> str:
    if moment is None:
        return "-"
    when = datetime.fromtimestamp(moment, UTC)
    if schedule is not None:
        when = when.astimezone(schedule.zone)
    return when.isoformat(timespec="seconds")


def _span(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 1:
        return f"{seconds:.0f} s"
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"
