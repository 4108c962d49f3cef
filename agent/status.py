"""The agent's status publisher: presence and job progress over MQTT, never in a backup's way.

The broker address comes from the controller when the agent's session is accepted
(`set_broker`); an empty host means "no status broker". The connection is a
`shared.mqtt.MqttConnection`, which reconnects with a jittered, capped backoff; on each
connection the publisher sets its last will (presence `offline`, retained), publishes presence
`online` (retained), then sends whatever the backup pipeline left in the outbox, and before a
clean disconnect it says goodbye (presence `offline`, reason `shutdown`).

`publish_progress` only records the value and wakes the connection's task: it never blocks
and never raises because of MQTT, and while the broker is away each job's progress coalesces
to its latest value (see `shared.status.Outbox`). The catalog, fed over gRPC, is the record
of every result; this is only the live view. Topics and payloads: `shared.status`,
`docs/mqtt.md`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import ClassVar, Final

import aiomqtt

from shared.errors import InvalidArgument
from shared.mqtt import KEEPALIVE_SECONDS, MqttConnection
from shared.status import (
    OfflineReason,
    OutgoingMessage,
    Presence,
    PresenceState,
    Progress,
    utc_now,
)
from shared.tls import TlsFiles, validate_vm_id

log = logging.getLogger(__name__)

# The clean-exit goodbye (presence offline) may delay the agent's shutdown by this much.
GOODBYE_TIMEOUT: Final = 1.0


class StatusPublisher(MqttConnection):
    """Publishes the presence of VM `vm_id`'s agent and the progress of its jobs.

    `tls` is the agent's certificate (CN = `vm_id`, which the broker takes as the MQTT user
    name its ACL checks), key and the Coffer CA. Use as an async context manager; publish
    methods may be called at any time, from any thread, connected or not.
    """

    WHAT: ClassVar[str] = "status publisher"

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
        self._hostname = hostname
        self._agent_version = agent_version
        self._clock = clock
        self._presence(PresenceState.ONLINE)  # InvalidArgument now rather than at connect time
        # The client id is the VM id, which is the certificate's CN the broker may force anyway.
        super().__init__(
            tls,
            identifier=self._vm_id,
            task_name=f"coffer-status-publisher:{self._vm_id}",
            max_pending=max_pending,
            keepalive=keepalive,
        )

    @property
    def vm_id(self) -> str:
        return self._vm_id

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
        self._enqueue(OutgoingMessage.of(progress))

    # --- the connection's hooks --------------------------------------------------------------

    def _will(self) -> aiomqtt.Will:
        return aiomqtt.Will(
            topic=self._presence(PresenceState.OFFLINE).topic,
            payload=self._presence(PresenceState.OFFLINE, OfflineReason.CONNECTION_LOST).to_json(),
            qos=Presence.QOS,
            retain=Presence.RETAIN,
        )

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        online = self._presence(PresenceState.ONLINE)
        await client.publish(online.topic, online.to_json(), qos=online.QOS, retain=online.RETAIN)

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
