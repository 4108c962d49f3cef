"""Reading a disk: its size, where its data is, and one chunk at a time.

Disks are image files or block devices. Holes in a sparse image (found with SEEK_DATA and
SEEK_HOLE) are never read: a chunk that lies wholly in a hole is a zero chunk without a
single read. Block devices do not report holes; every chunk of theirs is read.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

from shared.digest import ZERO_DIGEST, sha256


def disk_size(fd: int) -> int:
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode):
        return info.st_size
    # A block device's size is where its end is.
    return os.lseek(fd, 0, os.SEEK_END)


def data_chunks(fd: int, size: int, chunk_size: int) -> Iterator[int]:
    """Numbers of the chunks that hold any data, ascending; chunks wholly in holes are left out."""
    count = -(-size // chunk_size)
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past offset
                return
            if exc.errno == errno.EINVAL:  # no hole support (block device): all data
                yield from range(offset // chunk_size, count)
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        first, last = start // chunk_size, (end - 1) // chunk_size
        yield from range(max(first, offset // chunk_size), last + 1)
        offset = (last + 1) * chunk_size


_ZEROS: dict[int, bytes] = {}


def is_zero(data: bytes) -> bool:
    zeros = _ZEROS.get(len(data))
    if zeros is None:
        zeros = _ZEROS.setdefault(len(data), bytes(len(data)))
    return data == zeros


def read_chunk(fd: int, number: int, chunk_size: int, size: int) -> tuple[bytes, bytes]:
    """The chunk's digest (ZERO_DIGEST when all zero) and its bytes; blocking."""
    offset = number * chunk_size
    data = os.pread(fd, min(chunk_size, size - offset), offset)
    if is_zero(data):
        return ZERO_DIGEST, b""
    return sha256(data), data
