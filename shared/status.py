"""The MQTT status contract: topics, JSON payloads and delivery rules of Coffer's status feed.

MQTT carries *status* (who is online, how far a job is); it is never the record of a result,
which goes over gRPC into the catalog. So everything here favours "latest value, cheaply"
over "every value, reliably". The full description, with examples, is `docs/mqtt.md`.

Topics (all under the versioned root `coffer/v1`):

    coffer/v1/agents/<vm_id>/presence              agent → all   QoS 1, retained, also the will
    coffer/v1/agents/<vm_id>/jobs/<job_id>/progress agent → all   QoS 0, not retained
    coffer/v1/jobs/<job_id>/state                  controller → all  QoS 1, not retained

Payloads are UTF-8 JSON objects with `"v": 1` first. Readers ignore fields they do not know
(new optional fields do not change `v`); a payload with another `v`, a missing or mistyped
field, or ids that do not match its topic is refused with `InvalidArgument`. Timestamps are
ISO-8601 in UTC with a `Z` suffix.

Every payload a reader gets is untrusted (any agent can publish on its own topics), so the
decoders here raise nothing but `InvalidArgument`, whatever the bytes: the size is checked
first (`MAX_PAYLOAD_BYTES`), then how deep arrays and objects nest, by a cheap scan of the
bytes (`MAX_NESTING`), and only then does `json` parse, since it recurses once per level and
a few kilobytes of brackets would exhaust Python's stack. Text fields must be printable (no
control or escape characters, no lone surrogates) and counts must fit in 63 bits: what a
reader accepts can always be shown, stored and encoded again. `tests/test_status_fuzz.py`
holds the decoders to this with property-based tests.

The module also holds the delivery rules both publishers share, as pure code: `Outbox`
(latest message per topic, bounded) and `RECONNECT` (its backoff).
"""

from __future__ import annotations

import enum
import json
import math
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, Self

from shared.backoff import Backoff
from shared.errors import InvalidArgument
from shared.model import JobStatus
from shared.tls import CONTROLLER_NAME, validate_vm_id

SCHEMA_VERSION: Final = 1
TOPIC_ROOT: Final = "coffer/v1"
# The broker maps a client certificate's CN to the MQTT user name (and client id); this is the
# controller's. Agents' user names are their VM ids, which can never take it (`validate_vm_id`).
CONTROLLER_USERNAME: Final = CONTROLLER_NAME

PRESENCE_FILTER: Final = f"{TOPIC_ROOT}/agents/+/presence"
PROGRESS_FILTER: Final = f"{TOPIC_ROOT}/agents/+/jobs/+/progress"
JOB_STATE_FILTER: Final = f"{TOPIC_ROOT}/jobs/+/state"

# What a reader parses at most. The largest valid payload is about 2.4 KiB (a job state with a
# 256-character operation and error code of 4-byte UTF-8 characters); real ones are a few
# hundred bytes. The broker refuses bigger packets (controller/broker.py), so this is also
# what one retained presence can cost it.
MAX_PAYLOAD_BYTES: Final = 4096
# How deep arrays and objects may nest in a payload. Coffer's payloads are flat objects (depth
# 1); the slack is for fields a later version may add, which readers ignore.
MAX_NESTING: Final = 8
# Counts (bytes) must fit a signed 64-bit integer: the catalog's and protobuf's.
MAX_COUNT: Final = (1 << 63) - 1

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_MAX_TEXT = 256
# The bytes a nesting scan looks at: string delimiters, escapes, and brackets.
_STRUCTURE = re.compile(rb'[\\"\[\]{}]')


# --- topics --------------------------------------------------------------------------------


class TopicKind(enum.StrEnum):
    PRESENCE = "presence"
    PROGRESS = "progress"
    JOB_STATE = "job-state"


@dataclass(frozen=True)
class TopicRef:
    """What a Coffer topic names: its kind and the ids in it (None where the kind has none)."""

    kind: TopicKind
    vm_id: str | None = None
    job_id: str | None = None


