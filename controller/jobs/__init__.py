"""Jobs: every operation, from the request that starts it to its recorded outcome.

This note is the map of the package. The job layer is the controller's authority on what runs:
every operation an operator asks for or the schedule starts is a job with a record in the
catalog, and each part below can be read (and is tested) on its own.

    manager.py       JobManager: the one door for the rest of the controller (thin)
    runner.py        the one place a job is recorded, run as a task, and its outcome written
    outcome.py       how a job's end maps to status, error code and message (pure)
    cancel.py        how a cancelled job's work stops between items, never inside one
    queue.py         a vault's backup queue: its limit, its counters, what may start and
                     what expired (pure decisions from the queue, who is online, the time)
    dispatcher.py    the long-lived loop that acts on those decisions (supervised, RESTART)
    agent_command.py a job's command down the agent's session, its result, and cancel
    backup.py        backup jobs: queued, started, committed, and what follows them
    transaction.py   a backup's transaction: known digests, chunk holds, indexes, commit
    restore.py       restore jobs and their session: the recovery point, disk, index and
                     the chunks the agent may read; to an image, in place, to another VM
    drill.py         restore drills: a recovery point restored on a drill agent, checked
                     read-only, recorded on the recovery point; one at a time per agent
    file_recovery.py FileRecovery jobs (ls, get, mount): a restore's session in the target
                     VM's agent, what it has open, its TTL and unmount, bounded listings
    interrupted.py   what the last stop left running, recorded at the next start

Guarantees
----------
- One job per VM: a backup (queued or running) or a restore has its VM (the target VM) to
  itself; a second is refused with `OperationInProgress`, not queued behind a stuck one. A
  drill does not hold its VM; drills wait their turn on their drill agent. A file recovery
  does not need its VM alone (a backup may run beside an open mount).
- Who reads: an agent's data-path calls name a running job whose `agent_vm` is the caller's VM
  (the job's VM, but a drill's drill agent, a file recovery's target VM), and a restore's
  agent reads only the chunks of the disk it restores.
- Backups queue: recorded `InProgress` (phase `Queued`) at once, started when the agent is
  online and the vault has a free slot (`max_concurrent_backups`); a queued backup whose window
  closes first fails with `BackupWindowMissed`. The dispatcher is woken by the events that can
  change its answer and the nearest deadline, never by a timer over the vault's items.
- Commit order: every chunk durable (checked as each index arrives), indexes, the manifest (the
  datastore's commit point), the catalog row, then the job's status, which only then names
  the recovery point. Digests a backup relies on before a manifest references them are held in
  the vault's `ChunkGuard`, so garbage collection can run beside it.
- Cancel: a queued backup ends `Cancelled` at once; a running backup, restore or drill is
  cancelled in its agent (and refused once a backup is committing), so a cancelled backup
  leaves no recovery point and a cancelled drill no scratch image; a drill waiting for its
  agent ends at once; a prune, garbage collection or verify stops between items; other jobs
  are short and run to their end.
- Outcomes: every job ends through the runner, whatever raised; nothing a job raises stops
  another job, the dispatcher or the controller. A job the controller's stop cuts short is
  recorded by the next start (`ControllerRestarted`), and a scheduled backup it interrupted
  runs again for its slot (the protection manager does that).
- Records are typed: what decides (trigger, schedule slot, disks, pending recovery point) are
  columns of the job; `details` is only for display.
"""

from controller.jobs.agent_command import CANCEL_GRACE_SECONDS, AgentJob
from controller.jobs.backup import MANUAL_BACKUP_WINDOW_SECONDS, BackupEnded, RunningBackup
from controller.jobs.manager import DISPATCHER_TASK, JobManager
from controller.jobs.restore import RestoreSession, RunningRestore
from controller.jobs.runner import RunningJob
from controller.jobs.transaction import BackupTransaction, data_bytes

__all__ = [
    "CANCEL_GRACE_SECONDS",
    "DISPATCHER_TASK",
    "MANUAL_BACKUP_WINDOW_SECONDS",
    "AgentJob",
    "BackupEnded",
    "BackupTransaction",
    "JobManager",
    "RestoreSession",
    "RunningBackup",
    "RunningJob",
    "RunningRestore",
    "data_bytes",
]
