"""The agent registry: which VMs have a live session now, and how to send them commands.

A session is the controller's end of one agent's `Session` stream. Commands go down through
its outbox; each result comes back through `resolve`, matched by command id. When a session
ends, every command still waiting on it fails with `AgentDisconnected`, so no job waits for an
agent that is gone.

One VM, one session. A new session of a VM takes over from the one open (an agent that
restarted while its old connection is not yet noticed dead must not wait for it); the old one is
closed as *displaced* and its agent is told so (`DuplicateAgent`). If that agent is alive, two
agent processes hold one identity (a cloned VM): it comes back as a *standby* session, which
waits here until the VM has no session and never displaces the open one, so the two do not
take turns knocking each other off. The operator sees a `DuplicateAgent` warning on the VM
while a standby waits and for a day after (`warnings`).

Online means heard from lately. A session whose agent's heartbeats stopped `silent_after` seconds
ago is not online, even while its stream is open: a connection that died without a word stays
open until keepalive notices, and a command sent down it would be lost. Its next heartbeat
makes it online again and wakes the `on_connect` listeners, as a new session does. (Silence is
judged against the heartbeats an agent sends: a session that has sent none yet, a moment
old, is not judged.) When a VM's session ends, when it did is kept
(`left_at`): a VM that left moments ago is likely reconnecting (a blip), and its queued jobs
wait for it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from shared.clock import Clock, SystemClock
from shared.errors import AgentDisconnected, AgentUnreachable, DuplicateAgent
from shared.rpc import agent_pb2

log = logging.getLogger(__name__)

# How long after two agents of one VM were last seen together `coffer agents` still says so.
DUPLICATE_WARNING_SECONDS = 24 * 3600.0
# A session whose agent has said nothing for this many heartbeat intervals is not online:
# four heartbeats missed, which no live agent does.
SILENT_AFTER_HEARTBEATS = 4
SILENT_AFTER_SECONDS = 20.0  # for sessions told of no interval (tests' own sessions)


@dataclass
class AgentSession:
    hello: agent_pb2.Hello
    connected_at: float
    # Where the session comes from, as gRPC names the peer (e.g. "ipv4:10.0.0.5:41234").
    peer: str = ""
    outbox: asyncio.Queue[agent_pb2.ControllerMessage] = field(default_factory=asyncio.Queue)
    pending: dict[str, tuple[str, asyncio.Future[agent_pb2.CommandResult]]] = field(
        default_factory=dict
    )
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    # How long the agent may say nothing before the session is not online: SILENT_AFTER_HEARTBEATS
    # of the heartbeat interval it was given (agent_service.heartbeat_ms).
    silent_after: float = SILENT_AFTER_SECONDS
    # The session that took over from this one, when that is why it closed.
    displaced_by: AgentSession | None = None
    heard_at: float | None = None
    """When the agent last sent a heartbeat on this session (monotonic seconds)."""
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _wake: asyncio.Future[None] | None = field(default=None, repr=False)
    """Set while the session's writer waits in `next_message`: a command or the close wakes it."""

    @property
    def vm_id(self) -> str:
        return self.hello.vm_id

    @property
    def address(self) -> str:
        """Where the session comes from: the agent's address and port."""
        return _address(self.peer)

    def describe(self) -> str:
        """Which agent process this is, for people: its host name and address."""
        return f"host {self.hello.hostname or '?'!r} at {self.address}"

    def send(
        self, message: agent_pb2.ControllerMessage, job_id: str
    ) -> asyncio.Future[agent_pb2.CommandResult]:
        """Queue a command; the future resolves with the agent's result for it."""
        if self.closed.is_set():
            raise AgentUnreachable(vm_id=self.vm_id)
        message.command_id = f"{self.vm_id}-{next(self._ids)}"
        future: asyncio.Future[agent_pb2.CommandResult] = asyncio.get_running_loop().create_future()
        self.pending[message.command_id] = (job_id, future)
        self.tell(message)
        return future

    def tell(self, message: agent_pb2.ControllerMessage) -> None:
        """Queue a message that expects no result (a cancel, an unmount)."""
        self.outbox.put_nowait(message)
        self._wake_writer()

    async def next_message(self) -> agent_pb2.ControllerMessage | None:
        """The next message to write down the stream; None once the session is closed.

        An idle session's writer waits on one future of its own, which `send` and `close`
        resolve: waiting on the outbox and the close at once took two tasks for every idle
        session, for the session's whole life (issue 13: about 2.5 KiB each, 25 MiB at 10,000)."""
        while not self.closed.is_set():
            if not self.outbox.empty():
                return self.outbox.get_nowait()
            self._wake = asyncio.get_running_loop().create_future()
            try:
                await self._wake
            finally:
                self._wake = None
        return None  # closing: a command taken meanwhile has already failed

    def _wake_writer(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def silent(self, now: float) -> bool:
        """The agent's heartbeats stopped `silent_after` seconds before monotonic time `now`."""
        return self.heard_at is not None and now - self.heard_at >= self.silent_after

    def forget(self, command_id: str) -> None:
        """Stop waiting for a command's result (its job ended without it); a late result is
        ignored."""
        self.pending.pop(command_id, None)

    def resolve(self, result: agent_pb2.CommandResult) -> None:
        entry = self.pending.pop(result.command_id, None)
        if entry is None:
            log.warning("%s: result for unknown command %s ignored", self.vm_id, result.command_id)
            return
        if not entry[1].done():
            entry[1].set_result(result)

    def close(self, displaced_by: AgentSession | None = None) -> None:
        if not self.closed.is_set():
            self.displaced_by = displaced_by
        self.closed.set()
        self._wake_writer()
        for job_id, future in self.pending.values():
            if not future.done():
                future.set_exception(AgentDisconnected(vm_id=self.vm_id, job_id=job_id))
        self.pending.clear()

    def displacement(self) -> DuplicateAgent | None:
        """Why the agent must hear this session ended, if another took over from it."""
        if self.displaced_by is None:
            return None
        return DuplicateAgent(vm_id=self.vm_id, other=self.displaced_by.describe())


@dataclass(frozen=True)
class AgentWarning:
    """Something an operator should know about a VM's agent: a stable code and what happened."""

    code: str
    message: str


@dataclass(frozen=True)
class _Duplicate:
    """Two agent processes of one VM, as last seen together."""

    at: float
    holder: str  # the one that had the session
    other: str  # the one that waited for it


class AgentRegistry:
    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._sessions: dict[str, AgentSession] = {}
        # Standby sessions by VM, waiting for its open session to end.
        self._standby: dict[str, list[AgentSession]] = {}
        # Set (and dropped) when a VM's open session ends: wakes its standby sessions.
        self._vacated: dict[str, asyncio.Event] = {}
        self._duplicates: dict[str, _Duplicate] = {}
        # When each VM's last session ended (by the clock), while it has none.
        self._left_at: dict[str, float] = {}
        # Called with the VM id of every agent that connects, or is heard again after a
        # silence (the job dispatcher listens).
        self.on_connect: list[Callable[[str], None]] = []

    def connect(self, session: AgentSession) -> None:
        """Make `session` the VM's live one; the session open before is closed as displaced."""
        old = self._sessions.get(session.vm_id)
        if old is not None:
            log.info(
                "%s reconnected from %s; closing its previous session (from %s)",
                session.vm_id,
                session.describe(),
                old.describe(),
            )
            old.close(displaced_by=session)
        self._sessions[session.vm_id] = session
        self._left_at.pop(session.vm_id, None)
        self._connected(session.vm_id)

    def _connected(self, vm_id: str) -> None:
        for listener in self.on_connect:
            listener(vm_id)

    def heard(self, session: AgentSession) -> None:
        """The agent of `session` sent a heartbeat: it is online (again, after a silence)."""
        now = time.monotonic()
        was_silent = session.silent(now)
        session.heard_at = now
        if was_silent and self._sessions.get(session.vm_id) is session:
            log.info("%s is heard from again after a silence", session.vm_id)
            self._connected(session.vm_id)

    async def connect_when_free(self, session: AgentSession) -> None:
        """Connect standby `session` once its VM has no open session; it displaces none.

        Its agent was displaced by another agent process of the same VM and came back: both
        are alive, which is what the operator must hear about (a `DuplicateAgent` warning).
        """
        vm_id = session.vm_id
        waiting = self._standby.setdefault(vm_id, [])
        waiting.append(session)
        try:
            while (holder := self._sessions.get(vm_id)) is not None:
                self._duplicates[vm_id] = _Duplicate(
                    self._clock.now(), holder.describe(), session.describe()
                )
                log.warning(
                    "%s: two agent processes use this VM's certificate (DuplicateAgent): %s has "
                    "the session, %s waits for it to end",
                    vm_id,
                    holder.describe(),
                    session.describe(),
                )
                await self._vacated.setdefault(vm_id, asyncio.Event()).wait()
        finally:
            waiting.remove(session)
            if not waiting:
                del self._standby[vm_id]
        # No await between the check above and here: no other session can slip in between.
        log.info("%s: the standby agent (%s) takes the session", vm_id, session.describe())
        self.connect(session)

    def disconnect(self, session: AgentSession) -> None:
        session.close()
        if self._sessions.get(session.vm_id) is session:
            del self._sessions[session.vm_id]
            self._left_at[session.vm_id] = self._clock.now()
            vacated = self._vacated.pop(session.vm_id, None)
            if vacated is not None:
                vacated.set()

    def get(self, vm_id: str) -> AgentSession:
        session = self._sessions.get(vm_id)
        if session is None:
            raise AgentUnreachable(vm_id=vm_id)
        return session

    def session(self, vm_id: str) -> AgentSession | None:
        return self._sessions.get(vm_id)

    def online(self, vm_id: str) -> bool:
        """The VM's agent has a session and was heard from lately (a command sent now reaches
        it)."""
        session = self._sessions.get(vm_id)
        return (
            session is not None
            and not session.closed.is_set()
            and not session.silent(time.monotonic())
        )

    def left_within(self, vm_id: str, seconds: float) -> bool:
        """The VM has no session now, but had one until less than `seconds` ago (or has one
        it has not been heard on lately): it is likely coming back."""
        session = self._sessions.get(vm_id)
        if session is not None:
            return True
        left = self._left_at.get(vm_id)
        return left is not None and self._clock.now() - left < seconds

    def online_count(self) -> int:
        """How many VMs' agents have a session now."""
        return len(self._sessions)

    def warnings(self, vm_id: str) -> list[AgentWarning]:
        """What the operator should know about VM `vm_id`'s agent now."""
        holder = self._sessions.get(vm_id)
        waiting = self._standby.get(vm_id, [])
        if holder is not None and waiting:
            others = "; ".join(s.describe() for s in waiting)
            message = (
                f"{len(waiting) + 1} agent processes use this VM's certificate: "
                f"{holder.describe()} has the session, and waiting: {others}"
            )
        elif (seen := self._duplicates.get(vm_id)) is not None and (
            self._clock.now() - seen.at < DUPLICATE_WARNING_SECONDS
        ):
            at = datetime.fromtimestamp(seen.at, UTC).isoformat(timespec="seconds")
            message = (
                f"two agent processes used this VM's certificate, last at {at}: "
                f"{seen.holder} had the session, {seen.other} waited for it"
            )
        else:
            return []
        fix = (
            "stop one of them, or give the other VM its own identity "
            "(`coffer pki issue-agent NEW-VM`)"
        )
        return [AgentWarning(DuplicateAgent.code, f"{message}; {fix}")]

    def close_all(self) -> None:
        for session in list(self._sessions.values()):
            self.disconnect(session)


def _address(peer: str) -> str:
    """A gRPC peer name ("ipv4:10.0.0.5:41234", "ipv6:[::1]:41234") as an address."""
    kind, _, address = peer.partition(":")
    return address if kind in ("ipv4", "ipv6") and address else peer or "an unknown address"
