"""The controller's status monitor: agents' presence and job progress in, job states out, over MQTT.

The connection is a `shared.mqtt.MqttConnection`, which reconnects with a jittered, capped
backoff; on each connection the monitor (controller's client certificate) subscribes to every
agent's presence and progress, keeps the latest of each in memory for the API and the
dashboard, and sends job states from a coalescing outbox. After a reconnect the retained
presences arrive again by themselves.

MQTT is the live view only: job outcomes come over gRPC into the catalog, so nothing here is
ever the record of a result, and nothing a caller does blocks or raises because the broker is
away. Topics and payloads: `shared.status`, `docs/mqtt.md`.

Every message is untrusted input: any agent may publish on its own topics. A message is
*dropped*, counted by reason in `dropped` and logged at most once per `DROP_LOG_INTERVAL`
(with a count of the ones not logged), never fatal to the monitor, when:

- its payload is not a valid Coffer payload (the decoders bound size and depth before
  parsing), or names another VM or job than its topic does (`malformed`);
- it is progress of a job that is not a running job of the VM whose topic it is on: the job
  layer says which job runs for which VM (`set_job_owner`), so an agent cannot change what
  `coffer job show` displays for another VM's job by naming it (`not-its-job`);
- it is progress published retained (`retained`): progress is never retained in Coffer's
  protocol, and a retained message would stay in the broker's memory for ever. The monitor
  clears it on the broker (an empty retained message). It can tell, because it subscribes
  with MQTT 5's retain-as-published, and with no-local so that it does not hear its clears;
- handling it hit a bug (`error`, logged with the traceback): one message must not blind the
  controller to every agent, least of all a retained one that comes back at every connect.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import ClassVar, Final, Generic, TypeVar

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from shared.errors import InvalidArgument
from shared.mqtt import KEEPALIVE_SECONDS, MqttConnection
from shared.status import (
    CONTROLLER_USERNAME,
    PRESENCE_FILTER,
    PROGRESS_FILTER,
    AlertStatus,
    JobState,
    OutgoingMessage,
    Presence,
    Progress,
    TopicKind,
    TopicRef,
    parse_topic,
)
from shared.tls import TlsFiles

log = logging.getLogger(__name__)

# Bounds on what agents can make the controller remember (a job id is any topic level an
# agent chooses); the least recently updated entries go first.
MAX_JOBS: Final = 10_000
MAX_FORGOTTEN: Final = 4096
# QoS 1 messages the broker may have in flight to the monitor before it waits for
# acknowledgements (MQTT 5 Receive Maximum; the broker's max_inflight_messages, 20, is for
# everyone else). Beyond it the broker queues (max_queued_messages, controller/broker.py).
RECEIVE_MAXIMUM: Final = 1000
DROP_LOG_INTERVAL: Final = 10.0

# Which running job belongs to which VM: the VM id of running job `job_id`, or None.
JobOwner = Callable[[str], str | None]


class DropReason(enum.StrEnum):
    MALFORMED = "malformed"
    NOT_ITS_JOB = "not-its-job"
    RETAINED = "retained"
    ERROR = "error"


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


class _DropLog:
    """Logs dropped messages at a bounded rate: the first at once, then one line per interval.

    A hostile or broken publisher can send thousands of bad messages a second; the log must
    say that it happens, and by whom, without becoming the attack.
    """

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self._interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._held: Counter[DropReason] = Counter()

    def drop(self, reason: DropReason, topic: str, why: str, *, traceback: bool = False) -> None:
        now = self._clock()
        if now < self._next:
            self._held[reason] += 1
            log.debug("dropped status message on %r (%s): %s", topic, reason, why)
            return
        self._next = now + self._interval
        held = ", ".join(f"{n} {r}" for r, n in sorted(self._held.items()))
        self._held.clear()
        log.warning(
            "dropped status message on %r (%s): %s%s",
            topic,
            reason,
            why,
            f"; and {held} since the last report" if held else "",
            exc_info=traceback,
        )


class StatusMonitor(MqttConnection):
    """What the agents report over MQTT, as the controller sees it; and job states out.

    `tls` is the controller's certificate (CN `coffer-controller`), key and the Coffer CA.
    Use as an async context manager and tell it where the broker is with `set_broker` (a
    configured broker, or `PrivateBroker.host/port`), and which running job is which VM's
    with `set_job_owner` (until then every progress is dropped). Every method but the
    `wait_*` ones returns at once; `publish_job_state` may be called from any thread. While
    not `connected`, what it holds may be stale. `dropped` counts the messages it refused, by
    reason (see the module docstring).
    """

    WHAT: ClassVar[str] = "status monitor"
    # MQTT 5 for its subscription options (retain-as-published, no-local) and Receive Maximum.
    PROTOCOL: ClassVar[aiomqtt.ProtocolVersion] = aiomqtt.ProtocolVersion.V5

    def __init__(
        self,
        tls: TlsFiles,
        *,
        max_jobs: int = MAX_JOBS,
        max_pending: int = 1024,
        keepalive: int = KEEPALIVE_SECONDS,
        job_owner: JobOwner | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            tls,
            identifier=CONTROLLER_USERNAME,
            task_name="coffer-status-monitor",
            max_pending=max_pending,
            keepalive=keepalive,
        )
        # Bounded too: presence topics are only as many as certificates, but cheap to cap.
        self._presences: _Latest[Presence] = _Latest(max_size=max_jobs)
        self._progress: _Latest[Progress] = _Latest(max_size=max_jobs)
        # Progress still in flight when the controller forgot the job must not bring it back.
        self._forgotten: dict[str, None] = {}
        self._job_owner: JobOwner = job_owner or _no_owner
        # Told (VM id, [job id]) of every progress taken: the job layer's reply deadlines.
        self.on_progress: list[Callable[[str, list[str]], None]] = []
        self.dropped: Counter[DropReason] = Counter()
        self._drop_log = _DropLog(DROP_LOG_INTERVAL, clock)

    def set_job_owner(self, job_owner: JobOwner) -> None:
        """Ask `job_owner` which VM a job runs for (the job layer: controller.jobs)."""
        self._job_owner = job_owner

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
        self._enqueue(OutgoingMessage.of(state))

    def publish_alert(self, alert: AlertStatus) -> None:
        """Queue an alert's state (retained) for publishing; returns at once."""
        self._enqueue(OutgoingMessage.of(alert))

    # --- the connection's hooks --------------------------------------------------------------

    def _connect_properties(self) -> Properties:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho
        properties.ReceiveMaximum = RECEIVE_MAXIMUM
        return properties

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        filters = [(PRESENCE_FILTER, Presence.QOS), (PROGRESS_FILTER, Progress.QOS)]
        granted = await client.subscribe(
            [
                # Retain-as-published: a retained progress is told apart even when live.
                # No-local: the monitor's own clears of such messages do not come back.
                (f, SubscribeOptions(qos=qos, noLocal=True, retainAsPublished=True))
                for f, qos in filters
            ]
        )
        # MQTT 3.1.1 answers with granted QoS values (0x80: refused), paho 2 as reason codes.
        codes = [c.value if isinstance(c, ReasonCode) else int(c) for c in granted]
        for (topic_filter, _), code in zip(filters, codes, strict=True):
            if code >= 0x80:
                # Reconnecting would not help: the broker's ACL lacks the controller's rights.
                log.error(
                    "the status broker refused the subscription to %s; check that its ACL "
                    "gives user %r read access to it (docs/mqtt.md)",
                    topic_filter,
                    CONTROLLER_USERNAME,
                )

    def _on_message(self, topic: str, payload: object, retain: bool) -> None:
        try:
            match parse_topic(topic):
                case TopicRef(kind=TopicKind.PRESENCE, vm_id=str() as vm_id):
                    self._on_presence(vm_id, _bytes(payload))
                case TopicRef(kind=TopicKind.PROGRESS, vm_id=str() as vm_id, job_id=str() as job):
                    self._on_progress(vm_id, job, _bytes(payload), retain, topic)
                case _:
                    # Job states are ours; we do not subscribe to them.
                    pass
        except _Dropped as e:
            self._drop(e.reason, topic, e.why)
        except InvalidArgument as e:
            self._drop(DropReason.MALFORMED, topic, str(e))
        # Anything else is a bug in the code below, met on untrusted input. Logged with its
        # traceback (at a bounded rate) and counted; the monitor goes on with the next message
        # rather than end its session: a retained message that trips the bug would end every
        # session at once, and the controller would never see an agent again.
        except Exception as e:  # noqa: BLE001 - logged with its traceback by _drop
            self._drop(DropReason.ERROR, topic, f"{type(e).__name__}: {e}", traceback=True)

    def _drop(self, reason: DropReason, topic: str, why: str, *, traceback: bool = False) -> None:
        self.dropped[reason] += 1
        self._drop_log.drop(reason, topic[:200], why, traceback=traceback)

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

    def _on_progress(
        self, vm_id: str, job_id: str, payload: bytes, retain: bool, topic: str
    ) -> None:
        if retain:
            if payload:  # an empty one is a clear (ours, or an administrator's)
                self._chore(OutgoingMessage(topic, b"", qos=0, retain=True))
                raise _Dropped(DropReason.RETAINED, "progress is never retained; cleared it")
            return
        progress = Progress.from_json(payload)
        if (progress.vm_id, progress.job_id) != (vm_id, job_id):
            raise InvalidArgument(
                detail=f"the payload is about VM {progress.vm_id!r}, job {progress.job_id!r}"
            )
        if job_id in self._forgotten:
            log.debug("ignored progress of forgotten job %r", job_id)
            return
        owner = self._job_owner(job_id)
        if owner != vm_id:
            raise _Dropped(
                DropReason.NOT_ITS_JOB,
                f"job {job_id!r} is not a running job of VM {vm_id!r}",
            )
        self._progress.set(job_id, progress)
        for listener in self.on_progress:
            listener(vm_id, [job_id])


class _Dropped(Exception):
    """A message refused for a reason other than its form (raised and caught here only)."""

    def __init__(self, reason: DropReason, why: str) -> None:
        super().__init__(why)
        self.reason = reason
        self.why = why


def _bytes(payload: object) -> bytes:
    if not isinstance(payload, bytes | bytearray):
        raise InvalidArgument(detail=f"payload of type {type(payload).__name__}")
    return bytes(payload)


def _no_owner(job_id: str) -> None:
    return None
