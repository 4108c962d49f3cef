"""The gRPC service agents call: their session, and the chunk data path of their jobs.

Who calls is taken from the client certificate (`controller.interceptors.caller_vm`), never
from a message: an agent's session must name the VM its certificate names, and every data-path
call must name a job that is running for that VM. Errors leave typed through the interceptors:
handlers raise.

A VM has one session (`controller.registry`): a new one takes over from the open one, which is
told why (`SessionDisplaced`) and ends with `DuplicateAgent`; a standby session (an agent that
was displaced and is still alive) waits until the VM has none.

Hellos are written to the catalog in batches (`controller.hello_writer`). Sessions start
through the session gate (`controller.session_gate`): a bounded number at once,
the rest wait their turn or, when the wait would be long, are told to come back later
(`ControllerBusy` with a retry-after) before any of their work is done. A stream that ends
before its hello (an agent that gave up waiting, a port probe) is no error: it is logged at
debug level and the call ends quietly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import cast

import grpc

from controller.agent_limits import IndexBudget, index_deadline
from controller.catalog import AgentHello, Catalog, DiskRecord
from controller.enrolment import Enrolment
from controller.hello_writer import HelloWriter
from controller.interceptors import caller_vm
from controller.jobs import JobManager, RunningBackup
from controller.registry import SILENT_AFTER_HEARTBEATS, AgentRegistry, AgentSession
from controller.session_gate import MIN_RETURN, SessionGate
from shared.blob import Compression
from shared.clock import Clock
from shared.digest import DIGEST_SIZE, check_digest
from shared.errors import (
    AgentLimitExceeded,
    ChunkMissing,
    CofferError,
    CorruptData,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from shared.hello import DeclaredDisk, check_hello
from shared.index import DiskIndex
from shared.rpc import agent_pb2, agent_pb2_grpc
from shared.rpc_errors import end_with

log = logging.getLogger(__name__)

# How often an agent says it is alive (its last_seen). Not how a dead agent is noticed: the
# connection's keepalive does that (shared/rpc_channel.py). Each heartbeat is a message the
# controller's event loop handles: 10,000 agents at 5 s were 2,000 a second (issue 13).
# Heartbeats also name the jobs an agent carries out, so a shorter `[jobs] silence_seconds`
# shortens them: at least four fall within the silence a job is allowed (`heartbeat_ms`).
HEARTBEAT_INTERVAL_MS = 30_000


def heartbeat_ms(silence_seconds: float) -> int:
    """The heartbeat interval agents are given, for a job silence deadline of `silence_seconds`."""
    return max(500, min(HEARTBEAT_INTERVAL_MS, int(silence_seconds * 1000 / 4)))


# Chunks verified and written at once per upload stream: enough to keep the hashing busy and
# to share each file-system sync among many chunks, few enough to bound memory (each holds
# one chunk).
UPLOAD_CONCURRENCY = 16
DOWNLOAD_PREFETCH = 8
BATCH_BYTES = 1 << 20  # chunk bytes per download message
MAX_DIGESTS_PER_CALL = 1 << 16
# An agent declares itself again mid-session at most this often (once per backup is usual).
REHELLO_SECONDS = 1.0
# Bounds of the restore directories a hello may list (kept in the catalog).
MAX_RESTORE_DIRS = 64
MAX_PATH_CHARS = 4096
# When the controller stops, each agent is told to come back once the controller can be up
# again (`stopping`'s `back_in`) and at its own moment within the time the controller needs to
# start them all (`SessionGate.return_schedule`): a fleet that dialled at once into a
# controller still starting would only meet refused connections and back off, and one that
# came back all at once would meet a full gate and be refused (issue 13).
# What ending one session adds to the stop, which a restart waits for: at 10,000 sessions the
# stop took 10 s after a calm connect and 18 s after a storm whose failed dials had left
# their garbage, and agents told to come back sooner met a closed port (6,024 dials of 10,000
# agents); once storms no longer failed, it took 5.7-6.0 s (tests/bench/fleet). 1 ms each
# leaves room for the slower stop.
STOP_SECONDS_PER_SESSION = 0.001
# Jobs a heartbeat may name (an agent runs a backup, a restore and a few file recoveries).
MAX_JOBS_PER_HEARTBEAT = 64
# A displaced session's last message must not hold it open if its peer reads nothing.
DISPLACED_WRITE_SECONDS = 5.0


def _check_digests(digests: list[bytes]) -> None:
    """A request's list of digests: bounded, each of the right size."""
    if len(digests) > MAX_DIGESTS_PER_CALL:
        raise InvalidArgument(detail=f"at most {MAX_DIGESTS_PER_CALL} digests per call")
    for digest in digests:
        check_digest(digest)


