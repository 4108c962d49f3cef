"""The recovery point manifest: what one recovery point is, and the proof that it is complete.

A manifest names the VM, vault and job a recovery point came from, when it was taken, the
consistency reached, and for every disk its geometry and the SHA-256 of its index. The
datastore writes it last: a recovery point exists exactly when its manifest does. Manifests
(with the indexes they pin) are enough to rebuild the catalog if the SQLite file is lost.

Encoded as UTF-8 JSON with sorted keys, e.g.:

    {"consistency": "file-system", "created_at": "2025-01-31T02:00:00+00:00",
     "disks": [{"chunk_count": 4096, "chunk_size": 1048576, "index_sha256": "9f86…",
                "name": "root", "size_bytes": 4294967296}],
     "format": 1, "id": "rp-…", "job_id": "…", "vault": "eu-west", "vm": {"name": "web-1",
     "service": "shop", "region": "eu-west", "hostname": "web-1.lab"}, "vm_id": "…"}

Version rules: `format` changes only when an old reader would misread a new manifest; such a
manifest is refused with `UnsupportedFormat`. Keys added without a format change are optional
and ignored by older readers. Anything that does not parse is `CorruptData`.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from shared.errors import CorruptData, DiskNotFound, InvalidArgument, UnsupportedFormat
from shared.index import DiskIndex, check_disk_name, chunk_count
from shared.model import Consistency

MANIFEST_FORMAT = 1
CONSISTENCY_LEVELS = tuple(level.value for level in Consistency)
"""Consistency a recovery point can reach, best first (the values of `shared.model.Consistency`)."""

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_WHAT = "recovery point manifest"
_T = TypeVar("_T")


@dataclass(frozen=True)
class ManifestDisk:
    """One disk of a recovery point: geometry and the SHA-256 (hex) of its encoded index."""

    name: str
    size_bytes: int
    chunk_size: int
    chunk_count: int
    index_sha256: str
    consistency: str = ""
    """The consistency this disk reached (empty in manifests written before it was recorded)."""
    snapshot: str = ""
    """The snapshot provider it was read from (reflink, read-while-frozen, ...)."""

    def __post_init__(self) -> None:
        check_disk_name(self.name)
        if self.consistency and self.consistency not in CONSISTENCY_LEVELS:
            raise InvalidArgument(
                detail=f"disk {self.name!r}: consistency {self.consistency!r} is not one of "
                + ", ".join(CONSISTENCY_LEVELS)
            )
        if not isinstance(self.snapshot, str):
            raise InvalidArgument(detail=f"disk {self.name!r}: snapshot must be a string")
        if self.size_bytes < 0 or self.chunk_size <= 0:
            raise InvalidArgument(
                detail=f"disk {self.name!r}: size {self.size_bytes} / chunk size "
                f"{self.chunk_size} out of range"
            )
        if self.chunk_count != chunk_count(self.size_bytes, self.chunk_size):
            raise InvalidArgument(
                detail=f"disk {self.name!r}: {self.chunk_count} chunks cannot cover "
                f"{self.size_bytes} bytes in chunks of {self.chunk_size}"
            )
        if not isinstance(self.index_sha256, str) or not _SHA256_HEX.fullmatch(self.index_sha256):
            raise InvalidArgument(
                detail=f"disk {self.name!r}: index_sha256 must be 64 lowercase hex digits"
            )

    @classmethod
    def of(cls, index: DiskIndex, index_sha256: str) -> ManifestDisk:
        """The manifest entry of `index`, stored under the SHA-256 hex `index_sha256`."""
        return cls(index.disk, index.size_bytes, index.chunk_size, len(index), index_sha256)


@dataclass(frozen=True)
class RecoveryPointManifest:
    """One recovery point of a VM: identity, origin, consistency and its disks."""

    id: str
    vm_id: str
    vault: str
    job_id: str
    created_at: datetime
    consistency: str
    disks: tuple[ManifestDisk, ...]
    vm: Mapping[str, str] = field(default_factory=dict)
    """Descriptive facts about the VM when it was backed up (name, service, region, hostname)."""

    def __post_init__(self) -> None:
        for name in ("id", "vm_id", "vault", "job_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise InvalidArgument(detail=f"manifest {name} must be a non-empty string")
        if not isinstance(self.created_at, datetime) or self.created_at.utcoffset() is None:
            raise InvalidArgument(detail="manifest created_at must be a timezone-aware datetime")
        # Kept as a plain string so that the manifest reads the same whatever enum made it.
        object.__setattr__(self, "consistency", str(self.consistency))
        if self.consistency not in CONSISTENCY_LEVELS:
            raise InvalidArgument(
                detail=f"consistency {self.consistency!r} is not one of "
                + ", ".join(CONSISTENCY_LEVELS)
            )
        disks = tuple(self.disks)
        if not disks:
            raise InvalidArgument(detail="a recovery point has at least one disk")
        if any(not isinstance(d, ManifestDisk) for d in disks):
            raise InvalidArgument(detail="manifest disks must be ManifestDisk entries")
        names = [d.name for d in disks]
        if len(set(names)) != len(names):
            raise InvalidArgument(detail=f"disk names repeat in the manifest: {names}")
        object.__setattr__(self, "disks", disks)
        vm = dict(self.vm)
        if any(not isinstance(k, str) or not isinstance(v, str) for k, v in vm.items()):
            raise InvalidArgument(detail="manifest vm facts must map strings to strings")
        # Read-only so that a frozen manifest cannot be changed through its mapping.
        object.__setattr__(self, "vm", types.MappingProxyType(vm))

    def __hash__(self) -> int:
        # The id names the recovery point; equal manifests have equal ids.
        return hash(self.id)

    def disk(self, name: str) -> ManifestDisk:
        """The entry of disk `name`; DiskNotFound if the recovery point lacks it."""
        for entry in self.disks:
            if entry.name == name:
                return entry
        raise DiskNotFound(vm_id=self.vm_id, disk=name, known=", ".join(d.name for d in self.disks))

    def encode(self) -> bytes:
        """UTF-8 JSON with sorted keys (identical manifests give identical bytes)."""
        document = {
            "format": MANIFEST_FORMAT,
            "id": self.id,
            "vm_id": self.vm_id,
            "vault": self.vault,
            "job_id": self.job_id,
            "created_at": self.created_at.astimezone(UTC).isoformat(),
            "consistency": self.consistency,
            "disks": [_encode_disk(d) for d in self.disks],
            "vm": dict(self.vm),
        }
        return (json.dumps(document, sort_keys=True, indent=2) + "\n").encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> RecoveryPointManifest:
        """The manifest in `data`; CorruptData or UnsupportedFormat when it is not one."""
        try:
            document = json.loads(data.decode("utf-8"))
        # ValueError: JSONDecodeError, UnicodeDecodeError, an integer of over 4,300 digits;
        # RecursionError: brackets nested past the interpreter's stack (found by fuzzing).
        except (ValueError, RecursionError) as error:
            raise CorruptData(what=_WHAT, detail=f"not UTF-8 JSON: {str(error)[:200]}") from None
        if not isinstance(document, dict):
            raise CorruptData(what=_WHAT, detail="not a JSON object")
        version = _field(document, "format", int)
        if version > MANIFEST_FORMAT:
            raise UnsupportedFormat(what=_WHAT, version=version, supported=MANIFEST_FORMAT)
        if version < 1:
            raise CorruptData(what=_WHAT, detail=f"format {version} does not exist")
        created_text = _field(document, "created_at", str)
        try:
            created_at = datetime.fromisoformat(created_text)
        except ValueError:
            raise CorruptData(
                what=_WHAT, detail=f"created_at {created_text!r} is not ISO 8601"
            ) from None
        disks = []
        for entry in _field(document, "disks", list):
            if not isinstance(entry, dict):
                raise CorruptData(what=_WHAT, detail="a disk entry is not a JSON object")
            disks.append(
                _build(
                    ManifestDisk,
                    name=_field(entry, "name", str),
                    size_bytes=_field(entry, "size_bytes", int),
                    chunk_size=_field(entry, "chunk_size", int),
                    chunk_count=_field(entry, "chunk_count", int),
                    index_sha256=_field(entry, "index_sha256", str),
                    consistency=_optional(entry, "consistency", str, ""),
                    snapshot=_optional(entry, "snapshot", str, ""),
                )
            )
        return _build(
            cls,
            id=_field(document, "id", str),
            vm_id=_field(document, "vm_id", str),
            vault=_field(document, "vault", str),
            job_id=_field(document, "job_id", str),
            created_at=created_at,
            consistency=_field(document, "consistency", str),
            disks=tuple(disks),
            vm=_field(document, "vm", dict),
        )


def _encode_disk(disk: ManifestDisk) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": disk.name,
        "size_bytes": disk.size_bytes,
        "chunk_size": disk.chunk_size,
        "chunk_count": disk.chunk_count,
        "index_sha256": disk.index_sha256,
    }
    # Optional keys (added without a format change): present only when known.
    if disk.consistency:
        entry["consistency"] = disk.consistency
    if disk.snapshot:
        entry["snapshot"] = disk.snapshot
    return entry


def _optional(document: dict[str, Any], key: str, kind: type[Any], default: Any) -> Any:
    """`document[key]` if present (of JSON type `kind`), else `default`."""
    return _field(document, key, kind) if key in document else default


def _field(document: dict[str, Any], key: str, kind: type[Any]) -> Any:
    """`document[key]`, which must be of JSON type `kind`; CorruptData otherwise."""
    if key not in document:
        raise CorruptData(what=_WHAT, detail=f"field {key!r} is missing")
    value = document[key]
    # bool is an int subclass in Python, but `true` is no size.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CorruptData(
            what=_WHAT, detail=f"field {key!r} should be {kind.__name__}, got {value!r}"
        )
    return value


def _build(cls: type[_T], **fields: Any) -> _T:
    """`cls(**fields)`, turning a validation failure of decoded data into CorruptData."""
    try:
        return cls(**fields)
    except InvalidArgument as error:
        raise CorruptData(what=_WHAT, detail=error.fields.get("detail")) from None
