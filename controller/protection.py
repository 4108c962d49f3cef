"""Protection: the life of a VM in a vault, from discovery to stopped protection.

Every step is a job (`Discovery`, `Register`, `Unregister`, `ConfigureProtection`,
`StopProtection`, `DeleteBackupData`) and moves the VM's item through its states:

    (discovered) → Registering → Registered → Protected (pending initial backup) → Protected
                                     ↑                         ↓ backup fails      ↑ succeeds
                                     │                    ProtectionError ─────────┘
                                     └── delete data ── ProtectionStopped (retain data) ──→ resume

Soft-deleted backup data (controller/soft_delete.py) comes back with `undelete` (an `Undelete`
job): the VM's points are live again and its item ProtectionStopped, with the policy it had
when the data was deleted if the vault still has it. A VM whose protection runs again meanwhile
is refused (its policy's rules would prune what comes back): stop it with retained data first.
A VM no longer registered is registered again; one registered to another vault is refused.

The rules operators rely on are checked here, each with its own error: a VM is registered to
one vault at a time, only to a vault of its own region; only registered, unprotected VMs are
protected; a protected VM is not unregistered; a VM has exactly one policy. A VM whose
protection is stopped keeps its policy's name (its points are not pruned meanwhile), and
resuming without naming a policy brings that one back: another policy's rules would prune
what its own keep.

Protected items are planned in the scheduler (`controller.scheduler.Plan`) with their policy's
schedule. A backup's end updates the item; after every successful backup a `Prune` job of the
VM applies its policy's retention (recorded even when it deletes nothing, so the operator sees
that retention ran).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from controller.catalog import (
    AgentRecord,
    Catalog,
    DeletedRecoveryPointRecord,
    ItemRecord,
    JobRecord,
)
from controller.jobs import BackupEnded, JobManager
from controller.pruning import Pruner
from controller.registry import AgentRegistry
from controller.scheduler import Due, Plan, Scheduler
from controller.vaults import Vaults
from shared.clock import Clock
from shared.errors import (
    AlreadyRegistered,
    AmbiguousVmName,
    CofferError,
    InvalidArgument,
    ItemNotRegistered,
    ItemStateConflict,
    NotFound,
    OperationInProgress,
    RegionMismatch,
    VmNotFound,
)
from shared.model import ItemState, JobStatus, Operation, Trigger
from shared.policy import DEFAULT_POLICY_NAME, Policy
from shared.supervision import Policy as SupervisionPolicy
from shared.supervision import Supervisor

log = logging.getLogger(__name__)

SCHEDULER_TASK = "scheduler"


@dataclass(frozen=True)
class Discovered:
    agent: AgentRecord
    online: bool


@dataclass(frozen=True)
class Discovery:
    job: JobRecord
    vms: list[Discovered]
    notes: list[str]


def display_name(agent: AgentRecord | None, vm_id: str) -> str:
    if agent is None:
        return vm_id
    return service_name(agent.service, agent.name)


def service_name(service: str, name: str) -> str:
    """How operators name a VM: service/name, or its name alone."""
    return f"{service}/{name}" if service else name


class Protection:
    """Items, their states and their schedules; an async context manager.

    Its scheduler loop runs under `supervisor` (the controller's) from enter to exit.
    """

    def __init__(
        self,
        catalog: Catalog,
        registry: AgentRegistry,
        jobs: JobManager,
        vaults: Vaults,
        pruner: Pruner,
        clock: Clock,
        supervisor: Supervisor,
    ) -> None:
        self._catalog = catalog
        self._registry = registry
        self._jobs = jobs
        self._vaults = vaults
        self._pruner = pruner
        self._clock = clock
        self.plan = Plan()
        self.scheduler = Scheduler(self.plan, clock, self._scheduled)
        # Other entries of the plan, by key prefix, and what runs them when due (a vault's
        # restore drills: controller.drills).
        self.handlers: dict[str, Callable[[Due], Awaitable[None]]] = {}
        self._supervisor = supervisor
        # Changes to one item are made one at a time (read, decide, write): a backup ending
        # and a stop-protection must not write over each other's state.
        self._locks: dict[str, asyncio.Lock] = {}
        # Called with every backup's final record once its item is updated (and, after a
        # success, its VM pruned): the verifier starts what the vault's settings ask.
        self.after_backup: list[BackupEnded] = []
        jobs.on_backup_ended = self._backup_ended
        vaults.on_policy_changed = self._policy_changed

    async def __aenter__(self) -> Protection:
        # Backups the last shutdown cut short: their items show the failure, and a scheduled
        # one runs again (its slot is not lost to the restart).
        rerun: dict[str, JobRecord] = {}
        for job in self._jobs.interrupted:
            if job.operation is Operation.BACKUP:
                await self._backup_ended(job)
                if job.trigger is Trigger.SCHEDULED:
                    rerun[job.vm_id] = job
        for item in await self._catalog.items():
            if ItemState(item.state).protected and item.policy:
                await self._plan(item)
                if item.vm_id in rerun:
                    await self._rerun(item, rerun[item.vm_id])
        for vault in await self._catalog.vaults():
            self._pruner.plan_maintenance(self.plan, vault.name)
        # RESTART: what is due when lives in the plan, not in the loop; a loop that failed
        # starts again from the plan, and a slot that passed meanwhile is due at once.
        self._supervisor.start(SCHEDULER_TASK, self.scheduler.run, policy=SupervisionPolicy.RESTART)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._supervisor.stop(SCHEDULER_TASK)

    async def _rerun(self, item: ItemRecord, job: JobRecord) -> None:
        assert item.policy is not None
        policy = await self._vaults.policy(item.vault, item.policy)
        slot = job.slot if job.slot is not None else job.started_at
        log.info(
            "%s: running the scheduled backup a restart interrupted (job %s)", item.vm_id, job.id
        )
        await self._jobs.backup(
            item.vault,
            item.vm_id,
            trigger=Trigger.SCHEDULED,
            slot=slot,
            deadline=self._clock.now() + policy.schedule.window.total_seconds(),
        )

    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    def vault_created(self, vault: str) -> None:
        self._pruner.plan_maintenance(self.plan, vault)
        self.scheduler.changed()

    def vault_deleted(self, vault: str) -> None:
        self.plan.remove(self._pruner.maintenance_key(vault))

    def next_backup(self, item: ItemRecord) -> float | None:
        """When the item's next scheduled backup is due, if it is protected."""
        return self.plan.next_of(item.vm_id) if ItemState(item.state).protected else None

    # --- names ------------------------------------------------------------------------------

    async def resolve(self, names: Sequence[str]) -> list[AgentRecord]:
        """The enrolled VMs `names` give: each a VM id, a name, or service/name."""
        if not names:
            raise InvalidArgument(detail="name at least one VM (its name, or service/name)")
        # Only the VMs these names can be (a VM id, or a name with or without its service),
        # indexed once: a call may name the whole fleet.
        agents = await self._catalog.agents_named(
            name.partition("/")[2] if "/" in name else name for name in names
        )
        by_id = {a.vm_id: a for a in agents}
        by_name: dict[str, list[AgentRecord]] = {}
        by_service: dict[tuple[str, str], list[AgentRecord]] = {}
        for agent in agents:
            by_name.setdefault(agent.name, []).append(agent)
            by_service.setdefault((agent.service, agent.name), []).append(agent)
        found: dict[str, AgentRecord] = {}
        for name in names:
            if "/" in name:
                service, _, short = name.partition("/")
                matches = by_service.get((service, short), [])
            else:
                matches = [by_id[name]] if name in by_id else by_name.get(name, [])
            if not matches:
                raise VmNotFound(name=name)
            if len(matches) > 1:
                raise AmbiguousVmName(
                    name=name, services=", ".join(sorted(a.service for a in matches))
                )
            found.setdefault(matches[0].vm_id, matches[0])
        return list(found.values())

    async def _item_in(self, vault: str, agent: AgentRecord) -> ItemRecord:
        item = await self._catalog.item(agent.vm_id)
        if item is None or item.vault != vault:
            raise await self._not_registered(agent, vault, item)
        return item

    async def _not_registered(
        self, agent: AgentRecord, vault: str, item: ItemRecord | None
    ) -> ItemNotRegistered:
        """The error for a VM not registered to `vault` (or, with no vault named, to any),
        with a fix that names real vaults: where it is registered, or where it could be."""
        name = display_name(agent, agent.vm_id)
        where = f"vault {vault!r}" if vault else "any vault"
        if item is not None:
            return ItemNotRegistered(
                vm=name,
                where=where,
                fix=f"It is registered to vault {item.vault!r}: name that vault "
                f"(`--vault {item.vault}`).",
            )
        if vault:
            fix = f"Register it first (`coffer register --vault {vault} {name}`)."
        else:
            here = [v.name for v in await self._catalog.vaults() if v.region == agent.region]
            if len(here) == 1:
                fix = f"Register it first (`coffer register --vault {here[0]} {name}`)."
            elif here:
                fix = (
                    f"Register it first to one of the vaults of region {agent.region!r} "
                    f"({', '.join(here)}): `coffer register --vault {here[0]} {name}`."
                )
            else:
                fix = (
                    f"No vault is in its region {agent.region!r} yet: create one "
                    f"(`coffer vault create NAME --region {agent.region}`), then register it."
                )
        return ItemNotRegistered(vm=name, where=where, fix=fix)

    # --- step 1: discover -------------------------------------------------------------------

    async def discover(self, vault_name: str) -> Discovery:
        vault = await self._catalog.vault(vault_name)
        found: list[Discovered] = []
        notes: list[str] = []

        async def body(job: JobRecord) -> None:
            agents = await self._catalog.agents()
            registered = {item.vm_id for item in await self._catalog.items()}
            here = [a for a in agents if a.region == vault.region]
            for agent in here:
                if agent.vm_id not in registered:
                    found.append(Discovered(agent, self._registry.online(agent.vm_id)))
            if not found:
                if not agents:
                    notes.append(
                        "no VM has enrolled yet: install coffer-agent in the VMs and check "
                        "`coffer agents`"
                    )
                elif not here:
                    regions = sorted({a.region for a in agents})
                    notes.append(
                        f"no enrolled VM is in region {vault.region!r}; the enrolled VMs are "
                        f"in {', '.join(map(repr, regions))} (a vault protects only VMs of "
                        "its own region)"
                    )
                else:
                    notes.append(
                        f"every VM of region {vault.region!r} is already registered to a vault "
                        f"({len(here)} VMs); see `coffer items`"
                    )
            job.details["discovered"] = [d.agent.vm_id for d in found]

        job = await self._jobs.run(Operation.DISCOVERY, vault_name, "", body)
        return Discovery(job, found, notes)

    # --- step 2: register -------------------------------------------------------------------

    async def register(self, vault_name: str, names: Sequence[str]) -> list[JobRecord]:
        """A Register job per VM; many VMs are registered in one transaction."""
        vault = await self._catalog.vault(vault_name)
        agents = await self.resolve(names)
        items = await self._catalog.items_of([agent.vm_id for agent in agents])
        for agent in agents:  # every VM is checked before any job starts
            item = items.get(agent.vm_id)
            if item is not None:
                raise AlreadyRegistered(vm=display_name(agent, agent.vm_id), vault=item.vault)
            if agent.region != vault.region:
                raise RegionMismatch(
                    vm=display_name(agent, agent.vm_id),
                    vm_region=agent.region,
                    vault=vault.name,
                    vault_region=vault.region,
                )
        by_vm = {agent.vm_id: agent for agent in agents}

        async def body(jobs: list[JobRecord]) -> dict[str, CofferError]:
            errors: dict[str, CofferError] = {}
            now = self._clock.now()
            registering: list[tuple[JobRecord, ItemRecord]] = []
            for job in jobs:
                agent = by_vm[job.vm_id]
                # Registering checks the VM's agent answers: a VM whose agent is gone cannot
                # be backed up, and registering it would only defer the surprise.
                if not self._registry.online(agent.vm_id):
                    errors[job.id] = ItemStateConflict(
                        vm=display_name(agent, agent.vm_id),
                        state="offline",
                        fix="its agent is not connected, so it cannot be registered; start "
                        "coffer-agent in the VM and register it again",
                    )
                    continue
                item = ItemRecord(
                    vm_id=agent.vm_id,
                    vault=vault.name,
                    state=ItemState.REGISTERED,
                    policy=None,
                    registered_at=now,
                )
                registering.append((job, item))
            taken = await self._catalog.insert_items([item for _, item in registering])
            holders = await self._catalog.items_of(sorted(taken)) if taken else {}
            for job, item in registering:
                agent = by_vm[job.vm_id]
                if item.vm_id in taken:  # registered by another call meanwhile
                    holder = holders.get(item.vm_id)
                    errors[job.id] = AlreadyRegistered(
                        vm=display_name(agent, agent.vm_id),
                        vault=holder.vault if holder else vault.name,
                    )
                else:
                    job.details["disks"] = [d.name for d in agent.disks]
            return errors

        return await self._jobs.run_each(Operation.REGISTER, vault.name, list(by_vm), body)

    async def unregister(self, vault: str, names: Sequence[str]) -> list[JobRecord]:
        await self._catalog.vault(vault)
        agents = await self.resolve(names)
        items = [await self._item_in(vault, agent) for agent in agents]
        for agent, item in zip(agents, items, strict=True):
            if item.state not in (ItemState.REGISTERED, ItemState.REGISTERING):
                raise ItemStateConflict(
                    vm=display_name(agent, item.vm_id),
                    state=item.state,
                    fix="delete its retained recovery points first "
                    "(`coffer stop-protection --delete-data`)"
                    if item.state == ItemState.PROTECTION_STOPPED
                    else "stop its protection first (with --delete-data, or its recovery "
                    "points would be left without a VM)",
                )

        async def body(job: JobRecord) -> None:
            async with self._lock(job.vm_id):
                item = await self._catalog.item(job.vm_id)
                if item is None:
                    return
                if item.state not in (ItemState.REGISTERED, ItemState.REGISTERING):
                    raise ItemStateConflict(
                        vm=job.vm_id, state=item.state, fix="stop its protection first"
                    )
                points = await self._catalog.recovery_points(vm_id=job.vm_id, vault=vault)
                if points:
                    raise ItemStateConflict(
                        vm=job.vm_id,
                        state=f"holding {len(points)} recovery points",
                        fix="delete them first (`coffer stop-protection --delete-data`)",
                    )
                await self._catalog.delete_item(job.vm_id)

        return [
            await self._jobs.run(Operation.UNREGISTER, vault, item.vm_id, body) for item in items
        ]

    # --- step 3: protect --------------------------------------------------------------------

    async def protect(
        self,
        vault: str,
        names: Sequence[str],
        policy_name: str,
        new_policy: Policy | None = None,
        *,
        resume: bool = False,
    ) -> list[JobRecord]:
        """Attach a policy (an existing one, or `new_policy` created first).

        Without `resume`, registered VMs are protected and protected ones move to the policy
        (a policy change); with no policy named, registered VMs get `DefaultPolicy` and a
        protected VM is refused (moving it silently would prune what its own rules keep).
        `resume` protects ProtectionStopped VMs again, each with the policy it had unless one
        is named."""
        await self._catalog.vault(vault)
        agents = await self.resolve(names)
        items = await self._items_in(vault, agents)
        for agent, item in zip(agents, items, strict=True):
            state = ItemState(item.state)
            name = display_name(agent, item.vm_id)
            if resume and state != ItemState.PROTECTION_STOPPED:
                raise ItemStateConflict(
                    vm=name, state=state, fix="only VMs whose protection was stopped resume"
                )
            if not resume and state == ItemState.PROTECTION_STOPPED:
                raise ItemStateConflict(
                    vm=name, state=state, fix="use `coffer resume-protection` to protect it again"
                )
            if state == ItemState.REGISTERING:
                raise ItemStateConflict(vm=name, state=state, fix="wait for its registration")
        if new_policy is not None:
            chosen = {item.vm_id: new_policy.name for item in items}
            await self._vaults.create_policy(vault, new_policy)
        else:
            chosen = {
                item.vm_id: policy_name
                or self._unnamed_policy(vault, display_name(agent, item.vm_id), item)
                for agent, item in zip(agents, items, strict=True)
            }
        policies = {name: await self._vaults.policy(vault, name) for name in set(chosen.values())}
        stale = {item.vm_id: item for item in items}

        async def body(jobs: list[JobRecord]) -> dict[str, CofferError]:
            async with contextlib.AsyncExitStack() as locks:
                # In one order, so that two calls naming the same VMs never wait on each other.
                for vm_id in sorted(stale):
                    await locks.enter_async_context(self._lock(vm_id))
                return await self._protect_locked(jobs, stale, policies, chosen)

        return await self._jobs.run_each(
            Operation.CONFIGURE_PROTECTION, vault, [item.vm_id for item in items], body
        )

    async def _items_in(self, vault: str, agents: Sequence[AgentRecord]) -> list[ItemRecord]:
        """The items of `agents` in `vault` (read together); ItemNotRegistered for the first
        that is not registered there."""
        found = await self._catalog.items_of([agent.vm_id for agent in agents])
        items: list[ItemRecord] = []
        for agent in agents:
            item = found.get(agent.vm_id)
            if item is None or item.vault != vault:
                raise await self._not_registered(agent, vault, item)
            items.append(item)
        return items

    @staticmethod
    def _unnamed_policy(vault: str, name: str, item: ItemRecord) -> str:
        """The policy a VM gets when the caller names none: its own when protection resumes,
        DefaultPolicy when it is first protected; a protected VM is not moved."""
        state = ItemState(item.state)
        if state == ItemState.PROTECTION_STOPPED:
            if item.policy is None:
                raise InvalidArgument(
                    detail=f"VM {name!r} has no policy to resume with (its policy was deleted, "
                    "or its protection was stopped by an older Coffer): name one with --policy "
                    f"(`coffer policy list --vault {vault}`)"
                )
            return item.policy
        if state.protected:
            raise InvalidArgument(
                detail=f"VM {name!r} is already protected by policy {item.policy!r}; name the "
                "policy to move it to with --policy"
            )
        return DEFAULT_POLICY_NAME

    async def _protect_locked(
        self,
        jobs: list[JobRecord],
        stale: dict[str, ItemRecord],
        policies: dict[str, Policy],
        chosen: dict[str, str],
    ) -> dict[str, CofferError]:
        """Attach each job's VM to its chosen policy: one read, one write for them all."""
        errors: dict[str, CofferError] = {}
        current = await self._catalog.items_of(list(stale))
        latest = await self._catalog.latest_vaults(
            [vm_id for vm_id, item in current.items() if not ItemState(item.state).protected]
        )
        now = self._clock.now()
        changed: list[tuple[JobRecord, ItemRecord, str | None]] = []
        for job in jobs:
            before, item = stale[job.vm_id], current.get(job.vm_id)
            # What the checks before the job looked at must still hold (a backup ending
            # meanwhile, pending → protected, changes nothing that matters here).
            if (
                item is None
                or item.vault != before.vault
                or ItemState(item.state).protected != ItemState(before.state).protected
                or (item.state == ItemState.PROTECTION_STOPPED)
                != (before.state == ItemState.PROTECTION_STOPPED)
            ):
                errors[job.id] = ItemStateConflict(
                    vm=job.vm_id,
                    state="changed meanwhile",
                    fix="look at `coffer items` and try again",
                )
                continue
            previous = item.policy
            item.policy = chosen[job.vm_id]
            if not ItemState(item.state).protected:
                # No recovery point yet: pending its initial backup (a resumed VM with points
                # is protected at once).
                item.state = (
                    ItemState.PROTECTED
                    if latest.get(item.vm_id) == item.vault
                    else ItemState.PROTECTION_PENDING
                )
                item.protected_at = now
                item.last_slot = now
                item.error_code = item.error_message = ""
            else:
                # A policy change: the last backup's outcome (and error) still stands.
                self._schedule_changed(item)
            changed.append((job, item, previous))
        await self._catalog.update_items([item for _, item, _ in changed])
        for job, item, previous in changed:
            policy = policies[chosen[job.vm_id]]
            self._plan_with(item, policy)
            job.details["policy"] = policy.name
            if previous and previous != policy.name:
                job.details["previous_policy"] = previous
        return errors

    async def _plan(self, item: ItemRecord) -> None:
        assert item.policy is not None
        self._plan_with(item, await self._vaults.policy(item.vault, item.policy))

    def _plan_with(self, item: ItemRecord, policy: Policy) -> None:
        last = item.last_slot if item.last_slot is not None else self._clock.now()
        self.plan.set(item.vm_id, policy.schedule, last)
        self.scheduler.changed()

    async def _policy_changed(self, vault: str, policy: str) -> None:
        for item in await self._catalog.items(vault, policy=policy):
            if ItemState(item.state).protected:
                if self._schedule_changed(item):
                    await self._catalog.update_item(item)
                await self._plan(item)

    def _schedule_changed(self, item: ItemRecord) -> bool:
        """A protected VM gets another schedule: its slots before now were not missed, so
        planning continues from now (a slot the current plan has due is still run)."""
        now = self._clock.now()
        planned = self.plan.next_of(item.vm_id)
        if planned is None or planned <= now or (item.last_slot or 0.0) >= now:
            return False
        item.last_slot = now
        return True

    # --- stop and resume --------------------------------------------------------------------

    async def stop(self, vault: str, names: Sequence[str], delete_data: bool) -> list[JobRecord]:
        await self._catalog.vault(vault)
        agents = await self.resolve(names)
        items = [await self._item_in(vault, agent) for agent in agents]
        for agent, item in zip(agents, items, strict=True):
            state = ItemState(item.state)
            if not state.protected and not (delete_data and state == ItemState.PROTECTION_STOPPED):
                raise ItemStateConflict(
                    vm=display_name(agent, item.vm_id),
                    state=state,
                    fix="it is not protected"
                    + ("" if delete_data else " (--delete-data removes retained recovery points)"),
                )
            running = self._jobs.running_job_of(item.vm_id)
            if running:
                raise ItemStateConflict(
                    vm=display_name(agent, item.vm_id),
                    state=f"running job {running}",
                    fix="wait for it or cancel it (`coffer job cancel`)",
                )
            if delete_data:
                # All or nothing: what would refuse the delete half (a restore of another VM
                # reading a point of this one) refuses before the stop half applies.
                points = await self._catalog.recovery_points(vm_id=item.vm_id, vault=vault)
                if read := self._jobs.in_use() & {rp.id for rp in points}:
                    raise ItemStateConflict(
                        vm=display_name(agent, item.vm_id),
                        state=f"recovery points {', '.join(sorted(read))} being read by a "
                        "running job (a restore)",
                        fix="wait for it or cancel it (`coffer job cancel`); nothing was changed",
                    )
        jobs: list[JobRecord] = []
        for item in items:
            jobs.append(await self._stop_one(item))
            if delete_data:
                jobs.append(await self._delete_data(item))
        return jobs

    def _idle(self, vm_id: str) -> None:
        """Refuse while a job of the VM runs or waits (checked again under the item's lock)."""
        running = self._jobs.running_job_of(vm_id)
        if running:
            raise ItemStateConflict(
                vm=vm_id,
                state=f"running job {running}",
                fix="wait for it or cancel it (`coffer job cancel`)",
            )

    async def _stop_one(self, stale: ItemRecord) -> JobRecord:
        async def body(job: JobRecord) -> None:
            async with self._lock(stale.vm_id):
                item = await self._catalog.item(stale.vm_id)
                if item is None or item.vault != stale.vault:
                    raise ItemNotRegistered(
                        vm=stale.vm_id,
                        where=f"vault {stale.vault!r} any more",
                        fix="It was unregistered meanwhile; see `coffer items`.",
                    )
                self._idle(item.vm_id)
                self.plan.remove(item.vm_id)
                self.scheduler.changed()
                if ItemState(item.state).protected:
                    job.details["policy"] = item.policy
                    # The item keeps its policy's name: resuming protection without naming
                    # one brings its own back, with the rules that keep its older points.
                    item.state = ItemState.PROTECTION_STOPPED
                    item.error_code = item.error_message = ""
                    await self._catalog.update_item(item)

        return await self._jobs.run(Operation.STOP_PROTECTION, stale.vault, stale.vm_id, body)

    async def _delete_data(self, stale: ItemRecord) -> JobRecord:
        async def body(job: JobRecord) -> None:
            async with self._lock(stale.vm_id):
                item = await self._catalog.item(stale.vm_id)
                if item is None or item.vault != stale.vault:
                    raise ItemNotRegistered(
                        vm=stale.vm_id,
                        where=f"vault {stale.vault!r} any more",
                        fix="It was unregistered meanwhile; see `coffer items`.",
                    )
                if item.state != ItemState.PROTECTION_STOPPED:
                    raise ItemStateConflict(
                        vm=item.vm_id, state=item.state, fix="stop its protection first"
                    )
                self._idle(item.vm_id)
                deleted = await self._pruner.delete_all(
                    item.vault, item.vm_id, job_id=job.id, policy=item.policy
                )
                job.details["deleted_recovery_points"] = deleted.recovery_points
                if deleted.purge_at is not None:
                    # Soft-deleted: recoverable until then (controller.soft_delete).
                    job.details["purge_at"] = datetime.fromtimestamp(
                        deleted.purge_at, UTC
                    ).isoformat()
                item.state, item.policy = ItemState.REGISTERED, None
                item.last_slot = item.last_backup_at = None
                item.last_backup_status = None
                await self._catalog.update_item(item)

        return await self._jobs.run(Operation.DELETE_BACKUP_DATA, stale.vault, stale.vm_id, body)

    # --- soft-deleted data ------------------------------------------------------------------

    async def undelete(self, vault: str, name: str, rp_id: str = "") -> JobRecord:
        """An Undelete job: the VM's soft-deleted recovery points in `vault` (the one it has
        deleted points in, when empty), or only `rp_id`, live again; its item ProtectionStopped.
        Every check is made before the job starts, and again under the item's lock."""
        vm_id = await self._deleted_vm_id(name)
        chosen = await self._deleted_points(vault, vm_id, rp_id)
        vault = chosen[0].point.vault
        await self._undeletable(vault, vm_id)

        async def body(job: JobRecord) -> None:
            async with self._lock(vm_id):
                item = await self._undeletable(vault, vm_id)
                restored: list[str] = []
                job.details["undeleted_recovery_points"] = restored
                for record in chosen:
                    await self._pruner.soft_delete.undelete(vault, record.id)
                    restored.append(record.id)
                policy = item.policy if item is not None else None
                if policy is None:
                    policy = await self._existing_policy(vault, chosen[-1].policy)
                if item is None:
                    item = ItemRecord(
                        vm_id=vm_id,
                        vault=vault,
                        state=ItemState.PROTECTION_STOPPED,
                        policy=policy,
                        registered_at=self._clock.now(),
                    )
                    await self._catalog.insert_item(item)
                else:
                    item.state, item.policy = ItemState.PROTECTION_STOPPED, policy
                    item.error_code = item.error_message = ""
                    await self._catalog.update_item(item)
                job.details["policy"] = policy

        return await self._jobs.run(Operation.UNDELETE, vault, vm_id, body)

    async def _deleted_vm_id(self, name: str) -> str:
        """The VM `name` gives; a VM no longer enrolled is named by its id."""
        try:
            return (await self.resolve([name]))[0].vm_id
        except VmNotFound:
            if await self._catalog.deleted_recovery_points(vm_id=name):
                return name
            raise

    async def _deleted_points(
        self, vault: str, vm_id: str, rp_id: str
    ) -> list[DeletedRecoveryPointRecord]:
        if vault:
            await self._catalog.vault(vault)
        if rp_id:
            record = await self._catalog.deleted_recovery_point(rp_id)
            if record.point.vm_id != vm_id or (vault and record.point.vault != vault):
                raise NotFound(kind=f"deleted recovery point of VM {vm_id!r}", name=rp_id)
            return [record]
        found = await self._catalog.deleted_recovery_points(vm_id=vm_id, vault=vault)
        if not found:
            where = f" in vault {vault!r}" if vault else ""
            raise NotFound(
                f"VM {vm_id!r} has no deleted recovery points{where}: `coffer rp list --deleted` "
                "lists those that can be undeleted (purged ones are gone)."
            )
        vaults = sorted({record.point.vault for record in found})
        if len(vaults) > 1:
            raise InvalidArgument(
                detail=f"VM {vm_id!r} has deleted recovery points in vaults {', '.join(vaults)}: "
                "name the vault with --vault"
            )
        return found

    async def _undeletable(self, vault: str, vm_id: str) -> ItemRecord | None:
        """The VM's item if its deleted points may come back into `vault` (None: it is not
        registered, and will be); refused otherwise."""
        item = await self._catalog.item(vm_id)
        if item is not None and item.vault != vault:
            raise AlreadyRegistered(vm=vm_id, vault=item.vault)
        if item is not None and item.state not in (
            ItemState.REGISTERED,
            ItemState.PROTECTION_STOPPED,
        ):
            raise ItemStateConflict(
                vm=vm_id,
                state=item.state,
                fix="its policy would prune the points that come back: stop its protection "
                f"first (`coffer stop-protection --vault {vault} {vm_id} --retain-data`), then "
                "undelete, then resume",
            )
        self._idle(vm_id)
        return item

    async def _existing_policy(self, vault: str, name: str | None) -> str | None:
        """`name` if the vault still has that policy (it may have been deleted since)."""
        if name is None:
            return None
        try:
            await self._catalog.policy(vault, name)
        except NotFound:
            return None
        return name

    # --- backups ----------------------------------------------------------------------------

    async def backup_now(
        self, vault: str, names: Sequence[str], disks: Sequence[str]
    ) -> list[JobRecord]:
        """Queue a manual backup of every VM named, together: all of them, or none."""
        if vault:
            await self._catalog.vault(vault)
        return await self.backup_agents(vault, await self.resolve(names), disks)

    async def backup_agents(
        self, vault: str, agents: Sequence[AgentRecord], disks: Sequence[str]
    ) -> list[JobRecord]:
        """`backup_now` of VMs already resolved (`resolve`), in `vault` if named (checked)."""
        async with contextlib.AsyncExitStack() as locks:
            # Checked under the VMs' locks (in one order, so two calls never wait on each
            # other): a stop-protection must not come in between the check and the queue.
            for vm_id in sorted(agent.vm_id for agent in agents):
                await locks.enter_async_context(self._lock(vm_id))
            found = await self._catalog.items_of([agent.vm_id for agent in agents])
            items = [
                await self._protected_item(vault, agent, found.get(agent.vm_id)) for agent in agents
            ]
            return await self._jobs.backup_many(
                [(item.vault, item.vm_id) for item in items], disks=list(disks)
            )

    async def _protected_item(
        self, vault: str, agent: AgentRecord, item: ItemRecord | None
    ) -> ItemRecord:
        name = display_name(agent, agent.vm_id)
        if item is None or (vault and item.vault != vault):
            raise await self._not_registered(agent, vault, item)
        if item.state == ItemState.PROTECTION_STOPPED:
            raise ItemStateConflict(
                vm=name,
                state=item.state,
                fix="resume its protection first "
                f"(`coffer resume-protection --vault {item.vault} {name}`)",
            )
        if not ItemState(item.state).protected:
            raise ItemStateConflict(
                vm=name,
                state=item.state,
                fix=f"protect it first (`coffer protect --vault {item.vault} {name}`)",
            )
        return item

    async def _scheduled(self, due: Due) -> None:
        if self._pruner.is_maintenance(due.key):
            await self._pruner.maintain(due.key)
            return
        for prefix, handler in self.handlers.items():
            if due.key.startswith(prefix):
                await handler(due)
                return
        skipped: tuple[ItemRecord, str] | None = None
        async with self._lock(due.key):
            item = await self._catalog.item(due.key)
            if item is None or not ItemState(item.state).protected:
                self.plan.remove(due.key)
                return
            item.last_slot = due.slot
            await self._catalog.update_item(item)
            running = self._jobs.running_job_of(item.vm_id)
            if running:
                skipped = item, running
            else:
                if due.missed:
                    log.info(
                        "%s: %d scheduled backups were missed; running one now",
                        item.vm_id,
                        due.missed,
                    )
                await self._jobs.backup(
                    item.vault,
                    item.vm_id,
                    trigger=Trigger.SCHEDULED,
                    slot=due.slot,
                    deadline=due.deadline,
                )
        if skipped is not None:
            await self._skipped(*skipped, due.slot)

    async def _skipped(self, item: ItemRecord, running: str, slot: float) -> None:
        """A slot that came while the VM's previous job still ran: a failed backup job says so
        (and the item shows it), rather than a silent gap in the VM's recovery points."""
        at = datetime.fromtimestamp(slot, UTC).strftime("%Y-%m-%d %H:%M UTC")

        async def body(job: JobRecord) -> None:
            raise OperationInProgress(
                f"The scheduled backup of {at} did not run: job {running} of this VM was still "
                "running. If backups take longer than the gap between slots, schedule fewer "
                "or raise the vault's concurrent backups; the next slot will try again."
            )

        job = await self._jobs.run(
            Operation.BACKUP, item.vault, item.vm_id, body, trigger=Trigger.SCHEDULED, slot=slot
        )
        await self._backup_ended(job)

    async def _backup_ended(self, job: JobRecord) -> None:
        async with self._lock(job.vm_id):
            item = await self._update_after_backup(job)
        if item is not None and job.status.succeeded and item.policy:
            try:
                await self._pruner.prune_vm(
                    item.vault, item.vm_id, after_job=job.id, trigger=job.trigger
                )
            except CofferError as exc:
                log.warning("pruning %s after backup %s failed: %s", item.vm_id, job.id, exc)
        for listener in self.after_backup:
            await listener(job)

    async def _update_after_backup(self, job: JobRecord) -> ItemRecord | None:
        item = await self._catalog.item(job.vm_id)
        if item is None or item.vault != job.vault:
            return None
        item.last_backup_at = job.ended_at
        item.last_backup_status = job.status
        if job.status.succeeded:
            item.error_code = item.error_message = ""
            if ItemState(item.state).protected:
                item.state = ItemState.PROTECTED
        elif job.status == JobStatus.FAILED:
            item.error_code, item.error_message = job.error_code, job.error_message
            if ItemState(item.state).protected:
                item.state = ItemState.PROTECTION_ERROR
        await self._catalog.update_item(item)
        return item
