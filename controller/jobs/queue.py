"""A vault's backup queue: which queued backups may start now, and which waited too long.

Pure: no I/O, no clock of its own. `VaultQueue.take(now, online)` looks at the queued backups
in the order they were asked for, the vault's limit of concurrent backups
(`max_concurrent_backups`), how many of its backups are running, which agents are online and
the time it is given, and returns a `Decision`:

- `expired`: backups whose window closed before they could start (with whether their agent
  was online, which says why: no free slot, or no agent);
- `start`: backups whose agent is online, while the vault has a free slot, in queue order (an
  offline VM does not hold up the ones behind it);
- `next_deadline`: when the nearest window of those still waiting closes.

The backups a decision names leave the queue in the same step and those it starts count
against the limit until `ended`: once taken, a backup can no longer be withdrawn by a cancel,
and a cancelled (withdrawn) one is never taken. The caller acts on the decision afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Waiting(Protocol):
    """What the queue needs of a queued backup."""

    @property
    def vm_id(self) -> str: ...

    @property
    def deadline(self) -> float:
        """When its window closes (seconds since the epoch)."""
        ...


W = TypeVar("W", bound=Waiting)


@dataclass(frozen=True)
class Expired(Generic[W]):
    backup: W
    agent_online: bool


@dataclass(frozen=True)
class Decision(Generic[W]):
    start: tuple[W, ...] = ()
    expired: tuple[Expired[W], ...] = ()
    next_deadline: float | None = None


class VaultQueue(Generic[W]):
    """One vault's queued backups, its limit, and how many of its backups are running."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self._waiting: list[W] = []

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def waiting(self) -> tuple[W, ...]:
        return tuple(self._waiting)

    def add(self, backup: W) -> None:
        self._waiting.append(backup)

    def put_back(self, backup: W) -> None:
        """A backup `take` started did not begin: first in the queue again."""
        self._waiting.insert(0, backup)

    def withdraw(self, backup: W) -> bool:
        """Take a queued backup out (a cancel); False if it is no longer queued."""
        for position, queued in enumerate(self._waiting):
            if queued is backup:
                del self._waiting[position]
                return True
        return False

    def take(self, now: float, online: Callable[[str], bool]) -> Decision[W]:
        """Decide what starts and what expired at `now`; both leave the queue."""
        start: list[W] = []
        expired: list[Expired[W]] = []
        waiting: list[W] = []
        for backup in self._waiting:
            if now >= backup.deadline:
                expired.append(Expired(backup, online(backup.vm_id)))
            elif self.running < self.limit and online(backup.vm_id):
                self.running += 1
                start.append(backup)
            else:
                waiting.append(backup)
        self._waiting = waiting
        nearest = min((backup.deadline for backup in waiting), default=None)
        return Decision(tuple(start), tuple(expired), nearest)

    def ended(self) -> None:
        """A backup `take` started has ended: its slot is free."""
        self.running = max(0, self.running - 1)