class AgentService(agent_pb2_grpc.AgentServiceServicer):
    def __init__(
        self,
        catalog: Catalog,
        registry: AgentRegistry,
        jobs: JobManager,
        clock: Clock,
        mqtt_address: tuple[str, int] | None,
        controller_version: str,
        *,
        enrolment: Enrolment | None = None,
        index_budget: IndexBudget | None = None,
        gate: SessionGate | None = None,
        heartbeat_interval_ms: int = HEARTBEAT_INTERVAL_MS,
    ) -> None:
        self._enrolment = enrolment
        self._heartbeat_ms = heartbeat_interval_ms
        self.gate = gate or SessionGate()
        self._stopping = False
        self._return = (MIN_RETURN, 0.0)  # from when, over how long agents return
        # Sessions not registered yet (waiting in the gate, being started, or a standby
        # waiting for its VM): a stop sends them away as it does the registered ones.
        self._unregistered: set[asyncio.Task[object]] = set()
        self._hellos = HelloWriter(catalog)
        self._hello_at: dict[str, float] = {}  # when each VM last declared itself mid-session
        self._index_budget = index_budget or IndexBudget()
        self._catalog = catalog
        self._registry = registry
        self._jobs = jobs
        self._clock = clock
        self._mqtt = mqtt_address
        self._version = controller_version

    async def Session(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        vm_id = caller_vm()
        with self._sent_away_at_stop():
            async with self.gate.starting():
                hello = await self._hello(context, vm_id)
                if hello is None:
                    log.debug("agent %s ended its session before its hello", vm_id)
                    return
                session = AgentSession(
                    hello=hello,
                    connected_at=self._clock.now(),
                    peer=context.peer(),
                    silent_after=SILENT_AFTER_HEARTBEATS * self._heartbeat_ms / 1000,
                )
                if not hello.standby:
                    # A standby's is recorded once it has the session (below, outside the
                    # gate: it waits for the other agent's session to end).
                    try:
                        await self._accept(session, context)
                    except BaseException:
                        log.info("agent %s went away before its session began", vm_id)
                        raise
                    # No await from here to the end of the stop's reach: registered, the
                    # session is ended by the registry's close_all.
                    self._registry.connect(session)
        accepted = not hello.standby
        try:
            if hello.standby:
                # Before its hello is recorded: a standby's must not overwrite the record of
                # the agent that has the session.
                with self._sent_away_at_stop():
                    await self._registry.connect_when_free(session)
                session.connected_at = self._clock.now()
                await self._accept(session, context)
                accepted = True
            log.info(
                "agent %s connected from %s (%d disks)",
                vm_id,
                session.describe(),
                len(hello.disks),
            )
            # The session's two halves belong to this call: should writing a command fail, the
            # group ends the session (the edge logs the error with its traceback) and the
            # agent reconnects, rather than the session living on without a writer.
            async with asyncio.TaskGroup() as halves:
                halves.create_task(self._send(session, context), name=f"session-send:{vm_id}")
                receiving = halves.create_task(
                    self._receive(session, context), name=f"session-receive:{vm_id}"
                )
                await session.closed.wait()
                receiving.cancel()
        finally:
            # Before any await: when the peer is gone, gRPC cancels this handler at its next
            # await, and a session left in the registry would keep the VM "online" and its
            # job running until the agent reconnects.
            self._registry.disconnect(session)
            if accepted:
                self._catalog.touch_agent(vm_id, self._clock.now())
                log.info("agent %s disconnected (%s)", vm_id, session.describe())
            else:
                log.info("agent %s went away before its session began", vm_id)
        displaced = session.displacement()
        if displaced is not None:
            raise displaced
        if self._stopping:
            end_with(context, self._come_back_later())

    def _come_back_later(self) -> Unavailable:
        """What a session the stop ends is told: when its agent is to dial again, a moment
        of its own within the fleet's return (`stopping`)."""
        stopping = Unavailable("the controller is stopping")
        start, window = self._return
        stopping.retry_after = start + window * self.gate.rng()
        return stopping

    @contextlib.contextmanager
    def _sent_away_at_stop(self) -> Iterator[None]:
        """Run a step of a session not registered yet (its wait in the gate, its start, a
        standby's wait for its VM): a stop ends it, as `close_all` ends the registered ones,
        with when to come back (`_come_back_later`), instead of leaving it to the server's
        grace period, which would cancel it untold. A session that arrives during the stop
        is sent away at once."""
        if self._stopping:
            raise self._come_back_later()
        task = asyncio.current_task()
        assert task is not None
        self._unregistered.add(task)
        try:
            yield
        except asyncio.CancelledError:
            # The stop's cancellation (gRPC's, for a peer gone, would end the call untold
            # anyway: the status then reaches no one).
            if not self._stopping:
                raise
            task.uncancel()
            raise self._come_back_later() from None
        finally:
            self._unregistered.discard(task)

    def stopping(self, back_in: float = MIN_RETURN) -> None:
        """The controller stops: end every session now, each telling its agent when to come
        back (before the server's grace period, which would cancel them untold): after
        `back_in` seconds and the time ending the sessions takes (when a restarted controller
        would be listening), at a moment of its own within the time the session gate needs to
        start the whole fleet."""
        self._stopping = True
        # Every session it sends away: those registered and those not yet (in the gate, or
        # standing by), which a storm's gate may hold by the thousand.
        sessions = self._registry.online_count() + len(self._unregistered)
        back_in += sessions * STOP_SECONDS_PER_SESSION
        self._return = self.gate.return_schedule(back_in, sessions)
        log.info(
            "ending %d agent sessions: agents come back from %.1f s over %.1f s",
            sessions,
            *self._return,
        )
        self._registry.close_all()
        for task in self._unregistered:
            task.cancel()

    async def _accept(self, session: AgentSession, context: grpc.aio.ServicerContext) -> None:
        """The hello into the catalog, then `accepted` down the stream."""
        hello = session.hello
        host, port = self._mqtt or ("", 0)
        await self._hellos.write(
            AgentHello(
                vm_id=hello.vm_id,
                name=hello.name or hello.vm_id,
                service=hello.service,
                region=hello.region,
                hostname=hello.hostname,
                agent_version=hello.agent_version,
                disks=tuple(DiskRecord(d.name, d.path, d.size_bytes) for d in hello.disks),
                now=session.connected_at,
                restore_dirs=tuple(hello.restore_dirs),
            )
        )
        await context.write(
            agent_pb2.ControllerMessage(
                accepted=agent_pb2.SessionAccepted(
                    controller_version=self._version,
                    heartbeat_interval_ms=self._heartbeat_ms,
                    mqtt_host=host,
                    mqtt_port=port,
                )
            )
        )

    @staticmethod
    async def _hello(context: grpc.aio.ServicerContext, vm_id: str) -> agent_pb2.Hello | None:
        """The session's hello, checked; None if the stream ended before it."""
        first = await context.read()
        if first is grpc.aio.EOF:
            return None
        if not first.HasField("hello"):
            raise InvalidArgument(detail="a session starts with a hello")
        hello: agent_pb2.Hello = first.hello
        if hello.vm_id != vm_id:
            raise PermissionDenied(
                detail=f"the certificate is for VM {vm_id!r}, not {hello.vm_id!r}"
            )
        AgentService._check_hello(vm_id, hello)
        if len(hello.restore_dirs) > MAX_RESTORE_DIRS or any(
            len(d) > MAX_PATH_CHARS for d in hello.restore_dirs
        ):
            raise InvalidArgument(
                detail=f"at most {MAX_RESTORE_DIRS} restore_dirs of {MAX_PATH_CHARS} characters"
            )
        return hello

    @staticmethod
    def _check_hello(vm_id: str, hello: agent_pb2.Hello) -> None:
        """Every field within its limits before anything of it is stored or shown."""
        check_hello(
            name=hello.name or vm_id,
            service=hello.service,
            region=hello.region,
            hostname=hello.hostname,
            agent_version=hello.agent_version,
            disks=[DeclaredDisk(d.name, d.path, d.size_bytes) for d in hello.disks],
        )

    async def _receive(self, session: AgentSession, context: grpc.aio.ServicerContext) -> None:
        """What the agent sends, until it closes its side (which closes the session)."""
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                session.close()
                return
            kind = message.WhichOneof("kind")
            if kind == "heartbeat":
                self._registry.heard(session)
                self._catalog.touch_agent(session.vm_id, self._clock.now())
                # Bounded: an agent runs a few jobs at once, and names past these are not read.
                self._jobs.heard_from(
                    session.vm_id, message.heartbeat.job_ids[:MAX_JOBS_PER_HEARTBEAT]
                )
            elif kind == "result":
                session.resolve(message.result)
            elif kind == "file_recovery_status":
                self._jobs.file_recovery_status(session.vm_id, message.file_recovery_status)
            elif kind == "hello":
                await self._hello_again(session, message.hello)
            else:
                log.warning("%s sent an unexpected %s; ignored", session.vm_id, kind)

    async def _hello_again(self, session: AgentSession, hello: agent_pb2.Hello) -> None:
        """A hello during a session: the agent declares its VM again before a backup (a disk
        attached or grown since it connected). Checked as the first one was (a bad one ends
        the session); the session, the catalog and a running backup of the VM then go by it:
        an index is checked against the size the agent declared last. At most one per
        `REHELLO_SECONDS` is taken: each is a catalog write."""
        now = self._clock.now()
        if now - self._hello_at.get(session.vm_id, 0.0) < REHELLO_SECONDS:
            log.warning(
                "%s declared itself again within %g s; ignored", session.vm_id, REHELLO_SECONDS
            )
            return
        self._hello_at[session.vm_id] = now
        if hello.vm_id != session.vm_id or hello.standby:
            raise PermissionDenied(
                detail=f"a hello of VM {hello.vm_id!r} in {session.vm_id!r}'s session"
            )
        self._check_hello(session.vm_id, hello)
        session.hello = hello
        await self._catalog.upsert_agent(
            vm_id=session.vm_id,
            name=hello.name or session.vm_id,
            service=hello.service,
            region=hello.region,
            hostname=hello.hostname,
            agent_version=hello.agent_version,
            disks=[DiskRecord(d.name, d.path, d.size_bytes) for d in hello.disks],
            now=now,
        )
        self._jobs.disks_declared(session.vm_id, {d.name: d.size_bytes for d in hello.disks})

    @staticmethod
    async def _send(session: AgentSession, context: grpc.aio.ServicerContext) -> None:
        """Commands down the stream until the session closes; then, if displaced, why."""
        while (message := await session.next_message()) is not None:
            await context.write(message)
        other = session.displaced_by
        if other is None:
            return
        # The agent must learn why, or it would come back and take over in turn.
        displaced = agent_pb2.SessionDisplaced(
            peer=other.address,
            hostname=other.hello.hostname,
            agent_version=other.hello.agent_version,
            at=other.connected_at,
        )
        try:
            async with asyncio.timeout(DISPLACED_WRITE_SECONDS):
                await context.write(agent_pb2.ControllerMessage(displaced=displaced))
        except TimeoutError:
            log.info("%s: the displaced session does not read; closed untold", session.vm_id)

    async def Check(
        self, request: agent_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.CheckReply:
        vm_id = caller_vm()
        host, port = self._mqtt or ("", 0)
        item = await self._catalog.item(vm_id)
        return agent_pb2.CheckReply(
            controller_version=self._version,
            mqtt_host=host,
            mqtt_port=port,
            server_time=self._clock.now(),
            vault=item.vault if item else "",
            item_state=item.state if item else "",
            policy=(item.policy or "") if item else "",
            session_open=self._registry.online(vm_id),
        )

    async def FetchIndex(
        self,
        request: agent_pb2.FetchIndexRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[agent_pb2.IndexPart]:
        index = await self._jobs.index_for(
            caller_vm(), request.job_id, request.recovery_point_id, request.disk
        )
        running = self._jobs.running(request.job_id)
        assert running is not None  # index_for found it running for this caller
        # Which hash made these digests: an agent holding another key must not compare them.
        label = (await self._jobs.datastore(running)).chunk_hash.label
        step = MAX_DIGESTS_PER_CALL * DIGEST_SIZE
        for start in range(0, max(len(index.digests), 1), step):
            yield agent_pb2.IndexPart(
                job_id=request.job_id,
                disk=index.disk,
                size_bytes=index.size_bytes,
                chunk_size=index.chunk_size,
                digests=index.digests[start : start + step],
                chunk_hash=label if start == 0 else "",
            )

    async def MissingChunks(
        self,
        request: agent_pb2.MissingChunksRequest,
        context: grpc.aio.ServicerContext,
    ) -> agent_pb2.MissingChunksReply:
        running = self._jobs.running_backup(caller_vm(), request.job_id)
        digests = list(request.digests)
        _check_digests(digests)
        missing = await self._jobs.missing_chunks(running, digests)
        return agent_pb2.MissingChunksReply(missing=missing)

    async def UploadChunks(
        self,
        request_iterator: AsyncIterator[agent_pb2.ChunkUpload],
        context: grpc.aio.ServicerContext,
    ) -> agent_pb2.UploadSummary:
        summary = agent_pb2.UploadSummary()
        vm_id = caller_vm()
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None:
            return summary
        running = self._jobs.running_backup(vm_id, first.job_id)
        try:
            with running.stream("upload"):
                await self._upload(running, first, messages, summary)
        except AgentLimitExceeded as exc:
            raise self._jobs.over_limit(running, exc) from None
        except CofferError as exc:
            log.warning("job %s: upload refused: %s", running.record.id, exc)
            raise
        return summary

    async def _upload(
        self,
        running: RunningBackup,
        message: agent_pb2.ChunkUpload | None,
        messages: AsyncIterator[agent_pb2.ChunkUpload],
        summary: agent_pb2.UploadSummary,
    ) -> None:
        # Each chunk is verified and stored in the pool on its own, a bounded number at once.
        inflight: set[asyncio.Future[None]] = set()

        async def settle(at_most: int) -> None:
            nonlocal inflight
            while len(inflight) > at_most:
                done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    future.result()  # a refused chunk ends the stream now

        try:
            while message is not None:
                if message.job_id != running.record.id:
                    raise InvalidArgument(detail="one upload stream carries one job's chunks")
                for chunk in message.chunks:
                    compression = self._check_chunk(chunk, running.chunk_size)
                    await settle(UPLOAD_CONCURRENCY - 1)
                    inflight.add(
                        asyncio.ensure_future(self._store(running, chunk, compression, summary))
                    )
                message = await anext(messages, None)
            await settle(0)
            # What the stream stored is in the datastore when it returns: one sync for the
            # stream's last batch (chunks are stored in batches, `ObjectStore.put`).
            await self._jobs.commit_chunks(running)
        finally:
            # Refused, or the agent went away: chunks being stored finish (a put is atomic),
            # and nothing they raise is left unretrieved.
            if inflight:
                await asyncio.wait(inflight)
                for future in inflight:
                    if not future.cancelled():
                        future.exception()

    @staticmethod
    def _check_chunk(chunk: agent_pb2.Chunk, chunk_size: int) -> Compression:
        check_digest(chunk.digest)
        if chunk.raw_size > chunk_size:
            raise InvalidArgument(
                detail=f"a chunk is at most {chunk_size} bytes, got {chunk.raw_size}"
            )
        try:
            return Compression(chunk.compression)
        except ValueError as exc:
            raise InvalidArgument(detail=f"unknown compression {chunk.compression}") from exc

    async def _store(
        self,
        running: RunningBackup,
        chunk: agent_pb2.Chunk,
        compression: Compression,
        summary: agent_pb2.UploadSummary,
    ) -> None:
        # Each read of a bytes field copies it out of the message: read each once.
        digest, data = chunk.digest, chunk.data
        if len(data) > running.chunk_size:  # compression never needs more room than raw
            raise InvalidArgument(
                detail=f"a chunk's payload is at most {running.chunk_size} bytes, got {len(data)}"
            )
        stored = await self._jobs.store_chunk(running, digest, data, compression, chunk.raw_size)
        summary.chunks_received += 1
        summary.chunks_stored += 1 if stored else 0
        summary.bytes_stored += stored

    async def PutIndex(
        self,
        request_iterator: AsyncIterator[agent_pb2.IndexPart],
        context: grpc.aio.ServicerContext,
    ) -> agent_pb2.PutIndexReply:
        vm_id = caller_vm()
        parts = aiter(request_iterator)
        header = await anext(parts, None)
        if header is None:
            raise InvalidArgument(detail="empty index stream")
        running = self._jobs.running_backup(vm_id, header.job_id)
        # Checked against the job and the agent's hello before any digest is kept.
        expected = running.index_bytes(header.disk, header.size_bytes, header.chunk_size)
        try:
            with running.stream("index"):
                # Its share of the controller's index memory, first; then the parts, in time.
                async with self._index_budget.reserve(expected):
                    digests = await self._receive_index(running, header, parts, expected)
                    try:
                        index = DiskIndex(
                            disk=header.disk,
                            size_bytes=header.size_bytes,
                            chunk_size=header.chunk_size,
                            digests=digests,
                        )
                    except ValueError as exc:
                        raise InvalidArgument(detail=f"malformed index: {exc}") from exc
                    del digests
                    await self._jobs.accept_index(running, index)
        except AgentLimitExceeded as exc:
            raise self._jobs.over_limit(running, exc) from None
        return agent_pb2.PutIndexReply(chunk_count=len(index))

    @staticmethod
    async def _receive_index(
        running: RunningBackup,
        header: agent_pb2.IndexPart,
        parts: AsyncIterator[agent_pb2.IndexPart],
        expected: int,
    ) -> bytes:
        """The digests of an index stream: no more than its header's disk has, and all of
        them within `index_deadline` (an agent that stalls gives its share of memory back)."""
        received: list[bytes] = []
        total = 0
        part: agent_pb2.IndexPart | None = header
        try:
            async with asyncio.timeout(index_deadline(expected)):
                while part is not None:
                    if part.job_id not in ("", header.job_id) or part.disk not in (
                        "",
                        header.disk,
                    ):
                        raise InvalidArgument(detail="one index stream carries one disk's index")
                    digests = part.digests
                    total += len(digests)
                    if total > expected:
                        raise InvalidArgument(
                            detail="the index has more digests than the disk has chunks"
                        )
                    received.append(digests)
                    part = await anext(parts, None)
        except TimeoutError:
            raise AgentLimitExceeded(
                vm_id=running.vm_id,
                detail=f"the index of disk {header.disk!r} ({expected} bytes) was not sent "
                f"within {index_deadline(expected):.0f} s",
            ) from None
        return b"".join(received)

    async def DownloadChunks(
        self,
        request: agent_pb2.DownloadRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[agent_pb2.ChunkBatch]:
        running = self._jobs.running_restore(caller_vm(), request.job_id)
        digests = list(request.digests)
        _check_digests(digests)
        for digest in digests:
            if digest not in running.allowed:
                raise PermissionDenied(
                    detail=f"chunk {digest.hex()} is not part of the restored disk"
                )
        datastore = await self._jobs.datastore(running)
        # Read a few chunks ahead so the disk and the network overlap; send them a few MiB to
        # a message.
        ahead: deque[tuple[bytes, asyncio.Future[tuple[Compression, int, bytes]]]] = deque()
        batch = agent_pb2.ChunkBatch()
        batch_bytes = 0

        async def add_next() -> None:
            nonlocal batch_bytes
            digest, future = ahead.popleft()
            try:
                compression, raw_size, data = await future
            except (ChunkMissing, CorruptData) as error:
                # The datastore lacks it or cannot read it: damage, not "not found".
                raise await self._jobs.chunk_unreadable(running, digest, error) from None
            batch.chunks.add(  # built in place: the payload is copied once
                digest=digest,
                compression=cast(agent_pb2.Compression, compression),  # same values
                raw_size=raw_size,
                data=data,
            )
            batch_bytes += len(data)

        try:
            pending = iter(digests)
            while True:
                for digest in pending:
                    ahead.append((digest, self._jobs.in_pool(datastore.get_chunk_blob, digest)))
                    if len(ahead) >= DOWNLOAD_PREFETCH:
                        break
                if not ahead:
                    break
                await add_next()
                if batch_bytes >= BATCH_BYTES or not ahead:
                    yield batch
                    batch, batch_bytes = agent_pb2.ChunkBatch(), 0
        finally:
            for _, future in ahead:
                future.cancel()

    async def Renew(
        self, request: agent_pb2.RenewRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RenewReply:
        vm_id = caller_vm()
        if self._enrolment is None:
            raise Unavailable("this controller does not issue certificates")
        issued = await self._enrolment.renew(vm_id, request.csr_pem.encode(errors="replace"))
        return agent_pb2.RenewReply(
            certificate_pem=issued.certificate_pem.decode(), ca_pem=issued.ca_pem.decode()
        )
