"""Restore drills of a vault: where they run, when, and which recovery points they drill.

Knowing, before the day it is needed, that a recovery point restores. A vault's drill settings
name a drill agent (an enrolled VM of the vault's region: restoring there is what a drill
proves) and a scratch directory on it, under that agent's `restore_dirs` as its last hello
reported them (the agent checks again when it writes), and optionally a schedule (`"weekly sun
04:00 tz=UTC"`, the syntax of a backup policy's). At each slot, and on `coffer drill`, every
protected VM of the vault that has a recovery point gets a `RestoreDrill` job for its latest
(controller.jobs.drill: restore, read-only file system checks, delete, recorded on the
recovery point). Drills of one drill agent run one at a time.

The schedule lives in the protection manager's plan (`drill:VAULT` entries, run through its
`handlers`), planned from the vault's last drill slot: a slot missed while the controller was
down runs once at the next start, as a backup's does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import PurePosixPath

from controller.catalog import Catalog, DrillSettings, JobRecord, VaultRecord
from controller.jobs import JobManager
from controller.protection import Protection
from controller.scheduler import Due
from shared.clock import Clock
from shared.errors import (
    Conflict,
    InvalidArgument,
    InvalidPolicy,
    ItemNotRegistered,
    NotFound,
    PathNotAllowed,
    RestoreRegionMismatch,
    VmNotFound,
)
from shared.model import ItemState, Trigger
from shared.policy import Schedule, parse_schedule

log = logging.getLogger(__name__)

DRILL_PREFIX = "drill:"
NO_SCHEDULE = "off"  # `--drill-schedule off`: drills on demand only


def drill_key(vault: str) -> str:
    return DRILL_PREFIX + vault


def schedule_of(drill: DrillSettings | None) -> Schedule | None:
    if drill is None or drill.schedule is None:
        return None
    return Schedule.from_dict(drill.schedule)


def within(directory: str, restore_dirs: Sequence[str]) -> bool:
    """Whether `directory` (absolute, no '..') is one of `restore_dirs` or lies below one."""
    path = PurePosixPath(directory)
    if not path.is_absolute() or ".." in path.parts:
        return False
    return any(path.is_relative_to(PurePosixPath(allowed)) for allowed in restore_dirs)


class Drills:
    """A vault's drill settings, its drill schedule, and drills started now."""

    def __init__(
        self, catalog: Catalog, jobs: JobManager, protection: Protection, clock: Clock
    ) -> None:
        self._catalog = catalog
        self._jobs = jobs
        self._protection = protection
        self._clock = clock
        protection.handlers[DRILL_PREFIX] = self._scheduled

    async def plan_all(self) -> None:
        """Plan every vault's scheduled drills (at the controller's start)."""
        for vault in await self._catalog.vaults():
            self._plan(vault)

    def _plan(self, vault: VaultRecord) -> None:
        schedule = schedule_of(vault.drill)
        key = drill_key(vault.name)
        if schedule is None:
            self._protection.plan.remove(key)
        else:
            assert vault.drill is not None
            last = vault.drill.last_slot
            self._protection.plan.set(
                key, schedule, last if last is not None else self._clock.now()
            )
        self._protection.scheduler.changed()

    def vault_deleted(self, vault: str) -> None:
        self._protection.plan.remove(drill_key(vault))

    def next_at(self, vault: str) -> float | None:
        """When the vault's next scheduled drill is due (None: none is scheduled)."""
        return self._protection.plan.next_of(drill_key(vault))

    # --- settings ------------------------------------------------------------------------

    async def configure(
        self,
        vault_name: str,
        *,
        schedule: str = "",
        agent: str = "",
        directory: str = "",
        clear: bool = False,
    ) -> VaultRecord:
        """Change a vault's drill settings: each non-empty value replaces the vault's
        (`schedule` "off": on demand only), `clear` forgets them all. The result is checked
        whole: a drill agent of the vault's region, a directory under its restore_dirs."""
        vault = await self._catalog.vault(vault_name)
        if clear:
            if schedule or agent or directory:
                raise InvalidArgument(detail="clear the drill settings, or change them; not both")
            await self._catalog.set_drill(vault_name, None)
            vault = await self._catalog.vault(vault_name)
            self._plan(vault)
            return vault
        current = vault.drill
        spec = current.schedule if current else None
        if schedule == NO_SCHEDULE:
            spec = None
        elif schedule:
            try:
                spec = parse_schedule(schedule).to_dict()
            except InvalidPolicy as exc:
                raise InvalidArgument(
                    detail=f"drill schedule: {exc.fields.get('detail', exc.message)}"
                ) from None
        agent_id = current.agent if current else ""
        if agent:
            agent_id = (await self._protection.resolve([agent]))[0].vm_id
        directory = directory or (current.directory if current else "")
        if not agent_id or not directory:
            raise InvalidArgument(
                detail=f"vault {vault_name!r} drills need a drill agent and a directory on "
                "it: give both (--drill-agent VM --drill-dir DIR)"
            )
        await self._check_agent(vault, agent_id, directory)
        changed_schedule = current is None or spec != current.schedule
        drill = DrillSettings(
            agent=agent_id,
            directory=directory,
            schedule=spec,
            # A new schedule starts from now: its earlier slots were never due.
            last_slot=self._clock.now()
            if changed_schedule or current is None
            else current.last_slot,
        )
        await self._catalog.set_drill(vault_name, drill)
        vault = await self._catalog.vault(vault_name)
        if changed_schedule:
            self._plan(vault)
        return vault

    async def _check_agent(self, vault: VaultRecord, agent_id: str, directory: str) -> None:
        agent = await self._catalog.agent(agent_id)
        if agent is None:  # a drill agent set before and since removed
            raise VmNotFound(name=agent_id)
        if agent.region != vault.region:
            raise RestoreRegionMismatch(
                vm=agent_id, vm_region=agent.region, vault=vault.name, vault_region=vault.region
            )
        if not within(directory, agent.restore_dirs):
            raise PathNotAllowed(
                path=directory,
                allowed=", ".join(agent.restore_dirs)
                or f"none reported by the agent of VM {agent_id!r}",
            )

    # --- running -------------------------------------------------------------------------

    async def run(
        self, vault_name: str, names: Sequence[str] = (), trigger: Trigger = Trigger.MANUAL
    ) -> list[JobRecord]:
        """RestoreDrill jobs now: the latest recovery point of each VM named (each must be
        registered to the vault and have one), or of every protected VM of the vault that
        has one."""
        vault = await self._catalog.vault(vault_name)
        if vault.drill is None:
            raise Conflict(
                detail=f"vault {vault_name!r} has no drill agent: set one with `coffer vault "
                f"update {vault_name} --drill-agent VM --drill-dir DIR`"
            )
        if names:
            chosen = []
            for agent in await self._protection.resolve(names):
                item = await self._catalog.item(agent.vm_id)
                if item is None or item.vault != vault_name:
                    raise ItemNotRegistered(
                        vm=agent.vm_id,
                        where=f"vault {vault_name!r}",
                        fix=f"`coffer items --vault {vault_name}` lists its VMs",
                    )
                chosen.append(agent.vm_id)
        else:
            chosen = [
                item.vm_id
                for item in await self._catalog.items(vault_name)
                if ItemState(item.state).protected
            ]
        jobs = []
        for vm_id in chosen:
            points = await self._catalog.recovery_points(vm_id=vm_id, vault=vault_name)
            if not points:
                if names:
                    raise NotFound(kind=f"recovery point of VM {vm_id!r}", name="latest")
                log.info("drill of vault %s: VM %s has no recovery point yet", vault_name, vm_id)
                continue
            jobs.append(
                await self._jobs.drill(
                    points[-1], vault.drill.agent, vault.drill.directory, trigger
                )
            )
        return jobs

    async def _scheduled(self, due: Due) -> None:
        vault = due.key.removeprefix(DRILL_PREFIX)
        at = datetime.fromtimestamp(due.slot, UTC).isoformat(timespec="minutes")
        try:
            await self._catalog.set_drill_slot(vault, due.slot)
            jobs = await self.run(vault, trigger=Trigger.SCHEDULED)
        except (Conflict, NotFound) as exc:  # the vault or its settings went meanwhile
            log.warning("scheduled drill of vault %s at %s: %s", vault, at, exc)
            return
        log.info("scheduled drill of vault %s at %s: %d jobs", vault, at, len(jobs))
