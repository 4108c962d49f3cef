"""The controller process: catalog, datastores, status, jobs and the gRPC server, wired up.

`Controller` is one async context manager that starts everything in dependency order and
stops it in reverse: the gRPC server stops taking calls (with a grace period for calls in
flight), agent sessions close (their jobs fail with AgentDisconnected and are recorded), the
job manager drains, the status monitor and the private broker stop, the catalog flushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from controller.agent_service import AgentService
from controller.broker import PrivateBroker
from controller.catalog import Catalog
from controller.config import ControllerConfig
from controller.datastores import Datastores
from controller.jobs import JobManager
from controller.operator_service import OperatorService
from controller.protection import Protection
from controller.pruning import Pruner
from controller.registry import AgentRegistry
from controller.status import StatusMonitor
from controller.vaults import Vaults
from shared.clock import Clock, SystemClock
from shared.errors import Unavailable
from shared.rpc import agent_pb2_grpc, operator_pb2_grpc
from shared.rpc_channel import server_options
from shared.tls import server_credentials
from shared.version import coffer_version

log = logging.getLogger(__name__)

HEARTBEAT_FLUSH_SECONDS = 5.0
SHUTDOWN_GRACE_SECONDS = 5.0


class Controller:
    def __init__(self, config: ControllerConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.port = 0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Controller]:
        config = self.config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        async with contextlib.AsyncExitStack() as stack:
            # Datastore work: verifying chunks (hashing, decompressing: both free the GIL) and
            # file I/O that mostly waits on the disk, so more threads than cores.
            pool = stack.enter_context(ThreadPoolExecutor(16, thread_name_prefix="datastore"))
            catalog = await stack.enter_async_context(Catalog(config.catalog_path))
            datastores = Datastores(catalog, config.state_dir / "datastores")

            if config.mqtt is not None:
                mqtt = (config.mqtt.host, config.mqtt.port)
            else:
                broker = await stack.enter_async_context(
                    PrivateBroker(config.state_dir / "broker", config.tls, host=config.listen_host)
                )
                mqtt = (broker.host, broker.port)
            status = await stack.enter_async_context(StatusMonitor(config.tls))
            status.set_broker(*mqtt)
            advertised = (config.advertise_host or mqtt[0], mqtt[1])

            registry = AgentRegistry()
            jobs = await stack.enter_async_context(
                JobManager(catalog, registry, datastores, status, self.clock, pool)
            )
            # Exits run in reverse: sessions close before the job manager drains.
            stack.callback(registry.close_all)
            vaults = Vaults(catalog, datastores, self.clock, config.chunk_size)
            pruner = Pruner(catalog, datastores, jobs, self.clock, config.gc_grace_seconds)
            self.protection = await stack.enter_async_context(
                Protection(catalog, registry, jobs, vaults, pruner, self.clock)
            )
            self.jobs = jobs

            server = grpc.aio.server(options=server_options())
            agent_pb2_grpc.add_AgentServiceServicer_to_server(
                AgentService(catalog, registry, jobs, self.clock, advertised, coffer_version()),
                server,
            )
            operator_pb2_grpc.add_OperatorServiceServicer_to_server(
                OperatorService(catalog, registry, jobs, status, vaults, self.protection, pruner),
                server,
            )
            try:
                self.port = server.add_secure_port(config.listen, server_credentials(config.tls))
            except RuntimeError as exc:  # grpc's only word for "could not bind"
                raise Unavailable(
                    f"cannot listen on {config.listen}: {str(exc).split(';')[0]}. Is another "
                    "controller running, "
                    "or is the address wrong (`listen` in the controller config)?"
                ) from exc
            await server.start()
            stack.push_async_callback(server.stop, SHUTDOWN_GRACE_SECONDS)
            log.info("controller listening on %s (port %d)", config.listen, self.port)

            flusher = asyncio.create_task(self._flush_heartbeats(catalog), name="heartbeats")
            stack.push_async_callback(self._cancel, flusher)
            # Runs first on the way out: what the stop interrupts is recorded at the next start.
            stack.callback(jobs.stopping)
            yield self

    @staticmethod
    async def _flush_heartbeats(catalog: Catalog) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_FLUSH_SECONDS)
            await catalog.flush()

    @staticmethod
    async def _cancel(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
