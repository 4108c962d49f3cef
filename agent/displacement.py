"""Displacement: another agent process with this VM's identity took over the session.

One VM has one session with the controller. When a second agent process with the same
certificate connects (a cloned VM, a second `coffer-agent` started by hand), the controller
gives it the session and tells this one why its own ended (`SessionDisplaced`). This agent then
says so loudly, leaves the status broker (the other one's presence is the truth now), and
waits as a standby until the other goes away, when it takes its place again.

What it learned is kept in `state_dir/displaced.json`, so `coffer-agent doctor` can report it
even after the fact: who took over and when, and when this agent had the session again.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Final

from shared.errors import DuplicateAgent
from shared.rpc import agent_pb2

log = logging.getLogger(__name__)

RECORD_NAME: Final = "displaced.json"


@dataclass(frozen=True)
class Displacement:
    """The agent process that took over this VM's session, and when this one got it back."""

    at: float  # when the other took over, on the controller's clock (POSIX seconds)
    hostname: str
    peer: str  # its address as the controller saw it
    agent_version: str
    resumed_at: float | None = None  # when this agent had the session again

    @classmethod
    def from_proto(cls, message: agent_pb2.SessionDisplaced) -> Displacement:
        return cls(
            at=message.at,
            hostname=message.hostname,
            peer=message.peer,
            agent_version=message.agent_version,
        )

    def other(self) -> str:
        """The other agent process, for people."""
        return (
            f"host {self.hostname or '?'!r} at {self.peer or 'an unknown address'}, "
            f"agent {self.agent_version or '?'}"
        )

    def error(self, vm_id: str) -> DuplicateAgent:
        return DuplicateAgent(vm_id=vm_id, other=self.other())

    def resumed(self, at: float) -> Displacement:
        return replace(self, resumed_at=at)

    def save(self, state_dir: Path) -> None:
        """Write the record for `doctor`; a failure costs only that, so it is logged."""
        path = state_dir / RECORD_NAME
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not record the displacement in %s: %s", path, exc)

    @classmethod
    def settle(cls, state_dir: Path, now: float) -> None:
        """This agent has the session (not as a standby): a record still open is over."""
        record = cls.load(state_dir)
        if record is not None and record.resumed_at is None:
            record.resumed(now).save(state_dir)

    @classmethod
    def load(cls, state_dir: Path) -> Displacement | None:
        """The last displacement recorded in `state_dir`, if any (unreadable: none)."""
        try:
            raw = json.loads((state_dir / RECORD_NAME).read_text())
            return cls(
                at=float(raw["at"]),
                hostname=str(raw["hostname"]),
                peer=str(raw["peer"]),
                agent_version=str(raw["agent_version"]),
                resumed_at=None if raw.get("resumed_at") is None else float(raw["resumed_at"]),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the unreadable %s: %s", state_dir / RECORD_NAME, exc)
            return None
