"""The agent registry: which VMs have a live session now, and how to send them commands.

A session is the controller's end of one agent's `Session` stream. Commands go down through
its outbox; each result comes back through `resolve`, matched by command id. When a session
ends, every command still waiting on it fails with `AgentDisconnected`, so no job waits for an
agent that is gone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.errors import AgentDisconnected, AgentUnreachable
from shared.rpc import agent_pb2

log = logging.getLogger(__name__)


@dataclass
class AgentSession:
    hello: agent_pb2.Hello
    connected_at: float
    outbox: asyncio.Queue[agent_pb2.ControllerMessage] = field(default_factory=asyncio.Queue)
    pending: dict[str, tuple[str, asyncio.Future[agent_pb2.CommandResult]]] = field(
        default_factory=dict
    )
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def vm_id(self) -> str:
        return self.hello.vm_id

    def send(
        self, message: agent_pb2.ControllerMessage, job_id: str
    ) -> asyncio.Future[agent_pb2.CommandResult]:
        """Queue a command; the future resolves with the agent's result for it."""
        if self.closed.is_set():
            raise AgentUnreachable(vm_id=self.vm_id)
        message.command_id = f"{self.vm_id}-{next(self._ids)}"
        future: asyncio.Future[agent_pb2.CommandResult] = asyncio.get_running_loop().create_future()
        self.pending[message.command_id] = (job_id, future)
        self.outbox.put_nowait(message)
        return future

    def resolve(self, result: agent_pb2.CommandResult) -> None:
        entry = self.pending.pop(result.command_id, None)
        if entry is None:
            log.warning("%s: result for unknown command %s ignored", self.vm_id, result.command_id)
            return
        if not entry[1].done():
            entry[1].set_result(result)

    def close(self) -> None:
        self.closed.set()
        for job_id, future in self.pending.values():
            if not future.done():
                future.set_exception(AgentDisconnected(vm_id=self.vm_id, job_id=job_id))
        self.pending.clear()


class AgentRegistry:
    def __init__(self) -> None:
        self._sessions: dict[str, AgentSession] = {}
        # Called with the VM id of every agent that connects (the job dispatcher listens).
        self.on_connect: list[Callable[[str], None]] = []

    def connect(self, session: AgentSession) -> None:
        """Make `session` the VM's live one; a stale session of the same VM is closed."""
        old = self._sessions.get(session.vm_id)
        if old is not None:
            log.info("%s reconnected; closing its previous session", session.vm_id)
            old.close()
        self._sessions[session.vm_id] = session
        for listener in self.on_connect:
            listener(session.vm_id)

    def disconnect(self, session: AgentSession) -> None:
        session.close()
        if self._sessions.get(session.vm_id) is session:
            del self._sessions[session.vm_id]

    def get(self, vm_id: str) -> AgentSession:
        session = self._sessions.get(vm_id)
        if session is None:
            raise AgentUnreachable(vm_id=vm_id)
        return session

    def session(self, vm_id: str) -> AgentSession | None:
        return self._sessions.get(vm_id)

    def online(self, vm_id: str) -> bool:
        return vm_id in self._sessions

    def close_all(self) -> None:
        for session in list(self._sessions.values()):
            self.disconnect(session)
