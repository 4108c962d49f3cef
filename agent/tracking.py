"""Changed-block tracking: the clone kept from a disk's last backup, and whether the next
backup may read only what changed since it.

After a backup whose every disk was read from a reflink clone, each clone is kept beside its
image as `.<image>.coffer-tracked-<recovery point id>`, with a state file
`.<image>.coffer-tracking.json` that names it and records what the clone was at that moment
(inode, size, mtime, ctime), the chunk size and chunk-id key label its chunks were hashed with,
and when the chain of tracked backups last read the disk in full. Both live in the image's own
file system, so they survive agent restarts and reboots. The next backup compares the kept
clone's extent map with its new clone's (`agent.changed_blocks`): only the chunks that touch a
changed range are read; every other chunk's digest is the previous recovery point's. When it
succeeds, its clone replaces the kept one; when it fails, the kept one stays and the new clone
is released as any snapshot is.

Space: a kept clone shares every block with the image at first and holds, later, the blocks
the VM has overwritten since the last backup (at most the disk's size, in practice what
changed between two backups). A vault with `full_read_days` 0 keeps no clone, and the next
backup after that is set removes the one kept.

Correctness first (`full_read_reason`, a pure function): the disk is read in full, and the
reason recorded on the job, when there is no kept clone, it was read for another recovery
point than the one this backup builds on (that one was deleted, pruned, or its backup never
committed), it was modified, the disk was resized, the chunk size or chunk-id key changed,
the snapshot is not a reflink clone, the controller distrusts the previous point, or the
vault's periodic full read is due. Chunks of the previous index masked by the controller
(missing or damaged in the datastore) are read too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.changed_blocks import FiemapUnsupported, changed_chunks, extents
from shared.digest import DIGEST_SIZE, MASKED_DIGEST

log = logging.getLogger(__name__)

TRACKED_MARK = ".coffer-tracked-"
STATE_SUFFIX = ".coffer-tracking.json"
REFLINK = "reflink"
DAY = 86400.0


@dataclass(frozen=True)
class FileIdentity:
    """What a kept clone was when it was kept: nothing of ours ever writes to it, so any
    change here means someone else did."""

    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @staticmethod
    def of(path: Path) -> FileIdentity:
        info = os.stat(path)
        return FileIdentity(info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


@dataclass(frozen=True)
class KeptClone:
    """The state file of a disk's kept clone."""

    recovery_point_id: str
    clone: str  # its file name, beside the image
    identity: FileIdentity
    chunk_size: int
    chunk_hash: str  # the label of the hash and key its chunks were named with
    full_read_at: float  # POSIX seconds: when the chain of tracked backups last read in full

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> KeptClone:
        raw: dict[str, Any] = json.loads(text)
        return KeptClone(
            recovery_point_id=str(raw["recovery_point_id"]),
            clone=str(raw["clone"]),
            identity=FileIdentity(**{k: int(v) for k, v in raw["identity"].items()}),
            chunk_size=int(raw["chunk_size"]),
            chunk_hash=str(raw["chunk_hash"]),
            full_read_at=float(raw["full_read_at"]),
        )


@dataclass(frozen=True)
class Request:
    """What the backup command asks of tracking (from the controller)."""

    recovery_point_id: str  # the point this backup commits as: names the clone it keeps
    previous_recovery_point_id: str
    full_read_days: int  # 0: tracking is off
    controller_reason: str = ""  # the controller wants a full read, and why


def state_path(image: Path) -> Path:
    return image.parent / f".{image.name}{STATE_SUFFIX}"


def clone_path(image: Path, rp_id: str) -> Path:
    return image.parent / f".{image.name}{TRACKED_MARK}{rp_id}"


def _tracked_files(image: Path) -> Iterator[Path]:
    yield from image.parent.glob(f".{image.name}{TRACKED_MARK}*")


