"""The S3 backend against a real SeaweedFS: clear errors, retries, and the writer lease's expiry.

The shared ObjectStore and datastore suites (test_datastore.py, test_gc.py) run on S3 too; this
module holds what only a remote store has: credentials, buckets, throttling and outages, leases
that expire. Faults the server cannot be made to produce on demand (a 503 SlowDown, a reset
connection in the middle of a listing) are injected by FaultyStore below the RetryingStore,
with the error s3.py raises for them.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import obstore
import pytest

from controller.datastore import (
    Datastore,
    Fault,
    FaultyStore,
    LeaseHolder,
    RetryingStore,
    S3Settings,
    S3Store,
    open_object_store,
    writer_lease,
)
from controller.datastore.lease import keep_writer_lease
from controller.datastore.s3 import LEASE_KEY, parse_s3_url
from shared.backoff import Backoff
from shared.clock import ManualClock
from shared.errors import (
    DatastoreAccessDenied,
    DatastoreBucketMissing,
    DatastoreReadOnly,
    DatastoreUnavailable,
    InvalidArgument,
    NotFound,
    WriterLeaseHeld,
    WriterLeaseLost,
)
from tests.conftest import TEST_BUCKET
from tests.seaweed import SeaweedFS
from tests.test_datastore import CHUNK, ROOT_IMAGE, back_up, restore

HOLDER_A = LeaseHolder("a" * 32, "host-a", 1111, "10.0.0.1:7443")
HOLDER_B = LeaseHolder("b" * 32, "host-b", 2222, "10.0.0.2:7443")
NO_WAIT = Backoff(first=0.001, cap=0.002)


@pytest.fixture
def s3(seaweedfs: SeaweedFS, tmp_path: Path) -> S3Store:
    """A bare S3Store (no retries) on this test's own prefix."""
    return seaweedfs.store(TEST_BUCKET, tmp_path.name)


def unavailable(key: str) -> Exception:
    """What s3.py raises for a 503 SlowDown, a 429, a 5xx or a reset connection."""
    return DatastoreUnavailable(
        location="s3://coffer-tests", operation=f"put {key!r}", detail="503 SlowDown"
    )


# --- settings and urls ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket-1", ("bucket-1", "")),
        ("s3://bucket-1/", ("bucket-1", "")),
        ("s3://my.bucket/vaults/prod/", ("my.bucket", "vaults/prod")),
    ],
)
def test_s3_urls_name_a_bucket_and_a_prefix(url: str, expected: tuple[str, str]) -> None:
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize(
    "url", ["bucket/x", "s3://", "s3://B", "s3://ab", "s3://a..b/x", "s3://ok-bucket/../x"]
)
def test_bad_s3_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_s3_url(url)


def test_credentials_come_from_the_environment_when_not_configured() -> None:
    env = {
        "AWS_ACCESS_KEY_ID": "id-from-env",
        "AWS_SECRET_ACCESS_KEY": "secret-from-env",
        "AWS_REGION": "eu-central-1",
        "AWS_ENDPOINT_URL": "https://s3.example.test",
    }
    resolved = S3Settings().resolved(env)
    assert (resolved.access_key_id, resolved.secret_access_key) == (
        "id-from-env",
        "secret-from-env",
    )
    assert (resolved.region, resolved.endpoint) == ("eu-central-1", "https://s3.example.test")
    configured = S3Settings(access_key_id="id", secret_access_key="secret", region="r").resolved(
        env
    )
    assert (configured.access_key_id, configured.region) == ("id", "r")  # config wins
    with pytest.raises(InvalidArgument, match="AWS_ACCESS_KEY_ID"):
        S3Settings().resolved({})


def test_plain_http_must_be_allowed(seaweedfs: SeaweedFS) -> None:
    with pytest.raises(InvalidArgument, match="plain HTTP"):
        S3Store(seaweedfs.url(TEST_BUCKET), seaweedfs.settings(allow_http=False))


def test_a_datastore_location_is_a_directory_or_an_s3_url(tmp_path: Path) -> None:
    assert open_object_store(str(tmp_path / "ds")).location == str(tmp_path / "ds")
    assert open_object_store(f"file://{tmp_path}/ds").location == str(tmp_path / "ds")
    for bad in ("relative/dir", "gs://bucket/x", ""):
        with pytest.raises(InvalidArgument):
            open_object_store(bad)


