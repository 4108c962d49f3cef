"""The controller's status monitor: agents' presence and job progress in, job states out, over MQTT.

One background task owns the MQTT connection and loops: connect with the controller's client
certificate, subscribe to every agent's presence and progress, keep the latest of each in
memory for the API and the dashboard, and send job states from a coalescing outbox. On any
MQTT or network error it waits a jittered, capped backoff and connects again (aiomqtt has no
reconnect of its own); after a reconnect the retained presences arrive again by themselves.

MQTT is the live view only: job outcomes come over gRPC into the catalog, so nothing here is
ever the record of a result, and nothing a caller does blocks or raises because the broker is
away. A message that does not fit the schema, or whose payload names another VM or job than
its topic does, is logged and ignored. Topics and payloads: `shared.status`, `docs/mqtt.md`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import Final, Generic, Self, TypeVar

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

from shared.errors import CofferError, InvalidArgument
from shared.status import (
    CONTROLLER_USERNAME,
    PRESENCE_FILTER,
    PROGRESS_FILTER,
    JobState,
    Outbox,
    OutgoingMessage,
    Presence,
    Progress,
    TopicKind,
    TopicRef,
    parse_topic,
    reconnect_delay,
)
from shared.tls import TlsFiles, mqtt_ssl_context

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS: Final = 15
# Bound on every wait for the broker: CONNACK, SUBACK, PUBACK, DISCONNECT.
OPERATION_TIMEOUT: Final = 5.0
CLOSE_TIMEOUT: Final = 3.0
# Bounds on what agents can make the controller remember (a job id is any topic level an
# agent chooses); the least recently updated entries go first.
MAX_JOBS: Final = 10_000
MAX_FORGOTTEN: Final = 4096

_V = TypeVar("_V")


class _Latest(Generic[_V]):
    """The latest value per key, bounded, with waiters for the next value of a key."""

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._values: dict[str, _V] = {}
        self._waiters: dict[str, set[asyncio.Future[_V]]] = {}

    def get(self, key: str) -> _V | None:
        return self._values.get(key)

    def snapshot(self) -> dict[str, _V]:
        return dict(self._values)

    def set(self, key: str, value: _V) -> None:
        self._values.pop(key, None)
        self._values[key] = value
        while len(self._values) > self._max_size:
            del self._values[next(iter(self._values))]
        for waiter in self._waiters.pop(key, ()):
            if not waiter.done():
                waiter.set_result(value)

    def drop(self, key: str) -> None:
        self._values.pop(key, None)

    async def next(self, key: str, within: float | None) -> _V | None:
        waiter: asyncio.Future[_V] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(key, set())
        waiters.add(waiter)
        try:
            async with asyncio.timeout(within):
                return await waiter
        except TimeoutError:
            return None
        finally:
            waiters.discard(waiter)
            if not waiters and self._waiters.get(key) is waiters:
                del self._waiters[key]


class StatusMonitor:
    """What the agents report over MQTT, as the controller sees it; and job states out.

    `tls` is the controller's certificate (CN `coffer-controller`), key and the Coffer CA.
    Use as an async context manager and tell it where the broker is with `set_broker` (a
    configured broker, or `PrivateBroker.host/port`). Every method but the `wait_*` ones
    returns at once; `publish_job_state` may be called from any thread.
    """

    def __init__(
        self,
        tls: TlsFiles,
        *,
        max_jobs: int = MAX_JOBS,
        max_pending: int = 1024,
        keepalive: int = KEEPALIVE_SECONDS,
    ) -> None:
        self._tls = tls
        self._keepalive = keepalive
        # Bounded too: presence topics are only as many as certificates, but cheap to cap.
        self._presences: _Latest[Presence] = _Latest(max_size=max_jobs)
        self._progress: _Latest[Progress] = _Latest(max_size=max_jobs)
        # Progress still in flight when the controller forgot the job must not bring it back.
        self._forgotten: dict[str, None] = {}
        self._outbox = Outbox(max_pending)
        self._broker: tuple[str, int] | None = None
        self._closing = False
        self._connected = False
        self._connections = 0  # successful connects so far
        # _wake: something to do (job state, new broker, closing); _control: only the latter.
        self._wake = asyncio.Event()
        self._control = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        """Whether the monitor is connected to a broker (else what it holds may be stale)."""
        return self._connected

    @property
    def broker(self) -> tuple[str, int] | None:
        return self._broker

    # --- what the agents report --------------------------------------------------------------

    def presence(self, vm_id: str) -> Presence | None:
        """The latest presence VM `vm_id`'s agent published (or its will), if any."""
        return self._presences.get(vm_id)

    def presences(self) -> dict[str, Presence]:
        """The latest presence of every agent heard of, by VM id."""
        return self._presences.snapshot()

    def progress(self, job_id: str) -> Progress | None:
        """The latest progress of job `job_id`, if any came since it was last forgotten."""
        return self._progress.get(job_id)

    # A timeout parameter (ASYNC109) because "None after `timeout`" is the answer, not an error.
    async def wait_progress(self, job_id: str, timeout: float | None) -> Progress | None:  # noqa: ASYNC109
        """The next progress of job `job_id` to arrive; None if none does within `timeout` s."""
        return await self._progress.next(job_id, timeout)

    async def wait_presence(self, vm_id: str, timeout: float | None) -> Presence | None:  # noqa: ASYNC109
        """The next presence of VM `vm_id` to arrive; None if none does within `timeout` s."""
        return await self._presences.next(vm_id, timeout)

    def forget_job(self, job_id: str) -> None:
        """Drop job `job_id`'s progress (the job ended); later progress for it is ignored."""
        self._progress.drop(job_id)
        self._forgotten.pop(job_id, None)
        self._forgotten[job_id] = None
        while len(self._forgotten) > MAX_FORGOTTEN:
            del self._forgotten[next(iter(self._forgotten))]

    # --- what the controller says ------------------------------------------------------------

    def publish_job_state(self, state: JobState) -> None:
        """Queue `state` for publishing; returns at once. A job's states coalesce to the latest."""
        self._outbox.put(OutgoingMessage.of(state))
        self._signal()

    def set_broker(self, host: str, port: int) -> None:
        """Use the broker at `host:port` from now on; an empty `host` disconnects.

        A different address than before closes the current connection and connects to the new
        one; the same address changes nothing.
        """
        broker = (host, port) if host else None
        if broker is not None and not 0 < port < 65536:
            log.error("status broker %s:%d has no valid port; not connecting", host, port)
            broker = None
        if broker == self._broker:
            return
        self._broker = broker
        self._signal(control=True)

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._task = asyncio.create_task(self._run(), name="coffer-status-monitor")
        self._task.add_done_callback(_log_crash)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        # Let the task send what is queued and disconnect cleanly; cancel it if it cannot
        # within CLOSE_TIMEOUT.
        self._closing = True
        self._signal(control=True)
        try:
            await asyncio.wait({task}, timeout=CLOSE_TIMEOUT)
        finally:
            # Also when our caller is cancelled while waiting: the task never outlives us.
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error

    # --- the connection task -----------------------------------------------------------------

    def _signal(self, *, control: bool = False) -> None:
        """Wake the task; safe from any thread, and a no-op before start or after the loop ends."""
        loop = self._loop
        if loop is None:
            return
        events = (self._wake, self._control) if control else (self._wake,)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            for event in events:
                event.set()
            return
        for event in events:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to wake
                loop.call_soon_threadsafe(event.set)

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            self._control.clear()
            broker = self._broker
            if broker is None:
                await self._control.wait()
                continue
            error: str | None = None
            connected_before = self._connections
            try:
                await self._session(*broker)
            except* (aiomqtt.MqttError, OSError, CofferError) as group:
                # CofferError: the TLS files could not be loaded (e.g. mid-renewal).
                error = _describe(group.exceptions[0])
            if error is None:
                attempt = 0
                continue
            if self._connections != connected_before:
                attempt = 0  # it was up: retry soon, and say so once
                log.warning("status broker %s:%d lost: %s", *broker, error)
            elif attempt == 0:
                log.warning("cannot reach status broker %s:%d: %s", *broker, error)
            else:
                log.debug("status broker %s:%d still unreachable: %s", *broker, error)
            delay = reconnect_delay(attempt)
            attempt += 1
            # A new address or closing ends the wait early.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._control.wait()

    async def _session(self, host: str, port: int) -> None:
        """One connection: subscribe, then receive and send until closing or a new broker."""
        context = await asyncio.to_thread(mqtt_ssl_context, self._tls)
        client = aiomqtt.Client(
            host,
            port,
            identifier=CONTROLLER_USERNAME,
            tls_context=context,
            keepalive=self._keepalive,
            timeout=OPERATION_TIMEOUT,
        )
        async with client:
            self._connected = True
            self._connections += 1
            log.info("status: connected to broker %s:%d", host, port)
            try:
                await self._subscribe(client)
                async with asyncio.TaskGroup() as tasks:
                    receiver = tasks.create_task(
                        self._receive(client), name="coffer-status-monitor-receive"
                    )
                    tasks.create_task(
                        self._drain(client, (host, port), receiver),
                        name="coffer-status-monitor-send",
                    )
            finally:
                self._connected = False

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        filters = [(PRESENCE_FILTER, Presence.QOS), (PROGRESS_FILTER, Progress.QOS)]
        granted = await client.subscribe(filters)
        # MQTT 3.1.1 answers with granted QoS values (0x80: refused), paho 2 as reason codes.
        codes = [c.value if isinstance(c, ReasonCode) else int(c) for c in granted]
        for (topic_filter, _), code in zip(filters, codes, strict=True):
            if code >= 0x80:
                # Reconnecting would not help: the broker's ACL lacks the controller's rights.
                log.error(
                    "the status broker refused the subscription to %s; check that its ACL "
                    "gives user %r read access to coffer/# (docs/mqtt.md)",
                    topic_filter,
                    CONTROLLER_USERNAME,
                )

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self._handle(message.topic.value, message.payload)
        raise aiomqtt.MqttError("the broker closed the connection")

    async def _drain(
        self, client: aiomqtt.Client, broker: tuple[str, int], receiver: asyncio.Task[None]
    ) -> None:
        while True:
            self._wake.clear()
            # Decided before taking the batch, so job states queued before closing go out.
            stopping = self._closing or self._broker != broker
            batch = self._outbox.take_all()
            sent = 0
            try:
                for message in batch:
                    await client.publish(
                        message.topic, message.payload, qos=message.qos, retain=message.retain
                    )
                    sent += 1
            finally:
                # Failed or cancelled: what was not sent waits for the next connection.
                self._outbox.requeue(batch[sent:])
            if stopping:
                receiver.cancel()
                return
            if not batch:
                await self._wake.wait()

    # --- incoming messages -------------------------------------------------------------------

    def _handle(self, topic: str, payload: object) -> None:
        try:
            if not isinstance(payload, bytes | bytearray):
                raise InvalidArgument(detail=f"payload of type {type(payload).__name__}")
            match parse_topic(topic):
                case TopicRef(kind=TopicKind.PRESENCE, vm_id=str() as vm_id):
                    self._on_presence(vm_id, bytes(payload))
                case TopicRef(kind=TopicKind.PROGRESS, vm_id=str() as vm_id, job_id=str() as job):
                    self._on_progress(vm_id, job, bytes(payload))
                case _:
                    # Job states are ours; we do not subscribe to them.
                    pass
        except InvalidArgument as e:
            # Never fatal: one bad publisher must not blind the controller to the others.
            log.warning("ignored status message on %r: %s", topic, e)

    def _on_presence(self, vm_id: str, payload: bytes) -> None:
        if not payload:
            # An empty retained message deletes the retained presence (a retired VM).
            log.info("presence of VM %r was cleared on the broker", vm_id)
            self._presences.drop(vm_id)
            return
        presence = Presence.from_json(payload)
        if presence.vm_id != vm_id:
            raise InvalidArgument(detail=f"the payload is about VM {presence.vm_id!r}")
        self._presences.set(vm_id, presence)

    def _on_progress(self, vm_id: str, job_id: str, payload: bytes) -> None:
        progress = Progress.from_json(payload)
        if (progress.vm_id, progress.job_id) != (vm_id, job_id):
            raise InvalidArgument(
                detail=f"the payload is about VM {progress.vm_id!r}, job {progress.job_id!r}"
            )
        if job_id in self._forgotten:
            log.debug("ignored progress of forgotten job %r", job_id)
            return
        self._progress.set(job_id, progress)


def _describe(error: BaseException) -> str:
    """`error` with its cause: aiomqtt reports a lost connection as an MqttError from the cause."""
    cause = error.__cause__
    return f"{error} ({cause})" if cause is not None else str(error) or type(error).__name__


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("status monitor stopped by a bug", exc_info=error)
