"""Backup jobs: from the request to the committed recovery point, and what follows it.

Queued. A backup job is recorded `InProgress` (phase `Queued`) the moment it is asked for and
waits in its vault's queue (queue.py, dispatcher.py) until its agent is online and the vault
has a free slot; a VM never has two jobs at once (runner.py). A manual backup of a VM whose
agent has been gone longer than `RECONNECT_GRACE_SECONDS` is refused at once (one that left
moments ago is likely reconnecting, and its backup waits for it); a scheduled one waits until
its window closes (the scheduler's deadline, which already allows for a late start) and then
fails with `BackupWindowMissed`, saying its agent did not come back. A cancel of a queued
backup ends it at once; it never reaches the agent. Many manual backups (`backup-now` of a
fleet) are queued together in one catalog transaction (`queue_many`).

Back to the queue. A backup whose agent's session ends (or was found gone) before the agent
acknowledged its command never began in the agent (an agent's commands end with its session):
it goes back to the front of its queue, its slot freed and its transaction dropped, and waits
for the agent's next session within its window, instead of failing because of a blip.

Started. The job opens its transaction (transaction.py: known digests, chunk holds, indexes)
against the recovery point it builds on, and sends the agent its command (agent_command.py).
The recovery point is committed in this order, so that it is visible only when complete: every
chunk is durable (checked as each index arrives), the indexes are written, then the manifest
(the datastore's commit point), then the catalog row, then the job's status, which only then
names it (`recovery_point_id`; until then it is the job's `pending_recovery_point_id`, which a
restart uses to find a manifest committed just before a stop). A cancel is refused once the
commit has begun; before, it stops the backup before its manifest is written, so a cancelled
backup leaves no recovery point.

Ended, whatever the outcome: its chunk holds are released, its vault slot is freed, the bytes
it stored are counted to the vault (they are in the datastore until collected), and the
`on_ended` listener runs (the protection manager updates the item and, after a success, runs
a Prune job of the VM).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

from controller.catalog import Catalog, JobRecord, RecoveryPointRecord
from controller.datastores import Datastores
from controller.integrity import Integrity
from controller.jobs.agent_command import AgentJob, run_command
from controller.jobs.agent_command import cancel as cancel_agent_job
from controller.jobs.dispatcher import Dispatcher
from controller.jobs.outcome import Outcome, cancelled
from controller.jobs.runner import JobRunner, NotStarted
from controller.jobs.transaction import BackedUpDisk, BackupTransaction
from controller.registry import AgentRegistry
from shared.clock import Clock
from shared.digest import DIGEST_SIZE
from shared.errors import (
    AgentDisconnected,
    AgentLimitExceeded,
    AgentUnreachable,
    BackupWindowMissed,
    Conflict,
    DiskNotFound,
    InvalidArgument,
    JobCancelled,
)
from shared.index import chunk_count
from shared.model import JobStatus, Operation, Trigger, Verification, weakest
from shared.rpc import agent_pb2

log = logging.getLogger(__name__)

# A manual backup waits this long in the queue for its agent before it fails (by default:
# controller.toml `[jobs] manual_window_seconds`).
MANUAL_BACKUP_WINDOW_SECONDS = 2 * 3600.0
# A manual backup of a VM whose agent left less than this long ago is queued for its return.
RECONNECT_GRACE_SECONDS = 300.0
QUEUED = "Queued"

BackupEnded = Callable[[JobRecord], Awaitable[None]]


@dataclass(eq=False)
class RunningBackup(AgentJob):
    requested_disks: tuple[str, ...] = ()
    """The disks asked for (none: every disk the agent has)."""
    deadline: float = 0.0
    """When its window closes, if it has not started by then."""
    started: bool = False
    committing: bool = False
    transaction: BackupTransaction | None = None
    """Open from its start until its end."""
    vm: dict[str, str] = field(default_factory=dict)
    declared: dict[str, int] = field(default_factory=dict)
    """The disks the agent's hello declared when the backup started, and their sizes: an
    index is taken only for one of them, and no larger."""
    streams: set[str] = field(default_factory=set)
    """The data streams (upload, index) the agent has open for the job: one of each at most."""

    @property
    def previous(self) -> RecoveryPointRecord | None:
        return self.transaction.previous if self.transaction else None

    @property
    def chunk_size(self) -> int:
        assert self.transaction is not None, "the backup has not started"
        return self.transaction.chunk_size

    @contextlib.contextmanager
    def stream(self, kind: str) -> Iterator[None]:
        """Hold the job's one `kind` stream (upload, index) while the block runs."""
        if kind in self.streams:
            raise AgentLimitExceeded(
                vm_id=self.vm_id, detail=f"one {kind} stream at a time per backup job"
            )
        self.streams.add(kind)
        try:
            yield
        finally:
            self.streams.discard(kind)

    def index_bytes(self, disk: str, size_bytes: int, chunk_size: int) -> int:
        """The digest bytes an index of `disk` (`size_bytes`, in chunks of `chunk_size`) has,
        once it is checked to be one this backup may take: of a disk the backup is for and
        the agent declared, no larger than declared, with the job's chunk size, not yet
        taken."""
        assert self.transaction is not None, "the backup has not started"
        if chunk_size != self.transaction.chunk_size:
            raise InvalidArgument(
                detail=f"index chunk size {chunk_size} is not the job's {self.chunk_size}"
            )
        if disk not in self.record.disks:
            raise InvalidArgument(
                detail=f"backup {self.id} is not for a disk {disk!r}; it is for "
                f"{', '.join(self.record.disks) or 'no disk'}"
            )
        declared = self.declared.get(disk)
        if declared is None:
            raise InvalidArgument(detail=f"the agent's hello declared no disk {disk!r}")
        if not 0 <= size_bytes <= declared:
            raise InvalidArgument(
                detail=f"the index of disk {disk!r} is for {size_bytes} bytes, but the agent "
                f"declared the disk {declared} bytes large in its hello (a disk that grew is "
                "declared again when the agent reconnects)"
            )
        if disk in self.transaction.indexes:
            raise Conflict(detail=f"the index of disk {disk!r} was taken already")
        return chunk_count(size_bytes, chunk_size) * DIGEST_SIZE


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")


