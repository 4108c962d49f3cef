"""Soft-deleted recovery points: the tombstone that keeps one recoverable until it is purged.

Deleting backup data (stopping protection with delete, not pruning) does not remove a recovery
point at once: its manifest moves into a tombstone, `deleted/<rp id>.json`, that also says when
and by which job it was deleted, when it will be purged, and what the catalog knew of it (the
policy its VM had, its retention labels, its byte counts). Its indexes and chunks stay where
they are. The datastore alone therefore says which points are deleted and how to bring each
back, so `coffer-controller recover` sees them as deleted too.

The commit-point rule is unchanged: a recovery point is live exactly when its live manifest
(`manifests/<rp id>.json`) exists. Every move writes the new object before it removes the old
one, so at every moment a point that was committed has a manifest, a tombstone, or both:

- soft delete: tombstone written, then the manifest deleted (between the two the point is
  still live, with a stale tombstone);
- undelete: the manifest written back (checked as a commit is: its indexes and chunks must
  be there), then the tombstone deleted;
- purge: the tombstone deleted, then the indexes (left behind, they are a failed backup's
  leftovers to garbage collection); the chunks wait for garbage collection.

A tombstone beside a live manifest is stale (a move cut short) and is ignored: live wins.
Garbage collection marks the chunks of every tombstone's manifest as referenced (gc.py), so a
soft-deleted point keeps its chunks until it is purged.

Format 1 (JSON, sorted keys, times in POSIX seconds as the catalog keeps them; sealed like every
object of an encrypted datastore):

    {"format": 1, "id": "rp-...", "deleted_at": 1772330400.0,
     "purge_at": 1773540000.0, "job_id": "...", "policy": "Gold",
     "kept_by": ["daily"], "bytes_stored": 123, "data_bytes": 456,
     "manifest": "<the manifest's bytes exactly as they were stored, as text>"}

A reader refuses a newer format (`UnsupportedFormat`) and anything else that does not parse
(`CorruptData`), as for every other object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shared.errors import CorruptData, UnsupportedFormat
from shared.manifest import RecoveryPointManifest

TOMBSTONE_FORMAT = 1
_WHAT = "tombstone of a deleted recovery point"


@dataclass(frozen=True)
class Deletion:
    """Why and until when a recovery point is soft-deleted, and what the catalog knew of it."""

    deleted_at: float
    """POSIX seconds."""
    purge_at: float
    job_id: str = ""
    """The job that deleted it (DeleteBackupData)."""
    policy: str | None = None
    """The policy its VM had when the data was deleted: an undelete gives it back."""
    kept_by: tuple[str, ...] = ()
    bytes_stored: int = 0
    data_bytes: int = 0


@dataclass(frozen=True)
class Tombstone:
    """A soft-deleted recovery point: its manifest, exactly as stored, and its deletion."""

    manifest_bytes: bytes
    manifest: RecoveryPointManifest
    deletion: Deletion

    @property
    def id(self) -> str:
        return self.manifest.id

    def encode(self) -> bytes:
        d = self.deletion
        document = {
            "format": TOMBSTONE_FORMAT,
            "id": self.manifest.id,
            "deleted_at": d.deleted_at,
            "purge_at": d.purge_at,
            "job_id": d.job_id,
            "policy": d.policy,
            "kept_by": list(d.kept_by),
            "bytes_stored": d.bytes_stored,
            "data_bytes": d.data_bytes,
            "manifest": self.manifest_bytes.decode("utf-8"),
        }
        return (json.dumps(document, sort_keys=True, indent=2) + "\n").encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> Tombstone:
        """The tombstone in `data`; CorruptData or UnsupportedFormat when it is not one."""
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CorruptData(what=_WHAT, detail=f"not UTF-8 JSON: {error}") from None
        if not isinstance(document, dict):
            raise CorruptData(what=_WHAT, detail="not a JSON object")
        version = _field(document, "format", int)
        if version > TOMBSTONE_FORMAT:
            raise UnsupportedFormat(what=_WHAT, version=version, supported=TOMBSTONE_FORMAT)
        if version < 1:
            raise CorruptData(what=_WHAT, detail=f"format {version} does not exist")
        manifest_text = _field(document, "manifest", str)
        manifest_bytes = manifest_text.encode("utf-8")
        manifest = RecoveryPointManifest.decode(manifest_bytes)
        if manifest.id != _field(document, "id", str):
            raise CorruptData(what=_WHAT, detail="its manifest is another recovery point's")
        policy = document.get("policy")
        if policy is not None and not isinstance(policy, str):
            raise CorruptData(what=_WHAT, detail=f"field 'policy' should be str, got {policy!r}")
        kept_by = _field(document, "kept_by", list)
        if not all(isinstance(rule, str) for rule in kept_by):
            raise CorruptData(what=_WHAT, detail="field 'kept_by' should list strings")
        deletion = Deletion(
            deleted_at=_time(document, "deleted_at"),
            purge_at=_time(document, "purge_at"),
            job_id=_field(document, "job_id", str),
            policy=policy,
            kept_by=tuple(kept_by),
            bytes_stored=_count(document, "bytes_stored"),
            data_bytes=_count(document, "data_bytes"),
        )
        return cls(manifest_bytes, manifest, deletion)


def _field(document: dict[str, Any], key: str, kind: type[Any]) -> Any:
    if key not in document:
        raise CorruptData(what=_WHAT, detail=f"field {key!r} is missing")
    value = document[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CorruptData(
            what=_WHAT, detail=f"field {key!r} should be {kind.__name__}, got {value!r}"
        )
    return value


def _count(document: dict[str, Any], key: str) -> int:
    value: int = _field(document, key, int)
    if value < 0:
        raise CorruptData(what=_WHAT, detail=f"field {key!r} is negative")
    return value


def _time(document: dict[str, Any], key: str) -> float:
    if key not in document:
        raise CorruptData(what=_WHAT, detail=f"field {key!r} is missing")
    value = document[key]
    if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
        raise CorruptData(what=_WHAT, detail=f"field {key!r} should be POSIX seconds")
    return float(value)


__all__ = ["TOMBSTONE_FORMAT", "Deletion", "Tombstone"]
