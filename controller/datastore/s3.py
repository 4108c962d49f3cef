"""The S3 backend: a datastore's objects in an S3-compatible bucket, under a prefix.

`S3Store("s3://bucket/prefix", S3Settings(...))` is an `ObjectStore` through obstore (the
Python binding of Rust's `object_store`), chosen by measurement over boto3 and aiobotocore
(docs/decisions.md: the same 512 KiB throughput, a fifth to a tenth of the CPU per request).
Its synchronous calls release the GIL, so the controller's executor threads call it as they
call the local store.

Mapping of the interface:

- put: one PutObject, never multipart: S3 makes a single PUT visible whole or not at all, and
  durable when it is acknowledged (on AWS; a self-hosted server is as durable as its
  configuration: SeaweedFS syncs volume writes only when told to).
- get: GetObject; has and stat: HeadObject (Content-Length, Last-Modified in whole seconds).
- delete: DeleteObject, one key at a time (a missing key is no error, as S3 answers); durable
  once acknowledged, so `sync` has nothing to do.
- list: ListObjectsV2 in pages of 1000, from start-after `after`, in the server's order (byte
  order on AWS; SeaweedFS walks its directories). obstore lists by whole path segments, so a
  prefix that ends inside a name ("chunks/a") lists its parent and filters.
- the writer lease: `.writer-lease.json`, created with If-None-Match: * and updated with
  If-Match on its ETag (lease.py). Names starting with '.' are never keys, so listing skips it.

Errors are typed at this edge, from obstore's exception classes (never from message text):
a missing object is NotFound; a refused request DatastoreAccessDenied, or DatastoreReadOnly
when a write is refused and a read of the bucket is not; anything else (throttling, 5xx,
connection reset, timeouts) DatastoreUnavailable, which is retryable: `RetryingStore` (retry.py)
retries it with backoff and bounds the requests in flight, so obstore's own retries are off.
`check()` asks the bucket itself (a presigned HeadBucket, whose status is the answer) and names
a missing bucket or refused credentials before anything is written; `open_object_store` calls it.
"""

from __future__ import annotations

import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Literal, NoReturn

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    GenericError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import S3Store as _ObstoreS3

from controller.datastore.backend import MAX_KEY_LENGTH, ObjectInfo, check_key, check_prefix
from controller.datastore.lease import (
    DEFAULT_LEASE_SECONDS,
    LeaseHolder,
    LeaseRecord,
    held_error,
)
from shared.clock import Clock, SystemClock
from shared.errors import (
    DatastoreAccessDenied,
    DatastoreBucketMissing,
    DatastoreError,
    DatastoreReadOnly,
    DatastoreUnavailable,
    InvalidArgument,
    NotFound,
    WriterLeaseHeld,
    WriterLeaseLost,
)

if TYPE_CHECKING:
    from obstore import PutMode
    from obstore.store import S3Config

LEASE_KEY = ".writer-lease.json"
_LIST_PAGE = 1000
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_DETAIL_LENGTH = 400
Operation = Literal["put", "get", "has", "stat", "delete", "list", "lease"]


