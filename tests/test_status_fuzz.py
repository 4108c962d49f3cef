"""The MQTT payload and topic parsers under property-based tests (Hypothesis), in bounded time.

Whatever an agent publishes reaches these parsers, so for *any* input they must either return a
valid value or raise `InvalidArgument`, the typed error the monitor drops a message for, and
nothing else (issue 14: 10 KB of nested brackets raised RecursionError and stopped the
controller's monitor). Valid values must survive a round trip through their JSON, within the
size a reader accepts. A case Hypothesis finds goes into `@example` here (and, if it is a
kind of input, into tests/test_status.py), so it is replayed at every run.

Each test runs a bounded number of examples (`settings` below) and keeps no example database:
the suite's run time does not grow, and a run does not write into the worktree.
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from controller.status import DropReason, StatusMonitor
from shared.errors import InvalidArgument
from shared.model import JobStatus
from shared.status import (
    MAX_COUNT,
    MAX_PAYLOAD_BYTES,
    JobState,
    OfflineReason,
    Presence,
    PresenceState,
    Progress,
    nesting_depth,
    parse_topic,
)
from shared.tls import TlsFiles

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(
    max_examples=300,
    deadline=None,  # the machine is shared: timing says nothing here
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
PAYLOADS = (Presence, Progress, JobState)
DEEP = b'{"v":1,"x":' + b"[" * 2000 + b"]" * 2000 + b"}"

# --- strategies --------------------------------------------------------------------------

# JSON values of any shape, including what Python's json emits and accepts beyond the
# standard (NaN, Infinity) and integers far past 64 bits.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)

vm_ids = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,62}", fullmatch=True).filter(
    lambda s: not s.startswith("coffer-")
)
job_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", fullmatch=True)
# What `isprintable` accepts: no "Other" (C*) and no separators but the ASCII space.
texts = st.text(
    st.characters(exclude_categories=("C", "Zl", "Zp", "Zs"), include_characters=" "),
    min_size=1,
    max_size=256,
)
timestamps = st.datetimes(
    min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=st.timezones()
)
counts = st.integers(min_value=0, max_value=MAX_COUNT)
rates = st.floats(min_value=0, allow_nan=False, allow_infinity=False) | st.integers(0, 2**80)

presences = st.builds(
    Presence,
    vm_id=vm_ids,
    state=st.just(PresenceState.ONLINE),
    hostname=texts,
    agent_version=texts,
    ts=timestamps,
) | st.builds(
    Presence,
    vm_id=vm_ids,
    state=st.just(PresenceState.OFFLINE),
    hostname=texts,
    agent_version=texts,
    ts=timestamps,
    reason=st.sampled_from(OfflineReason),
)
progresses = st.builds(
    Progress,
    vm_id=vm_ids,
    job_id=job_ids,
    phase=texts,
    bytes_done=counts,
    bytes_total=counts,
    rate_bytes_per_second=rates,
    ts=timestamps,
)
job_states = st.builds(
    JobState,
    job_id=job_ids,
    operation=texts,
    status=st.sampled_from(JobStatus),
    vm_id=st.none() | vm_ids,
    error_code=st.none() | texts,
    ts=timestamps,
)
valid = presences | progresses | job_states


def decode_or_refuse(kind: type[Presence | Progress | JobState], payload: bytes) -> None:
    """Decoding `payload` gives a value that encodes again, or InvalidArgument; nothing else."""
    try:
        value = kind.from_json(payload)
    except InvalidArgument:
        return
    assert kind.from_json(value.to_json()) == value


# --- properties --------------------------------------------------------------------------


@FUZZ
@given(kind=st.sampled_from(PAYLOADS), payload=st.binary(max_size=MAX_PAYLOAD_BYTES + 64))
@example(kind=Progress, payload=DEEP)
@example(kind=Presence, payload=b"[" * 4000)
@example(kind=JobState, payload=b'{"v":1,"ts":"0001-01-01T00:00:00+01:00"}')
def test_any_bytes_decode_or_are_refused(
    kind: type[Presence | Progress | JobState], payload: bytes
) -> None:
    decode_or_refuse(kind, payload)


@FUZZ
@given(kind=st.sampled_from(PAYLOADS), document=json_values)
def test_any_json_decodes_or_is_refused(
    kind: type[Presence | Progress | JobState], document: Any
) -> None:
    decode_or_refuse(kind, json.dumps(document).encode())


@FUZZ
@given(status=valid, data=st.data())
@example(status=Progress("vm", "j", "p", 0, 0, 0.0, datetime(2025, 1, 1, tzinfo=UTC)), data=None)
def test_a_valid_payload_with_any_field_replaced_decodes_or_is_refused(
    status: Presence | Progress | JobState, data: st.DataObject | None
) -> None:
    document = json.loads(status.to_json())
    if data is not None:
        field = data.draw(st.sampled_from(sorted(document)))
        document[field] = data.draw(json_values)
    decode_or_refuse(type(status), json.dumps(document).encode())


@FUZZ
@given(status=valid)
def test_valid_payloads_round_trip_within_the_size_bound(
    status: Presence | Progress | JobState,
) -> None:
    payload = status.to_json()
    assert len(payload) <= MAX_PAYLOAD_BYTES
    assert type(status).from_json(payload) == status


def depth_of(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    return 0


@FUZZ
@given(document=json_values)
@example(document={"a": '"[[[[[[[[[\\'})
@example(document=[[[[[[[[[["]]]"]]]]]]]]]])
def test_the_nesting_scan_measures_what_json_parses(document: Any) -> None:
    payload = json.dumps(document).encode()
    scanned = nesting_depth(payload)
    if scanned > 8:  # the fast path answers with an upper bound below the limit only
        assert scanned == depth_of(document)
    else:
        assert depth_of(document) <= scanned


@FUZZ
@given(topic=st.text(max_size=300) | st.sampled_from(["coffer/v1/agents/a/presence"]))
def test_any_topic_parses_or_is_refused(topic: str) -> None:
    with contextlib.suppress(InvalidArgument):
        ref = parse_topic(topic)
        assert topic in {
            f"coffer/v1/agents/{ref.vm_id}/presence",
            f"coffer/v1/agents/{ref.vm_id}/jobs/{ref.job_id}/progress",
            f"coffer/v1/jobs/{ref.job_id}/state",
        }


@FUZZ
@given(
    topic=st.sampled_from(
        [
            "coffer/v1/agents/vm-1/presence",
            "coffer/v1/agents/vm-1/jobs/job-1/progress",
            "coffer/v1/jobs/job-1/state",
            "coffer/v1/agents/x/junk",
        ]
    )
    | st.text(max_size=100),
    payload=st.binary(max_size=512) | json_values.map(lambda v: json.dumps(v).encode()),
    retain=st.booleans(),
)
def test_the_monitor_takes_any_message_without_raising(
    topic: str, payload: bytes, retain: bool
) -> None:
    monitor = StatusMonitor(TlsFiles.in_dir(Path("/nonexistent"), "x"))
    monitor.set_job_owner({"job-1": "vm-1"}.get)
    monitor._on_message(topic, payload, retain)
    assert monitor.dropped[DropReason.ERROR] == 0
