"""The stored-format and policy parsers under property-based tests (Hypothesis), in bounded time.

Chunk blobs, disk indexes and manifests are read back from a datastore anyone with access to its
disk or bucket may have altered; policy JSON comes from any operator client. For *any* input
each parser returns a valid value or raises its typed error (CorruptData or UnsupportedFormat
for the formats, InvalidPolicy or InvalidArgument for a policy), never anything else, and a
valid value survives its round trip. (The MQTT payload parsers have theirs in
tests/test_status_fuzz.py.) Issue 14: "every parser fuzzed in CI for a bounded time".

Each test runs a bounded number of examples and keeps no example database.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared.blob import BLOB_MAGIC, HEADER_SIZE, Compression, decode_blob, encode_blob
from shared.errors import CorruptData, InvalidArgument, InvalidPolicy, UnsupportedFormat
from shared.index import DiskIndex
from shared.manifest import ManifestDisk, RecoveryPointManifest
from shared.policy import Policy, default_policy

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(
    max_examples=200,
    deadline=None,  # the machine is shared: timing says nothing here
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
FORMAT_ERRORS = (CorruptData, UnsupportedFormat)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


def _mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """`valid` with bytes flipped, cut short or extended: inputs near the format."""
    flips = st.lists(
        st.tuples(st.integers(0, max(len(valid) - 1, 0)), st.integers(0, 255)), max_size=6
    )

    def flipped(changes: list[tuple[int, int]]) -> bytes:
        data = bytearray(valid)
        for at, value in changes:
            if data:
                data[at] = value
        return bytes(data)

    return (
        flips.map(flipped)
        | st.integers(0, len(valid)).map(lambda n: valid[:n])
        | st.binary(max_size=64).map(lambda tail: valid + tail)
        | st.binary(max_size=256)
    )


# --- chunk blobs -----------------------------------------------------------------------------

_BLOB = encode_blob(Compression.NONE, 5, b"hello")


@FUZZ
@given(_mutations(_BLOB))
@example(b"")
@example(BLOB_MAGIC + b"\0" * (HEADER_SIZE - len(BLOB_MAGIC)))
def test_any_bytes_decode_as_a_blob_or_a_typed_error(data: bytes) -> None:
    try:
        compression, raw_size, payload = decode_blob(data)
    except FORMAT_ERRORS:
        return
    assert encode_blob(compression, raw_size, payload) == data


@FUZZ
@given(st.binary(max_size=512))
def test_a_blob_round_trips(payload: bytes) -> None:
    assert decode_blob(encode_blob(Compression.NONE, len(payload), payload)) == (
        Compression.NONE,
        len(payload),
        payload,
    )


# --- disk indexes ----------------------------------------------------------------------------

_INDEX = DiskIndex(
    disk="root", size_bytes=3 * 4096 + 1, chunk_size=4096, digests=bytes(128)
).encode()


@FUZZ
@given(_mutations(_INDEX))
@example(b"")
def test_any_bytes_decode_as_an_index_or_a_typed_error(data: bytes) -> None:
    try:
        index = DiskIndex.decode(data)
    except FORMAT_ERRORS:
        return
    assert DiskIndex.decode(index.encode()) == index


@FUZZ
@given(
    st.sampled_from(["root", "data-1", "d"]),
    st.integers(0, 64 * 4096),
    st.data(),
)
def test_an_index_round_trips(disk: str, size_bytes: int, data: st.DataObject) -> None:
    count = -(-size_bytes // 4096)
    digests = data.draw(st.binary(min_size=32 * count, max_size=32 * count))
    index = DiskIndex(disk=disk, size_bytes=size_bytes, chunk_size=4096, digests=digests)
    assert DiskIndex.decode(index.encode()) == index


# --- manifests -------------------------------------------------------------------------------

_MANIFEST = RecoveryPointManifest(
    id="rp-1",
    vm_id="vm-1",
    vault="lab",
    job_id="job-1",
    created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    consistency="crash",
    disks=(
        ManifestDisk(
            name="root",
            size_bytes=4096,
            chunk_size=4096,
            chunk_count=1,
            index_sha256="0" * 64,
            consistency="crash",
        ),
    ),
    vm={"name": "vm"},
)


def _document_variants() -> st.SearchStrategy[bytes]:
    """The manifest's JSON with one field replaced by any JSON value, or any JSON at all."""
    document: dict[str, Any] = json.loads(_MANIFEST.encode())

    def replaced(change: tuple[str, Any]) -> bytes:
        key, value = change
        changed = dict(document)
        changed[key] = value
        return json.dumps(changed).encode()

    def disk_replaced(change: tuple[str, Any]) -> bytes:
        key, value = change
        changed = dict(document)
        changed["disks"] = [{**document["disks"][0], key: value}]
        return json.dumps(changed).encode()

    keys = st.sampled_from(sorted(document))
    disk_keys = st.sampled_from(sorted(document["disks"][0]))
    return (
        st.tuples(keys, json_values).map(replaced)
        | st.tuples(disk_keys, json_values).map(disk_replaced)
        | json_values.map(lambda v: json.dumps(v).encode())
        | _mutations(_MANIFEST.encode())
    )


@FUZZ
@given(_document_variants())
@example(b"[" * 5000 + b"]" * 5000)
@example(b'{"format": ' + b"1" * 5000 + b"}")
def test_any_bytes_decode_as_a_manifest_or_a_typed_error(data: bytes) -> None:
    try:
        manifest = RecoveryPointManifest.decode(data)
    except FORMAT_ERRORS:
        return
    assert RecoveryPointManifest.decode(manifest.encode()) == manifest


# --- policy JSON -----------------------------------------------------------------------------


def _policy_variants() -> st.SearchStrategy[object]:
    document: dict[str, Any] = default_policy("UTC").to_dict()

    def replaced(change: tuple[str, Any]) -> object:
        key, value = change
        return {**document, key: value}

    def schedule_replaced(change: tuple[str, Any]) -> object:
        key, value = change
        return {**document, "schedule": {**document["schedule"], key: value}}

    return (
        st.tuples(st.sampled_from(sorted(document)), json_values).map(replaced)
        | st.tuples(
            st.sampled_from(["frequency", "times", "weekdays", "timezone", "window_minutes"]),
            json_values,
        ).map(schedule_replaced)
        | json_values
    )


@FUZZ
@given(_policy_variants())
@example({"name": "p", "schedule": {"frequency": "daily", "times": ["02:00"],
          "window_minutes": 10**30}})  # fmt: skip
def test_any_json_is_a_policy_or_a_typed_error(document: object) -> None:
    try:
        policy = Policy.from_dict(document)
    except (InvalidPolicy, InvalidArgument):
        return
    assert Policy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
