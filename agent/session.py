"""The agent's session with the controller: dial out, say hello, run commands, keep at it.

The agent never listens. It opens one `Session` stream, sends its hello (VM identity and
disks), then heartbeats, and runs each command it receives as its own task, sending back one
result per command. When the stream breaks, every running command is cancelled (the controller
has already failed its job) and the agent dials again after a jittered exponential backoff, so
a fleet of agents does not reconnect in lock step after a controller restart. A controller
busy starting other sessions refuses with a retry-after (`ControllerBusy`), and one that
stops ends every session with one: the agent waits that long (plus up to a tenth,
`shared.backoff.after_refusal`). The controller gives each agent its own moment, so the refused
and a restarted controller's fleet come back spread over the time it needs to take them.

When another agent process with this VM's certificate takes the session over, the controller
says so (`SessionDisplaced`): this agent logs it as an error, leaves the status broker, and
dials again as a standby that waits for the other's session to end (`agent.displacement`).

While the session is open the agent renews its certificate when it falls due, between
commands (`agent.renewal`); the session then ends and the agent dials again at once with the
new certificate. A controller that says the certificate was revoked is logged as an error: the
VM must be enrolled again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc

from agent.backup import BackupRun
from agent.config import AgentConfig
from agent.disk import disk_size
from agent.displacement import Displacement
from agent.file_recovery_jobs import FileRecoveryHost, FileRecoveryRun
from agent.renewal import Renewed, renew_when_due
from agent.restores import restore
from agent.runtime import Runtime
from agent.status import StatusPublisher
from shared.backoff import Backoff, after_refusal
from shared.errors import (
    CertificateRevoked,
    CofferError,
    ControllerBusy,
    DataCorrupted,
    DuplicateAgent,
    JobCancelled,
    find_coffer_error,
)
from shared.rpc import agent_pb2, agent_pb2_grpc
from shared.rpc_channel import secure_channel
from shared.rpc_errors import from_rpc_error, to_proto
from shared.version import coffer_version

log = logging.getLogger(__name__)

# Full jitter: a fleet that lost the controller at once comes back spread over the window.
RECONNECT = Backoff(first=0.5, cap=30.0, jitter="full")
# A session accepted at least this long before it broke resets the backoff.
HEALTHY_SESSION = RECONNECT.cap
# Threads that read, hash, compress and write chunks: reads wait on the disk, so more than
# cores; the pipelines bound how many chunks are in flight.
POOL_THREADS = 12


def damaged_chunks(exc: BaseException) -> list[bytes]:
    """The digests of the chunks `exc` (or, raised out of task groups, what it holds) says
    are damaged: the controller is told which, and checks them itself."""
    if isinstance(exc, DataCorrupted):
        digest = exc.fields.get("digest")
        return [bytes.fromhex(digest)] if isinstance(digest, str) else []
    if isinstance(exc, BaseExceptionGroup):
        return [digest for inner in exc.exceptions for digest in damaged_chunks(inner)]
    return []


def _forget(
    running: dict[str, asyncio.Task[None]], idle: asyncio.Event, job_id: str, _: object
) -> None:
    running.pop(job_id, None)
    if not running:
        idle.set()


async def say_hello(call: grpc.aio.StreamStreamCall, hello: agent_pb2.AgentMessage) -> None:
    """Send the session's first message. A controller that refused the call before reading it
    (a busy gate, a rate limit) may have ended it already: gRPC's asyncio client then fails the
    write ("RPC already finished") rather than report the refusal, so the failure is let go and
    the read that follows raises the refusal itself, its retry-after with it."""
    with contextlib.suppress(asyncio.InvalidStateError):
        await call.write(hello)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.connected = asyncio.Event()
        self._cancelled: set[str] = set()  # jobs the controller asked to cancel
        self._connected_at: float | None = None  # when the current session was accepted
        # Set while another agent process of this VM has the session: this one waits as a
        # standby until it ends.
        self._standby: Displacement | None = None
        # File recovery (FileRecovery jobs): what an agent that died left is swept at start.
        self._files = FileRecoveryHost(config.state_dir / "files")
        self._declared: dict[str, int] = {}  # the disk sizes the controller was told last

    def hello(self) -> agent_pb2.Hello:
        disks = []
        for disk in self.config.disks:
            try:
                with open(disk.path, "rb") as f:
                    size = disk_size(f.fileno())
            except OSError as exc:
                log.warning("disk %s at %s cannot be opened: %s", disk.name, disk.path, exc)
                size = 0
            disks.append(agent_pb2.DiskInfo(name=disk.name, path=str(disk.path), size_bytes=size))
        return agent_pb2.Hello(
            vm_id=self.config.vm_id,
            name=self.config.name,
            service=self.config.service,
            region=self.config.region,
            hostname=socket.gethostname(),
            agent_version=coffer_version(),
            disks=disks,
            standby=self._standby is not None,
            restore_dirs=[str(directory) for directory in self.config.restore_dirs],
        )

    async def run(self) -> None:
        """Keep a session with the controller until cancelled."""
        with ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="agent-io") as pool:
            async with (
                self._files,
                StatusPublisher(
                    self.config.vm_id,
                    self.config.tls,
                    hostname=socket.gethostname(),
                    agent_version=coffer_version(),
                ) as status,
            ):
                delays = RECONNECT.delays()
                while True:
                    renewed = False
                    retry_after: float | None = None
                    try:
                        await self._session(pool, status)
                    # The session's task group raises its tasks' failures as a group.
                    except* Renewed:
                        renewed = True
                    except* DuplicateAgent as group:
                        self._displaced(group.exceptions[0], status)
                    except* grpc.RpcError as group:
                        for exc in group.exceptions:
                            error = from_rpc_error(exc)
                            retry_after = error.retry_after
                            if isinstance(error, DuplicateAgent):
                                self._displaced(error, status)
                            else:
                                self._ended(error)
                    except* CofferError as group:
                        for exc in group.exceptions:
                            self._ended(exc)
                    if renewed:
                        log.info("dialling the controller again with the renewed certificate")
                        self._connected_at = None
                        self.connected.clear()
                        continue
                    if self._connected_at is not None and (
                        time.monotonic() - self._connected_at >= HEALTHY_SESSION
                    ):
                        # A session that held: this outage starts the backoff over, or a
                        # long-lived agent would wait up to the cap after every break once
                        # it had seen a few. One that broke soon after it was accepted (a
                        # controller in trouble) keeps backing off.
                        delays = RECONNECT.delays()
                    self._connected_at = None
                    self.connected.clear()
                    delay = after_refusal(next(delays), retry_after)
                    log.info("reconnecting in %.1f s", delay)
                    await asyncio.sleep(delay)

    def _ended(self, error: BaseException) -> None:
        if isinstance(error, CertificateRevoked):
            log.error("the controller refuses this agent's certificate: %s (%s)", error, error.code)
        elif isinstance(error, ControllerBusy):
            log.info("%s", error)
        else:
            log.warning("session with the controller ended: %s", error)

    def _displaced(self, error: BaseException, status: StatusPublisher) -> None:
        """Another agent process of this VM has the session: say so, step aside, wait."""
        if self._standby is None:  # told by the call's status alone: who is not known
            self._standby = Displacement(at=time.time(), hostname="", peer="", agent_version="")
        log.error("%s (%s)", error, DuplicateAgent.code)
        log.warning(
            "leaving the status broker to the other agent process; this one waits for its "
            "session to end and then takes the session again"
        )
        status.leave()
        self._standby.save(self.config.state_dir)

    async def _session(self, pool: ThreadPoolExecutor, status: StatusPublisher) -> None:
        async with secure_channel(
            self.config.controller, self.config.tls, self.config.controller_name
        ) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            runtime = Runtime(self.config, stub, pool, status)
            call = stub.Session()
            hello = self.hello()
            self._declared = _disk_sizes(hello)
            await say_hello(call, agent_pb2.AgentMessage(hello=hello))
            if self._standby is not None:
                log.info("waiting as a standby until the other agent's session ends")
            first = await call.read()
            if first is grpc.aio.EOF or not first.HasField("accepted"):
                raise CofferError("the controller did not accept the session")
            accepted = first.accepted
            status.set_broker(accepted.mqtt_host, accepted.mqtt_port)
            log.info(
                "connected to controller %s (version %s)",
                self.config.controller,
                accepted.controller_version,
            )
            if self._standby is not None:
                log.warning(
                    "the other agent process of VM %s (%s) is gone: this agent has the "
                    "session again",
                    self.config.vm_id,
                    self._standby.other(),
                )
                self._standby.resumed(time.time()).save(self.config.state_dir)
                self._standby = None
            else:
                # A record a stopped standby left open (this process started fresh) is over.
                Displacement.settle(self.config.state_dir, time.time())
            self.connected.set()
            self._connected_at = time.monotonic()
            outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
            interval = max(accepted.heartbeat_interval_ms, 500) / 1000
            running: dict[str, asyncio.Task[None]] = {}
            idle = asyncio.Event()
            idle.set()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._send(call, outbox), name="session-writer")
                tasks.create_task(self._heartbeat(outbox, interval, running), name="heartbeat")
                tasks.create_task(renew_when_due(self.config, stub, idle.wait), name="renewal")
                while True:
                    message = await call.read()
                    if message is grpc.aio.EOF:
                        raise CofferError("the controller closed the session")
                    kind = message.WhichOneof("kind")
                    if kind == "displaced":
                        self._standby = Displacement.from_proto(message.displaced)
                        raise self._standby.error(self.config.vm_id)
                    if kind == "cancel":
                        task = running.get(message.cancel.job_id)
                        if task is not None:
                            self._cancelled.add(message.cancel.job_id)
                            task.cancel()
                        continue
                    if kind == "unmount":
                        if not self._files.unmount(message.unmount.job_id):
                            log.info("unmount of %s: it is not mounted", message.unmount.job_id)
                        continue
                    job_id = getattr(message, kind).job_id
                    running[job_id] = tasks.create_task(
                        self._command(message, runtime, outbox),
                        name=f"{kind}-{job_id}",
                    )
                    idle.clear()
                    running[job_id].add_done_callback(partial(_forget, running, idle, job_id))
                    # Acknowledged at once: the controller knows the command was taken (a job
                    # whose agent leaves before that goes back to its queue, not to failure).
                    outbox.put_nowait(
                        agent_pb2.AgentMessage(
                            heartbeat=agent_pb2.Heartbeat(sequence=0, job_ids=list(running))
                        )
                    )

    def _declare_again(self, outbox: asyncio.Queue[agent_pb2.AgentMessage]) -> None:
        """Before a backup: if a disk was attached, grew or shrank since the session's hello,
        declare the VM again, since the controller takes an index no larger than the disk the
        agent declared."""
        hello = self.hello()
        if _disk_sizes(hello) != self._declared:
            self._declared = _disk_sizes(hello)
            log.info("disks changed since the session began: declared again %s", self._declared)
            outbox.put_nowait(agent_pb2.AgentMessage(hello=hello))

    @staticmethod
    async def _send(
        call: grpc.aio.StreamStreamCall,
        outbox: asyncio.Queue[agent_pb2.AgentMessage],
    ) -> None:
        while True:
            message = await outbox.get()
            try:
                await call.write(message)
            except asyncio.InvalidStateError:
                # The controller ended the call (a stop, a displacement): the session's read
                # reports how, its retry-after with it; this writer only stops.
                return

    @staticmethod
    async def _heartbeat(
        outbox: asyncio.Queue[agent_pb2.AgentMessage],
        interval: float,
        running: dict[str, asyncio.Task[None]],
    ) -> None:
        """A heartbeat every `interval`, naming the jobs this agent carries out: the controller
        fails a job whose agent has said nothing of it for its reply deadline."""
        sequence = 0
        while True:
            await asyncio.sleep(interval)
            sequence += 1
            outbox.put_nowait(
                agent_pb2.AgentMessage(
                    heartbeat=agent_pb2.Heartbeat(sequence=sequence, job_ids=list(running))
                )
            )

    async def _command(
        self,
        message: agent_pb2.ControllerMessage,
        runtime: Runtime,
        outbox: asyncio.Queue[agent_pb2.AgentMessage],
    ) -> None:
        kind = message.WhichOneof("kind")
        result = agent_pb2.CommandResult(command_id=message.command_id)
        try:
            if kind == "backup":
                result.job_id = message.backup.job_id
                log.info("backup %s started", result.job_id)
                self._declare_again(outbox)
                backup = BackupRun(runtime, message.backup)
                disks = await backup.run()
                result.disks.extend(d.to_proto() for d in disks)
                assert backup.snapshots is not None
                result.consistency = backup.snapshots.consistency
                result.frozen_ms = backup.snapshots.frozen_ms
                result.warnings.extend(backup.snapshots.warnings)
                log.info(
                    "backup %s: %s consistent, file systems frozen %.0f ms",
                    result.job_id,
                    result.consistency,
                    result.frozen_ms,
                )
            elif kind == "restore":
                result.job_id = message.restore.job_id
                log.info("restore %s started", result.job_id)
                result.restore.CopyFrom(await restore(runtime, message.restore))
                result.bytes_written = result.restore.bytes_written
            elif kind == "file_recovery":
                result.job_id = message.file_recovery.job_id
                log.info("file recovery %s started", result.job_id)

                def report(status: agent_pb2.FileRecoveryStatus) -> None:
                    outbox.put_nowait(agent_pb2.AgentMessage(file_recovery_status=status))

                run = FileRecoveryRun(runtime, self._files, message.file_recovery, report)
                result.file_recovery.CopyFrom(await run.run())
            else:
                raise CofferError(f"this agent does not know the command {kind!r}")
            result.ok = True
            log.info("%s %s completed", kind, result.job_id)
        except asyncio.CancelledError:
            if result.job_id not in self._cancelled:
                raise  # the session is ending: the controller has failed the job already
            self._cancelled.discard(result.job_id)
            log.info("%s %s cancelled", kind, result.job_id)
            result.error.CopyFrom(to_proto(JobCancelled(job_id=result.job_id)))
        # The command's boundary: whatever went wrong, the controller gets a result that
        # says what (task groups wrap failures in groups; a bug is reported, not swallowed).
        except Exception as exc:
            error = find_coffer_error(exc)
            if error is None:
                log.exception("%s %s failed unexpectedly", kind, result.job_id)
                error = CofferError(f"internal error in the agent: {exc!r}")
            log.warning("%s %s failed: %s", kind, result.job_id, error)
            result.error.CopyFrom(to_proto(error))
            result.damaged_chunks.extend(damaged_chunks(exc))
        outbox.put_nowait(agent_pb2.AgentMessage(result=result))


def _disk_sizes(hello: agent_pb2.Hello) -> dict[str, int]:
    return {disk.name: disk.size_bytes for disk in hello.disks}