def validate_job_id(job_id: str) -> str:
    """`job_id` if it can be one MQTT topic level, else InvalidArgument."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise InvalidArgument(
            detail=f"job id {job_id!r} must be 1-128 characters of A-Z, a-z, 0-9, '.', '_', ':' "
            "or '-', starting with a letter or digit"
        )
    return job_id


def _vm_id(vm_id: object) -> str:
    if not isinstance(vm_id, str):
        raise InvalidArgument(detail=f"VM id {vm_id!r} is not a string")
    return validate_vm_id(vm_id)


def agent_prefix(vm_id: str) -> str:
    """The topic prefix under which (and only under which) the agent of `vm_id` may publish."""
    return f"{TOPIC_ROOT}/agents/{_vm_id(vm_id)}"


def presence_topic(vm_id: str) -> str:
    return f"{agent_prefix(vm_id)}/presence"


def progress_topic(vm_id: str, job_id: str) -> str:
    return f"{agent_prefix(vm_id)}/jobs/{validate_job_id(job_id)}/progress"


def job_state_topic(job_id: str) -> str:
    return f"{TOPIC_ROOT}/jobs/{validate_job_id(job_id)}/state"


def parse_topic(topic: str) -> TopicRef:
    """Which Coffer topic `topic` is, with its ids; InvalidArgument for any other topic."""
    levels = topic.split("/")
    try:
        match levels:
            case ["coffer", "v1", "agents", vm_id, "presence"]:
                return TopicRef(TopicKind.PRESENCE, vm_id=_vm_id(vm_id))
            case ["coffer", "v1", "agents", vm_id, "jobs", job_id, "progress"]:
                return TopicRef(
                    TopicKind.PROGRESS, vm_id=_vm_id(vm_id), job_id=validate_job_id(job_id)
                )
            case ["coffer", "v1", "jobs", job_id, "state"]:
                return TopicRef(TopicKind.JOB_STATE, job_id=validate_job_id(job_id))
    except InvalidArgument as e:
        raise InvalidArgument(detail=f"topic {topic!r}: {e}") from e
    raise InvalidArgument(detail=f"topic {topic!r} is not a Coffer v1 status topic")


# --- timestamps ----------------------------------------------------------------------------


def utc_now() -> datetime:
    """The default clock of status publishers: now, in UTC."""
    return datetime.now(UTC)


def format_ts(ts: datetime) -> str:
    """`ts` as ISO-8601 UTC with microseconds and a `Z` suffix."""
    return ts.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_ts(text: str) -> datetime:
    """An ISO-8601 timestamp with a UTC offset (or `Z`), in UTC; InvalidArgument otherwise."""
    try:
        ts = datetime.fromisoformat(text)
    except ValueError as e:
        raise InvalidArgument(detail=f"timestamp {text!r} is not ISO-8601") from e
    if ts.tzinfo is None:
        raise InvalidArgument(detail=f"timestamp {text!r} has no UTC offset")
    return _in_utc(ts, text)


def _utc(ts: object, name: str) -> datetime:
    if not isinstance(ts, datetime) or ts.tzinfo is None:
        raise InvalidArgument(detail=f"{name} must be a timezone-aware datetime, not {ts!r}")
    return _in_utc(ts, name)


def _in_utc(ts: datetime, what: str) -> datetime:
    try:
        return ts.astimezone(UTC)
    except OverflowError as e:  # e.g. 0001-01-01T00:00+01:00 is before year 1 in UTC
        raise InvalidArgument(detail=f"timestamp {what!r} is out of range in UTC") from e


# --- payload checks ------------------------------------------------------------------------


def _text(value: object, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT:
        raise InvalidArgument(detail=f"{name} must be a string of 1-{_MAX_TEXT} characters")
    # Control and escape characters would reach an operator's terminal; lone surrogates could
    # not be encoded again (UTF-8, protobuf). Neither belongs in a status field.
    if not value.isprintable():
        raise InvalidArgument(detail=f"{name} holds control or unprintable characters")
    return value


def _optional_text(value: object, name: str) -> str | None:
    return None if value is None else _text(value, name)


def _count(value: object, name: str) -> int:
    # bool is an int to Python but never a byte count.
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise InvalidArgument(
            detail=f"{name} must be an integer from 0 to 2^63-1, not {_short(value)}"
        )
    return value


def _rate(value: object, name: str) -> float:
    problem = f"{name} must be a finite non-negative number, not {_short(value)}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(detail=problem)
    try:
        rate = float(value)
    except OverflowError as e:  # an integer beyond any float
        raise InvalidArgument(detail=problem) from e
    if not math.isfinite(rate) or rate < 0:
        raise InvalidArgument(detail=problem)
    return rate


def _short(value: object) -> str:
    """`value` for an error message, cut short: a refused value may be kilobytes long."""
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 256 else "a huge int"
    return text if len(text) <= 64 else f"{text[:61]}..."


def nesting_depth(payload: bytes) -> int:
    """How deep JSON arrays and objects nest in `payload` (brackets in strings do not count).

    One pass over the bytes, without parsing: what a reader checks before handing untrusted
    bytes to `json`, which recurses once per level. Made for well-formed JSON; on anything
    else the answer is only an upper bound of what a parser would get to, which is all a
    reader needs.
    """
    # Every `[` or `{` opens a level, so few of them bound the depth: the common case.
    if payload.count(b"[") + payload.count(b"{") <= MAX_NESTING:
        return payload.count(b"[") + payload.count(b"{")
    depth = deepest = 0
    in_string = False
    escaped = -1  # the position of the character a backslash escapes
    for match in _STRUCTURE.finditer(payload):
        at = match.start()
        if at == escaped:
            continue
        char = payload[at : at + 1]
        if in_string:
            if char == b"\\":
                escaped = at + 1
            elif char == b'"':
                in_string = False
        elif char == b'"':
            in_string = True
        elif char in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif char in (b"]", b"}"):
            depth -= 1
    return deepest


def _decode(payload: bytes, what: str) -> dict[str, Any]:
    """The JSON object in `payload`, with its schema version checked.

    Size and depth are bounded before `json` sees the bytes (see the module docstring).
    """
    if not isinstance(payload, bytes | bytearray):
        raise InvalidArgument(detail=f"{what} payload is {type(payload).__name__}, not bytes")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InvalidArgument(
            detail=f"{what} payload of {len(payload)} bytes is over {MAX_PAYLOAD_BYTES}"
        )
    if (depth := nesting_depth(payload)) > MAX_NESTING:
        raise InvalidArgument(
            detail=f"{what} payload nests {depth} levels deep, over {MAX_NESTING}"
        )
    try:
        document = json.loads(payload)
    # JSONDecodeError and UnicodeDecodeError are ValueErrors, as is an integer literal of
    # more than 4300 digits. RecursionError cannot happen below MAX_NESTING; caught all the
    # same, since this is the one place untrusted bytes are parsed.
    except (ValueError, RecursionError) as e:
        raise InvalidArgument(detail=f"{what} payload is not JSON: {_short(str(e))}") from e
    if not isinstance(document, dict):
        raise InvalidArgument(detail=f"{what} payload is not a JSON object")
    version = document.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise InvalidArgument(
            detail=f"{what} payload has schema version {version!r}; "
            f"this Coffer reads version {SCHEMA_VERSION}"
        )
    return document


def _field(document: dict[str, Any], name: str, what: str) -> Any:
    try:
        return document[name]
    except KeyError:
        raise InvalidArgument(detail=f"{what} payload lacks {name!r}") from None


def _encode(document: dict[str, Any]) -> bytes:
    # UTF-8 rather than \u escapes: 256 characters of any text fit MAX_PAYLOAD_BYTES.
    return json.dumps(
        {"v": SCHEMA_VERSION, **document}, separators=(",", ":"), ensure_ascii=False
    ).encode()


# --- payloads ------------------------------------------------------------------------------


class PresenceState(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class OfflineReason(enum.StrEnum):
    # The agent said goodbye before disconnecting (clean shutdown, or moving to another broker).
    SHUTDOWN = "shutdown"
    # The broker published the agent's last will: its connection broke without a goodbye.
    CONNECTION_LOST = "connection-lost"


@dataclass(frozen=True)
class Presence:
    """Whether an agent is connected to the status broker, and what it runs.

    For the last will, `ts` is when the connection that set it was made: the broker sends the
    will verbatim when it notices the loss, so the time of the loss is not in it.
    """

    QOS: ClassVar[int] = 1
    RETAIN: ClassVar[bool] = True
    WHAT: ClassVar[str] = "presence"

    vm_id: str
    state: PresenceState
    hostname: str
    agent_version: str
    ts: datetime
    reason: OfflineReason | None = None  # set only when offline

    def __post_init__(self) -> None:
        _vm_id(self.vm_id)
        try:
            object.__setattr__(self, "state", PresenceState(self.state))
            if self.reason is not None:
                object.__setattr__(self, "reason", OfflineReason(self.reason))
        except (ValueError, TypeError) as e:
            raise InvalidArgument(detail=f"presence: {e}") from e
        if self.state is PresenceState.ONLINE and self.reason is not None:
            raise InvalidArgument(detail="presence: an online agent has no offline reason")
        _text(self.hostname, "hostname")
        _text(self.agent_version, "agent_version")
        object.__setattr__(self, "ts", _utc(self.ts, "ts"))

    @property
    def topic(self) -> str:
        return presence_topic(self.vm_id)

    def to_json(self) -> bytes:
        return _encode(
            {
                "vm_id": self.vm_id,
                "state": str(self.state),
                "reason": None if self.reason is None else str(self.reason),
                "hostname": self.hostname,
                "agent_version": self.agent_version,
                "ts": format_ts(self.ts),
            }
        )

    @classmethod
    def from_json(cls, payload: bytes) -> Self:
        document = _decode(payload, cls.WHAT)
        return cls(
            vm_id=_field(document, "vm_id", cls.WHAT),
            state=_field(document, "state", cls.WHAT),
            hostname=_field(document, "hostname", cls.WHAT),
            agent_version=_field(document, "agent_version", cls.WHAT),
            ts=parse_ts(_text(_field(document, "ts", cls.WHAT), "ts")),
            reason=document.get("reason"),
        )


@dataclass(frozen=True)
class Progress:
    """How far one job of one agent is: the latest figures, superseding any earlier ones.

    `phase` is the agent's word for what it does now (e.g. `pre-script`, `freeze`,
    `snapshot`, `transfer`, `restore`); `bytes_total` may be 0 while it is not known yet.
    """

    QOS: ClassVar[int] = 0
    RETAIN: ClassVar[bool] = False
    WHAT: ClassVar[str] = "progress"

    vm_id: str
    job_id: str
    phase: str
    bytes_done: int
    bytes_total: int
    rate_bytes_per_second: float
    ts: datetime

    def __post_init__(self) -> None:
        _vm_id(self.vm_id)
        validate_job_id(self.job_id)
        _text(self.phase, "phase")
        _count(self.bytes_done, "bytes_done")
        _count(self.bytes_total, "bytes_total")
        rate = _rate(self.rate_bytes_per_second, "rate_bytes_per_second")
        object.__setattr__(self, "rate_bytes_per_second", rate)
        object.__setattr__(self, "ts", _utc(self.ts, "ts"))

    @property
    def topic(self) -> str:
        return progress_topic(self.vm_id, self.job_id)

    def to_json(self) -> bytes:
        return _encode(
            {
                "vm_id": self.vm_id,
                "job_id": self.job_id,
                "phase": self.phase,
                "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total,
                "rate_bytes_per_second": self.rate_bytes_per_second,
                "ts": format_ts(self.ts),
            }
        )

    @classmethod
    def from_json(cls, payload: bytes) -> Self:
        document = _decode(payload, cls.WHAT)
        return cls(
            vm_id=_field(document, "vm_id", cls.WHAT),
            job_id=_field(document, "job_id", cls.WHAT),
            phase=_field(document, "phase", cls.WHAT),
            bytes_done=_field(document, "bytes_done", cls.WHAT),
            bytes_total=_field(document, "bytes_total", cls.WHAT),
            rate_bytes_per_second=_field(document, "rate_bytes_per_second", cls.WHAT),
            ts=parse_ts(_text(_field(document, "ts", cls.WHAT), "ts")),
        )


@dataclass(frozen=True)
class JobState:
    """A job's status as the controller last changed it (the catalog holds the record).

    `vm_id` is None for jobs about no single VM (e.g. discovery); `error_code` is a stable
    `CofferError` code, set when the job failed or ended with warnings.
    """

    QOS: ClassVar[int] = 1
    RETAIN: ClassVar[bool] = False
    WHAT: ClassVar[str] = "job state"

    job_id: str
    operation: str
    status: JobStatus
    vm_id: str | None
    error_code: str | None
    ts: datetime

    def __post_init__(self) -> None:
        validate_job_id(self.job_id)
        _text(self.operation, "operation")
        try:
            object.__setattr__(self, "status", JobStatus(self.status))
        except (ValueError, TypeError) as e:
            raise InvalidArgument(detail=f"job state: {e}") from e
        if self.vm_id is not None:
            _vm_id(self.vm_id)
        _optional_text(self.error_code, "error_code")
        object.__setattr__(self, "ts", _utc(self.ts, "ts"))

    @property
    def topic(self) -> str:
        return job_state_topic(self.job_id)

    def to_json(self) -> bytes:
        return _encode(
            {
                "job_id": self.job_id,
                "operation": self.operation,
                "status": str(self.status),
                "vm_id": self.vm_id,
                "error_code": self.error_code,
                "ts": format_ts(self.ts),
            }
        )

    @classmethod
    def from_json(cls, payload: bytes) -> Self:
        document = _decode(payload, cls.WHAT)
        return cls(
            job_id=_field(document, "job_id", cls.WHAT),
            operation=_field(document, "operation", cls.WHAT),
            status=_field(document, "status", cls.WHAT),
            vm_id=document.get("vm_id"),
            error_code=document.get("error_code"),
            ts=parse_ts(_text(_field(document, "ts", cls.WHAT), "ts")),
        )


# --- delivery rules ------------------------------------------------------------------------


@dataclass(frozen=True)
class OutgoingMessage:
    """One message waiting for the broker."""

    topic: str
    payload: bytes
    qos: int
    retain: bool

    @classmethod
    def of(cls, status: Presence | Progress | JobState) -> OutgoingMessage:
        return cls(status.topic, status.to_json(), status.QOS, status.RETAIN)


@dataclass
class Outbox:
    """Messages waiting for the broker: only the latest per topic, at most `max_topics` topics.

    A newer message for a topic replaces the waiting one, so a job's progress coalesces to its
    latest value however long the broker is away; past `max_topics` the oldest topic's message
    is dropped (and counted), so memory stays bounded. Safe to fill from any thread.
    """

    max_topics: int = 256
    dropped: int = 0
    _pending: dict[str, OutgoingMessage] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.max_topics < 1:
            raise InvalidArgument(detail="an outbox holds at least one topic")

    def put(self, message: OutgoingMessage) -> None:
        with self._lock:
            # Re-inserting moves the topic to the end: oldest-updated topics are dropped first.
            self._pending.pop(message.topic, None)
            self._pending[message.topic] = message
            self._trim()

    def take_all(self) -> list[OutgoingMessage]:
        """Everything waiting, oldest first; the outbox is empty afterwards."""
        with self._lock:
            messages = list(self._pending.values())
            self._pending.clear()
            return messages

    def requeue(self, messages: Iterable[OutgoingMessage]) -> None:
        """Put back messages that could not be sent, unless a newer one for the topic came in."""
        with self._lock:
            older = {m.topic: m for m in messages if m.topic not in self._pending}
            self._pending = {**older, **self._pending}
            self._trim()

    def discard(self, topic: str) -> None:
        with self._lock:
            self._pending.pop(topic, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def _trim(self) -> None:
        while len(self._pending) > self.max_topics:
            del self._pending[next(iter(self._pending))]
            self.dropped += 1


# Reconnection: the first retry comes quickly (a broker restart takes well under a second);
# later ones back off to 4 s so a long outage costs one attempt every few seconds.
RECONNECT: Final = Backoff(first=0.25, cap=4.0, jitter="equal")