# --- what the operator sees when the store is misconfigured ----------------------------------


def test_a_wrong_secret_key_is_refused_naming_the_endpoint(seaweedfs: SeaweedFS) -> None:
    settings = seaweedfs.settings(secret_access_key="not-the-secret")
    with pytest.raises(DatastoreAccessDenied, match=seaweedfs.endpoint) as refused:
        open_object_store(seaweedfs.url(TEST_BUCKET, "x"), settings)
    assert refused.value.code == "DatastoreAccessDenied"
    assert "secret key" in str(refused.value)
    # The data path says the same, without being retried.
    store = S3Store(seaweedfs.url(TEST_BUCKET, "x"), settings)
    for call in (lambda: store.get("a"), lambda: store.has("a"), lambda: list(store.list(""))):
        with pytest.raises(DatastoreAccessDenied, match=seaweedfs.endpoint):
            call()


def test_a_missing_bucket_is_named_when_the_store_is_opened(seaweedfs: SeaweedFS) -> None:
    with pytest.raises(
        DatastoreBucketMissing,
        match=f"Bucket 'no-such-bucket' does not exist at {seaweedfs.endpoint}",
    ) as missing:
        open_object_store(seaweedfs.url("no-such-bucket", "vault"), seaweedfs.settings())
    assert missing.value.code == "DatastoreBucketMissing"
    # The coffer identity may not create buckets: nothing appeared.
    with pytest.raises(DatastoreBucketMissing):
        open_object_store(seaweedfs.url("no-such-bucket"), seaweedfs.settings())


def test_a_read_only_store_refuses_writes_and_still_serves_reads(
    seaweedfs: SeaweedFS, s3: S3Store, tmp_path: Path
) -> None:
    s3.put("a/b", b"kept")
    reader = open_object_store(
        seaweedfs.url(TEST_BUCKET, tmp_path.name), seaweedfs.settings(seaweedfs.reader)
    )
    assert isinstance(reader, RetryingStore)
    with pytest.raises(DatastoreReadOnly, match="is read-only: put 'a/c' was refused") as refused:
        reader.put("a/c", b"new")
    assert refused.value.code == "DatastoreReadOnly"
    with pytest.raises(DatastoreReadOnly):
        reader.delete("a/b")
    assert reader.retries == 0  # a refusal is never retried
    assert reader.get("a/b") == b"kept"
    assert list(reader.list("")) == ["a/b"]
    assert not s3.has("a/c")


def test_a_missing_object_is_not_found_and_not_retried(s3: S3Store) -> None:
    faulty = FaultyStore(s3)
    retrying = RetryingStore(faulty, backoff=NO_WAIT)
    with pytest.raises(NotFound, match="'nothing/here' was not found"):
        retrying.get("nothing/here")
    assert retrying.retries == 0


# --- real outages: a closed port, a server that never answers ----------------------------------


def test_an_unreachable_endpoint_is_retried_then_reported(seaweedfs: SeaweedFS) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    store = S3Store("s3://coffer-tests/x", seaweedfs.settings(endpoint=f"http://127.0.0.1:{port}"))
    delays: list[float] = []
    retrying = RetryingStore(store, max_attempts=4, sleep=delays.append)
    with pytest.raises(DatastoreUnavailable, match=rf"127\.0\.0\.1:{port}.*\(4 attempts\)") as down:
        retrying.put("a", b"x")
    assert down.value.retryable
    assert len(delays) == 3
    assert retrying.retries == 3
    assert all(0 <= delay <= 10.0 for delay in delays)


@pytest.mark.timeout(30)
def test_a_server_that_does_not_answer_times_out_and_is_retried(seaweedfs: SeaweedFS) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # accepts connections (the kernel does) and never answers
        port = silent.getsockname()[1]
        store = S3Store(
            "s3://coffer-tests/x",
            seaweedfs.settings(endpoint=f"http://127.0.0.1:{port}", request_timeout=0.5),
        )
        retrying = RetryingStore(store, max_attempts=2, backoff=NO_WAIT)
        started = time.monotonic()
        with pytest.raises(DatastoreUnavailable, match=r"\(2 attempts\)"):
            retrying.get("a")
        assert 0.9 < time.monotonic() - started < 10