class Backups:
    """Queues, starts and ends the backup jobs; owns the backup dispatcher."""

    def __init__(
        self,
        catalog: Catalog,
        registry: AgentRegistry,
        datastores: Datastores,
        runner: JobRunner,
        clock: Clock,
        pool: Executor,
        integrity: Integrity | None = None,
        *,
        manual_window: float = MANUAL_BACKUP_WINDOW_SECONDS,
    ) -> None:
        self._catalog = catalog
        self._manual_window = manual_window
        self._registry = registry
        self._datastores = datastores
        self._runner = runner
        self._clock = clock
        self._pool = pool
        self._integrity = integrity
        self.dispatcher: Dispatcher[RunningBackup] = Dispatcher(
            clock, registry.online, self._start, self._expire
        )
        self.on_ended: BackupEnded | None = None

    # --- queued --------------------------------------------------------------------------------

    async def queue(
        self,
        vault: str,
        vm_id: str,
        *,
        disks: Sequence[str] = (),
        trigger: Trigger = Trigger.MANUAL,
        slot: float | None = None,
        deadline: float | None = None,
    ) -> JobRecord:
        """Queue a backup of `vm_id` into `vault`; it starts when its agent and a slot are free."""
        self._check(vm_id, disks, trigger)
        limit = (await self._catalog.vault(vault)).max_concurrent_backups
        running = self._new(vault, vm_id, disks, trigger, slot, deadline)
        await self._runner.admit(running)
        self.dispatcher.enqueue(vault, running, limit)
        return running.record

    async def queue_many(
        self, backups: Sequence[tuple[str, str]], *, disks: Sequence[str] = ()
    ) -> list[JobRecord]:
        """Queue manual backups of (vault, VM id) pairs together: each is checked first, and
        all are recorded in one transaction (or none, when one is refused)."""
        for _, vm_id in backups:
            self._check(vm_id, disks, Trigger.MANUAL)
        limits = {
            vault: (await self._catalog.vault(vault)).max_concurrent_backups
            for vault in {vault for vault, _ in backups}
        }
        queued = [
            self._new(vault, vm_id, disks, Trigger.MANUAL, None, None) for vault, vm_id in backups
        ]
        await self._runner.admit_many(queued)
        for running in queued:
            self.dispatcher.enqueue(running.record.vault, running, limits[running.record.vault])
        return [running.record for running in queued]

    def _check(self, vm_id: str, disks: Sequence[str], trigger: Trigger) -> None:
        """A manual backup of an agent gone for good is refused, as is a disk it lacks."""
        session = self._registry.session(vm_id)
        if trigger is Trigger.MANUAL and not self._registry.left_within(
            vm_id, RECONNECT_GRACE_SECONDS
        ):
            raise AgentUnreachable(vm_id=vm_id)
        if session is not None:
            known = [d.name for d in session.hello.disks]
            for disk in disks:
                if disk not in known:
                    raise DiskNotFound(vm_id=vm_id, disk=disk, known=", ".join(known))

    def _new(
        self,
        vault: str,
        vm_id: str,
        disks: Sequence[str],
        trigger: Trigger,
        slot: float | None,
        deadline: float | None,
    ) -> RunningBackup:
        job = self._runner.new_record(
            Operation.BACKUP,
            vault,
            vm_id,
            trigger=trigger,
            slot=slot,
            disks=tuple(disks),
            pending_recovery_point_id=secrets.token_hex(8),
            details={"phase": QUEUED},
        )
        running = RunningBackup(
            job,
            exclusive=True,
            requested_disks=tuple(disks),
            deadline=(job.started_at + self._manual_window if deadline is None else deadline),
        )
        running.after_end += [
            partial(self._release, running),
            partial(self._count_stored, running),
            partial(self._spread_damage, running),
            partial(self._tell, running),
        ]
        return running

    def _expire(self, running: RunningBackup, agent_online: bool) -> None:
        job = running.record
        job.details.pop("phase", None)
        self._runner.end_soon(
            running,
            Outcome(
                JobStatus.FAILED,
                BackupWindowMissed.code,
                BackupWindowMissed(
                    vm=job.vm_id,
                    slot=_iso(job.slot if job.slot is not None else job.started_at),
                    deadline=_iso(running.deadline),
                    reason="the vault's other backups used every slot"
                    if agent_online
                    else "its agent was not connected, and did not come back within the window",
                    fix="Raise the vault's concurrent backups or spread the policies' "
                    "schedules; the next scheduled backup will try again."
                    if agent_online
                    else "Check that the VM runs and its agent is connected (`coffer "
                    "agents`); the next scheduled backup will try again, or run "
                    "`coffer backup-now`.",
                ).message,
            ),
        )

    # --- running -------------------------------------------------------------------------------

    def _start(self, running: RunningBackup) -> None:
        running.started = True
        self._runner.start(running, partial(self._run, running))

    async def _run(self, running: RunningBackup) -> None:
        try:
            await self._attempt(running)
        except (AgentDisconnected, AgentUnreachable):
            if (
                running.acknowledged
                or running.cancel_requested
                or self._clock.now() >= running.deadline
            ):
                raise
            await self._requeue(running)
            raise NotStarted from None

    async def _requeue(self, running: RunningBackup) -> None:
        """The agent left before it took the backup: back to the front of the queue, to wait
        for the agent's next session (the slot is another's meanwhile)."""
        job = running.record
        log.info("backup %s of %s waits for its agent to come back", job.id, job.vm_id)
        if running.transaction is not None:
            running.transaction.release()
            running.transaction = None
        running.started = False
        running.sent_at = running.heard_at = 0.0
        job.details.pop("base", None)
        job.details["phase"] = QUEUED
        self.dispatcher.ended(job.vault)
        self.dispatcher.put_back(job.vault, running)
        await self._runner.save(running)

    async def _attempt(self, running: RunningBackup) -> None:
        job = running.record
        job.details.pop("phase", None)
        session = self._registry.get(job.vm_id)
        datastore = await self._datastores.get(job.vault)
        previous = await self._catalog.latest_recovery_point(job.vm_id)
        if previous is not None and previous.vault != job.vault:
            previous = None  # registered anew to another vault: a full backup
        if previous is not None and self._datastores.in_old_format(job.vault, previous.id):
            # The vault is being upgraded and its point is not converted yet: its digests are
            # another hash's. The agent reads the disk in full; in a vault that is one trust
            # domain (shared_dedup), chunks the upgrade has already converted are found stored
            # and not sent; otherwise every chunk is sent again (a VM's own chunks are its base's,
            # and it has none here: jobs/transaction.py).
            job.details["base"] = (
                f"none: {previous.id} is not converted to the vault's new format yet, so the "
                "disk was read in full"
            )
            previous = None
        running.transaction = BackupTransaction(
            job_id=job.id,
            rp_id=job.pending_recovery_point_id,
            datastore=datastore,
            guard=self._datastores.guard(job.vault),
            catalog=self._catalog,
            pool=self._pool,
            previous=previous,
            on_stored=partial(self._stored, running),
            vault=job.vault,
            health=await self._datastores.health(job.vault),
            integrity=self._integrity,
            shared_dedup=(await self._catalog.vault(job.vault)).shared_dedup,
        )
        running.declared = {d.name: d.size_bytes for d in session.hello.disks}
        running.vm = {
            "name": session.hello.name,
            "service": session.hello.service,
            "region": session.hello.region,
            "hostname": session.hello.hostname,
        }
        job.disks = running.requested_disks or tuple(d.name for d in session.hello.disks)
        full_read_days = (await self._catalog.vault(job.vault)).full_read_days
        await self._runner.save(running)
        result = await run_command(
            running,
            session,
            agent_pb2.ControllerMessage(
                backup=agent_pb2.BackupCommand(
                    job_id=job.id,
                    chunk_size=datastore.chunk_size,
                    disks=list(running.requested_disks),
                    previous_recovery_point_id=previous.id if previous else "",
                    # The agent names chunks as the datastore does (never logged).
                    chunk_id_key=datastore.chunk_hash.key or b"",
                    # Changed-block tracking (agent/tracking.py): the agent keeps its clones
                    # under this point's id, and compares with them only when the next
                    # backup builds on it.
                    recovery_point_id=job.pending_recovery_point_id,
                    full_read_days=full_read_days,
                    full_read_reason=await self._distrusted(previous),
                )
            ),
            self._runner.deadlines,
        )
        await self._commit(running, result)

    async def _distrusted(self, previous: RecoveryPointRecord | None) -> str:
        """Why the agent may not take unchanged chunks from `previous` ('' when it may).

        A point a verify (or a failed read) found damaged is not built on without reading:
        its damaged chunks are masked in the index the agent gets and so read again anyway,
        but damage that is not a chunk's (an index) says the point itself is in doubt."""
        if previous is None:
            return ""
        found = (await self._catalog.verifications([previous.id])).get(previous.id)
        if found is not None and found.state is Verification.DAMAGED:
            return (
                f"the previous recovery point {previous.id} was found damaged, so no chunk is "
                "taken from it unread"
            )
        return ""

    @staticmethod
    def _stored(running: RunningBackup, stored: int) -> None:
        running.record.bytes_stored += stored
        running.touch()

    async def _commit(self, running: RunningBackup, result: agent_pb2.CommandResult) -> None:
        job, transaction = running.record, running.transaction
        assert transaction is not None
        for disk in result.disks:
            # Checked against what the agent declared, before anything is recorded: a disk
            # yields at most its size (its chunks are never sent larger than read).
            declared = running.declared.get(disk.disk, 0)
            if disk.bytes_read > declared or disk.bytes_sent > declared:
                raise InvalidArgument(
                    detail=f"the agent reports {disk.bytes_read} bytes read and "
                    f"{disk.bytes_sent} sent of disk {disk.disk[:64]!r}, which it declared "
                    f"{declared} bytes large"
                )
        for disk in result.disks:
            job.bytes_read += disk.bytes_read
            job.bytes_sent += disk.bytes_sent
        manifest = transaction.manifest(
            vm_id=job.vm_id,
            vault=job.vault,
            created_at=datetime.fromtimestamp(self._clock.now(), UTC),
            consistency=weakest([result.consistency or "crash"]),
            disks=[
                BackedUpDisk(d.disk, weakest([d.consistency or "crash"]), d.snapshot_provider)
                for d in result.disks
            ],
            expected=job.disks,
            vm=running.vm,
        )
        if running.cancel_requested:
            raise JobCancelled(job_id=job.id)
        # From here the recovery point is being committed: a cancel is refused, not half done.
        running.committing = True
        job.details["frozen_ms"] = round(result.frozen_ms, 1)
        job.details["consistency"] = {
            d.disk: f"{d.consistency or 'crash'} ({d.snapshot_provider or 'live'})"
            for d in result.disks
        }
        # How each disk was read: only its changed blocks, or in full and why (agent.tracking).
        job.details["reads"] = {
            d.disk: {
                "changed_blocks": d.changed_blocks,
                "full_read_reason": d.full_read_reason,
                "bytes_read": d.bytes_read,
                "size_bytes": d.size_bytes,
            }
            for d in result.disks
        }
        rp = await transaction.commit(manifest)
        # Begun before its vault was switched to a new format, it committed into the old one.
        self._datastores.committed(job.vault, rp.id, transaction.datastore)
        job.recovery_point_id = rp.id

    # --- cancelled -----------------------------------------------------------------------------

    async def cancel(self, running: RunningBackup) -> JobRecord:
        job = running.record
        if running.committing:
            raise Conflict(
                detail=f"backup {job.id} is committing its recovery point and can no longer "
                "be cancelled; delete the recovery point afterwards if it is not wanted"
            )
        if running.cancel_requested:
            return job
        if self.dispatcher.withdraw(job.vault, running):
            running.cancel_requested = True
            job.details.pop("phase", None)
            await self._runner.end(running, cancelled(job))
            return job
        await cancel_agent_job(running, self._runner, self._registry)
        return job

    # --- ended ---------------------------------------------------------------------------------

    async def _release(self, running: RunningBackup) -> None:
        if running.transaction is not None:
            running.transaction.release()
        if running.started:
            self.dispatcher.ended(running.record.vault)

    async def _count_stored(self, running: RunningBackup) -> None:
        job = running.record
        # What it uploaded is in the datastore until collected, also when it failed. A backup
        # the stop cut short is counted by the next start, with its failure.
        if not self._runner.left_for_next_start(job):
            await self._catalog.add_stored_bytes(job.vault, job.bytes_stored)

    async def _spread_damage(self, running: RunningBackup) -> None:
        """Chunks of its base found missing damage the vault's other recovery points that
        reference them too: found now, when the backup no longer waits for it."""
        transaction = running.transaction
        if transaction is None or self._integrity is None or not transaction.found_missing:
            return
        lost = {
            digest: reason
            for digest, reason in transaction.found_missing.items()
            if digest not in transaction.repaired
        }
        base = transaction.previous.id if transaction.previous is not None else ""
        await self._integrity.spread(
            running.record.vault, lost, by=running.record.id, exclude={base}
        )

    async def _tell(self, running: RunningBackup) -> None:
        job = running.record
        if self.on_ended is not None and not self._runner.left_for_next_start(job):
            await self.on_ended(job)

    def in_use(self) -> set[str]:
        """Recovery points running backups build on."""
        return {
            running.previous.id
            for running in self._runner
            if isinstance(running, RunningBackup) and running.previous is not None
        }
