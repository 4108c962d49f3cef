"""Consistency: the order of a consistent snapshot, and the consistency it reached per disk.

    pre-script → sync → freeze every mounted file system on the disks → snapshot each disk
    → thaw → post-script → (the caller reads the snapshots) → release the snapshots

`consistent_snapshot(disks, policy)` is an async context manager that does all of it and
yields a `SnapshotSet`: per disk, the path to read and the consistency reached, plus the time
the file systems were frozen and the warnings for the job. Leaving it releases everything, in
every case.

- `sync` runs before the freeze: FIFREEZE writes back everything cached, and most of that is
  done while writers may still write, so the frozen window is shorter. With nothing to freeze
  (no file system of the disks mounted here, or `freeze` off), only the disks themselves are
  flushed (fsync of each image file or device): what a snapshot takes is written, and the
  backup does not wait for every other file system of the machine to write back.
- The thaw watchdog (`agent.thaw_watchdog`) is started before the pre-script and holds every
  file system before it is frozen: whatever happens to this process, nothing stays frozen past
  `thaw_deadline` seconds.
- With atomic snapshots (reflink clones) the file systems are thawed as soon as every disk is
  snapshotted, and the post-script runs then, before the caller starts reading. A disk read
  while frozen keeps its file systems frozen until the caller is done with it (the post-script
  runs after that thaw); if the deadline passes first, the watchdog thaws them and the read is
  not consistent: `ExtensionSnapshotFailed`.
- Consistency per disk, strongest first: `application` (the pre-script succeeded and every file
  system on the disk stayed frozen until its snapshot was complete), `file-system` (the same
  without a successful pre-script), `crash` (some file system on the disk could not be frozen,
  or the freeze was cut short). A disk on which no file system is mounted has nothing cached
  to flush: its consistency is that of a frozen one. The recovery point's is the weakest.
- A file system that cannot be frozen (EOPNOTSUPP, e.g. vfat; network file systems) is skipped
  with a warning; one whose freeze fails or times out makes its disk crash-consistent with a
  warning, or fails the backup with `UserErrorFsFreezeFailed` when `require_freeze` is set.
- A failed pre-script fails the backup (`PreScriptFailed`) unless `continue_on_failure`; the
  post-script runs whenever the pre-script ran, so what it quiesced is resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Self

from pydantic import model_validator

from agent.disk_use import in_use_unseen, mounts_on_disk
from agent.freeze import FreezeState, Mount, MountFreeze, mounts
from agent.scripts import Phase, Script, ScriptSection, error_for, run_script
from agent.snapshot import DEFAULT_ORDER, PROVIDERS, SnapshotProvider, choose
from agent.thaw_watchdog import ThawWatchdog
from shared.config import Seconds, Section, one_of, validate
from shared.errors import (
    ExtensionSnapshotFailed,
    PostScriptFailed,
    UserErrorFsFreezeFailed,
)
from shared.model import Consistency, weakest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsistencyPolicy:
    """How a VM's backups are made consistent (the `[consistency]` table of the agent config)."""

    pre_script: Script | None = None
    post_script: Script | None = None
    freeze: bool = True
    require_freeze: bool = False  # a failed freeze fails the backup instead of `crash`
    freeze_timeout: float = 10.0  # seconds for one FIFREEZE to return
    thaw_deadline: float = 30.0  # seconds from the first freeze to the watchdog's thaw
    providers: tuple[str, ...] = DEFAULT_ORDER
    disk_providers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @staticmethod
    def from_toml(raw: Mapping[str, Any]) -> ConsistencyPolicy:
        """The policy of a `[consistency]` table."""
        return validate(ConsistencySection, raw, "[consistency]", at=("consistency",)).policy()

    def order_for(self, disk: str) -> tuple[str, ...]:
        return self.disk_providers.get(disk, self.providers)


# A snapshot provider's name, as `snapshot` lists them in the agent config.
ProviderName = Annotated[str, one_of(PROVIDERS, "snapshot provider")]


