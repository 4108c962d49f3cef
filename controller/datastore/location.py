"""Where a datastore lives: a directory or an s3:// URL, opened as the ObjectStore for it.

`open_object_store(url, settings)` is the one place that turns configuration into a backend
(and `datastore_names(url, settings)` finds the datastores under a root, for a recovery):

- a path (absolute, or `file:///path`): `LocalDirectoryStore`, syncing every write;
- `s3://bucket/prefix`: `S3Store` with `settings` (unset fields from the environment,
  s3.py), checked at once (a missing bucket or refused credentials are named now, not at the
  first backup), inside a `RetryingStore` with the settings' attempts and concurrency bound.

A local directory needs no retry wrapper: its errors are not transient, and a failed sync is
final (local.py).
"""

from __future__ import annotations

from pathlib import Path

from controller.datastore.backend import ObjectStore
from controller.datastore.local import LocalDirectoryStore
from controller.datastore.retry import RetryingStore
from controller.datastore.s3 import S3Settings, S3Store
from controller.datastore.store import CONFIG_KEY
from shared.errors import InvalidArgument


def open_object_store(url: str, settings: S3Settings | None = None) -> ObjectStore:
    """The ObjectStore at `url`; see the module note. Blocking (S3 is asked once)."""
    if url.startswith("s3://"):
        store = S3Store(url, settings or S3Settings())
        retrying = RetryingStore(
            store,
            max_attempts=store.settings.max_attempts,
            max_concurrent=store.settings.max_concurrent_requests,
        )
        retrying.call("check", store.check)
        return retrying
    if url.startswith("file://"):
        url = url.removeprefix("file://")
    if "://" in url or not url:
        raise InvalidArgument(
            detail=f"datastore location {url!r} must be a directory or s3://bucket/prefix"
        )
    path = Path(url)
    if not path.is_absolute():
        raise InvalidArgument(detail=f"datastore directory {url!r} must be an absolute path")
    return LocalDirectoryStore(path)


def datastore_names(url: str, settings: S3Settings | None = None) -> list[str]:
    """The names directly under `url` that hold a datastore (a `datastore.json`), sorted: the
    vaults whose datastores live under that root (controller/datastores.py). Blocking; reads
    one listing of the root's children, not the datastores' objects."""
    if url.startswith("s3://"):
        store = S3Store(url, settings or S3Settings())
        retrying = RetryingStore(
            store,
            max_attempts=store.settings.max_attempts,
            max_concurrent=store.settings.max_concurrent_requests,
        )
        retrying.call("check", store.check)
        names = retrying.call("list", store.children)
        return [name for name in names if retrying.has(f"{name}/{CONFIG_KEY}")]
    root = open_object_store(url)
    assert isinstance(root, LocalDirectoryStore)
    return list(root.children_with(CONFIG_KEY))


__all__ = ["datastore_names", "open_object_store"]