# --- retries of injected throttling and transient faults --------------------------------------


def test_throttled_requests_are_retried_with_backoff_until_they_succeed(s3: S3Store) -> None:
    faulty = FaultyStore(s3)
    delays: list[float] = []
    retrying = RetryingStore(faulty, max_attempts=5, sleep=delays.append)
    fault = faulty.raise_on("put", unavailable, times=3)
    retrying.put("chunks/ab/cd/x", b"data")
    assert fault.fired == 3
    assert retrying.retries == 3
    assert s3.get("chunks/ab/cd/x") == b"data"
    # Full jitter under a doubling ceiling: 0.2, 0.4, 0.8 s at most.
    assert len(delays) == 3
    assert all(delay <= 0.2 * 2**i for i, delay in enumerate(delays))


def test_a_fault_that_persists_fails_after_the_attempts_run_out(s3: S3Store) -> None:
    faulty = FaultyStore(s3)
    retrying = RetryingStore(faulty, max_attempts=3, backoff=NO_WAIT)
    fault = faulty.raise_on("get", unavailable, times=None)
    s3.put("k", b"v")
    with pytest.raises(DatastoreUnavailable, match=r"503 SlowDown \(3 attempts\)"):
        retrying.get("k")
    assert fault.fired == 3


@pytest.mark.parametrize(
    "error",
    [
        lambda key: NotFound(kind="object", name=key),
        lambda key: DatastoreAccessDenied(location="s3://b", operation="put", detail="403"),
        lambda key: DatastoreReadOnly(location="s3://b", detail="403"),
        lambda key: DatastoreBucketMissing(bucket="b", endpoint="http://x"),
        lambda key: InvalidArgument(detail="bad"),
        lambda key: ValueError("a bug"),
    ],
    ids=["not-found", "access-denied", "read-only", "no-bucket", "invalid", "bug"],
)
def test_refusals_mistakes_and_bugs_are_never_retried(
    s3: S3Store, error: Callable[[str], Exception]
) -> None:
    faulty = FaultyStore(s3)
    retrying = RetryingStore(faulty, backoff=NO_WAIT)
    fault = faulty.raise_on("put", error)
    with pytest.raises(type(error("k"))):
        retrying.put("k", b"v")
    assert fault.fired == 1
    assert retrying.retries == 0


def test_a_listing_broken_part_way_resumes_after_the_last_key(s3: S3Store) -> None:
    keys = [f"chunks/{i % 4:02x}/{i:04d}" for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: s3.put(key, b""), keys))
    faulty = FaultyStore(s3)
    retrying = RetryingStore(faulty, backoff=NO_WAIT)
    faulty.raise_on("list", unavailable, times=1)  # the first page fails
    faulty.raise_on("list", unavailable, after_keys=7, times=2)  # then twice part way
    listed = list(retrying.list("chunks/"))
    assert listed == list(s3.list("chunks/"))  # each key once, in order
    assert sorted(listed) == sorted(keys)
    assert retrying.retries == 3


def test_requests_in_flight_are_bounded(s3: S3Store) -> None:
    in_flight = 0
    peak = 0
    lock = threading.Lock()

    class Slow(FaultyStore):
        def put(self, key: str, data: bytes, *, durable: bool = True) -> None:
            nonlocal in_flight, peak
            with lock:
                in_flight += 1
                peak = max(peak, in_flight)
            try:
                time.sleep(0.02)
                super().put(key, data, durable=durable)
            finally:
                with lock:
                    in_flight -= 1

    retrying = RetryingStore(Slow(s3), max_concurrent=3)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: retrying.put(f"k/{i}", b"x"), range(48)))
    assert peak == 3
    assert len(list(s3.list("k/"))) == 48


def test_a_backup_rides_out_throttling(s3: S3Store) -> None:
    """Every fourth put is throttled once; the recovery point commits and restores whole."""
    faulty = FaultyStore(s3)
    retrying = RetryingStore(faulty, backoff=NO_WAIT)
    for skip in range(0, 12, 4):
        faulty.inject(Fault("put", skip=skip, error=unavailable))
    store = Datastore.create(retrying, CHUNK)
    store.put_manifest(back_up(store, "rp1", {"root": ROOT_IMAGE}))
    assert retrying.retries >= 2
    assert restore(Datastore.open(s3), "rp1", "root") == ROOT_IMAGE