class ConsistencySection(Section):
    """The `[consistency]` table of the agent config."""

    pre_script: ScriptSection | None = None
    post_script: ScriptSection | None = None
    freeze: bool = True
    require_freeze: bool = False
    freeze_timeout: Seconds = 10.0
    thaw_deadline: Seconds = 30.0
    snapshot: list[ProviderName] = list(DEFAULT_ORDER)

    @model_validator(mode="after")
    def _deadline_after_timeout(self) -> Self:
        if self.thaw_deadline <= self.freeze_timeout:
            raise ValueError(
                f"thaw_deadline ({self.thaw_deadline:g} s) must be longer than freeze_timeout "
                f"({self.freeze_timeout:g} s): the watchdog would thaw a file system while "
                "its freeze may still be under way"
            )
        return self

    def policy(self) -> ConsistencyPolicy:
        return ConsistencyPolicy(
            pre_script=self.pre_script.script() if self.pre_script is not None else None,
            post_script=self.post_script.script() if self.post_script is not None else None,
            freeze=self.freeze,
            require_freeze=self.require_freeze,
            freeze_timeout=self.freeze_timeout,
            thaw_deadline=self.thaw_deadline,
            providers=tuple(self.snapshot),
        )


@dataclass(frozen=True)
class MountOutcome:
    mountpoint: Path
    fstype: str
    state: FreezeState
    detail: str = ""


@dataclass
class DiskSnapshot:
    name: str
    source: Path  # the disk
    read_path: Path  # what to read: the snapshot, or the disk itself when read while frozen
    provider: str
    consistency: Consistency = Consistency.CRASH
    mounts: list[MountOutcome] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # providers tried first, and why not


@dataclass
class SnapshotSet:
    disks: dict[str, DiskSnapshot]
    consistency: Consistency = Consistency.CRASH
    frozen_ms: float = 0.0  # first FIFREEZE to last thaw; final once the context is left
    warnings: list[str] = field(default_factory=list)
    pre_script_ok: bool | None = None  # None: no pre-script
    post_script_ok: bool | None = None

    def read_path(self, disk: str) -> Path:
        return self.disks[disk].read_path


