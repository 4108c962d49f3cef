"""What every command an agent runs works with: its config, the controller, threads, status."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

from agent.config import AgentConfig
from agent.status import StatusPublisher
from shared.rpc import agent_pb2_grpc

T = TypeVar("T")


@dataclass(frozen=True)
class Runtime:
    config: AgentConfig
    stub: agent_pb2_grpc.AgentServiceStub
    pool: Executor  # blocking work: disk reads and writes, hashing, (de)compression
    status: StatusPublisher | None

    def in_pool(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