# --- the S3 writer lease: expiry, takeover, renewal ----------------------------------------------


def test_an_expired_lease_is_taken_over_and_its_old_holder_finds_out(s3: S3Store) -> None:
    clock = ManualClock(1_800_000_000.0)
    first = s3.acquire_writer_lease(HOLDER_A, duration=60, clock=clock)
    clock.advance(59)
    with pytest.raises(WriterLeaseHeld, match=r"until 2027-01-15T08:01:00\+00:00"):
        s3.acquire_writer_lease(HOLDER_B, duration=60, clock=clock)
    clock.advance(2)  # A did not renew in time (a paused VM, a partition)
    second = s3.acquire_writer_lease(HOLDER_B, duration=60, clock=clock)
    with pytest.raises(WriterLeaseLost, match=r"controller bbbbbbbbbbbb on host-b \(PID 2222"):
        first.renew()
    first.release()  # not ours any more: changes nothing
    with pytest.raises(WriterLeaseHeld, match="host-b"):
        s3.acquire_writer_lease(HOLDER_A, duration=60, clock=clock)
    second.renew()
    second.release()


def test_a_renewal_whose_reply_was_lost_keeps_the_lease(s3: S3Store) -> None:
    clock = ManualClock(1_800_000_000.0)
    lease = s3.acquire_writer_lease(HOLDER_A, duration=60, clock=clock)
    # Another renewal of ours went through but we never saw its new ETag.
    lease._etag = '"stale"'  # type: ignore[attr-defined]
    lease.renew()
    clock.advance(61)
    lease.renew()  # still ours: renewing late is fine while nobody took it
    with pytest.raises(WriterLeaseHeld):
        s3.acquire_writer_lease(HOLDER_B, duration=60, clock=clock)
    # A lost reply of our own create: taking it again finds our own lease.
    again = s3.acquire_writer_lease(HOLDER_A, duration=60, clock=clock)
    again.release()


def test_the_lease_object_is_readable_and_not_a_key(s3: S3Store) -> None:
    lease = s3.acquire_writer_lease(HOLDER_A, duration=60)
    raw = bytes(obstore.get(s3._store, LEASE_KEY).bytes())
    assert b'"host": "host-a"' in raw
    assert b'"released": false' in raw
    assert list(s3.list("")) == []
    lease.release()


@pytest.mark.timeout(30)
async def test_a_held_lease_is_renewed_and_a_lost_one_stops_the_holder(s3: S3Store) -> None:
    async with writer_lease(s3, HOLDER_A, duration=0.9) as lease:
        await asyncio.sleep(2.0)  # more than twice its duration: renewed meanwhile
        with pytest.raises(WriterLeaseHeld, match="host-a"):
            s3.acquire_writer_lease(HOLDER_B, duration=0.9)
        assert lease.expires_at is not None
        assert lease.expires_at > time.time()
    s3.acquire_writer_lease(HOLDER_B, duration=60).release()  # released on exit

    # B takes the lease over while A believes it holds it: A's next renewal stops its block.
    future = ManualClock(time.time() + 3600)
    stopped = asyncio.Event()

    async def hold_until_stopped() -> None:
        async with writer_lease(s3, HOLDER_A, duration=0.9):
            s3.acquire_writer_lease(HOLDER_B, duration=60, clock=future)
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                stopped.set()
                raise

    with pytest.raises(ExceptionGroup) as lost:
        await hold_until_stopped()
    assert stopped.is_set()
    assert lost.group_contains(WriterLeaseLost, match="host-b")


async def test_an_unreachable_store_ends_the_lease_when_it_expires(s3: S3Store) -> None:
    clock = ManualClock(1_800_000_000.0)
    lease = s3.acquire_writer_lease(HOLDER_A, duration=30, clock=clock)

    class Unreachable:
        location = lease.location
        holder = lease.holder
        duration = lease.duration
        expires_at = lease.expires_at

        def renew(self) -> None:
            raise unavailable("lease")

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)

    with pytest.raises(WriterLeaseLost, match="no renewal succeeded"):
        await keep_writer_lease(Unreachable(), clock=clock, sleep=sleep)  # type: ignore[arg-type]
    assert clock.now() >= 1_800_000_030.0
    lease.release()