def load(image: Path) -> KeptClone | None:
    """The kept clone's state; None when there is none or it cannot be read (a full read)."""
    try:
        return KeptClone.from_json(state_path(image).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("tracking state of %s unreadable (%s): reading in full", image, exc)
        return None


def full_read_reason(
    request: Request,
    kept: KeptClone | None,
    kept_now: FileIdentity | None,
    *,
    provider: str,
    size: int,
    kept_size: int | None,
    chunk_size: int,
    chunk_hash: str,
    now: float,
) -> str:
    """Why this disk must be read in full; '' when only its changed chunks need reading.

    `kept_now`: the kept clone's identity now (None: it is gone); `kept_size`: the disk size it
    was kept at (its file's size); `now`: POSIX seconds."""
    if request.full_read_days <= 0:
        return "changed-block tracking is off in the vault (full read every backup)"
    if request.controller_reason:
        return request.controller_reason
    if provider != REFLINK:
        return f"the disk's snapshot is {provider or 'none'}, not a reflink clone"
    if not request.previous_recovery_point_id:
        return "there is no previous recovery point to build on"
    if kept is None:
        return "no clone was kept from the previous backup (the first backup that tracks)"
    if kept.recovery_point_id != request.previous_recovery_point_id:
        return (
            f"the kept clone was read for recovery point {kept.recovery_point_id}, but this "
            f"backup builds on {request.previous_recovery_point_id} (the kept one was deleted, "
            "pruned or never committed)"
        )
    if kept_now is None:
        return f"the kept clone {kept.clone} is missing"
    if kept_now != kept.identity:
        return f"the kept clone {kept.clone} was modified after it was kept"
    if kept_size != size:
        return f"the disk was resized from {kept_size} to {size} bytes"
    if kept.chunk_size != chunk_size:
        return f"the chunk size changed from {kept.chunk_size} to {chunk_size} bytes"
    if kept.chunk_hash != chunk_hash:
        return "the vault's chunk-id key changed"
    age = now - kept.full_read_at
    if age >= request.full_read_days * DAY or age < 0:
        return (
            f"periodic full read: the last was {age / DAY:.1f} days ago (the vault reads in "
            f"full every {request.full_read_days} days)"
        )
    return ""


@dataclass
class Plan:
    """How one disk is read: the chunks to read (None: all), or why all of them are."""

    to_read: bytearray | None
    reason: str = ""
    kept: KeptClone | None = None

    @property
    def tracking(self) -> bool:
        return self.to_read is not None

    def must_read(self, number: int) -> bool:
        return self.to_read is None or bool(self.to_read[number])


def plan(
    request: Request,
    image: Path,
    snapshot: Path,
    *,
    provider: str,
    size: int,
    chunk_size: int,
    chunk_hash: str,
    previous: bytes,
    now: float,
) -> Plan:
    """Which chunks of the disk to read, comparing the kept clone with the new one; blocking."""
    kept = load(image) if request.full_read_days > 0 else None
    kept_now = None
    if kept is not None:
        with contextlib.suppress(FileNotFoundError):
            kept_now = FileIdentity.of(image.parent / kept.clone)
    reason = full_read_reason(
        request,
        kept,
        kept_now,
        provider=provider,
        size=size,
        kept_size=kept_now.size if kept_now else None,
        chunk_size=chunk_size,
        chunk_hash=chunk_hash,
        now=now,
    )
    if reason:
        return Plan(None, reason, kept)
    assert kept is not None
    count = -(-size // chunk_size)
    if len(previous) != count * DIGEST_SIZE:
        return Plan(None, "the previous recovery point's index of the disk could not be used")
    try:
        with (
            open(image.parent / kept.clone, "rb") as old,
            open(snapshot, "rb") as new,
        ):
            to_read = changed_chunks(
                extents(old.fileno(), size), extents(new.fileno(), size), size, chunk_size
            )
    except FiemapUnsupported as exc:
        return Plan(None, f"the file system cannot map extents ({exc})", kept)
    except ValueError as exc:
        return Plan(None, f"the extent maps could not be compared ({exc})", kept)
    # A chunk the controller masked (missing or damaged in the datastore) is read and sent
    # again even when its blocks did not change.
    for number in range(count):
        if previous[number * DIGEST_SIZE : (number + 1) * DIGEST_SIZE] == MASKED_DIGEST:
            to_read[number] = 1
    return Plan(to_read, "", kept)


def _write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def keep(
    image: Path,
    snapshot: Path,
    *,
    rp_id: str,
    chunk_size: int,
    chunk_hash: str,
    full_read_at: float,
) -> None:
    """After a successful backup: its clone becomes the kept one, the previous one goes; blocking.

    The order makes every crash safe: the clone is renamed, the state file names it, and only
    then is the old clone removed (a clone the state does not name is removed next time)."""
    target = clone_path(image, rp_id)
    os.rename(snapshot, target)
    kept = KeptClone(
        recovery_point_id=rp_id,
        clone=target.name,
        identity=FileIdentity.of(target),
        chunk_size=chunk_size,
        chunk_hash=chunk_hash,
        full_read_at=full_read_at,
    )
    _write_atomically(state_path(image), kept.to_json())
    _sync_directory(image.parent)
    for other in _tracked_files(image):
        if other != target:
            other.unlink(missing_ok=True)


def drop(image: Path) -> None:
    """Remove a disk's kept clone and its state (tracking off, or the disk not cloned)."""
    state_path(image).unlink(missing_ok=True)
    for other in _tracked_files(image):
        other.unlink(missing_ok=True)
