"""Agents' hellos into the catalog in batches: one transaction for every hello that arrived
while the last one was being written (group commit).

Each session starts by recording its agent's hello (controller/agent_service.py). One
transaction per hello is one round trip to the catalog's single writer thread per statement,
and a fleet reconnecting at once queued thousands of them behind each other (issue 13). Here
the first session to arrive writes its hello at once; those that arrive meanwhile wait, and the
next write takes all of them together.

A session that goes away while its hello is being written does not cancel the write: the
others' hellos are in it too (the write is shielded). A failed write fails every session whose
hello was in it, with the catalog's error.
"""

from __future__ import annotations

import asyncio

from controller.catalog import AgentHello, Catalog


class HelloWriter:
    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._pending: list[tuple[AgentHello, asyncio.Future[None]]] = []
        self._writing: asyncio.Task[None] | None = None
        self.batches = 0  # transactions written (for the benchmark and tests)

    async def write(self, hello: AgentHello) -> None:
        """Record `hello`, in the next transaction; return once it is committed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((hello, done))
        while not done.done():
            if self._writing is None or self._writing.done():
                batch, self._pending = self._pending, []
                self._writing = asyncio.ensure_future(self._write(batch))
            # Shielded: this session going away must not cancel the others' hellos.
            await asyncio.shield(self._writing)
        done.result()

    async def _write(self, batch: list[tuple[AgentHello, asyncio.Future[None]]]) -> None:
        try:
            await self._catalog.upsert_agents([hello for hello, _ in batch])
        except BaseException as error:
            for _, done in batch:
                if not done.done():
                    done.set_exception(error)
            raise
        self.batches += 1
        for _, done in batch:
            if not done.done():
                done.set_result(None)
