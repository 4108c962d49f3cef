"""File descriptors: the controller's open-file limit, and the fleet it can hold.

Every agent holds one TCP connection to the controller (its session and data calls share it)
and one to the MQTT broker: a descriptor in each process. The common soft limit of 1,024 is a
cliff at about a thousand agents: past it the controller cannot accept, the operator's own
`coffer` is locked out with the agents, and Mosquitto refuses connections (issue 13). So at
start the controller raises its soft limit to the hard limit (what the host allows the
process without privileges; systemd's `LimitNOFILE=` sets both), and its private broker, a
child, inherits it.

Of the limit, `RESERVE` descriptors are kept back from agents: the catalog and its journals,
datastore files being written, the broker's pipes, the web console, and the operator
listener's connections (`OPERATOR_CONNECTIONS`, its own `grpc.max_allowed_incoming_connections`
quota). The agent listener may hold the rest (`agent_connections`); gRPC closes a connection
past that at once, so agents can never take the descriptors operators need.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from typing import Final

log = logging.getLogger(__name__)

OPERATOR_CONNECTIONS: Final = 256
"""Connections the operator listener holds at most (CLIs, scripts, dashboards)."""
RESERVE: Final = OPERATOR_CONNECTIONS + 768
"""Descriptors kept from agents: operators' connections, and the controller's own files and
sockets (catalog, datastore writes in 16 threads, broker pipes, web console, S3 sockets)."""
MIN_AGENT_CONNECTIONS: Final = 64


@dataclass(frozen=True)
class OpenFiles:
    """The process's open-file limit after `raise_limit`, and what it was before."""

    soft: int
    hard: int
    before: int

    @property
    def agent_connections(self) -> int:
        """Agent connections the controller's listener may hold."""
        return max(self.soft - RESERVE, MIN_AGENT_CONNECTIONS)

    def describe(self) -> str:
        raised = f" (raised from {self.before})" if self.soft != self.before else ""
        return (
            f"open-file limit {self.soft}{raised}, hard limit {self.hard}: room for about "
            f"{self.agent_connections} agents ({RESERVE} descriptors kept for operators and "
            "the controller's own files)"
        )


def raise_limit() -> OpenFiles:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; the limits now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    # RLIM_INFINITY is not a number of descriptors: the kernel caps at fs.nr_open anyway.
    wanted = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if soft == resource.RLIM_INFINITY or soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return OpenFiles(soft=soft, hard=wanted, before=before)


def _nr_open() -> int:
    """The kernel's per-process ceiling on descriptors (fs.nr_open)."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20
