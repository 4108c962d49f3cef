"""What only the catalog knew, kept in the datastore: the vault's and each VM's description.

Manifests say what each recovery point is; they do not say a vault's region, settings and
policies, which policy a VM was protected by, which retention rules keep each point, or what
the last verify found. So that the storage and the master key are enough to rebuild the
catalog (`coffer-controller recover`), the controller keeps two kinds of small objects beside
the recovery points, written from the catalog whenever what they hold changes
(controller/descriptions.py) and read only by a recovery:

- `vault.json`: the vault's region, creation time, settings and policies.
- `vms/<name>.json`, one per VM the vault holds (registered, or with recovery points): the
  VM's facts (name, service, region, hostname), its item (state and policy), and per live
  recovery point its retention labels as of the last prune, its byte counts and the last
  verify's verdict. `<name>` is 32 hex digits of the datastore's chunk hash of the VM id
  (keyed in an encrypted datastore), so a listing does not name the VMs.

Each is written whole in one atomic put (rewritten, never appended), so a reader sees the old
or the new one. They may lag the catalog by moments (writes are coalesced) and after a failed
write until the next succeeds; what is lost with the catalog then is at most that lag. Soft-
deleted points keep their facts in their tombstones (deleted.py), not here.

Format 1, JSON with sorted keys; times in POSIX seconds, as the catalog keeps them (a JSON
number reads back as the very same float, so a recovered catalog shows the same times to the
microsecond). Unknown keys are ignored (a newer controller may add settings), a newer `format`
is refused (`UnsupportedFormat`), and anything that does not parse is `CorruptData`.

    vault.json: {"format": 1, "vault": "eu-vault", "region": "eu-west",
                 "created_at": 1772330400.0, "written_at": ...,
                 "settings": {"max_concurrent_backups": 4, "verify_new": false,
                              "reverify_days": 0, "soft_delete_days": 14},
                 "policies": [{"name": "DefaultPolicy", "spec": {...}, "created_at": ...,
                               "updated_at": ...}]}
    vms/<name>.json: {"format": 1, "vm_id": "web-1", "vault": "eu-vault", "written_at": ...,
                 "vm": {"name": "web-1", "service": "shop", "region": "eu-west",
                        "hostname": "web-1.lab"},
                 "item": {"state": "Protected", "policy": "Gold", "registered_at": ...},
                 "points": {"rp-...": {"kept_by": ["daily"], "bytes_stored": 1, "data_bytes": 2,
                                       "verification": "verified", "verified_at": ...}}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.errors import CorruptData, UnsupportedFormat

DESCRIPTION_FORMAT = 1
VAULT_DESCRIPTION_KEY = "vault.json"
VM_DESCRIPTIONS = "vms/"


@dataclass(frozen=True)
class PolicyDescription:
    name: str
    spec: Mapping[str, Any]
    """The policy's JSON form (shared.policy.Policy.to_dict)."""
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class VaultDescription:
    """`vault.json`: what a vault is beyond its datastore's settings."""

    vault: str
    region: str
    created_at: float
    settings: Mapping[str, Any] = field(default_factory=dict)
    """The vault's settings by name (max_concurrent_backups, verify_new, reverify_days,
    soft_delete_days, ...): a reader takes those it knows."""
    policies: tuple[PolicyDescription, ...] = ()
    written_at: float = 0.0

    def encode(self) -> bytes:
        document = {
            "format": DESCRIPTION_FORMAT,
            "vault": self.vault,
            "region": self.region,
            "created_at": self.created_at,
            "settings": dict(self.settings),
            "policies": [
                {
                    "name": p.name,
                    "spec": dict(p.spec),
                    "created_at": p.created_at,
                    "updated_at": p.updated_at,
                }
                for p in self.policies
            ],
            "written_at": self.written_at,
        }
        return _dump(document)

    @classmethod
    def decode(cls, data: bytes) -> VaultDescription:
        reader = _Reader(f"vault description ({VAULT_DESCRIPTION_KEY})", data)
        policies = []
        for entry in reader.field("policies", list):
            if not isinstance(entry, dict):
                raise reader.corrupt("a policy entry is not a JSON object")
            policies.append(
                PolicyDescription(
                    name=reader.field("name", str, entry),
                    spec=reader.field("spec", dict, entry),
                    created_at=reader.time("created_at", entry),
                    updated_at=reader.time("updated_at", entry),
                )
            )
        return cls(
            vault=reader.field("vault", str),
            region=reader.field("region", str),
            created_at=reader.time("created_at"),
            settings=reader.field("settings", dict),
            policies=tuple(policies),
            written_at=reader.time("written_at"),
        )


@dataclass(frozen=True)
class ItemDescription:
    """Where the VM's protection stood in the vault."""

    state: str
    policy: str | None
    registered_at: float


@dataclass(frozen=True)
class PointDescription:
    """What the catalog knew of one live recovery point beyond its manifest."""

    kept_by: tuple[str, ...] = ()
    bytes_stored: int = 0
    data_bytes: int = 0
    verification: str = ""
    """The last verify's verdict (verified, damaged, healed), "" for never verified."""
    verified_at: float | None = None


