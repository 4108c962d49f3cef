"""The controller process: catalog, datastores, status, jobs and the gRPC server, wired up.

`Controller` is one async context manager that starts everything in dependency order and
stops it in reverse. First it takes its state directory (`StateLock`), so a second controller
given the same `state_dir` refuses to start before it has touched anything there; one given
the same `listen` fails to bind (port reuse is off) and refuses too. Then it reads its master
key (controller/master_key.py; made on the first start when none is configured) and takes the
writer lease of the datastores' root (controller/datastores.py), which a second controller on
the same datastores is refused with, naming this one; then it opens every vault's datastore,
so a wrong master key (WrongKey) or unreachable storage stops the start, and starts keeping
the datastores' descriptions of what only the catalog knows (controller/descriptions.py); each
copy target's lease it takes in the background, so a copy target never stops the start
(controller/copies.py). On the way out the gRPC server stops taking calls (with a grace period
for calls in flight), agent sessions close (their jobs fail with AgentDisconnected and are
recorded), the job manager drains, the status monitor and the private broker stop, the
descriptions still pending are written, the catalog flushes.

The controller's long-lived tasks run under one `Supervisor`, each with its policy stated where
it is started: RESTART (logged with its traceback, started again after a backoff) or FATAL
(logged, and the controller stops with a non-zero exit: `Controller.wait` raises the error).
Components that own tasks take the supervisor (the protection's scheduler here; the job
manager's dispatcher is the next to move onto it).

Identities come first: the CA (`controller.pki.Authority`, which needs `ca.key` in `pki_dir`),
the revocation record and a fresh CRL, and the controller's own certificate (renewed before
anything listens, if due) are ready before the private broker starts, since it loads both.
With `enrol_listen` set, a second gRPC server serves enrolment only, on TLS that asks for no
client certificate; both servers take the controller's certificate anew after a renewal.

Descriptors and capacity (controller/descriptors.py, docs/fleet.md): the open-file limit is
raised to the hard limit first of all, and the start says how many agents it holds. The
agent listener (`listen`) holds at most that many connections; with `operator_listen` set, a
third gRPC server serves the operator service only, with a quota of its own from the reserved
descriptors, so agents filling `listen` never lock operators out. Agent sessions start through
the session gate (controller/session_gate.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import grpc

from controller.agent_limits import AgentAdmission, IndexBudget
from controller.agent_service import AgentService, heartbeat_ms
from controller.alerts import AlertKeeper, Delivery
from controller.audit import AuditLog
from controller.broker import PrivateBroker
from controller.catalog import Catalog
from controller.config import ControllerConfig
from controller.copies import Copier, CopyTargets
from controller.datastore import (
    LeaseHolder,
    LocalDirectoryStore,
    WriterLease,
    keep_writer_lease,
    open_object_store,
)
from controller.datastores import Datastores
from controller.descriptions import Describer
from controller.descriptors import OPERATOR_CONNECTIONS, raise_limit
from controller.drills import Drills
from controller.enrolment import (
    MAX_ENROL_CALLS,
    Enrolment,
    EnrolmentService,
    enrol_server_options,
)
from controller.interceptors import CallerIdentity, ErrorMapping
from controller.jobs import JobManager
from controller.jobs.deadlines import ReplyDeadlines
from controller.listener import Listener
from controller.master_key import load_master_key
from controller.metrics import Metrics, MetricsEndpoint
from controller.operator_service import OperatorService
from controller.pki import Authority
from controller.protection import Protection
from controller.pruning import Pruner
from controller.registry import AgentRegistry
from controller.renewal import CertificateMaintenance, ServerIdentity
from controller.revocation import Revocations
from controller.state_lock import StateLock
from controller.status import StatusMonitor
from controller.upgrades import VaultUpgrades
from controller.vaults import Vaults
from controller.verification import Verifier
from controller.web import OperatorCalls, WebConsole
from shared.address import Address, parse_address
from shared.clock import Clock, SystemClock
from shared.errors import CofferError
from shared.model import Trigger
from shared.rpc import agent_pb2_grpc, enrolment_pb2_grpc, operator_pb2_grpc
from shared.rpc_channel import server_options
from shared.supervision import Policy, Supervisor, TaskFailed
from shared.version import coffer_version

log = logging.getLogger(__name__)

# last_seen is kept in memory (`Catalog.touch_agent`, which every reader of it consults) and
# written for every agent heard from in one transaction this often, and at shutdown.
HEARTBEAT_FLUSH_SECONDS = 30.0
LEASE_TASK = "datastore-lease"
GIL_SWITCH_SECONDS = 0.0005
# The cyclic garbage collector's thresholds once the controller runs (CPython's are 700, 10,
# 10): a fleet's sessions are tens of thousands of long-lived objects, and at the default a
# 2,000-agent storm spent a quarter of the controller's busy CPU in `gc_collect_main`.
GC_THRESHOLDS = (50_000, 20, 20)
SHUTDOWN_GRACE_SECONDS = 5.0
# Seconds a restart takes beyond what this controller's own start took and the time ending its
# sessions takes (controller/agent_service.py): the rest of its stop (the catalog flushed, the
# broker stopped) and the new process's interpreter and imports.
RESTART_ALLOWANCE = 3.0


class Controller:
    def __init__(self, config: ControllerConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.port = 0
        # The enrolment listener's port (0: enrolment is off).
        self.enrol_port = 0
        # The operator listener's port (0: operators use `listen`).
        self.operator_port = 0
        # The web console and the metrics endpoint, when configured.
        self.web: WebConsole | None = None
        self.metrics_port = 0
        self._supervisor: Supervisor | None = None

    @property
    def supervisor(self) -> Supervisor:
        """The supervisor of the controller's long-lived tasks (while running)."""
        assert self._supervisor is not None, "the controller is not running"
        return self._supervisor

    async def wait(self, stop: asyncio.Event) -> None:
        """Until `stop` is set, or a FATAL task fails: then raise what it failed with."""
        supervisor = self.supervisor
        stopped = asyncio.ensure_future(stop.wait())
        failed = asyncio.ensure_future(supervisor.failed.wait())
        try:
            await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            failed.cancel()
        if supervisor.failure is not None:
            raise _fatal(supervisor.failure)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Controller]:
        config = self.config
        began = time.monotonic()
        # gRPC asks the server credentials' Python fetcher (renewal.py) before every TLS
        # handshake, from its own threads, each taking the GIL: at the default switch interval
        # (5 ms) a busy event loop kept thousands of handshakes waiting their turn in a storm.
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        # Before anything opens a descriptor in quantity; the private broker inherits it.
        open_files = raise_limit()
        log.info("%s", open_files.describe())
        _private_state_dir(config.state_dir)
        async with contextlib.AsyncExitStack() as stack:
            # Before anything in the state directory is touched, and held to the end.
            state_lock = stack.enter_context(StateLock(config.state_dir))
            supervisor = await stack.enter_async_context(Supervisor("controller"))
            self._supervisor = supervisor
            # FATAL: a controller whose lock file is gone may soon have a second controller
            # writing beside it; stopping is the only safe answer.
            supervisor.start("state-lock", state_lock.watch, policy=Policy.FATAL)
            master = await asyncio.to_thread(load_master_key, config)
            lease = await self._take_writer_lease(stack, supervisor)

            # Datastore work: verifying chunks (hashing, decompressing: both free the GIL) and
            # file I/O that mostly waits on the disk, so more threads than cores.
            pool = stack.enter_context(ThreadPoolExecutor(16, thread_name_prefix="datastore"))
            catalog = await stack.enter_async_context(Catalog(config.catalog_path))
            self.catalog = catalog
            where = config.datastores
            datastores = Datastores(
                catalog, where.url, s3=where.s3, master=master, clock=self.clock
            )
            await datastores.open_all()
            log.info(
                "datastores at %s (writer lease held by %s); master key: %s",
                where.url,
                lease.holder,
                master.describe(),
            )
            # Each copy target's lease, held in the background: a target unreachable or held
            # by another controller fails its copy jobs, never the start (controller.copies).
            # Left after the job manager has drained: no copy job writes by then.
            copy_targets = await stack.enter_async_context(
                CopyTargets(config.copy_targets, lease.holder, supervisor)
            )
            # What only the catalog knows, written to the datastores as it changes (so they
            # are enough to recover it); entered before the jobs, so it writes their last
            # changes after they have drained.
            describer = Describer(catalog, datastores, self.clock, supervisor)
            await stack.enter_async_context(describer)

            authority = await asyncio.to_thread(Authority.load, config.pki_dir)
            revocations = Revocations(catalog, authority, self.clock)
            await revocations.start()
            identity = ServerIdentity(config.tls)
            certificates = CertificateMaintenance(
                authority, revocations, identity, self.clock, config.certificate_lifetime
            )
            await certificates.renew_if_due()
            audit = AuditLog(catalog, self.clock)
            enrolment = Enrolment(
                catalog, authority, revocations, self.clock, config.certificate_lifetime
            )

            if config.mqtt is not None:
                mqtt = (config.mqtt.host, config.mqtt.port)
            else:
                broker = await stack.enter_async_context(
                    PrivateBroker(
                        config.state_dir / "broker",
                        config.tls,
                        host=config.listen_host,
                        crl=authority.crl_path,
                    )
                )
                mqtt = (broker.host, broker.port)
                # A new CRL (a revocation, a renewal) reaches the broker at once.
                revocations.on_crl_changed.append(broker.reload)
            status = await stack.enter_async_context(StatusMonitor(config.tls))
            status.set_broker(*mqtt)
            advertised = (config.advertise_host or mqtt[0], mqtt[1])

            registry = AgentRegistry(self.clock)
            self.registry = registry
            # The backup dispatcher runs under `supervisor` (RESTART, started by the job
            # manager); job bodies run in the job runner's own task group, which records
            # whatever they raise as the job's outcome.
            jobs = await stack.enter_async_context(
                JobManager(
                    catalog,
                    registry,
                    datastores,
                    status,
                    self.clock,
                    pool,
                    supervisor=supervisor,
                    deadlines=ReplyDeadlines(
                        config.jobs.acknowledge_seconds, config.jobs.silence_seconds
                    ),
                    manual_window=config.jobs.manual_window_seconds,
                )
            )
            # Exits run in reverse: sessions close before the job manager drains.
            stack.callback(registry.close_all)
            vaults = Vaults(catalog, datastores, self.clock, config.chunk_size)
            pruner = Pruner(catalog, datastores, jobs, self.clock, config.gc_grace_seconds)
            # Verify jobs: by hand, after backups and on the daily maintenance, as each
            # vault's settings say (controller.verification).
            verifier = Verifier(catalog, datastores, jobs, jobs.integrity, self.clock)
            # A point whose manifest was deleted is not offered as sound (issue 14).
            if gone := await jobs.integrity.check_manifests():
                log.warning("recovery points without a manifest, marked damaged: %s", gone)
            pruner.after_maintenance.append(verifier.reverify)
            protection = Protection(catalog, registry, jobs, vaults, pruner, self.clock, supervisor)
            protection.after_backup.append(verifier.after_backup)
            # Copies after each backup (and its prune), and daily after the maintenance.
            copier = Copier(
                catalog, datastores, copy_targets, jobs, self.clock, config.gc_grace_seconds
            )
            protection.after_backup.append(copier.after_backup)
            pruner.after_maintenance.append(copier.after_maintenance)
            self.protection = await stack.enter_async_context(protection)
            self.jobs = jobs
            # Vault upgrades: a garbage collection follows each (the old format's chunks), and
            # those the last stop interrupted run again now (controller.upgrades).
            upgrades = VaultUpgrades(catalog, datastores, jobs, jobs.integrity, self.clock)
            # The descriptions first, sealed and named as format 2 has them (descriptions.py).
            upgrades.after_upgrade.append(describer.rewrite)
            upgrades.after_upgrade.append(partial(_collect_after_upgrade, pruner))
            await upgrades.resume()

            # Restore drills are planned in the protection's schedule (drill:VAULT entries).
            self.drills = Drills(catalog, jobs, self.protection, self.clock)
            await self.drills.plan_all()

            if config.enrol_listen is not None:
                enrol_service = EnrolmentService(enrolment, audit)

                def enrol_server() -> grpc.aio.Server:
                    server = grpc.aio.server(
                        options=enrol_server_options(),
                        interceptors=(ErrorMapping(),),
                        maximum_concurrent_rpcs=MAX_ENROL_CALLS,
                    )
                    enrolment_pb2_grpc.add_EnrolmentServiceServicer_to_server(enrol_service, server)
                    return server

                self.enrol_port = await _listen(
                    stack,
                    certificates,
                    Listener(
                        "enrol_listen",
                        config.enrol_listen,
                        enrol_server,
                        identity,
                        client_certificates=False,
                    ),
                )
                log.info("enrolment listener on %s (port %d)", config.enrol_listen, self.enrol_port)

            # The one identity, role and audit check of every operator call: gRPC's edge,
            # and the web console's actions (controller.web.calls).
            edge = CallerIdentity(revocations, audit)
            agent_service = AgentService(
                catalog,
                registry,
                jobs,
                self.clock,
                advertised,
                coffer_version(),
                enrolment=enrolment,
                index_budget=IndexBudget(),
                heartbeat_interval_ms=heartbeat_ms(config.jobs.silence_seconds),
            )
            self.agent_service = agent_service
            operators = OperatorService(
                catalog,
                registry,
                jobs,
                status,
                vaults,
                self.protection,
                pruner,
                verifier=verifier,
                upgrades=upgrades,
                copier=copier,
                enrolment=enrolment,
                revocations=revocations,
                audit=audit,
                enrol_address=self._enrol_address(),
                drills=self.drills,
            )

            def agent_server() -> grpc.aio.Server:
                server = grpc.aio.server(
                    options=server_options(max_connections=open_files.agent_connections),
                    # The error mapping first: it also maps the identity check's refusals; an
                    # agent's calls are counted once it is known who calls.
                    interceptors=(ErrorMapping(), edge, AgentAdmission()),
                )
                agent_pb2_grpc.add_AgentServiceServicer_to_server(agent_service, server)
                operator_pb2_grpc.add_OperatorServiceServicer_to_server(operators, server)
                return server

            if config.operator_listen is not None:

                def operator_server() -> grpc.aio.Server:
                    server = grpc.aio.server(
                        options=server_options(max_connections=OPERATOR_CONNECTIONS),
                        interceptors=(ErrorMapping(), edge),
                    )
                    operator_pb2_grpc.add_OperatorServiceServicer_to_server(operators, server)
                    return server

                self.operator_port = await _listen(
                    stack,
                    certificates,
                    Listener(
                        "operator_listen",
                        config.operator_listen,
                        operator_server,
                        identity,
                        client_certificates=True,
                    ),
                )
                log.info(
                    "operator listener on %s (port %d)", config.operator_listen, self.operator_port
                )

            # Alerts: checked under the supervisor (RESTART), at once when a job ends.
            delivery = await stack.enter_async_context(Delivery(config.alerts, supervisor))
            alerts = AlertKeeper(catalog, registry, status, self.clock, config.alerts, delivery)
            jobs.on_job_end(alerts.job_ended)
            supervisor.start("alerts", alerts.run, policy=Policy.RESTART)
            stack.push_async_callback(supervisor.stop, "alerts")
            self.alerts = alerts

            metrics = Metrics(catalog, registry, jobs, self.protection, self.clock, alerts)
            jobs.on_job_end(metrics.job_ended)
            if config.metrics is not None:
                endpoint = await stack.enter_async_context(
                    MetricsEndpoint(metrics, config.metrics.listen)
                )
                self.metrics_port = endpoint.port

            if config.web is not None:
                console = WebConsole(
                    config.web,
                    OperatorCalls(operators, edge),
                    self.clock,
                    config.tls,
                    advertise_host=config.advertise_host,
                )
                self.web = await stack.enter_async_context(console)
                operators.web = console
                certificates.on_renewed.append(console.load_certificate)
            self.port = await _listen(
                stack,
                certificates,
                Listener("listen", config.listen, agent_server, identity, client_certificates=True),
            )
            # Runs before the server stops: sessions end at once, telling agents when to dial
            # again, so a restart does not meet the whole fleet dialling into a closed port:
            # once a controller started as this one did would listen again.
            stack.callback(agent_service.stopping, time.monotonic() - began + RESTART_ALLOWANCE)
            log.info("controller listening on %s (port %d)", config.listen, self.port)

            # RESTART: a renewal that failed (a full disk) is tried again; the certificate in
            # use stays valid for a third of its life after it fell due.
            supervisor.start("certificates", certificates.run, policy=Policy.RESTART)

            # RESTART: heartbeats wait in the catalog's memory until a flush writes them, so a
            # flush that failed (a busy or full disk) loses none; the next one writes them all.
            supervisor.start(
                "heartbeats", partial(self._flush_heartbeats, catalog), policy=Policy.RESTART
            )
            # Stopped while the catalog is still open.
            stack.push_async_callback(supervisor.stop, "heartbeats")
            # Runs first on the way out: what the stop interrupts is recorded at the next start.
            stack.callback(jobs.stopping)
            _settle_garbage_collector()
            yield self

    async def _take_writer_lease(
        self, stack: contextlib.AsyncExitStack, supervisor: Supervisor
    ) -> WriterLease:
        """Take the datastores' writer lease (WriterLeaseHeld, naming the holder, if another
        controller has it), keep it renewed under `supervisor` and release it on the way out,
        after everything that writes has stopped."""
        where = self.config.datastores
        # The root's own store holds the lease (on S3 the bucket is asked first whether it
        # exists and these credentials may use it).
        root = await asyncio.to_thread(open_object_store, where.url, where.s3)
        holder = LeaseHolder.this_process(self.config.listen)
        lease = await asyncio.to_thread(
            root.acquire_writer_lease, holder, duration=where.lease_seconds
        )

        async def release() -> None:
            await supervisor.stop(LEASE_TASK)
            try:
                await asyncio.to_thread(lease.release)
            except CofferError as error:  # it expires by itself; the next start takes it over
                log.warning("could not release the datastores' writer lease: %s", error)

        stack.push_async_callback(release)
        if isinstance(root, LocalDirectoryStore):
            # The writer now, before it writes: what puts cut short by a crash left is junk.
            reclaimed = await asyncio.to_thread(root.reclaim_temporary)
            if reclaimed:
                log.info("deleted %d temporary file(s) a crash left in %s", reclaimed, where.url)
        # FATAL: a controller that cannot prove it holds the lease may be writing beside
        # another one (garbage collection would delete the other's chunks): it must stop.
        supervisor.start(LEASE_TASK, partial(keep_writer_lease, lease), policy=Policy.FATAL)
        return lease

    def _enrol_address(self) -> str:
        """Where agents reach the enrolment listener ('' when it is off): the advertised host,
        and the port it got."""
        listen = self.config.enrol_listen
        if listen is None:
            return ""
        host = self.config.advertise_host or parse_address(listen, allow_port_zero=True).host
        return str(Address(host, self.enrol_port))

    @staticmethod
    async def _flush_heartbeats(catalog: Catalog) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_FLUSH_SECONDS)
            await catalog.flush()