class _Run:
    """One consistent snapshot: the state between the steps, and their undoing."""

    def __init__(
        self,
        disks: Sequence[tuple[str, Path]],
        policy: ConsistencyPolicy,
        env: Mapping[str, str],
        stack: contextlib.AsyncExitStack,
    ) -> None:
        self.disks = disks
        self.policy = policy
        self.env = {**env, "COFFER_DISKS": ",".join(name for name, _ in disks)}
        self.stack = stack
        self.providers: dict[str, SnapshotProvider] = {}
        self.freezes: dict[str, list[MountFreeze]] = {}  # per disk
        self.watchdog: ThawWatchdog | None = None
        self.freeze_started: float | None = None
        self.last_thaw: float | None = None
        self.post_script_done = False
        self.unseen: set[str] = set()
        self.result = SnapshotSet(disks={})

    # -- steps ----------------------------------------------------------------------------

    async def start(self) -> SnapshotSet:
        refused: dict[str, dict[str, str]] = {}
        for name, path in self.disks:
            self.providers[name], refused[name] = choose(name, path, self.policy.order_for(name))
        await self._pre_script()
        # The mount table is read after the pre-script, which may have changed it.
        on_disk = self._mounts() if self.policy.freeze else {}
        # A disk with no file system mounted here, yet held: mounted in another mount
        # namespace, where it cannot be frozen from here. It is not rated as if frozen.
        self.unseen = {
            name for name, path in self.disks if not on_disk.get(name) and in_use_unseen(path)
        }
        if any(on_disk.values()):
            self.watchdog = await self.stack.enter_async_context(
                ThawWatchdog(self.policy.thaw_deadline)
            )
            self.stack.callback(self._watch_what_may_still_freeze)
        if any(on_disk.values()):
            await asyncio.to_thread(os.sync)
        else:
            await asyncio.to_thread(_flush, [path for _, path in self.disks])
        await self._freeze(on_disk)
        for name, path in self.disks:
            provider = self.providers[name]
            # The clone is made in a thread that a cancellation does not stop: its release
            # waits for it, or a clone finished after the release would be left behind.
            take = asyncio.ensure_future(asyncio.to_thread(provider.take))
            self.stack.push_async_callback(self._release_after, provider, take)
            read_path = await asyncio.shield(take)
            self.result.disks[name] = DiskSnapshot(
                name, path, read_path, provider.name, refused=refused[name]
            )
        held = [name for name, p in self.providers.items() if not p.atomic]
        expired = self._expired()  # before the early thaw: did the freeze hold through takes?
        await self._thaw([name for name in self.providers if name not in held])
        for name, _ in self.disks:
            # A disk still frozen is rated as if the freeze holds; `finish` rates it again.
            self._rate(name, expired)
        if not held:
            await self._post_script()
        self._summarise()
        return self.result

    async def finish(self, body_failed: bool) -> None:
        """After the caller has read: thaw what is still frozen, rate those disks."""
        held = [name for name, p in self.providers.items() if not p.atomic]
        if not held:
            return
        expired = self._expired()
        await self._thaw(held)
        for name in held:
            if name in self.result.disks:
                self._rate(name, expired)
        self._summarise()
        if expired and not body_failed and any(self.freezes.get(name) for name in held):
            disk = next(name for name in held if self.freezes.get(name))
            raise ExtensionSnapshotFailed(
                disk=disk,
                provider="read-while-frozen",
                cause=f"reading the disk took longer than the thaw deadline of "
                f"{self.policy.thaw_deadline:g} s, so the watchdog thawed its file systems "
                f"while it was read; what was read is not consistent",
                fix="Put the disk image on XFS (made with reflink=1) or btrfs so that it can "
                "be cloned instantly, or raise `thaw_deadline`.",
            )
        if body_failed:
            # The caller's failure is the one to report; the post-script's is a log line.
            try:
                await self._post_script()
            except PostScriptFailed as exc:
                log.warning("%s", exc)
        else:
            await self._post_script()

    # -- helpers --------------------------------------------------------------------------

    def _mounts(self) -> dict[str, list[Mount]]:
        table = mounts()
        found: dict[str, list[Mount]] = {}
        seen: set[Path] = set()
        for name, path in self.disks:
            found[name] = [m for m in mounts_on_disk(path, table) if m.mountpoint not in seen]
            seen.update(m.mountpoint for m in found[name])
        return found

    @staticmethod
    async def _release_after(provider: SnapshotProvider, take: asyncio.Future[Path]) -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(take)  # its failure is reported where it was awaited
        await asyncio.to_thread(provider.release)

    def _watch_what_may_still_freeze(self) -> None:
        """Leaving: a FIFREEZE abandoned or still under way may land after we are gone, so
        the watchdog is left to thaw it (closed without `done`)."""
        if self.watchdog is not None and any(
            f.state is FreezeState.ABANDONED or f.in_flight
            for freezes in self.freezes.values()
            for f in freezes
        ):
            self.watchdog.keep_watching = True

    async def _post_script_on_exit(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        """The post-script runs whatever happens; when something failed already, that
        failure is the one reported and the post-script's is a warning in the log."""
        if exc_type is None:
            await self._post_script()
        else:
            try:
                await self._post_script()
            except PostScriptFailed as error:
                log.warning("%s", error)
        return False

    async def _pre_script(self) -> None:
        script = self.policy.pre_script
        if script is None:
            return
        # From here on the post-script runs whatever happens: it resumes what was quiesced.
        self.stack.push_async_exit(self._post_script_on_exit)
        result = await run_script(script, Phase.PRE, self.env)
        self.result.pre_script_ok = result.ok
        if not result.ok:
            error = error_for(script, Phase.PRE, result)
            if not script.continue_on_failure:
                raise error
            self.result.warnings.append(f"{error.code}: {error} (the backup went on)")

    async def _post_script(self) -> None:
        script = self.policy.post_script
        if script is None or self.post_script_done:
            return
        self.post_script_done = True
        result = await run_script(script, Phase.POST, self.env)
        self.result.post_script_ok = result.ok
        if not result.ok:
            error = error_for(script, Phase.POST, result)
            if not script.continue_on_failure:
                raise error
            self.result.warnings.append(f"{error.code}: {error} (the backup went on)")

    async def _freeze(self, on_disk: Mapping[str, list[Mount]]) -> None:
        # Open and arm every file system first, so the frozen window holds only the freezes.
        for name, found in on_disk.items():
            self.freezes[name] = []
            for mount in found:
                freeze = MountFreeze(mount)
                self.stack.callback(freeze.close)
                self.freezes[name].append(freeze)
                if freeze.state is FreezeState.OPEN:
                    assert self.watchdog is not None
                    await self.watchdog.arm(mount.mountpoint, mount.device)
        for name, freezes in self.freezes.items():
            # The thaw of the whole set is pushed once: it runs before each freeze.close.
            for freeze in freezes:
                if freeze.state is not FreezeState.OPEN:
                    continue
                if self.freeze_started is None:
                    self.freeze_started = time.monotonic()
                    self.stack.push_async_callback(self._thaw_all)
                state = await asyncio.to_thread(freeze.freeze, self.policy.freeze_timeout)
                if state is FreezeState.FROZEN:
                    continue
                mount = freeze.mount
                if state is not FreezeState.SKIPPED and self.policy.require_freeze:
                    raise UserErrorFsFreezeFailed(
                        mountpoint=str(mount.mountpoint),
                        fstype=mount.fstype,
                        disk=name,
                        cause=freeze.detail,
                    )
        for name, freezes in self.freezes.items():
            for freeze in freezes:
                if freeze.state is not FreezeState.FROZEN:
                    mount = freeze.mount
                    self.result.warnings.append(
                        f"disk {name!r}: the file system at {mount.mountpoint} ({mount.fstype}) "
                        f"was not frozen ({freeze.state}: {freeze.detail}); the disk is only "
                        "crash-consistent"
                    )

    async def _thaw(self, disks: Sequence[str]) -> None:
        """Thaw the disks' file systems, innermost first, and disarm the watchdog for them."""
        for name in disks:
            for freeze in reversed(self.freezes.get(name, [])):
                if freeze.state is FreezeState.FROZEN:
                    await asyncio.to_thread(freeze.thaw)
                    self.last_thaw = time.monotonic()
                    if self.watchdog is not None:
                        await self.watchdog.disarm(freeze.mount.mountpoint)

    async def _thaw_all(self) -> None:
        await self._thaw(list(self.freezes))

    def _expired(self) -> bool:
        return self.watchdog is not None and self.watchdog.expired

    def _rate(self, name: str, expired: bool) -> None:
        disk = self.result.disks[name]
        freezes = self.freezes.get(name, [])
        disk.mounts = [
            MountOutcome(f.mount.mountpoint, f.mount.fstype, f.state, f.detail) for f in freezes
        ]
        # Our own FITHAW finding it thawed already (EINVAL) means someone else thawed it
        # while we relied on it: the watchdog at its deadline, or an administrator.
        unfrozen = any(
            f.state not in (FreezeState.FROZEN, FreezeState.THAWED) or f.thawed_ok is False
            for f in freezes
        )
        if name in self.unseen:
            disk.consistency = Consistency.CRASH
            self.result.warnings.append(
                f"disk {name!r} is in use, but none of its file systems is mounted where the "
                "agent runs (mounted in another mount namespace?), so none could be frozen; "
                "the disk is only crash-consistent. Run the agent inside the VM."
            )
        elif not self.policy.freeze or unfrozen:
            disk.consistency = Consistency.CRASH
        elif expired and freezes:
            disk.consistency = Consistency.CRASH
            self.result.warnings.append(
                f"disk {name!r}: the thaw deadline of {self.policy.thaw_deadline:g} s passed "
                "before the snapshot was complete; the disk is only crash-consistent"
            )
        elif self.result.pre_script_ok:
            disk.consistency = Consistency.APPLICATION
        else:
            disk.consistency = Consistency.FILE_SYSTEM

    def _summarise(self) -> None:
        self.result.consistency = weakest([d.consistency for d in self.result.disks.values()])
        if self.freeze_started is not None:
            end = self.last_thaw or time.monotonic()
            if self.watchdog is not None and self.watchdog.expired_at is not None:
                end = min(end, self.watchdog.expired_at)
            self.result.frozen_ms = (end - self.freeze_started) * 1000


def _flush(paths: Sequence[Path]) -> None:
    """Write back what is cached of each disk (an image file or a block device); blocking."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:  # the snapshot that follows reports what is wrong with the disk
            log.warning("could not flush disk %s before its snapshot: %s", path, exc.strerror)


@contextlib.asynccontextmanager
async def consistent_snapshot(
    disks: Sequence[tuple[str, Path]],
    policy: ConsistencyPolicy,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[SnapshotSet]:
    """Snapshot `disks` ((name, path) pairs) as consistently as `policy` allows; yields the
    paths to read. `env` goes to the scripts (e.g. COFFER_JOB_ID)."""
    async with contextlib.AsyncExitStack() as stack:
        run = _Run(disks, policy, env or {}, stack)
        snapshots = await run.start()
        body_failed = True
        try:
            yield snapshots
            body_failed = False
        finally:
            await run.finish(body_failed)
