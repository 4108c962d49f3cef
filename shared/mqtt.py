"""A reconnecting MQTT connection: the loop of the agent's publisher and the controller's monitor.

aiomqtt has no reconnect of its own, so `MqttConnection` owns one background task that loops
(under a `Supervisor`, RESTART: should the loop itself fail, a bug, it is logged with its
traceback and started again rather than leave the connection dead in silence):
connect to the current broker (TLS client certificate, a fixed client id, the subclass's last
will), run a session, and on any MQTT or network error wait a jittered, capped backoff
(`shared.status.RECONNECT`) and connect again. A session is two tasks in a TaskGroup:
one receives (and is how a dropped connection is noticed, even by a client that subscribes to
nothing), the other sends what waits in a coalescing `Outbox`. A session ends cleanly when its
owner closes it or `set_broker` names another address: what was queued before goes out, the
subclass says goodbye, then the client disconnects. `leave` disconnects without the goodbye.

Callers never block and never see an MQTT error: they fill the outbox and `_signal` the task,
from any thread. Closing (leaving the `async with`) gives the session CLOSE_TIMEOUT to finish,
then cancels it; the task never outlives the context. What differs between the two sides is
small and lives in the subclasses: the protocol version and CONNECT properties, the client id
and will, the first words on each connection (`_on_connect`: announce presence, or subscribe),
incoming messages (`_on_message`, which must not raise: a message is untrusted input, and a
failure there would end the session), housekeeping messages that are sent once and not kept
over a reconnect (`_chore`), and the last words (`_goodbye`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from types import TracebackType
from typing import ClassVar, Final, Self

import aiomqtt
from paho.mqtt.properties import Properties

from shared.errors import CofferError
from shared.status import RECONNECT, Outbox, OutgoingMessage
from shared.supervision import Policy, Supervisor
from shared.tls import TlsFiles, mqtt_ssl_context

# A dead connection (VM paused, network cut) is noticed after 1.5 keepalives; a killed agent
# at once, since its kernel closes the socket and the broker sends the will.
KEEPALIVE_SECONDS: Final = 15
# Bound on every wait for the broker: CONNACK, SUBACK, PUBACK, DISCONNECT.
OPERATION_TIMEOUT: Final = 5.0
CLOSE_TIMEOUT: Final = 3.0


class MqttConnection(abc.ABC):
    """One MQTT client to whichever broker `set_broker` names, reconnecting until closed.

    `tls` is the client's certificate, key and the Coffer CA; `identifier` the MQTT client id
    (the certificate's CN, which the broker may force anyway); `task_name` names the
    background task. Use as an async context manager; `set_broker` and `_enqueue` may be
    called at any time, from any thread, connected or not.
    """

    # What the connection is to its owner: names its supervisor in the log.
    WHAT: ClassVar[str] = "status connection"
    # MQTT 3.1.1 unless a side needs 5 (the controller's monitor does: subscription options).
    PROTOCOL: ClassVar[aiomqtt.ProtocolVersion] = aiomqtt.ProtocolVersion.V311
    # Housekeeping messages waiting at most (see `_chore`).
    MAX_CHORES: ClassVar[int] = 4096

    def __init__(
        self,
        tls: TlsFiles,
        *,
        identifier: str,
        task_name: str,
        max_pending: int,
        keepalive: int = KEEPALIVE_SECONDS,
    ) -> None:
        self._tls = tls
        self._identifier = identifier
        self._task_name = task_name
        self._keepalive = keepalive
        # Log as the subclass's module (agent.status, controller.status): whose connection it is.
        self._log = logging.getLogger(type(self).__module__)
        self._outbox = Outbox(max_pending)
        self._chores = Outbox(self.MAX_CHORES)
        self._broker: tuple[str, int] | None = None
        self._closing = False
        self._quiet = False  # leaving without last words (`leave`)
        self._connected = False
        self._connections = 0  # successful connects so far
        # _wake: something to do (new message, new broker, closing); _control: only the latter.
        self._wake = asyncio.Event()
        self._control = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: Supervisor | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        """Whether a connection to a broker is up right now."""
        return self._connected

    @property
    def broker(self) -> tuple[str, int] | None:
        return self._broker

    @property
    def pending(self) -> int:
        """How many messages wait for the broker (at most one per topic, at most `max_pending`)."""
        return len(self._outbox)

    def set_broker(self, host: str, port: int) -> None:
        """Use the broker at `host:port` from now on; an empty `host` disconnects.

        A different address than before ends the current session (cleanly: queued messages
        and goodbye first) and connects to the new one; the same address changes nothing.
        """
        broker = (host, port) if host else None
        if broker is not None and not 0 < port < 65536:
            self._log.error("status broker %s:%d has no valid port; not connecting", host, port)
            broker = None
        if broker is not None:
            self._quiet = False
        if broker == self._broker:
            return
        self._broker = broker
        self._signal(control=True)

    def leave(self) -> None:
        """Disconnect from the broker without last words, until `set_broker` names one again.

        No goodbye, and no will either (a clean disconnect drops it): for a client whose
        identity another process now speaks for, whose presence must not be overwritten.
        """
        self._quiet = True
        self.set_broker("", 0)

    def _enqueue(self, message: OutgoingMessage) -> None:
        """Queue `message` for the broker and wake the task; returns at once, from any thread."""
        self._outbox.put(message)
        self._signal()

    def _chore(self, message: OutgoingMessage) -> None:
        """Send `message` on this connection if it can, before what the outbox holds.

        For housekeeping that answers what the broker sent on this connection (clearing a
        retained message): not kept for the next connection, where the same cause arrives
        again and asks again; bounded apart from the outbox, so it never pushes a caller's
        message out.
        """
        self._chores.put(message)
        self._signal()

    # --- what the subclasses say -------------------------------------------------------------

    def _will(self) -> aiomqtt.Will | None:
        """The last will of the next connection (asked at each connect), or None."""
        return None

    def _connect_properties(self) -> Properties | None:
        """MQTT 5 CONNECT properties of the next connection (only with PROTOCOL V5), or None."""
        return None

    @abc.abstractmethod
    async def _on_connect(self, client: aiomqtt.Client) -> None:
        """First words on each new connection, before anything queued is sent."""

    # Optional hooks: empty by default, not abstract (B027).
    def _on_message(self, topic: str, payload: object, retain: bool) -> None:  # noqa: B027
        """One incoming message; must not raise (none arrive without a subscription).

        `retain` is the message's retain flag: set for retained messages replayed on
        subscribing, and with MQTT 5's retain-as-published option also for live ones.
        """

    async def _goodbye(self, client: aiomqtt.Client) -> None:  # noqa: B027
        """Last words before a clean disconnect (closing, or moving to another broker)."""

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._closing = False
        tasks = Supervisor(self.WHAT)
        await tasks.__aenter__()
        self._tasks = tasks
        # RESTART: the loop's state (outbox, broker, backoff) lives in this object; a loop that
        # failed picks it up again.
        self._task = tasks.start(self._task_name, self._run, policy=Policy.RESTART)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        tasks, self._tasks = self._tasks, None
        if task is None or tasks is None:
            return
        # Let the task send what is queued, say goodbye and disconnect; cancel it if it cannot
        # within CLOSE_TIMEOUT (e.g. stuck in a connect to an unreachable address). A connect
        # under way runs in aiomqtt's executor thread and cannot be interrupted: should it
        # still succeed, that connection ends with the process (and the broker sends the will).
        self._closing = True
        self._signal(control=True)
        try:
            await asyncio.wait({task}, timeout=CLOSE_TIMEOUT)
        finally:
            # Also when our caller is cancelled while waiting: leaving the supervisor cancels
            # and awaits the task, which never outlives us.
            await tasks.__aexit__(None, None, None)

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
                self._log.warning("status broker %s:%d lost: %s", *broker, error)
            elif attempt == 0:
                self._log.warning("cannot reach status broker %s:%d: %s", *broker, error)
            else:
                self._log.debug("status broker %s:%d still unreachable: %s", *broker, error)
            delay = RECONNECT.delay(attempt)
            attempt += 1
            # A new address or closing ends the wait early.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._control.wait()

    async def _session(self, host: str, port: int) -> None:
        """One connection: receive and send until closing or a new broker."""
        context = await asyncio.to_thread(mqtt_ssl_context, self._tls)
        client = aiomqtt.Client(
            host,
            port,
            # A fixed id: a reconnect takes over a half-dead old connection at once, so its
            # will cannot land after (and over) what the new connection says.
            identifier=self._identifier,
            tls_context=context,
            will=self._will(),
            keepalive=self._keepalive,
            timeout=OPERATION_TIMEOUT,
            protocol=self.PROTOCOL,
            properties=self._connect_properties(),
        )
        self._chores.take_all()  # asked for by an earlier connection; this one asks anew
        async with client:
            self._connected = True
            self._connections += 1
            self._log.info("status: connected to broker %s:%d", host, port)
            try:
                async with asyncio.TaskGroup() as tasks:
                    receiver = tasks.create_task(
                        self._receive(client), name=f"{self._task_name}-receive"
                    )
                    tasks.create_task(
                        self._drain(client, (host, port), receiver),
                        name=f"{self._task_name}-send",
                    )
            finally:
                self._connected = False

    async def _receive(self, client: aiomqtt.Client) -> None:
        """Hand over incoming messages; raise MqttError when the connection drops."""
        async for message in client.messages:
            self._on_message(message.topic.value, message.payload, bool(message.retain))
        raise aiomqtt.MqttError("the broker closed the connection")

    async def _drain(
        self, client: aiomqtt.Client, broker: tuple[str, int], receiver: asyncio.Task[None]
    ) -> None:
        await self._on_connect(client)
        while True:
            self._wake.clear()
            # Decided before taking the batch, so what was queued before closing goes out.
            stopping = self._closing or self._broker != broker
            chores = self._chores.take_all()
            for chore in chores:
                await client.publish(chore.topic, chore.payload, qos=chore.qos, retain=chore.retain)
            batch = self._outbox.take_all()
            await _send(client, batch, self._outbox)
            if stopping:
                if not self._quiet:
                    await self._goodbye(client)
                receiver.cancel()
                return
            if not batch and not chores:
                await self._wake.wait()


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


def _describe(error: BaseException) -> str:
    """`error` with its cause: aiomqtt reports a lost connection as an MqttError from the cause."""
    cause = error.__cause__
    return f"{error} ({cause})" if cause is not None else str(error) or type(error).__name__