@dataclass(frozen=True)
class S3Settings:
    """How to reach an S3-compatible store; unset fields come from the environment
    (`resolved`): AWS_ENDPOINT_URL, AWS_REGION or AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN."""

    endpoint: str | None = None
    """Base URL, e.g. https://s3.eu-central-1.amazonaws.com or http://127.0.0.1:8333; None:
    AWS's endpoint for `region`."""
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)  # a secret: never shown
    session_token: str | None = field(default=None, repr=False)
    allow_http: bool = False
    """Allow a plain-HTTP endpoint (loopback tests); otherwise only HTTPS is accepted."""
    max_concurrent_requests: int = 16
    """Requests in flight at once to this store (RetryingStore's bound)."""
    max_attempts: int = 5
    """Tries of one request before its error is reported (RetryingStore)."""
    connect_timeout: float = 5.0
    request_timeout: float = 60.0
    """Seconds for a whole request: a 16 MiB chunk at 1 MB/s still fits."""

    def __post_init__(self) -> None:
        if self.max_concurrent_requests < 1 or self.max_attempts < 1:
            raise InvalidArgument(
                detail="max_concurrent_requests and max_attempts must be at least 1"
            )
        if self.connect_timeout <= 0 or self.request_timeout <= 0:
            raise InvalidArgument(detail="S3 timeouts must be positive")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise InvalidArgument(
                detail=f"S3 endpoint {self.endpoint!r} must be an http:// or https:// URL"
            )

    def resolved(self, environ: Mapping[str, str] | None = None) -> S3Settings:
        """These settings with every unset field taken from the environment; InvalidArgument
        if no credentials are given either way."""
        env = os.environ if environ is None else environ
        settings = replace(
            self,
            endpoint=self.endpoint or env.get("AWS_ENDPOINT_URL") or None,
            region=self.region
            or env.get("AWS_REGION")
            or env.get("AWS_DEFAULT_REGION")
            or "us-east-1",
            access_key_id=self.access_key_id or env.get("AWS_ACCESS_KEY_ID") or None,
            secret_access_key=self.secret_access_key or env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=self.session_token or env.get("AWS_SESSION_TOKEN") or None,
        )
        if not settings.access_key_id or not settings.secret_access_key:
            raise InvalidArgument(
                detail="an S3 datastore needs an access key id and a secret key: set them in "
                "the controller config or in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        return settings


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix`; the prefix has no leading or trailing '/'."""
    if not url.startswith("s3://"):
        raise InvalidArgument(detail=f"datastore url {url!r} must look like s3://bucket/prefix")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    if _BUCKET.fullmatch(bucket) is None or ".." in bucket:
        raise InvalidArgument(
            detail=f"bucket name {bucket!r} in {url!r} must be 3-63 lower-case letters, digits, "
            "'.' or '-', starting and ending with a letter or digit"
        )
    if prefix:
        try:
            check_key(prefix)
        except InvalidArgument:
            raise InvalidArgument(
                detail=f"prefix {prefix!r} in {url!r} must be '/'-separated names of letters, "
                "digits, '.', '_' or '-', none empty or starting with '.'"
            ) from None
        if len(prefix) > MAX_KEY_LENGTH // 4:
            raise InvalidArgument(detail=f"prefix in {url!r} is too long")
    return bucket, prefix


class S3Store:
    """An ObjectStore in an S3-compatible bucket under a prefix; thread-safe."""

    def __init__(self, url: str, settings: S3Settings) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.settings = settings.resolved()
        self.endpoint = self.settings.endpoint or (
            f"https://s3.{self.settings.region}.amazonaws.com"
        )
        if self.endpoint.startswith("http://") and not self.settings.allow_http:
            raise InvalidArgument(
                detail=f"S3 endpoint {self.endpoint} is plain HTTP: use https, or allow_http "
                "for a store on this machine or a trusted network"
            )
        self._url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._store = self._client(self.prefix or None)
        self._bucket_store = self._client(None)  # for HeadBucket, on the bucket itself

    def _client(self, prefix: str | None) -> _ObstoreS3:
        s = self.settings
        config: S3Config = {
            # One DELETE per key: a bulk delete reports a refusal inside a 200 response, which
            # obstore cannot type.
            "disable_bulk_delete": True,
            "conditional_put": "etag",
        }
        if s.endpoint:
            # Other stores than AWS (SeaweedFS, MinIO, an IP address) address buckets by path;
            # without an endpoint obstore uses AWS's own for the region.
            config["endpoint"] = s.endpoint
            config["virtual_hosted_style_request"] = False
        if s.region:
            config["region"] = s.region
        if s.access_key_id and s.secret_access_key:
            config["access_key_id"] = s.access_key_id
            config["secret_access_key"] = s.secret_access_key
        if s.session_token:
            config["session_token"] = s.session_token
        return _ObstoreS3(
            self.bucket,
            prefix=prefix,
            config=config,
            client_options={
                "allow_http": s.allow_http,
                "connect_timeout": timedelta(seconds=s.connect_timeout),
                "timeout": timedelta(seconds=s.request_timeout),
                "pool_max_idle_per_host": str(s.max_concurrent_requests),
            },
            # Retries belong to RetryingStore, which sees every error typed.
            retry_config={"max_retries": 0},
        )

    def __repr__(self) -> str:
        return f"S3Store({self._url!r}, endpoint={self.endpoint!r})"

    @property
    def location(self) -> str:
        return f"{self._url} at {self.endpoint}"

    # --- ObjectStore ---------------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, durable: bool = True) -> None:
        # An acknowledged PutObject is durable: `durable` asks nothing more.
        check_key(key)
        try:
            obstore.put(self._store, key, data, use_multipart=False)
        except (BaseError, FileNotFoundError) as error:
            self._raise("put", key, error)

    def get(self, key: str) -> bytes:
        check_key(key)
        try:
            return bytes(obstore.get(self._store, key).bytes())
        except (BaseError, FileNotFoundError) as error:
            self._raise("get", key, error)

    def has(self, key: str) -> bool:
        check_key(key)
        try:
            obstore.head(self._store, key)
        except FileNotFoundError:
            return False
        except BaseError as error:
            self._raise("has", key, error)
        return True

    def stat(self, key: str) -> ObjectInfo:
        check_key(key)
        try:
            meta = obstore.head(self._store, key)
        except (BaseError, FileNotFoundError) as error:
            self._raise("stat", key, error)
        return ObjectInfo(size=int(meta["size"]), modified=meta["last_modified"].timestamp())

    def delete(self, key: str, *, durable: bool = True) -> None:
        # An acknowledged DeleteObject is as durable as a put: `durable` asks nothing more.
        check_key(key)
        try:
            obstore.delete(self._store, key)
        except FileNotFoundError:
            return
        except BaseError as error:
            self._raise("delete", key, error)

    def sync(self) -> None:
        """Nothing: every delete is durable once S3 acknowledges it."""

    def list(self, prefix: str, after: str = "") -> Iterator[str]:
        check_prefix(prefix)
        return self._list(prefix, after)

    def _list(self, prefix: str, after: str) -> Iterator[str]:
        # obstore lists whole path segments: a prefix that ends inside a name ("chunks/a")
        # lists its parent ("chunks/") and keeps what starts with it. Keys come in the
        # server's order, which `after` (S3's start-after) continues; nothing here compares
        # keys, since that order is not always byte order (SeaweedFS lists a directory's keys
        # before a sibling "a-c" that sorts before "a/").
        parent = prefix[: prefix.rfind("/") + 1]
        try:
            for batch in obstore.list(
                self._store, parent or None, offset=after or None, chunk_size=_LIST_PAGE
            ):
                for meta in batch:
                    key = meta["path"]
                    if key.startswith(prefix) and _is_key(key):
                        yield key
        except (BaseError, FileNotFoundError) as error:
            self._raise("list", prefix or "/", error)

    def children(self) -> tuple[str, ...]:
        """The names one level below the prefix that have keys under them (the "directories"
        a delimiter listing gives): where each vault's datastore lives below a root."""
        try:
            result = obstore.list_with_delimiter(self._store, None)
        except (BaseError, FileNotFoundError) as error:
            self._raise("list", "/", error)
        names = [path.rstrip("/").rsplit("/", 1)[-1] for path in result["common_prefixes"]]
        return tuple(sorted(name for name in names if _is_key(name)))

    # --- checks and errors ---------------------------------------------------------------------

    def check(self) -> None:
        """Raise DatastoreBucketMissing or DatastoreAccessDenied if the bucket is missing or
        refuses these credentials; DatastoreUnavailable if it does not answer."""
        status = self._check_bucket("HeadBucket")
        if status != 200:
            raise DatastoreUnavailable(
                location=self.location, operation="HeadBucket", detail=f"status {status}"
            )

    def _check_bucket(self, operation: str) -> int:
        """HeadBucket's status, raising for a missing bucket or refused credentials."""
        status = self._head_bucket()
        if status == 404:
            raise DatastoreBucketMissing(bucket=self.bucket, endpoint=self.endpoint)
        if status in (401, 403):
            raise DatastoreAccessDenied(
                location=self.location,
                operation=operation,
                detail=f"the server answered {status}: the access key id or secret key is "
                "wrong, or the key may not use this bucket",
            )
        return status

    def _head_bucket(self) -> int:
        """The HTTP status of a HeadBucket request with these credentials (a presigned URL:
        obstore has no bucket requests, and its errors carry no status)."""
        url = obstore.sign(self._bucket_store, "HEAD", "", timedelta(minutes=5))
        request = urllib.request.Request(url, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=self.settings.request_timeout) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
        except OSError as error:
            raise DatastoreUnavailable(
                location=self.location, operation="HeadBucket", detail=str(error)
            ) from error

    def _raise(self, operation: Operation, key: str, error: Exception) -> NoReturn:
        if isinstance(error, FileNotFoundError):
            raise NotFound(kind="object", name=key) from None
        detail = _first_line(error)
        what = f"{operation} {key!r}"
        if isinstance(error, PermissionDeniedError | UnauthenticatedError):
            if operation in ("put", "delete", "lease") and self._reads_allowed():
                raise DatastoreReadOnly(
                    location=self.location,
                    detail=f"{what} was refused while reading is allowed ({detail})",
                ) from error
            raise DatastoreAccessDenied(
                location=self.location, operation=what, detail=detail
            ) from error
        if isinstance(error, GenericError):
            if operation == "list":
                # obstore does not type a listing's refusal; the bucket itself says (one more
                # request, on a failure of what is rare).
                self._check_bucket(f"{what}: {detail}")
            # Throttling (503 SlowDown, 429), a 5xx, a reset connection, a timeout: obstore
            # does not tell them apart, and all are worth another try.
            raise DatastoreUnavailable(
                location=self.location, operation=what, detail=detail
            ) from error
        raise DatastoreError(detail=f"{what} in {self.location}: {detail}") from error

    def _reads_allowed(self) -> bool:
        try:
            return self._head_bucket() == 200
        except DatastoreUnavailable:
            return False

    # --- the writer lease ----------------------------------------------------------------------

    def acquire_writer_lease(
        self,
        holder: LeaseHolder,
        *,
        duration: float = DEFAULT_LEASE_SECONDS,
        clock: Clock | None = None,
    ) -> S3WriterLease:
        """Create the lease object, or take over one that is released or expired (lease.py)."""
        if duration <= 0:
            raise InvalidArgument(detail="a writer lease must last a positive time")
        clock = clock or SystemClock()
        for _ in range(5):
            record = LeaseRecord(holder, expires_at=clock.now() + duration)
            try:
                etag = self._conditional_put(record, "create")
                return S3WriterLease(self, holder, duration, clock, etag, record.expires_at)
            except _Exists:
                pass
            try:
                current, etag = self._read_lease()
            except NotFound:
                continue  # deleted meanwhile: create it again
            if current.holder.id != holder.id and not current.is_free(clock.now()):
                raise held_error(self.location, current)
            # Free, or ours already (our create succeeded but its reply was lost): swap it.
            record = LeaseRecord(holder, expires_at=clock.now() + duration)
            try:
                etag = self._conditional_put(record, {"e_tag": etag})
                return S3WriterLease(self, holder, duration, clock, etag, record.expires_at)
            except _Exists:
                continue  # another taker changed it first: look again
        current, _ = self._read_lease()
        if current.holder.id == holder.id or current.is_free(clock.now()):
            raise DatastoreUnavailable(
                location=self.location,
                operation="lease",
                detail="the writer lease kept changing while it was taken; try again",
            )
        raise held_error(self.location, current)

    def _read_lease(self) -> tuple[LeaseRecord, str]:
        try:
            result = obstore.get(self._store, LEASE_KEY)
            data = bytes(result.bytes())
        except (BaseError, FileNotFoundError) as error:
            self._raise("lease", LEASE_KEY, error)
        etag = result.meta["e_tag"]
        if etag is None:
            raise DatastoreError(
                detail=f"{self.location} returned no ETag: it cannot hold a writer lease"
            )
        return LeaseRecord.decode(data, f"writer lease of {self.location}"), etag

    def _conditional_put(self, record: LeaseRecord, mode: PutMode) -> str:
        """Put the lease record if `mode` holds ("create": none exists; {"e_tag": e}: the
        current one has ETag e); its new ETag. _Exists if the condition failed."""
        try:
            result = obstore.put(
                self._store, LEASE_KEY, record.encode(), mode=mode, use_multipart=False
            )
        except (AlreadyExistsError, PreconditionError):
            raise _Exists from None
        except (BaseError, FileNotFoundError) as error:
            self._raise("lease", LEASE_KEY, error)
        etag = result["e_tag"]
        if etag is None:
            raise DatastoreError(
                detail=f"{self.location} returned no ETag: it cannot hold a writer lease"
            )
        return etag


class _Exists(Exception):
    """A conditional put of the lease found another version there."""


class S3WriterLease:
    """This process's lease object in a bucket; renewed and released by compare-and-swap."""

    def __init__(
        self,
        store: S3Store,
        holder: LeaseHolder,
        duration: float,
        clock: Clock,
        etag: str,
        expires_at: float | None,
    ) -> None:
        self._store = store
        self.holder = holder
        self.duration: float | None = duration
        self.expires_at = expires_at
        self._clock = clock
        self._etag: str | None = etag
        self._lock = threading.Lock()

    @property
    def location(self) -> str:
        return self._store.location

    def renew(self) -> None:
        with self._lock:
            if self._etag is None:
                raise WriterLeaseLost(location=self.location, detail="it was released")
            assert self.duration is not None
            record = LeaseRecord(self.holder, expires_at=self._clock.now() + self.duration)
            self._etag = self._swap(record)
            self.expires_at = record.expires_at

    def release(self) -> None:
        with self._lock:
            if self._etag is None:
                return
            record = LeaseRecord(self.holder, expires_at=self.expires_at, released=True)
            with suppress(WriterLeaseLost):  # another holder has it: nothing of ours to give up
                self._swap(record)
            self._etag = None

    def _swap(self, record: LeaseRecord) -> str:
        """Write `record` over our version of the lease; WriterLeaseLost if it is not ours."""
        assert self._etag is not None
        for _ in range(3):
            try:
                return self._store._conditional_put(record, {"e_tag": self._etag})
            except _Exists:
                pass
            # Changed since we wrote it. Ours still if an earlier swap of ours succeeded but
            # its reply was lost; otherwise another controller took it over.
            try:
                current, etag = self._store._read_lease()
            except NotFound:
                raise WriterLeaseLost(
                    location=self.location, detail="the lease object was deleted"
                ) from None
            if current.holder.id != self.holder.id:
                raise WriterLeaseLost(
                    location=self.location,
                    detail=f"{current.holder} on {current.holder.host} "
                    f"(PID {current.holder.pid}, {current.holder.address}) holds it now",
                )
            self._etag = etag
        raise DatastoreUnavailable(
            location=self.location, operation="lease", detail="the lease kept changing"
        )


def _is_key(name: str) -> bool:
    try:
        check_key(name)
    except InvalidArgument:
        return False  # a backend's own name ('.writer-lease.json') or another tool's object
    return True


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= _DETAIL_LENGTH else text[: _DETAIL_LENGTH - 1] + "…"


__all__ = ["LEASE_KEY", "S3Settings", "S3Store", "S3WriterLease", "WriterLeaseHeld", "parse_s3_url"]