@dataclass(frozen=True)
class VmDescription:
    """`vms/<name>.json`: one VM of a vault."""

    vm_id: str
    vault: str
    vm: Mapping[str, str] = field(default_factory=dict)
    """name, service, region, hostname, as its agent last said."""
    item: ItemDescription | None = None
    """None once the VM is no longer registered (its recovery points outlive it)."""
    points: Mapping[str, PointDescription] = field(default_factory=dict)
    written_at: float = 0.0

    def encode(self) -> bytes:
        points: dict[str, Any] = {}
        for rp_id, p in self.points.items():
            entry: dict[str, Any] = {
                "kept_by": list(p.kept_by),
                "bytes_stored": p.bytes_stored,
                "data_bytes": p.data_bytes,
            }
            if p.verification:
                entry["verification"] = p.verification
            if p.verified_at is not None:
                entry["verified_at"] = p.verified_at
            points[rp_id] = entry
        document: dict[str, Any] = {
            "format": DESCRIPTION_FORMAT,
            "vm_id": self.vm_id,
            "vault": self.vault,
            "vm": dict(self.vm),
            "item": None
            if self.item is None
            else {
                "state": self.item.state,
                "policy": self.item.policy,
                "registered_at": self.item.registered_at,
            },
            "points": points,
            "written_at": self.written_at,
        }
        return _dump(document)

    @classmethod
    def decode(cls, data: bytes, what: str = "VM description") -> VmDescription:
        reader = _Reader(what, data)
        vm = reader.field("vm", dict)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in vm.items()):
            raise reader.corrupt("its VM facts must map strings to strings")
        item = None
        found = reader.document.get("item")
        if found is not None:
            if not isinstance(found, dict):
                raise reader.corrupt("its item is not a JSON object")
            policy = found.get("policy")
            if policy is not None and not isinstance(policy, str):
                raise reader.corrupt(f"item policy {policy!r} is not a string")
            item = ItemDescription(
                state=reader.field("state", str, found),
                policy=policy,
                registered_at=reader.time("registered_at", found),
            )
        points: dict[str, PointDescription] = {}
        for rp_id, entry in reader.field("points", dict).items():
            if not isinstance(entry, dict):
                raise reader.corrupt(f"point {rp_id!r} is not a JSON object")
            kept_by = reader.field("kept_by", list, entry)
            if not all(isinstance(rule, str) for rule in kept_by):
                raise reader.corrupt(f"point {rp_id!r}: kept_by should list strings")
            points[rp_id] = PointDescription(
                kept_by=tuple(kept_by),
                bytes_stored=reader.count("bytes_stored", entry),
                data_bytes=reader.count("data_bytes", entry),
                verification=reader.field("verification", str, entry)
                if "verification" in entry
                else "",
                verified_at=reader.time("verified_at", entry) if "verified_at" in entry else None,
            )
        return cls(
            vm_id=reader.field("vm_id", str),
            vault=reader.field("vault", str),
            vm=vm,
            item=item,
            points=points,
            written_at=reader.time("written_at"),
        )


def _dump(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, sort_keys=True, indent=1) + "\n").encode("utf-8")


class _Reader:
    """Typed access to a decoded description; every failure is CorruptData naming it."""

    def __init__(self, what: str, data: bytes) -> None:
        self.what = what
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise self.corrupt(f"not UTF-8 JSON: {error}") from None
        if not isinstance(document, dict):
            raise self.corrupt("not a JSON object")
        self.document: dict[str, Any] = document
        version = self.field("format", int)
        if version > DESCRIPTION_FORMAT:
            raise UnsupportedFormat(what=what, version=version, supported=DESCRIPTION_FORMAT)
        if version < 1:
            raise self.corrupt(f"format {version} does not exist")

    def corrupt(self, detail: str) -> CorruptData:
        return CorruptData(what=self.what, detail=detail)

    def field(self, key: str, kind: type[Any], within: dict[str, Any] | None = None) -> Any:
        document = self.document if within is None else within
        if key not in document:
            raise self.corrupt(f"field {key!r} is missing")
        value = document[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.corrupt(f"field {key!r} should be {kind.__name__}, got {value!r}")
        return value

    def count(self, key: str, within: dict[str, Any]) -> int:
        value: int = self.field(key, int, within)
        if value < 0:
            raise self.corrupt(f"field {key!r} is negative")
        return value

    def time(self, key: str, within: dict[str, Any] | None = None) -> float:
        """A time in POSIX seconds (a JSON number: an integer or a float)."""
        document = self.document if within is None else within
        if key not in document:
            raise self.corrupt(f"field {key!r} is missing")
        value = document[key]
        if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
            raise self.corrupt(f"field {key!r} should be POSIX seconds, got {value!r}")
        return float(value)


__all__ = [
    "DESCRIPTION_FORMAT",
    "VAULT_DESCRIPTION_KEY",
    "VM_DESCRIPTIONS",
    "ItemDescription",
    "PointDescription",
    "PolicyDescription",
    "VaultDescription",
    "VmDescription",
]
