"""Changed blocks: which chunks of a disk differ between two reflink clones of its image, from
their extent maps (FIEMAP).

A reflink file system (XFS made with reflink=1, btrfs) never writes a block in place while two
files share it: a write to the image goes to a new block, and the clone kept from the last
backup keeps the old one. So a range at which the kept clone and a new clone map the *same*
physical blocks, both flagged shared, holds the same bytes in both files: it has not changed
since the kept clone was read. Everything else (extents moved by copy-on-write, holes punched
or filled, extents of unknown, delayed, inline, encoded or unaligned placement) counts as
changed, and every chunk that touches it is read again. Erring that way costs reads, never
correctness.

`extents(fd)` reads a file's map with the FS_IOC_FIEMAP ioctl, `EXTENTS_PER_CALL` at a time
(the buffer is bounded whatever the file's fragmentation), syncing the file first
(FIEMAP_FLAG_SYNC: delayed allocations would otherwise have no place yet). `changed_chunks`
is the pure comparison: two sorted extent lists in, one flag per chunk out; it walks both
lists once, so neither map is held whole in memory.
"""

from __future__ import annotations

import errno
import fcntl
import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1

EXTENT_LAST = 0x1
EXTENT_UNKNOWN = 0x2
EXTENT_DELALLOC = 0x4
EXTENT_ENCODED = 0x8
EXTENT_DATA_ENCRYPTED = 0x80
EXTENT_NOT_ALIGNED = 0x100
EXTENT_DATA_INLINE = 0x200
EXTENT_DATA_TAIL = 0x400
EXTENT_UNWRITTEN = 0x800
EXTENT_MERGED = 0x1000
EXTENT_SHARED = 0x2000

# An extent with any of these has no plain, block-for-block place on disk to compare.
UNCOMPARABLE = (
    EXTENT_UNKNOWN
    | EXTENT_DELALLOC
    | EXTENT_ENCODED
    | EXTENT_DATA_ENCRYPTED
    | EXTENT_NOT_ALIGNED
    | EXTENT_DATA_INLINE
    | EXTENT_DATA_TAIL
)
# Flags that say nothing of the content: where the list ends, how the kernel merged records,
# that the blocks are shared (required of both sides, checked on its own).
NOT_CONTENT = EXTENT_LAST | EXTENT_MERGED | EXTENT_SHARED

_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQ16xI12x")  # fe_logical, fe_physical, fe_length, ..., fe_flags
EXTENTS_PER_CALL = 1024  # 56 KiB of buffer per ioctl


class FiemapUnsupported(Exception):
    """The file system cannot report a file's extent map (the backup then reads in full)."""


class Extent(NamedTuple):
    # A tuple, not a frozen dataclass: a map has thousands of extents, and building a frozen
    # dataclass (a setattr per field) was most of the time a plan took.
    logical: int
    physical: int
    length: int
    flags: int = 0

    @property
    def end(self) -> int:
        return self.logical + self.length


def extents(fd: int, size: int) -> Iterator[Extent]:
    """The extents of the open file `fd` within its first `size` bytes, in logical order;
    blocking. Raises FiemapUnsupported when the file system has no FIEMAP."""
    start, flags = 0, FIEMAP_FLAG_SYNC
    while start < size:
        buffer = bytearray(_HEADER.size + _EXTENT.size * EXTENTS_PER_CALL)
        _HEADER.pack_into(buffer, 0, start, size - start, flags, 0, EXTENTS_PER_CALL, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buffer, True)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EBADR, errno.EINVAL):
                raise FiemapUnsupported(f"FIEMAP: {exc.strerror}") from exc
            raise
        flags = 0  # synced once is enough: nobody writes to a clone
        mapped = _HEADER.unpack_from(buffer, 0)[3]
        if mapped == 0:
            return
        extent = Extent(0, 0, 0)
        for fields in _EXTENT.iter_unpack(
            memoryview(buffer)[_HEADER.size : _HEADER.size + mapped * _EXTENT.size]
        ):
            extent = Extent._make(fields)
            yield extent
        if extent.flags & EXTENT_LAST or extent.end <= start:
            return
        start = extent.end


def _same_blocks(old: Extent, new: Extent) -> bool:
    """Whether, where both cover the same logical range, `old` and `new` are the same blocks."""
    if (old.flags | new.flags) & UNCOMPARABLE:
        return False
    if not (old.flags & new.flags & EXTENT_SHARED):
        return False
    if (old.flags & ~NOT_CONTENT) != (new.flags & ~NOT_CONTENT):
        return False  # e.g. unwritten in one, written in the other
    return old.physical - old.logical == new.physical - new.logical


class _Cursor:
    """Walks one sorted extent list: the extent covering a position, or the next one."""

    def __init__(self, items: Iterable[Extent]) -> None:
        self._items = iter(items)
        self._last_end = 0
        self.current: Extent | None = None
        self._next()

    def _next(self) -> None:
        for extent in self._items:
            if extent.length <= 0:
                continue
            if extent.logical < self._last_end:
                raise ValueError(f"extents overlap or are out of order at {extent.logical}")
            self._last_end = extent.end
            self.current = extent
            return
        self.current = None

    def at(self, position: int) -> Extent | None:
        """The extent covering `position` (None: a hole there); skips those that end before."""
        while self.current is not None and self.current.end <= position:
            self._next()
        if self.current is not None and self.current.logical <= position:
            return self.current
        return None

    def next_boundary(self, position: int, limit: int) -> int:
        """Where what `at(position)` said stops being true (at most `limit`)."""
        if self.current is None:
            return limit
        if self.current.logical <= position:
            return min(self.current.end, limit)
        return min(self.current.logical, limit)


def changed_chunks(
    old: Iterable[Extent], new: Iterable[Extent], size: int, chunk_size: int
) -> bytearray:
    """One byte per chunk of a `size`-byte disk: 1 where the chunk touches a range whose blocks
    differ between the kept clone (`old`) and the new one (`new`), 0 where it holds the same
    blocks or holes in both. Both lists in logical order; ValueError if they overlap."""
    flags = bytearray(-(-size // chunk_size))
    before, after = _Cursor(old), _Cursor(new)
    position = 0
    while position < size:
        was, now = before.at(position), after.at(position)
        end = min(before.next_boundary(position, size), after.next_boundary(position, size))
        same = (was is None and now is None) or (
            was is not None and now is not None and _same_blocks(was, now)
        )
        if not same:
            flags[position // chunk_size : (end - 1) // chunk_size + 1] = b"\x01" * (
                (end - 1) // chunk_size + 1 - position // chunk_size
            )
        position = end
    return flags