async def _collect_after_upgrade(pruner: Pruner, vault: str) -> None:
    """After an upgrade: reclaim the old format's chunks nothing references any more."""
    try:
        await pruner.collect(vault, trigger=Trigger.SCHEDULED)
    except CofferError as error:  # one runs already, or the controller is stopping
        log.info("vault %s: no garbage collection after its upgrade: %s", vault, error)


async def _listen(
    stack: contextlib.AsyncExitStack, certificates: CertificateMaintenance, listener: Listener
) -> int:
    """Start `listener` until `stack` closes, serving each renewed certificate; its port."""
    port = await listener.start()
    stack.push_async_callback(listener.stop, SHUTDOWN_GRACE_SECONDS)
    certificates.listeners.append(listener.renew)
    return port


def _settle_garbage_collector() -> None:
    """Everything made while starting (modules, the config, the catalog's and the datastores'
    state) lives as long as the process: frozen, the collector never traverses it again; and
    collections come less often (`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    log.debug(
        "garbage collector: %d objects frozen, thresholds %s", gc.get_freeze_count(), GC_THRESHOLDS
    )


def _fatal(failure: TaskFailed) -> CofferError:
    """The error the controller stops with when the FATAL task `failure` names failed."""
    if isinstance(failure.error, CofferError):
        return failure.error
    error = CofferError(
        f"the controller stopped: its task {failure.name!r} failed with "
        f"{failure.error!r} (the traceback is in the log)"
    )
    error.__cause__ = failure.error
    return error


def _private_state_dir(state_dir: Path) -> None:
    """The state directory, made private: 0700, and every file the controller creates from
    now on 0600 (umask 077: the catalog and its journal, the broker's configuration and log,
    keys). The catalog, its journals and the broker's directory and log made by an older
    controller are made private too. Issue 14: catalog.sqlite, the state directory and the
    broker log were world-readable."""
    os.umask(0o077)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    for entry in state_dir.iterdir():
        if entry.is_symlink():
            continue
        if entry.is_dir():
            entry.chmod(0o700)
            if entry.name == "broker":
                for inner in entry.iterdir():
                    if inner.is_file() and not inner.is_symlink():
                        inner.chmod(0o600)
        elif entry.is_file():
            entry.chmod(0o600)
