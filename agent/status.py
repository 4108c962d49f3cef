"""The agent's status publisher: presence and job progress over MQTT, never in a backup's way.

The broker address comes from the controller when the agent's session is accepted
(`set_broker`); an empty host means "no status broker". One background task owns the MQTT
connection and loops: connect (TLS client certificate, last will = presence `offline`
retained), publish presence `online` retained, then send whatever the backup pipeline left in
the outbox; on any MQTT or network error it waits a jittered, capped backoff and connects
again (aiomqtt has no reconnect of its own).

`publish_progress` only records the value and wakes that task: it never blocks and never
raises because of MQTT, and while the broker is away each job's progress coalesces to its
latest value (see `shared.status.Outbox`). The catalog, fed over gRPC, is the record of every
result; this is only the live view. Topics and payloads: `shared.status`, `docs/mqtt.md`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from types import TracebackType
from typing import Final, Self

import aiomqtt

from shared.errors import CofferError, InvalidArgument
from shared.status import (
    OfflineReason,
    Outbox,
    OutgoingMessage,
    Presence,
    PresenceState,
    Progress,
    reconnect_delay,
    utc_now,
)
from shared.tls import TlsFiles, mqtt_ssl_context, validate_vm_id

log = logging.getLogger(__name__)

# A dead connection (VM paused, network cut) is noticed after 1.5 keepalives; a killed agent
# at once, since its kernel closes the socket and the broker sends the will.
KEEPALIVE_SECONDS: Final = 15
# Bound on every wait for the broker: CONNACK, PUBACK, DISCONNECT.
OPERATION_TIMEOUT: Final = 5.0
# The clean-exit goodbye (presence offline) may delay the agent's shutdown by this much.
GOODBYE_TIMEOUT: Final = 1.0
CLOSE_TIMEOUT: Final = 3.0


class StatusPublisher:
    """Publishes the presence of VM `vm_id`'s agent and the progress of its jobs.

    `tls` is the agent's certificate (CN = `vm_id`, which the broker takes as the MQTT user
    name its ACL checks), key and the Coffer CA. Use as an async context manager; publish
    methods may be called at any time, from any thread, connected or not.
    """

    def __init__(
        self,
        vm_id: str,
        tls: TlsFiles,
        *,
        hostname: str,
        agent_version: str,
        clock: Callable[[], datetime] = utc_now,
        max_pending: int = 256,
        keepalive: int = KEEPALIVE_SECONDS,
    ) -> None:
        self._vm_id = validate_vm_id(vm_id)
        self._tls = tls
        self._hostname = hostname
        self._agent_version = agent_version
        self._clock = clock
        self._keepalive = keepalive
        self._presence(PresenceState.ONLINE)  # InvalidArgument now rather than at connect time
        self._outbox = Outbox(max_pending)
        self._broker: tuple[str, int] | None = None
        self._closing = False
        self._connected = False
        self._connections = 0  # successful connects so far
        # _wake: something to do (new message, new broker, closing); _control: only the latter.
        self._wake = asyncio.Event()
        self._control = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def vm_id(self) -> str:
        return self._vm_id

    @property
    def connected(self) -> bool:
        """Whether the publisher is connected to a broker right now."""
        return self._connected

    @property
    def broker(self) -> tuple[str, int] | None:
        return self._broker

    @property
    def pending(self) -> int:
        """How many messages wait for the broker (at most one per job, at most `max_pending`)."""
        return len(self._outbox)

    # --- the caller's side: never blocks, never raises because of MQTT --------------------

    def set_broker(self, host: str, port: int) -> None:
        """Publish to the broker at `host:port` from now on; an empty `host` stops publishing.

        A different address than before closes the current connection (saying goodbye) and
        connects to the new one; the same address changes nothing.
        """
        broker = (host, port) if host else None
        if broker is not None and not 0 < port < 65536:
            log.error("status broker %s:%d has no valid port; not publishing status", host, port)
            broker = None
        if broker == self._broker:
            return
        self._broker = broker
        self._signal(control=True)

    def publish_progress(
        self, job_id: str, phase: str, bytes_done: int, bytes_total: int, rate: float
    ) -> None:
        """Record job `job_id`'s latest progress for publishing; returns at once.

        A value that does not fit the schema (see `shared.status.Progress`) is logged and
        dropped: progress is a live view, not worth failing a backup over.
        """
        try:
            progress = Progress(
                vm_id=self._vm_id,
                job_id=job_id,
                phase=phase,
                bytes_done=bytes_done,
                bytes_total=bytes_total,
                rate_bytes_per_second=rate,
                ts=self._clock(),
            )
        except InvalidArgument as e:
            log.error("progress of job %r not published: %s", job_id, e)
            return
        self._outbox.put(OutgoingMessage.of(progress))
        self._signal()

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._task = asyncio.create_task(self._run(), name=f"coffer-status-publisher:{self._vm_id}")
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
        # Let the task say goodbye (presence offline) and disconnect; cancel it if it cannot
        # within CLOSE_TIMEOUT (e.g. stuck in a connect to an unreachable address). A connect
        # under way runs in aiomqtt's executor thread and cannot be interrupted: should it
        # still succeed, that connection ends with the process and the broker sends the will.
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

    # --- the publishing task -----------------------------------------------------------------

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
        """One connection: presence online, then the outbox, until closing or a new broker."""
        context = await asyncio.to_thread(mqtt_ssl_context, self._tls)
        will = aiomqtt.Will(
            topic=self._presence(PresenceState.OFFLINE).topic,
            payload=self._presence(PresenceState.OFFLINE, OfflineReason.CONNECTION_LOST).to_json(),
            qos=Presence.QOS,
            retain=Presence.RETAIN,
        )
        client = aiomqtt.Client(
            host,
            port,
            # A fixed id: a reconnect takes over a half-dead old connection at once, so its
            # will cannot land after (and over) our new `online`. The broker may also force
            # the id to the certificate's CN, which is the same.
            identifier=self._vm_id,
            tls_context=context,
            will=will,
            keepalive=self._keepalive,
            timeout=OPERATION_TIMEOUT,
        )
        async with client:
            self._connected = True
            self._connections += 1
            log.info("status: connected to broker %s:%d", host, port)
            try:
                async with asyncio.TaskGroup() as tasks:
                    watcher = tasks.create_task(
                        _until_disconnected(client), name=f"coffer-status-watch:{self._vm_id}"
                    )
                    tasks.create_task(
                        self._drain(client, (host, port), watcher),
                        name=f"coffer-status-drain:{self._vm_id}",
                    )
            finally:
                self._connected = False

    async def _drain(
        self, client: aiomqtt.Client, broker: tuple[str, int], watcher: asyncio.Task[None]
    ) -> None:
        online = self._presence(PresenceState.ONLINE)
        await client.publish(online.topic, online.to_json(), qos=online.QOS, retain=online.RETAIN)
        while True:
            self._wake.clear()
            # Decided before taking the batch, so the last progress goes out before goodbye.
            stopping = self._closing or self._broker != broker
            batch = self._outbox.take_all()
            await _send(client, batch, self._outbox)
            if stopping:
                await self._goodbye(client)
                watcher.cancel()
                return
            if not batch:
                await self._wake.wait()

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        offline = self._presence(PresenceState.OFFLINE, OfflineReason.SHUTDOWN)
        try:
            await client.publish(
                offline.topic,
                offline.to_json(),
                qos=offline.QOS,
                retain=offline.RETAIN,
                timeout=GOODBYE_TIMEOUT,
            )
        except aiomqtt.MqttError as e:
            log.info("status: could not publish presence offline on the way out: %s", e)

    def _presence(self, state: PresenceState, reason: OfflineReason | None = None) -> Presence:
        return Presence(
            vm_id=self._vm_id,
            state=state,
            hostname=self._hostname,
            agent_version=self._agent_version,
            ts=self._clock(),
            reason=reason,
        )


async def _send(client: aiomqtt.Client, batch: list[OutgoingMessage], outbox: Outbox) -> None:
    sent = 0
    try:
        for message in batch:
            await client.publish(
                message.topic, message.payload, qos=message.qos, retain=message.retain
            )
            sent += 1
    finally:
        # Failed or cancelled: what was not sent waits for the next connection.
        outbox.requeue(batch[sent:])


async def _until_disconnected(client: aiomqtt.Client) -> None:
    """Raise MqttError when the connection drops (the agent subscribes to nothing)."""
    async for _ in client.messages:
        pass
    raise aiomqtt.MqttError("the broker closed the connection")


def _describe(error: BaseException) -> str:
    """`error` with its cause: aiomqtt reports a lost connection as an MqttError from the cause."""
    cause = error.__cause__
    return f"{error} ({cause})" if cause is not None else str(error) or type(error).__name__


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("status publisher stopped by a bug", exc_info=error)
